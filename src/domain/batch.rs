//! The batch decision: which queued acquires one write admits, and that write.
//!
//! Pure and deterministic, called once per round trip of a consistency group (an entity with its
//! cascading children). Each acquire touches its own bucket and, for a cascading child, its
//! parent's. They are decided one after another, in arrival order, each against the state the
//! admitted ones before it left, starting from the states the store last confirmed; a refusal
//! changes nothing. Every bucket the admitted acquires touch then gets one conditional write for
//! their sum, planned from its confirmed state, so the store checks the whole batch at once.
//!
//! A bucket is planned under one limit set per batch: the first acquire that reaches it fixes
//! it, and an acquire asking another set for it ends the batch (it and everything after it wait
//! for the next round, so the order is kept).
//!
//! [`refusal`] is the same check of one request on the spot (the daemon's refusal at zero store
//! cost, on what its cache knows): one function checks a request, own bucket first, then the
//! parent's, for both.

use super::amounts::Amounts;
use super::bucket::{Admission, Bucket, LimitStatus, Plan, Rejection, Write};
use super::bucket::{admit, plan};
use super::limit::Limit;

/// What one acquire asks of one bucket: `item` indexes the batch's confirmed states.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub item: usize,
    pub limits: &'a [Limit],
    pub amounts: &'a Amounts,
}

/// One queued acquire: its own bucket (none when bypassed: nothing asked of it), and its
/// parent's when it cascades.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub own: Option<Ask<'a>>,
    pub parent: Option<Ask<'a>>,
}

/// The decision on one queued acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Carried by this batch's writes: how each limit of its own bucket stood.
    Admitted(Vec<LimitStatus>),
    /// Refused (by the parent's limits when `by_parent`); nothing of it is written.
    Rejected {
        rejection: Rejection,
        by_parent: bool,
    },
    /// Not decided in this batch (another limit set for a bucket came first).
    Deferred,
}

/// One bucket's write: `expected` is the state it leaves if nobody else wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemWrite {
    pub item: usize,
    pub write: Write,
    pub expected: Bucket,
}

/// The decisions, one per queued acquire in order, and the writes that carry the admitted ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    pub verdicts: Vec<Verdict>,
    pub writes: Vec<ItemWrite>,
}

impl BatchPlan {
    pub fn admitted(&self) -> usize {
        self.verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Admitted(_)))
            .count()
    }
}

/// One ask against the state the admitted ones before it left: how its limits stood and the
/// state after it, or the rejection. `stored`: against the stored balances, with no refill since
/// the stored refill time.
fn check(
    running: &[Option<Bucket>],
    ask: Ask<'_>,
    now: i64,
    stored: bool,
) -> Result<(Vec<LimitStatus>, Bucket), Rejection> {
    let state = running[ask.item].as_ref();
    let at = match state {
        Some(b) if stored => b.refilled_at.min(now),
        _ => now,
    };
    match admit(state, ask.limits, ask.amounts, at) {
        Admission::Rejected(rejection) => Err(rejection),
        Admission::Admitted { statuses, after } => Ok((statuses, after)),
    }
}

/// What a request admitted against `running` leaves: its own bucket's statuses (the parent's
/// when its own is bypassed), its own bucket after it (unless bypassed) and its parent's (when
/// it cascades).
type Admitted = (Vec<LimitStatus>, Option<Bucket>, Option<Bucket>);

/// One request against `running`: its own bucket first, then its parent's (only when its own
/// admits). The one order of a request's checks.
fn check_request(
    running: &[Option<Bucket>],
    req: &Request<'_>,
    now: i64,
    stored: bool,
) -> Result<Admitted, Verdict> {
    let refused = |rejection, by_parent| Verdict::Rejected {
        rejection,
        by_parent,
    };
    let own = match req.own {
        Some(own) => Some(check(running, own, now, stored).map_err(|r| refused(r, false))?),
        None => None,
    };
    let parent = match req.parent {
        Some(p) => Some(check(running, p, now, stored).map_err(|r| refused(r, true))?),
        None => None,
    };
    Ok(match (own, parent) {
        (Some((statuses, own)), parent) => (statuses, Some(own), parent.map(|p| p.1)),
        (None, Some((statuses, parent))) => (statuses, None, Some(parent)),
        (None, None) => (Vec::new(), None, None),
    })
}

