//! Everything but buckets: entities (with the parent index), stored limits, audit records, the
//! namespace registry and usage snapshots. Every change of an entity or of stored limits is one
//! transaction with its audit record.

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{
    Delete, KeysAndAttributes, Put, ReturnValue, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem,
};

use super::DynamoStore;
use super::clauses::{Action, Existing, Expr, action, put, update};
use super::codec::{decode_audit, decode_entity, decode_usage, entity_item, string};
use super::errors::{CancellationReasons, classify};
use super::keys::{
    Item, NAMESPACES_PK, audit_pk, cascade_keys, children_pk, entities_with_limits_pk, entity_keys,
    entity_pk, failure_policy_keys, gate_keys, keys, limits_index, limits_keys, n,
    resources_with_defaults_pk, s, usage_attr, usage_key,
};
use super::schema::{GSI1, GSI1PK, GSI1SK, PK, SK, TTL};
use crate::domain::bucket::Write;
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::{self, Limit, encode};
use crate::domain::records::{
    Actor, AuditAction, AuditEntry, Entity, FailurePolicy, Gate, LevelSettings, LimitScope, Period,
    Usage, cascade_text, parse_cascade,
};
use crate::store::{
    AuditPage, Once, StoreError, UsageCursor, UsagePage, UsageQuery, audit_sort_key, entity_json,
};

impl DynamoStore {
    fn audit_put(
        &self,
        ns: &Namespace,
        entry: &AuditEntry,
    ) -> Result<TransactWriteItem, StoreError> {
        let mut item = keys(audit_pk(ns, &entry.subject), audit_sort_key(entry.at_ms));
        let expires = entry.at_ms / 1_000 + self.audit_retention.as_secs() as i64;
        super::codec::audit_attributes(entry, expires, &mut item);
        Ok(action(Action::Put(put(&self.table, item, Existing::Any)?)))
    }

    /// Runs a transaction of a change and its audit record; `on_condition` maps the change's
    /// condition failure to the caller's error.
    async fn audited(
        &self,
        change: TransactWriteItem,
        audit: TransactWriteItem,
        on_condition: impl FnOnce() -> StoreError,
    ) -> Result<(), StoreError> {
        match self
            .client
            .transact_write_items()
            .transact_items(change)
            .transact_items(audit)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(se))
                if se.err().is_transaction_canceled_exception()
                    && se
                        .err()
                        .cancellation_reasons()
                        .first()
                        .and_then(|r| r.code())
                        == Some("ConditionalCheckFailed") =>
            {
                Err(on_condition())
            }
            Err(e) => Err(classify(e, &self.table)),
        }
    }

    /// Deletes the items whose keys (`PK`, `SK`) the given items carry, one by one.
    async fn delete_keys(&self, items: &[Item]) -> Result<(), StoreError> {
        for item in items {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(keys(
                    string(item, PK)?.to_owned(),
                    string(item, SK)?.to_owned(),
                )))
                .send()
                .await
                .map_err(|e| classify(e, &self.table))?;
        }
        Ok(())
    }

    /// Deletes an existing item together with its audit record.
    async fn delete_audited(
        &self,
        ns: &Namespace,
        key: Item,
        entry: &AuditEntry,
        not_found: impl FnOnce() -> StoreError,
    ) -> Result<(), StoreError> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key))
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let audit = self.audit_put(ns, entry)?;
        self.audited(
            TransactWriteItem::builder().delete(delete).build(),
            audit,
            not_found,
        )
        .await
    }

    /// Every item a query returns, page by page.
    async fn query_all(
        &self,
        query: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
    ) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let out = query
                .clone()
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| classify(e, &self.table))?;
            items.extend(out.items.unwrap_or_default());
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(items);
            }
        }
    }
}

