//! Envoy's rate limit service (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`):
//! a thin translation onto the limiter, as the RateLimiter service is.
//!
//! Each descriptor is matched against the configured rules ([`rules`]); a matched descriptor is an
//! acquire of its rule's hit limits for the entity and resource its entries name. A request is
//! decided all or nothing by the limiter ([`Limiter::acquire_all`]): if a non-shadow descriptor is
//! refused, nothing is charged; otherwise all are committed. Descriptors
//! no rule matches are allowed. When the store cannot decide, the limiter's failure policy answers
//! (block: `UNAVAILABLE`, for Envoy's own `failure_mode_deny` to decide; allow: admitted), within
//! the request's deadline either way.

pub mod rules;

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::envoy::r#type::v3::RateLimitUnit;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::access::Access;
use crate::domain::bucket::LimitStatus;
use crate::domain::ids::BucketKey;
use crate::domain::limit::{Limit, MILLI};
use crate::grpc::{caller, deadline, namespace, status};
use crate::limiter::{AcquireRequest, Decision, Limiter, LimiterError, Part};
use crate::live::Live;
use crate::metrics::{self as m, envoy_outcome};
use rules::{HeaderStyle, Override, Planned, Rules};

/// Bad input naming its field (see [`crate::grpc::status`]).
fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Status {
    status(LimiterError::invalid(field, message))
}

/// Most descriptors one request may carry.
pub const MAX_DESCRIPTORS: usize = 64;

/// The `RateLimitService`.
#[derive(Debug, Clone)]
pub struct RlsService {
    limiter: Limiter,
    live: Arc<Live>,
}

/// How one matched descriptor was decided, with the statuses of its limits.
enum Outcome {
    Admitted(Vec<LimitStatus>),
    Refused(Vec<LimitStatus>),
}

impl RlsService {
    pub fn new(limiter: Limiter, live: Arc<Live>) -> Self {
        Self { limiter, live }
    }

    /// Validates the request and plans each descriptor (`None`: no rule matched).
    fn plan<'r>(
        rules: &'r Rules,
        r: &RateLimitRequest,
    ) -> Result<Vec<Option<Planned<'r>>>, Status> {
        if r.domain.is_empty() {
            return Err(invalid("domain", "is empty"));
        }
        if r.descriptors.is_empty() {
            return Err(invalid("descriptors", "none given"));
        }
        if r.descriptors.len() > MAX_DESCRIPTORS {
            return Err(invalid(
                "descriptors",
                format!("{} given, at most {MAX_DESCRIPTORS}", r.descriptors.len()),
            ));
        }
        let request_hits = if r.hits_addend == 0 {
            1
        } else {
            u64::from(r.hits_addend)
        };
        r.descriptors
            .iter()
            .enumerate()
            .map(|(i, d)| Self::plan_one(rules, &r.domain, i, d, request_hits))
            .collect()
    }

    fn plan_one<'r>(
        rules: &'r Rules,
        domain: &str,
        i: usize,
        d: &RateLimitDescriptor,
        request_hits: u64,
    ) -> Result<Option<Planned<'r>>, Status> {
        let field = |f: &str| format!("descriptors[{i}].{f}");
        if d.entries.is_empty() {
            return Err(invalid(field("entries"), "none given"));
        }
        if let Some(j) = d.entries.iter().position(|e| e.key.is_empty()) {
            return Err(invalid(field(&format!("entries[{j}].key")), "is empty"));
        }
        if d.is_negative_hits {
            return Err(invalid(
                field("is_negative_hits"),
                "not supported (give back through a lease of the RateLimiter service)",
            ));
        }
        let limit_override = d
            .limit
            .as_ref()
            .map(|o| limit_override(o.requests_per_unit, o.unit))
            .transpose()
            .map_err(|e| invalid(field("limit"), e))?;
        let hits = d.hits_addend.as_ref().map_or(request_hits, |h| h.value);
        let entries: Vec<(&str, &str)> = d
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        rules
            .plan(domain, &entries, limit_override, hits)
            .map_err(|e| {
                let field = field(&e.field);
                status(if e.out_of_range {
                    LimiterError::out_of_range(field, e.message)
                } else {
                    LimiterError::invalid(field, e.message)
                })
            })
    }

    /// The acquire of a matched descriptor, in its rule's namespace (checked against the
    /// caller's access); a shadow rule's does not refuse the request.
    async fn part(
        &self,
        caller: crate::access::Caller,
        access: &Access,
        planned: &Planned<'_>,
        deadline: Instant,
    ) -> Result<Part, Status> {
        let ns = namespace(
            &self.limiter,
            access,
            caller,
            &planned.rule.namespace,
            deadline,
        )
        .await?;
        let request = AcquireRequest {
            key: BucketKey {
                namespace: ns,
                entity: planned.entity.clone(),
                resource: planned.resource.clone(),
            },
            amounts: planned.amounts.clone(),
            limits: planned.limits.clone(),
            lease: false,
            owner: crate::limiter::Owner::InProcess,
            on_unavailable: None,
        };
        Ok(Part {
            request,
            binding: !planned.rule.shadow,
        })
    }
}

