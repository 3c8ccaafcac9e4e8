//! What a decision needs from the store besides buckets: the stored limits that apply (entity +
//! resource, entity, resource, system: the first level that has any supplies the whole set), the
//! entity (does it cascade, to which parent) and the namespace registry. Each is cached for
//! `limits_cache_ms` in a bounded [`Cache`]; the caller bounds the time a look-up may take. A
//! cached value in the last quarter of its life is answered at once and re-read in the background
//! (see [`Cache::get_or_claim`]), so an entity in steady use never waits for these reads.
//! Concurrent misses of one key share one read: a burst of calls for an entity not seen yet (a
//! new API key, a restarted daemon) costs one read, not one per call. Entities due for refresh
//! are re-read together: one task gathers them for a moment and reads up to
//! [`REFRESH_BATCH`] in one call ([`crate::store::Store::get_entities`]).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use super::cache::Cache;
use super::messages::ParentSpec;
use super::types::{Deps, LimiterError};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::Limit;
use crate::domain::records::{
    Entity, FailurePolicy, Gate, LevelSettings, LimitScope, MAX_DEPTH, deciding_cascade,
    deciding_gate, gate_scopes,
};

type LimitsKey = (Namespace, EntityId, ResourceId);
type EntityKey = (Namespace, EntityId);

/// The most entities one background refresh reads (DynamoDB's `BatchGetItem` limit).
pub(crate) const REFRESH_BATCH: usize = 100;

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

/// A namespace's stored failure policy as last read. Kept past `limits_cache_ms` (it is wanted
/// most when the store cannot be read) and re-read in the background once older.
#[derive(Debug, Clone, Copy)]
struct KnownPolicy {
    policy: Option<FailurePolicy>,
    /// When it was read, or when a failed read may be tried again.
    read_at: i64,
    reading: bool,
    /// Bumped by every change made through this daemon: a read that started before one does not
    /// overwrite it.
    version: u64,
}

pub(crate) struct Lookups {
    deps: Arc<Deps>,
    /// Per bucket, the settings of its three levels (see [`gate_scopes`]).
    settings: Arc<Table<LimitsKey, Vec<LevelSettings>>>,
    policies: Arc<dashmap::DashMap<Namespace, KnownPolicy>>,
    limits: Arc<Table<LimitsKey, Option<Vec<Limit>>>>,
    entities: Arc<Table<EntityKey, Option<Entity>>>,
    registry: Arc<Table<(), Vec<Namespace>>>,
    /// Entities due for refresh, to the task that reads them in batches (started on first use).
    entity_refreshes: std::sync::OnceLock<mpsc::UnboundedSender<EntityKey>>,
    /// Bumped by [`Lookups::clear`]: a read that started before a clear does not refill the
    /// cache with what the change replaced.
    generation: Arc<AtomicU64>,
}

