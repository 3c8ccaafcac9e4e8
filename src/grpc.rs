//! The tonic services: validate and convert, call the limiter or the store, convert back. No
//! limiting logic lives here. Every error goes through [`status`], the one mapping from errors to
//! gRPC codes; over-limit is a normal answer (`allowed = false`), never an error.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::access::{Access, Caller};
use crate::admin::Admin;
use crate::domain::amounts::Amounts;
use crate::domain::bucket::LimitStatus;
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::{Limit, LimitName, MAX_TOKENS, MILLI, canonical};
use crate::domain::records::{Actor, Entity, LimitScope, Period};
use crate::limiter::{AcquireRequest, Decision, LeaseId, Limiter, LimiterError};
use crate::live::Live;
use crate::proto;

/// The one mapping from errors to gRPC status codes. `UNAVAILABLE` means "retry later": an
/// outage, overload, shutdown, an actor restarting, a close not confirmed yet. A permanent store
/// failure (missing table, refused credentials, corrupt item) is `FAILED_PRECONDITION`: retrying
/// will not help until an operator acts.
pub fn status(e: LimiterError) -> Status {
    let message = e.to_string();
    let outage = e.is_outage();
    match e {
        LimiterError::InvalidArgument { .. } => Status::invalid_argument(message),
        LimiterError::OutOfRange { .. } => Status::out_of_range(message),
        LimiterError::LeaseNotFound(_) | LimiterError::NotFound(_) => Status::not_found(message),
        LimiterError::AlreadyExists(_) => Status::already_exists(message),
        LimiterError::PermissionDenied(_) => Status::permission_denied(message),
        LimiterError::FailedPrecondition(_) => Status::failed_precondition(message),
        LimiterError::Store(_) if !outage => Status::failed_precondition(message),
        LimiterError::Store(_)
        | LimiterError::Deadline
        | LimiterError::Overloaded { .. }
        | LimiterError::ShuttingDown
        | LimiterError::ActorUnavailable(_)
        | LimiterError::CloseUnconfirmed { .. } => Status::unavailable(message),
    }
}

fn invalid(field: impl Into<String>, e: impl std::fmt::Display) -> Status {
    status(LimiterError::invalid(field, e))
}

/// The deadline of a request: its own `grpc-timeout`, capped by the configured default.
pub(crate) fn deadline<T>(req: &Request<T>, default: Duration) -> Instant {
    let own = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    Instant::now() + own.map_or(default, |d| d.min(default))
}

fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3_600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The calling process's credentials when it came through the Unix socket, else its TCP peer.
pub(crate) fn caller<T>(req: &Request<T>) -> Caller {
    req.extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map_or_else(
            || Caller {
                addr: req.remote_addr(),
                ..Caller::default()
            },
            |c| Caller {
                uid: Some(c.uid()),
                gid: Some(c.gid()),
                addr: None,
            },
        )
}

/// Who is calling, for audit records: the peer's uid over the Unix socket (else the TCP peer),
/// preceded by the name the caller gives in the `zae-principal` header, if any. The name is the
/// caller's word; the uid is the kernel's.
fn principal<T>(req: &Request<T>) -> String {
    let peer = match caller(req).uid {
        Some(uid) => format!("uid:{uid}"),
        None => req
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| format!("tcp:{a}")),
    };
    let given = req
        .metadata()
        .get("zae-principal")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| n.chars().take(128).collect::<String>());
    match given {
        Some(name) => format!("{name} ({peer})"),
        None => peer,
    }
}

/// The namespace a request names, provided the caller may use it.
pub(crate) async fn namespace(
    limiter: &Limiter,
    access: &Access,
    caller: Caller,
    requested: &str,
    deadline: Instant,
) -> Result<Namespace, Status> {
    let ns = limiter
        .namespace(requested, deadline)
        .await
        .map_err(status)?;
    permit(access, caller, &ns)?;
    Ok(ns)
}

