//! The daemon on DynamoDB Local: group commit on a hot entity, several daemons sharing one table,
//! and the failure policy when the store is unreachable.

mod common;

use common::UsageOf;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, free_port};
use tonic::Code;
use zae_limiter::client::{Acquire, ClientError};
use zae_limiter::store::Store;
use zae_limiter::{BucketKey, EntityId, Limit, LimitName, Namespace, ResourceId, proto};

fn config(ns: &Namespace, endpoint: &str, extra: &str) -> String {
    common::dynamodb_config(ns, endpoint, extra)
}

async fn consumed(store: &dyn Store, ns: &Namespace, entity: &str, limit: &str) -> i64 {
    let key = BucketKey {
        namespace: ns.clone(),
        entity: EntityId::new(entity).unwrap(),
        resource: ResourceId::new("gpt-4").unwrap(),
    };
    let bucket = store
        .load_bucket(&key)
        .await
        .unwrap()
        .expect("the bucket is stored");
    let total = bucket
        .limit(&LimitName::new(limit).unwrap())
        .unwrap()
        .consumed;
    i64::try_from(total).expect("small totals in these tests")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_entity_is_group_committed_and_every_admit_is_durable() {
    let store = common::dynamodb().await;
    let ns = common::unique_namespace();
    let daemon = Daemon::start(&config(&ns, &common::endpoint(), ""), &[]);
    let limits = [Limit::per_hour("rpm", 1_000_000).unwrap()];
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(daemon.client().await);
    }
    let admitted = Arc::new(AtomicI64::new(0));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let client = clients[i % clients.len()].clone();
            let (limits, admitted) = (limits.clone(), admitted.clone());
            tokio::spawn(async move {
                for _ in 0..40 {
                    let req = Acquire::new("hot", "gpt-4")
                        .limits(&limits)
                        .consume("rpm", 1);
                    client.acquire(req).await.unwrap().commit().await.unwrap();
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    assert_eq!(admitted, 64 * 40);
    let writes = daemon.metric("zae_limiter_store_calls_total", &["operation=\"write\""]);
    let units = daemon.metric("zae_limiter_store_write_units_total", &[]);
    println!("admitted {admitted} with {writes} writes ({units} write units)");
    assert!(
        writes * 4.0 < admitted as f64,
        "group commit: {writes} writes for {admitted} admits"
    );
    assert_eq!(consumed(&*store, &ns, "hot", "rpm").await, admitted * 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_on_one_table_never_over_admit() {
    let store = common::dynamodb().await;
    let ns = common::unique_namespace();
    let cfg = config(&ns, &common::endpoint(), "");
    // One of them on a single-threaded runtime (`worker_threads = 1`).
    let daemons: Vec<Daemon> = [&["--worker-threads", "1"][..], &[], &[]]
        .into_iter()
        .map(|flags| Daemon::start(&cfg, flags))
        .collect();
    // Capacity 1,000 and 50 tokens a second.
    let limits = [Limit::per_second("rps", 50)
        .unwrap()
        .with_burst(1_000)
        .unwrap()];
    let admitted = Arc::new(AtomicI64::new(0));
    let started = Instant::now();
    let run_for = Duration::from_secs(10);
    let mut tasks = Vec::new();
    for (nth, daemon) in daemons.iter().enumerate() {
        let client = daemon.client().await;
        for _ in 0..64 {
            let (client, limits, admitted) = (client.clone(), limits.clone(), admitted.clone());
            tasks.push(tokio::spawn(async move {
                while started.elapsed() < run_for {
                    let req = Acquire::new("shared", "gpt-4")
                        .limits(&limits)
                        .consume("rps", 1);
                    match client.acquire(req).await {
                        Ok(lease) => {
                            lease.commit().await.unwrap();
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(ClientError::OverLimit { retry_after, .. }) => {
                            let wait = retry_after.unwrap().min(Duration::from_millis(50));
                            tokio::time::sleep(wait).await;
                        }
                        Err(e) => panic!(
                            "daemon {nth}, {:?} in: unexpected error: {e}",
                            started.elapsed()
                        ),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed_ms = started.elapsed().as_millis() as i64;
    let admitted = admitted.load(Ordering::Relaxed);
    let bound = 1_000 + (elapsed_ms * 50 + 999) / 1_000;
    let stored = consumed(&*store, &ns, "shared", "rps").await;
    let conflicts: f64 = daemons
        .iter()
        .map(|d| d.metric("zae_limiter_conflicts_total", &[]))
        .sum();
    println!("admitted {admitted} of at most {bound} in {elapsed_ms} ms; {conflicts} conflicts");
    assert!(admitted <= bound, "over-admitted: {admitted} > {bound}");
    assert!(admitted >= 1_000, "the capacity was used: {admitted}");
    assert_eq!(
        stored,
        admitted * 1_000,
        "the stored total equals the sum admitted"
    );
}

/// A soft limit beside a hard one, shared by two daemons: the hard limit still admits no more than
/// it allows, and the soft one is charged every admitted token, into debt, by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_charge_a_soft_limit_into_debt_and_keep_the_hard_one_exact() {
    let store = common::dynamodb().await;
    let ns = common::unique_namespace();
    let cfg = config(&ns, &common::endpoint(), "");
    let daemons = [Daemon::start(&cfg, &[]), Daemon::start(&cfg, &[])];
    // Per day: no refill worth a token within the test.
    let limits = [
        Limit::per_day("rpm", 300).unwrap(),
        Limit::per_day("tpm", 100).unwrap().with_soft(true),
    ];
    let admitted = Arc::new(AtomicI64::new(0));
    let overdrawn = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for daemon in &daemons {
        let client = daemon.client().await;
        for _ in 0..16 {
            let (client, limits) = (client.clone(), limits.clone());
            let (admitted, overdrawn) = (admitted.clone(), overdrawn.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let req = Acquire::new("shared-soft", "gpt-4")
                        .limits(&limits)
                        .consume("rpm", 1)
                        .consume("tpm", 1);
                    match client.acquire(req).await {
                        Ok(lease) => {
                            let over = lease.overdrawn().collect::<Vec<_>>() == ["tpm"];
                            lease.commit().await.unwrap();
                            admitted.fetch_add(1, Ordering::Relaxed);
                            overdrawn.fetch_add(i64::from(over), Ordering::Relaxed);
                        }
                        Err(ClientError::OverLimit { violations, .. }) => {
                            let refused: Vec<_> = violations.iter().map(|v| &v.limit).collect();
                            assert_eq!(refused, ["rpm"], "only the hard limit refuses");
                            return;
                        }
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    assert_eq!(admitted, 300, "the hard limit's capacity, no more");
    assert_eq!(consumed(&*store, &ns, "shared-soft", "rpm").await, 300_000);
    assert_eq!(
        consumed(&*store, &ns, "shared-soft", "tpm").await,
        300_000,
        "every admitted token charged to the soft limit"
    );
    let key = BucketKey {
        namespace: ns.clone(),
        entity: EntityId::new("shared-soft").unwrap(),
        resource: ResourceId::new("gpt-4").unwrap(),
    };
    let bucket = store.load_bucket(&key).await.unwrap().unwrap();
    let tpm = bucket.limit(&LimitName::new("tpm").unwrap()).unwrap();
    assert!(tpm.limit.is_soft(), "stored soft");
    assert!(
        (-200_000..=-199_990).contains(&tpm.balance),
        "100 tokens less 300 taken: {}",
        tpm.balance
    );
    // `overdrawn` is what the deciding daemon saw: never for one that fitted, but a daemon that
    // has not yet read the other's writes may miss some of the 200 that did not.
    let overdrawn = overdrawn.load(Ordering::Relaxed);
    assert!((1..=200).contains(&overdrawn), "{overdrawn}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_answered_by_the_policy_within_the_deadline() {
    let ns = common::unique_namespace();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let settings = "request_timeout_ms = 1000";
    for (policy, expect_admit) in [("block", false), ("allow", true)] {
        let cfg = config(&ns, &closed, &format!("failure_policy = \"{policy}\"\n"))
            .replace("[limiter]", &format!("[server]\n{settings}\n[limiter]"))
            + "attempt_timeout_ms = 300\nmax_attempts = 2\n";
        let daemon = Daemon::start(&cfg, &[]);
        let client = daemon.client().await;
        let limits = [Limit::per_minute("rpm", 10).unwrap()];
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let mut raw = client.raw();
                let limits = limits.clone();
                tokio::spawn(async move {
                    let mut req = tonic::Request::new(proto::AcquireRequest {
                        entity_id: format!("e{}", i % 3),
                        resource: "gpt-4".into(),
                        consume: [("rpm".to_owned(), 1)].into(),
                        limits: limits.iter().map(proto::Limit::from).collect(),
                        ..Default::default()
                    });
                    // The caller's own deadline; the daemon must answer before it.
                    req.set_timeout(Duration::from_secs(3));
                    raw.acquire(req).await
                })
            })
            .collect();
        for call in calls {
            match (call.await.unwrap(), expect_admit) {
                (Ok(answer), true) => {
                    let answer = answer.into_inner();
                    assert!(
                        answer.allowed && answer.lease_id.starts_with("open-"),
                        "{answer:?}"
                    );
                }
                (Err(status), false) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                }
                (other, _) => panic!("policy {policy}: unexpected {other:?}"),
            }
        }
        // The call's own policy wins over the daemon's; a value that names none is refused.
        let mut raw = client.raw();
        let call = |on_unavailable: i32| proto::AcquireRequest {
            entity_id: "own".into(),
            resource: "gpt-4".into(),
            consume: [("rpm".to_owned(), 1)].into(),
            limits: limits.iter().map(proto::Limit::from).collect(),
            on_unavailable,
            ..Default::default()
        };
        let opposite = if expect_admit {
            proto::OnUnavailable::Block
        } else {
            proto::OnUnavailable::Allow
        };
        match raw.acquire(call(opposite.into())).await {
            Ok(answer) => assert!(!expect_admit && answer.get_ref().allowed, "{answer:?}"),
            Err(status) => assert!(
                expect_admit && status.code() == Code::Unavailable,
                "{status:?}"
            ),
        }
        let bad = raw.acquire(call(7)).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
        assert!(bad.message().starts_with("on_unavailable: "), "{bad:?}");
        let outcome = if expect_admit {
            "failed_open"
        } else {
            "failed_closed"
        };
        let counted = daemon.metric(
            "zae_limiter_decisions_total",
            &[&format!("outcome=\"{outcome}\"")],
        );
        assert_eq!(counted, 20.0, "{policy}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_two_daemons_adds_up_in_the_store() {
    use zae_limiter::domain::records::Period;
    let store = common::dynamodb().await;
    let ns = common::unique_namespace();
    let cfg = config(&ns, &common::endpoint(), "usage_flush_ms = 200\n");
    let mut daemons: Vec<Daemon> = (0..2).map(|_| Daemon::start(&cfg, &[])).collect();
    let limits = [Limit::per_hour("tpm", 1_000_000).unwrap()];
    let mut expected = 0;
    for (i, daemon) in daemons.iter().enumerate() {
        let client = daemon.client().await;
        for n in 0..20 {
            let req = Acquire::new("metered", "gpt-4")
                .limits(&limits)
                .consume("tpm", 10);
            let mut lease = client.acquire(req).await.unwrap();
            if n % 5 == 0 {
                lease.rollback().await.unwrap();
            } else {
                lease.adjust([("tpm", i as i64 + 1)]).await.unwrap();
                lease.commit().await.unwrap();
                expected += 10 + i as i64 + 1;
            }
        }
    }
    // Stopping flushes what is left.
    for d in &mut daemons {
        assert!(d.terminate().success());
    }
    let entity = EntityId::new("metered").unwrap();
    let hours = store
        .usage_of(&ns, &entity, None, Period::Hour, 0, i64::MAX)
        .await
        .unwrap();
    let total: i64 = hours.iter().flat_map(|u| &u.amounts).map(|(_, a)| a).sum();
    assert_eq!(
        total,
        expected * 1_000,
        "usage equals the admitted consumption"
    );
    assert_eq!(
        consumed(&*store, &ns, "metered", "tpm").await,
        expected * 1_000
    );
}

/// `limits plan|diff|apply` on DynamoDB Local (the memory store's run is in tests/daemon.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limits_manifest_is_planned_applied_once_and_refused_whole_when_bad() {
    let _ = common::dynamodb().await;
    let ns = common::unique_namespace();
    let daemon = Daemon::start(&config(&ns, &common::endpoint(), ""), &[]);
    common::manifest::scenario(&daemon, ns.as_str()).await;
}
