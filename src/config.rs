//! The TOML configuration (`config/zae-limiter.toml` documents every setting). Unknown keys are
//! errors, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::domain::ids::Namespace;
use crate::limiter::LimiterSettings;
use crate::store::dynamodb::DynamoSettings;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limiter: LimiterConfig,
    pub dynamodb: DynamoConfig,
    /// `[[access]]` rules: which uids/gids may use which namespaces (none: all may use all).
    pub access: Vec<crate::access::AccessRule>,
    /// Envoy's rate limit service: descriptor rules and response headers.
    pub envoy: crate::envoy::rules::EnvoyConfig,
    /// `[telemetry]`: OpenTelemetry traces.
    pub telemetry: crate::telemetry::TelemetryConfig,
}

/// Which store the daemon uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Embedded, in this process's memory: no AWS account needed, nothing shared or kept.
    Memory,
    /// DynamoDB (the `[dynamodb]` section): shared by every daemon on the table, durable.
    Dynamodb,
}

pub use crate::limiter::FailurePolicy;

/// The `[server]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Unix socket the gRPC API listens on (mode 0660).
    pub socket: PathBuf,
    /// Optional TCP listener for the gRPC API; loopback addresses only.
    pub tcp: Option<SocketAddr>,
    /// Where Prometheus scrapes `/metrics`; loopback by default.
    pub metrics_addr: Option<SocketAddr>,
    /// Deadline of a request that carries none of its own (`grpc-timeout`).
    pub request_timeout_ms: u64,
    /// How long shutdown waits for in-flight requests and actor flushes.
    pub drain_timeout_ms: u64,
    /// Threads of the daemon's runtime; 0: one per core; 1: a single-threaded runtime.
    pub worker_threads: usize,
    /// Group of the socket file (a name or a number): the group of the worker processes that
    /// may connect. Default: the daemon's own group.
    pub socket_group: Option<String>,
    /// Permissions of the socket file, in octal ("0660": owner and group).
    pub socket_mode: String,
    /// How often the store is probed for health (`grpc.health.v1`, `/ready`).
    pub health_probe_ms: u64,
    /// Log filter (`info`, `debug`, `zae_limiter=debug,info`, ...): re-read on reload. Unset:
    /// `RUST_LOG`, else `info`.
    pub log_level: Option<String>,
}

impl ServerConfig {
    /// The socket's mode bits.
    ///
    /// # Errors
    /// A message naming `server.socket_mode`.
    pub fn socket_mode(&self) -> Result<u32, String> {
        let digits = self.socket_mode.trim_start_matches("0o");
        u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| *m <= 0o777 && !digits.is_empty())
            .ok_or_else(|| {
                format!(
                    "server.socket_mode = {:?} is not an octal mode such as \"0660\"",
                    self.socket_mode
                )
            })
    }

    /// The socket's group id, `None` to leave the daemon's own. A name is resolved by the
    /// system (NSS: `/etc/group`, LDAP, SSSD, as `getent group` sees it).
    ///
    /// # Errors
    /// A message naming `server.socket_group` when the group does not exist.
    pub fn socket_gid(&self) -> Result<Option<u32>, String> {
        let Some(group) = &self.socket_group else {
            return Ok(None);
        };
        if let Ok(gid) = group.parse::<u32>() {
            return Ok(Some(gid));
        }
        match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => Ok(Some(g.gid.as_raw())),
            Ok(None) => Err(format!(
                "server.socket_group: no group {group:?} on this machine"
            )),
            Err(e) => Err(format!(
                "server.socket_group: cannot look up group {group:?}: {e}"
            )),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/tmp/zae-limiter.sock"),
            tcp: None,
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            request_timeout_ms: 2_000,
            drain_timeout_ms: 10_000,
            worker_threads: 0,
            socket_group: None,
            socket_mode: "0660".into(),
            health_probe_ms: 5_000,
            log_level: None,
        }
    }
}

