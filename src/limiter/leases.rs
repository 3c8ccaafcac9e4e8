//! A group's leases: what each acquired, its adjustments since, and how far its closing got.
//!
//! A lease is open until commit or rollback; closing it queues a settlement (the net delta, or a
//! refund of everything acquired) that the lane writes durably, retrying transient failures. The
//! closing caller is answered once the write is confirmed; a repeated close joins the one in
//! progress. A lease whose closer heard the outcome is forgotten at once; one whose closer had
//! gone (its deadline passed first) is kept, closed, until its time is up, so that repeating the
//! same close answers OK (the caller learns the outcome) and the other close is refused. Expiry is by the limiter's clock: an
//! open lease whose time is up is forgotten and what it acquired stays consumed.

use std::collections::{HashMap, VecDeque};

use super::group::{ParentSpec, Reply};
use super::types::LimiterError;
use crate::domain::amounts::{Amounts, MAX_AMOUNT};
use crate::domain::ids::{EntityId, ResourceId};
use crate::domain::limit::Limit;
use crate::metrics as m;

pub(crate) struct Lease {
    pub entity: EntityId,
    pub resource: ResourceId,
    pub limits: Vec<Limit>,
    pub acquired: Amounts,
    pub delta: Amounts,
    pub parent: Option<ParentSpec>,
    pub expires_ms: i64,
    phase: Phase,
}

enum Phase {
    Open,
    Closing {
        rollback: bool,
        waiters: Vec<Reply<()>>,
    },
    Closed {
        rollback: bool,
    },
}

/// What closing a lease needs written: amounts per entity (signed: positive charges more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settlement {
    pub resource: ResourceId,
    pub parts: Vec<(EntityId, Amounts)>,
}

#[derive(Default)]
pub(crate) struct Leases {
    map: HashMap<u64, Lease>,
    /// Ids in expiry order (one TTL for all, so creation order); ids already gone are skipped.
    expiry: VecDeque<(i64, u64)>,
    /// Leases forgotten since the last [`Leases::take_forgotten`] (their routes go too).
    forgotten: Vec<u64>,
}

/// The limiter names the lease as its caller gave it (see `Limiter::lease_call`).
fn not_found(id: u64) -> LimiterError {
    LimiterError::LeaseNotFound(format!("{id:x}"))
}

impl Lease {
    pub fn new(
        entity: EntityId,
        resource: ResourceId,
        limits: Vec<Limit>,
        acquired: Amounts,
        parent: Option<ParentSpec>,
        expires_ms: i64,
    ) -> Self {
        Self {
            entity,
            resource,
            limits,
            acquired,
            delta: Amounts::default(),
            parent,
            expires_ms,
            phase: Phase::Open,
        }
    }

    /// The settlement of `amounts` on the lease's bucket and, for a cascade, the parent's: each
    /// its share.
    fn settlement(&self, amounts: &Amounts) -> Settlement {
        let mut parts = vec![(self.entity.clone(), amounts.share(&self.limits).nonzero())];
        if let Some(p) = &self.parent {
            parts.push((p.entity.clone(), amounts.share(&p.limits).nonzero()));
        }
        parts.retain(|(_, a)| !a.is_empty());
        Settlement {
            resource: self.resource.clone(),
            parts,
        }
    }
}

impl Leases {
    pub fn open(&mut self, id: u64, lease: Lease) {
        self.expiry.push_back((lease.expires_ms, id));
        self.map.insert(id, lease);
        metrics::gauge!(m::LEASES_OPEN).increment(1.0);
    }

    /// Forgets a lease whose id never reached its caller.
    pub fn withdraw(&mut self, id: u64) {
        if self.map.remove(&id).is_some() {
            metrics::gauge!(m::LEASES_OPEN).decrement(1.0);
        }
    }

    /// Records an adjustment. The lease's total per limit (acquired plus adjustments) must stay
    /// within `0..=MAX_AMOUNT`: a lease never gives back more than it took.
    ///
    /// # Errors
    /// Not found (also once closing or closed), an unknown limit, or a total out of range; the
    /// lease is unchanged then.
    pub fn adjust(&mut self, id: u64, delta: &Amounts) -> Result<(), LimiterError> {
        let lease = self.map.get_mut(&id).ok_or_else(|| not_found(id))?;
        if !matches!(lease.phase, Phase::Open) {
            return Err(not_found(id));
        }
        let parent = lease.parent.as_ref().map(|p| &p.limits[..]);
        if let Err(unknown) = delta.known_to(&[&lease.limits, parent.unwrap_or_default()]) {
            return Err(LimiterError::invalid(
                "delta",
                format!("the lease has no limit \"{}\"", unknown.0),
            ));
        }
        let mut next = lease.delta.clone();
        let out_of_range = |name: &crate::domain::limit::LimitName| {
            LimiterError::out_of_range(
                format!("delta[{name}]"),
                format!(
                    "the lease's total for \"{name}\" would fall outside 0..={} tokens (a lease gives \
                     back at most what it acquired)",
                    MAX_AMOUNT / crate::domain::limit::MILLI
                ),
            )
        };
        next.try_add(delta).map_err(|e| out_of_range(&e.name))?;
        for (name, d) in next.iter() {
            let total = i128::from(lease.acquired.get(name)) + i128::from(d);
            if !(0..=i128::from(MAX_AMOUNT)).contains(&total) {
                return Err(out_of_range(name));
            }
        }
        lease.delta = next;
        Ok(())
    }

