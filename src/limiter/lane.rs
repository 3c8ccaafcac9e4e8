//! One resource of a consistency group: the buckets of the root and its cascading descendants for
//! that resource, the acquires queued on them, the settlements to write, and the one store call
//! in flight.
//!
//! Per bucket it keeps the state the store last confirmed and what queued acquires reserve of it.
//! An acquire that this state (refilled to now, less what is reserved) cannot cover is refused at
//! once, at no store cost: other daemons can only lower a balance, so the cache is an upper bound
//! on the truth, and the staleness bound covers refunds and raised limits made elsewhere.
//! Everything else queues. [`Lane::round`] runs whenever no store call is in flight: settlements
//! first (they are owed), then one batch of acquires decided by
//! [`crate::domain::batch::decide_batch`] and carried by one write per bucket, all buckets in one
//! transaction. A caller is answered only once its write is confirmed; a lost race returns the
//! stored item, which becomes the cache, and the batch is decided again from it (after two lost
//! races, on the stored balances: see [`decide_batch_on_stored`]). A state older than the
//! staleness bound may still carry admissions (the writes are conditional on it), never a
//! refusal: such a batch reads first.
//!
//! The lane does no I/O itself: a round returns the [`Io`] to start, and the actor reports the
//! outcome back ([`Lane::loaded`], [`Lane::written`]).

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::group::{AcquireJob, Ctx, PeekJob};
use super::leases::Lease;
use super::types::{Decision, LeaseId, LimiterError};
use crate::domain::amounts::Amounts;
use crate::domain::batch::{Ask, Request, Verdict, decide_batch, decide_batch_on_stored};
use crate::domain::bucket::{
    Admission, Bucket, LimitStatus, Plan, Write, admit, plan, plan_settle,
};
use crate::domain::ids::EntityId;
use crate::domain::limit::{Limit, LimitName};
use crate::metrics::{self as m, outcome};
use crate::store::StoreError;

/// The most buckets one write touches (DynamoDB's limit for one transaction is 100 items).
pub(crate) const MAX_ITEMS: usize = 100;

/// Lost races after which an acquire stops competing for refills (see
/// [`crate::domain::batch::decide_batch_on_stored`]).
const RACES_FOR_A_REFILL: u8 = 2;

/// A store call for the actor to start.
#[derive(Debug)]
pub(crate) enum Io {
    /// Read these buckets (consistently) and report them with [`Lane::loaded`].
    Load(Vec<EntityId>),
    /// Write these buckets all or nothing and report with [`Lane::written`].
    Write(Vec<(EntityId, Write)>),
    /// Find out whether the write marked `seq` landed on this bucket, fencing it off if not, and
    /// report with [`Lane::resolved`].
    Resolve(EntityId, u64),
    /// Nothing can start before this many milliseconds: call [`Lane::round`] again then.
    Wait(i64),
}

/// A settlement waiting to be written: lease closes (answered through the lease table) and
/// compensations for admissions whose caller had gone (`lease: None`).
pub(crate) struct Settle {
    pub parts: Vec<(EntityId, Amounts)>,
    pub lease: Option<u64>,
    pub give_up_ms: i64,
}

struct Cached {
    bucket: Option<Bucket>,
    at_ms: i64,
    /// Just read or returned by a lost race: one round may decide on it whatever its age.
    from_store: bool,
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

    fn record(self, ctx: &mut Ctx<'_>) {
        if ctx.deps.settings.usage_flush_ms <= 0 {
            return;
        }
        for (entity, amounts) in self.0 {
            ctx.deps
                .usage
                .record(&ctx.group.0, &entity, ctx.resource, &amounts, ctx.now);
        }
    }
}

/// Gives back an admission whose caller was told it was not admitted.
fn refund(
    entity: &EntityId,
    amounts: &Amounts,
    parent: Option<&super::group::ParentSpec>,
    share: &Amounts,
    ctx: &Ctx<'_>,
) -> Option<Settle> {
    let back = |a: &Amounts| a.negated().expect("acquired amounts are bounded");
    let mut parts = vec![(entity.clone(), back(amounts))];
    if let Some(p) = parent {
        parts.push((p.entity.clone(), back(share)));
    }
    parts.retain(|(_, a)| !a.is_zero());
    (!parts.is_empty()).then(|| Settle {
        parts,
        lease: None,
        give_up_ms: ctx.now.saturating_add(ctx.deps.settings.lease_ttl_ms),
    })
}

