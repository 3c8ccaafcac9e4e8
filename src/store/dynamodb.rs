//! The DynamoDB store: the authoritative state shared by every daemon on a table.
//!
//! Item layout (documented for operators in `docs/data-model.md`): one table with string keys `PK`
//! and `SK`, every `PK` starting with the namespace. One bucket item per (namespace, entity,
//! resource) holds all its limits, so one conditional `UpdateItem` decides a multi-limit acquire.
//! Bucket items carry no GSI attributes (no write amplification); only entity items with a parent
//! carry `GSI1PK`/`GSI1SK`, for the parent -> children index.
//!
//! Bucket [`Change`]s are translated into condition and update expressions that check exactly
//! what [`crate::domain::bucket::Bucket::apply`] checks. Failed conditions ask for the old image
//! (`ReturnValuesOnConditionCheckFailure = ALL_OLD`), so a conflict costs no extra read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, Put, ReturnValue, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem, Update,
};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use futures_util::future::join_all;

use super::{AuditPage, KeyedWrite, Store, StoreError, audit_sort_key, entity_json};
use crate::domain::bucket::{Bucket, Change, LimitChange, LimitState, Write};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::{self, Limit, LimitName, encode};
use crate::domain::records::{Actor, AuditAction, AuditEntry, Entity, LimitScope, Period, Usage};

mod batch;
pub use batch::BatchCounts;
pub mod table;

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

use schema::{GSI1, GSI1PK, GSI1SK, PK, SK, TTL};

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
    /// `w:<writer>` (see [`crate::domain::bucket::Fence`]). Random per process, so two daemons
    /// never share one.
    writer: String,
    /// Where the limiter's single-bucket writes queue to be sent together (`None`: one call each).
    batcher: Option<Arc<batch::Batcher>>,
}

