//! A write whose answer was lost (a time-out, a reset) may or may not have landed. Nothing else is
//! written to the lane's buckets until that is known: the group reads the bucket, whose mark
//! tells whether the write landed (see [`crate::domain::bucket::Mark`]); if it does not, a write
//! that only moves the mark fences the lost write off for good. What was owed either way is then
//! settled: admissions whose callers heard the failure policy are given back if the write landed,
//! settlements are done if it landed and written again if not.

use super::settle::Settle;
use super::{Busy, Ctx, Lane};
use crate::domain::bucket::Bucket;
use crate::domain::ids::EntityId;
use crate::limiter::messages::Resolution;
use crate::metrics as m;
use crate::store::StoreError;

/// A write whose outcome is unknown: what is owed either way.
pub(super) struct Unresolved {
    pub entity: EntityId,
    /// The mark the write moves its buckets to.
    pub mark: u64,
    pub owed: Owed,
}

pub(super) enum Owed {
    /// Admissions whose callers were told they were not admitted: given back if the write
    /// landed.
    Refunds(Vec<Settle>),
    /// Settlements: done if the write landed, written again if not.
    Settles(Vec<Settle>),
}

impl Lane {
    /// A write of `written` failed without an answer: it may or may not have landed.
    pub(super) fn unsure(&mut self, written: &[(EntityId, Bucket)], owed: Owed) {
        for (entity, _) in written {
            self.view.forget(entity);
        }
        // One write is all or nothing, so its first bucket tells for all of them.
        let (entity, expected) = written
            .first()
            .expect("a write touches at least one bucket");
        let mark = expected
            .mark
            .expect("every write is marked before it is sent");
        self.backoff.failed();
        self.unresolved = Some(Unresolved {
            entity: entity.clone(),
            mark,
            owed,
        });
    }

    /// The outcome of the unknown write is known, with the bucket as it is now.
    pub fn resolved(&mut self, result: Result<Resolution, StoreError>, ctx: &Ctx<'_>) {
        if !matches!(self.busy, Busy::Resolving) {
            return;
        }
        self.busy = Busy::Idle;
        let Resolution { landed, current } = match result {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!("the outcome of a write is still unknown: {e}");
                self.backoff.failed();
                return;
            }
        };
        let Some(u) = self.unresolved.take() else {
            return;
        };
        self.backoff.succeeded();
        self.view.confirm(u.entity, current, ctx.now, true);
        match (u.owed, landed) {
            (Owed::Refunds(refunds), true) => {
                metrics::counter!(m::COMPENSATIONS).increment(refunds.len() as u64);
                for refund in refunds {
                    self.settle(refund);
                }
            }
            (Owed::Refunds(_), false) => {}
            (Owed::Settles(settles), true) => self.settled(settles),
            (Owed::Settles(settles), false) => self.settles.requeue(settles),
        }
    }
}