impl Lookups {
    pub fn new(deps: Arc<Deps>) -> Self {
        let age = deps.settings.limits_cache_ms;
        let size = deps.settings.max_cached_lookups;
        Self {
            policies: Arc::new(dashmap::DashMap::new()),
            limits: Table::new(age, size),
            settings: Table::new(age, size),
            entities: Table::new(age, size),
            registry: Table::new(age, 1),
            entity_refreshes: std::sync::OnceLock::new(),
            generation: Arc::new(AtomicU64::new(0)),
            deps,
        }
    }

    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.limits.cache.clear();
        self.settings.cache.clear();
        self.entities.cache.clear();
        self.registry.cache.clear();
    }

    /// The namespace's stored failure policy as last read (`None`: none stored, or not read yet),
    /// without waiting: a value older than `limits_cache_ms` (or none) is re-read in the
    /// background.
    pub fn failure_policy(&self, ns: &Namespace) -> Option<FailurePolicy> {
        let now = self.deps.clock.now_ms();
        let age = self.deps.settings.limits_cache_ms;
        let due = |k: &KnownPolicy| !k.reading && now.saturating_sub(k.read_at) >= age;
        // The common case, on every acquire: known and fresh, a shared read of one shard.
        if let Some(known) = self.policies.get(ns)
            && !due(&known)
        {
            return known.policy;
        }
        let (policy, version) = {
            let mut entry = self.policies.entry(ns.clone()).or_insert(KnownPolicy {
                policy: None,
                read_at: i64::MIN,
                reading: false,
                version: 0,
            });
            if !due(&entry) {
                return entry.policy;
            }
            entry.reading = true;
            (entry.policy, entry.version)
        };
        let (deps, policies, ns) = (self.deps.clone(), self.policies.clone(), ns.clone());
        self.deps.tasks.spawn(async move {
            let read = deps.store.get_failure_policy(&ns).await;
            let now = deps.clock.now_ms();
            let Some(mut entry) = policies.get_mut(&ns) else {
                return;
            };
            entry.reading = false;
            match read {
                Ok(policy) if entry.version == version => {
                    entry.policy = policy;
                    entry.read_at = now;
                }
                Ok(_) => {}
                Err(e) => {
                    // Kept as it was; tried again after an eighth of the cache's life.
                    tracing::debug!("reading the failure policy of {ns} failed: {e}");
                    entry.read_at = now.saturating_sub(age - (age / 8).max(1));
                }
            }
        });
        policy
    }

    /// Records a failure policy this daemon just stored (or removed), effective at once.
    pub fn failure_policy_changed(&self, ns: &Namespace, policy: Option<FailurePolicy>) {
        let now = self.deps.clock.now_ms();
        let mut entry = self.policies.entry(ns.clone()).or_insert(KnownPolicy {
            policy,
            read_at: now,
            reading: false,
            version: 0,
        });
        entry.policy = policy;
        entry.read_at = now;
        entry.version += 1;
    }

    /// Drops expired look-ups, so memory follows the entities in use now.
    pub fn purge(&self, now: i64) {
        self.limits.cache.purge(now);
        self.settings.cache.purge(now);
        self.entities.cache.purge(now);
    }

    /// Where entities due for refresh go: the batching task, started on first use.
    fn entity_refreshes(&self) -> &mpsc::UnboundedSender<EntityKey> {
        self.entity_refreshes.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(refresh_entities(
                Arc::downgrade(&self.deps),
                self.entities.clone(),
                self.generation.clone(),
                rx,
            ));
            tx
        })
    }

    /// The cached value of `key`, else `load`'s (cached), read once for all concurrent misses.
    /// A value due for refresh is answered and re-read in the background: sent to `batched`
    /// when given, else by a task of its own.
    async fn cached<K, V, F, Fut>(
        &self,
        table: &Arc<Table<K, V>>,
        key: K,
        load: F,
        batched: Option<&mpsc::UnboundedSender<K>>,
    ) -> Result<V, LimiterError>
    where
        K: Eq + Hash + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
        F: Fn(Arc<Deps>, K) -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, LimiterError>> + Send + 'static,
    {
        let clock = &self.deps.clock;
        if let Some((value, refresh)) = table.cache.get_or_claim(&key, clock.now_ms()) {
            if let Some(batched) = batched.filter(|_| refresh) {
                // Dropped only when the limiter is: nothing is left to refresh then.
                let _ = batched.send(key);
            } else if refresh {
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
            .cached(
                &self.registry,
                (),
                |deps, ()| async move { Ok(deps.store.list_namespaces().await?) },
                None,
            )
            .await?;
        Ok(list.contains(ns))
    }

    /// The settings of a bucket's three levels (gates, cascade policies): one read, cached as
    /// the limits are.
    async fn levels(&self, key: &BucketKey) -> Result<Vec<LevelSettings>, LimiterError> {
        let cache_key = (
            key.namespace.clone(),
            key.entity.clone(),
            key.resource.clone(),
        );
        self.cached(
            &self.settings,
            cache_key,
            |deps, (ns, entity, resource)| async move {
                let scopes = gate_scopes(&entity, &resource);
                Ok(deps.store.get_level_settings(&ns, &scopes).await?)
            },
            None,
        )
        .await
    }

    /// Whether a bucket's resource is served to its entity, and bypassed (its balances not
    /// debited): the first level with a gate that holds now decides.
    ///
    /// # Errors
    /// [`LimiterError::Disabled`] naming the level that disables it.
    pub async fn gate(&self, key: &BucketKey) -> Result<bool, LimiterError> {
        let levels = self.levels(key).await?;
        match deciding_gate(&levels, self.deps.clock.now_ms()) {
            Some((level, Gate::Disabled)) => Err(LimiterError::Disabled {
                entity: key.entity.to_string(),
                resource: key.resource.to_string(),
                level: gate_scopes(&key.entity, &key.resource)[level].to_string(),
            }),
            Some((_, Gate::Bypass { .. })) => Ok(true),
            Some((_, Gate::Enabled)) | None => Ok(false),
        }
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
                None,
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
    /// step by the rule of [`Lookups::cascading_parent`], whatever limits the parents have), so
    /// that every bucket of a chain, for this resource, is decided by one actor, whichever limits
    /// a call gives. `first` is the entity's own cascading parent, already looked up.
    pub async fn group_root(
        &self,
        key: &BucketKey,
        first: Option<&EntityId>,
    ) -> Result<EntityId, LimiterError> {
        let Some(first) = first else {
            return Ok(key.entity.clone());
        };
        let mut up = BucketKey {
            entity: first.clone(),
            ..key.clone()
        };
        // Bounded: moves refuse cycles, and a chain is at most MAX_DEPTH long.
        for _ in 0..MAX_DEPTH {
            match self.cascading_parent(&up).await? {
                Some(p) if p != key.entity => up.entity = p,
                _ => break,
            }
        }
        Ok(up.entity)
    }

    /// The parent an acquire for `key` cascades to: set when the entity exists, has a parent and
    /// cascades on the resource (the first of its entity + resource, entity and resource levels
    /// with a cascade policy decides, else the entity's flag; the levels are read only for an
    /// entity with a parent).
    pub async fn cascading_parent(
        &self,
        key: &BucketKey,
    ) -> Result<Option<EntityId>, LimiterError> {
        let cache_key = (key.namespace.clone(), key.entity.clone());
        let entity = self
            .cached(
                &self.entities,
                cache_key,
                |deps, (ns, id)| async move { Ok(deps.store.get_entity(&ns, &id).await?) },
                Some(self.entity_refreshes()),
            )
            .await?;
        let Some((parent, flag)) = entity.and_then(|e| Some((e.parent?, e.cascade))) else {
            return Ok(None);
        };
        Ok(deciding_cascade(&self.levels(key).await?, flag).then_some(parent))
    }

    /// The cascading parent `parent` of `key`'s entity as an acquire charges it: with its own
    /// stored limits (any level), else with `given` (the call's limits: the Python
    /// zae-limiter's slow path), else not at all (a parent with no limits constrains nothing).
    pub async fn parent_spec(
        &self,
        key: &BucketKey,
        parent: Option<&EntityId>,
        given: Option<&[Limit]>,
    ) -> Result<Option<ParentSpec>, LimiterError> {
        let Some(parent) = parent else {
            return Ok(None);
        };
        let parent_key = BucketKey {
            entity: parent.clone(),
            ..key.clone()
        };
        let limits = match self.resolve(&parent_key).await {
            Ok(limits) => limits,
            Err(LimiterError::InvalidArgument { .. }) => match given {
                Some(given) => given.to_vec(),
                None => return Ok(None),
            },
            Err(e) => return Err(e),
        };
        Ok(Some(ParentSpec {
            entity: parent.clone(),
            limits,
        }))
    }
}

/// Re-reads the entities due for refresh in batches: each batch gathers keys for a moment
/// (`limits_cache_ms / 16`, at most 1 s: well inside the last quarter of an entry's life in which
/// it is refreshed) or until it holds [`REFRESH_BATCH`], then reads them in one store call per
/// namespace. Ends with the limiter.
async fn refresh_entities(
    deps: std::sync::Weak<Deps>,
    table: Arc<Table<EntityKey, Option<Entity>>>,
    generation: Arc<AtomicU64>,
    mut due: mpsc::UnboundedReceiver<EntityKey>,
) {
    while let Some(first) = due.recv().await {
        let Some(deps) = deps.upgrade().filter(|d| !d.tasks.is_closed()) else {
            return;
        };
        let linger_ms = (deps.settings.limits_cache_ms / 16).clamp(1, 1_000);
        let until = tokio::time::Instant::now()
            + std::time::Duration::from_millis(u64::try_from(linger_ms).unwrap_or(1));
        let mut batch = vec![first];
        while batch.len() < REFRESH_BATCH {
            match tokio::time::timeout_at(until, due.recv()).await {
                Ok(Some(key)) => batch.push(key),
                Ok(None) | Err(_) => break,
            }
        }
        let mut by_namespace: HashMap<Namespace, Vec<EntityId>> = HashMap::new();
        for (ns, id) in batch {
            by_namespace.entry(ns).or_default().push(id);
        }
        for (ns, ids) in by_namespace {
            let started = generation.load(Ordering::SeqCst);
            match deps.store.get_entities(&ns, &ids).await {
                Ok(found) if generation.load(Ordering::SeqCst) == started => {
                    let now = deps.clock.now_ms();
                    for (id, entity) in ids.into_iter().zip(found) {
                        table.cache.insert((ns.clone(), id), entity, now);
                    }
                }
                Ok(_) => {}
                // The entries stay until they expire; a later reader claims them again.
                Err(e) => tracing::debug!("background entity refresh failed: {e}"),
            }
        }
    }
}
