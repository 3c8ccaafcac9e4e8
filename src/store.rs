//! The one storage trait, and its two implementations: [`memory::MemoryStore`] (embedded, the
//! default) and [`dynamodb::DynamoStore`] (authoritative, shared by many daemons).
//!
//! The trait speaks in domain terms. Bucket writes are the conditional [`Write`]s planned by the
//! pure bucket math; a store only checks their conditions atomically and applies them. A failed
//! condition comes back as [`StoreError::Conflict`] carrying the stored item as it is now, so the
//! caller can re-plan without another read. Every entity and limit change takes an [`Actor`] and
//! writes its audit record in the same atomic operation: there is never a change without its record,
//! nor a record without its change.

pub mod dynamodb;
pub mod memory;
pub mod metered;

use async_trait::async_trait;

use crate::domain::bucket::{Bucket, Write};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::Limit;
use crate::domain::records::{
    Actor, AuditEntry, Entity, FailurePolicy, Gate, LevelSettings, LimitScope, Period, Usage,
};

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A conditional write found the item changed; `current` is the item as stored now (`None`:
    /// it does not exist). `index` is the failing write's position in a commit.
    #[error("write {index} conflicted with a concurrent change")]
    Conflict {
        index: usize,
        current: Option<Box<Bucket>>,
    },
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} does not exist")]
    NotFound(String),
    /// The operation is refused in the current state (e.g. deleting an entity with children).
    #[error("{0}")]
    Refused(String),
    /// Throttling, time-outs, an unreachable endpoint: retrying later may succeed.
    #[error("store temporarily unavailable: {0}")]
    Transient(String),
    #[error("stored item is corrupt: {0}")]
    Corrupt(String),
    /// Anything else the backend refused (missing table, rejected credentials, bad request).
    #[error("{0}")]
    Backend(String),
}

impl StoreError {
    /// Whether the same call may succeed if tried again later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

/// One bucket's conditional write inside an atomic [`Store::commit`] (planned by
/// [`crate::domain::bucket::plan`] or [`crate::domain::bucket::plan_settle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedWrite {
    pub key: BucketKey,
    pub write: Write,
}

/// An operation done at most once per key ([`Store::operate_bucket`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Once {
    /// The caller's key, unique per (namespace, entity).
    pub key: String,
    /// What a later call with the same key gets back: the first call's outcome.
    pub outcome: String,
    /// Until when the key is remembered (ms since the epoch).
    pub until_ms: i64,
}

/// One page of audit records, newest first; `next` continues after the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    pub next: Option<String>,
}

