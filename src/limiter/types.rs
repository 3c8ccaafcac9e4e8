//! The limiter's public vocabulary: settings, the answer to an acquire, lease ids, errors; and
//! the read-only dependencies every actor gets.

use std::sync::Arc;

use tokio_util::task::TaskTracker;

pub use crate::access::Owner;
use crate::clock::Clock;
use crate::domain::amounts::Amounts;
use crate::domain::bucket::{LimitStatus, Rejection};
use crate::domain::ids::{BucketKey, EntityId, Namespace};
use crate::domain::limit::Limit;
use crate::store::{Store, StoreError};

pub use crate::domain::records::FailurePolicy;

/// Limiter settings (see `[limiter]` in `config/zae-limiter.toml`). Times are milliseconds of the
/// limiter's [`Clock`].
#[derive(Debug, Clone)]
pub struct LimiterSettings {
    pub failure_policy: FailurePolicy,
    /// Namespaces callers may use; a request naming none uses the first.
    pub namespaces: Vec<Namespace>,
    /// Also every namespace registered in the store (`"*"` in the configuration).
    pub registered: bool,
    pub max_staleness_ms: i64,
    pub min_commit_interval_ms: i64,
    pub max_batch: usize,
    /// Most acquires one consistency group may have waiting (in its mailbox or its queues).
    pub max_queue: usize,
    pub lease_ttl_ms: i64,
    /// An actor with nothing queued, in flight or open for this long stops; its cached buckets
    /// stay behind as a compact record.
    pub idle_timeout_ms: i64,
    /// How long an idle entity's compact record is kept after its last use.
    pub entity_cache_ms: i64,
    /// Most compact records kept at once (a bound against floods of new entity ids).
    pub max_cached_entities: usize,
    pub limits_cache_ms: i64,
    /// Most entries each look-up cache keeps (stored limits, entities).
    pub max_cached_lookups: usize,
    pub usage_flush_ms: i64,
}

impl Default for LimiterSettings {
    fn default() -> Self {
        Self {
            failure_policy: FailurePolicy::Block,
            namespaces: vec![Namespace::new("default").expect("\"default\" is a valid namespace")],
            registered: false,
            max_staleness_ms: 1_000,
            min_commit_interval_ms: 0,
            max_batch: 256,
            max_queue: 10_000,
            lease_ttl_ms: 60_000,
            idle_timeout_ms: 100,
            entity_cache_ms: 600_000,
            max_cached_entities: 1_000_000,
            limits_cache_ms: 60_000,
            max_cached_lookups: 100_000,
            usage_flush_ms: 60_000,
        }
    }
}

/// Why a limiter call failed. Over-limit is not an error: it is [`Decision::Rejected`].
///
/// Only an outage ([`LimiterError::is_outage`]: the store failing transiently, or no answer
/// within the deadline) is answered by the failure policy; under `allow` it is admitted.
/// Overload, shutdown and an actor that cannot be reached are this daemon's own state: they are
/// never admitted, and their messages do not blame the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LimiterError {
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// A value that is well formed but outside what the limiter can represent or allow.
    #[error("{field}: {message}")]
    OutOfRange { field: String, message: String },
    #[error("lease {0:?} is unknown, closed or expired")]
    LeaseNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The resource is disabled for the entity (at `level`, e.g. `resource gpt-4`): no acquire
    /// is served, whatever the limits or the failure policy.
    #[error("resource {resource:?} is disabled for entity {entity:?} (set for {level})")]
    Disabled {
        entity: String,
        resource: String,
        level: String,
    },
    /// The store failed: transiently (retry later), or in a way retrying will not fix (missing
    /// table, refused credentials, corrupt item: an operator must act). See
    /// [`StoreError::is_transient`].
    #[error("{}", store_message(.0))]
    Store(StoreError),
    /// No answer within the caller's deadline (a slow store, or a long queue before it).
    #[error("no answer within the deadline")]
    Deadline,
    /// The entity already has `max_queue` acquires waiting: this one was shed, nothing decided.
    #[error(
        "overloaded: {max_queue} acquires already wait for this entity; retry later (the \
         limit is limiter.max_queue)"
    )]
    Overloaded { max_queue: usize },
    /// The daemon is shutting down: it takes no new work.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The entity's actor could not be started or stopped before answering; a retry goes to a
    /// new one.
    #[error("the entity's actor {0}; retry")]
    ActorUnavailable(String),
    /// A lease's close was sent to the store and not confirmed in time; the message says what
    /// happens to it.
    #[error("lease {lease}: {state}")]
    CloseUnconfirmed { lease: String, state: String },
}

impl LimiterError {
    pub fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.to_string(),
        }
    }

    pub fn out_of_range(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::OutOfRange {
            field: field.into(),
            message: message.to_string(),
        }
    }

    /// Whether the store could not decide in time (a transient failure, a conflict that
    /// escaped, or no answer within the deadline): what the failure policy answers.
    pub fn is_outage(&self) -> bool {
        match self {
            Self::Store(e) => e.is_transient() || matches!(e, StoreError::Conflict { .. }),
            Self::Deadline => true,
            _ => false,
        }
    }
}

