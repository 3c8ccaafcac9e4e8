//! One behavioural suite for every store: each test below runs against the embedded memory store
//! and against DynamoDB Local (started by `scripts/test.sh`). A difference between the two is a
//! bug in one of them.

mod common;

use common::UsageOf;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::Counting;
use zae_limiter::clock::{Clock, SystemClock};
use zae_limiter::consume::{Outcome, Seen, consume};
use zae_limiter::domain::bucket::{Operation, Plan, Write, plan, plan_operation, plan_settle};
use zae_limiter::domain::limit::{MILLI, canonical};
use zae_limiter::domain::records::{
    Actor, AuditAction, AuditEntry, Entity, FailurePolicy, Gate, LevelSettings, LimitScope, Period,
    Usage,
};
use zae_limiter::store::dynamodb::DynamoStore;
use zae_limiter::store::{KeyedWrite, Once, Store, StoreError, UsageQuery};
use zae_limiter::{BucketKey, EntityId, Limit, LimitName, Namespace, ResourceId};

const T0: i64 = 1_800_000_000_000;

fn key(ns: &Namespace, entity: &str, resource: &str) -> BucketKey {
    BucketKey {
        namespace: ns.clone(),
        entity: EntityId::new(entity).unwrap(),
        resource: ResourceId::new(resource).unwrap(),
    }
}

fn name(s: &str) -> LimitName {
    LimitName::new(s).unwrap()
}

fn tokens(pairs: &[(&str, i64)]) -> Vec<(LimitName, i64)> {
    pairs.iter().map(|(n, t)| (name(n), t * MILLI)).collect()
}

fn actor(at_ms: i64) -> Actor {
    Actor {
        principal: "uid:1000".into(),
        at_ms,
    }
}

async fn audit_count(store: &dyn Store, ns: &Namespace, subject: &str) -> usize {
    store
        .list_audit(ns, subject, 10, None)
        .await
        .unwrap()
        .entries
        .len()
}

fn admitted(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Admitted { .. })
}

fn stored_balance(b: &zae_limiter::Bucket, limit: &str) -> i64 {
    b.limit(&name(limit)).unwrap().balance
}

fn stored_consumed(b: &zae_limiter::Bucket, limit: &str) -> i64 {
    i64::try_from(b.limit(&name(limit)).unwrap().consumed).expect("small totals in these tests")
}

async fn create_then_load_round_trips(store: Arc<dyn Store>, ns: Namespace) {
    let k = key(&ns, "api-key-1", "gpt-4");
    assert_eq!(store.load_bucket(&k).await.unwrap(), None);
    let limits = canonical(vec![
        Limit::per_minute("rpm", 100).unwrap(),
        Limit::per_minute("tpm", 10_000)
            .unwrap()
            .with_burst(15_000)
            .unwrap(),
    ])
    .unwrap();
    let out = consume(
        &*store,
        &k,
        &limits,
        &tokens(&[("rpm", 1), ("tpm", 500)]),
        T0,
        Seen::Unread,
    )
    .await
    .unwrap();
    let Outcome::Admitted { bucket } = out else {
        panic!("expected admit, got {out:?}")
    };
    assert_eq!(stored_balance(&bucket, "rpm"), 99 * MILLI);
    assert_eq!(stored_balance(&bucket, "tpm"), 14_500 * MILLI);
    assert_eq!(store.load_bucket(&k).await.unwrap(), Some(bucket.clone()));
    // Refill, consume, and what comes back equals what a read sees.
    let out = consume(
        &*store,
        &k,
        &limits,
        &tokens(&[("rpm", 2)]),
        T0 + 6_000,
        Seen::Bucket(bucket),
    )
    .await
    .unwrap();
    let Outcome::Admitted { bucket } = out else {
        panic!("expected admit, got {out:?}")
    };
    // 99 + 10 refilled, clamped to the capacity of 100, minus 2.
    assert_eq!(stored_balance(&bucket, "rpm"), 98 * MILLI);
    assert_eq!(stored_balance(&bucket, "tpm"), 15_000 * MILLI);
    assert_eq!(bucket.refilled_at, T0 + 6_000);
    assert_eq!(store.load_bucket(&k).await.unwrap(), Some(bucket));
    // Another resource, another entity, another namespace: other buckets.
    for other in [
        key(&ns, "api-key-1", "gpt-5"),
        key(&ns, "api-key-2", "gpt-4"),
        key(
            &Namespace::new(format!("{ns}-b")).unwrap(),
            "api-key-1",
            "gpt-4",
        ),
    ] {
        assert_eq!(store.load_bucket(&other).await.unwrap(), None);
    }
}

