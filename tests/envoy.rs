//! Envoy's rate limit service through the daemon's socket, with a client generated from Envoy's
//! own protos (the `envoy-types` crate), as a gateway would call it.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use common::proxy::{Fault, FaultProxy};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::envoy::r#type::v3::RateLimitUnit;
use envoy_types::pb::google::protobuf::UInt64Value;
use tonic::transport::Channel;
use zae_limiter::proto;

const RULES: &str = r#"
[[envoy.rules]]
name = "api-key"
domain = "edge"
entries = [{ key = "api_key" }]
entity = "api_key"
resource = "edge"
limits = ["requests=2/1m"]

[[envoy.rules]]
name = "daily"
domain = "edge"
entries = [{ key = "api_key" }, { key = "plan", value = "daily" }]
entity = "api_key"
resource = "daily"
limits = ["requests=100/1d"]

[[envoy.rules]]
name = "one-a-day"
domain = "edge"
entries = [{ key = "api_key" }, { key = "plan", value = "one" }]
entity = "api_key"
resource = "one"
limits = ["requests=1/1d"]

[[envoy.rules]]
name = "stored"
domain = "edge"
entries = [{ key = "api_key" }, { key = "model" }]
entity = "api_key"
resource_key = "model"
hits = ["rpm"]

[[envoy.rules]]
name = "trial"
domain = "edge"
entries = [{ key = "trial_key" }]
entity = "trial_key"
resource = "trial"
limits = ["requests=1/1d"]
shadow = true
"#;

fn config(headers: &str) -> String {
    format!("[limiter]\nbackend = \"memory\"\n[envoy]\nheaders = \"{headers}\"\n{RULES}")
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).to_owned(),
                value: (*v).to_owned(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}

fn request(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "edge".into(),
        descriptors,
        hits_addend: 0,
    }
}

async fn envoy(daemon: &Daemon) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::new(daemon.client().await.channel())
}

async fn ask(
    client: &mut RateLimitServiceClient<Channel>,
    req: RateLimitRequest,
) -> RateLimitResponse {
    client.should_rate_limit(req).await.unwrap().into_inner()
}

fn header<'a>(answer: &'a RateLimitResponse, key: &str) -> Option<&'a str> {
    answer
        .response_headers_to_add
        .iter()
        .find(|h| h.key == key)
        .map(|h| h.value.as_str())
}

