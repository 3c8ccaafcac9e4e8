//! `zae-limiter acquire` (acquire, then commit, roll back or keep the lease open) and
//! `zae-limiter lease` (adjust, renew, commit or roll back a lease kept open).

use std::process::ExitCode;

use super::CliError;
use super::args::{AcquireArgs, LeaseOp};
use crate::client::{Acquire, Client, ClientError};

/// Exit status of `acquire` when the request is over limit.
pub const OVER_LIMIT: u8 = 3;

/// Acquires, prints the answer as JSON, and closes the lease as asked. Exit status 0 when
/// admitted, [`OVER_LIMIT`] when refused.
///
/// # Errors
/// [`CliError::Client`] when the daemon cannot be reached or refuses the request.
pub async fn acquire(args: AcquireArgs) -> Result<ExitCode, CliError> {
    let client = Client::connect(&args.socket).await?;
    let mut request = Acquire::new(&args.entity, &args.resource)
        .namespace(&args.namespace)
        .limits(&args.limit);
    if let Some(policy) = args.on_unavailable {
        request = request.on_unavailable(policy);
    }
    for (name, tokens) in &args.consume {
        request = request.consume(name, *tokens);
    }
    for (resource, amounts) in &args.also {
        request = request.also(resource, amounts.iter().map(|(n, t)| (n.as_str(), *t)));
    }
    let mut lease = match client.acquire(request).await {
        Ok(lease) => lease,
        Err(ClientError::OverLimit {
            retry_after,
            violations,
            refused_by,
        }) => {
            let violations: Vec<_> = violations
                .iter()
                .map(|v| {
                    serde_json::json!({
                        "limit": v.limit,
                        "available": v.available,
                        "requested": v.requested,
                        "retry_after_ms": v.retry_after.map(|d| d.as_millis() as u64),
                        "resource": v.resource,
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "allowed": false,
                    "refused_by": refused_by,
                    "retry_after_ms": retry_after.map(|d| d.as_millis() as u64),
                    "violations": violations,
                })
            );
            return Ok(ExitCode::from(OVER_LIMIT));
        }
        Err(e) => return Err(e.into()),
    };
    if !args.adjust.is_empty() {
        lease
            .adjust(args.adjust.iter().map(|(n, t)| (n.as_str(), *t)))
            .await?;
    }
    let id = lease.id().to_owned();
    let also: serde_json::Map<String, serde_json::Value> = lease
        .others()
        .map(|(resource, id)| (resource.to_owned(), id.into()))
        .collect();
    let overdrawn: Vec<String> = lease.overdrawn().map(str::to_owned).collect();
    let bypassed = lease.bypassed();
    let closed = if args.keep_open {
        lease.into_id();
        "open"
    } else if args.rollback {
        lease.rollback().await?;
        "rolled_back"
    } else {
        lease.commit().await?;
        "committed"
    };
    println!(
        "{}",
        serde_json::json!({
            "allowed": true,
            "lease_id": id,
            "lease": closed,
            "overdrawn": overdrawn,
            "bypassed": bypassed,
            "also": also,
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// Adjusts, renews, commits or rolls back a lease kept open (`acquire --keep-open`), by its id.
///
/// # Errors
/// [`CliError::Client`] when the daemon cannot be reached or refuses (an unknown or expired
/// lease is `NOT_FOUND`).
pub async fn lease(socket: &std::path::Path, op: LeaseOp) -> Result<(), CliError> {
    let client = Client::connect(socket).await?;
    match op {
        LeaseOp::Adjust { lease_id, delta } => {
            let delta = delta.iter().map(|(n, t)| (n.as_str(), *t));
            client.adjust_lease(&lease_id, delta).await?;
        }
        LeaseOp::Renew { lease_id } => client.renew_lease(&lease_id).await?,
        LeaseOp::Commit { lease_id } => client.commit_lease(&lease_id).await?,
        LeaseOp::Rollback { lease_id } => client.rollback_lease(&lease_id).await?,
    }
    println!("ok");
    Ok(())
}
