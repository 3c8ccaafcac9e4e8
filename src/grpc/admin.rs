//! The `Admin` service: entities, stored limits, audit, namespaces and usage, converted and
//! handed to the administration rules ([`crate::admin::Admin`]), with the caller's access checked
//! first: reading needs the namespace, changing needs a grant too.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::convert::{
    caller, deadline, entity_id, invalid, limits, namespace, on_unavailable, parent_id, permit,
    principal, to_proto_entity,
};
use super::status;
use crate::access::{Access, Caller};
use crate::admin::{Admin, Operated, UsageOf, UsageWindow};
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::LimitName;
use crate::domain::records::{Actor, Entity, LimitScope};
use crate::limiter::{Limiter, LimiterError};
use crate::live::Live;
use crate::proto;
use crate::store::UsageCursor;

/// The last millisecond of the year 9999: no later end of a bypass is taken.
const MAX_EPOCH_MS: i64 = 253_402_300_799_999;

/// The `Admin` service: converts, checks the caller's namespace, and calls [`Admin`].
#[derive(Debug, Clone)]
pub struct AdminService {
    limiter: Limiter,
    admin: Admin,
    live: Arc<Live>,
}

/// A changing Admin call needs a grant: `PERMISSION_DENIED` names the call, the caller and how
/// to grant it.
fn grant(access: &Access, caller: Caller, ns: &Namespace, call: Call) -> Result<(), Status> {
    match call {
        Call::Change(what) if !access.may_change(caller, ns) => {
            Err(status(LimiterError::PermissionDenied(format!(
                "{caller} may not {what} in namespace {:?}: changes need the daemon's own uid or \
                 root, or an [[access]] rule with admin = true for this caller",
                ns.as_str()
            ))))
        }
        _ => Ok(()),
    }
}

/// Whether an Admin call reads or changes: changing calls need a grant (see [`Access`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read,
    Change(&'static str),
}

impl AdminService {
    pub fn new(limiter: Limiter, live: Arc<Live>) -> Self {
        Self {
            admin: Admin::new(limiter.clone()),
            limiter,
            live,
        }
    }

    /// The request's namespace, checked against the caller's access for `call`, and its
    /// deadline.
    async fn namespace<T>(
        &self,
        req: &Request<T>,
        requested: &str,
        call: Call,
    ) -> Result<(Namespace, Instant), Status> {
        let deadline = deadline(req, self.live.request_timeout());
        let access = self.live.access();
        let ns = namespace(&self.limiter, &access, caller(req), requested, deadline).await?;
        grant(&access, caller(req), &ns, call)?;
        Ok((ns, deadline))
    }

    /// A namespace to register or delete: well formed, and one the caller may change.
    fn registry_namespace<T>(
        &self,
        req: &Request<T>,
        name: &str,
        call: Call,
    ) -> Result<Namespace, Status> {
        let ns = Namespace::new(name).map_err(|e| invalid("namespace", e))?;
        let access = self.live.access();
        permit(&access, caller(req), &ns)?;
        grant(&access, caller(req), &ns, call)?;
        Ok(ns)
    }

    fn actor<T>(&self, req: &Request<T>) -> Actor {
        Actor {
            principal: principal(req),
            at_ms: self.limiter.now_ms(),
        }
    }

    async fn scope<T>(
        &self,
        req: &Request<T>,
        ns: &str,
        scope: Option<&proto::LimitScope>,
        call: Call,
    ) -> Result<(Namespace, LimitScope, Instant), Status> {
        let (ns, deadline) = self.namespace(req, ns, call).await?;
        let scope = scope.cloned().unwrap_or_default();
        let entity = scope
            .entity_id
            .map(|e| EntityId::new(e).map_err(|e| invalid("scope.entity_id", e)))
            .transpose()?;
        let resource = scope
            .resource
            .map(|r| ResourceId::new(r).map_err(|e| invalid("scope.resource", e)))
            .transpose()?;
        let scope = match (entity, resource) {
            (Some(e), Some(r)) => LimitScope::EntityResource(e, r),
            (Some(e), None) => LimitScope::Entity(e),
            (None, Some(r)) => LimitScope::Resource(r),
            (None, None) => LimitScope::System,
        };
        Ok((ns, scope, deadline))
    }

