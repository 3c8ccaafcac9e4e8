//! The in-process limiter: the handle the gRPC layer (and tests) call. It validates and routes;
//! the per-entity actors in [`actor`] own all cached bucket state and do the deciding.
//!
//! One actor per consistency group (an entity) is found through a `DashMap` registry, spawned on
//! first use and stopped when idle, so memory stays bounded however many entities pass through.
//! Every call carries a deadline: when the store cannot answer in time, the configured failure
//! policy answers instead, so no caller ever hangs.

mod actor;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ractor::{ActorRef, MessagingErr};

use crate::clock::Clock;
use crate::config::{FailurePolicy, LimiterConfig};
use crate::domain::bucket::{LimitStatus, Rejection};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::{Limit, LimitName};
use crate::domain::records::LimitScope;
use crate::metrics::{self as m, outcome};
use crate::store::{Store, StoreError};
use actor::{GroupActor, Msg};

/// Validated limiter settings (see `[limiter]` in `config/zae-limiter.toml`).
#[derive(Debug, Clone)]
pub struct LimiterSettings {
    pub failure_policy: FailurePolicy,
    /// Namespaces callers may use; a request naming none uses the first.
    pub namespaces: Vec<Namespace>,
    /// Also every namespace registered in the store (`"*"` in the configuration).
    pub registered: bool,
    pub max_staleness: Duration,
    pub min_commit_interval: Duration,
    pub max_batch: usize,
    pub max_queue: usize,
    pub lease_ttl: Duration,
    pub idle_timeout: Duration,
    pub limits_cache: Duration,
    pub usage_flush: Duration,
}

impl LimiterSettings {
    /// # Errors
    /// A message naming the bad namespace.
    pub fn from_config(c: &LimiterConfig) -> Result<Self, String> {
        let namespaces = c
            .namespaces
            .iter()
            .filter(|n| *n != "*")
            .map(|n| Namespace::new(n.as_str()).map_err(|e| format!("limiter.namespaces: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let registered = c.namespaces.iter().any(|n| n == "*");
        Ok(Self {
            failure_policy: c.failure_policy,
            namespaces,
            registered,
            max_staleness: Duration::from_millis(c.max_staleness_ms),
            min_commit_interval: Duration::from_millis(c.min_commit_interval_ms),
            max_batch: c.max_batch.max(1),
            max_queue: c.max_queue.max(1),
            lease_ttl: Duration::from_millis(c.lease_ttl_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            limits_cache: Duration::from_millis(c.limits_cache_ms),
            usage_flush: Duration::from_millis(c.usage_flush_ms),
        })
    }
}

impl Default for LimiterSettings {
    fn default() -> Self {
        Self::from_config(&LimiterConfig::default()).expect("the default namespaces are valid")
    }
}

/// Why a limiter call failed. Over-limit is not an error: it is [`Decision::Rejected`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimiterError {
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("lease {0:?} is unknown, closed or expired")]
    LeaseNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The store failed or did not answer in time, and the policy is `block`.
    #[error("rate-limit store unavailable: {0}")]
    Unavailable(String),
    #[error("deadline exceeded before the decision was made")]
    DeadlineExceeded,
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl LimiterError {
    pub fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

impl From<StoreError> for LimiterError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(what) => {
                Self::AlreadyExists(format!("{what} already exists"))
            }
            StoreError::NotFound(what) => Self::NotFound(format!("{what} does not exist")),
            StoreError::Refused(why) => Self::FailedPrecondition(why),
            StoreError::Transient(_) | StoreError::Backend(_) => Self::Unavailable(e.to_string()),
            StoreError::Conflict { .. } | StoreError::Corrupt(_) => Self::Internal(e.to_string()),
        }
    }
}

/// A lease handle as callers see it. Leases admitted while the store was unreachable under the
/// `allow` policy were never written; closing them writes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseId {
    Backed(u64),
    Unbacked(u64),
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Backed(n) => write!(f, "{n:x}"),
            Self::Unbacked(n) => write!(f, "open-{n:x}"),
        }
    }
}

impl std::str::FromStr for LeaseId {
    type Err = LimiterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || LimiterError::invalid("lease_id", format!("{s:?} is not a lease id"));
        match s.strip_prefix("open-") {
            Some(hex) => u64::from_str_radix(hex, 16)
                .map(Self::Unbacked)
                .map_err(|_| bad()),
            None => u64::from_str_radix(s, 16)
                .map(Self::Backed)
                .map_err(|_| bad()),
        }
    }
}

