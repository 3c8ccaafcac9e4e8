//! Consumption waiting to be added to the stored usage snapshots: per (namespace, entity,
//! resource, period, period start), what the store recorded (admissions, lease settlements and
//! refunds, signed). One log for the whole limiter, written to by every actor and flushed on a
//! timer with commutative additions, so several daemons' flushes add up and an actor can stop
//! (its entity idle) without waiting for the next flush.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::domain::amounts::Amounts;
use crate::domain::ids::{EntityId, Namespace, ResourceId};
use crate::domain::records::{Period, Usage};

type Key = (Namespace, EntityId, ResourceId, Period, i64);

#[derive(Default)]
pub(crate) struct UsageLog {
    pending: Mutex<HashMap<Key, Amounts>>,
    /// Snapshot additions taken by a flush and not finished yet.
    writing: AtomicUsize,
}

impl UsageLog {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Amounts>> {
        // A panic while holding the lock leaves sums that are still valid.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds what the store recorded at `now`. A total that would leave `i64` keeps its old value
    /// (the snapshot under-counts rather than wraps) and is logged.
    pub fn record(
        &self,
        ns: &Namespace,
        entity: &EntityId,
        resource: &ResourceId,
        used: &Amounts,
        now: i64,
    ) {
        if used.is_zero() {
            return;
        }
        let mut pending = self.pending();
        for period in Period::ALL {
            let key = (
                ns.clone(),
                entity.clone(),
                resource.clone(),
                period,
                period.start(now),
            );
            if let Err(e) = pending.entry(key).or_default().try_add(used) {
                tracing::warn!("usage snapshot not counted: {e}");
            }
        }
        self.publish(pending.len());
    }

    /// Puts back what a failed flush took.
    pub fn restore(&self, ns: &Namespace, usage: Vec<Usage>) {
        let mut pending = self.pending();
        for u in usage {
            let Ok(amounts) = Amounts::new(u.amounts) else {
                continue;
            };
            let key = (ns.clone(), u.entity, u.resource, u.period, u.start_ms);
            if let Err(e) = pending.entry(key).or_default().try_add(&amounts) {
                tracing::warn!("usage snapshot not counted: {e}");
            }
        }
        self.publish(pending.len());
    }

    /// Everything pending, by namespace; the log is empty afterwards. Each snapshot taken is
    /// counted as being written until [`UsageLog::written`] is called for it.
    pub fn take(&self) -> HashMap<Namespace, Vec<Usage>> {
        // Taken whole, so the map's memory goes too (a drained map keeps its capacity).
        let drained = std::mem::take(&mut *self.pending());
        let mut out: HashMap<Namespace, Vec<Usage>> = HashMap::new();
        for ((ns, entity, resource, period, start_ms), amounts) in drained {
            if amounts.is_zero() {
                continue;
            }
            out.entry(ns).or_default().push(Usage {
                entity,
                resource,
                period,
                start_ms,
                amounts: amounts.nonzero().to_vec(),
            });
        }
        let taken = out.values().map(Vec::len).sum::<usize>();
        self.writing.fetch_add(taken, Ordering::Relaxed);
        self.publish(self.pending().len());
        out
    }

    /// One snapshot taken by [`UsageLog::take`] is written (or put back with `restore`).
    pub fn written(&self) {
        self.writing.fetch_sub(1, Ordering::Relaxed);
        self.publish(self.pending().len());
    }

    /// Sets the pending-snapshots gauge: `in_log` in the log plus those being written.
    fn publish(&self, in_log: usize) {
        let total = in_log + self.writing.load(Ordering::Relaxed);
        metrics::gauge!(crate::metrics::USAGE_PENDING).set(total as f64);
    }
}
