//! Shared test set-up: stores to run the conformance suite against, unique namespaces, daemons.
#![allow(dead_code)]

pub mod daemon;
pub mod manifest;
pub mod proxy;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use zae_limiter::Namespace;
use zae_limiter::store::Store;
use zae_limiter::store::dynamodb::{DynamoSettings, DynamoStore, table};
use zae_limiter::store::memory::MemoryStore;

/// A raw gRPC acquire of 1 `rpm` (1,000 a minute) of `entity` on `gpt-4`, held as a lease.
pub fn acquire_request(entity: &str) -> zae_limiter::proto::AcquireRequest {
    zae_limiter::proto::AcquireRequest {
        entity_id: entity.into(),
        resource: "gpt-4".into(),
        consume: [("rpm".to_owned(), 1)].into(),
        limits: vec![zae_limiter::proto::Limit {
            name: "rpm".into(),
            capacity: 1_000,
            refill_amount: 1_000,
            refill_period_ms: 60_000,
            soft: false,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The table every DynamoDB test shares; tests isolate themselves by namespace.
pub const TEST_TABLE: &str = "zae-limiter-tests";

/// The DynamoDB Local endpoint that `scripts/test.sh` starts.
pub fn endpoint() -> String {
    std::env::var("ZAE_TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "ZAE_TEST_DYNAMODB_ENDPOINT is not set: run the suite with scripts/test.sh, which \
             starts DynamoDB Local and sets it"
        )
    })
}

/// A daemon configuration on the test table of DynamoDB Local (`endpoint`), in namespace `ns`;
/// `limiter` is added to the `[limiter]` section, and anything after the result goes into
/// `[dynamodb]`.
pub fn dynamodb_config(ns: &Namespace, endpoint: &str, limiter: &str) -> String {
    format!(
        "[limiter]\nbackend = \"dynamodb\"\nnamespaces = [\"{ns}\"]\n{limiter}\n\
         [dynamodb]\ntable = \"{TEST_TABLE}\"\nendpoint_url = \"{endpoint}\"\n"
    )
}

pub fn settings(table: &str) -> DynamoSettings {
    let mut s = DynamoSettings::new(table);
    s.endpoint_url = Some(endpoint());
    s.credentials = Some(("local".into(), "local".into()));
    s
}

/// A namespace no other test (or earlier run against the same DynamoDB Local) uses.
pub fn unique_namespace() -> Namespace {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    Namespace::new(format!("t{:x}-{}-{seq}", nanos, std::process::id())).unwrap()
}

pub fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

pub async fn dynamodb() -> Arc<dyn Store> {
    let settings = settings(TEST_TABLE);
    table::deploy(&settings.client().await, TEST_TABLE)
        .await
        .expect("deploy the test table on DynamoDB Local");
    Arc::new(DynamoStore::connect(&settings).await)
}

/// A store that counts the calls it passes on, to show which paths touch the store; it can also
/// slow bucket writes down (applying them only after the delay) and fail the next ones.
pub struct Counting {
    pub inner: Arc<dyn Store>,
    pub loads: AtomicU64,
    pub writes: AtomicU64,
    /// Look-ups: entities, stored limits, the namespace registry.
    pub lookups: AtomicU64,
    /// Entities read one at a time.
    pub entity_reads: AtomicU64,
    /// The number of ids of each call that read several entities (once it answered).
    pub entity_batches: std::sync::Mutex<Vec<usize>>,
    /// Milliseconds each bucket write waits before it is applied.
    pub write_delay_ms: AtomicU64,
    /// How many of the next bucket writes and loads fail (transiently, applying nothing).
    pub failures: AtomicU64,
    /// Milliseconds each usage snapshot addition waits before it is applied.
    pub usage_delay_ms: AtomicU64,
    /// Usage snapshot additions started.
    pub usage_adds: AtomicU64,
    /// How many of the next usage snapshot additions fail (transiently, after the usage delay,
    /// adding nothing).
    pub usage_failures: AtomicU64,
    /// Milliseconds each look-up (entity, stored limits, namespace registry) waits.
    pub lookup_delay_ms: AtomicU64,
    /// Another daemon that writes the bucket just before each bucket write of this store.
    pub rival: std::sync::Mutex<Option<Rival>>,
}

/// Another daemon on the same bucket, quicker than the one under test: before each of its
/// writes, the rival consumes `amounts` (refilling to the clock's time, as any writer does), and
/// then the clock moves on by `step_ms`, so a refill is due again when the loser re-plans.
#[derive(Clone)]
pub struct Rival {
    pub key: zae_limiter::BucketKey,
    pub limits: Vec<zae_limiter::Limit>,
    pub amounts: zae_limiter::domain::amounts::Amounts,
    pub clock: Arc<zae_limiter::clock::ManualClock>,
    pub step_ms: i64,
    /// How many rival writes were admitted.
    pub admitted: Arc<AtomicU64>,
}

impl Rival {
    async fn write(&self, store: &dyn Store) {
        use zae_limiter::clock::Clock;
        use zae_limiter::consume::{Outcome, Seen, consume};
        let now = self.clock.now_ms();
        let outcome = consume(
            store,
            &self.key,
            &self.limits,
            &self.amounts,
            now,
            Seen::Unread,
        )
        .await
        .expect("the rival's write");
        if matches!(outcome, Outcome::Admitted { .. }) {
            self.admitted.fetch_add(1, Ordering::SeqCst);
        }
        self.clock.advance(self.step_ms);
    }
}

impl Counting {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            loads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            lookups: AtomicU64::new(0),
            entity_reads: AtomicU64::new(0),
            entity_batches: std::sync::Mutex::new(Vec::new()),
            write_delay_ms: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            usage_delay_ms: AtomicU64::new(0),
            usage_adds: AtomicU64::new(0),
            usage_failures: AtomicU64::new(0),
            rival: std::sync::Mutex::new(None),
            lookup_delay_ms: AtomicU64::new(0),
        }
    }

    /// Counts a look-up and waits out the look-up delay.
    async fn lookup(&self) {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let delay = self.lookup_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
    }

    /// The rival's write, if one is set, before a bucket write of this store.
    async fn rival_first(&self) {
        let rival = self.rival.lock().unwrap().clone();
        if let Some(rival) = rival {
            rival.write(&*self.inner).await;
        }
    }

    /// Whether this call is one of those that fail; waits out the write delay first for writes.
    async fn fault(&self, write: bool) -> Result<(), zae_limiter::StoreError> {
        if write {
            let delay = self.write_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            }
        }
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(zae_limiter::StoreError::Transient(
                "injected failure".into(),
            ));
        }
        Ok(())
    }

    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::SeqCst)
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::SeqCst)
    }
}

