//! Token-bucket math and the conditional changes that carry it to a store.
//!
//! Pure and deterministic: the current time (`now`, milliseconds since the Unix epoch) is always a
//! parameter. One [`Bucket`] holds every limit of one (entity, resource) pair, mirroring the one
//! stored item that holds them, so one write decides a multi-limit acquire.
//!
//! Refill is lazy and exact. Per limit, `elapsed * refill_amount + carry` milli-token-milliseconds
//! accrue; whole multiples of the period become tokens and the remainder stays in `carry`. The
//! shared refill timestamp then moves to `now`, so refilling in many small steps credits exactly
//! what one large step would: no rounding drift, whatever the rate. Balances are clamped to capacity
//! on refill but never floored: adjustments may leave debt, which then sets the retry-after.
//!
//! [`plan`] turns a request into a [`Write`] that states the conditions under which it is still
//! right; [`Bucket::apply`] is the reference semantics of those conditions (the memory store uses
//! it, the DynamoDB store translates it into condition expressions).
//!
//! Every name a request's amounts give is a limit of the limit set it is planned under: the
//! daemon checks a request's names once, where it comes in ([`super::amounts::check_names`]),
//! and gives each bucket its share. So [`admit`] and [`plan`] do not check them again (a name
//! outside the set would be charged nothing; debug builds panic on it).
//!
//! Each write carries this process's **mark** ([`Mark`]): it requires the stored mark of this
//! process's writer to be what the write was planned from and moves it to a number no other write
//! of the process uses. Only this process moves its own mark, so after a write whose answer was
//! lost the stored mark tells whether it landed.

use super::amounts::MIN_BALANCE;
use super::limit::{Limit, LimitName, encode};
use super::schedule::{Params, Schedule, cross};

/// The most schedule boundaries walked one by one in a refill or a wait (past them, a refill
/// credits the rest at the schedule's slowest rate and smallest capacity: never more than the
/// schedule gives).
const MAX_SEGMENTS: usize = 64;

/// The state of one limit inside a bucket. Balances and totals are milli-tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitState {
    pub limit: Limit,
    /// May be negative (debt after an adjustment); at most the capacity after a refill.
    pub balance: i64,
    /// Refill accrued but not yet worth a milli-token, in milli-token-milliseconds (< period).
    /// Of a session quota: when its open window ends, ms since the epoch (0: none is open).
    pub carry: i64,
    /// Total ever consumed through this bucket (consumptions, adjustments and refunds). Wider
    /// than a balance: it only grows with use, refill pays for more, and it must never wrap.
    pub consumed: i128,
    /// Of a session quota: what was topped up for the open (or next) window, which raises its
    /// ceiling until the window ends (a calendar quota keeps its period's in its carry). 0 for
    /// any other limit.
    pub topped_up: i64,
}

impl LimitState {
    fn full(limit: Limit, now: i64) -> Self {
        Self {
            balance: limit.capacity_at(now),
            limit,
            carry: 0,
            consumed: 0,
            topped_up: 0,
        }
    }

    /// Balance and carry after refilling from `from` to `to` (ms since the epoch): a quota
    /// back at its amount when an edge of its calendar lies between (debt forgiven), else as
    /// it was; a dripping limit by what the time accrued.
    fn refilled(&self, from: i64, to: i64) -> (i64, i64) {
        let capacity = self.limit.capacity();
        if self.limit.session_ms().is_some() {
            return match self.window_over(to) {
                true => (capacity, 0),
                false => (self.balance, self.carry),
            };
        }
        if let Some(calendar) = self.limit.calendar() {
            return match calendar.edge_between(from, to) {
                true => (capacity, 0),
                false => (self.balance, self.carry),
            };
        }
        let Some(schedule) = self.limit.schedule() else {
            return drip(self.balance, self.carry, self.limit.base(), from, to);
        };
        // Piecewise: each span at the values in force in it; at a boundary the balance is
        // clamped to the new capacity, and a new period restarts the carry.
        let (mut balance, mut carry) = (self.balance, self.carry);
        let (mut at, mut params) = (from, self.limit.params_at(from));
        for _ in 0..MAX_SEGMENTS {
            let end = schedule.span(at).to.min(to);
            (balance, carry) = drip(balance, carry, params, at, end);
            if end >= to {
                return (balance, carry);
            }
            at = end;
            let next = self.limit.params_at(at);
            (balance, carry) = cross(balance, carry, params, next);
            params = next;
        }
        // Further boundaries: the rest at the slowest rate, up to the smallest capacity, then
        // clamped to the capacity at `to` (the ideal bucket has at least that much).
        let all = || schedule.all_params(self.limit.base());
        let slowest = all()
            .min_by(|a, b| {
                (i128::from(a.refill_amount) * i128::from(b.refill_period_ms))
                    .cmp(&(i128::from(b.refill_amount) * i128::from(a.refill_period_ms)))
            })
            .unwrap_or(params);
        let smallest = all().map(|p| p.capacity).min().unwrap_or(params.capacity);
        let floor = Params {
            capacity: smallest,
            ..slowest
        };
        let (balance, _) = drip(balance, 0, floor, at, to);
        (balance.min(self.limit.capacity_at(to)), 0)
    }

