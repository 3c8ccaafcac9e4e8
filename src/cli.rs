//! The `zae-limiter` command: the daemon (`serve`), its client verbs (`acquire`, `lease`), the
//! administration through a running daemon (`entity`, `limits`, `audit`, `namespace`, `usage`)
//! and the table's life (`deploy`, `status`, `delete`). The binary only parses the arguments
//! ([`args::Cli`]) and hands them to [`main`].

pub mod acquire;
pub mod admin;
pub mod args;
pub mod manifest;
pub mod output;
pub mod serve;
pub mod table;

use std::process::ExitCode;

pub use admin::{AdminOp, PRINCIPAL_HEADER};
pub use args::Cli;
pub use output::{Output, rfc3339};

use crate::client::ClientError;
use crate::proto;
use crate::store::StoreError;
use args::Command;

/// Why a command failed, printed as `error: ...` with exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The arguments ask for something refused as it stands (a deletion without `--yes`).
    #[error("{0}")]
    Usage(String),
    /// The configuration cannot be used.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The daemon refused.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The table's store refused, with what was being done.
    #[error("{context}: {source}")]
    Store { context: String, source: StoreError },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot write the man page: {0}")]
    Output(std::io::Error),
    /// The daemon could not start or failed.
    #[error("{0}")]
    Serve(String),
}

impl CliError {
    pub(crate) fn store(context: String, source: StoreError) -> Self {
        Self::Store { context, source }
    }
}

/// Runs a parsed command line; returns the exit status (errors are printed on stderr).
pub fn main(cli: Cli) -> ExitCode {
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode, CliError> {
    use clap::CommandFactory;
    match command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "zae-limiter",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map(|()| ExitCode::SUCCESS)
            .map_err(CliError::Output),
        // The daemon builds the runtime its configuration asks for.
        Command::Serve(args) => serve::serve(*args).map(|()| ExitCode::SUCCESS),
        other => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CliError::Runtime)?
            .block_on(client_command(other)),
    }
}

/// A command spoken to a running daemon or to the table.
async fn client_command(command: Command) -> Result<ExitCode, CliError> {
    match command {
        Command::Completions { .. } | Command::Man | Command::Serve(_) => {
            unreachable!("run() handles them without a client runtime")
        }
        Command::Acquire(args) => return acquire::acquire(args).await,
        Command::Lease { op, socket } => acquire::lease(&socket, op).await?,
        Command::Entity { op, daemon } => admin::print(daemon, op.into()).await?,
        Command::Limits { op, daemon } => match op.manifest() {
            Some((verb, file)) => {
                return Ok(ExitCode::from(manifest::run(&daemon, &file, verb).await?));
            }
            None => admin::print(daemon, op.into()).await?,
        },
        Command::Namespace { op, daemon } => admin::print(daemon, op.try_into()?).await?,
        Command::FailurePolicy { op, daemon } => admin::print(daemon, op.into()).await?,
        Command::Gate { op, daemon } => admin::print(daemon, op.into()).await?,
        Command::Cascade { op, daemon } => admin::print(daemon, op.into()).await?,
        Command::Bucket { op, daemon } => admin::print(daemon, op.into()).await?,
        Command::Capacity {
            resource,
            limit,
            parents_only,
            daemon,
        } => {
            let request = proto::ResourceCapacityRequest {
                resource,
                limit_name: limit,
                parents_only,
                ..Default::default()
            };
            admin::print(daemon, admin::AdminOp::Capacity(request)).await?
        }
        Command::Usage {
            entity,
            resource,
            period,
            from_ms,
            to_ms,
            daemon,
        } => {
            let request = proto::UsageRequest {
                namespace: String::new(),
                entity_id: entity,
                resource,
                period,
                from_ms,
                to_ms,
                ..Default::default()
            };
            admin::print(daemon, AdminOp::Usage(request)).await?;
        }
        Command::Audit {
            subject,
            page_size,
            page,
            daemon,
        } => {
            let op = AdminOp::Audit {
                subject,
                page_size,
                page,
            };
            admin::print(daemon, op).await?;
        }
        Command::Deploy(args) => table::deploy(&args).await?,
        Command::Status(args) => table::status(&args).await?,
        Command::Delete { table: args, yes } => table::delete(&args, yes).await?,
    }
    Ok(ExitCode::SUCCESS)
}
