//! A store decorator that counts every call and the write units it consumes, by operation and
//! outcome. The daemon wraps its store in it, so the metrics show exactly what reached the store
//! (and a rejection served from cache shows as nothing at all).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use tracing::Instrument;

use super::{AuditPage, KeyedWrite, Once, Store, StoreError, UsagePage, UsageQuery};
use crate::domain::bucket::{Bucket, Write};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::Limit;
use crate::domain::records::{
    Actor, AuditEntry, Entity, FailurePolicy, Gate, LevelSettings, LimitScope, Usage,
};
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
    /// Runs one store call in its trace span (operation, items, write units; then its outcome
    /// and conflicts), and counts it.
    async fn call<T>(
        &self,
        operation: &'static str,
        items: usize,
        units: u64,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let span = match crate::telemetry::traced() {
            true => tracing::trace_span!(
            target: crate::telemetry::TARGET,
            "store",
            otel.name = span_name(operation),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            store.operation = operation,
            store.items = i64::try_from(items).unwrap_or(i64::MAX),
            store.write_units = i64::try_from(units).unwrap_or(i64::MAX),
            store.outcome = tracing::field::Empty,
            store.conflicts = tracing::field::Empty,
            ),
            // Only under a traced call: a background call (flush, probe) starts no trace.
            false => tracing::Span::none(),
        };
        let started = Instant::now();
        let r = call.instrument(span.clone()).await;
        let outcome = self.record(operation, started, units, &r);
        if !span.is_disabled() {
            span.record("store.outcome", outcome);
            span.record("store.conflicts", i64::from(outcome == "conflict"));
            if outcome == "error" {
                span.record("otel.status_code", "ERROR");
            }
        }
        r
    }

    fn record<T>(
        &self,
        operation: &'static str,
        started: Instant,
        units: u64,
        result: &Result<T, StoreError>,
    ) -> &'static str {
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
        outcome
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