pub(super) async fn create_entity(
    store: &DynamoStore,
    ns: &Namespace,
    entity: &Entity,
    by: &Actor,
) -> Result<(), StoreError> {
    let created = put(&store.table, entity_item(ns, entity), Existing::Absent)?;
    let audit = store.audit_put(
        ns,
        &AuditEntry::new(
            entity.id.to_string(),
            AuditAction::EntityCreated,
            by,
            None,
            Some(entity_json(entity)),
        ),
    )?;
    store
        .audited(action(Action::Put(created)), audit, || {
            StoreError::AlreadyExists(format!("entity {:?}", entity.id.as_str()))
        })
        .await
}

pub(super) async fn get_entity(
    store: &DynamoStore,
    ns: &Namespace,
    id: &EntityId,
) -> Result<Option<Entity>, StoreError> {
    get_one(store, entity_keys(ns, id))
        .await?
        .as_ref()
        .map(decode_entity)
        .transpose()
}

/// One item by its key, read strongly consistent (`None`: there is none).
async fn get_one(store: &DynamoStore, key: Item) -> Result<Option<Item>, StoreError> {
    let out = store
        .client
        .get_item()
        .table_name(&store.table)
        .set_key(Some(key))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| classify(e, &store.table))?;
    Ok(out.item)
}

/// The most keys one `BatchGetItem` takes.
const MAX_BATCH_GET: usize = 100;
/// Rounds of a batch's unprocessed keys (throttled reads) before giving up.
const UNPROCESSED_ROUNDS: u32 = 5;

pub(super) async fn get_entities(
    store: &DynamoStore,
    ns: &Namespace,
    ids: &[EntityId],
) -> Result<Vec<Option<Entity>>, StoreError> {
    // BatchGetItem refuses a request that names a key twice.
    let mut unique: Vec<&EntityId> = Vec::with_capacity(ids.len());
    for id in ids {
        if !unique.contains(&id) {
            unique.push(id);
        }
    }
    let keys = unique.iter().map(|id| entity_keys(ns, id)).collect();
    let mut found: std::collections::HashMap<EntityId, Entity> =
        std::collections::HashMap::with_capacity(unique.len());
    for item in batch_get(store, keys, "entity").await? {
        let entity = decode_entity(&item)?;
        found.insert(entity.id.clone(), entity);
    }
    Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
}

