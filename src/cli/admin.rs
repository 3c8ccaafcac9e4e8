//! The administrative verbs (entities, stored limits, audit, namespaces, usage), spoken through
//! a running daemon's `Admin` service.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::CliError;
use super::args::{
    BucketArgs, BucketOp, CascadeOp, DaemonArgs, EntityOp, FailurePolicyOp, GateOp, LimitsOp,
    NamespaceOp,
};
use super::output::{
    Output, audit_value, entity_json, entity_rows, limit_json, limit_rows, rfc3339, table,
};
use crate::Limit;
use crate::client::Client;
use crate::domain::records::cascade_text;
use crate::proto;

/// The request header that names the person behind an administrative change.
pub const PRINCIPAL_HEADER: &str = "zae-principal";

/// An administrative operation.
#[derive(Debug, Clone)]
pub enum AdminOp {
    CreateEntity {
        id: String,
        name: String,
        parent: Option<String>,
        cascade: bool,
        metadata: BTreeMap<String, String>,
    },
    GetEntity(String),
    DeleteEntity {
        id: String,
        force: bool,
    },
    MoveEntity {
        id: String,
        parent: Option<String>,
    },
    Children(String),
    SetLimits {
        scope: proto::LimitScope,
        limits: Vec<Limit>,
    },
    GetLimits(proto::LimitScope),
    DeleteLimits(proto::LimitScope),
    Audit {
        subject: String,
        page_size: u32,
        page: String,
    },
    Usage(proto::UsageRequest),
    CreateNamespace(String),
    ListNamespaces,
    DeleteNamespace(String),
    SetGate {
        scope: proto::LimitScope,
        gate: crate::Gate,
    },
    GetGate(proto::LimitScope),
    ResetBucket(proto::BucketRequest),
    EntitiesWithLimits(proto::ListEntitiesWithLimitsRequest),
    Capacity(proto::ResourceCapacityRequest),
    ResourcesWithDefaults,
    TopUp(proto::BucketRequest),
    ClearGate(proto::LimitScope),
    SetCascade {
        scope: proto::LimitScope,
        cascade: bool,
    },
    GetCascade(proto::LimitScope),
    ClearCascade(proto::LimitScope),
    SetFailurePolicy(crate::FailurePolicy),
    GetFailurePolicy,
    DeleteFailurePolicy,
}

