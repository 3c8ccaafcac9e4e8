//! Descriptor rules: which Envoy descriptor means which entity, resource, namespace and limits.
//!
//! Pure: configuration, validation (once, at start-up) and matching; no I/O. In the spirit of
//! envoyproxy/ratelimit's domain and descriptor tree: a rule belongs to a domain and lists the
//! descriptor's entries in order (each a key, optionally the value it must have); a descriptor
//! matches a rule when it has exactly those entries. The first matching rule of the domain wins.

use std::time::Duration;

use serde::Deserialize;

use crate::domain::amounts::Amounts;
use crate::domain::ids::{EntityId, Namespace, ResourceId};
use crate::domain::limit::{Limit, LimitName, MAX_TOKENS, MILLI, canonical};

/// The `[envoy]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvoyConfig {
    /// Which rate-limit headers answers carry (`response_headers_to_add`).
    pub headers: HeaderStyle,
    pub rules: Vec<RuleConfig>,
}

/// Response header style.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeaderStyle {
    /// No headers but `Retry-After` on over-limit answers.
    #[default]
    None,
    /// The IETF draft's `RateLimit-Policy` and `RateLimit` fields.
    Draft,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (envoyproxy/ratelimit's).
    XRatelimit,
}

/// One `[[envoy.rules]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Names the rule in metrics and logs; unique.
    pub name: String,
    pub domain: String,
    /// The descriptor's entries, in order.
    pub entries: Vec<EntryConfig>,
    /// The key of the entry whose value is the entity id.
    pub entity: String,
    /// A fixed resource...
    #[serde(default)]
    pub resource: Option<String>,
    /// ...or the key of the entry whose value is the resource.
    #[serde(default)]
    pub resource_key: Option<String>,
    /// Empty: the daemon's first namespace.
    #[serde(default)]
    pub namespace: String,
    /// `NAME=RATE/PERIOD[,burst=N][,soft]` limits; empty: the entity's stored limits for the resource.
    #[serde(default)]
    pub limits: Vec<String>,
    /// The limits a hit counts against; default: every limit in `limits` (required with stored
    /// limits, whose names the rule cannot know).
    #[serde(default)]
    pub hits: Vec<String>,
    /// Decide and count, never refuse.
    #[serde(default)]
    pub shadow: bool,
}

/// One descriptor entry a rule requires.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryConfig {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone)]
enum Resource {
    Fixed(ResourceId),
    Entry(usize),
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub domain: String,
    entries: Vec<(String, Option<String>)>,
    entity: usize,
    resource: Resource,
    /// As configured (empty: the daemon's first); checked against the caller's access per call.
    pub namespace: String,
    limits: Option<Vec<Limit>>,
    hits: Vec<LimitName>,
    pub shadow: bool,
}

/// Every rule, validated.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    pub headers: HeaderStyle,
}

/// A descriptor's limit override: `requests_per_unit` per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Override {
    pub requests_per_unit: u64,
    pub period: Duration,
}

/// What to decide for one matched descriptor.
#[derive(Debug, Clone)]
pub struct Planned<'r> {
    pub rule: &'r Rule,
    pub entity: EntityId,
    pub resource: ResourceId,
    /// `None`: the stored limits.
    pub limits: Option<Vec<Limit>>,
    pub amounts: Amounts,
}

/// Why a descriptor cannot be decided: the field (relative to the descriptor) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    pub field: String,
    pub message: String,
    /// An amount beyond the maximum (`OUT_OF_RANGE`) rather than a malformed value.
    pub out_of_range: bool,
}

impl Rules {
    /// Validates the configuration.
    ///
    /// # Errors
    /// One line naming the rule and the field, e.g.
    /// `envoy.rules[1] ("api-key"): entity: "user" is not one of its entries`.
    pub fn new(config: &EnvoyConfig) -> Result<Self, String> {
        let mut rules: Vec<Rule> = Vec::with_capacity(config.rules.len());
        for (i, rule) in config.rules.iter().enumerate() {
            let checked =
                Rule::new(rule).map_err(|e| format!("envoy.rules[{i}] ({:?}): {e}", rule.name))?;
            if rules.iter().any(|r| r.name == checked.name) {
                return Err(format!(
                    "envoy.rules[{i}]: the name {:?} is used by an earlier rule",
                    rule.name
                ));
            }
            rules.push(checked);
        }
        Ok(Self {
            rules,
            headers: config.headers,
        })
    }

    /// Whether some rule serves `domain` (metrics label only configured domains).
    pub fn knows_domain(&self, domain: &str) -> bool {
        self.rules.iter().any(|r| r.domain == domain)
    }

    /// The first rule of `domain` whose entries the descriptor has, exactly and in order.
    pub fn matching(&self, domain: &str, entries: &[(&str, &str)]) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.domain == domain && r.matches(entries))
    }

    /// What to decide for a descriptor (`None`: no rule matches; it is allowed). `hits` is the
    /// amount consumed from each of the rule's hit limits.
    ///
    /// # Errors
    /// [`PlanError`] for a value that is not a valid entity or resource id, an override that is
    /// not a valid limit, or hits beyond the maximum.
    pub fn plan(
        &self,
        domain: &str,
        entries: &[(&str, &str)],
        limit_override: Option<Override>,
        hits: u64,
    ) -> Result<Option<Planned<'_>>, PlanError> {
        let Some(rule) = self.matching(domain, entries) else {
            return Ok(None);
        };
        rule.plan(entries, limit_override, hits).map(Some)
    }
}

