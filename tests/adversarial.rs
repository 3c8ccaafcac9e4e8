//! Hostile input through the socket: arbitrary sequences of acquires, adjustments, closes, peeks,
//! moves, audit reads and Envoy `ShouldRateLimit` calls with extreme and overflowing amounts,
//! unicode and NUL in ids, huge maps, garbage lease ids, page tokens, descriptors and overrides. Whatever comes in: no panic, no `INTERNAL` or
//! `UNKNOWN`, nothing written for a refused request, and every stored item stays readable.
//!
//! CI runs a few thousand cases per store; `ZAE_ADVERSARIAL_CASES=100000 scripts/test.sh
//! --test adversarial` runs a longer search.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use common::daemon::Daemon;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::google::protobuf::UInt64Value;
use proptest::prelude::*;
use tonic::Code;
use zae_limiter::client::Client;
use zae_limiter::store::Store;
use zae_limiter::{BucketKey, EntityId, Namespace, ResourceId, proto};

/// Cron patterns and time zones for quotas: usable ones and hostile ones.
const CRONS: &[&str] = &[
    "0 0 1 * *",
    "* * * * *",
    "*/1 * * * *",
    "@monthly",
    "0 9,17 * * 1-5",
    "61 0 * * *",
    "0 0 29 2 *",
    "",
    "\u{0}\u{1b}[31m",
    "0 0 1 * * * * * * * * * * * * * * * * * * * * * * * * * * * * * * * * * * * * * * * *",
];
const ZONES: &[&str] = &[
    "UTC",
    "",
    "Europe/Berlin",
    "Mars/Olympus",
    "\u{0}",
    "Etc/GMT+14",
];

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        entity: String,
        resource: String,
        consume: Vec<(String, i64)>,
        limits: Vec<(String, u64, u64, u64)>,
        commit: bool,
        /// Mostly the defined values, sometimes any number.
        on_unavailable: i32,
        /// Further resources (mostly none; sometimes more than an acquire may name).
        also: Vec<(String, Vec<(String, i64)>)>,
    },
    Adjust {
        lease: Option<String>,
        delta: Vec<(String, i64)>,
    },
    Close {
        lease: Option<String>,
        rollback: bool,
        /// The adjustments a commit carries (a rollback ignores them).
        delta: Vec<(String, i64)>,
    },
    Available {
        entity: String,
        consume: Vec<(String, i64)>,
    },
    Audit {
        subject: String,
        page: String,
    },
    Move {
        entity: String,
        parent: Option<String>,
    },
    /// Disables, enables, bypasses (a defined value, with any end) or sets any number, or
    /// clears, at any scope.
    Gate {
        entity: Option<String>,
        resource: Option<String>,
        gate: Option<i32>,
        until: Option<i64>,
    },
    /// Sets (`Some`) or clears a cascade policy at a hostile scope.
    Cascade {
        entity: Option<String>,
        resource: Option<String>,
        cascade: Option<bool>,
    },
    Envoy {
        domain: String,
        descriptors: Vec<HostileDescriptor>,
        hits_addend: u32,
    },
    /// Resets (named limits, or all) or tops up (hostile amounts) a bucket, with any key.
    Bucket {
        entity: String,
        resource: String,
        top_up: bool,
        limits: Vec<String>,
        amounts: Vec<(String, i64)>,
        key: String,
    },
}

#[derive(Debug, Clone)]
struct HostileDescriptor {
    entries: Vec<(String, String)>,
    hits: Option<u64>,
    limit: Option<(u32, i32)>,
    negative: bool,
}

/// Rules for the Envoy calls: inline limits, and stored limits found by an entry's value.
const ENVOY_RULES: &str = r#"
[[envoy.rules]]
name = "key"
domain = "edge"
entries = [{ key = "api_key" }]
entity = "api_key"
resource = "edge"
limits = ["tok=10/1s"]
[[envoy.rules]]
name = "model"
domain = "edge"
entries = [{ key = "api_key" }, { key = "model" }]
entity = "api_key"
resource_key = "model"
hits = ["tok"]
shadow = true
"#;

