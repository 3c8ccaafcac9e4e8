//! Regression tests for the ledger's edge cases found by trying the daemon as a new user would,
//! through the socket with the raw gRPC API (findings 2, 3 and 7 need a faulty store: see
//! `tests/faults.rs`; finding 8 is `tests/cascade.rs` and the cascade benchmark).

mod common;

use common::daemon::Daemon;
use tonic::Code;
use zae_limiter::store::Store;
use zae_limiter::{BucketKey, EntityId, LimitName, Namespace, ResourceId, proto};

fn config(ns: &Namespace) -> String {
    common::dynamodb_config(ns, &common::endpoint(), "")
}

/// A limit that refills one token in ten years: exact balances do not move while a test runs.
fn still(name: &str, capacity: u64) -> proto::Limit {
    proto::Limit {
        name: name.into(),
        capacity,
        refill_amount: 1,
        refill_period_ms: zae_limiter::domain::limit::MAX_PERIOD_MS as u64,
        soft: false,
        ..Default::default()
    }
}

fn limit(name: &str, tokens_per_hour: u64) -> proto::Limit {
    proto::Limit {
        name: name.into(),
        capacity: tokens_per_hour,
        refill_amount: tokens_per_hour,
        refill_period_ms: 3_600_000,
        soft: false,
        ..Default::default()
    }
}

fn acquire(entity: &str, limits: &[proto::Limit], take: i64) -> proto::AcquireRequest {
    proto::AcquireRequest {
        entity_id: entity.into(),
        resource: "model".into(),
        consume: [(limits[0].name.clone(), take)].into(),
        limits: limits.to_vec(),
        ..Default::default()
    }
}

/// Acquires `take` of `entity` with a lease; returns the lease id.
async fn open_lease(
    raw: &mut proto::rate_limiter_client::RateLimiterClient<tonic::transport::Channel>,
    entity: &str,
    limits: &[proto::Limit],
    take: i64,
) -> String {
    let answer = raw.acquire(acquire(entity, limits, take)).await.unwrap();
    answer.into_inner().lease_id
}

/// (balance, consumed) in milli-tokens, as every daemon would read them.
async fn stored(store: &dyn Store, ns: &Namespace, entity: &str, limit: &str) -> (i64, i128) {
    let key = BucketKey {
        namespace: ns.clone(),
        entity: EntityId::new(entity).unwrap(),
        resource: ResourceId::new("model").unwrap(),
    };
    let bucket = store
        .load_bucket(&key)
        .await
        .expect("every stored item stays readable")
        .expect("stored");
    let l = bucket.limit(&LimitName::new(limit).unwrap()).unwrap();
    (l.balance, l.consumed)
}

/// Finding 1: adjustments that would overflow are refused with OUT_OF_RANGE; the bucket stays
/// readable and usable by every daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_adjustments_are_refused_and_the_bucket_stays_readable() {
    let store = common::dynamodb().await;
    let ns = common::unique_namespace();
    let daemon = Daemon::start(&config(&ns), &[]);
    let mut raw = daemon.client().await.raw();
    let limits = [still("tok", 1_000_000_000_000_000)];
    let lease = open_lease(&mut raw, "e", &limits, 1).await;
    for _ in 0..10 {
        let err = raw
            .adjust(proto::AdjustRequest {
                lease_id: lease.clone(),
                delta: [("tok".to_owned(), 1_000_000_000_000_000)].into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
        assert!(err.message().starts_with("delta[tok]"), "{}", err.message());
    }
    raw.commit(proto::LeaseRequest {
        lease_id: lease,
        ..Default::default()
    })
    .await
    .unwrap();
    let (balance, consumed) = stored(&*store, &ns, "e", "tok").await;
    assert_eq!(consumed, 1_000);
    assert_eq!(balance, 1_000_000_000_000_000_000 - 1_000);
    // Still usable, by this daemon and by a new one.
    raw.acquire(acquire("e", &limits, 1)).await.unwrap();
    let other = Daemon::start(&config(&ns), &[]);
    let answer = other
        .client()
        .await
        .raw()
        .acquire(acquire("e", &limits, 1))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.allowed);
}

/// Finding 4: a lease never gives back more than it took; the balance never passes capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_gives_back_at_most_what_it_took() {
    let store = common::dynamodb().await;
    let ns = common::unique_namespace();
    let daemon = Daemon::start(&config(&ns), &[]);
    let mut raw = daemon.client().await.raw();
    let limits = [still("tok", 100)];
    let lease = open_lease(&mut raw, "e", &limits, 10).await;
    let err = raw
        .adjust(proto::AdjustRequest {
            lease_id: lease.clone(),
            delta: [("tok".to_owned(), -50)].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    raw.commit(proto::LeaseRequest {
        lease_id: lease,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(stored(&*store, &ns, "e", "tok").await, (90_000, 10_000));
    // A rollback gives back exactly what was taken, never above capacity.
    let lease = open_lease(&mut raw, "e", &limits, 10).await;
    raw.rollback(proto::LeaseRequest {
        lease_id: lease,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(stored(&*store, &ns, "e", "tok").await, (90_000, 10_000));
}

/// Finding 5: moving an entity under its own descendant is refused, naming the cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_cycle_is_refused() {
    let daemon = Daemon::start("[limiter]\nbackend = \"memory\"\n", &[]);
    let mut admin = daemon.client().await.admin();
    for (id, parent) in [("cA", None), ("cB", Some("cA")), ("cC", Some("cB"))] {
        admin
            .create_entity(proto::CreateEntityRequest {
                entity: Some(proto::Entity {
                    id: id.into(),
                    parent_id: parent.map(Into::into),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for parent in ["cB", "cC"] {
        let err = admin
            .move_entity(proto::MoveEntityRequest {
                entity_id: "cA".into(),
                parent_id: Some(parent.into()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("cycle: cA -> "), "{}", err.message());
    }
    // A move that makes no cycle still works.
    admin
        .move_entity(proto::MoveEntityRequest {
            entity_id: "cC".into(),
            parent_id: Some("cA".into()),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Finding 6: permanent request errors are INVALID_ARGUMENT, never UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_request_errors_are_invalid_argument() {
    let store = common::dynamodb().await;
    let ns = common::unique_namespace();
    let daemon = Daemon::start(&config(&ns), &[]);
    let client = daemon.client().await;
    let many: Vec<proto::Limit> = (0..10_000).map(|i| limit(&format!("l{i}"), 10)).collect();
    let err = client
        .raw()
        .acquire(acquire("e", &many, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("limits:"), "{}", err.message());
    let err = client
        .admin()
        .set_limits(proto::SetLimitsRequest {
            scope: Some(proto::LimitScope::default()),
            limits: many,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = client
        .admin()
        .list_audit(proto::ListAuditRequest {
            subject: "e".into(),
            page: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("page:"), "{}", err.message());
    // Nothing was written for any of them.
    let key = BucketKey {
        namespace: ns,
        entity: EntityId::new("e").unwrap(),
        resource: ResourceId::new("model").unwrap(),
    };
    assert_eq!(store.load_bucket(&key).await.unwrap(), None);
}
