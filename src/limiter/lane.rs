//! One resource of a consistency group: the buckets of the root and its cascading descendants for
//! that resource, the acquires queued on them, the settlements to write, and the one store call
//! in flight. Its four ideas, one file each:
//! - the view of the buckets ([`view`]): confirmed states, reservations, and the refusal decided
//!   on them at no store cost;
//! - the batch state machine (here): [`Lane::round`] runs whenever no store call is in flight,
//!   settlements first (they are owed), then one batch of acquires decided by
//!   [`crate::domain::batch::decide_batch`] and carried by one write per bucket, all buckets in
//!   one transaction;
//! - settlements ([`settle`]): lease closes and compensations, with back-off;
//! - recovery from a write of unknown outcome ([`recovery`]).
//!
//! A caller is answered only once its write is confirmed; a lost race returns the stored item,
//! which becomes the cache, and the batch is decided again from it (after two lost races, on the
//! stored balances: see [`decide_batch_on_stored`]). A state older than the staleness bound may
//! still carry admissions (the writes are conditional on it), never a refusal: such a batch reads
//! first.
//!
//! The lane does no I/O and touches nothing outside itself: a round returns the [`Io`] to start,
//! the actor reports the outcome back ([`Lane::loaded`], [`Lane::written`], [`Lane::resolved`]),
//! and what the group must act on (admissions to answer, settlements done, usage) comes out as
//! [`Event`]s ([`Lane::take_events`]).

mod recovery;
mod settle;
#[cfg(test)]
mod tests;
mod view;

use std::collections::VecDeque;

pub(crate) use settle::Settle;

use super::messages::{AcquireJob, PeekJob};
use super::types::{Decision, LimiterError, LimiterSettings};
use crate::domain::amounts::Amounts;
use crate::domain::batch::{Ask, Request, Verdict, decide_batch, decide_batch_on_stored};
use crate::domain::bucket::{Admission, Bucket, LimitStatus, Write, admit};
use crate::domain::ids::EntityId;
use crate::metrics::{self as m, outcome};
use crate::store::StoreError;
use recovery::{Owed, Unresolved};
use settle::{Backoff, Settles};
use view::View;

/// The most buckets one write touches (DynamoDB's limit for one transaction is 100 items).
pub(crate) const MAX_ITEMS: usize = 100;

/// Lost races after which an acquire stops competing for refills (see
/// [`crate::domain::batch::decide_batch_on_stored`]).
const RACES_FOR_A_REFILL: u8 = 2;

/// A mark no other write of this process uses (see [`crate::domain::bucket::Mark`]).
pub(crate) fn next_mark() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A store call for the actor to start.
#[derive(Debug)]
pub(crate) enum Io {
    /// Read these buckets (consistently) and report them with [`Lane::loaded`].
    Load(Vec<EntityId>),
    /// Write these buckets all or nothing and report with [`Lane::written`].
    Write(Vec<(EntityId, Write)>),
    /// Find out whether the write that moves this bucket's mark to the given one landed, fencing
    /// it off if not, and report with [`Lane::resolved`].
    Resolve(EntityId, u64),
    /// Nothing can start before this many milliseconds: call [`Lane::round`] again then.
    Wait(i64),
}

/// What a lane did that its group acts on.
// Events live for one message, in a Vec that is drained at once: boxing the job would cost an
// allocation per admission instead.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Event {
    /// An acquire's consumption is durable: the group opens its lease (when it asked for one)
    /// and answers it. When the caller has gone (its deadline passed and it was told so), the
    /// group gives the admission back ([`Lane::settle`] a [`Settle::refund`]).
    Admitted(AcquireJob, Vec<LimitStatus>),
    /// The settlement of lease `id` is written (`Ok`) or refused for good (`Err`).
    Settled(u64, Result<(), LimiterError>),
    /// What one write recorded on each bucket (signed milli-tokens), for the usage snapshots.
    Used(Vec<(EntityId, Amounts)>),
}

/// What a lane reads besides itself.
pub(crate) struct Ctx<'a> {
    pub settings: &'a LimiterSettings,
    /// The limiter's clock, read once per message.
    pub now: i64,
}

/// Consumption summed per bucket over one write, recorded once for the usage snapshots.
#[derive(Default)]
struct Used(Vec<(EntityId, Amounts)>);

