//! Cascade: an acquire for a child entity with `cascade` on also charges its parent, in one
//! atomic commit. Every test runs against a daemon on the memory store and on DynamoDB Local.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use common::daemon::Daemon;
use zae_limiter::Limit;
use zae_limiter::client::{Acquire, Client, ClientError};
use zae_limiter::proto;

/// Every read goes to the store, so availability shows what other entities' actors wrote.
const FRESH: &str = "max_staleness_ms = 0\n";

fn memory() -> Daemon {
    Daemon::start(&format!("[limiter]\n{FRESH}"), &[])
}

fn dynamodb() -> Daemon {
    let ns = common::unique_namespace();
    Daemon::start(
        &format!(
            "[limiter]\nbackend = \"dynamodb\"\nnamespaces = [\"{ns}\"]\n{FRESH}\
             [dynamodb]\ntable = \"{}\"\nendpoint_url = \"{}\"\n",
            common::TEST_TABLE,
            common::endpoint()
        ),
        &[],
    )
}

async fn entity(client: &Client, id: &str, parent: Option<&str>, cascade: bool, rpm: u64) {
    let mut admin = client.admin();
    admin
        .create_entity(proto::CreateEntityRequest {
            namespace: String::new(),
            entity: Some(proto::Entity {
                id: id.into(),
                name: id.into(),
                parent_id: parent.map(Into::into),
                cascade,
                metadata: Default::default(),
            }),
        })
        .await
        .unwrap();
    admin
        .set_limits(proto::SetLimitsRequest {
            namespace: String::new(),
            scope: Some(proto::LimitScope {
                entity_id: Some(id.into()),
                resource: None,
            }),
            limits: vec![proto::Limit::from(&Limit::per_hour("rpm", rpm).unwrap())],
        })
        .await
        .unwrap();
}

async fn available(client: &Client, entity: &str) -> i64 {
    client.available(entity, "gpt-4", &[]).await.unwrap()["rpm"]
}

async fn take(client: &Client, entity: &str, n: i64) -> Result<(), ClientError> {
    client
        .consume(Acquire::new(entity, "gpt-4").consume("rpm", n))
        .await
}

async fn refusal(client: &Client, entity: &str) -> Option<String> {
    match take(client, entity, 1).await {
        Err(ClientError::OverLimit { refused_by, .. }) => refused_by,
        other => panic!("expected a refusal for {entity}, got {other:?}"),
    }
}

async fn charges_both_or_neither(daemon: Daemon) {
    let client = daemon.client().await;
    entity(&client, "proj", None, false, 5).await;
    entity(&client, "key-a", Some("proj"), true, 3).await;
    entity(&client, "key-b", Some("proj"), true, 100).await;
    entity(&client, "key-c", Some("proj"), false, 100).await;

    // The child's own limit runs out first: refused by itself, the parent is not charged.
    take(&client, "key-a", 3).await.unwrap();
    assert_eq!(available(&client, "proj").await, 2);
    assert_eq!(refusal(&client, "key-a").await, None);
    assert_eq!(
        available(&client, "proj").await,
        2,
        "a refused child charges no parent"
    );

    // The parent runs out: refused by the parent, and the child is not charged.
    take(&client, "key-b", 2).await.unwrap();
    assert_eq!(available(&client, "proj").await, 0);
    assert_eq!(refusal(&client, "key-b").await.as_deref(), Some("proj"));
    assert_eq!(
        available(&client, "key-b").await,
        98,
        "a refused parent leaves the child as it was"
    );

    // Without cascade, the parent's limits do not apply.
    take(&client, "key-c", 10).await.unwrap();
    assert_eq!(available(&client, "proj").await, 0);
}

async fn rollback_refunds_child_and_parent(daemon: Daemon) {
    let client = daemon.client().await;
    entity(&client, "org", None, false, 10).await;
    entity(&client, "team", Some("org"), true, 10).await;
    let mut lease = client
        .acquire(Acquire::new("team", "gpt-4").consume("rpm", 4))
        .await
        .unwrap();
    assert_eq!(
        (
            available(&client, "team").await,
            available(&client, "org").await
        ),
        (6, 6)
    );
    lease.adjust([("rpm", 1)]).await.unwrap();
    lease.rollback().await.unwrap();
    assert_eq!(
        (
            available(&client, "team").await,
            available(&client, "org").await
        ),
        (10, 10)
    );
    // A commit writes the adjustment to both.
    let mut lease = client
        .acquire(Acquire::new("team", "gpt-4").consume("rpm", 2))
        .await
        .unwrap();
    lease.adjust([("rpm", 3)]).await.unwrap();
    lease.commit().await.unwrap();
    assert_eq!(
        (
            available(&client, "team").await,
            available(&client, "org").await
        ),
        (5, 5)
    );
}

