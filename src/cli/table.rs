//! The table's life: `deploy` (create it, idempotent), `status` and `delete`, straight against
//! DynamoDB (no daemon needed).

use super::CliError;
use super::args::TableArgs;
use crate::store::dynamodb::DynamoSettings;
use crate::store::dynamodb::table::{self, Deployed};

/// Where the table is, for messages.
fn place(settings: &DynamoSettings) -> String {
    match &settings.endpoint_url {
        Some(url) => format!("table {:?} at {url}", settings.table),
        None => format!("table {:?} in {}", settings.table, settings.region),
    }
}

/// Creates the table (keys, on-demand billing, parent index, TTL), unless it is there.
///
/// # Errors
/// [`CliError::Store`] saying where and why.
pub async fn deploy(args: &TableArgs) -> Result<(), CliError> {
    let settings = args.settings()?;
    let client = settings.client().await;
    let place = place(&settings);
    match table::deploy(&client, &settings.table)
        .await
        .map_err(|e| CliError::store(format!("deploy of {place} failed"), e))?
    {
        Deployed::Created => println!("deployed {place}"),
        Deployed::AlreadyDeployed => println!("already deployed: {place}"),
    }
    Ok(())
}

/// Prints the table's state, item count and schema version.
///
/// # Errors
/// [`CliError::Store`] saying where and why.
pub async fn status(args: &TableArgs) -> Result<(), CliError> {
    let settings = args.settings()?;
    let client = settings.client().await;
    let report = table::status(&client, &settings.table)
        .await
        .map_err(|e| CliError::store(format!("status of {} failed", place(&settings)), e))?;
    println!("table:          {}", report.table);
    println!("status:         {}", report.status);
    println!(
        "items:          {} (as reported by DynamoDB)",
        report.item_count
    );
    println!("size:           {} bytes", report.size_bytes);
    println!(
        "parent index:   {}",
        if report.parent_index {
            "present"
        } else {
            "missing"
        }
    );
    println!("ttl:            {}", report.ttl);
    match report.schema_version {
        Some(v) => println!("schema version: {v}"),
        None => println!("schema version: none (not deployed by zae-limiter)"),
    }
    Ok(())
}

/// Deletes the table and everything in it (`yes` confirms).
///
/// # Errors
/// [`CliError::Usage`] without `yes`; [`CliError::Store`] saying where and why.
pub async fn delete(args: &TableArgs, yes: bool) -> Result<(), CliError> {
    let settings = args.settings()?;
    let place = place(&settings);
    if !yes {
        return Err(CliError::Usage(format!(
            "refusing to delete {place} without --yes (this deletes every limit, entity and \
             bucket in it)"
        )));
    }
    let client = settings.client().await;
    table::delete(&client, &settings.table)
        .await
        .map_err(|e| CliError::store(format!("delete of {place} failed"), e))?;
    println!("deleted {place}");
    Ok(())
}