    /// Starts closing a lease. `Ok(Some(_))`: this settlement must be written, then
    /// [`Leases::settled`] answers `reply`; `Ok(None)`: `reply` was answered or will be with the
    /// close already in progress.
    pub fn close(&mut self, id: u64, rollback: bool, reply: Reply<()>) -> Option<Settlement> {
        let Some(lease) = self.map.get_mut(&id) else {
            let _ = reply.send(Err(not_found(id)));
            return None;
        };
        match &mut lease.phase {
            Phase::Closed { rollback: done } | Phase::Closing { rollback: done, .. }
                if *done != rollback =>
            {
                let was = if *done { "rolled back" } else { "committed" };
                let _ = reply.send(Err(LimiterError::FailedPrecondition(format!(
                    "the lease was already {was}"
                ))));
                None
            }
            Phase::Closed { .. } => {
                let _ = reply.send(Ok(()));
                None
            }
            Phase::Closing { waiters, .. } => {
                waiters.push(reply);
                None
            }
            Phase::Open => {
                let amounts = if rollback {
                    // The adjustments were never written: give back what the acquire took.
                    lease
                        .acquired
                        .negated()
                        .expect("acquired amounts are within 0..=MAX_AMOUNT")
                } else {
                    lease.delta.clone()
                };
                let settlement = lease.settlement(&amounts);
                if settlement.parts.is_empty() {
                    lease.phase = Phase::Closing {
                        rollback,
                        waiters: vec![reply],
                    };
                    self.settled(id, Ok(()));
                    return None;
                }
                lease.phase = Phase::Closing {
                    rollback,
                    waiters: vec![reply],
                };
                Some(settlement)
            }
        }
    }

    /// The settlement of lease `id` is written (`Ok`) or refused for good (`Err`: the lease is
    /// open again, unchanged, and the closers hear why).
    pub fn settled(&mut self, id: u64, outcome: Result<(), LimiterError>) {
        let Some(lease) = self.map.get_mut(&id) else {
            return;
        };
        let Phase::Closing { rollback, waiters } = std::mem::replace(&mut lease.phase, Phase::Open)
        else {
            return;
        };
        let mut heard = true;
        for w in waiters {
            heard &= w.send(outcome.clone()).is_ok();
        }
        if outcome.is_ok() {
            metrics::gauge!(m::LEASES_OPEN).decrement(1.0);
            if heard {
                self.map.remove(&id);
                self.forgotten.push(id);
            } else if let Some(lease) = self.map.get_mut(&id) {
                lease.phase = Phase::Closed { rollback };
            }
        }
    }

    /// The leases forgotten since the last call (closed and answered, or expired).
    pub fn take_forgotten(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.forgotten)
    }

    /// Forgets the leases whose time is up at `now`; returns their ids. What an open lease
    /// acquired stays consumed; a lease still closing keeps its settlement queued (the lane gives
    /// it up at the same time) and its closers are told.
    pub fn expire(&mut self, now: i64) -> Vec<u64> {
        let mut gone = Vec::new();
        while let Some(&(expires, id)) = self.expiry.front() {
            if expires > now {
                break;
            }
            self.expiry.pop_front();
            let Some(lease) = self.map.remove(&id) else {
                continue;
            };
            match lease.phase {
                Phase::Open => {
                    metrics::gauge!(m::LEASES_OPEN).decrement(1.0);
                    metrics::counter!(m::LEASES_EXPIRED).increment(1);
                }
                Phase::Closing { waiters, .. } => {
                    metrics::gauge!(m::LEASES_OPEN).decrement(1.0);
                    for w in waiters {
                        let _ = w.send(Err(LimiterError::CloseUnconfirmed {
                            lease: format!("{id:x}"),
                            state: "the store did not confirm the close before the lease \
                                    expired; what it acquired stays consumed"
                                .into(),
                        }));
                    }
                }
                Phase::Closed { .. } => {}
            }
            gone.push(id);
        }
        gone
    }

    /// When lease `id` expires.
    pub fn expires_ms(&self, id: u64) -> Option<i64> {
        self.map.get(&id).map(|l| l.expires_ms)
    }

    /// When the earliest lease expires.
    pub fn next_expiry(&mut self) -> Option<i64> {
        while let Some(&(expires, id)) = self.expiry.front() {
            if self.map.contains_key(&id) {
                return Some(expires);
            }
            self.expiry.pop_front();
        }
        None
    }

    /// Forgets every lease (the actor is stopping); returns their ids.
    pub fn drain(&mut self) -> Vec<u64> {
        let open = self
            .map
            .values()
            .filter(|l| !matches!(l.phase, Phase::Closed { .. }))
            .count();
        metrics::gauge!(m::LEASES_OPEN).decrement(open as f64);
        self.expiry.clear();
        self.map.drain().map(|(id, _)| id).collect()
    }

    /// Whether any lease still waits for its settlement to be written.
    pub fn closing(&self) -> bool {
        self.map
            .values()
            .any(|l| matches!(l.phase, Phase::Closing { .. }))
    }

    /// Whether any lease is open (not closed).
    pub fn any_open(&self) -> bool {
        self.map
            .values()
            .any(|l| !matches!(l.phase, Phase::Closed { .. }))
    }
}
