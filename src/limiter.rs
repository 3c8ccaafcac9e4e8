//! The in-process limiter: the handle the gRPC layer, the CLI's tools and tests call.
//!
//! It validates, looks up what a decision needs (stored limits, the cascade parent, registered
//! namespaces) and routes the work to the actor of its consistency group; the actors
//! ([`group`]) own all cached bucket state and do the deciding. Its parts:
//! - [`lookup`]: stored-limit resolution, entities and the namespace registry, with bounded caches;
//! - [`registry`]: one actor per consistency group, spawned on demand, stopped when idle, with a
//!   bounded mailbox;
//! - [`messages`]: what the handle, the registry and the actors say to each other;
//! - [`group`] (with [`lane`] and [`leases`]): the actor itself;
//! - [`usage`]: consumption waiting for the usage snapshots, and its flush;
//! - [`joint`]: several acquires all or nothing.
//!
//! Every call has one deadline, and every store call it makes (look-ups and writes) answers
//! within it: a store that cannot is answered by the one failure-policy path,
//! [`Limiter::fail`]. A caller told "not admitted" is never charged: an admission whose caller has
//! gone by the time its write returns is given back by a compensating write.

mod cache;
mod group;
mod joint;
mod lane;
mod leases;
mod lookup;
mod messages;
mod registry;
mod types;
mod usage;

pub use joint::{Joint, MAX_RESOURCES, Part};
pub(crate) use types::Deps;
pub use types::{
    AcquireRequest, Decision, FailurePolicy, LeaseId, LimiterError, LimiterSettings, Owner,
};

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::clock::Clock;
use crate::domain::amounts::{Amounts, MAX_AMOUNT, check_names};
use crate::domain::bucket::LimitStatus;
use crate::domain::ids::{BucketKey, Namespace};
use crate::domain::limit::Limit;
use crate::metrics::{self as m, outcome};
use crate::store::Store;
use lookup::Lookups;
use messages::{AcquireJob, Close, LeaseOp, PeekJob, reply};
use registry::Registry;
use usage::Flush;

/// An acquire validated and looked up, ready for its group's actor.
struct Prepared {
    group: messages::GroupKey,
    job: AcquireJob,
    answer: messages::Answer<Decision>,
}

