//! Every error a caller can see, and its gRPC status: mapped here and nowhere else.

use sluicegate_core::InvalidShape;
use sluicegate_core::backend::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong; `field` names the offending input.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The request is larger than the server's bounds (MAX_DESCRIPTORS, MAX_KEY_BYTES, MAX_BATCH):
    /// refused before any work, and counted as shed.
    #[error("{field}: {reason}")]
    OutOfBounds { field: &'static str, reason: String },
    /// The request asks for something this server's lock-down switches refuse.
    #[error("{0}")]
    PermissionDenied(String),
    /// What the request names does not exist (an unknown or expired reservation).
    #[error("{0}")]
    NotFound(String),
    /// The backend could not decide and FAILURE_MODE says to report it (Envoy's
    /// `failure_mode_deny` then decides).
    #[error("rate limit backend unavailable: {0}")]
    Backend(#[from] BackendError),
}

impl ApiError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub fn out_of_bounds(field: &'static str, reason: impl Into<String>) -> Self {
        ApiError::OutOfBounds {
            field,
            reason: reason.into(),
        }
    }
}

impl From<InvalidShape> for ApiError {
    fn from(e: InvalidShape) -> Self {
        ApiError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        match &e {
            ApiError::InvalidArgument { .. } | ApiError::OutOfBounds { .. } => {
                tonic::Status::invalid_argument(e.to_string())
            }
            ApiError::PermissionDenied(_) => tonic::Status::permission_denied(e.to_string()),
            ApiError::NotFound(_) => tonic::Status::not_found(e.to_string()),
            ApiError::Backend(b) if b.kind == sluicegate_core::backend::ErrorKind::Shed => {
                tonic::Status::resource_exhausted(e.to_string())
            }
            ApiError::Backend(_) => tonic::Status::unavailable(e.to_string()),
        }
    }
}
