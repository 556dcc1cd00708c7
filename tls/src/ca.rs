//! The cluster's certificate authority: made once (`godwit ca init DIR`), it signs the
//! certificates of hosts (agents, the orchestrator) and of operators (`godwit ca issue`).
//! Keys are made where the command runs and written with mode 0600; nothing is sent anywhere.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::{read, Identity, Role, TlsError};

/// The CA's certificate in its directory (give it to every daemon and operator).
pub const CA_CERT: &str = "ca.crt";
/// The CA's private key in its directory (keep it there).
pub const CA_KEY: &str = "ca.key";

/// How long a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) to `days` from now.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }

    /// Already over (for tests of expired certificates).
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::days(2),
            not_after: now - Duration::days(1),
        }
    }
}

/// The files a certificate was written to.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA certificate beside them (copied there unless it was already).
    pub ca: PathBuf,
}

/// Writes `bytes` to a new file `path` (refusing to replace one) with `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError::Exists {
                path: path.to_owned(),
            }
        } else {
            TlsError::Write {
                path: path.to_owned(),
                source,
            }
        }
    })
}

fn mkdir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })
}

fn subject(name: &str, role: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "godwit");
    dn.push(DnType::OrganizationalUnitName, role);
    dn.push(DnType::CommonName, name);
    dn
}

/// Makes a new CA in `dir` (`ca.crt`, `ca.key`), valid for ten years. An existing CA there is
/// never replaced.
pub fn init(dir: &Path, cluster: &str) -> Result<PathBuf, TlsError> {
    mkdir(dir)?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(TlsError::Exists { path: p.clone() });
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(&format!("{cluster} CA"), "ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let validity = Validity::days(3650);
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params.self_signed(&key)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert_path)
}

/// Issues a certificate for `who` signed by the CA in `ca_dir`, written to `out_dir` as
/// `NAME.crt` and `NAME.key` (with `ca.crt` beside them). A host certificate serves and
/// connects and names, besides `extra_names`, the host's name, `localhost`, 127.0.0.1 and ::1
/// (clients check the address they dial against these); a user certificate only connects.
pub fn issue(
    ca_dir: &Path,
    who: &Identity,
    extra_names: &[String],
    validity: Validity,
    out_dir: &Path,
) -> Result<Issued, TlsError> {
    let valid_name = !who.name.is_empty()
        && who.name.len() <= 64
        && who
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if !valid_name {
        return Err(TlsError::Invalid(format!(
            "{:?} is not a usable name: use 1-64 characters of A-Z a-z 0-9 - _ . @",
            who.name
        )));
    }
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_pem = String::from_utf8_lossy(&read(&ca_cert_path)?).into_owned();
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_key =
        KeyPair::from_pem(&String::from_utf8_lossy(&read(&ca_key_path)?)).map_err(|_| {
            TlsError::Pem {
                path: ca_key_path.clone(),
                what: "private key",
            }
        })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = subject(&who.name, who.role.as_str());
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if who.role == Role::Host {
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let mut names: Vec<String> = vec![who.name.clone(), "localhost".into()];
        names.extend(["127.0.0.1".to_owned(), "::1".to_owned()]);
        names.extend(extra_names.iter().cloned());
        names.dedup();
        for n in names {
            let san = match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into().map_err(|_| {
                    TlsError::Invalid(format!("{n:?} is neither a DNS name nor an IP address"))
                })?),
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    mkdir(out_dir)?;
    let cert_path = out_dir.join(format!("{}.crt", who.name));
    let key_path = out_dir.join(format!("{}.key", who.name));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(TlsError::Exists { path: p.clone() });
        }
    }
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    let ca_copy = out_dir.join(CA_CERT);
    if !ca_copy.exists() {
        write_new(&ca_copy, ca_pem.as_bytes(), 0o644)?;
    }
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        ca: ca_copy,
    })
}
