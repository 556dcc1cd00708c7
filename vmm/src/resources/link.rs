//! The connections between two hosts' VMMs that carry a VM's resources: its disk and scratch
//! data during a migration (`GODWIT-RES`, [`super::transfer`]) and its endpoint's links to the
//! host it moved to (`GODWIT-LINK`, [`super::endpoint`]). Both go to the resource listener of
//! the other host's VMM.
//!
//! With the host's certificate they are mutual TLS like the migration channels (the same
//! [`Channel`] seam): each end presents a certificate of the cluster CA, the dialling end
//! checks the listener's against the address it dials, and the listener takes only hosts of
//! the cluster (resource data only from the migration's announced source, checked where the
//! header names the migration). Without a certificate (`--insecure`), plain TCP.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use godwit_tls::rustls::{ClientConfig, ServerConfig};
use godwit_tls::{Credentials, Role, TlsError, TlsStream};
use page_transfer::channel::Channel;

/// How long a link's TCP connect and TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How this VMM secures the resource connections it opens and accepts.
#[derive(Debug, Clone, Default)]
pub struct LinkSecurity {
    tls: Option<(Arc<ClientConfig>, Arc<ServerConfig>)>,
}

impl LinkSecurity {
    /// Mutual TLS with `creds` (the host's certificate), or plain TCP without.
    pub fn new(creds: Option<&Credentials>) -> Result<Self, TlsError> {
        Ok(LinkSecurity {
            tls: match creds {
                Some(c) => Some((c.client_config()?, c.server_config()?)),
                None => None,
            },
        })
    }

    /// Opens a connection to the resource listener at `addr`.
    pub fn connect(&self, addr: SocketAddr) -> io::Result<Channel> {
        let tcp = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)?;
        tcp.set_nodelay(true)?;
        Ok(match &self.tls {
            None => Channel::plain(tcp),
            Some((client, _)) => {
                let name = godwit_tls::ServerName::IpAddress(addr.ip().into());
                Channel::tls(TlsStream::client(
                    tcp,
                    client.clone(),
                    name,
                    HANDSHAKE_TIMEOUT,
                )?)
            }
        })
    }

    /// Secures a connection accepted by the resource listener: only a host of the cluster
    /// gets through.
    pub fn accept(&self, tcp: TcpStream) -> io::Result<Channel> {
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Channel::plain(tcp)),
            Some((_, server)) => {
                let channel =
                    Channel::tls(TlsStream::server(tcp, server.clone(), HANDSHAKE_TIMEOUT)?);
                match channel.peer() {
                    Some(who) if who.role == Role::Host => Ok(channel),
                    who => Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "a resource connection from {} refused: only hosts of the cluster may connect",
                            who.map_or("an unnamed peer".to_owned(), |w| w.to_string())
                        ),
                    )),
                }
            }
        }
    }
}

/// First line of a link to a disk export: `GODWIT-NBD <export name>`.
pub const NBD_PREFIX: &str = "GODWIT-NBD";

/// Opens a tunnel to the disk export `export` of the host whose resource listener is `addr`
/// (`HOST:PORT`): a loopback listener whose one connection is spliced to a resource link
/// there. Returns the loopback address for the NBD client. (godwit-nbd's client speaks NBD
/// over a plain `TcpStream`; the tunnel gives it the link's TLS without a TLS client of its
/// own, at the cost of one local copy.)
pub fn nbd_tunnel(links: &LinkSecurity, addr: &str, export: &str) -> io::Result<String> {
    use std::io::Write;
    let remote = std::net::ToSocketAddrs::to_socket_addrs(addr)?
        .next()
        .ok_or_else(|| io::Error::other(format!("{addr} resolves to no address")))?;
    let mut link = links.connect(remote)?;
    link.write_all(format!("{NBD_PREFIX} {export}\n").as_bytes())?;
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("nbd-tunnel".into())
        .spawn(move || {
            // The NBD client connects once, at once: nobody else is waited for, and if it
            // never comes (its setup failed first) the link is dropped after a while.
            let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
            if listener.set_nonblocking(true).is_err() {
                return;
            }
            while std::time::Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_nodelay(true);
                        super::endpoint::splice(Channel::plain(conn), link);
                        return;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => return,
                }
            }
            tracing::warn!("NBD tunnel: the disk's client never connected; link dropped");
        })?;
    Ok(local.to_string())
}

