//! Consumption waiting to be added to the stored usage snapshots: per (namespace, entity,
//! resource, period, period start), what the store recorded (admissions, lease settlements and
//! refunds, signed). One log for the whole limiter, written to by every actor and flushed on a
//! timer with commutative additions, so several daemons' flushes add up and an actor can stop
//! (its entity idle) without waiting for the next flush.
//!
//! One flush at a time: a flush holds the log's flush lock from the moment it takes the pending
//! sums until each addition it took is written or put back. So the last flush at shutdown starts
//! only after a flush on the timer has finished, and sees what that one put back; once the last
//! flush has begun, flushes on the timer do nothing. (Before, the last flush could run beside a
//! timer's flush and return while that one's additions were still on their way: the process then
//! exited, and they were lost.)

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;

use crate::domain::amounts::Amounts;
use crate::domain::ids::{EntityId, Namespace, ResourceId};
use crate::domain::records::{Period, Usage};
use crate::store::Store;

type Key = (Namespace, EntityId, ResourceId, Period, i64);

/// Usage snapshot additions in flight at once during a flush: two full batches of the DynamoDB
/// store's batch writer.
const WRITES_AT_ONCE: usize = 50;

/// Which flush runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flush {
    /// On the timer, or asked for: does nothing once the last flush has begun.
    Periodic,
    /// At shutdown: every flush after it is the last one too.
    Last,
}

#[derive(Default)]
pub(crate) struct UsageLog {
    pending: Mutex<HashMap<Key, Amounts>>,
    /// Snapshot additions taken by a flush and not finished yet.
    writing: AtomicUsize,
    /// Held by the flush in progress; `true` once the last flush has begun.
    flushing: tokio::sync::Mutex<bool>,
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

    /// Adds what is pending to the stored snapshots, one snapshot per call (so a failure puts
    /// back exactly what was not added), several calls at once; after any flush in progress.
    /// Returns how many additions failed and were put back.
    pub async fn flush(&self, store: &dyn Store, which: Flush) -> usize {
        let mut last = self.flushing.lock().await;
        if *last && which == Flush::Periodic {
            return 0;
        }
        *last |= which == Flush::Last;
        let failed = AtomicUsize::new(0);
        let calls = self
            .take()
            .into_iter()
            .flat_map(|(ns, usage)| usage.into_iter().map(move |u| (ns.clone(), u)));
        futures_util::stream::iter(calls)
            .for_each_concurrent(WRITES_AT_ONCE, |(ns, u)| {
                let failed = &failed;
                async move {
                    if let Err(e) = store.add_usage(&ns, std::slice::from_ref(&u)).await {
                        tracing::warn!("usage flush failed, kept for the next one: {e}");
                        self.restore(&ns, vec![u]);
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    self.written();
                }
            })
            .await;
        failed.into_inner()
    }

    /// Snapshot additions waiting or being written.
    pub fn len(&self) -> usize {
        self.pending().len() + self.writing.load(Ordering::Relaxed)
    }

    /// Puts back what a failed flush took.
    fn restore(&self, ns: &Namespace, usage: Vec<Usage>) {
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
    fn take(&self) -> HashMap<Namespace, Vec<Usage>> {
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
    fn written(&self) {
        self.writing.fetch_sub(1, Ordering::Relaxed);
        self.publish(self.pending().len());
    }

    /// Sets the pending-snapshots gauge: `in_log` in the log plus those being written.
    fn publish(&self, in_log: usize) {
        let total = in_log + self.writing.load(Ordering::Relaxed);
        metrics::gauge!(crate::metrics::USAGE_PENDING).set(total as f64);
    }
}
