//! An operator's changes to one bucket outside any acquire: a reset (limits back to full, debt
//! forgiven) and a top-up (tokens given, at most the room below capacity). Each is planned by the
//! pure bucket math ([`plan_operation`]) against the stored bucket and written conditionally, so
//! it stays exact while other daemons keep deciding on that bucket; a lost race re-plans from the
//! bucket the store returned. With an idempotency key, the store keeps the first call's outcome
//! for [`ONCE_MS`] and a retry gets it back without doing anything more.

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::Admin;
use crate::domain::bucket::{Bucket, Operation, plan_operation};
use crate::domain::ids::BucketKey;
use crate::domain::limit::{LimitName, MAX_TOKENS, MILLI};
use crate::domain::records::{Actor, AuditAction, AuditEntry};
use crate::limiter::{LimiterError, within};
use crate::store::{Once, StoreError};

/// How long an idempotency key is remembered: three days.
pub const ONCE_MS: i64 = 3 * 24 * 3_600_000;

/// Tries of a conditional write that keeps losing to other writers before giving up.
const TRIES: usize = 16;

/// What a reset or top-up did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operated {
    /// Bucket items written: 0 when there was nothing to change (no bucket yet, already full).
    pub written: u32,
    /// Milli-tokens each named limit (a reset without names: each limit) gained.
    pub gained_milli: Vec<(LimitName, i64)>,
    /// The idempotency key was used before: nothing was done now, this is the first answer.
    #[serde(skip)]
    pub replayed: bool,
}

/// What the store keeps with an idempotency key: the operation, so that the key used for another
/// one is refused, and its outcome.
#[derive(Serialize, Deserialize)]
struct Outcome {
    action: String,
    resource: String,
    #[serde(flatten)]
    operated: Operated,
}

/// An idempotency key: 1-64 characters, letters, digits, `.`, `_`, `:` and `-`.
///
/// # Errors
/// `InvalidArgument` naming `idempotency_key`.
pub fn check_key(key: &str) -> Result<(), LimiterError> {
    let valid = (1..=64).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(LimiterError::invalid(
            "idempotency_key",
            format!("{key:?} is not 1-64 characters of letters, digits, '.', '_', ':' and '-'"),
        ))
    }
}

impl Admin {
    /// Fills the named limits of a bucket (`None`: all) to capacity, debt forgiven. A bucket that
    /// was never used is full already: nothing is written (the call is still audited, and its
    /// key remembered).
    ///
    /// # Errors
    /// `InvalidArgument` for a name that is not a limit of the bucket (or of its stored limits
    /// when it has no bucket yet) or a bad key, `Unavailable` when other writers kept changing
    /// the bucket through every try, or the store's error.
    pub async fn reset_bucket(
        &self,
        key: &BucketKey,
        names: Option<Vec<LimitName>>,
        once: Option<&str>,
        by: &Actor,
        deadline: Instant,
    ) -> Result<Operated, LimiterError> {
        let op = Operation::Reset(names);
        self.operate(key, op, AuditAction::BucketReset, once, by, deadline)
            .await
    }

    /// Gives each named limit of a bucket its amount (whole tokens, 1..=10^15), at most its
    /// room below capacity (a refund, not a purchase).
    ///
    /// # Errors
    /// As [`Admin::reset_bucket`], and `OutOfRange` naming the amount.
    pub async fn top_up(
        &self,
        key: &BucketKey,
        amounts: Vec<(LimitName, i64)>,
        once: Option<&str>,
        by: &Actor,
        deadline: Instant,
    ) -> Result<Operated, LimiterError> {
        if amounts.is_empty() {
            return Err(LimiterError::invalid("amounts", "is empty"));
        }
        let mut milli = Vec::with_capacity(amounts.len());
        for (name, n) in amounts {
            if !(1..=MAX_TOKENS as i64).contains(&n) {
                return Err(LimiterError::out_of_range(
                    format!("amounts[{name}]"),
                    format!("{n} is outside 1..={MAX_TOKENS} tokens"),
                ));
            }
            milli.push((name, n * MILLI));
        }
        let op = Operation::TopUp(milli);
        self.operate(key, op, AuditAction::BucketToppedUp, once, by, deadline)
            .await
    }