/// The answer to an acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admitted {
        /// `None` when the acquire was committed at once.
        lease: Option<LeaseId>,
        statuses: Vec<LimitStatus>,
    },
    Rejected {
        rejection: Rejection,
        /// The entity whose limits refused, when it is not the one asked for (a cascade
        /// parent).
        refused_by: Option<EntityId>,
    },
}

/// A validated acquire.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub key: BucketKey,
    /// Milli-tokens per limit name.
    pub amounts: Vec<(LimitName, i64)>,
    /// Explicit limits (canonical order); `None` resolves the stored ones.
    pub limits: Option<Vec<Limit>>,
    /// Return a lease to adjust, commit or roll back; `false` commits at once.
    pub lease: bool,
}

type GroupKey = (Namespace, EntityId);
type ResolvedLimits = (Instant, Option<Vec<Limit>>);

struct Shared {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    settings: LimiterSettings,
    actors: DashMap<GroupKey, ActorRef<Msg>>,
    leases: DashMap<u64, GroupKey>,
    next_lease: AtomicU64,
    resolved: DashMap<(Namespace, EntityId, ResourceId), ResolvedLimits>,
    entities: DashMap<(Namespace, EntityId), (Instant, Option<crate::domain::records::Entity>)>,
    registry: std::sync::Mutex<Option<(Instant, Vec<Namespace>)>>,
}

/// The limiter handle; cheap to clone.
#[derive(Clone)]
pub struct Limiter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("actors", &self.shared.actors.len())
            .field("leases", &self.shared.leases.len())
            .finish()
    }
}

