//! The `RateLimiter` service: acquire, lease calls and availability, converted and handed to
//! the limiter.

use std::sync::Arc;

use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::convert::{
    amounts, caller, deadline, invalid, key, lease_id, limits, namespace, on_unavailable, permit,
    to_proto_status,
};
use super::status;
use crate::domain::amounts::Amounts;
use crate::domain::ids::{BucketKey, ResourceId};
use crate::limiter::{AcquireRequest, Decision, Joint, LeaseId, Limiter, LimiterError};
use crate::live::Live;
use crate::proto;

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

    /// The lease's time to live, for an admission with a lease (else 0).
    fn lease_ttl_ms(&self, decision: &Decision) -> u64 {
        match decision {
            Decision::Admitted { lease: Some(_), .. } => {
                u64::try_from(self.limiter.settings().lease_ttl_ms).unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// The answer to an acquire with `also`: every resource's statuses, each naming its
    /// resource; admitted, the leases (the first resource's as `lease_id`); refused, the first
    /// refused resource, the longest wait over the refused ones (none when one can never fit)
    /// and the cascade parent that refused it.
    fn joint_response(&self, resources: &[String], joint: Joint) -> proto::AcquireResponse {
        let mut answer = proto::AcquireResponse {
            allowed: joint.admitted,
            ..Default::default()
        };
        let mut waits = Vec::new();
        for (i, (decision, resource)) in joint.decisions.iter().zip(resources).enumerate() {
            let statuses = match decision {
                Decision::Admitted {
                    lease,
                    statuses,
                    bypassed,
                } => {
                    answer.bypassed |= bypassed;
                    if *bypassed {
                        answer.bypassed_resources.push(resource.clone());
                    }
                    if let Some(lease) = lease {
                        if i == 0 {
                            answer.lease_id = lease.to_string();
                            answer.lease_ttl_ms = self.lease_ttl_ms(decision);
                        } else {
                            answer.also.push(proto::ResourceLease {
                                resource: resource.clone(),
                                lease_id: lease.to_string(),
                            });
                        }
                    }
                    statuses
                }
                Decision::Rejected {
                    rejection,
                    refused_by,
                } => {
                    waits.push(rejection.retry_after_ms());
                    if answer.refused_resource.is_empty() {
                        answer.refused_resource = resource.clone();
                        answer.refused_by = refused_by
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default();
                    }
                    &rejection.statuses
                }
            };
            answer
                .statuses
                .extend(statuses.iter().map(|s| proto::LimitStatus {
                    resource: resource.clone(),
                    ..to_proto_status(s)
                }));
        }
        // The longest wait over the refused resources; none when one of them can never fit.
        answer.retry_after_ms = waits
            .iter()
            .copied()
            .collect::<Option<Vec<u64>>>()
            .and_then(|w| w.into_iter().max());
        answer
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
            on_unavailable: on_unavailable("on_unavailable", r.on_unavailable)?,
        };
        if r.also.is_empty() {
            let decision = self
                .limiter
                .acquire(request, deadline)
                .await
                .map_err(status)?;
            let lease_ttl_ms = self.lease_ttl_ms(&decision);
            return Ok(Response::new(match decision {
                Decision::Admitted {
                    lease,
                    statuses,
                    bypassed,
                } => proto::AcquireResponse {
                    allowed: true,
                    bypassed,
                    lease_ttl_ms,
                    lease_id: lease.map(|l| l.to_string()).unwrap_or_default(),
                    statuses: statuses.iter().map(to_proto_status).collect(),
                    ..Default::default()
                },
                Decision::Rejected {
                    rejection,
                    refused_by,
                } => proto::AcquireResponse {
                    allowed: false,
                    statuses: rejection.statuses.iter().map(to_proto_status).collect(),
                    retry_after_ms: rejection.retry_after_ms(),
                    refused_by: refused_by.map(|e| e.to_string()).unwrap_or_default(),
                    ..Default::default()
                },
            }));
        }
        let also = r
            .also
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let resource = ResourceId::new(&a.resource)
                    .map_err(|e| invalid(format!("also[{i}].resource"), e))?;
                Ok((
                    resource,
                    amounts(&format!("also[{i}].consume"), &a.consume, false)?,
                ))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let resources: Vec<String> = std::iter::once(&request.key.resource)
            .chain(also.iter().map(|(r, _)| r))
            .map(ToString::to_string)
            .collect();
        let joint = self
            .limiter
            .acquire_resources(request, also, deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(self.joint_response(&resources, joint)))
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
        let delta = amounts("delta", &req.get_ref().delta, true)?;
        self.limiter
            .commit_adjusted(lease, delta, deadline)
            .await
            .map_err(status)?;
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
        let bypassed = self.limiter.bypassed(&key, deadline);
        let statuses = self
            .limiter
            .peek(key.clone(), limits(&r.limits)?, want, deadline);
        let (bypassed, statuses) = futures_util::future::join(bypassed, statuses).await;
        let (bypassed, statuses) = (bypassed.map_err(status)?, statuses.map_err(status)?);
        let retry_after_ms = if bypassed {
            Some(0)
        } else {
            statuses
                .iter()
                .map(|s| s.retry_after_ms)
                .try_fold(0, |acc, w| w.map(|w| acc.max(w)))
        };
        Ok(Response::new(proto::TimeUntilAvailableResponse {
            retry_after_ms,
            statuses: statuses.iter().map(to_proto_status).collect(),
            bypassed,
        }))
    }
}
