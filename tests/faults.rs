//! The ledger under store faults: a proxy between the daemon and DynamoDB Local slows answers,
//! resets connections after the writes landed, or black-holes traffic while concurrent clients
//! acquire. Whatever happens, every request is answered near its deadline with the configured
//! policy, never `INTERNAL`, nothing is admitted above the bound, and once compensations settle
//! the stored consumed total equals what was acknowledged.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::proxy::{Fault, FaultProxy};
use tonic::Code;
use zae_limiter::client::Client;
use zae_limiter::store::Store;
use zae_limiter::{BucketKey, EntityId, Limit, LimitName, Namespace, ResourceId, proto};

const DEADLINE_MS: u64 = 1_000;

fn config(ns: &Namespace, endpoint: &str, policy: &str) -> String {
    common::dynamodb_config(ns, endpoint, &format!("failure_policy = \"{policy}\""))
        + &format!(
            "max_attempts = 2
write_calls_in_flight = 1
[server]
request_timeout_ms = {DEADLINE_MS}
"
        )
}

/// Commits or rolls back a lease through the raw API.
async fn close(
    raw: &mut proto::rate_limiter_client::RateLimiterClient<tonic::transport::Channel>,
    lease_id: &str,
    rollback: bool,
) -> Result<(), tonic::Status> {
    let req = proto::LeaseRequest {
        lease_id: lease_id.to_owned(),
        ..Default::default()
    };
    if rollback {
        raw.rollback(req).await.map(drop)
    } else {
        raw.commit(req).await.map(drop)
    }
}

/// The stored consumed total of `entity`'s `tok` limit, in whole tokens (0 when not stored).
async fn stored(store: &dyn Store, ns: &Namespace, entity: &str) -> i64 {
    stored_on(store, ns, entity, "model").await
}

/// Waits (bounded) until the stored total equals `expected`, then returns it.
async fn settled(store: &dyn Store, ns: &Namespace, entity: &str, expected: i64) -> i64 {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let now = stored(store, ns, entity).await;
        if now == expected || Instant::now() > until {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Default)]
struct Tally {
    /// Admissions the daemon acknowledged with a decision from the store (tokens).
    admitted: AtomicI64,
    /// Admissions under the `allow` policy, never written.
    unbacked: AtomicI64,
    refused: AtomicI64,
    unavailable: AtomicI64,
    slowest_ms: AtomicU64,
}