#[tonic::async_trait]
impl RateLimitService for RlsService {
    async fn should_rate_limit(
        &self,
        req: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let deadline = deadline(&req, self.live.request_timeout());
        let caller = caller(&req);
        let (rules, access) = (self.live.envoy(), self.live.access());
        let r = req.into_inner();
        let plans = Self::plan(&rules, &r)?;
        let access = &*access;
        let matched: Vec<&Planned<'_>> = plans.iter().flatten().collect();
        let parts = futures_util::future::try_join_all(
            matched
                .iter()
                .map(|planned| self.part(caller, access, planned, deadline)),
        )
        .await?;

        let domain_label = if rules.knows_domain(&r.domain) {
            r.domain.clone()
        } else {
            "other".to_owned()
        };
        let count = |rule: &str, outcome: &'static str| {
            metrics::counter!(m::ENVOY_DESCRIPTORS, "domain" => domain_label.clone(),
                "rule" => rule.to_owned(), "outcome" => outcome)
            .increment(1);
        };
        let joint = match self.limiter.acquire_all(parts, deadline).await {
            Ok(joint) => joint,
            // Envoy lets a request through when its rate limit service fails (unless
            // `failure_mode_deny`): a disabled resource is an answer, OVER_LIMIT, not an error.
            Err(LimiterError::Disabled { .. }) => {
                for p in &matched {
                    count(&p.rule.name, envoy_outcome::DISABLED);
                }
                let code = |matched: bool| if matched { Code::OverLimit } else { Code::Ok };
                return Ok(Response::new(RateLimitResponse {
                    overall_code: Code::OverLimit as i32,
                    statuses: plans
                        .iter()
                        .map(|p| DescriptorStatus {
                            code: code(p.is_some()) as i32,
                            ..DescriptorStatus::default()
                        })
                        .collect(),
                    ..RateLimitResponse::default()
                }));
            }
            Err(e) => {
                for p in &matched {
                    count(&p.rule.name, envoy_outcome::UNAVAILABLE);
                }
                return Err(status(e));
            }
        };
        let refused = !joint.admitted;
        let mut decided = joint.decisions.into_iter();
        let decisions: Vec<Option<Outcome>> = plans
            .iter()
            .map(|p| {
                p.as_ref().map(|_| {
                    match decided.next().expect("one decision per matched descriptor") {
                        Decision::Admitted { statuses, .. } => Outcome::Admitted(statuses),
                        Decision::Rejected { rejection, .. } => {
                            Outcome::Refused(rejection.statuses)
                        }
                    }
                })
            })
            .collect();

