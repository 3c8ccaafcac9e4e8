//! One actor per consistency group (an entity with its cascading descendants, keyed by the root),
//! found through a `DashMap`, spawned on first use and stopped when idle; and the index that
//! routes a lease id to its group.
//!
//! A stopped actor leaves its cached buckets behind in the same map, as a compact [`Parked`]
//! record: the next actor of the group starts from it. Records are dropped once unused for
//! `entity_cache_ms` ([`Registry::sweep`]) and never number more than `max_cached_entities`, so
//! memory follows the entities in use, at a few hundred bytes for each idle one.
//!
//! Mailboxes are bounded here, before a message is sent: every acquire holds a [`Ticket`] from
//! the moment it is sent until it is answered (it is dropped with the job), and a group already
//! holding `max_queue` of them sheds the next with `UNAVAILABLE`. The actors see only the narrow
//! [`Routes`] side of the registry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use ractor::{ActorRef, MessagingErr};
use tokio::time::Instant;

use super::group::{Args, GroupActor};
use super::messages::{
    AcquireJob, Answer, GroupKey, LeaseOp, Msg, Parked, PeekJob, Routes, Ticket, reply,
};
use super::types::{Decision, Deps, LimiterError, Owner, lease_secret};
use crate::domain::bucket::LimitStatus;
use crate::domain::ids::{EntityId, ResourceId};
use crate::metrics::{self as m, outcome};

/// Where an open lease lives, the secret half of its id, and who may use it.
struct Route {
    group: GroupKey,
    secret: u128,
    owner: Owner,
}

#[derive(Clone)]
struct Handle {
    actor: ActorRef<Msg>,
    tickets: Arc<AtomicUsize>,
    /// Calls sent (or about to be) and not yet answered: an actor with any may not stop, or a
    /// message already in its mailbox would be dropped unanswered.
    calls: Arc<AtomicUsize>,
    /// A tick sent from outside ([`Registry::tick`]) waits in the mailbox: another would be
    /// moot (the actor clears it when it handles a tick).
    tick_queued: Arc<AtomicBool>,
}

/// One call's place in [`Handle::calls`], given back when dropped (answered, failed or the
/// caller gone).
struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A group's entry: its running actor, or what its last actor cached.
enum Slot {
    Running(Handle),
    Parked(Parked),
}

pub(crate) struct Registry {
    deps: Arc<Deps>,
    actors: DashMap<GroupKey, Slot>,
    /// How many slots are [`Slot::Parked`].
    parked: AtomicUsize,
    leases: DashMap<u64, Route>,
    next_lease: AtomicU64,
    /// Set once at construction: the registry itself, as the actors see it.
    me: std::sync::OnceLock<std::sync::Weak<Registry>>,
}

impl Routes for Registry {
    fn lease_opened(&self, group: &GroupKey, owner: Owner) -> (u64, u128) {
        let seq = self.next_lease_id();
        let secret = lease_secret();
        self.leases.insert(
            seq,
            Route {
                group: group.clone(),
                secret,
                owner,
            },
        );
        (seq, secret)
    }

    fn lease_closed(&self, seq: u64) {
        self.leases.remove(&seq);
    }

    fn unpublish(&self, group: &GroupKey, actor: ractor::ActorId) {
        self.actors
            .remove_if(group, |_, slot| is_actor(slot, actor));
    }

    fn park(&self, group: &GroupKey, actor: ractor::ActorId, parked: Parked) -> bool {
        // Under the slot's lock: a caller counts its call first and then checks the slot, so
        // either it sees the record (and goes to a new actor) or this sees its call.
        let idle = |slot: &Slot| match slot {
            Slot::Running(h) => h.calls.load(Ordering::SeqCst) == 0,
            Slot::Parked(_) => true,
        };
        // A place among the records is taken first, so racing actors cannot pass the bound.
        let placed = !parked.buckets.is_empty()
            && self.parked.fetch_add(1, Ordering::SeqCst) < self.deps.settings.max_cached_entities;
        if !placed {
            if !parked.buckets.is_empty() {
                self.parked.fetch_sub(1, Ordering::SeqCst);
            }
            let mut busy = false;
            self.actors.remove_if(group, |_, slot| {
                busy = is_actor(slot, actor) && !idle(slot);
                is_actor(slot, actor) && !busy
            });
            return !busy;
        }
        let outcome = match self.actors.get_mut(group) {
            Some(mut slot) if is_actor(&slot, actor) => {
                if idle(&slot) {
                    *slot = Slot::Parked(parked);
                    metrics::gauge!(m::CACHED_ENTITIES).increment(1.0);
                    return true;
                }
                false
            }
            // Not routed to this actor any more (shut down): it may stop.
            _ => true,
        };
        self.parked.fetch_sub(1, Ordering::SeqCst);
        outcome
    }
}