impl Used {
    fn add(&mut self, entity: &EntityId, amounts: &Amounts) {
        let sum = match self.0.iter_mut().find(|(e, _)| e == entity) {
            Some((_, sum)) => sum.try_add(amounts),
            None => {
                self.0.push((entity.clone(), amounts.clone()));
                Ok(())
            }
        };
        if let Err(e) = sum {
            tracing::warn!("usage snapshot not counted: {e}");
        }
    }

    fn record(self, events: &mut Vec<Event>) {
        if !self.0.is_empty() {
            events.push(Event::Used(self.0));
        }
    }
}

/// The one store call in flight, and what it carries.
enum Busy {
    Idle,
    Loading,
    Resolving,
    Acquiring {
        admitted: Vec<(AcquireJob, Vec<LimitStatus>)>,
        written: Vec<(EntityId, Bucket)>,
    },
    Settling {
        settles: Vec<Settle>,
        written: Vec<(EntityId, Bucket)>,
    },
}

pub(crate) struct Lane {
    view: View,
    queue: VecDeque<AcquireJob>,
    peeks: Vec<PeekJob>,
    settles: Settles,
    /// Nothing else is written until this is resolved.
    unresolved: Option<Unresolved>,
    busy: Busy,
    last_write_ms: Option<i64>,
    /// Paces retries after failed loads, settlements and resolutions.
    backoff: Backoff,
    events: Vec<Event>,
    pub wake_scheduled: bool,
}

impl Default for Lane {
    fn default() -> Self {
        Self {
            view: View::default(),
            queue: VecDeque::new(),
            peeks: Vec::new(),
            settles: Settles::default(),
            unresolved: None,
            busy: Busy::Idle,
            last_write_ms: None,
            backoff: Backoff::default(),
            events: Vec::new(),
            wake_scheduled: false,
        }
    }
}

impl Lane {
    /// Whether nothing is queued, in flight or owed.
    pub fn is_idle(&self) -> bool {
        matches!(self.busy, Busy::Idle)
            && self.unresolved.is_none()
            && self.queue.is_empty()
            && self.settles.is_empty()
            && self.peeks.is_empty()
    }

    /// Starts from a state an earlier actor of the group confirmed at `at_ms`.
    pub fn restore(&mut self, entity: EntityId, bucket: Option<Bucket>, at_ms: i64) {
        self.view.restore(entity, bucket, at_ms);
    }

    /// The cached buckets, with the time each was confirmed.
    pub fn cached(&self) -> impl Iterator<Item = (&EntityId, Option<&Bucket>, i64)> {
        self.view.cached()
    }

    /// The trace spans of the acquires the store call in flight carries (a write: those it
    /// admits; a read: those queued behind it).
    pub fn in_flight_spans(&self) -> Vec<&tracing::Span> {
        let jobs: Box<dyn Iterator<Item = &AcquireJob>> = match &self.busy {
            Busy::Acquiring { admitted, .. } => Box::new(admitted.iter().map(|(j, _)| j)),
            Busy::Loading => Box::new(self.queue.iter()),
            _ => return Vec::new(),
        };
        jobs.filter_map(|j| j.span.as_deref()).collect()
    }

    /// What the group must act on since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Takes an acquire: refused at once when the cache can tell, else queued.
    pub fn acquire(&mut self, job: AcquireJob, ctx: &Ctx<'_>) {
        if let Some((rejection, refused_by)) = self.view.refusal(&job, ctx) {
            m::decision(outcome::REJECTED_CACHED);
            let _ = job.reply.send(Ok(Decision::Rejected {
                rejection,
                refused_by,
            }));
            return;
        }
        self.view.reserve(&job);
        self.queue.push_back(job);
    }

    /// Forgets the cached state of a bucket (the store's changed outside any acquire): the next
    /// decision on it reads it first.
    pub fn forget(&mut self, entity: &EntityId) {
        self.view.forget(entity);
    }

    pub fn peek(&mut self, job: PeekJob) {
        self.peeks.push(job);
    }

