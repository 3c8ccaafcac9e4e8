//! What a decision needs from the store besides buckets: the stored limits that apply (entity +
//! resource, entity, resource, system: the first level that has any supplies the whole set), the
//! entity (does it cascade, to which parent) and the namespace registry. Each is cached for
//! `limits_cache_ms` in a bounded [`Cache`]; the caller bounds the time a look-up may take. A
//! cached value in the last quarter of its life is answered at once and re-read in the background
//! (see [`Cache::get_or_claim`]), so an entity in steady use never waits for these reads.
//! Concurrent misses of one key share one read: a burst of calls for an entity not seen yet (a
//! new API key, a restarted daemon) costs one read, not one per call.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::cache::Cache;
use super::messages::ParentSpec;
use super::types::{Deps, LimiterError};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::Limit;
use crate::domain::records::{Entity, LimitScope, MAX_DEPTH};

type LimitsKey = (Namespace, EntityId, ResourceId);
type EntityKey = (Namespace, EntityId);

/// A cache and the reads in flight for keys it misses.
struct Table<K: Eq + Hash, V> {
    cache: Cache<K, V>,
    /// Per key, the answer of the read in flight (`None` until it lands); its reader removes it.
    flights: Mutex<HashMap<K, Flight<V>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Table<K, V> {
    fn new(max_age_ms: i64, max_entries: usize) -> Arc<Self> {
        Arc::new(Self {
            cache: Cache::new(max_age_ms, max_entries),
            flights: Mutex::new(HashMap::new()),
        })
    }

    /// Joins the read in flight for `key`, or starts one: `Err` carries the sender of the new
    /// read's answer, for the caller to fill.
    fn join(&self, key: &K) -> Result<Flight<V>, watch::Sender<Answer<V>>> {
        let mut flights = self
            .flights
            .lock()
            .expect("never poisoned: no panics under it");
        if let Some(answer) = flights.get(key) {
            return Ok(answer.clone());
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(key.clone(), rx);
        Err(tx)
    }

    fn landed(&self, key: &K) {
        self.flights
            .lock()
            .expect("never poisoned: no panics under it")
            .remove(key);
    }
}

/// A read's answer, `None` until it lands.
type Answer<V> = Option<Result<V, LimiterError>>;
type Flight<V> = watch::Receiver<Answer<V>>;

/// Ends a read in flight however its reader leaves (answered, failed or dropped at a deadline):
/// callers waiting on a dropped one start their own.
struct Landing<'a, K: Eq + Hash + Clone, V: Clone> {
    table: &'a Table<K, V>,
    key: &'a K,
}

impl<K: Eq + Hash + Clone, V: Clone> Drop for Landing<'_, K, V> {
    fn drop(&mut self) {
        self.table.landed(self.key);
    }
}

pub(crate) struct Lookups {
    deps: Arc<Deps>,
    limits: Arc<Table<LimitsKey, Option<Vec<Limit>>>>,
    entities: Arc<Table<EntityKey, Option<Entity>>>,
    registry: Arc<Table<(), Vec<Namespace>>>,
    /// Bumped by [`Lookups::clear`]: a read that started before a clear does not refill the
    /// cache with what the change replaced.
    generation: Arc<AtomicU64>,
}

impl Lookups {
    pub fn new(deps: Arc<Deps>) -> Self {
        let age = deps.settings.limits_cache_ms;
        let size = deps.settings.max_cached_lookups;
        Self {
            limits: Table::new(age, size),
            entities: Table::new(age, size),
            registry: Table::new(age, 1),
            generation: Arc::new(AtomicU64::new(0)),
            deps,
        }
    }

    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.limits.cache.clear();
        self.entities.cache.clear();
        self.registry.cache.clear();
    }

    /// Drops expired look-ups, so memory follows the entities in use now.
    pub fn purge(&self, now: i64) {
        self.limits.cache.purge(now);
        self.entities.cache.purge(now);
    }

    /// The cached value of `key`, else `load`'s (cached), read once for all concurrent misses.
    /// A value due for refresh is answered and re-read by a background task.
    async fn cached<K, V, F, Fut>(
        &self,
        table: &Arc<Table<K, V>>,
        key: K,
        load: F,
    ) -> Result<V, LimiterError>
    where
        K: Eq + Hash + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
        F: Fn(Arc<Deps>, K) -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, LimiterError>> + Send + 'static,
    {
        let clock = &self.deps.clock;
        if let Some((value, refresh)) = table.cache.get_or_claim(&key, clock.now_ms()) {
            if refresh {
                let (deps, table, generation) =
                    (self.deps.clone(), table.clone(), self.generation.clone());
                let started = generation.load(Ordering::SeqCst);
                self.deps.tasks.spawn(async move {
                    match load(deps.clone(), key.clone()).await {
                        Ok(fresh) if generation.load(Ordering::SeqCst) == started => {
                            table.cache.insert(key, fresh, deps.clock.now_ms());
                        }
                        Ok(_) => {}
                        // The entry stays until it expires; another reader retries.
                        Err(e) => tracing::debug!("background look-up refresh failed: {e}"),
                    }
                });
            }
            return Ok(value);
        }
        loop {
            match table.join(&key) {
                Ok(mut flight) => {
                    if let Ok(answer) = flight.wait_for(Option::is_some).await {
                        return answer.clone().expect("waited for an answer");
                    }
                    // Its reader was dropped (at its caller's deadline): read anew.
                }
                Err(tx) => {
                    let _landing = Landing { table, key: &key };
                    let started = self.generation.load(Ordering::SeqCst);
                    let answer = load(self.deps.clone(), key.clone()).await;
                    if let Ok(value) = &answer
                        && self.generation.load(Ordering::SeqCst) == started
                    {
                        table
                            .cache
                            .insert(key.clone(), value.clone(), clock.now_ms());
                    }
                    tx.send_replace(Some(answer.clone()));
                    return answer;
                }
            }
        }
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
        let list = self
            .cached(&self.registry, (), |deps, ()| async move {
                Ok(deps.store.list_namespaces().await?)
            })
            .await?;
        Ok(list.contains(ns))
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
        let found = self
            .cached(
                &self.limits,
                cache_key,
                |deps, (ns, entity, resource)| async move {
                    for scope in [
                        LimitScope::EntityResource(entity.clone(), resource.clone()),
                        LimitScope::Entity(entity),
                        LimitScope::Resource(resource),
                        LimitScope::System,
                    ] {
                        if let Some(limits) = deps.store.get_limits(&ns, &scope).await? {
                            return Ok(Some(limits));
                        }
                    }
                    Ok(None)
                },
            )
            .await?;
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
        let entity = self
            .cached(&self.entities, cache_key, |deps, (ns, id)| async move {
                Ok(deps.store.get_entity(&ns, &id).await?)
            })
            .await?;
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
