//! The actor of one consistency group: an entity and its cascading descendants (routed here by the
//! root's id), sole owner of their cached buckets, queued acquires and open leases while it runs;
//! idle, it leaves the buckets behind as a compact record and stops. One [`Lane`] per resource
//! does the deciding; this module wires lanes to the store, to time, and to the lease table:
//! it starts the store calls a lane asks for and applies the [`Event`]s it returns (answering
//! admissions, opening and closing leases, recording usage).
//!
//! Store calls run in tracked tasks that report back as messages, so the actor never waits on
//! I/O and keeps answering cached rejections while a write is in flight; shutdown waits for
//! the tasks. Every time-based rule (staleness, lease expiry, idleness, commit spacing) reads the
//! limiter's [`crate::clock::Clock`]; timers only say when to look again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

use super::lane::{Ctx, Event, Io, Lane, Settle, next_mark};
use super::leases::{Lease, Leases};
use super::messages::{
    AcquireJob, GroupKey, LeaseOp, Msg, Parked, ParkedBucket, Resolution, Routes,
};
use super::types::{Decision, Deps, LeaseId};
use crate::domain::bucket::{Change, LimitStatus, Write};
use crate::domain::ids::{BucketKey, EntityId, ResourceId};
use crate::metrics::{self as m, outcome};
use crate::store::{KeyedWrite, StoreError};

pub(crate) struct GroupActor;

pub(crate) struct Args {
    pub deps: Arc<Deps>,
    pub routes: Arc<dyn Routes>,
    pub group: GroupKey,
    /// What the group's previous actor cached, when it left a record.
    pub parked: Option<Parked>,
    /// Set while a tick sent from outside waits in the mailbox (see `Registry::tick`).
    pub tick_queued: Arc<AtomicBool>,
}

/// Whether open leases keep a group from being quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenLeases {
    /// Going idle: a group holding a lease is not idle (its holder will be back, or a closer
    /// that did not hear the outcome will ask again).
    Hold,
    /// Shutting down: open leases stay consumed; they do not hold the actor.
    Ignore,
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
    tick_queued: Arc<AtomicBool>,
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
            leases: Leases::new(args.deps.settings.lease_ttl_ms),
            deps: args.deps,
            routes: args.routes,
            group: args.group,
            lanes,
            last_active_ms: now,
            tick_at: None,
            tick_timer: None,
            stopping: false,
            tick_queued: args.tick_queued,
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
            Msg::Lease { id, op, reply } => {
                state.last_active_ms = now;
                state.expire_leases(now);
                match op {
                    LeaseOp::Adjust(delta) => {
                        let _ = reply.send(state.leases.adjust(id, &delta, now));
                        None
                    }
                    LeaseOp::Renew => {
                        let _ = reply.send(state.leases.renew(id, now));
                        None
                    }
                    LeaseOp::Close(how, delta) => {
                        let refused = (!delta.is_empty() && state.leases.is_open(id))
                            .then(|| state.leases.adjust(id, &delta, now).err())
                            .flatten();
                        let closing = match refused {
                            // Refused whole: the lease stays open, unchanged.
                            Some(e) => {
                                let _ = reply.send(Err(e));
                                None
                            }
                            None => state.leases.close(id, how, reply, now),
                        };
                        let give_up_ms = state.leases.expires_ms(id).unwrap_or(now);
                        closing.map(|settlement| {
                            state.lane(&settlement.resource).settle(Settle {
                                parts: settlement.parts,
                                counted: settlement.counted,
                                lease: Some(id),
                                give_up_ms,
                            });
                            settlement.resource
                        })
                    }
                }
            }
            Msg::Peek(job) => {
                state.last_active_ms = now;
                let resource = job.resource.clone();
                state.lane(&resource).peek(job);
                Some(resource)
            }
            Msg::Refresh {
                entity,
                resource,
                reply,
            } => {
                if let Some(lane) = state.lanes.get_mut(&resource) {
                    lane.forget(&entity);
                }
                let _ = reply.send(Ok(()));
                None
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
                state.tick_queued.store(false, Ordering::SeqCst);
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
                    && state.quiet(OpenLeases::Hold)
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
        if state.stopping && state.quiet(OpenLeases::Ignore) {
            myself.stop(None);
            return Ok(());
        }
        state.schedule_tick(now, &myself);
        Ok(())
    }
}

