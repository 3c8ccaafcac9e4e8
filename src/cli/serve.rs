//! `zae-limiter serve`: the configuration from the file and the flags, logging, the runtime,
//! and the daemon until SIGINT or SIGTERM.

use super::CliError;
use super::args::ServeArgs;
use crate::config::Config;
use crate::server;

/// The configuration `serve` runs with: the file (or the defaults), then the flags.
fn serve_config(args: &ServeArgs) -> Result<Config, String> {
    let mut config = args.table.config().map_err(|e| e.to_string())?;
    if let Some(socket) = &args.socket {
        config.server.socket = socket.clone();
    }
    if let Some(tcp) = args.tcp {
        config.server.tcp = Some(tcp);
    }
    if let Some(addr) = args.metrics_addr {
        config.server.metrics_addr = Some(addr);
    }
    if args.no_metrics {
        config.server.metrics_addr = None;
    }
    if let Some(backend) = args.backend {
        config.limiter.backend = backend;
    }
    if let Some(policy) = args.failure_policy {
        config.limiter.failure_policy = policy;
    }
    if let Some(threads) = args.worker_threads {
        config.server.worker_threads = threads;
    }
    config.validate()?;
    Ok(config)
}

/// Runs the daemon until SIGINT or SIGTERM, then shuts it down in order.
///
/// # Errors
/// [`CliError::Config`] for a configuration that cannot be used, [`CliError::Serve`] when the
/// daemon cannot start or fails.
pub fn serve(args: ServeArgs) -> Result<(), CliError> {
    use tracing_subscriber::prelude::*;
    let config = serve_config(&args).map_err(CliError::Config)?;
    let dynamo = args.table.settings_from(&config);
    let filter = |level: Option<&str>| match level {
        Some(level) => tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string()),
        None => Ok(tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))),
    };
    // One thread: a current-thread runtime, so no task ever wakes another thread.
    let mut runtime = match config.server.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    let runtime = runtime.enable_all().build().map_err(CliError::Runtime)?;
    // The log's filter (replaced by a reload) applies to the log only: the trace spans have
    // their own (see `telemetry`).
    let (filter_layer, filter_handle) = tracing_subscriber::reload::Layer::new(
        filter(config.server.log_level.as_deref()).map_err(CliError::Config)?,
    );
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter_layer);
    #[cfg(feature = "otel")]
    let (exporter, traces) = match config.telemetry.enabled {
        true => {
            // The exporter's gRPC client lives on the runtime.
            let _runtime = runtime.enter();
            let (exporter, layer) =
                crate::telemetry::Exporter::start(&config.telemetry).map_err(CliError::Config)?;
            (Some(exporter), Some(layer))
        }
        false => (None, None),
    };
    let subscriber = tracing_subscriber::registry().with(log);
    #[cfg(feature = "otel")]
    let subscriber = subscriber.with(traces);
    subscriber.init();
    let require_store = args.require_store;
    let reload = server::Reload {
        load: Box::new(move || serve_config(&args)),
        set_log_level: Box::new(move |level: String| {
            filter_handle
                .reload(filter(Some(&level))?)
                .map_err(|e| e.to_string())
        }),
    };
    let options = server::ServeOptions {
        require_store,
        reload: Some(reload),
    };
    let served = runtime.block_on(async {
        let served = server::serve(config, dynamo, options, shutdown_signal()).await;
        #[cfg(feature = "otel")]
        if let Some(exporter) = exporter {
            // The spans still buffered go out, or are given up on, before the exit.
            let _ = tokio::task::spawn_blocking(move || exporter.shutdown()).await;
        }
        served
    });
    served.map_err(CliError::Serve)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
