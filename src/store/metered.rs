//! A store decorator that counts every call and the write units it consumes, by operation and
//! outcome. The daemon wraps its store in it, so the metrics show exactly what reached the store
//! (and a rejection served from cache shows as nothing at all).

use std::sync::Arc;

use async_trait::async_trait;

use super::{AuditPage, KeyedWrite, Store, StoreError};
use crate::domain::bucket::{Bucket, Write};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::Limit;
use crate::domain::records::{Actor, Entity, LimitScope, Period, Usage};
use crate::metrics::{STORE_CALLS, WRITE_UNITS};

/// Counts calls and write units of the store it wraps.
#[derive(Clone)]
pub struct Metered {
    inner: Arc<dyn Store>,
}

impl std::fmt::Debug for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metered")
    }
}

impl Metered {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner }
    }
}

fn record<T>(operation: &'static str, units: u64, result: &Result<T, StoreError>) {
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
}

#[async_trait]
impl Store for Metered {
    async fn load_bucket(&self, key: &BucketKey) -> Result<Option<Bucket>, StoreError> {
        let r = self.inner.load_bucket(key).await;
        record("load", 0, &r);
        r
    }

    async fn write_bucket(&self, key: &BucketKey, write: &Write) -> Result<Bucket, StoreError> {
        let r = self.inner.write_bucket(key, write).await;
        record("write", 1, &r);
        r
    }

    async fn commit(&self, writes: &[KeyedWrite]) -> Result<(), StoreError> {
        let r = self.inner.commit(writes).await;
        let units = match writes {
            [_] => 1,
            many => 2 * many.len() as u64,
        };
        record("commit", units, &r);
        r
    }

    async fn create_entity(
        &self,
        ns: &Namespace,
        entity: &Entity,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let r = self.inner.create_entity(ns, entity, by).await;
        record("entity", 4, &r);
        r
    }

    async fn get_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
    ) -> Result<Option<Entity>, StoreError> {
        let r = self.inner.get_entity(ns, id).await;
        record("entity", 0, &r);
        r
    }

    async fn delete_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        force: bool,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let r = self.inner.delete_entity(ns, id, force, by).await;
        record("entity", 4, &r);
        r
    }

    async fn move_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        parent: Option<&EntityId>,
        by: &Actor,
    ) -> Result<Entity, StoreError> {
        let r = self.inner.move_entity(ns, id, parent, by).await;
        record("entity", 4, &r);
        r
    }

    async fn list_children(
        &self,
        ns: &Namespace,
        parent: &EntityId,
    ) -> Result<Vec<Entity>, StoreError> {
        let r = self.inner.list_children(ns, parent).await;
        record("entity", 0, &r);
        r
    }

    async fn set_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        limits: &[Limit],
        by: &Actor,
    ) -> Result<(), StoreError> {
        let r = self.inner.set_limits(ns, scope, limits, by).await;
        record("limits", 4, &r);
        r
    }

    async fn get_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
    ) -> Result<Option<Vec<Limit>>, StoreError> {
        let r = self.inner.get_limits(ns, scope).await;
        record("limits", 0, &r);
        r
    }

    async fn delete_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let r = self.inner.delete_limits(ns, scope, by).await;
        record("limits", 4, &r);
        r
    }

    async fn list_audit(
        &self,
        ns: &Namespace,
        subject: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<AuditPage, StoreError> {
        let r = self.inner.list_audit(ns, subject, page_size, after).await;
        record("audit", 0, &r);
        r
    }

    async fn add_usage(&self, ns: &Namespace, usage: &[Usage]) -> Result<(), StoreError> {
        let r = self.inner.add_usage(ns, usage).await;
        record("usage", usage.len() as u64, &r);
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
        let r = self
            .inner
            .usage(ns, entity, resource, period, from_ms, to_ms)
            .await;
        record("usage", 0, &r);
        r
    }

    async fn create_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        let r = self.inner.create_namespace(ns).await;
        record("namespace", 1, &r);
        r
    }

    async fn list_namespaces(&self) -> Result<Vec<Namespace>, StoreError> {
        let r = self.inner.list_namespaces().await;
        record("namespace", 0, &r);
        r
    }

    async fn delete_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        let r = self.inner.delete_namespace(ns).await;
        record("namespace", 1, &r);
        r
    }
}
