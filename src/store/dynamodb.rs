//! The DynamoDB store: the authoritative state shared by every daemon on a table.
//!
//! Item layout (documented for operators in `docs/data-model.md`): one table with string keys `PK`
//! and `SK`, every `PK` starting with the namespace. One bucket item per (namespace, entity,
//! resource) holds all its limits, so one conditional `UpdateItem` decides a multi-limit acquire.
//! Bucket items carry no GSI attributes (no write amplification); only entity items with a parent
//! carry `GSI1PK`/`GSI1SK`, for the parent -> children index.
//!
//! This file holds the connection and the buckets' hot path (read, write, transaction); its
//! parts: [`keys`] (where items live), `codec` (items to values and back), `clauses` (what a
//! write checks and changes, and the one builder of each kind of write), `errors` (SDK errors as
//! store errors), `records` (entities, limits, audit, namespaces, usage), `batch` (single writes
//! sent together) and [`table`] (deploy, status, probe).
//!
//! Bucket [`Change`]s are translated into condition and update expressions that check exactly
//! what [`crate::domain::bucket::Bucket::apply`] checks. Failed conditions ask for the old image
//! (`ReturnValuesOnConditionCheckFailure = ALL_OLD`), so a conflict costs no extra read.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::{UpdateItemError, UpdateItemOutput};
use aws_sdk_dynamodb::types::{Put, ReturnValue, Update};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use futures_util::future::join_all;

use super::{AuditPage, KeyedWrite, Once, Store, StoreError, UsagePage, UsageQuery};
use crate::domain::bucket::{Bucket, Change, Write};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::Limit;
use crate::domain::records::{
    Actor, AuditEntry, Entity, FailurePolicy, Gate, LevelSettings, LimitScope, Usage,
};
use clauses::{Action, Existing, Expr, action, put, update};
use codec::{bucket_item, decode_bucket};
use errors::{CancellationReasons, classify};
use keys::{Item, bucket_keys};

mod batch;
mod clauses;
mod codec;
mod errors;
pub mod keys;
mod records;
pub mod table;

pub use batch::BatchCounts;

/// Attribute and index names of the table schema.
pub mod schema {
    pub const PK: &str = "PK";
    pub const SK: &str = "SK";
    pub const GSI1: &str = "GSI1";
    pub const GSI1PK: &str = "GSI1PK";
    pub const GSI1SK: &str = "GSI1SK";
    pub const TTL: &str = "ttl";
    /// The version of the item layout this build reads and writes.
    pub const VERSION: i64 = 1;
}

/// Where the table is and how to reach it.
#[derive(Debug, Clone)]
pub struct DynamoSettings {
    pub table: String,
    pub region: String,
    /// A custom endpoint (DynamoDB Local); `None` for AWS.
    pub endpoint_url: Option<String>,
    /// Static credentials (`access key`, `secret`); `None` uses the standard AWS chain.
    pub credentials: Option<(String, String)>,
    /// Time for one attempt of a call, including connecting.
    pub attempt_timeout: Duration,
    /// Attempts per call (throttling and network errors are retried with backoff).
    pub max_attempts: u32,
    /// How long audit records are kept before DynamoDB's TTL removes them.
    pub audit_retention: Duration,
    /// Write calls out before further single-bucket writes wait and go out together in one
    /// PartiQL batch (a full batch goes out at once); 0 sends each write on its own.
    pub write_calls_in_flight: usize,
}

impl DynamoSettings {
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            region: "us-east-1".into(),
            endpoint_url: None,
            credentials: None,
            attempt_timeout: Duration::from_secs(3),
            max_attempts: 3,
            audit_retention: Duration::from_secs(90 * 86_400),
            write_calls_in_flight: 4,
        }
    }

    /// A DynamoDB client for these settings, with bounded time-outs so that no call hangs.
    pub async fn client(&self) -> Client {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(self.attempt_timeout.min(Duration::from_secs(2)))
            .operation_attempt_timeout(self.attempt_timeout)
            .operation_timeout(self.attempt_timeout * self.max_attempts.max(1) * 2)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(self.max_attempts.max(1)));
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some((key, secret)) = &self.credentials {
            loader = loader.credentials_provider(Credentials::new(
                key,
                secret,
                None,
                None,
                "zae-limiter-static",
            ));
        }
        Client::new(&loader.load().await)
    }
}