    /// A bucket request's bucket, key, actor and deadline, checked for `what` (a change).
    async fn bucket(
        &self,
        req: &Request<proto::BucketRequest>,
        what: &'static str,
    ) -> Result<(BucketKey, Option<String>, Actor, Instant), Status> {
        let by = self.actor(req);
        let r = req.get_ref();
        let (namespace, deadline) = self
            .namespace(req, &r.namespace, Call::Change(what))
            .await?;
        let key = BucketKey {
            namespace,
            entity: entity_id("entity_id", r.entity_id.clone())?,
            resource: ResourceId::new(r.resource.clone()).map_err(|e| invalid("resource", e))?,
        };
        let once = (!r.idempotency_key.is_empty()).then(|| r.idempotency_key.clone());
        Ok((key, once, by, deadline))
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    async fn create_entity(
        &self,
        req: Request<proto::CreateEntityRequest>,
    ) -> Result<Response<proto::EntityResponse>, Status> {
        let by = self.actor(&req);
        let (ns, deadline) = self
            .namespace(
                &req,
                &req.get_ref().namespace,
                Call::Change("create entities"),
            )
            .await?;
        let e = req
            .into_inner()
            .entity
            .ok_or_else(|| invalid("entity", "is missing"))?;
        let entity = Entity {
            id: entity_id("entity.id", e.id)?,
            name: e.name,
            parent: parent_id("entity.parent_id", e.parent_id)?,
            cascade: e.cascade,
            metadata: e.metadata.into_iter().collect::<BTreeMap<_, _>>(),
        };
        self.admin
            .create_entity(&ns, &entity, &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::EntityResponse {
            entity: Some(to_proto_entity(entity)),
        }))
    }

