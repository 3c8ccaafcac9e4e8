//! `run`: binds the listeners, serves the gRPC API until shutdown, then shuts down in a fixed
//! order: stop accepting, drain in-flight requests, stop actors (they answer what they hold),
//! remove the socket file.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;

use crate::access::Access;
use crate::authority::LocalAuthority;
use crate::clock::SystemClock;
use crate::config::{Backend, Config};
use crate::envoy::RlsService;
use crate::envoy::rules::Rules;
use crate::grpc::{AdminService, RateLimiterService};
use crate::limiter::Limiter;
use crate::live::Live;
use crate::metrics as m;
use crate::ops::Readiness;
use crate::proto::admin_server::AdminServer;
use crate::proto::rate_limiter_server::RateLimiterServer;
use crate::store::Store;
use crate::store::dynamodb::{DynamoSettings, DynamoStore};
use crate::store::memory::MemoryStore;
use crate::store::metered::Metered;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;

/// Where and how the daemon listens.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub socket: PathBuf,
    /// Mode bits of the socket file.
    pub socket_mode: u32,
    /// Group of the socket file (`None`: the daemon's own).
    pub socket_gid: Option<u32>,
    pub tcp: Option<std::net::SocketAddr>,
    pub drain_timeout: Duration,
    /// Access rules, Envoy rules and the request deadline: replaced by a reload.
    pub live: Arc<Live>,
    /// How often the store is probed for health.
    pub health_probe: Duration,
    /// Whether RPCs get trace spans (`[telemetry] enabled`), and which share of the calls
    /// without a caller's trace does.
    pub traces: bool,
    pub sampling_ratio: f64,
}

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another zae-limiter is already listening on {0}")]
    SocketInUse(String),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(String),
    #[error("cannot listen on {what}: {source}")]
    Bind {
        what: String,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
}

/// Binds the Unix socket: a stale socket file (no daemon behind it) is replaced, a live one or a
/// file that is not a socket is an error. The socket gets `mode` and, if given, the group `gid`
/// before it appears at `path`: it is bound in a private directory beside it, given its owner
/// and mode there, then moved into place, so no process can connect under other permissions.
///
/// # Errors
/// [`ServerError`] saying which of those happened.
pub async fn bind_socket(
    path: &Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<UnixListener, ServerError> {
    let shown = path.display().to_string();
    let bind_err = |what: &str| {
        let what = what.to_owned();
        move |source| ServerError::Bind { what, source }
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(shown));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::SocketInUse(shown));
        }
        std::fs::remove_file(path).map_err(bind_err(&shown))?;
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let staging = dir
        .unwrap_or(Path::new("."))
        .join(format!(".zae-limiter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(bind_err(&shown))?;
    let staged = staging.join("sock");
    let bound = (|| {
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&staged, None, Some(gid))?;
        }
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    bound.map_err(bind_err(&shown))
}

/// Serves the API on the socket (and the TCP address, if any) until `shutdown` resolves.
///
/// # Errors
/// [`ServerError`] when a listener cannot be bound or the server fails.
pub async fn run(
    limiter: Limiter,
    store: Arc<Metered>,
    settings: ServerSettings,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    // The TCP listener first: once the socket appears at its path, every listener accepts.
    let tcp = match settings.tcp {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind {
                    what: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let uds = bind_socket(&settings.socket, settings.socket_mode, settings.socket_gid).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    // Health is in step with the store from the first request on.
    set_health(&health, readiness.get().is_ok()).await;
    let probe = tokio::spawn(probe_store(store, settings.health_probe, health, readiness));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    // A span per RPC, joined to the caller's trace (without telemetry, not even that).
    #[cfg(feature = "otel")]
    let mut server = match settings.traces {
        true => Server::builder().trace_fn(crate::telemetry::caller_spans(settings.sampling_ratio)),
        false => Server::builder(),
    };
    #[cfg(not(feature = "otel"))]
    let mut server = Server::builder();
    let router = server
        .add_service(health_service)
        .add_service(reflection)
        .add_service(RateLimiterServer::new(RateLimiterService::new(
            limiter.clone(),
            settings.live.clone(),
        )))
        .add_service(AdminServer::new(AdminService::new(
            limiter.clone(),
            settings.live.clone(),
        )))
        .add_service(RateLimitServiceServer::new(RlsService::new(
            limiter.clone(),
            settings.live.clone(),
        )));

    tracing::info!(socket = %settings.socket.display(), tcp = ?settings.tcp, "serving");
    // Stock gRPC clients send the socket path as the authority: see `authority`.
    let uds_incoming = UnixListenerStream::new(uds).map(|conn| conn.map(LocalAuthority::new));
    let uds_server = router
        .clone()
        .serve_with_incoming_shutdown(uds_incoming, stopped(stop_rx.clone()));
    let tcp_server = async {
        match tcp {
            Some(l) => {
                router
                    .serve_with_incoming_shutdown(
                        TcpListenerStream::new(l),
                        stopped(stop_rx.clone()),
                    )
                    .await
            }
            None => Ok(()),
        }
    };
    let servers = async { tokio::try_join!(uds_server, tcp_server) };
    tokio::pin!(servers);
    let served = tokio::select! {
        result = &mut servers => result,
        () = shutdown => {
            tracing::info!("shutting down: draining in-flight requests");
            let _ = stop_tx.send(true);
            match tokio::time::timeout(settings.drain_timeout, &mut servers).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        "in-flight requests still open after {:?}; closing their connections",
                        settings.drain_timeout
                    );
                    Ok(((), ()))
                }
            }
        }
    };
    probe.abort();
    limiter.shutdown(settings.drain_timeout).await;
    let _ = std::fs::remove_file(&settings.socket);
    tracing::info!("stopped");
    served.map(drop).map_err(ServerError::from)
}