fn compensation(job: &AcquireJob, ctx: &Ctx<'_>) -> Option<Settle> {
    refund(
        &job.entity,
        &job.own,
        job.parent.as_ref(),
        &job.parent_share,
        ctx,
    )
}

/// Milli-tokens that queued acquires hold of a bucket (wider than `i64`: a long queue of large
/// requests must not wrap it).
type Reserved = BTreeMap<LimitName, i128>;

#[derive(Default)]
struct Item {
    cache: Option<Cached>,
    reserved: Reserved,
}

/// A write whose outcome is unknown (its answer was lost): what is owed either way.
struct Unresolved {
    entity: EntityId,
    seq: u64,
    owed: Owed,
}

enum Owed {
    /// Admissions whose callers were told "unavailable": given back if the write landed.
    Refunds(Vec<Settle>),
    /// Settlements: done if the write landed, written again if not.
    Settles(Vec<Settle>),
}

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
    items: HashMap<EntityId, Item>,
    queue: VecDeque<AcquireJob>,
    settles: VecDeque<Settle>,
    peeks: Vec<PeekJob>,
    busy: Busy,
    last_write_ms: Option<i64>,
    /// Consecutive failed settlement writes, and when the next may be tried: the back-off paces
    /// store calls in real time, so it is not the limiter's clock.
    failures: u32,
    retry_at: Option<tokio::time::Instant>,
    /// Settle one at a time: a sum went past a bound that one of its parts may not.
    one_settle: bool,
    /// Nothing else is written until this is resolved.
    unresolved: Option<Unresolved>,
    pub wake_scheduled: bool,
}

impl Default for Lane {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            queue: VecDeque::new(),
            settles: VecDeque::new(),
            peeks: Vec::new(),
            busy: Busy::Idle,
            last_write_ms: None,
            failures: 0,
            retry_at: None,
            one_settle: false,
            unresolved: None,
            wake_scheduled: false,
        }
    }
}

fn reserve(r: &mut Reserved, amounts: &Amounts, sign: i128) {
    for (name, a) in amounts.iter() {
        let delta = sign * i128::from(a);
        match r.get_mut(name) {
            Some(total) => {
                *total += delta;
                if *total == 0 {
                    r.remove(name);
                }
            }
            None if delta != 0 => {
                r.insert(name.clone(), delta);
            }
            None => {}
        }
    }
}

