//! Consumption waiting to be added to the stored usage snapshots: per (entity, resource, period,
//! period start), what the store recorded (admissions, lease settlements and refunds, signed).
//! Flushed with commutative additions, so several daemons' flushes add up.

use std::collections::HashMap;

use crate::domain::amounts::Amounts;
use crate::domain::ids::{EntityId, ResourceId};
use crate::domain::records::{Period, Usage};

#[derive(Default)]
pub(crate) struct UsageLog {
    pending: HashMap<(EntityId, ResourceId, Period, i64), Amounts>,
}

impl UsageLog {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Adds what the store recorded at `now`. A total that would leave `i64` keeps its old value
    /// (the snapshot under-counts rather than wraps) and is logged.
    pub fn record(&mut self, entity: &EntityId, resource: &ResourceId, used: &Amounts, now: i64) {
        if used.is_zero() {
            return;
        }
        for period in Period::ALL {
            let key = (entity.clone(), resource.clone(), period, period.start(now));
            if let Err(e) = self.pending.entry(key).or_default().try_add(used) {
                tracing::warn!("usage snapshot not counted: {e}");
            }
        }
    }

    /// Puts back what a failed flush took.
    pub fn restore(&mut self, usage: Vec<Usage>) {
        for u in usage {
            let Ok(amounts) = Amounts::new(u.amounts) else {
                continue;
            };
            let key = (u.entity, u.resource, u.period, u.start_ms);
            if let Err(e) = self.pending.entry(key).or_default().try_add(&amounts) {
                tracing::warn!("usage snapshot not counted: {e}");
            }
        }
    }

    pub fn take(&mut self) -> Vec<Usage> {
        self.pending
            .drain()
            .filter(|(_, amounts)| !amounts.is_zero())
            .map(|((entity, resource, period, start_ms), amounts)| Usage {
                entity,
                resource,
                period,
                start_ms,
                amounts: amounts.nonzero().to_vec(),
            })
            .collect()
    }
}
