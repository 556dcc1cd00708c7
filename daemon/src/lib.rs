//! What Godwit's daemons (the agent and the orchestrator) share at their edges: an error and
//! its sources as one line, the JSON error response every API answers with, the signals
//! that stop them, the HTTPS listener of their APIs ([`https`]), who may do what there
//! ([`auth`]) and how clients reach them ([`client`]).

#![forbid(unsafe_code)]

mod api_error;
pub mod auth;
pub mod client;
pub mod host;
pub mod https;
pub mod paths;
pub mod run_dir;

pub use api_error::{parse_body, AgentError};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use godwit_api::ErrorBody;

/// An error and its sources as one line: "outer: inner: innermost" (a source whose text the
/// outer message already ends with is not repeated).
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

/// An API error answer: `status` with `{"error": "<message>"}`; server errors are logged.
pub fn error_response(status: StatusCode, error: &dyn std::fmt::Display) -> Response {
    if status.is_server_error() {
        tracing::warn!(%status, %error, "request failed");
    }
    (
        status,
        Json(ErrorBody {
            error: error.to_string(),
        }),
    )
        .into_response()
}

/// Resolves on SIGTERM or SIGINT: the daemons then drain and stop.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
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
    fn error_responses_carry_status() {
        let r = error_response(StatusCode::CONFLICT, &"taken");
        assert_eq!(r.status(), StatusCode::CONFLICT);
    }
}