/// Whether `req` is refused on the spot, on `states`: each of its buckets as it stands at `now`
/// less what queued requests hold of it, or `None` when it is not stored or not known well
/// enough to refuse on (a full bucket then: only a request that can never fit is refused; a
/// quota topped up holds more than its amount, so asking a quota for more than its amount is
/// never refused on an unknown state). Returns the rejection, and whether the parent's limits
/// refused. The checks and their order are [`decide_batch`]'s.
pub fn refusal(
    states: &[Option<Bucket>],
    req: &Request<'_>,
    now: i64,
) -> Option<(Rejection, bool)> {
    let past_unknown_quota = req.own.iter().chain(req.parent.as_ref()).any(|a| {
        states[a.item].is_none()
            && a.limits
                .iter()
                .any(|l| l.quota_kind().is_some() && a.amounts.get(l.name()) > l.capacity())
    });
    if past_unknown_quota {
        return None;
    }
    match check_request(states, req, now, false) {
        Err(Verdict::Rejected {
            rejection,
            by_parent,
        }) => Some((rejection, by_parent)),
        _ => None,
    }
}

/// Decides `queue` against the `confirmed` bucket states (`None`: not stored) at `now`.
///
/// # Panics
/// Never for valid input: an `Ask::item` out of range of `confirmed` is a caller bug and panics
/// with that message.
pub fn decide_batch(confirmed: &[Option<Bucket>], queue: &[Request<'_>], now: i64) -> BatchPlan {
    decide(confirmed, queue, now, false)
}

/// As [`decide_batch`], but each acquire must fit the balances as stored: nothing refilled since
/// the stored refill time is credited to it. The writes are still planned at `now`, so they stay
/// exact: one the stored balances cover needs no refill and commutes with other writers (unless
/// the refill would reach a capacity, which it must then write). For acquires whose writes keep
/// losing the race for a refill to other daemons: they are written without one or refused, with
/// a retry-after counted from the stored refill time (never shorter than the true one).
pub fn decide_batch_on_stored(
    confirmed: &[Option<Bucket>],
    queue: &[Request<'_>],
    now: i64,
) -> BatchPlan {
    decide(confirmed, queue, now, true)
}

fn decide(
    confirmed: &[Option<Bucket>],
    queue: &[Request<'_>],
    now: i64,
    stored: bool,
) -> BatchPlan {
    let mut running: Vec<Option<Bucket>> = confirmed.to_vec();
    let mut sets: Vec<Option<&[Limit]>> = vec![None; confirmed.len()];
    let mut totals: Vec<Amounts> = vec![Amounts::default(); confirmed.len()];
    let mut verdicts = Vec::with_capacity(queue.len());
    let mut deferring = false;
    for req in queue {
        let asks = req.own.iter().chain(req.parent.as_ref());
        let other_set = asks
            .clone()
            .any(|a| sets[a.item].is_some_and(|s| s != a.limits));
        if deferring || other_set {
            deferring = true;
            verdicts.push(Verdict::Deferred);
            continue;
        }
        let (statuses, own, parent) = match check_request(&running, req, now, stored) {
            Ok(admitted) => admitted,
            Err(verdict) => {
                verdicts.push(verdict);
                continue;
            }
        };
        let charged = req.own.zip(own).into_iter().chain(req.parent.zip(parent));
        for (ask, after) in charged {
            running[ask.item] = Some(after);
            sets[ask.item] = Some(ask.limits);
            totals[ask.item]
                .try_add(ask.amounts)
                .expect("admitted amounts fit in a balance, so their sum fits in i64");
        }
        verdicts.push(Verdict::Admitted(statuses));
    }
    let writes = sets
        .iter()
        .enumerate()
        .filter_map(|(item, set)| {
            let set = (*set)?;
            match plan(confirmed[item].as_ref(), set, &totals[item], now) {
                Plan::Admit { write, expected } => {
                    let noop = matches!(&write, Write::Change(c) if c.is_noop());
                    (!noop).then_some(ItemWrite {
                        item,
                        write,
                        expected,
                    })
                }
                // Each admitted acquire fitted the state the previous ones left, so their sum
                // fits the confirmed state: `plan` checks exactly what `admit` checked, at once.
                Plan::Reject(_) => {
                    unreachable!("the sum of acquires admitted one by one is admitted at once")
                }
            }
        })
        .collect();
    BatchPlan { verdicts, writes }
}

#[cfg(test)]
mod tests;