    /// Starts what can start: the next store call, or nothing when idle or busy.
    pub fn round(&mut self, ctx: &Ctx<'_>) -> Option<Io> {
        if !matches!(self.busy, Busy::Idle) {
            return None;
        }
        if let Some(u) = &self.unresolved {
            if let Some(wait) = self.backoff.left() {
                return Some(Io::Wait(wait));
            }
            self.busy = Busy::Resolving;
            return Some(Io::Resolve(u.entity.clone(), u.mark));
        }
        self.give_up_settles(ctx);
        // Settlements wait out the back-off after a failure; acquires need not.
        let settle_wait = self.backoff.left().filter(|_| !self.settles.is_empty());
        if settle_wait.is_none() {
            // Each pass writes, waits for a read, or answers (or refuses) what it took.
            while !self.settles.is_empty() {
                if let Some(io) = self.start_settle(ctx) {
                    return Some(io);
                }
            }
        }
        let idle = settle_wait.map(Io::Wait);
        loop {
            self.drop_late_jobs();
            if self.queue.is_empty() && self.peeks.is_empty() {
                return idle;
            }
            let batch = self.batch_len(ctx);
            let stale: Vec<EntityId> = self
                .needed(batch)
                .into_iter()
                .filter(|e| !self.view.fresh(e, ctx))
                .collect();
            // A stale state may still carry admissions (their writes are conditional), but not a
            // peek or a refusal, and a bucket never seen must be read.
            let unseen = stale.iter().any(|e| !self.view.seen(e));
            if unseen || (!stale.is_empty() && !self.peeks.is_empty()) {
                self.busy = Busy::Loading;
                return Some(Io::Load(stale));
            }
            self.answer_peeks(ctx);
            if self.queue.is_empty() {
                return idle;
            }
            if let Some(last) = self.last_write_ms {
                let wait = last + ctx.settings.min_commit_interval_ms - ctx.now;
                if wait > 0 {
                    return Some(Io::Wait(settle_wait.map_or(wait, |s| s.min(wait))));
                }
            }
            if let Some(io) = self.decide(batch, &stale, ctx) {
                return Some(io);
            }
        }
    }

    /// How many queued acquires the next batch may hold: at most `max_batch`, touching at most
    /// [`MAX_ITEMS`] buckets.
    fn batch_len(&self, ctx: &Ctx<'_>) -> usize {
        let mut seen: Vec<&EntityId> = Vec::new();
        let mut n = 0;
        for job in self.queue.iter().take(ctx.settings.max_batch) {
            let mut new = Vec::new();
            for (e, _, _) in job.charged() {
                if !seen.contains(&e) && !new.contains(&e) {
                    new.push(e);
                }
            }
            if seen.len() + new.len() > MAX_ITEMS {
                break;
            }
            seen.extend(new);
            n += 1;
        }
        n.max(1).min(self.queue.len())
    }

    /// The buckets the peeks and the next `batch` acquires need, each once.
    fn needed(&self, batch: usize) -> Vec<EntityId> {
        let mut out: Vec<EntityId> = Vec::new();
        let mut add = |e: &EntityId| {
            if !out.contains(e) {
                out.push(e.clone());
            }
        };
        for p in &self.peeks {
            add(&p.entity);
        }
        for job in self.queue.iter().take(batch) {
            for (e, _, _) in job.charged() {
                add(e);
            }
        }
        out
    }

    /// Callers whose deadline has passed are answered so and charged nothing.
    fn drop_late_jobs(&mut self) {
        let now = tokio::time::Instant::now();
        if self.queue.iter().all(|j| j.deadline > now) {
            return;
        }
        let (late, keep): (Vec<_>, Vec<_>) = self.queue.drain(..).partition(|j| j.deadline <= now);
        self.queue = keep.into();
        for job in late {
            self.view.release(&job);
            let _ = job.reply.send(Err(LimiterError::Deadline));
        }
    }

    fn answer_peeks(&mut self, ctx: &Ctx<'_>) {
        for p in std::mem::take(&mut self.peeks) {
            let cached = self.view.get(&p.entity).and_then(|c| c.bucket.as_ref());
            let statuses = match admit(cached, &p.limits, &p.amounts, ctx.now) {
                Admission::Admitted { statuses, .. } => statuses,
                Admission::Rejected(r) => r.statuses,
            };
            let _ = p.reply.send(Ok(statuses));
        }
    }