fn permit(access: &Access, caller: Caller, ns: &Namespace) -> Result<(), Status> {
    if access.allows(caller, ns) {
        Ok(())
    } else {
        Err(status(LimiterError::PermissionDenied(format!(
            "{caller} may not use namespace {:?}",
            ns.as_str()
        ))))
    }
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

fn key(namespace: Namespace, entity: &str, resource: &str) -> Result<BucketKey, Status> {
    Ok(BucketKey {
        namespace,
        entity: EntityId::new(entity).map_err(|e| invalid("entity_id", e))?,
        resource: ResourceId::new(resource).map_err(|e| invalid("resource", e))?,
    })
}

/// Whole tokens per limit name into milli-tokens; `signed` allows negative values (adjust).
fn amounts(field: &str, map: &HashMap<String, i64>, signed: bool) -> Result<Amounts, Status> {
    let pairs: Vec<(LimitName, i64)> = map
        .iter()
        .map(|(name, &tokens)| {
            let limit = LimitName::new(name.as_str()).map_err(|e| invalid(field, e))?;
            if !signed && tokens < 0 {
                return Err(invalid(
                    format!("{field}[{name}]"),
                    format!("{tokens} is negative"),
                ));
            }
            if tokens.unsigned_abs() > MAX_TOKENS {
                return Err(status(LimiterError::out_of_range(
                    format!("{field}[{name}]"),
                    format!("{tokens} is beyond the maximum of {MAX_TOKENS} tokens"),
                )));
            }
            Ok((limit, tokens * MILLI))
        })
        .collect::<Result<_, _>>()?;
    // Each name appears once in a map, so nothing is summed here.
    Amounts::new(pairs).map_err(|e| invalid(field, e))
}

fn limits(given: &[proto::Limit]) -> Result<Option<Vec<Limit>>, Status> {
    if given.is_empty() {
        return Ok(None);
    }
    let list = given
        .iter()
        .enumerate()
        .map(|(i, l)| {
            Limit::custom(
                &l.name,
                l.capacity,
                l.refill_amount,
                Duration::from_millis(l.refill_period_ms),
            )
            .map_err(|e| invalid(format!("limits[{i}]"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    canonical(list).map(Some).map_err(|e| invalid("limits", e))
}

fn to_proto_status(s: &LimitStatus) -> proto::LimitStatus {
    proto::LimitStatus {
        name: s.limit.name().to_string(),
        allowed: s.allowed(),
        available_milli: s.available,
        requested_milli: s.requested,
        retry_after_ms: s.retry_after_ms,
        limit: Some(proto::Limit::from(&s.limit)),
    }
}

fn lease_id(s: &str) -> Result<LeaseId, Status> {
    if s.is_empty() {
        return Err(invalid("lease_id", "is empty"));
    }
    s.parse().map_err(status)
}

/// The `RateLimiter` service.
#[derive(Debug, Clone)]
pub struct RateLimiterService {
    limiter: Limiter,
    live: Arc<Live>,
}

impl RateLimiterService {
    pub fn new(limiter: Limiter, live: Arc<Live>) -> Self {
        Self { limiter, live }
    }

    async fn key<T>(
        &self,
        req: &Request<T>,
        ns: &str,
        entity: &str,
        resource: &str,
        deadline: Instant,
    ) -> Result<BucketKey, Status> {
        key(
            namespace(
                &self.limiter,
                &self.live.access(),
                caller(req),
                ns,
                deadline,
            )
            .await?,
            entity,
            resource,
        )
    }

    /// A lease id the caller may use. A lease opened by another caller (another uid, another TCP
    /// connection) is `NOT_FOUND`, exactly as an unknown id: its existence is not disclosed.
    fn lease<T>(&self, req: &Request<T>, id: &str) -> Result<LeaseId, Status> {
        let lease = lease_id(id)?;
        if let Some((ns, owner)) = self.limiter.lease_owner(lease) {
            let caller = caller(req);
            if !owner.admits(caller) {
                return Err(status(LimiterError::LeaseNotFound(lease.to_string())));
            }
            permit(&self.live.access(), caller, &ns)?;
        }
        Ok(lease)
    }
}

#[tonic::async_trait]
impl proto::rate_limiter_server::RateLimiter for RateLimiterService {
    async fn acquire(
        &self,
        req: Request<proto::AcquireRequest>,
    ) -> Result<Response<proto::AcquireResponse>, Status> {
        let deadline = deadline(&req, self.live.request_timeout());
        let r = req.get_ref();
        let key = self
            .key(&req, &r.namespace, &r.entity_id, &r.resource, deadline)
            .await?;
        let owner = caller(&req).owner();
        let r = req.into_inner();
        let request = AcquireRequest {
            key,
            amounts: amounts("consume", &r.consume, false)?,
            limits: limits(&r.limits)?,
            lease: !r.commit,
            owner,
        };
        let decision = self
            .limiter
            .acquire(request, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(match decision {
            Decision::Admitted { lease, statuses } => proto::AcquireResponse {
                allowed: true,
                lease_ttl_ms: match lease {
                    Some(_) => u64::try_from(self.limiter.settings().lease_ttl_ms).unwrap_or(0),
                    None => 0,
                },
                lease_id: lease.map(|l| l.to_string()).unwrap_or_default(),
                statuses: statuses.iter().map(to_proto_status).collect(),
                retry_after_ms: None,
                refused_by: String::new(),
            },
            Decision::Rejected {
                rejection,
                refused_by,
            } => proto::AcquireResponse {
                allowed: false,
                lease_id: String::new(),
                statuses: rejection.statuses.iter().map(to_proto_status).collect(),
                retry_after_ms: rejection.retry_after_ms(),
                refused_by: refused_by.map(|e| e.to_string()).unwrap_or_default(),
                lease_ttl_ms: 0,
            },
        }))
    }

    async fn adjust(
        &self,
        req: Request<proto::AdjustRequest>,
    ) -> Result<Response<proto::LeaseResponse>, Status> {
        let deadline = deadline(&req, self.live.request_timeout());
        let lease = self.lease(&req, &req.get_ref().lease_id)?;
        let r = req.into_inner();
        let delta = amounts("delta", &r.delta, true)?;
        self.limiter
            .adjust(lease, delta, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::LeaseResponse {}))
    }

    async fn commit(
        &self,
        req: Request<proto::LeaseRequest>,
    ) -> Result<Response<proto::LeaseResponse>, Status> {
        let deadline = deadline(&req, self.live.request_timeout());
        let lease = self.lease(&req, &req.get_ref().lease_id)?;
        self.limiter.commit(lease, deadline).await.map_err(status)?;
        Ok(Response::new(proto::LeaseResponse {}))
    }

    async fn rollback(
        &self,
        req: Request<proto::LeaseRequest>,
    ) -> Result<Response<proto::LeaseResponse>, Status> {
        let deadline = deadline(&req, self.live.request_timeout());
        let lease = self.lease(&req, &req.get_ref().lease_id)?;
        self.limiter
            .rollback(lease, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::LeaseResponse {}))
    }

    async fn renew(
        &self,
        req: Request<proto::LeaseRequest>,
    ) -> Result<Response<proto::LeaseResponse>, Status> {
        let deadline = deadline(&req, self.live.request_timeout());
        let lease = self.lease(&req, &req.get_ref().lease_id)?;
        self.limiter.renew(lease, deadline).await.map_err(status)?;
        Ok(Response::new(proto::LeaseResponse {}))
    }

    async fn available(
        &self,
        req: Request<proto::AvailableRequest>,
    ) -> Result<Response<proto::AvailableResponse>, Status> {
        let deadline = deadline(&req, self.live.request_timeout());
        let r = req.get_ref();
        let key = self
            .key(&req, &r.namespace, &r.entity_id, &r.resource, deadline)
            .await?;
        let r = req.into_inner();
        let statuses = self
            .limiter
            .peek(key, limits(&r.limits)?, Amounts::default(), deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::AvailableResponse {
            statuses: statuses.iter().map(to_proto_status).collect(),
        }))
    }

    async fn time_until_available(
        &self,
        req: Request<proto::TimeUntilAvailableRequest>,
    ) -> Result<Response<proto::TimeUntilAvailableResponse>, Status> {
        let deadline = deadline(&req, self.live.request_timeout());
        let r = req.get_ref();
        let key = self
            .key(&req, &r.namespace, &r.entity_id, &r.resource, deadline)
            .await?;
        let r = req.into_inner();
        let want = amounts("consume", &r.consume, false)?;
        let statuses = self
            .limiter
            .peek(key, limits(&r.limits)?, want, deadline)
            .await
            .map_err(status)?;
        let retry_after_ms = statuses
            .iter()
            .map(|s| s.retry_after_ms)
            .try_fold(0, |acc, w| w.map(|w| acc.max(w)));
        Ok(Response::new(proto::TimeUntilAvailableResponse {
            retry_after_ms,
            statuses: statuses.iter().map(to_proto_status).collect(),
        }))
    }
}

/// The `Admin` service: converts, checks the caller's namespace, and calls [`Admin`].
#[derive(Debug, Clone)]
pub struct AdminService {
    limiter: Limiter,
    admin: Admin,
    live: Arc<Live>,
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
}

fn to_proto_entity(e: Entity) -> proto::Entity {
    proto::Entity {
        id: e.id.to_string(),
        name: e.name,
        parent_id: e.parent.map(|p| p.to_string()),
        cascade: e.cascade,
        metadata: e.metadata.into_iter().collect(),
    }
}

fn entity_id(field: &str, id: String) -> Result<EntityId, Status> {
    EntityId::new(id).map_err(|e| invalid(field, e))
}

fn parent_id(field: &str, id: Option<String>) -> Result<Option<EntityId>, Status> {
    id.filter(|p| !p.is_empty())
        .map(|p| entity_id(field, p))
        .transpose()
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
        let page_size = match r.page_size {
            0 => 50,
            n => n.min(1_000) as usize,
        };
        let after = (!r.page.is_empty()).then_some(r.page.as_str());
        let page = self
            .admin
            .audit(&ns, &r.subject, page_size, after, deadline)
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
        let settings = self.limiter.settings();
        let mut usable = settings.namespaces.clone();
        if settings.registered {
            for ns in self.admin.namespaces(deadline).await.map_err(status)? {
                if !usable.contains(&ns) {
                    usable.push(ns);
                }
            }
        }
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

    async fn get_usage(
        &self,
        req: Request<proto::UsageRequest>,
    ) -> Result<Response<proto::UsageResponse>, Status> {
        let (ns, deadline) = self
            .namespace(&req, &req.get_ref().namespace, Call::Read)
            .await?;
        let r = req.into_inner();
        let entity = entity_id("entity_id", r.entity_id)?;
        let resource = r
            .resource
            .map(|r| ResourceId::new(r).map_err(|e| invalid("resource", e)))
            .transpose()?;
        let period = match r.period.as_str() {
            "" | "hour" => Period::Hour,
            "day" => Period::Day,
            other => return Err(invalid("period", format!("{other:?} is not hour or day"))),
        };
        let (from, to) = match (r.from_ms, r.to_ms) {
            (0, 0) => {
                let now = self.limiter.now_ms();
                (now - 86_400_000, now + 1)
            }
            (from, 0) => (from, i64::MAX),
            range => range,
        };
        let snapshots = self
            .admin
            .usage(&ns, &entity, resource.as_ref(), period, from, to, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::UsageResponse {
            snapshots: snapshots
                .into_iter()
                .map(|u| proto::UsageSnapshot {
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
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn bad_amounts_name_the_field() {
        let map = HashMap::from([("rpm".to_owned(), -1)]);
        let err = amounts("consume", &map, false).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("consume[rpm]: -1 is negative"),
            "{}",
            err.message()
        );
        let map = HashMap::from([("rpm".to_owned(), i64::MAX)]);
        assert!(
            amounts("delta", &map, true)
                .unwrap_err()
                .message()
                .contains("delta[rpm]")
        );
        let map = HashMap::from([("bad name".to_owned(), 1)]);
        assert!(
            amounts("consume", &map, false)
                .unwrap_err()
                .message()
                .starts_with("consume: ")
        );
    }
}
