use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::ca::{self, Validity};
use super::*;

fn host(name: &str) -> Identity {
    Identity {
        name: name.into(),
        role: Role::Host,
    }
}

/// A CA in `dir/ca` and credentials for `names` issued by it into `dir/NAME`.
fn cluster(dir: &Path, names: &[&str]) -> Vec<Credentials> {
    ca::init(&dir.join("ca"), "test").unwrap();
    names
        .iter()
        .map(|n| {
            let out = dir.join(n);
            let issued =
                ca::issue(&dir.join("ca"), &host(n), &[], Validity::days(1), &out).unwrap();
            Credentials::load(&issued.ca, &issued.cert, &issued.key).unwrap()
        })
        .collect()
}

/// An expired host certificate of the CA in `ca_dir`, issued into `out`.
fn expired(ca_dir: &Path, out: &Path) -> Credentials {
    let i = ca::issue(ca_dir, &host("old"), &[], Validity::expired(), out).unwrap();
    Credentials::load(&i.ca, &i.cert, &i.key).unwrap()
}

/// Runs a TLS server for one connection on loopback; returns its address and what the
/// server side ended with (the client's identity, or the handshake's error).
fn serve(
    config: Arc<rustls::ServerConfig>,
) -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<std::io::Result<TlsStream>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (sock, _) = listener.accept()?;
        TlsStream::server(sock, config, Duration::from_secs(5))
    });
    (addr, t)
}

fn connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream> {
    let sock = TcpStream::connect(addr)?;
    TlsStream::client(
        sock,
        config,
        server_name("127.0.0.1").unwrap(),
        Duration::from_secs(5),
    )
}

