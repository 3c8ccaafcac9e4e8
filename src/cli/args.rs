//! The command line: every verb, flag and environment variable of `zae-limiter`, as clap
//! types. Parsing only; [`super::main`] runs them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::CliError;
use super::output::Output;
use crate::Limit;
use crate::config::{Backend, Config, FailurePolicy};
use crate::proto;
use crate::store::dynamodb::DynamoSettings;

#[derive(Debug, Parser)]
#[command(
    name = "zae-limiter",
    version,
    about = "Rate limiting for LLM and API traffic, backed by DynamoDB"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Disable, enable or bypass a resource for an entity (--entity and --resource), for all of
    /// an entity's resources (--entity), or for every entity (--resource). For an acquire, the
    /// first of these levels with a gate decides.
    Gate {
        #[command(subcommand)]
        op: GateOp,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// One limit's capacity and what is available of it now, over the entities with a bucket on
    /// a resource (on DynamoDB a scan of the table: for reports).
    Capacity {
        #[arg(long)]
        resource: String,
        #[arg(long)]
        limit: String,
        /// Only entities that are some entity's parent.
        #[arg(long)]
        parents_only: bool,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Reset or top up one entity's bucket on a resource (audited, exact while other daemons keep
    /// deciding on it).
    Bucket {
        #[command(subcommand)]
        op: BucketOp,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Whether an acquire of a child entity also charges its parent, per entity and resource
    /// (--entity and --resource), per entity (--entity) or per resource (--resource). For an
    /// acquire, the first of these levels with a policy decides, else the entity's cascade flag.
    Cascade {
        #[command(subcommand)]
        op: CascadeOp,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Set, show or delete the namespace's failure policy: what an acquire that gives none does
    /// when the store cannot answer (default: the daemon's `failure_policy`).
    FailurePolicy {
        #[command(subcommand)]
        op: FailurePolicyOp,
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

pub const DEFAULT_SOCKET: &str = "/tmp/zae-limiter.sock";

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub table: TableArgs,
    /// Unix socket to listen on [default: /tmp/zae-limiter.sock].
    #[arg(long, env = "ZAE_LIMITER_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Also listen on this loopback TCP address.
    #[arg(long, env = "ZAE_LIMITER_TCP")]
    pub tcp: Option<SocketAddr>,
    /// Prometheus /metrics address [default: 127.0.0.1:9464].
    #[arg(long, env = "ZAE_LIMITER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve no /metrics.
    #[arg(long)]
    pub no_metrics: bool,
    /// Store backend [default: memory].
    #[arg(long, value_enum, env = "ZAE_LIMITER_BACKEND")]
    pub backend: Option<Backend>,
    /// What to answer when the store cannot be reached in time [default: block].
    #[arg(long, value_enum, env = "ZAE_LIMITER_FAILURE_POLICY")]
    pub failure_policy: Option<FailurePolicy>,
    /// Runtime threads; 0: one per core [default: 0].
    #[arg(long, env = "ZAE_LIMITER_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Exit with an error when the store cannot serve at start-up (missing table, no
    /// credentials, unreachable), instead of answering NOT_SERVING until it can.
    #[arg(long)]
    pub require_store: bool,
}

#[derive(Debug, Args)]
pub struct AcquireArgs {
    #[arg(long, env = "ZAE_LIMITER_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[arg(long, default_value = "")]
    pub namespace: String,
    #[arg(long)]
    pub entity: String,
    #[arg(long)]
    pub resource: String,
    /// NAME=TOKENS to consume (repeatable).
    #[arg(long, value_parser = parse_amount)]
    pub consume: Vec<(String, i64)>,
    /// NAME=RATE/PERIOD[,burst=N][,soft] limits for this call, e.g. rpm=100/1m (default: stored limits).
    #[arg(long)]
    pub limit: Vec<Limit>,
    /// RESOURCE:NAME=TOKENS[,NAME=TOKENS] to consume on a further resource of the entity, all
    /// or none with the rest (repeatable; each resource's stored limits apply).
    #[arg(long, value_parser = parse_also, conflicts_with = "limit")]
    pub also: Vec<(String, Vec<(String, i64)>)>,
    /// NAME=TOKENS of extra usage to record before committing (repeatable; may be negative).
    #[arg(long, value_parser = parse_amount, allow_hyphen_values = true)]
    pub adjust: Vec<(String, i64)>,
    /// Roll back instead of committing.
    #[arg(long, conflicts_with = "keep_open")]
    pub rollback: bool,
    /// Leave the lease open and print its id (close it with `zae-limiter lease`).
    #[arg(long)]
    pub keep_open: bool,
    /// What to do if the store cannot answer in time [default: the namespace's policy, else
    /// the daemon's].
    #[arg(long, value_enum)]
    pub on_unavailable: Option<FailurePolicy>,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[arg(long, env = "ZAE_LIMITER_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
    #[arg(long, default_value = "", global = true)]
    pub namespace: String,
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value = "table", global = true)]
    pub output: Output,
    /// Your name for the audit records (beside the uid the daemon sees).
    #[arg(long, env = "ZAE_LIMITER_PRINCIPAL", global = true)]
    pub principal: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum EntityOp {
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

#[derive(Debug, Args)]
pub struct ScopeArgs {
    #[arg(long)]
    pub entity: Option<String>,
    #[arg(long)]
    pub resource: Option<String>,
}

impl ScopeArgs {
    pub fn scope(self) -> proto::LimitScope {
        proto::LimitScope {
            entity_id: self.entity,
            resource: self.resource,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CascadeOp {
    /// Charge the parent too (`on`) or not (`off`) at this scope.
    Set {
        #[arg(value_parser = parse_on_off, action = clap::ArgAction::Set)]
        cascade: bool,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Remove the policy at this scope (the next level decides, then the entity's flag).
    Clear {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    Get {
        #[command(flatten)]
        scope: ScopeArgs,
    },
}

/// `on` or `off`.
fn parse_on_off(s: &str) -> Result<bool, String> {
    crate::domain::records::parse_cascade(s).map_err(|s| format!("{s:?}: expected on or off"))
}

#[derive(Debug, Subcommand)]
pub enum BucketOp {
    /// Fill the bucket's limits to capacity, debt forgiven (a bucket never used is full).
    Reset {
        #[command(flatten)]
        bucket: BucketArgs,
        /// Only this limit (repeatable; default: every limit of the bucket).
        #[arg(long = "limit", value_name = "NAME")]
        limits: Vec<String>,
    },
    /// Give the bucket's limits tokens, each at most its room below capacity.
    TopUp {
        #[command(flatten)]
        bucket: BucketArgs,
        /// NAME=TOKENS (repeatable), each 1..=10^15.
        #[arg(long, value_parser = parse_amount, required = true)]
        amount: Vec<(String, i64)>,
    },
}

#[derive(Debug, Args)]
pub struct BucketArgs {
    #[arg(long)]
    pub entity: String,
    #[arg(long)]
    pub resource: String,
    /// Names the operation: the same key on the same entity within 3 days does nothing more
    /// and prints the first call's answer (1-64 of letters, digits, '.', '_', ':', '-').
    #[arg(long, default_value = "")]
    pub idempotency_key: String,
}

#[derive(Debug, Subcommand)]
pub enum GateOp {
    /// Refuse every acquire at this scope (FAILED_PRECONDITION, whatever the limits).
    Disable {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Serve acquires at this scope, even if a wider level disables the resource.
    Enable {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Admit every acquire at this scope without debiting the entity's balances (its
    /// consumption is still counted; a cascade parent is charged as usual).
    Bypass {
        #[command(flatten)]
        scope: ScopeArgs,
        /// End the bypass after this many seconds (without: until cleared).
        #[arg(long = "for", value_name = "SECONDS")]
        for_secs: Option<u32>,
    },
    /// Remove the gate at this scope (the next level decides).
    Clear {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    Get {
        #[command(flatten)]
        scope: ScopeArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum FailurePolicyOp {
    Set {
        #[arg(value_enum)]
        policy: FailurePolicy,
    },
    Get,
    Delete,
}

#[derive(Debug, Subcommand)]
pub enum NamespaceOp {
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

#[derive(Debug, Subcommand)]
pub enum LimitsOp {
    Set {
        #[command(flatten)]
        scope: ScopeArgs,
        /// NAME=RATE/PERIOD[,burst=N][,soft] (repeatable), e.g. rpm=100/1m.
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
    /// Show what applying a limits manifest (the Python zae-limiter's YAML shape: system,
    /// resources, entities with their limits, cascade, disabled, on_unavailable) would change.
    /// A bad file is refused whole, naming the line and key.
    Plan { file: PathBuf },
    /// As `plan`, exiting 2 when the store differs from the file (drift).
    Diff { file: PathBuf },
    /// Make the store say what the manifest says: one audited call per change; a second apply
    /// changes nothing. What the file leaves out is left as it is.
    Apply { file: PathBuf },
    /// With --resource: the entities with limits of their own for it (a page at a time);
    /// without: the resources with default limits.
    List {
        #[arg(long)]
        resource: Option<String>,
        #[arg(long, default_value_t = 0)]
        page_size: u32,
        /// The `next_page` a previous listing printed.
        #[arg(long, default_value = "")]
        page: String,
    },
}

impl LimitsOp {
    /// The manifest verbs (`plan`, `diff`, `apply`) and their file.
    pub fn manifest(&self) -> Option<(super::manifest::Verb, PathBuf)> {
        use super::manifest::Verb;
        match self {
            Self::Plan { file } => Some((Verb::Plan, file.clone())),
            Self::Diff { file } => Some((Verb::Diff, file.clone())),
            Self::Apply { file } => Some((Verb::Apply, file.clone())),
            _ => None,
        }
    }
}

pub(super) fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

#[derive(Debug, Subcommand)]
pub enum LeaseOp {
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

/// `RESOURCE:NAME=TOKENS[,NAME=TOKENS]`: amounts on a further resource.
pub(super) fn parse_also(s: &str) -> Result<(String, Vec<(String, i64)>), String> {
    let (resource, amounts) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected RESOURCE:NAME=TOKENS[,NAME=TOKENS]"))?;
    let amounts = amounts
        .split(',')
        .map(parse_amount)
        .collect::<Result<_, _>>()?;
    Ok((resource.trim().to_owned(), amounts))
}

pub(super) fn parse_amount(s: &str) -> Result<(String, i64), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=TOKENS"))?;
    let n = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {n:?} is not a whole number"))?;
    Ok((name.trim().to_owned(), n))
}

#[derive(Debug, Args)]
pub struct TableArgs {
    /// Configuration file (TOML); see config/zae-limiter.toml.
    #[arg(long, env = "ZAE_LIMITER_CONFIG")]
    pub config: Option<PathBuf>,
    /// DynamoDB table name [default: zae-limiter].
    #[arg(long, env = "ZAE_LIMITER_TABLE")]
    pub table: Option<String>,
    /// AWS region [default: us-east-1].
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Custom DynamoDB endpoint, e.g. DynamoDB Local at http://127.0.0.1:8000.
    #[arg(long, env = "ZAE_LIMITER_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
}

impl TableArgs {
    /// The configuration file's settings, or the defaults without one.
    ///
    /// # Errors
    /// [`CliError::Config`] naming the file and what is wrong in it.
    pub fn config(&self) -> Result<Config, CliError> {
        match &self.config {
            Some(path) => Config::load(path).map_err(|e| CliError::Config(e.to_string())),
            None => Ok(Config::default()),
        }
    }

    /// Flags and environment over the configuration file over the defaults.
    ///
    /// # Errors
    /// As [`TableArgs::config`].
    pub fn settings(&self) -> Result<DynamoSettings, CliError> {
        Ok(self.settings_from(&self.config()?))
    }

    pub fn settings_from(&self, config: &Config) -> DynamoSettings {
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
        settings
    }
}