        let mut statuses = Vec::with_capacity(plans.len());
        let mut headers: Vec<HeaderValue> = Vec::new();
        let mut tightest: Option<Shown> = None;
        let mut longest_wait_ms: Option<u64> = None;
        let now = self.limiter.now_ms();
        for (plan, decision) in plans.iter().zip(decisions) {
            let (Some(plan), Some(decision)) = (plan, decision) else {
                count("none", envoy_outcome::UNMATCHED);
                statuses.push(DescriptorStatus {
                    code: Code::Ok as i32,
                    ..DescriptorStatus::default()
                });
                continue;
            };
            let rule = &plan.rule.name;
            let over_limit = matches!(decision, Outcome::Refused(_)) && !plan.rule.shadow;
            let status = match decision {
                Outcome::Admitted(s) => {
                    count(
                        rule,
                        if refused {
                            envoy_outcome::ROLLED_BACK
                        } else {
                            envoy_outcome::OK
                        },
                    );
                    shown(plan, &s, true, now)
                }
                Outcome::Refused(s) if plan.rule.shadow => {
                    count(rule, envoy_outcome::SHADOW_REFUSED);
                    shown(plan, &s, false, now).map(|mut sh| {
                        sh.over_limit = false;
                        sh
                    })
                }
                Outcome::Refused(s) => {
                    count(rule, envoy_outcome::OVER_LIMIT);
                    shown(plan, &s, false, now)
                }
            };
            let Some(shown) = status else {
                // No statuses: admitted by the failure policy.
                statuses.push(DescriptorStatus {
                    code: if over_limit {
                        Code::OverLimit
                    } else {
                        Code::Ok
                    } as i32,
                    ..DescriptorStatus::default()
                });
                continue;
            };
            if shown.over_limit {
                longest_wait_ms = Some(longest_wait_ms.unwrap_or(0).max(shown.reset_ms));
            }
            statuses.push(shown.status());
            // Shadow rules stay invisible to clients: no headers from them.
            if !plan.rule.shadow
                && tightest
                    .as_ref()
                    .is_none_or(|t| shown.remaining < t.remaining)
            {
                tightest = Some(shown);
            }
        }
        if let Some(t) = &tightest {
            headers.extend(t.headers(rules.headers));
        }
        if refused {
            let seconds = longest_wait_ms.unwrap_or(0).div_ceil(1_000).max(1);
            headers.push(header("retry-after", seconds.to_string()));
        }
        Ok(Response::new(RateLimitResponse {
            overall_code: if refused { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            response_headers_to_add: headers,
            ..RateLimitResponse::default()
        }))
    }
}

/// A descriptor's limit override as a period.
fn limit_override(requests_per_unit: u32, unit: i32) -> Result<Override, String> {
    const DAY: u64 = 86_400_000;
    let period_ms = match RateLimitUnit::try_from(unit) {
        Ok(RateLimitUnit::Second) => 1_000,
        Ok(RateLimitUnit::Minute) => 60_000,
        Ok(RateLimitUnit::Hour) => 3_600_000,
        Ok(RateLimitUnit::Day) => DAY,
        Ok(RateLimitUnit::Month) => 30 * DAY,
        Ok(RateLimitUnit::Year) => 365 * DAY,
        _ => return Err(format!("unit {unit} is not a known time unit")),
    };
    if requests_per_unit == 0 {
        return Err("requests_per_unit is 0".into());
    }
    Ok(Override {
        requests_per_unit: u64::from(requests_per_unit),
        period: Duration::from_millis(period_ms),
    })
}

/// What a descriptor's status shows: its governing limit.
struct Shown {
    limit: Limit,
    over_limit: bool,
    /// Whole tokens left after this decision.
    remaining: i64,
    /// Over limit: until the request would fit; else: until the bucket is full again.
    reset_ms: u64,
}

