//! Single-item writes sent together: while `in_flight` write calls are out, the writes that
//! arrive meanwhile wait and then go out in one PartiQL `BatchExecuteStatement` (up to 25; a full
//! batch goes out at once, so the limit never caps how many writes the store takes). Each
//! statement is the same conditional update as the `UpdateItem` it replaces, applied or refused on
//! its own (no transaction: one write unit each), so a batch answers for each write separately.
//! One call of the SDK costs about five times less CPU per write this way. Two kinds of writes
//! queue: the limiter's bucket changes and the usage flush's additions to snapshots.
//!
//! A batch does not return new images, so a batched bucket change answers `Ok(None)` ("applied";
//! the caller knows the bucket as planned) where a change sent alone answers with the stored
//! bucket. A refused condition comes back with the item as stored (`ALL_OLD`), as from
//! `UpdateItem`. A usage addition in a batch only adds to counters that exist (PartiQL cannot add
//! to a missing attribute, nor create an item): refused, because its snapshot or one of its
//! counters is new, it is sent again on its own as the `UpdateItem` that creates them. A statement
//! that DynamoDB could not take as PartiQL is sent again on its own too: a statement error other
//! than a failed condition or throttling means it was not applied. A batch refused as a whole for
//! good (an IAM policy without `dynamodb:PartiQLUpdate`) turns batching off: its writes and all
//! later ones go out one call each. A batch refused as a whole for another reason may have
//! applied: its writes answer as after a time-out. No batch names an item twice (DynamoDB refuses
//! it): a second write of an item in the queue goes out on its own.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeValue, BatchStatementErrorCodeEnum as Code, BatchStatementRequest,
    ReturnValuesOnConditionCheckFailure,
};
use futures_util::future::join_all;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::DynamoStore;
use super::clauses::{Clause, Clauses};
use super::errors::classify;
use super::keys::{bucket_keys, bucket_sk, entity_pk, n, s, usage_attr, usage_key};
use super::schema::{PK, SK};
use crate::domain::bucket::{Bucket, Write};
use crate::domain::ids::{BucketKey, Namespace};
use crate::domain::records::Usage;
use crate::store::{Store, StoreError};

/// DynamoDB's limit of statements in one batch.
const MAX_STATEMENTS: usize = 25;

type Answer = Result<Option<Bucket>, StoreError>;

