//! A group's leases: what each acquired, its adjustments since, and how far its closing got.
//!
//! A lease is open until commit or rollback; closing it queues a settlement (the net delta, or a
//! refund of everything acquired) that the lane writes durably, retrying transient failures. The
//! closing caller is answered once the write is confirmed; a repeated close joins the one in
//! progress. A lease whose closer heard the outcome is forgotten at once; one whose closer had
//! gone (its deadline passed first) is kept, closed, until its time is up, so that repeating the
//! same close answers OK (the caller learns the outcome) and the other close is refused.
//!
//! A lease lives as long as its holder: every call on it (an adjustment, a close, a renewal)
//! moves its expiry to `lease_ttl_ms` from now, and the clients renew the leases they hold on a
//! timer. So `lease_ttl_ms` is how long a lease outlives a holder gone silent (a crashed worker):
//! then, by the limiter's clock, it is forgotten and what it acquired stays consumed.

use std::collections::{BTreeSet, HashMap};

use super::messages::{Close, ParentSpec, Reply};
use super::types::LimiterError;
use crate::domain::amounts::{Amounts, MAX_AMOUNT, check_names};
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
    /// The entity's own bucket is bypassed: its share is counted as usage, never written.
    pub bypass: bool,
    /// Set by the table: `lease_ttl_ms` after the holder's last call.
    expires_ms: i64,
    phase: Phase,
}

enum Phase {
    Open,
    Closing { how: Close, waiters: Vec<Reply<()>> },
    Closed { how: Close },
}

/// What closing a lease needs written: amounts per entity (signed: positive charges more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settlement {
    pub resource: ResourceId,
    pub parts: Vec<(EntityId, Amounts)>,
    /// Of a bypassed bucket: counted as usage, never written.
    pub counted: Vec<(EntityId, Amounts)>,
}

pub(crate) struct Leases {
    map: HashMap<u64, Lease>,
    /// (expiry, id) of every lease in the map, earliest first; a renewal moves its entry.
    expiry: BTreeSet<(i64, u64)>,
    /// Leases forgotten since the last [`Leases::take_forgotten`] (their routes go too).
    forgotten: Vec<u64>,
    /// How long a lease lives after its holder's last call.
    ttl_ms: i64,
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
        bypass: bool,
    ) -> Self {
        Self {
            entity,
            resource,
            limits,
            acquired,
            delta: Amounts::default(),
            parent,
            bypass,
            expires_ms: 0,
            phase: Phase::Open,
        }
    }

    /// The settlement of `amounts` on the lease's bucket and, for a cascade, the parent's: each
    /// its share.
    fn settlement(&self, amounts: &Amounts) -> Settlement {
        let own = (self.entity.clone(), amounts.share(&self.limits).nonzero());
        let (own, counted) = if self.bypass {
            (None, Some(own))
        } else {
            (Some(own), None)
        };
        let parent = self
            .parent
            .as_ref()
            .map(|p| (p.entity.clone(), amounts.share(&p.limits).nonzero()));
        let mut parts: Vec<_> = own.into_iter().chain(parent).collect();
        let mut counted: Vec<_> = counted.into_iter().collect();
        parts.retain(|(_, a)| !a.is_empty());
        counted.retain(|(_, a)| !a.is_empty());
        Settlement {
            resource: self.resource.clone(),
            parts,
            counted,
        }
    }
}

impl Leases {
    /// An empty table whose leases live `ttl_ms` after their holder's last call.
    pub fn new(ttl_ms: i64) -> Self {
        Self {
            map: HashMap::new(),
            expiry: BTreeSet::new(),
            forgotten: Vec::new(),
            ttl_ms,
        }
    }

    /// Opens a lease at `now`.
    pub fn open(&mut self, id: u64, mut lease: Lease, now: i64) {
        lease.expires_ms = now.saturating_add(self.ttl_ms);
        self.expiry.insert((lease.expires_ms, id));
        self.map.insert(id, lease);
        metrics::gauge!(m::LEASES_OPEN).increment(1.0);
    }

    /// Forgets a lease whose id never reached its caller.
    pub fn withdraw(&mut self, id: u64) {
        if let Some(lease) = self.map.remove(&id) {
            self.expiry.remove(&(lease.expires_ms, id));
            metrics::gauge!(m::LEASES_OPEN).decrement(1.0);
        }
    }

    /// The holder of lease `id` is alive at `now`: the lease lives `lease_ttl_ms` from now. A
    /// closing lease is not moved (its close is retried until the time it had when it began).
    ///
    /// # Errors
    /// Not found: unknown, expired or closed.
    pub fn renew(&mut self, id: u64, now: i64) -> Result<(), LimiterError> {
        let lease = self.map.get_mut(&id).ok_or_else(|| not_found(id))?;
        match lease.phase {
            Phase::Open => {
                let expires = now.saturating_add(self.ttl_ms).max(lease.expires_ms);
                self.expiry.remove(&(lease.expires_ms, id));
                self.expiry.insert((expires, id));
                lease.expires_ms = expires;
                Ok(())
            }
            Phase::Closing { .. } => Ok(()),
            Phase::Closed { .. } => Err(not_found(id)),
        }
    }

