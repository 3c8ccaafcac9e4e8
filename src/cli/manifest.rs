//! Limits as code: the Python zae-limiter's YAML manifest (`limits plan|diff|apply FILE`).
//!
//! ```yaml
//! namespace: prod
//! system:
//!   on_unavailable: block            # or allow
//!   limits:
//!     rpm: {capacity: 1000}          # refill_amount defaults to capacity, refill_period to 60 s
//! resources:
//!   gpt-4:
//!     cascade: true                  # optional, as `disabled` (true, false or bypass)
//!     limits:
//!       tpm: {capacity: 100000, refill_period: 60, soft: true}
//!       monthly: {capacity: 5000000, reset_schedule: [{cron: "0 0 1 * *", tz: UTC}]}
//! entities:
//!   user-1:
//!     resources:
//!       gpt-4:
//!         limits:
//!           tpm: {capacity: 500, schedule: [{cron: "* 9-17 * * 1-5", scale: 0.5}]}
//! ```
//!
//! Reading is pure: [`parse`] gives every level the file declares, or the first fault with its
//! line and key (the file is refused whole). A level is managed for what it names: `limits`
//! present sets exactly those (`limits: {}` removes the level's), `cascade`, `disabled` and
//! `on_unavailable` when given; what the file leaves out is left as it is.

use std::time::Duration;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{LoaderOptions, Node, parse_yaml_with_options};

use crate::domain::calendar::Calendar;
use crate::domain::limit::{Limit, MILLI, canonical};
use crate::domain::schedule::{Change, Schedule};
use crate::{FailurePolicy, Gate, proto};

/// A level of stored configuration the file declares.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    System,
    Resource(String),
    Entity { entity: String, resource: String },
}

impl Level {
    pub fn scope(&self) -> proto::LimitScope {
        match self {
            Self::System => proto::LimitScope::default(),
            Self::Resource(r) => proto::LimitScope {
                entity_id: None,
                resource: Some(r.clone()),
            },
            Self::Entity { entity, resource } => proto::LimitScope {
                entity_id: Some(entity.clone()),
                resource: Some(resource.clone()),
            },
        }
    }

    /// As the plan names it: `system`, `resource gpt-4`, `entity user-1 / gpt-4`.
    pub fn text(&self) -> String {
        match self {
            Self::System => "system".to_owned(),
            Self::Resource(r) => format!("resource {r}"),
            Self::Entity { entity, resource } => format!("entity {entity} / {resource}"),
        }
    }
}

/// What the file says of one level.
#[derive(Debug, Clone)]
pub struct Declared {
    pub level: Level,
    /// The line of the level's key.
    pub line: usize,
    /// `None`: the file does not manage the level's limits.
    pub limits: Option<Vec<Limit>>,
    pub cascade: Option<bool>,
    pub gate: Option<Gate>,
    /// The system level only.
    pub on_unavailable: Option<FailurePolicy>,
}

#[derive(Debug, Clone)]
pub struct Manifest {
    pub namespace: Option<String>,
    pub levels: Vec<Declared>,
}

/// A fault in the file: where, which key, what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {key}: {message}")]
pub struct Fault {
    pub line: usize,
    pub key: String,
    pub message: String,
}

type Parsed<T> = Result<T, Fault>;

fn line_of(node: &Node) -> usize {
    node.span().start().map_or(0, marked_yaml::Marker::line)
}

fn fault(line: usize, key: &str, message: impl Into<String>) -> Fault {
    Fault {
        line,
        key: key.to_owned(),
        message: message.into(),
    }
}

/// A node that may be YAML's null (`key:` with nothing after it, `~`, `null`).
fn is_null(node: &Node) -> bool {
    node.as_scalar()
        .is_some_and(|s| matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL"))
}

/// The mapping at `key` (null: empty), refusing keys outside `allowed`.
fn mapping<'a>(
    node: &'a Node,
    key: &str,
    allowed: Option<&[&str]>,
) -> Parsed<Vec<(&'a MarkedScalarNode, &'a Node)>> {
    if is_null(node) {
        return Ok(Vec::new());
    }
    let map: &MarkedMappingNode = node
        .as_mapping()
        .ok_or_else(|| fault(line_of(node), key, "expected a mapping"))?;
    let entries: Vec<_> = map.iter().collect();
    if let Some(allowed) = allowed
        && let Some((k, _)) = entries.iter().find(|(k, _)| !allowed.contains(&k.as_str()))
    {
        return Err(fault(
            key_line(k),
            &join(key, k.as_str()),
            format!("unknown key; expected one of: {}", allowed.join(", ")),
        ));
    }
    Ok(entries)
}

