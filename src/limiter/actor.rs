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
//! For an entity that cascades, a slot also keeps the parent's bucket for the resource: every
//! acquire must fit both, and both items are written in one transaction (see docs/daemon.md).
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
use crate::domain::ids::{BucketKey, EntityId, ResourceId};
use crate::domain::limit::{Limit, LimitName};
use crate::domain::records::{Period, Usage};
use crate::metrics::{self as m, outcome};
use crate::store::{BucketOp, KeyedWrite, StoreError};

pub(super) struct GroupActor;

pub(super) struct Args {
    pub shared: Arc<Shared>,
    pub group: GroupKey,
}

type Amounts = Vec<(LimitName, i64)>;
type Reply<T> = RpcReplyPort<Result<T, LimiterError>>;

/// The parent a cascading entity's acquire also charges, with the parent's own limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ParentSpec {
    pub entity: EntityId,
    pub limits: Vec<Limit>,
}

impl ParentSpec {
    /// The part of `amounts` the parent's limits take (limits it lacks are not charged).
    fn amounts(&self, amounts: &[(LimitName, i64)]) -> Amounts {
        amounts
            .iter()
            .filter(|(n, _)| self.limits.iter().any(|l| l.name() == n))
            .cloned()
            .collect()
    }
}

pub(super) struct AcquireJob {
    pub resource: ResourceId,
    pub limits: Vec<Limit>,
    pub amounts: Amounts,
    /// Set for a cascading entity: charge this parent too, in the same atomic commit.
    pub parent: Option<ParentSpec>,
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
    /// The bucket as read, and the parent's when the slot cascades.
    Loaded(
        ResourceId,
        Result<(Option<Bucket>, Option<Option<Bucket>>), StoreError>,
    ),
    Written(ResourceId, Result<Written, StoreError>),
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

/// What a finished write tells about the buckets it wrote.
pub(super) enum Written {
    /// One bucket, as the store returned it.
    Stored(Bucket),
    /// A transaction (no item comes back): the states it was planned to leave.
    Planned {
        bucket: Option<Bucket>,
        parent: Option<Bucket>,
    },
    /// Unconditional adjustments, applied as sent.
    Adjusted,
    /// Nothing needed writing.
    Nothing,
}

/// A commit delta or rollback refund waiting for the next write.
struct PendingAdjust {
    amounts: Amounts,
    /// The cascade parent's share.
    parent: Option<(EntityId, Amounts)>,
    reply: Reply<()>,
}

/// What the in-flight write carries.
struct Batch {
    admitted: Vec<(AcquireJob, Vec<LimitStatus>)>,
    adjusts: Vec<PendingAdjust>,
    /// Sum of the admitted amounts.
    amounts: Amounts,
    /// Sum of what the admitted charge the cascade parent.
    parent_amounts: Amounts,
    /// Which bucket each write of a transaction is (a conflict names its position).
    parts: Vec<Part>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Own,
    Parent,
}

/// The cascade parent's bucket as this slot last saw it.
struct ParentSlot {
    entity: EntityId,
    cache: Option<Cached>,
    reserved: Amounts,
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
    /// Set while the entity cascades to a parent.
    parent: Option<ParentSlot>,
}

struct Lease {
    resource: ResourceId,
    limits: Vec<Limit>,
    acquired: Amounts,
    delta: Amounts,
    parent: Option<ParentSpec>,
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
    /// Consumption not yet added to the stored usage snapshots, per (entity, resource, period,
    /// start); the entity is this actor's, or a cascade parent.
    usage: HashMap<(EntityId, ResourceId, Period, i64), Amounts>,
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
                    let key = (u.entity, u.resource, u.period, u.start_ms);
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

/// A rejection that a fresh cached state decides: the state, refilled to now, less what is
/// already reserved, cannot cover the request.
fn cached_rejection(
    cache: Option<&Cached>,
    max_staleness: Duration,
    reserved: &[(LimitName, i64)],
    limits: &[Limit],
    amounts: &[(LimitName, i64)],
    now: i64,
) -> Option<Rejection> {
    let cached = cache.filter(|c| c.fetched.elapsed() <= max_staleness)?;
    let mut projected = match &cached.bucket {
        Some(b)
            if b.limits.len() == limits.len()
                && b.limits.iter().zip(limits).all(|(s, l)| s.limit == *l) =>
        {
            b.at(now)
        }
        Some(_) => return None,
        None => Bucket::full(limits.to_vec(), now),
    };
    projected.adjust(reserved).ok()?;
    match plan(Some(&projected), limits, amounts, now) {
        Ok(Plan::Reject(r)) => Some(r),
        _ => None,
    }
}

impl Slot {
    /// Points the slot at the parent the next jobs cascade to (or none); a change of parent
    /// starts from an empty cache and recounts what the queue reserves of the new one.
    fn follow_parent(&mut self, spec: Option<&ParentSpec>) {
        let current = self.parent.as_ref().map(|p| &p.entity);
        if current == spec.map(|s| &s.entity) {
            return;
        }
        self.parent = spec.map(|spec| {
            let mut reserved = Vec::new();
            for job in &self.pending {
                if let Some(s) = job.parent.as_ref().filter(|s| s.entity == spec.entity) {
                    add(&mut reserved, &s.amounts(&job.amounts), 1);
                }
            }
            ParentSlot {
                entity: spec.entity.clone(),
                cache: None,
                reserved,
            }
        });
    }

