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
/// Acquires carried by one bucket write.
pub const BATCH_SIZE: &str = "zae_limiter_batch_size";
/// Conditional writes that lost to a concurrent change and were re-planned.
pub const CONFLICTS: &str = "zae_limiter_conflicts_total";
/// Entity actors alive (each holds the cached buckets of one entity).
pub const ACTORS: &str = "zae_limiter_actors";
/// Leases acquired and not yet committed, rolled back or expired.
pub const LEASES_OPEN: &str = "zae_limiter_leases_open";
/// Leases that expired without commit or rollback (their consumption stays).
pub const LEASES_EXPIRED: &str = "zae_limiter_leases_expired_total";
/// Admissions given back because their caller had gone (deadline passed) when the write returned.
pub const COMPENSATIONS: &str = "zae_limiter_compensations_total";
/// Settlements (lease closes, compensations) the store did not confirm before their lease's
/// time was up: dropped, their consumption stays.
pub const SETTLEMENTS_ABANDONED: &str = "zae_limiter_settlements_abandoned_total";

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
}

/// Registers the descriptions with the installed recorder (call once, after installing it).
pub fn describe() {
    describe_counter!(DECISIONS, "Rate-limit decisions by outcome");
    describe_histogram!(DECISION_SECONDS, Unit::Seconds, "Time to answer an acquire");
    describe_counter!(STORE_CALLS, "Store calls by operation and outcome");
    describe_counter!(WRITE_UNITS, "Store write units consumed");
    describe_histogram!(BATCH_SIZE, "Acquires carried by one bucket write");
    describe_counter!(
        CONFLICTS,
        "Conditional writes that lost a race and were re-planned"
    );
    describe_gauge!(ACTORS, "Live entity actors");
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
}

/// Installs the Prometheus recorder with an HTTP listener serving `/metrics` at `addr`, with
/// real histogram buckets (not summaries) for latency and batch size, and the descriptions.
///
/// # Errors
/// The exporter's error when the address cannot be bound or a recorder is already installed.
pub fn install(addr: std::net::SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(DECISION_SECONDS.to_owned()),
            &[
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(BATCH_SIZE.to_owned()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        )?
        .install()?;
    describe();
    Ok(())
}

/// Counts one decision. The handles are looked up once (the recorder must be installed before
/// the first decision, as `serve` does), not on every call of the hot path.
pub fn decision(outcome: &'static str) {
    use std::sync::OnceLock;
    const ALL: [&str; 6] = [
        outcome::ADMITTED,
        outcome::REJECTED_CACHED,
        outcome::REJECTED_STORE,
        outcome::FAILED_OPEN,
        outcome::FAILED_CLOSED,
        outcome::SHED,
    ];
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
