//! Who may do what on the agent's and the orchestrator's HTTP APIs.
//!
//! A request's [`Caller`] is proven by a client certificate of the cluster CA (its subject
//! names a host, an admin or a viewer) or by a bearer token listed, hashed, in the daemon's
//! configuration ([`Tokens`]). [`Access`] is the layer in front of every route: it works out
//! the caller, refuses what the caller's role may not do (401 without an identity, 403 with
//! the wrong one; the reason is logged, never a token), and hands the caller to the handlers
//! (`Extension<Caller>`), which check what depends on a request's body (a heartbeat names the
//! host sending it, an incoming migration the host it comes from).
//!
//! The roles: a `viewer` may read (GET); an `admin` may also change things; a `host` (an
//! agent, the orchestrator) may read, and may change what the daemons ask of each other:
//! on an agent everything (the orchestrator drives VMs there, a source host announces its
//! migrations), on the orchestrator only its own heartbeats. `/healthz` answers anyone who
//! completes the TLS handshake. An API serving plain HTTP (`--insecure`, loopback only)
//! authenticates nobody and refuses nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use godwit_tls::{Identity, Role};
use serde::Deserialize;

use crate::https::Peer;

/// Who sent a request, and how they proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No certificate and no token.
    Anonymous,
    /// The API serves plain HTTP (`--insecure`): nobody is authenticated.
    Insecure,
    /// A client certificate of the cluster CA.
    Certificate(Identity),
    /// A bearer token of the daemon's token list.
    Token(Identity),
}

impl Caller {
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Caller::Certificate(i) | Caller::Token(i) => Some(i),
            Caller::Anonymous | Caller::Insecure => None,
        }
    }

    /// Whether this caller is host `name` (on an insecure API anyone is).
    pub fn is_host(&self, name: &str) -> bool {
        match self {
            Caller::Insecure => true,
            Caller::Certificate(i) => i.role == Role::Host && i.name == name,
            Caller::Token(_) | Caller::Anonymous => false,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Anonymous => f.write_str("anonymous"),
            Caller::Insecure => f.write_str("insecure"),
            Caller::Certificate(i) => write!(f, "{i} (certificate)"),
            Caller::Token(i) => write!(f, "{i} (token)"),
        }
    }
}

/// One entry of a token list: `[[tokens]]` with `name`, `role` and `sha256`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it (appears in logs).
    pub name: String,
    /// `admin` or `viewer`.
    pub role: String,
    /// The token's SHA-256, 64 hex digits (`godwit token new` prints it;
    /// `printf %s TOKEN | sha256sum` computes it).
    pub sha256: String,
}

/// The bearer tokens a daemon accepts, by hash: the tokens themselves are never stored.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], Identity>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

impl Tokens {
    pub fn new(entries: &[TokenEntry]) -> Result<Tokens, String> {
        let mut by_hash = HashMap::new();
        for e in entries {
            let role = match Role::parse(&e.role) {
                Some(r @ (Role::Admin | Role::Viewer)) => r,
                _ => {
                    return Err(format!(
                        "token {:?}: role must be admin or viewer, not {:?}",
                        e.name, e.role
                    ))
                }
            };
            let hash = parse_hex32(&e.sha256).ok_or_else(|| {
                format!(
                    "token {:?}: sha256 must be 64 hex digits (the token's SHA-256)",
                    e.name
                )
            })?;
            let identity = Identity {
                name: e.name.clone(),
                role,
            };
            if by_hash.insert(hash, identity).is_some() {
                return Err(format!("token {:?} is listed twice", e.name));
            }
        }
        Ok(Tokens { by_hash })
    }

