//! OpenTelemetry traces: the `[telemetry]` section, and (with the cargo feature `otel`, on by
//! default) the exporter that sends the daemon's spans over OTLP/gRPC.
//!
//! The spans: one per RPC (`rpc.system = grpc`, joined to the caller's trace through the W3C
//! `traceparent` metadata), and under it the look-ups (entity, limits), the round of the entity's
//! group that carried the request, and each store call (`store.operation`, `store.items`,
//! `store.write_units`, `store.outcome`, `store.conflicts`). They are `tracing` spans of level
//! TRACE and target [`TARGET`]: with telemetry off no subscriber wants them, so each costs one
//! cached level check; the log (`log_level`) never shows them unless it asks for that target.
//!
//! Sampling is decided once, when the RPC arrives (the caller's `traceparent` flag, else
//! `sampling_ratio`), and the child spans exist only under a recorded RPC span ([`traced`]): a
//! call left out of the sample costs no span at all, and no stray root trace starts elsewhere.

use serde::Deserialize;

/// The `tracing` target of the daemon's trace spans.
pub const TARGET: &str = "zae_limiter::trace";

/// Whether the current task records a trace: the daemon's spans below the RPC's are created only
/// then.
pub fn traced() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::TRACE)
        && !tracing::Span::current().is_disabled()
}

/// `[telemetry]`: OpenTelemetry traces, off by default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Export traces.
    pub enabled: bool,
    /// The OTLP/gRPC endpoint (a collector). Unset: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else `http://localhost:4317`.
    pub endpoint: Option<String>,
    /// The share of new traces recorded, from 0 to 1. A caller's sampled `traceparent` is always
    /// followed (and an unsampled one never), whatever the ratio.
    pub sampling_ratio: f64,
    /// The `service.name` resource attribute.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: None,
            sampling_ratio: 0.01,
            service_name: "zae-limiter".into(),
        }
    }
}

impl TelemetryConfig {
    /// # Errors
    /// A message naming the key that cannot be used.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!(
                "telemetry.sampling_ratio = {} is not between 0 and 1",
                self.sampling_ratio
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err("telemetry.service_name must not be empty".into());
        }
        if let Some(endpoint) = &self.endpoint {
            let uri: http::Uri = endpoint
                .parse()
                .map_err(|e| format!("telemetry.endpoint = {endpoint:?}: {e}"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(format!(
                    "telemetry.endpoint = {endpoint:?}: expected http://host:port or https://host:port"
                ));
            }
        }
        if self.enabled && !cfg!(feature = "otel") {
            return Err(
                "telemetry.enabled = true, but this build has no OpenTelemetry (cargo feature `otel`)"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(feature = "otel")]
pub use otel::{Exporter, caller_spans};

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::propagation::{Extractor, TextMapPropagator};
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::registry::LookupSpan;

    use super::{TARGET, TelemetryConfig};

    /// The running exporter; [`Exporter::shutdown`] sends what is still buffered.
    #[derive(Debug)]
    pub struct Exporter {
        provider: SdkTracerProvider,
    }

    impl Exporter {
        /// Starts the exporter (inside a Tokio runtime: its gRPC client lives there) and the
        /// `tracing` layer that feeds it only the daemon's trace spans.
        ///
        /// # Errors
        /// The exporter's message when it cannot be built.
        pub fn start<S>(
            config: &TelemetryConfig,
        ) -> Result<(Self, impl Layer<S> + Send + Sync + 'static), String>
        where
            S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
        {
            let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = &config.endpoint {
                exporter = exporter.with_endpoint(endpoint.clone());
            }
            let exporter = exporter
                .build()
                .map_err(|e| format!("telemetry: the OTLP exporter: {e}"))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(config.service_name.clone())
                .build();
            // The sample is drawn by `caller_spans`: a root span that exists is recorded.
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
                .with_resource(resource)
                .build();
            let tracer = provider.tracer("zae-limiter");
            // Only what the spans say: no source locations, threads, targets or busy/idle
            // timings (each costs on every span).
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_filter(Targets::new().with_target(TARGET, tracing::Level::TRACE));
            Ok((Self { provider }, layer))
        }

        /// Sends the spans still buffered and stops (blocking: call it off the runtime's
        /// threads, while the runtime still runs).
        pub fn shutdown(self) {
            if let Err(e) = self.provider.shutdown() {
                tracing::warn!("telemetry: the last spans were not sent: {e}");
            }
        }
    }

    /// The span of each RPC (for tonic's `trace_fn`): joined to the caller's trace when its
    /// metadata carries one (`traceparent`, `tracestate`) and recorded when the caller's trace
    /// is sampled; without one, recorded for `ratio` of the calls. A call left out gets no span.
    pub fn caller_spans(
        ratio: f64,
    ) -> impl Fn(&http::Request<()>) -> tracing::Span + Clone + Send + Sync + 'static {
        let propagator = TraceContextPropagator::new();
        move |request| {
            let parent = propagator.extract(&Headers(request.headers()));
            let remote = parent.span().span_context().clone();
            let sampled = match remote.is_valid() {
                true => remote.is_sampled(),
                false => sample(ratio),
            };
            if !sampled {
                return tracing::Span::none();
            }
            let path = request.uri().path();
            let (service, method) = path
                .trim_start_matches('/')
                .split_once('/')
                .unwrap_or((path, ""));
            let span = tracing::trace_span!(
                target: TARGET,
                "rpc",
                otel.name = path.trim_start_matches('/'),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                otel.status_description = tracing::field::Empty,
            );
            if !span.is_disabled() {
                let _ = span.set_parent(parent);
            }
            span
        }
    }

    /// True for `ratio` of the calls (a per-thread xorshift generator, seeded by the OS).
    fn sample(ratio: f64) -> bool {
        if ratio >= 1.0 {
            return true;
        }
        if ratio <= 0.0 {
            return false;
        }
        thread_local! {
            static STATE: std::cell::Cell<u64> =
                std::cell::Cell::new(getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15) | 1);
        }
        STATE.with(|state| {
            let mut x = state.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            state.set(x);
            // The top 53 bits as a fraction of 1.
            ((x >> 11) as f64) / ((1u64 << 53) as f64) < ratio
        })
    }

    /// The request's metadata, as the propagator reads it.
    struct Headers<'a>(&'a http::HeaderMap);

    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(http::HeaderName::as_str).collect()
        }
    }
}
