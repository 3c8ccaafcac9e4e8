//! Entities, stored limit scopes and audit records: plain data, no behaviour beyond validation.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::ids::{EntityId, ResourceId};

/// The deepest entity hierarchy: moves that would make a deeper one are refused, and walks up a
/// hierarchy stop there.
pub const MAX_DEPTH: usize = 64;

/// Something limits apply to: an API key, a user, a project. An entity with `cascade` on charges
/// its parent's buckets too, in the same atomic commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    pub id: EntityId,
    pub name: String,
    pub parent: Option<EntityId>,
    pub cascade: bool,
    pub metadata: BTreeMap<String, String>,
}

/// Where a stored limit set applies. Resolution order: entity+resource, entity default, resource,
/// system; the first level that has limits supplies the whole set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitScope {
    EntityResource(EntityId, ResourceId),
    Entity(EntityId),
    Resource(ResourceId),
    System,
}

impl std::fmt::Display for LimitScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EntityResource(e, r) => write!(f, "entity {e} on resource {r}"),
            Self::Entity(e) => write!(f, "entity {e}"),
            Self::Resource(r) => write!(f, "resource {r}"),
            Self::System => f.write_str("the system level"),
        }
    }
}

impl LimitScope {
    /// The audit subject of a change at this scope: the entity id for entity scopes, otherwise a
    /// name that no entity id can clash with in meaning (`#resource:...`, `#system`).
    pub fn audit_subject(&self) -> String {
        match self {
            Self::EntityResource(e, _) | Self::Entity(e) => e.to_string(),
            Self::Resource(r) => format!("#resource:{r}"),
            Self::System => "#system".to_owned(),
        }
    }
}

/// Whether acquires on a resource are served, as set at one level (entity + resource, entity,
/// resource: see [`gate_scopes`]). `Enabled` is explicit, so an entity can be served on a
/// resource disabled for everyone else. `Bypass` admits everything without debiting the
/// bucket's balances (its consumption is still counted), until `until_ms` when one is given: an
/// expired bypass is as if the level had no gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gate {
    Enabled,
    Disabled,
    Bypass { until_ms: Option<i64> },
}

impl Gate {
    /// The gate as stored and audited: `enabled`, `disabled`, `bypass`, `bypass until <ms>`.
    pub fn text(self) -> String {
        match self {
            Self::Enabled => "enabled".to_owned(),
            Self::Disabled => "disabled".to_owned(),
            Self::Bypass { until_ms: None } => "bypass".to_owned(),
            Self::Bypass {
                until_ms: Some(until),
            } => format!("bypass until {until}"),
        }
    }

    /// # Errors
    /// The text, when it names no gate.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "enabled" => Ok(Self::Enabled),
            "disabled" => Ok(Self::Disabled),
            "bypass" => Ok(Self::Bypass { until_ms: None }),
            other => other
                .strip_prefix("bypass until ")
                .and_then(|ms| ms.parse().ok())
                .map(|until| Self::Bypass {
                    until_ms: Some(until),
                })
                .ok_or_else(|| other.to_owned()),
        }
    }

    /// Whether the gate still holds at `now` (a bypass past its end does not).
    pub fn holds_at(self, now: i64) -> bool {
        match self {
            Self::Bypass {
                until_ms: Some(until),
            } => now < until,
            _ => true,
        }
    }
}

/// The levels whose settings decide how `entity` is served on `resource` (its gate, whether it
/// cascades), in the order they are consulted: for each setting, the first level that has one
/// decides.
pub fn gate_scopes(entity: &EntityId, resource: &ResourceId) -> [LimitScope; 3] {
    [
        LimitScope::EntityResource(entity.clone(), resource.clone()),
        LimitScope::Entity(entity.clone()),
        LimitScope::Resource(resource.clone()),
    ]
}

/// What one level (see [`gate_scopes`]) stores about acquires on a resource; each unset unless
/// stored there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LevelSettings {
    pub gate: Option<Gate>,
    /// Whether an acquire of a child entity also charges its parent (see [`deciding_cascade`]).
    pub cascade: Option<bool>,
}

/// The gate that decides at `now`, from the levels' settings in [`gate_scopes`] order: the first
/// one set that still holds (see [`Gate::holds_at`]), with its position; `None` when no level has
/// one (served).
pub fn deciding_gate(levels: &[LevelSettings], now: i64) -> Option<(usize, Gate)> {
    levels
        .iter()
        .enumerate()
        .find_map(|(i, l)| l.gate.filter(|g| g.holds_at(now)).map(|g| (i, g)))
}

/// Whether an acquire charges the entity's parent too: the first level (in [`gate_scopes`]
/// order) with a cascade policy decides, else the entity's own flag.
pub fn deciding_cascade(levels: &[LevelSettings], entity_flag: bool) -> bool {
    levels.iter().find_map(|l| l.cascade).unwrap_or(entity_flag)
}

/// A cascade policy as stored and audited.
pub fn cascade_text(cascade: bool) -> &'static str {
    if cascade { "on" } else { "off" }
}

/// # Errors
/// The text, when it is neither `on` nor `off`.
pub fn parse_cascade(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(other.to_owned()),
    }
}