    /// Whether refilling from `from` to `to` changes anything: at least one milli-token drips
    /// in, or a quota's calendar has an edge between (whatever its balance: a write after it must
    /// move the refill time past it, or the edge would later erase what that write consumed).
    fn refill_adds(&self, from: i64, to: i64) -> bool {
        if self.limit.session_ms().is_some() {
            return self.window_over(to);
        }
        if let Some(calendar) = self.limit.calendar() {
            return calendar.edge_between(from, to);
        }
        if let Some(schedule) = self.limit.schedule()
            && schedule.boundary_between(from, to)
        {
            return true;
        }
        let p = self.limit.params_at(from);
        let elapsed = to.saturating_sub(from);
        elapsed > 0
            && i128::from(elapsed) * i128::from(p.refill_amount) + i128::from(self.carry)
                >= i128::from(p.refill_period_ms)
    }

    /// Milliseconds until `balance` (with `carry`, the state refilled up to `since`) covers
    /// `wanted`; `None` if it never can. A soft limit covers anything at once, short of the
    /// floor no balance may pass; a quota at its calendar's next edge after `since`, counted
    /// from `now` (no edge lies between them, or the state would have been refilled).
    fn wait_ms(&self, balance: i64, carry: i64, wanted: i64, since: i64, now: i64) -> Option<u64> {
        if self.limit.is_soft() {
            return (i128::from(balance) - i128::from(wanted) >= i128::from(MIN_BALANCE))
                .then_some(0);
        }
        if wanted <= balance {
            return Some(0);
        }
        if let Some(schedule) = self.limit.schedule() {
            let most = schedule
                .all_params(self.limit.base())
                .map(|p| p.capacity)
                .max();
            if most.is_none_or(|most| wanted > most) {
                return None;
            }
            return Some(self.scheduled_wait(schedule, balance, carry, wanted, since));
        }
        if wanted > self.limit.capacity() {
            return None;
        }
        if self.limit.session_ms().is_some() {
            // Until the open window ends (with none open the balance is full, or in debt from
            // a settlement: the next consumption opens one).
            let end = match self.carry {
                0 => now.saturating_add(self.limit.session_ms().unwrap_or(0)),
                end => end,
            };
            return Some(u64::try_from(end.saturating_sub(now)).unwrap_or(0));
        }
        if let Some(calendar) = self.limit.calendar() {
            let edge = calendar.next_edge(since)?;
            return Some(u64::try_from(edge.saturating_sub(now)).unwrap_or(0));
        }
        Some(drip_wait(balance, carry, wanted, self.limit.base()))
    }

    /// [`LimitState::wait_ms`] of a scheduled limit: walks its spans from `since` (each at its
    /// own rate, clamped at each boundary) until the balance covers `wanted`.
    fn scheduled_wait(
        &self,
        schedule: &Schedule,
        mut balance: i64,
        mut carry: i64,
        wanted: i64,
        since: i64,
    ) -> u64 {
        let (mut at, mut params) = (since, self.limit.params_at(since));
        let waited = |at: i64, more: u64| {
            u64::try_from(at.saturating_sub(since))
                .unwrap_or(0)
                .saturating_add(more)
        };
        for _ in 0..MAX_SEGMENTS {
            let end = schedule.span(at).to;
            if wanted <= params.capacity {
                let more = drip_wait(balance, carry, wanted, params);
                if i128::from(at) + i128::from(more) < i128::from(end) {
                    return waited(at, more);
                }
            }
            (balance, carry) = drip(balance, carry, params, at, end);
            at = end;
            let next = self.limit.params_at(at);
            (balance, carry) = cross(balance, carry, params, next);
            params = next;
            if wanted <= balance {
                return waited(at, 0);
            }
        }
        // Further than the walk goes: at the rate then in force.
        waited(at, drip_wait(balance, carry, wanted, params))
    }
}

/// A dripping limit's balance and carry after refilling from `from` to `to` at `p`.
fn drip(balance: i64, carry: i64, p: Params, from: i64, to: i64) -> (i64, i64) {
    let elapsed = to.saturating_sub(from);
    let period = i128::from(p.refill_period_ms);
    let accrued = i128::from(elapsed.max(0)) * i128::from(p.refill_amount) + i128::from(carry);
    let refilled = i128::from(balance) + accrued / period;
    if refilled >= i128::from(p.capacity) {
        (p.capacity, 0)
    } else {
        // refilled < capacity <= i64::MAX and refilled >= balance >= i64::MIN
        (refilled as i64, (accrued % period) as i64)
    }
}

/// Milliseconds until `balance` (with `carry`) covers `wanted` at `p` (below its capacity).
fn drip_wait(balance: i64, carry: i64, wanted: i64, p: Params) -> u64 {
    let deficit = i128::from(wanted) - i128::from(balance);
    if deficit <= 0 {
        return 0;
    }
    let needed = deficit * i128::from(p.refill_period_ms) - i128::from(carry);
    let amount = i128::from(p.refill_amount);
    let wait = (needed + amount - 1) / amount;
    u64::try_from(wait.max(0)).unwrap_or(u64::MAX)
}

impl LimitState {
    /// When a quota's amount comes back, for a state refilled up to `since` (see
    /// [`LimitStatus::resets_at_ms`]).
    fn resets_at(&self, since: i64) -> Option<i64> {
        if let Some(calendar) = self.limit.calendar() {
            return calendar.next_edge(since);
        }
        (self.limit.session_ms().is_some() && self.carry != 0).then_some(self.carry)
    }

