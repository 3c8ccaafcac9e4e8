//! The in-process limiter: the handle the gRPC layer, the CLI's tools and tests call.
//!
//! It validates, looks up what a decision needs (stored limits, the cascade parent, registered
//! namespaces) and routes the work to the actor of its consistency group; the actors
//! ([`group`]) own all cached bucket state and do the deciding. Its parts:
//! - [`lookup`]: stored-limit resolution, entities and the namespace registry, with bounded caches;
//! - [`registry`]: one actor per consistency group, spawned on demand, stopped when idle, with a
//!   bounded mailbox;
//! - [`group`] (with [`lane`], [`leases`] and [`usage`]): the actor itself.
//!
//! Every call has one deadline, and every store call it makes (look-ups and writes) answers
//! within it: a store that cannot is answered by the one failure-policy path,
//! [`Limiter::fail`]. A caller told "not admitted" is never charged: an admission whose caller has
//! gone by the time its write returns is given back by a compensating write.

mod cache;
mod group;
mod lane;
mod leases;
mod lookup;
mod registry;
mod usage;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::domain::amounts::{Amounts, MAX_AMOUNT};
use crate::domain::bucket::{LimitStatus, Rejection};
use crate::domain::ids::{BucketKey, EntityId, Namespace};
use crate::domain::limit::Limit;
use crate::metrics::{self as m, outcome};
use crate::store::{Store, StoreError};
use group::{AcquireJob, Msg};
use lookup::Lookups;
use registry::{Registry, Routes};

/// What a decision does when the store cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Refuse (gRPC `UNAVAILABLE`): never admit what the store has not recorded.
    Block,
    /// Admit without recording (the lease writes nothing); counted as `failed_open`.
    Allow,
}

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
    pub idle_timeout_ms: i64,
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
            idle_timeout_ms: 60_000,
            limits_cache_ms: 60_000,
            max_cached_lookups: 100_000,
            usage_flush_ms: 60_000,
        }
    }
}

/// Why a limiter call failed. Over-limit is not an error: it is [`Decision::Rejected`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
    /// The store failed or did not answer in time, and the policy is `block`: retry later.
    #[error("rate-limit store unavailable: {0}")]
    Unavailable(String),
    #[error("deadline exceeded before the decision was made")]
    DeadlineExceeded,
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The store refused in a way retrying will not fix (missing table, refused credentials,
    /// corrupt item): an operator must act.
    #[error("rate-limit store refused: {0}")]
    Store(String),
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
}

impl From<StoreError> for LimiterError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(what) => {
                Self::AlreadyExists(format!("{what} already exists"))
            }
            StoreError::NotFound(what) => Self::NotFound(format!("{what} does not exist")),
            StoreError::Refused(why) => Self::FailedPrecondition(why),
            StoreError::Transient(_) => Self::Unavailable(e.to_string()),
            StoreError::Backend(_) | StoreError::Corrupt(_) => Self::Store(e.to_string()),
            // Conflicts are re-planned where they happen; one that escapes is another writer's
            // progress, worth a retry.
            StoreError::Conflict { .. } => Self::Unavailable(e.to_string()),
        }
    }
}

/// A lease handle as callers see it. Leases admitted while the store was unreachable under the
/// `allow` policy were never written; closing them writes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseId {
    Backed(u64),
    Unbacked(u64),
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Backed(n) => write!(f, "{n:x}"),
            Self::Unbacked(n) => write!(f, "open-{n:x}"),
        }
    }
}

impl std::str::FromStr for LeaseId {
    type Err = LimiterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || LimiterError::invalid("lease_id", format!("{s:?} is not a lease id"));
        match s.strip_prefix("open-") {
            Some(hex) => u64::from_str_radix(hex, 16)
                .map(Self::Unbacked)
                .map_err(|_| bad()),
            None => u64::from_str_radix(s, 16)
                .map(Self::Backed)
                .map_err(|_| bad()),
        }
    }
}

/// The answer to an acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admitted {
        /// `None` when the acquire was committed at once.
        lease: Option<LeaseId>,
        statuses: Vec<LimitStatus>,
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
}

/// What every actor may read: the store, the clock, the settings and the task tracker.
pub(crate) struct Deps {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub settings: LimiterSettings,
    /// Every store call an actor spawns; shutdown waits for them.
    pub tasks: TaskTracker,
}

/// The limiter handle; cheap to clone.
#[derive(Clone)]
pub struct Limiter {
    deps: Arc<Deps>,
    lookups: Arc<Lookups>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("groups", &self.registry.len())
            .finish()
    }
}

