//! The per-entity actor: sole owner of the entity's cached buckets, its queued acquires and its
//! open leases.
//!
//! Per bucket it keeps the last state the store confirmed. An acquire that this state (plus refill
//! since, minus what is queued or in flight) cannot cover is rejected at once without touching the
//! store: other daemons can only lower a balance, so the cache is an upper bound on the truth (the
//! staleness bound covers refunds and raised limits). Everything else queues; while one write per
//! bucket is in flight, new acquires wait, and when it returns the next write carries every queued
//! acquire that fits (group commit). A caller is answered only after the write carrying its
//! consumption succeeded. A lost race returns the current item, which becomes the cache, and the
//! batch is decided again. Lease adjustments, commits and rollbacks ride along in the same writes.
//!
//! Store calls run in spawned tasks that report back as messages, so the actor never blocks on I/O
//! and keeps answering cached rejections while a write is in flight.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::{Decision, GroupKey, LeaseId, LimiterError, Shared};
use crate::config::FailurePolicy;
use crate::domain::bucket::{
    Admission, Bucket, LimitChange, LimitStatus, Plan, Rejection, Write, admit, plan,
};
use crate::domain::ids::{BucketKey, ResourceId};
use crate::domain::limit::{Limit, LimitName};
use crate::domain::records::{Period, Usage};
use crate::metrics::{self as m, outcome};
use crate::store::StoreError;

pub(super) struct GroupActor;

pub(super) struct Args {
    pub shared: Arc<Shared>,
    pub group: GroupKey,
}

type Amounts = Vec<(LimitName, i64)>;
type Reply<T> = RpcReplyPort<Result<T, LimiterError>>;

pub(super) struct AcquireJob {
    pub resource: ResourceId,
    pub limits: Vec<Limit>,
    pub amounts: Amounts,
    pub deadline: Instant,
    /// Whether the caller wants a lease (else the acquire is committed at once).
    pub lease: bool,
    pub reply: Reply<Decision>,
}

pub(super) enum Msg {
    Acquire(AcquireJob),
    Adjust(u64, Amounts, Reply<()>),
    Commit(u64, Reply<()>),
    Rollback(u64, Reply<()>),
    Peek(ResourceId, Vec<Limit>, Amounts, Reply<Vec<LimitStatus>>),
    Loaded(ResourceId, Result<Option<Bucket>, StoreError>),
    Written(ResourceId, Result<Option<Bucket>, StoreError>),
    Pump(ResourceId),
    Tick,
    FlushUsage,
    /// A usage flush that failed: added back, to go with the next one.
    UsageNotFlushed(Vec<Usage>),
}

/// The last stored state of one bucket that the store confirmed.
struct Cached {
    bucket: Option<Bucket>,
    fetched: Instant,
    /// Just read or returned by a failed write: decisions made on it count as store decisions.
    from_store: bool,
}

/// A commit delta or rollback refund waiting for the next write.
struct PendingAdjust {
    amounts: Amounts,
    reply: Reply<()>,
}

/// What the in-flight write carries.
struct Batch {
    admitted: Vec<(AcquireJob, Vec<LimitStatus>)>,
    adjusts: Vec<PendingAdjust>,
    /// Sum of the admitted amounts.
    amounts: Amounts,
}

enum Busy {
    Loading,
    Writing(Batch),
}

#[derive(Default)]
struct Slot {
    cache: Option<Cached>,
    pending: VecDeque<AcquireJob>,
    adjusts: Vec<PendingAdjust>,
    /// Sum of amounts queued or in flight: what the cached state must still cover.
    reserved: Amounts,
    busy: Option<Busy>,
    peeks: Vec<(Vec<Limit>, Amounts, Reply<Vec<LimitStatus>>)>,
    last_write: Option<Instant>,
    pump_scheduled: bool,
}

struct Lease {
    resource: ResourceId,
    limits: Vec<Limit>,
    acquired: Amounts,
    delta: Amounts,
}