/// Keeps `grpc.health.v1` (the whole server and the `RateLimiter` service) and `/ready` in step
/// with whether the store answers: the calls the daemon makes anyway tell it when there are any
/// (none failed, one succeeded within the interval), a probe of its own otherwise. The store logs
/// its own failures (see `Metered`); this logs the change of health.
async fn probe_store(
    store: Arc<Metered>,
    every: Duration,
    health: tonic_health::server::HealthReporter,
    readiness: Arc<Readiness>,
) {
    loop {
        tokio::time::sleep(every).await;
        let result = if store.answered_within(every) {
            Ok(())
        } else {
            match tokio::time::timeout(every.max(Duration::from_secs(1)), store.probe()).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("the store did not answer the health probe in time".to_owned()),
            }
        };
        metrics::gauge!(m::STORE_UP).set(if result.is_ok() { 1.0 } else { 0.0 });
        let cause = result.as_ref().err().cloned();
        if readiness.set(result) {
            set_health(&health, cause.is_none()).await;
            match cause {
                None => tracing::info!("health: SERVING (the store answers again)"),
                Some(cause) => tracing::warn!("health: NOT_SERVING: {cause}"),
            }
        }
    }
}

/// Sets the whole server's and the `RateLimiter` service's health.
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <RateLimiterServer<RateLimiterService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// A fallible step of a reload: a message saying what was wrong.
pub type ReloadStep<A> = Box<dyn Fn(A) -> Result<(), String> + Send + Sync>;

/// How `serve` re-reads its configuration on `SIGHUP`.
#[allow(missing_debug_implementations)]
pub struct Reload {
    /// Reads and validates the configuration as at start-up (the file, then the flags).
    pub load: Box<dyn Fn() -> Result<Config, String> + Send + Sync>,
    /// Applies a log filter.
    pub set_log_level: ReloadStep<String>,
}