    /// Reads a TOML file of `[[tokens]]` entries.
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("Cannot read the token file {}: {e}", path.display()))?;
        let file: TokenFile = toml::from_str(&text)
            .map_err(|e| format!("The token file {} is invalid: {e}", path.display()))?;
        Tokens::new(&file.tokens).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Who `token` belongs to.
    pub fn check(&self, token: &str) -> Option<&Identity> {
        self.by_hash.get(&sha256(token.as_bytes()))
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The SHA-256 of `token` as 64 hex digits, as a token list holds it.
pub fn token_hash(token: &str) -> String {
    sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random bearer token: `gdw_` and 64 hex digits (256 bits from the system's CSPRNG).
pub fn new_token() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "The system's random number generator failed".to_owned())?;
    Ok(format!(
        "gdw_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// Which daemon's rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rules {
    Agent,
    Orchestrator,
}

/// An API's access layer: how it authenticates (TLS or `--insecure`), its tokens, its rules.
#[derive(Debug)]
pub struct Access {
    insecure: bool,
    tokens: Tokens,
    rules: Rules,
}

/// Why a request was refused, and with which status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

impl Refusal {
    fn unauthorized(reason: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason: reason.into(),
        }
    }

    fn forbidden(reason: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::FORBIDDEN,
            reason: reason.into(),
        }
    }
}

impl Access {
    /// An API over TLS accepting client certificates of the cluster CA and `tokens`.
    pub fn tls(rules: Rules, tokens: Tokens) -> Arc<Access> {
        Arc::new(Access {
            insecure: false,
            tokens,
            rules,
        })
    }

    /// An API over plain HTTP (`--insecure`): everyone may do everything.
    pub fn insecure(rules: Rules) -> Arc<Access> {
        Arc::new(Access {
            insecure: true,
            tokens: Tokens::default(),
            rules,
        })
    }

    /// Who sent a request with this certificate identity and `Authorization` header.
    pub fn caller(
        &self,
        certificate: Option<&Identity>,
        authorization: Option<&str>,
    ) -> Result<Caller, Refusal> {
        if self.insecure {
            return Ok(Caller::Insecure);
        }
        if let Some(value) = authorization {
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .ok_or_else(|| {
                    Refusal::unauthorized("The Authorization header must be \"Bearer TOKEN\"")
                })?;
            return match self.tokens.check(token.trim()) {
                Some(identity) => Ok(Caller::Token(identity.clone())),
                None => Err(Refusal::unauthorized(
                    "The bearer token is not one this API accepts",
                )),
            };
        }
        Ok(match certificate {
            Some(identity) => Caller::Certificate(identity.clone()),
            None => Caller::Anonymous,
        })
    }

    /// Whether `caller` may send `method` to `path`.
    pub fn check(&self, caller: &Caller, method: &Method, path: &str) -> Result<(), Refusal> {
        if path == "/healthz" {
            return Ok(());
        }
        let identity = match caller {
            Caller::Insecure => return Ok(()),
            Caller::Anonymous => {
                return Err(Refusal::unauthorized(
                    "This API needs a client certificate of the cluster CA or a bearer token",
                ))
            }
            Caller::Certificate(i) | Caller::Token(i) => i,
        };
        let read = method == Method::GET || method == Method::HEAD;
        match (self.rules, identity.role) {
            (_, Role::Viewer) if read => Ok(()),
            (_, Role::Viewer) => Err(Refusal::forbidden(format!(
                "{identity} may only read; {method} {path} needs an admin"
            ))),
            (Rules::Agent, Role::Admin) if path == "/v1/migrations/incoming" => {
                Err(Refusal::forbidden(format!(
                    "{identity} cannot announce a migration: only the source host can"
                )))
            }
            (_, Role::Admin) if path == "/v1/agents/heartbeat" => Err(Refusal::forbidden(format!(
                "{identity} cannot send heartbeats: only a host can"
            ))),
            (_, Role::Admin) => Ok(()),
            (Rules::Agent, Role::Host) => Ok(()),
            (Rules::Orchestrator, Role::Host) if read || path == "/v1/agents/heartbeat" => Ok(()),
            (Rules::Orchestrator, Role::Host) => Err(Refusal::forbidden(format!(
                "{identity} may only read and send its heartbeats; {method} {path} needs an admin"
            ))),
        }
    }
}

/// The access layer's middleware (`axum::middleware::from_fn_with_state`); see [`serve`].
pub async fn authorize(
    State(access): State<Arc<Access>>,
    mut req: Request,
    next: Next,
) -> Response {
    // Liveness probes need no identity, and a stale token must not make a healthy daemon
    // look down.
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let peer = req.extensions().get::<ConnectInfo<Peer>>().map(|c| &c.0);
    let addr: Option<SocketAddr> = peer.map(|p| p.addr);
    let certificate = peer.and_then(|p| p.identity.clone());
    let authorization = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let decision = access
        .caller(certificate.as_ref(), authorization.as_deref())
        .and_then(|caller| {
            access
                .check(&caller, req.method(), req.uri().path())
                .map(|()| caller)
        });
    match decision {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(refusal) => {
            tracing::warn!(
                peer = ?addr,
                certificate = %certificate.map(|i| i.to_string()).unwrap_or_else(|| "none".into()),
                method = %req.method(),
                path = %req.uri().path(),
                status = refusal.status.as_u16(),
                reason = %refusal.reason,
                "API request refused"
            );
            crate::error_response(refusal.status, &refusal.reason)
        }
    }
}

/// `router` behind the access layer (serve it with [`crate::https::serve`]).
pub fn protect(router: axum::Router, access: Arc<Access>) -> axum::Router {
    router.layer(axum::middleware::from_fn_with_state(access, authorize))
}

/// Refuses plain HTTP on an address other than loopback: `--insecure` is for one machine.
pub fn check_insecure(addr: &SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "--insecure serves plain HTTP without authentication and is refused on {addr}: \
             only a loopback address (127.0.0.1, ::1) may be insecure; give --ca, --cert and \
             --key instead"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(name: &str, role: Role) -> Identity {
        Identity {
            name: name.into(),
            role,
        }
    }

    #[test]
    fn tokens_are_checked_by_hash() {
        let token = new_token().unwrap();
        assert!(token.starts_with("gdw_") && token.len() == 68, "{token}");
        let tokens = Tokens::new(&[TokenEntry {
            name: "ci".into(),
            role: "viewer".into(),
            sha256: token_hash(&token),
        }])
        .unwrap();
        assert_eq!(tokens.check(&token), Some(&who("ci", Role::Viewer)));
        assert_eq!(tokens.check("gdw_other"), None);
        // The well-known SHA-256 of "abc".
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        for (role, sha) in [("host", token_hash("x")), ("admin", "12".into())] {
            let bad = TokenEntry {
                name: "x".into(),
                role: role.into(),
                sha256: sha,
            };
            assert!(Tokens::new(&[bad]).is_err());
        }
    }

    #[test]
    fn roles_decide_what_a_caller_may_do() {
        let agent = Access::tls(Rules::Agent, Tokens::default());
        let orch = Access::tls(Rules::Orchestrator, Tokens::default());
        let viewer = Caller::Token(who("ann", Role::Viewer));
        let admin = Caller::Certificate(who("bob", Role::Admin));
        let host = Caller::Certificate(who("host-1", Role::Host));
        let (get, post) = (Method::GET, Method::POST);
        for access in [&agent, &orch] {
            assert!(access.check(&Caller::Anonymous, &get, "/healthz").is_ok());
            let r = access
                .check(&Caller::Anonymous, &get, "/v1/vms")
                .unwrap_err();
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
            assert!(access.check(&viewer, &get, "/v1/vms").is_ok());
            assert!(access.check(&viewer, &get, "/metrics").is_ok());
            let r = access.check(&viewer, &post, "/v1/vms").unwrap_err();
            assert_eq!(r.status, StatusCode::FORBIDDEN);
            assert!(
                r.reason.contains("viewer ann may only read"),
                "{}",
                r.reason
            );
            assert!(access.check(&admin, &post, "/v1/vms").is_ok());
            assert!(access.check(&admin, &Method::DELETE, "/v1/vms/x").is_ok());
        }
        assert!(agent.check(&host, &post, "/v1/vms/x/migrate").is_ok());
        assert!(agent.check(&host, &post, "/v1/migrations/incoming").is_ok());
        assert!(agent
            .check(&admin, &post, "/v1/migrations/incoming")
            .is_err());
        assert!(orch.check(&host, &post, "/v1/agents/heartbeat").is_ok());
        assert!(orch.check(&admin, &post, "/v1/agents/heartbeat").is_err());
        assert!(orch.check(&host, &post, "/v1/vms").is_err());
        assert!(orch.check(&host, &get, "/v1/hosts").is_ok());
        let insecure = Access::insecure(Rules::Orchestrator);
        let c = insecure.caller(None, None).unwrap();
        assert_eq!(c, Caller::Insecure);
        assert!(insecure.check(&c, &post, "/v1/vms").is_ok());
        assert!(c.is_host("anyone"));
    }

    #[test]
    fn callers_are_proven_by_certificate_or_token() {
        let token = new_token().unwrap();
        let tokens = Tokens::new(&[TokenEntry {
            name: "ops".into(),
            role: "admin".into(),
            sha256: token_hash(&token),
        }])
        .unwrap();
        let access = Access::tls(Rules::Agent, tokens);
        let cert = who("host-2", Role::Host);
        assert_eq!(access.caller(None, None).unwrap(), Caller::Anonymous);
        assert_eq!(
            access.caller(Some(&cert), None).unwrap(),
            Caller::Certificate(cert.clone())
        );
        assert!(access.caller(Some(&cert), None).unwrap().is_host("host-2"));
        assert!(!access.caller(Some(&cert), None).unwrap().is_host("host-3"));
        let bearer = format!("Bearer {token}");
        assert_eq!(
            access.caller(None, Some(&bearer)).unwrap(),
            Caller::Token(who("ops", Role::Admin))
        );
        let wrong = access
            .caller(Some(&cert), Some("Bearer gdw_nope"))
            .unwrap_err();
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        assert!(!wrong.reason.contains("gdw_nope"));
        assert!(
            access.caller(None, Some(&token)).is_err(),
            "no Bearer prefix"
        );
    }

    #[test]
    fn insecure_is_for_loopback_only() {
        assert!(check_insecure(&"127.0.0.1:7000".parse().unwrap()).is_ok());
        assert!(check_insecure(&"[::1]:7000".parse().unwrap()).is_ok());
        let e = check_insecure(&"0.0.0.0:7000".parse().unwrap()).unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        assert!(check_insecure(&"10.0.0.2:7000".parse().unwrap()).is_err());
    }
}