    /// Adds (`sign` 1) or releases (-1) what a job holds of the bucket and of its parent.
    fn reserve(&mut self, job: &AcquireJob, sign: i64) {
        add(&mut self.reserved, &job.amounts, sign);
        if let (Some(spec), Some(parent)) = (&job.parent, &mut self.parent)
            && parent.entity == spec.entity
        {
            add(&mut parent.reserved, &spec.amounts(&job.amounts), sign);
        }
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

    fn acquire(&mut self, job: AcquireJob, myself: &ActorRef<Msg>) {
        let now = self.shared.clock.now_ms();
        if let Some((rejection, refused_by)) = self.fast_reject(&job, now) {
            m::decision(outcome::REJECTED_CACHED);
            let _ = job.reply.send(Ok(Decision::Rejected {
                rejection,
                refused_by,
            }));
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
        if slot.busy.is_none() && slot.pending.is_empty() {
            slot.follow_parent(job.parent.as_ref());
        }
        slot.reserve(&job, 1);
        slot.pending.push_back(job);
        self.pump(&resource, myself);
    }

    /// A rejection decided from the cache alone (with the parent that refused, for a cascade),
    /// or `None` when the store must decide.
    fn fast_reject(&mut self, job: &AcquireJob, now: i64) -> Option<(Rejection, Option<EntityId>)> {
        // More than a limit's capacity never fits, whatever is stored.
        if let Ok(Plan::Reject(r)) = plan(None, &job.limits, &job.amounts, now)
            && r.retry_after_ms().is_none()
        {
            return Some((r, None));
        }
        let max_staleness = self.shared.settings.max_staleness;
        let slot = self.slots.get(&job.resource)?;
        if let Some(r) = cached_rejection(
            slot.cache.as_ref(),
            max_staleness,
            &slot.reserved,
            &job.limits,
            &job.amounts,
            now,
        ) {
            return Some((r, None));
        }
        let spec = job.parent.as_ref()?;
        let parent = slot.parent.as_ref().filter(|p| p.entity == spec.entity)?;
        cached_rejection(
            parent.cache.as_ref(),
            max_staleness,
            &parent.reserved,
            &spec.limits,
            &spec.amounts(&job.amounts),
            now,
        )
        .map(|r| (r, Some(spec.entity.clone())))
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
        if let Some(front) = slot.pending.front() {
            let spec = front.parent.clone();
            slot.follow_parent(spec.as_ref());
        }
        // A state the store just returned serves one round of decisions, however short the
        // staleness bound; after that, age decides.
        let fresh = |c: &Option<Cached>| {
            c.as_ref()
                .is_some_and(|c| c.from_store || c.fetched.elapsed() <= settings.max_staleness)
        };
        let parent_fresh = slot.parent.as_ref().is_none_or(|p| fresh(&p.cache));
        let has_decisions = !slot.pending.is_empty() || !slot.peeks.is_empty();
        let has_state = fresh(&slot.cache) && parent_fresh;
        if has_decisions && !has_state {
            slot.busy = Some(Busy::Loading);
            let parent_key = slot.parent.as_ref().map(|p| BucketKey {
                entity: p.entity.clone(),
                ..key.clone()
            });
            let me = myself.clone();
            let resource = resource.clone();
            tokio::spawn(async move {
                let result = async {
                    let own = store.load_bucket(&key).await?;
                    let parent = match parent_key {
                        Some(k) => Some(store.load_bucket(&k).await?),
                        None => None,
                    };
                    Ok((own, parent))
                }
                .await;
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
        let from_store = slot.cache.as_ref().is_some_and(|c| c.from_store)
            || slot
                .parent
                .as_ref()
                .is_some_and(|p| p.cache.as_ref().is_some_and(|c| c.from_store));
        // This round uses up the store's answer; the next one goes by age.
        for c in [
            slot.cache.as_mut(),
            slot.parent.as_mut().and_then(|p| p.cache.as_mut()),
        ]
        .into_iter()
        .flatten()
        {
            c.from_store = false;
        }
        let Some((limits, spec)) = slot
            .pending
            .front()
            .map(|j| (j.limits.clone(), j.parent.clone()))
        else {
            return self.write_adjustments(resource, myself);
        };
        let parent_cached = slot
            .parent
            .as_ref()
            .and_then(|p| p.cache.as_ref().and_then(|c| c.bucket.clone()));
        // Decide, in order, what the cached states cover: the bucket and, for a cascade, the
        // parent, each against what the previous acquires of the batch left.
        let mut base = cached.clone();
        let mut parent_base = parent_cached.clone();
        let mut batch = Batch {
            admitted: Vec::new(),
            adjusts: Vec::new(),
            amounts: Vec::new(),
            parent_amounts: Vec::new(),
            parts: Vec::new(),
        };
        let mut later = VecDeque::new();
        while let Some(job) = slot.pending.pop_front() {
            if batch.admitted.len() >= settings.max_batch {
                slot.pending.push_front(job);
                break;
            }
            if job.limits != limits || job.parent != spec {
                later.push_back(job);
                continue;
            }
            if Instant::now() >= job.deadline {
                // The caller has gone: charge nothing for it.
                slot.reserve(&job, -1);
                continue;
            }
            let own = admit(base.as_ref(), &limits, &job.amounts, now);
            let parent = spec.as_ref().map(|spec| {
                admit(
                    parent_base.as_ref(),
                    &spec.limits,
                    &spec.amounts(&job.amounts),
                    now,
                )
            });
            let refusal = match (&own, &parent) {
                (Err(e), _) | (_, Some(Err(e))) => Some(Err(LimiterError::invalid("consume", e))),
                (Ok(Admission::Rejected(r)), _) => Some(Ok((r.clone(), None))),
                (_, Some(Ok(Admission::Rejected(r)))) => {
                    Some(Ok((r.clone(), spec.as_ref().map(|s| s.entity.clone()))))
                }
                _ => None,
            };
            match refusal {
                Some(answer) => {
                    slot.reserve(&job, -1);
                    let answer = answer.map(|(rejection, refused_by)| {
                        m::decision(if from_store {
                            outcome::REJECTED_STORE
                        } else {
                            outcome::REJECTED_CACHED
                        });
                        Decision::Rejected {
                            rejection,
                            refused_by,
                        }
                    });
                    let _ = job.reply.send(answer);
                }
                None => {
                    let Ok(Admission::Admitted { statuses, after }) = own else {
                        unreachable!("a job that was not refused was admitted");
                    };
                    base = Some(after);
                    if let (Some(Ok(Admission::Admitted { after, .. })), Some(spec)) =
                        (parent, &spec)
                    {
                        parent_base = Some(after);
                        add(&mut batch.parent_amounts, &spec.amounts(&job.amounts), 1);
                    }
                    add(&mut batch.amounts, &job.amounts, 1);
                    batch.admitted.push((job, statuses));
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
        let own = plan(cached.as_ref(), &limits, &batch.amounts, now);
        let parent = spec.as_ref().map(|spec| {
            plan(
                parent_cached.as_ref(),
                &spec.limits,
                &batch.parent_amounts,
                now,
            )
        });
        let (own, parent) = match (own, parent) {
            (Ok(Plan::Admit { write, expected }), None) => ((write, expected), None),
            (
                Ok(Plan::Admit { write, expected }),
                Some(Ok(Plan::Admit {
                    write: pw,
                    expected: pe,
                })),
            ) => ((write, expected), Some((pw, pe))),
            _ => {
                // Admitting one by one and all at once agree; if they ever did not, decide again.
                for (job, _) in batch.admitted.into_iter().rev() {
                    slot.pending.push_front(job);
                }
                slot.cache = None;
                return self.pump(resource, myself);
            }
        };
        let ((mut write, expected), parent) = (own, parent);
        let noop = |w: &Write| matches!(w, Write::Change(c) if c.is_noop());
        metrics::histogram!(m::BATCH_SIZE).record(batch.admitted.len() as f64);
        match parent.filter(|(pw, _)| !noop(pw)) {
            None => {
                if slot.parent.is_none() {
                    batch.adjusts = fold_adjustments(&mut write, &mut slot.adjusts);
                }
                if noop(&write) {
                    // Nothing to record (all amounts zero, no refill due): answer from the
                    // cache, which stays as the store last confirmed it.
                    slot.busy = Some(Busy::Writing(batch));
                    return self.finish(resource, Ok(Written::Nothing), myself);
                }
                batch.parts = vec![Part::Own];
                slot.busy = Some(Busy::Writing(batch));
                slot.last_write = Some(Instant::now());
                let me = myself.clone();
                let resource = resource.clone();
                tokio::spawn(async move {
                    let result = store.write_bucket(&key, &write).await.map(Written::Stored);
                    let _ = me.cast(Msg::Written(resource, result));
                });
            }
            Some((parent_write, parent_expected)) => {
                // The bucket and its parent change together or not at all.
                let parent_key = BucketKey {
                    entity: spec
                        .as_ref()
                        .expect("a parent write has a parent")
                        .entity
                        .clone(),
                    ..key.clone()
                };
                let mut writes = Vec::new();
                if !noop(&write) {
                    writes.push(KeyedWrite {
                        key: key.clone(),
                        op: BucketOp::Write(write),
                    });
                    batch.parts.push(Part::Own);
                }
                writes.push(KeyedWrite {
                    key: parent_key,
                    op: BucketOp::Write(parent_write),
                });
                batch.parts.push(Part::Parent);
                slot.busy = Some(Busy::Writing(batch));
                slot.last_write = Some(Instant::now());
                let me = myself.clone();
                let resource = resource.clone();
                tokio::spawn(async move {
                    let result = store.commit(&writes).await.map(|()| Written::Planned {
                        bucket: Some(expected),
                        parent: Some(parent_expected),
                    });
                    let _ = me.cast(Msg::Written(resource, result));
                });
            }
        }
    }

    /// Writes queued lease adjustments on their own (no acquire to carry them); with a cascade
    /// parent's share, both buckets in one transaction.
    fn write_adjustments(&mut self, resource: &ResourceId, myself: &ActorRef<Msg>) {
        let key = self.key(resource);
        let store = self.shared.store.clone();
        let slot = self.slots.entry(resource.clone()).or_default();
        if slot.adjusts.is_empty() {
            return;
        }
        let adjusts: Vec<PendingAdjust> = std::mem::take(&mut slot.adjusts);
        let mut writes = Vec::new();
        let mut parts = Vec::new();
        let mut own = Vec::new();
        let mut parents: Vec<(EntityId, Amounts)> = Vec::new();
        for a in &adjusts {
            add(&mut own, &a.amounts, 1);
            if let Some((entity, amounts)) = &a.parent {
                match parents.iter_mut().find(|(e, _)| e == entity) {
                    Some((_, total)) => add(total, amounts, 1),
                    None => parents.push((entity.clone(), amounts.clone())),
                }
            }
        }
        if !own.is_empty() {
            writes.push(KeyedWrite {
                key: key.clone(),
                op: BucketOp::Adjust(own),
            });
            parts.push(Part::Own);
        }
        for (entity, amounts) in parents.into_iter().filter(|(_, a)| !a.is_empty()) {
            writes.push(KeyedWrite {
                key: BucketKey {
                    entity,
                    ..key.clone()
                },
                op: BucketOp::Adjust(amounts),
            });
            parts.push(Part::Parent);
        }
        slot.busy = Some(Busy::Writing(Batch {
            admitted: Vec::new(),
            adjusts,
            amounts: Vec::new(),
            parent_amounts: Vec::new(),
            parts,
        }));
        if writes.is_empty() {
            return self.finish(resource, Ok(Written::Nothing), myself);
        }
        slot.last_write = Some(Instant::now());
        let me = myself.clone();
        let resource = resource.clone();
        tokio::spawn(async move {
            let result = store.commit(&writes).await.map(|()| Written::Adjusted);
            let _ = me.cast(Msg::Written(resource, result));
        });
    }

    fn loaded(
        &mut self,
        resource: ResourceId,
        result: Result<(Option<Bucket>, Option<Option<Bucket>>), StoreError>,
        myself: &ActorRef<Msg>,
    ) {
        let policy = self.shared.settings.failure_policy;
        let slot = self.slots.entry(resource.clone()).or_default();
        slot.busy = None;
        let confirmed = |bucket| Cached {
            bucket,
            fetched: Instant::now(),
            from_store: true,
        };
        match result {
            Ok((own, parent)) => {
                slot.cache = Some(confirmed(own));
                if let (Some(bucket), Some(p)) = (parent, &mut slot.parent) {
                    p.cache = Some(confirmed(bucket));
                }
            }
            Err(e) => {
                let jobs: Vec<AcquireJob> = slot.pending.drain(..).collect();
                slot.reserved.clear();
                if let Some(p) = &mut slot.parent {
                    p.reserved.clear();
                }
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
        result: Result<Written, StoreError>,
        myself: &ActorRef<Msg>,
    ) {
        let policy = self.shared.settings.failure_policy;
        let lease_ttl = self.shared.settings.lease_ttl;
        let slot = self.slots.entry(resource.clone()).or_default();
        let Some(Busy::Writing(batch)) = slot.busy.take() else {
            return;
        };
        match result {
            Ok(written) => {
                match written {
                    Written::Stored(bucket) => {
                        slot.cache = Some(Cached {
                            bucket: Some(bucket),
                            fetched: Instant::now(),
                            from_store: false,
                        });
                    }
                    Written::Planned { bucket, parent } => {
                        // No item comes back from a transaction: keep what it was planned to
                        // leave, but only as fresh as the last confirmed read (other writers
                        // may have changed the items since).
                        if let Some(c) = &mut slot.cache {
                            c.bucket = bucket;
                            c.from_store = false;
                        }
                        if let Some(c) = slot.parent.as_mut().and_then(|p| p.cache.as_mut()) {
                            c.bucket = parent;
                            c.from_store = false;
                        }
                    }
                    Written::Adjusted => {
                        // Apply the adjustments to the caches as the store did.
                        for a in &batch.adjusts {
                            if let Some(Cached {
                                bucket: Some(b), ..
                            }) = &mut slot.cache
                            {
                                let _ = b.adjust(&a.amounts);
                            }
                            if let (Some((entity, amounts)), Some(p)) =
                                (&a.parent, &mut slot.parent)
                                && p.entity == *entity
                                && let Some(Cached {
                                    bucket: Some(b), ..
                                }) = &mut p.cache
                            {
                                let _ = b.adjust(amounts);
                            }
                        }
                    }
                    Written::Nothing => {}
                }
                add(&mut slot.reserved, &batch.amounts, -1);
                if let Some(p) = &mut slot.parent {
                    add(&mut p.reserved, &batch.parent_amounts, -1);
                }
                let mut used = batch.amounts.clone();
                let mut parent_used: Vec<(EntityId, Amounts)> = Vec::new();
                if let Some(spec) = batch.admitted.first().and_then(|(j, _)| j.parent.as_ref()) {
                    parent_used.push((spec.entity.clone(), batch.parent_amounts.clone()));
                }
                for a in batch.adjusts {
                    add(&mut used, &a.amounts, 1);
                    if let Some((entity, amounts)) = a.parent {
                        parent_used.push((entity, amounts));
                    }
                    let _ = a.reply.send(Ok(()));
                }
                let own = self.group.1.clone();
                self.record_usage(&own, resource, &used, myself);
                for (entity, amounts) in parent_used {
                    self.record_usage(&entity, resource, &amounts, myself);
                }
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
                            parent: job.parent,
                        },
                    );
                    let _ = job.reply.send(Ok(Decision::Admitted {
                        lease: Some(LeaseId::Backed(id)),
                        statuses,
                    }));
                }
            }
            Err(StoreError::Conflict { index, current }) => {
                metrics::counter!(m::CONFLICTS).increment(1);
                let fresh = Cached {
                    bucket: current.map(|b| *b),
                    fetched: Instant::now(),
                    from_store: true,
                };
                match (batch.parts.get(index), &mut slot.parent) {
                    (Some(Part::Parent), Some(p)) => p.cache = Some(fresh),
                    _ => slot.cache = Some(fresh),
                }
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
                if let Some(ParentSlot {
                    cache:
                        Some(Cached {
                            bucket: Some(b), ..
                        }),
                    ..
                }) = &slot.parent
                {
                    for a in &mut adjusts {
                        if let Some((_, amounts)) = &mut a.parent {
                            amounts.retain(|(n, _)| b.limit(n).is_some());
                        }
                    }
                }
                adjusts.append(&mut slot.adjusts);
                slot.adjusts = adjusts;
            }
            Err(e) => {
                slot.cache = None;
                add(&mut slot.reserved, &batch.amounts, -1);
                if let Some(p) = &mut slot.parent {
                    p.cache = None;
                    add(&mut p.reserved, &batch.parent_amounts, -1);
                }
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
        // A cascade lease settles the parent's share the same way, in the same write.
        let parent = lease
            .parent
            .as_ref()
            .map(|spec| (spec.entity.clone(), spec.amounts(&amounts)))
            .filter(|(_, a)| !a.is_empty());
        if amounts.is_empty() {
            let _ = reply.send(Ok(()));
            return;
        }
        self.slot(&lease.resource).adjusts.push(PendingAdjust {
            amounts,
            parent,
            reply,
        });
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
        entity: &EntityId,
        resource: &ResourceId,
        used: &[(LimitName, i64)],
        myself: &ActorRef<Msg>,
    ) {
        if used.is_empty() || self.shared.settings.usage_flush.is_zero() {
            return;
        }
        let now = self.shared.clock.now_ms();
        for period in Period::ALL {
            let key = (entity.clone(), resource.clone(), period, period.start(now));
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
            .map(|((entity, resource, period, start_ms), amounts)| Usage {
                entity,
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