/// What a decision does when the store cannot answer in time: configured for the daemon, stored
/// per namespace, or given per call (the first of call, namespace, daemon that says wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Refuse (gRPC `UNAVAILABLE`): never admit what the store has not recorded.
    Block,
    /// Admit without recording (the lease writes nothing); counted as `failed_open`.
    Allow,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Allow => "allow",
        }
    }

    /// # Errors
    /// The text, when it is neither `block` nor `allow`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "block" => Ok(Self::Block),
            "allow" => Ok(Self::Allow),
            other => Err(other.to_owned()),
        }
    }
}

/// What an audited change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    EntityCreated,
    EntityDeleted,
    EntityMoved,
    LimitsSet,
    LimitsDeleted,
    FailurePolicySet,
    FailurePolicyDeleted,
    GateSet,
    GateCleared,
    CascadeSet,
    CascadeCleared,
    BucketReset,
    BucketToppedUp,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EntityCreated => "entity_created",
            Self::EntityDeleted => "entity_deleted",
            Self::EntityMoved => "entity_moved",
            Self::LimitsSet => "limits_set",
            Self::LimitsDeleted => "limits_deleted",
            Self::FailurePolicySet => "failure_policy_set",
            Self::FailurePolicyDeleted => "failure_policy_deleted",
            Self::GateSet => "gate_set",
            Self::GateCleared => "gate_cleared",
            Self::CascadeSet => "cascade_set",
            Self::CascadeCleared => "cascade_cleared",
            Self::BucketReset => "bucket_reset",
            Self::BucketToppedUp => "bucket_topped_up",
        }
    }

    /// # Errors
    /// The unknown text, when it names no action.
    pub fn parse(text: &str) -> Result<Self, String> {
        [
            Self::EntityCreated,
            Self::EntityDeleted,
            Self::EntityMoved,
            Self::LimitsSet,
            Self::LimitsDeleted,
            Self::FailurePolicySet,
            Self::FailurePolicyDeleted,
            Self::GateSet,
            Self::GateCleared,
            Self::CascadeSet,
            Self::CascadeCleared,
            Self::BucketReset,
            Self::BucketToppedUp,
        ]
        .into_iter()
        .find(|a| a.as_str() == text)
        .ok_or_else(|| text.to_owned())
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who changed something, and when: supplied by the caller of every audited store operation, so
/// the record is written atomically with the change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub principal: String,
    pub at_ms: i64,
}

/// One audit record. `before`/`after` are JSON texts of the changed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub subject: String,
    pub action: AuditAction,
    pub principal: String,
    pub at_ms: i64,
    pub before: Option<String>,
    pub after: Option<String>,
}

impl AuditEntry {
    /// The record of `by` doing `action` to `subject`.
    pub fn new(
        subject: String,
        action: AuditAction,
        by: &Actor,
        before: Option<String>,
        after: Option<String>,
    ) -> Self {
        Self {
            subject,
            action,
            principal: by.principal.clone(),
            at_ms: by.at_ms,
            before,
            after,
        }
    }
}

/// The length of a usage snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Hour,
    Day,
}

impl Period {
    pub const ALL: [Self; 2] = [Self::Hour, Self::Day];

    pub fn millis(self) -> i64 {
        match self {
            Self::Hour => 3_600_000,
            Self::Day => 86_400_000,
        }
    }

    /// The start of the period (UTC) that contains `at_ms`.
    pub fn start(self, at_ms: i64) -> i64 {
        at_ms - at_ms.rem_euclid(self.millis())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }
}

/// Consumption (milli-tokens per limit) of one (entity, resource) in one period: what a daemon
/// adds to the stored snapshot, or what the snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub entity: EntityId,
    pub resource: ResourceId,
    pub period: Period,
    /// Start of the period, ms since the epoch.
    pub start_ms: i64,
    pub amounts: Vec<(crate::domain::limit::LimitName, i64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_start_on_utc_boundaries() {
        let t = 1_800_000_123_456; // 2027-01-15T08:02:03.456Z
        assert_eq!(Period::Hour.start(t), 1_800_000_000_000);
        assert_eq!(Period::Hour.start(t) % 3_600_000, 0);
        assert_eq!(Period::Day.start(t) % 86_400_000, 0);
        assert!(Period::Day.start(t) <= Period::Hour.start(t));
        assert_eq!(
            Period::Hour.start(Period::Hour.start(t)),
            Period::Hour.start(t)
        );
    }

    #[test]
    fn gates_read_back_as_written_and_an_ended_bypass_lets_the_next_level_decide() {
        let until = Gate::Bypass {
            until_ms: Some(1_000),
        };
        let gates = [Gate::Enabled, Gate::Disabled, until];
        for gate in gates.into_iter().chain([Gate::Bypass { until_ms: None }]) {
            assert_eq!(Gate::parse(&gate.text()), Ok(gate));
        }
        for bad in ["bypass until", "bypass until soon", "Bypass", ""] {
            assert_eq!(Gate::parse(bad), Err(bad.to_owned()));
        }
        let levels = [
            LevelSettings::default(),
            LevelSettings {
                gate: Some(until),
                cascade: None,
            },
            LevelSettings {
                gate: Some(Gate::Disabled),
                cascade: None,
            },
        ];
        assert_eq!(deciding_gate(&levels, 999), Some((1, until)));
        assert_eq!(deciding_gate(&levels, 1_000), Some((2, Gate::Disabled)));
        assert_eq!(deciding_gate(&levels[..2], 1_000), None);
    }
}