/// The `[limiter]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimiterConfig {
    pub backend: Backend,
    pub failure_policy: FailurePolicy,
    /// Namespaces callers may use; a request naming no namespace uses the first. `"*"` also
    /// admits every namespace registered in the store (`zae-limiter namespace create`).
    pub namespaces: Vec<String>,
    /// A cached bucket older than this is re-read before it may reject a request, so refunds and
    /// limit raises made by other daemons are seen within this time.
    pub max_staleness_ms: u64,
    /// Minimum time between two writes of one bucket by this daemon (0: write as soon as the
    /// previous write returns). Raising it trades latency for fewer writes with many daemons.
    pub min_commit_interval_ms: u64,
    /// Most acquires one write carries.
    pub max_batch: usize,
    /// Most acquires one consistency group may hold (mailbox, queue, in flight); more are refused
    /// with `UNAVAILABLE` (the daemon sheds load instead of queueing without bound).
    pub max_queue: usize,
    /// A lease neither committed nor rolled back expires after this; its consumption stays.
    pub lease_ttl_ms: u64,
    /// An entity's actor with no work and no open lease for this long stops; its cached buckets
    /// stay behind as a compact record (a few hundred bytes).
    pub idle_timeout_ms: u64,
    /// How long an idle entity's compact record is kept after its last use: an entity that
    /// comes back within it is written without reading its buckets first.
    pub entity_cache_ms: u64,
    /// Most compact records kept at once; past it, idle entities are forgotten at once.
    pub max_cached_entities: usize,
    /// How long stored limit configurations are cached (changes made through this daemon apply
    /// at once).
    pub limits_cache_ms: u64,
    /// Most entries each look-up cache (stored limits, entities) keeps.
    pub max_cached_lookups: usize,
    /// How often an entity's consumption is added to its hourly and daily usage snapshots
    /// (two writes per entity and resource each time); 0 keeps no snapshots.
    pub usage_flush_ms: u64,
}