impl Limiter {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, settings: LimiterSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                clock,
                settings,
                actors: DashMap::new(),
                leases: DashMap::new(),
                next_lease: AtomicU64::new(1),
                resolved: DashMap::new(),
                entities: DashMap::new(),
                registry: std::sync::Mutex::new(None),
            }),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    pub fn settings(&self) -> &LimiterSettings {
        &self.shared.settings
    }

    pub fn now_ms(&self) -> i64 {
        self.shared.clock.now_ms()
    }

    /// The namespace a request names (empty: the first configured one): one of the configured
    /// namespaces or, with `"*"` configured, one registered in the store.
    ///
    /// # Errors
    /// [`LimiterError::InvalidArgument`] for a malformed or unknown namespace;
    /// [`LimiterError::Unavailable`] when the registry cannot be read.
    pub async fn namespace(&self, requested: &str) -> Result<Namespace, LimiterError> {
        let settings = &self.shared.settings;
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

    /// Whether the store's registry has `ns` (the list is cached like stored limits).
    async fn registered(&self, ns: &Namespace) -> Result<bool, LimiterError> {
        let fresh = self
            .shared
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(at, _)| at.elapsed() < self.shared.settings.limits_cache)
            .map(|(_, list)| list.contains(ns));
        if let Some(found) = fresh {
            return Ok(found);
        }
        let list = self.shared.store.list_namespaces().await?;
        let found = list.contains(ns);
        *self
            .shared
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), list));
        Ok(found)
    }

    /// The namespace an open lease belongs to (`None`: unknown, closed, expired or unbacked).
    pub fn lease_namespace(&self, lease: LeaseId) -> Option<Namespace> {
        match lease {
            LeaseId::Backed(id) => self.shared.leases.get(&id).map(|g| g.0.clone()),
            LeaseId::Unbacked(_) => None,
        }
    }

    /// Decides an acquire, answering by `deadline` at the latest.
    ///
    /// # Errors
    /// [`LimiterError::InvalidArgument`] for a request naming limits it does not have;
    /// [`LimiterError::Unavailable`] when the store fails under the `block` policy.
    pub async fn acquire(
        &self,
        req: AcquireRequest,
        deadline: Instant,
    ) -> Result<Decision, LimiterError> {
        let started = Instant::now();
        // What the decision needs from the store (stored limits, the cascade parent), within the
        // deadline; a store that cannot say is answered by the failure policy.
        let looked_up = async {
            let limits = match req.limits {
                Some(limits) => limits,
                None => self.resolve(&req.key).await?,
            };
            let parent = self.cascade_parent(&req.key).await?;
            Ok::<_, LimiterError>((limits, parent))
        };
        let (limits, parent) = match tokio::time::timeout_at(deadline.into(), looked_up).await {
            Ok(Ok(found)) => found,
            Ok(Err(LimiterError::Unavailable(why))) => {
                return self.fail_open_or_closed(why, req.lease);
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return self.fail_open_or_closed("no answer within the deadline".into(), req.lease);
            }
        };
        if let Some((name, _)) = req
            .amounts
            .iter()
            .find(|(n, _)| !limits.iter().any(|l| l.name() == n))
        {
            return Err(LimiterError::invalid(
                "consume",
                format!("unknown limit \"{name}\"; configured: {}", names(&limits)),
            ));
        }
        let group = (req.key.namespace.clone(), req.key.entity.clone());
        let resource = req.key.resource;
        let amounts = req.amounts;
        let lease = req.lease;
        let result = self
            .call(&group, deadline, |reply| {
                Msg::Acquire(actor::AcquireJob {
                    resource,
                    limits,
                    amounts,
                    parent,
                    deadline,
                    lease,
                    reply,
                })
            })
            .await;
        let result = match result {
            Err(LimiterError::DeadlineExceeded) => {
                self.fail_open_or_closed("no answer within the deadline".into(), lease)
            }
            other => other.and_then(|r| r),
        };
        m::decision_time(started.elapsed().as_secs_f64());
        result
    }

    /// Records extra consumption (negative: less) on an open lease; written at commit.
    ///
    /// # Errors
    /// [`LimiterError::LeaseNotFound`] for unknown, closed or expired leases;
    /// [`LimiterError::InvalidArgument`] for limits the lease does not have.
    pub async fn adjust(
        &self,
        lease: LeaseId,
        delta: Vec<(LimitName, i64)>,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        self.lease_call(lease, deadline, |id, reply| Msg::Adjust(id, delta, reply))
            .await
    }

    /// Closes a lease, writing its net adjustment (nothing when there is none).
    ///
    /// # Errors
    /// As [`Limiter::adjust`], and [`LimiterError::Unavailable`] when the write fails.
    pub async fn commit(&self, lease: LeaseId, deadline: Instant) -> Result<(), LimiterError> {
        self.lease_call(lease, deadline, Msg::Commit).await
    }

    /// Closes a lease, giving back everything it acquired.
    ///
    /// # Errors
    /// As [`Limiter::commit`].
    pub async fn rollback(&self, lease: LeaseId, deadline: Instant) -> Result<(), LimiterError> {
        self.lease_call(lease, deadline, Msg::Rollback).await
    }

    /// How every limit of a bucket stands for a request of `amounts`, without consuming.
    ///
    /// # Errors
    /// As [`Limiter::acquire`].
    pub async fn peek(
        &self,
        key: BucketKey,
        limits: Option<Vec<Limit>>,
        amounts: Vec<(LimitName, i64)>,
        deadline: Instant,
    ) -> Result<Vec<LimitStatus>, LimiterError> {
        let limits = match limits {
            Some(l) => l,
            None => self.resolve(&key).await?,
        };
        let group = (key.namespace.clone(), key.entity.clone());
        self.call(&group, deadline, |reply| {
            Msg::Peek(key.resource, limits, amounts, reply)
        })
        .await?
    }

    /// Stored limits for a bucket: entity+resource, entity default, resource, system; the first
    /// level that has limits supplies the whole set. Cached for `limits_cache`.
    async fn resolve(&self, key: &BucketKey) -> Result<Vec<Limit>, LimiterError> {
        let cache_key = (
            key.namespace.clone(),
            key.entity.clone(),
            key.resource.clone(),
        );
        let fresh = self
            .shared
            .resolved
            .get(&cache_key)
            .filter(|e| e.0.elapsed() < self.shared.settings.limits_cache)
            .map(|e| e.1.clone());
        let found = match fresh {
            Some(found) => found,
            None => {
                let mut found = None;
                for scope in [
                    LimitScope::EntityResource(key.entity.clone(), key.resource.clone()),
                    LimitScope::Entity(key.entity.clone()),
                    LimitScope::Resource(key.resource.clone()),
                    LimitScope::System,
                ] {
                    if let Some(limits) =
                        self.shared.store.get_limits(&key.namespace, &scope).await?
                    {
                        found = Some(limits);
                        break;
                    }
                }
                self.shared
                    .resolved
                    .insert(cache_key, (Instant::now(), found.clone()));
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

    /// The parent an acquire for `key` also charges: set when the entity exists, cascades and
    /// has a parent that has limits of its own (stored at any level). Entities are cached like
    /// stored limits.
    async fn cascade_parent(
        &self,
        key: &BucketKey,
    ) -> Result<Option<actor::ParentSpec>, LimiterError> {
        let cache_key = (key.namespace.clone(), key.entity.clone());
        let fresh = self
            .shared
            .entities
            .get(&cache_key)
            .filter(|e| e.0.elapsed() < self.shared.settings.limits_cache)
            .map(|e| e.1.clone());
        let entity = match fresh {
            Some(entity) => entity,
            None => {
                let entity = self
                    .shared
                    .store
                    .get_entity(&key.namespace, &key.entity)
                    .await?;
                self.shared
                    .entities
                    .insert(cache_key, (Instant::now(), entity.clone()));
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
            Ok(limits) => Ok(Some(actor::ParentSpec {
                entity: parent,
                limits,
            })),
            // A parent with no limits anywhere constrains nothing.
            Err(LimiterError::InvalidArgument { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Forgets cached stored limits and entities (after a change made through this daemon).
    pub fn forget_resolved_limits(&self) {
        self.shared.resolved.clear();
        self.shared.entities.clear();
        *self
            .shared
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Stops every actor after it has answered what it holds; waits up to `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        let actors: Vec<ActorRef<Msg>> = self
            .shared
            .actors
            .iter()
            .map(|e| e.value().clone())
            .collect();
        self.shared.actors.clear();
        for a in &actors {
            // An actor already stopping rejects the marker; it is on its way out anyway.
            let _ = a.drain();
        }
        let until = tokio::time::Instant::now() + timeout;
        for a in &actors {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let _ = a.wait(Some(left)).await;
        }
    }

    fn fail_open_or_closed(&self, why: String, lease: bool) -> Result<Decision, LimiterError> {
        match self.shared.settings.failure_policy {
            FailurePolicy::Block => {
                m::decision(outcome::FAILED_CLOSED);
                Err(LimiterError::Unavailable(why))
            }
            FailurePolicy::Allow => {
                m::decision(outcome::FAILED_OPEN);
                let n = self.shared.next_lease.fetch_add(1, Ordering::Relaxed);
                Ok(Decision::Admitted {
                    lease: lease.then_some(LeaseId::Unbacked(n)),
                    statuses: Vec::new(),
                })
            }
        }
    }

    async fn lease_call(
        &self,
        lease: LeaseId,
        deadline: Instant,
        msg: impl FnOnce(u64, ractor::RpcReplyPort<Result<(), LimiterError>>) -> Msg,
    ) -> Result<(), LimiterError> {
        let id = match lease {
            LeaseId::Unbacked(_) => return Ok(()),
            LeaseId::Backed(id) => id,
        };
        let group = self
            .shared
            .leases
            .get(&id)
            .map(|g| g.value().clone())
            .ok_or_else(|| LimiterError::LeaseNotFound(lease.to_string()))?;
        self.call(&group, deadline, |reply| msg(id, reply)).await?
    }

    /// Sends a call to the group's actor, spawning it if needed. An actor that was stopping
    /// (idle) hands the message back, and it goes to a fresh actor instead.
    async fn call<T: Send + 'static>(
        &self,
        group: &GroupKey,
        deadline: Instant,
        build: impl FnOnce(ractor::RpcReplyPort<T>) -> Msg,
    ) -> Result<T, LimiterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut msg = build(ractor::RpcReplyPort::from(tx));
        for _ in 0..3 {
            let actor = self.actor(group)?;
            match actor.send_message(msg) {
                Ok(()) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    return match tokio::time::timeout(remaining, rx).await {
                        Ok(Ok(value)) => Ok(value),
                        Ok(Err(_)) => Err(LimiterError::Internal(
                            "the entity's actor stopped without answering".into(),
                        )),
                        Err(_) => Err(LimiterError::DeadlineExceeded),
                    };
                }
                Err(MessagingErr::SendErr(back)) => msg = back,
                Err(e) => return Err(LimiterError::Internal(format!("actor unreachable: {e}"))),
            }
            let stale = actor.get_id();
            self.shared
                .actors
                .remove_if(group, |_, r| r.get_id() == stale);
        }
        Err(LimiterError::Internal(
            "could not reach the entity's actor".into(),
        ))
    }

    fn actor(&self, group: &GroupKey) -> Result<ActorRef<Msg>, LimiterError> {
        if let Some(r) = self.shared.actors.get(group) {
            return Ok(r.clone());
        }
        let entry = self
            .shared
            .actors
            .entry(group.clone())
            .or_try_insert_with(|| {
                let args = actor::Args {
                    shared: self.shared.clone(),
                    group: group.clone(),
                };
                ractor::ActorRuntime::spawn_instant(None, GroupActor, args).map(|(r, _)| r)
            })
            .map_err(|e| LimiterError::Internal(format!("cannot start an entity actor: {e}")))?;
        Ok(entry.clone())
    }
}

fn names(limits: &[Limit]) -> String {
    limits
        .iter()
        .map(|l| l.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