/// Options of `zae-limiter serve` beyond the configuration.
#[derive(Default)]
#[allow(missing_debug_implementations)]
pub struct ServeOptions {
    /// Exit with an error when the store cannot serve at start-up (else: `NOT_SERVING` until
    /// it can).
    pub require_store: bool,
    /// Reload on `SIGHUP` (without it, `SIGHUP` is ignored).
    pub reload: Option<Reload>,
}

/// The daemon as `zae-limiter serve` runs it: metrics exporter, store, limiter and listeners from a
/// validated configuration, until `shutdown` resolves.
///
/// # Errors
/// One line saying what could not start or failed.
pub async fn serve(
    config: Config,
    dynamo: DynamoSettings,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    // From here on SIGHUP reloads (or is ignored); it never ends the daemon.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
    let limiter_settings = config.limiter.settings()?;
    let readiness = Arc::new(Readiness::default());
    if let Some(addr) = config.server.metrics_addr {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
        let handle = crate::metrics::install()?;
        tokio::spawn(crate::ops::serve(listener, handle, readiness.clone()));
    }
    let store: Arc<dyn Store> = match config.limiter.backend {
        Backend::Memory => Arc::new(MemoryStore::new()),
        Backend::Dynamodb => Arc::new(DynamoStore::connect(&dynamo).await),
    };
    let metered = Arc::new(Metered::new(store));
    let store: Arc<dyn Store> = metered.clone();
    let first = store.probe().await.map_err(|e| e.to_string());
    metrics::gauge!(m::STORE_UP).set(if first.is_ok() { 1.0 } else { 0.0 });
    if let Err(e) = &first {
        if options.require_store {
            return Err(format!("the store cannot serve: {e}"));
        }
        tracing::error!(
            "the store cannot serve: {e}; answering NOT_SERVING until it can (--require-store \
             exits instead)"
        );
    }
    readiness.set(first);
    let limiter = Limiter::new(store, Arc::new(SystemClock), limiter_settings);
    let live = Arc::new(Live::new(
        Access::new(config.access.clone()),
        Rules::new(&config.envoy)?,
        Duration::from_millis(config.server.request_timeout_ms),
    ));
    let settings = ServerSettings {
        socket: config.server.socket.clone(),
        socket_mode: config.server.socket_mode()?,
        socket_gid: config.server.socket_gid()?,
        tcp: config.server.tcp,
        drain_timeout: Duration::from_millis(config.server.drain_timeout_ms),
        live: live.clone(),
        health_probe: Duration::from_millis(config.server.health_probe_ms),
        traces: config.telemetry.enabled,
        sampling_ratio: config.telemetry.sampling_ratio,
    };
    tracing::info!(
        backend = ?config.limiter.backend,
        policy = ?config.limiter.failure_policy,
        "starting"
    );
    let reloader = tokio::spawn(reload_on_hangup(
        hangups,
        options.reload,
        config,
        limiter.clone(),
        live,
    ));
    let served = run(limiter, metered, settings, readiness, shutdown)
        .await
        .map_err(|e| e.to_string());
    reloader.abort();
    served
}

async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    reload: Option<Reload>,
    mut running: Config,
    limiter: Limiter,
    live: Arc<Live>,
) {
    while hangups.recv().await.is_some() {
        let Some(reload) = &reload else {
            tracing::info!("SIGHUP: this daemon has no configuration to reload");
            continue;
        };
        match apply(reload, &running, &limiter, &live) {
            Ok(next) => {
                metrics::counter!(m::RELOADS, "outcome" => "applied").increment(1);
                running = next;
            }
            Err(e) => {
                metrics::counter!(m::RELOADS, "outcome" => "refused").increment(1);
                tracing::error!("reload refused, the running configuration stays: {e}");
            }
        }
    }
}

