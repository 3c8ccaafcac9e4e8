//! Where each item lives: its `PK`/`SK` and attribute names. Every `PK` starts with the
//! namespace (so an IAM policy can confine a tenant with `dynamodb:LeadingKeys`), except the
//! namespace registry's, which `#` keeps outside every namespace. The layout is documented for
//! operators in `docs/data-model.md`.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use super::schema::{PK, SK};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::LimitName;
use crate::domain::records::{LimitScope, Period};

/// One item as the SDK holds it.
pub(super) type Item = HashMap<String, AttributeValue>;

/// The partition of the namespace registry (outside every namespace: `#` cannot start one).
pub(super) const NAMESPACES_PK: &str = "#NS";

/// A bucket's encoded limit set.
pub(super) const CONFIG: &str = "cfg";
/// A bucket's refill time.
pub(super) const REFILLED_AT: &str = "rt";

pub(super) fn balance_attr(name: &LimitName) -> String {
    format!("b:{name}")
}

pub(super) fn carry_attr(name: &LimitName) -> String {
    format!("k:{name}")
}

pub(super) fn consumed_attr(name: &LimitName) -> String {
    format!("c:{name}")
}

/// A session quota's top-up for its window (absent: none).
pub(super) fn topped_up_attr(name: &LimitName) -> String {
    format!("t:{name}")
}

/// A usage snapshot's counter of one limit.
pub(super) fn usage_attr(name: &LimitName) -> String {
    format!("u:{name}")
}

pub(super) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(super) fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(super) fn keys(pk: String, sk: String) -> Item {
    HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
}

pub(super) fn entity_pk(ns: &Namespace, id: &EntityId) -> String {
    format!("{ns}#E#{id}")
}

pub(super) fn bucket_sk(resource: &ResourceId) -> String {
    format!("#B#{resource}")
}

pub(super) fn bucket_keys(key: &BucketKey) -> Item {
    keys(
        entity_pk(&key.namespace, &key.entity),
        bucket_sk(&key.resource),
    )
}

pub(super) fn entity_keys(ns: &Namespace, id: &EntityId) -> Item {
    keys(entity_pk(ns, id), "#ENTITY".into())
}

/// The parent -> children index's partition of `parent`.
pub(super) fn children_pk(ns: &Namespace, parent: &EntityId) -> String {
    format!("{ns}#P#{parent}")
}

/// The item of a namespace's stored failure policy (beside its system limits).
pub(super) fn failure_policy_keys(ns: &Namespace) -> Item {
    keys(format!("{ns}#S"), "#POLICY".into())
}

/// The item of the gate stored at `scope` (beside the scope's limits). There is no system gate:
/// the system scope's key is refused before a gate is stored or read.
pub(super) fn gate_keys(ns: &Namespace, scope: &LimitScope) -> Item {
    level_keys(ns, scope, 'G')
}

/// The item of the cascade policy stored at `scope` (beside its gate); no system level either.
pub(super) fn cascade_keys(ns: &Namespace, scope: &LimitScope) -> Item {
    level_keys(ns, scope, 'C')
}

/// The item of a setting of one level, tagged `tag` in its sort key.
fn level_keys(ns: &Namespace, scope: &LimitScope, tag: char) -> Item {
    let (pk, sk) = match scope {
        LimitScope::EntityResource(e, r) => (entity_pk(ns, e), format!("#{tag}#{r}")),
        LimitScope::Entity(e) => (entity_pk(ns, e), format!("#{tag}")),
        LimitScope::Resource(r) => (format!("{ns}#R#{r}"), format!("#{tag}")),
        LimitScope::System => (format!("{ns}#S"), format!("#{tag}")),
    };
    keys(pk, sk)
}

pub(super) fn limits_keys(ns: &Namespace, scope: &LimitScope) -> Item {
    let (pk, sk) = match scope {
        LimitScope::EntityResource(e, r) => (entity_pk(ns, e), format!("#L#{r}")),
        LimitScope::Entity(e) => (entity_pk(ns, e), "#L".to_owned()),
        LimitScope::Resource(r) => (format!("{ns}#R#{r}"), "#L".to_owned()),
        LimitScope::System => (format!("{ns}#S"), "#L".to_owned()),
    };
    keys(pk, sk)
}

/// Where a limit item is listed in the `GSI1` index (`None`: the entity and system levels are
/// not listed): resource defaults under `{ns}#LR` by resource, entity + resource limits under
/// `{ns}#LE#{resource}` by entity. Limit items are written rarely, so the index costs little.
pub(super) fn limits_index(ns: &Namespace, scope: &LimitScope) -> Option<(String, String)> {
    match scope {
        LimitScope::Resource(r) => Some((resources_with_defaults_pk(ns), r.to_string())),
        LimitScope::EntityResource(e, r) => Some((entities_with_limits_pk(ns, r), e.to_string())),
        LimitScope::Entity(_) | LimitScope::System => None,
    }
}

pub(super) fn resources_with_defaults_pk(ns: &Namespace) -> String {
    format!("{ns}#LR")
}

pub(super) fn entities_with_limits_pk(ns: &Namespace, resource: &ResourceId) -> String {
    format!("{ns}#LE#{resource}")
}

pub(super) fn audit_pk(ns: &Namespace, subject: &str) -> String {
    format!("{ns}#A#{subject}")
}

/// Usage snapshot keys: one partition per entity, sorted by period, start and resource.
pub(super) fn usage_key(
    ns: &Namespace,
    entity: &EntityId,
    period: Period,
    start_ms: i64,
    resource: Option<&ResourceId>,
) -> (String, String) {
    let p = match period {
        Period::Hour => 'H',
        Period::Day => 'D',
    };
    let mut sk = format!("{p}#{:020}", start_ms.max(0));
    if let Some(r) = resource {
        sk.push('#');
        sk.push_str(r.as_str());
    }
    (format!("{ns}#U#{entity}"), sk)
}
