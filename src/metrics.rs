//! Metric names (constants, `zae_limiter_` prefix, unit suffixes) and their descriptions. Labels
//! are small closed sets; entity ids never become label values (unbounded cardinality).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Decisions by `outcome`: admitted, rejected_cached, rejected_store, failed_open, failed_closed,
/// shed.
pub const DECISIONS: &str = "zae_limiter_decisions_total";
/// Time from receiving an acquire to answering it.
pub const DECISION_SECONDS: &str = "zae_limiter_decision_duration_seconds";
/// Store calls by `operation` (load, write, adjust, commit, entity, limits, audit) and `outcome`
/// (ok, conflict, error).
pub const STORE_CALLS: &str = "zae_limiter_store_calls_total";
/// Write units the store calls consumed (DynamoDB's billing: 1 per item written, 2 per item in a
/// transaction; a failed conditional write is billed too).
pub const WRITE_UNITS: &str = "zae_limiter_store_write_units_total";
/// Single-bucket writes that went to DynamoDB inside a batch of several (one
/// `BatchExecuteStatement`, each still its own conditional write).
pub const BATCHED_WRITES: &str = "zae_limiter_store_batched_writes_total";
/// Acquires carried by one bucket write.
pub const BATCH_SIZE: &str = "zae_limiter_batch_size";
/// Conditional writes that lost to a concurrent change and were re-planned.
pub const CONFLICTS: &str = "zae_limiter_conflicts_total";
/// Entity actors alive: groups with work queued, a write in flight, a lease open, or recent use.
pub const ACTORS: &str = "zae_limiter_actors";
/// Acquires sent to their entity's actor and not answered yet (queued, or in a write in flight):
/// the daemon's queue depth. Each entity holds at most `max_queue` of them.
pub const ACQUIRES_WAITING: &str = "zae_limiter_acquires_waiting";
/// Idle entities (consistency groups) whose cached buckets are kept as a compact record.
pub const CACHED_ENTITIES: &str = "zae_limiter_cached_entities";
/// Usage snapshot additions recorded and not yet written to the store (waiting for the next
/// flush, or being written): a value that keeps growing means the flushes fall behind.
pub const USAGE_PENDING: &str = "zae_limiter_usage_pending";
/// Leases acquired and not yet committed, rolled back or expired.
pub const LEASES_OPEN: &str = "zae_limiter_leases_open";
/// Leases that expired without commit or rollback (their consumption stays).
pub const LEASES_EXPIRED: &str = "zae_limiter_leases_expired_total";
/// Admissions given back because their caller had gone (deadline passed) when the write returned.
pub const COMPENSATIONS: &str = "zae_limiter_compensations_total";
/// Settlements (lease closes, compensations) the store did not confirm before their lease's
/// time was up: dropped, their consumption stays.
pub const SETTLEMENTS_ABANDONED: &str = "zae_limiter_settlements_abandoned_total";

/// Time of one store call, by `operation` (as [`STORE_CALLS`], plus `probe`).
pub const STORE_SECONDS: &str = "zae_limiter_store_call_duration_seconds";
/// 1 while the store answers the health probe, 0 while it does not.
pub const STORE_UP: &str = "zae_limiter_store_up";
/// Always 1; the labels say which build runs (`version`).
pub const BUILD_INFO: &str = "zae_limiter_build_info";
/// Configuration reloads by `outcome` (applied, refused).
pub const RELOADS: &str = "zae_limiter_config_reloads_total";

/// The `operation` label values of [`STORE_CALLS`] and [`STORE_SECONDS`].
pub const STORE_OPERATIONS: [&str; 9] = [
    "probe",
    "load",
    "write",
    "commit",
    "entity",
    "limits",
    "audit",
    "namespace",
    "usage",
];

/// Envoy descriptors (`ShouldRateLimit`) by `domain` (configured domains; others are `other`),
/// `rule` (the rule's name; `none` when no rule matched) and `outcome` (see [`envoy_outcome`]).
pub const ENVOY_DESCRIPTORS: &str = "zae_limiter_envoy_descriptors_total";

/// Values of the `outcome` label of [`ENVOY_DESCRIPTORS`].
pub mod envoy_outcome {
    /// Admitted (and charged, unless another descriptor of the request refused).
    pub const OK: &str = "ok";
    pub const OVER_LIMIT: &str = "over_limit";
    /// A shadow rule would have refused: answered OK, nothing charged.
    pub const SHADOW_REFUSED: &str = "shadow_refused";
    /// No rule matched: allowed.
    pub const UNMATCHED: &str = "unmatched";
    /// Not charged because another descriptor of the same request refused.
    pub const ROLLED_BACK: &str = "rolled_back";
    /// The store could not decide (the failure policy answered).
    pub const UNAVAILABLE: &str = "unavailable";
    /// The resource is disabled for the entity (a gate): the whole request is refused.
    pub const DISABLED: &str = "disabled";
}

/// Decision outcomes, the values of the `outcome` label of [`DECISIONS`].
pub mod outcome {
    pub const ADMITTED: &str = "admitted";
    pub const REJECTED_CACHED: &str = "rejected_cached";
    pub const REJECTED_STORE: &str = "rejected_store";
    pub const FAILED_OPEN: &str = "failed_open";
    pub const FAILED_CLOSED: &str = "failed_closed";
    /// Refused because too many acquires already wait for the bucket (load shedding).
    pub const SHED: &str = "shed";
    /// Refused because the resource is disabled for the entity.
    pub const DISABLED: &str = "disabled";
    pub const ALL: [&str; 7] = [
        ADMITTED,
        REJECTED_CACHED,
        REJECTED_STORE,
        FAILED_OPEN,
        FAILED_CLOSED,
        SHED,
        DISABLED,
    ];
}

