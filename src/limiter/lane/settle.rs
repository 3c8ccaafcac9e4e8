//! Settlements: what a lane owes its buckets besides admissions. A lease's close (its net
//! adjustment, or the refund of everything it acquired) and the compensation for an admission
//! whose caller had gone are queued here and written before anything else, one write per bucket
//! for their sum. A transient failure is retried with back-off until the settlement's time is up.

use std::collections::VecDeque;

use super::{Busy, Ctx, Event, Io, Lane, MAX_ITEMS, Used};
use crate::domain::amounts::Amounts;
use crate::domain::bucket::plan_settle;
use crate::domain::ids::EntityId;
use crate::limiter::messages::AcquireJob;
use crate::limiter::types::LimiterError;
use crate::metrics as m;

/// A settlement waiting to be written: a lease's close (answered through the lease table) or a
/// compensation for an admission whose caller had gone (`lease: None`).
pub(crate) struct Settle {
    /// Signed milli-tokens per bucket: positive charges more, negative gives back.
    pub parts: Vec<(EntityId, Amounts)>,
    /// As `parts`, of bypassed buckets: counted as usage once settled, never written.
    pub counted: Vec<(EntityId, Amounts)>,
    pub lease: Option<u64>,
    /// When it is given up (its lease would have expired): it is dropped then, unwritten.
    pub give_up_ms: i64,
}

impl Settle {
    /// Gives back an admission whose caller was told it was not admitted (`None`: it took
    /// nothing).
    pub fn refund(job: &AcquireJob, give_up_ms: i64) -> Option<Self> {
        let parent = job.parent.as_ref().map(|p| (&p.entity, &job.parent_share));
        Self::refund_of((&job.entity, &job.own), job.bypass, parent, give_up_ms)
    }

    /// As [`Settle::refund`], of an acquire's shares: its own (only uncounted when `bypass`),
    /// and its parent's.
    pub fn refund_of(
        own: (&EntityId, &Amounts),
        bypass: bool,
        parent: Option<(&EntityId, &Amounts)>,
        give_up_ms: i64,
    ) -> Option<Self> {
        let back = |(entity, share): (&EntityId, &Amounts)| {
            let back = share.negated().expect("acquired amounts are bounded");
            (!back.is_zero()).then(|| (entity.clone(), back))
        };
        let own = back(own);
        let (own, counted) = if bypass { (None, own) } else { (own, None) };
        let parts: Vec<_> = own.into_iter().chain(parent.and_then(back)).collect();
        let counted: Vec<_> = counted.into_iter().collect();
        (!parts.is_empty() || !counted.is_empty()).then_some(Self {
            parts,
            counted,
            lease: None,
            give_up_ms,
        })
    }
}

/// The back-off between retries of failed store calls: 50 ms doubling to 2 s, each wait drawn
/// between half and all of that (so that lanes that failed together do not retry together). It
/// paces store calls in real time, so it is not the limiter's clock.
#[derive(Default)]
pub(super) struct Backoff {
    failures: u32,
    retry_at: Option<tokio::time::Instant>,
}

impl Backoff {
    /// Milliseconds left to wait, if any.
    pub fn left(&self) -> Option<i64> {
        self.retry_at
            .map(|at| at.saturating_duration_since(tokio::time::Instant::now()))
            .filter(|left| !left.is_zero())
            .map(|left| i64::try_from(left.as_millis()).unwrap_or(i64::MAX).max(1))
    }

    /// A call failed: wait longer before the next.
    pub fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let ceiling = (25u64 << self.failures.min(7)).min(2_000);
        let wait = ceiling / 2 + jitter(ceiling / 2 + 1);
        self.retry_at = Some(tokio::time::Instant::now() + std::time::Duration::from_millis(wait));
    }

    /// A call succeeded: the next failure starts from the shortest wait again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }
}

/// A number in `0..n` from the thread's random state (for spreading retries; not secret).
fn jitter(n: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now()) % n.max(1)
}

