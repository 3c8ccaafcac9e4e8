//! The embedded store: everything in one process's memory, under one lock.
//!
//! It is the default backend (a daemon works with no AWS account) and the reference the DynamoDB
//! store is tested against: bucket conditions are checked by [`Bucket::apply`], the same code that
//! defines them. Operations never await while holding the lock, so a std `Mutex` is right here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    AuditPage, KeyedWrite, Once, Store, StoreError, UsageCursor, UsagePage, UsageQuery,
    audit_sort_key, entity_json,
};
use crate::domain::bucket::{Bucket, Write};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::{Limit, LimitName, encode};
use crate::domain::records::{
    Actor, AuditAction, AuditEntry, Entity, FailurePolicy, Gate, LevelSettings, LimitScope, Period,
    Usage, cascade_text,
};

/// A usage snapshot: namespace, entity, period, start, resource.
type UsageKey = (Namespace, EntityId, Period, i64, ResourceId);

#[derive(Debug, Default)]
struct State {
    buckets: HashMap<BucketKey, Bucket>,
    entities: BTreeMap<(Namespace, EntityId), Entity>,
    limits: HashMap<(Namespace, LimitScope), Vec<Limit>>,
    audit: HashMap<(Namespace, String), BTreeMap<String, AuditEntry>>,
    usage: BTreeMap<UsageKey, Vec<(LimitName, i64)>>,
    namespaces: std::collections::BTreeSet<Namespace>,
    failure_policies: HashMap<Namespace, FailurePolicy>,
    settings: HashMap<(Namespace, LimitScope), LevelSettings>,
    /// Keys of operations done once: the outcome and until when the key is remembered.
    once: HashMap<(Namespace, EntityId, String), (String, i64)>,
}

impl State {
    /// Changes one setting at `scope` with `change` (which returns what it replaced), audited
    /// with `text` for the values; a level left with no setting is forgotten.
    fn set_level<T: Copy>(
        &mut self,
        ns: &Namespace,
        scope: &LimitScope,
        setting: (Option<T>, &str, fn(T) -> String),
        actions: (AuditAction, AuditAction),
        field: fn(&mut LevelSettings) -> &mut Option<T>,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let (after, what, text) = setting;
        let at = (ns.clone(), scope.clone());
        let level = self.settings.entry(at.clone()).or_default();
        let before = std::mem::replace(field(level), after);
        if level == &LevelSettings::default() {
            self.settings.remove(&at);
        }
        if before.is_none() && after.is_none() {
            return Err(StoreError::NotFound(format!("{what} of {scope}")));
        }
        let e = AuditEntry::new(
            scope.audit_subject(),
            if after.is_some() {
                actions.0
            } else {
                actions.1
            },
            by,
            before.map(text),
            after.map(text),
        );
        self.audit(ns, e);
        Ok(())
    }
}

