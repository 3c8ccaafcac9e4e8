//! Criterion benchmarks of the in-process decision path: the limiter handle, the entity actor and
//! the memory store, without gRPC. Each measured loop runs inside a spawned task on the runtime
//! (measuring on the `block_on` thread would add a cross-thread wake-up to every call).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use zae_limiter::clock::SystemClock;
use zae_limiter::domain::amounts::Amounts;
use zae_limiter::domain::limit::{Limit, LimitName, MILLI};
use zae_limiter::limiter::{AcquireRequest, Decision, Limiter, LimiterSettings};
use zae_limiter::store::memory::MemoryStore;
use zae_limiter::{BucketKey, EntityId, Namespace, ResourceId};

fn request(limit: &Limit) -> AcquireRequest {
    AcquireRequest {
        key: BucketKey {
            namespace: Namespace::default_namespace(),
            entity: EntityId::new("hot").unwrap(),
            resource: ResourceId::new("model").unwrap(),
        },
        amounts: Amounts::new([(LimitName::new("rpm").unwrap(), MILLI)]).unwrap(),
        limits: Some(vec![limit.clone()]),
        lease: true,
        owner: zae_limiter::limiter::Owner::InProcess,
        on_unavailable: None,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (name, limit, admitted) in [
        (
            "actor/admit_and_commit",
            Limit::per_second("rpm", 1_000_000_000).unwrap(),
            true,
        ),
        (
            "actor/fast_reject",
            Limit::per_hour("rpm", 1).unwrap(),
            false,
        ),
    ] {
        let limiter = Limiter::new(
            Arc::new(MemoryStore::new()),
            Arc::new(SystemClock),
            LimiterSettings::default(),
        );
        c.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (limiter, limit) = (limiter.clone(), limit.clone());
                async move {
                    tokio::spawn(async move {
                        let started = Instant::now();
                        for _ in 0..iters {
                            let deadline = Instant::now() + Duration::from_secs(5);
                            match limiter.acquire(request(&limit), deadline).await.unwrap() {
                                Decision::Admitted { lease, .. } => {
                                    let lease = lease.expect("a lease was asked for");
                                    limiter.commit(lease, deadline).await.unwrap();
                                }
                                Decision::Rejected { .. } => {
                                    assert!(!admitted, "a full bucket admits")
                                }
                            }
                        }
                        started.elapsed()
                    })
                    .await
                    .unwrap()
                }
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
