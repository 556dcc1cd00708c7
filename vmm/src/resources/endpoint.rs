//! A VM's published endpoint: a TCP address clients connect to, joined to the VM's stream
//! device, that keeps working when the VM moves (GR: the address stays, a forwarder rebinds
//! what is behind it).
//!
//! Every connection to a VM's endpoint, from a client or from another agent forwarding one
//! (a link), becomes a session. While the VM runs here, a session pumps bytes between the
//! connection and the VM's [`Stream`]. When the VM migrates, the stream is frozen at the pause
//! and detached on success; each live session then opens a link to the VM's new host, sends the
//! bytes held since the freeze, and splices the connection to the link. The guest's output
//! from before the pause drains to the client first, so nothing is lost, repeated or
//! reordered. Later connections to the published address are forwarded the same way, and a
//! VM that moves again extends the chain from its current host. Links between hosts are
//! secured as [`super::link`] says (mutual TLS between hosts of the cluster); clients'
//! connections to the published address are the guest's own traffic and stay as they come.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use page_transfer::channel::Channel;

use super::link::LinkSecurity;
use crate::microvm::stream::{Delivered, Stream};

/// First line a forwarding agent sends on a link: `GODWIT-LINK <vm> <resource>\n`.
pub const LINK_PREFIX: &str = "GODWIT-LINK";
const BUF: usize = 16 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a VM's endpoint leads from this host.
#[derive(Debug, Clone)]
enum Route {
    /// The VM runs here.
    Local(Arc<Stream>),
    /// The VM runs behind this link address (the agent it moved to).
    Forward(SocketAddr),
}

/// One live connection attached to the local stream.
#[derive(Debug, Default)]
struct Session {
    /// The connection itself, to close it when the endpoint stops.
    conn: Mutex<Option<Channel>>,
    /// Set once the VM moved away: the link to its new host.
    link: Mutex<Option<Channel>>,
    linked: Condvar,
    closed: AtomicBool,
}