/// The DynamoDB implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    audit_retention: Duration,
    /// This process's writer id: its bucket writes carry their mark in the attribute
    /// `w:<writer>` (see [`crate::domain::bucket::Mark`]). 64 bits from the operating system's
    /// random source, so two daemons never share one.
    writer: String,
    /// Where the limiter's single-bucket writes queue to be sent together (`None`: one call each).
    batcher: Option<Arc<batch::Batcher>>,
}

/// A writer id: 64 bits from the operating system's random source.
///
/// # Panics
/// When the operating system has no random source to give (two daemons could then share marks).
fn writer_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    format!("{:016x}", u64::from_ne_bytes(bytes))
}

impl DynamoStore {
    pub async fn connect(settings: &DynamoSettings) -> Self {
        let store = Self {
            client: settings.client().await,
            table: settings.table.clone(),
            audit_retention: settings.audit_retention,
            writer: writer_id(),
            batcher: None,
        };
        let batcher = (settings.write_calls_in_flight > 0).then(|| {
            Arc::new(batch::Batcher::start(
                store.clone(),
                settings.write_calls_in_flight,
            ))
        });
        Self { batcher, ..store }
    }

    /// How many writes went out inside a batch of several so far, and how many of those were
    /// sent again on their own.
    pub fn batched_writes(&self) -> BatchCounts {
        self.batcher
            .as_ref()
            .map_or_else(BatchCounts::default, |b| b.counts())
    }

    /// The attribute that holds this writer's mark on a bucket.
    fn mark_attr(&self) -> String {
        format!("w:{}", self.writer)
    }

    fn decode_bucket(&self, item: &Item) -> Result<Bucket, StoreError> {
        decode_bucket(item, &self.mark_attr())
    }

    /// A failed condition with the item as it is now (`old`). When the item already carries
    /// the mark this write moves it to, the write has landed (an earlier attempt whose answer
    /// was lost, and the SDK's retry found it done): that is success, with the item as stored.
    fn conflict(
        &self,
        index: usize,
        old: Option<&Item>,
        mark: Option<u64>,
    ) -> Result<Bucket, StoreError> {
        let current = match old.filter(|item| !item.is_empty()) {
            Some(item) => Some(self.decode_bucket(item)?),
            None => None,
        };
        match current {
            Some(b) if mark.is_some() && b.mark == mark => Ok(b),
            current => Err(StoreError::Conflict {
                index,
                current: current.map(Box::new),
            }),
        }
    }

    /// The write of a bucket, as built for a transaction or for a call of its own.
    fn bucket_action(&self, key: &BucketKey, write: &Write) -> Result<Action, StoreError> {
        Ok(match write {
            Write::Create(bucket) => Action::Put(put(
                &self.table,
                bucket_item(key, bucket, &self.mark_attr()),
                Existing::Absent,
            )?),
            Write::Change(change) => Action::Update(self.change_update(key, change)?),
        })
    }

    fn change_update(&self, key: &BucketKey, change: &Change) -> Result<Update, StoreError> {
        update(
            &self.table,
            bucket_keys(key),
            Expr::change(change, &self.mark_attr()),
        )
    }

    /// Sends a built put as a call of its own.
    async fn send_put(
        &self,
        p: Put,
    ) -> Result<(), SdkError<PutItemError, aws_smithy_runtime_api::http::Response>> {
        self.client
            .put_item()
            .table_name(p.table_name)
            .set_item(Some(p.item))
            .set_condition_expression(p.condition_expression)
            .set_expression_attribute_names(p.expression_attribute_names)
            .set_expression_attribute_values(p.expression_attribute_values)
            .set_return_values_on_condition_check_failure(
                p.return_values_on_condition_check_failure,
            )
            .send()
            .await
            .map(drop)
    }

    /// Sends a built update as a call of its own (`new`: return the item as stored after it).
    async fn send_update(
        &self,
        u: Update,
        new: bool,
    ) -> Result<UpdateItemOutput, SdkError<UpdateItemError, aws_smithy_runtime_api::http::Response>>
    {
        self.client
            .update_item()
            .table_name(u.table_name)
            .set_key(Some(u.key))
            .update_expression(u.update_expression)
            .set_condition_expression(u.condition_expression)
            .set_expression_attribute_names(u.expression_attribute_names)
            .set_expression_attribute_values(u.expression_attribute_values)
            .set_return_values_on_condition_check_failure(
                u.return_values_on_condition_check_failure,
            )
            .set_return_values(new.then_some(ReturnValue::AllNew))
            .send()
            .await
    }

    /// Adds one usage record to its snapshot on its own (see `records::add_usage_alone`).
    async fn add_usage_alone(&self, ns: &Namespace, u: &Usage) -> Result<(), StoreError> {
        records::add_usage_alone(self, ns, u).await
    }
}