mod counting {
    use std::sync::atomic::Ordering;

    use async_trait::async_trait;
    use zae_limiter::domain::bucket::{Bucket, Write};
    use zae_limiter::domain::records::{
        Actor, AuditEntry, Entity, FailurePolicy, Gate, LevelSettings, LimitScope, Usage,
    };
    use zae_limiter::store::{
        AuditPage, KeyedWrite, Once, Store, StoreError, UsagePage, UsageQuery,
    };
    use zae_limiter::{BucketKey, EntityId, Limit, Namespace, ResourceId};

    use super::Counting;

    #[async_trait]
    impl Store for Counting {
        async fn load_bucket(&self, key: &BucketKey) -> Result<Option<Bucket>, StoreError> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            self.fault(false).await?;
            self.inner.load_bucket(key).await
        }
        async fn write_bucket(&self, key: &BucketKey, write: &Write) -> Result<Bucket, StoreError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.fault(true).await?;
            self.rival_first().await;
            self.inner.write_bucket(key, write).await
        }
        async fn commit(&self, writes: &[KeyedWrite]) -> Result<(), StoreError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.fault(true).await?;
            self.rival_first().await;
            self.inner.commit(writes).await
        }
        async fn resource_buckets(
            &self,
            ns: &Namespace,
            resource: &ResourceId,
        ) -> Result<Vec<(EntityId, Bucket)>, StoreError> {
            self.inner.resource_buckets(ns, resource).await
        }
        async fn list_entities_with_limits(
            &self,
            ns: &Namespace,
            resource: &ResourceId,
            page_size: usize,
            after: Option<&EntityId>,
        ) -> Result<(Vec<EntityId>, Option<EntityId>), StoreError> {
            self.inner
                .list_entities_with_limits(ns, resource, page_size, after)
                .await
        }
        async fn list_resources_with_defaults(
            &self,
            ns: &Namespace,
        ) -> Result<Vec<ResourceId>, StoreError> {
            self.inner.list_resources_with_defaults(ns).await
        }
        async fn operate_bucket(
            &self,
            key: &BucketKey,
            write: Option<&Write>,
            entry: &AuditEntry,
            once: Option<&Once>,
        ) -> Result<Option<String>, StoreError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.fault(true).await?;
            self.rival_first().await;
            self.inner.operate_bucket(key, write, entry, once).await
        }
        async fn create_entity(
            &self,
            ns: &Namespace,
            e: &Entity,
            by: &Actor,
        ) -> Result<(), StoreError> {
            self.inner.create_entity(ns, e, by).await
        }
        async fn get_entity(
            &self,
            ns: &Namespace,
            id: &EntityId,
        ) -> Result<Option<Entity>, StoreError> {
            self.lookup().await;
            self.entity_reads.fetch_add(1, Ordering::SeqCst);
            self.inner.get_entity(ns, id).await
        }
        async fn get_entities(
            &self,
            ns: &Namespace,
            ids: &[EntityId],
        ) -> Result<Vec<Option<Entity>>, StoreError> {
            self.lookup().await;
            let found = self.inner.get_entities(ns, ids).await;
            self.entity_batches.lock().unwrap().push(ids.len());
            found
        }
        async fn delete_entity(
            &self,
            ns: &Namespace,
            id: &EntityId,
            force: bool,
            by: &Actor,
        ) -> Result<(), StoreError> {
            self.inner.delete_entity(ns, id, force, by).await
        }
        async fn move_entity(
            &self,
            ns: &Namespace,
            id: &EntityId,
            parent: Option<&EntityId>,
            by: &Actor,
        ) -> Result<Entity, StoreError> {
            self.inner.move_entity(ns, id, parent, by).await
        }
        async fn list_children(
            &self,
            ns: &Namespace,
            p: &EntityId,
        ) -> Result<Vec<Entity>, StoreError> {
            self.inner.list_children(ns, p).await
        }
        async fn set_limits(
            &self,
            ns: &Namespace,
            scope: &LimitScope,
            limits: &[Limit],
            by: &Actor,
        ) -> Result<(), StoreError> {
            self.inner.set_limits(ns, scope, limits, by).await
        }
        async fn get_limits(
            &self,
            ns: &Namespace,
            scope: &LimitScope,
        ) -> Result<Option<Vec<Limit>>, StoreError> {
            self.lookup().await;
            self.inner.get_limits(ns, scope).await
        }
        async fn delete_limits(
            &self,
            ns: &Namespace,
            scope: &LimitScope,
            by: &Actor,
        ) -> Result<(), StoreError> {
            self.inner.delete_limits(ns, scope, by).await
        }
        async fn get_level_settings(
            &self,
            ns: &Namespace,
            scopes: &[LimitScope],
        ) -> Result<Vec<LevelSettings>, StoreError> {
            self.lookup().await;
            self.inner.get_level_settings(ns, scopes).await
        }
        async fn set_gate(
            &self,
            ns: &Namespace,
            scope: &LimitScope,
            gate: Option<Gate>,
            by: &Actor,
        ) -> Result<(), StoreError> {
            self.inner.set_gate(ns, scope, gate, by).await
        }
        async fn set_cascade(
            &self,
            ns: &Namespace,
            scope: &LimitScope,
            cascade: Option<bool>,
            by: &Actor,
        ) -> Result<(), StoreError> {
            self.inner.set_cascade(ns, scope, cascade, by).await
        }
        async fn get_failure_policy(
            &self,
            ns: &Namespace,
        ) -> Result<Option<FailurePolicy>, StoreError> {
            // Not a look-up a decision waits for (read in the background): not counted.
            self.inner.get_failure_policy(ns).await
        }
        async fn set_failure_policy(
            &self,
            ns: &Namespace,
            policy: Option<FailurePolicy>,
            by: &Actor,
        ) -> Result<(), StoreError> {
            self.inner.set_failure_policy(ns, policy, by).await
        }
        async fn list_audit(
            &self,
            ns: &Namespace,
            subject: &str,
            page_size: usize,
            after: Option<&str>,
        ) -> Result<AuditPage, StoreError> {
            self.inner.list_audit(ns, subject, page_size, after).await
        }
        async fn create_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
            self.inner.create_namespace(ns).await
        }
        async fn list_namespaces(&self) -> Result<Vec<Namespace>, StoreError> {
            self.lookup().await;
            self.inner.list_namespaces().await
        }
        async fn delete_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
            self.inner.delete_namespace(ns).await
        }
        async fn add_usage(&self, ns: &Namespace, usage: &[Usage]) -> Result<(), StoreError> {
            self.usage_adds.fetch_add(1, Ordering::SeqCst);
            let delay = self.usage_delay_ms.load(Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            let failing = self
                .usage_failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(StoreError::Transient("injected usage failure".into()));
            }
            self.inner.add_usage(ns, usage).await
        }
        async fn usage(
            &self,
            ns: &Namespace,
            query: &UsageQuery<'_>,
        ) -> Result<UsagePage, StoreError> {
            self.inner.usage(ns, query).await
        }
    }
}

