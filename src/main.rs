//! The `zae-limiter` command: flags, environment and output only; the work is in the library.

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use zae_limiter::config::Config;
use zae_limiter::store::dynamodb::DynamoSettings;
use zae_limiter::store::dynamodb::table::{self, Deployed};

#[derive(Parser)]
#[command(
    name = "zae-limiter",
    version,
    about = "Rate limiting for LLM and API traffic, backed by DynamoDB"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the DynamoDB table (keys, on-demand billing, parent index, TTL); idempotent.
    Deploy(TableArgs),
    /// Report the table's state, item count and schema version.
    Status(TableArgs),
    /// Delete the table and everything in it.
    Delete {
        #[command(flatten)]
        table: TableArgs,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
struct TableArgs {
    /// Configuration file (TOML); see config/zae-limiter.toml.
    #[arg(long, env = "ZAE_LIMITER_CONFIG")]
    config: Option<PathBuf>,
    /// DynamoDB table name [default: zae-limiter].
    #[arg(long, env = "ZAE_LIMITER_TABLE")]
    table: Option<String>,
    /// AWS region [default: us-east-1].
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    /// Custom DynamoDB endpoint, e.g. DynamoDB Local at http://127.0.0.1:8000.
    #[arg(long, env = "ZAE_LIMITER_ENDPOINT_URL")]
    endpoint_url: Option<String>,
}

impl TableArgs {
    /// Flags and environment over the configuration file over the defaults.
    fn settings(&self) -> Result<DynamoSettings, String> {
        let config = match &self.config {
            Some(path) => Config::load(path).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        let mut settings = config.dynamodb.settings();
        if let Some(table) = &self.table {
            settings.table = table.clone();
        }
        if let Some(region) = &self.region {
            settings.region = region.clone();
        }
        if let Some(url) = &self.endpoint_url {
            settings.endpoint_url = Some(url.clone());
        }
        Ok(settings)
    }
}

/// Where the table is, for messages.
fn place(settings: &DynamoSettings) -> String {
    match &settings.endpoint_url {
        Some(url) => format!("table {:?} at {url}", settings.table),
        None => format!("table {:?} in {}", settings.table, settings.region),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Deploy(args) => {
            let settings = args.settings()?;
            let client = settings.client().await;
            let place = place(&settings);
            match table::deploy(&client, &settings.table)
                .await
                .map_err(|e| format!("deploy of {place} failed: {e}"))?
            {
                Deployed::Created => println!("deployed {place}"),
                Deployed::AlreadyDeployed => println!("already deployed: {place}"),
            }
        }
        Command::Status(args) => {
            let settings = args.settings()?;
            let client = settings.client().await;
            let report = table::status(&client, &settings.table)
                .await
                .map_err(|e| format!("status of {} failed: {e}", place(&settings)))?;
            println!("table:          {}", report.table);
            println!("status:         {}", report.status);
            println!(
                "items:          {} (as reported by DynamoDB)",
                report.item_count
            );
            println!("size:           {} bytes", report.size_bytes);
            println!(
                "parent index:   {}",
                if report.parent_index {
                    "present"
                } else {
                    "missing"
                }
            );
            println!("ttl:            {}", report.ttl);
            match report.schema_version {
                Some(v) => println!("schema version: {v}"),
                None => println!("schema version: none (not deployed by zae-limiter)"),
            }
        }
        Command::Delete { table: args, yes } => {
            let settings = args.settings()?;
            let place = place(&settings);
            if !yes {
                return Err(format!(
                    "refusing to delete {place} without --yes (this deletes every limit, entity and bucket in it)"
                ));
            }
            let client = settings.client().await;
            table::delete(&client, &settings.table)
                .await
                .map_err(|e| format!("delete of {place} failed: {e}"))?;
            println!("deleted {place}");
        }
    }
    Ok(())
}
