//! Black-box tests of the daemon: each starts the real binary on a socket in a temporary folder
//! and speaks to it only through the client library, the CLI, `/metrics` and gRPC health.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use zae_limiter::Limit;
use zae_limiter::client::{Acquire, Client, ClientError, Lease};
use zae_limiter::proto;

const MEMORY: &str = "[limiter]\nbackend = \"memory\"\n";

fn rpm(n: u64) -> Limit {
    Limit::per_minute("rpm", n).unwrap()
}

fn tpm(n: u64) -> Limit {
    Limit::per_minute("tpm", n).unwrap()
}

async fn acquire(
    client: &Client,
    entity: &str,
    limits: &[Limit],
    consume: &[(&str, i64)],
) -> Result<Lease, ClientError> {
    let mut req = Acquire::new(entity, "gpt-4").limits(limits);
    for (name, n) in consume {
        req = req.consume(*name, *n);
    }
    client.acquire(req).await
}

/// Runs the command line against the daemon: exit status, stdout, stderr.
/// Runs the CLI, expecting it to succeed; returns its standard output.
fn cli_ok(daemon: &Daemon, args: &[&str]) -> String {
    let (code, out, err) = run_cli(daemon, args);
    assert_eq!(code, Some(0), "{args:?}: {err}");
    out
}

