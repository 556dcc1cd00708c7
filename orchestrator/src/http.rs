//! A blocking JSON-over-HTTP client for Godwit's APIs: errors come back as the server's own
//! sentence (its `ErrorBody`), answers are parsed into the caller's type.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use godwit_api::ErrorBody;
use godwit_daemon::client::ClientAuth;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct JsonClient {
    base: String,
    /// What the server is, for error messages ("the agent", "the orchestrator").
    peer: &'static str,
    http: reqwest::blocking::Client,
}

impl JsonClient {
    /// A client of the API at `base` (a URL), reached as `auth` says.
    pub fn new(
        base: &str,
        peer: &'static str,
        timeout: Duration,
        auth: &ClientAuth,
    ) -> Result<Self> {
        if base.starts_with("https://") && !auth.is_tls() {
            bail!(
                "{base} is HTTPS: give the cluster CA (--ca, or `ca` in the config file) and a \
                 certificate (--cert, --key) or a token (GODWIT_TOKEN)"
            );
        }
        if base.starts_with("http://") && auth.is_tls() {
            bail!("{base} is plain HTTP but TLS credentials were given: use https://");
        }
        Ok(JsonClient {
            base: base.trim_end_matches('/').to_owned(),
            peer,
            http: auth.blocking_client(timeout)?,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn send<T: DeserializeOwned>(&self, req: reqwest::blocking::RequestBuilder) -> Result<T> {
        let resp = req
            .send()
            .with_context(|| format!("Cannot reach {} at {}", self.peer, self.base))?;
        let status = resp.status();
        let text = resp.text()?;
        if !status.is_success() {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            bail!("{message} (HTTP {})", status.as_u16());
        }
        let text = if text.is_empty() { "null".into() } else { text };
        serde_json::from_str(&text)
            .with_context(|| format!("Unexpected answer from {}: {text}", self.peer))
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
    }

    pub fn put<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
    }

    pub fn delete(&self, path: &str) -> Result<()> {
        let _: serde_json::Value = self.send(self.http.delete(format!("{}{path}", self.base)))?;
        Ok(())
    }

    /// A plain-text GET (console logs).
    pub fn text(&self, path: &str) -> Result<String> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .with_context(|| format!("Cannot reach {} at {}", self.peer, self.base))?
            .error_for_status()?;
        Ok(resp.text()?)
    }
}