fn descriptor() -> impl Strategy<Value = HostileDescriptor> {
    let key = prop_oneof![4 => Just("api_key".to_owned()), 2 => Just("model".to_owned()), 1 => Just(String::new()), 1 => any::<String>()];
    let hits = prop_oneof![
        3 => Just(None),
        2 => (0..20u64).prop_map(Some),
        1 => any::<u64>().prop_map(Some),
        1 => Just(Some(u64::MAX)),
    ];
    let limit = prop::option::of((any::<u32>(), -1..9i32));
    (
        prop::collection::vec((key, id()), 0..3),
        hits,
        limit,
        prop::bool::weighted(0.1),
    )
        .prop_map(|(entries, hits, limit, negative)| HostileDescriptor {
            entries,
            hits,
            limit,
            negative,
        })
}

fn envoy_request() -> impl Strategy<Value = Op> {
    let domain =
        prop_oneof![6 => Just("edge".to_owned()), 1 => Just(String::new()), 1 => any::<String>()];
    let descriptors = prop_oneof![
        8 => prop::collection::vec(descriptor(), 0..4),
        1 => prop::collection::vec(descriptor(), 60..70),
    ];
    (
        domain,
        descriptors,
        prop_oneof![3 => Just(0u32), 2 => 0..10u32, 1 => any::<u32>()],
    )
        .prop_map(|(domain, descriptors, hits_addend)| Op::Envoy {
            domain,
            descriptors,
            hits_addend,
        })
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "k[0-3]",
        1 => any::<String>(),
        1 => "[\\x00-\\x1f]{1,4}",
        1 => "\\PC{200,300}",
        1 => Just(String::new()),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![4 => Just("tok".to_owned()), 2 => Just("rpm".to_owned()), 1 => any::<String>()]
}

fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => 0..100i64,
        1 => -100..0i64,
        1 => any::<i64>(),
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
        1 => Just(1_000_000_000_000_000i64),
        1 => Just(-1_000_000_000_000_000i64),
    ]
}

fn amounts() -> impl Strategy<Value = Vec<(String, i64)>> {
    prop_oneof![
        8 => prop::collection::vec((name(), amount()), 0..3),
        1 => prop::collection::vec((any::<String>(), amount()), 100..300),
    ]
}

fn quantity() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 1..1_000u64,
        1 => Just(0u64),
        1 => any::<u64>(),
        1 => Just(1_000_000_000_000_000u64),
    ]
}

fn limits() -> impl Strategy<Value = Vec<(String, u64, u64, u64)>> {
    let one = || (name(), quantity(), quantity(), quantity());
    prop_oneof![
        8 => prop::collection::vec(one(), 0..3),
        1 => prop::collection::vec(one(), 30..40),
    ]
}

/// The further resources of an acquire: mostly none, some, sometimes more than 15 (16 resources
/// per acquire at most).
fn also() -> impl Strategy<Value = Vec<(String, Vec<(String, i64)>)>> {
    prop_oneof![
        6 => Just(Vec::new()),
        3 => prop::collection::vec((id(), amounts()), 1..4),
        1 => prop::collection::vec((id(), amounts()), 15..20),
    ]
}

fn lease() -> impl Strategy<Value = Option<String>> {
    // `None`: the lease of the last admitted acquire; else a forged id.
    prop_oneof![
        4 => Just(None),
        1 => any::<String>().prop_map(Some),
        1 => "[0-9a-f]{1,20}".prop_map(Some),
        1 => "open-[0-9a-f]{1,20}".prop_map(Some),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (
            id(),
            id(),
            amounts(),
            limits(),
            any::<bool>(),
            prop_oneof![4 => 0..3i32, 1 => any::<i32>()],
            also(),
        )
            .prop_map(
                |(entity, resource, consume, limits, commit, on_unavailable, also)| Op::Acquire {
                    entity,
                    resource,
                    consume,
                    limits,
                    commit,
                    on_unavailable,
                    also,
                }
            ),
        3 => (lease(), amounts()).prop_map(|(lease, delta)| Op::Adjust { lease, delta }),
        2 => (lease(), any::<bool>(), prop_oneof![2 => Just(Vec::new()), 1 => amounts()])
            .prop_map(|(lease, rollback, delta)| Op::Close { lease, rollback, delta }),
        1 => (id(), amounts()).prop_map(|(entity, consume)| Op::Available { entity, consume }),
        1 => (id(), any::<String>()).prop_map(|(subject, page)| Op::Audit { subject, page }),
        1 => (id(), prop::option::of(id())).prop_map(|(entity, parent)| Op::Move { entity, parent }),
        1 => (
            prop::option::of(id()),
            prop::option::of(id()),
            prop::option::of(prop_oneof![4 => 0..4i32, 1 => any::<i32>()]),
            prop::option::of(prop_oneof![any::<i64>(), 1_700_000_000_000..1_900_000_000_000i64]),
        )
            .prop_map(|(entity, resource, gate, until)| Op::Gate {
                entity,
                resource,
                gate,
                until,
            }),
        1 => (
            prop::option::of(id()),
            prop::option::of(id()),
            prop::option::of(any::<bool>()),
        )
            .prop_map(|(entity, resource, cascade)| Op::Cascade {
                entity,
                resource,
                cascade
            }),
        2 => envoy_request(),
        1 => (
            id(),
            prop_oneof![3 => Just("model".to_owned()), 1 => id()],
            any::<bool>(),
            prop::collection::vec(name(), 0..3),
            amounts(),
            prop_oneof![2 => Just(String::new()), 2 => "[a-z0-9._:-]{1,8}", 1 => any::<String>()],
        )
            .prop_map(|(entity, resource, top_up, limits, amounts, key)| Op::Bucket {
                entity,
                resource,
                top_up,
                limits,
                amounts,
                key,
            }),
    ]
}