    async fn get_entity(
        &self,
        req: Request<proto::EntityRequest>,
    ) -> Result<Response<proto::EntityResponse>, Status> {
        let (ns, deadline) = self
            .namespace(&req, &req.get_ref().namespace, Call::Read)
            .await?;
        let id = entity_id("entity_id", req.into_inner().entity_id)?;
        let entity = self
            .admin
            .entity(&ns, &id, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::EntityResponse {
            entity: Some(to_proto_entity(entity)),
        }))
    }

    async fn delete_entity(
        &self,
        req: Request<proto::EntityRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let by = self.actor(&req);
        let (ns, deadline) = self
            .namespace(
                &req,
                &req.get_ref().namespace,
                Call::Change("delete entities"),
            )
            .await?;
        let r = req.into_inner();
        let id = entity_id("entity_id", r.entity_id)?;
        self.admin
            .delete_entity(&ns, &id, r.force, &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn move_entity(
        &self,
        req: Request<proto::MoveEntityRequest>,
    ) -> Result<Response<proto::EntityResponse>, Status> {
        let by = self.actor(&req);
        let (ns, deadline) = self
            .namespace(
                &req,
                &req.get_ref().namespace,
                Call::Change("move entities"),
            )
            .await?;
        let r = req.into_inner();
        let id = entity_id("entity_id", r.entity_id)?;
        let parent = parent_id("parent_id", r.parent_id)?;
        let moved = self
            .admin
            .move_entity(&ns, &id, parent.as_ref(), &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::EntityResponse {
            entity: Some(to_proto_entity(moved)),
        }))
    }

    async fn list_children(
        &self,
        req: Request<proto::EntityRequest>,
    ) -> Result<Response<proto::ListChildrenResponse>, Status> {
        let (ns, deadline) = self
            .namespace(&req, &req.get_ref().namespace, Call::Read)
            .await?;
        let id = entity_id("entity_id", req.into_inner().entity_id)?;
        let children = self
            .admin
            .children(&ns, &id, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListChildrenResponse {
            children: children.into_iter().map(to_proto_entity).collect(),
        }))
    }

    async fn set_limits(
        &self,
        req: Request<proto::SetLimitsRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let by = self.actor(&req);
        let (ns, scope, deadline) = self
            .scope(
                &req,
                &req.get_ref().namespace,
                req.get_ref().scope.as_ref(),
                Call::Change("set limits"),
            )
            .await?;
        let limits = limits(&req.into_inner().limits)?.unwrap_or_default();
        self.admin
            .set_limits(&ns, &scope, &limits, &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn get_limits(
        &self,
        req: Request<proto::LimitsRequest>,
    ) -> Result<Response<proto::LimitsResponse>, Status> {
        let (ns, scope, deadline) = self
            .scope(
                &req,
                &req.get_ref().namespace,
                req.get_ref().scope.as_ref(),
                Call::Read,
            )
            .await?;
        let limits = self
            .admin
            .limits(&ns, &scope, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::LimitsResponse {
            limits: limits.iter().map(proto::Limit::from).collect(),
        }))
    }

    async fn delete_limits(
        &self,
        req: Request<proto::LimitsRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let by = self.actor(&req);
        let (ns, scope, deadline) = self
            .scope(
                &req,
                &req.get_ref().namespace,
                req.get_ref().scope.as_ref(),
                Call::Change("delete limits"),
            )
            .await?;
        self.admin
            .delete_limits(&ns, &scope, &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn list_audit(
        &self,
        req: Request<proto::ListAuditRequest>,
    ) -> Result<Response<proto::ListAuditResponse>, Status> {
        let (ns, deadline) = self
            .namespace(&req, &req.get_ref().namespace, Call::Read)
            .await?;
        let r = req.into_inner();
        let page = self
            .admin
            .audit(&ns, &r.subject, r.page_size, &r.page, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListAuditResponse {
            records: page
                .entries
                .into_iter()
                .map(|e| proto::AuditRecord {
                    subject: e.subject,
                    action: e.action.to_string(),
                    principal: e.principal,
                    at_ms: e.at_ms,
                    before: e.before,
                    after: e.after,
                })
                .collect(),
            next_page: page.next.unwrap_or_default(),
        }))
    }

    async fn create_namespace(
        &self,
        req: Request<proto::NamespaceRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let ns = self.registry_namespace(
            &req,
            &req.get_ref().namespace,
            Call::Change("register namespaces"),
        )?;
        let deadline = deadline(&req, self.live.request_timeout());
        self.admin
            .create_namespace(&ns, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::Empty {}))
    }

    /// Every namespace the caller may use now: the configured ones and, when the configuration
    /// admits them (`"*"`), the registered ones.
    async fn list_namespaces(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::ListNamespacesResponse>, Status> {
        let caller = caller(&req);
        let access = self.live.access();
        let deadline = deadline(&req, self.live.request_timeout());
        let usable = self.admin.namespaces(deadline).await.map_err(status)?;
        Ok(Response::new(proto::ListNamespacesResponse {
            namespaces: usable
                .into_iter()
                .filter(|ns| access.allows(caller, ns))
                .map(|ns| ns.to_string())
                .collect(),
        }))
    }

    async fn delete_namespace(
        &self,
        req: Request<proto::NamespaceRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let ns = self.registry_namespace(
            &req,
            &req.get_ref().namespace,
            Call::Change("delete namespaces"),
        )?;
        let deadline = deadline(&req, self.live.request_timeout());
        self.admin
            .delete_namespace(&ns, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn set_gate(
        &self,
        req: Request<proto::GateRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let by = self.actor(&req);
        let (ns, scope, deadline) = self
            .scope(
                &req,
                &req.get_ref().namespace,
                req.get_ref().scope.as_ref(),
                Call::Change("set gates"),
            )
            .await?;
        let until = req.get_ref().bypass_until_ms;
        let gate = proto::Gate::try_from(req.get_ref().gate)
            .ok()
            .and_then(|g| g.gate(until))
            .ok_or_else(|| {
                invalid(
                    "gate",
                    format!(
                        "{} is not ENABLED (1), DISABLED (2) or BYPASS (3); ClearGate removes one",
                        req.get_ref().gate
                    ),
                )
            })?;
        match (gate, until) {
            (crate::Gate::Bypass { .. }, Some(ms)) if !(1..=MAX_EPOCH_MS).contains(&ms) => {
                return Err(status(LimiterError::out_of_range(
                    "bypass_until_ms",
                    format!("{ms} is outside 1..={MAX_EPOCH_MS} (ms since the Unix epoch)"),
                )));
            }
            (crate::Gate::Enabled | crate::Gate::Disabled, Some(_)) => {
                return Err(invalid("bypass_until_ms", "is for a BYPASS gate only"));
            }
            _ => {}
        }
        self.admin
            .set_gate(&ns, &scope, Some(gate), &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn get_gate(
        &self,
        req: Request<proto::LimitsRequest>,
    ) -> Result<Response<proto::GateResponse>, Status> {
        let (ns, scope, deadline) = self
            .scope(
                &req,
                &req.get_ref().namespace,
                req.get_ref().scope.as_ref(),
                Call::Read,
            )
            .await?;
        let level = self
            .admin
            .level(&ns, &scope, deadline)
            .await
            .map_err(status)?;
        let bypass_until_ms = match level.gate {
            Some(crate::Gate::Bypass { until_ms }) => until_ms,
            _ => None,
        };
        Ok(Response::new(proto::GateResponse {
            gate: proto::Gate::from(level.gate).into(),
            bypass_until_ms,
        }))
    }

    async fn clear_gate(
        &self,
        req: Request<proto::LimitsRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let by = self.actor(&req);
        let (ns, scope, deadline) = self
            .scope(
                &req,
                &req.get_ref().namespace,
                req.get_ref().scope.as_ref(),
                Call::Change("clear gates"),
            )
            .await?;
        self.admin
            .set_gate(&ns, &scope, None, &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn set_cascade(
        &self,
        req: Request<proto::CascadeRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let by = self.actor(&req);
        let r = req.get_ref();
        let scope = r.scope.as_ref();
        let (ns, scope, deadline) = self
            .scope(
                &req,
                &r.namespace,
                scope,
                Call::Change("set cascade policies"),
            )
            .await?;
        let cascade = Some(req.get_ref().cascade);
        self.admin
            .set_cascade(&ns, &scope, cascade, &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn get_cascade(
        &self,
        req: Request<proto::LimitsRequest>,
    ) -> Result<Response<proto::CascadeResponse>, Status> {
        let r = req.get_ref();
        let (ns, scope, deadline) = self
            .scope(&req, &r.namespace, r.scope.as_ref(), Call::Read)
            .await?;
        let level = self.admin.level(&ns, &scope, deadline).await;
        Ok(Response::new(proto::CascadeResponse {
            cascade: level.map_err(status)?.cascade,
        }))
    }

    async fn clear_cascade(
        &self,
        req: Request<proto::LimitsRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let by = self.actor(&req);
        let r = req.get_ref();
        let scope = r.scope.as_ref();
        let (ns, scope, deadline) = self
            .scope(
                &req,
                &r.namespace,
                scope,
                Call::Change("clear cascade policies"),
            )
            .await?;
        self.admin
            .set_cascade(&ns, &scope, None, &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn set_failure_policy(
        &self,
        req: Request<proto::FailurePolicyRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let by = self.actor(&req);
        let (ns, deadline) = self
            .namespace(
                &req,
                &req.get_ref().namespace,
                Call::Change("set the failure policy"),
            )
            .await?;
        let policy =
            on_unavailable("on_unavailable", req.get_ref().on_unavailable)?.ok_or_else(|| {
                invalid(
                    "on_unavailable",
                    "is unspecified (DeleteFailurePolicy removes it)",
                )
            })?;
        self.admin
            .set_failure_policy(&ns, Some(policy), &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn get_failure_policy(
        &self,
        req: Request<proto::NamespaceRequest>,
    ) -> Result<Response<proto::FailurePolicyResponse>, Status> {
        let (ns, deadline) = self
            .namespace(&req, &req.get_ref().namespace, Call::Read)
            .await?;
        let policy = self
            .admin
            .failure_policy(&ns, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::FailurePolicyResponse {
            on_unavailable: proto::OnUnavailable::from(policy).into(),
        }))
    }

    async fn delete_failure_policy(
        &self,
        req: Request<proto::NamespaceRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let by = self.actor(&req);
        let (ns, deadline) = self
            .namespace(
                &req,
                &req.get_ref().namespace,
                Call::Change("delete the failure policy"),
            )
            .await?;
        self.admin
            .set_failure_policy(&ns, None, &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn get_usage(
        &self,
        req: Request<proto::UsageRequest>,
    ) -> Result<Response<proto::UsageResponse>, Status> {
        let (ns, deadline) = self
            .namespace(&req, &req.get_ref().namespace, Call::Read)
            .await?;
        let r = req.into_inner();
        let entity = (!r.entity_id.is_empty())
            .then(|| entity_id("entity_id", r.entity_id))
            .transpose()?;
        let resource = r
            .resource
            .map(|r| ResourceId::new(r).map_err(|e| invalid("resource", e)))
            .transpose()?;
        let page = (!r.page.is_empty())
            .then(|| UsageCursor::parse(&r.page).map_err(|e| invalid("page", e)))
            .transpose()?;
        let of = UsageOf {
            entity,
            resource,
            window: UsageWindow::new(&r.period, r.from_ms, r.to_ms).map_err(status)?,
            page_size: match r.page_size {
                0 => 100,
                n => n.min(1_000) as usize,
            },
            page,
        };
        let found = self.admin.usage(&ns, &of, deadline).await.map_err(status)?;
        Ok(Response::new(proto::UsageResponse {
            snapshots: found
                .snapshots
                .into_iter()
                .map(|u| proto::UsageSnapshot {
                    entity_id: u.entity.to_string(),
                    resource: u.resource.to_string(),
                    period: u.period.as_str().to_owned(),
                    start_ms: u.start_ms,
                    consumed_milli: u
                        .amounts
                        .into_iter()
                        .map(|(n, a)| (n.to_string(), a))
                        .collect(),
                })
                .collect(),
            next_page: found.next.map(|p| p.token()).unwrap_or_default(),
        }))
    }

    async fn list_entities_with_limits(
        &self,
        req: Request<proto::ListEntitiesWithLimitsRequest>,
    ) -> Result<Response<proto::ListEntitiesWithLimitsResponse>, Status> {
        let (ns, deadline) = self
            .namespace(&req, &req.get_ref().namespace, Call::Read)
            .await?;
        let r = req.into_inner();
        let resource = ResourceId::new(r.resource).map_err(|e| invalid("resource", e))?;
        let (ids, next) = self
            .admin
            .entities_with_limits(&ns, &resource, r.page_size, &r.page, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListEntitiesWithLimitsResponse {
            entity_ids: ids.into_iter().map(|e| e.to_string()).collect(),
            next_page: next.map(|e| e.to_string()).unwrap_or_default(),
        }))
    }

    async fn get_resource_capacity(
        &self,
        req: Request<proto::ResourceCapacityRequest>,
    ) -> Result<Response<proto::ResourceCapacityResponse>, Status> {
        let (ns, deadline) = self
            .namespace(&req, &req.get_ref().namespace, Call::Read)
            .await?;
        let r = req.into_inner();
        let resource = ResourceId::new(r.resource).map_err(|e| invalid("resource", e))?;
        let limit = LimitName::new(r.limit_name).map_err(|e| invalid("limit_name", e))?;
        let found = self
            .admin
            .resource_capacity(&ns, &resource, &limit, r.parents_only, deadline)
            .await
            .map_err(status)?;
        let total = |f: fn(&(EntityId, i64, i64)) -> i64| {
            found.iter().map(f).fold(0i64, i64::saturating_add)
        };
        Ok(Response::new(proto::ResourceCapacityResponse {
            total_capacity_milli: total(|e| e.1),
            total_available_milli: total(|e| e.2),
            entities: found
                .iter()
                .map(|(e, capacity, available)| proto::EntityCapacity {
                    entity_id: e.to_string(),
                    capacity_milli: *capacity,
                    available_milli: *available,
                })
                .collect(),
        }))
    }

    async fn list_resources_with_defaults(
        &self,
        req: Request<proto::NamespaceRequest>,
    ) -> Result<Response<proto::ListResourcesResponse>, Status> {
        let (ns, deadline) = self
            .namespace(&req, &req.get_ref().namespace, Call::Read)
            .await?;
        let resources = self
            .admin
            .resources_with_defaults(&ns, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListResourcesResponse {
            resources: resources.into_iter().map(|r| r.to_string()).collect(),
        }))
    }

    async fn reset_bucket(
        &self,
        req: Request<proto::BucketRequest>,
    ) -> Result<Response<proto::BucketResponse>, Status> {
        let (key, once, by, deadline) = self.bucket(&req, "reset buckets").await?;
        let r = req.into_inner();
        let names = r
            .limits
            .into_iter()
            .enumerate()
            .map(|(i, n)| LimitName::new(n).map_err(|e| invalid(format!("limits[{i}]"), e)))
            .collect::<Result<Vec<_>, _>>()?;
        let names = (!names.is_empty()).then_some(names);
        let operated = self
            .admin
            .reset_bucket(&key, names, once.as_deref(), &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(to_proto_operated(operated)))
    }

    async fn top_up(
        &self,
        req: Request<proto::BucketRequest>,
    ) -> Result<Response<proto::BucketResponse>, Status> {
        let (key, once, by, deadline) = self.bucket(&req, "top up buckets").await?;
        let amounts = req
            .into_inner()
            .amounts
            .into_iter()
            .map(|(n, a)| {
                let name = LimitName::new(n).map_err(|e| invalid("amounts", e))?;
                Ok((name, a))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let operated = self
            .admin
            .top_up(&key, amounts, once.as_deref(), &by, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(to_proto_operated(operated)))
    }
}

fn to_proto_operated(o: Operated) -> proto::BucketResponse {
    proto::BucketResponse {
        written: i32::try_from(o.written).unwrap_or(i32::MAX),
        gained_milli: o
            .gained_milli
            .into_iter()
            .map(|(n, g)| (n.to_string(), g))
            .collect(),
        replayed: o.replayed,
    }
}
