//! The store-level acquire: plan against a seen bucket state, write conditionally, and on a
//! conflict re-plan from the item the store returned (no extra read).
//!
//! A single acquire with no daemon around it, for tools and tests (the daemon decides batches with
//! [`crate::domain::batch::decide_batch`] and writes them itself). It reads once when it has seen
//! nothing.

use crate::domain::amounts::{UnknownLimit, check_names};
use crate::domain::bucket::{Bucket, Plan, Rejection, Write, plan};
use crate::domain::ids::BucketKey;
use crate::domain::limit::{Limit, LimitName};
use crate::store::{Store, StoreError};

/// How many conflicts one acquire rides out before giving up. Each conflict means another writer
/// made progress, so this is only reached under pathological contention.
pub const MAX_ATTEMPTS: usize = 32;

/// The result of an acquire that reached the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted and durable; `bucket` is the stored state after the write.
    Admitted { bucket: Bucket },
    /// Refused; `bucket` is the state the refusal was decided on (`None`: not stored yet).
    Rejected {
        rejection: Rejection,
        bucket: Option<Bucket>,
    },
}

/// What the caller knows of the stored bucket before it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Nothing: read it first.
    Unread,
    /// It was not stored (as of the caller's last look).
    Absent,
    /// It was stored like this (as of the caller's last look).
    Bucket(Bucket),
}

/// Why an acquire could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    UnknownLimit(#[from] UnknownLimit),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Consumes `amounts` (milli-tokens per limit) from the bucket at `key` under `limits` (canonical
/// order), all limits or none, planning from what the caller has `seen` (a stale state only costs
/// a conflict, answered with the current item).
///
/// # Errors
/// [`ConsumeError::UnknownLimit`] when `amounts` names a limit outside `limits`;
/// [`ConsumeError::Store`] when the store fails, or [`StoreError::Transient`] after
/// [`MAX_ATTEMPTS`] conflicts in a row.
pub async fn consume(
    store: &dyn Store,
    key: &BucketKey,
    limits: &[Limit],
    amounts: &[(LimitName, i64)],
    now: i64,
    seen: Seen,
) -> Result<Outcome, ConsumeError> {
    check_names(amounts, &[limits])?;
    let mut seen = match seen {
        Seen::Unread => store.load_bucket(key).await?,
        Seen::Absent => None,
        Seen::Bucket(bucket) => Some(bucket),
    };
    for _ in 0..MAX_ATTEMPTS {
        let write = match plan(seen.as_ref(), limits, amounts, now) {
            Plan::Reject(rejection) => {
                return Ok(Outcome::Rejected {
                    rejection,
                    bucket: seen,
                });
            }
            Plan::Admit { write, expected } => {
                if let Write::Change(change) = &write
                    && change.is_noop()
                {
                    return Ok(Outcome::Admitted { bucket: expected });
                }
                write
            }
        };
        match store.write_bucket(key, &write).await {
            Ok(bucket) => return Ok(Outcome::Admitted { bucket }),
            Err(StoreError::Conflict { current, .. }) => seen = current.map(|b| *b),
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Transient(format!("gave up after {MAX_ATTEMPTS} conflicting writes")).into())
}