impl DynamoStore {
    pub async fn connect(settings: &DynamoSettings) -> Self {
        use std::hash::BuildHasher;
        let seed = (std::process::id(), std::time::SystemTime::now());
        let writer = format!("{:016x}", std::hash::RandomState::new().hash_one(seed));
        let store = Self {
            client: settings.client().await,
            table: settings.table.clone(),
            audit_retention: settings.audit_retention,
            writer,
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

    /// Adds one usage record to its snapshot in one `UpdateItem`, creating the snapshot and its
    /// counters if they are new.
    async fn add_usage_alone(&self, ns: &Namespace, u: &Usage) -> Result<(), StoreError> {
        let mut e = Expr::default();
        let res = e.name("res");
        let res_v = e.value(s(u.resource.to_string()));
        let start = e.name("start");
        let start_v = e.value(n(u.start_ms));
        e.set.push(format!("{res} = {res_v}"));
        e.set.push(format!("{start} = {start_v}"));
        for (name, amount) in &u.amounts {
            let a = e.name(&usage_attr(name));
            let v = e.value(n(*amount));
            e.add.push(format!("{a} {v}"));
        }
        let (pk, sk) = usage_key(ns, &u.entity, u.period, u.start_ms, Some(&u.resource));
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(keys(pk, sk)))
            .update_expression(e.update_expression())
            .set_expression_attribute_names(maybe(e.names))
            .set_expression_attribute_values(maybe(e.values))
            .send()
            .await
            .map_err(|e| classify(e, &self.table))?;
        Ok(())
    }

    fn mark_attr(&self) -> String {
        format!("w:{}", self.writer)
    }

    fn decode_bucket(&self, item: &Item) -> Result<Bucket, StoreError> {
        let mut bucket = decode_bucket(item)?;
        bucket.mark = match item.get(&self.mark_attr()) {
            Some(AttributeValue::N(v)) => Some(v.parse().map_err(|_| {
                StoreError::Corrupt(format!(
                    "attribute {} = {v:?} is not a mark",
                    self.mark_attr()
                ))
            })?),
            _ => None,
        };
        Ok(bucket)
    }

    /// A failed condition with the item as it is now (`old`). When the item already carries
    /// this write's own mark, the write has landed (an earlier attempt whose answer was lost, and
    /// the SDK's retry found it done): that is success, with the item as stored.
    fn conflict(
        &self,
        index: usize,
        old: Option<&Item>,
        seq: Option<u64>,
    ) -> Result<Bucket, StoreError> {
        let current = match old.filter(|item| !item.is_empty()) {
            Some(item) => Some(self.decode_bucket(item)?),
            None => None,
        };
        match current {
            Some(b) if seq.is_some() && b.mark == seq => Ok(b),
            current => Err(StoreError::Conflict {
                index,
                current: current.map(Box::new),
            }),
        }
    }
}

// ---- keys --------------------------------------------------------------------------------------

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn wide(v: i128) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn entity_pk(ns: &Namespace, id: &EntityId) -> String {
    format!("{ns}#E#{id}")
}

fn bucket_keys(key: &BucketKey) -> HashMap<String, AttributeValue> {
    keys(
        entity_pk(&key.namespace, &key.entity),
        bucket_sk(&key.resource),
    )
}

fn bucket_sk(resource: &ResourceId) -> String {
    format!("#B#{resource}")
}

fn entity_keys(ns: &Namespace, id: &EntityId) -> HashMap<String, AttributeValue> {
    keys(entity_pk(ns, id), "#ENTITY".into())
}

fn limits_keys(ns: &Namespace, scope: &LimitScope) -> HashMap<String, AttributeValue> {
    let (pk, sk) = match scope {
        LimitScope::EntityResource(e, r) => (entity_pk(ns, e), format!("#L#{r}")),
        LimitScope::Entity(e) => (entity_pk(ns, e), "#L".to_owned()),
        LimitScope::Resource(r) => (format!("{ns}#R#{r}"), "#L".to_owned()),
        LimitScope::System => (format!("{ns}#S"), "#L".to_owned()),
    };
    keys(pk, sk)
}

fn audit_pk(ns: &Namespace, subject: &str) -> String {
    format!("{ns}#A#{subject}")
}

fn keys(pk: String, sk: String) -> HashMap<String, AttributeValue> {
    HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
}

// ---- bucket codec ------------------------------------------------------------------------------

/// The partition of the namespace registry (outside every namespace: `#` cannot start one).
const NAMESPACES_PK: &str = "#NS";

const CONFIG: &str = "cfg";
const REFILLED_AT: &str = "rt";

fn balance_attr(name: &LimitName) -> String {
    format!("b:{name}")
}
fn carry_attr(name: &LimitName) -> String {
    format!("k:{name}")
}
fn consumed_attr(name: &LimitName) -> String {
    format!("c:{name}")
}

type Item = HashMap<String, AttributeValue>;

fn bucket_item(key: &BucketKey, bucket: &Bucket, mark_attr: &str) -> Item {
    let mut item = bucket_keys(key);
    if let Some(mark) = bucket.mark {
        item.insert(mark_attr.to_owned(), AttributeValue::N(mark.to_string()));
    }
    item.insert(CONFIG.into(), s(encode(&bucket.limit_set())));
    item.insert(REFILLED_AT.into(), n(bucket.refilled_at));
    for l in &bucket.limits {
        let name = l.limit.name();
        item.insert(balance_attr(name), n(l.balance));
        item.insert(carry_attr(name), n(l.carry));
        item.insert(consumed_attr(name), wide(l.consumed));
    }
    item
}

fn number(item: &Item, attr: &str) -> Result<i64, StoreError> {
    match item.get(attr) {
        Some(AttributeValue::N(v)) => v.parse().map_err(|_| {
            StoreError::Corrupt(format!("attribute {attr} = {v:?} is not an integer"))
        }),
        _ => Err(StoreError::Corrupt(format!(
            "attribute {attr} is missing or not a number"
        ))),
    }
}

/// A consumed total: wider than `i64` (see [`LimitState::consumed`]).
fn wide_number(item: &Item, attr: &str) -> Result<i128, StoreError> {
    match item.get(attr) {
        Some(AttributeValue::N(v)) => v.parse().map_err(|_| {
            StoreError::Corrupt(format!("attribute {attr} = {v:?} is not an integer"))
        }),
        _ => Err(StoreError::Corrupt(format!(
            "attribute {attr} is missing or not a number"
        ))),
    }
}

fn string<'a>(item: &'a Item, attr: &str) -> Result<&'a str, StoreError> {
    match item.get(attr) {
        Some(AttributeValue::S(v)) => Ok(v),
        _ => Err(StoreError::Corrupt(format!(
            "attribute {attr} is missing or not a string"
        ))),
    }
}