impl LimiterConfig {
    /// The limiter's typed settings.
    ///
    /// # Errors
    /// A message naming the bad namespace.
    pub fn settings(&self) -> Result<LimiterSettings, String> {
        let namespaces = self
            .namespaces
            .iter()
            .filter(|n| *n != "*")
            .map(|n| Namespace::new(n.as_str()).map_err(|e| format!("limiter.namespaces: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok(LimiterSettings {
            failure_policy: self.failure_policy,
            namespaces,
            registered: self.namespaces.iter().any(|n| n == "*"),
            max_staleness_ms: ms(self.max_staleness_ms),
            min_commit_interval_ms: ms(self.min_commit_interval_ms),
            max_batch: self.max_batch.max(1),
            max_queue: self.max_queue.max(1),
            lease_ttl_ms: ms(self.lease_ttl_ms),
            idle_timeout_ms: ms(self.idle_timeout_ms),
            entity_cache_ms: ms(self.entity_cache_ms),
            max_cached_entities: self.max_cached_entities,
            limits_cache_ms: ms(self.limits_cache_ms),
            max_cached_lookups: self.max_cached_lookups.max(1),
            usage_flush_ms: ms(self.usage_flush_ms),
        })
    }
}

impl Default for LimiterConfig {
    /// The limiter's own defaults, in the file's units.
    fn default() -> Self {
        let d = LimiterSettings::default();
        let ms = |v: i64| u64::try_from(v).unwrap_or(0);
        Self {
            backend: Backend::Memory,
            failure_policy: d.failure_policy,
            namespaces: d.namespaces.iter().map(ToString::to_string).collect(),
            max_staleness_ms: ms(d.max_staleness_ms),
            min_commit_interval_ms: ms(d.min_commit_interval_ms),
            max_batch: d.max_batch,
            max_queue: d.max_queue,
            lease_ttl_ms: ms(d.lease_ttl_ms),
            idle_timeout_ms: ms(d.idle_timeout_ms),
            entity_cache_ms: ms(d.entity_cache_ms),
            max_cached_entities: d.max_cached_entities,
            limits_cache_ms: ms(d.limits_cache_ms),
            max_cached_lookups: d.max_cached_lookups,
            usage_flush_ms: ms(d.usage_flush_ms),
        }
    }
}

/// The `[dynamodb]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamoConfig {
    pub table: String,
    pub region: String,
    pub endpoint_url: Option<String>,
    pub attempt_timeout_ms: u64,
    pub max_attempts: u32,
    pub audit_retention_days: u64,
    pub write_calls_in_flight: usize,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        let d = DynamoSettings::new("zae-limiter");
        Self {
            table: d.table,
            region: d.region,
            endpoint_url: d.endpoint_url,
            attempt_timeout_ms: d.attempt_timeout.as_millis() as u64,
            max_attempts: d.max_attempts,
            audit_retention_days: d.audit_retention.as_secs() / 86_400,
            write_calls_in_flight: d.write_calls_in_flight,
        }
    }
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration in {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Reads and validates a configuration file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and, for bad content, the offending key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: shown,
            message,
        })
    }

    /// # Errors
    /// A message naming the offending key and, for a TOML error, its line and column.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| locate(text, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// # Errors
    /// A message naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        self.telemetry.validate()?;
        let d = &self.dynamodb;
        if d.max_attempts == 0 {
            return Err("dynamodb.max_attempts must be at least 1".into());
        }
        if d.attempt_timeout_ms == 0 {
            return Err("dynamodb.attempt_timeout_ms must be greater than zero".into());
        }
        if let Some(tcp) = self.server.tcp
            && !tcp.ip().is_loopback()
        {
            return Err(format!(
                "server.tcp = {tcp} is not a loopback address: the API has no authentication"
            ));
        }
        self.server.socket_mode()?;
        self.server.socket_gid()?;
        if self.server.health_probe_ms == 0 {
            return Err("server.health_probe_ms must be greater than zero".into());
        }
        if let Some(level) = &self.server.log_level {
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| format!("server.log_level = {level:?}: {e}"))?;
        }
        if self.server.request_timeout_ms == 0 {
            return Err("server.request_timeout_ms must be greater than zero".into());
        }
        let l = &self.limiter;
        if l.namespaces.is_empty() {
            return Err("limiter.namespaces must name at least one namespace".into());
        }
        for ns in l.namespaces.iter().filter(|n| *n != "*") {
            crate::Namespace::new(ns.as_str()).map_err(|e| format!("limiter.namespaces: {e}"))?;
        }
        let any_registered = l.namespaces.iter().any(|n| n == "*");
        crate::envoy::rules::Rules::new(&self.envoy)?;
        for (i, rule) in self.envoy.rules.iter().enumerate() {
            if !rule.namespace.is_empty()
                && !any_registered
                && !l.namespaces.contains(&rule.namespace)
            {
                return Err(format!(
                    "envoy.rules[{i}] ({:?}): namespace {:?} is not in limiter.namespaces",
                    rule.name, rule.namespace
                ));
            }
        }
        for (i, rule) in self.access.iter().enumerate() {
            if rule.namespaces.is_empty() {
                return Err(format!("access[{i}].namespaces is empty"));
            }
            if let Some(unknown) = rule
                .namespaces
                .iter()
                .find(|n| *n != "*" && !any_registered && !l.namespaces.contains(n))
            {
                return Err(format!(
                    "access[{i}].namespaces: {unknown:?} is not in limiter.namespaces"
                ));
            }
        }
        for (key, value) in [
            ("limiter.max_batch", l.max_batch as u64),
            ("limiter.max_queue", l.max_queue as u64),
            ("limiter.lease_ttl_ms", l.lease_ttl_ms),
            ("limiter.idle_timeout_ms", l.idle_timeout_ms),
        ] {
            if value == 0 {
                return Err(format!("{key} must be greater than zero"));
            }
        }
        Ok(())
    }
}

/// A TOML error as a person can act on it: line, column, the key being read and the message.
fn locate(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let key = match (table, key) {
        (Some(t), Some(k)) => format!(", key {t}.{k}"),
        (None, Some(k)) => format!(", key {k}"),
        _ => String::new(),
    };
    format!("line {line_no}, column {column}{key}: {}", e.message())
}

