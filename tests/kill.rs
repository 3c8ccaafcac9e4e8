//! kill -9 under load: two daemons share one table; one is killed mid-run and restarted on the
//! same socket. Every acknowledged admit is in the stored total; the only consumption beyond
//! them is of requests that were in flight on the killed daemon (their callers got a broken
//! connection, not an answer); and nothing is admitted above the bound across the restart. The
//! clients spread over four entities, whose writes go out together in batches (one write call in
//! flight), so the kill also lands in the middle of batches.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use tonic::Code;
use zae_limiter::client::Client;
use zae_limiter::{BucketKey, EntityId, Limit, LimitName, Namespace, ResourceId, proto};

fn config(ns: &Namespace) -> String {
    common::dynamodb_config(ns, &common::endpoint(), "") + "write_calls_in_flight = 1\n"
}

const ENTITIES: [&str; 4] = ["e0", "e1", "e2", "e3"];
const BURST: i64 = 100;

/// Per entity of [`ENTITIES`].
#[derive(Default)]
struct Tally {
    admitted: [AtomicI64; 4],
    /// Calls that ended without an answer (the daemon died under them).
    unanswered: [AtomicI64; 4],
}

/// `tasks` clients acquire 1 token each, committed at once, until `until`, from the entities in
/// turn; a broken connection is counted and the client reconnects to whatever listens on
/// `socket` then.
fn clients(
    socket: std::path::PathBuf,
    tasks: usize,
    until: Instant,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    // 40 a second with a burst of 100, per entity: the load drains it within the first second.
    let limits = [Limit::per_second("tok", 40)
        .unwrap()
        .with_burst(BURST as u64)
        .unwrap()];
    (0..tasks)
        .map(|i| {
            let (socket, tally, limits) = (socket.clone(), tally.clone(), limits.clone());
            let e = i % ENTITIES.len();
            tokio::spawn(async move {
                let mut client: Option<Client> = None;
                while Instant::now() < until {
                    let Some(c) = &client else {
                        client = Client::connect(&socket).await.ok();
                        if client.is_none() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        continue;
                    };
                    let req = proto::AcquireRequest {
                        entity_id: ENTITIES[e].into(),
                        resource: "model".into(),
                        consume: [("tok".to_owned(), 1)].into(),
                        limits: limits.iter().map(proto::Limit::from).collect(),
                        commit: true,
                        ..Default::default()
                    };
                    match c.raw().acquire(req).await {
                        Ok(a) if a.get_ref().allowed => {
                            tally.admitted[e].fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => tokio::time::sleep(Duration::from_millis(25)).await,
                        Err(s)
                            if s.code() == Code::Unavailable
                                && s.message().contains("overloaded") => {}
                        Err(s) => {
                            // The daemon went away mid-call: the outcome is unknown to the caller.
                            assert!(
                                matches!(
                                    s.code(),
                                    Code::Unavailable | Code::Unknown | Code::Cancelled
                                ),
                                "{s:?}"
                            );
                            tally.unanswered[e].fetch_add(1, Ordering::Relaxed);
                            client = None;
                        }
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_loses_no_acknowledged_admit_and_never_over_admits() {
    let store = common::dynamodb().await;
    let ns = common::unique_namespace();
    let cfg = config(&ns);
    let steady = Daemon::start(&cfg, &[]);
    // The victim runs on a single-threaded runtime (`worker_threads = 1`).
    let mut victim = Daemon::start(&cfg, &["--worker-threads", "1"]);
    let socket = victim.socket.clone();
    let started = Instant::now();
    let until = started + Duration::from_secs(6);
    let (steady_tally, victim_tally) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let mut tasks = clients(steady.socket.clone(), 16, until, steady_tally.clone());
    tasks.extend(clients(socket.clone(), 16, until, victim_tally.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    victim.kill9();
    // The same socket path again: the stale socket file is replaced.
    let _restarted = Daemon::start_at(&cfg, Some(socket), &[]);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed_ms = started.elapsed().as_millis() as i64;
    let bound = BURST + elapsed_ms * 40 / 1_000 + 1;
    for (e, entity) in ENTITIES.into_iter().enumerate() {
        let acknowledged = steady_tally.admitted[e].load(Ordering::Relaxed)
            + victim_tally.admitted[e].load(Ordering::Relaxed);
        let unanswered = victim_tally.unanswered[e].load(Ordering::Relaxed);
        let key = BucketKey {
            namespace: ns.clone(),
            entity: EntityId::new(entity).unwrap(),
            resource: ResourceId::new("model").unwrap(),
        };
        let bucket = store.load_bucket(&key).await.unwrap().unwrap();
        let stored = bucket
            .limit(&LimitName::new("tok").unwrap())
            .unwrap()
            .consumed
            / 1_000;
        let stored = i64::try_from(stored).unwrap();
        println!(
            "{entity}: acknowledged {acknowledged}, unanswered at the kill {unanswered}, \
             stored {stored}, bound {bound}"
        );
        assert!(
            stored >= acknowledged,
            "{entity}: an acknowledged admit was lost"
        );
        assert!(
            stored <= acknowledged + unanswered,
            "{entity}: consumption beyond what was acknowledged or in flight at the kill"
        );
        assert!(
            stored <= bound,
            "{entity}: over-admitted across the restart: {stored} > {bound}"
        );
        assert!(
            acknowledged >= BURST,
            "{entity}: the load used the capacity: {acknowledged}"
        );
    }
    let batched = steady.metric("zae_limiter_store_batched_writes_total", &[]);
    println!("the steady daemon sent {batched} writes in batches");
    assert!(batched > 0.0, "no write went out in a batch");
}