/// The items of `keys` (distinct) that exist, read with `BatchGetItem` ([`MAX_BATCH_GET`] a
/// call, strongly consistent); keys left unprocessed are asked again a few times. `what` names
/// the items in an error.
async fn batch_get(
    store: &DynamoStore,
    keys: Vec<Item>,
    what: &str,
) -> Result<Vec<Item>, StoreError> {
    let mut found = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(MAX_BATCH_GET) {
        let mut wanted: Vec<Item> = chunk.to_vec();
        let mut round = 0;
        while !wanted.is_empty() {
            if round > 0 {
                if round > UNPROCESSED_ROUNDS {
                    return Err(StoreError::Transient(format!(
                        "{} {what} reads left unprocessed by DynamoDB (throttled)",
                        wanted.len()
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20 << round)).await;
            }
            round += 1;
            let request = KeysAndAttributes::builder()
                .set_keys(Some(wanted))
                .consistent_read(true)
                .build()
                .map_err(|e| StoreError::Backend(format!("BatchGetItem request: {e}")))?;
            let out = store
                .client
                .batch_get_item()
                .request_items(&store.table, request)
                .send()
                .await
                .map_err(|e| classify(e, &store.table))?;
            let (mut responses, mut unprocessed) = (out.responses, out.unprocessed_keys);
            found.extend(
                responses
                    .as_mut()
                    .and_then(|r| r.remove(&store.table))
                    .unwrap_or_default(),
            );
            wanted = unprocessed
                .as_mut()
                .and_then(|u| u.remove(&store.table))
                .map(|k| k.keys)
                .unwrap_or_default();
        }
    }
    Ok(found)
}

/// The settings of each level in one `BatchGetItem`: the gate items and the cascade items.
pub(super) async fn get_level_settings(
    store: &DynamoStore,
    ns: &Namespace,
    scopes: &[LimitScope],
) -> Result<Vec<LevelSettings>, StoreError> {
    let mut keys: Vec<Item> = Vec::with_capacity(2 * scopes.len());
    for scope in scopes {
        for key in [gate_keys(ns, scope), cascade_keys(ns, scope)] {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    let items = batch_get(store, keys, "level setting").await?;
    let text = |key: Item, attribute: &str| {
        items
            .iter()
            .find(|item| item.get(PK) == key.get(PK) && item.get(SK) == key.get(SK))
            .map(|item| string(item, attribute))
            .transpose()
    };
    let corrupt = |what: &str, t: String| StoreError::Corrupt(format!("{what} {t:?}"));
    scopes
        .iter()
        .map(|scope| {
            let gate = text(gate_keys(ns, scope), "gate")?
                .map(|t| Gate::parse(t).map_err(|t| corrupt("gate", t)))
                .transpose()?;
            let cascade = text(cascade_keys(ns, scope), "cascade")?
                .map(|t| parse_cascade(t).map_err(|t| corrupt("cascade policy", t)))
                .transpose()?;
            Ok(LevelSettings { gate, cascade })
        })
        .collect()
}

/// The settings stored at one level.
async fn level(
    store: &DynamoStore,
    ns: &Namespace,
    scope: &LimitScope,
) -> Result<LevelSettings, StoreError> {
    let levels = get_level_settings(store, ns, std::slice::from_ref(scope)).await?;
    Ok(levels.into_iter().next().unwrap_or_default())
}

pub(super) async fn set_gate(
    store: &DynamoStore,
    ns: &Namespace,
    scope: &LimitScope,
    gate: Option<Gate>,
    by: &Actor,
) -> Result<(), StoreError> {
    let before = level(store, ns, scope).await?.gate;
    let change = Setting {
        key: gate_keys(ns, scope),
        attribute: "gate",
        subject: scope.audit_subject(),
        actions: (AuditAction::GateSet, AuditAction::GateCleared),
        what: format!("gate of {scope}"),
    };
    let (before, after) = (before.map(Gate::text), gate.map(Gate::text));
    change
        .apply(store, ns, before.as_deref(), after.as_deref(), by)
        .await
}

pub(super) async fn set_cascade(
    store: &DynamoStore,
    ns: &Namespace,
    scope: &LimitScope,
    cascade: Option<bool>,
    by: &Actor,
) -> Result<(), StoreError> {
    let before = level(store, ns, scope).await?.cascade;
    let change = Setting {
        key: cascade_keys(ns, scope),
        attribute: "cascade",
        subject: scope.audit_subject(),
        actions: (AuditAction::CascadeSet, AuditAction::CascadeCleared),
        what: format!("cascade policy of {scope}"),
    };
    let (before, after) = (before.map(cascade_text), cascade.map(cascade_text));
    change.apply(store, ns, before, after, by).await
}

/// One text attribute in an item of its own (a gate, a failure policy), set or removed in one
/// transaction with its audit record.
struct Setting {
    key: Item,
    attribute: &'static str,
    subject: String,
    /// The audit actions of setting and of removing it.
    actions: (AuditAction, AuditAction),
    /// What it is, for a removal of nothing.
    what: String,
}

impl Setting {
    /// Stores `after` (`None`: removes the item; `NotFound` when `before` says there is none).
    async fn apply(
        self,
        store: &DynamoStore,
        ns: &Namespace,
        before: Option<&str>,
        after: Option<&str>,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let (set, removed) = self.actions;
        let Some(value) = after else {
            let not_found = || StoreError::NotFound(self.what.clone());
            before.ok_or_else(not_found)?;
            let entry = AuditEntry::new(
                self.subject.clone(),
                removed,
                by,
                before.map(str::to_owned),
                None,
            );
            return store
                .delete_audited(ns, self.key.clone(), &entry, not_found)
                .await;
        };
        let mut item = self.key;
        item.insert(self.attribute.into(), s(value.to_owned()));
        let stored = put(&store.table, item, Existing::Any)?;
        let entry = AuditEntry::new(
            self.subject,
            set,
            by,
            before.map(str::to_owned),
            Some(value.to_owned()),
        );
        let audit = store.audit_put(ns, &entry)?;
        store
            .audited(action(Action::Put(stored)), audit, || {
                StoreError::Backend(format!("{} changed concurrently", self.what))
            })
            .await
    }
}

pub(super) async fn delete_entity(
    store: &DynamoStore,
    ns: &Namespace,
    id: &EntityId,
    force: bool,
    by: &Actor,
) -> Result<(), StoreError> {
    let not_found = || StoreError::NotFound(format!("entity {:?}", id.as_str()));
    let old = get_entity(store, ns, id).await?.ok_or_else(not_found)?;
    // The parent index is eventually consistent: a child created a moment ago may be missed.
    let children = list_children(store, ns, id).await?.len();
    if children > 0 && !force {
        return Err(StoreError::Refused(format!(
            "entity {:?} has {children} children; delete them first or force",
            id.as_str()
        )));
    }
    let entry = AuditEntry::new(
        id.to_string(),
        AuditAction::EntityDeleted,
        by,
        Some(entity_json(&old)),
        None,
    );
    store
        .delete_audited(ns, entity_keys(ns, id), &entry, not_found)
        .await?;
    // Then its buckets and entity-level limits: every other item of its partition.
    let items = store
        .query_all(
            store
                .client
                .query()
                .table_name(&store.table)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", s(entity_pk(ns, id)))
                .projection_expression("#pk, SK"),
        )
        .await?;
    store.delete_keys(&items).await
}

pub(super) async fn move_entity(
    store: &DynamoStore,
    ns: &Namespace,
    id: &EntityId,
    parent: Option<&EntityId>,
    by: &Actor,
) -> Result<Entity, StoreError> {
    let not_found = || StoreError::NotFound(format!("entity {:?}", id.as_str()));
    let old = get_entity(store, ns, id).await?.ok_or_else(not_found)?;
    let moved = Entity {
        parent: parent.cloned(),
        ..old.clone()
    };
    let replaced = put(&store.table, entity_item(ns, &moved), Existing::Present)?;
    let entry = AuditEntry::new(
        id.to_string(),
        AuditAction::EntityMoved,
        by,
        Some(entity_json(&old)),
        Some(entity_json(&moved)),
    );
    let audit = store.audit_put(ns, &entry)?;
    store
        .audited(action(Action::Put(replaced)), audit, not_found)
        .await?;
    Ok(moved)
}

/// Every item under `pk` in the `GSI1` index.
async fn index_items(store: &DynamoStore, pk: String) -> Result<Vec<Item>, StoreError> {
    store
        .query_all(
            store
                .client
                .query()
                .table_name(&store.table)
                .index_name(GSI1)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", GSI1PK)
                .expression_attribute_values(":pk", s(pk)),
        )
        .await
}

pub(super) async fn list_children(
    store: &DynamoStore,
    ns: &Namespace,
    parent: &EntityId,
) -> Result<Vec<Entity>, StoreError> {
    let items = index_items(store, children_pk(ns, parent)).await?;
    let mut children = items
        .iter()
        .map(decode_entity)
        .collect::<Result<Vec<_>, _>>()?;
    children.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(children)
}

pub(super) async fn list_entities_with_limits(
    store: &DynamoStore,
    ns: &Namespace,
    resource: &ResourceId,
    page_size: usize,
    after: Option<&EntityId>,
) -> Result<(Vec<EntityId>, Option<EntityId>), StoreError> {
    let pk = entities_with_limits_pk(ns, resource);
    let start = after.map(|e| {
        let scope = LimitScope::EntityResource(e.clone(), resource.clone());
        let mut key = limits_keys(ns, &scope);
        key.insert(GSI1PK.into(), s(pk.clone()));
        key.insert(GSI1SK.into(), s(e.to_string()));
        key
    });
    let out = store
        .client
        .query()
        .table_name(&store.table)
        .index_name(GSI1)
        .key_condition_expression("#pk = :pk")
        .expression_attribute_names("#pk", GSI1PK)
        .expression_attribute_values(":pk", s(pk))
        .limit(i32::try_from(page_size).unwrap_or(i32::MAX))
        .set_exclusive_start_key(start)
        .send()
        .await
        .map_err(|e| classify(e, &store.table))?;
    let ids = out
        .items
        .unwrap_or_default()
        .iter()
        .map(|item| {
            let id = string(item, GSI1SK)?;
            EntityId::new(id).map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let next = match out.last_evaluated_key {
        Some(_) => ids.last().cloned(),
        None => None,
    };
    Ok((ids, next))
}

pub(super) async fn list_resources_with_defaults(
    store: &DynamoStore,
    ns: &Namespace,
) -> Result<Vec<ResourceId>, StoreError> {
    let items = index_items(store, resources_with_defaults_pk(ns)).await?;
    let mut resources = items
        .iter()
        .map(|item| {
            let r = string(item, GSI1SK)?;
            ResourceId::new(r).map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    resources.sort();
    Ok(resources)
}

pub(super) async fn set_limits(
    store: &DynamoStore,
    ns: &Namespace,
    scope: &LimitScope,
    limits: &[Limit],
    by: &Actor,
) -> Result<(), StoreError> {
    let before = get_limits(store, ns, scope).await?;
    let mut item = limits_keys(ns, scope);
    item.insert("limits".into(), s(encode(limits)));
    if let Some((pk, sk)) = limits_index(ns, scope) {
        item.insert(GSI1PK.into(), s(pk));
        item.insert(GSI1SK.into(), s(sk));
    }
    let stored = put(&store.table, item, Existing::Any)?;
    let audit = store.audit_put(
        ns,
        &AuditEntry::new(
            scope.audit_subject(),
            AuditAction::LimitsSet,
            by,
            before.map(|b| encode(&b)),
            Some(encode(limits)),
        ),
    )?;
    store
        .audited(action(Action::Put(stored)), audit, || {
            StoreError::Backend("limit item changed concurrently".into())
        })
        .await
}

pub(super) async fn get_limits(
    store: &DynamoStore,
    ns: &Namespace,
    scope: &LimitScope,
) -> Result<Option<Vec<Limit>>, StoreError> {
    get_one(store, limits_keys(ns, scope))
        .await?
        .as_ref()
        .map(|item| {
            limit::decode(string(item, "limits")?).map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .transpose()
}

pub(super) async fn delete_limits(
    store: &DynamoStore,
    ns: &Namespace,
    scope: &LimitScope,
    by: &Actor,
) -> Result<(), StoreError> {
    let not_found = || StoreError::NotFound(format!("limits of {scope}"));
    let old = get_limits(store, ns, scope).await?.ok_or_else(not_found)?;
    let entry = AuditEntry::new(
        scope.audit_subject(),
        AuditAction::LimitsDeleted,
        by,
        Some(encode(&old)),
        None,
    );
    store
        .delete_audited(ns, limits_keys(ns, scope), &entry, not_found)
        .await
}

pub(super) async fn get_failure_policy(
    store: &DynamoStore,
    ns: &Namespace,
) -> Result<Option<FailurePolicy>, StoreError> {
    get_one(store, failure_policy_keys(ns))
        .await?
        .as_ref()
        .map(|item| {
            let text = string(item, "policy")?;
            FailurePolicy::parse(text)
                .map_err(|t| StoreError::Corrupt(format!("failure policy {t:?}")))
        })
        .transpose()
}

pub(super) async fn set_failure_policy(
    store: &DynamoStore,
    ns: &Namespace,
    policy: Option<FailurePolicy>,
    by: &Actor,
) -> Result<(), StoreError> {
    let before = get_failure_policy(store, ns).await?;
    let change = Setting {
        key: failure_policy_keys(ns),
        attribute: "policy",
        subject: LimitScope::System.audit_subject(),
        actions: (
            AuditAction::FailurePolicySet,
            AuditAction::FailurePolicyDeleted,
        ),
        what: "the namespace's failure policy".into(),
    };
    let text = |p: Option<FailurePolicy>| p.map(FailurePolicy::as_str);
    change
        .apply(store, ns, text(before), text(policy), by)
        .await
}

pub(super) async fn list_audit(
    store: &DynamoStore,
    ns: &Namespace,
    subject: &str,
    page_size: usize,
    after: Option<&str>,
) -> Result<AuditPage, StoreError> {
    let pk = audit_pk(ns, subject);
    // Ask for one more than a page, so `next` is set only when there really is more.
    let wanted = page_size.clamp(1, 1_000);
    let mut items: Vec<Item> = Vec::new();
    let mut start = after.map(|sk| keys(pk.clone(), sk.to_owned()));
    loop {
        let out = store
            .client
            .query()
            .table_name(&store.table)
            .key_condition_expression("#pk = :pk")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_values(":pk", s(pk.clone()))
            .scan_index_forward(false)
            .limit((wanted + 1 - items.len()) as i32)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| classify(e, &store.table))?;
        items.extend(out.items.unwrap_or_default());
        start = out.last_evaluated_key;
        if start.is_none() || items.len() > wanted {
            break;
        }
    }
    let more = items.len() > wanted;
    items.truncate(wanted);
    let next = if more {
        Some(string(items.last().expect("more than zero items"), SK)?.to_owned())
    } else {
        None
    };
    let entries = items
        .iter()
        .map(|item| decode_audit(item, subject))
        .collect::<Result<_, StoreError>>()?;
    Ok(AuditPage { entries, next })
}

pub(super) async fn create_namespace(
    store: &DynamoStore,
    ns: &Namespace,
) -> Result<(), StoreError> {
    store
        .client
        .put_item()
        .table_name(&store.table)
        .set_item(Some(keys(NAMESPACES_PK.into(), ns.to_string())))
        .send()
        .await
        .map_err(|e| classify(e, &store.table))?;
    Ok(())
}

pub(super) async fn list_namespaces(store: &DynamoStore) -> Result<Vec<Namespace>, StoreError> {
    let items = store
        .query_all(
            store
                .client
                .query()
                .table_name(&store.table)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", s(NAMESPACES_PK))
                .consistent_read(true),
        )
        .await?;
    items
        .iter()
        .map(|item| {
            Namespace::new(string(item, SK)?).map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .collect()
}

pub(super) async fn delete_namespace(
    store: &DynamoStore,
    ns: &Namespace,
) -> Result<(), StoreError> {
    let registration = keys(NAMESPACES_PK.into(), ns.to_string());
    let out = store
        .client
        .delete_item()
        .table_name(&store.table)
        .set_key(Some(registration))
        .return_values(ReturnValue::AllOld)
        .send()
        .await
        .map_err(|e| classify(e, &store.table))?;
    if out.attributes.is_none() {
        return Err(StoreError::NotFound(format!("namespace {:?}", ns.as_str())));
    }
    // Every key of the namespace starts with `{ns}#`; no index lists them, so scan.
    let mut start = None;
    loop {
        let out = store
            .client
            .scan()
            .table_name(&store.table)
            .filter_expression("begins_with(#pk, :prefix)")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_values(":prefix", s(format!("{ns}#")))
            .projection_expression("#pk, SK")
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| classify(e, &store.table))?;
        store.delete_keys(out.items()).await?;
        start = out.last_evaluated_key;
        if start.is_none() {
            return Ok(());
        }
    }
}

/// Adds one usage record to its snapshot in one `UpdateItem`, creating the snapshot and its
/// counters if they are new.
pub(super) async fn add_usage_alone(
    store: &DynamoStore,
    ns: &Namespace,
    u: &Usage,
) -> Result<(), StoreError> {
    let mut e = Expr::default();
    let res = e.name("res");
    let res_v = e.value(s(u.resource.to_string()));
    let start = e.name("start");
    let start_v = e.value(n(u.start_ms));
    e.set.push(format!("{res} = {res_v}"));
    e.set.push(format!("{start} = {start_v}"));
    for (name, amount) in &u.amounts {
        let a = e.name(&usage_attr(name));
        let v = e.value(n(*amount));
        e.add.push(format!("{a} {v}"));
    }
    let (pk, sk) = usage_key(ns, &u.entity, u.period, u.start_ms, Some(&u.resource));
    store
        .send_update(update(&store.table, keys(pk, sk), e)?, false)
        .await
        .map_err(|e| classify(e, &store.table))?;
    Ok(())
}

pub(super) async fn usage(
    store: &DynamoStore,
    ns: &Namespace,
    q: &UsageQuery<'_>,
) -> Result<UsagePage, StoreError> {
    let mut e = Expr::default();
    // Filters on what the key does not select.
    let start = e.name("start");
    let from = e.value(n(q.from_ms));
    let to = e.value(n(q.to_ms));
    let mut filters = vec![format!("{start} >= {from} AND {start} < {to}")];
    if let Some(r) = q.resource {
        let res = e.name("res");
        let v = e.value(s(r.to_string()));
        filters.push(format!("{res} = {v}"));
    }
    let pk_name = e.name(PK);
    let start_key = q.page.map(|c| keys(c.partition.clone(), c.sort.clone()));
    let limit = i32::try_from(q.page_size.clamp(1, 1_000)).unwrap_or(1_000);
    let (items, last) = match q.entity {
        Some(entity) => {
            // One entity: its snapshots are one partition, sorted `{period}#{start}#{resource}`.
            let (pk, _) = usage_key(ns, entity, Period::Hour, 0, None);
            let pk_v = e.value(s(pk));
            let mut condition = format!("{pk_name} = {pk_v}");
            if let Some(period) = q.period {
                let sk_name = e.name(SK);
                let (_, low) = usage_key(ns, entity, period, q.from_ms, None);
                let (_, high) = usage_key(ns, entity, period, q.to_ms, None);
                let (lo, hi) = (e.value(s(low)), e.value(s(high)));
                condition.push_str(&format!(" AND {sk_name} BETWEEN {lo} AND {hi}"));
            }
            let out = store
                .client
                .query()
                .table_name(&store.table)
                .key_condition_expression(condition)
                .filter_expression(filters.join(" AND "))
                .set_expression_attribute_names(Some(e.names.clone()))
                .set_expression_attribute_values(Some(e.values.clone()))
                .limit(limit)
                .set_exclusive_start_key(start_key)
                .send()
                .await
                .map_err(|e| classify(e, &store.table))?;
            (out.items.unwrap_or_default(), out.last_evaluated_key)
        }
        None => {
            // One resource across entities: snapshots are in no index, so this scans the
            // table (a report, not a request's path).
            let prefix = e.value(s(format!("{ns}#U#")));
            filters.push(format!("begins_with({pk_name}, {prefix})"));
            if let Some(period) = q.period {
                let sk_name = e.name(SK);
                let letter = e.value(s(format!("{}#", period_letter(period))));
                filters.push(format!("begins_with({sk_name}, {letter})"));
            }
            let out = store
                .client
                .scan()
                .table_name(&store.table)
                .filter_expression(filters.join(" AND "))
                .set_expression_attribute_names(Some(e.names.clone()))
                .set_expression_attribute_values(Some(e.values.clone()))
                .limit(limit)
                .set_exclusive_start_key(start_key)
                .send()
                .await
                .map_err(|e| classify(e, &store.table))?;
            (out.items.unwrap_or_default(), out.last_evaluated_key)
        }
    };
    let snapshots = items
        .iter()
        .map(|item| decode_usage_item(ns, item))
        .collect::<Result<Vec<_>, _>>()?;
    // The last key read, whatever item it was (a scan reads every item).
    let next = last
        .map(|key| {
            Ok::<_, StoreError>(UsageCursor {
                partition: string(&key, PK)?.to_owned(),
                sort: string(&key, SK)?.to_owned(),
            })
        })
        .transpose()?;
    Ok(UsagePage { snapshots, next })
}

fn period_letter(period: Period) -> char {
    match period {
        Period::Hour => 'H',
        Period::Day => 'D',
    }
}

/// A usage item's entity and period, read off its key.
fn usage_item_key(ns: &Namespace, item: &Item) -> Result<(EntityId, Period), StoreError> {
    let bad = || StoreError::Corrupt("a usage item's key".into());
    let entity = string(item, PK)?
        .strip_prefix(&format!("{ns}#U#"))
        .and_then(|e| EntityId::new(e).ok())
        .ok_or_else(bad)?;
    let period = match string(item, SK)?.split('#').next() {
        Some("H") => Period::Hour,
        Some("D") => Period::Day,
        _ => return Err(bad()),
    };
    Ok((entity, period))
}

fn decode_usage_item(ns: &Namespace, item: &Item) -> Result<Usage, StoreError> {
    let (entity, period) = usage_item_key(ns, item)?;
    decode_usage(item, &entity, period)
}

/// The item that remembers an operation's key on its entity (deleted with the entity).
fn once_keys(key: &BucketKey, once: &str) -> Item {
    keys(entity_pk(&key.namespace, &key.entity), format!("#O#{once}"))
}

pub(super) async fn operate_bucket(
    store: &DynamoStore,
    key: &BucketKey,
    write: Option<&Write>,
    entry: &AuditEntry,
    once: Option<&Once>,
) -> Result<Option<String>, StoreError> {
    let mut items = Vec::with_capacity(3);
    if let Some(write) = write {
        items.push(action(store.bucket_action(key, write)?));
    }
    items.push(store.audit_put(&key.namespace, entry)?);
    if let Some(once) = once {
        let mut item = once_keys(key, &once.key);
        item.insert("outcome".into(), s(once.outcome.clone()));
        item.insert("until".into(), n(once.until_ms));
        item.insert(TTL.into(), n(once.until_ms / 1_000 + 1));
        let remembered = Put::builder()
            .table_name(&store.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk) OR #until < :at")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#until", "until")
            .expression_attribute_values(":at", n(entry.at_ms))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        items.push(TransactWriteItem::builder().put(remembered).build());
    }
    let result = store
        .client
        .transact_write_items()
        .set_transact_items(Some(items))
        .send()
        .await;
    let se = match result {
        Ok(_) => return Ok(None),
        Err(SdkError::ServiceError(se)) if se.err().is_transaction_canceled_exception() => se,
        Err(e) => return Err(classify(e, &store.table)),
    };
    let reasons = se.err().cancellation_reasons();
    let failed = |r: Option<&aws_sdk_dynamodb::types::CancellationReason>| {
        r.and_then(|r| r.code()) == Some("ConditionalCheckFailed")
    };
    // A key in use outranks a bucket that moved: the operation was done already.
    if once.is_some() && failed(reasons.last()) {
        let old = reasons
            .last()
            .and_then(|r| r.item())
            .cloned()
            .unwrap_or_default();
        return string(&old, "outcome").map(|o| Some(o.to_owned()));
    }
    if write.is_some() && failed(reasons.first()) {
        return store
            .conflict(0, reasons.first().and_then(|r| r.item()), None)
            .map(|_| None);
    }
    Err(StoreError::Transient(format!(
        "transaction cancelled: {:?}",
        reasons.iter().filter_map(|r| r.code()).collect::<Vec<_>>()
    )))
}
