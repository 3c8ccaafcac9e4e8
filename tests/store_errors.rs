//! DynamoDB failures become typed, bounded errors: never a hang, never a panic.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use zae_limiter::store::Store;
use zae_limiter::store::dynamodb::DynamoStore;
use zae_limiter::{BucketKey, EntityId, Namespace, ResourceId};

fn bucket() -> BucketKey {
    BucketKey {
        namespace: Namespace::default_namespace(),
        entity: EntityId::new("e").unwrap(),
        resource: ResourceId::new("r").unwrap(),
    }
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_transient_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings = common::settings("zae-limiter");
    settings.endpoint_url = Some(format!("http://127.0.0.1:{port}"));
    settings.attempt_timeout = Duration::from_millis(500);
    let store = DynamoStore::connect(&settings).await;
    let err = store.load_bucket(&bucket()).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("cannot reach DynamoDB"), "{err}");
}

#[tokio::test]
async fn a_missing_table_is_a_clear_permanent_error() {
    let store = DynamoStore::connect(&common::settings("no-such-table-here")).await;
    let err = store.load_bucket(&bucket()).await.unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    assert!(
        err.to_string()
            .contains("\"no-such-table-here\" does not exist"),
        "{err}"
    );
}
