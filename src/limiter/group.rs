//! The actor of one consistency group: an entity and its cascading descendants (routed here by the
//! root's id), sole owner of their cached buckets, queued acquires and open leases while it runs;
//! idle, it leaves the buckets behind as a compact record and stops. One [`Lane`] per resource
//! does the deciding; this module wires lanes to the store and to time.
//!
//! Store calls run in tracked tasks that report back as messages, so the actor never waits on
//! I/O and keeps answering cached rejections while a write is in flight; shutdown waits for the
//! tasks. Every time-based rule (staleness, lease expiry, idleness, commit spacing) reads the
//! limiter's [`crate::clock::Clock`]; timers only say when to look again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;

use super::lane::{Io, Lane, Settle};
use super::leases::Leases;
use super::types::{
    Decision, Deps, GroupKey, LimiterError, Owner, Parked, ParkedBucket, Routes, Ticket,
};
use crate::domain::amounts::Amounts;
use crate::domain::bucket::{Bucket, Change, LimitStatus, Write};
use crate::domain::ids::{BucketKey, EntityId, ResourceId};
use crate::domain::limit::Limit;
use crate::metrics as m;
use crate::store::{KeyedWrite, StoreError};

pub(crate) type Reply<T> = oneshot::Sender<Result<T, LimiterError>>;

/// The parent a cascading entity's acquire also charges, with the parent's own limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParentSpec {
    pub entity: EntityId,
    pub limits: Vec<Limit>,
}

pub(crate) struct AcquireJob {
    pub entity: EntityId,
    pub resource: ResourceId,
    pub limits: Vec<Limit>,
    /// What the caller asked, by limit name: each name is a limit of the entity, of its cascade
    /// parent, or of both.
    pub amounts: Amounts,
    /// The share of the entity's own bucket: the amounts of its limits.
    pub own: Amounts,
    /// Set for a cascading child: charge this parent too, in the same atomic write.
    pub parent: Option<ParentSpec>,
    /// The share of the parent's bucket: the amounts of the parent's limits (empty without one).
    pub parent_share: Amounts,
    pub deadline: tokio::time::Instant,
    /// Whether the caller wants a lease, and who may use it (else the acquire is committed at
    /// once).
    pub lease: Option<Owner>,
    pub reply: Reply<Decision>,
    /// The job's place in its group's bound (see [`super::registry`]).
    pub ticket: Option<Ticket>,
    /// How many writes carrying this job lost a race to another writer.
    pub races: u8,
}

pub(crate) struct PeekJob {
    pub entity: EntityId,
    pub limits: Vec<Limit>,
    pub amounts: Amounts,
    pub reply: Reply<Vec<LimitStatus>>,
}

pub(crate) enum Msg {
    Acquire(AcquireJob),
    Adjust(u64, Amounts, Reply<()>),
    /// Commit (`false`) or roll back (`true`) a lease.
    Close(u64, bool, Reply<()>),
    Peek(
        EntityId,
        ResourceId,
        Vec<Limit>,
        Amounts,
        Reply<Vec<LimitStatus>>,
    ),
    Loaded(
        ResourceId,
        Result<Vec<(EntityId, Option<Bucket>)>, StoreError>,
    ),
    Written(ResourceId, Result<Option<Bucket>, StoreError>),
    /// Whether a write of unknown outcome landed, with the bucket as it is now.
    Resolved(ResourceId, Result<(bool, Option<Bucket>), StoreError>),
    /// A lane's wait (commit spacing, back-off) is over.
    Wake(ResourceId),
    Tick,
    /// Settle what is owed, flush usage, then stop.
    Shutdown,
}

pub(crate) struct GroupActor;

pub(crate) struct Args {
    pub deps: Arc<Deps>,
    pub routes: Arc<dyn Routes>,
    pub group: GroupKey,
    /// What the group's previous actor cached, when it left a record.
    pub parked: Option<Parked>,
}

pub(crate) struct State {
    deps: Arc<Deps>,
    routes: Arc<dyn Routes>,
    group: GroupKey,
    lanes: HashMap<ResourceId, Lane>,
    leases: Leases,
    last_active_ms: i64,
    /// When the next tick is due (clock ms), if one is scheduled, and its timer: a timer holds
    /// the actor's cell (mailbox included) until it fires, so a stopping actor aborts it.
    tick_at: Option<i64>,
    tick_timer: Option<tokio::task::JoinHandle<Result<(), ractor::MessagingErr<Msg>>>>,
    /// Stopping: idle, or the limiter is shutting down.
    stopping: bool,
}