fn is_actor(slot: &Slot, actor: ractor::ActorId) -> bool {
    matches!(slot, Slot::Running(h) if h.actor.get_id() == actor)
}

impl Registry {
    pub fn new(deps: Arc<Deps>) -> Self {
        Self {
            deps,
            actors: DashMap::new(),
            parked: AtomicUsize::new(0),
            leases: DashMap::new(),
            next_lease: AtomicU64::new(1),
            me: std::sync::OnceLock::new(),
        }
    }

    /// Called once the registry is in its `Arc`, so actors can reach it.
    pub fn publish_self(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Groups with a running actor.
    pub fn len(&self) -> usize {
        self.actors.len() - self.parked.load(Ordering::Relaxed).min(self.actors.len())
    }

    /// Groups whose idle state is kept as a compact record.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// A record left the map.
    fn unparked(&self) {
        self.parked.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!(m::CACHED_ENTITIES).decrement(1.0);
    }

    /// Drops the compact records unused since `entity_cache_ms` before `now`.
    pub fn sweep(&self, now: i64) {
        let keep = self.deps.settings.entity_cache_ms;
        self.actors.retain(|_, slot| match slot {
            Slot::Parked(p) if now.saturating_sub(p.last_active_ms) >= keep => {
                self.unparked();
                false
            }
            _ => true,
        });
    }

    /// A sequence number for a lease id (unbacked leases number from the same counter).
    pub fn next_lease_id(&self) -> u64 {
        self.next_lease.fetch_add(1, Ordering::Relaxed)
    }

    /// The group and owner of an open lease; `None` for an unknown id or a wrong secret.
    pub fn lease_route(&self, seq: u64, secret: u128) -> Option<(GroupKey, Owner)> {
        self.leases
            .get(&seq)
            .filter(|r| r.secret == secret)
            .map(|r| (r.group.clone(), r.owner))
    }

    /// Decides an acquire in its group (`answer`: where `job.reply` answers). It is shed with
    /// [`LimiterError::Overloaded`] when the group holds `max_queue` acquires already.
    ///
    /// # Errors
    /// As [`Registry::send`], and [`LimiterError::Overloaded`].
    pub async fn acquire(
        &self,
        group: &GroupKey,
        job: AcquireJob,
        answer: Answer<Decision>,
    ) -> Result<Decision, LimiterError> {
        let deadline = job.deadline;
        self.send(group, deadline, Msg::Acquire(job), answer).await
    }

    /// Applies `op` to lease `id` of `group`.
    ///
    /// # Errors
    /// As [`Registry::send`], and the lease table's refusals.
    pub async fn lease(
        &self,
        group: &GroupKey,
        id: u64,
        op: LeaseOp,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        let (reply, answer) = reply();
        self.send(group, deadline, Msg::Lease { id, op, reply }, answer)
            .await
    }

    /// How the limits of a bucket of `group` stand (`answer`: where `job.reply` answers).
    ///
    /// # Errors
    /// As [`Registry::send`].
    pub async fn peek(
        &self,
        group: &GroupKey,
        job: PeekJob,
        answer: Answer<Vec<LimitStatus>>,
        deadline: Instant,
    ) -> Result<Vec<LimitStatus>, LimiterError> {
        self.send(group, deadline, Msg::Peek(job), answer).await
    }

    /// Has the group's actor forget its cached state of one bucket.
    ///
    /// # Errors
    /// As [`Registry::send`].
    pub async fn refresh(
        &self,
        group: &GroupKey,
        entity: EntityId,
        resource: ResourceId,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        let (reply, answer) = reply();
        let msg = Msg::Refresh {
            entity,
            resource,
            reply,
        };
        self.send(group, deadline, msg, answer).await
    }

    /// Sends `msg` to the group's actor and waits for its answer on `answer` until `deadline`.
    /// An acquire takes a [`Ticket`] first: it is shed when the group holds `max_queue`.
    ///
    /// When the deadline passes, the answer channel is closed first and then read once more: an
    /// answer the actor sent before the close is taken (the caller gets what was decided); after
    /// the close, the actor's send fails, and it gives back what it had admitted. So exactly one
    /// of the two sides owns the outcome.
    ///
    /// # Errors
    /// [`LimiterError::Overloaded`] when shed, [`LimiterError::ActorUnavailable`] when the actor
    /// cannot be reached or stopped without answering, [`LimiterError::ShuttingDown`], and
    /// [`LimiterError::Deadline`] when no answer came in time.
    async fn send<T: Send + 'static>(
        &self,
        group: &GroupKey,
        deadline: Instant,
        mut msg: Msg,
        mut answer: Answer<T>,
    ) -> Result<T, LimiterError> {
        for _ in 0..3 {
            let handle = self.handle(group)?;
            handle.calls.fetch_add(1, Ordering::SeqCst);
            let pending = Pending(handle.calls.clone());
            let current = self
                .actors
                .get(group)
                .is_some_and(|slot| is_actor(&slot, handle.actor.get_id()));
            if !current {
                // It went idle and left its record meanwhile: go to the group's next actor.
                continue;
            }
            if let Msg::Acquire(job) = &mut msg {
                let max = self.deps.settings.max_queue;
                let held = handle.tickets.fetch_add(1, Ordering::Relaxed);
                if held >= max {
                    handle.tickets.fetch_sub(1, Ordering::Relaxed);
                    m::decision(outcome::SHED);
                    return Err(LimiterError::Overloaded { max_queue: max });
                }
                job.ticket = Some(Ticket::new(handle.tickets.clone()));
            }
            match handle.actor.send_message(msg) {
                Ok(()) => {
                    let answer = wait(&mut answer, deadline).await;
                    drop(pending);
                    return answer;
                }
                Err(MessagingErr::SendErr(mut back)) => {
                    if let Msg::Acquire(job) = &mut back {
                        job.ticket = None;
                    }
                    msg = back;
                }
                Err(e) => {
                    return Err(LimiterError::ActorUnavailable(format!(
                        "is unreachable ({e})"
                    )));
                }
            }
            // The actor was stopping (idle): route to a fresh one.
            self.unpublish(group, handle.actor.get_id());
        }
        Err(LimiterError::ActorUnavailable(
            "kept stopping while this call was sent to it".into(),
        ))
    }

