//! The administrative commands of the `zae-limiter` binary (entities, stored limits, audit),
//! spoken through a running daemon's `Admin` service, with output as a table for people or as
//! JSON for scripts. Flag parsing stays in the binary; this module runs and renders.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::Limit;
use crate::client::Client;
use crate::domain::limit::{MILLI, period};
use crate::proto;

/// The request header that names the person behind an administrative change.
pub const PRINCIPAL_HEADER: &str = "zae-principal";

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

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
}

fn status_text(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn entity_json(e: &proto::Entity) -> Value {
    json!({
        "id": e.id,
        "name": e.name,
        "parent_id": e.parent_id,
        "cascade": e.cascade,
        "metadata": e.metadata.iter().collect::<BTreeMap<_, _>>(),
    })
}

fn limit_json(l: &proto::Limit) -> Value {
    json!({
        "name": l.name,
        "capacity": l.capacity,
        "refill_amount": l.refill_amount,
        "refill_period_ms": l.refill_period_ms,
        "refill_period": period(l.refill_period_ms as i64),
    })
}

/// A stored limit set (the audit's `before`/`after`) in tokens and periods; other values (an
/// entity's JSON) as they are.
fn audit_value(text: &str) -> (Value, String) {
    match crate::domain::limit::decode(text) {
        Ok(limits) if !limits.is_empty() => (
            Value::Array(
                limits
                    .iter()
                    .map(|l| {
                        json!({
                            "name": l.name().as_str(),
                            "capacity": l.capacity() as f64 / MILLI as f64,
                            "refill_amount": l.refill_amount() as f64 / MILLI as f64,
                            "refill_period_ms": l.refill_period_ms(),
                            "refill_period": period(l.refill_period_ms()),
                        })
                    })
                    .collect(),
            ),
            limits
                .iter()
                .map(Limit::describe)
                .collect::<Vec<_>>()
                .join("; "),
        ),
        _ => (Value::String(text.to_owned()), text.to_owned()),
    }
}

/// Epoch milliseconds as RFC 3339 in UTC (`2026-11-29T09:31:37.123Z`).
pub fn rfc3339(ms: i64) -> String {
    let (days, in_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, sec, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1_000 % 60,
        in_day % 1_000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{sec:02}.{milli:03}Z")
}

/// Left-aligned columns under a header.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_uppercase()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

fn entity_rows(entities: &[proto::Entity]) -> String {
    let rows: Vec<Vec<String>> = entities
        .iter()
        .map(|e| {
            vec![
                e.id.clone(),
                e.name.clone(),
                e.parent_id.clone().unwrap_or_else(|| "-".into()),
                e.cascade.to_string(),
                e.metadata
                    .iter()
                    .collect::<BTreeMap<_, _>>()
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    table(&["id", "name", "parent", "cascade", "metadata"], &rows)
}

fn limit_rows(limits: &[proto::Limit]) -> String {
    let rows: Vec<Vec<String>> = limits
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                format!("{}/{}", l.refill_amount, period(l.refill_period_ms as i64)),
                l.capacity.to_string(),
            ]
        })
        .collect();
    table(&["limit", "rate", "burst"], &rows)
}

/// Runs an operation against the daemon and returns what to print.
///
/// # Errors
/// One line saying what the daemon refused.
pub async fn run(
    client: &Client,
    namespace: &str,
    principal: Option<&str>,
    op: AdminOp,
    output: Output,
) -> Result<String, String> {
    // A name for the audit records, sent beside the peer credentials the daemon reads itself.
    let principal = principal
        .map(|p| {
            tonic::metadata::MetadataValue::try_from(p)
                .map_err(|_| format!("--principal {p:?} is not a valid header value"))
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
                .await
                .map_err(status_text)?
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
                .await
                .map_err(status_text)?
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
                .await
                .map_err(status_text)?
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
                .await
                .map_err(status_text)?;
            (json!({ "deleted": id }), format!("deleted entity {id}"))
        }
        AdminOp::Children(id) => {
            let children = admin
                .list_children(proto::EntityRequest {
                    namespace: ns,
                    entity_id: id,
                    force: false,
                })
                .await
                .map_err(status_text)?
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
                .await
                .map_err(status_text)?;
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
                .await
                .map_err(status_text)?
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
                .await
                .map_err(status_text)?;
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
                .await
                .map_err(status_text)?
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
        AdminOp::CreateNamespace(name) => {
            admin
                .create_namespace(proto::NamespaceRequest {
                    namespace: name.clone(),
                })
                .await
                .map_err(status_text)?;
            let usable = admin
                .list_namespaces(proto::Empty {})
                .await
                .map_err(status_text)?
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
        AdminOp::ListNamespaces => {
            let names = admin
                .list_namespaces(proto::Empty {})
                .await
                .map_err(status_text)?
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
                .await
                .map_err(status_text)?;
            (
                json!({ "deleted": name }),
                format!("namespace {name} deleted"),
            )
        }
        AdminOp::Usage(mut request) => {
            request.namespace = ns;
            let snapshots = admin
                .get_usage(request)
                .await
                .map_err(status_text)?
                .into_inner()
                .snapshots;
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