/// A store failure as callers read it: one category, then the store's words.
fn store_message(e: &StoreError) -> String {
    match e {
        StoreError::Transient(why) => format!("rate-limit store unavailable: {why}"),
        StoreError::Conflict { .. } => format!("rate-limit store unavailable: {e}"),
        StoreError::Backend(why) => format!("rate-limit store refused: {why}"),
        StoreError::Corrupt(_) => format!("rate-limit store refused: {e}"),
        StoreError::AlreadyExists(_) | StoreError::NotFound(_) | StoreError::Refused(_) => {
            e.to_string()
        }
    }
}

impl From<StoreError> for LimiterError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(what) => {
                Self::AlreadyExists(format!("{what} already exists"))
            }
            StoreError::NotFound(what) => Self::NotFound(format!("{what} does not exist")),
            StoreError::Refused(why) => Self::FailedPrecondition(why),
            // Conflicts are re-planned where they happen; one that escapes is another writer's
            // progress, worth a retry (it counts as transient).
            e => Self::Store(e),
        }
    }
}

/// A lease handle as callers see it: a capability. A backed lease's id carries 128 bits from the
/// operating system's random source next to its sequence number, so an id cannot be guessed from
/// another; the daemon also binds it to the caller that opened it (see [`Owner`]). Leases
/// admitted while the store was unreachable under the `allow` policy were never written; closing
/// them writes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseId {
    Backed { seq: u64, secret: u128 },
    Unbacked(u64),
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Backed { seq, secret } => write!(f, "{seq:x}.{secret:032x}"),
            Self::Unbacked(n) => write!(f, "open-{n:x}"),
        }
    }
}

impl std::str::FromStr for LeaseId {
    type Err = LimiterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || LimiterError::invalid("lease_id", format!("{s:?} is not a lease id"));
        let hex = |h: &str| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit());
        if let Some(n) = s.strip_prefix("open-") {
            return u64::from_str_radix(n, 16)
                .ok()
                .filter(|_| hex(n))
                .map(Self::Unbacked)
                .ok_or_else(bad);
        }
        let (seq, secret) = s.split_once('.').ok_or_else(bad)?;
        if !hex(seq) || secret.len() != 32 || !hex(secret) {
            return Err(bad());
        }
        Ok(Self::Backed {
            seq: u64::from_str_radix(seq, 16).map_err(|_| bad())?,
            secret: u128::from_str_radix(secret, 16).map_err(|_| bad())?,
        })
    }
}

/// 128 bits from the operating system's random source.
///
/// # Panics
/// When the operating system has no random source to give (the daemon cannot issue safe lease
/// ids without one).
pub(crate) fn lease_secret() -> u128 {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    u128::from_ne_bytes(bytes)
}

/// The answer to an acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admitted {
        /// `None` when the acquire was committed at once.
        lease: Option<LeaseId>,
        statuses: Vec<LimitStatus>,
        /// Admitted under a bypass gate: the entity's own balances were not debited.
        bypassed: bool,
    },
    Rejected {
        rejection: Rejection,
        /// The entity whose limits refused, when it is not the one asked for (a cascade
        /// parent).
        refused_by: Option<EntityId>,
    },
}

/// A validated acquire.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub key: BucketKey,
    /// Milli-tokens per limit name, each in `0..=MAX_AMOUNT`.
    pub amounts: Amounts,
    /// Explicit limits (canonical order); `None` resolves the stored ones.
    pub limits: Option<Vec<Limit>>,
    /// Return a lease to adjust, commit or roll back; `false` commits at once.
    pub lease: bool,
    /// Who may use the lease (the gRPC layer checks it; in-process callers pass
    /// [`Owner::InProcess`]).
    pub owner: Owner,
    /// What to do if the store cannot answer in time; `None`: the namespace's stored policy,
    /// else the daemon's.
    pub on_unavailable: Option<FailurePolicy>,
}

/// What every actor may read: the store, the clock, the settings and the task tracker.
pub struct Deps {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub settings: LimiterSettings,
    /// Every store call an actor spawns; shutdown waits for them.
    pub tasks: TaskTracker,
    /// Consumption for the usage snapshots, flushed on a timer.
    pub(crate) usage: super::usage::UsageLog,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_one_category_and_blame_the_store_only_for_its_own_failures() {
        let transient = LimiterError::from(StoreError::Transient("DynamoDB did not answer".into()));
        assert_eq!(
            transient.to_string(),
            "rate-limit store unavailable: DynamoDB did not answer"
        );
        assert!(transient.is_outage());
        let refused = LimiterError::from(StoreError::Backend("table \"t\" does not exist".into()));
        assert_eq!(
            refused.to_string(),
            "rate-limit store refused: table \"t\" does not exist"
        );
        assert!(!refused.is_outage(), "a permanent refusal is not an outage");
        assert!(LimiterError::Deadline.is_outage());
        for own in [
            LimiterError::Overloaded { max_queue: 2 },
            LimiterError::ShuttingDown,
            LimiterError::ActorUnavailable("cannot start (no runtime)".into()),
        ] {
            assert!(!own.is_outage(), "{own}: the policy never admits it");
            assert!(!own.to_string().contains("store"), "{own}");
        }
    }
}
