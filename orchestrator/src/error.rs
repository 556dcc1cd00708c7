//! The orchestrator's API errors: a sentence, and the HTTP status that says what kind.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum OrchError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// No host can take it (placement failed).
    #[error("{0}")]
    NoCapacity(String),
    /// A host it needs is down.
    #[error("{0}")]
    Unavailable(String),
    /// An agent refused or failed.
    #[error("{0}")]
    Agent(String),
    #[error("{0}")]
    Internal(String),
    #[error("This endpoint does not accept that method; see docs/orchestrator-api.md")]
    MethodNotAllowed,
}

impl OrchError {
    pub fn store(e: crate::store::StoreError) -> Self {
        OrchError::Internal(chain(&e))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            OrchError::BadRequest(_) => StatusCode::BAD_REQUEST,
            OrchError::NotFound(_) => StatusCode::NOT_FOUND,
            OrchError::Conflict(_) => StatusCode::CONFLICT,
            OrchError::Forbidden(_) => StatusCode::FORBIDDEN,
            OrchError::NoCapacity(_) => StatusCode::INSUFFICIENT_STORAGE,
            OrchError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            OrchError::Agent(_) => StatusCode::BAD_GATEWAY,
            OrchError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            OrchError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }
}

impl IntoResponse for OrchError {
    fn into_response(self) -> Response {
        godwit_daemon::error_response(self.status(), &self)
    }
}

pub use godwit_daemon::chain;
