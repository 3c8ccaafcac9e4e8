//! The tonic services: validate and convert, call the limiter or the administration rules,
//! convert back. No limiting or administration logic lives here. Every error goes through
//! [`status`], the one mapping from errors to gRPC codes; over-limit is a normal answer
//! (`allowed = false`), never an error. Its parts: [`convert`] (requests to domain values and
//! back, deadlines and callers) and one file per service ([`rate_limiter`], [`admin`]; Envoy's is
//! [`crate::envoy`]).

pub mod admin;
pub mod convert;
pub mod rate_limiter;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use admin::AdminService;
pub(crate) use convert::{caller, deadline, namespace};
pub use rate_limiter::RateLimiterService;

use crate::limiter::LimiterError;

/// The one mapping from errors to gRPC status codes. `UNAVAILABLE` means "retry later": an
/// outage, overload, shutdown, an actor restarting, a close not confirmed yet. A permanent store
/// failure (missing table, refused credentials, corrupt item) is `FAILED_PRECONDITION`: retrying
/// will not help until an operator acts.
///
/// Bad input also names its field in a structured detail (`google.rpc.BadRequest` in the
/// `grpc-status-details-bin` trailer), so that clients need not parse the message.
/// The `google.rpc.ErrorInfo` reason of a refusal because the resource is disabled.
pub const DISABLED_REASON: &str = "RESOURCE_DISABLED";

pub fn status(e: LimiterError) -> Status {
    let message = e.to_string();
    let outage = e.is_outage();
    let status = match e {
        LimiterError::InvalidArgument {
            field,
            message: why,
        } => bad_request(Code::InvalidArgument, message, &field, &why),
        LimiterError::OutOfRange {
            field,
            message: why,
        } => bad_request(Code::OutOfRange, message, &field, &why),
        LimiterError::LeaseNotFound(_) | LimiterError::NotFound(_) => Status::not_found(message),
        LimiterError::AlreadyExists(_) => Status::already_exists(message),
        LimiterError::PermissionDenied(_) => Status::permission_denied(message),
        LimiterError::FailedPrecondition(_) => Status::failed_precondition(message),
        LimiterError::Disabled {
            entity,
            resource,
            level,
        } => {
            let metadata = std::collections::HashMap::from([
                ("entity_id".to_owned(), entity),
                ("resource".to_owned(), resource),
                ("level".to_owned(), level),
            ]);
            let details = ErrorDetails::with_error_info(DISABLED_REASON, "zae-limiter", metadata);
            Status::with_error_details(Code::FailedPrecondition, message, details)
        }
        LimiterError::Store(_) if !outage => Status::failed_precondition(message),
        LimiterError::Store(_)
        | LimiterError::Deadline
        | LimiterError::Overloaded { .. }
        | LimiterError::ShuttingDown
        | LimiterError::ActorUnavailable(_)
        | LimiterError::CloseUnconfirmed { .. } => Status::unavailable(message),
    };
    // The RPC's trace span (when there is one) says how it ended.
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("rpc.grpc.status_code", status.code() as i64);
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", status.message());
    }
    status
}

/// A status for bad input: `message` for people, and `field` with its `description` as a
/// `google.rpc.BadRequest` field violation for programs.
pub fn bad_request(code: Code, message: String, field: &str, description: &str) -> Status {
    let details = ErrorDetails::with_bad_request_violation(field, description);
    Status::with_error_details(code, message, details)
}