fn join(key: &str, child: &str) -> String {
    if key.is_empty() {
        child.to_owned()
    } else {
        format!("{key}.{child}")
    }
}

fn get<'a>(entries: &[(&MarkedScalarNode, &'a Node)], name: &str) -> Option<&'a Node> {
    entries
        .iter()
        .find(|(k, _)| k.as_str() == name)
        .map(|(_, v)| *v)
        .filter(|v| !is_null(v))
}

fn scalar<'a>(node: &'a Node, key: &str) -> Parsed<&'a MarkedScalarNode> {
    node.as_scalar()
        .ok_or_else(|| fault(line_of(node), key, "expected a single value"))
}

fn string(node: &Node, key: &str) -> Parsed<String> {
    Ok(scalar(node, key)?.as_str().to_owned())
}

/// YAML's spellings of a boolean.
fn truth(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

fn boolean(node: &Node, key: &str) -> Parsed<bool> {
    let text = scalar(node, key)?.as_str();
    truth(text).ok_or_else(|| {
        fault(
            line_of(node),
            key,
            format!("must be true or false, got {text:?}"),
        )
    })
}

fn whole(node: &Node, key: &str) -> Parsed<u64> {
    let text = scalar(node, key)?.as_str();
    text.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
        fault(
            line_of(node),
            key,
            format!("must be a whole number above 0, got {text:?}"),
        )
    })
}

/// The line a loader error points at.
fn load_line(e: &marked_yaml::LoadError) -> usize {
    use marked_yaml::LoadError as E;
    let marker = match e {
        E::TopLevelMustBeMapping(m)
        | E::TopLevelMustBeSequence(m)
        | E::UnexpectedAnchor(m)
        | E::MappingKeyMustBeScalar(m)
        | E::UnexpectedTag(m)
        | E::ScanError(m, _) => Some(*m),
        E::DuplicateKey(inner) => inner.key.span().start().copied(),
    };
    marker.map_or(0, |m| m.line())
}

fn key_line(key: &MarkedScalarNode) -> usize {
    key.span().start().map_or(0, marked_yaml::Marker::line)
}

/// Reads a manifest.
///
/// # Errors
/// The first [`Fault`]: YAML that does not parse, an unknown key, a value of the wrong kind, a
/// limit the daemon would refuse.
pub fn parse(text: &str) -> Parsed<Manifest> {
    let options = LoaderOptions::default().error_on_duplicate_keys(true);
    let root = parse_yaml_with_options(0, text, options)
        .map_err(|e| fault(load_line(&e), "(file)", e.to_string()))?;
    let top = mapping(
        &root,
        "",
        Some(&["namespace", "system", "resources", "entities"]),
    )?;
    let namespace = get(&top, "namespace")
        .map(|n| string(n, "namespace"))
        .transpose()?;
    let mut levels = Vec::new();
    if let Some(system) = top.iter().find(|(k, _)| k.as_str() == "system") {
        let node = system.1;
        let entries = mapping(node, "system", Some(&["limits", "on_unavailable"]))?;
        let on_unavailable = get(&entries, "on_unavailable")
            .map(|n| match string(n, "system.on_unavailable")?.as_str() {
                "block" => Ok(FailurePolicy::Block),
                "allow" => Ok(FailurePolicy::Allow),
                other => Err(fault(
                    line_of(n),
                    "system.on_unavailable",
                    format!("must be block or allow, got {other:?}"),
                )),
            })
            .transpose()?;
        levels.push(Declared {
            level: Level::System,
            line: key_line(system.0),
            limits: limits_of(&entries, "system")?,
            cascade: None,
            gate: None,
            on_unavailable,
        });
    }
    if let Some(resources) = get(&top, "resources") {
        for (name, node) in mapping(resources, "resources", None)? {
            let key = join("resources", name.as_str());
            let at = Level::Resource(name.as_str().to_owned());
            levels.push(level(at, key_line(name), node, &key)?);
        }
    }
    if let Some(entities) = get(&top, "entities") {
        for (entity, node) in mapping(entities, "entities", None)? {
            let key = join("entities", entity.as_str());
            let entries = mapping(node, &key, Some(&["resources"]))?;
            let Some(resources) = get(&entries, "resources") else {
                continue;
            };
            let key = join(&key, "resources");
            for (resource, node) in mapping(resources, &key, None)? {
                let at = Level::Entity {
                    entity: entity.as_str().to_owned(),
                    resource: resource.as_str().to_owned(),
                };
                let line = key_line(resource);
                levels.push(level(at, line, node, &join(&key, resource.as_str()))?);
            }
        }
    }
    Ok(Manifest { namespace, levels })
}

