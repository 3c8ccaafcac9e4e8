//! The TOML configuration (`config/zae-limiter.toml` documents every setting). Unknown keys are
//! errors, so a typo never silently falls back to a default.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::store::dynamodb::DynamoSettings;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub dynamodb: DynamoConfig,
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
    /// A message naming the offending key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let d = &config.dynamodb;
        if d.max_attempts == 0 {
            return Err("dynamodb.max_attempts must be at least 1".into());
        }
        if d.attempt_timeout_ms == 0 {
            return Err("dynamodb.attempt_timeout_ms must be greater than zero".into());
        }
        Ok(config)
    }
}

impl DynamoConfig {
    pub fn settings(&self) -> DynamoSettings {
        let mut s = DynamoSettings::new(&self.table);
        s.region = self.region.clone();
        s.endpoint_url = self.endpoint_url.clone();
        s.attempt_timeout = Duration::from_millis(self.attempt_timeout_ms);
        s.max_attempts = self.max_attempts;
        s.audit_retention = Duration::from_secs(self.audit_retention_days * 86_400);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_and_matches_the_defaults() {
        let example = include_str!("../config/zae-limiter.toml");
        let config = Config::parse(example).unwrap();
        let d = DynamoConfig::default();
        assert_eq!(config.dynamodb.table, d.table);
        assert_eq!(config.dynamodb.attempt_timeout_ms, d.attempt_timeout_ms);
        assert_eq!(config.dynamodb.audit_retention_days, 90);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = Config::parse("[dynamodb]\ntabel = \"x\"\n").unwrap_err();
        assert!(err.contains("tabel"), "{err}");
        let err = Config::parse("[dynamodb]\nmax_attempts = 0\n").unwrap_err();
        assert!(err.contains("dynamodb.max_attempts"), "{err}");
        assert_eq!(Config::parse("").unwrap().dynamodb.table, "zae-limiter");
    }
}