fn decode_bucket(item: &Item) -> Result<Bucket, StoreError> {
    let limits =
        limit::decode(string(item, CONFIG)?).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let limits = limits
        .into_iter()
        .map(|limit| {
            let name = limit.name().clone();
            Ok(LimitState {
                balance: number(item, &balance_attr(&name))?,
                carry: number(item, &carry_attr(&name))?,
                consumed: wide_number(item, &consumed_attr(&name))?,
                limit,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(Bucket {
        refilled_at: number(item, REFILLED_AT)?,
        limits,
        mark: None,
    })
}

/// An update expression with its placeholders, built clause by clause.
#[derive(Default)]
struct Expr {
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
    conditions: Vec<String>,
    set: Vec<String>,
    add: Vec<String>,
    remove: Vec<String>,
}

impl Expr {
    fn name(&mut self, attr: &str) -> String {
        let key = format!("#a{}", self.names.len());
        self.names.insert(key.clone(), attr.to_owned());
        key
    }

    fn value(&mut self, v: AttributeValue) -> String {
        let key = format!(":v{}", self.values.len());
        self.values.insert(key.clone(), v);
        key
    }

    fn update_expression(&self) -> String {
        let mut parts = Vec::new();
        for (verb, clauses) in [
            ("SET", &self.set),
            ("ADD", &self.add),
            ("REMOVE", &self.remove),
        ] {
            if !clauses.is_empty() {
                parts.push(format!("{verb} {}", clauses.join(", ")));
            }
        }
        parts.join(" ")
    }

    fn condition_expression(&self) -> Option<String> {
        (!self.conditions.is_empty()).then(|| self.conditions.join(" AND "))
    }

    /// The update expression for a change's clauses.
    fn change(change: &Change, mark_attr: &str) -> Self {
        let mut e = Self::default();
        for c in Clauses::change(change, mark_attr) {
            match c {
                Clause::Compare(attr, op, v) => {
                    let (a, v) = (e.name(&attr), e.value(v));
                    e.conditions.push(format!("{a} {op} {v}"));
                }
                Clause::Missing(attr) => {
                    let a = e.name(&attr);
                    e.conditions.push(format!("attribute_not_exists({a})"));
                }
                Clause::Set(attr, v) => {
                    let (a, v) = (e.name(&attr), e.value(v));
                    e.set.push(format!("{a} = {v}"));
                }
                Clause::Add(attr, v) => {
                    let (a, v) = (e.name(&attr), e.value(v));
                    e.add.push(format!("{a} {v}"));
                }
                Clause::Remove(attr) => {
                    let a = e.name(&attr);
                    e.remove.push(a);
                }
            }
        }
        e
    }
}

/// One condition or update of a bucket write, on one attribute.
enum Clause {
    /// The attribute compared (`=`, `>=` or `<=`, the same in both renderings) with a value.
    Compare(String, &'static str, AttributeValue),
    Missing(String),
    Set(String, AttributeValue),
    /// Adds a number to an attribute that exists.
    Add(String, AttributeValue),
    Remove(String),
}

struct Clauses;

impl Clauses {
    /// What a [`Change`] checks and writes: the same conditions as `Bucket::apply`, rendered as
    /// an update expression ([`Expr::change`]) or as a PartiQL statement (`batch`).
    fn change(change: &Change, mark_attr: &str) -> Vec<Clause> {
        let mut out = Vec::new();
        let seen = s(change.seen_config.clone());
        out.push(Clause::Compare(CONFIG.into(), "=", seen.clone()));
        if let Some(mark) = change.mark {
            out.push(match mark.from {
                Some(seen) => {
                    Clause::Compare(mark_attr.into(), "=", AttributeValue::N(seen.to_string()))
                }
                None => Clause::Missing(mark_attr.into()),
            });
            out.push(Clause::Set(
                mark_attr.into(),
                AttributeValue::N(mark.to.to_string()),
            ));
        }
        if let Some(refill) = &change.refill {
            out.push(Clause::Compare(
                REFILLED_AT.into(),
                "=",
                n(refill.seen_refilled_at),
            ));
            out.push(Clause::Set(REFILLED_AT.into(), n(refill.refilled_at)));
            out.push(Clause::Set(CONFIG.into(), s(encode(&refill.limits))));
            for name in &refill.removed {
                for attr in [balance_attr(name), carry_attr(name), consumed_attr(name)] {
                    out.push(Clause::Remove(attr));
                }
            }
        } else if change.is_noop() || (change.limits.is_empty() && change.mark.is_none()) {
            // Nothing to add: rewrite the configuration with itself so the write still checks.
            out.push(Clause::Set(CONFIG.into(), seen));
        }
        for c in &change.limits {
            match c {
                LimitChange::Update {
                    name,
                    delta,
                    consumed,
                    min_balance,
                    max_balance,
                    carry,
                } => {
                    let b = balance_attr(name);
                    out.push(Clause::Compare(b.clone(), ">=", n(*min_balance)));
                    if let Some(max) = max_balance {
                        out.push(Clause::Compare(b.clone(), "<=", n(*max)));
                    }
                    if *delta != 0 {
                        out.push(Clause::Add(b, n(*delta)));
                    }
                    if *consumed != 0 {
                        out.push(Clause::Add(consumed_attr(name), n(*consumed)));
                    }
                    if let Some(carry) = carry {
                        out.push(Clause::Set(carry_attr(name), n(*carry)));
                    }
                }
                LimitChange::Insert(state) => {
                    let name = state.limit.name();
                    out.push(Clause::Set(balance_attr(name), n(state.balance)));
                    out.push(Clause::Set(carry_attr(name), n(state.carry)));
                    out.push(Clause::Set(consumed_attr(name), wide(state.consumed)));
                }
            }
        }
        out
    }
}

/// The cancellation reasons of a cancelled transaction, one per item in request order.
trait CancellationReasons {
    fn cancellation_reasons(&self) -> &[aws_sdk_dynamodb::types::CancellationReason];
}

impl CancellationReasons for TransactWriteItemsError {
    fn cancellation_reasons(&self) -> &[aws_sdk_dynamodb::types::CancellationReason] {
        match self {
            Self::TransactionCanceledException(t) => t.cancellation_reasons(),
            _ => &[],
        }
    }
}

fn maybe<T: Clone>(map: HashMap<String, T>) -> Option<HashMap<String, T>> {
    (!map.is_empty()).then_some(map)
}

// ---- errors ------------------------------------------------------------------------------------

/// Maps an SDK error to a [`StoreError`]: service codes that retrying can fix, time-outs and
/// unreachable endpoints are transient; a missing table or refused credentials get a plain message.
pub(crate) fn classify<E>(
    err: SdkError<E, aws_smithy_runtime_api::http::Response>,
    table: &str,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let Some(cause) = credentials_error(&err) {
        return StoreError::Backend(format!(
            "no usable AWS credentials: {cause} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
             AWS_PROFILE, or run with an IAM role)"
        ));
    }
    match &err {
        SdkError::TimeoutError(_) => {
            StoreError::Transient("DynamoDB did not answer in time".into())
        }
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            StoreError::Transient("DynamoDB did not answer in time".into())
        }
        SdkError::DispatchFailure(_) => {
            StoreError::Transient(format!("cannot reach DynamoDB: {}", innermost(&err)))
        }
        SdkError::ResponseError(_) => StoreError::Transient(format!(
            "unreadable answer from DynamoDB: {}",
            innermost(&err)
        )),
        SdkError::ServiceError(se) if se.err().code().is_none() => StoreError::Backend(format!(
            "the endpoint answered HTTP {} without a DynamoDB error: is it a DynamoDB endpoint?",
            se.raw().status().as_u16()
        )),
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("Unknown");
            let message = se.err().message().unwrap_or("").to_owned();
            match code {
                "ProvisionedThroughputExceededException"
                | "ThrottlingException"
                | "RequestLimitExceeded" => StoreError::Transient(format!(
                    "DynamoDB throttled the request ({code}): {message}"
                )),
                "InternalServerError"
                | "ServiceUnavailable"
                | "TransactionConflictException"
                | "TransactionInProgressException" => {
                    StoreError::Transient(format!("{code}: {message}"))
                }
                "ResourceNotFoundException" => StoreError::Backend(format!(
                    "table {table:?} does not exist (run `zae-limiter deploy`): {message}"
                )),
                "AccessDeniedException" => StoreError::Backend(format!(
                    "access denied to table {table:?} (the IAM policy needs the dynamodb actions \
                     listed in the README): {message}"
                )),
                "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "MissingAuthenticationTokenException"
                | "ExpiredTokenException" => {
                    StoreError::Backend(format!("AWS refused the credentials ({code}): {message}"))
                }
                _ => StoreError::Backend(format!("{code}: {message}")),
            }
        }
        _ => StoreError::Backend(DisplayErrorContext(&err).to_string()),
    }
}

/// The credentials provider's error, when the call failed for want of credentials (the SDK
/// reports it as a dispatch failure, which would otherwise read as an outage).
fn credentials_error(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
            .is_some()
        {
            return Some(innermost(e));
        }
        cur = e.source();
    }
    None
}

/// The deepest cause in an error chain: for network failures, the one a person can act on
/// ("Connection refused"), without the layers of wrapping above it.
fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

// ---- the store ---------------------------------------------------------------------------------

impl DynamoStore {
    fn audit_put(
        &self,
        ns: &Namespace,
        entry: &AuditEntry,
    ) -> Result<TransactWriteItem, StoreError> {
        let mut item = keys(audit_pk(ns, &entry.subject), audit_sort_key(entry.at_ms));
        item.insert("action".into(), s(entry.action.as_str()));
        item.insert("principal".into(), s(entry.principal.clone()));
        item.insert("at".into(), n(entry.at_ms));
        if let Some(before) = &entry.before {
            item.insert("before".into(), s(before.clone()));
        }
        if let Some(after) = &entry.after {
            item.insert("after".into(), s(after.clone()));
        }
        let expires = entry.at_ms / 1_000 + self.audit_retention.as_secs() as i64;
        item.insert(TTL.into(), n(expires));
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    fn entity_item(&self, ns: &Namespace, entity: &Entity) -> Item {
        let mut item = entity_keys(ns, &entity.id);
        item.insert("name".into(), s(entity.name.clone()));
        item.insert("cascade".into(), AttributeValue::Bool(entity.cascade));
        if !entity.metadata.is_empty() {
            item.insert(
                "meta".into(),
                AttributeValue::M(
                    entity
                        .metadata
                        .iter()
                        .map(|(k, v)| (k.clone(), s(v.clone())))
                        .collect(),
                ),
            );
        }
        if let Some(parent) = &entity.parent {
            item.insert("parent".into(), s(parent.to_string()));
            item.insert(GSI1PK.into(), s(format!("{ns}#P#{parent}")));
            item.insert(GSI1SK.into(), s(entity.id.to_string()));
        }
        item
    }

    /// Runs a transaction of a change and its audit record; `missing_or_present` maps the change's
    /// condition failure to the caller's error.
    async fn audited(
        &self,
        change: TransactWriteItem,
        audit: TransactWriteItem,
        on_condition: impl FnOnce() -> StoreError,
    ) -> Result<(), StoreError> {
        match self
            .client
            .transact_write_items()
            .transact_items(change)
            .transact_items(audit)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(se))
                if se.err().is_transaction_canceled_exception()
                    && se
                        .err()
                        .cancellation_reasons()
                        .first()
                        .and_then(|r| r.code())
                        == Some("ConditionalCheckFailed") =>
            {
                Err(on_condition())
            }
            Err(e) => Err(classify(e, &self.table)),
        }
    }

    /// Deletes the items whose keys (`PK`, `SK`) the given items carry, one by one.
    async fn delete_keys(&self, items: &[Item]) -> Result<(), StoreError> {
        for item in items {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(keys(
                    string(item, PK)?.to_owned(),
                    string(item, SK)?.to_owned(),
                )))
                .send()
                .await
                .map_err(|e| classify(e, &self.table))?;
        }
        Ok(())
    }

    /// Deletes an existing item together with its audit record.
    async fn delete_audited(
        &self,
        ns: &Namespace,
        key: Item,
        entry: &AuditEntry,
        not_found: impl FnOnce() -> StoreError,
    ) -> Result<(), StoreError> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key))
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let audit = self.audit_put(ns, entry)?;
        self.audited(
            TransactWriteItem::builder().delete(delete).build(),
            audit,
            not_found,
        )
        .await
    }

    fn update_for(&self, key: &BucketKey, e: Expr) -> Result<Update, StoreError> {
        Update::builder()
            .table_name(&self.table)
            .set_key(Some(bucket_keys(key)))
            .update_expression(e.update_expression())
            .set_condition_expression(e.condition_expression())
            .set_expression_attribute_names(maybe(e.names))
            .set_expression_attribute_values(maybe(e.values))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))
    }

    fn transact_item(&self, w: &KeyedWrite) -> Result<TransactWriteItem, StoreError> {
        let item = TransactWriteItem::builder();
        Ok(match &w.write {
            Write::Create(bucket) => item
                .put(
                    Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(bucket_item(&w.key, bucket, &self.mark_attr())))
                        .condition_expression("attribute_not_exists(#pk)")
                        .expression_attribute_names("#pk", PK)
                        .return_values_on_condition_check_failure(
                            ReturnValuesOnConditionCheckFailure::AllOld,
                        )
                        .build()
                        .map_err(|e| StoreError::Backend(e.to_string()))?,
                )
                .build(),
            Write::Change(change) => item
                .update(self.update_for(&w.key, Expr::change(change, &self.mark_attr()))?)
                .build(),
        })
    }

    async fn run_update(
        &self,
        key: &BucketKey,
        e: Expr,
        seq: Option<u64>,
    ) -> Result<Bucket, StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(bucket_keys(key)))
            .update_expression(e.update_expression())
            .set_condition_expression(e.condition_expression())
            .set_expression_attribute_names(maybe(e.names))
            .set_expression_attribute_values(maybe(e.values))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(out) => self.decode_bucket(&out.attributes.unwrap_or_default()),
            Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => {
                let old = match se.err() {
                    UpdateItemError::ConditionalCheckFailedException(c) => c.item(),
                    _ => None,
                };
                self.conflict(0, old, seq)
            }
            Err(e) => Err(classify(e, &self.table)),
        }
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
        match write {
            Write::Create(bucket) => {
                let result = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .set_item(Some(bucket_item(key, bucket, &self.mark_attr())))
                    .condition_expression("attribute_not_exists(#pk)")
                    .expression_attribute_names("#pk", PK)
                    .return_values_on_condition_check_failure(
                        ReturnValuesOnConditionCheckFailure::AllOld,
                    )
                    .send()
                    .await;
                match result {
                    Ok(_) => Ok(bucket.clone()),
                    Err(SdkError::ServiceError(se))
                        if se.err().is_conditional_check_failed_exception() =>
                    {
                        let old = match se.err() {
                            PutItemError::ConditionalCheckFailedException(c) => c.item(),
                            _ => None,
                        };
                        self.conflict(0, old, bucket.mark)
                    }
                    Err(e) => Err(classify(e, &self.table)),
                }
            }
            Write::Change(change) => {
                let e = Expr::change(change, &self.mark_attr());
                self.run_update(key, e, write.marks()).await
            }
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
            .map(|w| self.transact_item(w))
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

    async fn create_entity(
        &self,
        ns: &Namespace,
        entity: &Entity,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(self.entity_item(ns, entity)))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let audit = self.audit_put(
            ns,
            &AuditEntry::new(
                entity.id.to_string(),
                AuditAction::EntityCreated,
                by,
                None,
                Some(entity_json(entity)),
            ),
        )?;
        self.audited(TransactWriteItem::builder().put(put).build(), audit, || {
            StoreError::AlreadyExists(format!("entity {:?}", entity.id.as_str()))
        })
        .await
    }

    async fn get_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
    ) -> Result<Option<Entity>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(entity_keys(ns, id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(e, &self.table))?;
        out.item.as_ref().map(decode_entity).transpose()
    }

    async fn delete_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        force: bool,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let not_found = || StoreError::NotFound(format!("entity {:?}", id.as_str()));
        let old = self.get_entity(ns, id).await?.ok_or_else(not_found)?;
        // The parent index is eventually consistent: a child created a moment ago may be missed.
        let children = self.list_children(ns, id).await?.len();
        if children > 0 && !force {
            return Err(StoreError::Refused(format!(
                "entity {:?} has {children} children; delete them first or force",
                id.as_str()
            )));
        }
        let entry = AuditEntry::new(
            id.to_string(),
            AuditAction::EntityDeleted,
            by,
            Some(entity_json(&old)),
            None,
        );
        self.delete_audited(ns, entity_keys(ns, id), &entry, not_found)
            .await?;
        // Then its buckets and entity-level limits: every other item of its partition.
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", s(entity_pk(ns, id)))
                .projection_expression("#pk, SK")
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| classify(e, &self.table))?;
            self.delete_keys(out.items()).await?;
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(());
            }
        }
    }

    async fn move_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        parent: Option<&EntityId>,
        by: &Actor,
    ) -> Result<Entity, StoreError> {
        let not_found = || StoreError::NotFound(format!("entity {:?}", id.as_str()));
        let old = self.get_entity(ns, id).await?.ok_or_else(not_found)?;
        let moved = Entity {
            parent: parent.cloned(),
            ..old.clone()
        };
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(self.entity_item(ns, &moved)))
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let entry = AuditEntry::new(
            id.to_string(),
            AuditAction::EntityMoved,
            by,
            Some(entity_json(&old)),
            Some(entity_json(&moved)),
        );
        let audit = self.audit_put(ns, &entry)?;
        self.audited(
            TransactWriteItem::builder().put(put).build(),
            audit,
            not_found,
        )
        .await?;
        Ok(moved)
    }

    async fn list_children(
        &self,
        ns: &Namespace,
        parent: &EntityId,
    ) -> Result<Vec<Entity>, StoreError> {
        let mut children = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(GSI1)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", GSI1PK)
                .expression_attribute_values(":pk", s(format!("{ns}#P#{parent}")))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| classify(e, &self.table))?;
            for item in out.items() {
                children.push(decode_entity(item)?);
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        children.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(children)
    }

    async fn set_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        limits: &[Limit],
        by: &Actor,
    ) -> Result<(), StoreError> {
        let before = self.get_limits(ns, scope).await?;
        let mut item = limits_keys(ns, scope);
        item.insert("limits".into(), s(encode(limits)));
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let audit = self.audit_put(
            ns,
            &AuditEntry::new(
                scope.audit_subject(),
                AuditAction::LimitsSet,
                by,
                before.map(|b| encode(&b)),
                Some(encode(limits)),
            ),
        )?;
        self.audited(TransactWriteItem::builder().put(put).build(), audit, || {
            StoreError::Backend("limit item changed concurrently".into())
        })
        .await
    }

    async fn get_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
    ) -> Result<Option<Vec<Limit>>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(limits_keys(ns, scope)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(e, &self.table))?;
        out.item
            .as_ref()
            .map(|item| {
                limit::decode(string(item, "limits")?)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .transpose()
    }

    async fn delete_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let not_found = || StoreError::NotFound(format!("limits of {scope}"));
        let old = self.get_limits(ns, scope).await?.ok_or_else(not_found)?;
        let entry = AuditEntry::new(
            scope.audit_subject(),
            AuditAction::LimitsDeleted,
            by,
            Some(encode(&old)),
            None,
        );
        self.delete_audited(ns, limits_keys(ns, scope), &entry, not_found)
            .await
    }

    async fn list_audit(
        &self,
        ns: &Namespace,
        subject: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<AuditPage, StoreError> {
        let pk = audit_pk(ns, subject);
        // Ask for one more than a page, so `next` is set only when there really is more.
        let wanted = page_size.clamp(1, 1_000);
        let mut items: Vec<Item> = Vec::new();
        let mut start = after.map(|sk| keys(pk.clone(), sk.to_owned()));
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", s(pk.clone()))
                .scan_index_forward(false)
                .limit((wanted + 1 - items.len()) as i32)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| classify(e, &self.table))?;
            items.extend(out.items.unwrap_or_default());
            start = out.last_evaluated_key;
            if start.is_none() || items.len() > wanted {
                break;
            }
        }
        let more = items.len() > wanted;
        items.truncate(wanted);
        let next = if more {
            Some(string(items.last().expect("more than zero items"), SK)?.to_owned())
        } else {
            None
        };
        let entries = items
            .iter()
            .map(|item| {
                Ok(AuditEntry {
                    subject: subject.to_owned(),
                    action: AuditAction::parse(string(item, "action")?)
                        .map_err(|a| StoreError::Corrupt(format!("unknown audit action {a:?}")))?,
                    principal: string(item, "principal")?.to_owned(),
                    at_ms: number(item, "at")?,
                    before: string(item, "before").ok().map(str::to_owned),
                    after: string(item, "after").ok().map(str::to_owned),
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(AuditPage { entries, next })
    }

    async fn create_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(keys(NAMESPACES_PK.into(), ns.to_string())))
            .send()
            .await
            .map_err(|e| classify(e, &self.table))?;
        Ok(())
    }

    async fn list_namespaces(&self) -> Result<Vec<Namespace>, StoreError> {
        let mut found = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", s(NAMESPACES_PK))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| classify(e, &self.table))?;
            for item in out.items() {
                found.push(
                    Namespace::new(string(item, SK)?)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                );
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(found);
            }
        }
    }

    async fn delete_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        let registration = keys(NAMESPACES_PK.into(), ns.to_string());
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(registration))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| classify(e, &self.table))?;
        if out.attributes.is_none() {
            return Err(StoreError::NotFound(format!("namespace {:?}", ns.as_str())));
        }
        // Every key of the namespace starts with `{ns}#`; no index lists them, so scan.
        let mut start = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .filter_expression("begins_with(#pk, :prefix)")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":prefix", s(format!("{ns}#")))
                .projection_expression("#pk, SK")
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| classify(e, &self.table))?;
            self.delete_keys(out.items()).await?;
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(());
            }
        }
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

    async fn usage(
        &self,
        ns: &Namespace,
        entity: &EntityId,
        resource: Option<&ResourceId>,
        period: Period,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Usage>, StoreError> {
        let (pk, low) = usage_key(ns, entity, period, from_ms, None);
        // Sort keys are `{period}#{start}#{resource}`: `{period}#{to}` sorts before every key of
        // the period starting at `to`, so BETWEEN keeps exactly the starts in from..to.
        let (_, high) = usage_key(ns, entity, period, to_ms, None);
        let mut found = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk AND #sk BETWEEN :lo AND :hi")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":pk", s(pk.clone()))
                .expression_attribute_values(":lo", s(low.clone()))
                .expression_attribute_values(":hi", s(high.clone()))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| classify(e, &self.table))?;
            for item in out.items() {
                let usage = decode_usage(item, entity, period)?;
                if resource.is_none_or(|r| *r == usage.resource) {
                    found.push(usage);
                }
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        Ok(found)
    }
}