/// A resource, or an entity's resource: limits, cascade, disabled.
fn level(at: Level, line: usize, node: &Node, key: &str) -> Parsed<Declared> {
    let entries = mapping(node, key, Some(&["limits", "cascade", "disabled"]))?;
    let cascade = get(&entries, "cascade")
        .map(|n| boolean(n, &join(key, "cascade")))
        .transpose()?;
    let gate = get(&entries, "disabled")
        .map(|n| {
            let key = join(key, "disabled");
            match scalar(n, &key)?.as_str() {
                "bypass" => Ok(Gate::Bypass { until_ms: None }),
                text => match truth(text) {
                    Some(true) => Ok(Gate::Disabled),
                    Some(false) => Ok(Gate::Enabled),
                    None => Err(fault(
                        line_of(n),
                        &key,
                        format!("must be true, false or bypass, got {text:?}"),
                    )),
                },
            }
        })
        .transpose()?;
    Ok(Declared {
        level: at,
        line,
        limits: limits_of(&entries, key)?,
        cascade,
        gate,
        on_unavailable: None,
    })
}

/// The `limits` of a level: `None` when it has no `limits` key.
fn limits_of(entries: &[(&MarkedScalarNode, &Node)], key: &str) -> Parsed<Option<Vec<Limit>>> {
    let Some((_, node)) = entries.iter().find(|(k, _)| k.as_str() == "limits") else {
        return Ok(None);
    };
    let key = join(key, "limits");
    let mut limits = Vec::new();
    for (name, decl) in mapping(node, &key, None)? {
        limits.push(limit(name.as_str(), decl, &join(&key, name.as_str()))?);
    }
    let line = line_of(node);
    canonical(limits)
        .map(Some)
        .map_err(|e| fault(line, &key, e.to_string()))
}

const LIMIT_KEYS: &[&str] = &[
    "capacity",
    "burst",
    "refill_amount",
    "refill_period",
    "soft",
    "schedule",
    "reset_schedule",
    "reset_after_seconds",
];