/// A write waiting for the writer, with where its answer goes.
enum Job {
    /// A bucket change (creates are never queued).
    Change {
        key: BucketKey,
        write: Write,
        reply: oneshot::Sender<Answer>,
    },
    /// An addition to one usage snapshot (with at least one amount).
    Usage {
        ns: Namespace,
        usage: Usage,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Job {
    fn is_closed(&self) -> bool {
        match self {
            Job::Change { reply, .. } => reply.is_closed(),
            Job::Usage { reply, .. } => reply.is_closed(),
        }
    }

    /// The item it writes (partition and sort key).
    fn item(&self) -> (String, String) {
        match self {
            Job::Change { key, .. } => (
                entity_pk(&key.namespace, &key.entity),
                bucket_sk(&key.resource),
            ),
            Job::Usage { ns, usage, .. } => usage_key(
                ns,
                &usage.entity,
                usage.period,
                usage.start_ms,
                Some(&usage.resource),
            ),
        }
    }

    /// Answers "applied as sent".
    fn applied(self) {
        match self {
            Job::Change { reply, .. } => drop(reply.send(Ok(None))),
            Job::Usage { reply, .. } => drop(reply.send(Ok(()))),
        }
    }

    fn fail(self, e: StoreError) {
        match self {
            Job::Change { reply, .. } => drop(reply.send(Err(e))),
            Job::Usage { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// The queue in front of the writer task; the task ends when the last store holding it is gone.
#[derive(Debug)]
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Job>,
    counts: Arc<Counts>,
}

/// What the batch writer did so far (for tests and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// Writes sent inside a batch of several.
    pub batched: u64,
    /// Of those, how many DynamoDB refused as statements (sent again on their own).
    pub resent: u64,
    /// Of those, usage additions whose snapshot or counter was new (sent again on their own, as
    /// the `UpdateItem` that creates it).
    pub created: u64,
}

/// What the writer did, and whether it still batches.
#[derive(Debug, Default)]
struct Counts {
    /// Writes sent inside a batch of several.
    batched: AtomicU64,
    /// Batched writes that DynamoDB refused as statements, sent again on their own.
    resent: AtomicU64,
    /// Batched usage additions whose snapshot or counter was new, sent again on their own.
    created: AtomicU64,
    /// Batches were refused for good: every write goes out on its own.
    off: AtomicBool,
}

impl Counts {
    fn turn_off(&self, why: &str) {
        if !self.off.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "DynamoDB refused a batch of writes ({why}): sending each write on its own from \
                 now on (batches need the IAM action dynamodb:PartiQLUpdate)"
            );
        }
    }
}

impl Batcher {
    /// Starts the writer task on the current runtime. `store` must not hold a batcher itself.
    pub(super) fn start(store: DynamoStore, in_flight: usize) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(Counts::default());
        tokio::spawn(run(store, rx, in_flight, counts.clone()));
        Self { queue, counts }
    }

    pub(super) fn counts(&self) -> BatchCounts {
        let c = &self.counts;
        BatchCounts {
            batched: c.batched.load(Ordering::Relaxed),
            resent: c.resent.load(Ordering::Relaxed),
            created: c.created.load(Ordering::Relaxed),
        }
    }

    /// Queues a change; `None` when it is to be sent on its own: a create, batching turned
    /// off, or the writer task gone (its runtime shut down).
    pub(super) async fn write(&self, key: &BucketKey, write: &Write) -> Option<Answer> {
        if matches!(write, Write::Create(_)) {
            return None;
        }
        self.submit(|reply| Job::Change {
            key: key.clone(),
            write: write.clone(),
            reply,
        })
        .await
    }

    /// Queues an addition to a usage snapshot; `None` when it is to be sent on its own: nothing
    /// to add, batching turned off, or the writer task gone.
    pub(super) async fn add_usage(
        &self,
        ns: &Namespace,
        usage: &Usage,
    ) -> Option<Result<(), StoreError>> {
        if usage.amounts.is_empty() {
            return None;
        }
        self.submit(|reply| Job::Usage {
            ns: ns.clone(),
            usage: usage.clone(),
            reply,
        })
        .await
    }

    /// Queues the job made with its reply channel and waits for the answer.
    async fn submit<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Option<Result<T, StoreError>> {
        if self.counts.off.load(Ordering::Relaxed) {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        self.queue.send(job(reply)).ok()?;
        Some(answer.await.unwrap_or_else(|_| Err(stopped())))
    }
}

fn stopped() -> StoreError {
    StoreError::Transient("the store's batch writer stopped before answering".into())
}

async fn run(
    store: DynamoStore,
    mut rx: mpsc::UnboundedReceiver<Job>,
    in_flight: usize,
    counts: Arc<Counts>,
) {
    let permits = Arc::new(Semaphore::new(in_flight.max(1)));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_STATEMENTS {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // A caller that is gone learns nothing of its write: not writing it charges nobody.
        batch.retain(|job| !job.is_closed());
        // DynamoDB refuses a batch that names an item twice (two usage flushes overlap at
        // shutdown): a second write of an item goes out on its own.
        let mut items = HashSet::new();
        let (batch, again): (Vec<Job>, Vec<Job>) =
            batch.into_iter().partition(|job| items.insert(job.item()));
        for job in again {
            let store = store.clone();
            tokio::spawn(async move { store.send_alone(job).await });
        }
        // The limit only makes writes wait to go out together: a full batch has nothing more to
        // wait for, so it does not hold a call slot (the store's capacity is not capped).
        let permit = (batch.len() < MAX_STATEMENTS).then_some(permit);
        let (store, counts) = (store.clone(), counts.clone());
        tokio::spawn(async move {
            store.send(batch, &counts).await;
            drop(permit);
        });
    }
}

impl DynamoStore {
    async fn send(&self, batch: Vec<Job>, counts: &Counts) {
        if batch.len() > 1 && !counts.off.load(Ordering::Relaxed) {
            self.send_batch(batch, counts).await;
        } else {
            join_all(batch.into_iter().map(|job| self.send_alone(job))).await;
        }
    }

    /// Sends one job as its own call (`UpdateItem`) and answers it.
    async fn send_alone(&self, job: Job) {
        match job {
            Job::Change { key, write, reply } => {
                let _ = reply.send(self.write_bucket(&key, &write).await.map(Some));
            }
            Job::Usage { ns, usage, reply } => {
                let _ = reply.send(self.add_usage_alone(&ns, &usage).await);
            }
        }
    }

    async fn send_batch(&self, batch: Vec<Job>, counts: &Counts) {
        counts
            .batched
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        metrics::counter!(crate::metrics::BATCHED_WRITES).increment(batch.len() as u64);
        let mark_attr = self.mark_attr();
        let statements = batch
            .iter()
            .map(|job| statement(&self.table, &mark_attr, job))
            .collect::<Result<Vec<_>, _>>();
        let statements = match statements {
            Ok(s) => s,
            Err(e) => {
                for job in batch {
                    job.fail(StoreError::Backend(e.to_string()));
                }
                return;
            }
        };
        let result = self
            .client
            .batch_execute_statement()
            .set_statements(Some(statements))
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                if e.code() == Some("AccessDeniedException") {
                    // Refused before anything applied, as every later batch will be (a policy
                    // without PartiQL): `UpdateItem` answers for each.
                    counts.turn_off(&classify(e, &self.table).to_string());
                    counts
                        .resent
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    join_all(batch.into_iter().map(|job| self.send_alone(job))).await;
                    return;
                }
                // No answer for any of them, and no telling whether they applied (DynamoDB Local
                // applies a batch that it then refuses for naming an item twice): each caller
                // finds out by its write's mark.
                let err = match classify(e, &self.table) {
                    err @ StoreError::Transient(_) => err,
                    err => StoreError::Transient(format!(
                        "DynamoDB refused a batch of writes, which may have applied: {err}"
                    )),
                };
                for job in batch {
                    job.fail(err.clone());
                }
                return;
            }
        };
        let mut responses = out.responses.unwrap_or_default().into_iter();
        let mut alone = Vec::new();
        for job in batch {
            let Some(response) = responses.next() else {
                job.fail(StoreError::Transient(
                    "the batch came back without an answer for this write".into(),
                ));
                continue;
            };
            let Some(e) = response.error else {
                job.applied();
                continue;
            };
            match (e.code, job) {
                (Some(Code::ConditionalCheckFailed), Job::Change { write, reply, .. }) => {
                    let _ = reply.send(self.conflict(0, e.item.as_ref(), write.marks()).map(Some));
                }
                // A new snapshot or counter: the `UpdateItem` that creates it adds the amounts.
                // The failed statement is billed too: the metered store counts the one sent next.
                (Some(Code::ConditionalCheckFailed), job @ Job::Usage { .. }) => {
                    counts.created.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(crate::metrics::WRITE_UNITS).increment(1);
                    alone.push(job);
                }
                (
                    Some(
                        code @ (Code::ThrottlingError
                        | Code::RequestLimitExceeded
                        | Code::ProvisionedThroughputExceeded
                        | Code::InternalServerError
                        | Code::TransactionConflict),
                    ),
                    job,
                ) => job.fail(StoreError::Transient(format!(
                    "{}: {}",
                    code.as_str(),
                    e.message.unwrap_or_default()
                ))),
                // Not applied; `UpdateItem` gives the authoritative answer.
                (code, job) => {
                    if code == Some(Code::AccessDenied) {
                        counts.turn_off("access denied");
                    }
                    tracing::debug!(
                        "batched write refused ({:?}: {}), sending it alone",
                        code,
                        e.message.unwrap_or_default()
                    );
                    counts.resent.fetch_add(1, Ordering::Relaxed);
                    alone.push(job);
                }
            }
        }
        join_all(alone.into_iter().map(|job| self.send_alone(job))).await;
    }
}

