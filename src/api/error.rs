//! Every error a caller can see, and its gRPC status: mapped here and nowhere else.

use crate::backend::BackendError;
use crate::core::InvalidShape;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong; `field` names the offending input.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
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
            ApiError::InvalidArgument { .. } => tonic::Status::invalid_argument(e.to_string()),
            ApiError::Backend(_) => tonic::Status::unavailable(e.to_string()),
        }
    }
}