/// One limit, as the library declares it (`refill_period` in seconds, default 60;
/// `refill_amount` default the capacity, or 0 for a quota).
fn limit(name: &str, node: &Node, key: &str) -> Parsed<Limit> {
    let line = line_of(node);
    let entries = mapping(node, key, Some(LIMIT_KEYS))?;
    let field = |f: &str| join(key, f);
    let capacity = match (get(&entries, "burst"), get(&entries, "capacity")) {
        (Some(n), _) => whole(n, &field("burst"))?,
        (None, Some(n)) => whole(n, &field("capacity"))?,
        (None, None) => return Err(fault(line, key, "capacity is required")),
    };
    let soft = get(&entries, "soft")
        .map(|n| boolean(n, &field("soft")))
        .transpose()?
        .unwrap_or(false);
    let resets = get(&entries, "reset_schedule");
    let session = get(&entries, "reset_after_seconds");
    let refill = get(&entries, "refill_amount");
    let period = get(&entries, "refill_period");
    let bad = |k: &str, m: &str| Err(fault(line, &field(k), m.to_owned()));
    let made = match (resets, session) {
        (Some(_), Some(_)) => {
            return bad(
                "reset_after_seconds",
                "a limit has one recovery: reset_schedule or reset_after_seconds, not both",
            );
        }
        (Some(n), None) => {
            if refill.is_some() || period.is_some() {
                return bad("refill_amount", "a quota does not drip: leave refill out");
            }
            let key = field("reset_schedule");
            let entries = n
                .as_sequence()
                .ok_or_else(|| fault(line_of(n), &key, "expected a list of {cron, tz}"))?;
            let [entry] = entries.as_slice() else {
                return Err(fault(
                    line_of(n),
                    &key,
                    "one reset entry per limit here (a calendar quota has one pattern)",
                ));
            };
            let at = format!("{key}[0]");
            let e = mapping(entry, &at, Some(&["cron", "tz"]))?;
            let cron =
                get(&e, "cron").ok_or_else(|| fault(line_of(entry), &at, "cron is required"))?;
            let tz = get(&e, "tz")
                .map(|n| string(n, &join(&at, "tz")))
                .transpose()?
                .unwrap_or_else(|| "UTC".to_owned());
            let calendar = Calendar::new(&string(cron, &join(&at, "cron"))?, &tz)
                .map_err(|e| fault(line_of(entry), &at, e.to_string()))?;
            Limit::quota(name, capacity, calendar)
        }
        (None, Some(n)) => {
            if refill.is_some() || period.is_some() {
                return bad("refill_amount", "a quota does not drip: leave refill out");
            }
            let seconds = whole(n, &field("reset_after_seconds"))?;
            Limit::session_quota(name, capacity, Duration::from_secs(seconds))
        }
        (None, None) => {
            let amount = refill
                .map(|n| whole(n, &field("refill_amount")))
                .transpose()?
                .unwrap_or(capacity);
            let seconds = period
                .map(|n| whole(n, &field("refill_period")))
                .transpose()?
                .unwrap_or(60);
            Limit::custom(name, capacity, amount, Duration::from_secs(seconds))
        }
    }
    .map_err(|e| fault(line, key, e.to_string()))?
    .with_soft(soft);
    match get(&entries, "schedule") {
        None => Ok(made),
        Some(n) => {
            let schedule = schedule(n, &field("schedule"))?;
            made.with_schedule(schedule)
                .map_err(|e| fault(line_of(n), &field("schedule"), e.to_string()))
        }
    }
}

/// A `schedule`: entries `{cron, tz, scale | capacity, refill_amount, refill_period_seconds}`,
/// one zone for all.
fn schedule(node: &Node, key: &str) -> Parsed<Schedule> {
    let items = node
        .as_sequence()
        .ok_or_else(|| fault(line_of(node), key, "expected a list of entries"))?;
    let mut entries = Vec::new();
    let mut zone: Option<String> = None;
    for (i, item) in items.iter().enumerate() {
        let at = format!("{key}[{i}]");
        let e = mapping(
            item,
            &at,
            Some(&[
                "cron",
                "tz",
                "scale",
                "capacity",
                "refill_amount",
                "refill_period_seconds",
            ]),
        )?;
        let line = line_of(item);
        let cron = get(&e, "cron").ok_or_else(|| fault(line, &at, "cron is required"))?;
        let cron = string(cron, &join(&at, "cron"))?;
        let tz = get(&e, "tz")
            .map(|n| string(n, &join(&at, "tz")))
            .transpose()?
            .unwrap_or_else(|| "UTC".to_owned());
        match &zone {
            Some(z) if *z != tz => {
                return Err(fault(
                    line,
                    &join(&at, "tz"),
                    format!("one zone per schedule: the first entry's is {z}"),
                ));
            }
            _ => zone = Some(tz),
        }
        // Tokens as milli-tokens, seconds as milliseconds: both a thousand times the value.
        let thousandfold = |f: &str| -> Parsed<Option<i64>> {
            get(&e, f)
                .map(|n| {
                    whole(n, &join(&at, f)).map(|v| (v.min(i64::MAX as u64 / 1000) as i64) * MILLI)
                })
                .transpose()
        };
        let change = match get(&e, "scale") {
            Some(n) => {
                let text = scalar(n, &join(&at, "scale"))?.as_str();
                let scale = text
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0);
                let Some(scale) = scale else {
                    return Err(fault(
                        line_of(n),
                        &join(&at, "scale"),
                        format!("must be a number above 0, got {text:?}"),
                    ));
                };
                if ["capacity", "refill_amount", "refill_period_seconds"]
                    .iter()
                    .any(|f| get(&e, f).is_some())
                {
                    return Err(fault(line, &at, "an entry scales or sets values, not both"));
                }
                Change::Scale(((scale * 1000.0).round() as u64).max(1))
            }
            None => {
                let set = Change::Set {
                    capacity: thousandfold("capacity")?,
                    refill_amount: thousandfold("refill_amount")?,
                    refill_period_ms: thousandfold("refill_period_seconds")?,
                };
                if set
                    == (Change::Set {
                        capacity: None,
                        refill_amount: None,
                        refill_period_ms: None,
                    })
                {
                    return Err(fault(
                        line,
                        &at,
                        "give a scale, or capacity / refill_amount / refill_period_seconds",
                    ));
                }
                set
            }
        };
        entries.push((cron, change));
    }
    Schedule::new(&entries, zone.as_deref().unwrap_or("UTC"))
        .map_err(|e| fault(line_of(node), key, e.to_string()))
}

