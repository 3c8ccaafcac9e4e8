//! Single-bucket writes sent together: while `in_flight` write calls are out, the writes that
//! arrive meanwhile wait and then go out in one PartiQL `BatchExecuteStatement` (up to 25; a full
//! batch goes out at once, so the limit never caps how many writes the store takes). Each
//! statement is the same conditional update as the `UpdateItem` it replaces, applied or refused on
//! its own (no transaction: one write unit each), so a batch answers for each write separately.
//! One call of the SDK costs about five times less CPU per write this way.
//!
//! A batch does not return new images, so a batched write answers `Ok(None)` ("applied"; the
//! caller knows the bucket as planned) where a write sent alone answers with the stored bucket. A
//! refused condition comes back with the item as stored (`ALL_OLD`), as from `UpdateItem`. A
//! statement that DynamoDB could not take as PartiQL is sent again on its own as `UpdateItem`:
//! a statement error other than a failed condition or throttling means it was not applied. A
//! batch refused as a whole for good (an IAM policy without `dynamodb:PartiQLUpdate`) turns
//! batching off: its writes and all later ones go out one call each.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use aws_sdk_dynamodb::types::{
    AttributeValue, BatchStatementErrorCodeEnum as Code, BatchStatementRequest,
    ReturnValuesOnConditionCheckFailure,
};
use futures_util::future::join_all;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::schema::{PK, SK};
use super::{Clause, Clauses, DynamoStore, bucket_keys, classify};
use crate::domain::bucket::{Bucket, Write};
use crate::domain::ids::BucketKey;
use crate::store::{Store, StoreError};

/// DynamoDB's limit of statements in one batch.
const MAX_STATEMENTS: usize = 25;

type Answer = Result<Option<Bucket>, StoreError>;

struct Pending {
    key: BucketKey,
    /// Always a change: creates are never queued.
    write: Write,
    reply: oneshot::Sender<Answer>,
}

/// The queue in front of the writer task; the task ends when the last store holding it is gone.
#[derive(Debug)]
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Pending>,
    counts: Arc<Counts>,
}

/// What the writer did (for tests and benchmarks), and whether it still batches.
#[derive(Debug, Default)]
struct Counts {
    /// Writes sent inside a batch of several.
    batched: AtomicU64,
    /// Batched writes that DynamoDB refused as statements, sent again on their own.
    resent: AtomicU64,
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

    /// Writes sent inside a batch of several so far, and how many of those were sent again on
    /// their own.
    pub(super) fn counts(&self) -> (u64, u64) {
        let c = &self.counts;
        (
            c.batched.load(Ordering::Relaxed),
            c.resent.load(Ordering::Relaxed),
        )
    }

    /// Queues a change; `None` when it is to be sent on its own: a create, batching turned
    /// off, or the writer task gone (its runtime shut down).
    pub(super) async fn write(&self, key: &BucketKey, write: &Write) -> Option<Answer> {
        if matches!(write, Write::Create(_)) {
            return None;
        }
        if self.counts.off.load(Ordering::Relaxed) {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            key: key.clone(),
            write: write.clone(),
            reply,
        };
        self.queue.send(pending).ok()?;
        Some(answer.await.unwrap_or_else(|_| {
            Err(StoreError::Transient(
                "the store's batch writer stopped before answering".into(),
            ))
        }))
    }
}

async fn run(
    store: DynamoStore,
    mut rx: mpsc::UnboundedReceiver<Pending>,
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
        batch.retain(|p| !p.reply.is_closed());
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
    async fn send(&self, batch: Vec<Pending>, counts: &Counts) {
        if batch.len() > 1 && !counts.off.load(Ordering::Relaxed) {
            self.send_batch(batch, counts).await;
        } else {
            self.send_alone(batch).await;
        }
    }

    /// One `UpdateItem` each, at once.
    async fn send_alone(&self, batch: Vec<Pending>) {
        join_all(batch.into_iter().map(|p| async move {
            let answer = self.update_alone(&p).await;
            let _ = p.reply.send(answer);
        }))
        .await;
    }

    async fn update_alone(&self, p: &Pending) -> Answer {
        self.write_bucket(&p.key, &p.write).await.map(Some)
    }

    async fn send_batch(&self, batch: Vec<Pending>, counts: &Counts) {
        counts
            .batched
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        metrics::counter!(crate::metrics::BATCHED_WRITES).increment(batch.len() as u64);
        let statements = batch
            .iter()
            .map(|p| {
                let (statement, parameters) = statement(&self.table, &self.mark_attr(), p);
                BatchStatementRequest::builder()
                    .statement(statement)
                    .set_parameters(Some(parameters))
                    .return_values_on_condition_check_failure(
                        ReturnValuesOnConditionCheckFailure::AllOld,
                    )
                    .build()
            })
            .collect::<Result<Vec<_>, _>>();
        let statements = match statements {
            Ok(s) => s,
            Err(e) => {
                for p in batch {
                    let _ = p.reply.send(Err(StoreError::Backend(e.to_string())));
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
                let err = classify(e, &self.table);
                if err.is_transient() {
                    // No answer for any of them: each caller finds out by its write's mark.
                    for p in batch {
                        let _ = p.reply.send(Err(err.clone()));
                    }
                } else {
                    // Refused as a whole, so none applied: `UpdateItem` answers for each.
                    counts.turn_off(&err.to_string());
                    counts
                        .resent
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    self.send_alone(batch).await;
                }
                return;
            }
        };
        let mut responses = out.responses.unwrap_or_default().into_iter();
        for p in batch {
            let answer = match responses.next() {
                None => Err(StoreError::Transient(
                    "the batch came back without an answer for this write".into(),
                )),
                Some(r) => match r.error {
                    None => Ok(None),
                    Some(e) => match e.code {
                        Some(Code::ConditionalCheckFailed) => {
                            self.conflict(0, e.item.as_ref(), p.write.seq()).map(Some)
                        }
                        Some(
                            code @ (Code::ThrottlingError
                            | Code::RequestLimitExceeded
                            | Code::ProvisionedThroughputExceeded
                            | Code::InternalServerError
                            | Code::TransactionConflict),
                        ) => Err(StoreError::Transient(format!(
                            "{}: {}",
                            code.as_str(),
                            e.message.unwrap_or_default()
                        ))),
                        // Not applied; `UpdateItem` gives the authoritative answer.
                        code => {
                            if code == Some(Code::AccessDenied) {
                                counts.turn_off("access denied");
                            }
                            tracing::debug!(
                                "batched write refused ({:?}: {}), sending it alone",
                                code,
                                e.message.unwrap_or_default()
                            );
                            counts.resent.fetch_add(1, Ordering::Relaxed);
                            self.update_alone(&p).await
                        }
                    },
                },
            };
            let _ = p.reply.send(answer);
        }
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

/// The PartiQL statement for a change, with its parameters in order: the clauses of
/// [`Clauses::change`], as `UpdateItem` gets them (an `ADD` becomes `SET a = a + ?`, which needs
/// `a` to exist; every bucket item has all three attributes of each of its limits).
fn statement(table: &str, mark_attr: &str, p: &Pending) -> (String, Vec<AttributeValue>) {
    let key = bucket_keys(&p.key);
    let mut set = Vec::new();
    let mut remove = Vec::new();
    let mut conditions: Vec<(String, Option<AttributeValue>)> = [PK, SK]
        .into_iter()
        .map(|attr| (format!("{} = ?", quoted(attr)), Some(key[attr].clone())))
        .collect();
    let Write::Change(change) = &p.write else {
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
