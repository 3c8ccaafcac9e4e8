//! SDK errors as [`StoreError`]s: what retrying can fix is transient, a missing table or refused
//! credentials get a message that says what to do, and a network failure names its innermost
//! cause ("Connection refused") instead of the layers wrapped around it.

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;

use crate::store::StoreError;

/// The cancellation reasons of a cancelled transaction, one per item in request order.
pub(super) trait CancellationReasons {
    fn cancellation_reasons(&self) -> &[aws_sdk_dynamodb::types::CancellationReason];
}

impl CancellationReasons for TransactWriteItemsError {
    fn cancellation_reasons(&self) -> &[aws_sdk_dynamodb::types::CancellationReason] {
        match self {
            Self::TransactionCanceledException(t) => t.cancellation_reasons(),
            _ => &[],
        }
    }
}

/// Maps an SDK error to a [`StoreError`]: service codes that retrying can fix, time-outs and
/// unreachable endpoints are transient; a missing table or refused credentials get a plain message.
pub(crate) fn classify<E>(
    err: SdkError<E, aws_smithy_runtime_api::http::Response>,
    table: &str,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let Some(cause) = credentials_error(&err) {
        return StoreError::Backend(format!(
            "no usable AWS credentials: {cause} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
             AWS_PROFILE, or run with an IAM role)"
        ));
    }
    match &err {
        SdkError::TimeoutError(_) => {
            StoreError::Transient("DynamoDB did not answer in time".into())
        }
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            StoreError::Transient("DynamoDB did not answer in time".into())
        }
        SdkError::DispatchFailure(_) => {
            StoreError::Transient(format!("cannot reach DynamoDB: {}", innermost(&err)))
        }
        SdkError::ResponseError(_) => StoreError::Transient(format!(
            "unreadable answer from DynamoDB: {}",
            innermost(&err)
        )),
        SdkError::ServiceError(se) if se.err().code().is_none() => StoreError::Backend(format!(
            "the endpoint answered HTTP {} without a DynamoDB error: is it a DynamoDB endpoint?",
            se.raw().status().as_u16()
        )),
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("Unknown");
            let message = se.err().message().unwrap_or("").to_owned();
            match code {
                "ProvisionedThroughputExceededException"
                | "ThrottlingException"
                | "RequestLimitExceeded" => StoreError::Transient(format!(
                    "DynamoDB throttled the request ({code}): {message}"
                )),
                "InternalServerError"
                | "ServiceUnavailable"
                | "TransactionConflictException"
                | "TransactionInProgressException" => {
                    StoreError::Transient(format!("{code}: {message}"))
                }
                "ResourceNotFoundException" => StoreError::Backend(format!(
                    "table {table:?} does not exist (run `zae-limiter deploy`): {message}"
                )),
                "AccessDeniedException" => StoreError::Backend(format!(
                    "access denied to table {table:?} (the IAM policy needs the dynamodb actions \
                     listed in the README): {message}"
                )),
                "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "MissingAuthenticationTokenException"
                | "ExpiredTokenException" => {
                    StoreError::Backend(format!("AWS refused the credentials ({code}): {message}"))
                }
                _ => StoreError::Backend(format!("{code}: {message}")),
            }
        }
        _ => StoreError::Backend(DisplayErrorContext(&err).to_string()),
    }
}

/// The credentials provider's error, when the call failed for want of credentials (the SDK
/// reports it as a dispatch failure, which would otherwise read as an outage).
fn credentials_error(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
            .is_some()
        {
            return Some(innermost(e));
        }
        cur = e.source();
    }
    None
}

/// The deepest cause in an error chain: for network failures, the one a person can act on
/// ("Connection refused"), without the layers of wrapping above it.
fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