/// `tasks` clients acquire 1 token (committed at once) of `entity` in a loop for `run`.
async fn load(client: &Client, entity: &str, cap: u64, tasks: usize, run: Duration) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let limits = [Limit::per_hour("tok", cap).unwrap()];
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (mut raw, tally, limits) = (client.raw(), tally.clone(), limits.clone());
            let entity = entity.to_owned();
            tokio::spawn(async move {
                while started.elapsed() < run {
                    let req = proto::AcquireRequest {
                        entity_id: entity.clone(),
                        resource: "model".into(),
                        consume: [("tok".to_owned(), 1)].into(),
                        limits: limits.iter().map(proto::Limit::from).collect(),
                        commit: true,
                        ..Default::default()
                    };
                    let asked = Instant::now();
                    let answer = raw.acquire(req).await;
                    let took = asked.elapsed().as_millis() as u64;
                    tally.slowest_ms.fetch_max(took, Ordering::Relaxed);
                    match answer {
                        Ok(a) => {
                            let a = a.into_inner();
                            let counter = match (a.allowed, a.statuses.is_empty()) {
                                (true, false) => &tally.admitted,
                                (true, true) => &tally.unbacked,
                                (false, _) => &tally.refused,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            if !a.allowed {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                        Err(s) if s.code() == Code::Unavailable => {
                            tally.unavailable.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(s) => panic!("unexpected answer under faults: {s:?}"),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    tally
}

/// The entities under load: their writes go out together (one write call in flight, see
/// `config`), so the faults hit batches as well as single writes.
const ENTITIES: [&str; 4] = ["e0", "e1", "e2", "e3"];

/// `load` on every entity at once, `tasks` clients each; one tally per entity.
async fn load_all(client: &Client, cap: u64, tasks: usize, run: Duration) -> Vec<Arc<Tally>> {
    futures_util::future::join_all(ENTITIES.map(|e| load(client, e, cap, tasks, run))).await
}

/// Adds `part` into `sum`.
fn add(sum: &Tally, part: &Tally) {
    for (s, p) in [
        (&sum.admitted, &part.admitted),
        (&sum.unbacked, &part.unbacked),
        (&sum.refused, &part.refused),
        (&sum.unavailable, &part.unavailable),
    ] {
        s.fetch_add(p.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    sum.slowest_ms
        .fetch_max(part.slowest_ms.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Runs load on several entities through `fault` for a while, then with the store healthy
/// again, and checks each entity's ledger. Returns the tally of all of them for fault-specific
/// checks.
async fn under(fault: Fault, policy: &str, cap: u64) -> Arc<Tally> {
    let store = common::dynamodb().await;
    let proxy = FaultProxy::start(&common::endpoint()).await;
    let ns = common::unique_namespace();
    let daemon = Daemon::start(&config(&ns, &proxy.endpoint(), policy), &[]);
    let client = daemon.client().await;
    // Warm: the buckets exist and are cached.
    let warm = load_all(&client, cap, 1, Duration::from_millis(200)).await;
    proxy.set(fault);
    let faulty = load_all(&client, cap, 4, Duration::from_secs(3)).await;
    proxy.set(Fault::Pass);
    // Longer than the longest retry back-off (2 s), so the store's recovery is always reached.
    let healthy = load_all(&client, cap, 1, Duration::from_secs(4)).await;
    let all = Arc::new(Tally::default());
    for (i, entity) in ENTITIES.into_iter().enumerate() {
        let tally = Tally::default();
        for phase in [&warm, &faulty, &healthy] {
            add(&tally, &phase[i]);
        }
        add(&all, &tally);
        let acknowledged = tally.admitted.load(Ordering::Relaxed);
        let total = settled(&*store, &ns, entity, acknowledged).await;
        println!(
            "{fault:?}/{policy}, {entity}: {acknowledged} admitted, {} unbacked, {} refused, {} \
             unavailable, slowest answer {} ms; stored {total}",
            tally.unbacked.load(Ordering::Relaxed),
            tally.refused.load(Ordering::Relaxed),
            tally.unavailable.load(Ordering::Relaxed),
            tally.slowest_ms.load(Ordering::Relaxed),
        );
        assert_eq!(
            total, acknowledged,
            "{entity}: the stored total is what was acknowledged"
        );
        assert!(
            acknowledged <= cap as i64,
            "{entity}: over-admitted: {acknowledged} > {cap}"
        );
    }
    let batched = daemon.metric("zae_limiter_store_batched_writes_total", &[]);
    println!(
        "{} compensations, {batched} writes sent in batches",
        daemon.metric("zae_limiter_compensations_total", &[]),
    );
    assert!(batched > 0.0, "no write went out in a batch");
    // Answered by the deadline (with room for a slow machine), never left waiting on the store.
    let slowest = all.slowest_ms.load(Ordering::Relaxed);
    assert!(slowest < 5 * DEADLINE_MS, "an answer took {slowest} ms");
    all
}

/// Finding 2: DynamoDB answers after the caller's deadline; the writes land. Callers told
/// UNAVAILABLE are given back by compensating writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_charge_only_what_was_acknowledged() {
    let tally = under(
        Fault::SlowAnswers(Duration::from_millis(1_500)),
        "block",
        1_000_000,
    )
    .await;
    assert!(
        tally.unavailable.load(Ordering::Relaxed) > 0,
        "the fault bit"
    );
}

/// Finding 3: answers right around the deadline never come back as INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_near_the_deadline_are_never_internal() {
    under(
        Fault::SlowAnswers(Duration::from_millis(DEADLINE_MS - 50)),
        "block",
        1_000_000,
    )
    .await;
}

/// Writes land but their answers are lost to connection resets (the SDK retries): each is
/// counted once, acknowledged or given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_answers_neither_double_charge_nor_lose_admits() {
    under(Fault::ResetAnswers, "block", 1_000_000).await;
}

/// With a bound that the load exhausts: nothing above it, under resets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_answers_never_over_admit() {
    let tally = under(Fault::ResetAnswers, "block", 40).await;
    assert!(
        tally.refused.load(Ordering::Relaxed) > 0,
        "the bound was reached"
    );
}

/// A black-holed store: every caller is answered by the policy within the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_is_answered_by_the_policy() {
    let blocked = under(Fault::Blackhole, "block", 1_000_000).await;
    assert!(blocked.unavailable.load(Ordering::Relaxed) > 0);
    let allowed = under(Fault::Blackhole, "allow", 1_000_000).await;
    assert!(allowed.unbacked.load(Ordering::Relaxed) > 0);
}

/// Finding 7: a rollback or commit whose answers are lost is still written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_closes_survive_lost_answers() {
    let store = common::dynamodb().await;
    let proxy = FaultProxy::start(&common::endpoint()).await;
    let ns = common::unique_namespace();
    let daemon = Daemon::start(&config(&ns, &proxy.endpoint(), "block"), &[]);
    let client = daemon.client().await;
    let limits = [Limit::per_hour("tok", 1_000).unwrap()];
    let acquire = |n: i64| {
        zae_limiter::client::Acquire::new("e", "model")
            .limits(&limits)
            .consume("tok", n)
    };
    let rolled = client.acquire(acquire(100)).await.unwrap();
    let mut committed = client.acquire(acquire(10)).await.unwrap();
    committed.adjust([("tok", 5)]).await.unwrap();
    let (rolled_id, committed_id) = (rolled.into_id(), committed.into_id());
    proxy.set(Fault::ResetAnswers);
    let mut raw = client.raw();
    // The answers may say UNAVAILABLE (not confirmed in time); the writes are retried.
    for (id, rollback) in [(&rolled_id, true), (&committed_id, false)] {
        if let Err(s) = close(&mut raw, id, rollback).await {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(Fault::Pass);
    // Repeating a close reports its outcome once it is written.
    let until = Instant::now() + Duration::from_secs(20);
    for (id, rollback) in [(&rolled_id, true), (&committed_id, false)] {
        loop {
            match close(&mut raw, id, rollback).await {
                Ok(_) => break,
                Err(s) if s.code() == Code::Unavailable && Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => panic!("{s:?}"),
            }
        }
    }
    assert_eq!(settled(&*store, &ns, "e", 15).await, 15);
}

/// The look-ups of a decision run under the same deadline: stored-limit resolution for
/// `TimeUntilAvailable` and the namespace registry (`"*"`) answer `UNAVAILABLE` by the deadline
/// when the store is a black hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_ups_are_answered_by_the_deadline() {
    common::dynamodb().await;
    let proxy = FaultProxy::start(&common::endpoint()).await;
    let ns = common::unique_namespace();
    let cfg = config(&ns, &proxy.endpoint(), "block").replace(
        &format!("namespaces = [\"{ns}\"]"),
        &format!("namespaces = [\"{ns}\", \"*\"]"),
    );
    let daemon = Daemon::start(&cfg, &[]);
    let mut raw = daemon.client().await.raw();
    proxy.set(Fault::Blackhole);
    let started = Instant::now();
    let peek = raw
        .time_until_available(proto::TimeUntilAvailableRequest {
            entity_id: "never-seen".into(),
            resource: "model".into(),
            consume: [("tok".to_owned(), 1)].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(peek.code(), Code::Unavailable, "{peek:?}");
    let registered = raw
        .acquire(proto::AcquireRequest {
            namespace: "registered-elsewhere".into(),
            entity_id: "e".into(),
            resource: "model".into(),
            consume: [("tok".to_owned(), 1)].into(),
            limits: vec![proto::Limit::from(&Limit::per_hour("tok", 10).unwrap())],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(registered.code(), Code::Unavailable, "{registered:?}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(5 * DEADLINE_MS),
        "two look-ups took {took:?}"
    );
}

/// The stored consumed total of `entity`'s `tok` limit on `resource`, in whole tokens (0 when not
/// stored).
async fn stored_on(store: &dyn Store, ns: &Namespace, entity: &str, resource: &str) -> i64 {
    let key = BucketKey {
        namespace: ns.clone(),
        entity: EntityId::new(entity).unwrap(),
        resource: ResourceId::new(resource).unwrap(),
    };
    match store.load_bucket(&key).await.unwrap() {
        None => 0,
        Some(b) => {
            let milli = b.limit(&LimitName::new("tok").unwrap()).unwrap().consumed;
            i64::try_from(milli / 1_000).unwrap()
        }
    }
}

/// A multi-resource acquire (`also`) under store faults is all or none: with the budget's
/// bound reached while answers are slow or lost, once compensations settle each resource's
/// stored total is exactly the acknowledged admissions, and the budget's is within its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_resource_acquire_is_all_or_none_under_faults() {
    let store = common::dynamodb().await;
    for fault in [
        Fault::SlowAnswers(Duration::from_millis(1_500)),
        Fault::ResetAnswers,
    ] {
        let proxy = FaultProxy::start(&common::endpoint()).await;
        let ns = common::unique_namespace();
        let daemon = Daemon::start(&config(&ns, &proxy.endpoint(), "block"), &[]);
        let client = daemon.client().await;
        let cap = 60;
        for (resource, capacity) in [("model", 1_000_000), ("budget", cap)] {
            client
                .admin()
                .set_limits(proto::SetLimitsRequest {
                    namespace: String::new(),
                    scope: Some(proto::LimitScope {
                        entity_id: None,
                        resource: Some(resource.into()),
                    }),
                    limits: vec![proto::Limit::from(
                        &Limit::per_hour("tok", capacity).unwrap(),
                    )],
                })
                .await
                .unwrap();
        }
        let tally = Arc::new(Tally::default());
        let run = |tasks: usize, for_ms: u64| {
            let started = Instant::now();
            let handles: Vec<_> = (0..tasks)
                .map(|_| {
                    let (mut raw, tally) = (client.raw(), tally.clone());
                    tokio::spawn(async move {
                        while started.elapsed() < Duration::from_millis(for_ms) {
                            let req = proto::AcquireRequest {
                                entity_id: "e".into(),
                                resource: "model".into(),
                                consume: [("tok".to_owned(), 1)].into(),
                                also: vec![proto::AlsoAcquire {
                                    resource: "budget".into(),
                                    consume: [("tok".to_owned(), 1)].into(),
                                }],
                                commit: true,
                                ..Default::default()
                            };
                            match raw.acquire(req).await {
                                Ok(a) if a.get_ref().allowed => {
                                    assert_eq!(a.get_ref().statuses.len(), 2, "both resources");
                                    tally.admitted.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(a) => {
                                    assert_eq!(a.get_ref().refused_resource, "budget");
                                    tally.refused.fetch_add(1, Ordering::Relaxed);
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                Err(s) if s.code() == Code::Unavailable => {
                                    tally.unavailable.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(s) => panic!("unexpected answer under faults: {s:?}"),
                            }
                        }
                    })
                })
                .collect::<Vec<_>>();
            futures_util::future::join_all(handles)
        };
        // Warm (the buckets exist and are cached), leaving most of the budget for the faults.
        for h in run(1, 50).await {
            h.unwrap();
        }
        let warm = tally.admitted.load(Ordering::Relaxed);
        proxy.set(fault);
        for h in run(4, 3_000).await {
            h.unwrap();
        }
        proxy.set(Fault::Pass);
        for h in run(1, 4_000).await {
            h.unwrap();
        }
        let acknowledged = tally.admitted.load(Ordering::Relaxed);
        let until = Instant::now() + Duration::from_secs(30);
        let totals = loop {
            let totals = (
                stored_on(&*store, &ns, "e", "model").await,
                stored_on(&*store, &ns, "e", "budget").await,
            );
            if totals == (acknowledged, acknowledged) || Instant::now() > until {
                break totals;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!(
            "{fault:?}: {acknowledged} admitted ({warm} before the fault), {} refused, {} \
             unavailable; stored {totals:?}",
            tally.refused.load(Ordering::Relaxed),
            tally.unavailable.load(Ordering::Relaxed),
        );
        assert_eq!(
            totals,
            (acknowledged, acknowledged),
            "{fault:?}: each resource stores exactly what was acknowledged"
        );
        assert!(acknowledged <= cap as i64, "{fault:?}: over the budget");
        assert!(
            tally.refused.load(Ordering::Relaxed) > 0,
            "the bound was reached"
        );
    }
}

/// A top-up whose transaction lands but whose answers are lost (the SDK retries it, then the
/// caller does, under its idempotency key, until it is answered): given exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_retried_through_lost_answers_is_given_once() {
    let store = common::dynamodb().await;
    let proxy = FaultProxy::start(&common::endpoint()).await;
    let ns = common::unique_namespace();
    let daemon = Daemon::start(&config(&ns, &proxy.endpoint(), "block"), &[]);
    let client = daemon.client().await;
    let limits = [Limit::per_day("tok", 1_000).unwrap()];
    let acquire = zae_limiter::client::Acquire::new("e", "model")
        .limits(&limits)
        .consume("tok", 900);
    client.consume(acquire).await.unwrap();
    let request = proto::BucketRequest {
        entity_id: "e".into(),
        resource: "model".into(),
        amounts: [("tok".to_owned(), 300)].into_iter().collect(),
        idempotency_key: "order-1".into(),
        ..Default::default()
    };
    let mut admin = client.admin();
    proxy.set(Fault::LoseAnswersOf("TransactWriteItems"));
    for _ in 0..3 {
        let lost = admin.top_up(request.clone()).await;
        let code = lost.as_ref().map_err(|s| s.code());
        assert!(
            matches!(code, Err(Code::Unavailable | Code::DeadlineExceeded)),
            "no answer reaches the daemon: {lost:?}"
        );
    }
    proxy.set(Fault::Pass);
    let answer = admin.top_up(request.clone()).await.unwrap().into_inner();
    assert!(answer.replayed, "it landed under the faults: {answer:?}");
    let key = BucketKey {
        namespace: ns.clone(),
        entity: EntityId::new("e").unwrap(),
        resource: ResourceId::new("model").unwrap(),
    };
    let bucket = store.load_bucket(&key).await.unwrap().unwrap();
    let balance = bucket
        .limit(&LimitName::new("tok").unwrap())
        .unwrap()
        .balance;
    let gained = answer.gained_milli["tok"];
    assert!((299_000..=300_000).contains(&gained), "{answer:?}");
    // 100 left, 300 given once (and a little refill): not 400 more, nor none.
    assert!((400_000..402_000).contains(&balance), "balance {balance}");
}