/// The bucket as it stands at `now` less what is reserved of it (`None`: it would be cached
/// under another limit set, so the cache says nothing about this request).
fn projected(cache: &Cached, limits: &[Limit], reserved: &Reserved, now: i64) -> Option<Bucket> {
    let mut b = match &cache.bucket {
        Some(b)
            if b.limits.len() == limits.len()
                && b.limits.iter().zip(limits).all(|(s, l)| s.limit == *l) =>
        {
            b.at(now)
        }
        Some(_) => return None,
        None => Bucket::full(limits.to_vec(), now),
    };
    for l in &mut b.limits {
        let held = reserved.get(l.limit.name()).copied().unwrap_or(0);
        l.balance = (i128::from(l.balance) - held).max(i128::from(i64::MIN / 2)) as i64;
    }
    Some(b)
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
        self.items.entry(entity).or_default().cache = Some(Cached {
            bucket,
            at_ms,
            from_store: false,
        });
    }

    /// The cached buckets, with the time each was confirmed.
    pub fn cached(&self) -> impl Iterator<Item = (&EntityId, Option<&Bucket>, i64)> {
        self.items
            .iter()
            .filter_map(|(e, i)| i.cache.as_ref().map(|c| (e, c.bucket.as_ref(), c.at_ms)))
    }

    fn item(&mut self, entity: &EntityId) -> &mut Item {
        self.items.entry(entity.clone()).or_default()
    }

    /// Whether the bucket's state is cached at all, however old.
    fn seen(&self, entity: &EntityId) -> bool {
        self.items.get(entity).is_some_and(|i| i.cache.is_some())
    }

    fn fresh(&self, entity: &EntityId, ctx: &Ctx<'_>) -> bool {
        self.items
            .get(entity)
            .and_then(|i| i.cache.as_ref())
            .is_some_and(|c| {
                c.from_store || ctx.now - c.at_ms <= ctx.deps.settings.max_staleness_ms
            })
    }

    /// Takes an acquire: refused at once when the cache can tell, else queued.
    pub fn acquire(&mut self, job: AcquireJob, ctx: &Ctx<'_>) {
        if let Some((rejection, refused_by)) = self.fast_reject(&job, ctx) {
            m::decision(outcome::REJECTED_CACHED);
            let _ = job.reply.send(Ok(Decision::Rejected {
                rejection,
                refused_by,
            }));
            return;
        }
        reserve(&mut self.item(&job.entity).reserved, &job.own, 1);
        if let Some(p) = &job.parent {
            reserve(&mut self.item(&p.entity).reserved, &job.parent_share, 1);
        }
        self.queue.push_back(job);
    }

    pub fn peek(&mut self, job: PeekJob) {
        self.peeks.push(job);
    }

    pub fn settle(&mut self, settle: Settle) {
        self.settles.push_back(settle);
    }

    /// A refusal the cache decides (with the parent that refused, for a cascade).
    fn fast_reject(
        &self,
        job: &AcquireJob,
        ctx: &Ctx<'_>,
    ) -> Option<(crate::domain::bucket::Rejection, Option<EntityId>)> {
        // More than a limit's capacity never fits, whatever is stored.
        if let Ok(Plan::Reject(r)) = plan(None, &job.limits, &job.own, ctx.now)
            && r.retry_after_ms().is_none()
        {
            return Some((r, None));
        }
        let check = |entity: &EntityId, limits: &[Limit], amounts: &Amounts| {
            if !self.fresh(entity, ctx) {
                return None;
            }
            let item = self.items.get(entity)?;
            let state = projected(item.cache.as_ref()?, limits, &item.reserved, ctx.now)?;
            match admit(Some(&state), limits, amounts, ctx.now) {
                Ok(Admission::Rejected(r)) => Some(r),
                _ => None,
            }
        };
        if let Some(r) = check(&job.entity, &job.limits, &job.own) {
            return Some((r, None));
        }
        let p = job.parent.as_ref()?;
        check(&p.entity, &p.limits, &job.parent_share).map(|r| (r, Some(p.entity.clone())))
    }

    fn release(&mut self, job: &AcquireJob) {
        reserve(&mut self.item(&job.entity).reserved, &job.own, -1);
        if let Some(p) = &job.parent {
            reserve(&mut self.item(&p.entity).reserved, &job.parent_share, -1);
        }
    }

    /// Starts what can start: the next store call, or nothing when idle or busy.
    pub fn round(&mut self, ctx: &mut Ctx<'_>) -> Option<Io> {
        if !matches!(self.busy, Busy::Idle) {
            return None;
        }
        if let Some(u) = &self.unresolved {
            if let Some(wait) = self.backing_off() {
                return Some(Io::Wait(wait));
            }
            self.busy = Busy::Resolving;
            return Some(Io::Resolve(u.entity.clone(), u.seq));
        }
        self.give_up_settles(ctx);
        // Settlements wait out the back-off after a failure; acquires need not.
        let settle_wait = self.backing_off().filter(|_| !self.settles.is_empty());
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
                .filter(|e| !self.fresh(e, ctx))
                .collect();
            // A stale state may still carry admissions (their writes are conditional), but not a
            // peek or a refusal, and a bucket never seen must be read.
            let unseen = stale.iter().any(|e| !self.seen(e));
            if unseen || (!stale.is_empty() && !self.peeks.is_empty()) {
                self.busy = Busy::Loading;
                return Some(Io::Load(stale));
            }
            self.answer_peeks(ctx);
            if self.queue.is_empty() {
                return idle;
            }
            if let Some(last) = self.last_write_ms {
                let wait = last + ctx.deps.settings.min_commit_interval_ms - ctx.now;
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
        for job in self.queue.iter().take(ctx.deps.settings.max_batch) {
            let mut new = Vec::new();
            for e in std::iter::once(&job.entity).chain(job.parent.as_ref().map(|p| &p.entity)) {
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
            add(&job.entity);
            if let Some(p) = &job.parent {
                add(&p.entity);
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
            self.release(&job);
            let _ = job.reply.send(Err(LimiterError::Deadline));
        }
    }

    fn answer_peeks(&mut self, ctx: &Ctx<'_>) {
        for p in std::mem::take(&mut self.peeks) {
            let cached = self
                .items
                .get(&p.entity)
                .and_then(|i| i.cache.as_ref())
                .and_then(|c| c.bucket.as_ref());
            let answer = match admit(cached, &p.limits, &p.amounts, ctx.now) {
                Ok(Admission::Admitted { statuses, .. }) => Ok(statuses),
                Ok(Admission::Rejected(r)) => Ok(r.statuses),
                Err(e) => Err(LimiterError::invalid("consume", e)),
            };
            let _ = p.reply.send(answer);
        }
    }

    /// Decides the next `batch` acquires. Returns the write to start, or `None` when the batch
    /// needed none (everything refused, or nothing to change); the caller then goes on.
    ///
    /// `stale` buckets are cached but older than the staleness bound. Admissions may be planned
    /// on them: each write is conditional on what it was planned from, and a lost race returns
    /// the stored item. A refusal may not (a refund elsewhere would be missed): a batch that would
    /// refuse anything while some of its buckets are stale reads them first.
    fn decide(&mut self, batch: usize, stale: &[EntityId], ctx: &mut Ctx<'_>) -> Option<Io> {
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
            let own = index(&mut entities, &job.entity);
            let parent = job.parent.as_ref().map(|p| index(&mut entities, &p.entity));
            slots.push((own, parent));
        }
        let mut from_store = false;
        let confirmed: Vec<Option<Bucket>> = entities
            .iter()
            .map(|e| {
                let cache = self.items.get(e).and_then(|i| i.cache.as_ref());
                let cache = cache.expect("every bucket of the batch was seen before deciding");
                from_store |= cache.from_store;
                cache.bucket.clone()
            })
            .collect();
        let requests: Vec<Request<'_>> = jobs
            .iter()
            .zip(&slots)
            .map(|(job, (own, parent))| Request {
                own: Ask {
                    item: *own,
                    limits: &job.limits,
                    amounts: &job.own,
                },
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
        for e in &entities {
            // This round uses up a state the store just returned; later ones go by age.
            if let Some(cache) = self.items.get_mut(e).and_then(|i| i.cache.as_mut()) {
                cache.from_store = false;
            }
        }
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
                    self.release(&job);
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
                Verdict::Invalid(e) => {
                    self.release(&job);
                    let _ = job.reply.send(Err(LimiterError::invalid("consume", e)));
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
            self.admit(admitted, ctx);
            return None;
        }
        let seq = ctx.next_mark();
        let mut written = Vec::with_capacity(decided.writes.len());
        let mut writes = Vec::with_capacity(decided.writes.len());
        for mut w in decided.writes {
            let seen = confirmed[w.item].as_ref().and_then(|b| b.mark);
            w.expected.mark = w.write.stamp(seen, seq);
            written.push((entities[w.item].clone(), w.expected));
            writes.push((entities[w.item].clone(), w.write));
        }
        self.busy = Busy::Acquiring { admitted, written };
        self.last_write_ms = Some(ctx.now);
        Some(Io::Write(writes))
    }

    /// Answers acquires whose consumption is durable. One whose caller has gone (its deadline
    /// passed and it was told so) is given back by a compensating settlement.
    fn admit(&mut self, admitted: Vec<(AcquireJob, Vec<LimitStatus>)>, ctx: &mut Ctx<'_>) {
        // What the write recorded, per bucket, for the usage snapshots (summed over the batch).
        let mut used = Used::default();
        for (job, statuses) in admitted {
            self.release(&job);
            let AcquireJob {
                entity,
                limits,
                amounts,
                own,
                parent,
                parent_share: share,
                lease,
                reply,
                ..
            } = job;
            used.add(&entity, &own);
            if let Some(p) = &parent {
                used.add(&p.entity, &share);
            }
            // The lease is routable before its id reaches the caller (who may use it at once).
            let lease = lease.map(|owner| {
                let (seq, secret) = ctx.routes.lease_opened(ctx.group, owner);
                let expires = ctx.now.saturating_add(ctx.deps.settings.lease_ttl_ms);
                let lease = Lease::new(
                    entity.clone(),
                    ctx.resource.clone(),
                    limits,
                    amounts.clone(),
                    parent.clone(),
                    expires,
                );
                ctx.leases.open(seq, lease);
                (seq, LeaseId::Backed { seq, secret })
            });
            let answer = Ok(Decision::Admitted {
                lease: lease.map(|(_, id)| id),
                statuses,
            });
            if reply.send(answer).is_ok() {
                m::decision(outcome::ADMITTED);
                continue;
            }
            if let Some((seq, _)) = lease {
                ctx.leases.withdraw(seq);
                ctx.routes.lease_closed(seq);
            }
            metrics::counter!(m::COMPENSATIONS).increment(1);
            self.settles
                .extend(refund(&entity, &own, parent.as_ref(), &share, ctx));
        }
        used.record(ctx);
    }

    /// Settlements whose time is up are dropped (their lease has expired and told its closers).
    fn give_up_settles(&mut self, ctx: &Ctx<'_>) {
        let before = self.settles.len();
        self.settles.retain(|s| s.give_up_ms > ctx.now);
        let dropped = before - self.settles.len();
        if dropped > 0 {
            tracing::warn!("{dropped} settlement(s) not written before their lease expired");
            metrics::counter!(m::SETTLEMENTS_ABANDONED).increment(dropped as u64);
        }
    }

    /// Plans the queued settlements: one write per bucket for their sum. Returns the store call,
    /// or `None` when nothing needed writing (they are answered) or it must wait for a load.
    fn start_settle(&mut self, ctx: &mut Ctx<'_>) -> Option<Io> {
        let mut take = if self.one_settle {
            1
        } else {
            self.settles.len()
        };
        let mut sums: Vec<(EntityId, Amounts)> = Vec::new();
        'sum: for (i, s) in self.settles.iter().enumerate().take(take) {
            let mut next = sums.clone();
            for (entity, amounts) in &s.parts {
                match next.iter_mut().find(|(e, _)| e == entity) {
                    Some((_, total)) => {
                        if total.try_add(amounts).is_err() {
                            take = i.max(1);
                            break 'sum;
                        }
                    }
                    None => next.push((entity.clone(), amounts.clone())),
                }
            }
            if next.len() > MAX_ITEMS {
                take = i.max(1);
                break;
            }
            sums = next;
        }
        let missing: Vec<EntityId> = sums
            .iter()
            .map(|(e, _)| e)
            .filter(|e| self.items.get(*e).is_none_or(|i| i.cache.is_none()))
            .cloned()
            .collect();
        if !missing.is_empty() {
            self.busy = Busy::Loading;
            return Some(Io::Load(missing));
        }
        let mut writes = Vec::new();
        let mut written = Vec::new();
        let seq = ctx.next_mark();
        for (entity, sum) in &sums {
            let seen = self.items[entity]
                .cache
                .as_ref()
                .and_then(|c| c.bucket.as_ref());
            // A bucket that is not stored (deleted since) has nothing to settle.
            let Some(seen) = seen else { continue };
            match plan_settle(seen, sum, ctx.now) {
                Ok(None) => {}
                Ok(Some((mut write, mut expected))) => {
                    expected.mark = write.stamp(seen.mark, seq);
                    writes.push((entity.clone(), write));
                    written.push((entity.clone(), expected));
                }
                Err(e) if take > 1 => {
                    tracing::debug!("settling one at a time: {e}");
                    self.one_settle = true;
                    return self.start_settle(ctx);
                }
                Err(e) => {
                    let s = self
                        .settles
                        .pop_front()
                        .expect("one settlement was planned");
                    self.one_settle = false;
                    if let Some(id) = s.lease {
                        ctx.leases
                            .settled(id, Err(LimiterError::out_of_range("delta", e)));
                    }
                    return None;
                }
            }
        }
        let settles: Vec<Settle> = self.settles.drain(..take).collect();
        if writes.is_empty() {
            self.settled(settles, ctx);
            return None;
        }
        self.busy = Busy::Settling { settles, written };
        self.last_write_ms = Some(ctx.now);
        Some(Io::Write(writes))
    }

    fn settled(&mut self, settles: Vec<Settle>, ctx: &mut Ctx<'_>) {
        self.one_settle = false;
        let mut used = Used::default();
        for s in settles {
            for (entity, amounts) in &s.parts {
                used.add(entity, amounts);
            }
            if let Some(id) = s.lease {
                ctx.leases.settled(id, Ok(()));
            }
        }
        used.record(ctx);
    }

    /// A read finished: the states become the cache, or everything waiting on them fails.
    pub fn loaded(
        &mut self,
        result: Result<Vec<(EntityId, Option<Bucket>)>, StoreError>,
        ctx: &mut Ctx<'_>,
    ) {
        if !matches!(self.busy, Busy::Loading) {
            return;
        }
        self.busy = Busy::Idle;
        match result {
            Ok(states) => {
                for (entity, bucket) in states {
                    self.item(&entity).cache = Some(Cached {
                        bucket,
                        at_ms: ctx.now,
                        from_store: true,
                    });
                }
            }
            Err(e) => {
                let err = LimiterError::from(e);
                for job in std::mem::take(&mut self.queue) {
                    self.release(&job);
                    let _ = job.reply.send(Err(err.clone()));
                }
                for p in std::mem::take(&mut self.peeks) {
                    let _ = p.reply.send(Err(err.clone()));
                }
                self.failed();
            }
        }
    }

    /// A write finished (`stored`: the one bucket as the store returned it; a transaction
    /// returns none).
    pub fn written(&mut self, result: Result<Option<Bucket>, StoreError>, ctx: &mut Ctx<'_>) {
        match std::mem::replace(&mut self.busy, Busy::Idle) {
            Busy::Acquiring { admitted, written } => match result {
                Ok(stored) => {
                    self.confirm(written, stored, ctx);
                    self.admit(admitted, ctx);
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
                    let mut refunds = Vec::new();
                    for (job, _) in admitted {
                        self.release(&job);
                        refunds.extend(compensation(&job, ctx));
                        let _ = job.reply.send(Err(err.clone()));
                    }
                    self.unsure(&written, Owed::Refunds(refunds));
                }
            },
            Busy::Settling { settles, written } => match result {
                Ok(stored) => {
                    self.failures = 0;
                    self.confirm(written, stored, ctx);
                    self.settled(settles, ctx);
                }
                Err(StoreError::Conflict { index, current }) => {
                    self.lost_race(&written, index, current, ctx);
                    self.requeue(settles);
                }
                Err(e) => {
                    tracing::debug!("settlement write failed, resolving it: {e}");
                    self.unsure(&written, Owed::Settles(settles));
                }
            },
            other => self.busy = other,
        }
    }

    /// Milliseconds left of the back-off, if any.
    fn backing_off(&self) -> Option<i64> {
        self.retry_at
            .map(|at| at.saturating_duration_since(tokio::time::Instant::now()))
            .filter(|left| !left.is_zero())
            .map(|left| i64::try_from(left.as_millis()).unwrap_or(i64::MAX).max(1))
    }

    /// Backs off settlement retries: 50 ms doubling to 2 s.
    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let wait = (25u64 << self.failures.min(7)).min(2_000);
        self.retry_at = Some(tokio::time::Instant::now() + std::time::Duration::from_millis(wait));
    }

    /// A write of `written` failed without an answer: it may or may not have landed.
    fn unsure(&mut self, written: &[(EntityId, Bucket)], owed: Owed) {
        for (entity, _) in written {
            self.item(entity).cache = None;
        }
        // One write is all or nothing, so its first bucket tells for all of them.
        let (entity, expected) = written
            .first()
            .expect("a write touches at least one bucket");
        let seq = expected
            .mark
            .expect("every write is stamped before it is sent");
        self.failed();
        self.unresolved = Some(Unresolved {
            entity: entity.clone(),
            seq,
            owed,
        });
    }

    /// The outcome of an unknown write is known: `landed`, with the bucket as it is now.
    pub fn resolved(
        &mut self,
        result: Result<(bool, Option<Bucket>), StoreError>,
        ctx: &mut Ctx<'_>,
    ) {
        if !matches!(self.busy, Busy::Resolving) {
            return;
        }
        self.busy = Busy::Idle;
        let (landed, current) = match result {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!("the outcome of a write is still unknown: {e}");
                self.failed();
                return;
            }
        };
        let Some(u) = self.unresolved.take() else {
            return;
        };
        self.failures = 0;
        self.item(&u.entity).cache = Some(Cached {
            bucket: current,
            at_ms: ctx.now,
            from_store: true,
        });
        match (u.owed, landed) {
            (Owed::Refunds(refunds), true) => {
                metrics::counter!(m::COMPENSATIONS).increment(refunds.len() as u64);
                self.settles.extend(refunds);
            }
            (Owed::Refunds(_), false) => {}
            (Owed::Settles(settles), true) => self.settled(settles, ctx),
            (Owed::Settles(settles), false) => self.requeue(settles),
        }
    }

    fn requeue(&mut self, settles: Vec<Settle>) {
        for s in settles.into_iter().rev() {
            self.settles.push_front(s);
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
            self.item(&entity).cache = Some(Cached {
                bucket: Some(bucket),
                at_ms: ctx.now,
                from_store: false,
            });
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
            self.item(entity).cache = Some(Cached {
                bucket: current.map(|b| *b),
                at_ms: ctx.now,
                from_store: true,
            });
        }
    }
}