/// A PartiQL identifier: double quotes, with any double quote in it doubled.
fn quoted(name: &str) -> String {
    if name.contains('"') {
        format!("\"{}\"", name.replace('"', "\"\""))
    } else {
        format!("\"{name}\"")
    }
}

/// The batch statement for a job.
fn statement(
    table: &str,
    mark_attr: &str,
    job: &Job,
) -> Result<BatchStatementRequest, aws_sdk_dynamodb::error::BuildError> {
    let (text, parameters, old) = match job {
        Job::Change { key, write, .. } => {
            let (text, parameters) = change_statement(table, mark_attr, key, write);
            (text, parameters, true)
        }
        Job::Usage { ns, usage, .. } => {
            let (text, parameters) = usage_statement(table, ns, usage);
            (text, parameters, false)
        }
    };
    BatchStatementRequest::builder()
        .statement(text)
        .set_parameters(Some(parameters))
        .set_return_values_on_condition_check_failure(
            old.then_some(ReturnValuesOnConditionCheckFailure::AllOld),
        )
        .build()
}

/// The PartiQL statement for a change, with its parameters in order: the clauses of
/// [`Clauses::change`], as `UpdateItem` gets them (an `ADD` becomes `SET a = a + ?`, which needs
/// `a` to exist; every bucket item has all three attributes of each of its limits).
fn change_statement(
    table: &str,
    mark_attr: &str,
    key: &BucketKey,
    write: &Write,
) -> (String, Vec<AttributeValue>) {
    let key = bucket_keys(key);
    let mut set = Vec::new();
    let mut remove = Vec::new();
    let mut conditions: Vec<(String, Option<AttributeValue>)> = [PK, SK]
        .into_iter()
        .map(|attr| (format!("{} = ?", quoted(attr)), Some(key[attr].clone())))
        .collect();
    let Write::Change(change) = write else {
        unreachable!("only changes are queued")
    };
    for c in Clauses::change(change, mark_attr) {
        match c {
            Clause::Compare(a, op, v) => {
                conditions.push((format!("{} {op} ?", quoted(&a)), Some(v)))
            }
            Clause::Missing(a) => conditions.push((format!("{} IS MISSING", quoted(&a)), None)),
            Clause::Set(a, v) => set.push((format!("{} = ?", quoted(&a)), v)),
            Clause::Add(a, v) => {
                let a = quoted(&a);
                set.push((format!("{a} = {a} + ?"), v));
            }
            Clause::Remove(a) => remove.push(quoted(&a)),
        }
    }
    render(table, set, remove, conditions)
}