/// Runs an operation against the daemon and returns what to print.
///
/// # Errors
/// [`CliError::Status`] saying what the daemon refused.
pub async fn run(
    client: &Client,
    namespace: &str,
    principal: Option<&str>,
    op: AdminOp,
    output: Output,
) -> Result<String, CliError> {
    // A name for the audit records, sent beside the peer credentials the daemon reads itself.
    let principal = principal
        .map(|p| {
            tonic::metadata::MetadataValue::try_from(p).map_err(|_| {
                CliError::Usage(format!("--principal {p:?} is not a valid header value"))
            })
        })
        .transpose()?;
    let mut admin = proto::admin_client::AdminClient::with_interceptor(
        client.channel(),
        move |mut req: tonic::Request<()>| {
            if let Some(p) = &principal {
                req.metadata_mut().insert(PRINCIPAL_HEADER, p.clone());
            }
            Ok(req)
        },
    );
    let ns = namespace.to_owned();
    let (json, text) = match op {
        AdminOp::CreateEntity {
            id,
            name,
            parent,
            cascade,
            metadata,
        } => {
            let entity = admin
                .create_entity(proto::CreateEntityRequest {
                    namespace: ns,
                    entity: Some(proto::Entity {
                        id,
                        name,
                        parent_id: parent,
                        cascade,
                        metadata: metadata.into_iter().collect(),
                    }),
                })
                .await?
                .into_inner()
                .entity
                .unwrap_or_default();
            (entity_json(&entity), entity_rows(&[entity]))
        }
        AdminOp::GetEntity(id) => {
            let entity = admin
                .get_entity(proto::EntityRequest {
                    namespace: ns,
                    entity_id: id,
                    force: false,
                })
                .await?
                .into_inner()
                .entity
                .unwrap_or_default();
            (entity_json(&entity), entity_rows(&[entity]))
        }
        AdminOp::MoveEntity { id, parent } => {
            let entity = admin
                .move_entity(proto::MoveEntityRequest {
                    namespace: ns,
                    entity_id: id,
                    parent_id: parent,
                })
                .await?
                .into_inner()
                .entity
                .unwrap_or_default();
            (entity_json(&entity), entity_rows(&[entity]))
        }
        AdminOp::DeleteEntity { id, force } => {
            admin
                .delete_entity(proto::EntityRequest {
                    namespace: ns,
                    entity_id: id.clone(),
                    force,
                })
                .await?;
            (json!({ "deleted": id }), format!("deleted entity {id}"))
        }
        AdminOp::Children(id) => {
            let children = admin
                .list_children(proto::EntityRequest {
                    namespace: ns,
                    entity_id: id,
                    force: false,
                })
                .await?
                .into_inner()
                .children;
            (
                Value::Array(children.iter().map(entity_json).collect()),
                entity_rows(&children),
            )
        }
        AdminOp::SetLimits { scope, limits } => {
            let limits: Vec<proto::Limit> = limits.iter().map(proto::Limit::from).collect();
            admin
                .set_limits(proto::SetLimitsRequest {
                    namespace: ns,
                    scope: Some(scope),
                    limits: limits.clone(),
                })
                .await?;
            (
                Value::Array(limits.iter().map(limit_json).collect()),
                limit_rows(&limits),
            )
        }
        AdminOp::GetLimits(scope) => {
            let limits = admin
                .get_limits(proto::LimitsRequest {
                    namespace: ns,
                    scope: Some(scope),
                })
                .await?
                .into_inner()
                .limits;
            (
                Value::Array(limits.iter().map(limit_json).collect()),
                limit_rows(&limits),
            )
        }
        AdminOp::DeleteLimits(scope) => {
            admin
                .delete_limits(proto::LimitsRequest {
                    namespace: ns,
                    scope: Some(scope),
                })
                .await?;
            (json!({ "deleted": true }), "deleted limits".to_owned())
        }
        AdminOp::Audit {
            subject,
            page_size,
            page,
        } => {
            let answer = admin
                .list_audit(proto::ListAuditRequest {
                    namespace: ns,
                    subject,
                    page_size,
                    page,
                })
                .await?
                .into_inner();
            let records: Vec<Value> = answer
                .records
                .iter()
                .map(|r| {
                    json!({
                        "subject": r.subject, "action": r.action, "principal": r.principal,
                        "at_ms": r.at_ms,
                        "before": r.before.as_deref().map(|v| audit_value(v).0),
                        "after": r.after.as_deref().map(|v| audit_value(v).0),
                    })
                })
                .collect();
            let rows: Vec<Vec<String>> = answer
                .records
                .iter()
                .map(|r| {
                    vec![
                        rfc3339(r.at_ms),
                        r.action.clone(),
                        r.principal.clone(),
                        r.before
                            .as_deref()
                            .map_or_else(|| "-".into(), |v| audit_value(v).1),
                        r.after
                            .as_deref()
                            .map_or_else(|| "-".into(), |v| audit_value(v).1),
                    ]
                })
                .collect();
            let mut text = table(&["at", "action", "principal", "before", "after"], &rows);
            if !answer.next_page.is_empty() {
                text += &format!("\nmore: --page {}", answer.next_page);
            }
            (
                json!({ "records": records, "next_page": answer.next_page }),
                text,
            )
        }
        AdminOp::SetGate { scope, gate } => {
            admin
                .set_gate(proto::GateRequest {
                    namespace: ns,
                    scope: Some(scope),
                    gate: proto::Gate::from(Some(gate)).into(),
                    bypass_until_ms: bypass_until(Some(gate)),
                })
                .await?;
            (gate_json(Some(gate)), gate.text())
        }
        AdminOp::ResetBucket(r) => {
            let request = proto::BucketRequest { namespace: ns, ..r };
            operated(admin.reset_bucket(request).await?.into_inner())
        }
        AdminOp::TopUp(r) => {
            let request = proto::BucketRequest { namespace: ns, ..r };
            operated(admin.top_up(request).await?.into_inner())
        }
        AdminOp::GetGate(scope) => {
            let answer = admin
                .get_gate(proto::LimitsRequest {
                    namespace: ns,
                    scope: Some(scope),
                })
                .await?
                .into_inner();
            let gate = answer.gate().gate(answer.bypass_until_ms);
            let text =
                gate.map_or_else(|| "none (the next level decides)".to_owned(), |g| g.text());
            (gate_json(gate), text)
        }
        AdminOp::ClearGate(scope) => {
            admin
                .clear_gate(proto::LimitsRequest {
                    namespace: ns,
                    scope: Some(scope),
                })
                .await?;
            (json!({ "cleared": true }), "gate cleared".to_owned())
        }
        AdminOp::SetCascade { scope, cascade } => {
            let scope = Some(scope);
            let request = proto::CascadeRequest {
                namespace: ns,
                scope,
                cascade,
            };
            admin.set_cascade(request).await?;
            let text = format!("cascade {}", cascade_text(cascade));
            (json!({ "cascade": cascade }), text)
        }
        AdminOp::GetCascade(scope) => {
            let scope = Some(scope);
            let request = proto::LimitsRequest {
                namespace: ns,
                scope,
            };
            let cascade = admin.get_cascade(request).await?.into_inner().cascade;
            let text = match cascade {
                Some(c) => format!("cascade {}", cascade_text(c)),
                None => "none (the next level decides, then the entity's flag)".to_owned(),
            };
            (json!({ "cascade": cascade }), text)
        }
        AdminOp::ClearCascade(scope) => {
            let scope = Some(scope);
            let request = proto::LimitsRequest {
                namespace: ns,
                scope,
            };
            admin.clear_cascade(request).await?;
            (
                json!({ "cleared": true }),
                "cascade policy cleared".to_owned(),
            )
        }
        AdminOp::SetFailurePolicy(policy) => {
            admin
                .set_failure_policy(proto::FailurePolicyRequest {
                    namespace: ns,
                    on_unavailable: proto::OnUnavailable::from(Some(policy)).into(),
                })
                .await?;
            let text = format!("failure policy {}", policy.as_str());
            (json!({ "on_unavailable": policy.as_str() }), text)
        }
        AdminOp::GetFailurePolicy => {
            let stored = admin
                .get_failure_policy(proto::NamespaceRequest { namespace: ns })
                .await?
                .into_inner()
                .on_unavailable();
            let name = stored.policy().map(crate::FailurePolicy::as_str);
            let text = name.map_or_else(
                || "none stored (the daemon's failure_policy applies)".to_owned(),
                |n| format!("failure policy {n}"),
            );
            (json!({ "on_unavailable": name }), text)
        }
        AdminOp::DeleteFailurePolicy => {
            admin
                .delete_failure_policy(proto::NamespaceRequest { namespace: ns })
                .await?;
            (
                json!({ "deleted": true }),
                "failure policy deleted (the daemon's applies)".to_owned(),
            )
        }
        AdminOp::CreateNamespace(name) => {
            admin
                .create_namespace(proto::NamespaceRequest {
                    namespace: name.clone(),
                })
                .await?;
            let usable = admin
                .list_namespaces(proto::Empty {})
                .await?
                .into_inner()
                .namespaces
                .contains(&name);
            let text = if usable {
                format!("namespace {name} created")
            } else {
                format!(
                    "namespace {name} registered; this daemon does not admit registered \
                     namespaces: add \"*\" (or \"{name}\") to limiter.namespaces in its \
                     configuration and restart it to use {name}"
                )
            };
            (json!({ "created": name, "usable": usable }), text)
        }
        AdminOp::EntitiesWithLimits(r) => {
            let request = proto::ListEntitiesWithLimitsRequest { namespace: ns, ..r };
            let answer = admin.list_entities_with_limits(request).await?.into_inner();
            let rows: Vec<Vec<String>> =
                answer.entity_ids.iter().map(|e| vec![e.clone()]).collect();
            let mut text = table(&["entity"], &rows);
            if !answer.next_page.is_empty() {
                text += &format!("\nmore: --page {}", answer.next_page);
            }
            let value = json!({ "entity_ids": answer.entity_ids, "next_page": answer.next_page });
            (value, text)
        }
        AdminOp::Capacity(r) => {
            let request = proto::ResourceCapacityRequest { namespace: ns, ..r };
            let answer = admin.get_resource_capacity(request).await?.into_inner();
            let rows: Vec<Vec<String>> = answer
                .entities
                .iter()
                .map(|e| {
                    vec![
                        e.entity_id.clone(),
                        crate::domain::limit::tokens(e.capacity_milli),
                        crate::domain::limit::tokens(e.available_milli),
                    ]
                })
                .collect();
            let mut text = table(&["entity", "capacity", "available"], &rows);
            text += &format!(
                "\ntotal: capacity {}, available {}",
                crate::domain::limit::tokens(answer.total_capacity_milli),
                crate::domain::limit::tokens(answer.total_available_milli)
            );
            let entities: Vec<serde_json::Value> = answer
                .entities
                .iter()
                .map(|e| {
                    json!({
                        "entity_id": e.entity_id,
                        "capacity": token_json(e.capacity_milli),
                        "available": token_json(e.available_milli),
                    })
                })
                .collect();
            let value = json!({
                "total_capacity": token_json(answer.total_capacity_milli),
                "total_available": token_json(answer.total_available_milli),
                "entities": entities,
            });
            (value, text)
        }
        AdminOp::ResourcesWithDefaults => {
            let request = proto::NamespaceRequest { namespace: ns };
            let answer = admin
                .list_resources_with_defaults(request)
                .await?
                .into_inner();
            let rows: Vec<Vec<String>> = answer.resources.iter().map(|r| vec![r.clone()]).collect();
            (json!(answer.resources), table(&["resource"], &rows))
        }
        AdminOp::ListNamespaces => {
            let names = admin
                .list_namespaces(proto::Empty {})
                .await?
                .into_inner()
                .namespaces;
            let rows: Vec<Vec<String>> = names.iter().map(|n| vec![n.clone()]).collect();
            (json!(names), table(&["namespace"], &rows))
        }
        AdminOp::DeleteNamespace(name) => {
            admin
                .delete_namespace(proto::NamespaceRequest {
                    namespace: name.clone(),
                })
                .await?;
            (
                json!({ "deleted": name }),
                format!("namespace {name} deleted"),
            )
        }
        AdminOp::Usage(mut request) => {
            request.namespace = ns;
            // Every page.
            let mut snapshots = Vec::new();
            loop {
                let page = admin.get_usage(request.clone()).await?.into_inner();
                snapshots.extend(page.snapshots);
                if page.next_page.is_empty() {
                    break;
                }
                request.page = page.next_page;
            }
            let json = Value::Array(
                snapshots
                    .iter()
                    .map(|u| {
                        json!({
                            "resource": u.resource, "period": u.period, "start_ms": u.start_ms,
                            "consumed": u.consumed_milli.iter()
                                .map(|(k, v)| (k.clone(), json!(*v as f64 / 1000.0)))
                                .collect::<serde_json::Map<_, _>>(),
                        })
                    })
                    .collect(),
            );
            let rows: Vec<Vec<String>> = snapshots
                .iter()
                .map(|u| {
                    vec![
                        rfc3339(u.start_ms),
                        u.period.clone(),
                        u.resource.clone(),
                        u.consumed_milli
                            .iter()
                            .collect::<BTreeMap<_, _>>()
                            .iter()
                            .map(|(k, v)| format!("{k}={}", **v as f64 / 1000.0))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ]
                })
                .collect();
            (
                json,
                table(&["start", "period", "resource", "consumed"], &rows),
            )
        }
    };
    Ok(match output {
        Output::Json => json.to_string(),
        Output::Table => text,
    })
}

