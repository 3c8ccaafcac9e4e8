//! Several acquires decided all or nothing: Envoy's descriptors of one request
//! ([`Limiter::acquire_all`]) and the multi-resource acquire ([`Limiter::acquire_resources`]).
//! Each is acquired, concurrently, as a lease when there are several; if a binding one is
//! refused, every admitted one is rolled back and nothing stays charged; if any fails (a disabled
//! resource, an outage under `block`, an invalid request), the others are rolled back and the
//! failure is the answer (a disabled resource first: it outranks every other answer); otherwise
//! all are committed, or, for a caller who asked for leases, kept open as its leases. One acquire
//! alone is one call (acquire and commit at once).
//!
//! Each resource is its own lane and its own write, so the all or nothing is a compensation (a
//! rollback of what was admitted), not one transaction: a concurrent reader may see a debit that
//! is then given back, never one that stays for a refused request.
//!
//! The closes are settlements the limiter retries until the leases would expire; one not
//! confirmed within the deadline is logged (it stays charged if it never lands).

use futures_util::future::join_all;
use tokio::time::Instant;

use super::messages::Close;
use super::{AcquireRequest, Decision, LeaseId, Limiter, LimiterError};
use crate::domain::amounts::Amounts;
use crate::domain::ids::{BucketKey, ResourceId};
use crate::metrics as m;

/// The most resources one acquire charges: its own and those of `also`.
pub const MAX_RESOURCES: usize = 16;

/// One acquire of a joint request.
#[derive(Debug, Clone)]
pub struct Part {
    pub request: AcquireRequest,
    /// Whether its refusal refuses them all (`false`: a shadow, decided and reported only).
    pub binding: bool,
}

/// How a joint request was decided.
#[derive(Debug, Clone)]
pub struct Joint {
    /// One per part, in order. Leases are closed (their ids are not returned), except those of
    /// an admitted [`Limiter::acquire_resources`] that asked for them.
    pub decisions: Vec<Decision>,
    /// Whether it was admitted (and committed, or held): no binding part was refused.
    pub admitted: bool,
}

impl Limiter {
    /// Decides `parts` all or nothing by `deadline`, committing them when admitted (see the
    /// module documentation).
    ///
    /// # Errors
    /// The first part's error (any admitted part is rolled back first; a disabled resource comes
    /// before every other error), as [`Limiter::acquire`].
    pub async fn acquire_all(
        &self,
        parts: Vec<Part>,
        deadline: Instant,
    ) -> Result<Joint, LimiterError> {
        self.joint(parts, false, deadline).await.map_err(|(_, e)| e)
    }

    /// Acquires `req` and, with it, all or none, the amounts of `also` on further resources of
    /// the same entity: each resolves its own stored limits, gate and cascade parent. When one
    /// is refused, everything admitted is given back before the answer. Admitted with
    /// `req.lease`: one open lease per resource, `req`'s first (each adjusted, committed and
    /// rolled back on its own); else all are committed.
    ///
    /// # Errors
    /// [`LimiterError::InvalidArgument`] naming `also` for more than [`MAX_RESOURCES`]
    /// resources, a resource named twice or `also` with explicit limits (a limit list names no
    /// resource); a part's error as [`Limiter::acquire_all`], its field prefixed with
    /// `also[i].` for the `i`th of `also`.
    pub async fn acquire_resources(
        &self,
        req: AcquireRequest,
        also: Vec<(ResourceId, Amounts)>,
        deadline: Instant,
    ) -> Result<Joint, LimiterError> {
        if also.is_empty() {
            let hold = req.lease;
            let part = Part {
                request: req,
                binding: true,
            };
            return self
                .joint(vec![part], hold, deadline)
                .await
                .map_err(|(_, e)| e);
        }
        if 1 + also.len() > MAX_RESOURCES {
            return Err(LimiterError::invalid(
                "also",
                format!(
                    "at most {MAX_RESOURCES} resources per acquire, got {}",
                    1 + also.len()
                ),
            ));
        }
        if req.limits.is_some() {
            return Err(LimiterError::invalid(
                "also",
                "cannot be combined with limits: a list of limits names no resource",
            ));
        }
        for (i, (resource, _)) in also.iter().enumerate() {
            let twice = *resource == req.key.resource
                || also[..i].iter().any(|(earlier, _)| earlier == resource);
            if twice {
                return Err(LimiterError::invalid(
                    format!("also[{i}].resource"),
                    format!("{resource:?} is named twice; each resource appears once"),
                ));
            }
        }
        let hold = req.lease;
        let mut parts = Vec::with_capacity(1 + also.len());
        for (resource, amounts) in also {
            let request = AcquireRequest {
                key: BucketKey {
                    resource,
                    ..req.key.clone()
                },
                amounts,
                ..req.clone()
            };
            parts.push(Part {
                request,
                binding: true,
            });
        }
        parts.insert(
            0,
            Part {
                request: req,
                binding: true,
            },
        );
        self.joint(parts, hold, deadline)
            .await
            .map_err(|(i, e)| match (i.checked_sub(1), e) {
                (Some(i), LimiterError::InvalidArgument { field, message }) => {
                    LimiterError::invalid(format!("also[{i}].{field}"), message)
                }
                (Some(i), LimiterError::OutOfRange { field, message }) => {
                    LimiterError::out_of_range(format!("also[{i}].{field}"), message)
                }
                (_, e) => e,
            })
    }

