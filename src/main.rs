//! The `zae-limiter` command: flags, environment and output only; the work is in the library.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
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
    /// DynamoDB table name.
    #[arg(long, env = "ZAE_LIMITER_TABLE", default_value = "zae-limiter")]
    table: String,
    /// AWS region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    region: String,
    /// Custom DynamoDB endpoint, e.g. DynamoDB Local at http://127.0.0.1:8000.
    #[arg(long, env = "ZAE_LIMITER_ENDPOINT_URL")]
    endpoint_url: Option<String>,
}

impl TableArgs {
    fn settings(&self) -> DynamoSettings {
        let mut settings = DynamoSettings::new(&self.table);
        settings.region = self.region.clone();
        settings.endpoint_url = self.endpoint_url.clone();
        settings
    }

    /// Where the table is, for messages.
    fn place(&self) -> String {
        match &self.endpoint_url {
            Some(url) => format!("table {:?} at {url}", self.table),
            None => format!("table {:?} in {}", self.table, self.region),
        }
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
            let client = args.settings().client().await;
            let fail = |e| format!("deploy of {} failed: {e}", args.place());
            match table::deploy(&client, &args.table).await.map_err(fail)? {
                Deployed::Created => println!("deployed {}", args.place()),
                Deployed::AlreadyDeployed => println!("already deployed: {}", args.place()),
            }
        }
        Command::Status(args) => {
            let client = args.settings().client().await;
            let report = table::status(&client, &args.table)
                .await
                .map_err(|e| format!("status of {} failed: {e}", args.place()))?;
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
            if !yes {
                return Err(format!(
                    "refusing to delete {} without --yes (this deletes every limit, entity and bucket in it)",
                    args.place()
                ));
            }
            let client = args.settings().client().await;
            table::delete(&client, &args.table)
                .await
                .map_err(|e| format!("delete of {} failed: {e}", args.place()))?;
            println!("deleted {}", args.place());
        }
    }
    Ok(())
}
