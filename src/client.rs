//! The Rust client: talks to the daemon over its Unix socket.
//!
//! ```no_run
//! # async fn demo() -> Result<(), zae_limiter::client::ClientError> {
//! use zae_limiter::client::{Acquire, Client};
//! use zae_limiter::Limit;
//!
//! let client = Client::connect("/tmp/zae-limiter.sock").await?;
//! let rpm = Limit::per_minute("rpm", 100).expect("a valid limit");
//! let tpm = Limit::per_minute("tpm", 10_000).expect("a valid limit");
//! let mut lease = client
//!     .acquire(Acquire::new("api-key-1", "gpt-4").consume("rpm", 1).consume("tpm", 500).limits([&rpm, &tpm]))
//!     .await?;
//! // ... call the model, then reconcile the real usage:
//! lease.adjust([("tpm", 230)]).await?;
//! lease.commit().await?;
//! # Ok(()) }
//! ```
//!
//! A [`Lease`] dropped without [`Lease::commit`] is rolled back (in the background, on the current
//! Tokio runtime). While it is held, a task on the current runtime renews it every third of the
//! daemon's lease TTL, so a lease lives as long as its holder (an LLM stream longer than the TTL
//! keeps it); one whose process died expires a TTL later and stays consumed. Over-limit is [`ClientError::OverLimit`], carrying the wait and every violated
//! limit. [`BlockingClient`] wraps all of it for code without an async runtime.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::domain::limit::{Limit, MILLI};
use crate::proto;
use crate::proto::admin_client::AdminClient;
use crate::proto::rate_limiter_client::RateLimiterClient;

/// A violated limit in an over-limit answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub limit: String,
    /// Whole tokens available at decision time (negative when in debt).
    pub available: i64,
    pub requested: i64,
    /// `None` when the request exceeds the limit's capacity and can never fit.
    pub retry_after: Option<Duration>,
    /// The resource whose limit this is, in the answer to an acquire with [`Acquire::also`].
    pub resource: Option<String>,
}

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("rate limit exceeded ({}); retry after {retry_after:?}", violations.iter().map(|v| v.limit.as_str()).collect::<Vec<_>>().join(", "))]
    OverLimit {
        /// The longest wait over the violated limits; `None` if the request can never fit.
        retry_after: Option<Duration>,
        violations: Vec<Violation>,
        /// The cascade parent whose limits refused, when it was not the entity asked for.
        refused_by: Option<String>,
    },
    #[error("cannot connect to the zae-limiter daemon: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The socket cannot be used: missing, not a socket, refused, no permission.
    #[error("cannot connect to the zae-limiter daemon at {path}: {reason}")]
    Socket { path: String, reason: String },
    /// The resource is disabled for the entity (`level`: where, e.g. `resource gpt-4`).
    #[error("resource {resource:?} is disabled for entity {entity:?} (set for {level})")]
    Disabled {
        entity: String,
        resource: String,
        level: String,
    },
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    #[error("cannot start a runtime for the blocking client: {0}")]
    Runtime(std::io::Error),
}

impl From<tonic::Status> for ClientError {
    /// [`ClientError::Disabled`] for a refusal of a disabled resource, else the status.
    fn from(status: tonic::Status) -> Self {
        use tonic_types::StatusExt;
        match status.get_details_error_info() {
            Some(info) if info.reason == crate::grpc::DISABLED_REASON => {
                let field = |k: &str| info.metadata.get(k).cloned().unwrap_or_default();
                Self::Disabled {
                    entity: field("entity_id"),
                    resource: field("resource"),
                    level: field("level"),
                }
            }
            _ => Self::Status(status),
        }
    }
}

/// One acquire to make: entity, resource, what to consume, and optionally the limits.
#[derive(Debug, Clone, Default)]
pub struct Acquire {
    request: proto::AcquireRequest,
}

impl Acquire {
    pub fn new(entity_id: impl Into<String>, resource: impl Into<String>) -> Self {
        Self {
            request: proto::AcquireRequest {
                entity_id: entity_id.into(),
                resource: resource.into(),
                ..Default::default()
            },
        }
    }

    /// Consumes `tokens` of the limit `name`.
    pub fn consume(mut self, name: impl Into<String>, tokens: i64) -> Self {
        *self.request.consume.entry(name.into()).or_default() += tokens;
        self
    }