#[async_trait]
impl Store for DynamoStore {
    async fn probe(&self) -> Result<(), StoreError> {
        table::probe(&self.client, &self.table).await
    }

    async fn load_bucket(&self, key: &BucketKey) -> Result<Option<Bucket>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(bucket_keys(key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(e, &self.table))?;
        out.item
            .as_ref()
            .map(|item| self.decode_bucket(item))
            .transpose()
    }

    async fn write_bucket(&self, key: &BucketKey, write: &Write) -> Result<Bucket, StoreError> {
        let mark = write.marks();
        match self.bucket_action(key, write)? {
            Action::Put(p) => match self.send_put(p).await {
                Ok(()) => match write {
                    Write::Create(bucket) => Ok(bucket.clone()),
                    Write::Change(_) => unreachable!("a change is an update"),
                },
                Err(SdkError::ServiceError(se))
                    if se.err().is_conditional_check_failed_exception() =>
                {
                    let old = match se.err() {
                        PutItemError::ConditionalCheckFailedException(c) => c.item(),
                        _ => None,
                    };
                    self.conflict(0, old, mark)
                }
                Err(e) => Err(classify(e, &self.table)),
            },
            Action::Update(u) => match self.send_update(u, true).await {
                Ok(out) => self.decode_bucket(&out.attributes.unwrap_or_default()),
                Err(SdkError::ServiceError(se))
                    if se.err().is_conditional_check_failed_exception() =>
                {
                    let old = match se.err() {
                        UpdateItemError::ConditionalCheckFailedException(c) => c.item(),
                        _ => None,
                    };
                    self.conflict(0, old, mark)
                }
                Err(e) => Err(classify(e, &self.table)),
            },
        }
    }

    async fn submit_write(
        &self,
        key: &BucketKey,
        write: &Write,
    ) -> Result<Option<Bucket>, StoreError> {
        if let Some(batcher) = &self.batcher
            && let Some(answer) = batcher.write(key, write).await
        {
            return answer;
        }
        self.write_bucket(key, write).await.map(Some)
    }