/// The storage operations the limiter needs. Object-safe: the daemon picks a backend at run time.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Checks that the store can serve: for DynamoDB, that the table exists and is active. A
    /// store that cannot fail (the embedded one) is always ready.
    async fn probe(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Reads one bucket (`None` if it was never created).
    async fn load_bucket(&self, key: &BucketKey) -> Result<Option<Bucket>, StoreError>;

    /// Applies one conditional write and returns the bucket as stored after it.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] with the current item when a condition fails (a create that finds
    /// the bucket already there included).
    async fn write_bucket(&self, key: &BucketKey, write: &Write) -> Result<Bucket, StoreError>;

    /// Applies one conditional write like [`Store::write_bucket`], letting the backend send it
    /// together with other writes of the moment (DynamoDB: one `BatchExecuteStatement` carries up
    /// to 25, each applied or refused on its own). Returns the bucket as stored after it when the
    /// backend answered with it; `None` when it only said the write applied (the caller knows
    /// the bucket as planned).
    ///
    /// # Errors
    /// As [`Store::write_bucket`].
    async fn submit_write(
        &self,
        key: &BucketKey,
        write: &Write,
    ) -> Result<Option<Bucket>, StoreError> {
        self.write_bucket(key, write).await.map(Some)
    }

    /// Applies several bucket writes all or nothing (each bucket at most once).
    ///
    /// # Errors
    /// [`StoreError::Conflict`] naming the first failing write; nothing is applied.
    async fn commit(&self, writes: &[KeyedWrite]) -> Result<(), StoreError>;

    /// Applies an operator's change to one bucket (`write`; `None`: there is nothing to write)
    /// with its audit record `entry`, all or nothing. With `once`, only if its key is not in use
    /// on the entity (never used, or remembered no longer than `until_ms` of its first use, as of
    /// `entry.at_ms`): then the key is stored with its outcome in the same atomic operation. A key
    /// in use writes nothing and returns the outcome stored with it.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] (index 0) with the bucket as stored now when `write`'s condition
    /// fails; nothing is applied.
    async fn operate_bucket(
        &self,
        key: &BucketKey,
        write: Option<&Write>,
        entry: &AuditEntry,
        once: Option<&Once>,
    ) -> Result<Option<String>, StoreError>;

    /// Every stored bucket on `resource`, with its entity, in entity order. DynamoDB has no index
    /// of buckets (a bucket write is billed once), so it scans the table: for reports, not for a
    /// request's path.
    async fn resource_buckets(
        &self,
        ns: &Namespace,
        resource: &ResourceId,
    ) -> Result<Vec<(EntityId, Bucket)>, StoreError>;

    /// # Errors
    /// [`StoreError::AlreadyExists`] when an entity with this id exists.
    async fn create_entity(
        &self,
        ns: &Namespace,
        entity: &Entity,
        by: &Actor,
    ) -> Result<(), StoreError>;

    async fn get_entity(&self, ns: &Namespace, id: &EntityId)
    -> Result<Option<Entity>, StoreError>;

    /// Several entities in one go (DynamoDB: `BatchGetItem`, up to 100 keys a call, strongly
    /// consistent): the answer has one place per id, in order (`None` where there is none). An id
    /// may repeat.
    async fn get_entities(
        &self,
        ns: &Namespace,
        ids: &[EntityId],
    ) -> Result<Vec<Option<Entity>>, StoreError>;

    /// Deletes an entity with its buckets and its entity-level stored limits (its audit records
    /// and usage snapshots stay). Refused while it has children, unless `force` (the children
    /// then keep a parent that no longer exists).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when there is no such entity; [`StoreError::Refused`] when it has
    /// children and `force` is off.
    async fn delete_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        force: bool,
        by: &Actor,
    ) -> Result<(), StoreError>;

    /// Gives an entity another parent (or none); returns it as it is now.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when there is no such entity.
    async fn move_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        parent: Option<&EntityId>,
        by: &Actor,
    ) -> Result<Entity, StoreError>;

    /// The entities whose parent is `parent`, ordered by id.
    async fn list_children(
        &self,
        ns: &Namespace,
        parent: &EntityId,
    ) -> Result<Vec<Entity>, StoreError>;

    /// Replaces the limit set stored at `scope` (`limits` in canonical order).
    async fn set_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        limits: &[Limit],
        by: &Actor,
    ) -> Result<(), StoreError>;

    async fn get_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
    ) -> Result<Option<Vec<Limit>>, StoreError>;

    /// Entities with limits stored for `resource` (at the entity + resource level), in id order,
    /// up to `page_size` after the id `after`; with the page's last id when more may follow.
    /// DynamoDB reads an index, so a change is listed within a moment, not at once.
    async fn list_entities_with_limits(
        &self,
        ns: &Namespace,
        resource: &ResourceId,
        page_size: usize,
        after: Option<&EntityId>,
    ) -> Result<(Vec<EntityId>, Option<EntityId>), StoreError>;

    /// Resources with default limits stored (the resource level), in order (from an index on
    /// DynamoDB, as [`Store::list_entities_with_limits`]).
    async fn list_resources_with_defaults(
        &self,
        ns: &Namespace,
    ) -> Result<Vec<ResourceId>, StoreError>;

    /// # Errors
    /// [`StoreError::NotFound`] when nothing is stored at `scope`.
    async fn delete_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        by: &Actor,
    ) -> Result<(), StoreError>;

    /// The settings stored at `scopes` (entity + resource, entity, resource levels: gates and
    /// cascade policies), one place per scope in order, in one read (DynamoDB: `BatchGetItem`,
    /// strongly consistent).
    async fn get_level_settings(
        &self,
        ns: &Namespace,
        scopes: &[LimitScope],
    ) -> Result<Vec<LevelSettings>, StoreError>;

    /// Stores the gate at `scope` (`None`: clears it), audited on the scope's subject.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when clearing a gate that is not set.
    async fn set_gate(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        gate: Option<Gate>,
        by: &Actor,
    ) -> Result<(), StoreError>;

    /// Stores the cascade policy at `scope` (`None`: clears it), audited on the scope's subject.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when clearing a policy that is not set.
    async fn set_cascade(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        cascade: Option<bool>,
        by: &Actor,
    ) -> Result<(), StoreError>;

    /// The namespace's stored failure policy (what a call that gives none does when the store
    /// cannot answer), if one is stored.
    async fn get_failure_policy(&self, ns: &Namespace)
    -> Result<Option<FailurePolicy>, StoreError>;

    /// Stores the namespace's failure policy (`None`: removes it, so the daemon's applies),
    /// audited on the system subject.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when removing a policy that is not stored.
    async fn set_failure_policy(
        &self,
        ns: &Namespace,
        policy: Option<FailurePolicy>,
        by: &Actor,
    ) -> Result<(), StoreError>;

    /// Audit records of `subject` (an entity id, or [`LimitScope::audit_subject`]), newest first.
    async fn list_audit(
        &self,
        ns: &Namespace,
        subject: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<AuditPage, StoreError>;

    /// Registers a namespace (idempotent: registering it again is no error).
    async fn create_namespace(&self, ns: &Namespace) -> Result<(), StoreError>;

    /// The registered namespaces, in order.
    async fn list_namespaces(&self) -> Result<Vec<Namespace>, StoreError>;

    /// Removes a namespace and everything in it: entities, limits, buckets, audit records and
    /// usage snapshots. Not atomic: on DynamoDB it scans the table and deletes item by item.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when the namespace is not registered.
    async fn delete_namespace(&self, ns: &Namespace) -> Result<(), StoreError>;

    /// Adds consumption to usage snapshots. Additions commute, so several daemons flushing the
    /// same snapshot add up.
    async fn add_usage(&self, ns: &Namespace, usage: &[Usage]) -> Result<(), StoreError>;

    /// A page of the usage snapshots `query` asks for: of an entity (one resource, or all), or of
    /// one resource across entities; of one period or both; starting in `from_ms..to_ms`.
    ///
    async fn usage(&self, ns: &Namespace, query: &UsageQuery<'_>) -> Result<UsagePage, StoreError>;
}

/// Which usage snapshots to list (see [`Store::usage`]): at least an entity or a resource.
#[derive(Debug, Clone, Copy)]
pub struct UsageQuery<'a> {
    pub entity: Option<&'a EntityId>,
    pub resource: Option<&'a ResourceId>,
    /// `None`: hourly and daily.
    pub period: Option<Period>,
    pub from_ms: i64,
    pub to_ms: i64,
    /// How many snapshots a page reads (it holds at most that many: on DynamoDB fewer, after
    /// the filters, as a `Limit` counts what is read).
    pub page_size: usize,
    /// Where the page before ended.
    pub page: Option<&'a UsageCursor>,
}