/// The governing limit among the descriptor's hit limits: over limit, the violated one with the
/// longest wait (a violated limit is always one the request asked of); else the one with the
/// fewest tokens left. `None` without statuses (failed open).
fn shown(plan: &Planned<'_>, statuses: &[LimitStatus], admitted: bool, now: i64) -> Option<Shown> {
    if !admitted {
        let s = statuses
            .iter()
            .filter(|s| !s.allowed())
            .max_by_key(|s| s.retry_after_ms.unwrap_or(u64::MAX))?;
        let reset_ms = s
            .retry_after_ms
            .unwrap_or_else(|| until_full(s.current(), s.available, now));
        return Some(Shown {
            limit: s.current().clone(),
            over_limit: true,
            remaining: s.available.div_euclid(MILLI).max(0),
            reset_ms,
        });
    }
    let hit = |s: &&LimitStatus| plan.amounts.iter().any(|(n, _)| n == s.limit.name());
    let s = statuses
        .iter()
        .filter(hit)
        .min_by_key(|s| s.available.saturating_sub(s.requested))?;
    let left = s.available.saturating_sub(s.requested);
    Some(Shown {
        limit: s.current().clone(),
        over_limit: false,
        remaining: left.div_euclid(MILLI).max(0),
        reset_ms: until_full(s.current(), left, now),
    })
}

