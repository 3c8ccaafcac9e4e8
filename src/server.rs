//! `run`: binds the listeners, serves the gRPC API until shutdown, then shuts down in a fixed
//! order: stop accepting, drain in-flight requests, stop actors (they answer what they hold),
//! remove the socket file.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
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
    pub tcp: Option<std::net::SocketAddr>,
    pub request_timeout: Duration,
    pub drain_timeout: Duration,
    /// Which callers may use which namespaces.
    pub access: Arc<Access>,
    /// Envoy's rate limit service's descriptor rules.
    pub envoy: Arc<Rules>,
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
/// file that is not a socket is an error. The socket gets mode 0660.
///
/// # Errors
/// [`ServerError`] saying which of those happened.
pub async fn bind_socket(path: &Path) -> Result<UnixListener, ServerError> {
    let shown = path.display().to_string();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(shown));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::SocketInUse(shown));
        }
        std::fs::remove_file(path).map_err(|source| ServerError::Bind {
            what: shown.clone(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        what: shown.clone(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        ServerError::Bind {
            what: shown,
            source,
        }
    })?;
    Ok(listener)
}

/// Serves the API on the socket (and the TCP address, if any) until `shutdown` resolves.
///
/// # Errors
/// [`ServerError`] when a listener cannot be bound or the server fails.
pub async fn run(
    limiter: Limiter,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let uds = bind_socket(&settings.socket).await?;
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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<RateLimiterServer<RateLimiterService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let router = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(RateLimiterServer::new(RateLimiterService::new(
            limiter.clone(),
            settings.access.clone(),
            settings.request_timeout,
        )))
        .add_service(AdminServer::new(AdminService::new(
            limiter.clone(),
            settings.access.clone(),
            settings.request_timeout,
        )))
        .add_service(RateLimitServiceServer::new(RlsService::new(
            limiter.clone(),
            settings.access.clone(),
            settings.request_timeout,
            settings.envoy.clone(),
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
    limiter.shutdown(settings.drain_timeout).await;
    let _ = std::fs::remove_file(&settings.socket);
    tracing::info!("stopped");
    served.map(drop).map_err(ServerError::from)
}

/// The daemon as `zae-limiter serve` runs it: metrics exporter, store, limiter and listeners from a
/// validated configuration, until `shutdown` resolves.
///
/// # Errors
/// One line saying what could not start or failed.
pub async fn serve(
    config: Config,
    dynamo: DynamoSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let limiter_settings = config.limiter.settings()?;
    if let Some(addr) = config.server.metrics_addr {
        crate::metrics::install(addr)
            .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    }
    let store: Arc<dyn Store> = match config.limiter.backend {
        Backend::Memory => Arc::new(MemoryStore::new()),
        Backend::Dynamodb => Arc::new(DynamoStore::connect(&dynamo).await),
    };
    let limiter = Limiter::new(
        Arc::new(Metered::new(store)),
        Arc::new(SystemClock),
        limiter_settings,
    );
    let settings = ServerSettings {
        socket: config.server.socket.clone(),
        tcp: config.server.tcp,
        request_timeout: Duration::from_millis(config.server.request_timeout_ms),
        drain_timeout: Duration::from_millis(config.server.drain_timeout_ms),
        access: Arc::new(Access::new(config.access.clone())),
        envoy: Arc::new(Rules::new(&config.envoy)?),
    };
    tracing::info!(
        backend = ?config.limiter.backend,
        policy = ?config.limiter.failure_policy,
        "starting"
    );
    run(limiter, settings, shutdown)
        .await
        .map_err(|e| e.to_string())
}