fn decode_entity(item: &Item) -> Result<Entity, StoreError> {
    let pk = string(item, PK)?;
    let id = pk
        .split_once("#E#")
        .map(|(_, id)| id)
        .ok_or_else(|| StoreError::Corrupt(format!("entity key {pk:?}")))?;
    let corrupt = |e: crate::domain::ids::IdError| StoreError::Corrupt(e.to_string());
    Ok(Entity {
        id: EntityId::new(id).map_err(corrupt)?,
        name: string(item, "name")?.to_owned(),
        parent: string(item, "parent")
            .ok()
            .map(EntityId::new)
            .transpose()
            .map_err(corrupt)?,
        cascade: matches!(item.get("cascade"), Some(AttributeValue::Bool(true))),
        metadata: match item.get("meta") {
            Some(AttributeValue::M(m)) => m
                .iter()
                .filter_map(|(k, v)| v.as_s().ok().map(|v| (k.clone(), v.clone())))
                .collect(),
            _ => Default::default(),
        },
    })
}

fn usage_attr(name: &LimitName) -> String {
    format!("u:{name}")
}

/// Usage snapshot keys: one partition per entity, sorted by period, start and resource.
fn usage_key(
    ns: &Namespace,
    entity: &EntityId,
    period: Period,
    start_ms: i64,
    resource: Option<&ResourceId>,
) -> (String, String) {
    let p = match period {
        Period::Hour => 'H',
        Period::Day => 'D',
    };
    let mut sk = format!("{p}#{:020}", start_ms.max(0));
    if let Some(r) = resource {
        sk.push('#');
        sk.push_str(r.as_str());
    }
    (format!("{ns}#U#{entity}"), sk)
}

fn decode_usage(item: &Item, entity: &EntityId, period: Period) -> Result<Usage, StoreError> {
    let resource =
        ResourceId::new(string(item, "res")?).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let mut amounts = item
        .iter()
        .filter_map(|(attr, value)| Some((attr.strip_prefix("u:")?, value)))
        .map(|(name, value)| {
            let name = LimitName::new(name).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let amount = match value {
                AttributeValue::N(v) => v
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("usage {v:?}")))?,
                _ => return Err(StoreError::Corrupt("usage is not a number".into())),
            };
            Ok((name, amount))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    amounts.sort();
    Ok(Usage {
        entity: entity.clone(),
        resource,
        period,
        start_ms: number(item, "start")?,
        amounts,
    })
}