    /// Decides `parts` all or nothing; admitted, they are committed, or kept open when `hold`.
    /// An error comes with the index of the part that failed.
    async fn joint(
        &self,
        parts: Vec<Part>,
        hold: bool,
        deadline: Instant,
    ) -> Result<Joint, (usize, LimiterError)> {
        let started = std::time::Instant::now();
        let lease = hold || parts.len() > 1;
        let binding: Vec<bool> = parts.iter().map(|p| p.binding).collect();
        let requests: Vec<AcquireRequest> = parts
            .into_iter()
            .map(|p| AcquireRequest { lease, ..p.request })
            .collect();
        let policies: Vec<_> = requests.iter().map(|r| self.policy_for(r)).collect();
        let prepared = join_all(requests.into_iter().map(|r| self.prepare(r, deadline))).await;
        // A part that could not be prepared is answered now, by the failure policy for an
        // outage. One that fails (invalid, disabled, an outage not let through) fails them all
        // before anything is charged.
        let mut early: Vec<Option<Result<Decision, LimiterError>>> = Vec::new();
        let mut ready = Vec::new();
        for (p, policy) in prepared.into_iter().zip(&policies) {
            match p {
                Ok(p) => {
                    early.push(None);
                    ready.push(Some(p));
                }
                Err(e) => {
                    early.push(Some(self.decide(Err(e), lease, *policy).await));
                    ready.push(None);
                }
            }
        }
        if let Some(i) = failure(&early) {
            let e = early.swap_remove(i).and_then(Result::err);
            return Err((i, e.expect("the failure is an error")));
        }
        let dispatched = join_all(
            ready
                .into_iter()
                .zip(&policies)
                .map(|(p, policy)| async move {
                    match p {
                        Some(p) => Some(self.decide(Ok(p), lease, *policy).await),
                        None => None,
                    }
                }),
        )
        .await;
        let decided: Vec<Result<Decision, LimiterError>> = early
            .into_iter()
            .zip(dispatched)
            .map(|(early, later)| early.or(later).expect("each part is decided once"))
            .collect();
        for _ in &decided {
            m::decision_time(started.elapsed().as_secs_f64());
        }
        let leases: Vec<LeaseId> = decided
            .iter()
            .filter_map(|d| match d {
                Ok(Decision::Admitted { lease, .. }) => *lease,
                _ => None,
            })
            .collect();
        let refused = decided
            .iter()
            .zip(&binding)
            .any(|(d, binding)| *binding && matches!(d, Ok(Decision::Rejected { .. })));
        let failed = decided.iter().any(Result::is_err);
        let close = if refused || failed {
            Some(Close::Rollback)
        } else if hold {
            None
        } else {
            Some(Close::Commit)
        };
        if let Some(how) = close {
            self.close_all(leases, how, deadline).await;
        }
        let decided: Vec<_> = decided.into_iter().map(Some).collect();
        let failure = failure(&decided);
        let mut decisions = Vec::with_capacity(decided.len());
        for (i, d) in decided.into_iter().flatten().enumerate() {
            match d {
                Ok(Decision::Admitted {
                    lease,
                    statuses,
                    bypassed,
                }) => decisions.push(Decision::Admitted {
                    lease: lease.filter(|_| close.is_none()),
                    statuses,
                    bypassed,
                }),
                Ok(refused) => decisions.push(refused),
                Err(e) if failure == Some(i) => return Err((i, e)),
                Err(_) => {}
            }
        }
        Ok(Joint {
            decisions,
            admitted: !refused,
        })
    }

    async fn close_all(&self, leases: Vec<LeaseId>, how: Close, deadline: Instant) {
        let closes = leases.into_iter().map(|lease| async move {
            let closed = match how {
                Close::Commit => self.commit(lease, deadline).await,
                Close::Rollback => self.rollback(lease, deadline).await,
            };
            if let Err(e) = closed {
                // The limiter keeps retrying a settlement until the lease expires; an unclosed
                // lease stays consumed.
                tracing::warn!(%lease, how = how.done(), error = %e, "lease not closed in time");
            }
        });
        join_all(closes).await;
    }
}

/// The part whose error answers a joint request: a disabled resource (it outranks every other
/// answer), else the first failure; `None` when no part (decided so far) failed.
fn failure(decided: &[Option<Result<Decision, LimiterError>>]) -> Option<usize> {
    let failed = |disabled: bool| {
        decided.iter().position(|d| match d {
            Some(Err(LimiterError::Disabled { .. })) => true,
            Some(Err(_)) => !disabled,
            _ => false,
        })
    };
    failed(true).or_else(|| failed(false))
}