    /// The most the balance may hold at `at`: the capacity in force, and of a calendar quota
    /// what was topped up this period (kept in its carry, which a quota's drip does not need).
    fn ceiling(&self, at: i64) -> i64 {
        match (self.limit.calendar(), self.limit.session_ms()) {
            (Some(_), _) => self.limit.capacity().saturating_add(self.carry.max(0)),
            (_, Some(_)) => self.limit.capacity().saturating_add(self.topped_up.max(0)),
            _ => self.limit.capacity_at(at),
        }
    }

    /// What to write of a session quota's top-up with a refill (`None`: other limits).
    fn topped_up_change(&self) -> Option<i64> {
        self.limit.session_ms().map(|_| self.topped_up)
    }

    /// Whether a session quota's open window has ended by `now`.
    fn window_over(&self, now: i64) -> bool {
        self.carry != 0 && self.carry <= now
    }

    /// Whether consuming `amount` at this state opens a session window (none is open).
    fn opens(&self, amount: i64) -> bool {
        self.limit.session_ms().is_some() && amount > 0 && self.carry == 0
    }

    /// As [`LimitState::opens`], of this state as it will stand at `now` (its window may end
    /// by then), without refilling it.
    fn opens_at(&self, amount: i64, now: i64) -> bool {
        self.limit.session_ms().is_some()
            && amount > 0
            && (self.carry == 0 || self.window_over(now))
    }

    /// The same state, its balance no higher than its ceiling at `at`.
    fn clamped(mut self, at: i64) -> Self {
        self.balance = self.balance.min(self.ceiling(at));
        self
    }

    /// Consumes `amount` at `now`: a session quota with no open window opens one.
    fn consume(&mut self, amount: i64, now: i64) {
        if self.opens(amount) {
            let window = self.limit.session_ms().unwrap_or(0);
            self.carry = now.saturating_add(window).max(1);
        }
        self.balance -= amount;
        self.consumed += i128::from(amount);
    }
}

/// Every limit of one (entity, resource) pair, as stored. Limits are in canonical (name) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// When the balances were last refilled (ms since the epoch). Never moves backwards.
    pub refilled_at: i64,
    pub limits: Vec<LimitState>,
    /// The mark of the last write this process's store made to the item (see [`Mark`]); `None`
    /// when it never wrote it. Each store reads its own writer's mark only.
    pub mark: Option<u64>,
}

/// How one limit stands for one request, at the time of the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    pub limit: Limit,
    /// Of a scheduled limit: the limit in force at the decision (its schedule applied).
    pub in_force: Option<Limit>,
    /// Balance at the decision time, milli-tokens (may be negative).
    pub available: i64,
    /// What the request asked of this limit, milli-tokens.
    pub requested: i64,
    /// Milliseconds until the request would fit: `Some(0)` when it fits now, `None` when it never
    /// can (more than the capacity).
    pub retry_after_ms: Option<u64>,
    /// Of a quota: when its amount comes back (a calendar's next edge, the open window's end),
    /// ms since the epoch; `None` for a dripping limit or a session with no window open.
    pub resets_at_ms: Option<i64>,
}

impl LimitStatus {
    /// The limit as it stood at the decision: of a scheduled limit, the one in force.
    pub fn current(&self) -> &Limit {
        self.in_force.as_ref().unwrap_or(&self.limit)
    }

    pub fn allowed(&self) -> bool {
        self.retry_after_ms == Some(0)
    }

    /// Whether a soft limit's balance does not cover the request (it is debited into debt).
    pub fn overdrawn(&self) -> bool {
        self.limit.is_soft() && i128::from(self.available) < i128::from(self.requested)
    }
}

/// Why a request was refused: the status of every limit, violated or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub statuses: Vec<LimitStatus>,
}

impl Rejection {
    pub fn violated(&self) -> impl Iterator<Item = &LimitStatus> {
        self.statuses.iter().filter(|s| !s.allowed())
    }

    /// The longest wait over the violated limits; `None` when some limit can never fit the request.
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.violated()
            .map(|s| s.retry_after_ms)
            .try_fold(0, |acc, w| w.map(|w| acc.max(w)))
    }
}

/// A conditional change to one stored bucket, planned from a state that was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Store a new bucket, provided none exists yet.
    Create(Bucket),
    /// Change an existing bucket, provided it still matches what the change was planned from.
    Change(Change),
}

/// A write's mark: it requires the stored mark of this process's writer to be `from` and moves it
/// to `to` (unique per write). After a write whose answer was lost, the stored mark tells
/// whether it landed (`to`) or not (`from`, and then it never will once a later write has moved
/// the mark on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub from: Option<u64>,
    pub to: u64,
}

/// A change to an existing bucket.
///
/// It always requires the stored limit configuration to be `seen_config`. A plain consumption
/// (`refill == None`) only subtracts, so it commutes with every other writer and needs nothing but
/// enough balance. A refill or reconfiguration also needs the stored refill time to be unchanged:
/// only one writer can win a refill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Encoded limit set the change was planned against ([`encode`]).
    pub seen_config: String,
    pub refill: Option<Refill>,
    pub limits: Vec<LimitChange>,
    /// Set by the writer just before sending (see [`Write::mark`]).
    pub mark: Option<Mark>,
}

impl Write {
    /// Marks the write: `from` is the mark of the state it was planned from, `to` a number no
    /// other write of this process uses (the bucket carries it once the write has landed).
    pub fn mark(&mut self, from: Option<u64>, to: u64) {
        match self {
            Self::Create(b) => b.mark = Some(to),
            Self::Change(c) => c.mark = Some(Mark { from, to }),
        }
    }

