//! How Godwit's clients (daemons calling each other, the CLI, VMMs calling agents, tests and
//! benchmarks) reach an API: over TLS, trusting only the cluster CA, with a client certificate
//! and/or a bearer token, or over plain HTTP to an `--insecure` daemon.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use godwit_tls::rustls::ClientConfig;
use godwit_tls::{Credentials, TlsError};

/// How long a client keeps an idle connection for the next request: well under the servers'
/// [`crate::https::HEADER_TIMEOUT`], so a request is never sent on a connection the server is
/// closing.
const POOL_IDLE: Duration = Duration::from_secs(15);

/// A client's TLS configuration and token. Its `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct ClientAuth {
    tls: Option<Arc<ClientConfig>>,
    token: Option<String>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

impl ClientAuth {
    /// Plain HTTP, no identity (for daemons started with `--insecure`).
    pub fn insecure() -> Self {
        ClientAuth::default()
    }

    /// TLS with `creds`' certificate (a host or an operator).
    pub fn certificate(creds: &Credentials) -> Result<Self, TlsError> {
        Ok(ClientAuth {
            tls: Some(creds.client_config()?),
            token: None,
        })
    }

    /// TLS trusting the CA in `ca`, presenting no certificate (pair it with a token).
    pub fn ca_only(ca: &Path) -> Result<Self, TlsError> {
        Ok(ClientAuth {
            tls: Some(godwit_tls::ca_only_client_config(ca)?),
            token: None,
        })
    }

    /// Also sends `token` as `Authorization: Bearer TOKEN`.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        if self.is_tls() {
            "https"
        } else {
            "http"
        }
    }

    /// `HOST:PORT` (or a URL) as a base URL in this client's scheme.
    pub fn url(&self, address: &str) -> String {
        if address.starts_with("http://") || address.starts_with("https://") {
            address.trim_end_matches('/').to_owned()
        } else {
            format!("{}://{address}", self.scheme())
        }
    }

    fn headers(&self) -> reqwest::header::HeaderMap {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = &self.token {
            if let Ok(mut value) =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            {
                value.set_sensitive(true);
                headers.insert(reqwest::header::AUTHORIZATION, value);
            }
        }
        headers
    }

    /// An async client with this identity and a whole-request `timeout`.
    pub fn client(&self, timeout: Duration) -> reqwest::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder()
            .timeout(timeout)
            .tls_info(true)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(POOL_IDLE)
            .default_headers(self.headers());
        if let Some(tls) = &self.tls {
            b = b.use_preconfigured_tls((**tls).clone());
        }
        b.build()
    }

    /// A blocking client (not for use on an async runtime's threads).
    pub fn blocking_client(&self, timeout: Duration) -> reqwest::Result<reqwest::blocking::Client> {
        let mut b = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(POOL_IDLE)
            .default_headers(self.headers());
        if let Some(tls) = &self.tls {
            b = b.use_preconfigured_tls((**tls).clone());
        }
        b.build()
    }
}