/// A mark no other write of this process uses (see [`crate::domain::bucket::Fence`]).
pub(crate) fn next_mark() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What a lane may touch besides itself while deciding.
pub(crate) struct Ctx<'a> {
    pub deps: &'a Deps,
    pub routes: &'a dyn Routes,
    pub group: &'a GroupKey,
    pub resource: &'a ResourceId,
    pub leases: &'a mut Leases,
    pub now: i64,
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
        let now = args.deps.clock.now_ms();
        let mut lanes: HashMap<ResourceId, Lane> = HashMap::new();
        for b in args.parked.into_iter().flat_map(|p| p.buckets) {
            lanes
                .entry(b.resource)
                .or_default()
                .restore(b.entity, b.bucket, b.at_ms);
        }
        Ok(State {
            deps: args.deps,
            routes: args.routes,
            group: args.group,
            lanes,
            leases: Leases::default(),
            last_active_ms: now,
            tick_at: None,
            tick_timer: None,
            stopping: false,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Msg>,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        metrics::gauge!(m::ACTORS).decrement(1.0);
        if let Some(timer) = state.tick_timer.take() {
            timer.abort();
        }
        state.routes.unpublish(&state.group, myself.get_id());
        // Leases still open stay consumed; forget their routes.
        for id in state.leases.drain() {
            state.routes.lease_closed(id);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Msg>,
        msg: Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        let now = state.deps.clock.now_ms();
        let resource = match msg {
            Msg::Acquire(job) => {
                state.last_active_ms = now;
                let resource = job.resource.clone();
                state.with_lane(&resource, now, |lane, ctx| lane.acquire(job, ctx));
                Some(resource)
            }
            Msg::Adjust(id, delta, reply) => {
                state.last_active_ms = now;
                state.expire_leases(now);
                let _ = reply.send(state.leases.adjust(id, &delta));
                None
            }
            Msg::Close(id, rollback, reply) => {
                state.last_active_ms = now;
                state.expire_leases(now);
                let give_up_ms = state.leases.expires_ms(id).unwrap_or(now);
                state.leases.close(id, rollback, reply).map(|settlement| {
                    let lane = state.lanes.entry(settlement.resource.clone()).or_default();
                    lane.settle(Settle {
                        parts: settlement.parts,
                        lease: Some(id),
                        give_up_ms,
                    });
                    settlement.resource
                })
            }
            Msg::Peek(entity, resource, limits, amounts, reply) => {
                state.last_active_ms = now;
                let lane = state.lanes.entry(resource.clone()).or_default();
                lane.peek(PeekJob {
                    entity,
                    limits,
                    amounts,
                    reply,
                });
                Some(resource)
            }
            Msg::Loaded(resource, result) => {
                state.with_lane(&resource, now, |lane, ctx| lane.loaded(result, ctx));
                Some(resource)
            }
            Msg::Written(resource, result) => {
                state.with_lane(&resource, now, |lane, ctx| lane.written(result, ctx));
                Some(resource)
            }
            Msg::Resolved(resource, result) => {
                state.with_lane(&resource, now, |lane, ctx| lane.resolved(result, ctx));
                Some(resource)
            }
            Msg::Wake(resource) => {
                if let Some(lane) = state.lanes.get_mut(&resource) {
                    lane.wake_scheduled = false;
                }
                Some(resource)
            }
            Msg::Tick => {
                state.tick_at = None;
                // Finished if this tick is its own; a tick sent from outside makes it moot.
                if let Some(timer) = state.tick_timer.take() {
                    timer.abort();
                }
                state.expire_leases(now);
                let resources: Vec<ResourceId> = state.lanes.keys().cloned().collect();
                for r in resources {
                    state.drive(&r, now, &myself);
                }
                if !state.stopping
                    && state.quiet(false)
                    && now - state.last_active_ms >= state.deps.settings.idle_timeout_ms
                {
                    // Leave the record first, so new callers get a fresh actor starting from it;
                    // a call already on its way keeps this one running until it is answered.
                    let parked = state.park();
                    state.stopping = state.routes.park(&state.group, myself.get_id(), parked);
                }
                None
            }
            Msg::Shutdown => {
                state.stopping = true;
                state.routes.unpublish(&state.group, myself.get_id());
                None
            }
        };
        if let Some(resource) = resource {
            state.drive(&resource, now, &myself);
        }
        for id in state.leases.take_forgotten() {
            state.routes.lease_closed(id);
        }
        if state.stopping && state.quiet(true) {
            myself.stop(None);
            return Ok(());
        }
        state.schedule_tick(now, &myself);
        Ok(())
    }
}

/// The parts of the state a lane's context borrows, split from the lanes.
struct CtxParts<'a> {
    deps: &'a Deps,
    routes: &'a dyn Routes,
    group: &'a GroupKey,
    leases: &'a mut Leases,
    now: i64,
}