/// Reads the configuration again and applies what can change live: access rules, Envoy rules,
/// the request deadline, the failure policy and the log filter. Settings that need a restart are
/// named in a warning and keep their running values.
///
/// # Errors
/// Why the new configuration cannot be used (nothing is applied then).
fn apply(
    reload: &Reload,
    running: &Config,
    limiter: &Limiter,
    live: &Live,
) -> Result<Config, String> {
    let next = (reload.load)()?;
    let rules = Rules::new(&next.envoy)?;
    let restart: Vec<&str> = restart_only(running, &next);
    if let Some(level) = &next.server.log_level {
        (reload.set_log_level)(level.clone())?;
    }
    live.replace(
        Access::new(next.access.clone()),
        rules,
        Duration::from_millis(next.server.request_timeout_ms),
    );
    limiter.set_failure_policy(next.limiter.failure_policy);
    if !restart.is_empty() {
        tracing::warn!(
            "reload: {} changed; that applies at the next restart (the running value stays)",
            restart.join(", ")
        );
    }
    tracing::info!(
        access_rules = next.access.len(),
        envoy_rules = next.envoy.rules.len(),
        policy = ?next.limiter.failure_policy,
        "configuration reloaded"
    );
    // What runs: the new live settings, the old restart-only ones.
    let mut applied = running.clone();
    applied.access = next.access;
    applied.envoy = next.envoy;
    applied.server.request_timeout_ms = next.server.request_timeout_ms;
    applied.server.log_level = next.server.log_level;
    applied.limiter.failure_policy = next.limiter.failure_policy;
    Ok(applied)
}

/// The settings that differ between `a` and `b` and need a restart to change.
fn restart_only(a: &Config, b: &Config) -> Vec<&'static str> {
    let (s, t) = (&a.server, &b.server);
    let (l, k) = (&a.limiter, &b.limiter);
    let (d, e) = (&a.dynamodb, &b.dynamodb);
    [
        ("server.socket", s.socket != t.socket),
        ("server.tcp", s.tcp != t.tcp),
        ("server.metrics_addr", s.metrics_addr != t.metrics_addr),
        ("telemetry", a.telemetry != b.telemetry),
        (
            "server.drain_timeout_ms",
            s.drain_timeout_ms != t.drain_timeout_ms,
        ),
        (
            "server.worker_threads",
            s.worker_threads != t.worker_threads,
        ),
        ("server.socket_group", s.socket_group != t.socket_group),
        ("server.socket_mode", s.socket_mode != t.socket_mode),
        (
            "server.health_probe_ms",
            s.health_probe_ms != t.health_probe_ms,
        ),
        ("limiter.backend", l.backend != k.backend),
        ("limiter.namespaces", l.namespaces != k.namespaces),
        (
            "limiter.max_staleness_ms",
            l.max_staleness_ms != k.max_staleness_ms,
        ),
        (
            "limiter.min_commit_interval_ms",
            l.min_commit_interval_ms != k.min_commit_interval_ms,
        ),
        ("limiter.max_batch", l.max_batch != k.max_batch),
        ("limiter.max_queue", l.max_queue != k.max_queue),
        ("limiter.lease_ttl_ms", l.lease_ttl_ms != k.lease_ttl_ms),
        (
            "limiter.idle_timeout_ms",
            l.idle_timeout_ms != k.idle_timeout_ms,
        ),
        (
            "limiter.entity_cache_ms",
            l.entity_cache_ms != k.entity_cache_ms,
        ),
        (
            "limiter.max_cached_entities",
            l.max_cached_entities != k.max_cached_entities,
        ),
        (
            "limiter.limits_cache_ms",
            l.limits_cache_ms != k.limits_cache_ms,
        ),
        (
            "limiter.max_cached_lookups",
            l.max_cached_lookups != k.max_cached_lookups,
        ),
        (
            "limiter.usage_flush_ms",
            l.usage_flush_ms != k.usage_flush_ms,
        ),
        ("dynamodb", format!("{d:?}") != format!("{e:?}")),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}
