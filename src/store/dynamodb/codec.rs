//! Items to domain values and back: buckets, entities, usage snapshots, audit records. A value
//! that does not decode is [`StoreError::Corrupt`], naming the attribute.

use aws_sdk_dynamodb::types::AttributeValue;

use super::keys::{
    CONFIG, Item, REFILLED_AT, balance_attr, bucket_keys, carry_attr, children_pk, consumed_attr,
    entity_keys, n, s, topped_up_attr,
};
use super::schema::{GSI1PK, GSI1SK, PK};
use crate::domain::bucket::{Bucket, LimitState};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::{self, LimitName, encode};
use crate::domain::records::{AuditAction, AuditEntry, Entity, Period, Usage};
use crate::store::StoreError;

/// A number attribute (`i64` for balances and times, `i128` for consumed totals, `u64` for marks).
pub(super) fn number<T: std::str::FromStr>(item: &Item, attr: &str) -> Result<T, StoreError> {
    match item.get(attr) {
        Some(AttributeValue::N(v)) => v.parse().map_err(|_| {
            StoreError::Corrupt(format!("attribute {attr} = {v:?} is not an integer"))
        }),
        _ => Err(StoreError::Corrupt(format!(
            "attribute {attr} is missing or not a number"
        ))),
    }
}

pub(super) fn string<'a>(item: &'a Item, attr: &str) -> Result<&'a str, StoreError> {
    match item.get(attr) {
        Some(AttributeValue::S(v)) => Ok(v),
        _ => Err(StoreError::Corrupt(format!(
            "attribute {attr} is missing or not a string"
        ))),
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// A bucket as an item, with this writer's mark in `mark_attr`.
pub(super) fn bucket_item(key: &BucketKey, bucket: &Bucket, mark_attr: &str) -> Item {
    let mut item = bucket_keys(key);
    if let Some(mark) = bucket.mark {
        item.insert(mark_attr.to_owned(), n(mark));
    }
    item.insert(CONFIG.into(), s(encode(&bucket.limit_set())));
    item.insert(REFILLED_AT.into(), n(bucket.refilled_at));
    for l in &bucket.limits {
        let name = l.limit.name();
        item.insert(balance_attr(name), n(l.balance));
        item.insert(carry_attr(name), n(l.carry));
        item.insert(consumed_attr(name), n(l.consumed));
        if l.topped_up != 0 {
            item.insert(topped_up_attr(name), n(l.topped_up));
        }
    }
    item
}

/// A bucket item, with the mark this writer left in `mark_attr` (other writers' marks are not
/// its business).
pub(super) fn decode_bucket(item: &Item, mark_attr: &str) -> Result<Bucket, StoreError> {
    let limits = limit::decode(string(item, CONFIG)?).map_err(corrupt)?;
    let limits = limits
        .into_iter()
        .map(|limit| {
            let name = limit.name().clone();
            Ok(LimitState {
                balance: number(item, &balance_attr(&name))?,
                carry: number(item, &carry_attr(&name))?,
                consumed: number(item, &consumed_attr(&name))?,
                topped_up: match item.get(&topped_up_attr(&name)) {
                    Some(_) => number(item, &topped_up_attr(&name))?,
                    None => 0,
                },
                limit,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    let mark = match item.get(mark_attr) {
        Some(_) => Some(number(item, mark_attr)?),
        None => None,
    };
    Ok(Bucket {
        refilled_at: number(item, REFILLED_AT)?,
        limits,
        mark,
    })
}

pub(super) fn entity_item(ns: &Namespace, entity: &Entity) -> Item {
    let mut item = entity_keys(ns, &entity.id);
    item.insert("name".into(), s(entity.name.clone()));
    item.insert("cascade".into(), AttributeValue::Bool(entity.cascade));
    if !entity.metadata.is_empty() {
        item.insert(
            "meta".into(),
            AttributeValue::M(
                entity
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), s(v.clone())))
                    .collect(),
            ),
        );
    }
    if let Some(parent) = &entity.parent {
        item.insert("parent".into(), s(parent.to_string()));
        item.insert(GSI1PK.into(), s(children_pk(ns, parent)));
        item.insert(GSI1SK.into(), s(entity.id.to_string()));
    }
    item
}

pub(super) fn decode_entity(item: &Item) -> Result<Entity, StoreError> {
    let pk = string(item, PK)?;
    let id = pk
        .split_once("#E#")
        .map(|(_, id)| id)
        .ok_or_else(|| StoreError::Corrupt(format!("entity key {pk:?}")))?;
    Ok(Entity {
        id: EntityId::new(id).map_err(corrupt)?,
        name: string(item, "name")?.to_owned(),
        parent: string(item, "parent")
            .ok()
            .map(EntityId::new)
            .transpose()
            .map_err(corrupt)?,
        cascade: matches!(item.get("cascade"), Some(AttributeValue::Bool(true))),
        metadata: match item.get("meta") {
            Some(AttributeValue::M(m)) => m
                .iter()
                .filter_map(|(k, v)| v.as_s().ok().map(|v| (k.clone(), v.clone())))
                .collect(),
            _ => Default::default(),
        },
    })
}

pub(super) fn decode_usage(
    item: &Item,
    entity: &EntityId,
    period: Period,
) -> Result<Usage, StoreError> {
    let resource = ResourceId::new(string(item, "res")?).map_err(corrupt)?;
    let mut amounts = item
        .keys()
        .filter_map(|attr| Some((attr, attr.strip_prefix("u:")?)))
        .map(|(attr, name)| Ok((LimitName::new(name).map_err(corrupt)?, number(item, attr)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    amounts.sort();
    Ok(Usage {
        entity: entity.clone(),
        resource,
        period,
        start_ms: number(item, "start")?,
        amounts,
    })
}

/// An audit record's attributes (its key is the caller's); `expires` is its TTL, in seconds.
pub(super) fn audit_attributes(entry: &AuditEntry, expires: i64, item: &mut Item) {
    item.insert("action".into(), s(entry.action.as_str()));
    item.insert("principal".into(), s(entry.principal.clone()));
    item.insert("at".into(), n(entry.at_ms));
    if let Some(before) = &entry.before {
        item.insert("before".into(), s(before.clone()));
    }
    if let Some(after) = &entry.after {
        item.insert("after".into(), s(after.clone()));
    }
    item.insert(super::schema::TTL.into(), n(expires));
}

pub(super) fn decode_audit(item: &Item, subject: &str) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        subject: subject.to_owned(),
        action: AuditAction::parse(string(item, "action")?)
            .map_err(|a| StoreError::Corrupt(format!("unknown audit action {a:?}")))?,
        principal: string(item, "principal")?.to_owned(),
        at_ms: number(item, "at")?,
        before: string(item, "before").ok().map(str::to_owned),
        after: string(item, "after").ok().map(str::to_owned),
    })
}