impl State {
    /// Runs `f` on the lane of `resource` with its context.
    fn with_lane<T>(
        &mut self,
        resource: &ResourceId,
        now: i64,
        f: impl FnOnce(&mut Lane, &Ctx<'_>) -> T,
    ) -> T {
        let ctx = Ctx {
            settings: &self.deps.settings,
            now,
        };
        f(self.lanes.entry(resource.clone()).or_default(), &ctx)
    }

    fn lane(&mut self, resource: &ResourceId) -> &mut Lane {
        self.lanes.entry(resource.clone()).or_default()
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

    /// Whether nothing is queued, in flight or owed (and, when `leases` counts them, no lease is
    /// open).
    fn quiet(&self, leases: OpenLeases) -> bool {
        self.lanes.values().all(Lane::is_idle)
            && !self.leases.closing()
            && (leases == OpenLeases::Ignore || !self.leases.any())
    }

    /// Runs a lane's rounds and starts the store call it asks for, applying what the lane did
    /// (a compensation it is given back means another round).
    fn drive(&mut self, resource: &ResourceId, now: i64, myself: &ActorRef<Msg>) {
        let io = loop {
            self.apply(resource, now);
            let io = self.with_lane(resource, now, |lane, ctx| lane.round(ctx));
            if io.is_some() || !self.apply(resource, now) {
                break io;
            }
        };
        let wait = match io {
            None => None,
            Some(Io::Wait(ms)) => Some(ms),
            Some(Io::Load(entities)) => {
                let span = self.round_span(resource, "round load");
                self.spawn_load(resource.clone(), entities, myself, span);
                None
            }
            Some(Io::Write(writes)) => {
                let span = self.round_span(resource, "round write");
                self.spawn_write(resource.clone(), writes, myself, span);
                None
            }
            Some(Io::Resolve(entity, mark)) => {
                self.spawn_resolve(resource.clone(), entity, mark, myself);
                None
            }
        };
        if let Some(ms) = wait {
            let lane = self.lane(resource);
            if !lane.wake_scheduled {
                lane.wake_scheduled = true;
                let resource = resource.clone();
                let delay = Duration::from_millis(ms.max(1) as u64);
                myself.send_after(delay, move || Msg::Wake(resource));
            }
        }
    }

    /// Acts on what the lane of `resource` did. Returns whether it gave the lane a compensation
    /// to write (the lane has more to do then).
    fn apply(&mut self, resource: &ResourceId, now: i64) -> bool {
        let Some(events) = self
            .lanes
            .get_mut(resource)
            .map(Lane::take_events)
            .filter(|e| !e.is_empty())
        else {
            return false;
        };
        let mut compensations = Vec::new();
        for event in events {
            match event {
                Event::Admitted(job, statuses) => {
                    compensations.extend(self.answer(resource, job, statuses, now));
                }
                Event::Settled(id, outcome) => self.leases.settled(id, outcome),
                Event::Used(parts) => {
                    if self.deps.settings.usage_flush_ms > 0 {
                        for (entity, amounts) in parts {
                            let (ns, usage) = (&self.group.0, &self.deps.usage);
                            usage.record(ns, &entity, resource, &amounts, now);
                        }
                    }
                }
            }
        }
        if compensations.is_empty() {
            return false;
        }
        let lane = self.lane(resource);
        for c in compensations {
            lane.settle(c);
        }
        true
    }

    /// Answers an admission whose consumption is durable, opening its lease first (so that it
    /// is routable before its id reaches the caller, who may use it at once). A caller that has
    /// gone (its deadline passed and it was told so) is not charged: returns the compensation.
    fn answer(
        &mut self,
        resource: &ResourceId,
        job: AcquireJob,
        statuses: Vec<LimitStatus>,
        now: i64,
    ) -> Option<Settle> {
        let AcquireJob {
            entity,
            limits,
            amounts,
            own,
            parent,
            parent_share,
            bypass,
            lease,
            reply,
            ..
        } = job;
        let lease = lease.map(|owner| {
            let (seq, secret) = self.routes.lease_opened(&self.group, owner);
            let lease = Lease::new(
                entity.clone(),
                resource.clone(),
                limits,
                amounts,
                parent.clone(),
                bypass,
            );
            self.leases.open(seq, lease, now);
            (seq, LeaseId::Backed { seq, secret })
        });
        let answer = Ok(Decision::Admitted {
            lease: lease.map(|(_, id)| id),
            statuses,
            bypassed: bypass,
        });
        if reply.send(answer).is_ok() {
            m::decision(outcome::ADMITTED);
            return None;
        }
        if let Some((seq, _)) = lease {
            self.leases.withdraw(seq);
            self.routes.lease_closed(seq);
        }
        metrics::counter!(m::COMPENSATIONS).increment(1);
        let give_up_ms = now.saturating_add(self.deps.settings.lease_ttl_ms);
        let parent = parent.as_ref().map(|p| (&p.entity, &parent_share));
        Settle::refund_of((&entity, &own), bypass, parent, give_up_ms)
    }

    fn key(&self, entity: EntityId, resource: &ResourceId) -> BucketKey {
        BucketKey {
            namespace: self.group.0.clone(),
            entity,
            resource: resource.clone(),
        }
    }

    /// The trace span of the store call a lane starts: a child of the first acquire it carries,
    /// following from the others (disabled without telemetry).
    fn round_span(&mut self, resource: &ResourceId, name: &'static str) -> tracing::Span {
        if !tracing::enabled!(target: crate::telemetry::TARGET, tracing::Level::TRACE) {
            return tracing::Span::none();
        }
        let lane = self.lane(resource);
        let callers = lane.in_flight_spans();
        if callers.is_empty() {
            // No caller of this round is traced.
            return tracing::Span::none();
        }
        let span = tracing::trace_span!(
            target: crate::telemetry::TARGET,
            parent: callers[0].id(),
            "round",
            otel.name = name,
            round.acquires = i64::try_from(callers.len()).unwrap_or(i64::MAX),
        );
        for caller in callers.iter().skip(1) {
            span.follows_from(*caller);
        }
        span
    }

    fn spawn_load(
        &self,
        resource: ResourceId,
        entities: Vec<EntityId>,
        myself: &ActorRef<Msg>,
        span: tracing::Span,
    ) {
        let store = self.deps.store.clone();
        let keys: Vec<BucketKey> = entities
            .into_iter()
            .map(|e| self.key(e, &resource))
            .collect();
        let me = myself.clone();
        self.deps.tasks.spawn(
            async move {
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
            }
            .instrument(span),
        );
    }

    fn spawn_write(
        &self,
        resource: ResourceId,
        writes: Vec<(EntityId, Write)>,
        myself: &ActorRef<Msg>,
        span: tracing::Span,
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
        self.deps.tasks.spawn(
            async move {
                let result = match writes.as_slice() {
                    [one] => store.submit_write(&one.key, &one.write).await,
                    many => store.commit(many).await.map(|()| None),
                };
                let _ = me.cast(Msg::Written(resource, result));
            }
            .instrument(span),
        );
    }

    /// Finds out whether the write that moves the bucket's mark to `mark` landed: the stored
    /// mark says so; if it does not (yet), a write that only moves the mark fences the lost write
    /// off for good.
    fn spawn_resolve(
        &self,
        resource: ResourceId,
        entity: EntityId,
        mark: u64,
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
                        return Ok(Resolution {
                            landed: false,
                            current: None,
                        });
                    };
                    if current.mark == Some(mark) {
                        return Ok(Resolution {
                            landed: true,
                            current: Some(current),
                        });
                    }
                    let fence_off = Write::Change(Change::mark_only(&current, next_mark()));
                    match store.write_bucket(&key, &fence_off).await {
                        Ok(stored) => {
                            return Ok(Resolution {
                                landed: false,
                                current: Some(stored),
                            });
                        }
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
            .quiet(OpenLeases::Hold)
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