    /// Decides the next `batch` acquires. Returns the write to start, or `None` when the batch
    /// needed none (everything refused, or nothing to change); the caller then goes on.
    ///
    /// `stale` buckets are cached but older than the staleness bound. Admissions may be planned
    /// on them: each write is conditional on what it was planned from, and a lost race returns
    /// the stored item. A refusal may not (a refund elsewhere would be missed): a batch that would
    /// refuse anything while some of its buckets are stale reads them first.
    fn decide(&mut self, batch: usize, stale: &[EntityId], ctx: &Ctx<'_>) -> Option<Io> {
        let jobs: Vec<AcquireJob> = self.queue.drain(..batch).collect();
        let mut entities: Vec<EntityId> = Vec::new();
        let index =
            |entities: &mut Vec<EntityId>, e: &EntityId| match entities.iter().position(|x| x == e)
            {
                Some(i) => i,
                None => {
                    entities.push(e.clone());
                    entities.len() - 1
                }
            };
        let mut slots = Vec::with_capacity(jobs.len());
        for job in &jobs {
            let own = (!job.bypass).then(|| index(&mut entities, &job.entity));
            let parent = job.parent.as_ref().map(|p| index(&mut entities, &p.entity));
            slots.push((own, parent));
        }
        let mut from_store = false;
        let confirmed: Vec<Option<Bucket>> = entities
            .iter()
            .map(|e| {
                let cache = self.view.get(e);
                let cache = cache.expect("every bucket of the batch was seen before deciding");
                from_store |= cache.from_store;
                cache.bucket.clone()
            })
            .collect();
        let requests: Vec<Request<'_>> = jobs
            .iter()
            .zip(&slots)
            .map(|(job, (own, parent))| Request {
                own: own.map(|item| Ask {
                    item,
                    limits: &job.limits,
                    amounts: &job.own,
                }),
                parent: job.parent.as_ref().zip(*parent).map(|(p, item)| Ask {
                    item,
                    limits: &p.limits,
                    amounts: &job.parent_share,
                }),
            })
            .collect();
        // Only one writer can win a refill (it moves the stored refill time), and on a bucket that
        // several daemons drain it goes to whichever is quickest: a slower daemon would lose every
        // round until its callers' deadlines passed, and the block policy would then answer a
        // healthy store's contention as an outage. So a batch holding an acquire whose writes
        // lost RACES_FOR_A_REFILL races is decided on the stored balances, with no refill.
        let decided = if jobs.iter().any(|j| j.races >= RACES_FOR_A_REFILL) {
            decide_batch_on_stored(&confirmed, &requests, ctx.now)
        } else {
            decide_batch(&confirmed, &requests, ctx.now)
        };
        drop(requests);
        let refuses = |v: &Verdict| matches!(v, Verdict::Rejected { .. });
        if !stale.is_empty() && decided.verdicts.iter().any(refuses) {
            for job in jobs.into_iter().rev() {
                self.queue.push_front(job);
            }
            self.busy = Busy::Loading;
            return Some(Io::Load(stale.to_vec()));
        }
        self.view.used(&entities);
        let mut admitted = Vec::new();
        let mut deferred = Vec::new();
        for (job, verdict) in jobs.into_iter().zip(decided.verdicts) {
            match verdict {
                Verdict::Admitted(statuses) => admitted.push((job, statuses)),
                Verdict::Deferred => deferred.push(job),
                Verdict::Rejected {
                    rejection,
                    by_parent,
                } => {
                    self.view.release(&job);
                    m::decision(if from_store {
                        outcome::REJECTED_STORE
                    } else {
                        outcome::REJECTED_CACHED
                    });
                    let refused_by = if by_parent {
                        job.parent.as_ref().map(|p| p.entity.clone())
                    } else {
                        None
                    };
                    let _ = job.reply.send(Ok(Decision::Rejected {
                        rejection,
                        refused_by,
                    }));
                }
            }
        }
        for job in deferred.into_iter().rev() {
            self.queue.push_front(job);
        }
        if admitted.is_empty() {
            return None;
        }
        metrics::histogram!(m::BATCH_SIZE).record(admitted.len() as f64);
        if decided.writes.is_empty() {
            // Nothing to record (zero amounts, no refill due): the caches stay as confirmed.
            self.admit(admitted);
            return None;
        }
        let mark = next_mark();
        let mut written = Vec::with_capacity(decided.writes.len());
        let mut writes = Vec::with_capacity(decided.writes.len());
        for mut w in decided.writes {
            let seen = confirmed[w.item].as_ref().and_then(|b| b.mark);
            w.write.mark(seen, mark);
            w.expected.mark = Some(mark);
            written.push((entities[w.item].clone(), w.expected));
            writes.push((entities[w.item].clone(), w.write));
        }
        self.busy = Busy::Acquiring { admitted, written };
        self.last_write_ms = Some(ctx.now);
        Some(Io::Write(writes))
    }