fn run_cli(daemon: &Daemon, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
        .args(args)
        .arg("--socket")
        .arg(&daemon.socket)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the standard gRPC health check answers for `service` ("": the whole daemon).
async fn health(client: &Client, service: &str) -> ServingStatus {
    let mut health = tonic_health::pb::health_client::HealthClient::new(client.channel());
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    health.check(request).await.unwrap().into_inner().status()
}

fn code(e: ClientError) -> (Code, String) {
    match e {
        ClientError::Status(s) => (s.code(), s.message().to_owned()),
        other => panic!("expected a gRPC status, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admits_then_rejects_with_retry_after() {
    let daemon = Daemon::start(MEMORY, &[]);
    let client = daemon.client().await;
    let limits = [rpm(3)];
    for _ in 0..3 {
        acquire(&client, "k1", &limits, &[("rpm", 1)])
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    match acquire(&client, "k1", &limits, &[("rpm", 1)]).await {
        Err(ClientError::OverLimit {
            retry_after,
            violations,
            refused_by: None,
        }) => {
            // One token of 3 per minute: at most 20 s away, less the time the test took.
            let wait = retry_after.unwrap();
            assert!(
                wait <= Duration::from_secs(20) && wait > Duration::from_secs(15),
                "{wait:?}"
            );
            assert_eq!(violations.len(), 1);
            assert_eq!(
                (
                    violations[0].limit.as_str(),
                    violations[0].available,
                    violations[0].requested
                ),
                ("rpm", 0, 1)
            );
        }
        other => panic!("expected over limit, got {other:?}"),
    }
    // Another entity has its own bucket.
    acquire(&client, "k2", &limits, &[("rpm", 3)])
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    // A request above capacity can never fit: no retry-after.
    match acquire(&client, "k3", &limits, &[("rpm", 4)]).await {
        Err(ClientError::OverLimit {
            retry_after: None, ..
        }) => {}
        other => panic!("expected a never-fitting rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjusting_into_debt_makes_the_next_wait_longer() {
    let daemon = Daemon::start(MEMORY, &[]);
    let client = daemon.client().await;
    let limits = [tpm(1_000)];
    let mut lease = acquire(&client, "k", &limits, &[("tpm", 1_000)])
        .await
        .unwrap();
    let before = match acquire(&client, "k", &limits, &[("tpm", 1)]).await {
        Err(ClientError::OverLimit { retry_after, .. }) => retry_after.unwrap(),
        other => panic!("expected over limit, got {other:?}"),
    };
    assert!(
        before <= Duration::from_millis(60),
        "one token at 1,000/min: {before:?}"
    );
    lease.adjust([("tpm", 500)]).await.unwrap();
    lease.commit().await.unwrap();
    let available = client.available("k", "gpt-4", &limits).await.unwrap();
    assert!(
        available["tpm"] < -490,
        "in debt after the adjustment: {available:?}"
    );
    match acquire(&client, "k", &limits, &[("tpm", 1)]).await {
        Err(ClientError::OverLimit { retry_after, .. }) => {
            // 501 tokens short at 1,000 per minute: about 30 s.
            let after = retry_after.unwrap();
            assert!(
                after > Duration::from_secs(29) && after <= Duration::from_millis(30_060),
                "{after:?}"
            );
        }
        other => panic!("expected over limit, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_writes_the_net_delta_and_rollback_gives_everything_back() {
    let daemon = Daemon::start(MEMORY, &[]);
    let client = daemon.client().await;
    let limits = [Limit::per_hour("tpm", 1_000).unwrap()];
    let avail = || async { client.available("k", "gpt-4", &limits).await.unwrap()["tpm"] };

    let lease = acquire(&client, "k", &limits, &[("tpm", 100)])
        .await
        .unwrap();
    assert_eq!(avail().await, 900);
    lease.rollback().await.unwrap();
    assert_eq!(avail().await, 1_000);

    let mut lease = acquire(&client, "k", &limits, &[("tpm", 100)])
        .await
        .unwrap();
    lease.adjust([("tpm", -30)]).await.unwrap();
    lease.adjust([("tpm", 5)]).await.unwrap();
    assert_eq!(avail().await, 900, "adjustments are written at commit");
    lease.commit().await.unwrap();
    assert_eq!(avail().await, 925);

    // Adjusting a limit the lease does not have is refused and names the field.
    let mut lease = acquire(&client, "k", &limits, &[("tpm", 1)]).await.unwrap();
    let (c, message) = code(lease.adjust([("rpm", 1)]).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument);
    assert!(message.starts_with("delta:"), "{message}");
    let id = lease.id().to_owned();
    lease.commit().await.unwrap();
    // A closed lease (its closer heard the answer) is gone: adjusting or closing it again is
    // NOT_FOUND, and nothing more is written.
    let mut raw = client.raw();
    let err = raw
        .adjust(proto::AdjustRequest {
            lease_id: id.clone(),
            delta: [("tpm".to_owned(), 1)].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = raw
        .commit(proto::LeaseRequest {
            lease_id: id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(avail().await, 924);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_carrying_adjustments_records_them_or_refuses_them_whole() {
    let daemon = Daemon::start(MEMORY, &[]);
    let client = daemon.client().await;
    let limits = [Limit::per_hour("tpm", 1_000).unwrap()];
    let avail = || async { client.available("k", "gpt-4", &limits).await.unwrap()["tpm"] };
    let mut raw = client.raw();
    let commit = |id: &str, delta: &[(&str, i64)]| proto::LeaseRequest {
        lease_id: id.to_owned(),
        delta: delta.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
    };

    // The adjustments a client kept until the end go with the commit: one call.
    let id = acquire(&client, "k", &limits, &[("tpm", 100)])
        .await
        .unwrap()
        .into_id();
    raw.commit(commit(&id, &[("tpm", 150)])).await.unwrap();
    assert_eq!(avail().await, 750);

    // Refused whole where Adjust would refuse (giving back more than acquired, a limit the lease
    // does not have): the lease stays open and unchanged, and a plain commit closes it.
    let id = acquire(&client, "k", &limits, &[("tpm", 100)])
        .await
        .unwrap()
        .into_id();
    let err = raw.commit(commit(&id, &[("tpm", -101)])).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().starts_with("delta[tpm]"), "{err:?}");
    let err = raw
        .commit(commit(&id, &[("tpm", 1), ("rpm", 1)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        avail().await,
        650,
        "nothing of the refused commits was recorded"
    );
    raw.commit(commit(&id, &[("tpm", -100)])).await.unwrap();
    assert_eq!(
        avail().await,
        750,
        "the lease was still open: its give-back landed"
    );

    // Rollback gives back what the acquire took, whatever delta comes with it.
    let id = acquire(&client, "k", &limits, &[("tpm", 100)])
        .await
        .unwrap()
        .into_id();
    raw.rollback(commit(&id, &[("tpm", 500)])).await.unwrap();
    assert_eq!(avail().await, 750);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_lease_is_rolled_back() {
    let daemon = Daemon::start(MEMORY, &[]);
    let client = daemon.client().await;
    let limits = [Limit::per_hour("rpm", 10).unwrap()];
    drop(acquire(&client, "k", &limits, &[("rpm", 4)]).await.unwrap());
    let mut restored = false;
    for _ in 0..100 {
        if client.available("k", "gpt-4", &limits).await.unwrap()["rpm"] == 10 {
            restored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(restored, "the dropped lease's tokens came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lease_lives_past_its_ttl_while_its_holder_renews_it() {
    let daemon = Daemon::start("[limiter]\nlease_ttl_ms = 2000\n", &[]);
    let client = daemon.client().await;
    // A day's worth: the seconds this test takes refill less than a token.
    let limits = [Limit::per_day("tpm", 1_000).unwrap()];
    // Held three TTLs and more (an LLM stream longer than the TTL): the client renews it.
    let mut held = acquire(&client, "stream", &limits, &[("tpm", 100)])
        .await
        .unwrap();
    // Abandoned at once: no renewal, nobody calls it.
    let abandoned = acquire(&client, "gone", &limits, &[("tpm", 100)])
        .await
        .unwrap()
        .into_id();
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    held.adjust([("tpm", 400)]).await.unwrap();
    held.commit()
        .await
        .expect("a renewed lease outlives its TTL");
    let left = client.available("stream", "gpt-4", &limits).await.unwrap();
    assert_eq!(left["tpm"], 1_000 - 500, "the adjustment was written");
    let err = client
        .raw()
        .rollback(proto::LeaseRequest {
            lease_id: abandoned,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let left = client.available("gone", "gpt-4", &limits).await.unwrap();
    assert_eq!(left["tpm"], 1_000 - 100, "an expired lease stays consumed");
    assert_eq!(daemon.metric("zae_limiter_leases_expired_total", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclosed_leases_expire_and_stay_consumed() {
    let daemon = Daemon::start("[limiter]\nlease_ttl_ms = 200\n", &[]);
    let client = daemon.client().await;
    let limits = [Limit::per_hour("rpm", 10).unwrap()];
    let id = acquire(&client, "k", &limits, &[("rpm", 3)])
        .await
        .unwrap()
        .into_id();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut raw = client.raw();
    for result in [
        raw.commit(proto::LeaseRequest {
            lease_id: id.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
        raw.rollback(proto::LeaseRequest {
            lease_id: id.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
    ] {
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(err.message().contains("expired"), "{}", err.message());
    }
    assert_eq!(
        client.available("k", "gpt-4", &limits).await.unwrap()["rpm"],
        7
    );
    assert_eq!(daemon.metric("zae_limiter_leases_expired_total", &[]), 1.0);
    // Ids that never existed, and ids that are not ids.
    assert_eq!(
        raw.commit(proto::LeaseRequest {
            lease_id: format!("ffff.{}", "0".repeat(32)),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    let err = raw
        .commit(proto::LeaseRequest {
            lease_id: "not-a-lease".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("lease_id:"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_a_cached_rejection_that_costs_no_store_call() {
    let daemon = Daemon::start(MEMORY, &[]);
    let client = daemon.client().await;
    for service in ["", "zae_limiter.v1.RateLimiter"] {
        assert_eq!(health(&client, service).await, ServingStatus::Serving);
    }
    let limits = [rpm(2)];
    for _ in 0..2 {
        acquire(&client, "hot", &limits, &[("rpm", 1)])
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    let store_calls = daemon.metric("zae_limiter_store_calls_total", &[]);
    assert!(
        store_calls >= 2.0,
        "the admits reached the store: {store_calls}"
    );
    for _ in 0..50 {
        assert!(matches!(
            acquire(&client, "hot", &limits, &[("rpm", 1)]).await,
            Err(ClientError::OverLimit { .. })
        ));
    }
    let text = daemon.scrape();
    use common::daemon::metric_in;
    assert_eq!(
        metric_in(&text, "zae_limiter_store_calls_total", &[]),
        store_calls,
        "rejections made no store call"
    );
    assert_eq!(
        metric_in(
            &text,
            "zae_limiter_decisions_total",
            &["outcome=\"rejected_cached\""]
        ),
        50.0
    );
    assert_eq!(
        metric_in(
            &text,
            "zae_limiter_decisions_total",
            &["outcome=\"admitted\""]
        ),
        2.0
    );
    assert_eq!(
        metric_in(&text, "zae_limiter_store_write_units_total", &[]),
        2.0
    );
    assert_eq!(metric_in(&text, "zae_limiter_actors", &[]), 1.0);
    assert_eq!(metric_in(&text, "zae_limiter_leases_open", &[]), 0.0);
    assert!(
        text.contains("zae_limiter_decision_duration_seconds_bucket"),
        "a real histogram"
    );
    assert!(text.contains("zae_limiter_batch_size_bucket"));
    assert!(
        !text.contains("entity=") && !text.contains("\"hot\""),
        "no entity ids in labels"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_or_out_of_range_naming_the_field_and_writes_nothing() {
    let daemon = Daemon::start(MEMORY, &[]);
    let client = daemon.client().await;
    let limits = [rpm(10)];
    let cases: Vec<(Acquire, &str)> = vec![
        (
            Acquire::new("", "gpt-4").limits(&limits).consume("rpm", 1),
            "entity_id",
        ),
        (
            Acquire::new("k", "x".repeat(300))
                .limits(&limits)
                .consume("rpm", 1),
            "resource",
        ),
        (
            Acquire::new("k", "gpt-4")
                .limits(&limits)
                .consume("rpm", -1),
            "consume[rpm]",
        ),
        (
            Acquire::new("k", "gpt-4").limits(&limits).consume("tpm", 1),
            "consume",
        ),
        (
            Acquire::new("k", "gpt-4")
                .limits(&limits)
                .consume("bad name", 1),
            "consume",
        ),
        (
            Acquire::new("k", "gpt-4")
                .limits(&limits)
                .consume("rpm", 1)
                .namespace("elsewhere"),
            "namespace",
        ),
        (Acquire::new("k", "gpt-4").consume("rpm", 1), "limits"),
    ];
    for (req, field) in cases {
        let err = client.acquire(req).await.unwrap_err();
        // The field also comes as a structured detail (google.rpc.BadRequest).
        if let ClientError::Status(s) = &err {
            use tonic_types::StatusExt;
            let detail = s.get_details_bad_request().expect("a BadRequest detail");
            assert_eq!(detail.field_violations[0].field, field, "{s:?}");
        }
        let (c, message) = code(err);
        assert_eq!(c, Code::InvalidArgument, "{message}");
        assert!(
            message.starts_with(&format!("{field}:")),
            "{message:?} should name {field}"
        );
    }
    // Well formed but beyond what a bucket can hold: OUT_OF_RANGE, naming the field.
    let huge = Acquire::new("k", "gpt-4")
        .limits(&limits)
        .consume("rpm", i64::MAX);
    let (c, message) = code(client.acquire(huge).await.unwrap_err());
    assert_eq!(c, Code::OutOfRange, "{message}");
    assert!(message.starts_with("consume[rpm]:"), "{message}");
    let mut raw = client.raw();
    let bad_limit = proto::AcquireRequest {
        entity_id: "k".into(),
        resource: "gpt-4".into(),
        consume: [("rpm".to_owned(), 1)].into(),
        limits: vec![proto::Limit {
            name: "rpm".into(),
            capacity: 0,
            refill_amount: 1,
            refill_period_ms: 1000,
            soft: false,
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = raw.acquire(bad_limit).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("limits[0]:"), "{}", err.message());
    // Only the stored-limits look-up of the last case read the store; nothing was written.
    let writes = daemon.metric("zae_limiter_store_calls_total", &["operation=\"write\""]);
    assert_eq!(writes, 0.0);
    assert_eq!(
        daemon.metric("zae_limiter_store_write_units_total", &[]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_acquires_and_reports_over_limit_with_its_exit_status() {
    let daemon = Daemon::start(MEMORY, &[]);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
            .arg("acquire")
            .arg("--socket")
            .arg(&daemon.socket)
            .args([
                "--entity",
                "cli",
                "--resource",
                "gpt-4",
                "--limit",
                "rpm=2/1m",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let first = run(&["--consume", "rpm=1"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(out["allowed"], true);
    assert_eq!(out["lease"], "committed");
    let rolled = run(&["--consume", "rpm=1", "--rollback"]);
    assert!(rolled.status.success());
    assert!(run(&["--consume", "rpm=1"]).status.success());
    let over = run(&["--consume", "rpm=1"]);
    assert_eq!(over.status.code(), Some(3));
    let out: serde_json::Value = serde_json::from_slice(&over.stdout).unwrap();
    assert_eq!(out["allowed"], false);
    assert_eq!(out["violations"][0]["limit"], "rpm");
    assert!(out["retry_after_ms"].as_u64().unwrap() > 0);
    let bad = run(&["--consume", "rpm=-1"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.starts_with("error: InvalidArgument: consume[rpm]"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_in_flight_requests_and_removes_the_socket() {
    // With 3 s between writes, acquires wait in the actor's queue: in flight at SIGTERM.
    // A deadline well past that wait.
    let mut daemon = Daemon::start(
        "[server]\nrequest_timeout_ms = 20000\n[limiter]\nmin_commit_interval_ms = 3000\n",
        &[],
    );
    let client = daemon.client().await;
    let limits = [Limit::per_hour("rpm", 1_000).unwrap()];
    acquire(&client, "e", &limits, &[("rpm", 1)])
        .await
        .unwrap()
        .into_id();
    let in_flight: Vec<_> = (0..16)
        .map(|_| {
            let (client, limits) = (client.clone(), limits.clone());
            tokio::spawn(async move {
                acquire(&client, "e", &limits, &[("rpm", 1)])
                    .await
                    .map(Lease::into_id)
            })
        })
        .collect();
    // Terminated once all 16 wait in the actor's queue (the queue-depth gauge says so).
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while daemon.metric("zae_limiter_acquires_waiting", &[]) < 16.0
        && std::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(daemon.metric("zae_limiter_acquires_waiting", &[]), 16.0);
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status}");
    for t in in_flight {
        let answer = t.await.unwrap();
        assert!(
            answer.is_ok(),
            "an in-flight request was answered: {answer:?}"
        );
    }
    assert!(!daemon.socket.exists(), "the socket file is removed");
}

/// `worker_threads = 1` runs the daemon on a single-threaded runtime: everything (connections,
/// actors, timers, the metrics listener, signals) shares that one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_runtime_thread_serves_concurrent_clients_and_shuts_down() {
    let mut daemon = Daemon::start(MEMORY, &["--worker-threads", "1"]);
    let clients = [daemon.client().await, daemon.client().await];
    // Per hour: no token comes back while the test runs, however slow the machine.
    let limits = [Limit::per_hour("rpm", 25).unwrap()];
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let (client, limits) = (clients[i % 2].clone(), limits.clone());
            tokio::spawn(async move {
                let lease = acquire(&client, "shared", &limits, &[("rpm", 1)]).await?;
                lease.commit().await
            })
        })
        .collect();
    let (mut admitted, mut refused) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(()) => admitted += 1,
            Err(ClientError::OverLimit { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((admitted, refused), (25, 15));
    assert_eq!(health(&clients[0], "").await, ServingStatus::Serving);
    assert_eq!(
        daemon.metric("zae_limiter_decisions_total", &["outcome=\"admitted\""]),
        25.0
    );
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!daemon.socket.exists(), "the socket file is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let first = Daemon::start_at(MEMORY, Some(path.clone()), &[]);
    assert_eq!(first.socket, path);
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
        .args(["serve", "--no-metrics", "--socket"])
        .arg(&first.socket)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already listening"), "{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&first.socket)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o660
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_actors_stop_and_come_back_on_demand() {
    let daemon = Daemon::start("[limiter]\nidle_timeout_ms = 1500\n", &[]);
    let client = daemon.client().await;
    let limits = [Limit::per_hour("rpm", 10).unwrap()];
    for i in 0..50 {
        acquire(&client, &format!("e{i}"), &limits, &[("rpm", 1)])
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    assert_eq!(daemon.metric("zae_limiter_actors", &[]), 50.0);
    let mut stopped = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if daemon.metric("zae_limiter_actors", &[]) == 0.0 {
            stopped = true;
            break;
        }
    }
    assert!(stopped, "idle actors stopped");
    // A stopped entity's state is in the store: a new actor picks it up.
    let avail = client.available("e0", "gpt-4", &limits).await.unwrap();
    assert_eq!(avail["rpm"], 9);
}

#[test]
fn the_blocking_client_serves_code_without_a_runtime() {
    use zae_limiter::client::BlockingClient;
    let daemon = Daemon::start(MEMORY, &[]);
    let client = BlockingClient::connect(&daemon.socket).unwrap();
    let limits = [Limit::per_hour("tpm", 100).unwrap()];
    let acquire = || {
        Acquire::new("sync", "gpt-4")
            .limits(&limits)
            .consume("tpm", 60)
    };
    let mut lease = client.acquire(acquire()).unwrap();
    assert!(!lease.bypassed());
    let status = &lease.statuses()[0];
    assert_eq!(
        (status.name.as_str(), status.available_milli),
        ("tpm", 100_000)
    );
    lease.adjust([("tpm", -20)]).unwrap();
    lease.commit().unwrap();
    // 40 used; a second 60 fits, a third does not, and dropping the second gives it back.
    let second = client.acquire(acquire()).unwrap();
    assert!(matches!(
        client.acquire(acquire()),
        Err(ClientError::OverLimit { .. })
    ));
    drop(second);
    client.acquire(acquire()).unwrap().rollback().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_until_available_reports_the_wait_without_consuming() {
    let daemon = Daemon::start(MEMORY, &[]);
    let client = daemon.client().await;
    let limits = [Limit::per_second("rps", 10).unwrap()];
    acquire(&client, "t", &limits, &[("rps", 10)])
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    let mut raw = client.raw();
    let ask = |n: i64| proto::TimeUntilAvailableRequest {
        entity_id: "t".into(),
        resource: "gpt-4".into(),
        consume: [("rps".to_owned(), n)].into(),
        limits: limits.iter().map(proto::Limit::from).collect(),
        ..Default::default()
    };
    let wait = raw.time_until_available(ask(5)).await.unwrap().into_inner();
    let ms = wait.retry_after_ms.unwrap();
    assert!(ms > 0 && ms <= 500, "five tokens at 10/s: {ms} ms");
    let never = raw
        .time_until_available(ask(11))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(never.retry_after_ms, None, "above capacity never fits");
    // Asking consumed nothing: the same wait (less elapsed time) is reported again.
    let again = raw.time_until_available(ask(5)).await.unwrap().into_inner();
    assert!(again.retry_after_ms.unwrap() <= ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_bucket_sheds_load_with_unavailable() {
    // One write every 2 s (well within the deadline) and room for one waiting acquire.
    let daemon = Daemon::start(
        "[server]\nrequest_timeout_ms = 20000\n[limiter]\nmin_commit_interval_ms = 2000\nmax_queue = 1\n",
        &[],
    );
    let client = daemon.client().await;
    let limits = [Limit::per_hour("rpm", 100).unwrap()];
    acquire(&client, "busy", &limits, &[("rpm", 1)])
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    // Two acquires at once: the bucket has room for one waiting, so the other is shed (which
    // one depends on which arrives first, not on timing).
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let (client, limits) = (client.clone(), limits.clone());
            tokio::spawn(async move {
                acquire(&client, "busy", &limits, &[("rpm", 1)])
                    .await
                    .map(Lease::into_id)
            })
        })
        .collect();
    let mut shed = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => {}
            Err(e) => {
                let (c, message) = code(e);
                assert_eq!(c, Code::Unavailable);
                assert!(message.contains("overloaded"), "{message}");
                assert!(
                    !message.contains("store"),
                    "not the store's fault: {message}"
                );
                shed += 1;
            }
        }
    }
    assert_eq!(shed, 1, "one waits, one is shed; the waiting one is served");
    assert_eq!(
        daemon.metric("zae_limiter_decisions_total", &["outcome=\"shed\""]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_may_use_only_the_namespaces_its_uid_is_granted() {
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    #[allow(unsafe_code)]
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let config = format!(
        "[limiter]\nnamespaces = [\"alpha\", \"beta\"]\n\
         [[access]]\nuid = {uid}\nnamespaces = [\"alpha\"]\n\
         [[access]]\ngid = {}\nnamespaces = [\"beta\"]\n",
        gid.wrapping_add(1)
    );
    let daemon = Daemon::start(&config, &[]);
    let client = daemon.client().await;
    let limits = [rpm(10)];
    let req = |ns: &str| {
        Acquire::new("k", "gpt-4")
            .limits(&limits)
            .consume("rpm", 1)
            .namespace(ns)
    };
    let lease = client.acquire(req("alpha")).await.unwrap();
    let (c, message) = code(client.acquire(req("beta")).await.unwrap_err());
    assert_eq!(c, Code::PermissionDenied);
    assert!(
        message.contains(&format!("uid {uid}")) && message.contains("\"beta\""),
        "{message}"
    );
    // The default namespace is the first configured one, which this caller may use.
    client
        .acquire(req(""))
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    let mut admin = client.admin();
    let denied = admin
        .get_limits(proto::LimitsRequest {
            namespace: "beta".into(),
            scope: None,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    lease.commit().await.unwrap();
    // Nothing was touched in the refused namespace.
    assert_eq!(daemon.metric("zae_limiter_decisions_total", &[]), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_limits_resolve_entity_resource_then_entity_then_resource_then_system() {
    let daemon = Daemon::start(MEMORY, &[]);
    let client = daemon.client().await;
    let mut admin = client.admin();
    let scope = |e: Option<&str>, r: Option<&str>| proto::LimitScope {
        entity_id: e.map(Into::into),
        resource: r.map(Into::into),
    };
    for (capacity, s) in [
        (1, scope(None, None)),
        (2, scope(None, Some("gpt-4"))),
        (3, scope(Some("e"), None)),
        (4, scope(Some("e"), Some("gpt-4"))),
    ] {
        admin
            .set_limits(proto::SetLimitsRequest {
                namespace: String::new(),
                scope: Some(s),
                limits: vec![proto::Limit::from(
                    &Limit::per_hour("rpm", capacity).unwrap(),
                )],
            })
            .await
            .unwrap();
    }
    let capacity = |entity: &'static str, resource: &'static str| {
        let client = client.clone();
        async move { client.available(entity, resource, &[]).await.unwrap()["rpm"] }
    };
    assert_eq!(capacity("e", "gpt-4").await, 4, "entity + resource");
    assert_eq!(capacity("e", "other").await, 3, "entity default");
    assert_eq!(capacity("x", "gpt-4").await, 2, "resource default");
    assert_eq!(capacity("x", "other").await, 1, "system default");
    // Limits in the call win over stored ones.
    let explicit = client
        .available("e", "gpt-4", &[Limit::per_hour("rpm", 7).unwrap()])
        .await
        .unwrap();
    assert_eq!(explicit["rpm"], 7);
    // A change made through the daemon applies at once, cache or not.
    admin
        .delete_limits(proto::LimitsRequest {
            namespace: String::new(),
            scope: Some(scope(Some("e"), Some("gpt-4"))),
        })
        .await
        .unwrap();
    assert_eq!(capacity("e", "gpt-4").await, 3);
    // The stored limits decide acquires too.
    for _ in 0..3 {
        client
            .consume(Acquire::new("e", "gpt-4").consume("rpm", 1))
            .await
            .unwrap();
    }
    assert!(matches!(
        client
            .consume(Acquire::new("e", "gpt-4").consume("rpm", 1))
            .await,
        Err(ClientError::OverLimit { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_limits_and_audit_from_the_command_line() {
    let daemon = Daemon::start(MEMORY, &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    let (code, table, _) = cli(&["entity", "create", "proj-1", "--name", "Production"]);
    assert_eq!(code, Some(0));
    assert!(
        table.starts_with("ID") && table.contains("proj-1  Production"),
        "{table}"
    );
    cli(&[
        "entity",
        "create",
        "key-1",
        "--parent",
        "proj-1",
        "--cascade",
        "--meta",
        "team=ml",
    ]);
    let (_, json, _) = cli(&["entity", "children", "proj-1", "--output", "json"]);
    let children: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(children[0]["id"], "key-1");
    assert_eq!(children[0]["cascade"], true);
    assert_eq!(children[0]["metadata"]["team"], "ml");
    let (code, _, _) = cli(&[
        "limits",
        "set",
        "--entity",
        "proj-1",
        "--limit",
        "rpm=100/1m",
        "--limit",
        "tpm=10000/1m,burst=15000",
    ]);
    assert_eq!(code, Some(0));
    let (_, json, _) = cli(&["limits", "get", "--entity", "proj-1", "--output", "json"]);
    let limits: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(limits[1]["name"], "tpm");
    assert_eq!(limits[1]["capacity"], 15000);
    let (_, json, _) = cli(&["audit", "proj-1", "--output", "json"]);
    let audit: serde_json::Value = serde_json::from_str(&json).unwrap();
    let actions: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["limits_set", "entity_created"]);
    // The entity was created without a name given, the limits too: the uid alone.
    assert!(
        audit["records"][0]["principal"]
            .as_str()
            .unwrap()
            .starts_with("uid:")
    );
    // A name given by the caller is recorded before the uid the daemon saw.
    cli(&["entity", "create", "named", "--principal", "alice"]);
    let (_, json, _) = cli(&["audit", "named", "--output", "json"]);
    let audit: serde_json::Value = serde_json::from_str(&json).unwrap();
    let principal = audit["records"][0]["principal"].as_str().unwrap();
    assert!(principal.starts_with("alice (uid:"), "{principal}");
    let (code, _, err) = cli(&["entity", "create", "proj-1"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: AlreadyExists:"), "{err}");
    let (code, _, err) = cli(&["entity", "create", "orphan", "--parent", "nope"]);
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("error: FailedPrecondition: parent \"nope\""),
        "{err}"
    );
    // A parent with children is not deleted; after moving the child away it is.
    let (code, _, err) = cli(&["entity", "delete", "proj-1"]);
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("error: FailedPrecondition:") && err.contains("children"),
        "{err}"
    );
    let (code, table, _) = cli(&["entity", "move", "key-1", "--no-parent"]);
    assert_eq!(code, Some(0));
    assert!(
        table.contains("key-1") && table.contains("  -  "),
        "{table}"
    );
    assert_eq!(cli(&["entity", "delete", "proj-1"]).0, Some(0));
    let (code, _, err) = cli(&["entity", "get", "proj-1"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: NotFound:"), "{err}");
    let (code, _, err) = cli(&["limits", "set", "--limit", "rpm=0/1m"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("rpm"), "{err}");
}

/// `zae_limiter_usage_pending` counts the snapshot additions not written yet (an hour's and a
/// day's per entity and resource) and drains once a flush has written them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_usage_is_counted_until_flushed() {
    let limits = [Limit::per_hour("tpm", 10_000).unwrap()];
    for (flush_ms, pending) in [(3_600_000, 4.0), (100, 0.0)] {
        let daemon = Daemon::start(&format!("[limiter]\nusage_flush_ms = {flush_ms}\n"), &[]);
        let client = daemon.client().await;
        for entity in ["a", "b"] {
            acquire(&client, entity, &limits, &[("tpm", 5)])
                .await
                .unwrap()
                .commit()
                .await
                .unwrap();
        }
        let mut seen = daemon.metric("zae_limiter_usage_pending", &[]);
        for _ in 0..200 {
            if seen == pending {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            seen = daemon.metric("zae_limiter_usage_pending", &[]);
        }
        assert_eq!(seen, pending, "usage_flush_ms = {flush_ms}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_totals_follow_adjustments_and_rollbacks() {
    let daemon = Daemon::start("[limiter]\nusage_flush_ms = 100\n", &[]);
    let client = daemon.client().await;
    let limits = [Limit::per_hour("tpm", 10_000).unwrap()];
    let mut lease = acquire(&client, "u", &limits, &[("tpm", 100)])
        .await
        .unwrap();
    lease.adjust([("tpm", 50)]).await.unwrap();
    lease.commit().await.unwrap();
    acquire(&client, "u", &limits, &[("tpm", 30)])
        .await
        .unwrap()
        .rollback()
        .await
        .unwrap();
    client
        .consume(Acquire::new("u", "gpt-4").limits(&limits).consume("tpm", 7))
        .await
        .unwrap();
    let mut admin = client.admin();
    let mut totals: Vec<i64> = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let snapshots = |period: &str| proto::UsageRequest {
            entity_id: "u".into(),
            period: period.into(),
            ..Default::default()
        };
        let hour = admin
            .get_usage(snapshots("hour"))
            .await
            .unwrap()
            .into_inner()
            .snapshots;
        let day = admin
            .get_usage(snapshots("day"))
            .await
            .unwrap()
            .into_inner()
            .snapshots;
        // Summed, in case the test straddles an hour (or day) boundary.
        totals = [hour, day]
            .iter()
            .map(|snapshots| snapshots.iter().map(|s| s.consumed_milli["tpm"]).sum())
            .collect();
        if totals == [157_000, 157_000] {
            break;
        }
    }
    assert_eq!(
        totals,
        [157_000, 157_000],
        "100 + 50 adjusted, 30 rolled back, 7 consumed"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
        .args(["usage", "u", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("hour") && table.contains("tpm=157"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_namespaces_are_created_listed_used_and_deleted() {
    let daemon = Daemon::start("[limiter]\nnamespaces = [\"default\", \"*\"]\n", &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    let client = daemon.client().await;
    let limits = [rpm(10)];
    let req = |ns: &str| {
        Acquire::new("k", "gpt-4")
            .limits(&limits)
            .consume("rpm", 1)
            .namespace(ns)
    };
    let (c, message) = code(client.acquire(req("tenant-x")).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument);
    assert!(message.contains("unknown namespace"), "{message}");
    assert_eq!(cli(&["namespace", "create", "tenant-x"]).0, Some(0));
    client
        .acquire(req("tenant-x"))
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    // Every usable namespace: the configured one and the registered one.
    let (_, json, _) = cli(&["namespace", "list", "--output", "json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&json).unwrap(),
        serde_json::json!(["default", "tenant-x"])
    );
    let (code_, _, err) = cli(&["namespace", "delete", "tenant-x"]);
    assert_eq!(code_, Some(1));
    assert!(err.contains("without --yes"), "{err}");
    assert_eq!(
        cli(&["namespace", "delete", "tenant-x", "--yes"]).0,
        Some(0)
    );
    let (c, _) = code(client.acquire(req("tenant-x")).await.unwrap_err());
    assert_eq!(
        c,
        Code::InvalidArgument,
        "a deleted namespace is unknown again"
    );
    // The configured namespace needs no registration.
    client
        .acquire(req("default"))
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
}

#[test]
fn registering_a_namespace_the_configuration_does_not_admit_says_how_to_use_it() {
    let daemon = Daemon::start(MEMORY, &[]);
    let (code, out, err) = run_cli(&daemon, &["namespace", "create", "tenant-y"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("add \"*\" (or \"tenant-y\") to limiter.namespaces"),
        "{out}"
    );
    let (_, list, _) = run_cli(&daemon, &["namespace", "list"]);
    assert_eq!(list.trim(), "NAMESPACE\ndefault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reflection_lists_the_services_for_grpcurl() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let daemon = Daemon::start(MEMORY, &[]);
    let client = daemon.client().await;
    let mut reflection = ServerReflectionClient::new(client.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("expected a service list, got {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in [
        "zae_limiter.v1.RateLimiter",
        "zae_limiter.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&service), "{service} missing from {names:?}");
    }
}

/// Sends one gRPC health check over the socket as gRPC's C core does (Python's `grpcio`, Ruby,
/// C++, ...): `:authority` is the socket path, percent-encoded; the second request refers to the
/// first one's authority through the HPACK dynamic table. Returns, per request, the response's
/// `grpc-status` or how the stream ended.
fn raw_health_checks(socket: &std::path::Path, authority: &str, requests: u32) -> Vec<String> {
    use std::io::{Read, Write};
    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    let mut conn = std::os::unix::net::UnixStream::connect(socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let mut encoder = loona_hpack::Encoder::new();
    for i in 0..requests {
        let stream = 1 + 2 * i;
        let fields: [(&[u8], &[u8]); 6] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/grpc.health.v1.Health/Check"),
            (b":authority", authority.as_bytes()),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
        ];
        frame(&mut out, 0x1, 0x4, stream, &encoder.encode(fields));
        frame(&mut out, 0x0, 0x1, stream, &[0, 0, 0, 0, 0]);
    }
    conn.write_all(&out).unwrap();

    let mut decoder = loona_hpack::Decoder::new();
    let mut ended = std::collections::BTreeMap::new();
    let mut buf = Vec::new();
    while ended.len() < requests as usize {
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).expect("the daemon answers");
        assert!(n > 0, "the daemon closed the connection: {ended:?}");
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes(buf[5..9].try_into().unwrap());
            let payload: Vec<u8> = buf.drain(..9 + len).skip(9).collect();
            match kind {
                0x1 => {
                    for (name, value) in decoder.decode(&payload).unwrap() {
                        if name == b"grpc-status" {
                            ended.insert(
                                stream,
                                format!("grpc-status {}", String::from_utf8_lossy(&value)),
                            );
                        }
                    }
                }
                0x3 => {
                    ended.insert(stream, format!("RST_STREAM {payload:?}"));
                }
                0x4 if flags & 0x1 == 0 => {
                    let mut ack = Vec::new();
                    frame(&mut ack, 0x4, 0x1, 0, &[]);
                    conn.write_all(&ack).unwrap();
                }
                _ => {}
            }
        }
    }
    ended.into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_send_the_socket_path_as_authority_are_served() {
    let daemon = Daemon::start(MEMORY, &[]);
    let encoded = daemon
        .socket
        .to_str()
        .unwrap()
        .trim_start_matches('/')
        .replace('/', "%2F");
    for authority in [
        encoded.as_str(),
        daemon.socket.to_str().unwrap(),
        "localhost",
    ] {
        let answers = raw_health_checks(&daemon.socket, authority, 3);
        assert_eq!(answers, vec!["grpc-status 0"; 3], "authority {authority:?}");
    }
}

#[test]
fn the_cli_speaks_in_the_users_units() {
    let daemon = Daemon::start(MEMORY, &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    let (code, _, err) = cli(&["limits", "set", "--entity", "proj-1", "--limit", "rpm=1/1m"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, table, _) = cli(&["limits", "get", "--entity", "proj-1"]);
    assert_eq!(
        table.trim(),
        "LIMIT  RATE  BURST\nrpm    1/1m  1",
        "{table}"
    );
    let (_, audit, _) = cli(&["audit", "proj-1"]);
    let row = audit.lines().nth(1).expect("one record");
    assert!(
        row.contains("limits_set") && row.contains("rpm 1/1m, burst 1"),
        "{audit}"
    );
    let at = row.split_whitespace().next().unwrap();
    assert!(
        at.len() == 24 && at.ends_with('Z') && at.as_bytes()[10] == b'T' && at.starts_with("20"),
        "RFC 3339: {at}"
    );
    let (_, json, _) = cli(&["audit", "proj-1", "--output", "json"]);
    let record = &serde_json::from_str::<serde_json::Value>(&json).unwrap()["records"][0];
    assert!(
        record["at_ms"].as_i64().unwrap() > 1_700_000_000_000,
        "{record}"
    );
    assert_eq!(record["after"][0]["refill_amount"], 1.0, "{record}");
    assert_eq!(record["after"][0]["refill_period"], "1m", "{record}");
    let (code, _, err) = cli(&["limits", "delete", "--entity", "nosuch"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("limits of entity nosuch does not exist"),
        "{err}"
    );
}

#[test]
fn the_cli_stores_soft_limits_and_reports_what_they_overdraw() {
    let daemon = Daemon::start(MEMORY, &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    let (code, _, err) = cli(&[
        "limits",
        "set",
        "--entity",
        "proj-s",
        "--limit",
        "rpm=10/1d",
        "--limit",
        "tpm=5/1d,soft",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (_, table, _) = cli(&["limits", "get", "--entity", "proj-s"]);
    assert_eq!(
        table.trim(),
        "LIMIT  RATE   BURST  SOFT\nrpm    10/1d  10     no\ntpm    5/1d   5      yes",
        "{table}"
    );
    let (_, audit, _) = cli(&["audit", "proj-s"]);
    assert!(audit.contains("tpm 5/1d, burst 5, soft"), "{audit}");
    let acquire = |tpm: &str| {
        cli(&[
            "acquire",
            "--entity",
            "proj-s",
            "--resource",
            "gpt-4",
            "--consume",
            "rpm=1",
            "--consume",
            tpm,
        ])
    };
    let (code, out, err) = acquire("tpm=4");
    assert_eq!(code, Some(0), "{err}");
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["overdrawn"], serde_json::json!([]), "{out}");
    // 1 token left of 5: the soft limit admits 4 more into debt, and says so.
    let (code, out, err) = acquire("tpm=4");
    assert_eq!(code, Some(0), "{err}");
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["overdrawn"], serde_json::json!(["tpm"]), "{out}");
    let (code, _, err) = cli(&[
        "limits",
        "set",
        "--entity",
        "proj-s",
        "--limit",
        "tpm=5/1d,soft,soft",
    ]);
    assert_eq!(code, Some(2), "a malformed limit is refused: {err}");
}

#[test]
fn the_cli_stores_the_namespace_failure_policy_and_audits_it() {
    let daemon = Daemon::start(MEMORY, &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    let (code, out, err) = cli(&["failure-policy", "get"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("none stored"), "{out}");
    let (code, _, err) = cli(&["failure-policy", "set", "allow"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = cli(&["failure-policy", "get", "--output", "json"]);
    assert_eq!(out.trim(), r#"{"on_unavailable":"allow"}"#);
    let (code, _, err) = cli(&["failure-policy", "delete"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cli(&["failure-policy", "delete"]);
    assert_eq!(code, Some(1), "nothing left to delete");
    assert!(err.contains("NotFound"), "{err}");
    let (code, _, err) = cli(&["failure-policy", "set", "sometimes"]);
    assert_eq!(code, Some(2), "{err}");
    let (_, audit, _) = cli(&["audit", "#system"]);
    let actions: Vec<_> = audit
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        actions,
        ["failure_policy_deleted", "failure_policy_set"],
        "{audit}"
    );
    // A call may name its own policy (the memory store never fails, so it only has to parse).
    let (code, _, err) = cli(&[
        "acquire",
        "--entity",
        "e",
        "--resource",
        "r",
        "--limit",
        "rpm=1/1m",
        "--consume",
        "rpm=1",
        "--on-unavailable",
        "block",
    ]);
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_disabled_from_the_cli_is_refused_with_its_own_error() {
    let daemon = Daemon::start(MEMORY, &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    let (code, _, err) = cli(&["gate", "disable", "--resource", "gpt-4"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = cli(&["gate", "get", "--resource", "gpt-4", "--output", "json"]);
    assert_eq!(out.trim(), r#"{"gate":"disabled"}"#);
    let client = daemon.client().await;
    let refused = acquire(&client, "k1", &[rpm(10)], &[("rpm", 1)]).await;
    match refused {
        Err(ClientError::Disabled {
            entity,
            resource,
            level,
        }) => assert_eq!(
            (entity.as_str(), resource.as_str(), level.as_str()),
            ("k1", "gpt-4", "resource gpt-4")
        ),
        other => panic!("expected Disabled, got {other:?}"),
    }
    // A stock client sees FAILED_PRECONDITION with the reason in its message.
    let raw = client
        .raw()
        .acquire(common::acquire_request("k1"))
        .await
        .unwrap_err();
    assert_eq!(raw.code(), Code::FailedPrecondition);
    assert!(raw.message().contains("is disabled"), "{raw:?}");
    let (code, _, err) = cli(&["gate", "enable", "--entity", "k1"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        acquire(&client, "k1", &[rpm(10)], &[("rpm", 1)])
            .await
            .is_ok()
    );
    assert!(matches!(
        acquire(&client, "k2", &[rpm(10)], &[("rpm", 1)]).await,
        Err(ClientError::Disabled { .. })
    ));
    let (code, _, err) = cli(&["gate", "disable"]);
    assert_eq!(code, Some(1), "no system gate: {err}");
    assert!(err.contains("InvalidArgument: scope"), "{err}");
    let metric = daemon.metric("zae_limiter_decisions_total", &["outcome=\"disabled\""]);
    assert_eq!(metric, 3.0);
}

/// A multi-resource acquire through the socket: the CLI's `--also`, all or none (a refusal of
/// the budget charges the model nothing), the refused resource named in each violation; the Rust
/// client's lease reaches the further resource, which is adjusted on its own and committed with
/// the rest, and says for itself whether it was bypassed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_resources_are_acquired_all_or_none_from_the_cli_and_the_client() {
    let daemon = Daemon::start(MEMORY, &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    for (resource, limit) in [("model", "tok=100/1d"), ("budget", "tok=3/1d")] {
        let (code, _, err) = cli(&["limits", "set", "--resource", resource, "--limit", limit]);
        assert_eq!(code, Some(0), "{err}");
    }
    let acquire = |budget: &str| {
        cli(&[
            "acquire",
            "--entity",
            "e",
            "--resource",
            "model",
            "--consume",
            "tok=10",
            "--also",
            budget,
        ])
    };
    let (code, out, err) = acquire("budget:tok=2");
    assert_eq!(code, Some(0), "{err}");
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["allowed"], true, "{out}");
    let (code, out, _) = acquire("budget:tok=2");
    assert_eq!(code, Some(3), "over the budget: {out}");
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["violations"][0]["resource"], "budget", "{out}");
    let (code, _, err) = acquire("budget:nope=1");
    assert_eq!(code, Some(1));
    assert!(err.contains("also[0].consume"), "{err}");
    let (code, _, err) = acquire("budget");
    assert_eq!(code, Some(2), "malformed --also: {err}");
    let client = daemon.client().await;
    let available = |resource: &'static str| {
        let client = client.clone();
        async move { client.available("e", resource, &[]).await.unwrap()["tok"] }
    };
    assert_eq!(
        available("model").await,
        90,
        "the refused acquires took nothing"
    );
    assert_eq!(available("budget").await, 1);
    let mut lease = client
        .acquire(
            Acquire::new("e", "model")
                .consume("tok", 1)
                .also("budget", [("tok", 1)]),
        )
        .await
        .unwrap();
    assert_eq!(lease.statuses().len(), 1, "the model's own statuses");
    let budget = lease.resource("budget").expect("the budget's lease");
    assert_eq!(budget.statuses()[0].resource, "budget");
    budget.adjust([("tok", -1)]).await.unwrap();
    assert!(lease.resource("model").is_none(), "not a further resource");
    lease.commit().await.unwrap();
    assert_eq!(available("model").await, 89);
    assert_eq!(
        available("budget").await,
        1,
        "adjusted back on its own lease"
    );
    // Each resource says for itself whether it was bypassed.
    cli_ok(
        &daemon,
        &["gate", "bypass", "--entity", "e", "--resource", "budget"],
    );
    let both = Acquire::new("e", "model")
        .consume("tok", 1)
        .also("budget", [("tok", 5)]);
    let mut lease = client.acquire(both).await.unwrap();
    assert!(!lease.bypassed(), "the model was not bypassed");
    assert!(lease.resource("budget").unwrap().bypassed());
    lease.commit().await.unwrap();
    assert_eq!(available("budget").await, 1, "never debited");
}

/// Cascade per resource from the CLI: on for a model (every entity), so an acquire of a child
/// on it charges the parent and one on another resource does not; shown, cleared, audited; no
/// system level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_bypasses_an_entity_and_its_parent_is_still_charged() {
    let daemon = Daemon::start(MEMORY, &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    let ok = |args: &[&str]| cli_ok(&daemon, args);
    ok(&["entity", "create", "org"]);
    ok(&["entity", "create", "key", "--parent", "org", "--cascade"]);
    ok(&["limits", "set", "--entity", "org", "--limit", "tok=100/1d"]);
    ok(&["limits", "set", "--entity", "key", "--limit", "tok=10/1d"]);
    let args = ["gate", "bypass", "--entity", "key", "--resource", "gpt-4"];
    ok(&[&args[..], &["--for", "3600"]].concat());
    let out = ok(&[
        "gate",
        "get",
        "--entity",
        "key",
        "--resource",
        "gpt-4",
        "--output",
        "json",
    ]);
    let gate: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(gate["gate"], "bypass", "{out}");
    assert!(gate["until_ms"].as_i64().unwrap() > 0, "{out}");
    let acquire = ["acquire", "--entity", "key", "--resource", "gpt-4"];
    let out = ok(&[&acquire[..], &["--consume", "tok=50"]].concat());
    let answer: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(answer["bypassed"], true, "{out}");
    let client = daemon.client().await;
    let left = |entity: &'static str| {
        let client = client.clone();
        async move { client.available(entity, "gpt-4", &[]).await.unwrap()["tok"] }
    };
    assert_eq!(left("key").await, 10, "the key is not debited");
    assert_eq!(left("org").await, 50, "its parent is");
    // Over the parent's limit: refused by the parent.
    let (code, out, _) = cli(&[&acquire[..], &["--consume", "tok=60"]].concat());
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains(r#""refused_by":"org""#), "{out}");
    ok(&["gate", "clear", "--entity", "key", "--resource", "gpt-4"]);
    let (code, out, _) = cli(&[&acquire[..], &["--consume", "tok=20"]].concat());
    assert_eq!(code, Some(3), "the key's own limit again: {out}");
    let audit = ok(&["audit", "key"]);
    assert!(audit.contains("bypass until"), "{audit}");
    let (code, _, err) = cli(&[&args[..], &["--for", "soon"]].concat());
    assert_eq!(code, Some(2), "{err}");
}

/// `bucket reset` and `bucket top-up` through the socket: what each limit gained, once per
/// idempotency key (a retry prints the first answer), audited; bad names and amounts refused
/// with the field named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_resets_and_tops_up_a_bucket_once_per_key() {
    let daemon = Daemon::start(MEMORY, &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    let ok = |args: &[&str]| cli_ok(&daemon, args);
    let json = |out: String| -> serde_json::Value { serde_json::from_str(out.trim()).unwrap() };
    ok(&["entity", "create", "buyer"]);
    ok(&[
        "limits",
        "set",
        "--entity",
        "buyer",
        "--limit",
        "tok=100/1d",
    ]);
    let acquire = ["acquire", "--entity", "buyer", "--resource", "gpt-4"];
    ok(&[&acquire[..], &["--consume", "tok=100"]].concat());
    let bucket = [
        "--entity",
        "buyer",
        "--resource",
        "gpt-4",
        "--output",
        "json",
    ];
    let reset = [
        &["bucket", "reset"],
        &bucket[..],
        &["--idempotency-key", "incident-7"],
    ]
    .concat();
    let first = json(ok(&reset));
    assert_eq!(
        (first["written"].as_i64(), first["replayed"].as_bool()),
        (Some(1), Some(false))
    );
    let gained = first["gained"]["tok"].as_f64().unwrap();
    assert!(99.0 < gained && gained <= 100.0, "{first}");
    ok(&[&acquire[..], &["--consume", "tok=60"]].concat());
    let again = json(ok(&reset));
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(again["gained"], first["gained"], "the first answer");
    let top_up = [&["bucket", "top-up"], &bucket[..], &["--amount", "tok=25"]].concat();
    let topped = json(ok(&top_up));
    let gained = topped["gained"]["tok"].as_f64().unwrap();
    assert!(
        (25.0..=25.0).contains(&gained),
        "{topped}: the 60 used was not given back"
    );
    let client = daemon.client().await;
    let left = client.available("buyer", "gpt-4", &[]).await.unwrap()["tok"];
    assert!((65..=66).contains(&left), "{left}");
    let audit = ok(&["audit", "buyer"]);
    assert_eq!(audit.matches("bucket_reset").count(), 1, "{audit}");
    assert_eq!(audit.matches("bucket_topped_up").count(), 1, "{audit}");
    let (code, _, err) = cli(&[&["bucket", "reset"], &bucket[..], &["--limit", "rpm"]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("limits") && err.contains("rpm"), "{err}");
    let (code, _, err) =
        cli(&[&["bucket", "top-up"], &bucket[..], &["--amount", "tok=0"]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("amounts[tok]"), "{err}");
    let (code, _, err) = cli(&[&reset[..], &["--idempotency-key", "no spaces"]].concat());
    assert_ne!(code, Some(0), "{err}");
}

/// A calendar quota through the CLI and the socket: stored in the limit grammar, shown with its
/// calendar, refused once spent with the wait until the next edge; a bad calendar is refused
/// naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_stores_a_calendar_quota_and_refuses_until_its_edge() {
    let daemon = Daemon::start(MEMORY, &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    let ok = |args: &[&str]| cli_ok(&daemon, args);
    let quota = "tok=5/cron(0 0 1 * *),tz=Europe/Berlin";
    ok(&["limits", "set", "--entity", "tenant", "--limit", quota]);
    let out = ok(&["limits", "get", "--entity", "tenant", "--output", "json"]);
    let limits: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let tok = &limits[0];
    assert_eq!(
        (tok["quota_cron"].as_str(), tok["quota_tz"].as_str()),
        (Some("0 0 1 * *"), Some("Europe/Berlin")),
        "{out}"
    );
    assert_eq!(
        (tok["refill_amount"].as_u64(), tok["capacity"].as_u64()),
        (Some(0), Some(5)),
        "{out}"
    );
    let table = ok(&["limits", "get", "--entity", "tenant"]);
    assert!(
        table.contains("quota: cron(0 0 1 * *), tz Europe/Berlin"),
        "{table}"
    );
    let acquire = ["acquire", "--entity", "tenant", "--resource", "gpt-4"];
    ok(&[&acquire[..], &["--consume", "tok=5"]].concat());
    let (code, out, _) = cli(&[&acquire[..], &["--consume", "tok=1"]].concat());
    assert_eq!(code, Some(3), "{out}");
    let answer: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let wait = answer["retry_after_ms"]
        .as_u64()
        .expect("a wait until the edge");
    assert!(wait > 0 && wait <= 31 * 86_400_000, "{out}");
    let (code, _, err) = cli(&[
        "limits",
        "set",
        "--entity",
        "tenant",
        "--limit",
        "tok=5/cron(* * * * *)",
    ]);
    assert_eq!(code, Some(2), "a usage error, before any call: {err}");
    assert!(err.contains("never starts matching"), "{err}");
}

/// A scheduled limit through the CLI and the socket: stored in the limit grammar, shown with its
/// entries, deciding with the entry in force; a bad entry is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_stores_a_scheduled_limit_and_decides_with_the_entry_in_force() {
    let daemon = Daemon::start(MEMORY, &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    let ok = |args: &[&str]| cli_ok(&daemon, args);
    // Always in force: a tenth of the capacity.
    let limit = "rpm=100/1d,when(* * * * *)=capacity:10,tz=Europe/Berlin";
    ok(&["limits", "set", "--entity", "tenant", "--limit", limit]);
    let out = ok(&["limits", "get", "--entity", "tenant", "--output", "json"]);
    let limits: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(limits[0]["capacity"].as_u64(), Some(100), "{out}");
    assert_eq!(
        limits[0]["schedule_tz"].as_str(),
        Some("Europe/Berlin"),
        "{out}"
    );
    assert_eq!(
        limits[0]["schedule"],
        serde_json::json!([{"cron": "* * * * *", "change": "capacity:10"}]),
        "{out}"
    );
    let table = ok(&["limits", "get", "--entity", "tenant"]);
    assert!(
        table.contains("100/1d, when(* * * * *) capacity:10, tz Europe/Berlin"),
        "{table}"
    );
    let acquire = ["acquire", "--entity", "tenant", "--resource", "gpt-4"];
    ok(&[&acquire[..], &["--consume", "rpm=10"]].concat());
    let (code, out, _) = cli(&[&acquire[..], &["--consume", "rpm=1"]].concat());
    assert_eq!(code, Some(3), "refused at the capacity in force: {out}");
    let audit = ok(&["audit", "tenant", "--output", "json"]);
    assert!(
        audit.contains("\"schedule\""),
        "the audit record shows the schedule: {audit}"
    );
    let (code, _, err) = cli(&[
        "limits",
        "set",
        "--entity",
        "tenant",
        "--limit",
        "rpm=100/1d,when(* * * * *)=x2,when(* * 31 2 *)=x3",
    ]);
    assert_eq!(code, Some(2), "a usage error, before any call: {err}");
    assert!(err.contains("entry 1"), "{err}");
}

/// `limits list`: the resources with defaults, and with --resource the entities with limits of
/// their own for it, a page at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_resources_with_defaults_and_entities_with_limits() {
    let daemon = Daemon::start(MEMORY, &[]);
    let ok = |args: &[&str]| cli_ok(&daemon, args);
    let json = |out: String| -> serde_json::Value { serde_json::from_str(out.trim()).unwrap() };
    for resource in ["gpt-4", "embed"] {
        ok(&[
            "limits",
            "set",
            "--resource",
            resource,
            "--limit",
            "rpm=10/1m",
        ]);
    }
    for key in ["k2", "k1", "k3"] {
        ok(&[
            "limits",
            "set",
            "--entity",
            key,
            "--resource",
            "gpt-4",
            "--limit",
            "rpm=1/1m",
        ]);
    }
    ok(&["limits", "set", "--entity", "k9", "--limit", "rpm=1/1m"]);
    let resources = json(ok(&["limits", "list", "--output", "json"]));
    assert_eq!(resources, serde_json::json!(["embed", "gpt-4"]));
    let list = ["limits", "list", "--resource", "gpt-4", "--output", "json"];
    let first = json(ok(&[&list[..], &["--page-size", "2"]].concat()));
    assert_eq!(
        first["entity_ids"],
        serde_json::json!(["k1", "k2"]),
        "{first}"
    );
    let page = first["next_page"].as_str().unwrap().to_owned();
    let rest = json(ok(&[&list[..], &["--page", &page]].concat()));
    assert_eq!(rest["entity_ids"], serde_json::json!(["k3"]), "{rest}");
    assert_eq!(rest["next_page"], "", "{rest}");
    let table = ok(&["limits", "list", "--resource", "gpt-4", "--page-size", "1"]);
    assert!(
        table.contains("k1") && table.contains("more: --page k1"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_cascade_per_resource() {
    let daemon = Daemon::start(MEMORY, &[]);
    let cli = |args: &[&str]| run_cli(&daemon, args);
    let ok = |args: &[&str]| cli_ok(&daemon, args);
    ok(&["entity", "create", "org"]);
    ok(&["entity", "create", "key", "--parent", "org"]);
    ok(&["limits", "set", "--entity", "org", "--limit", "tok=100/1d"]);
    ok(&["limits", "set", "--entity", "key", "--limit", "tok=100/1d"]);
    ok(&["cascade", "set", "on", "--resource", "gpt-4"]);
    let out = ok(&["cascade", "get", "--resource", "gpt-4", "--output", "json"]);
    assert_eq!(out.trim(), r#"{"cascade":true}"#);
    let out = ok(&["cascade", "get", "--entity", "key"]);
    assert!(out.contains("none"), "{out}");
    for resource in ["gpt-4", "embeddings"] {
        let args = ["acquire", "--entity", "key", "--consume", "tok=10"];
        ok(&[&args[..], &["--resource", resource]].concat());
    }
    let client = daemon.client().await;
    let left = |entity: &'static str, resource: &'static str| {
        let client = client.clone();
        async move { client.available(entity, resource, &[]).await.unwrap()["tok"] }
    };
    assert_eq!(left("org", "gpt-4").await, 90, "charged on the model");
    assert_eq!(left("org", "embeddings").await, 100, "not elsewhere");
    ok(&["cascade", "clear", "--resource", "gpt-4"]);
    let (code, _, err) = cli(&["cascade", "clear", "--resource", "gpt-4"]);
    assert_eq!(code, Some(1), "nothing left to clear: {err}");
    let audit = ok(&["audit", "#resource:gpt-4"]);
    assert!(audit.contains("cascade_cleared"), "{audit}");
    let (code, _, err) = cli(&["cascade", "set", "on"]);
    assert_eq!(code, Some(1), "no system level: {err}");
    assert!(err.contains("scope"), "{err}");
    let (code, _, err) = cli(&["cascade", "set", "maybe", "--resource", "gpt-4"]);
    assert_eq!(code, Some(2), "{err}");
}

/// `limits plan|diff|apply` on the memory store (DynamoDB Local's run is in
/// tests/daemon_dynamodb.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limits_manifest_is_planned_applied_once_and_refused_whole_when_bad() {
    let ns = "manifests";
    let daemon = Daemon::start(
        &format!("[limiter]\nbackend = \"memory\"\nnamespaces = [\"{ns}\"]\n"),
        &[],
    );
    common::manifest::scenario(&daemon, ns).await;
}