pub(super) struct State {
    shared: Arc<Shared>,
    group: GroupKey,
    slots: HashMap<ResourceId, Slot>,
    leases: HashMap<u64, Lease>,
    /// Lease ids in expiry order (the TTL is the same for all, so creation order); ids already
    /// closed are skipped when they reach the front.
    expiry: VecDeque<(Instant, u64)>,
    last_active: Instant,
    /// When the next scheduled tick fires, if one is.
    tick_at: Option<Instant>,
    /// Consumption not yet added to the stored usage snapshots, per (resource, period, start).
    usage: HashMap<(ResourceId, Period, i64), Amounts>,
    flush_scheduled: bool,
}

impl Actor for GroupActor {
    type Msg = Msg;
    type State = State;
    type Arguments = Args;

    async fn pre_start(
        &self,
        _myself: ActorRef<Msg>,
        args: Args,
    ) -> Result<State, ActorProcessingErr> {
        metrics::gauge!(m::ACTORS).increment(1.0);
        Ok(State {
            shared: args.shared,
            group: args.group,
            slots: HashMap::new(),
            leases: HashMap::new(),
            expiry: VecDeque::new(),
            last_active: Instant::now(),
            tick_at: None,
            usage: HashMap::new(),
            flush_scheduled: false,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Msg>,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        metrics::gauge!(m::ACTORS).decrement(1.0);
        let me = myself.get_id();
        state
            .shared
            .actors
            .remove_if(&state.group, |_, r| r.get_id() == me);
        // Leases still open stay consumed; forget their routes.
        for id in state.leases.keys() {
            state.shared.leases.remove(id);
        }
        metrics::gauge!(m::LEASES_OPEN).decrement(state.leases.len() as f64);
        // The last consumption goes to the usage snapshots before the actor is gone.
        let usage = state.take_usage();
        if !usage.is_empty()
            && let Err(e) = state.shared.store.add_usage(&state.group.0, &usage).await
        {
            tracing::warn!("usage of a stopping entity could not be flushed: {e}");
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Msg>,
        msg: Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        if matches!(
            msg,
            Msg::Acquire(_) | Msg::Adjust(..) | Msg::Commit(..) | Msg::Rollback(..) | Msg::Peek(..)
        ) {
            state.last_active = Instant::now();
        }
        match msg {
            Msg::Acquire(job) => state.acquire(job, &myself),
            Msg::Adjust(id, delta, reply) => {
                let _ = reply.send(state.adjust(id, delta));
            }
            Msg::Commit(id, reply) => state.close(id, false, reply, &myself),
            Msg::Rollback(id, reply) => state.close(id, true, reply, &myself),
            Msg::Peek(resource, limits, amounts, reply) => {
                state.peek(resource, limits, amounts, reply, &myself)
            }
            Msg::Loaded(resource, result) => state.loaded(resource, result, &myself),
            Msg::Written(resource, result) => state.finish(&resource, result, &myself),
            Msg::Pump(resource) => {
                state.slot(&resource).pump_scheduled = false;
                state.pump(&resource, &myself);
            }
            Msg::FlushUsage => {
                state.flush_scheduled = false;
                let usage = state.take_usage();
                if !usage.is_empty() {
                    let store = state.shared.store.clone();
                    let ns = state.group.0.clone();
                    let me = myself.clone();
                    tokio::spawn(async move {
                        if let Err(e) = store.add_usage(&ns, &usage).await {
                            tracing::warn!("usage flush failed, kept for the next one: {e}");
                            let _ = me.cast(Msg::UsageNotFlushed(usage));
                        }
                    });
                }
            }
            Msg::UsageNotFlushed(usage) => {
                for u in usage {
                    let key = (u.resource, u.period, u.start_ms);
                    add(state.usage.entry(key).or_default(), &u.amounts, 1);
                }
                state.schedule_flush(&myself);
            }
            Msg::Tick => {
                state.tick_at = None;
                if state.tick(&myself) {
                    return Ok(());
                }
            }
        }
        state.schedule_tick(&myself);
        Ok(())
    }
}

fn add(acc: &mut Amounts, amounts: &[(LimitName, i64)], sign: i64) {
    for (name, amount) in amounts {
        match acc.iter_mut().find(|(n, _)| n == name) {
            Some((_, total)) => *total += sign * amount,
            None => acc.push((name.clone(), sign * amount)),
        }
    }
    acc.retain(|(_, a)| *a != 0);
}

impl State {
    fn slot(&mut self, resource: &ResourceId) -> &mut Slot {
        self.slots.entry(resource.clone()).or_default()
    }

    fn key(&self, resource: &ResourceId) -> BucketKey {
        BucketKey {
            namespace: self.group.0.clone(),
            entity: self.group.1.clone(),
            resource: resource.clone(),
        }
    }

    fn fresh(&self, cached: &Cached) -> bool {
        cached.fetched.elapsed() <= self.shared.settings.max_staleness
    }

    fn acquire(&mut self, job: AcquireJob, myself: &ActorRef<Msg>) {
        let now = self.shared.clock.now_ms();
        if let Some(rejection) = self.fast_reject(&job, now) {
            m::decision(outcome::REJECTED_CACHED);
            let _ = job.reply.send(Ok(Decision::Rejected(rejection)));
            return;
        }
        let resource = job.resource.clone();
        let max_queue = self.shared.settings.max_queue;
        let slot = self.slots.entry(resource.clone()).or_default();
        if slot.pending.len() >= max_queue {
            m::decision(outcome::SHED);
            let _ = job.reply.send(Err(LimiterError::Unavailable(format!(
                "overloaded: {max_queue} acquires already wait for this bucket"
            ))));
            return;
        }
        add(&mut slot.reserved, &job.amounts, 1);
        slot.pending.push_back(job);
        self.pump(&resource, myself);
    }

    /// A rejection decided from the cache alone, or `None` when the store must decide.
    fn fast_reject(&mut self, job: &AcquireJob, now: i64) -> Option<Rejection> {
        // More than a limit's capacity never fits, whatever is stored.
        if let Ok(Plan::Reject(r)) = plan(None, &job.limits, &job.amounts, now)
            && r.retry_after_ms().is_none()
        {
            return Some(r);
        }
        let slot = self.slots.get(&job.resource)?;
        let cached = slot.cache.as_ref().filter(|c| self.fresh(c))?;
        let mut projected = match &cached.bucket {
            Some(b)
                if b.limits.len() == job.limits.len()
                    && b.limits.iter().zip(&job.limits).all(|(s, l)| s.limit == *l) =>
            {
                b.at(now)
            }
            Some(_) => return None,
            None => Bucket::full(job.limits.clone(), now),
        };
        projected.adjust(&slot.reserved).ok()?;
        match plan(Some(&projected), &job.limits, &job.amounts, now) {
            Ok(Plan::Reject(r)) => Some(r),
            _ => None,
        }
    }

    /// Starts the next store call of a bucket, if it has work and none is in flight.
    fn pump(&mut self, resource: &ResourceId, myself: &ActorRef<Msg>) {
        let settings = self.shared.settings.clone();
        let key = self.key(resource);
        let store = self.shared.store.clone();
        let slot = self.slots.entry(resource.clone()).or_default();
        if slot.busy.is_some()
            || (slot.pending.is_empty() && slot.adjusts.is_empty() && slot.peeks.is_empty())
        {
            return;
        }
        let fresh = slot
            .cache
            .as_ref()
            .is_some_and(|c| c.fetched.elapsed() <= settings.max_staleness);
        if (!slot.pending.is_empty() || !slot.peeks.is_empty()) && !fresh {
            slot.busy = Some(Busy::Loading);
            let me = myself.clone();
            let resource = resource.clone();
            tokio::spawn(async move {
                let result = store.load_bucket(&key).await;
                let _ = me.cast(Msg::Loaded(resource, result));
            });
            return;
        }
        let now = self.shared.clock.now_ms();
        let cached = slot.cache.as_ref().and_then(|c| c.bucket.clone());
        for (limits, amounts, reply) in slot.peeks.drain(..) {
            let statuses = match admit(cached.as_ref(), &limits, &amounts, now) {
                Ok(Admission::Admitted { statuses, .. }) => Ok(statuses),
                Ok(Admission::Rejected(rejection)) => Ok(rejection.statuses),
                Err(e) => Err(LimiterError::invalid("consume", e)),
            };
            let _ = reply.send(statuses);
        }
        if let Some(last) = slot.last_write
            && last.elapsed() < settings.min_commit_interval
        {
            if !slot.pump_scheduled {
                slot.pump_scheduled = true;
                let resource = resource.clone();
                myself.send_after(settings.min_commit_interval - last.elapsed(), move || {
                    Msg::Pump(resource)
                });
            }
            return;
        }
        let from_store = slot.cache.as_ref().is_some_and(|c| c.from_store);
        let Some(limits) = slot.pending.front().map(|j| j.limits.clone()) else {
            return self.write_adjustments(resource, myself);
        };
        // Decide, in order, what the cached state covers.
        let mut base = cached.clone();
        let mut batch = Batch {
            admitted: Vec::new(),
            adjusts: Vec::new(),
            amounts: Vec::new(),
        };
        let mut later = VecDeque::new();
        while let Some(job) = slot.pending.pop_front() {
            if batch.admitted.len() >= settings.max_batch {
                slot.pending.push_front(job);
                break;
            }
            if job.limits != limits {
                later.push_back(job);
                continue;
            }
            if Instant::now() >= job.deadline {
                // The caller has gone: charge nothing for it.
                add(&mut slot.reserved, &job.amounts, -1);
                continue;
            }
            match admit(base.as_ref(), &limits, &job.amounts, now) {
                Ok(Admission::Admitted { statuses, after }) => {
                    base = Some(after);
                    add(&mut batch.amounts, &job.amounts, 1);
                    batch.admitted.push((job, statuses));
                }
                Ok(Admission::Rejected(rejection)) => {
                    add(&mut slot.reserved, &job.amounts, -1);
                    m::decision(if from_store {
                        outcome::REJECTED_STORE
                    } else {
                        outcome::REJECTED_CACHED
                    });
                    let _ = job.reply.send(Ok(Decision::Rejected(rejection)));
                }
                Err(e) => {
                    add(&mut slot.reserved, &job.amounts, -1);
                    let _ = job.reply.send(Err(LimiterError::invalid("consume", e)));
                }
            }
        }
        while let Some(job) = later.pop_back() {
            slot.pending.push_front(job);
        }
        if batch.admitted.is_empty() {
            if slot.pending.is_empty() {
                return self.write_adjustments(resource, myself);
            }
            return self.pump(resource, myself);
        }
        let Ok(Plan::Admit { write, expected }) =
            plan(cached.as_ref(), &limits, &batch.amounts, now)
        else {
            // Admitting one by one and all at once agree; if they ever did not, decide again.
            for (job, _) in batch.admitted.into_iter().rev() {
                slot.pending.push_front(job);
            }
            slot.cache = None;
            return self.pump(resource, myself);
        };
        let mut write = write;
        batch.adjusts = fold_adjustments(&mut write, &mut slot.adjusts);
        if let Write::Change(change) = &write
            && change.is_noop()
        {
            // Nothing to record (all amounts zero, no refill due): answer from the cache.
            // The cache stays as the store last confirmed it.
            let _ = expected;
            slot.busy = Some(Busy::Writing(batch));
            return self.finish(resource, Ok(None), myself);
        }
        metrics::histogram!(m::BATCH_SIZE).record(batch.admitted.len() as f64);
        slot.busy = Some(Busy::Writing(batch));
        slot.last_write = Some(Instant::now());
        let me = myself.clone();
        let resource = resource.clone();
        tokio::spawn(async move {
            let result = store.write_bucket(&key, &write).await.map(Some);
            let _ = me.cast(Msg::Written(resource, result));
        });
    }

    /// Writes queued lease adjustments on their own (no acquire to carry them).
    fn write_adjustments(&mut self, resource: &ResourceId, myself: &ActorRef<Msg>) {
        let key = self.key(resource);
        let store = self.shared.store.clone();
        let slot = self.slots.entry(resource.clone()).or_default();
        if slot.adjusts.is_empty() {
            return;
        }
        let adjusts: Vec<PendingAdjust> = std::mem::take(&mut slot.adjusts);
        let mut total = Vec::new();
        for a in &adjusts {
            add(&mut total, &a.amounts, 1);
        }
        slot.busy = Some(Busy::Writing(Batch {
            admitted: Vec::new(),
            adjusts,
            amounts: Vec::new(),
        }));
        if total.is_empty() {
            return self.finish(resource, Ok(None), myself);
        }
        slot.last_write = Some(Instant::now());
        let me = myself.clone();
        let resource = resource.clone();
        tokio::spawn(async move {
            let result = store.adjust_bucket(&key, &total).await.map(|()| None);
            let _ = me.cast(Msg::Written(resource, result));
        });
    }

    fn loaded(
        &mut self,
        resource: ResourceId,
        result: Result<Option<Bucket>, StoreError>,
        myself: &ActorRef<Msg>,
    ) {
        let policy = self.shared.settings.failure_policy;
        let slot = self.slots.entry(resource.clone()).or_default();
        slot.busy = None;
        match result {
            Ok(bucket) => {
                slot.cache = Some(Cached {
                    bucket,
                    fetched: Instant::now(),
                    from_store: true,
                });
            }
            Err(e) => {
                let jobs: Vec<AcquireJob> = slot.pending.drain(..).collect();
                slot.reserved.clear();
                for (_, _, reply) in slot.peeks.drain(..) {
                    let _ = reply.send(Err(LimiterError::from(e.clone())));
                }
                for job in jobs {
                    self.fail(job, policy, &e);
                }
            }
        }
        self.pump(&resource, myself);
    }

    /// Answers everything the finished write carried and starts the next one.
    fn finish(
        &mut self,
        resource: &ResourceId,
        result: Result<Option<Bucket>, StoreError>,
        myself: &ActorRef<Msg>,
    ) {
        let policy = self.shared.settings.failure_policy;
        let lease_ttl = self.shared.settings.lease_ttl;
        let slot = self.slots.entry(resource.clone()).or_default();
        let Some(Busy::Writing(batch)) = slot.busy.take() else {
            return;
        };
        match result {
            Ok(bucket) => {
                match bucket {
                    Some(bucket) => {
                        slot.cache = Some(Cached {
                            bucket: Some(bucket),
                            fetched: Instant::now(),
                            from_store: false,
                        });
                    }
                    None => {
                        // An adjustment-only write: apply it to the cache as the store did.
                        if let Some(Cached {
                            bucket: Some(b), ..
                        }) = &mut slot.cache
                        {
                            for a in &batch.adjusts {
                                let _ = b.adjust(&a.amounts);
                            }
                        }
                    }
                }
                add(&mut slot.reserved, &batch.amounts, -1);
                let mut used = batch.amounts.clone();
                for a in batch.adjusts {
                    add(&mut used, &a.amounts, 1);
                    let _ = a.reply.send(Ok(()));
                }
                self.record_usage(resource, &used, myself);
                for (job, statuses) in batch.admitted {
                    m::decision(outcome::ADMITTED);
                    if !job.lease {
                        // Committed at once: the consumption is final, nothing to keep.
                        let _ = job.reply.send(Ok(Decision::Admitted {
                            lease: None,
                            statuses,
                        }));
                        continue;
                    }
                    let id = self
                        .shared
                        .next_lease
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.shared.leases.insert(id, self.group.clone());
                    metrics::gauge!(m::LEASES_OPEN).increment(1.0);
                    self.expiry.push_back((Instant::now() + lease_ttl, id));
                    self.leases.insert(
                        id,
                        Lease {
                            resource: job.resource,
                            limits: job.limits,
                            acquired: job.amounts,
                            delta: Vec::new(),
                        },
                    );
                    let _ = job.reply.send(Ok(Decision::Admitted {
                        lease: Some(LeaseId::Backed(id)),
                        statuses,
                    }));
                }
            }
            Err(StoreError::Conflict { current, .. }) => {
                metrics::counter!(m::CONFLICTS).increment(1);
                slot.cache = Some(Cached {
                    bucket: current.map(|b| *b),
                    fetched: Instant::now(),
                    from_store: true,
                });
                for (job, _) in batch.admitted.into_iter().rev() {
                    slot.pending.push_front(job);
                }
                let mut adjusts = batch.adjusts;
                // An adjustment naming a limit the bucket no longer has: drop that part.
                if let Some(Cached {
                    bucket: Some(b), ..
                }) = &slot.cache
                {
                    for a in &mut adjusts {
                        a.amounts.retain(|(n, _)| b.limit(n).is_some());
                    }
                }
                adjusts.append(&mut slot.adjusts);
                slot.adjusts = adjusts;
            }
            Err(e) => {
                slot.cache = None;
                add(&mut slot.reserved, &batch.amounts, -1);
                for a in batch.adjusts {
                    let _ = a.reply.send(Err(LimiterError::from(e.clone())));
                }
                for (job, _) in batch.admitted {
                    self.fail(job, policy, &e);
                }
            }
        }
        self.pump(resource, myself);
    }

    /// Answers an acquire the store could not decide, per the failure policy.
    fn fail(&mut self, job: AcquireJob, policy: FailurePolicy, e: &StoreError) {
        let answer = match policy {
            FailurePolicy::Block => {
                m::decision(outcome::FAILED_CLOSED);
                Err(LimiterError::Unavailable(e.to_string()))
            }
            FailurePolicy::Allow => {
                m::decision(outcome::FAILED_OPEN);
                let id = self
                    .shared
                    .next_lease
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(Decision::Admitted {
                    lease: job.lease.then_some(LeaseId::Unbacked(id)),
                    statuses: Vec::new(),
                })
            }
        };
        let _ = job.reply.send(answer);
    }

    /// Forgets leases whose time is up; their consumption stays.
    fn expire_leases(&mut self) {
        let now = Instant::now();
        while let Some(&(expires, id)) = self.expiry.front() {
            if expires > now {
                break;
            }
            self.expiry.pop_front();
            if self.leases.remove(&id).is_some() {
                self.shared.leases.remove(&id);
                metrics::gauge!(m::LEASES_OPEN).decrement(1.0);
                metrics::counter!(m::LEASES_EXPIRED).increment(1);
            }
        }
    }

    /// When the earliest open lease expires.
    fn next_expiry(&mut self) -> Option<Instant> {
        while let Some(&(expires, id)) = self.expiry.front() {
            if self.leases.contains_key(&id) {
                return Some(expires);
            }
            self.expiry.pop_front();
        }
        None
    }

    fn adjust(&mut self, id: u64, delta: Amounts) -> Result<(), LimiterError> {
        self.expire_leases();
        let lease = self
            .leases
            .get_mut(&id)
            .ok_or_else(|| LimiterError::LeaseNotFound(LeaseId::Backed(id).to_string()))?;
        if let Some((name, _)) = delta
            .iter()
            .find(|(n, _)| !lease.limits.iter().any(|l| l.name() == n))
        {
            return Err(LimiterError::invalid(
                "delta",
                format!("the lease has no limit \"{name}\""),
            ));
        }
        add(&mut lease.delta, &delta, 1);
        Ok(())
    }

    fn close(&mut self, id: u64, rollback: bool, reply: Reply<()>, myself: &ActorRef<Msg>) {
        self.expire_leases();
        let Some(lease) = self.leases.remove(&id) else {
            let _ = reply.send(Err(LimiterError::LeaseNotFound(
                LeaseId::Backed(id).to_string(),
            )));
            return;
        };
        self.shared.leases.remove(&id);
        metrics::gauge!(m::LEASES_OPEN).decrement(1.0);
        let mut amounts = Vec::new();
        if rollback {
            // The adjustments were never written; give back what the acquire took.
            add(&mut amounts, &lease.acquired, -1);
        } else {
            add(&mut amounts, &lease.delta, 1);
        }
        if amounts.is_empty() {
            let _ = reply.send(Ok(()));
            return;
        }
        self.slot(&lease.resource)
            .adjusts
            .push(PendingAdjust { amounts, reply });
        self.pump(&lease.resource, myself);
    }

    fn peek(
        &mut self,
        resource: ResourceId,
        limits: Vec<Limit>,
        amounts: Amounts,
        reply: Reply<Vec<LimitStatus>>,
        myself: &ActorRef<Msg>,
    ) {
        self.slot(&resource).peeks.push((limits, amounts, reply));
        self.pump(&resource, myself);
    }

    /// Expires leases; stops the actor when it has been idle long enough. Returns whether it is
    /// stopping.
    fn tick(&mut self, myself: &ActorRef<Msg>) -> bool {
        self.expire_leases();
        let idle = self.leases.is_empty()
            && self
                .slots
                .values()
                .all(|s| s.busy.is_none() && s.pending.is_empty() && s.adjusts.is_empty())
            && self.last_active.elapsed() >= self.shared.settings.idle_timeout;
        if idle {
            let me = myself.get_id();
            // Unpublish first, so new callers spawn a fresh actor; then finish what is queued.
            self.shared
                .actors
                .remove_if(&self.group, |_, r| r.get_id() == me);
            let _ = myself.drain();
        }
        idle
    }

    /// Adds consumption that the store recorded to the usage waiting to be flushed.
    fn record_usage(
        &mut self,
        resource: &ResourceId,
        used: &[(LimitName, i64)],
        myself: &ActorRef<Msg>,
    ) {
        if used.is_empty() {
            return;
        }
        let now = self.shared.clock.now_ms();
        for period in Period::ALL {
            let key = (resource.clone(), period, period.start(now));
            add(self.usage.entry(key).or_default(), used, 1);
        }
        self.schedule_flush(myself);
    }

    fn schedule_flush(&mut self, myself: &ActorRef<Msg>) {
        if !self.flush_scheduled && !self.usage.is_empty() {
            self.flush_scheduled = true;
            myself.send_after(self.shared.settings.usage_flush, || Msg::FlushUsage);
        }
    }

    fn take_usage(&mut self) -> Vec<Usage> {
        self.usage
            .drain()
            .filter(|(_, amounts)| !amounts.is_empty())
            .map(|((resource, period, start_ms), amounts)| Usage {
                entity: self.group.1.clone(),
                resource,
                period,
                start_ms,
                amounts,
            })
            .collect()
    }

    fn schedule_tick(&mut self, myself: &ActorRef<Msg>) {
        let idle_at = self.last_active + self.shared.settings.idle_timeout;
        let next = self.next_expiry().map_or(idle_at, |e| e.min(idle_at));
        if self.tick_at.is_some_and(|at| at <= next) {
            return;
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        self.tick_at = Some(next);
        myself.send_after(wait, || Msg::Tick);
    }
}

/// Moves queued lease adjustments into an acquire's write when they touch only limits the write
/// changes; returns the ones moved (answered with the write), leaving the rest queued.
fn fold_adjustments(write: &mut Write, queued: &mut Vec<PendingAdjust>) -> Vec<PendingAdjust> {
    let (fit, rest): (Vec<_>, Vec<_>) = std::mem::take(queued).into_iter().partition(|a| {
        a.amounts.iter().all(|(name, _)| match &*write {
            Write::Create(b) => b.limit(name).is_some(),
            Write::Change(c) => c
                .limits
                .iter()
                .any(|l| matches!(l, LimitChange::Update { name: n, .. } if n == name)),
        })
    });
    *queued = rest;
    for a in &fit {
        match write {
            Write::Create(b) => {
                let _ = b.adjust(&a.amounts);
            }
            Write::Change(c) => {
                for (name, amount) in &a.amounts {
                    for l in &mut c.limits {
                        if let LimitChange::Update {
                            name: n,
                            delta,
                            consumed,
                            ..
                        } = l
                            && n == name
                        {
                            *delta -= amount;
                            *consumed += amount;
                        }
                    }
                }
            }
        }
    }
    fit
}