/// A daemon, a client, the store it writes to, and the buckets admissions created.
struct Target {
    rt: tokio::runtime::Runtime,
    _daemon: Daemon,
    client: Client,
    /// The daemon's store, where the test can read it (DynamoDB; the memory store lives in the
    /// daemon's process).
    store: Option<Arc<dyn Store>>,
    ns: Namespace,
    /// Resource ids that have had an admission (their buckets may exist).
    admitted: Mutex<HashSet<(String, String)>>,
    /// Whether the store may answer UNAVAILABLE (DynamoDB Local under load).
    may_be_unavailable: bool,
}

fn target(dynamodb: bool) -> Target {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ns = common::unique_namespace();
    let (config, store) = if dynamodb {
        let store = Some(rt.block_on(common::dynamodb()));
        let config = format!(
            "[limiter]\nbackend = \"dynamodb\"\nnamespaces = [\"{ns}\"]\n\
             [dynamodb]\ntable = \"{}\"\nendpoint_url = \"{}\"\n{ENVOY_RULES}",
            common::TEST_TABLE,
            common::endpoint()
        );
        (config, store)
    } else {
        let config =
            format!("[limiter]\nbackend = \"memory\"\nnamespaces = [\"{ns}\"]\n{ENVOY_RULES}");
        (config, None)
    };
    let daemon = Daemon::start(&config, &[]);
    let client = rt.block_on(daemon.client());
    Target {
        rt,
        _daemon: daemon,
        client,
        store,
        ns,
        admitted: Mutex::new(HashSet::new()),
        may_be_unavailable: dynamodb,
    }
}

fn to_limits(limits: &[(String, u64, u64, u64)]) -> Vec<proto::Limit> {
    limits
        .iter()
        .map(|(name, capacity, refill_amount, refill_period_ms)| {
            // Every fourth limit a calendar quota, its pattern and zone picked from good and
            // hostile ones, its refill fields left (refused) or zeroed.
            // Every fourth but one a session quota, its window any number (the period's).
            let quota = capacity % 4 == 1;
            let session = capacity % 4 == 2;
            let pick = |list: &[&str], n: u64| list[(n % list.len() as u64) as usize].to_owned();
            let zeroed = (quota || session) && refill_amount % 2 == 0;
            proto::Limit {
                name: name.clone(),
                capacity: *capacity,
                refill_amount: if zeroed { 0 } else { *refill_amount },
                refill_period_ms: if zeroed { 0 } else { *refill_period_ms },
                // Every third limit soft, so hostile input meets soft limits too (debt down
                // to the floor, overdrawn statuses).
                soft: capacity % 3 == 0,
                quota_cron: if quota {
                    pick(CRONS, *refill_amount / 2)
                } else {
                    String::new()
                },
                quota_tz: if quota {
                    pick(ZONES, *refill_period_ms)
                } else {
                    String::new()
                },
                quota_reset_after_ms: if session {
                    refill_period_ms.saturating_mul(1_000 * (refill_amount % 2))
                        + refill_period_ms * (1 - refill_amount % 2)
                } else {
                    0
                },
                // Every fourth but two scheduled: up to 18 entries (16 is the most), each a
                // pattern from the list, a scale of any size (0: none) or values it sets, in a
                // zone from the list.
                schedule: if capacity % 4 == 3 {
                    (0..(refill_amount % 19))
                        .map(|j| proto::ScheduleEntry {
                            cron: pick(CRONS, refill_amount.wrapping_add(j)),
                            scale_permille: if j % 2 == 0 {
                                refill_period_ms.wrapping_mul(j + 1)
                            } else {
                                0
                            },
                            capacity: if j % 3 == 1 {
                                capacity.wrapping_mul(j)
                            } else {
                                0
                            },
                            refill_amount: if j % 4 == 1 { *refill_amount } else { 0 },
                            refill_period_ms: if j % 5 == 1 {
                                refill_period_ms.wrapping_mul(j)
                            } else {
                                0
                            },
                        })
                        .collect()
                } else {
                    Vec::new()
                },
                schedule_tz: if capacity % 4 == 3 && refill_amount % 3 != 0 {
                    pick(ZONES, *capacity / 4)
                } else {
                    String::new()
                },
            }
        })
        .collect()
}