    /// The mark the write moves the bucket to, once marked.
    pub fn marks(&self) -> Option<u64> {
        match self {
            Self::Create(b) => b.mark,
            Self::Change(c) => c.mark.map(|m| m.to),
        }
    }
}

impl Change {
    /// A change that only moves the writer's mark (after a write whose outcome is unknown: once
    /// it lands, that write never can).
    pub fn mark_only(seen: &Bucket, to: u64) -> Self {
        Self {
            seen_config: encode(&seen.limit_set()),
            refill: None,
            limits: Vec::new(),
            mark: Some(Mark {
                from: seen.mark,
                to,
            }),
        }
    }

    /// Whether applying the change would alter nothing (a plain change of zero amounts).
    pub fn is_noop(&self) -> bool {
        self.mark.is_none()
            && self.refill.is_none()
            && self.limits.iter().all(|c| {
                matches!(
                    c,
                    LimitChange::Update {
                        delta: 0,
                        consumed: 0,
                        carry: None,
                        topped_up: None,
                        ..
                    }
                )
            })
    }
}

/// The part of a [`Change`] that refills or reconfigures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refill {
    pub seen_refilled_at: i64,
    pub refilled_at: i64,
    /// The limit set after the change (equal to `seen_config` when only refilling).
    pub limits: Vec<Limit>,
    /// Limits of the old set that the new one drops.
    pub removed: Vec<LimitName>,
}

/// What a [`Change`] does to one limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitChange {
    /// Add `delta` to the balance and `consumed` to the total, provided the stored balance lies in
    /// `min_balance..=max_balance`; with a refill, also set the carry (and a session quota's
    /// top-up).
    Update {
        name: LimitName,
        delta: i64,
        consumed: i64,
        min_balance: i64,
        max_balance: Option<i64>,
        carry: Option<i64>,
        topped_up: Option<i64>,
    },
    /// A limit new to the bucket (only inside a reconfiguring change).
    Insert(LimitState),
}

/// The stored bucket did not meet a write's conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the stored bucket no longer matches what the write was planned from")]
pub struct ConditionFailed;

/// The outcome of planning a request against a seen state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Admit with this write; `expected` is the bucket as it will be if nobody else wrote.
    Admit {
        write: Write,
        expected: Bucket,
    },
    Reject(Rejection),
}

/// The outcome of checking a request without planning its write (see [`admit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// It fits: how each limit stood, and the state after consuming.
    Admitted {
        statuses: Vec<LimitStatus>,
        after: Bucket,
    },
    Rejected(Rejection),
}

/// Checks a request as [`plan`] does and computes the state after it, without building the
/// write: the cheap step for deciding many queued requests one after another, each against the
/// state the previous one left. Every name of `amounts` is a limit of `limits` (see the module
/// documentation).
pub fn admit(
    seen: Option<&Bucket>,
    limits: &[Limit],
    amounts: &[(LimitName, i64)],
    now: i64,
) -> Admission {
    debug_assert!(
        known(limits, amounts),
        "names checked where the request came in"
    );
    let amount_of = |name: &LimitName| amount_for(amounts, name);
    let mut after = match seen {
        None => Bucket::full(limits.to_vec(), now),
        Some(seen) => seen.at(now).reconfigured(limits),
    };
    if let Some(rejection) = after.check(&amount_of, now) {
        return Admission::Rejected(rejection);
    }
    let mut statuses = Vec::with_capacity(after.limits.len());
    let after_refilled_at = after.refilled_at;
    for l in &mut after.limits {
        let requested = amount_of(l.limit.name());
        let available = l.balance;
        l.consume(requested, now);
        statuses.push(LimitStatus {
            limit: l.limit.clone(),
            in_force: l.limit.in_force(now),
            available,
            requested,
            retry_after_ms: Some(0),
            resets_at_ms: l.resets_at(after_refilled_at),
        });
    }
    Admission::Admitted { statuses, after }
}

/// Whether every name of `amounts` is a limit of `limits`.
fn known(limits: &[Limit], amounts: &[(LimitName, i64)]) -> bool {
    amounts
        .iter()
        .all(|(name, _)| limits.iter().any(|l| l.name() == name))
}