/// Whether `channel` may carry resource data for a migration announced from host `source`
/// (any peer on a plain connection).
pub fn from_source(channel: &Channel, source: &str) -> Result<(), String> {
    match channel.peer() {
        None if !channel.is_tls() => Ok(()),
        Some(who) if who.role == Role::Host && who.name == source => Ok(()),
        who => Err(format!(
            "resource data from {} refused: the migration was announced from host {source}",
            who.map_or("an unnamed peer".to_owned(), |w| w.to_string())
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::TcpListener;
    use std::path::Path;

    use godwit_tls::ca::{self, Validity};
    use godwit_tls::Identity;

    use super::*;

    /// A CA in `dir` and the credentials of `who`, issued by it.
    pub(crate) fn credentials(dir: &Path, who: &Identity) -> Credentials {
        if !dir.join("ca").join(ca::CA_CERT).exists() {
            ca::init(&dir.join("ca"), "test").unwrap();
        }
        let out = dir.join(format!("{}-{}", who.role, who.name));
        let i = ca::issue(&dir.join("ca"), who, &[], Validity::days(1), &out).unwrap();
        Credentials::load(&i.ca, &i.cert, &i.key).unwrap()
    }

    pub(crate) fn host_credentials(dir: &Path, name: &str) -> Credentials {
        credentials(
            dir,
            &Identity {
                name: name.into(),
                role: Role::Host,
            },
        )
    }

    #[test]
    fn only_hosts_of_the_cluster_get_a_link_and_data_only_from_the_source() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let ours = LinkSecurity::new(Some(&host_credentials(dir.path(), "a"))).unwrap();
        let b = LinkSecurity::new(Some(&host_credentials(dir.path(), "b"))).unwrap();
        let admin = credentials(
            dir.path(),
            &Identity {
                name: "ann".into(),
                role: Role::Admin,
            },
        );
        let admin = LinkSecurity::new(Some(&admin)).unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let stranger = LinkSecurity::new(Some(&host_credentials(other_dir.path(), "a"))).unwrap();
        let old = ca::issue(
            &dir.path().join("ca"),
            &Identity {
                name: "c".into(),
                role: Role::Host,
            },
            &[],
            Validity::expired(),
            &dir.path().join("expired"),
        )
        .unwrap();
        let expired = LinkSecurity::new(Some(
            &Credentials::load(&old.ca, &old.cert, &old.key).unwrap(),
        ))
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut results = Vec::new();
            for _ in 0..5 {
                let (tcp, _) = listener.accept().unwrap();
                results.push(ours.accept(tcp).map(|mut c| {
                    let mut byte = [0u8; 1];
                    c.read_exact(&mut byte).unwrap();
                    (c, byte[0])
                }));
            }
            results
        });
        // Host b: in, and its data is from b, not from a.
        let mut c = b.connect(addr).unwrap();
        c.write_all(b"x").unwrap();
        // Plain TCP, an operator's certificate, a host of another CA, an expired host
        // certificate: refused.
        let plain = TcpStream::connect(addr).unwrap();
        let _ = (&plain).write_all(b"GODWIT-RES 0\n");
        let _ = admin.connect(addr).and_then(|mut c| c.write_all(b"y"));
        let _ = stranger.connect(addr);
        let _ = expired.connect(addr).and_then(|mut c| c.write_all(b"z"));
        let results = server.join().unwrap();
        let (channel, byte) = results[0].as_ref().unwrap();
        assert_eq!(*byte, b'x');
        assert!(from_source(channel, "b").is_ok());
        let e = from_source(channel, "a").unwrap_err();
        assert!(e.contains("announced from host a"), "{e}");
        for r in &results[1..] {
            assert!(r.is_err());
        }
        let e = results[2].as_ref().unwrap_err().to_string();
        assert!(e.contains("only hosts of the cluster"), "{e}");
        drop(plain);
    }
}