    /// Uses these limits instead of the stored ones.
    pub fn limits<'a>(mut self, limits: impl IntoIterator<Item = &'a Limit>) -> Self {
        self.request
            .limits
            .extend(limits.into_iter().map(proto::Limit::from));
        self
    }

    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.request.namespace = namespace.into();
        self
    }

    /// Also consumes `consume` (limit name, whole tokens) on a further `resource` of the same
    /// entity, all or none with the rest: each resource resolves its own stored limits (so not
    /// with [`Acquire::limits`]); at most 16 resources per acquire. The lease reaches it through
    /// [`Lease::resource`].
    pub fn also<'a>(
        mut self,
        resource: impl Into<String>,
        consume: impl IntoIterator<Item = (&'a str, i64)>,
    ) -> Self {
        let mut part = proto::AlsoAcquire {
            resource: resource.into(),
            ..Default::default()
        };
        for (name, tokens) in consume {
            *part.consume.entry(name.to_owned()).or_default() += tokens;
        }
        self.request.also.push(part);
        self
    }

    /// What to do if the store cannot answer in time (default: the namespace's stored policy,
    /// else the daemon's).
    pub fn on_unavailable(mut self, policy: crate::FailurePolicy) -> Self {
        self.request.on_unavailable = proto::OnUnavailable::from(Some(policy)).into();
        self
    }
}

/// A connection to the daemon; cheap to clone (clones share the connection).
#[derive(Debug, Clone)]
pub struct Client {
    limiter: RateLimiterClient<Channel>,
    admin: AdminClient<Channel>,
    channel: Channel,
}