impl Target {
    fn acceptable(&self, status: &tonic::Status) -> bool {
        match status.code() {
            Code::InvalidArgument
            | Code::OutOfRange
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists => true,
            Code::Unavailable => self.may_be_unavailable,
            _ => false,
        }
    }

    /// The bucket of an entity and resource, as the store has it (`None`: not stored, or the
    /// ids are not valid ids). Reading it proves it readable.
    async fn bucket(&self, entity: &str, resource: &str) -> Option<zae_limiter::Bucket> {
        let store = self.store.as_ref()?;
        let key = BucketKey {
            namespace: self.ns.clone(),
            entity: EntityId::new(entity).ok()?,
            resource: ResourceId::new(resource).ok()?,
        };
        store
            .load_bucket(&key)
            .await
            .expect("every stored item stays readable")
    }

    async fn run(&self, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut raw = self.client.raw();
        let mut admin = self.client.admin();
        let mut envoy = RateLimitServiceClient::new(self.client.channel());
        let mut last_lease = String::new();
        for op in ops {
            let answer: Result<(), tonic::Status> = match op.clone() {
                Op::Acquire {
                    entity,
                    resource,
                    consume,
                    limits,
                    commit,
                    on_unavailable,
                    also,
                } => {
                    let resources: Vec<String> = std::iter::once(resource.clone())
                        .chain(also.iter().map(|(r, _)| r.clone()))
                        .collect();
                    // What the store has of each bucket never admitted before.
                    let mut before = Vec::new();
                    for r in &resources {
                        let key = (entity.clone(), r.clone());
                        if !self.admitted.lock().unwrap().contains(&key) {
                            before.push((r.clone(), self.bucket(&entity, r).await));
                        }
                    }
                    let req = proto::AcquireRequest {
                        namespace: String::new(),
                        entity_id: entity.clone(),
                        resource: resource.clone(),
                        consume: consume.into_iter().collect(),
                        limits: to_limits(&limits),
                        commit,
                        on_unavailable,
                        also: also
                            .into_iter()
                            .map(|(resource, consume)| proto::AlsoAcquire {
                                resource,
                                consume: consume.into_iter().collect(),
                            })
                            .collect(),
                    };
                    match raw.acquire(req).await {
                        Ok(a) => {
                            let a = a.into_inner();
                            if a.allowed {
                                // A bypassed bucket is admitted without being written.
                                if !a.bypassed {
                                    let mut admitted = self.admitted.lock().unwrap();
                                    for r in resources {
                                        admitted.insert((entity.clone(), r));
                                    }
                                }
                                last_lease = a.lease_id;
                            }
                            Ok(())
                        }
                        Err(s) => {
                            for (r, before) in before {
                                let after = self.bucket(&entity, &r).await;
                                prop_assert_eq!(before, after, "a refused acquire wrote: {:?}", s);
                            }
                            Err(s)
                        }
                    }
                }
                Op::Adjust { lease, delta } => raw
                    .adjust(proto::AdjustRequest {
                        lease_id: lease.unwrap_or_else(|| last_lease.clone()),
                        delta: delta.into_iter().collect(),
                    })
                    .await
                    .map(drop),
                Op::Close {
                    lease,
                    rollback,
                    delta,
                } => {
                    let req = proto::LeaseRequest {
                        lease_id: lease.unwrap_or_else(|| last_lease.clone()),
                        delta: delta.into_iter().collect(),
                    };
                    if rollback {
                        raw.rollback(req).await.map(drop)
                    } else {
                        raw.commit(req).await.map(drop)
                    }
                }
                Op::Available { entity, consume } => raw
                    .time_until_available(proto::TimeUntilAvailableRequest {
                        entity_id: entity,
                        resource: "model".into(),
                        consume: consume.into_iter().collect(),
                        limits: to_limits(&[("tok".into(), 10, 10, 1_000)]),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                Op::Audit { subject, page } => admin
                    .list_audit(proto::ListAuditRequest {
                        subject,
                        page,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                Op::Move { entity, parent } => admin
                    .move_entity(proto::MoveEntityRequest {
                        entity_id: entity,
                        parent_id: parent,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                Op::Gate {
                    entity,
                    resource,
                    gate,
                    until,
                } => {
                    let scope = Some(proto::LimitScope {
                        entity_id: entity,
                        resource,
                    });
                    match gate {
                        Some(gate) => admin
                            .set_gate(proto::GateRequest {
                                scope,
                                gate,
                                bypass_until_ms: until,
                                ..Default::default()
                            })
                            .await
                            .map(drop),
                        None => admin
                            .clear_gate(proto::LimitsRequest {
                                scope,
                                ..Default::default()
                            })
                            .await
                            .map(drop),
                    }
                }
                Op::Cascade {
                    entity,
                    resource,
                    cascade,
                } => {
                    let scope = Some(proto::LimitScope {
                        entity_id: entity,
                        resource,
                    });
                    match cascade {
                        Some(cascade) => admin
                            .set_cascade(proto::CascadeRequest {
                                scope,
                                cascade,
                                ..Default::default()
                            })
                            .await
                            .map(drop),
                        None => admin
                            .clear_cascade(proto::LimitsRequest {
                                scope,
                                ..Default::default()
                            })
                            .await
                            .map(drop),
                    }
                }
                Op::Envoy {
                    domain,
                    descriptors,
                    hits_addend,
                } => envoy
                    .should_rate_limit(RateLimitRequest {
                        domain,
                        descriptors: descriptors
                            .into_iter()
                            .map(|d| RateLimitDescriptor {
                                entries: d
                                    .entries
                                    .into_iter()
                                    .map(|(key, value)| Entry { key, value })
                                    .collect(),
                                limit: d.limit.map(|(requests_per_unit, unit)| RateLimitOverride {
                                    requests_per_unit,
                                    unit,
                                }),
                                hits_addend: d.hits.map(|value| UInt64Value { value }),
                                is_negative_hits: d.negative,
                            })
                            .collect(),
                        hits_addend,
                    })
                    .await
                    .map(drop),
                Op::Bucket {
                    entity,
                    resource,
                    top_up,
                    limits,
                    amounts,
                    key,
                } => {
                    let request = proto::BucketRequest {
                        entity_id: entity,
                        resource,
                        limits,
                        amounts: amounts.into_iter().collect(),
                        idempotency_key: key,
                        ..Default::default()
                    };
                    match top_up {
                        true => admin.top_up(request).await.map(drop),
                        false => admin.reset_bucket(request).await.map(drop),
                    }
                }
            };
            if let Err(s) = answer {
                prop_assert!(self.acceptable(&s), "{:?} answered {:?}", op, s);
            }
        }
        Ok(())
    }
}

fn cases(default: u32) -> u32 {
    std::env::var("ZAE_ADVERSARIAL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn check(dynamodb: bool, default_cases: u32) {
    let t = target(dynamodb);
    let config = ProptestConfig {
        cases: cases(default_cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&prop::collection::vec(op(), 1..8), |ops| {
        t.rt.block_on(t.run(ops))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Every bucket an admission touched is still readable.
    let keys: Vec<(String, String)> = t.admitted.lock().unwrap().iter().cloned().collect();
    if dynamodb {
        for (entity, resource) in keys {
            t.rt.block_on(t.bucket(&entity, &resource))
                .expect("an admitted bucket is stored");
        }
    }
    // And the daemon still serves.
    let health =
        t.rt.block_on(t.client.raw().available(proto::AvailableRequest {
            entity_id: "k0".into(),
            resource: "model".into(),
            limits: to_limits(&[("tok".into(), 10, 10, 1_000)]),
            ..Default::default()
        }));
    assert!(health.is_ok(), "{health:?}");
}

#[test]
fn hostile_requests_on_the_memory_store() {
    check(false, 2_000);
}

#[test]
fn hostile_requests_on_dynamodb() {
    check(true, 1_000);
}
