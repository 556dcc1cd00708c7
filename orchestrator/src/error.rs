//! The orchestrator's API errors: a sentence, and the HTTP status that says what kind.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use godwit_api::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum OrchError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
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
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        }
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// An error and its sources as one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.ends_with(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}
