//! Several acquires decided all or nothing (Envoy's descriptors of one request; the
//! multi-resource acquire): each is acquired, concurrently, as a lease when there are several;
//! if a binding one is refused, every admitted one is rolled back and nothing stays charged; if
//! any fails (an outage under `block`, an invalid request), the others are rolled back and the
//! failure is the answer; otherwise all are committed. One acquire alone is one call (acquire and
//! commit at once).
//!
//! The closes are settlements the limiter retries until the leases would expire; one not
//! confirmed within the deadline is logged (it stays charged if it never lands).

use futures_util::future::join_all;
use tokio::time::Instant;

use super::messages::Close;
use super::{AcquireRequest, Decision, LeaseId, Limiter, LimiterError};

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
    /// One per part, in order (leases are closed: their ids are not returned).
    pub decisions: Vec<Decision>,
    /// Whether it was admitted (and committed): no binding part was refused.
    pub admitted: bool,
}

impl Limiter {
    /// Decides `parts` all or nothing by `deadline` (see the module documentation).
    ///
    /// # Errors
    /// The first part's error (any admitted part is rolled back first), as
    /// [`Limiter::acquire`].
    pub async fn acquire_all(
        &self,
        parts: Vec<Part>,
        deadline: Instant,
    ) -> Result<Joint, LimiterError> {
        let several = parts.len() > 1;
        let binding: Vec<bool> = parts.iter().map(|p| p.binding).collect();
        let decided = join_all(parts.into_iter().map(|p| {
            let request = AcquireRequest {
                lease: several,
                ..p.request
            };
            self.acquire(request, deadline)
        }))
        .await;
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
        let how = if refused || failed {
            Close::Rollback
        } else {
            Close::Commit
        };
        self.close_all(leases, how, deadline).await;
        let decisions = decided
            .into_iter()
            .map(|d| {
                d.map(|d| match d {
                    Decision::Admitted { statuses, .. } => Decision::Admitted {
                        lease: None,
                        statuses,
                    },
                    refused => refused,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
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
