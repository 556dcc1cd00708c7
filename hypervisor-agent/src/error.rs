//! The agent's API errors: what went wrong as one sentence, and which HTTP status says so.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use godwit_api::ErrorBody;

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

/// An error and its sources as one line: "outer: inner: innermost".
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot open the thing")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_joins_sources() {
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file",
        ));
        assert_eq!(chain(&e), "Cannot open the thing: no such file");
    }

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