async fn eight_tasks_never_over_admit(store: Arc<dyn Store>, ns: Namespace) {
    // Capacity 100, one token back every ten seconds.
    let limits = vec![Limit::custom("rpm", 100, 1, Duration::from_secs(10)).unwrap()];
    let k = key(&ns, "hot", "model");
    let started = SystemClock.now_ms();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, k, limits) = (store.clone(), k.clone(), limits.clone());
            tokio::spawn(async move {
                let mut seen = Seen::Unread;
                let mut admitted = 0i64;
                for _ in 0..200 {
                    let now = SystemClock.now_ms();
                    match consume(
                        &*store,
                        &k,
                        &limits,
                        &tokens(&[("rpm", 1)]),
                        now,
                        seen.clone(),
                    )
                    .await
                    .unwrap()
                    {
                        Outcome::Admitted { bucket } => {
                            admitted += 1;
                            seen = Seen::Bucket(bucket);
                        }
                        Outcome::Rejected { bucket, .. } => {
                            seen = bucket.map_or(Seen::Absent, Seen::Bucket);
                        }
                    }
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    let elapsed = SystemClock.now_ms() - started;
    let refill = elapsed / 10_000 + 1;
    assert!(admitted >= 100, "the whole capacity is used: {admitted}");
    assert!(
        admitted <= 100 + refill,
        "admitted {admitted} > capacity 100 + refill {refill}"
    );
    let stored = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(
        stored_consumed(&stored, "rpm"),
        admitted * MILLI,
        "every admit is stored, once"
    );
}

async fn racing_creators_charge_once(store: Arc<dyn Store>, ns: Namespace) {
    let limits = vec![Limit::per_minute("rpm", 100).unwrap()];
    let k = key(&ns, "new", "model");
    let plan_create = |n| match plan(None, &limits, &tokens(&[("rpm", n)]), T0) {
        Plan::Admit {
            write: w @ Write::Create(_),
            ..
        } => w,
        other => panic!("expected a create, got {other:?}"),
    };
    let (first, second) = (plan_create(3), plan_create(5));
    let created = store.write_bucket(&k, &first).await.unwrap();
    // The second creator loses, and learns the current item from the failure itself.
    let Err(StoreError::Conflict {
        current: Some(current),
        ..
    }) = store.write_bucket(&k, &second).await
    else {
        panic!("a second create must conflict and return the stored item");
    };
    assert_eq!(*current, created);
    let counting = Counting::new(store.clone());
    let out = consume(
        &counting,
        &k,
        &limits,
        &tokens(&[("rpm", 5)]),
        T0,
        Seen::Absent,
    )
    .await
    .unwrap();
    assert!(admitted(&out));
    assert_eq!(
        (counting.loads(), counting.writes()),
        (0, 2),
        "the conflict answered the read"
    );
    let stored = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(stored_consumed(&stored, "rpm"), 8 * MILLI);
    assert_eq!(stored_balance(&stored, "rpm"), 92 * MILLI);

    // Truly concurrent creators of a fresh bucket: each is charged exactly once.
    let k = key(&ns, "new2", "model");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, k, limits) = (store.clone(), k.clone(), limits.clone());
            tokio::spawn(async move {
                consume(
                    &*store,
                    &k,
                    &limits,
                    &tokens(&[("rpm", 2)]),
                    T0,
                    Seen::Absent,
                )
                .await
                .unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert!(admitted(&t.await.unwrap()));
    }
    let stored = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(stored_consumed(&stored, "rpm"), 16 * MILLI);
    assert_eq!(stored_balance(&stored, "rpm"), 84 * MILLI);
}

/// Consumes `take` as a daemon would from what it has `seen`; the stored bucket after it.
async fn admitted_at(
    store: &dyn Store,
    k: &BucketKey,
    limits: &[Limit],
    take: (&str, i64),
    now: i64,
    seen: Seen,
) -> zae_limiter::Bucket {
    let out = consume(store, k, limits, &tokens(&[take]), now, seen)
        .await
        .unwrap();
    let Outcome::Admitted { bucket } = out else {
        panic!("expected an admission, got {out:?}")
    };
    bucket
}

async fn a_refill_conflict_retries_without_a_read(store: Arc<dyn Store>, ns: Namespace) {
    let limits = vec![Limit::per_second("rps", 10).unwrap()];
    let k = key(&ns, "e", "r");
    let stale = admitted_at(&*store, &k, &limits, ("rps", 10), T0, Seen::Unread).await;
    // Another daemon refills first.
    let seen = Seen::Bucket(stale.clone());
    admitted_at(&*store, &k, &limits, ("rps", 1), T0 + 500, seen).await;
    // This daemon plans its refill from the stale state: the refill write loses, and the retry
    // uses the item returned with the failure.
    let counting = Counting::new(store.clone());
    let out = consume(
        &counting,
        &k,
        &limits,
        &tokens(&[("rps", 2)]),
        T0 + 500,
        Seen::Bucket(stale),
    )
    .await
    .unwrap();
    let Outcome::Admitted { bucket } = out else {
        panic!("expected admit, got {out:?}")
    };
    assert_eq!((counting.loads(), counting.writes()), (0, 2));
    assert_eq!(
        stored_balance(&bucket, "rps"),
        2 * MILLI,
        "refilled once: 0 + 5 - 1 - 2"
    );
    assert_eq!(stored_consumed(&bucket, "rps"), 13 * MILLI);
}

async fn a_rejection_writes_nothing(store: Arc<dyn Store>, ns: Namespace) {
    let limits = vec![Limit::per_minute("rpm", 5).unwrap()];
    let k = key(&ns, "e", "r");
    let counting = Counting::new(store.clone());
    // More than capacity: refused from the limits alone, nothing is created.
    let out = consume(
        &counting,
        &k,
        &limits,
        &tokens(&[("rpm", 6)]),
        T0,
        Seen::Absent,
    )
    .await
    .unwrap();
    let Outcome::Rejected { rejection, .. } = out else {
        panic!("expected a rejection")
    };
    assert_eq!(rejection.retry_after_ms(), None);
    assert_eq!(counting.writes(), 0);
    assert_eq!(store.load_bucket(&k).await.unwrap(), None);
    let out = consume(
        &counting,
        &k,
        &limits,
        &tokens(&[("rpm", 5)]),
        T0,
        Seen::Absent,
    )
    .await
    .unwrap();
    let Outcome::Admitted { bucket } = out else {
        panic!("expected admit")
    };
    let out = consume(
        &counting,
        &k,
        &limits,
        &tokens(&[("rpm", 1)]),
        T0,
        Seen::Bucket(bucket),
    )
    .await
    .unwrap();
    let Outcome::Rejected { rejection, .. } = out else {
        panic!("expected a rejection")
    };
    assert_eq!(rejection.retry_after_ms(), Some(12_000));
    assert_eq!(counting.writes(), 1, "only the admit wrote");
}

/// Settles `amounts` (signed) on a stored bucket the way the daemon does: plan from what was
/// seen, write conditionally, re-plan from the returned item on a conflict.
async fn settle(store: &dyn Store, k: &BucketKey, amounts: &[(LimitName, i64)], now: i64) {
    let mut seen = store
        .load_bucket(k)
        .await
        .unwrap()
        .expect("a stored bucket");
    for _ in 0..8 {
        let Some((write, _)) = plan_settle(&seen, amounts, now).unwrap() else {
            return;
        };
        match store.write_bucket(k, &write).await {
            Ok(_) => return,
            Err(StoreError::Conflict { current, .. }) => seen = *current.unwrap(),
            Err(e) => panic!("{e}"),
        }
    }
    panic!("a settlement kept conflicting");
}

async fn settlements_go_into_debt_and_refunds_stop_at_capacity(
    store: Arc<dyn Store>,
    ns: Namespace,
) {
    let limits = vec![Limit::per_minute("tpm", 1_000).unwrap()];
    let k = key(&ns, "e", "r");
    let out = consume(
        &*store,
        &k,
        &limits,
        &tokens(&[("tpm", 100)]),
        T0,
        Seen::Unread,
    )
    .await
    .unwrap();
    assert!(admitted(&out));
    settle(&*store, &k, &tokens(&[("tpm", 2_000)]), T0).await;
    let stored = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(stored_balance(&stored, "tpm"), -1_100 * MILLI);
    assert_eq!(stored_consumed(&stored, "tpm"), 2_100 * MILLI);
    // In debt: refused, with the wait the debt sets.
    let out = consume(
        &*store,
        &k,
        &limits,
        &tokens(&[("tpm", 1)]),
        T0,
        Seen::Unread,
    )
    .await
    .unwrap();
    let Outcome::Rejected { rejection, .. } = out else {
        panic!("expected a rejection")
    };
    assert_eq!(rejection.retry_after_ms(), Some(66_060));
    // A refund (negative consumption).
    settle(&*store, &k, &tokens(&[("tpm", -1_100)]), T0).await;
    let stored = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(stored_balance(&stored, "tpm"), 0);
    assert_eq!(stored_consumed(&stored, "tpm"), 1_000 * MILLI);
    // A refund planned from a stale state: the commutative write's ceiling fails against the
    // stored balance, and the re-plan from the returned item clamps at the capacity.
    let stale = store.load_bucket(&k).await.unwrap().unwrap();
    settle(&*store, &k, &tokens(&[("tpm", -900)]), T0).await;
    let (write, _) = plan_settle(&stale, &tokens(&[("tpm", -900)]), T0)
        .unwrap()
        .unwrap();
    let conflict = store.write_bucket(&k, &write).await;
    let Err(StoreError::Conflict {
        current: Some(current),
        ..
    }) = conflict
    else {
        panic!("expected a conflict, got {conflict:?}")
    };
    assert_eq!(stored_balance(&current, "tpm"), 900 * MILLI);
    settle(&*store, &k, &tokens(&[("tpm", -900)]), T0).await;
    let stored = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(
        stored_balance(&stored, "tpm"),
        1_000 * MILLI,
        "never above capacity"
    );
    assert_eq!(
        stored_consumed(&stored, "tpm"),
        -800 * MILLI,
        "the ledger counts it all"
    );
    // A charge past the deepest debt is refused before anything is written.
    let deep = vec![(name("tpm"), zae_limiter::domain::amounts::MAX_AMOUNT)];
    for _ in 0..4 {
        settle(&*store, &k, &deep, T0).await;
    }
    let floor = store.load_bucket(&k).await.unwrap().unwrap();
    assert!(plan_settle(&floor, &deep, T0).is_err());
    assert!(stored_balance(&floor, "tpm") >= zae_limiter::domain::amounts::MIN_BALANCE);
}

async fn commit_is_all_or_nothing(store: Arc<dyn Store>, ns: Namespace) {
    let limits = vec![Limit::per_minute("rpm", 10).unwrap()];
    let (child, parent) = (key(&ns, "child", "m"), key(&ns, "parent", "m"));
    let write = |seen: Option<&zae_limiter::Bucket>, n: i64| match plan(
        seen,
        &limits,
        &tokens(&[("rpm", n)]),
        T0,
    ) {
        Plan::Admit { write, .. } => write,
        Plan::Reject(r) => panic!("unexpected rejection {r:?}"),
    };
    // Two creates in one commit.
    store
        .commit(&[
            KeyedWrite {
                key: child.clone(),
                write: write(None, 2),
            },
            KeyedWrite {
                key: parent.clone(),
                write: write(None, 2),
            },
        ])
        .await
        .unwrap();
    let child_seen = store.load_bucket(&child).await.unwrap().unwrap();
    let parent_seen = store.load_bucket(&parent).await.unwrap().unwrap();
    // The parent is drained elsewhere; a commit planned from the old state must fail whole.
    settle(&*store, &parent, &tokens(&[("rpm", 7)]), T0).await;
    let parent_now = store.load_bucket(&parent).await.unwrap().unwrap();
    let result = store
        .commit(&[
            KeyedWrite {
                key: child.clone(),
                write: write(Some(&child_seen), 3),
            },
            KeyedWrite {
                key: parent.clone(),
                write: write(Some(&parent_seen), 3),
            },
        ])
        .await;
    match result {
        Err(StoreError::Conflict {
            index: 1,
            current: Some(current),
        }) => assert_eq!(*current, parent_now),
        other => panic!("expected a conflict on the parent, got {other:?}"),
    }
    assert_eq!(
        store.load_bucket(&child).await.unwrap(),
        Some(child_seen.clone()),
        "child untouched"
    );
    // A consumption and a settlement succeed together.
    let (refund, _) = plan_settle(&parent_now, &tokens(&[("rpm", -1)]), T0)
        .unwrap()
        .unwrap();
    store
        .commit(&[
            KeyedWrite {
                key: child.clone(),
                write: write(Some(&child_seen), 3),
            },
            KeyedWrite {
                key: parent.clone(),
                write: refund,
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        stored_consumed(&store.load_bucket(&child).await.unwrap().unwrap(), "rpm"),
        5 * MILLI
    );
    assert_eq!(
        stored_consumed(&store.load_bucket(&parent).await.unwrap().unwrap(), "rpm"),
        8 * MILLI
    );
    // A single-write commit behaves like the single write.
    let single = store
        .commit(&[KeyedWrite {
            key: key(&ns, "solo", "m"),
            write: write(None, 1),
        }])
        .await;
    assert!(single.is_ok(), "{single:?}");
}

async fn limit_changes_reconfigure_stored_buckets(store: Arc<dyn Store>, ns: Namespace) {
    let k = key(&ns, "e", "r");
    let old = vec![Limit::per_minute("rpm", 100).unwrap()];
    assert!(admitted(
        &consume(&*store, &k, &old, &tokens(&[("rpm", 10)]), T0, Seen::Unread)
            .await
            .unwrap()
    ));
    let new = canonical(vec![
        Limit::per_minute("rpm", 50).unwrap(),
        Limit::per_minute("tpm", 1_000).unwrap(),
    ])
    .unwrap();
    let out = consume(&*store, &k, &new, &tokens(&[("tpm", 10)]), T0, Seen::Unread)
        .await
        .unwrap();
    assert!(admitted(&out));
    let stored = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(stored.limit_set(), new);
    assert_eq!(
        stored_balance(&stored, "rpm"),
        50 * MILLI,
        "shrunk capacity clamps"
    );
    assert_eq!(
        stored_balance(&stored, "tpm"),
        990 * MILLI,
        "a new limit starts full"
    );
    let only = vec![Limit::per_minute("tpm", 1_000).unwrap()];
    assert!(admitted(
        &consume(&*store, &k, &only, &[], T0 + 1, Seen::Unread)
            .await
            .unwrap()
    ));
    assert_eq!(
        store.load_bucket(&k).await.unwrap().unwrap().limit_set(),
        only,
        "a dropped limit goes"
    );
}

async fn entities_and_children(store: Arc<dyn Store>, ns: Namespace) {
    let entity = |id: &str, parent: Option<&str>| Entity {
        id: EntityId::new(id).unwrap(),
        name: format!("name of {id}"),
        parent: parent.map(|p| EntityId::new(p).unwrap()),
        cascade: parent.is_some(),
        metadata: BTreeMap::from([("tier".to_owned(), "gold".to_owned())]),
    };
    let project = entity("proj-1", None);
    store
        .create_entity(&ns, &project, &actor(T0))
        .await
        .unwrap();
    let dup = store.create_entity(&ns, &project, &actor(T0 + 1)).await;
    assert!(matches!(dup, Err(StoreError::AlreadyExists(_))), "{dup:?}");
    for (i, id) in ["key-b", "key-a", "key-c"].iter().enumerate() {
        store
            .create_entity(&ns, &entity(id, Some("proj-1")), &actor(T0 + 10 + i as i64))
            .await
            .unwrap();
    }
    store
        .create_entity(&ns, &entity("other", Some("proj-2")), &actor(T0))
        .await
        .unwrap();
    assert_eq!(
        store.get_entity(&ns, &project.id).await.unwrap(),
        Some(project.clone())
    );
    assert_eq!(
        store
            .get_entity(&ns, &EntityId::new("key-a").unwrap())
            .await
            .unwrap(),
        Some(entity("key-a", Some("proj-1")))
    );
    let children: Vec<String> = store
        .list_children(&ns, &project.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(children, ["key-a", "key-b", "key-c"]);
    // Namespaces isolate entities.
    let elsewhere = Namespace::new(format!("{ns}-x")).unwrap();
    assert_eq!(
        store.get_entity(&elsewhere, &project.id).await.unwrap(),
        None
    );
    assert!(
        store
            .list_children(&elsewhere, &project.id)
            .await
            .unwrap()
            .is_empty()
    );
    let key_b = EntityId::new("key-b").unwrap();
    store
        .delete_entity(&ns, &key_b, false, &actor(T0 + 20))
        .await
        .unwrap();
    let again = store
        .delete_entity(&ns, &key_b, false, &actor(T0 + 21))
        .await;
    assert!(matches!(again, Err(StoreError::NotFound(_))), "{again:?}");
    assert_eq!(
        store.list_children(&ns, &project.id).await.unwrap().len(),
        2
    );
    // Audit: create then delete, newest first; the failed delete left no record.
    let page = store.list_audit(&ns, "key-b", 10, None).await.unwrap();
    let actions: Vec<AuditAction> = page.entries.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [AuditAction::EntityDeleted, AuditAction::EntityCreated]
    );
    assert_eq!(page.next, None);
    assert_eq!(page.entries[0].principal, "uid:1000");
    assert_eq!(page.entries[0].at_ms, T0 + 20);
    assert!(
        page.entries[0]
            .before
            .as_deref()
            .unwrap()
            .contains("\"key-b\"")
    );
    assert_eq!(page.entries[0].after, None);
    // The failed duplicate create left no record either.
    assert_eq!(audit_count(&*store, &ns, "proj-1").await, 1);
}

async fn entities_read_together(store: Arc<dyn Store>, ns: Namespace) {
    // 150 entities: more than one call's worth of keys on DynamoDB (100).
    let ids: Vec<EntityId> = (0..150)
        .map(|i| EntityId::new(format!("many-{i:03}")).unwrap())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let e = Entity {
            id: id.clone(),
            name: format!("name of {id}"),
            parent: (i % 2 == 1).then(|| ids[0].clone()),
            cascade: i % 3 == 1,
            metadata: BTreeMap::from([("n".to_owned(), i.to_string())]),
        };
        store.create_entity(&ns, &e, &actor(T0)).await.unwrap();
    }
    // Asked in another order, with ids that do not exist and ids twice.
    let missing = EntityId::new("nobody").unwrap();
    let mut asked: Vec<EntityId> = ids.iter().rev().cloned().collect();
    asked.insert(7, missing.clone());
    asked.push(ids[3].clone());
    asked.push(missing.clone());
    let got = store.get_entities(&ns, &asked).await.unwrap();
    assert_eq!(got.len(), asked.len());
    for (id, found) in asked.iter().zip(&got) {
        assert_eq!(found, &store.get_entity(&ns, id).await.unwrap(), "{id}");
        assert_eq!(found.is_some(), *id != missing, "{id}");
    }
    // Another namespace has none of them; no ids, no answer.
    let elsewhere = Namespace::new(format!("{ns}-x")).unwrap();
    let none = store.get_entities(&elsewhere, &ids[..5]).await.unwrap();
    assert_eq!(none, vec![None; 5]);
    assert!(store.get_entities(&ns, &[]).await.unwrap().is_empty());
}

async fn stored_limits_at_four_scopes(store: Arc<dyn Store>, ns: Namespace) {
    let e = EntityId::new("e1").unwrap();
    let r = ResourceId::new("gpt-4").unwrap();
    let scopes = [
        LimitScope::EntityResource(e.clone(), r.clone()),
        LimitScope::Entity(e.clone()),
        LimitScope::Resource(r.clone()),
        LimitScope::System,
    ];
    for (i, scope) in scopes.iter().enumerate() {
        assert_eq!(store.get_limits(&ns, scope).await.unwrap(), None);
        let limits = vec![Limit::per_minute("rpm", 10 * (i as u64 + 1)).unwrap()];
        store
            .set_limits(&ns, scope, &limits, &actor(T0 + i as i64))
            .await
            .unwrap();
    }
    for (i, scope) in scopes.iter().enumerate() {
        let limits = vec![Limit::per_minute("rpm", 10 * (i as u64 + 1)).unwrap()];
        assert_eq!(
            store.get_limits(&ns, scope).await.unwrap(),
            Some(limits),
            "{scope:?}"
        );
    }
    // Replace, then delete; each change is audited with before and after.
    let replaced = canonical(vec![
        Limit::per_minute("rpm", 7).unwrap(),
        Limit::per_minute("tpm", 700).unwrap(),
    ])
    .unwrap();
    store
        .set_limits(&ns, &scopes[2], &replaced, &actor(T0 + 10))
        .await
        .unwrap();
    store
        .delete_limits(&ns, &scopes[2], &actor(T0 + 11))
        .await
        .unwrap();
    let missing = store.delete_limits(&ns, &scopes[2], &actor(T0 + 12)).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
    assert_eq!(store.get_limits(&ns, &scopes[2]).await.unwrap(), None);
    let page = store
        .list_audit(&ns, "#resource:gpt-4", 10, None)
        .await
        .unwrap();
    let actions: Vec<AuditAction> = page.entries.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [
            AuditAction::LimitsDeleted,
            AuditAction::LimitsSet,
            AuditAction::LimitsSet
        ]
    );
    assert_eq!(
        page.entries[1].before.as_deref(),
        Some("rpm:30000:30000:60000")
    );
    assert_eq!(
        page.entries[1].after.as_deref(),
        Some("rpm:7000:7000:60000,tpm:700000:700000:60000")
    );
    // Entity-level changes are audited under the entity; system ones under #system.
    assert_eq!(audit_count(&*store, &ns, "e1").await, 2);
    assert_eq!(audit_count(&*store, &ns, "#system").await, 1);
}

/// Changes made in the same millisecond are listed newest first in the order they were made
/// (the sort key's salt came before the sequence: their order was random; failed before).
async fn audit_records_of_one_millisecond_keep_their_order(store: Arc<dyn Store>, ns: Namespace) {
    for policy in [FailurePolicy::Allow, FailurePolicy::Block]
        .into_iter()
        .cycle()
        .take(12)
    {
        store
            .set_failure_policy(&ns, Some(policy), &actor(T0))
            .await
            .unwrap();
    }
    let audit = store.list_audit(&ns, "#system", 20, None).await.unwrap();
    let after: Vec<_> = audit
        .entries
        .iter()
        .map(|e| e.after.as_deref().unwrap())
        .collect();
    let expected: Vec<_> = ["block", "allow"].into_iter().cycle().take(12).collect();
    assert_eq!(after, expected, "newest first, as made");
}

async fn a_failure_policy_is_stored_replaced_and_removed_audited(
    store: Arc<dyn Store>,
    ns: Namespace,
) {
    assert_eq!(store.get_failure_policy(&ns).await.unwrap(), None);
    for (i, policy) in [FailurePolicy::Allow, FailurePolicy::Block]
        .into_iter()
        .enumerate()
    {
        store
            .set_failure_policy(&ns, Some(policy), &actor(T0 + i as i64))
            .await
            .unwrap();
        assert_eq!(store.get_failure_policy(&ns).await.unwrap(), Some(policy));
    }
    // Soft limits beside it, at the system scope, keep their soft-ness.
    let soft = vec![Limit::per_minute("tpm", 5).unwrap().with_soft(true)];
    store
        .set_limits(&ns, &LimitScope::System, &soft, &actor(T0 + 2))
        .await
        .unwrap();
    store
        .set_failure_policy(&ns, None, &actor(T0 + 3))
        .await
        .unwrap();
    assert_eq!(store.get_failure_policy(&ns).await.unwrap(), None);
    assert_eq!(
        store.get_limits(&ns, &LimitScope::System).await.unwrap(),
        Some(soft),
        "a policy is not a limit set"
    );
    let again = store.set_failure_policy(&ns, None, &actor(T0 + 4)).await;
    assert!(matches!(again, Err(StoreError::NotFound(_))), "{again:?}");
    let audit = store.list_audit(&ns, "#system", 10, None).await.unwrap();
    let seen: Vec<_> = audit
        .entries
        .iter()
        .map(|e| (e.action, e.before.as_deref(), e.after.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            (AuditAction::FailurePolicyDeleted, Some("block"), None),
            (
                AuditAction::LimitsSet,
                None,
                Some("tpm:5000:5000:60000:soft")
            ),
            (AuditAction::FailurePolicySet, Some("allow"), Some("block")),
            (AuditAction::FailurePolicySet, None, Some("allow")),
        ]
    );
    // Namespaces keep their own.
    let other = common::unique_namespace();
    assert_eq!(store.get_failure_policy(&other).await.unwrap(), None);
}

/// The gates of `scopes`, as one read of their settings answers.
async fn gates(store: &dyn Store, ns: &Namespace, scopes: &[LimitScope]) -> Vec<Option<Gate>> {
    let levels = store.get_level_settings(ns, scopes).await.unwrap();
    levels.iter().map(|l| l.gate).collect()
}

async fn gates_and_cascade_policies_at_three_levels_read_in_one_call(
    store: Arc<dyn Store>,
    ns: Namespace,
) {
    let e = EntityId::new("e1").unwrap();
    let r = ResourceId::new("gpt-4").unwrap();
    let scopes = zae_limiter::domain::records::gate_scopes(&e, &r);
    assert_eq!(gates(&*store, &ns, &scopes).await, [None, None, None]);
    store
        .set_gate(&ns, &scopes[2], Some(Gate::Disabled), &actor(T0))
        .await
        .unwrap();
    store
        .set_gate(&ns, &scopes[1], Some(Gate::Enabled), &actor(T0 + 1))
        .await
        .unwrap();
    store
        .set_gate(&ns, &scopes[2], Some(Gate::Enabled), &actor(T0 + 2))
        .await
        .unwrap();
    // The same scope twice in one read is answered twice.
    let read = [scopes[2].clone(), scopes[0].clone(), scopes[2].clone()];
    assert_eq!(
        gates(&*store, &ns, &read).await,
        [Some(Gate::Enabled), None, Some(Gate::Enabled)]
    );
    store
        .set_gate(&ns, &scopes[2], None, &actor(T0 + 3))
        .await
        .unwrap();
    let again = store.set_gate(&ns, &scopes[2], None, &actor(T0 + 4)).await;
    assert!(matches!(again, Err(StoreError::NotFound(_))), "{again:?}");
    assert_eq!(
        gates(&*store, &ns, &scopes).await,
        [None, Some(Gate::Enabled), None]
    );
    let audit = store
        .list_audit(&ns, "#resource:gpt-4", 10, None)
        .await
        .unwrap();
    let seen: Vec<_> = audit
        .entries
        .iter()
        .map(|e| (e.action, e.before.as_deref(), e.after.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            (AuditAction::GateCleared, Some("enabled"), None),
            (AuditAction::GateSet, Some("disabled"), Some("enabled")),
            (AuditAction::GateSet, None, Some("disabled")),
        ]
    );
    assert_eq!(audit_count(&*store, &ns, "e1").await, 1);
    // Cascade policies live beside the gates, read in the same call, each cleared on its own.
    store
        .set_cascade(&ns, &scopes[0], Some(false), &actor(T0 + 11))
        .await
        .unwrap();
    store
        .set_cascade(&ns, &scopes[2], Some(true), &actor(T0 + 12))
        .await
        .unwrap();
    store
        .set_gate(&ns, &scopes[2], Some(Gate::Disabled), &actor(T0 + 13))
        .await
        .unwrap();
    store
        .set_gate(&ns, &scopes[2], None, &actor(T0 + 14))
        .await
        .unwrap();
    let levels = store.get_level_settings(&ns, &scopes).await.unwrap();
    let cascades: Vec<_> = levels.iter().map(|l| l.cascade).collect();
    assert_eq!(cascades, [Some(false), None, Some(true)]);
    assert_eq!(
        gates(&*store, &ns, &scopes).await,
        [None, Some(Gate::Enabled), None],
        "clearing a gate keeps the cascade policy"
    );
    store
        .set_cascade(&ns, &scopes[2], None, &actor(T0 + 15))
        .await
        .unwrap();
    let again = store
        .set_cascade(&ns, &scopes[2], None, &actor(T0 + 16))
        .await;
    assert!(matches!(again, Err(StoreError::NotFound(_))), "{again:?}");
    let audit = store.list_audit(&ns, "#resource:gpt-4", 2, None).await;
    let seen: Vec<_> = audit
        .unwrap()
        .entries
        .iter()
        .map(|e| (e.action, e.before.clone(), e.after.clone()))
        .collect();
    assert_eq!(
        seen[0],
        (AuditAction::CascadeCleared, Some("on".to_owned()), None)
    );
    let audit = store.list_audit(&ns, "e1", 10, None).await.unwrap();
    assert_eq!(audit.entries[0].action, AuditAction::CascadeSet);
    assert_eq!(audit.entries[0].after.as_deref(), Some("off"));
    // A bypass keeps its end, and its audit says it.
    for (at, until_ms) in [(T0 + 17, Some(T0 + 60_000)), (T0 + 18, None)] {
        store
            .set_gate(&ns, &scopes[1], Some(Gate::Bypass { until_ms }), &actor(at))
            .await
            .unwrap();
    }
    let audit = store.list_audit(&ns, "e1", 2, None).await.unwrap();
    let seen: Vec<_> = audit
        .entries
        .iter()
        .map(|e| (e.before.clone().unwrap(), e.after.clone().unwrap()))
        .collect();
    let until = format!("bypass until {}", T0 + 60_000);
    assert_eq!(
        seen,
        [
            (until.clone(), "bypass".to_owned()),
            ("enabled".to_owned(), until)
        ]
    );
    let until_ms = Some(T0 + 60_000);
    store
        .set_gate(
            &ns,
            &scopes[1],
            Some(Gate::Bypass { until_ms }),
            &actor(T0 + 19),
        )
        .await
        .unwrap();
    assert_eq!(
        gates(&*store, &ns, &scopes).await,
        [None, Some(Gate::Bypass { until_ms }), None]
    );
    store
        .set_gate(&ns, &scopes[1], Some(Gate::Enabled), &actor(T0 + 20))
        .await
        .unwrap();
    // A gate is not a limit set, and other namespaces have their own.
    assert_eq!(store.get_limits(&ns, &scopes[1]).await.unwrap(), None);
    let other = common::unique_namespace();
    assert_eq!(gates(&*store, &other, &scopes).await, [None, None, None]);
    // Deleting the entity deletes its gates.
    let entity = Entity {
        id: e.clone(),
        name: String::new(),
        parent: None,
        cascade: false,
        metadata: BTreeMap::new(),
    };
    store
        .create_entity(&ns, &entity, &actor(T0 + 5))
        .await
        .unwrap();
    store
        .set_gate(&ns, &scopes[0], Some(Gate::Disabled), &actor(T0 + 6))
        .await
        .unwrap();
    store
        .delete_entity(&ns, &e, false, &actor(T0 + 7))
        .await
        .unwrap();
    let levels = store.get_level_settings(&ns, &scopes).await.unwrap();
    assert_eq!(
        levels[..2],
        [LevelSettings::default(), LevelSettings::default()],
        "its gates and cascade policies went with it"
    );
}

async fn audit_pages_newest_first(store: Arc<dyn Store>, ns: Namespace) {
    let scope = LimitScope::System;
    for i in 0..5u64 {
        let limits = vec![Limit::per_minute("rpm", i + 1).unwrap()];
        store
            .set_limits(&ns, &scope, &limits, &actor(T0 + i as i64))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store
            .list_audit(&ns, "#system", 2, after.as_deref())
            .await
            .unwrap();
        pages += 1;
        seen.extend(page.entries.iter().map(|e| e.at_ms - T0));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, [4, 3, 2, 1, 0]);
    assert_eq!(pages, 3);
}

/// One resource across entities, both periods, page after page: every snapshot once, in order.
async fn usage_lists_a_resource_across_entities_page_by_page(store: Arc<dyn Store>, ns: Namespace) {
    let hour = Period::Hour.start(T0);
    let day = Period::Day.start(T0);
    let mut written = Vec::new();
    for entity in ["a", "b", "c"] {
        for (i, resource) in ["gpt-4", "embed"].into_iter().enumerate() {
            for (period, start) in [
                (Period::Hour, hour),
                (Period::Hour, hour + 3_600_000),
                (Period::Day, day),
            ] {
                written.push(Usage {
                    entity: EntityId::new(entity).unwrap(),
                    resource: ResourceId::new(resource).unwrap(),
                    period,
                    start_ms: start,
                    amounts: tokens(&[("rpm", 1 + i as i64)]),
                });
            }
        }
    }
    store.add_usage(&ns, &written).await.unwrap();
    let other = Namespace::new(format!("{ns}-x")).unwrap();
    store.add_usage(&other, &written[..1]).await.unwrap();
    let list = |entity: Option<&str>, resource: Option<&str>, period: Option<Period>, size| {
        let store = store.clone();
        let ns = ns.clone();
        let entity = entity.map(|e| EntityId::new(e).unwrap());
        let resource = resource.map(|r| ResourceId::new(r).unwrap());
        async move {
            let (mut all, mut page, mut pages) = (Vec::new(), None, 0);
            loop {
                let query = UsageQuery {
                    entity: entity.as_ref(),
                    resource: resource.as_ref(),
                    period,
                    from_ms: 0,
                    to_ms: i64::MAX,
                    page_size: size,
                    page: page.as_ref(),
                };
                let found = store.usage(&ns, &query).await.unwrap();
                assert!(
                    found.snapshots.len() <= size,
                    "a page holds at most its size"
                );
                pages += 1;
                all.extend(found.snapshots);
                match found.next {
                    Some(next) => page = Some(next),
                    None => return (all, pages),
                }
            }
        }
    };
    // Both stores list an entity's daily snapshots first, then by start and resource.
    let key = |u: &Usage| {
        (
            u.entity.clone(),
            u.period.as_str(),
            u.start_ms,
            u.resource.clone(),
        )
    };
    let expect = |keep: &dyn Fn(&Usage) -> bool| {
        let mut e: Vec<Usage> = written.iter().filter(|u| keep(u)).cloned().collect();
        e.sort_by_key(key);
        e
    };
    let sorted = |mut v: Vec<Usage>| {
        v.sort_by_key(key);
        v
    };
    // Across entities, in the store's order: each once.
    let (across, pages) = list(None, Some("gpt-4"), None, 100).await;
    assert_eq!(sorted(across), expect(&|u| u.resource.as_str() == "gpt-4"));
    assert!(pages >= 1);
    let (paged, pages) = list(Some("a"), None, None, 2).await;
    assert_eq!(
        paged,
        expect(&|u| u.entity.as_str() == "a"),
        "one entity: in order"
    );
    assert!(pages >= 3, "6 snapshots, 2 at a time: {pages} pages");
    let (daily, _) = list(None, Some("embed"), Some(Period::Day), 100).await;
    assert_eq!(
        sorted(daily),
        expect(&|u| u.resource.as_str() == "embed" && u.period == Period::Day)
    );
    let (both, _) = list(Some("b"), None, None, 4).await;
    assert_eq!(
        sorted(both),
        expect(&|u| u.entity.as_str() == "b"),
        "both periods"
    );
    let (one, _) = list(Some("c"), Some("embed"), Some(Period::Hour), 1).await;
    assert_eq!(
        sorted(one),
        expect(&|u| u.entity.as_str() == "c"
            && u.resource.as_str() == "embed"
            && u.period == Period::Hour)
    );
}

async fn usage_snapshots_add_up_and_query_by_range(store: Arc<dyn Store>, ns: Namespace) {
    let entity = EntityId::new("e").unwrap();
    let usage = |resource: &str, period: Period, start_ms: i64, amounts: &[(&str, i64)]| Usage {
        entity: entity.clone(),
        resource: ResourceId::new(resource).unwrap(),
        period,
        start_ms,
        amounts: tokens(amounts),
    };
    let hour = Period::Hour.start(T0);
    let day = Period::Day.start(T0);
    // Two daemons flushing the same snapshots: their additions add up; a refund subtracts.
    store
        .add_usage(
            &ns,
            &[
                usage("gpt-4", Period::Hour, hour, &[("rpm", 3), ("tpm", 500)]),
                usage("gpt-4", Period::Day, day, &[("rpm", 3)]),
            ],
        )
        .await
        .unwrap();
    store
        .add_usage(
            &ns,
            &[
                usage("gpt-4", Period::Hour, hour, &[("rpm", 2), ("tpm", -100)]),
                usage("gpt-4", Period::Day, day, &[("rpm", 2)]),
            ],
        )
        .await
        .unwrap();
    store
        .add_usage(
            &ns,
            &[usage(
                "gpt-4",
                Period::Hour,
                hour + 3_600_000,
                &[("rpm", 1)],
            )],
        )
        .await
        .unwrap();
    store
        .add_usage(&ns, &[usage("embed", Period::Hour, hour, &[("rpm", 9)])])
        .await
        .unwrap();
    let found = store
        .usage_of(
            &ns,
            &entity,
            Some(&ResourceId::new("gpt-4").unwrap()),
            Period::Hour,
            hour,
            hour + 1,
        )
        .await
        .unwrap();
    assert_eq!(
        found,
        [usage(
            "gpt-4",
            Period::Hour,
            hour,
            &[("rpm", 5), ("tpm", 400)]
        )]
    );
    let both_hours = store
        .usage_of(
            &ns,
            &entity,
            Some(&ResourceId::new("gpt-4").unwrap()),
            Period::Hour,
            hour,
            hour + 7_200_000,
        )
        .await
        .unwrap();
    assert_eq!(both_hours.len(), 2);
    assert_eq!(both_hours[1].start_ms, hour + 3_600_000);
    let all_resources = store
        .usage_of(&ns, &entity, None, Period::Hour, hour, hour + 1)
        .await
        .unwrap();
    assert_eq!(all_resources.len(), 2);
    let days = store
        .usage_of(&ns, &entity, None, Period::Day, day, day + 86_400_000)
        .await
        .unwrap();
    assert_eq!(days, [usage("gpt-4", Period::Day, day, &[("rpm", 5)])]);
    let elsewhere = Namespace::new(format!("{ns}-x")).unwrap();
    assert!(
        store
            .usage_of(&elsewhere, &entity, None, Period::Hour, 0, i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn deleting_and_moving_entities(store: Arc<dyn Store>, ns: Namespace) {
    let entity = |id: &str, parent: Option<&str>| Entity {
        id: EntityId::new(id).unwrap(),
        name: id.to_owned(),
        parent: parent.map(|p| EntityId::new(p).unwrap()),
        cascade: false,
        metadata: BTreeMap::new(),
    };
    let (proj, other, child) = (
        EntityId::new("proj").unwrap(),
        EntityId::new("other").unwrap(),
        EntityId::new("child").unwrap(),
    );
    for e in [
        entity("proj", None),
        entity("other", None),
        entity("child", Some("proj")),
    ] {
        store.create_entity(&ns, &e, &actor(T0)).await.unwrap();
    }
    // Buckets and entity-level limits of the project, and a system default that must survive.
    let limits = vec![Limit::per_minute("rpm", 10).unwrap()];
    for resource in ["gpt-4", "embed"] {
        let out = consume(
            &*store,
            &key(&ns, "proj", resource),
            &limits,
            &tokens(&[("rpm", 1)]),
            T0,
            Seen::Unread,
        )
        .await
        .unwrap();
        assert!(admitted(&out));
    }
    store
        .set_limits(&ns, &LimitScope::Entity(proj.clone()), &limits, &actor(T0))
        .await
        .unwrap();
    let proj_gpt4 = LimitScope::EntityResource(proj.clone(), ResourceId::new("gpt-4").unwrap());
    store
        .set_limits(&ns, &proj_gpt4, &limits, &actor(T0))
        .await
        .unwrap();
    store
        .set_limits(&ns, &LimitScope::System, &limits, &actor(T0))
        .await
        .unwrap();

    // With a child, deleting is refused and changes nothing.
    let refused = store.delete_entity(&ns, &proj, false, &actor(T0 + 1)).await;
    assert!(
        matches!(refused, Err(StoreError::Refused(_))),
        "{refused:?}"
    );
    assert!(store.get_entity(&ns, &proj).await.unwrap().is_some());

    // Moving the child to another parent, then deleting the project.
    let moved = store
        .move_entity(&ns, &child, Some(&other), &actor(T0 + 2))
        .await
        .unwrap();
    assert_eq!(moved.parent.as_ref(), Some(&other));
    assert!(store.list_children(&ns, &proj).await.unwrap().is_empty());
    assert_eq!(store.list_children(&ns, &other).await.unwrap(), [moved]);
    store
        .delete_entity(&ns, &proj, false, &actor(T0 + 3))
        .await
        .unwrap();
    assert_eq!(store.get_entity(&ns, &proj).await.unwrap(), None);
    for resource in ["gpt-4", "embed"] {
        assert_eq!(
            store
                .load_bucket(&key(&ns, "proj", resource))
                .await
                .unwrap(),
            None,
            "buckets go with it"
        );
    }
    assert_eq!(
        store
            .get_limits(&ns, &LimitScope::Entity(proj.clone()))
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.get_limits(&ns, &proj_gpt4).await.unwrap(), None);
    assert_eq!(
        store.get_limits(&ns, &LimitScope::System).await.unwrap(),
        Some(limits.clone())
    );
    // The audit trail stays, in order.
    let actions: Vec<AuditAction> = store
        .list_audit(&ns, "proj", 10, None)
        .await
        .unwrap()
        .entries
        .iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions[0], AuditAction::EntityDeleted);
    let moves = store.list_audit(&ns, "child", 10, None).await.unwrap();
    assert_eq!(moves.entries[0].action, AuditAction::EntityMoved);
    assert!(
        moves.entries[0]
            .after
            .as_deref()
            .unwrap()
            .contains("\"parent\":\"other\"")
    );
    // Forced: the child keeps its (now missing) parent.
    store
        .delete_entity(&ns, &other, true, &actor(T0 + 4))
        .await
        .unwrap();
    assert_eq!(
        store.get_entity(&ns, &child).await.unwrap().unwrap().parent,
        Some(other.clone())
    );
    // Moving to no parent.
    let freed = store
        .move_entity(&ns, &child, None, &actor(T0 + 5))
        .await
        .unwrap();
    assert_eq!(freed.parent, None);
    assert!(store.list_children(&ns, &other).await.unwrap().is_empty());
    let missing = store.move_entity(&ns, &proj, None, &actor(T0 + 6)).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
}

async fn deleting_a_namespace_removes_everything_in_it_only(store: Arc<dyn Store>, ns: Namespace) {
    let other = Namespace::new(format!("{ns}-keep")).unwrap();
    let limits = vec![Limit::per_minute("rpm", 10).unwrap()];
    let e = EntityId::new("e").unwrap();
    for n in [&ns, &other] {
        store.create_namespace(n).await.unwrap();
        store.create_namespace(n).await.unwrap(); // idempotent
        let entity = Entity {
            id: e.clone(),
            name: "e".into(),
            parent: None,
            cascade: false,
            metadata: BTreeMap::new(),
        };
        store.create_entity(n, &entity, &actor(T0)).await.unwrap();
        store
            .set_limits(n, &LimitScope::System, &limits, &actor(T0))
            .await
            .unwrap();
        store
            .set_failure_policy(n, Some(FailurePolicy::Allow), &actor(T0))
            .await
            .unwrap();
        assert!(admitted(
            &consume(
                &*store,
                &key(n, "e", "r"),
                &limits,
                &tokens(&[("rpm", 1)]),
                T0,
                Seen::Unread
            )
            .await
            .unwrap()
        ));
        let usage = Usage {
            entity: e.clone(),
            resource: ResourceId::new("r").unwrap(),
            period: Period::Hour,
            start_ms: Period::Hour.start(T0),
            amounts: tokens(&[("rpm", 1)]),
        };
        store.add_usage(n, &[usage]).await.unwrap();
    }
    let listed = store.list_namespaces().await.unwrap();
    assert!(
        listed.contains(&ns) && listed.contains(&other),
        "{listed:?}"
    );
    store.delete_namespace(&ns).await.unwrap();
    let listed = store.list_namespaces().await.unwrap();
    assert!(!listed.contains(&ns) && listed.contains(&other));
    let missing = store.delete_namespace(&ns).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
    for (n, kept) in [(&ns, false), (&other, true)] {
        assert_eq!(store.get_entity(n, &e).await.unwrap().is_some(), kept);
        assert_eq!(store.get_failure_policy(n).await.unwrap().is_some(), kept);
        assert_eq!(
            store
                .get_limits(n, &LimitScope::System)
                .await
                .unwrap()
                .is_some(),
            kept
        );
        assert_eq!(
            store
                .load_bucket(&key(n, "e", "r"))
                .await
                .unwrap()
                .is_some(),
            kept
        );
        assert_eq!(audit_count(&*store, n, "e").await > 0, kept);
        assert_eq!(
            !store
                .usage_of(n, &e, None, Period::Hour, 0, i64::MAX)
                .await
                .unwrap()
                .is_empty(),
            kept
        );
    }
    store.delete_namespace(&other).await.unwrap();
}

/// A consumption the stored balance covers defers a due refill: it commutes with another
/// daemon's refill, and a refund that the deferred refill would carry past the capacity makes it
/// conflict (and return the item) rather than credit the clamp away.
async fn a_deferred_refill_commutes_but_not_with_a_refund_past_capacity(
    store: Arc<dyn Store>,
    ns: Namespace,
) {
    // 10 tokens a second, at most 100.
    let limits = vec![
        Limit::per_second("rps", 10)
            .unwrap()
            .with_burst(100)
            .unwrap(),
    ];
    let k = key(&ns, "e", "r");
    let stale = admitted_at(&*store, &k, &limits, ("rps", 50), T0, Seen::Unread).await;
    // Another daemon needs the refill (52 of 50 stored + 5 refilled) and writes it.
    let seen = Seen::Bucket(stale.clone());
    admitted_at(&*store, &k, &limits, ("rps", 52), T0 + 500, seen).await;
    // This daemon takes 2 of the 50 it saw, deferring its refill: it lands on the other's state.
    let deferred = |seen: &zae_limiter::Bucket, take: i64| match plan(
        Some(seen),
        &limits,
        &tokens(&[("rps", take)]),
        T0 + 1_000,
    ) {
        Plan::Admit {
            write: Write::Change(c),
            ..
        } if c.refill.is_none() => Write::Change(c),
        other => panic!("expected a deferred refill, got {other:?}"),
    };
    let stored = store.write_bucket(&k, &deferred(&stale, 2)).await.unwrap();
    assert_eq!(stored_balance(&stored, "rps"), MILLI, "55 - 52 - 2");
    assert_eq!(stored_consumed(&stored, "rps"), 104 * MILLI);
    // A refund elsewhere to 96 tokens: with the 5 pending since the stored refill time it would
    // pass the capacity, so the deferred write planned from 1 token conflicts.
    settle(&*store, &k, &tokens(&[("rps", -95)]), T0 + 1_000).await;
    let conflict = store.write_bucket(&k, &deferred(&stored, 1)).await;
    let Err(StoreError::Conflict {
        current: Some(current),
        ..
    }) = conflict
    else {
        panic!("expected a conflict, got {conflict:?}")
    };
    assert_eq!(stored_balance(&current, "rps"), 96 * MILLI);
}

/// Writes submitted at the same moment (the DynamoDB store sends them together, in PartiQL
/// batches) are applied or refused each on its own, with the conditions and results of one write
/// at a time: a refill planned from the state as stored lands, one planned from a state another
/// writer has moved on conflicts with the item as it is now, and a limit change removes and
/// inserts limits.
async fn writes_submitted_together_are_decided_each_on_its_own(
    store: Arc<dyn Store>,
    ns: Namespace,
) {
    let rps = Limit::per_second("rps", 10)
        .unwrap()
        .with_burst(100)
        .unwrap();
    let before = canonical(vec![rps.clone(), Limit::per_second("tps", 1_000).unwrap()]).unwrap();
    let after = canonical(vec![rps, Limit::per_minute("rpm", 600).unwrap()]).unwrap();
    let mut writes = Vec::new();
    for i in 0..30u64 {
        let k = key(&ns, &format!("e{i}"), "r");
        let stale = admitted_at(&*store, &k, &before, ("rps", 50), T0, Seen::Unread).await;
        if i % 3 == 1 {
            // Another writer refills first: 50 + 5 - 52 = 3 tokens left.
            let seen = Seen::Bucket(stale.clone());
            admitted_at(&*store, &k, &before, ("rps", 52), T0 + 500, seen).await;
        }
        let limits = if i % 3 == 2 { &after } else { &before };
        // 52 of 50 stored: the write needs the refill, so it is guarded by the refill time.
        let Plan::Admit { mut write, .. } =
            plan(Some(&stale), limits, &tokens(&[("rps", 52)]), T0 + 1_000)
        else {
            panic!("expected an admission")
        };
        write.mark(stale.mark, 1_000 + i);
        writes.push((k, write));
    }
    let answers = futures_util::future::join_all(
        writes.iter().map(|(k, write)| store.submit_write(k, write)),
    )
    .await;
    for (i, ((k, write), answer)) in (0u64..).zip(writes.iter().zip(answers)) {
        let stored = store.load_bucket(k).await.unwrap().unwrap();
        if i % 3 == 1 {
            let Err(StoreError::Conflict {
                current: Some(current),
                ..
            }) = answer
            else {
                panic!("write {i}: expected a conflict, got {answer:?}")
            };
            assert_eq!(*current, stored, "write {i}: the item as it is now");
            assert_eq!(stored_balance(&stored, "rps"), 3 * MILLI, "write {i}");
            assert_ne!(stored.mark, write.marks(), "write {i}");
            continue;
        }
        match answer {
            Ok(Some(returned)) => assert_eq!(returned, stored, "write {i}"),
            Ok(None) => {}
            Err(e) => panic!("write {i}: expected it to apply, got {e}"),
        }
        assert_eq!(stored.mark, write.marks(), "write {i}");
        assert_eq!(stored.refilled_at, T0 + 1_000, "write {i}");
        assert_eq!(
            stored_balance(&stored, "rps"),
            8 * MILLI,
            "write {i}: 50 + 10 - 52"
        );
        assert_eq!(stored_consumed(&stored, "rps"), 102 * MILLI, "write {i}");
        let names: BTreeSet<String> = stored
            .limits
            .iter()
            .map(|l| l.limit.name().to_string())
            .collect();
        let want = if i % 3 == 2 {
            ["rpm", "rps"]
        } else {
            ["rps", "tps"]
        };
        assert_eq!(names, BTreeSet::from(want.map(String::from)), "write {i}");
    }
}

/// Usage additions submitted at once, one record per call as the usage flush sends them (and
/// once as one call of many records): new snapshots, new counters on existing snapshots, and
/// additions (and refunds) to existing counters all add up.
async fn usage_added_at_once_adds_up(store: Arc<dyn Store>, ns: Namespace) {
    let hour = Period::Hour.start(T0);
    let record = |i: i64, amounts: &[(&str, i64)]| Usage {
        entity: EntityId::new(format!("e{i}")).unwrap(),
        resource: ResourceId::new("r").unwrap(),
        period: Period::Hour,
        start_ms: hour,
        amounts: tokens(amounts),
    };
    let at_once = |records: Vec<Usage>| {
        let (store, ns) = (store.clone(), ns.clone());
        async move {
            let added = futures_util::future::join_all(
                records
                    .iter()
                    .map(|u| store.add_usage(&ns, std::slice::from_ref(u))),
            )
            .await;
            for (u, added) in records.iter().zip(added) {
                added.unwrap_or_else(|e| panic!("{}: {e}", u.entity));
            }
        }
    };
    // New snapshots.
    at_once((0..20).map(|i| record(i, &[("rpm", 1 + i)])).collect()).await;
    // The same counter again on even entities; a refund and a new counter on odd ones.
    at_once(
        (0..20)
            .map(|i| match i % 2 {
                0 => record(i, &[("rpm", 2)]),
                _ => record(i, &[("rpm", -1), ("tpm", 100)]),
            })
            .collect(),
    )
    .await;
    // One call of many records: a new counter on even entities.
    let all: Vec<Usage> = (0..20)
        .map(|i| record(i, &[("rpm", 10), ("tpm", 5)]))
        .collect();
    store.add_usage(&ns, &all).await.unwrap();
    for i in 0..20 {
        let found = store
            .usage_of(
                &ns,
                &EntityId::new(format!("e{i}")).unwrap(),
                Some(&ResourceId::new("r").unwrap()),
                Period::Hour,
                hour,
                hour + 1,
            )
            .await
            .unwrap();
        let want = match i % 2 {
            0 => record(i, &[("rpm", 1 + i + 2 + 10), ("tpm", 5)]),
            _ => record(i, &[("rpm", 1 + i - 1 + 10), ("tpm", 105)]),
        };
        assert_eq!(found, [want], "entity e{i}");
    }
}

/// Stamps out every test of the suite for one store.
/// An operator's bucket change: applied with its audit record, refused whole on a moved bucket
/// (with the bucket as stored, nothing written), and done once per key: a key in use writes
/// nothing and gives the first outcome back, until its time is over; a key is per entity.
async fn a_bucket_operation_is_conditional_audited_and_done_once_per_key(
    store: Arc<dyn Store>,
    ns: Namespace,
) {
    let k = key(&ns, "buyer", "gpt-4");
    let limits = vec![Limit::per_minute("tpm", 100).unwrap()];
    let out = consume(
        &*store,
        &k,
        &limits,
        &tokens(&[("tpm", 90)]),
        T0,
        Seen::Unread,
    )
    .await;
    assert!(admitted(&out.unwrap()));
    let seen = store.load_bucket(&k).await.unwrap().unwrap();
    let (reset, gained) = plan_operation(&seen, &Operation::Reset(None), T0);
    assert_eq!(gained, tokens(&[("tpm", 90)]));
    let reset = reset.expect("a write");
    let audited = |at_ms| {
        AuditEntry::new(
            "buyer".into(),
            AuditAction::BucketReset,
            &actor(at_ms),
            None,
            Some("{}".into()),
        )
    };
    let once = |key: &str, outcome: &str, until_ms| Once {
        key: key.into(),
        outcome: outcome.into(),
        until_ms,
    };

    // Another writer's refund lands first: refused whole, with the bucket as it is now.
    settle(&*store, &k, &tokens(&[("tpm", -5)]), T0).await;
    let first = once("order-1", "first", T0 + 1_000);
    match store
        .operate_bucket(&k, Some(&reset), &audited(T0), Some(&first))
        .await
    {
        Err(StoreError::Conflict { index: 0, current }) => {
            assert_eq!(current.map(|b| stored_balance(&b, "tpm")), Some(15 * MILLI));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(audit_count(&*store, &ns, "buyer").await, 0, "no record");
    // Re-planned on the bucket as stored, it lands with its record and its key.
    let seen = store.load_bucket(&k).await.unwrap().unwrap();
    let (reset, _) = plan_operation(&seen, &Operation::Reset(None), T0 + 6_000);
    let landed = store
        .operate_bucket(&k, reset.as_ref(), &audited(T0), Some(&first))
        .await;
    assert_eq!(landed.unwrap(), None);
    let after = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(stored_balance(&after, "tpm"), 100 * MILLI);
    assert_eq!(
        stored_consumed(&after, "tpm"),
        85 * MILLI,
        "the counter stays"
    );
    assert_eq!(audit_count(&*store, &ns, "buyer").await, 1);

    // The same key again: nothing written, the first outcome back.
    let at = T0 + 6_000;
    let forty = tokens(&[("tpm", 40)]);
    let out = consume(&*store, &k, &limits, &forty, at, Seen::Bucket(after)).await;
    assert!(admitted(&out.unwrap()));
    let seen = store.load_bucket(&k).await.unwrap().unwrap();
    let (again, _) = plan_operation(&seen, &Operation::Reset(None), T0 + 6_000);
    let replay = once("order-1", "second", T0 + 2_000);
    let replayed = store
        .operate_bucket(&k, again.as_ref(), &audited(T0 + 500), Some(&replay))
        .await;
    assert_eq!(replayed.unwrap().as_deref(), Some("first"));
    let unchanged = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(stored_balance(&unchanged, "tpm"), 60 * MILLI);
    assert_eq!(audit_count(&*store, &ns, "buyer").await, 1);
    // Another entity's key of the same name is its own; nothing to write is still recorded.
    let other = key(&ns, "other-buyer", "gpt-4");
    let recorded = store
        .operate_bucket(&other, None, &audited(T0 + 500), Some(&replay))
        .await;
    assert_eq!(recorded.unwrap(), None);
    assert_eq!(audit_count(&*store, &ns, "other-buyer").await, 0);
    assert_eq!(
        audit_count(&*store, &ns, "buyer").await,
        2,
        "audited on the entry's subject"
    );
    // Once its time is over, the key is free again.
    let late = once("order-1", "third", T0 + 10_000);
    let landed = store
        .operate_bucket(&k, again.as_ref(), &audited(T0 + 1_001), Some(&late))
        .await;
    assert_eq!(landed.unwrap(), None);
    let after = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(stored_balance(&after, "tpm"), 100 * MILLI);
    // Without a key, each call applies (here: nothing left to give, only the record).
    let (write, _) = plan_operation(&after, &Operation::Reset(None), T0 + 6_000);
    assert_eq!(write, None);
    for _ in 0..2 {
        let done = store
            .operate_bucket(&k, None, &audited(T0 + 2_000), None)
            .await;
        assert_eq!(done.unwrap(), None);
    }
    assert_eq!(audit_count(&*store, &ns, "buyer").await, 5);
}

/// A session quota's top-up is kept with its bucket, raising its ceiling (a refund then returns
/// above the amount), until a write at its window's end takes it back.
async fn a_session_top_up_is_stored_and_taken_back_at_the_window_s_end(
    store: Arc<dyn Store>,
    ns: Namespace,
) {
    let k = key(&ns, "buyer", "assistant");
    let window = std::time::Duration::from_secs(60);
    let limits = vec![Limit::session_quota("s", 10, window).unwrap()];
    let out = consume(
        &*store,
        &k,
        &limits,
        &tokens(&[("s", 10)]),
        T0,
        Seen::Unread,
    )
    .await;
    assert!(admitted(&out.unwrap()));
    let seen = store.load_bucket(&k).await.unwrap().unwrap();
    let (top_up, _) = plan_operation(&seen, &Operation::TopUp(tokens(&[("s", 7)])), T0 + 1);
    let entry = AuditEntry::new(
        "buyer".into(),
        AuditAction::BucketToppedUp,
        &actor(T0),
        None,
        Some("{}".into()),
    );
    store
        .operate_bucket(&k, top_up.as_ref(), &entry, None)
        .await
        .unwrap();
    let stored = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(
        (stored.limits[0].balance, stored.limits[0].topped_up),
        (7 * MILLI, 7 * MILLI)
    );
    let out = consume(
        &*store,
        &k,
        &limits,
        &tokens(&[("s", 7)]),
        T0 + 2,
        Seen::Unread,
    )
    .await;
    assert!(admitted(&out.unwrap()), "the seven bought");
    let out = consume(
        &*store,
        &k,
        &limits,
        &tokens(&[("s", 1)]),
        T0 + 60_000,
        Seen::Unread,
    )
    .await;
    assert!(admitted(&out.unwrap()), "a new window");
    let stored = store.load_bucket(&k).await.unwrap().unwrap();
    assert_eq!(
        (stored.limits[0].balance, stored.limits[0].topped_up),
        (9 * MILLI, 0),
        "the window's end took the top-up back"
    );
}

/// Entities with limits of their own for a resource, a page at a time in id order, and the
/// resources with defaults; a deletion (of the limits, or of the entity) takes them off. The
/// DynamoDB store reads an index, so the test waits for it to settle.
async fn limits_are_listed_by_resource(store: Arc<dyn Store>, ns: Namespace) {
    let by = actor(T0);
    let limits = [Limit::per_minute("rpm", 5).unwrap()];
    let r = ResourceId::new("gpt-4").unwrap();
    let id = |s: &str| EntityId::new(s).unwrap();
    for e in ["k3", "k1", "k2", "k4"] {
        let scope = LimitScope::EntityResource(id(e), r.clone());
        store.set_limits(&ns, &scope, &limits, &by).await.unwrap();
    }
    let elsewhere = LimitScope::EntityResource(id("k9"), ResourceId::new("other").unwrap());
    store
        .set_limits(&ns, &elsewhere, &limits, &by)
        .await
        .unwrap();
    let default = LimitScope::Entity(id("k5"));
    store.set_limits(&ns, &default, &limits, &by).await.unwrap();
    for resource in ["gpt-4", "embed"] {
        let scope = LimitScope::Resource(ResourceId::new(resource).unwrap());
        store.set_limits(&ns, &scope, &limits, &by).await.unwrap();
    }
    let scope = LimitScope::EntityResource(id("k4"), r.clone());
    store.delete_limits(&ns, &scope, &by).await.unwrap();
    let entity = Entity {
        id: id("k2"),
        name: String::new(),
        parent: None,
        cascade: false,
        metadata: Default::default(),
    };
    store.create_entity(&ns, &entity, &by).await.unwrap();
    store
        .delete_entity(&ns, &id("k2"), false, &by)
        .await
        .unwrap();
    let settled = |ids: &[EntityId]| ids == [id("k1"), id("k3")];
    let mut pages = Vec::new();
    for _ in 0..200 {
        let (first, next) = store
            .list_entities_with_limits(&ns, &r, 1, None)
            .await
            .unwrap();
        let next = next.expect("more after the first page");
        let (rest, _) = store
            .list_entities_with_limits(&ns, &r, 10, Some(&next))
            .await
            .unwrap();
        pages = [first, rest].concat();
        if settled(&pages) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(settled(&pages), "{pages:?}");
    let resources = store.list_resources_with_defaults(&ns).await.unwrap();
    let names: Vec<&str> = resources.iter().map(|r| r.as_str()).collect();
    assert_eq!(names, ["embed", "gpt-4"]);
    let other = common::unique_namespace();
    assert!(
        store
            .list_resources_with_defaults(&other)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Every bucket of a resource, with its entity, in entity order; none of another resource or
/// namespace.
async fn a_resource_s_buckets_are_read_together(store: Arc<dyn Store>, ns: Namespace) {
    let limits = vec![Limit::per_minute("rpm", 100).unwrap()];
    let take = tokens(&[("rpm", 10)]);
    for (entity, resource) in [
        ("k2", "gpt-4"),
        ("k1", "gpt-4"),
        ("k3", "embed"),
        ("k3", "gpt-4"),
    ] {
        let k = key(&ns, entity, resource);
        let out = consume(&*store, &k, &limits, &take, T0, Seen::Unread).await;
        assert!(admitted(&out.unwrap()));
    }
    let elsewhere = key(&common::unique_namespace(), "k0", "gpt-4");
    let out = consume(&*store, &elsewhere, &limits, &take, T0, Seen::Unread).await;
    assert!(admitted(&out.unwrap()));
    let found = store
        .resource_buckets(&ns, &ResourceId::new("gpt-4").unwrap())
        .await
        .unwrap();
    let ids: Vec<&str> = found.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(ids, ["k1", "k2", "k3"]);
    assert!(
        found
            .iter()
            .all(|(_, b)| stored_balance(b, "rpm") == 90 * MILLI)
    );
    let none = store
        .resource_buckets(&ns, &ResourceId::new("nothing").unwrap())
        .await
        .unwrap();
    assert!(none.is_empty());
}

macro_rules! conformance {
    ($store:ident, $make:expr) => {
        mod $store {
            use super::*;

            conformance!(@tests $make;
                create_then_load_round_trips,
                eight_tasks_never_over_admit,
                racing_creators_charge_once,
                a_refill_conflict_retries_without_a_read,
                a_deferred_refill_commutes_but_not_with_a_refund_past_capacity,
                writes_submitted_together_are_decided_each_on_its_own,
                a_rejection_writes_nothing,
                settlements_go_into_debt_and_refunds_stop_at_capacity,
                commit_is_all_or_nothing,
                limit_changes_reconfigure_stored_buckets,
                entities_and_children,
                entities_read_together,
                stored_limits_at_four_scopes,
                a_failure_policy_is_stored_replaced_and_removed_audited,
                audit_records_of_one_millisecond_keep_their_order,
                usage_lists_a_resource_across_entities_page_by_page,
                gates_and_cascade_policies_at_three_levels_read_in_one_call,
                audit_pages_newest_first,
                usage_snapshots_add_up_and_query_by_range,
                usage_added_at_once_adds_up,
                deleting_and_moving_entities,
                deleting_a_namespace_removes_everything_in_it_only,
                a_bucket_operation_is_conditional_audited_and_done_once_per_key,
                a_session_top_up_is_stored_and_taken_back_at_the_window_s_end,
                limits_are_listed_by_resource,
                a_resource_s_buckets_are_read_together,
            );
        }
    };
    (@tests $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                super::$test($make, common::unique_namespace()).await;
            }
        )*
    };
}

conformance!(memory, common::memory());
conformance!(dynamodb, common::dynamodb().await);

/// A DynamoDB store (at `endpoint`, or DynamoDB Local) with one write call in flight at a time,
/// so that writes of the same moment wait for it and go out together.
async fn batching_store(endpoint: Option<String>) -> Arc<DynamoStore> {
    common::dynamodb().await; // deploys the table
    let mut settings = common::settings(common::TEST_TABLE);
    settings.endpoint_url = endpoint.or(settings.endpoint_url);
    settings.write_calls_in_flight = 1;
    Arc::new(DynamoStore::connect(&settings).await)
}

async fn write_together(store: &Arc<DynamoStore>) {
    let ns = common::unique_namespace();
    writes_submitted_together_are_decided_each_on_its_own(store.clone(), ns).await;
}

/// What the store's batch writer did so far, after checking that it sent batches and DynamoDB
/// refused none of their statements.
fn batched_and_none_refused(store: &DynamoStore) -> zae_limiter::store::dynamodb::BatchCounts {
    let counts = store.batched_writes();
    assert!(counts.batched >= 2, "{counts:?}");
    assert_eq!(
        counts.resent, 0,
        "batched writes DynamoDB refused: {counts:?}"
    );
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dynamodb_store_sends_writes_of_the_same_moment_in_batches() {
    let store = batching_store(None).await;
    write_together(&store).await;
    batched_and_none_refused(&store);
}

/// Usage additions of the same moment go out in batches too. In a batch, an addition only adds
/// to counters that exist; one whose snapshot or counter is new is sent again on its own, as the
/// `UpdateItem` that creates it: here at most 40 of them (20 new snapshots, then 10 and 10 new
/// counters), and the others applied in their batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dynamodb_store_adds_usage_of_the_same_moment_in_batches() {
    let store = batching_store(None).await;
    usage_added_at_once_adds_up(store.clone(), common::unique_namespace()).await;
    let counts = batched_and_none_refused(&store);
    assert!(counts.created <= 40, "{counts:?}");
    assert!(counts.batched > counts.created, "{counts:?}");
}

/// Two additions to one snapshot at once (two usage flushes overlap while a daemon shuts down)
/// both count, and do not cost the batch: DynamoDB refuses a batch that names an item twice, so
/// the second goes out on its own. (A single-threaded runtime, so that all five additions are
/// queued before the writer takes them.)
#[tokio::test]
async fn two_additions_to_one_snapshot_at_once_both_count() {
    let store = batching_store(None).await;
    let ns = common::unique_namespace();
    let hour = Period::Hour.start(T0);
    let record = |entity: &str, rpm: i64| Usage {
        entity: EntityId::new(entity).unwrap(),
        resource: ResourceId::new("r").unwrap(),
        period: Period::Hour,
        start_ms: hour,
        amounts: tokens(&[("rpm", rpm)]),
    };
    for entity in ["a", "b", "c", "x"] {
        store.add_usage(&ns, &[record(entity, 1)]).await.unwrap();
    }
    let at_once = [
        record("x", 1),
        record("a", 10),
        record("b", 1),
        record("a", 100),
        record("c", 1),
    ];
    let added = futures_util::future::join_all(
        at_once
            .iter()
            .map(|u| store.add_usage(&ns, std::slice::from_ref(u))),
    )
    .await;
    for added in added {
        added.unwrap();
    }
    for (entity, total) in [("a", 111), ("b", 2), ("c", 2), ("x", 2)] {
        let found = store
            .usage_of(
                &ns,
                &EntityId::new(entity).unwrap(),
                None,
                Period::Hour,
                hour,
                hour + 1,
            )
            .await
            .unwrap();
        assert_eq!(found, [record(entity, total)], "entity {entity}");
    }
    batched_and_none_refused(&store);
}

/// A daemon whose IAM policy does not allow PartiQL (`dynamodb:PartiQLUpdate`) still writes: a
/// batch refused as a whole goes out again one `UpdateItem` each, and batching stays off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_refused_as_a_batch_go_out_one_by_one() {
    let proxy = common::proxy::FaultProxy::start(&common::endpoint()).await;
    proxy.set(common::proxy::Fault::Refuse("BatchExecuteStatement"));
    let store = batching_store(Some(proxy.endpoint())).await;
    write_together(&store).await;
    let counts = store.batched_writes();
    assert!(counts.batched >= 2, "{counts:?}");
    assert_eq!(
        counts.resent, counts.batched,
        "every refused batch was sent again"
    );
    // Off for good: the next writes of one moment, bucket changes and usage additions alike, go
    // out on their own.
    write_together(&store).await;
    usage_added_at_once_adds_up(store.clone(), common::unique_namespace()).await;
    assert_eq!(store.batched_writes(), counts);
}
