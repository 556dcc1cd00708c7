//! A client for one VMM process's local API: HTTP/1.1 over the unix socket in the VM's run
//! directory. reqwest has no unix-socket transport, so this speaks hyper's client directly:
//! one connection per request (the socket is local, a connect costs microseconds), a timeout
//! on each, and every non-2xx answer turned back into an [`Error::Vmm`] with its status and
//! sentence.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Error;

/// How long a VMM call may take unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The local API of one VMM process.
#[derive(Debug, Clone)]
pub struct VmmClient {
    socket: PathBuf,
}

impl VmmClient {
    pub fn new(socket: &Path) -> Self {
        VmmClient {
            socket: socket.to_owned(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; returns the status and the body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), Error> {
        let unreachable = |e: Box<dyn std::error::Error + Send + Sync>| Error::VmmUnreachable {
            socket: self.socket.display().to_string(),
            source: e,
        };
        let exchange = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| unreachable(e.into()))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.into()))?;
            tokio::spawn(conn);
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, "vmm")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| unreachable(e.into()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| unreachable(e.into()))?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.into()))?
                .to_bytes();
            Ok::<_, Error>((status, bytes))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::VmmTimeout {
                path: path.to_owned(),
                timeout,
            })?
    }

    /// A JSON call: a 2xx answer parsed as `T`, any other one as the error it carries.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + Sync)>,
        timeout: Duration,
    ) -> Result<T, Error> {
        let body =
            body.map(serde_json::to_vec)
                .transpose()
                .map_err(|source| Error::VmmNonsense {
                    path: path.to_owned(),
                    source,
                })?;
        let (status, bytes) = self.raw(method, path, body, timeout).await?;
        if !(200..300).contains(&status) {
            return Err(error_answer(status, &bytes));
        }
        // 204 and 202 carry no body; `()` and unit-like answers parse from `null`.
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|source| Error::VmmNonsense {
            path: path.to_owned(),
            source,
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call(Method::GET, path, None::<&()>, DEFAULT_TIMEOUT)
            .await
    }
}

/// The error a non-2xx VMM answer carries (its JSON `error`, or the status).
pub fn error_answer(status: u16, body: &[u8]) -> Error {
    let message = serde_json::from_slice::<godwit_api::ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| format!("The VMM answered HTTP {status}"));
    Error::Vmm { status, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_status_and_sentence() {
        let e = error_answer(409, br#"{"error":"VM \"a\" is being migrated"}"#);
        assert!(
            matches!(e, Error::Vmm { status: 409, ref message } if message.contains("being migrated"))
        );
        let e = error_answer(500, b"garbage");
        assert!(
            matches!(e, Error::Vmm { status: 500, ref message } if message.contains("HTTP 500"))
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = VmmClient::new(&dir.path().join("none.sock"));
        let e = c.get::<serde_json::Value>("/v1/vmm").await.unwrap_err();
        assert!(e.to_string().contains("does not answer"), "{e}");
    }
}