/// Plans a request for `amounts` (milli-tokens per limit name; limits not named are asked for 0,
/// so a limit in debt refuses everything) against `seen` (`None`: no bucket is stored yet), under
/// the limit set `limits` (canonical order, see [`super::limit::canonical`]). Every name of
/// `amounts` is a limit of `limits` (see the module documentation).
pub fn plan(
    seen: Option<&Bucket>,
    limits: &[Limit],
    amounts: &[(LimitName, i64)],
    now: i64,
) -> Plan {
    debug_assert!(
        known(limits, amounts),
        "names checked where the request came in"
    );
    let amount_of = |name: &LimitName| amount_for(amounts, name);
    let Some(seen) = seen else {
        let fresh = Bucket::full(limits.to_vec(), now);
        return match fresh.check(&amount_of, now) {
            Some(rejection) => Plan::Reject(rejection),
            None => {
                let mut created = fresh;
                for l in &mut created.limits {
                    l.consume(amount_of(l.limit.name()), now);
                }
                Plan::Admit {
                    write: Write::Create(created.clone()),
                    expected: created,
                }
            }
        };
    };
    let target = seen.at(now).reconfigured(limits);
    if let Some(rejection) = target.check(&amount_of, now) {
        return Plan::Reject(rejection);
    }
    // Opening a session window is a guarded write that moves the refill time to now: of two
    // daemons opening the same window at once, one wins and the other re-plans inside it.
    let opens = target
        .limits
        .iter()
        .any(|l| l.opens(amount_of(l.limit.name())));
    let target = match opens {
        true => seen.refilled_to(now).reconfigured(limits),
        false => target,
    };
    let same_limits = seen.limits.len() == limits.len()
        && seen.limits.iter().zip(limits).all(|(s, l)| s.limit == *l);
    // A due refill is written only when the consumption needs it or deferring it would lose
    // tokens. While the stored balances cover the request and no consumed limit's refill reaches
    // its capacity, refilling later (from the unchanged refill time) adds exactly what refilling
    // now would, so the write only subtracts and commutes with every other writer's.
    let deferrable = same_limits
        && !seen.edge_due(now)
        && seen
            .limits
            .iter()
            .zip(&target.limits)
            .all(|(before, refilled)| {
                let amount = amount_of(before.limit.name());
                (before.limit.is_soft() || before.balance >= amount)
                    && (amount == 0 || refilled.balance < refilled.limit.capacity_at(now))
            });
    let guarded = !same_limits || opens || (seen.refill_due(now) && !deferrable);
    let mut expected = target.clone();
    let mut changes = Vec::with_capacity(target.limits.len());
    for (state, after) in target.limits.iter().zip(&mut expected.limits) {
        let amount = amount_of(state.limit.name());
        after.consume(amount, now);
        let before = seen.limit(state.limit.name());
        changes.push(match before {
            None => LimitChange::Insert(after.clone()),
            Some(before) => {
                // What refilling to now adds (none when no refill is due).
                let accrued = state.balance - before.balance;
                let refill = if guarded { accrued } else { 0 };
                // A deferred refill stays exact only while a concurrent refund elsewhere does
                // not bring it to the capacity.
                let ceiling = (!guarded && amount > 0 && accrued > 0)
                    .then(|| state.limit.capacity_at(now) - accrued);
                // A soft limit may go into debt, down to the floor.
                let floor = if state.limit.is_soft() {
                    MIN_BALANCE
                } else {
                    0
                };
                LimitChange::Update {
                    name: state.limit.name().clone(),
                    delta: refill - amount,
                    consumed: amount,
                    min_balance: floor + amount - refill,
                    max_balance: if guarded {
                        Some(before.balance)
                    } else {
                        ceiling
                    },
                    carry: guarded.then_some(after.carry),
                    topped_up: after.topped_up_change().filter(|_| guarded),
                }
            }
        });
    }
    let refill = guarded.then(|| Refill {
        seen_refilled_at: seen.refilled_at,
        refilled_at: target.refilled_at,
        limits: limits.to_vec(),
        removed: seen
            .limits
            .iter()
            .map(|l| l.limit.name().clone())
            .filter(|n| !limits.iter().any(|l| l.name() == n))
            .collect(),
    });
    if refill.is_none() {
        // Without a refill nothing moves the timestamp or the carries.
        expected.refilled_at = seen.refilled_at;
        for (after, before) in expected.limits.iter_mut().zip(&seen.limits) {
            after.carry = before.carry;
            after.balance = before.balance - amount_of(before.limit.name());
        }
    }
    Plan::Admit {
        write: Write::Change(Change {
            seen_config: encode(&seen.limit_set()),
            refill,
            limits: changes,
            mark: None,
        }),
        expected,
    }
}

/// A settlement that would take a balance below [`MIN_BALANCE`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "limit \"{name}\" would fall below the deepest debt a bucket may hold ({} tokens)",
    MIN_BALANCE / super::limit::MILLI
)]
pub struct DebtTooDeep {
    pub name: LimitName,
}

