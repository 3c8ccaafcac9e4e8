//! Table life cycle: deploy (idempotent), status, delete. Used by the CLI and by tests.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};

use super::errors::classify;
use super::keys::{keys, n};
use super::schema::{GSI1, GSI1PK, GSI1SK, PK, SK, TTL, VERSION};
use crate::store::StoreError;

const META_PK: &str = "#META";
const META_SK: &str = "#SCHEMA";

/// What `deploy` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployed {
    Created,
    AlreadyDeployed,
}

/// What `status` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStatusReport {
    pub table: String,
    pub status: String,
    /// DynamoDB's own count; AWS refreshes it about every six hours.
    pub item_count: i64,
    pub size_bytes: i64,
    pub parent_index: bool,
    pub ttl: String,
    /// `None` when the table has no schema record (not deployed by this tool).
    pub schema_version: Option<i64>,
}

fn build_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Creates the table with its keys, on-demand billing, the parent -> children index, TTL and the
/// schema record, waiting until it is active. A table that exists already is left as it is.
///
/// # Errors
/// [`StoreError`] when DynamoDB cannot be reached, refuses, or the existing table has other keys.
pub async fn deploy(client: &Client, table: &str) -> Result<Deployed, StoreError> {
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(build_err)
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .map_err(build_err)
    };
    let index = GlobalSecondaryIndex::builder()
        .index_name(GSI1)
        .key_schema(key(GSI1PK, KeyType::Hash)?)
        .key_schema(key(GSI1SK, KeyType::Range)?)
        .projection(
            Projection::builder()
                .projection_type(ProjectionType::All)
                .build(),
        )
        .build()
        .map_err(build_err)?;
    let created = client
        .create_table()
        .table_name(table)
        .attribute_definitions(attr(PK)?)
        .attribute_definitions(attr(SK)?)
        .attribute_definitions(attr(GSI1PK)?)
        .attribute_definitions(attr(GSI1SK)?)
        .key_schema(key(PK, KeyType::Hash)?)
        .key_schema(key(SK, KeyType::Range)?)
        .global_secondary_indexes(index)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await;
    let outcome = match created {
        Ok(_) => Deployed::Created,
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_in_use_exception()) =>
        {
            check_keys(client, table).await?;
            Deployed::AlreadyDeployed
        }
        Err(e) => return Err(classify(e, table)),
    };
    wait_active(client, table).await?;
    if outcome == Deployed::Created {
        client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name(TTL)
                    .build()
                    .map_err(build_err)?,
            )
            .send()
            .await
            .map_err(|e| classify(e, table))?;
    }
    let mut meta = keys(META_PK.into(), META_SK.into());
    meta.insert("version".into(), n(VERSION));
    client
        .put_item()
        .table_name(table)
        .set_item(Some(meta))
        .send()
        .await
        .map_err(|e| classify(e, table))?;
    Ok(outcome)
}

/// Whether the table can serve: it exists and is active (or updating, which serves too).
///
/// # Errors
/// [`StoreError`] saying why not.
pub(crate) async fn probe(client: &Client, table: &str) -> Result<(), StoreError> {
    let out = describe(client, table).await?;
    match out.table().and_then(|t| t.table_status()) {
        Some(TableStatus::Active | TableStatus::Updating) => Ok(()),
        Some(other) => Err(StoreError::Backend(format!(
            "table {table:?} is {}, not ACTIVE",
            other.as_str()
        ))),
        None => Err(StoreError::Backend(format!(
            "DynamoDB described no table {table:?}"
        ))),
    }
}

async fn describe(
    client: &Client,
    table: &str,
) -> Result<aws_sdk_dynamodb::operation::describe_table::DescribeTableOutput, StoreError> {
    client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| classify(e, table))
}

async fn check_keys(client: &Client, table: &str) -> Result<(), StoreError> {
    let out = describe(client, table).await?;
    let schema: Vec<(&str, &KeyType)> = out
        .table()
        .map(|t| t.key_schema())
        .unwrap_or_default()
        .iter()
        .map(|k| (k.attribute_name(), k.key_type()))
        .collect();
    if schema == [(PK, &KeyType::Hash), (SK, &KeyType::Range)] {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "table {table:?} exists but has other keys ({schema:?}); it is not a zae-limiter table"
        )))
    }
}

async fn wait_active(client: &Client, table: &str) -> Result<(), StoreError> {
    for _ in 0..300 {
        let out = describe(client, table).await?;
        if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(StoreError::Transient(format!(
        "table {table:?} did not become active within a minute"
    )))
}

/// Describes the table: state, DynamoDB's item count, index, TTL and schema version.
///
/// # Errors
/// [`StoreError`] when the table does not exist or DynamoDB cannot be reached.
pub async fn status(client: &Client, table: &str) -> Result<TableStatusReport, StoreError> {
    let out = describe(client, table).await?;
    let t = out
        .table()
        .ok_or_else(|| StoreError::Backend(format!("DynamoDB described no table {table:?}")))?;
    let ttl = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(|e| classify(e, table))?;
    let meta = client
        .get_item()
        .table_name(table)
        .set_key(Some(keys(META_PK.into(), META_SK.into())))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| classify(e, table))?;
    let schema_version = meta
        .item()
        .and_then(|i| i.get("version"))
        .and_then(|v| match v {
            AttributeValue::N(v) => v.parse().ok(),
            _ => None,
        });
    Ok(TableStatusReport {
        table: table.to_owned(),
        status: t
            .table_status()
            .map_or_else(|| "UNKNOWN".to_owned(), |s| s.as_str().to_owned()),
        item_count: t.item_count().unwrap_or(0),
        size_bytes: t.table_size_bytes().unwrap_or(0),
        parent_index: t
            .global_secondary_indexes()
            .iter()
            .any(|i| i.index_name() == Some(GSI1)),
        ttl: ttl
            .time_to_live_description()
            .and_then(|d| d.time_to_live_status())
            .map_or_else(|| "UNKNOWN".to_owned(), |s| s.as_str().to_owned()),
        schema_version,
    })
}

/// Deletes the table and everything in it.
///
/// # Errors
/// [`StoreError`] when the table does not exist or DynamoDB cannot be reached.
pub async fn delete(client: &Client, table: &str) -> Result<(), StoreError> {
    client
        .delete_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| classify(e, table))?;
    Ok(())
}
