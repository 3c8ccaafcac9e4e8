//! What the handle, the registry and a consistency group's actor say to each other: the jobs the
//! handle builds ([`AcquireJob`], [`PeekJob`], a [`LeaseOp`]), the messages an actor takes
//! ([`Msg`]), how it answers ([`Reply`]), and the narrow side of the registry an actor sees
//! ([`Routes`], [`Parked`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::oneshot;

use super::types::{Decision, LimiterError, Owner};
use crate::domain::amounts::Amounts;
use crate::domain::bucket::{Bucket, LimitStatus};
use crate::domain::ids::{EntityId, Namespace, ResourceId};
use crate::domain::limit::Limit;
use crate::store::StoreError;

/// Where an actor sends the answer to one call.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, LimiterError>>;

/// Where the caller waits for it.
pub(crate) type Answer<T> = oneshot::Receiver<Result<T, LimiterError>>;

/// A reply channel: the actor's end and the caller's.
pub(crate) fn reply<T>() -> (Reply<T>, Answer<T>) {
    oneshot::channel()
}

/// A consistency group: the namespace and the root entity.
pub(crate) type GroupKey = (Namespace, EntityId);

/// The parent a cascading entity's acquire also charges, with the parent's own limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParentSpec {
    pub entity: EntityId,
    pub limits: Vec<Limit>,
}

/// An acquire, validated and resolved, on its way to its group's actor.
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
    /// The entity's own bucket is bypassed: nothing is asked of it or written to it, but its
    /// share is still counted as usage (a cascade parent is charged as usual).
    pub bypass: bool,
    pub deadline: tokio::time::Instant,
    /// Whether the caller wants a lease, and who may use it (else the acquire is committed at
    /// once).
    pub lease: Option<Owner>,
    pub reply: Reply<Decision>,
    /// The job's place in its group's bound (see [`super::registry`]).
    pub ticket: Option<Ticket>,
    /// How many writes carrying this job lost a race to another writer.
    pub races: u8,
    /// The caller's trace span (none without telemetry): the parent of the round that carries
    /// the job.
    pub span: Option<Box<tracing::Span>>,
}

impl AcquireJob {
    /// The buckets the acquire charges, each with its limits and share: its own (unless
    /// bypassed), then its cascade parent's.
    pub fn charged(&self) -> impl Iterator<Item = (&EntityId, &[Limit], &Amounts)> {
        let own = (!self.bypass).then_some((&self.entity, &self.limits[..], &self.own));
        let parent = self
            .parent
            .as_ref()
            .map(|p| (&p.entity, &p.limits[..], &self.parent_share));
        own.into_iter().chain(parent)
    }
}

/// How every limit of a bucket stands for `amounts`, without consuming.
pub(crate) struct PeekJob {
    pub entity: EntityId,
    pub resource: ResourceId,
    pub limits: Vec<Limit>,
    pub amounts: Amounts,
    pub reply: Reply<Vec<LimitStatus>>,
}

/// How a lease is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// Write the net adjustment: what it acquired stays consumed.
    Commit,
    /// Give back everything it acquired.
    Rollback,
}

impl Close {
    /// The past tense, for messages ("the lease was already committed").
    pub fn done(self) -> &'static str {
        match self {
            Self::Commit => "committed",
            Self::Rollback => "rolled back",
        }
    }
}

/// What a caller does with its lease.
pub(crate) enum LeaseOp {
    /// Records extra consumption (negative: less), written at commit.
    Adjust(Amounts),
    /// Its holder is alive: it lives `lease_ttl_ms` from now.
    Renew,
    /// Closes it, after recording these adjustments if it is still open.
    Close(Close, Amounts),
}

/// Whether a write of unknown outcome landed, with the bucket as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolution {
    pub landed: bool,
    pub current: Option<Bucket>,
}

/// What a group's actor takes.
pub(crate) enum Msg {
    Acquire(AcquireJob),
    Lease {
        id: u64,
        op: LeaseOp,
        reply: Reply<()>,
    },
    Peek(PeekJob),
    /// The store's bucket changed outside any acquire: forget its cached state.
    Refresh {
        entity: EntityId,
        resource: ResourceId,
        reply: Reply<()>,
    },
    /// A read a lane asked for finished.
    Loaded(
        ResourceId,
        Result<Vec<(EntityId, Option<Bucket>)>, StoreError>,
    ),
    /// A write a lane asked for finished (with the one bucket as stored, when the store said).
    Written(ResourceId, Result<Option<Bucket>, StoreError>),
    /// The outcome of a write whose answer was lost is known.
    Resolved(ResourceId, Result<Resolution, StoreError>),
    /// A lane's wait (commit spacing, back-off) is over.
    Wake(ResourceId),
    Tick,
    /// Settle what is owed, then stop.
    Shutdown,
}

/// An acquire's place in its group's bound (`held`, already counted); given back when dropped.
pub(crate) struct Ticket(Arc<AtomicUsize>);

impl Ticket {
    /// A place taken in `held` (the caller counted it there).
    pub fn new(held: Arc<AtomicUsize>) -> Self {
        metrics::gauge!(crate::metrics::ACQUIRES_WAITING).increment(1.0);
        Self(held)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::ACQUIRES_WAITING).decrement(1.0);
    }
}

/// What an actor may do to the registry: publish and withdraw its leases, withdraw itself.
pub(crate) trait Routes: Send + Sync + 'static {
    /// Makes a new lease of `group` routable; returns the two halves of its id (the sequence
    /// number keys the group's lease table).
    fn lease_opened(&self, group: &GroupKey, owner: Owner) -> (u64, u128);
    fn lease_closed(&self, seq: u64);
    /// Stops routing to the actor `actor` of `group` (new work spawns a fresh actor).
    fn unpublish(&self, group: &GroupKey, actor: ractor::ActorId);
    /// Replaces the idle actor `actor` of `group` with the compact record of what it cached
    /// (new work spawns a fresh actor that starts from it). Returns whether the actor may stop:
    /// `false` while a call to it is on its way (its message would be dropped unanswered).
    fn park(&self, group: &GroupKey, actor: ractor::ActorId, parked: Parked) -> bool;
}

/// What an idle group's actor leaves behind: its cached buckets, with the time each was
/// confirmed, in a record a fraction of an actor's size.
pub(crate) struct Parked {
    pub buckets: Box<[ParkedBucket]>,
    /// The clock's time of the group's last work.
    pub last_active_ms: i64,
}

pub(crate) struct ParkedBucket {
    pub resource: ResourceId,
    pub entity: EntityId,
    /// `None`: the store had no such bucket.
    pub bucket: Option<Bucket>,
    pub at_ms: i64,
}