/// Plans settling lease amounts on a stored bucket (`settle`: milli-tokens per limit; positive
/// charges more, which may go into debt down to [`MIN_BALANCE`]; negative gives back, and a
/// refund never lifts a balance above its capacity). Limits the bucket no longer has are
/// skipped: there is nothing left to settle on them. `None` when nothing needs writing.
///
/// While no refund would pass the capacity, the write commutes with every other writer (it only
/// adds, under conditions that keep the floor and the ceiling). Otherwise it refills to `now` and
/// clamps, guarded on the exact refill time and on balances no higher than seen (a concurrent
/// consumption only lowers them, and the write then credits at most what it would have).
///
/// # Errors
/// [`DebtTooDeep`] naming the first limit a charge would take below the floor.
pub fn plan_settle(
    seen: &Bucket,
    settle: &[(LimitName, i64)],
    now: i64,
) -> Result<Option<(Write, Bucket)>, DebtTooDeep> {
    let amount_of = |name: &LimitName| amount_for(settle, name);
    if seen.limits.iter().all(|l| amount_of(l.limit.name()) == 0) {
        return Ok(None);
    }
    for l in &seen.limits {
        let a = amount_of(l.limit.name());
        if i128::from(l.balance) - i128::from(a) < i128::from(MIN_BALANCE) {
            return Err(DebtTooDeep {
                name: l.limit.name().clone(),
            });
        }
    }
    let clamps = seen.limits.iter().any(|l| {
        let a = amount_of(l.limit.name());
        a < 0 && i128::from(l.balance) - i128::from(a) > i128::from(l.ceiling(now))
    });
    let seen_config = encode(&seen.limit_set());
    // A charge to a session quota with no open window opens one (a guarded write, as in
    // `plan`).
    let opens = seen
        .limits
        .iter()
        .any(|l| l.opens_at(amount_of(l.limit.name()), now));
    // After a quota's edge, a plain write would be erased by the reset a later read applies.
    if !clamps && !opens && !seen.edge_due(now) {
        let mut expected = seen.clone();
        let mut changes = Vec::new();
        for (l, after) in seen.limits.iter().zip(&mut expected.limits) {
            let a = amount_of(l.limit.name());
            if a == 0 {
                continue;
            }
            after.balance -= a;
            after.consumed += i128::from(a);
            changes.push(LimitChange::Update {
                name: l.limit.name().clone(),
                delta: -a,
                consumed: a,
                // A charge keeps the floor; a refund keeps the ceiling.
                min_balance: if a > 0 { MIN_BALANCE + a } else { MIN_BALANCE },
                max_balance: (a < 0).then(|| l.ceiling(now) + a),
                carry: None,
                topped_up: None,
            });
        }
        let write = Write::Change(Change {
            seen_config,
            refill: None,
            limits: changes,
            mark: None,
        });
        return Ok(Some((write, expected)));
    }
    let target = match opens {
        true => seen.refilled_to(now),
        false => seen.at(now),
    };
    let mut expected = target.clone();
    let mut changes = Vec::with_capacity(seen.limits.len());
    for ((before, now_state), after) in seen
        .limits
        .iter()
        .zip(&target.limits)
        .zip(&mut expected.limits)
    {
        let a = amount_of(before.limit.name());
        let capacity = before.limit.capacity_at(now);
        let ceiling = now_state.ceiling(now);
        let balance = if a < 0 {
            (i128::from(now_state.balance) - i128::from(a)).min(i128::from(ceiling)) as i64
        } else {
            now_state.balance - a
        };
        // A session's window stays open to its end, whatever the balance.
        let carry = if before.limit.calendar().is_some() {
            now_state.carry
        } else if balance >= capacity && before.limit.session_ms().is_none() {
            0
        } else if now_state.opens(a) {
            now.saturating_add(now_state.limit.session_ms().unwrap_or(0))
                .max(1)
        } else {
            now_state.carry
        };
        after.balance = balance;
        after.carry = carry;
        after.consumed += i128::from(a);
        let delta = balance - before.balance;
        changes.push(LimitChange::Update {
            name: before.limit.name().clone(),
            delta,
            consumed: a,
            min_balance: MIN_BALANCE.saturating_sub(delta.min(0)),
            max_balance: Some(before.balance),
            carry: Some(carry),
            topped_up: now_state.topped_up_change(),
        });
    }
    Ok(Some((
        refill_change(seen, target.refilled_at, changes),
        expected,
    )))
}

/// A change that refills `seen` to `refilled_at` under its own limit set, guarded on its refill
/// time, with `changes` to its limits.
fn refill_change(seen: &Bucket, refilled_at: i64, changes: Vec<LimitChange>) -> Write {
    Write::Change(Change {
        seen_config: encode(&seen.limit_set()),
        refill: Some(Refill {
            seen_refilled_at: seen.refilled_at,
            refilled_at,
            limits: seen.limit_set(),
            removed: Vec::new(),
        }),
        limits: changes,
        mark: None,
    })
}

/// The most a calendar quota can be topped up within one period, milli-tokens: four times the
/// largest capacity (so a balance never comes near the range of an `i64`).
pub const MAX_TOPPED_UP: i64 = 4 * super::limit::MAX_TOKENS as i64 * super::limit::MILLI;

/// An operator's change to one stored bucket, outside any acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// The named limits (`None`: all of them) back to full capacity, debt forgiven (a calendar
    /// quota's top-ups of the period too; a session's window ends).
    Reset(Option<Vec<LimitName>>),
    /// Milli-tokens given to each named limit (each > 0): a calendar quota exactly that for
    /// this period, any other limit at most its room below capacity.
    TopUp(Vec<(LimitName, i64)>),
}

impl Operation {
    /// The names it acts on (`None`: every limit of the bucket).
    pub fn names(&self) -> Option<Vec<&LimitName>> {
        match self {
            Self::Reset(names) => names.as_ref().map(|n| n.iter().collect()),
            Self::TopUp(amounts) => Some(amounts.iter().map(|(n, _)| n).collect()),
        }
    }
}

