//! The tonic services: validate and convert, call the limiter or the administration rules,
//! convert back. No limiting or administration logic lives here. Every error goes through
//! [`status`], the one mapping from errors to gRPC codes; over-limit is a normal answer
//! (`allowed = false`), never an error. Its parts: [`convert`] (requests to domain values and
//! back, deadlines and callers) and one file per service ([`rate_limiter`], [`admin`]; Envoy's is
//! [`crate::envoy`]).

pub mod admin;
pub mod convert;
pub mod rate_limiter;

use tonic::Status;

pub use admin::AdminService;
pub(crate) use convert::{caller, deadline, namespace};
pub use rate_limiter::RateLimiterService;

use crate::limiter::LimiterError;

/// The one mapping from errors to gRPC status codes. `UNAVAILABLE` means "retry later": an
/// outage, overload, shutdown, an actor restarting, a close not confirmed yet. A permanent store
/// failure (missing table, refused credentials, corrupt item) is `FAILED_PRECONDITION`: retrying
/// will not help until an operator acts.
pub fn status(e: LimiterError) -> Status {
    let message = e.to_string();
    let outage = e.is_outage();
    match e {
        LimiterError::InvalidArgument { .. } => Status::invalid_argument(message),
        LimiterError::OutOfRange { .. } => Status::out_of_range(message),
        LimiterError::LeaseNotFound(_) | LimiterError::NotFound(_) => Status::not_found(message),
        LimiterError::AlreadyExists(_) => Status::already_exists(message),
        LimiterError::PermissionDenied(_) => Status::permission_denied(message),
        LimiterError::FailedPrecondition(_) => Status::failed_precondition(message),
        LimiterError::Store(_) if !outage => Status::failed_precondition(message),
        LimiterError::Store(_)
        | LimiterError::Deadline
        | LimiterError::Overloaded { .. }
        | LimiterError::ShuttingDown
        | LimiterError::ActorUnavailable(_)
        | LimiterError::CloseUnconfirmed { .. } => Status::unavailable(message),
    }
}