impl DynamoConfig {
    pub fn settings(&self) -> DynamoSettings {
        let mut s = DynamoSettings::new(&self.table);
        s.region = self.region.clone();
        s.endpoint_url = self.endpoint_url.clone();
        s.attempt_timeout = Duration::from_millis(self.attempt_timeout_ms);
        s.max_attempts = self.max_attempts;
        s.audit_retention = Duration::from_secs(self.audit_retention_days * 86_400);
        s.write_calls_in_flight = self.write_calls_in_flight;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_group_is_resolved_by_the_system() {
        let named = |g: &str| ServerConfig {
            socket_group: Some(g.to_owned()),
            ..ServerConfig::default()
        };
        // Group 0 is `root` on every Linux system, found through NSS like any other group.
        assert_eq!(named("root").socket_gid(), Ok(Some(0)));
        assert_eq!(named("4242").socket_gid(), Ok(Some(4242)));
        let missing = named("no-such-group-zl").socket_gid().unwrap_err();
        assert!(missing.starts_with("server.socket_group:"), "{missing}");
    }

    #[test]
    fn the_readme_s_envoy_rules_parse() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("```toml\n[envoy]")
            .expect("the README shows [envoy]")
            + 8;
        let end = start + readme[start..].find("```").expect("the block ends");
        let config = Config::parse(&readme[start..end]).unwrap();
        assert_eq!(config.envoy.rules.len(), 1);
        assert_eq!(
            config.envoy.headers,
            crate::envoy::rules::HeaderStyle::Draft
        );
    }

    #[test]
    fn the_shipped_example_parses_and_matches_the_defaults() {
        let example = include_str!("../config/zae-limiter.toml");
        let config = Config::parse(example).unwrap();
        let d = DynamoConfig::default();
        assert_eq!(config.dynamodb.table, d.table);
        assert_eq!(config.dynamodb.attempt_timeout_ms, d.attempt_timeout_ms);
        assert_eq!(config.dynamodb.audit_retention_days, 90);
        assert_eq!(
            config.dynamodb.write_calls_in_flight,
            d.write_calls_in_flight
        );
        let l = LimiterConfig::default();
        assert_eq!(config.limiter.backend, l.backend);
        assert_eq!(config.limiter.namespaces, l.namespaces);
        assert_eq!(config.limiter.max_staleness_ms, l.max_staleness_ms);
        assert_eq!(config.limiter.lease_ttl_ms, l.lease_ttl_ms);
        assert_eq!(config.server.socket, ServerConfig::default().socket);
        assert_eq!(
            config.server.metrics_addr,
            ServerConfig::default().metrics_addr
        );
        assert_eq!(
            config.telemetry,
            crate::telemetry::TelemetryConfig::default()
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = Config::parse("[dynamodb]\ntabel = \"x\"\n").unwrap_err();
        assert!(err.contains("tabel"), "{err}");
        let err = Config::parse("[dynamodb]\nmax_attempts = 0\n").unwrap_err();
        assert!(err.contains("dynamodb.max_attempts"), "{err}");
        assert_eq!(Config::parse("").unwrap().dynamodb.table, "zae-limiter");
        let err = Config::parse("[server]\ntcp = \"0.0.0.0:50051\"\n").unwrap_err();
        assert!(err.contains("server.tcp"), "{err}");
        let err = Config::parse("[limiter]\nnamespaces = [\"Bad#\"]\n").unwrap_err();
        assert!(err.contains("limiter.namespaces"), "{err}");
        let err = Config::parse("[[access]]\nuid = 5\nnamespaces = [\"nope\"]\n").unwrap_err();
        assert!(err.contains("access[0].namespaces"), "{err}");
        let ok =
            "[limiter]\nnamespaces = [\"a\", \"b\"]\n[[access]]\ngid = 7\nnamespaces = [\"b\"]\n";
        assert_eq!(Config::parse(ok).unwrap().access[0].gid, Some(7));
        let err = Config::parse("[limiter]\nbackend = \"redis\"\n").unwrap_err();
        assert!(err.contains("redis"), "{err}");
        let err = Config::parse("[server]\nsocket_mode = \"rw\"\n").unwrap_err();
        assert!(err.contains("server.socket_mode"), "{err}");
        let err = Config::parse("[server]\nsocket_group = \"no-such-group-here\"\n").unwrap_err();
        assert!(err.contains("server.socket_group"), "{err}");
    }

    #[test]
    fn toml_errors_give_line_column_and_key() {
        let err =
            Config::parse("# the daemon\n[server]\nmetrics_addr = 127.0.0.1:9\n").unwrap_err();
        assert!(
            err.starts_with("line 3, column 21, key server.metrics_addr: "),
            "{err}"
        );
        let err = Config::parse("[limiter]\nmax_batch = \"many\"\n").unwrap_err();
        assert!(
            err.starts_with("line 2, column 13, key limiter.max_batch: "),
            "{err}"
        );
    }
}
