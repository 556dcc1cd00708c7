//! Godwit's cluster identities and transport security.
//!
//! Every daemon and operator holds a certificate from the cluster's own CA ([`ca`]): a host
//! (agent, orchestrator) or a user with a role. Its subject says who: `CN` is the name, `OU`
//! the kind (`host`, `admin`, `viewer`), `O` is `godwit`. [`Credentials`] loads a CA, a
//! certificate and its key and builds rustls configurations for mutual TLS: both ends present
//! a certificate of the same CA. [`peer_identity`] reads who the other end is; [`TlsStream`] is
//! a blocking TLS connection that a reader and a writer thread can share (the migration
//! engine's channels).

pub mod ca;
mod stream;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use rustls;
pub use rustls_pki_types::ServerName;
pub use stream::TlsStream;

/// What a certificate's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A daemon of the cluster (agent, orchestrator): it may talk to the others.
    Host,
    /// An operator who may change things.
    Admin,
    /// An operator who may only read.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "host" => Some(Role::Host),
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a certificate names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("Cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no usable {what}", path.display())]
    Pem { path: PathBuf, what: &'static str },
    #[error("{} already exists; not overwritten", path.display())]
    Exists { path: PathBuf },
    #[error("The certificate {} names no Godwit identity (CN and OU host/admin/viewer)", path.display())]
    NoIdentity { path: PathBuf },
    #[error("Cannot make a certificate")]
    Generate(#[from] rcgen::Error),
    #[error("Invalid TLS configuration")]
    Config(#[from] rustls::Error),
    #[error("Invalid client verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0}")]
    Invalid(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The identity a DER certificate's subject names, if it names one.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let role = subject
        .iter_organizational_unit()
        .find_map(|ou| Role::parse(ou.as_str().ok()?))?;
    Some(Identity { name, role })
}

/// Who the peer of a TLS connection is (its end-entity certificate's identity).
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    identity_of(conn.peer_certificates()?.first()?)
}

/// Where a daemon's CA certificate, certificate and key are (its `--ca`, `--cert`, `--key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The three paths made absolute (a child process may run elsewhere).
    pub fn absolute(&self) -> Result<TlsFiles, TlsError> {
        let abs = |p: &Path| {
            p.canonicalize().map_err(|source| TlsError::Read {
                path: p.to_owned(),
                source,
            })
        };
        Ok(TlsFiles {
            ca: abs(&self.ca)?,
            cert: abs(&self.cert)?,
            key: abs(&self.key)?,
        })
    }

    pub fn load(&self) -> Result<Credentials, TlsError> {
        Credentials::load(&self.ca, &self.cert, &self.key)
    }

    /// `--ca CA --cert CERT --key KEY`, as the daemons and the CLI take them.
    pub fn flags(&self) -> Vec<String> {
        [
            ("--ca", &self.ca),
            ("--cert", &self.cert),
            ("--key", &self.key),
        ]
        .into_iter()
        .flat_map(|(flag, p)| [flag.to_owned(), p.display().to_string()])
        .collect()
    }

    /// Loads them and checks that the certificate is the host `name`'s, of the CA, and valid
    /// now.
    pub fn load_host(&self, name: &str) -> Result<Credentials, TlsError> {
        let creds = self.load()?;
        creds.check_issued()?;
        let want = Identity {
            name: name.to_owned(),
            role: Role::Host,
        };
        if creds.identity() != &want {
            return Err(TlsError::Invalid(format!(
                "{} is the certificate of {}, not of host {name}",
                self.cert.display(),
                creds.identity()
            )));
        }
        Ok(creds)
    }
}

/// A CA, a certificate and its key: what one end of a mutual-TLS channel holds.
#[derive(Debug, Clone)]
pub struct Credentials {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    identity: Identity,
}

impl Credentials {
    /// Loads the cluster CA certificate, this end's certificate and its private key (PEM).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let roots = load_roots(ca)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
            .collect::<Result<_, _>>()
            .map_err(|_| TlsError::Pem {
                path: cert.to_owned(),
                what: "certificate",
            })?;
        let first = chain.first().ok_or_else(|| TlsError::Pem {
            path: cert.to_owned(),
            what: "certificate",
        })?;
        let identity = identity_of(first).ok_or_else(|| TlsError::NoIdentity {
            path: cert.to_owned(),
        })?;
        let key = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|_| TlsError::Pem {
            path: key.to_owned(),
            what: "private key",
        })?;
        Ok(Credentials {
            roots,
            chain,
            key: Arc::new(key),
            identity,
        })
    }

    /// Who these credentials say this end is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Checks that the certificate is one of the CA's and valid now, as a peer will: a
    /// daemon calls it at start, so a wrong or expired certificate stops it there instead of
    /// failing every handshake later.
    pub fn check_issued(&self) -> Result<(), TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), Self::provider())
                .build()?;
        let (end, intermediates) = self
            .chain
            .split_first()
            .ok_or_else(|| TlsError::Invalid("the certificate file holds no certificate".into()))?;
        verifier
            .verify_client_cert(end, intermediates, rustls_pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| {
                TlsError::Invalid(format!(
                    "the certificate of {} is not valid for the CA given: {e}",
                    self.identity
                ))
            })
    }

    /// ring's TLS 1.3 suites, AES-128-GCM first: with AES-NI it costs the least per byte of
    /// guest memory (AES-256 takes 40% more rounds), and both ends are Godwit's.
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        use rustls::crypto::ring::cipher_suite as suite;
        Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![
                suite::TLS13_AES_128_GCM_SHA256,
                suite::TLS13_AES_256_GCM_SHA384,
                suite::TLS13_CHACHA20_POLY1305_SHA256,
            ],
            ..rustls::crypto::ring::default_provider()
        })
    }

    /// A server that requires a client certificate from the cluster CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), Self::provider())
                .build()?;
        let config = ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// An HTTP API server: a client certificate of the cluster CA is checked when one is
    /// presented, but not required, so an operator holding only a bearer token can connect
    /// (the API's access layer then decides who may do what; see `godwit-daemon`'s `auth`).
    pub fn api_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), Self::provider())
                .allow_unauthenticated()
                .build()?;
        let mut config = ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A client that trusts only the cluster CA and presents this end's certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let config = ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

/// A client that trusts only the cluster CA in `ca` and presents no certificate (an operator
/// who authenticates with a bearer token instead).
pub fn ca_only_client_config(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(Credentials::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(load_roots(ca)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn load_roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(&read(ca)?) {
        let der = der.map_err(|_| TlsError::Pem {
            path: ca.to_owned(),
            what: "certificate",
        })?;
        roots.add(der)?;
    }
    if roots.is_empty() {
        return Err(TlsError::Pem {
            path: ca.to_owned(),
            what: "certificate",
        });
    }
    Ok(Arc::new(roots))
}

/// The server name a client checks the server's certificate against: an IP address or a DNS
/// name (the host part of `HOST` or `HOST:PORT`).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|_| TlsError::Invalid(format!("{host:?} is not a host name or an IP address")))
}

#[cfg(test)]
mod tests;