/// The queued settlements.
#[derive(Default)]
pub(super) struct Settles {
    queue: VecDeque<Settle>,
    /// Settle one at a time: a sum went past a bound that one of its parts may not.
    one_at_a_time: bool,
}

impl Settles {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Puts settlements back at the front, in their order (their write lost a race or did not
    /// land).
    pub fn requeue(&mut self, settles: Vec<Settle>) {
        for s in settles.into_iter().rev() {
            self.queue.push_front(s);
        }
    }
}

impl Lane {
    /// Queues a settlement.
    pub fn settle(&mut self, settle: Settle) {
        self.settles.queue.push_back(settle);
    }

    /// Settlements whose time is up are dropped (their lease has expired and told its closers).
    pub(super) fn give_up_settles(&mut self, ctx: &Ctx<'_>) {
        let queue = &mut self.settles.queue;
        let before = queue.len();
        queue.retain(|s| s.give_up_ms > ctx.now);
        let dropped = before - queue.len();
        if dropped > 0 {
            tracing::warn!("{dropped} settlement(s) not written before their lease expired");
            metrics::counter!(m::SETTLEMENTS_ABANDONED).increment(dropped as u64);
        }
    }

    /// Plans the queued settlements: one write per bucket for their sum. Returns the store call,
    /// or `None` when nothing needed writing (they are answered) or one was refused for good.
    pub(super) fn start_settle(&mut self, ctx: &Ctx<'_>) -> Option<Io> {
        let queue = &self.settles.queue;
        let mut take = if self.settles.one_at_a_time {
            1
        } else {
            queue.len()
        };
        let mut sums: Vec<(EntityId, Amounts)> = Vec::new();
        'sum: for (i, s) in queue.iter().enumerate().take(take) {
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
            .filter(|e| !self.view.seen(e))
            .cloned()
            .collect();
        if !missing.is_empty() {
            self.busy = Busy::Loading;
            return Some(Io::Load(missing));
        }
        let mut writes = Vec::new();
        let mut written = Vec::new();
        let mark = super::next_mark();
        for (entity, sum) in &sums {
            let seen = self.view.get(entity).and_then(|c| c.bucket.as_ref());
            // A bucket that is not stored (deleted since) has nothing to settle.
            let Some(seen) = seen else { continue };
            match plan_settle(seen, sum, ctx.now) {
                Ok(None) => {}
                Ok(Some((mut write, mut expected))) => {
                    write.mark(seen.mark, mark);
                    expected.mark = Some(mark);
                    writes.push((entity.clone(), write));
                    written.push((entity.clone(), expected));
                }
                Err(e) if take > 1 => {
                    tracing::debug!("settling one at a time: {e}");
                    self.settles.one_at_a_time = true;
                    return self.start_settle(ctx);
                }
                Err(e) => {
                    let s = self
                        .settles
                        .queue
                        .pop_front()
                        .expect("one settlement was planned");
                    self.settles.one_at_a_time = false;
                    if let Some(id) = s.lease {
                        let refused = LimiterError::out_of_range("delta", e);
                        self.events.push(Event::Settled(id, Err(refused)));
                    }
                    return None;
                }
            }
        }
        let settles: Vec<Settle> = self.settles.queue.drain(..take).collect();
        if writes.is_empty() {
            self.settled(settles);
            return None;
        }
        self.busy = Busy::Settling { settles, written };
        self.last_write_ms = Some(ctx.now);
        Some(Io::Write(writes))
    }

    /// Settlements are written: their leases are answered, their amounts are usage.
    pub(super) fn settled(&mut self, settles: Vec<Settle>) {
        self.settles.one_at_a_time = false;
        let mut used = Used::default();
        for s in settles {
            for (entity, amounts) in s.parts.iter().chain(&s.counted) {
                used.add(entity, amounts);
            }
            if let Some(id) = s.lease {
                self.events.push(Event::Settled(id, Ok(())));
            }
        }
        used.record(&mut self.events);
    }
}