impl Limiter {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, settings: LimiterSettings) -> Self {
        let deps = Arc::new(Deps {
            store,
            clock,
            settings,
            tasks: TaskTracker::new(),
        });
        let registry = Arc::new(Registry::new(deps.clone()));
        registry.publish_self();
        Self {
            lookups: Arc::new(Lookups::new(deps.clone())),
            registry,
            deps,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.deps.store
    }

    pub fn settings(&self) -> &LimiterSettings {
        &self.deps.settings
    }

    pub fn now_ms(&self) -> i64 {
        self.deps.clock.now_ms()
    }

    /// The namespace a request names (empty: the first configured one): one of the configured
    /// namespaces or, with `"*"` configured, one registered in the store.
    ///
    /// # Errors
    /// [`LimiterError::InvalidArgument`] for a malformed or unknown namespace;
    /// [`LimiterError::Unavailable`] when the registry cannot be read by `deadline`.
    pub async fn namespace(
        &self,
        requested: &str,
        deadline: Instant,
    ) -> Result<Namespace, LimiterError> {
        within(deadline, self.lookups.namespace(requested)).await
    }

    /// The namespace an open lease belongs to (`None`: unknown, closed, expired or unbacked).
    pub fn lease_namespace(&self, lease: LeaseId) -> Option<Namespace> {
        match lease {
            LeaseId::Backed(id) => self.registry.lease_group(id).map(|g| g.0),
            LeaseId::Unbacked(_) => None,
        }
    }

    /// Decides an acquire, answering by `deadline`.
    ///
    /// # Errors
    /// [`LimiterError::InvalidArgument`] for a request naming limits it does not have or negative
    /// amounts; [`LimiterError::Unavailable`] when the store cannot answer in time under the
    /// `block` policy.
    pub async fn acquire(
        &self,
        req: AcquireRequest,
        deadline: Instant,
    ) -> Result<Decision, LimiterError> {
        let started = std::time::Instant::now();
        let lease = req.lease;
        let result = match self.route_acquire(req, deadline).await {
            Err(LimiterError::Unavailable(why)) => self.fail(why, lease),
            Err(LimiterError::DeadlineExceeded) => {
                self.fail("no answer within the deadline".into(), lease)
            }
            other => other,
        };
        m::decision_time(started.elapsed().as_secs_f64());
        result
    }

    /// The one failure-policy path: what a decision the store could not make in time answers.
    fn fail(&self, why: String, lease: bool) -> Result<Decision, LimiterError> {
        match self.deps.settings.failure_policy {
            FailurePolicy::Block => {
                m::decision(outcome::FAILED_CLOSED);
                Err(LimiterError::Unavailable(why))
            }
            FailurePolicy::Allow => {
                m::decision(outcome::FAILED_OPEN);
                Ok(Decision::Admitted {
                    lease: lease.then(|| LeaseId::Unbacked(self.registry.next_lease_id())),
                    statuses: Vec::new(),
                })
            }
        }
    }

    async fn route_acquire(
        &self,
        req: AcquireRequest,
        deadline: Instant,
    ) -> Result<Decision, LimiterError> {
        if let Some((name, amount)) = req
            .amounts
            .iter()
            .find(|(_, a)| !(0..=MAX_AMOUNT).contains(a))
        {
            return Err(LimiterError::out_of_range(
                format!("consume[{name}]"),
                format!("{amount} milli-tokens is outside 0..={MAX_AMOUNT}"),
            ));
        }
        let key = req.key;
        let (limits, parent) = within(deadline, async {
            let limits = match req.limits {
                Some(limits) => limits,
                None => self.lookups.resolve(&key).await?,
            };
            let parent = self.lookups.cascade_parent(&key).await?;
            Ok((limits, parent))
        })
        .await?;
        if let Some((name, _)) = req
            .amounts
            .iter()
            .find(|(n, _)| !limits.iter().any(|l| l.name() == *n))
        {
            return Err(LimiterError::invalid(
                "consume",
                format!("unknown limit \"{name}\"; configured: {}", names(&limits)),
            ));
        }
        let group = match &parent {
            Some(p) => (key.namespace.clone(), p.entity.clone()),
            None => (key.namespace.clone(), key.entity.clone()),
        };
        let job = |reply| {
            Msg::Acquire(AcquireJob {
                entity: key.entity.clone(),
                resource: key.resource.clone(),
                limits,
                amounts: req.amounts,
                parent,
                deadline,
                lease: req.lease,
                reply,
                ticket: None,
            })
        };
        self.registry.call(&group, deadline, true, job).await
    }