impl From<EntityOp> for AdminOp {
    fn from(op: EntityOp) -> Self {
        match op {
            EntityOp::Create {
                id,
                name,
                parent,
                cascade,
                meta,
            } => Self::CreateEntity {
                id,
                name,
                parent,
                cascade,
                metadata: meta.into_iter().collect(),
            },
            EntityOp::Get { id } => Self::GetEntity(id),
            EntityOp::Delete { id, force } => Self::DeleteEntity { id, force },
            EntityOp::Move { id, parent, .. } => Self::MoveEntity { id, parent },
            EntityOp::Children { id } => Self::Children(id),
        }
    }
}

impl From<LimitsOp> for AdminOp {
    fn from(op: LimitsOp) -> Self {
        match op {
            LimitsOp::Set { scope, limit } => Self::SetLimits {
                scope: scope.scope(),
                limits: limit,
            },
            LimitsOp::Get { scope } => Self::GetLimits(scope.scope()),
            LimitsOp::Delete { scope } => Self::DeleteLimits(scope.scope()),
            LimitsOp::List {
                resource: Some(resource),
                page_size,
                page,
            } => Self::EntitiesWithLimits(proto::ListEntitiesWithLimitsRequest {
                resource,
                page_size,
                page,
                ..Default::default()
            }),
            LimitsOp::List { resource: None, .. } => Self::ResourcesWithDefaults,
            LimitsOp::Plan { .. } | LimitsOp::Diff { .. } | LimitsOp::Apply { .. } => {
                unreachable!("cli::manifest runs the manifest verbs (LimitsOp::manifest)")
            }
        }
    }
}