/// Registers the descriptions with the installed recorder (call once, after installing it).
pub fn describe() {
    describe_counter!(DECISIONS, "Rate-limit decisions by outcome");
    describe_histogram!(DECISION_SECONDS, Unit::Seconds, "Time to answer an acquire");
    describe_counter!(STORE_CALLS, "Store calls by operation and outcome");
    describe_counter!(WRITE_UNITS, "Store write units consumed");
    describe_histogram!(BATCH_SIZE, "Acquires carried by one bucket write");
    describe_counter!(
        BATCHED_WRITES,
        "Single-item writes (bucket changes, usage additions) sent inside a batch of several"
    );
    describe_counter!(
        CONFLICTS,
        "Conditional writes that lost a race and were re-planned"
    );
    describe_gauge!(ACTORS, "Live entity actors");
    describe_gauge!(
        ACQUIRES_WAITING,
        "Acquires sent to their entity's actor and not answered yet"
    );
    describe_gauge!(
        CACHED_ENTITIES,
        "Idle entities whose cached buckets are kept as a compact record"
    );
    describe_gauge!(
        USAGE_PENDING,
        "Usage snapshot additions not yet written to the store"
    );
    describe_gauge!(LEASES_OPEN, "Open leases");
    describe_counter!(LEASES_EXPIRED, "Leases that expired unclosed");
    describe_counter!(
        COMPENSATIONS,
        "Admissions given back because their caller had gone"
    );
    describe_counter!(
        SETTLEMENTS_ABANDONED,
        "Settlements not confirmed before their lease expired"
    );
    describe_counter!(
        ENVOY_DESCRIPTORS,
        "Envoy rate limit service descriptors by domain, rule and outcome"
    );
    describe_histogram!(
        STORE_SECONDS,
        Unit::Seconds,
        "Time of one store call by operation"
    );
    describe_gauge!(STORE_UP, "Whether the store answers the health probe");
    describe_gauge!(BUILD_INFO, "The running build");
    process().describe();
    describe_counter!(RELOADS, "Configuration reloads by outcome");
}

/// Creates every series the dashboards and alerts read, at zero, so that a rate over a counter
/// that has not moved yet is 0 rather than no data.
pub fn register_all() {
    for o in outcome::ALL {
        metrics::counter!(DECISIONS, "outcome" => o).increment(0);
    }
    for op in STORE_OPERATIONS {
        for o in ["ok", "conflict", "error"] {
            metrics::counter!(STORE_CALLS, "operation" => op, "outcome" => o).increment(0);
        }
    }
    for name in [
        WRITE_UNITS,
        BATCHED_WRITES,
        CONFLICTS,
        LEASES_EXPIRED,
        COMPENSATIONS,
        SETTLEMENTS_ABANDONED,
    ] {
        metrics::counter!(name).increment(0);
    }
    for o in ["applied", "refused"] {
        metrics::counter!(RELOADS, "outcome" => o).increment(0);
    }
    for name in [
        ACTORS,
        ACQUIRES_WAITING,
        CACHED_ENTITIES,
        USAGE_PENDING,
        LEASES_OPEN,
    ] {
        metrics::gauge!(name).increment(0.0);
    }
    // Labelled by configured rules; the family is there from the start.
    metrics::counter!(ENVOY_DESCRIPTORS, "domain" => "other", "rule" => "none",
        "outcome" => envoy_outcome::UNMATCHED)
    .increment(0);
    // Histograms show their buckets (at zero) once registered.
    let _ = metrics::histogram!(DECISION_SECONDS);
    let _ = metrics::histogram!(BATCH_SIZE);
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    sample_process();
}

/// The collector of the standard process metrics, under the names Prometheus's own clients give
/// them: `process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`, `process_threads`,
/// `process_start_time_seconds`.
fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Reads the process metrics (CPU, memory, descriptors, threads) into their series.
pub fn sample_process() {
    process().collect();
}

/// Installs the Prometheus recorder (rendered by [`crate::ops`] on `/metrics`), with real
/// histogram buckets (not summaries) for latencies and batch size, the descriptions, and every
/// series at zero.
///
/// # Errors
/// The exporter's error when a recorder is already installed.
pub fn install() -> Result<metrics_exporter_prometheus::PrometheusHandle, String> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(STORE_SECONDS.to_owned()),
            &[
                0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            Matcher::Full(DECISION_SECONDS.to_owned()),
            &[
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            Matcher::Full(BATCH_SIZE.to_owned()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        )
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|_| "a metrics recorder is already installed".to_owned())?;
    describe();
    register_all();
    Ok(handle)
}

/// Counts one decision. The handles are looked up once (the recorder must be installed before
/// the first decision, as `serve` does), not on every call of the hot path.
pub fn decision(outcome: &'static str) {
    use outcome::ALL;
    use std::sync::OnceLock;
    static HANDLES: OnceLock<Vec<metrics::Counter>> = OnceLock::new();
    let handles = HANDLES.get_or_init(|| {
        ALL.iter()
            .map(|o| metrics::counter!(DECISIONS, "outcome" => *o))
            .collect()
    });
    match ALL.iter().position(|o| *o == outcome) {
        Some(i) => handles[i].increment(1),
        None => metrics::counter!(DECISIONS, "outcome" => outcome).increment(1),
    }
}

/// Records how long a decision took.
pub fn decision_time(seconds: f64) {
    use std::sync::OnceLock;
    static HANDLE: OnceLock<metrics::Histogram> = OnceLock::new();
    HANDLE
        .get_or_init(|| metrics::histogram!(DECISION_SECONDS))
        .record(seconds);
}