/// The embedded in-memory store. Data lives as long as the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change: every operation
        // validates first and mutates last. So a poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn apply(&self, key: &BucketKey, write: &Write, index: usize) -> Result<Bucket, StoreError> {
        let current = self.buckets.get(key);
        let conflict = || StoreError::Conflict {
            index,
            current: current.cloned().map(Box::new),
        };
        match write {
            Write::Create(bucket) => match current {
                Some(_) => Err(conflict()),
                None => Ok(bucket.clone()),
            },
            Write::Change(change) => {
                let mut next = current.cloned().ok_or_else(conflict)?;
                next.apply(change).map_err(|_| conflict())?;
                Ok(next)
            }
        }
    }

    fn audit(&mut self, ns: &Namespace, entry: AuditEntry) {
        self.audit
            .entry((ns.clone(), entry.subject.clone()))
            .or_default()
            .insert(audit_sort_key(entry.at_ms), entry);
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn load_bucket(&self, key: &BucketKey) -> Result<Option<Bucket>, StoreError> {
        Ok(self.lock().buckets.get(key).cloned())
    }

    async fn write_bucket(&self, key: &BucketKey, write: &Write) -> Result<Bucket, StoreError> {
        let mut state = self.lock();
        let next = state.apply(key, write, 0)?;
        state.buckets.insert(key.clone(), next.clone());
        Ok(next)
    }

    async fn commit(&self, writes: &[KeyedWrite]) -> Result<(), StoreError> {
        let mut state = self.lock();
        let mut staged: HashMap<&BucketKey, Bucket> = HashMap::new();
        for (index, w) in writes.iter().enumerate() {
            if staged.contains_key(&w.key) {
                return Err(StoreError::Backend(
                    "a commit may touch each bucket only once".into(),
                ));
            }
            staged.insert(&w.key, state.apply(&w.key, &w.write, index)?);
        }
        for (key, bucket) in staged {
            state.buckets.insert(key.clone(), bucket);
        }
        Ok(())
    }

    async fn operate_bucket(
        &self,
        key: &BucketKey,
        write: Option<&Write>,
        entry: &AuditEntry,
        once: Option<&Once>,
    ) -> Result<Option<String>, StoreError> {
        let mut state = self.lock();
        let remembered = once.map(|o| (key.namespace.clone(), key.entity.clone(), o.key.clone()));
        if let Some(at) = &remembered
            && let Some((outcome, until_ms)) = state.once.get(at)
            && *until_ms >= entry.at_ms
        {
            return Ok(Some(outcome.clone()));
        }
        let next = write.map(|w| state.apply(key, w, 0)).transpose()?;
        if let Some(next) = next {
            state.buckets.insert(key.clone(), next);
        }
        if let (Some(at), Some(o)) = (remembered, once) {
            state.once.insert(at, (o.outcome.clone(), o.until_ms));
        }
        state.audit(&key.namespace, entry.clone());
        Ok(None)
    }

    async fn resource_buckets(
        &self,
        ns: &Namespace,
        resource: &ResourceId,
    ) -> Result<Vec<(EntityId, Bucket)>, StoreError> {
        let mut found: Vec<(EntityId, Bucket)> = self
            .lock()
            .buckets
            .iter()
            .filter(|(k, _)| k.namespace == *ns && k.resource == *resource)
            .map(|(k, b)| (k.entity.clone(), b.clone()))
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    async fn list_entities_with_limits(
        &self,
        ns: &Namespace,
        resource: &ResourceId,
        page_size: usize,
        after: Option<&EntityId>,
    ) -> Result<(Vec<EntityId>, Option<EntityId>), StoreError> {
        let state = self.lock();
        let mut ids: Vec<EntityId> = state
            .limits
            .keys()
            .filter_map(|(n, scope)| match scope {
                LimitScope::EntityResource(e, r) if n == ns && r == resource => Some(e.clone()),
                _ => None,
            })
            .filter(|e| after.is_none_or(|a| e > a))
            .collect();
        ids.sort();
        let more = ids.len() > page_size;
        ids.truncate(page_size);
        let next = more.then(|| ids.last().cloned()).flatten();
        Ok((ids, next))
    }

    async fn list_resources_with_defaults(
        &self,
        ns: &Namespace,
    ) -> Result<Vec<ResourceId>, StoreError> {
        let mut resources: Vec<ResourceId> = self
            .lock()
            .limits
            .keys()
            .filter_map(|(n, scope)| match scope {
                LimitScope::Resource(r) if n == ns => Some(r.clone()),
                _ => None,
            })
            .collect();
        resources.sort();
        Ok(resources)
    }

    async fn create_entity(
        &self,
        ns: &Namespace,
        entity: &Entity,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        let key = (ns.clone(), entity.id.clone());
        if state.entities.contains_key(&key) {
            return Err(StoreError::AlreadyExists(format!(
                "entity {:?}",
                entity.id.as_str()
            )));
        }
        state.entities.insert(key, entity.clone());
        let e = AuditEntry::new(
            entity.id.to_string(),
            AuditAction::EntityCreated,
            by,
            None,
            Some(entity_json(entity)),
        );
        state.audit(ns, e);
        Ok(())
    }

    async fn get_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
    ) -> Result<Option<Entity>, StoreError> {
        Ok(self.lock().entities.get(&(ns.clone(), id.clone())).cloned())
    }

    async fn get_entities(
        &self,
        ns: &Namespace,
        ids: &[EntityId],
    ) -> Result<Vec<Option<Entity>>, StoreError> {
        let state = self.lock();
        Ok(ids
            .iter()
            .map(|id| state.entities.get(&(ns.clone(), id.clone())).cloned())
            .collect())
    }

    async fn delete_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        force: bool,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        let key = (ns.clone(), id.clone());
        if !state.entities.contains_key(&key) {
            return Err(StoreError::NotFound(format!("entity {:?}", id.as_str())));
        }
        let children = state
            .entities
            .iter()
            .filter(|((n, _), e)| n == ns && e.parent.as_ref() == Some(id))
            .count();
        if children > 0 && !force {
            return Err(StoreError::Refused(format!(
                "entity {:?} has {children} children; delete them first or force",
                id.as_str()
            )));
        }
        let old = state.entities.remove(&key).expect("checked above");
        state
            .buckets
            .retain(|k, _| !(k.namespace == *ns && k.entity == *id));
        state.once.retain(|(n, e, _), _| !(n == ns && e == id));
        let of_entity = |n: &Namespace, scope: &LimitScope| {
            n == ns
                && matches!(scope, LimitScope::Entity(e) | LimitScope::EntityResource(e, _) if e == id)
        };
        state.limits.retain(|(n, scope), _| !of_entity(n, scope));
        state.settings.retain(|(n, scope), _| !of_entity(n, scope));
        let e = AuditEntry::new(
            id.to_string(),
            AuditAction::EntityDeleted,
            by,
            Some(entity_json(&old)),
            None,
        );
        state.audit(ns, e);
        Ok(())
    }

    async fn move_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        parent: Option<&EntityId>,
        by: &Actor,
    ) -> Result<Entity, StoreError> {
        let mut state = self.lock();
        let entity = state
            .entities
            .get_mut(&(ns.clone(), id.clone()))
            .ok_or_else(|| StoreError::NotFound(format!("entity {:?}", id.as_str())))?;
        let before = entity_json(entity);
        entity.parent = parent.cloned();
        let moved = entity.clone();
        let e = AuditEntry::new(
            id.to_string(),
            AuditAction::EntityMoved,
            by,
            Some(before),
            Some(entity_json(&moved)),
        );
        state.audit(ns, e);
        Ok(moved)
    }

    async fn list_children(
        &self,
        ns: &Namespace,
        parent: &EntityId,
    ) -> Result<Vec<Entity>, StoreError> {
        Ok(self
            .lock()
            .entities
            .iter()
            .filter(|((n, _), e)| n == ns && e.parent.as_ref() == Some(parent))
            .map(|(_, e)| e.clone())
            .collect())
    }

    async fn set_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        limits: &[Limit],
        by: &Actor,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        let before = state
            .limits
            .insert((ns.clone(), scope.clone()), limits.to_vec())
            .map(|old| encode(&old));
        let e = AuditEntry::new(
            scope.audit_subject(),
            AuditAction::LimitsSet,
            by,
            before,
            Some(encode(limits)),
        );
        state.audit(ns, e);
        Ok(())
    }

    async fn get_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
    ) -> Result<Option<Vec<Limit>>, StoreError> {
        Ok(self
            .lock()
            .limits
            .get(&(ns.clone(), scope.clone()))
            .cloned())
    }

    async fn delete_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        let old = state
            .limits
            .remove(&(ns.clone(), scope.clone()))
            .ok_or_else(|| StoreError::NotFound(format!("limits of {scope}")))?;
        let e = AuditEntry::new(
            scope.audit_subject(),
            AuditAction::LimitsDeleted,
            by,
            Some(encode(&old)),
            None,
        );
        state.audit(ns, e);
        Ok(())
    }

    async fn get_level_settings(
        &self,
        ns: &Namespace,
        scopes: &[LimitScope],
    ) -> Result<Vec<LevelSettings>, StoreError> {
        let state = self.lock();
        Ok(scopes
            .iter()
            .map(|scope| {
                let at = (ns.clone(), scope.clone());
                state.settings.get(&at).copied().unwrap_or_default()
            })
            .collect())
    }

    async fn set_gate(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        gate: Option<Gate>,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let actions = (AuditAction::GateSet, AuditAction::GateCleared);
        let setting = (gate, "gate", Gate::text as fn(Gate) -> String);
        self.lock()
            .set_level(ns, scope, setting, actions, |l| &mut l.gate, by)
    }

    async fn set_cascade(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        cascade: Option<bool>,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let actions = (AuditAction::CascadeSet, AuditAction::CascadeCleared);
        let setting = (
            cascade,
            "cascade policy",
            (|c| cascade_text(c).to_owned()) as fn(bool) -> String,
        );
        self.lock()
            .set_level(ns, scope, setting, actions, |l| &mut l.cascade, by)
    }

    async fn get_failure_policy(
        &self,
        ns: &Namespace,
    ) -> Result<Option<FailurePolicy>, StoreError> {
        Ok(self.lock().failure_policies.get(ns).copied())
    }

    async fn set_failure_policy(
        &self,
        ns: &Namespace,
        policy: Option<FailurePolicy>,
        by: &Actor,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        let (before, action) = match policy {
            Some(p) => (
                state.failure_policies.insert(ns.clone(), p),
                AuditAction::FailurePolicySet,
            ),
            None => (
                Some(state.failure_policies.remove(ns).ok_or_else(|| {
                    StoreError::NotFound("the namespace's failure policy".into())
                })?),
                AuditAction::FailurePolicyDeleted,
            ),
        };
        let e = AuditEntry::new(
            LimitScope::System.audit_subject(),
            action,
            by,
            before.map(|p| p.as_str().to_owned()),
            policy.map(|p| p.as_str().to_owned()),
        );
        state.audit(ns, e);
        Ok(())
    }

    async fn list_audit(
        &self,
        ns: &Namespace,
        subject: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<AuditPage, StoreError> {
        let state = self.lock();
        let Some(records) = state.audit.get(&(ns.clone(), subject.to_owned())) else {
            return Ok(AuditPage {
                entries: Vec::new(),
                next: None,
            });
        };
        let mut newest_first = records
            .iter()
            .rev()
            .filter(|(sk, _)| after.is_none_or(|a| sk.as_str() < a));
        let page: Vec<(&String, &AuditEntry)> = newest_first.by_ref().take(page_size).collect();
        let more = newest_first.next().is_some();
        Ok(AuditPage {
            next: more
                .then(|| page.last().map(|(sk, _)| (*sk).clone()))
                .flatten(),
            entries: page.into_iter().map(|(_, e)| e.clone()).collect(),
        })
    }

    async fn add_usage(&self, ns: &Namespace, usage: &[Usage]) -> Result<(), StoreError> {
        let mut state = self.lock();
        for u in usage {
            let key = (
                ns.clone(),
                u.entity.clone(),
                u.period,
                u.start_ms,
                u.resource.clone(),
            );
            let totals = state.usage.entry(key).or_default();
            for (name, amount) in &u.amounts {
                match totals.iter_mut().find(|(n, _)| n == name) {
                    Some((_, total)) => *total += amount,
                    None => totals.push((name.clone(), *amount)),
                }
            }
            totals.sort();
        }
        Ok(())
    }

    async fn usage(&self, ns: &Namespace, query: &UsageQuery<'_>) -> Result<UsagePage, StoreError> {
        // Listed in cursor order; a page goes on after the cursor it was given.
        let cursor = |u: &Usage| UsageCursor {
            partition: u.entity.to_string(),
            sort: format!("{}#{:020}#{}", u.period.as_str(), u.start_ms, u.resource),
        };
        let mut found: Vec<(UsageCursor, Usage)> = self
            .lock()
            .usage
            .iter()
            .filter(|((n, ..), _)| n == ns)
            .map(|((_, e, p, start, r), amounts)| Usage {
                entity: e.clone(),
                resource: r.clone(),
                period: *p,
                start_ms: *start,
                amounts: amounts.clone(),
            })
            .filter(|u| query.matches(u))
            .map(|u| (cursor(&u), u))
            .filter(|(c, _)| query.page.is_none_or(|after| c > after))
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let size = query.page_size.max(1);
        let next = (found.len() > size).then(|| found[size - 1].0.clone());
        found.truncate(size);
        Ok(UsagePage {
            snapshots: found.into_iter().map(|(_, u)| u).collect(),
            next,
        })
    }

    async fn create_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        self.lock().namespaces.insert(ns.clone());
        Ok(())
    }

    async fn list_namespaces(&self) -> Result<Vec<Namespace>, StoreError> {
        Ok(self.lock().namespaces.iter().cloned().collect())
    }

    async fn delete_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        let mut state = self.lock();
        if !state.namespaces.remove(ns) {
            return Err(StoreError::NotFound(format!("namespace {:?}", ns.as_str())));
        }
        state.buckets.retain(|k, _| k.namespace != *ns);
        state.entities.retain(|(n, _), _| n != ns);
        state.limits.retain(|(n, _), _| n != ns);
        state.audit.retain(|(n, _), _| n != ns);
        state.usage.retain(|(n, ..), _| n != ns);
        state.failure_policies.remove(ns);
        state.settings.retain(|(n, _), _| n != ns);
        state.once.retain(|(n, ..), _| n != ns);
        Ok(())
    }
}