/// The PartiQL statement adding a usage record's amounts to its snapshot's counters, on the
/// condition that they all exist (so that it fails with a failed condition, not a validation
/// error, when one is new).
fn usage_statement(table: &str, ns: &Namespace, usage: &Usage) -> (String, Vec<AttributeValue>) {
    let (pk, sk) = usage_key(
        ns,
        &usage.entity,
        usage.period,
        usage.start_ms,
        Some(&usage.resource),
    );
    let mut set = Vec::new();
    let mut conditions = vec![
        (format!("{} = ?", quoted(PK)), Some(s(pk))),
        (format!("{} = ?", quoted(SK)), Some(s(sk))),
    ];
    for (name, amount) in &usage.amounts {
        let a = quoted(&usage_attr(name));
        set.push((format!("{a} = {a} + ?"), n(*amount)));
        conditions.push((format!("{a} IS NOT MISSING"), None));
    }
    render(table, set, Vec::new(), conditions)
}

fn render(
    table: &str,
    set: Vec<(String, AttributeValue)>,
    remove: Vec<String>,
    conditions: Vec<(String, Option<AttributeValue>)>,
) -> (String, Vec<AttributeValue>) {
    let mut text = format!("UPDATE {}", quoted(table));
    let mut parameters = Vec::new();
    for (clause, value) in set {
        text.push_str(" SET ");
        text.push_str(&clause);
        parameters.push(value);
    }
    for attr in remove {
        text.push_str(" REMOVE ");
        text.push_str(&attr);
    }
    for (i, (clause, value)) in conditions.into_iter().enumerate() {
        text.push_str(if i == 0 { " WHERE " } else { " AND " });
        text.push_str(&clause);
        parameters.extend(value);
    }
    (text, parameters)
}

#[cfg(test)]
mod tests {
    use super::quoted;

    #[test]
    fn identifiers_are_quoted_with_their_quotes_doubled() {
        assert_eq!(quoted("b:rpm"), "\"b:rpm\"");
        assert_eq!(quoted("a\"b"), "\"a\"\"b\"");
    }
}
