//! Generated gRPC types and services of `proto/zae_limiter/v1/ratelimit.proto`.
#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

tonic::include_proto!("zae_limiter.v1");

/// The encoded descriptor set of the API, for gRPC server reflection.
pub const DESCRIPTOR: &[u8] = tonic::include_file_descriptor_set!("zae_limiter_descriptor");

impl From<&crate::Limit> for Limit {
    /// A limit in its wire form (whole tokens).
    fn from(l: &crate::Limit) -> Self {
        use crate::domain::limit::MILLI;
        Self {
            name: l.name().to_string(),
            capacity: (l.capacity() / MILLI) as u64,
            refill_amount: (l.refill_amount() / MILLI) as u64,
            refill_period_ms: l.refill_period_ms() as u64,
            soft: l.is_soft(),
            quota_cron: l
                .calendar()
                .map(|c| c.pattern().to_owned())
                .unwrap_or_default(),
            quota_tz: l.calendar().map(|c| c.tz().to_owned()).unwrap_or_default(),
            quota_reset_after_ms: l.session_ms().unwrap_or(0) as u64,
            schedule: l
                .schedule()
                .map(|s| s.entries().map(ScheduleEntry::from).collect())
                .unwrap_or_default(),
            schedule_tz: l.schedule().map(|s| s.tz().to_owned()).unwrap_or_default(),
        }
    }
}

impl ScheduleEntry {
    /// The change the entry puts in force, milli-tokens: its scale when it has one, else the
    /// values it sets (0: none). A value past the largest taken stays past it, for the schedule
    /// to refuse by name.
    pub fn change(&self) -> crate::domain::schedule::Change {
        use crate::domain::limit::{MAX_TOKENS, MILLI};
        use crate::domain::schedule::Change;
        let milli =
            |tokens: u64| (tokens != 0).then(|| (tokens.min(MAX_TOKENS + 1) as i64) * MILLI);
        match self.scale_permille {
            0 => Change::Set {
                capacity: milli(self.capacity),
                refill_amount: milli(self.refill_amount),
                refill_period_ms: (self.refill_period_ms != 0)
                    .then(|| self.refill_period_ms.min(i64::MAX as u64) as i64),
            },
            permille => Change::Scale(permille),
        }
    }

    /// Whether it gives both a scale and values to set.
    pub fn scales_and_sets(&self) -> bool {
        self.scale_permille != 0
            && (self.capacity, self.refill_amount, self.refill_period_ms) != (0, 0, 0)
    }
}

impl From<(&str, crate::domain::schedule::Change)> for ScheduleEntry {
    /// A schedule entry in its wire form (whole tokens).
    fn from((cron, change): (&str, crate::domain::schedule::Change)) -> Self {
        use crate::domain::limit::MILLI;
        use crate::domain::schedule::Change;
        let tokens = |v: Option<i64>| v.map_or(0, |v| (v / MILLI) as u64);
        match change {
            Change::Scale(permille) => Self {
                cron: cron.to_owned(),
                scale_permille: permille,
                ..Self::default()
            },
            Change::Set {
                capacity,
                refill_amount,
                refill_period_ms,
            } => Self {
                cron: cron.to_owned(),
                scale_permille: 0,
                capacity: tokens(capacity),
                refill_amount: tokens(refill_amount),
                refill_period_ms: refill_period_ms.map_or(0, |v| v as u64),
            },
        }
    }
}

impl From<Option<crate::FailurePolicy>> for OnUnavailable {
    /// A failure policy in its wire form (`None`: unspecified).
    fn from(policy: Option<crate::FailurePolicy>) -> Self {
        match policy {
            None => Self::Unspecified,
            Some(crate::FailurePolicy::Block) => Self::Block,
            Some(crate::FailurePolicy::Allow) => Self::Allow,
        }
    }
}

impl OnUnavailable {
    /// The failure policy it names (`None`: unspecified).
    pub fn policy(self) -> Option<crate::FailurePolicy> {
        match self {
            Self::Unspecified => None,
            Self::Block => Some(crate::FailurePolicy::Block),
            Self::Allow => Some(crate::FailurePolicy::Allow),
        }
    }
}

impl From<Option<crate::Gate>> for Gate {
    /// A gate in its wire form (`None`: unspecified); a bypass's end goes beside it.
    fn from(gate: Option<crate::Gate>) -> Self {
        match gate {
            None => Self::Unspecified,
            Some(crate::Gate::Enabled) => Self::Enabled,
            Some(crate::Gate::Disabled) => Self::Disabled,
            Some(crate::Gate::Bypass { .. }) => Self::Bypass,
        }
    }
}

impl Gate {
    /// The gate it names, with a bypass's end (`None`: unspecified).
    pub fn gate(self, bypass_until_ms: Option<i64>) -> Option<crate::Gate> {
        match self {
            Self::Unspecified => None,
            Self::Enabled => Some(crate::Gate::Enabled),
            Self::Disabled => Some(crate::Gate::Disabled),
            Self::Bypass => Some(crate::Gate::Bypass {
                until_ms: bypass_until_ms,
            }),
        }
    }
}
