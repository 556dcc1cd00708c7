//! The agent's API errors: what went wrong as one sentence, and which HTTP status says so.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed or asks for something impossible.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request clashes with current state (duplicate name, crashed VM).
    #[error("{0}")]
    Conflict(String),
    /// The host cannot hold what was asked for.
    #[error("{0}")]
    InsufficientMemory(String),
    /// No usable KVM on this host.
    #[error("{0}")]
    KvmUnavailable(String),
    #[error("{0}")]
    Internal(String),
    /// Another agent this request depends on failed or could not be reached.
    #[error("{0}")]
    BadGateway(String),
}

impl AgentError {
    pub fn status(&self) -> StatusCode {
        match self {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::InsufficientMemory(_) => StatusCode::INSUFFICIENT_STORAGE,
            AgentError::KvmUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AgentError::BadGateway(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        godwit_daemon::error_response(self.status(), &self)
    }
}

pub use godwit_daemon::chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(
            AgentError::Conflict(String::new()).status(),
            StatusCode::CONFLICT
        );
        assert_eq!(
            AgentError::KvmUnavailable(String::new()).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