impl Session {
    fn wait_link(&self) -> Option<Channel> {
        let mut link = lock(&self.link);
        loop {
            if let Some(l) = link.as_ref() {
                return Some(l.clone());
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            link = self
                .linked
                .wait_timeout(link, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.linked.notify_all();
    }
}

/// A VM's endpoint on this host.
#[derive(Debug)]
pub struct Endpoint {
    vm: String,
    resource: String,
    /// The published address, on the host where the VM was created.
    published: Option<SocketAddr>,
    route: Mutex<Route>,
    sessions: Mutex<Vec<Arc<Session>>>,
    connections: AtomicU64,
    stopped: AtomicBool,
    /// How links to the VM's next host are secured.
    links: LinkSecurity,
}

impl Endpoint {
    /// An endpoint whose VM runs here with `stream`; `listener`, if given, is the published
    /// address (the VM's home), accepted on a thread of its own.
    pub fn start(
        vm: &str,
        resource: &str,
        stream: Arc<Stream>,
        listener: Option<TcpListener>,
        links: LinkSecurity,
    ) -> io::Result<Arc<Self>> {
        let published = listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let endpoint = Arc::new(Endpoint {
            vm: vm.to_owned(),
            resource: resource.to_owned(),
            published,
            route: Mutex::new(Route::Local(stream)),
            sessions: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            links,
        });
        if let Some(listener) = listener {
            let ep = endpoint.clone();
            thread::Builder::new()
                .name(format!("endpoint-{vm}"))
                .spawn(move || ep.accept_loop(listener))?;
        }
        Ok(endpoint)
    }

    pub fn published(&self) -> Option<SocketAddr> {
        self.published
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Whether the VM still runs here.
    pub fn is_local(&self) -> bool {
        matches!(*lock(&self.route), Route::Local(_))
    }

    /// `tcp ADDR` while the VM is here, `forward to ADDR` once it moved.
    pub fn location(&self) -> String {
        match &*lock(&self.route) {
            Route::Local(_) => match self.published {
                Some(a) => format!("tcp {a}"),
                None => "linked from the VM's published address".into(),
            },
            Route::Forward(a) => format!("forwarded to {a}"),
        }
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        // Blocking accept: `stop` wakes it with a connection of its own.
        loop {
            let accepted = listener.accept();
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            match accepted {
                Ok((conn, peer)) => {
                    tracing::debug!(vm = %self.vm, %peer, "endpoint client connected");
                    let _ = conn.set_nodelay(true);
                    self.serve(Channel::plain(conn));
                }
                Err(e) => {
                    tracing::warn!(vm = %self.vm, error = %e, "endpoint accept failed");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Serves one connection (a client's, or a link from another agent).
    pub fn serve(self: &Arc<Self>, conn: Channel) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let route = lock(&self.route).clone();
        match route {
            Route::Local(stream) => self.attach(conn, stream),
            Route::Forward(addr) => {
                let (vm, resource) = (self.vm.clone(), self.resource.clone());
                let links = self.links.clone();
                thread::spawn(move || match open_link(&links, addr, &vm, &resource) {
                    Ok(link) => splice(conn, link),
                    Err(e) => {
                        tracing::warn!(%vm, %addr, error = %e, "cannot forward an endpoint connection");
                    }
                });
            }
        }
    }

    fn attach(self: &Arc<Self>, conn: Channel, stream: Arc<Stream>) {
        let session = Arc::new(Session::default());
        *lock(&session.conn) = Some(conn.clone());
        lock(&self.sessions).push(session.clone());
        let (reader_conn, writer_conn) = (conn.clone(), conn);
        // Client to guest.
        let (s, st) = (session.clone(), stream.clone());
        let _ = thread::Builder::new()
            .name(format!("ep-rx-{}", self.vm))
            .spawn(move || {
                let mut conn = reader_conn;
                let mut buf = vec![0u8; BUF];
                let mut link: Option<Channel> = None;
                loop {
                    let n = match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if link.is_none() && st.deliver(&buf[..n]) == Delivered::Queued {
                        continue;
                    }
                    if link.is_none() {
                        link = s.wait_link();
                    }
                    let sent = link
                        .as_mut()
                        .is_some_and(|l| l.write_all(&buf[..n]).is_ok());
                    if !sent {
                        break;
                    }
                }
                if let Some(l) = link {
                    let _ = l.shutdown(Shutdown::Write);
                }
                s.close();
            });
        // Guest to client: first everything the guest wrote here, then the link's bytes.
        let s = session;
        let _ = thread::Builder::new()
            .name(format!("ep-tx-{}", self.vm))
            .spawn(move || {
                let mut conn = writer_conn;
                loop {
                    match stream.take_output(Duration::from_millis(100)) {
                        Some(bytes) if bytes.is_empty() => {
                            if s.closed.load(Ordering::Acquire) {
                                return;
                            }
                        }
                        Some(bytes) => {
                            if conn.write_all(&bytes).is_err() {
                                s.close();
                                return;
                            }
                        }
                        None => break,
                    }
                }
                if let Some(mut link) = s.wait_link() {
                    let _ = io::copy(&mut link, &mut conn);
                }
                let _ = conn.shutdown(Shutdown::Both);
                s.close();
            });
    }

    /// The VM migrated and runs behind `link_addr` now: forwards every live session there,
    /// handing over the client bytes `held` since the freeze, and routes new connections too.
    pub fn moved_to(&self, link_addr: SocketAddr, held: Vec<u8>) {
        *lock(&self.route) = Route::Forward(link_addr);
        let sessions: Vec<Arc<Session>> = std::mem::take(&mut *lock(&self.sessions));
        let live: Vec<Arc<Session>> = sessions
            .into_iter()
            .filter(|s| !s.closed.load(Ordering::Acquire))
            .collect();
        if live.is_empty() && !held.is_empty() {
            tracing::warn!(vm = %self.vm, bytes = held.len(), "client bytes held at the switchover had no session left to forward them");
        }
        let mut held = Some(held);
        for s in live {
            match open_link(&self.links, link_addr, &self.vm, &self.resource) {
                Ok(mut link) => {
                    // Only one session can be attached at a time in practice; the held bytes
                    // belong to whichever was sending, so the first live one carries them.
                    if let Some(bytes) = held.take() {
                        if let Err(e) = link.write_all(&bytes) {
                            tracing::warn!(vm = %self.vm, error = %e, "cannot hand over held endpoint bytes");
                        }
                    }
                    *lock(&s.link) = Some(link);
                    s.linked.notify_all();
                }
                Err(e) => {
                    tracing::warn!(vm = %self.vm, %link_addr, error = %e, "cannot forward a live endpoint session");
                    s.close();
                }
            }
        }
    }

    /// The VM came back to this host (or arrived here again): serve it locally again.
    pub fn rebind_local(&self, stream: Arc<Stream>) {
        *lock(&self.route) = Route::Local(stream);
    }

    /// Stops accepting on the published address and closes the live sessions (the VM is
    /// gone).
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(mut addr) = self.published {
            // Wake the accept loop so it sees `stopped` and closes the listener.
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
        for s in lock(&self.sessions).iter() {
            s.close();
            if let Some(c) = lock(&s.conn).as_ref() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Opens a link to the host whose resource listener is `addr` for `vm`'s endpoint
/// `resource`.
pub fn open_link(
    links: &LinkSecurity,
    addr: SocketAddr,
    vm: &str,
    resource: &str,
) -> io::Result<Channel> {
    let mut link = links.connect(addr)?;
    link.write_all(format!("{LINK_PREFIX} {vm} {resource}\n").as_bytes())?;
    Ok(link)
}

/// Reads the link header line of a connection to the resource listener: `(vm, resource)`.
/// The header is at most 200 bytes; anything else is refused.
pub fn read_link_header(rest: &str) -> Option<(String, String)> {
    let mut parts = rest.split_whitespace();
    let vm = parts.next()?;
    let resource = parts.next()?;
    if parts.next().is_some() || vm.len() > 64 || resource.len() > 32 {
        return None;
    }
    Some((vm.to_owned(), resource.to_owned()))
}

/// Copies both ways between two connections until either side closes.
pub(crate) fn splice(a: Channel, b: Channel) {
    let (mut a2, mut b2) = (a.clone(), b.clone());
    let t = thread::spawn(move || {
        let mut a = a;
        let mut b = b;
        let _ = io::copy(&mut a, &mut b);
        let _ = b.shutdown(Shutdown::Write);
    });
    let _ = io::copy(&mut b2, &mut a2);
    let _ = a2.shutdown(Shutdown::Write);
    let _ = t.join();
}

/// Reads one header line (at most `max` bytes) from a fresh connection (`&Channel`, or any
/// reader) without consuming anything after it.
pub fn read_header_line(mut r: impl Read, max: usize) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < max {
        if r.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return String::from_utf8(line)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "header is not UTF-8"));
        }
        line.push(byte[0]);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "header line too long",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn echo_guest(stream: Arc<Stream>, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match stream.guest_read() {
                    Some(b) => stream.guest_write(b),
                    None => thread::sleep(Duration::from_millis(1)),
                }
            }
        })
    }

    #[test]
    fn a_client_keeps_its_connection_across_a_move() {
        a_client_keeps_its_connection_across_a_move_over(&LinkSecurity::default());
    }

    #[test]
    fn a_client_keeps_its_connection_across_a_move_over_tls() {
        let dir = tempfile::tempdir().unwrap();
        let creds = super::super::link::tests::host_credentials(dir.path(), "h");
        a_client_keeps_its_connection_across_a_move_over(&LinkSecurity::new(Some(&creds)).unwrap());
    }

    fn a_client_keeps_its_connection_across_a_move_over(links: &LinkSecurity) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let source_stream = Arc::new(Stream::new());
        let ep = Endpoint::start(
            "vm",
            "web",
            source_stream.clone(),
            Some(listener),
            links.clone(),
        )
        .unwrap();
        let addr = ep.published().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let guest = echo_guest(source_stream.clone(), stop.clone());

        let mut client = TcpStream::connect(addr).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.write_all(b"one\n").unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"one\n");

        // The "target": a link listener whose VM has its own stream and echo guest.
        let link_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let link_addr = link_listener.local_addr().unwrap();
        let target_stream = Arc::new(Stream::new());
        let target_ep =
            Endpoint::start("vm", "web", target_stream.clone(), None, links.clone()).unwrap();
        let t = target_ep.clone();
        let target_links = links.clone();
        thread::spawn(move || {
            let (conn, _) = link_listener.accept().unwrap();
            let conn = target_links.accept(conn).unwrap();
            let header = read_header_line(&conn, 200).unwrap();
            assert_eq!(header, "GODWIT-LINK vm web");
            t.serve(conn);
        });

        // Migrate: stop the guest, freeze, send bytes meanwhile, move.
        stop.store(true, Ordering::Release);
        guest.join().unwrap();
        let unread = source_stream.freeze();
        client.write_all(b"two\n").unwrap();
        thread::sleep(Duration::from_millis(50));
        target_stream.preload(&unread);
        let stop2 = Arc::new(AtomicBool::new(false));
        let _target_guest = echo_guest(target_stream.clone(), stop2.clone());
        let held = source_stream.detach();
        ep.moved_to(link_addr, held);

        client.write_all(b"three\n").unwrap();
        let mut got = vec![0u8; 10];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"two\nthree\n");
        stop2.store(true, Ordering::Release);
        ep.stop();
    }
}