    /// Acquires whose consumption is durable: their shares are usage, and the group answers them.
    fn admit(&mut self, admitted: Vec<(AcquireJob, Vec<LimitStatus>)>) {
        // What the write recorded, per bucket, for the usage snapshots (summed over the batch).
        let mut used = Used::default();
        for (job, statuses) in admitted {
            self.view.release(&job);
            used.add(&job.entity, &job.own);
            if let Some(p) = &job.parent {
                used.add(&p.entity, &job.parent_share);
            }
            self.events.push(Event::Admitted(job, statuses));
        }
        used.record(&mut self.events);
    }

    /// A read finished: the states become the cache, or everything waiting on them fails.
    pub fn loaded(
        &mut self,
        result: Result<Vec<(EntityId, Option<Bucket>)>, StoreError>,
        ctx: &Ctx<'_>,
    ) {
        if !matches!(self.busy, Busy::Loading) {
            return;
        }
        self.busy = Busy::Idle;
        match result {
            Ok(states) => {
                for (entity, bucket) in states {
                    self.view.confirm(entity, bucket, ctx.now, true);
                }
            }
            Err(e) => {
                let err = LimiterError::from(e);
                for job in std::mem::take(&mut self.queue) {
                    self.view.release(&job);
                    let _ = job.reply.send(Err(err.clone()));
                }
                for p in std::mem::take(&mut self.peeks) {
                    let _ = p.reply.send(Err(err.clone()));
                }
                self.backoff.failed();
            }
        }
    }

    /// A write finished (`stored`: the one bucket as the store returned it; a transaction or a
    /// batch returns none).
    pub fn written(&mut self, result: Result<Option<Bucket>, StoreError>, ctx: &Ctx<'_>) {
        match std::mem::replace(&mut self.busy, Busy::Idle) {
            Busy::Acquiring { admitted, written } => match result {
                Ok(stored) => {
                    self.confirm(written, stored, ctx);
                    self.admit(admitted);
                }
                Err(StoreError::Conflict { index, current }) => {
                    self.lost_race(&written, index, current, ctx);
                    for (mut job, _) in admitted.into_iter().rev() {
                        job.races = job.races.saturating_add(1);
                        self.queue.push_front(job);
                    }
                }
                Err(e) => {
                    // The callers hear the policy now. Whether the write landed is found out
                    // before anything else is written; if it did, it is given back.
                    let err = LimiterError::from(e);
                    let give_up_ms = ctx.now.saturating_add(ctx.settings.lease_ttl_ms);
                    let mut refunds = Vec::new();
                    for (job, _) in admitted {
                        self.view.release(&job);
                        refunds.extend(Settle::refund(&job, give_up_ms));
                        let _ = job.reply.send(Err(err.clone()));
                    }
                    self.unsure(&written, Owed::Refunds(refunds));
                }
            },
            Busy::Settling { settles, written } => match result {
                Ok(stored) => {
                    self.backoff.succeeded();
                    self.confirm(written, stored, ctx);
                    self.settled(settles);
                }
                Err(StoreError::Conflict { index, current }) => {
                    self.lost_race(&written, index, current, ctx);
                    self.settles.requeue(settles);
                }
                Err(e) => {
                    tracing::debug!("settlement write failed, resolving it: {e}");
                    self.unsure(&written, Owed::Settles(settles));
                }
            },
            other => self.busy = other,
        }
    }

    /// A write landed: the buckets are as the store returned (one bucket) or as planned (a
    /// transaction returns nothing). Either is an upper bound on the truth as of now: the write's
    /// conditions held, and other writers can only have lowered the balances since (refunds and
    /// raised limits elsewhere are what the staleness bound is for), so the age restarts.
    fn confirm(&mut self, written: Vec<(EntityId, Bucket)>, stored: Option<Bucket>, ctx: &Ctx<'_>) {
        let single = written.len() == 1;
        for (entity, expected) in written {
            let bucket = match (&stored, single) {
                (Some(b), true) => b.clone(),
                _ => expected,
            };
            self.view.confirm(entity, Some(bucket), ctx.now, false);
        }
    }

    fn lost_race(
        &mut self,
        written: &[(EntityId, Bucket)],
        index: usize,
        current: Option<Box<Bucket>>,
        ctx: &Ctx<'_>,
    ) {
        metrics::counter!(m::CONFLICTS).increment(1);
        if let Some((entity, _)) = written.get(index) {
            self.view
                .confirm(entity.clone(), current.map(|b| *b), ctx.now, true);
        }
    }
}