fn code(status: &DescriptorStatus) -> Code {
    Code::try_from(status.code).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_admitted_then_refused_with_statuses_and_headers() {
    let daemon = Daemon::start(&config("x-ratelimit"), &[]);
    let mut client = envoy(&daemon).await;
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(ask(&mut client, request(vec![descriptor(&[("api_key", "k1")])])).await);
    }
    let codes: Vec<Code> = answers
        .iter()
        .map(|a| Code::try_from(a.overall_code).unwrap())
        .collect();
    assert_eq!(codes, [Code::Ok, Code::Ok, Code::OverLimit]);
    let remaining: Vec<u32> = answers
        .iter()
        .map(|a| a.statuses[0].limit_remaining)
        .collect();
    assert_eq!(remaining, [1, 0, 0]);
    for a in &answers {
        let limit = a.statuses[0].current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.name.as_str(), limit.requests_per_unit),
            ("requests", 2)
        );
        assert_eq!(Unit::try_from(limit.unit).unwrap(), Unit::Minute);
    }
    let refused = &answers[2];
    assert_eq!(code(&refused.statuses[0]), Code::OverLimit);
    // One request comes back every 30 s.
    let reset = refused.statuses[0].duration_until_reset.unwrap();
    assert!(
        (1..=30).contains(&reset.seconds) || (reset.seconds == 0 && reset.nanos > 0),
        "{reset:?}"
    );
    let retry: u64 = header(refused, "retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(header(refused, "x-ratelimit-limit"), Some("2, 2;w=60"));
    assert_eq!(header(refused, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&answers[0], "x-ratelimit-remaining"), Some("1"));
    assert!(header(&answers[0], "retry-after").is_none());
    // A shadow rule shows nothing to the client, even when it would refuse.
    for _ in 0..2 {
        let trial = ask(
            &mut client,
            request(vec![descriptor(&[("trial_key", "t0")])]),
        )
        .await;
        assert!(trial.response_headers_to_add.is_empty(), "{trial:?}");
    }
    assert_eq!(
        daemon.metric(
            "zae_limiter_envoy_descriptors_total",
            &[
                "domain=\"edge\"",
                "rule=\"api-key\"",
                "outcome=\"over_limit\""
            ]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_descriptor_refuses_none_is_charged() {
    let daemon = Daemon::start(&config("none"), &[]);
    let mut client = envoy(&daemon).await;
    let both = || {
        request(vec![
            descriptor(&[("api_key", "k2"), ("plan", "daily")]),
            descriptor(&[("api_key", "k2"), ("plan", "one")]),
        ])
    };
    let first = ask(&mut client, both()).await;
    assert_eq!(first.overall_code, Code::Ok as i32);
    assert_eq!(first.statuses.len(), 2);
    let second = ask(&mut client, both()).await;
    assert_eq!(second.overall_code, Code::OverLimit as i32);
    assert_eq!(code(&second.statuses[0]), Code::Ok);
    assert_eq!(code(&second.statuses[1]), Code::OverLimit);
    assert!(header(&second, "retry-after").is_some());
    // The daily descriptor was charged once (the first request), not by the refused one.
    let daily = ask(
        &mut client,
        request(vec![descriptor(&[("api_key", "k2"), ("plan", "daily")])]),
    )
    .await;
    assert_eq!(daily.statuses[0].limit_remaining, 100 - 2);
    assert_eq!(
        daemon.metric(
            "zae_limiter_envoy_descriptors_total",
            &["rule=\"daily\"", "outcome=\"rolled_back\""]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_addend_is_the_amount_per_request_or_per_descriptor() {
    let daemon = Daemon::start(&config("none"), &[]);
    let mut client = envoy(&daemon).await;
    let mut five = request(vec![descriptor(&[("api_key", "k3"), ("plan", "daily")])]);
    five.hits_addend = 5;
    assert_eq!(ask(&mut client, five).await.statuses[0].limit_remaining, 95);
    let mut seven = request(vec![descriptor(&[("api_key", "k3"), ("plan", "daily")])]);
    seven.hits_addend = 5;
    seven.descriptors[0].hits_addend = Some(UInt64Value { value: 7 });
    assert_eq!(
        ask(&mut client, seven).await.statuses[0].limit_remaining,
        88
    );
    // More than the limit's capacity can never fit.
    let mut huge = request(vec![descriptor(&[("api_key", "k3"), ("plan", "daily")])]);
    huge.hits_addend = 1_000;
    assert_eq!(
        ask(&mut client, huge).await.overall_code,
        Code::OverLimit as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_s_limit_override_replaces_the_rule_s_limit() {
    let daemon = Daemon::start(&config("none"), &[]);
    let mut client = envoy(&daemon).await;
    let mut d = descriptor(&[("api_key", "k4")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 5,
        unit: RateLimitUnit::Hour as i32,
    });
    let answer = ask(&mut client, request(vec![d])).await;
    let limit = answer.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, Unit::try_from(limit.unit).unwrap()),
        (5, Unit::Hour)
    );
    assert_eq!(answer.statuses[0].limit_remaining, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_limits_and_a_cascading_parent_decide_a_descriptor() {
    let daemon = Daemon::start(&config("draft"), &[]);
    let mut client = envoy(&daemon).await;
    let mut admin = daemon.client().await.admin();
    let entity = |id: &str, parent: Option<&str>| proto::CreateEntityRequest {
        namespace: String::new(),
        entity: Some(proto::Entity {
            id: id.into(),
            name: id.into(),
            parent_id: parent.map(Into::into),
            cascade: parent.is_some(),
            metadata: Default::default(),
        }),
    };
    let set = |id: &str, capacity: u64| proto::SetLimitsRequest {
        namespace: String::new(),
        scope: Some(proto::LimitScope {
            entity_id: Some(id.into()),
            resource: None,
        }),
        limits: vec![proto::Limit {
            name: "rpm".into(),
            capacity,
            refill_amount: capacity,
            refill_period_ms: 86_400_000,
            soft: false,
            ..Default::default()
        }],
    };
    admin.create_entity(entity("project", None)).await.unwrap();
    admin
        .create_entity(entity("key-5", Some("project")))
        .await
        .unwrap();
    admin.set_limits(set("project", 1)).await.unwrap();
    admin.set_limits(set("key-5", 10)).await.unwrap();

    let ask_key = || {
        request(vec![descriptor(&[
            ("api_key", "key-5"),
            ("model", "gpt-4"),
        ])])
    };
    let first = ask(&mut client, ask_key()).await;
    assert_eq!(first.overall_code, Code::Ok as i32);
    let limit = first.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!((limit.name.as_str(), limit.requests_per_unit), ("rpm", 10));
    assert_eq!(Unit::try_from(limit.unit).unwrap(), Unit::Day);
    assert_eq!(first.statuses[0].limit_remaining, 9);
    assert_eq!(
        header(&first, "ratelimit-policy"),
        Some("\"rpm\";q=10;w=86400")
    );
    assert!(
        header(&first, "ratelimit")
            .unwrap()
            .starts_with("\"rpm\";r=9;t=")
    );
    // The project allows one a day: the key's second request is refused by its parent.
    let second = ask(&mut client, ask_key()).await;
    assert_eq!(second.overall_code, Code::OverLimit as i32);
    let limit = second.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(limit.requests_per_unit, 1, "the parent's limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_descriptors_are_allowed_and_shadow_rules_never_refuse() {
    let daemon = Daemon::start(&config("none"), &[]);
    let mut client = envoy(&daemon).await;
    let mixed = ask(
        &mut client,
        request(vec![
            descriptor(&[("remote_address", "10.0.0.1")]),
            descriptor(&[("api_key", "k6")]),
        ]),
    )
    .await;
    assert_eq!(mixed.overall_code, Code::Ok as i32);
    assert_eq!(code(&mixed.statuses[0]), Code::Ok);
    assert!(mixed.statuses[0].current_limit.is_none(), "no rule matched");
    assert!(mixed.statuses[1].current_limit.is_some());
    let mut other_domain = request(vec![descriptor(&[("api_key", "k6")])]);
    other_domain.domain = "internal".into();
    assert!(
        ask(&mut client, other_domain).await.statuses[0]
            .current_limit
            .is_none()
    );

    for _ in 0..3 {
        let trial = ask(
            &mut client,
            request(vec![descriptor(&[("trial_key", "t1")])]),
        )
        .await;
        assert_eq!(trial.overall_code, Code::Ok as i32);
        assert_eq!(code(&trial.statuses[0]), Code::Ok);
    }
    let shadow = |outcome: &str| {
        daemon.metric(
            "zae_limiter_envoy_descriptors_total",
            &["rule=\"trial\"", &format!("outcome=\"{outcome}\"")],
        )
    };
    assert_eq!((shadow("ok"), shadow("shadow_refused")), (1.0, 2.0));
    assert_eq!(
        daemon.metric(
            "zae_limiter_envoy_descriptors_total",
            &["domain=\"other\"", "outcome=\"unmatched\""]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let daemon = Daemon::start(&config("none"), &[]);
    let mut client = envoy(&daemon).await;
    let mut no_domain = request(vec![descriptor(&[("api_key", "k")])]);
    no_domain.domain.clear();
    let mut negative = request(vec![descriptor(&[("api_key", "k")])]);
    negative.descriptors[0].is_negative_hits = true;
    let mut bad_unit = request(vec![descriptor(&[("api_key", "k")])]);
    bad_unit.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: 0,
    });
    for (req, field) in [
        (no_domain, "domain"),
        (request(vec![]), "descriptors"),
        (
            request(vec![descriptor(&[("api_key", "k"), ("", "x")])]),
            "descriptors[0].entries[1].key",
        ),
        (request(vec![descriptor(&[])]), "descriptors[0].entries"),
        (
            request(vec![descriptor(&[("api_key", "")])]),
            "descriptors[0].entries[0].value",
        ),
        (negative, "descriptors[0].is_negative_hits"),
        (bad_unit, "descriptors[0].limit"),
    ] {
        let err = client.should_rate_limit(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_does_not_answer_gets_the_failure_policy_s_answer() {
    common::dynamodb().await;
    let proxy = FaultProxy::start(&common::endpoint()).await;
    for (policy, expected) in [
        ("block", Err(tonic::Code::Unavailable)),
        ("allow", Ok(Code::Ok)),
    ] {
        let ns = common::unique_namespace();
        let config = common::dynamodb_config(
            &ns,
            &proxy.endpoint(),
            &format!("failure_policy = \"{policy}\""),
        ) + "max_attempts = 1\nattempt_timeout_ms = 500\n[server]\nrequest_timeout_ms = 1000\n"
            + &format!(
                "[envoy]\n{}",
                RULES.replace(
                    "[[envoy.rules]]",
                    &format!("[[envoy.rules]]\nnamespace = \"{ns}\"")
                )
            );
        let daemon = Daemon::start(&config, &[]);
        let mut client = envoy(&daemon).await;
        proxy.set(Fault::Blackhole);
        let mut req = tonic::Request::new(request(vec![
            descriptor(&[("api_key", "k7"), ("plan", "daily")]),
            descriptor(&[("api_key", "k7")]),
        ]));
        req.set_timeout(Duration::from_secs(30));
        let got = client
            .should_rate_limit(req)
            .await
            .map(|a| Code::try_from(a.into_inner().overall_code).unwrap())
            .map_err(|e| e.code());
        assert_eq!(got, expected, "policy {policy}");
        proxy.set(Fault::Pass);
    }
}

/// Envoy lets a request through when its rate limit service errs (by default): a disabled
/// resource must come back as OVER_LIMIT, never as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_resource_is_over_limit_for_envoy_not_an_error() {
    let daemon = Daemon::start(&config("x-ratelimit"), &[]);
    let mut client = envoy(&daemon).await;
    daemon
        .client()
        .await
        .admin()
        .set_gate(proto::GateRequest {
            namespace: String::new(),
            scope: Some(proto::LimitScope {
                entity_id: None,
                resource: Some("daily".into()),
            }),
            gate: proto::Gate::Disabled.into(),
            bypass_until_ms: None,
        })
        .await
        .unwrap();
    let answer = ask(
        &mut client,
        request(vec![
            descriptor(&[("api_key", "k9")]),
            descriptor(&[("api_key", "k9"), ("plan", "daily")]),
            descriptor(&[("nobody", "x")]),
        ]),
    )
    .await;
    assert_eq!(
        Code::try_from(answer.overall_code).unwrap(),
        Code::OverLimit
    );
    let codes: Vec<Code> = answer.statuses.iter().map(code).collect();
    assert_eq!(codes, [Code::OverLimit, Code::OverLimit, Code::Ok]);
    // Nothing was charged: the other rule's descriptor alone is admitted twice (2 a minute).
    let mut alone = Vec::new();
    for _ in 0..3 {
        let answer = ask(&mut client, request(vec![descriptor(&[("api_key", "k9")])])).await;
        alone.push(Code::try_from(answer.overall_code).unwrap());
    }
    assert_eq!(alone, [Code::Ok, Code::Ok, Code::OverLimit]);
    let counted = daemon.metric(
        "zae_limiter_envoy_descriptors_total",
        &["outcome=\"disabled\""],
    );
    assert_eq!(counted, 2.0);
}