impl Rule {
    fn new(c: &RuleConfig) -> Result<Self, String> {
        if c.name.trim().is_empty() {
            return Err("name: is empty".into());
        }
        if c.domain.is_empty() {
            return Err("domain: is empty".into());
        }
        if c.entries.is_empty() {
            return Err("entries: at least one entry is needed".into());
        }
        if let Some(i) = c.entries.iter().position(|e| e.key.is_empty()) {
            return Err(format!("entries[{i}].key: is empty"));
        }
        let position = |field: &str, key: &str| {
            c.entries
                .iter()
                .position(|e| e.key == key)
                .ok_or_else(|| format!("{field}: {key:?} is not one of its entries"))
        };
        let entity = position("entity", &c.entity)?;
        let resource = match (&c.resource, &c.resource_key) {
            (Some(fixed), None) => Resource::Fixed(
                ResourceId::new(fixed.as_str()).map_err(|e| format!("resource: {e}"))?,
            ),
            (None, Some(key)) => Resource::Entry(position("resource_key", key)?),
            _ => return Err("give exactly one of resource and resource_key".into()),
        };
        if !c.namespace.is_empty() {
            Namespace::new(c.namespace.as_str()).map_err(|e| format!("namespace: {e}"))?;
        }
        let limits = if c.limits.is_empty() {
            None
        } else {
            let parsed = c
                .limits
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    spec.parse::<Limit>()
                        .map_err(|e| format!("limits[{i}]: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(canonical(parsed).map_err(|e| format!("limits: {e}"))?)
        };
        let hits: Vec<LimitName> = if c.hits.is_empty() {
            match &limits {
                Some(limits) => limits.iter().map(|l| l.name().clone()).collect(),
                None => {
                    return Err("hits: needed with stored limits (which limits count a hit)".into());
                }
            }
        } else {
            c.hits
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let name = LimitName::new(h.as_str()).map_err(|e| format!("hits[{i}]: {e}"))?;
                    match &limits {
                        Some(limits) if !limits.iter().any(|l| *l.name() == name) => {
                            Err(format!("hits[{i}]: {h:?} is not one of the rule's limits"))
                        }
                        _ => Ok(name),
                    }
                })
                .collect::<Result<_, _>>()?
        };
        Ok(Self {
            name: c.name.clone(),
            domain: c.domain.clone(),
            entries: c
                .entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect(),
            entity,
            resource,
            namespace: c.namespace.clone(),
            limits,
            hits,
            shadow: c.shadow,
        })
    }

    fn matches(&self, entries: &[(&str, &str)]) -> bool {
        entries.len() == self.entries.len()
            && self
                .entries
                .iter()
                .zip(entries)
                .all(|((key, value), (k, v))| {
                    key == k && value.as_deref().is_none_or(|want| want == *v)
                })
    }

    fn plan(
        &self,
        entries: &[(&str, &str)],
        limit_override: Option<Override>,
        hits: u64,
    ) -> Result<Planned<'_>, PlanError> {
        let bad = |field: String, e: &dyn std::fmt::Display| PlanError {
            field,
            message: e.to_string(),
            out_of_range: false,
        };
        let entity = EntityId::new(entries[self.entity].1)
            .map_err(|e| bad(format!("entries[{}].value", self.entity), &e))?;
        let resource = match &self.resource {
            Resource::Fixed(r) => r.clone(),
            Resource::Entry(i) => ResourceId::new(entries[*i].1)
                .map_err(|e| bad(format!("entries[{i}].value"), &e))?,
        };
        if hits > MAX_TOKENS {
            return Err(PlanError {
                field: "hits_addend".into(),
                message: format!("{hits} is beyond the maximum of {MAX_TOKENS}"),
                out_of_range: true,
            });
        }
        let limits = match limit_override {
            None => self.limits.clone(),
            Some(o) => {
                let overridden = self
                    .hits
                    .iter()
                    .map(|name| {
                        Limit::custom(
                            name.as_str(),
                            o.requests_per_unit,
                            o.requests_per_unit,
                            o.period,
                        )
                        .map_err(|e| bad("limit".into(), &e))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let kept = self
                    .limits
                    .iter()
                    .flatten()
                    .filter(|l| !self.hits.contains(l.name()))
                    .cloned();
                Some(
                    canonical(overridden.into_iter().chain(kept).collect())
                        .map_err(|e| bad("limit".into(), &e))?,
                )
            }
        };
        let milli = i64::try_from(hits).expect("at most MAX_TOKENS") * MILLI;
        let amounts = Amounts::new(self.hits.iter().map(|h| (h.clone(), milli)))
            .map_err(|e| bad("hits".into(), &e))?;
        Ok(Planned {
            rule: self,
            entity,
            resource,
            limits,
            amounts,
        })
    }
}

#[cfg(test)]
mod tests;