impl Client {
    /// Connects to the daemon's Unix socket.
    ///
    /// # Errors
    /// [`ClientError::Connect`] when nothing listens there.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = socket.as_ref();
        let endpoint = Endpoint::from_shared(format!("unix://{}", path.display()))?;
        match endpoint.connect().await {
            Ok(channel) => Ok(Self::from_channel(channel)),
            Err(e) => Err(diagnose(path).unwrap_or(ClientError::Connect(e))),
        }
    }

    pub fn from_channel(channel: Channel) -> Self {
        Self {
            limiter: RateLimiterClient::new(channel.clone()),
            admin: AdminClient::new(channel.clone()),
            channel,
        }
    }

    /// The generated `Admin` client (entities and stored limits).
    pub fn admin(&self) -> AdminClient<Channel> {
        self.admin.clone()
    }

    /// The generated `RateLimiter` client, for calls this wrapper does not cover.
    pub fn raw(&self) -> RateLimiterClient<Channel> {
        self.limiter.clone()
    }

    /// The standard gRPC health service of the daemon.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Acquires and commits in one call: for consumption known upfront (no adjustment to make).
    ///
    /// # Errors
    /// As [`Client::acquire`].
    pub async fn consume(&self, acquire: Acquire) -> Result<(), ClientError> {
        let mut request = acquire.request;
        request.commit = true;
        let answer = self.limiter.clone().acquire(request).await?.into_inner();
        match over_limit(&answer) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Acquires, returning a lease on success.
    ///
    /// # Errors
    /// [`ClientError::OverLimit`] when refused; [`ClientError::Status`] for bad input
    /// (`INVALID_ARGUMENT`) or an unavailable store (`UNAVAILABLE`).
    pub async fn acquire(&self, acquire: Acquire) -> Result<Lease, ClientError> {
        let resource = acquire.request.resource.clone();
        let joint = !acquire.request.also.is_empty();
        let answer = self
            .limiter
            .clone()
            .acquire(acquire.request)
            .await?
            .into_inner();
        if let Some(e) = over_limit(&answer) {
            return Err(e);
        }
        // With `also`, each resource says for itself whether it was bypassed.
        let bypassed = |r: &str| match joint {
            true => answer.bypassed_resources.iter().any(|b| b == r),
            false => answer.bypassed,
        };
        let lease = |id: String, statuses, resource: &str| Lease {
            client: self.limiter.clone(),
            renewer: renew_every(&self.limiter, &id, answer.lease_ttl_ms),
            id,
            statuses,
            bypassed: bypassed(resource),
            open: true,
            others: Vec::new(),
        };
        let mut statuses = answer.statuses;
        let mut others = Vec::with_capacity(answer.also.len());
        for other in answer.also {
            let (own, rest) = statuses
                .into_iter()
                .partition(|s| s.resource == other.resource);
            statuses = rest;
            let held = lease(other.lease_id, own, &other.resource);
            others.push((other.resource, held));
        }
        let mut first = lease(answer.lease_id.clone(), statuses, &resource);
        first.others = others;
        Ok(first)
    }

    /// Records extra usage on the open lease `id` (for a lease held elsewhere, see
    /// [`Lease::into_id`]); as [`Lease::adjust`].
    ///
    /// # Errors
    /// As [`Lease::adjust`].
    pub async fn adjust_lease<'a>(
        &self,
        id: &str,
        delta: impl IntoIterator<Item = (&'a str, i64)>,
    ) -> Result<(), ClientError> {
        let mut map = HashMap::new();
        for (name, tokens) in delta {
            *map.entry(name.to_owned()).or_default() += tokens;
        }
        let request = proto::AdjustRequest {
            lease_id: id.to_owned(),
            delta: map,
        };
        self.limiter.clone().adjust(request).await?;
        Ok(())
    }

    /// Keeps the open lease `id` alive for another lease TTL; as [`Lease::renew`].
    ///
    /// # Errors
    /// As [`Lease::renew`].
    pub async fn renew_lease(&self, id: &str) -> Result<(), ClientError> {
        self.limiter.clone().renew(lease_request(id)).await?;
        Ok(())
    }

    /// Commits the open lease `id`; as [`Lease::commit`].
    ///
    /// # Errors
    /// As [`Lease::commit`].
    pub async fn commit_lease(&self, id: &str) -> Result<(), ClientError> {
        self.limiter.clone().commit(lease_request(id)).await?;
        Ok(())
    }

    /// Rolls the open lease `id` back; as [`Lease::rollback`].
    ///
    /// # Errors
    /// As [`Lease::rollback`].
    pub async fn rollback_lease(&self, id: &str) -> Result<(), ClientError> {
        self.limiter.clone().rollback(lease_request(id)).await?;
        Ok(())
    }

    /// Balances of every limit of a bucket (whole tokens), without consuming.
    ///
    /// # Errors
    /// [`ClientError::Status`] for bad input or an unavailable store.
    pub async fn available(
        &self,
        entity_id: &str,
        resource: &str,
        limits: &[Limit],
    ) -> Result<HashMap<String, i64>, ClientError> {
        let answer = self
            .limiter
            .clone()
            .available(proto::AvailableRequest {
                entity_id: entity_id.into(),
                resource: resource.into(),
                limits: limits.iter().map(proto::Limit::from).collect(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(answer
            .statuses
            .into_iter()
            .map(|s| (s.name, s.available_milli.div_euclid(MILLI)))
            .collect())
    }
}

fn lease_request(id: &str) -> proto::LeaseRequest {
    proto::LeaseRequest {
        lease_id: id.to_owned(),
        ..Default::default()
    }
}

/// Why the socket at `path` cannot be used, in words that say what to do (`None`: it can).
fn diagnose(path: &Path) -> Option<ClientError> {
    use std::io::ErrorKind;
    use std::os::unix::fs::FileTypeExt;
    let why = |reason: String| ClientError::Socket {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Some(why(
                "it is not a socket (is --socket or ZAE_LIMITER_SOCKET the daemon's socket?)"
                    .into(),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Some(why(format!(
                "no such socket ({e}); is the daemon running (`zae-limiter serve`), and is this \
                 its socket?"
            )));
        }
        _ => {}
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => None,
        Err(e) if e.kind() == ErrorKind::PermissionDenied => Some(why(format!(
            "{e}; this user may not open the socket (join the socket's group, see \
             server.socket_group and server.socket_mode)"
        ))),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Some(why(format!(
            "{e}; no daemon listens there (a socket file left behind?)"
        ))),
        Err(e) => Some(why(e.to_string())),
    }
}

fn over_limit(answer: &proto::AcquireResponse) -> Option<ClientError> {
    (!answer.allowed).then(|| ClientError::OverLimit {
        retry_after: answer.retry_after_ms.map(Duration::from_millis),
        refused_by: (!answer.refused_by.is_empty()).then(|| answer.refused_by.clone()),
        violations: answer
            .statuses
            .iter()
            .filter(|s| !s.allowed)
            .map(|s| Violation {
                limit: s.name.clone(),
                available: s.available_milli.div_euclid(MILLI),
                requested: s.requested_milli / MILLI,
                retry_after: s.retry_after_ms.map(Duration::from_millis),
                resource: (!s.resource.is_empty()).then(|| s.resource.clone()),
            })
            .collect(),
    })
}

/// Renews the lease `id` every third of `ttl_ms` on the current runtime, until aborted or the
/// daemon no longer knows the lease (`None`: no TTL, or no runtime).
fn renew_every(
    client: &RateLimiterClient<Channel>,
    id: &str,
    ttl_ms: u64,
) -> Option<tokio::task::AbortHandle> {
    if ttl_ms == 0 || id.is_empty() {
        return None;
    }
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let every = Duration::from_millis((ttl_ms / 3).max(1));
    let (mut client, lease_id) = (client.clone(), id.to_owned());
    let task = runtime.spawn(async move {
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            timer.tick().await;
            let request = proto::LeaseRequest {
                lease_id: lease_id.clone(),
                ..Default::default()
            };
            match client.renew(request).await {
                Ok(_) => {}
                // Closed or expired: nothing left to keep alive.
                Err(s) if s.code() == tonic::Code::NotFound => return,
                Err(e) => tracing::debug!("renewing lease {lease_id} failed, trying again: {e}"),
            }
        }
    });
    Some(task.abort_handle())
}

/// An admitted acquire. Adjust it with the real usage, then commit; dropped without commit, it
/// is rolled back. It is renewed in the background while held.
#[derive(Debug)]
pub struct Lease {
    client: RateLimiterClient<Channel>,
    id: String,
    statuses: Vec<proto::LimitStatus>,
    bypassed: bool,
    open: bool,
    renewer: Option<tokio::task::AbortHandle>,
    /// The leases of the further resources of an acquire with [`Acquire::also`].
    others: Vec<(String, Lease)>,
}

impl Lease {
    /// The lease of a further resource of an acquire with [`Acquire::also`] (`None`: not one of
    /// them), to adjust on its own; [`Lease::commit`] and [`Lease::rollback`] close it with this
    /// one.
    pub fn resource(&mut self, resource: &str) -> Option<&mut Lease> {
        self.others
            .iter_mut()
            .find(|(r, _)| r == resource)
            .map(|(_, lease)| lease)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every limit's status at the time of the decision.
    pub fn statuses(&self) -> &[proto::LimitStatus] {
        &self.statuses
    }

    /// Whether it was admitted under a bypass gate on its resource (see [`Lease::resource`] for
    /// the others of an acquire with [`Acquire::also`]): the entity's balances were not debited
    /// (its consumption is still counted), and [`Lease::statuses`] are its cascade parent's.
    pub fn bypassed(&self) -> bool {
        self.bypassed
    }

    /// The soft limits this acquire overdrew (admitted into debt), by name.
    pub fn overdrawn(&self) -> impl Iterator<Item = &str> {
        self.statuses
            .iter()
            .filter(|s| s.overdrawn)
            .map(|s| s.name.as_str())
    }

    /// Keeps the lease alive now (the background renewal does this on its own).
    ///
    /// # Errors
    /// [`ClientError::Status`]: `NOT_FOUND` once the lease is closed or expired.
    pub async fn renew(&mut self) -> Result<(), ClientError> {
        self.client.renew(lease_request(&self.id)).await?;
        Ok(())
    }

    /// Records extra usage (negative: less) per limit, in whole tokens; written at commit. May
    /// drive a balance negative.
    ///
    /// # Errors
    /// [`ClientError::Status`]: `NOT_FOUND` for an expired lease, `INVALID_ARGUMENT` for a limit
    /// the lease does not have.
    pub async fn adjust<'a>(
        &mut self,
        delta: impl IntoIterator<Item = (&'a str, i64)>,
    ) -> Result<(), ClientError> {
        let mut map = HashMap::new();
        for (name, tokens) in delta {
            *map.entry(name.to_owned()).or_default() += tokens;
        }
        self.client
            .adjust(proto::AdjustRequest {
                lease_id: self.id.clone(),
                delta: map,
            })
            .await?;
        Ok(())
    }

    /// Closes the lease (and those of its further resources), writing the net adjustment.
    ///
    /// # Errors
    /// [`ClientError::Status`] when the lease expired or the write failed (the first failure;
    /// every lease is closed all the same).
    pub async fn commit(self) -> Result<(), ClientError> {
        self.close(true).await
    }

    /// Closes the lease (and those of its further resources), giving back everything it
    /// acquired.
    ///
    /// # Errors
    /// As [`Lease::commit`].
    pub async fn rollback(self) -> Result<(), ClientError> {
        self.close(false).await
    }

    async fn close(mut self, commit: bool) -> Result<(), ClientError> {
        self.open = false;
        self.stop_renewing();
        let mut leases = vec![(self.client.clone(), std::mem::take(&mut self.id))];
        for (_, mut other) in std::mem::take(&mut self.others) {
            other.open = false;
            other.stop_renewing();
            leases.push((other.client.clone(), std::mem::take(&mut other.id)));
        }
        let closes = leases.into_iter().map(|(mut client, id)| async move {
            if commit {
                client.commit(lease_request(&id)).await
            } else {
                client.rollback(lease_request(&id)).await
            }
        });
        for closed in futures_util::future::join_all(closes).await {
            closed?;
        }
        Ok(())
    }

    /// The further resources of an acquire with [`Acquire::also`] and their lease ids, in
    /// request order.
    pub fn others(&self) -> impl Iterator<Item = (&str, &str)> {
        self.others
            .iter()
            .map(|(resource, lease)| (resource.as_str(), lease.id()))
    }

    /// Leaves the lease open and returns its id, for closing it elsewhere (so are the leases of
    /// its further resources: see [`Lease::others`] for their ids). It is no longer renewed
    /// here: whoever holds the id renews it (`Renew`), or it expires a lease TTL after the last
    /// call on it and stays consumed.
    pub fn into_id(mut self) -> String {
        for (_, other) in std::mem::take(&mut self.others) {
            other.into_id();
        }
        self.open = false;
        self.stop_renewing();
        std::mem::take(&mut self.id)
    }

    fn stop_renewing(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_renewing();
        if !self.open {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut client = self.client.clone();
        let lease_id = std::mem::take(&mut self.id);
        runtime.spawn(async move {
            if let Err(e) = client
                .rollback(proto::LeaseRequest {
                    lease_id,
                    ..Default::default()
                })
                .await
            {
                tracing::warn!("rolling back a dropped lease failed: {e}");
            }
        });
    }
}

/// The client for code without an async runtime: every call blocks.
#[derive(Debug)]
pub struct BlockingClient {
    runtime: std::sync::Arc<tokio::runtime::Runtime>,
    client: Client,
}

impl BlockingClient {
    /// # Errors
    /// As [`Client::connect`].
    pub fn connect(socket: impl AsRef<Path>) -> Result<Self, ClientError> {
        // One worker thread of its own, so that held leases are renewed between calls.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        let client = runtime.block_on(Client::connect(socket))?;
        Ok(Self {
            runtime: std::sync::Arc::new(runtime),
            client,
        })
    }

    /// # Errors
    /// As [`Client::acquire`].
    pub fn acquire(&self, acquire: Acquire) -> Result<BlockingLease, ClientError> {
        // Inside the runtime, so the lease's renewal runs on its worker.
        let lease = self.runtime.block_on(self.client.acquire(acquire))?;
        Ok(BlockingLease {
            runtime: self.runtime.clone(),
            lease: Some(lease),
        })
    }
}

/// A [`Lease`] for blocking code; rolled back when dropped without commit.
#[derive(Debug)]
pub struct BlockingLease {
    runtime: std::sync::Arc<tokio::runtime::Runtime>,
    lease: Option<Lease>,
}

impl BlockingLease {
    pub fn id(&self) -> &str {
        self.lease.as_ref().map_or("", Lease::id)
    }

    /// As [`Lease::statuses`].
    pub fn statuses(&self) -> &[proto::LimitStatus] {
        self.lease.as_ref().map_or(&[], Lease::statuses)
    }

    /// As [`Lease::bypassed`].
    pub fn bypassed(&self) -> bool {
        self.lease.as_ref().is_some_and(Lease::bypassed)
    }

    /// # Errors
    /// As [`Lease::adjust`].
    pub fn adjust<'a>(
        &mut self,
        delta: impl IntoIterator<Item = (&'a str, i64)>,
    ) -> Result<(), ClientError> {
        let lease = self
            .lease
            .as_mut()
            .expect("an open lease until commit or rollback");
        self.runtime.block_on(lease.adjust(delta))
    }

    /// # Errors
    /// As [`Lease::commit`].
    pub fn commit(mut self) -> Result<(), ClientError> {
        let lease = self
            .lease
            .take()
            .expect("an open lease until commit or rollback");
        self.runtime.block_on(lease.commit())
    }

    /// # Errors
    /// As [`Lease::rollback`].
    pub fn rollback(mut self) -> Result<(), ClientError> {
        let lease = self
            .lease
            .take()
            .expect("an open lease until commit or rollback");
        self.runtime.block_on(lease.rollback())
    }
}

impl Drop for BlockingLease {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let _ = self.runtime.block_on(lease.rollback());
        }
    }
}