impl From<CascadeOp> for AdminOp {
    fn from(op: CascadeOp) -> Self {
        match op {
            CascadeOp::Set { cascade, scope } => Self::SetCascade {
                scope: scope.scope(),
                cascade,
            },
            CascadeOp::Clear { scope } => Self::ClearCascade(scope.scope()),
            CascadeOp::Get { scope } => Self::GetCascade(scope.scope()),
        }
    }
}

impl From<GateOp> for AdminOp {
    fn from(op: GateOp) -> Self {
        match op {
            GateOp::Disable { scope } => Self::SetGate {
                scope: scope.scope(),
                gate: crate::Gate::Disabled,
            },
            GateOp::Enable { scope } => Self::SetGate {
                scope: scope.scope(),
                gate: crate::Gate::Enabled,
            },
            GateOp::Bypass { scope, for_secs } => Self::SetGate {
                scope: scope.scope(),
                gate: crate::Gate::Bypass {
                    until_ms: for_secs.map(|s| now_ms().saturating_add(i64::from(s) * 1_000)),
                },
            },
            GateOp::Clear { scope } => Self::ClearGate(scope.scope()),
            GateOp::Get { scope } => Self::GetGate(scope.scope()),
        }
    }
}

impl From<BucketOp> for AdminOp {
    fn from(op: BucketOp) -> Self {
        let request = |b: BucketArgs| proto::BucketRequest {
            entity_id: b.entity,
            resource: b.resource,
            idempotency_key: b.idempotency_key,
            ..Default::default()
        };
        match op {
            BucketOp::Reset { bucket, limits } => Self::ResetBucket(proto::BucketRequest {
                limits,
                ..request(bucket)
            }),
            BucketOp::TopUp { bucket, amount } => Self::TopUp(proto::BucketRequest {
                amounts: amount.into_iter().collect(),
                ..request(bucket)
            }),
        }
    }
}