/// Plans an [`Operation`] on the stored bucket `seen` at `now`: the write (`None` when it gives
/// nothing: every named limit is full already) and what each named limit gains, milli-tokens.
/// Names the bucket does not have gain nothing.
///
/// The write refills to `now` and sets the new balances, guarded on the refill time seen and on
/// balances no higher than seen (only a concurrent refund raises one, and it is re-planned). A
/// concurrent consumption only lowers a balance and keeps the refill time: the write then still
/// adds exactly what it planned, as if the operation came first. So it is exact against the
/// ledger while other writers keep deciding, never a blind overwrite.
pub fn plan_operation(
    seen: &Bucket,
    op: &Operation,
    now: i64,
) -> (Option<Write>, Vec<(LimitName, i64)>) {
    let target = seen.at(now.max(seen.refilled_at));
    let mut gained = Vec::new();
    let mut changes = Vec::with_capacity(seen.limits.len());
    for (before, refilled) in seen.limits.iter().zip(&target.limits) {
        let name = before.limit.name();
        let capacity = before.limit.capacity_at(target.refilled_at);
        let named = |amounts: &[(LimitName, i64)]| amounts.iter().any(|(n, _)| n == name);
        let (balance, carry, topped_up) = match op {
            Operation::Reset(names) if names.as_ref().is_none_or(|n| n.contains(name)) => {
                (capacity, 0, 0)
            }
            // A calendar quota gains exactly what is given, for this period (its ceiling
            // rises with it; the next edge takes both back), up to a bound no sum can pass.
            Operation::TopUp(amounts) if before.limit.calendar().is_some() && named(amounts) => {
                let room = MAX_TOPPED_UP.saturating_sub(refilled.carry.max(0)).max(0);
                let given = amount_for(amounts, name).clamp(0, room);
                (refilled.balance + given, refilled.carry + given, 0)
            }
            // So does a session quota, for the open window (or the next one, if none is open).
            Operation::TopUp(amounts) if before.limit.session_ms().is_some() && named(amounts) => {
                let room = MAX_TOPPED_UP
                    .saturating_sub(refilled.topped_up.max(0))
                    .max(0);
                let given = amount_for(amounts, name).clamp(0, room);
                (
                    refilled.balance + given,
                    refilled.carry,
                    refilled.topped_up + given,
                )
            }
            Operation::TopUp(amounts) if named(amounts) => {
                let given = amount_for(amounts, name).max(0);
                let room = (i128::from(capacity) - i128::from(refilled.balance)).max(0);
                let balance = refilled.balance + i128::from(given).min(room) as i64;
                (
                    balance,
                    if balance >= capacity {
                        0
                    } else {
                        refilled.carry
                    },
                    0,
                )
            }
            _ => (refilled.balance, refilled.carry, refilled.topped_up),
        };
        if op.names().is_none_or(|n| n.contains(&name)) {
            gained.push((name.clone(), balance - refilled.balance));
        }
        let delta = balance - before.balance;
        changes.push(LimitChange::Update {
            name: name.clone(),
            delta,
            consumed: 0,
            min_balance: MIN_BALANCE.saturating_sub(delta.min(0)),
            max_balance: Some(before.balance),
            carry: Some(carry),
            topped_up: before.limit.session_ms().map(|_| topped_up),
        });
    }
    if gained.iter().all(|(_, g)| *g == 0) {
        return (None, gained);
    }
    let write = refill_change(seen, target.refilled_at, changes);
    (Some(write), gained)
}

fn amount_for(amounts: &[(LimitName, i64)], name: &LimitName) -> i64 {
    amounts
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, a)| *a)
        .sum()
}

impl Bucket {
    /// A bucket with every limit at capacity.
    pub fn full(limits: Vec<Limit>, now: i64) -> Self {
        Self {
            mark: None,
            refilled_at: now,
            limits: limits
                .into_iter()
                .map(|l| LimitState::full(l, now))
                .collect(),
        }
    }

    pub fn limit(&self, name: &LimitName) -> Option<&LimitState> {
        self.limits.iter().find(|l| l.limit.name() == name)
    }

    pub fn limit_set(&self) -> Vec<Limit> {
        self.limits.iter().map(|l| l.limit.clone()).collect()
    }

    /// Whether a write at `now` would credit refill (so it must be a guarded write).
    pub fn refill_due(&self, now: i64) -> bool {
        self.limits
            .iter()
            .any(|l| l.refill_adds(self.refilled_at, now))
    }

    /// Whether a quota's calendar has an edge, or a schedule a boundary, between the refill
    /// time and `now`: a write at `now` must then refill (move the refill time past it),
    /// whatever it changes. A plain write after an edge would be erased by the reset a later
    /// read applies; one after a boundary would be charged against the balance before the
    /// boundary's clamp (so a lowered capacity would not bind it).
    pub fn edge_due(&self, now: i64) -> bool {
        self.limits.iter().any(|l| {
            l.limit
                .calendar()
                .is_some_and(|c| c.edge_between(self.refilled_at, now))
                || l.limit
                    .schedule()
                    .is_some_and(|s| s.boundary_between(self.refilled_at, now))
        })
    }

    /// The bucket as it stands at `now`: refilled, clamped, timestamp moved (never backwards).
    pub fn at(&self, now: i64) -> Self {
        if !self.refill_due(now) {
            let mut same = self.clone();
            let at = self.refilled_at.max(now);
            same.limits = same.limits.into_iter().map(|l| l.clamped(at)).collect();
            return same;
        }
        self.refilled_to(now)
    }

    /// The bucket refilled to `now` whether or not anything is due (exact either way: what
    /// does not make a milli-token stays in the carry), its refill time moved to `now` (never
    /// backwards).
    fn refilled_to(&self, now: i64) -> Self {
        Self {
            mark: self.mark,
            refilled_at: self.refilled_at.max(now),
            limits: self
                .limits
                .iter()
                .map(|l| {
                    let (balance, carry) = l.refilled(self.refilled_at, now);
                    // A session's window end takes its top-up back.
                    let ended = l.limit.session_ms().is_some() && l.window_over(now);
                    LimitState {
                        balance,
                        carry,
                        topped_up: if ended { 0 } else { l.topped_up },
                        ..l.clone()
                    }
                    .clamped(self.refilled_at.max(now))
                })
                .collect(),
        }
    }