/// Milliseconds until a bucket holding `balance` milli-tokens refills to its capacity (a quota:
/// at its calendar's next edge after `now`).
fn until_full(limit: &Limit, balance: i64, now: i64) -> u64 {
    let missing = i128::from(limit.capacity()) - i128::from(balance);
    if missing <= 0 {
        return 0;
    }
    if let Some(calendar) = limit.calendar() {
        let edge = calendar.next_edge(now).unwrap_or(i64::MAX);
        return u64::try_from(edge.saturating_sub(now)).unwrap_or(0);
    }
    if let Some(window) = limit.session_ms() {
        // The open window ends within its length (the status does not say when).
        return u64::try_from(window).unwrap_or(0);
    }
    let amount = i128::from(limit.refill_amount());
    let ms = (missing * i128::from(limit.refill_period_ms()) + amount - 1) / amount;
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// A limit's rate in Envoy's terms: its own period when that is a unit, else the first unit in
/// which the rate is a whole number (a day at the most, rounded down).
fn rate(limit: &Limit) -> (u32, Unit) {
    if limit.quota_kind().is_some() {
        // A quota has no rate: its amount, per the longest unit Envoy knows.
        let amount = limit.capacity() / MILLI;
        return (u32::try_from(amount).unwrap_or(u32::MAX), Unit::Day);
    }
    const UNITS: [(Unit, i64); 4] = [
        (Unit::Second, 1_000),
        (Unit::Minute, 60_000),
        (Unit::Hour, 3_600_000),
        (Unit::Day, 86_400_000),
    ];
    let amount = i128::from(limit.refill_amount());
    let period = i128::from(limit.refill_period_ms());
    let per = |unit_ms: i64| amount * i128::from(unit_ms) / period / i128::from(MILLI);
    let exact = |unit_ms: i64| (amount * i128::from(unit_ms)) % (period * i128::from(MILLI)) == 0;
    let (unit, unit_ms) = UNITS
        .iter()
        .find(|(_, ms)| i128::from(*ms) == period)
        .or_else(|| UNITS.iter().find(|(_, ms)| exact(*ms)))
        .unwrap_or(&UNITS[3]);
    (u32::try_from(per(*unit_ms)).unwrap_or(u32::MAX), *unit)
}

impl Shown {
    fn status(&self) -> DescriptorStatus {
        let (requests_per_unit, unit) = rate(&self.limit);
        DescriptorStatus {
            code: if self.over_limit {
                Code::OverLimit
            } else {
                Code::Ok
            } as i32,
            current_limit: Some(RateLimit {
                name: self.limit.name().to_string(),
                requests_per_unit,
                unit: unit as i32,
            }),
            limit_remaining: u32::try_from(self.remaining).unwrap_or(u32::MAX),
            duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: i64::try_from(self.reset_ms / 1_000).unwrap_or(i64::MAX),
                nanos: i32::try_from((self.reset_ms % 1_000) * 1_000_000).expect("below 1e9"),
            }),
            ..DescriptorStatus::default()
        }
    }

    fn headers(&self, style: HeaderStyle) -> Vec<HeaderValue> {
        let quota = self.limit.capacity().div_euclid(MILLI);
        let reset_s = self.reset_ms.div_ceil(1_000);
        // A quota's window is the rest of its period.
        let window_s = match (self.limit.calendar(), self.limit.session_ms()) {
            (Some(_), _) => reset_s,
            (_, Some(ms)) => u64::try_from(ms).unwrap_or(0).div_ceil(1_000),
            _ => u64::try_from(self.limit.refill_period_ms())
                .unwrap_or(0)
                .div_ceil(1_000),
        };
        let name = self.limit.name().to_string();
        match style {
            HeaderStyle::None => Vec::new(),
            HeaderStyle::Draft => vec![
                header(
                    "ratelimit-policy",
                    format!("\"{name}\";q={quota};w={window_s}"),
                ),
                header(
                    "ratelimit",
                    format!("\"{name}\";r={};t={reset_s}", self.remaining),
                ),
            ],
            HeaderStyle::XRatelimit => vec![
                header(
                    "x-ratelimit-limit",
                    format!("{quota}, {quota};w={window_s}"),
                ),
                header("x-ratelimit-remaining", self.remaining.to_string()),
                header("x-ratelimit-reset", reset_s.to_string()),
            ],
        }
    }
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value,
        ..HeaderValue::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_keep_their_own_unit_or_find_a_whole_one() {
        let l = |spec: &str| spec.parse::<Limit>().unwrap();
        assert_eq!(rate(&l("rpm=100/1m")), (100, Unit::Minute));
        assert_eq!(rate(&l("rps=5/1s")), (5, Unit::Second));
        assert_eq!(rate(&l("r=120/2m")), (1, Unit::Second));
        assert_eq!(rate(&l("r=7/10m")), (42, Unit::Hour));
        assert_eq!(rate(&l("r=1/7d")), (0, Unit::Day));
    }

    #[test]
    fn a_quota_shows_its_amount_per_day_and_resets_at_its_edge_or_within_its_window() {
        // 2026-01-31T00:00:00Z; the monthly edge is a day later.
        let jan_31 = 1_769_817_600_000;
        let monthly: Limit = "tok=500/cron(0 0 1 * *)".parse().unwrap();
        assert_eq!(rate(&monthly), (500, Unit::Day));
        assert_eq!(until_full(&monthly, 0, jan_31), 86_400_000);
        assert_eq!(until_full(&monthly, 500_000, jan_31), 0, "full");
        let session: Limit = "tok=50/session(5h)".parse().unwrap();
        assert_eq!(rate(&session), (50, Unit::Day));
        assert_eq!(until_full(&session, 0, jan_31), 5 * 3_600_000);
    }

    #[test]
    fn until_full_rounds_up_and_is_zero_when_full() {
        let limit: Limit = "rpm=60/1m".parse().unwrap();
        assert_eq!(until_full(&limit, 60_000, 0), 0);
        assert_eq!(until_full(&limit, 59_000, 0), 1_000);
        assert_eq!(until_full(&limit, 58_999, 0), 1_001);
        assert_eq!(until_full(&limit, -60_000, 0), 120_000);
    }

    #[test]
    fn overrides_map_units_and_refuse_unknown_ones() {
        assert_eq!(
            limit_override(10, RateLimitUnit::Minute as i32),
            Ok(Override {
                requests_per_unit: 10,
                period: Duration::from_secs(60)
            })
        );
        assert!(limit_override(10, 0).is_err());
        assert!(limit_override(0, RateLimitUnit::Second as i32).is_err());
        assert!(limit_override(1, 99).is_err());
    }
}
