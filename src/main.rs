//! The `zae-limiter` command: flags, environment and output only; the work is in the library.

use std::process::ExitCode;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use zae_limiter::Limit;
use zae_limiter::cli::{self, AdminOp, Output};
use zae_limiter::client::{Acquire, Client, ClientError};
use zae_limiter::config::{Backend, Config, FailurePolicy};
use zae_limiter::proto;
use zae_limiter::server;
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
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to standard output.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to standard output: `zae-limiter man > zae-limiter.1`.
    Man,
    /// Run the daemon: gRPC on a Unix socket, Prometheus metrics, the configured store.
    Serve(Box<ServeArgs>),
    /// Acquire from a running daemon, then commit (or roll back, or keep the lease open).
    /// Exit status: 0 admitted, 3 over limit, 1 error.
    Acquire(AcquireArgs),
    /// Create, show, delete entities and list their children (through a running daemon).
    Entity {
        #[command(subcommand)]
        op: EntityOp,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Set, show or delete stored limits: system default, resource default (--resource), entity
    /// default (--entity) or entity + resource (both).
    Limits {
        #[command(subcommand)]
        op: LimitsOp,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Audit records of an entity (or `#resource:NAME`, `#system`), newest first.
    Audit {
        subject: String,
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        /// The `next_page` token of the previous page.
        #[arg(long, default_value = "")]
        page: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Register, list or delete namespaces (through a running daemon).
    Namespace {
        #[command(subcommand)]
        op: NamespaceOp,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Hourly or daily consumption of an entity (after adjustments and rollbacks).
    Usage {
        entity: String,
        #[arg(long)]
        resource: Option<String>,
        /// `hour` or `day`.
        #[arg(long, default_value = "hour")]
        period: String,
        /// Snapshots starting at or after this time (ms since the epoch) [default: 24 h ago].
        #[arg(long, default_value_t = 0)]
        from_ms: i64,
        /// Snapshots starting before this time (ms since the epoch) [default: now].
        #[arg(long, default_value_t = 0)]
        to_ms: i64,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Adjust, commit or roll back an open lease on a running daemon.
    Lease {
        #[command(subcommand)]
        op: LeaseOp,
        #[arg(long, env = "ZAE_LIMITER_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
        socket: PathBuf,
    },
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

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_SOCKET: &str = "/tmp/zae-limiter.sock";

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    table: TableArgs,
    /// Unix socket to listen on [default: /tmp/zae-limiter.sock].
    #[arg(long, env = "ZAE_LIMITER_SOCKET")]
    socket: Option<PathBuf>,
    /// Also listen on this loopback TCP address.
    #[arg(long, env = "ZAE_LIMITER_TCP")]
    tcp: Option<SocketAddr>,
    /// Prometheus /metrics address [default: 127.0.0.1:9464].
    #[arg(long, env = "ZAE_LIMITER_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Serve no /metrics.
    #[arg(long)]
    no_metrics: bool,
    /// Store backend [default: memory].
    #[arg(long, value_enum, env = "ZAE_LIMITER_BACKEND")]
    backend: Option<Backend>,
    /// What to answer when the store cannot be reached in time [default: block].
    #[arg(long, value_enum, env = "ZAE_LIMITER_FAILURE_POLICY")]
    failure_policy: Option<FailurePolicy>,
    /// Runtime threads; 0: one per core [default: 0].
    #[arg(long, env = "ZAE_LIMITER_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Exit with an error when the store cannot serve at start-up (missing table, no
    /// credentials, unreachable), instead of answering NOT_SERVING until it can.
    #[arg(long)]
    require_store: bool,
}

#[derive(Args)]
struct AcquireArgs {
    #[arg(long, env = "ZAE_LIMITER_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[arg(long, default_value = "")]
    namespace: String,
    #[arg(long)]
    entity: String,
    #[arg(long)]
    resource: String,
    /// NAME=TOKENS to consume (repeatable).
    #[arg(long, value_parser = parse_amount)]
    consume: Vec<(String, i64)>,
    /// NAME=RATE/PERIOD[,burst=N] limits for this call, e.g. rpm=100/1m (default: stored limits).
    #[arg(long)]
    limit: Vec<Limit>,
    /// NAME=TOKENS of extra usage to record before committing (repeatable; may be negative).
    #[arg(long, value_parser = parse_amount, allow_hyphen_values = true)]
    adjust: Vec<(String, i64)>,
    /// Roll back instead of committing.
    #[arg(long, conflicts_with = "keep_open")]
    rollback: bool,
    /// Leave the lease open and print its id (close it with `zae-limiter lease`).
    #[arg(long)]
    keep_open: bool,
}

#[derive(Args)]
struct DaemonArgs {
    #[arg(long, env = "ZAE_LIMITER_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    #[arg(long, default_value = "", global = true)]
    namespace: String,
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value = "table", global = true)]
    output: Output,
    /// Your name for the audit records (beside the uid the daemon sees).
    #[arg(long, env = "ZAE_LIMITER_PRINCIPAL", global = true)]
    principal: Option<String>,
}

#[derive(Subcommand)]
enum EntityOp {
    Create {
        id: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        parent: Option<String>,
        /// Acquires for this entity also charge its parent.
        #[arg(long)]
        cascade: bool,
        /// KEY=VALUE (repeatable).
        #[arg(long, value_parser = parse_pair)]
        meta: Vec<(String, String)>,
    },
    Get {
        id: String,
    },
    /// Delete an entity with its buckets and entity-level limits.
    Delete {
        id: String,
        /// Delete even if it has children.
        #[arg(long)]
        force: bool,
    },
    /// Give an entity another parent (or none).
    Move {
        id: String,
        #[arg(long, required_unless_present = "no_parent")]
        parent: Option<String>,
        #[arg(long, conflicts_with = "parent")]
        no_parent: bool,
    },
    Children {
        id: String,
    },
}

#[derive(Args)]
struct ScopeArgs {
    #[arg(long)]
    entity: Option<String>,
    #[arg(long)]
    resource: Option<String>,
}

impl ScopeArgs {
    fn scope(self) -> proto::LimitScope {
        proto::LimitScope {
            entity_id: self.entity,
            resource: self.resource,
        }
    }
}

#[derive(Subcommand)]
enum NamespaceOp {
    /// Register a namespace (a daemon configured with namespaces = ["*"] then accepts it).
    Create {
        name: String,
    },
    List,
    /// Delete a namespace with every entity, limit, bucket, audit record and usage snapshot in it.
    Delete {
        name: String,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum LimitsOp {
    Set {
        #[command(flatten)]
        scope: ScopeArgs,
        /// NAME=RATE/PERIOD[,burst=N] (repeatable), e.g. rpm=100/1m.
        #[arg(long, required = true)]
        limit: Vec<Limit>,
    },
    Get {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    Delete {
        #[command(flatten)]
        scope: ScopeArgs,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

#[derive(Subcommand)]
enum LeaseOp {
    /// Record extra usage on an open lease.
    Adjust {
        lease_id: String,
        /// NAME=TOKENS (repeatable; may be negative).
        #[arg(long, value_parser = parse_amount, allow_hyphen_values = true, required = true)]
        delta: Vec<(String, i64)>,
    },
    /// Keep an open lease alive for another lease TTL (every call on a lease does).
    Renew { lease_id: String },
    /// Close a lease, writing its adjustments.
    Commit { lease_id: String },
    /// Close a lease, giving back what it acquired.
    Rollback { lease_id: String },
}

fn parse_amount(s: &str) -> Result<(String, i64), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=TOKENS"))?;
    let n = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {n:?} is not a whole number"))?;
    Ok((name.trim().to_owned(), n))
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
    fn config(&self) -> Result<Config, String> {
        match &self.config {
            Some(path) => Config::load(path).map_err(|e| e.to_string()),
            None => Ok(Config::default()),
        }
    }

    /// Flags and environment over the configuration file over the defaults.
    fn settings(&self) -> Result<DynamoSettings, String> {
        self.settings_from(&self.config()?)
    }

    fn settings_from(&self, config: &Config) -> Result<DynamoSettings, String> {
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
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "zae-limiter",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            use clap::CommandFactory;
            return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write the man page: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    if let Command::Serve(args) = cli.command {
        return match serve(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("error: {message}");
                ExitCode::FAILURE
            }
        };
    }
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
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Serve(_) | Command::Completions { .. } | Command::Man => {
            unreachable!("handled before the runtime starts")
        }
        Command::Acquire(args) => return acquire(args).await,
        Command::Entity { op, daemon } => {
            let op = match op {
                EntityOp::Create {
                    id,
                    name,
                    parent,
                    cascade,
                    meta,
                } => AdminOp::CreateEntity {
                    id,
                    name,
                    parent,
                    cascade,
                    metadata: meta.into_iter().collect(),
                },
                EntityOp::Get { id } => AdminOp::GetEntity(id),
                EntityOp::Delete { id, force } => AdminOp::DeleteEntity { id, force },
                EntityOp::Move { id, parent, .. } => AdminOp::MoveEntity { id, parent },
                EntityOp::Children { id } => AdminOp::Children(id),
            };
            admin(daemon, op).await?;
        }
        Command::Limits { op, daemon } => {
            let op = match op {
                LimitsOp::Set { scope, limit } => AdminOp::SetLimits {
                    scope: scope.scope(),
                    limits: limit,
                },
                LimitsOp::Get { scope } => AdminOp::GetLimits(scope.scope()),
                LimitsOp::Delete { scope } => AdminOp::DeleteLimits(scope.scope()),
            };
            admin(daemon, op).await?;
        }
        Command::Namespace { op, daemon } => {
            let op = match op {
                NamespaceOp::Create { name } => AdminOp::CreateNamespace(name),
                NamespaceOp::List => AdminOp::ListNamespaces,
                NamespaceOp::Delete { name, yes } => {
                    if !yes {
                        return Err(format!(
                            "refusing to delete namespace {name:?} and everything in it without --yes"
                        ));
                    }
                    AdminOp::DeleteNamespace(name)
                }
            };
            admin(daemon, op).await?;
        }
        Command::Usage {
            entity,
            resource,
            period,
            from_ms,
            to_ms,
            daemon,
        } => {
            let op = AdminOp::Usage(proto::UsageRequest {
                namespace: String::new(),
                entity_id: entity,
                resource,
                period,
                from_ms,
                to_ms,
            });
            admin(daemon, op).await?;
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
            admin(daemon, op).await?;
        }
        Command::Lease { op, socket } => {
            let client = Client::connect(&socket).await.map_err(|e| e.to_string())?;
            let mut raw = client.raw();
            let result = match op {
                LeaseOp::Adjust { lease_id, delta } => raw
                    .adjust(proto::AdjustRequest {
                        lease_id,
                        delta: delta.into_iter().collect(),
                    })
                    .await
                    .map(drop),
                LeaseOp::Renew { lease_id } => {
                    raw.renew(proto::LeaseRequest { lease_id }).await.map(drop)
                }
                LeaseOp::Commit { lease_id } => {
                    raw.commit(proto::LeaseRequest { lease_id }).await.map(drop)
                }
                LeaseOp::Rollback { lease_id } => raw
                    .rollback(proto::LeaseRequest { lease_id })
                    .await
                    .map(drop),
            };
            result.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            println!("ok");
        }
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
    Ok(ExitCode::SUCCESS)
}

async fn admin(daemon: DaemonArgs, op: AdminOp) -> Result<(), String> {
    let client = Client::connect(&daemon.socket)
        .await
        .map_err(|e| e.to_string())?;
    let output = cli::run(
        &client,
        &daemon.namespace,
        daemon.principal.as_deref(),
        op,
        daemon.output,
    )
    .await?;
    println!("{output}");
    Ok(())
}

/// Exit status of `acquire` when the request is over limit.
const OVER_LIMIT: u8 = 3;

async fn acquire(args: AcquireArgs) -> Result<ExitCode, String> {
    let client = Client::connect(&args.socket)
        .await
        .map_err(|e| e.to_string())?;
    let mut request = Acquire::new(&args.entity, &args.resource)
        .namespace(&args.namespace)
        .limits(&args.limit);
    for (name, tokens) in &args.consume {
        request = request.consume(name, *tokens);
    }
    let mut lease = match client.acquire(request).await {
        Ok(lease) => lease,
        Err(ClientError::OverLimit {
            retry_after,
            violations,
            refused_by,
        }) => {
            let violations: Vec<_> = violations
                .iter()
                .map(|v| {
                    serde_json::json!({
                        "limit": v.limit,
                        "available": v.available,
                        "requested": v.requested,
                        "retry_after_ms": v.retry_after.map(|d| d.as_millis() as u64),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "allowed": false,
                    "refused_by": refused_by,
                    "retry_after_ms": retry_after.map(|d| d.as_millis() as u64),
                    "violations": violations,
                })
            );
            return Ok(ExitCode::from(OVER_LIMIT));
        }
        Err(e) => return Err(e.to_string()),
    };
    if !args.adjust.is_empty() {
        lease
            .adjust(args.adjust.iter().map(|(n, t)| (n.as_str(), *t)))
            .await
            .map_err(|e| e.to_string())?;
    }
    let id = lease.id().to_owned();
    let closed = if args.keep_open {
        lease.into_id();
        "open"
    } else if args.rollback {
        lease.rollback().await.map_err(|e| e.to_string())?;
        "rolled_back"
    } else {
        lease.commit().await.map_err(|e| e.to_string())?;
        "committed"
    };
    println!(
        "{}",
        serde_json::json!({ "allowed": true, "lease_id": id, "lease": closed })
    );
    Ok(ExitCode::SUCCESS)
}

/// The configuration `serve` runs with: the file (or the defaults), then the flags.
fn serve_config(args: &ServeArgs) -> Result<Config, String> {
    let mut config = args.table.config()?;
    if let Some(socket) = &args.socket {
        config.server.socket = socket.clone();
    }
    if let Some(tcp) = args.tcp {
        config.server.tcp = Some(tcp);
    }
    if let Some(addr) = args.metrics_addr {
        config.server.metrics_addr = Some(addr);
    }
    if args.no_metrics {
        config.server.metrics_addr = None;
    }
    if let Some(backend) = args.backend {
        config.limiter.backend = backend;
    }
    if let Some(policy) = args.failure_policy {
        config.limiter.failure_policy = policy;
    }
    if let Some(threads) = args.worker_threads {
        config.server.worker_threads = threads;
    }
    config.validate()?;
    Ok(config)
}

fn serve(args: ServeArgs) -> Result<(), String> {
    use tracing_subscriber::prelude::*;
    let config = serve_config(&args)?;
    let dynamo = args.table.settings_from(&config)?;
    let filter = |level: Option<&str>| match level {
        Some(level) => tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string()),
        None => Ok(tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))),
    };
    let (filter_layer, filter_handle) =
        tracing_subscriber::reload::Layer::new(filter(config.server.log_level.as_deref())?);
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    // One thread: a current-thread runtime, so no task ever wakes another thread.
    let mut runtime = match config.server.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    let runtime = runtime
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let require_store = args.require_store;
    let reload = server::Reload {
        load: Box::new(move || serve_config(&args)),
        set_log_level: Box::new(move |level: String| {
            filter_handle
                .reload(filter(Some(&level))?)
                .map_err(|e| e.to_string())
        }),
    };
    let options = server::ServeOptions {
        require_store,
        reload: Some(reload),
    };
    runtime.block_on(server::serve(config, dynamo, options, shutdown_signal()))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