/// A store call's span name, by operation (as the metrics' `operation` label).
fn span_name(operation: &'static str) -> &'static str {
    match operation {
        "probe" => "store probe",
        "load" => "store load",
        "write" => "store write",
        "commit" => "store commit",
        "entity" => "store entity",
        "limits" => "store limits",
        "audit" => "store audit",
        "usage" => "store usage",
        "namespace" => "store namespace",
        _ => "store call",
    }
}

#[async_trait]
impl Store for Metered {
    async fn probe(&self) -> Result<(), StoreError> {
        self.call("probe", 1, 0, self.inner.probe()).await
    }

    async fn load_bucket(&self, key: &BucketKey) -> Result<Option<Bucket>, StoreError> {
        self.call("load", 1, 0, self.inner.load_bucket(key)).await
    }

    async fn write_bucket(&self, key: &BucketKey, write: &Write) -> Result<Bucket, StoreError> {
        self.call("write", 1, 1, self.inner.write_bucket(key, write))
            .await
    }

    async fn submit_write(
        &self,
        key: &BucketKey,
        write: &Write,
    ) -> Result<Option<Bucket>, StoreError> {
        self.call("write", 1, 1, self.inner.submit_write(key, write))
            .await
    }

    async fn commit(&self, writes: &[KeyedWrite]) -> Result<(), StoreError> {
        let units = match writes {
            [_] => 1,
            many => 2 * many.len() as u64,
        };
        self.call("commit", writes.len(), units, self.inner.commit(writes))
            .await
    }

    async fn resource_buckets(
        &self,
        ns: &Namespace,
        resource: &ResourceId,
    ) -> Result<Vec<(EntityId, Bucket)>, StoreError> {
        self.call("load", 1, 0, self.inner.resource_buckets(ns, resource))
            .await
    }

    async fn list_entities_with_limits(
        &self,
        ns: &Namespace,
        resource: &ResourceId,
        page_size: usize,
        after: Option<&EntityId>,
    ) -> Result<(Vec<EntityId>, Option<EntityId>), StoreError> {
        let call = self
            .inner
            .list_entities_with_limits(ns, resource, page_size, after);
        self.call("limits", 1, 0, call).await
    }

    async fn list_resources_with_defaults(
        &self,
        ns: &Namespace,
    ) -> Result<Vec<ResourceId>, StoreError> {
        let call = self.inner.list_resources_with_defaults(ns);
        self.call("limits", 1, 0, call).await
    }

    async fn operate_bucket(
        &self,
        key: &BucketKey,
        write: Option<&Write>,
        entry: &AuditEntry,
        once: Option<&Once>,
    ) -> Result<Option<String>, StoreError> {
        // A transaction of the bucket, its audit record and the key: two units each.
        let items = 1 + usize::from(write.is_some()) + usize::from(once.is_some());
        let call = self.inner.operate_bucket(key, write, entry, once);
        self.call("commit", items, 2 * items as u64, call).await
    }

    async fn create_entity(
        &self,
        ns: &Namespace,
        entity: &Entity,
        by: &Actor,
    ) -> Result<(), StoreError> {
        self.call("entity", 1, 4, self.inner.create_entity(ns, entity, by))
            .await
    }

    async fn get_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
    ) -> Result<Option<Entity>, StoreError> {
        self.call("entity", 1, 0, self.inner.get_entity(ns, id))
            .await
    }

    async fn get_entities(
        &self,
        ns: &Namespace,
        ids: &[EntityId],
    ) -> Result<Vec<Option<Entity>>, StoreError> {
        self.call("entity", ids.len(), 0, self.inner.get_entities(ns, ids))
            .await
    }

    async fn delete_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        force: bool,
        by: &Actor,
    ) -> Result<(), StoreError> {
        self.call("entity", 1, 4, self.inner.delete_entity(ns, id, force, by))
            .await
    }

    async fn move_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        parent: Option<&EntityId>,
        by: &Actor,
    ) -> Result<Entity, StoreError> {
        self.call("entity", 1, 4, self.inner.move_entity(ns, id, parent, by))
            .await
    }

    async fn list_children(
        &self,
        ns: &Namespace,
        parent: &EntityId,
    ) -> Result<Vec<Entity>, StoreError> {
        self.call("entity", 1, 0, self.inner.list_children(ns, parent))
            .await
    }

    async fn set_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        limits: &[Limit],
        by: &Actor,
    ) -> Result<(), StoreError> {
        self.call("limits", 1, 4, self.inner.set_limits(ns, scope, limits, by))
            .await
    }

    async fn get_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
    ) -> Result<Option<Vec<Limit>>, StoreError> {
        self.call("limits", 1, 0, self.inner.get_limits(ns, scope))
            .await
    }

    async fn delete_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        by: &Actor,
    ) -> Result<(), StoreError> {
        self.call("limits", 1, 4, self.inner.delete_limits(ns, scope, by))
            .await
    }

    async fn get_level_settings(
        &self,
        ns: &Namespace,
        scopes: &[LimitScope],
    ) -> Result<Vec<LevelSettings>, StoreError> {
        let read = self.inner.get_level_settings(ns, scopes);
        self.call("limits", 2 * scopes.len(), 0, read).await
    }

    async fn set_gate(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        gate: Option<Gate>,
        by: &Actor,
    ) -> Result<(), StoreError> {
        self.call("limits", 1, 4, self.inner.set_gate(ns, scope, gate, by))
            .await
    }

    async fn set_cascade(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        cascade: Option<bool>,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let write = self.inner.set_cascade(ns, scope, cascade, by);
        self.call("limits", 1, 4, write).await
    }

    async fn get_failure_policy(
        &self,
        ns: &Namespace,
    ) -> Result<Option<FailurePolicy>, StoreError> {
        self.call("limits", 1, 0, self.inner.get_failure_policy(ns))
            .await
    }

    async fn set_failure_policy(
        &self,
        ns: &Namespace,
        policy: Option<FailurePolicy>,
        by: &Actor,
    ) -> Result<(), StoreError> {
        self.call(
            "limits",
            1,
            4,
            self.inner.set_failure_policy(ns, policy, by),
        )
        .await
    }

    async fn list_audit(
        &self,
        ns: &Namespace,
        subject: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<AuditPage, StoreError> {
        self.call(
            "audit",
            1,
            0,
            self.inner.list_audit(ns, subject, page_size, after),
        )
        .await
    }

    async fn add_usage(&self, ns: &Namespace, usage: &[Usage]) -> Result<(), StoreError> {
        self.call(
            "usage",
            usage.len(),
            usage.len() as u64,
            self.inner.add_usage(ns, usage),
        )
        .await
    }

    async fn usage(&self, ns: &Namespace, query: &UsageQuery<'_>) -> Result<UsagePage, StoreError> {
        let op = if query.entity.is_some() {
            "usage"
        } else {
            "usage_scan"
        };
        self.call(op, 1, 0, self.inner.usage(ns, query)).await
    }

    async fn create_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        self.call("namespace", 1, 1, self.inner.create_namespace(ns))
            .await
    }

    async fn list_namespaces(&self) -> Result<Vec<Namespace>, StoreError> {
        self.call("namespace", 1, 0, self.inner.list_namespaces())
            .await
    }

    async fn delete_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        self.call("namespace", 1, 1, self.inner.delete_namespace(ns))
            .await
    }
}