/// One change that makes the store say what the file says.
#[derive(Debug, Clone)]
pub enum Step {
    Limits {
        level: Level,
        from: Vec<proto::Limit>,
        to: Vec<Limit>,
    },
    Cascade {
        level: Level,
        from: Option<bool>,
        to: bool,
    },
    Gate {
        level: Level,
        from: Option<Gate>,
        to: Gate,
    },
    FailurePolicy {
        from: Option<FailurePolicy>,
        to: FailurePolicy,
    },
}

fn limits_text(limits: &[proto::Limit]) -> String {
    if limits.is_empty() {
        return "(none)".to_owned();
    }
    limits
        .iter()
        .map(|l| {
            let soft = if l.soft { ", soft" } else { "" };
            format!(
                "{} {} cap {}{soft}",
                l.name,
                super::output::rate_text(l),
                l.capacity
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn gate_text(gate: Option<Gate>) -> String {
    gate.map_or_else(|| "(none)".to_owned(), Gate::text)
}

impl Step {
    /// `~ limits resource gpt-4: rpm 100/1m cap 100 -> rpm 200/1m cap 200`.
    pub fn text(&self) -> String {
        let (what, level, from, to) = match self {
            Self::Limits { level, from, to } => {
                let to: Vec<proto::Limit> = to.iter().map(proto::Limit::from).collect();
                ("limits", level.text(), limits_text(from), limits_text(&to))
            }
            Self::Cascade { level, from, to } => (
                "cascade",
                level.text(),
                from.map_or_else(|| "(none)".to_owned(), |c| c.to_string()),
                to.to_string(),
            ),
            Self::Gate { level, from, to } => {
                ("gate", level.text(), gate_text(*from), gate_text(Some(*to)))
            }
            Self::FailurePolicy { from, to } => (
                "on_unavailable",
                "namespace".to_owned(),
                from.map_or("(none)", FailurePolicy::as_str).to_owned(),
                to.as_str().to_owned(),
            ),
        };
        let sign = if from == "(none)" {
            '+'
        } else if to == "(none)" {
            '-'
        } else {
            '~'
        };
        format!("{sign} {what} {level}: {from} -> {to}")
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "change": self.text() })
    }

    fn op(&self) -> super::admin::AdminOp {
        use super::admin::AdminOp;
        match self {
            Self::Limits { level, to, .. } if to.is_empty() => AdminOp::DeleteLimits(level.scope()),
            Self::Limits { level, to, .. } => AdminOp::SetLimits {
                scope: level.scope(),
                limits: to.clone(),
            },
            Self::Cascade { level, to, .. } => AdminOp::SetCascade {
                scope: level.scope(),
                cascade: *to,
            },
            Self::Gate { level, to, .. } => AdminOp::SetGate {
                scope: level.scope(),
                gate: *to,
            },
            Self::FailurePolicy { to, .. } => AdminOp::SetFailurePolicy(*to),
        }
    }
}

/// What `limits plan|diff|apply` does with the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Plan,
    Diff,
    Apply,
}

/// Reads `file`, compares it with what the daemon has stored, and shows (or, for `apply`,
/// makes) the changes. Returns the process's exit status: `diff` exits 2 when there are
/// differences.
///
/// # Errors
/// [`super::CliError::Usage`] for a file that cannot be read or is refused (nothing is changed
/// then), [`super::CliError::Status`] for a refusal by the daemon (the steps before it stand).
pub async fn run(
    daemon: &super::args::DaemonArgs,
    file: &std::path::Path,
    verb: Verb,
) -> Result<u8, super::CliError> {
    use super::CliError;
    let text = std::fs::read_to_string(file)
        .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
    let manifest = parse(&text).map_err(|f| CliError::Usage(format!("{}: {f}", file.display())))?;
    let namespace = match (&manifest.namespace, daemon.namespace.as_str()) {
        (Some(file_ns), given) if !given.is_empty() && given != file_ns => {
            return Err(CliError::Usage(format!(
                "{}: the file is for namespace {file_ns:?}, --namespace says {given:?}",
                file.display()
            )));
        }
        (Some(file_ns), _) => file_ns.clone(),
        (None, given) => given.to_owned(),
    };
    let client = crate::client::Client::connect(&daemon.socket).await?;
    let steps = plan(&client, &namespace, &manifest).await?;
    let json = daemon.output == super::output::Output::Json;
    let mut done = Vec::new();
    if verb == Verb::Apply {
        for step in &steps {
            // Each step is one call, audited by the daemon; a refusal stops here.
            super::admin::run(
                &client,
                &namespace,
                daemon.principal.as_deref(),
                step.op(),
                super::output::Output::Json,
            )
            .await?;
            done.push(step);
        }
    }
    let declared = manifest.levels.len();
    if json {
        let list: Vec<_> = steps.iter().map(Step::json).collect();
        let key = if verb == Verb::Apply {
            "applied"
        } else {
            "changes"
        };
        println!(
            "{}",
            serde_json::json!({ key: list, "levels": declared, "namespace": namespace })
        );
    } else {
        for step in &steps {
            println!("{}", step.text());
        }
        let count = steps.len();
        let summary = match verb {
            Verb::Apply => format!("{count} changes applied ({declared} levels declared)"),
            _ if count == 0 => format!("no changes ({declared} levels declared)"),
            _ => format!("{count} changes to apply ({declared} levels declared)"),
        };
        println!("{summary}");
    }
    Ok(if verb == Verb::Diff && !steps.is_empty() {
        2
    } else {
        0
    })
}

/// The steps that make the store say what `manifest` says, in the file's order.
async fn plan(
    client: &crate::client::Client,
    namespace: &str,
    manifest: &Manifest,
) -> Result<Vec<Step>, super::CliError> {
    let mut admin = proto::admin_client::AdminClient::new(client.channel());
    let request = |level: &Level| proto::LimitsRequest {
        namespace: namespace.to_owned(),
        scope: Some(level.scope()),
    };
    let mut steps = Vec::new();
    for declared in &manifest.levels {
        let level = &declared.level;
        if let Some(to) = &declared.limits {
            let from = admin.get_limits(request(level)).await?.into_inner().limits;
            let wanted: Vec<proto::Limit> = to.iter().map(proto::Limit::from).collect();
            if from != wanted {
                steps.push(Step::Limits {
                    level: level.clone(),
                    from,
                    to: to.clone(),
                });
            }
        }
        if let Some(to) = declared.cascade {
            let from = admin
                .get_cascade(request(level))
                .await?
                .into_inner()
                .cascade;
            if from != Some(to) {
                steps.push(Step::Cascade {
                    level: level.clone(),
                    from,
                    to,
                });
            }
        }
        if let Some(to) = declared.gate {
            let answer = admin.get_gate(request(level)).await?.into_inner();
            let from = answer.gate().gate(answer.bypass_until_ms);
            if from != Some(to) {
                steps.push(Step::Gate {
                    level: level.clone(),
                    from,
                    to,
                });
            }
        }
        if let Some(to) = declared.on_unavailable {
            let from = admin
                .get_failure_policy(proto::NamespaceRequest {
                    namespace: namespace.to_owned(),
                })
                .await?
                .into_inner()
                .on_unavailable()
                .policy();
            if from != Some(to) {
                steps.push(Step::FailurePolicy { from, to });
            }
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests;