/// Every usage snapshot of an entity, page after page (as the store listed them before pages).
#[async_trait::async_trait]
pub trait UsageOf {
    async fn usage_of(
        &self,
        ns: &Namespace,
        entity: &zae_limiter::EntityId,
        resource: Option<&zae_limiter::ResourceId>,
        period: zae_limiter::domain::records::Period,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<zae_limiter::domain::records::Usage>, zae_limiter::StoreError>;
}

#[async_trait::async_trait]
impl<T: Store + ?Sized> UsageOf for T {
    async fn usage_of(
        &self,
        ns: &Namespace,
        entity: &zae_limiter::EntityId,
        resource: Option<&zae_limiter::ResourceId>,
        period: zae_limiter::domain::records::Period,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<zae_limiter::domain::records::Usage>, zae_limiter::StoreError> {
        let mut all = Vec::new();
        let mut page = None;
        loop {
            let query = zae_limiter::store::UsageQuery {
                entity: Some(entity),
                resource,
                period: Some(period),
                from_ms,
                to_ms,
                page_size: 7,
                page: page.as_ref(),
            };
            let found = self.usage(ns, &query).await?;
            all.extend(found.snapshots);
            match found.next {
                Some(next) => page = Some(next),
                None => return Ok(all),
            }
        }
    }
}
