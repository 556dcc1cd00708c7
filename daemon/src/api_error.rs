//! The agent's and the VMM's API errors: what went wrong as one sentence, and which HTTP status
//! says so. The agent passes a VMM's answer on with the same status ([`AgentError::from_status`]).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed or asks for something impossible.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    Forbidden(String),
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
            AgentError::Forbidden(_) => StatusCode::FORBIDDEN,
            AgentError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::InsufficientMemory(_) => StatusCode::INSUFFICIENT_STORAGE,
            AgentError::KvmUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AgentError::BadGateway(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

impl AgentError {
    /// The error an answer with `status` and `message` stands for (the inverse of `status`).
    pub fn from_status(status: u16, message: String) -> Self {
        match status {
            400 => AgentError::BadRequest(message),
            403 => AgentError::Forbidden(message),
            404 => AgentError::NotFound(message),
            405 => AgentError::MethodNotAllowed(message),
            409 => AgentError::Conflict(message),
            507 => AgentError::InsufficientMemory(message),
            503 => AgentError::KvmUnavailable(message),
            502 => AgentError::BadGateway(message),
            _ => AgentError::Internal(message),
        }
    }
}

/// Parses a JSON request body into `T`, answering a missing or malformed one with a sentence
/// (instead of axum's default rejection). The agent's and the VMM's APIs both parse with it.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AgentError> {
    if body.is_empty() {
        return Err(AgentError::BadRequest(
            "The request needs a JSON body".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| AgentError::BadRequest(format!("Malformed JSON request body: {e}")))
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        crate::error_response(self.status(), &self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for e in [
            AgentError::BadRequest("x".into()),
            AgentError::NotFound("x".into()),
            AgentError::Conflict("x".into()),
            AgentError::InsufficientMemory("x".into()),
            AgentError::KvmUnavailable("x".into()),
            AgentError::BadGateway("x".into()),
            AgentError::Internal("x".into()),
        ] {
            let back = AgentError::from_status(e.status().as_u16(), "x".into());
            assert_eq!(back.status(), e.status());
        }
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
