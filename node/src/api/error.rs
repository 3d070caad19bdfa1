//! The one place where errors become HTTP answers: `{"error": {"code", "message"}}` with the
//! status that fits.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, snake_case.
    pub code: &'static str,
    /// For people: what went wrong and what to do.
    pub message: String,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn chain_unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "chain_unavailable", message)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(target: "agora::api", error = %e, "store error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code, message: self.message } };
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::artifacts::ArtifactError> for ApiError {
    fn from(e: crate::artifacts::ArtifactError) -> Self {
        use crate::artifacts::ArtifactError as A;
        match e {
            A::NotFound(_) => Self::not_found(e.to_string()),
            A::TooLarge { limit } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the upload is larger than the limit of {limit} bytes"),
            ),
            other => {
                tracing::error!(target: "agora::api", error = %other, "artifact store error");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", other.to_string())
            }
        }
    }
}

impl From<crate::registry::RegistryError> for ApiError {
    fn from(e: crate::registry::RegistryError) -> Self {
        use crate::registry::RegistryError as R;
        match e {
            R::NotFound(m) => Self::not_found(m),
            R::AlreadyExists(m) => Self::new(StatusCode::CONFLICT, "already_exists", m),
            R::Invalid(m) => Self::new(StatusCode::BAD_REQUEST, "invalid_parameter", m),
            R::Unauthenticated(m) => Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", m),
            R::Forbidden(m) => Self::new(StatusCode::FORBIDDEN, "forbidden", m),
            R::Store(e) => e.into(),
            R::Artifact(e) => e.into(),
        }
    }
}

/// A blocking task that panicked or was cancelled.
impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        tracing::error!(target: "agora::api", error = %e, "a blocking task failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}