impl Ctx<'_> {
    pub fn next_mark(&self) -> u64 {
        next_mark()
    }
}

impl<'a> CtxParts<'a> {
    fn with<'b>(&'b mut self, resource: &'b ResourceId) -> Ctx<'b> {
        Ctx {
            deps: self.deps,
            routes: self.routes,
            group: self.group,
            resource,
            leases: self.leases,
            now: self.now,
        }
    }
}

impl State {
    fn ctx_parts(&mut self, now: i64) -> (&mut HashMap<ResourceId, Lane>, CtxParts<'_>) {
        (
            &mut self.lanes,
            CtxParts {
                deps: &self.deps,
                routes: &*self.routes,
                group: &self.group,
                leases: &mut self.leases,
                now,
            },
        )
    }

    fn with_lane<T>(
        &mut self,
        resource: &ResourceId,
        now: i64,
        f: impl FnOnce(&mut Lane, &mut Ctx<'_>) -> T,
    ) -> T {
        let (lanes, mut parts) = self.ctx_parts(now);
        let lane = lanes.entry(resource.clone()).or_default();
        f(lane, &mut parts.with(resource))
    }

    /// The compact record of what the lanes cache, for the group's next actor.
    fn park(&self) -> Parked {
        let buckets = self
            .lanes
            .iter()
            .flat_map(|(resource, lane)| {
                lane.cached().map(|(entity, bucket, at_ms)| ParkedBucket {
                    resource: resource.clone(),
                    entity: entity.clone(),
                    bucket: bucket.cloned(),
                    at_ms,
                })
            })
            .collect();
        Parked {
            buckets,
            last_active_ms: self.last_active_ms,
        }
    }

    fn expire_leases(&mut self, now: i64) {
        for id in self.leases.expire(now) {
            self.routes.lease_closed(id);
        }
    }

    /// Whether nothing is queued, in flight or owed (and, unless `ignore_leases`, no lease is
    /// open).
    fn quiet(&self, ignore_leases: bool) -> bool {
        self.lanes.values().all(Lane::is_idle)
            && !self.leases.closing()
            && (ignore_leases || !self.leases.any_open())
    }

    /// Runs a lane's rounds and starts the store call it asks for.
    fn drive(&mut self, resource: &ResourceId, now: i64, myself: &ActorRef<Msg>) {
        let io = self.with_lane(resource, now, |lane, ctx| lane.round(ctx));
        let wait = match io {
            None => None,
            Some(Io::Wait(ms)) => Some(ms),
            Some(Io::Load(entities)) => {
                self.spawn_load(resource.clone(), entities, myself);
                None
            }
            Some(Io::Write(writes)) => {
                self.spawn_write(resource.clone(), writes, myself);
                None
            }
            Some(Io::Resolve(entity, seq)) => {
                self.spawn_resolve(resource.clone(), entity, seq, myself);
                None
            }
        };
        if let Some(ms) = wait {
            let lane = self
                .lanes
                .get_mut(resource)
                .expect("the lane was just used");
            if !lane.wake_scheduled {
                lane.wake_scheduled = true;
                let resource = resource.clone();
                let delay = Duration::from_millis(ms.max(1) as u64);
                myself.send_after(delay, move || Msg::Wake(resource));
            }
        }
    }

    fn key(&self, entity: EntityId, resource: &ResourceId) -> BucketKey {
        BucketKey {
            namespace: self.group.0.clone(),
            entity,
            resource: resource.clone(),
        }
    }

    fn spawn_load(&self, resource: ResourceId, entities: Vec<EntityId>, myself: &ActorRef<Msg>) {
        let store = self.deps.store.clone();
        let keys: Vec<BucketKey> = entities
            .into_iter()
            .map(|e| self.key(e, &resource))
            .collect();
        let me = myself.clone();
        self.deps.tasks.spawn(async move {
            let mut states = Vec::with_capacity(keys.len());
            let mut result = Ok(());
            for key in keys {
                match store.load_bucket(&key).await {
                    Ok(b) => states.push((key.entity, b)),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let _ = me.cast(Msg::Loaded(resource, result.map(|()| states)));
        });
    }

    fn spawn_write(
        &self,
        resource: ResourceId,
        writes: Vec<(EntityId, Write)>,
        myself: &ActorRef<Msg>,
    ) {
        let store = self.deps.store.clone();
        let writes: Vec<KeyedWrite> = writes
            .into_iter()
            .map(|(e, write)| KeyedWrite {
                key: self.key(e, &resource),
                write,
            })
            .collect();
        let me = myself.clone();
        self.deps.tasks.spawn(async move {
            let result = match writes.as_slice() {
                [one] => store.submit_write(&one.key, &one.write).await,
                many => store.commit(many).await.map(|()| None),
            };
            let _ = me.cast(Msg::Written(resource, result));
        });
    }

    /// Finds out whether the write marked `seq` landed: the stored mark says so; if it does not
    /// (yet), a write that only moves the mark fences the lost write off for good.
    fn spawn_resolve(
        &self,
        resource: ResourceId,
        entity: EntityId,
        seq: u64,
        myself: &ActorRef<Msg>,
    ) {
        let store = self.deps.store.clone();
        let key = self.key(entity, &resource);
        let me = myself.clone();
        self.deps.tasks.spawn(async move {
            let result = async {
                for _ in 0..crate::consume::MAX_ATTEMPTS {
                    let Some(current) = store.load_bucket(&key).await? else {
                        // Never created: the lost write was a create that did not land.
                        return Ok((false, None));
                    };
                    if current.mark == Some(seq) {
                        return Ok((true, Some(current)));
                    }
                    let fence = Write::Change(Change::fence_only(&current, next_mark()));
                    match store.write_bucket(&key, &fence).await {
                        Ok(stored) => return Ok((false, Some(stored))),
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(StoreError::Transient(
                    "could not fence off a lost write: the bucket keeps changing".into(),
                ))
            }
            .await;
            let _ = me.cast(Msg::Resolved(resource, result));
        });
    }

    /// Arms the timer for the next lease expiry and, when nothing is queued, in flight or open,
    /// for the moment the group becomes idle. A group that is not quiet has no idle moment to
    /// wait for: the message that makes it quiet (a write's answer, a lease's close or expiry)
    /// schedules again. (Waiting for it on a timer made every actor with an open lease tick
    /// every 10 ms once its idle time had passed.)
    fn schedule_tick(&mut self, now: i64, myself: &ActorRef<Msg>) {
        let idle_at = self
            .quiet(false)
            .then(|| self.last_active_ms + self.deps.settings.idle_timeout_ms);
        let Some(next) = next_tick(idle_at, self.leases.next_expiry()) else {
            return;
        };
        if self.tick_at.is_some_and(|at| at <= next) {
            return;
        }
        let wait = (next - now).clamp(10, 60_000);
        self.tick_at = Some(next);
        let timer = myself.send_after(Duration::from_millis(wait as u64), || Msg::Tick);
        if let Some(earlier) = self.tick_timer.replace(timer) {
            earlier.abort();
        }
    }
}

/// When the next tick is due: the earlier of the idle moment (`None` while the group is not
/// quiet) and the next lease expiry; `None` when neither is coming.
fn next_tick(idle_at: Option<i64>, lease_expiry: Option<i64>) -> Option<i64> {
    match (idle_at, lease_expiry) {
        (Some(i), Some(e)) => Some(i.min(e)),
        (Some(at), None) | (None, Some(at)) => Some(at),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::next_tick;

    #[test]
    fn a_group_that_cannot_stop_waits_for_its_next_lease_expiry() {
        // Quiet: the idle moment or an earlier expiry.
        assert_eq!(next_tick(Some(1_000), None), Some(1_000));
        assert_eq!(next_tick(Some(1_000), Some(900)), Some(900));
        // A lease is open (not quiet): however long ago the group was last active, the next
        // tick is the lease's expiry, not a timer that fires again and again meanwhile.
        assert_eq!(next_tick(None, Some(60_000)), Some(60_000));
        // Busy with nothing open: the answer of its store call schedules again.
        assert_eq!(next_tick(None, None), None);
    }
}