    /// Sends every live actor a tick, unless one it was sent is still waiting in its mailbox
    /// (ticks sent faster than an actor handles them would fill it without end).
    pub fn tick(&self) {
        for slot in self.actors.iter() {
            if let Slot::Running(h) = slot.value()
                && !h.tick_queued.swap(true, Ordering::SeqCst)
            {
                let _ = h.actor.send_message(Msg::Tick);
            }
        }
    }

    /// Asks every actor to settle what it holds and stop; waits for them until `until`.
    pub async fn stop_all(&self, until: Instant) {
        let handles: Vec<Handle> = self
            .actors
            .iter()
            .filter_map(|slot| match slot.value() {
                Slot::Running(h) => Some(h.clone()),
                Slot::Parked(_) => None,
            })
            .collect();
        self.actors.clear();
        let parked = self.parked.swap(0, Ordering::Relaxed);
        metrics::gauge!(m::CACHED_ENTITIES).decrement(parked as f64);
        for h in &handles {
            let _ = h.actor.send_message(Msg::Shutdown);
        }
        for h in &handles {
            let left = until.saturating_duration_since(Instant::now());
            let _ = h.actor.wait(Some(left)).await;
        }
    }

    fn handle(&self, group: &GroupKey) -> Result<Handle, LimiterError> {
        if let Some(slot) = self.actors.get(group)
            && let Slot::Running(h) = slot.value()
        {
            return Ok(h.clone());
        }
        let routes: Arc<dyn Routes> = self
            .me
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or(LimiterError::ShuttingDown)?;
        let spawn = |parked: Option<Parked>| {
            let tick_queued = Arc::new(AtomicBool::new(false));
            let args = Args {
                tick_queued: tick_queued.clone(),
                deps: self.deps.clone(),
                routes,
                group: group.clone(),
                parked,
            };
            ractor::ActorRuntime::spawn_instant(None, GroupActor, args)
                .map(|(actor, _)| Handle {
                    actor,
                    tickets: Arc::new(AtomicUsize::new(0)),
                    calls: Arc::new(AtomicUsize::new(0)),
                    tick_queued,
                })
                .map_err(|e| LimiterError::ActorUnavailable(format!("cannot start ({e})")))
        };
        match self.actors.entry(group.clone()) {
            Entry::Occupied(mut slot) => {
                let parked = match slot.get_mut() {
                    Slot::Running(h) => return Ok(h.clone()),
                    Slot::Parked(p) => std::mem::replace(
                        p,
                        Parked {
                            buckets: Box::new([]),
                            last_active_ms: 0,
                        },
                    ),
                };
                self.unparked();
                match spawn(Some(parked)) {
                    Ok(h) => {
                        slot.insert(Slot::Running(h.clone()));
                        Ok(h)
                    }
                    Err(e) => {
                        slot.remove();
                        Err(e)
                    }
                }
            }
            Entry::Vacant(slot) => {
                let h = spawn(None)?;
                slot.insert(Slot::Running(h.clone()));
                Ok(h)
            }
        }
    }
}

async fn wait<T>(rx: &mut Answer<T>, deadline: Instant) -> Result<T, LimiterError> {
    match tokio::time::timeout_at(deadline, &mut *rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(LimiterError::ActorUnavailable(
            "stopped before answering".into(),
        )),
        Err(_) => {
            rx.close();
            match rx.try_recv() {
                Ok(answer) => answer,
                Err(_) => Err(LimiterError::Deadline),
            }
        }
    }
}