    async fn operate(
        &self,
        key: &BucketKey,
        op: Operation,
        action: AuditAction,
        once: Option<&str>,
        by: &Actor,
        deadline: Instant,
    ) -> Result<Operated, LimiterError> {
        if let Some(k) = once {
            check_key(k)?;
        }
        let operated = within(deadline, async {
            let mut seen = self.store().load_bucket(key).await?;
            let known = self.check_names(key, &op, seen.as_ref()).await?;
            for _ in 0..TRIES {
                let (write, gained) = match &seen {
                    Some(b) => plan_operation(b, &op, by.at_ms),
                    // Never used: full already, nothing to give.
                    None => {
                        let names = op.names().unwrap_or_else(|| known.iter().collect());
                        (None, names.into_iter().map(|n| (n.clone(), 0)).collect())
                    }
                };
                let operated = Operated {
                    written: u32::from(write.is_some()),
                    gained_milli: gained,
                    replayed: false,
                };
                let outcome = Outcome {
                    action: action.to_string(),
                    resource: key.resource.to_string(),
                    operated,
                };
                let text = serde_json::to_string(&outcome).expect("strings and numbers only");
                let record = audit_text(key, &outcome.operated, once);
                let entry = AuditEntry::new(key.entity.to_string(), action, by, None, Some(record));
                let once = once.map(|k| Once {
                    key: k.to_owned(),
                    outcome: text,
                    until_ms: by.at_ms.saturating_add(ONCE_MS),
                });
                let store = self.store();
                match store
                    .operate_bucket(key, write.as_ref(), &entry, once.as_ref())
                    .await
                {
                    Ok(None) => return Ok(outcome.operated),
                    Ok(Some(first)) => return replay(&first, action, key),
                    Err(StoreError::Conflict { current, .. }) => seen = current.map(|b| *b),
                    Err(e) => return Err(e.into()),
                }
            }
            Err(LimiterError::Store(StoreError::Transient(format!(
                "the bucket of entity {:?} on {:?} kept changing through {TRIES} tries",
                key.entity.as_str(),
                key.resource.as_str()
            ))))
        })
        .await?;
        // The change has landed: a cache this daemon could not reach (shutting down, out of
        // time) refuses on the old balance for at most `max_staleness_ms`, as other daemons'
        // do, and the caller must not hear of a failure (a retry without a key would apply it
        // again).
        if operated.written > 0
            && let Err(e) = self.limiter.bucket_changed(key, deadline).await
        {
            tracing::warn!(error = %e, "a changed bucket's cached state could not be dropped");
        }
        Ok(operated)
    }

    /// Every name the operation gives is a limit of the bucket, or, with no bucket yet, of the
    /// limits stored for it: those limits' names.
    async fn check_names(
        &self,
        key: &BucketKey,
        op: &Operation,
        seen: Option<&Bucket>,
    ) -> Result<Vec<LimitName>, LimiterError> {
        let known: Vec<LimitName> = match seen {
            Some(b) => b.limit_set().iter().map(|l| l.name().clone()).collect(),
            None => {
                let stored = self.limiter.resolved_limits(key).await?;
                stored.iter().map(|l| l.name().clone()).collect()
            }
        };
        let field = match op {
            Operation::Reset(_) => "limits",
            Operation::TopUp(_) => "amounts",
        };
        match op
            .names()
            .unwrap_or_default()
            .into_iter()
            .find(|n| !known.contains(n))
        {
            Some(unknown) => Err(LimiterError::invalid(
                field,
                format!(
                    "{:?} is not a limit of entity {:?} on {:?} (it has {})",
                    unknown.as_str(),
                    key.entity.as_str(),
                    key.resource.as_str(),
                    known
                        .iter()
                        .map(LimitName::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            None => Ok(known),
        }
    }
}

/// The audit record's text: the resource, what each limit gained and the key.
fn audit_text(key: &BucketKey, operated: &Operated, once: Option<&str>) -> String {
    let gained: serde_json::Map<String, serde_json::Value> = operated
        .gained_milli
        .iter()
        .map(|(n, g)| (n.to_string(), (*g).into()))
        .collect();
    serde_json::json!({
        "resource": key.resource.as_str(),
        "gained_milli": gained,
        "idempotency_key": once,
    })
    .to_string()
}

/// The first call's answer for a key in use, if it was this same operation.
fn replay(first: &str, action: AuditAction, key: &BucketKey) -> Result<Operated, LimiterError> {
    let outcome: Outcome = serde_json::from_str(first).map_err(|e| {
        LimiterError::Store(StoreError::Corrupt(format!("idempotency record: {e}")))
    })?;
    if outcome.action != action.as_str() || outcome.resource != key.resource.as_str() {
        return Err(LimiterError::invalid(
            "idempotency_key",
            format!(
                "was used for a {} of {:?}; use a new key for another operation",
                outcome.action, outcome.resource
            ),
        ));
    }
    Ok(Operated {
        replayed: true,
        ..outcome.operated
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_take_the_librarys_alphabet_and_length() {
        for good in ["a", "order-17:v2.retry_1", &"k".repeat(64)] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in ["", "has space", "slash/", &"k".repeat(65), "é"] {
            let err = check_key(bad).unwrap_err().to_string();
            assert!(err.starts_with("idempotency_key:"), "{err}");
        }
    }
}
