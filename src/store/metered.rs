//! A store decorator that counts every call and the write units it consumes, by operation and
//! outcome. The daemon wraps its store in it, so the metrics show exactly what reached the store
//! (and a rejection served from cache shows as nothing at all).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;

use super::{AuditPage, KeyedWrite, Store, StoreError};
use crate::domain::bucket::{Bucket, Write};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::Limit;
use crate::domain::records::{Actor, Entity, LimitScope, Period, Usage};
use crate::metrics::{STORE_CALLS, STORE_SECONDS, WRITE_UNITS};

/// Counts calls and write units of the store it wraps.
#[derive(Clone)]
pub struct Metered {
    inner: Arc<dyn Store>,
    /// Whether the last call failed (see [`Metered::note_state`]).
    failing: Arc<AtomicBool>,
    /// When a call last succeeded, in milliseconds since `started` (`u64::MAX`: never).
    last_ok_ms: Arc<AtomicU64>,
    started: Instant,
}

impl std::fmt::Debug for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metered")
    }
}

impl Metered {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            failing: Arc::new(AtomicBool::new(false)),
            last_ok_ms: Arc::new(AtomicU64::new(u64::MAX)),
            started: Instant::now(),
        }
    }

    /// Whether the store answered a call within the last `window` and has not failed since:
    /// the health probe needs no call of its own then (on DynamoDB Local, whose `DescribeTable`
    /// counts every item, a probe under load would hold up the writes).
    pub fn answered_within(&self, window: std::time::Duration) -> bool {
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last != u64::MAX
            && now.saturating_sub(last) <= u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
            && !self.failing.load(Ordering::Relaxed)
    }
}

impl Metered {
    fn record<T>(
        &self,
        operation: &'static str,
        started: Instant,
        units: u64,
        result: &Result<T, StoreError>,
    ) {
        metrics::histogram!(STORE_SECONDS, "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(_) => "ok",
            Err(StoreError::Conflict { .. }) => "conflict",
            Err(_) => "error",
        };
        metrics::counter!(STORE_CALLS, "operation" => operation, "outcome" => outcome).increment(1);
        // A write that reached DynamoDB is billed whether its condition held or not.
        if units > 0 && matches!(result, Ok(_) | Err(StoreError::Conflict { .. })) {
            metrics::counter!(WRITE_UNITS).increment(units);
        }
        self.note_state(result.as_ref().err());
    }

    /// Logs a change between "the store answers" and "the store fails" once, at WARN, with the
    /// cause (answers such as "already exists" or a lost condition are not failures).
    fn note_state(&self, error: Option<&StoreError>) {
        let failure = error.filter(|e| {
            matches!(
                e,
                StoreError::Transient(_) | StoreError::Backend(_) | StoreError::Corrupt(_)
            )
        });
        if failure.is_none() {
            let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.last_ok_ms.store(now, Ordering::Relaxed);
        }
        let was_failing = self.failing.swap(failure.is_some(), Ordering::Relaxed);
        match failure {
            Some(e) if !was_failing => tracing::warn!("store calls are failing: {e}"),
            None if was_failing => tracing::warn!("store calls succeed again"),
            _ => {}
        }
    }
}

#[async_trait]
impl Store for Metered {
    async fn probe(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.inner.probe().await;
        self.record("probe", started, 0, &r);
        r
    }

    async fn load_bucket(&self, key: &BucketKey) -> Result<Option<Bucket>, StoreError> {
        let started = Instant::now();
        let r = self.inner.load_bucket(key).await;
        self.record("load", started, 0, &r);
        r
    }

    async fn write_bucket(&self, key: &BucketKey, write: &Write) -> Result<Bucket, StoreError> {
        let started = Instant::now();
        let r = self.inner.write_bucket(key, write).await;
        self.record("write", started, 1, &r);
        r
    }

    async fn submit_write(
        &self,
        key: &BucketKey,
        write: &Write,
    ) -> Result<Option<Bucket>, StoreError> {
        let started = Instant::now();
        let r = self.inner.submit_write(key, write).await;
        self.record("write", started, 1, &r);
        r
    }

    async fn commit(&self, writes: &[KeyedWrite]) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.inner.commit(writes).await;
        let units = match writes {
            [_] => 1,
            many => 2 * many.len() as u64,
        };
        self.record("commit", started, units, &r);
        r
    }

    async fn create_entity(
        &self,
        ns: &Namespace,
        entity: &Entity,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.inner.create_entity(ns, entity, by).await;
        self.record("entity", started, 4, &r);
        r
    }

    async fn get_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
    ) -> Result<Option<Entity>, StoreError> {
        let started = Instant::now();
        let r = self.inner.get_entity(ns, id).await;
        self.record("entity", started, 0, &r);
        r
    }

    async fn delete_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        force: bool,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.inner.delete_entity(ns, id, force, by).await;
        self.record("entity", started, 4, &r);
        r
    }

    async fn move_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        parent: Option<&EntityId>,
        by: &Actor,
    ) -> Result<Entity, StoreError> {
        let started = Instant::now();
        let r = self.inner.move_entity(ns, id, parent, by).await;
        self.record("entity", started, 4, &r);
        r
    }

    async fn list_children(
        &self,
        ns: &Namespace,
        parent: &EntityId,
    ) -> Result<Vec<Entity>, StoreError> {
        let started = Instant::now();
        let r = self.inner.list_children(ns, parent).await;
        self.record("entity", started, 0, &r);
        r
    }

    async fn set_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        limits: &[Limit],
        by: &Actor,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.inner.set_limits(ns, scope, limits, by).await;
        self.record("limits", started, 4, &r);
        r
    }

    async fn get_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
    ) -> Result<Option<Vec<Limit>>, StoreError> {
        let started = Instant::now();
        let r = self.inner.get_limits(ns, scope).await;
        self.record("limits", started, 0, &r);
        r
    }

    async fn delete_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.inner.delete_limits(ns, scope, by).await;
        self.record("limits", started, 4, &r);
        r
    }

    async fn list_audit(
        &self,
        ns: &Namespace,
        subject: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<AuditPage, StoreError> {
        let started = Instant::now();
        let r = self.inner.list_audit(ns, subject, page_size, after).await;
        self.record("audit", started, 0, &r);
        r
    }

    async fn add_usage(&self, ns: &Namespace, usage: &[Usage]) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.inner.add_usage(ns, usage).await;
        self.record("usage", started, usage.len() as u64, &r);
        r
    }

    async fn usage(
        &self,
        ns: &Namespace,
        entity: &EntityId,
        resource: Option<&ResourceId>,
        period: Period,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Usage>, StoreError> {
        let started = Instant::now();
        let r = self
            .inner
            .usage(ns, entity, resource, period, from_ms, to_ms)
            .await;
        self.record("usage", started, 0, &r);
        r
    }

    async fn create_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.inner.create_namespace(ns).await;
        self.record("namespace", started, 1, &r);
        r
    }

    async fn list_namespaces(&self) -> Result<Vec<Namespace>, StoreError> {
        let started = Instant::now();
        let r = self.inner.list_namespaces().await;
        self.record("namespace", started, 0, &r);
        r
    }

    async fn delete_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.inner.delete_namespace(ns).await;
        self.record("namespace", started, 1, &r);
        r
    }
}