    /// Whether lease `id` is open (neither closing nor closed).
    pub fn is_open(&self, id: u64) -> bool {
        self.map
            .get(&id)
            .is_some_and(|l| matches!(l.phase, Phase::Open))
    }

    /// Records an adjustment. The lease's total per limit (acquired plus adjustments) must stay
    /// within `0..=MAX_AMOUNT`: a lease never gives back more than it took.
    ///
    /// The call renews the lease (see [`Leases::renew`]).
    ///
    /// # Errors
    /// Not found (also once closing or closed), an unknown limit, or a total out of range; the
    /// lease is unchanged then (but renewed).
    pub fn adjust(&mut self, id: u64, delta: &Amounts, now: i64) -> Result<(), LimiterError> {
        self.renew(id, now)?;
        let lease = self.map.get_mut(&id).ok_or_else(|| not_found(id))?;
        if !matches!(lease.phase, Phase::Open) {
            return Err(not_found(id));
        }
        let parent = lease.parent.as_ref().map(|p| &p.limits[..]);
        if let Err(unknown) = check_names(delta, &[&lease.limits, parent.unwrap_or_default()]) {
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

    /// Starts closing a lease at `now` (which renews it first). `Some(_)`: this settlement must
    /// be written (until [`Leases::expires_ms`]), then [`Leases::settled`] answers `reply`;
    /// `None`: `reply` was answered or will be with the close already in progress.
    pub fn close(&mut self, id: u64, how: Close, reply: Reply<()>, now: i64) -> Option<Settlement> {
        let _ = self.renew(id, now);
        let Some(lease) = self.map.get_mut(&id) else {
            let _ = reply.send(Err(not_found(id)));
            return None;
        };
        match &mut lease.phase {
            Phase::Closed { how: done } | Phase::Closing { how: done, .. } if *done != how => {
                let _ = reply.send(Err(LimiterError::FailedPrecondition(format!(
                    "the lease was already {}",
                    done.done()
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
                let amounts = match how {
                    Close::Commit => lease.delta.clone(),
                    // The adjustments were never written: give back what the acquire took.
                    Close::Rollback => lease
                        .acquired
                        .negated()
                        .expect("acquired amounts are within 0..=MAX_AMOUNT"),
                };
                let settlement = lease.settlement(&amounts);
                lease.phase = Phase::Closing {
                    how,
                    waiters: vec![reply],
                };
                if settlement.parts.is_empty() && settlement.counted.is_empty() {
                    self.settled(id, Ok(()));
                    return None;
                }
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
        let Phase::Closing { how, waiters } = std::mem::replace(&mut lease.phase, Phase::Open)
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
                if let Some(lease) = self.map.remove(&id) {
                    self.expiry.remove(&(lease.expires_ms, id));
                }
                self.forgotten.push(id);
            } else if let Some(lease) = self.map.get_mut(&id) {
                lease.phase = Phase::Closed { how };
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
        while let Some(&(expires, id)) = self.expiry.first() {
            if expires > now {
                break;
            }
            self.expiry.pop_first();
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
    pub fn next_expiry(&self) -> Option<i64> {
        self.expiry.first().map(|&(expires, _)| expires)
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

    /// Whether the table holds any lease: open, closing, or closed and kept until its time for
    /// a closer that did not hear the outcome (a repeated close must still find it).
    pub fn any(&self) -> bool {
        !self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::limit::{LimitName, MILLI};
    use crate::limiter::messages::{Answer, reply};

    const T0: i64 = 1_700_000_000_000;
    const TTL: i64 = 60_000;

    fn id(s: &str) -> EntityId {
        EntityId::new(s).unwrap()
    }

    fn tokens(pairs: &[(&str, i64)]) -> Amounts {
        Amounts::new(
            pairs
                .iter()
                .map(|(n, a)| (LimitName::new(*n).unwrap(), a * MILLI)),
        )
        .unwrap()
    }

    /// A key holding `rpm`, cascading to a project that holds `tpm`, that acquired both.
    fn lease() -> Lease {
        Lease::new(
            id("key"),
            ResourceId::new("model").unwrap(),
            vec![Limit::per_minute("rpm", 100).unwrap()],
            tokens(&[("rpm", 1), ("tpm", 500)]),
            Some(ParentSpec {
                entity: id("project"),
                limits: vec![Limit::per_minute("tpm", 10_000).unwrap()],
            }),
            false,
        )
    }

    fn table() -> Leases {
        let mut leases = Leases::new(TTL);
        leases.open(1, lease(), T0);
        leases
    }

    fn closing(leases: &mut Leases, how: Close) -> (Option<Settlement>, Answer<()>) {
        let (tx, rx) = reply();
        (leases.close(1, how, tx, T0), rx)
    }

    #[test]
    fn adjustments_stay_within_what_the_lease_took_and_its_buckets_limits() {
        let mut leases = table();
        leases.adjust(1, &tokens(&[("tpm", 250)]), T0).unwrap();
        assert!(
            matches!(
                leases.adjust(1, &tokens(&[("tpm", -751)]), T0),
                Err(LimiterError::OutOfRange { ref field, .. }) if field == "delta[tpm]"
            ),
            "a lease never gives back more than it took"
        );
        assert!(matches!(
            leases.adjust(1, &tokens(&[("xyz", 1)]), T0),
            Err(LimiterError::InvalidArgument { .. })
        ));
        let (settlement, _) = closing(&mut leases, Close::Commit);
        assert_eq!(
            settlement.unwrap().parts,
            vec![(id("project"), tokens(&[("tpm", 250)]))],
            "the refused adjustments changed nothing; tpm is the parent's share"
        );
    }

    #[test]
    fn a_rollback_gives_each_bucket_its_share_back_and_the_other_close_is_refused() {
        let mut leases = table();
        leases.adjust(1, &tokens(&[("tpm", 100)]), T0).unwrap();
        let (settlement, mut first) = closing(&mut leases, Close::Rollback);
        assert_eq!(
            settlement.unwrap().parts,
            vec![
                (id("key"), tokens(&[("rpm", -1)])),
                (id("project"), tokens(&[("tpm", -500)])),
            ],
            "the adjustments were never written: what the acquire took goes back"
        );
        let (again, mut second) = closing(&mut leases, Close::Rollback);
        assert!(
            again.is_none(),
            "a repeated close joins the one in progress"
        );
        let (other, mut refused) = closing(&mut leases, Close::Commit);
        assert!(other.is_none());
        assert!(matches!(
            refused.try_recv(),
            Ok(Err(LimiterError::FailedPrecondition(_)))
        ));
        leases.settled(1, Ok(()));
        assert!(matches!(first.try_recv(), Ok(Ok(()))));
        assert!(matches!(second.try_recv(), Ok(Ok(()))));
        assert_eq!(leases.take_forgotten(), vec![1], "heard: forgotten at once");
    }

    #[test]
    fn a_close_whose_closer_had_gone_is_kept_until_its_time_so_a_repeat_learns_the_outcome() {
        let mut leases = table();
        leases.adjust(1, &tokens(&[("rpm", 1)]), T0).unwrap();
        let (settlement, gone) = closing(&mut leases, Close::Commit);
        assert!(settlement.is_some(), "the adjustment is to be written");
        drop(gone);
        leases.settled(1, Ok(()));
        assert!(leases.take_forgotten().is_empty());
        let (none, mut repeat) = closing(&mut leases, Close::Commit);
        assert!(none.is_none());
        assert!(matches!(repeat.try_recv(), Ok(Ok(()))));
        assert_eq!(leases.expire(T0 + TTL), vec![1]);
    }

    #[test]
    fn a_lease_lives_while_its_holder_calls_and_expires_a_ttl_after_it_went_silent() {
        let mut leases = table();
        // Renewed every third of the TTL, for ten TTLs: still open.
        for step in 1..=30 {
            let now = T0 + step * TTL / 3;
            assert!(leases.expire(now).is_empty(), "open at {step}/3 TTL");
            leases.renew(1, now).unwrap();
            assert_eq!(leases.next_expiry(), Some(now + TTL));
        }
        // An adjustment renews too.
        let last = T0 + 11 * TTL;
        leases.adjust(1, &tokens(&[("rpm", 1)]), last).unwrap();
        assert!(leases.expire(last + TTL - 1).is_empty());
        // Silent for a TTL: gone, and what it took stays consumed.
        assert_eq!(leases.expire(last + TTL), vec![1]);
        assert!(matches!(
            leases.renew(1, last + TTL),
            Err(LimiterError::LeaseNotFound(_))
        ));
        assert_eq!(leases.next_expiry(), None);
    }

    #[test]
    fn an_open_lease_expires_by_the_clock_and_stays_consumed() {
        let mut leases = table();
        assert!(leases.expire(T0 + TTL - 1).is_empty());
        assert_eq!(leases.next_expiry(), Some(T0 + TTL));
        assert_eq!(leases.expire(T0 + TTL), vec![1]);
        assert!(!leases.any());
        let (settlement, mut answer) = closing(&mut leases, Close::Rollback);
        assert!(settlement.is_none(), "nothing is given back");
        assert!(matches!(
            answer.try_recv(),
            Ok(Err(LimiterError::LeaseNotFound(_)))
        ));
    }
}