async fn concurrent_children_never_over_admit_the_parent(daemon: Daemon) {
    let client = daemon.client().await;
    entity(&client, "parent", None, false, 50).await;
    for i in 0..8 {
        entity(&client, &format!("child-{i}"), Some("parent"), true, 1_000).await;
    }
    let admitted = Arc::new(AtomicI64::new(0));
    let tasks: Vec<_> = (0..8)
        .flat_map(|i| (0..4).map(move |_| i))
        .map(|i| {
            let (client, admitted) = (client.clone(), admitted.clone());
            tokio::spawn(async move {
                for _ in 0..5 {
                    match take(&client, &format!("child-{i}"), 1).await {
                        Ok(()) => {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(ClientError::OverLimit { .. }) => {}
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    // 160 attempts on a parent of 50 per hour (the test takes seconds: at most one more refills).
    assert!((50..=51).contains(&admitted), "admitted {admitted}");
    let parent_left = available(&client, "parent").await;
    assert!(parent_left <= 1, "the parent is used up: {parent_left}");
    let mut children_used = 0;
    for i in 0..8 {
        children_used += 1_000 - available(&client, &format!("child-{i}")).await;
    }
    assert_eq!(
        children_used, admitted,
        "every admit charged its child once"
    );
}

/// A limit name is known when the entity or its cascade parent has that limit (the Python
/// zae-limiter's rule): a key that holds `rpm`, under a project that holds `tpm`, consumes
/// `{"rpm": 1, "tpm": 500}`, each from the bucket that has it; its lease adjusts `tpm` too. A
/// name that neither has is refused, naming the field. (Before, the `tpm` the parent holds was
/// refused with `INVALID_ARGUMENT`.)
async fn a_name_the_parent_holds_is_known_to_the_child(daemon: Daemon) {
    let client = daemon.client().await;
    entity(&client, "project", None, false, 100).await;
    let mut admin = client.admin();
    admin
        .set_limits(proto::SetLimitsRequest {
            namespace: String::new(),
            scope: Some(proto::LimitScope {
                entity_id: Some("project".into()),
                resource: None,
            }),
            // A token a minute: the seconds this test takes refill none, whatever the machine.
            limits: vec![proto::Limit::from(
                &Limit::custom("tpm", 10_000, 10_080, Duration::from_secs(7 * 86_400)).unwrap(),
            )],
        })
        .await
        .unwrap();
    entity(&client, "key", Some("project"), true, 100).await;
    let mut lease = client
        .acquire(
            Acquire::new("key", "gpt-4")
                .consume("rpm", 1)
                .consume("tpm", 500),
        )
        .await
        .expect("rpm is the key's, tpm its parent's");
    lease.adjust([("tpm", 250)]).await.unwrap();
    lease.commit().await.unwrap();
    let key = client.available("key", "gpt-4", &[]).await.unwrap();
    assert_eq!(key.get("rpm"), Some(&99));
    assert_eq!(key.get("tpm"), None, "the key holds no tpm");
    let project = client.available("project", "gpt-4", &[]).await.unwrap();
    assert_eq!(project.get("tpm"), Some(&(10_000 - 750)));
    let lease = client
        .acquire(Acquire::new("key", "gpt-4").consume("tpm", 100))
        .await
        .unwrap();
    lease.rollback().await.unwrap();
    let project = client.available("project", "gpt-4", &[]).await.unwrap();
    assert_eq!(
        project.get("tpm"),
        Some(&(10_000 - 750)),
        "a rollback gives the parent its share back"
    );
    let unknown = client
        .consume(Acquire::new("key", "gpt-4").consume("xyz", 1))
        .await
        .unwrap_err();
    match unknown {
        ClientError::Status(s) => {
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
            assert!(s.message().starts_with("consume: "), "{}", s.message());
            assert!(s.message().contains("\"xyz\""), "{}", s.message());
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

macro_rules! both_stores {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::memory()).await;
                }
            )*
        }
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let _table = super::common::dynamodb().await;
                    super::$test(super::dynamodb()).await;
                }
            )*
        }
    };
}

both_stores!(
    charges_both_or_neither,
    rollback_refunds_child_and_parent,
    concurrent_children_never_over_admit_the_parent,
    a_name_the_parent_holds_is_known_to_the_child,
);