    /// Records extra consumption (negative: less) on an open lease; written at commit. The
    /// lease's total per limit stays within `0..=MAX_AMOUNT` (an adjustment that would leave it
    /// is refused and changes nothing).
    ///
    /// # Errors
    /// [`LimiterError::LeaseNotFound`] for unknown, closed or expired leases;
    /// [`LimiterError::InvalidArgument`] for limits the lease does not have;
    /// [`LimiterError::OutOfRange`] for a total out of range.
    pub async fn adjust(
        &self,
        lease: LeaseId,
        delta: Amounts,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        self.lease_call(lease, deadline, |id, reply| Msg::Adjust(id, delta, reply))
            .await
    }

    /// Closes a lease, writing its net adjustment (nothing when there is none). The answer comes
    /// once the write is durable; a store that does not confirm in time is retried in the
    /// background until the lease would have expired (repeating the call reports the outcome).
    ///
    /// # Errors
    /// As [`Limiter::adjust`], [`LimiterError::FailedPrecondition`] for a lease already rolled
    /// back, and [`LimiterError::Unavailable`] when the write is not confirmed by `deadline`.
    pub async fn commit(&self, lease: LeaseId, deadline: Instant) -> Result<(), LimiterError> {
        self.lease_call(lease, deadline, |id, reply| Msg::Close(id, false, reply))
            .await
    }

    /// Closes a lease, giving back everything it acquired. See [`Limiter::commit`].
    ///
    /// # Errors
    /// As [`Limiter::commit`].
    pub async fn rollback(&self, lease: LeaseId, deadline: Instant) -> Result<(), LimiterError> {
        self.lease_call(lease, deadline, |id, reply| Msg::Close(id, true, reply))
            .await
    }

    /// How every limit of a bucket stands for a request of `amounts`, without consuming.
    ///
    /// # Errors
    /// As [`Limiter::acquire`] (with no failure policy: an unreachable store is `Unavailable`).
    pub async fn peek(
        &self,
        key: BucketKey,
        limits: Option<Vec<Limit>>,
        amounts: Amounts,
        deadline: Instant,
    ) -> Result<Vec<LimitStatus>, LimiterError> {
        let (limits, parent) = within(deadline, async {
            let limits = match limits {
                Some(l) => l,
                None => self.lookups.resolve(&key).await?,
            };
            Ok((limits, self.lookups.cascade_parent(&key).await?))
        })
        .await?;
        let group = match &parent {
            Some(p) => (key.namespace.clone(), p.entity.clone()),
            None => (key.namespace.clone(), key.entity.clone()),
        };
        self.registry
            .call(&group, deadline, false, |reply| {
                Msg::Peek(key.entity, key.resource, limits, amounts, reply)
            })
            .await
    }

    /// Forgets cached stored limits, entities and registered namespaces (after a change made
    /// through this daemon).
    pub fn forget_lookups(&self) {
        self.lookups.clear();
    }

    /// Sends every actor a tick now (lease expiry, idle eviction): tests drive time with a
    /// manual clock and call this instead of waiting for the timers.
    pub fn tick(&self) {
        self.registry.broadcast(|| Msg::Tick);
    }

    /// The number of consistency groups with a live actor.
    pub fn live_groups(&self) -> usize {
        self.registry.len()
    }

    /// Stops every actor after it has written what it holds (lease settlements, compensations,
    /// usage), then waits for every store call still running; `timeout` bounds it all.
    pub async fn shutdown(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        self.registry.stop_all(until).await;
        self.deps.tasks.close();
        let _ = tokio::time::timeout_at(until, self.deps.tasks.wait()).await;
    }

    async fn lease_call(
        &self,
        lease: LeaseId,
        deadline: Instant,
        msg: impl FnOnce(u64, group::Reply<()>) -> Msg,
    ) -> Result<(), LimiterError> {
        let id = match lease {
            LeaseId::Unbacked(_) => return Ok(()),
            LeaseId::Backed(id) => id,
        };
        let group = self
            .registry
            .lease_group(id)
            .ok_or_else(|| LimiterError::LeaseNotFound(lease.to_string()))?;
        match self
            .registry
            .call(&group, deadline, false, |reply| msg(id, reply))
            .await
        {
            Ok(()) => Ok(()),
            Err(LimiterError::DeadlineExceeded) => Err(LimiterError::Unavailable(format!(
                "lease {lease}: the store has not confirmed the write yet; it is retried until \
                 the lease would expire (repeat the call to learn the outcome)"
            ))),
            Err(e) => Err(e),
        }
    }
}

/// Runs a store look-up under the caller's deadline: running out of time is `Unavailable`.
pub(crate) async fn within<T>(
    deadline: Instant,
    work: impl Future<Output = Result<T, LimiterError>>,
) -> Result<T, LimiterError> {
    match tokio::time::timeout_at(deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(LimiterError::Unavailable(
            "no answer within the deadline".into(),
        )),
    }
}

fn names(limits: &[Limit]) -> String {
    limits
        .iter()
        .map(|l| l.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
