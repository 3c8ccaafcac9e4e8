//! What a decision needs from the store besides buckets: the stored limits that apply (entity +
//! resource, entity, resource, system: the first level that has any supplies the whole set), the
//! entity (does it cascade, to which parent) and the namespace registry. Each is cached for
//! `limits_cache_ms` in a bounded [`Cache`]; the caller bounds the time a look-up may take.

use std::sync::Arc;

use super::cache::Cache;
use super::group::ParentSpec;
use super::types::{Deps, LimiterError};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::Limit;
use crate::domain::records::{Entity, LimitScope, MAX_DEPTH};

pub(crate) struct Lookups {
    deps: Arc<Deps>,
    limits: Cache<(Namespace, EntityId, ResourceId), Option<Vec<Limit>>>,
    entities: Cache<(Namespace, EntityId), Option<Entity>>,
    registry: Cache<(), Vec<Namespace>>,
}

impl Lookups {
    pub fn new(deps: Arc<Deps>) -> Self {
        let age = deps.settings.limits_cache_ms;
        let size = deps.settings.max_cached_lookups;
        Self {
            limits: Cache::new(age, size),
            entities: Cache::new(age, size),
            registry: Cache::new(age, 1),
            deps,
        }
    }

    pub fn clear(&self) {
        self.limits.clear();
        self.entities.clear();
        self.registry.clear();
    }

    fn now(&self) -> i64 {
        self.deps.clock.now_ms()
    }

    /// See [`super::Limiter::namespace`].
    pub async fn namespace(&self, requested: &str) -> Result<Namespace, LimiterError> {
        let settings = &self.deps.settings;
        if requested.is_empty() {
            return settings.namespaces.first().cloned().ok_or_else(|| {
                LimiterError::invalid("namespace", "is required (no default is configured)")
            });
        }
        let ns = Namespace::new(requested).map_err(|e| LimiterError::invalid("namespace", e))?;
        if settings.namespaces.contains(&ns)
            || (settings.registered && self.registered(&ns).await?)
        {
            return Ok(ns);
        }
        Err(LimiterError::invalid(
            "namespace",
            format!("unknown namespace {requested:?}"),
        ))
    }

    async fn registered(&self, ns: &Namespace) -> Result<bool, LimiterError> {
        if let Some(list) = self.registry.get(&(), self.now()) {
            return Ok(list.contains(ns));
        }
        let list = self.deps.store.list_namespaces().await?;
        let found = list.contains(ns);
        self.registry.insert((), list, self.now());
        Ok(found)
    }

    /// The stored limits for a bucket.
    ///
    /// # Errors
    /// [`LimiterError::InvalidArgument`] when no level has any.
    pub async fn resolve(&self, key: &BucketKey) -> Result<Vec<Limit>, LimiterError> {
        let cache_key = (
            key.namespace.clone(),
            key.entity.clone(),
            key.resource.clone(),
        );
        let found = match self.limits.get(&cache_key, self.now()) {
            Some(found) => found,
            None => {
                let mut found = None;
                for scope in [
                    LimitScope::EntityResource(key.entity.clone(), key.resource.clone()),
                    LimitScope::Entity(key.entity.clone()),
                    LimitScope::Resource(key.resource.clone()),
                    LimitScope::System,
                ] {
                    if let Some(limits) = self.deps.store.get_limits(&key.namespace, &scope).await?
                    {
                        found = Some(limits);
                        break;
                    }
                }
                self.limits.insert(cache_key, found.clone(), self.now());
                found
            }
        };
        found.ok_or_else(|| {
            LimiterError::invalid(
                "limits",
                format!(
                    "none given and none stored for entity {:?}, resource {:?} or the system",
                    key.entity.as_str(),
                    key.resource.as_str()
                ),
            )
        })
    }

    /// The consistency group of `key`'s entity: the top of its chain of cascading parents (each
    /// step by the rule of [`Lookups::cascade_parent`]), so that every bucket of a chain, for
    /// this resource, is decided by one actor. `first` is the entity's own cascade parent, already
    /// looked up.
    pub async fn group_root(
        &self,
        key: &BucketKey,
        first: Option<&ParentSpec>,
    ) -> Result<EntityId, LimiterError> {
        let Some(first) = first else {
            return Ok(key.entity.clone());
        };
        let mut up = BucketKey {
            entity: first.entity.clone(),
            ..key.clone()
        };
        // Bounded: moves refuse cycles, and a chain is at most MAX_DEPTH long.
        for _ in 0..MAX_DEPTH {
            match self.cascade_parent(&up).await? {
                Some(p) if p.entity != key.entity => up.entity = p.entity,
                _ => break,
            }
        }
        Ok(up.entity)
    }

    /// The parent an acquire for `key` also charges: set when the entity exists, cascades and
    /// has a parent that has limits of its own (stored at any level).
    pub async fn cascade_parent(
        &self,
        key: &BucketKey,
    ) -> Result<Option<ParentSpec>, LimiterError> {
        let cache_key = (key.namespace.clone(), key.entity.clone());
        let entity = match self.entities.get(&cache_key, self.now()) {
            Some(entity) => entity,
            None => {
                let entity = self
                    .deps
                    .store
                    .get_entity(&key.namespace, &key.entity)
                    .await?;
                self.entities.insert(cache_key, entity.clone(), self.now());
                entity
            }
        };
        let Some(parent) = entity.filter(|e| e.cascade).and_then(|e| e.parent) else {
            return Ok(None);
        };
        let parent_key = BucketKey {
            entity: parent.clone(),
            ..key.clone()
        };
        match self.resolve(&parent_key).await {
            Ok(limits) => Ok(Some(ParentSpec {
                entity: parent,
                limits,
            })),
            // A parent with no limits anywhere constrains nothing.
            Err(LimiterError::InvalidArgument { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