    async fn commit(&self, writes: &[KeyedWrite]) -> Result<(), StoreError> {
        // One item needs no transaction (half the write cost).
        if let [single] = writes {
            return self
                .write_bucket(&single.key, &single.write)
                .await
                .map(drop);
        }
        let items = writes
            .iter()
            .map(|w| self.bucket_action(&w.key, &w.write).map(action))
            .collect::<Result<Vec<_>, _>>()?;
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(se)) if se.err().is_transaction_canceled_exception() => {
                let reasons = se.err().cancellation_reasons();
                // DynamoDB cancels the whole transaction; the first conditional failure says which
                // write and carries its old image. Other reasons (conflicts with another
                // transaction, throttling) are worth a retry.
                match reasons
                    .iter()
                    .position(|r| r.code() == Some("ConditionalCheckFailed"))
                {
                    Some(index) => {
                        let mark = writes[index].write.marks();
                        self.conflict(index, reasons[index].item(), mark).map(drop)
                    }
                    None => Err(StoreError::Transient(format!(
                        "transaction cancelled: {:?}",
                        reasons.iter().filter_map(|r| r.code()).collect::<Vec<_>>()
                    ))),
                }
            }
            Err(e) => Err(classify(e, &self.table)),
        }
    }

    async fn operate_bucket(
        &self,
        key: &BucketKey,
        write: Option<&Write>,
        entry: &AuditEntry,
        once: Option<&Once>,
    ) -> Result<Option<String>, StoreError> {
        records::operate_bucket(self, key, write, entry, once).await
    }

    async fn resource_buckets(
        &self,
        ns: &Namespace,
        resource: &ResourceId,
    ) -> Result<Vec<(EntityId, Bucket)>, StoreError> {
        let prefix = format!("{ns}#E#");
        let mut found = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .filter_expression("begins_with(#pk, :prefix) AND #sk = :sk")
                .expression_attribute_names("#pk", schema::PK)
                .expression_attribute_names("#sk", schema::SK)
                .expression_attribute_values(":prefix", keys::s(prefix.clone()))
                .expression_attribute_values(":sk", keys::s(keys::bucket_sk(resource)))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| classify(e, &self.table))?;
            for item in out.items() {
                let pk = codec::string(item, schema::PK)?;
                let entity = pk
                    .strip_prefix(&prefix)
                    .and_then(|e| EntityId::new(e).ok())
                    .ok_or_else(|| StoreError::Corrupt(format!("bucket key {pk:?}")))?;
                found.push((entity, self.decode_bucket(item)?));
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    async fn list_entities_with_limits(
        &self,
        ns: &Namespace,
        resource: &ResourceId,
        page_size: usize,
        after: Option<&EntityId>,
    ) -> Result<(Vec<EntityId>, Option<EntityId>), StoreError> {
        records::list_entities_with_limits(self, ns, resource, page_size, after).await
    }

    async fn list_resources_with_defaults(
        &self,
        ns: &Namespace,
    ) -> Result<Vec<ResourceId>, StoreError> {
        records::list_resources_with_defaults(self, ns).await
    }

    async fn create_entity(
        &self,
        ns: &Namespace,
        entity: &Entity,
        by: &Actor,
    ) -> Result<(), StoreError> {
        records::create_entity(self, ns, entity, by).await
    }

    async fn get_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
    ) -> Result<Option<Entity>, StoreError> {
        records::get_entity(self, ns, id).await
    }

    async fn get_entities(
        &self,
        ns: &Namespace,
        ids: &[EntityId],
    ) -> Result<Vec<Option<Entity>>, StoreError> {
        records::get_entities(self, ns, ids).await
    }

    async fn delete_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        force: bool,
        by: &Actor,
    ) -> Result<(), StoreError> {
        records::delete_entity(self, ns, id, force, by).await
    }

    async fn move_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        parent: Option<&EntityId>,
        by: &Actor,
    ) -> Result<Entity, StoreError> {
        records::move_entity(self, ns, id, parent, by).await
    }

    async fn list_children(
        &self,
        ns: &Namespace,
        parent: &EntityId,
    ) -> Result<Vec<Entity>, StoreError> {
        records::list_children(self, ns, parent).await
    }

    async fn set_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        limits: &[Limit],
        by: &Actor,
    ) -> Result<(), StoreError> {
        records::set_limits(self, ns, scope, limits, by).await
    }

    async fn get_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
    ) -> Result<Option<Vec<Limit>>, StoreError> {
        records::get_limits(self, ns, scope).await
    }

    async fn delete_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        by: &Actor,
    ) -> Result<(), StoreError> {
        records::delete_limits(self, ns, scope, by).await
    }

    async fn list_audit(
        &self,
        ns: &Namespace,
        subject: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<AuditPage, StoreError> {
        records::list_audit(self, ns, subject, page_size, after).await
    }

    async fn create_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        records::create_namespace(self, ns).await
    }

    async fn list_namespaces(&self) -> Result<Vec<Namespace>, StoreError> {
        records::list_namespaces(self).await
    }

    async fn delete_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        records::delete_namespace(self, ns).await
    }

    async fn get_level_settings(
        &self,
        ns: &Namespace,
        scopes: &[LimitScope],
    ) -> Result<Vec<LevelSettings>, StoreError> {
        records::get_level_settings(self, ns, scopes).await
    }

    async fn set_gate(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        gate: Option<Gate>,
        by: &Actor,
    ) -> Result<(), StoreError> {
        records::set_gate(self, ns, scope, gate, by).await
    }

    async fn set_cascade(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        cascade: Option<bool>,
        by: &Actor,
    ) -> Result<(), StoreError> {
        records::set_cascade(self, ns, scope, cascade, by).await
    }

    async fn get_failure_policy(
        &self,
        ns: &Namespace,
    ) -> Result<Option<FailurePolicy>, StoreError> {
        records::get_failure_policy(self, ns).await
    }

    async fn set_failure_policy(
        &self,
        ns: &Namespace,
        policy: Option<FailurePolicy>,
        by: &Actor,
    ) -> Result<(), StoreError> {
        records::set_failure_policy(self, ns, policy, by).await
    }

    async fn add_usage(&self, ns: &Namespace, usage: &[Usage]) -> Result<(), StoreError> {
        let Some(batcher) = &self.batcher else {
            for u in usage {
                self.add_usage_alone(ns, u).await?;
            }
            return Ok(());
        };
        let added = join_all(usage.iter().map(|u| async move {
            match batcher.add_usage(ns, u).await {
                Some(answer) => answer,
                None => self.add_usage_alone(ns, u).await,
            }
        }))
        .await;
        added.into_iter().collect()
    }

    async fn usage(&self, ns: &Namespace, query: &UsageQuery<'_>) -> Result<UsagePage, StoreError> {
        records::usage(self, ns, query).await
    }
}
