//! kill -9 under load: two daemons share one table; one is killed mid-run and restarted on the
//! same socket. Every acknowledged admit is in the stored total; the only consumption beyond
//! them is of requests that were in flight on the killed daemon (their callers got a broken
//! connection, not an answer); and nothing is admitted above the bound across the restart.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use tonic::Code;
use zae_limiter::client::Client;
use zae_limiter::{BucketKey, EntityId, Limit, LimitName, Namespace, ResourceId, proto};

fn config(ns: &Namespace) -> String {
    common::dynamodb_config(ns, &common::endpoint(), "")
}

#[derive(Default)]
struct Tally {
    admitted: AtomicI64,
    /// Calls that ended without an answer (the daemon died under them).
    unanswered: AtomicI64,
}

/// `tasks` clients acquire 1 token each, committed at once, until `until`; a broken connection
/// is counted and the client reconnects to whatever listens on `socket` then.
fn clients(
    socket: std::path::PathBuf,
    tasks: usize,
    until: Instant,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    // One second's rate with a burst of 300.
    let limits = [Limit::per_second("tok", 40)
        .unwrap()
        .with_burst(300)
        .unwrap()];
    (0..tasks)
        .map(|_| {
            let (socket, tally, limits) = (socket.clone(), tally.clone(), limits.clone());
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
                        entity_id: "shared".into(),
                        resource: "model".into(),
                        consume: [("tok".to_owned(), 1)].into(),
                        limits: limits.iter().map(proto::Limit::from).collect(),
                        commit: true,
                        ..Default::default()
                    };
                    match c.raw().acquire(req).await {
                        Ok(a) if a.get_ref().allowed => {
                            tally.admitted.fetch_add(1, Ordering::Relaxed);
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
                            tally.unanswered.fetch_add(1, Ordering::Relaxed);
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
    let acknowledged = steady_tally.admitted.load(Ordering::Relaxed)
        + victim_tally.admitted.load(Ordering::Relaxed);
    let unanswered = victim_tally.unanswered.load(Ordering::Relaxed);
    let key = BucketKey {
        namespace: ns,
        entity: EntityId::new("shared").unwrap(),
        resource: ResourceId::new("model").unwrap(),
    };
    let bucket = store.load_bucket(&key).await.unwrap().unwrap();
    let stored = bucket
        .limit(&LimitName::new("tok").unwrap())
        .unwrap()
        .consumed
        / 1_000;
    let stored = i64::try_from(stored).unwrap();
    let bound = 300 + elapsed_ms * 40 / 1_000 + 1;
    println!(
        "acknowledged {acknowledged}, unanswered at the kill {unanswered}, stored {stored}, \
         bound {bound}"
    );
    assert!(stored >= acknowledged, "an acknowledged admit was lost");
    assert!(
        stored <= acknowledged + unanswered,
        "consumption beyond what was acknowledged or in flight at the kill"
    );
    assert!(
        stored <= bound,
        "over-admitted across the restart: {stored} > {bound}"
    );
    assert!(
        acknowledged >= 300,
        "the load used the capacity: {acknowledged}"
    );
}