/// What a reset or top-up did, in tokens: `{"written": 1, "gained": {"tpm": 120}, "replayed":
/// false}`.
fn operated(answer: proto::BucketResponse) -> (serde_json::Value, String) {
    let gained: BTreeMap<String, String> = answer
        .gained_milli
        .iter()
        .map(|(n, g)| (n.clone(), crate::domain::limit::tokens(*g)))
        .collect();
    let json_gained: serde_json::Map<String, serde_json::Value> = answer
        .gained_milli
        .iter()
        .map(|(n, g)| (n.clone(), token_json(*g)))
        .collect();
    let mut text = match gained.is_empty() {
        true => "nothing to change".to_owned(),
        false => gained
            .iter()
            .map(|(n, g)| format!("{n} +{g}"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    if answer.replayed {
        text += " (done before with this key: nothing more now)";
    }
    let value = json!({
        "written": answer.written,
        "gained": json_gained,
        "replayed": answer.replayed,
    });
    (value, text)
}

/// Milli-tokens as a JSON number of tokens: whole when they are.
fn token_json(milli: i64) -> serde_json::Value {
    use crate::domain::limit::MILLI;
    match milli % MILLI {
        0 => json!(milli / MILLI),
        _ => json!(milli as f64 / MILLI as f64),
    }
}

impl From<FailurePolicyOp> for AdminOp {
    fn from(op: FailurePolicyOp) -> Self {
        match op {
            FailurePolicyOp::Set { policy } => Self::SetFailurePolicy(policy),
            FailurePolicyOp::Get => Self::GetFailurePolicy,
            FailurePolicyOp::Delete => Self::DeleteFailurePolicy,
        }
    }
}

impl TryFrom<NamespaceOp> for AdminOp {
    type Error = CliError;

    /// # Errors
    /// [`CliError::Usage`] for a deletion without `--yes`.
    fn try_from(op: NamespaceOp) -> Result<Self, CliError> {
        Ok(match op {
            NamespaceOp::Create { name } => Self::CreateNamespace(name),
            NamespaceOp::List => Self::ListNamespaces,
            NamespaceOp::Delete { name, yes: false } => {
                return Err(CliError::Usage(format!(
                    "refusing to delete namespace {name:?} and everything in it without --yes"
                )));
            }
            NamespaceOp::Delete { name, yes: true } => Self::DeleteNamespace(name),
        })
    }
}

/// Runs `op` through the daemon `daemon` names and prints the result.
///
/// # Errors
/// [`CliError::Client`] when the daemon cannot be reached, [`CliError::Status`] when it refuses.
pub async fn print(daemon: DaemonArgs, op: AdminOp) -> Result<(), CliError> {
    let client = Client::connect(&daemon.socket).await?;
    let principal = daemon.principal.as_deref();
    let output = run(&client, &daemon.namespace, principal, op, daemon.output).await?;
    println!("{output}");
    Ok(())
}

/// A gate as the CLI prints it in JSON: `{"gate": "bypass", "until_ms": ...}`.
fn gate_json(gate: Option<crate::Gate>) -> serde_json::Value {
    let name = gate.map(|g| match g {
        crate::Gate::Enabled => "enabled",
        crate::Gate::Disabled => "disabled",
        crate::Gate::Bypass { .. } => "bypass",
    });
    match bypass_until(gate) {
        Some(until) => json!({ "gate": name, "until_ms": until }),
        None => json!({ "gate": name }),
    }
}

fn bypass_until(gate: Option<crate::Gate>) -> Option<i64> {
    match gate {
        Some(crate::Gate::Bypass { until_ms }) => until_ms,
        _ => None,
    }
}

/// The wall clock, ms since the Unix epoch.
fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