impl UsageQuery<'_> {
    pub fn matches(&self, u: &Usage) -> bool {
        self.entity.is_none_or(|e| *e == u.entity)
            && self.resource.is_none_or(|r| *r == u.resource)
            && self.period.is_none_or(|p| p == u.period)
            && (self.from_ms..self.to_ms).contains(&u.start_ms)
    }
}

/// A page of usage snapshots; `next` (absent on the last) continues it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsagePage {
    pub snapshots: Vec<Usage>,
    pub next: Option<UsageCursor>,
}

/// Where a usage listing stopped, in the store's own terms (on DynamoDB the last key read,
/// whatever item it was); its token is what callers pass back for the next page.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UsageCursor {
    pub partition: String,
    pub sort: String,
}

impl UsageCursor {
    pub fn token(&self) -> String {
        serde_json::json!([self.partition, self.sort]).to_string()
    }

    /// # Errors
    /// What is wrong with a token no listing gave.
    pub fn parse(token: &str) -> Result<Self, String> {
        let (partition, sort): (String, String) =
            serde_json::from_str(token).map_err(|e| format!("not a usage page token: {e}"))?;
        Ok(Self { partition, sort })
    }
}

/// A sort key for an audit record: time first (so a query can return newest first), then this
/// process's sequence (records one daemon makes in the same millisecond keep their order), then a
/// random salt so that records of several daemons never overwrite each other.
pub(crate) fn audit_sort_key(at_ms: i64) -> String {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let salt = RandomState::new().hash_one(seq) & 0xffff_ffff;
    // The sequence's low 32 bits: they order one daemon's records within a millisecond.
    format!("{:020}#{:08x}{salt:08x}", at_ms.max(0), seq & 0xffff_ffff)
}

pub(crate) fn entity_json(entity: &Entity) -> String {
    serde_json::to_string(entity).expect("entities always serialize: strings and maps only")
}