#[test]
fn hosts_of_one_ca_talk_both_ways_at_once_and_know_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let creds = cluster(dir.path(), &["a", "b"]);
    assert_eq!(creds[0].identity(), &host("a"));
    let (addr, server) = serve(creds[1].server_config().unwrap());
    let client = Arc::new(connect(addr, creds[0].client_config().unwrap()).unwrap());
    let server = Arc::new(server.join().unwrap().unwrap());
    assert_eq!(client.peer_identity(), Some(&host("b")));
    assert_eq!(server.peer_identity(), Some(&host("a")));

    // 8 MiB each way at once, each side reading on one thread while writing on another.
    let data: Vec<u8> = (0..8 << 20)
        .map(|i: u32| (i * 7 + i / 4096) as u8)
        .collect();
    let data = Arc::new(data);
    let mut threads = Vec::new();
    for (from, to) in [
        (client.clone(), server.clone()),
        (server.clone(), client.clone()),
    ] {
        let d = data.clone();
        threads.push(std::thread::spawn(move || {
            (&*from).write_all(&d).unwrap();
            (&*from).flush().unwrap();
        }));
        let d = data.clone();
        threads.push(std::thread::spawn(move || {
            let mut got = vec![0u8; d.len()];
            (&*to).read_exact(&mut got).unwrap();
            assert!(got == *d, "the bytes changed on the way");
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    // A read timeout reads like a blocking socket's.
    server
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let e = (&*server).read(&mut [0u8; 16]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    // A clean close is EOF.
    client.shutdown(std::net::Shutdown::Both).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!((&*server).read(&mut [0u8; 16]).unwrap(), 0);
}

#[test]
fn strangers_expired_and_certless_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ours = cluster(&dir.path().join("ours"), &["a", "b"]);
    let theirs = cluster(&dir.path().join("theirs"), &["a"]);
    // A certificate of another CA: the server refuses the client, the client the server.
    let (addr, server) = serve(ours[1].server_config().unwrap());
    let _ = connect(addr, theirs[0].client_config().unwrap());
    assert!(server.join().unwrap().is_err());
    let (addr, server) = serve(theirs[0].server_config().unwrap());
    assert!(connect(addr, ours[0].client_config().unwrap()).is_err());
    let _ = server.join();

    // An expired certificate of our CA.
    let old = expired(&dir.path().join("ours/ca"), &dir.path().join("old"));
    let (addr, server) = serve(ours[1].server_config().unwrap());
    let _ = connect(addr, old.client_config().unwrap());
    let e = server.join().unwrap().unwrap_err();
    assert!(e.to_string().to_lowercase().contains("expired"), "{e}");

    // No client certificate at all.
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(dir.path().join("ours/ca/ca.crt")).unwrap() {
        roots.add(der.unwrap()).unwrap();
    }
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let (addr, server) = serve(ours[1].server_config().unwrap());
    let _ = connect(addr, Arc::new(anonymous));
    assert!(server.join().unwrap().is_err());
}

#[test]
fn users_have_roles_and_nothing_is_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    ca::init(&ca_dir, "test").unwrap();
    assert!(matches!(
        ca::init(&ca_dir, "test"),
        Err(TlsError::Exists { .. })
    ));
    let viewer = Identity {
        name: "ann".into(),
        role: Role::Viewer,
    };
    let out = dir.path().join("ann");
    let issued = ca::issue(&ca_dir, &viewer, &[], Validity::days(30), &out).unwrap();
    let c = Credentials::load(&issued.ca, &issued.cert, &issued.key).unwrap();
    assert_eq!(c.identity(), &viewer);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&issued.key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(matches!(
        ca::issue(&ca_dir, &viewer, &[], Validity::days(30), &out),
        Err(TlsError::Exists { .. })
    ));
    assert!(ca::issue(&ca_dir, &host("a/b"), &[], Validity::days(1), &out).is_err());
    // A host certificate names the extra addresses it is reached at.
    let h = ca::issue(
        &ca_dir,
        &host("h1"),
        &["10.0.0.2".into(), "h1.example".into()],
        Validity::days(1),
        &dir.path().join("h1"),
    )
    .unwrap();
    let pem = std::fs::read(&h.cert).unwrap();
    let der = CertificateDer::from_pem_slice(&pem).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let sans = format!(
        "{:?}",
        parsed.subject_alternative_name().unwrap().unwrap().value
    );
    for want in ["10.0.0.2", "h1.example", "localhost", "127.0.0.1"] {
        assert!(
            sans.contains(want) || sans.contains(&want.replace('.', ", ")),
            "{sans}"
        );
    }
}

/// Loopback throughput through one TLS connection next to plain TCP (a measurement, not a
/// check: `cargo test --release -p godwit-tls -- --ignored --nocapture throughput`).
#[test]
#[ignore = "measurement"]
fn throughput() {
    let dir = tempfile::tempdir().unwrap();
    let creds = cluster(dir.path(), &["a", "b"]);
    const TOTAL: usize = 1 << 30;
    let chunk = vec![0x5au8; 256 << 10];
    type Reader = Box<dyn FnMut(&mut [u8]) -> usize + Send>;
    let measure = |w: &mut dyn Write, r: Reader| {
        let mut r = r;
        let t = std::time::Instant::now();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            let mut got = 0;
            while got < TOTAL {
                let n = r(&mut buf);
                assert!(n > 0);
                got += n;
            }
        });
        let mut sent = 0;
        while sent < TOTAL {
            w.write_all(&chunk).unwrap();
            sent += chunk.len();
        }
        w.flush().unwrap();
        reader.join().unwrap();
        TOTAL as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut s, _) = listener.accept().unwrap();
    let plain = measure(&mut c, Box::new(move |b| s.read(b).unwrap()));
    let (addr, server) = serve(creds[1].server_config().unwrap());
    let client = connect(addr, creds[0].client_config().unwrap()).unwrap();
    let server = Arc::new(server.join().unwrap().unwrap());
    let srv = server.clone();
    let mut w = &client;
    let tls = measure(&mut w, Box::new(move |b| (&*srv).read(b).unwrap()));
    println!(
        "plain TCP {plain:.0} MiB/s, TLS {tls:.0} MiB/s ({:.2})",
        tls / plain
    );
}

#[test]
fn writing_after_shutdown_fails_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let creds = cluster(dir.path(), &["a", "b"]);
    let (addr, server) = serve(creds[1].server_config().unwrap());
    let client = connect(addr, creds[0].client_config().unwrap()).unwrap();
    let _server = server.join().unwrap().unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert!((&client).write_all(b"late").is_err());
}

#[test]
fn a_certificate_of_another_ca_or_expired_fails_its_check_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ours = cluster(&dir.path().join("ours"), &["a"]);
    assert!(ours[0].check_issued().is_ok());
    let _ = cluster(&dir.path().join("theirs"), &["b"]);
    // Our CA file with their certificate.
    let mixed = Credentials::load(
        &dir.path().join("ours/ca/ca.crt"),
        &dir.path().join("theirs/b/b.crt"),
        &dir.path().join("theirs/b/b.key"),
    )
    .unwrap();
    let e = mixed.check_issued().unwrap_err().to_string();
    assert!(e.contains("not valid for the CA given"), "{e}");
    let old = expired(&dir.path().join("ours/ca"), &dir.path().join("old"));
    let e = old.check_issued().unwrap_err().to_string();
    assert!(e.to_lowercase().contains("expired"), "{e}");
}
