//! Conversions between the wire and the domain: request fields into validated values (an
//! invalid one is `INVALID_ARGUMENT` or `OUT_OF_RANGE` naming the field), domain values into
//! answers, and what every call carries: its deadline, its caller, the namespace it may use.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Request, Status};

use super::status;
use crate::access::{Access, Caller};
use crate::domain::amounts::Amounts;
use crate::domain::bucket::LimitStatus;
use crate::domain::calendar::Calendar;
use crate::domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
use crate::domain::limit::{Limit, LimitName, MAX_TOKENS, MILLI, canonical};
use crate::domain::records::{Entity, FailurePolicy};
use crate::domain::schedule::Schedule;
use crate::limiter::{LeaseId, Limiter, LimiterError};
use crate::proto;

pub(super) fn invalid(field: impl Into<String>, e: impl std::fmt::Display) -> Status {
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

pub(super) fn parse_grpc_timeout(v: &str) -> Option<Duration> {
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
pub(super) fn principal<T>(req: &Request<T>) -> String {
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

pub(super) fn permit(access: &Access, caller: Caller, ns: &Namespace) -> Result<(), Status> {
    if access.allows(caller, ns) {
        Ok(())
    } else {
        Err(status(LimiterError::PermissionDenied(format!(
            "{caller} may not use namespace {:?}",
            ns.as_str()
        ))))
    }
}

pub(super) fn key(namespace: Namespace, entity: &str, resource: &str) -> Result<BucketKey, Status> {
    Ok(BucketKey {
        namespace,
        entity: EntityId::new(entity).map_err(|e| invalid("entity_id", e))?,
        resource: ResourceId::new(resource).map_err(|e| invalid("resource", e))?,
    })
}

/// Whole tokens per limit name into milli-tokens; `signed` allows negative values (adjust).
pub(super) fn amounts(
    field: &str,
    map: &HashMap<String, i64>,
    signed: bool,
) -> Result<Amounts, Status> {
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

/// A call's failure policy (`None`: unspecified, the namespace's or the daemon's applies).
pub(super) fn on_unavailable(field: &str, value: i32) -> Result<Option<FailurePolicy>, Status> {
    match proto::OnUnavailable::try_from(value) {
        Ok(known) => Ok(known.policy()),
        Err(_) => Err(invalid(
            field,
            format!("{value} is not a failure policy (1: BLOCK, 2: ALLOW)"),
        )),
    }
}

pub(super) fn limits(given: &[proto::Limit]) -> Result<Option<Vec<Limit>>, Status> {
    if given.is_empty() {
        return Ok(None);
    }
    let list = given
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let field = || format!("limits[{i}]");
            let session = l.quota_reset_after_ms;
            let limit = if session > 0 {
                if (l.refill_amount, l.refill_period_ms) != (0, 0) || !l.quota_cron.is_empty() {
                    return Err(invalid(
                        field(),
                        "a session quota neither drips nor has a calendar: leave refill_amount, \
                         refill_period_ms and quota_cron empty",
                    ));
                }
                Limit::session_quota(&l.name, l.capacity, Duration::from_millis(session))
            } else if l.quota_cron.is_empty() && l.quota_tz.is_empty() {
                Limit::custom(
                    &l.name,
                    l.capacity,
                    l.refill_amount,
                    Duration::from_millis(l.refill_period_ms),
                )
            } else {
                if (l.refill_amount, l.refill_period_ms) != (0, 0) {
                    return Err(invalid(
                        field(),
                        "a quota does not drip: leave refill_amount and refill_period_ms at 0",
                    ));
                }
                let tz = if l.quota_tz.is_empty() {
                    "UTC"
                } else {
                    &l.quota_tz
                };
                let calendar = Calendar::new(&l.quota_cron, tz)
                    .map_err(|e| invalid(format!("{}.quota_cron", field()), e))?;
                Limit::quota(&l.name, l.capacity, calendar)
            };
            let limit = limit.map(|limit| limit.with_soft(l.soft)).map_err(|e| {
                let at = if e.is_about_name() {
                    format!("{}.name", field())
                } else {
                    field()
                };
                invalid(at, e)
            })?;
            match schedule(&field(), l)? {
                None => Ok(limit),
                Some(s) => limit
                    .with_schedule(s)
                    .map_err(|e| invalid(format!("{}.schedule", field()), e)),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    canonical(list).map(Some).map_err(|e| invalid("limits", e))
}

/// A wire limit's schedule (`None`: it has none).
fn schedule(field: &str, l: &proto::Limit) -> Result<Option<Schedule>, Status> {
    if l.schedule.is_empty() {
        if !l.schedule_tz.is_empty() {
            return Err(invalid(
                format!("{field}.schedule_tz"),
                "a time zone without a schedule",
            ));
        }
        return Ok(None);
    }
    if let Some(j) = l
        .schedule
        .iter()
        .position(proto::ScheduleEntry::scales_and_sets)
    {
        return Err(invalid(
            format!("{field}.schedule[{j}]"),
            "give scale_permille or the values it sets (capacity, refill_amount, \
             refill_period_ms), not both",
        ));
    }
    let entries: Vec<_> = l
        .schedule
        .iter()
        .map(|e| (e.cron.clone(), e.change()))
        .collect();
    let tz = if l.schedule_tz.is_empty() {
        "UTC"
    } else {
        &l.schedule_tz
    };
    Schedule::new(&entries, tz)
        .map(Some)
        .map_err(|e| invalid(format!("{field}.schedule"), e))
}

pub(super) fn to_proto_status(s: &LimitStatus) -> proto::LimitStatus {
    proto::LimitStatus {
        name: s.limit.name().to_string(),
        allowed: s.allowed(),
        available_milli: s.available,
        requested_milli: s.requested,
        retry_after_ms: s.retry_after_ms,
        limit: Some(proto::Limit::from(&s.limit)),
        soft: s.limit.is_soft(),
        overdrawn: s.overdrawn(),
        resource: String::new(),
        resets_at_ms: s.resets_at_ms,
        in_force: s.in_force.as_ref().map(proto::Limit::from),
    }
}

pub(super) fn lease_id(s: &str) -> Result<LeaseId, Status> {
    if s.is_empty() {
        return Err(invalid("lease_id", "is empty"));
    }
    s.parse().map_err(status)
}

pub(super) fn to_proto_entity(e: Entity) -> proto::Entity {
    proto::Entity {
        id: e.id.to_string(),
        name: e.name,
        parent_id: e.parent.map(|p| p.to_string()),
        cascade: e.cascade,
        metadata: e.metadata.into_iter().collect(),
    }
}

pub(super) fn entity_id(field: &str, id: String) -> Result<EntityId, Status> {
    EntityId::new(id).map_err(|e| invalid(field, e))
}

pub(super) fn parent_id(field: &str, id: Option<String>) -> Result<Option<EntityId>, Status> {
    id.filter(|p| !p.is_empty())
        .map(|p| entity_id(field, p))
        .transpose()
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