    /// The same bucket under another limit set: kept limits keep their balance (clamped to a
    /// smaller capacity), new ones start full, dropped ones go. A changed period restarts the carry.
    fn reconfigured(self, limits: &[Limit]) -> Self {
        let at = self.refilled_at;
        let states = limits
            .iter()
            .map(|limit| match self.limit(limit.name()) {
                None => LimitState::full(limit.clone(), self.refilled_at),
                Some(old) => {
                    // A calendar quota keeps its period's top-ups (and its raised ceiling).
                    let calendars = old.limit.calendar().is_some() && limit.calendar().is_some();
                    // A session's open window stays while its length does.
                    let sessions = old.limit.session_ms().is_some() && limit.session_ms().is_some();
                    let window = sessions && old.limit.session_ms() == limit.session_ms();
                    let carry = if calendars
                        || window
                        || (!sessions
                            && old.limit.params_at(at).refill_period_ms
                                == limit.params_at(at).refill_period_ms
                            && old.limit.session_ms() == limit.session_ms()
                            && old.balance < limit.capacity_at(at))
                    {
                        old.carry
                    } else {
                        0
                    };
                    LimitState {
                        limit: limit.clone(),
                        balance: old.balance,
                        carry,
                        consumed: old.consumed,
                        topped_up: if sessions { old.topped_up } else { 0 },
                    }
                    .clamped(at)
                }
            })
            .collect();
        Self {
            mark: self.mark,
            refilled_at: self.refilled_at,
            limits: states,
        }
    }

    /// The statuses of a request at `now` against this (already refilled) state, or `None` if
    /// it fits.
    fn check(&self, amount_of: &dyn Fn(&LimitName) -> i64, now: i64) -> Option<Rejection> {
        let statuses: Vec<LimitStatus> = self
            .limits
            .iter()
            .map(|l| {
                let requested = amount_of(l.limit.name());
                LimitStatus {
                    limit: l.limit.clone(),
                    in_force: l.limit.in_force(now),
                    available: l.balance,
                    requested,
                    retry_after_ms: l.wait_ms(l.balance, l.carry, requested, self.refilled_at, now),
                    resets_at_ms: l.resets_at(self.refilled_at),
                }
            })
            .collect();
        statuses
            .iter()
            .any(|s| !s.allowed())
            .then_some(Rejection { statuses })
    }

    /// Applies a change if its conditions hold, exactly as the stores must.
    ///
    /// # Errors
    /// [`ConditionFailed`] (and no change at all) when any condition fails.
    pub fn apply(&mut self, change: &Change) -> Result<(), ConditionFailed> {
        if encode(&self.limit_set()) != change.seen_config {
            return Err(ConditionFailed);
        }
        if let Some(refill) = &change.refill
            && refill.seen_refilled_at != self.refilled_at
        {
            return Err(ConditionFailed);
        }
        if let Some(mark) = change.mark
            && mark.from != self.mark
        {
            return Err(ConditionFailed);
        }
        for c in &change.limits {
            match c {
                LimitChange::Update {
                    name,
                    min_balance,
                    max_balance,
                    ..
                } => {
                    let state = self.limit(name).ok_or(ConditionFailed)?;
                    if state.balance < *min_balance
                        || max_balance.is_some_and(|max| state.balance > max)
                    {
                        return Err(ConditionFailed);
                    }
                }
                LimitChange::Insert(state) => {
                    if self.limit(state.limit.name()).is_some() {
                        return Err(ConditionFailed);
                    }
                }
            }
        }
        let mut next = Vec::with_capacity(change.limits.len());
        for c in &change.limits {
            match c {
                LimitChange::Update {
                    name,
                    delta,
                    consumed,
                    carry,
                    topped_up,
                    ..
                } => {
                    let mut state = self.limit(name).cloned().ok_or(ConditionFailed)?;
                    state.balance = state.balance.checked_add(*delta).ok_or(ConditionFailed)?;
                    state.consumed += i128::from(*consumed);
                    if let Some(carry) = carry {
                        state.carry = *carry;
                    }
                    if let Some(topped_up) = topped_up {
                        state.topped_up = *topped_up;
                    }
                    if let Some(refill) = &change.refill
                        && let Some(limit) = refill.limits.iter().find(|l| l.name() == name)
                    {
                        state.limit = limit.clone();
                    }
                    next.push(state);
                }
                LimitChange::Insert(state) => next.push(state.clone()),
            }
        }
        // Limits the change does not mention stay as they are (a plain change names them all; a
        // reconfiguring one drops what it lists as removed).
        for state in &self.limits {
            let mentioned = next.iter().any(|n| n.limit.name() == state.limit.name());
            let removed = change
                .refill
                .as_ref()
                .is_some_and(|r| r.removed.contains(state.limit.name()));
            if !mentioned && !removed {
                next.push(state.clone());
            }
        }
        next.sort_by(|a, b| a.limit.name().cmp(b.limit.name()));
        self.limits = next;
        if let Some(refill) = &change.refill {
            self.refilled_at = refill.refilled_at;
        }
        if let Some(mark) = change.mark {
            self.mark = Some(mark.to);
        }
        Ok(())
    }

    /// Unconditionally adds `amount` milli-tokens of consumption (negative: a refund) to each named
    /// limit, without the clamp or floor of [`plan_settle`]: for building states in tests.
    ///
    /// # Errors
    /// The first name that is not in the bucket (and no change).
    #[cfg(test)]
    pub fn adjust(&mut self, amounts: &[(LimitName, i64)]) -> Result<(), LimitName> {
        if let Some((name, _)) = amounts.iter().find(|(n, _)| self.limit(n).is_none()) {
            return Err(name.clone());
        }
        for (name, amount) in amounts {
            let state = self
                .limits
                .iter_mut()
                .find(|l| l.limit.name() == name)
                .expect("every name was checked above");
            state.balance -= amount;
            state.consumed += i128::from(*amount);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