/// The limiter handle; cheap to clone.
#[derive(Clone)]
pub struct Limiter {
    deps: Arc<Deps>,
    lookups: Arc<Lookups>,
    registry: Arc<Registry>,
    /// The failure policy in force: the configured one until a reload changes it.
    fail_open: Arc<std::sync::atomic::AtomicBool>,
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
            usage: usage::UsageLog::default(),
        });
        let registry = Arc::new(Registry::new(deps.clone()));
        registry.publish_self();
        let limiter = Self {
            lookups: Arc::new(Lookups::new(deps.clone())),
            registry,
            fail_open: Arc::new(std::sync::atomic::AtomicBool::new(
                deps.settings.failure_policy == FailurePolicy::Allow,
            )),
            deps,
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(housekeeping(
                Arc::downgrade(&limiter.deps),
                Arc::downgrade(&limiter.registry),
                Arc::downgrade(&limiter.lookups),
            ));
            runtime.spawn(usage_flusher(Arc::downgrade(&limiter.deps)));
        }
        limiter
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.deps.store
    }

    pub fn settings(&self) -> &LimiterSettings {
        &self.deps.settings
    }

    /// The failure policy in force.
    pub fn failure_policy(&self) -> FailurePolicy {
        if self.fail_open.load(std::sync::atomic::Ordering::Relaxed) {
            FailurePolicy::Allow
        } else {
            FailurePolicy::Block
        }
    }

    /// Changes the failure policy for the decisions made from now on (a reload).
    pub fn set_failure_policy(&self, policy: FailurePolicy) {
        self.fail_open.store(
            policy == FailurePolicy::Allow,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub fn now_ms(&self) -> i64 {
        self.deps.clock.now_ms()
    }

    /// The namespace a request names (empty: the first configured one): one of the configured
    /// namespaces or, with `"*"` configured, one registered in the store.
    ///
    /// # Errors
    /// [`LimiterError::InvalidArgument`] for a malformed or unknown namespace;
    /// [`LimiterError::Store`] or [`LimiterError::Deadline`] when the registry cannot be read by
    /// `deadline`.
    pub async fn namespace(
        &self,
        requested: &str,
        deadline: Instant,
    ) -> Result<Namespace, LimiterError> {
        within(deadline, self.lookups.namespace(requested)).await
    }

    /// The namespace and owner of an open lease (`None`: unknown, closed, expired or unbacked).
    pub fn lease_owner(&self, lease: LeaseId) -> Option<(Namespace, Owner)> {
        match lease {
            LeaseId::Backed { seq, secret } => self
                .registry
                .lease_route(seq, secret)
                .map(|((ns, _), owner)| (ns, owner)),
            LeaseId::Unbacked(_) => None,
        }
    }

    /// Decides an acquire, answering by `deadline`.
    ///
    /// # Errors
    /// [`LimiterError::InvalidArgument`] for a request naming limits it does not have or negative
    /// amounts; an outage ([`LimiterError::is_outage`]) when the store cannot answer in time
    /// under the `block` policy; [`LimiterError::Overloaded`], [`LimiterError::ShuttingDown`] or
    /// [`LimiterError::ActorUnavailable`] under either policy.
    pub async fn acquire(
        &self,
        req: AcquireRequest,
        deadline: Instant,
    ) -> Result<Decision, LimiterError> {
        let started = std::time::Instant::now();
        let (lease, policy) = (req.lease, self.policy_for(&req));
        let prepared = self.prepare(req, deadline).await;
        let result = self.decide(prepared, lease, policy).await;
        m::decision_time(started.elapsed().as_secs_f64());
        result
    }

    /// The failure policy a request names, else its namespace's stored one (read now, never
    /// waiting: when the store fails, it may not be readable); `None`: the daemon's.
    fn policy_for(&self, req: &AcquireRequest) -> Option<FailurePolicy> {
        req.on_unavailable
            .or_else(|| self.lookups.failure_policy(&req.key.namespace))
    }

    /// Decides a prepared acquire in its group's actor; a request that could not be prepared (or
    /// decided) in time is answered by the failure policy.
    async fn decide(
        &self,
        prepared: Result<Prepared, LimiterError>,
        lease: bool,
        policy: Option<FailurePolicy>,
    ) -> Result<Decision, LimiterError> {
        let result = match prepared {
            Ok(p) => self.registry.acquire(&p.group, p.job, p.answer).await,
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.is_outage() => self.fail(e, lease, policy),
            Err(e @ LimiterError::Disabled { .. }) => {
                m::decision(outcome::DISABLED);
                Err(e)
            }
            other => other,
        }
    }

    /// The one failure-policy path: what a decision the store could not make in time answers
    /// (`outage` is one, see [`LimiterError::is_outage`]), under the call's or the namespace's
    /// `policy`, else the daemon's.
    fn fail(
        &self,
        outage: LimiterError,
        lease: bool,
        policy: Option<FailurePolicy>,
    ) -> Result<Decision, LimiterError> {
        match policy.unwrap_or_else(|| self.failure_policy()) {
            FailurePolicy::Block => {
                m::decision(outcome::FAILED_CLOSED);
                Err(outage)
            }
            FailurePolicy::Allow => {
                m::decision(outcome::FAILED_OPEN);
                Ok(Decision::Admitted {
                    lease: lease.then(|| LeaseId::Unbacked(self.registry.next_lease_id())),
                    statuses: Vec::new(),
                    bypassed: false,
                })
            }
        }
    }

    /// Validates an acquire and looks up what deciding it needs (its gate, limits, cascade
    /// parent and group), charging nothing.
    async fn prepare(
        &self,
        req: AcquireRequest,
        deadline: Instant,
    ) -> Result<Prepared, LimiterError> {
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
        let given = req.limits.is_some();
        let (limits, parent, root, bypass) = within(deadline, async {
            let span = lookup_span("look-up gates");
            let bypass = self.lookups.gate(&key).instrument(span);
            let limits = async {
                match req.limits {
                    Some(limits) => Ok(limits),
                    None => {
                        let span = lookup_span("look-up limits");
                        self.lookups.resolve(&key).instrument(span).await
                    }
                }
            };
            // A disabled resource outranks every other answer (over limit, no limits stored).
            let (bypass, limits) = futures_util::future::join(bypass, limits).await;
            let bypass = bypass?;
            let limits = limits?;
            let span = lookup_span("look-up cascade parent");
            let parent = async {
                let up = self.lookups.cascading_parent(&key).await?;
                let given = given.then_some(&limits[..]);
                let spec = self.lookups.parent_spec(&key, up.as_ref(), given).await?;
                Ok::<_, LimiterError>((up, spec))
            };
            let (up, parent) = parent.instrument(span).await?;
            let span = lookup_span("look-up group root");
            let root = self
                .lookups
                .group_root(&key, up.as_ref())
                .instrument(span)
                .await?;
            Ok((limits, parent, root, bypass))
        })
        .await?;
        let parent_limits = parent.as_ref().map(|p| &p.limits[..]);
        if let Err(unknown) =
            check_names(&req.amounts, &[&limits, parent_limits.unwrap_or_default()])
        {
            let of_parent = match &parent {
                Some(p) => format!(
                    " (cascade parent {:?}: {})",
                    p.entity.as_str(),
                    names(&p.limits)
                ),
                None => String::new(),
            };
            return Err(LimiterError::invalid(
                "consume",
                format!(
                    "unknown limit \"{}\"; configured: {}{of_parent}",
                    unknown.0,
                    names(&limits)
                ),
            ));
        }
        let own = req.amounts.share(&limits);
        let parent_share = parent_limits.map_or_else(Default::default, |l| req.amounts.share(l));
        let group = (key.namespace.clone(), root);
        let (reply, answer) = reply();
        let job = AcquireJob {
            entity: key.entity,
            resource: key.resource,
            limits,
            amounts: req.amounts,
            own,
            parent,
            parent_share,
            bypass,
            deadline,
            lease: req.lease.then_some(req.owner),
            reply,
            ticket: None,
            races: 0,
            span: Some(tracing::Span::current())
                .filter(|s| !s.is_disabled())
                .map(Box::new),
        };
        Ok(Prepared { group, job, answer })
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
        self.lease_op(lease, LeaseOp::Adjust(delta), deadline).await
    }

    /// Keeps a lease alive: it lives `lease_ttl_ms` from now (every call on a lease does the
    /// same). The clients renew the leases they hold on a timer, so a lease outlives its holder
    /// by at most `lease_ttl_ms`.
    ///
    /// # Errors
    /// [`LimiterError::LeaseNotFound`] for unknown, closed or expired leases.
    pub async fn renew(&self, lease: LeaseId, deadline: Instant) -> Result<(), LimiterError> {
        self.lease_op(lease, LeaseOp::Renew, deadline).await
    }

    /// Closes a lease, writing its net adjustment (nothing when there is none). The answer comes
    /// once the write is durable; a store that does not confirm in time is retried in the
    /// background until the lease would have expired (repeating the call reports the outcome).
    ///
    /// # Errors
    /// As [`Limiter::adjust`], [`LimiterError::FailedPrecondition`] for a lease already rolled
    /// back, and [`LimiterError::CloseUnconfirmed`] when the write is not confirmed by
    /// `deadline`.
    pub async fn commit(&self, lease: LeaseId, deadline: Instant) -> Result<(), LimiterError> {
        self.commit_adjusted(lease, Amounts::default(), deadline)
            .await
    }

    /// Records `delta` on an open lease, as [`Limiter::adjust`] does, then commits it: one call
    /// for a client that keeps its adjustments until the end. A lease already closing or closed
    /// does not record `delta` again (the call joins or reports the close).
    ///
    /// # Errors
    /// As [`Limiter::commit`]; a refused `delta` leaves the lease open and unchanged.
    pub async fn commit_adjusted(
        &self,
        lease: LeaseId,
        delta: Amounts,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        self.lease_op(lease, LeaseOp::Close(Close::Commit, delta), deadline)
            .await
    }

    /// Closes a lease, giving back everything it acquired. See [`Limiter::commit`].
    ///
    /// # Errors
    /// As [`Limiter::commit`].
    pub async fn rollback(&self, lease: LeaseId, deadline: Instant) -> Result<(), LimiterError> {
        self.lease_op(
            lease,
            LeaseOp::Close(Close::Rollback, Amounts::default()),
            deadline,
        )
        .await
    }

    /// Whether a bypass gate decides for `key` now (a disabled resource is not bypassed).
    ///
    /// # Errors
    /// As [`Limiter::peek`].
    pub async fn bypassed(&self, key: &BucketKey, deadline: Instant) -> Result<bool, LimiterError> {
        match within(deadline, self.lookups.gate(key)).await {
            Err(LimiterError::Disabled { .. }) => Ok(false),
            other => other,
        }
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
        let (limits, root) = within(deadline, async {
            let limits = match limits {
                Some(l) => l,
                None => self.lookups.resolve(&key).await?,
            };
            let up = self.lookups.cascading_parent(&key).await?;
            Ok((limits, self.lookups.group_root(&key, up.as_ref()).await?))
        })
        .await?;
        if let Err(unknown) = check_names(&amounts, &[&limits]) {
            return Err(LimiterError::invalid("consume", unknown));
        }
        let group = (key.namespace.clone(), root);
        let (reply, answer) = reply();
        let job = PeekJob {
            entity: key.entity,
            resource: key.resource,
            limits,
            amounts,
            reply,
        };
        self.registry.peek(&group, job, answer, deadline).await
    }

    /// The limits stored for a bucket, as an acquire that gives none resolves them.
    ///
    /// # Errors
    /// `InvalidArgument` when no level has any, or the store's error.
    pub async fn resolved_limits(&self, key: &BucketKey) -> Result<Vec<Limit>, LimiterError> {
        self.lookups.resolve(key).await
    }

    /// The store's bucket changed outside any acquire (an operator's reset or top-up): this
    /// daemon forgets its cached state of it, so that its next decision on it reads it first
    /// (other daemons refuse on theirs for at most `max_staleness_ms`).
    ///
    /// # Errors
    /// As [`Limiter::peek`].
    pub async fn bucket_changed(
        &self,
        key: &BucketKey,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        let root = within(deadline, async {
            let up = self.lookups.cascading_parent(key).await?;
            self.lookups.group_root(key, up.as_ref()).await
        })
        .await?;
        let group = (key.namespace.clone(), root);
        self.registry
            .refresh(&group, key.entity.clone(), key.resource.clone(), deadline)
            .await
    }

    /// Forgets cached stored limits, entities and registered namespaces (after a change made
    /// through this daemon).
    pub fn forget_lookups(&self) {
        self.lookups.clear();
    }

    /// The namespace's stored failure policy as this daemon last read it, without waiting (a
    /// value older than `limits_cache_ms`, or none, is re-read in the background).
    pub fn stored_failure_policy(&self, ns: &Namespace) -> Option<FailurePolicy> {
        self.lookups.failure_policy(ns)
    }

    /// Applies a namespace failure policy this daemon just stored (or removed), at once.
    pub fn failure_policy_changed(&self, ns: &Namespace, policy: Option<FailurePolicy>) {
        self.lookups.failure_policy_changed(ns, policy);
    }

    /// Sends every actor a tick now (lease expiry, idle eviction): tests drive time with a
    /// manual clock and call this instead of waiting for the timers.
    pub fn tick(&self) {
        self.registry.tick();
    }

    /// The number of consistency groups with a live actor.
    pub fn live_groups(&self) -> usize {
        self.registry.len()
    }

    /// The number of idle groups whose cached buckets are kept as a compact record.
    pub fn parked_groups(&self) -> usize {
        self.registry.parked()
    }

    /// Forgets what has not been used for long enough by the limiter's clock (compact records
    /// of idle entities, expired look-ups). A background task does this every few seconds; tests
    /// that drive a manual clock call it instead.
    pub fn sweep(&self) {
        let now = self.deps.clock.now_ms();
        self.registry.sweep(now);
        self.lookups.purge(now);
    }

    /// Adds the consumption recorded so far to the stored usage snapshots now (a background task
    /// does it every `usage_flush_ms`).
    pub async fn flush_usage(&self) {
        self.deps
            .usage
            .flush(&*self.deps.store, Flush::Periodic)
            .await;
    }

    /// Stops every actor after it has written what it holds (lease settlements, compensations),
    /// adds the usage they recorded to the snapshots (after a flush in progress, retrying what
    /// fails), then waits for every store call still running; `timeout` bounds it all.
    pub async fn shutdown(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        self.registry.stop_all(until).await;
        let usage = &self.deps.usage;
        let last_flush = async {
            let mut wait = Duration::from_millis(50);
            while usage.flush(&*self.deps.store, Flush::Last).await > 0 {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
        };
        if tokio::time::timeout_at(until, last_flush).await.is_err() {
            tracing::error!(
                "{} usage snapshot addition(s) not written before the drain timeout: that \
                 consumption is missing from the usage snapshots (the buckets have it)",
                usage.len()
            );
        }
        self.deps.tasks.close();
        let _ = tokio::time::timeout_at(until, self.deps.tasks.wait()).await;
    }

    async fn lease_op(
        &self,
        lease: LeaseId,
        op: LeaseOp,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        let (id, secret) = match lease {
            LeaseId::Unbacked(_) => return Ok(()),
            LeaseId::Backed { seq, secret } => (seq, secret),
        };
        let (group, _) = self
            .registry
            .lease_route(id, secret)
            .ok_or_else(|| LimiterError::LeaseNotFound(lease.to_string()))?;
        let closing = matches!(op, LeaseOp::Close(..));
        match self.registry.lease(&group, id, op, deadline).await {
            Ok(()) => Ok(()),
            Err(LimiterError::LeaseNotFound(_)) => {
                Err(LimiterError::LeaseNotFound(lease.to_string()))
            }
            Err(LimiterError::Deadline) if closing => Err(LimiterError::CloseUnconfirmed {
                lease: lease.to_string(),
                state: "the store has not confirmed the write yet; it is retried until the \
                        lease would expire (repeat the call to learn the outcome)"
                    .into(),
            }),
            Err(e) => Err(e),
        }
    }
}

/// Sweeps idle records and look-ups that went unused, until the limiter is shut down or dropped.
async fn housekeeping(deps: Weak<Deps>, registry: Weak<Registry>, lookups: Weak<Lookups>) {
    let Some(settings) = deps.upgrade().map(|d| d.settings.clone()) else {
        return;
    };
    let mut sweep = interval((settings.entity_cache_ms / 4).min(SWEEP_MS)).await;
    loop {
        sweep.tick().await;
        let Some(deps) = deps.upgrade().filter(|d| !d.tasks.is_closed()) else {
            return;
        };
        let now = deps.clock.now_ms();
        if let Some(registry) = registry.upgrade() {
            registry.sweep(now);
        }
        if let Some(lookups) = lookups.upgrade() {
            lookups.purge(now);
        }
    }
}

/// Adds the recorded usage to the stored snapshots every `usage_flush_ms`, on its own task: a
/// long flush (a slow store, many entities) delays the next flush, never a sweep.
async fn usage_flusher(deps: Weak<Deps>) {
    let Some(settings) = deps.upgrade().map(|d| d.settings.clone()) else {
        return;
    };
    // No snapshots kept (`usage_flush_ms = 0`): nothing is ever recorded, so rarely look.
    let flush_ms = match settings.usage_flush_ms {
        ms if ms > 0 => ms,
        _ => 3_600_000,
    };
    let mut flush = interval(flush_ms).await;
    loop {
        flush.tick().await;
        let Some(deps) = deps.upgrade().filter(|d| !d.tasks.is_closed()) else {
            return;
        };
        deps.usage.flush(&*deps.store, Flush::Periodic).await;
    }
}

/// A timer every `ms` (at least 100 ms) whose first tick is one period away and whose missed
/// ticks are not made up.
async fn interval(ms: i64) -> tokio::time::Interval {
    let period = Duration::from_millis(u64::try_from(ms.max(100)).unwrap_or(100));
    let mut timer = tokio::time::interval(period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer.tick().await;
    timer
}

/// The longest time between two sweeps of unused records and look-ups (the shortest, and the
/// shortest between two usage flushes, is 100 ms).
const SWEEP_MS: i64 = 5_000;

/// Runs a store look-up under the caller's deadline: running out of time is
/// [`LimiterError::Deadline`].
pub(crate) async fn within<T>(
    deadline: Instant,
    work: impl Future<Output = Result<T, LimiterError>>,
) -> Result<T, LimiterError> {
    match tokio::time::timeout_at(deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(LimiterError::Deadline),
    }
}

/// The trace span of one look-up (entity, limits) of an acquire.
fn lookup_span(name: &'static str) -> tracing::Span {
    if !crate::telemetry::traced() {
        return tracing::Span::none();
    }
    tracing::trace_span!(target: crate::telemetry::TARGET, "lookup", otel.name = name)
}

fn names(limits: &[Limit]) -> String {
    limits
        .iter()
        .map(|l| l.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
