//! A blocking TLS connection that one reader thread and writer threads can use at once, as
//! the migration engine uses its TCP channels (a control channel is read by one thread and
//! written by another).
//!
//! rustls' own `StreamOwned` needs `&mut` for both directions, so it cannot be shared that
//! way; tokio-rustls splits, but the engine is not async. So this drives rustls by hand: the
//! socket is non-blocking, the rustls connection sits behind a mutex that is held only to move
//! bytes (never while waiting), and waits are `poll(2)` on the socket with the caller's
//! timeouts, giving the same `WouldBlock`/`TimedOut` errors a blocking `TcpStream` would.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use rustls_pki_types::ServerName;

use crate::Identity;

/// Plaintext rustls buffers for sending before a write waits for the socket.
const SEND_BUFFER: usize = 1 << 20;

#[derive(Debug)]
pub struct TlsStream {
    sock: TcpStream,
    conn: Mutex<Connection>,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
    peer: Option<Identity>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Connects as a client over `sock`: the handshake runs within `timeout`, the server's
    /// certificate is checked against the CA and `server_name`.
    pub fn client(
        sock: TcpStream,
        config: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        timeout: Duration,
    ) -> io::Result<Self> {
        let conn = ClientConnection::new(config, server_name).map_err(tls_err)?;
        Self::handshake(sock, Connection::Client(conn), timeout)
    }

    /// Accepts a client over `sock`: the handshake runs within `timeout`, and the client must
    /// present a certificate of the CA (the server config requires it).
    pub fn server(
        sock: TcpStream,
        config: Arc<ServerConfig>,
        timeout: Duration,
    ) -> io::Result<Self> {
        let conn = ServerConnection::new(config).map_err(tls_err)?;
        Self::handshake(sock, Connection::Server(conn), timeout)
    }

    fn handshake(sock: TcpStream, mut conn: Connection, timeout: Duration) -> io::Result<Self> {
        conn.set_buffer_limit(Some(SEND_BUFFER));
        let old_read = sock.read_timeout()?;
        let old_write = sock.write_timeout()?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        let deadline = Instant::now() + timeout;
        let mut io = &sock;
        while conn.is_handshaking() {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the TLS handshake did not finish in time",
                ));
            }
            conn.complete_io(&mut io)?;
        }
        // The client's last flight may still be queued.
        while conn.wants_write() {
            conn.write_tls(&mut io)?;
        }
        sock.set_read_timeout(old_read)?;
        sock.set_write_timeout(old_write)?;
        sock.set_nonblocking(true)?;
        let peer = crate::peer_identity(&conn);
        Ok(TlsStream {
            read_timeout: Mutex::new(old_read),
            write_timeout: Mutex::new(old_write),
            sock,
            conn: Mutex::new(conn),
            peer,
        })
    }

    /// Who the other end's certificate names.
    pub fn peer_identity(&self) -> Option<&Identity> {
        self.peer.as_ref()
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        *lock(&self.read_timeout) = timeout;
        Ok(())
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        *lock(&self.write_timeout) = timeout;
        Ok(())
    }

    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.sock.set_nodelay(nodelay)
    }

    /// Shuts the TCP connection down (a reader blocked on it wakes up with EOF).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            let mut conn = lock(&self.conn);
            conn.send_close_notify();
            let _ = conn.write_tls(&mut &self.sock);
        }
        self.sock.shutdown(how)
    }

    /// Waits until the socket is readable (`read`) or writable, at most until `deadline`.
    fn wait(&self, read: bool, deadline: Option<Instant>) -> io::Result<()> {
        use rustix::event::{poll, PollFd, PollFlags};
        let flags = if read { PollFlags::IN } else { PollFlags::OUT };
        loop {
            let left = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        // What a blocking socket with a timeout says.
                        return Err(io::Error::new(
                            io::ErrorKind::WouldBlock,
                            "timed out waiting on the TLS connection",
                        ));
                    }
                    Some(d - now)
                }
                None => None,
            };
            let timespec = left.map(|l| rustix::event::Timespec {
                tv_sec: l.as_secs() as i64,
                tv_nsec: i64::from(l.subsec_nanos()),
            });
            let fd = self.sock.as_fd();
            let mut fds = [PollFd::new(&fd, flags)];
            match poll(&mut fds, timespec.as_ref()) {
                Ok(0) => continue,
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends what rustls has queued, waiting (without the lock) while the socket is full.
    fn flush_tls(&self, deadline: Option<Instant>) -> io::Result<()> {
        loop {
            let mut conn = lock(&self.conn);
            if !conn.wants_write() {
                return Ok(());
            }
            match conn.write_tls(&mut &self.sock) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(conn);
                    self.wait(false, deadline)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn deadline(timeout: &Mutex<Option<Duration>>) -> Option<Instant> {
        lock(timeout).map(|t| Instant::now() + t)
    }
}

impl Read for &TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = TlsStream::deadline(&self.read_timeout);
        loop {
            let mut conn = lock(&self.conn);
            match conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match conn.read_tls(&mut &self.sock) {
                Ok(0) => {
                    // The peer closed TCP: what is buffered is all there is.
                    conn.process_new_packets().map_err(tls_err)?;
                    return match conn.reader().read(buf) {
                        Ok(n) => Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                        Err(e) => Err(e),
                    };
                }
                Ok(_) => {
                    let state = conn.process_new_packets();
                    // Reading can queue records for the peer (an alert, a key update's
                    // answer). They go out now if the socket takes them, else with the next
                    // write: a reader never waits for room to send, because what is queued may
                    // be a writer's data and the peer may be waiting for this side to read.
                    if conn.wants_write() {
                        let _ = conn.write_tls(&mut &self.sock);
                    }
                    drop(conn);
                    if let Err(e) = state {
                        return Err(tls_err(e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(conn);
                    self.wait(true, deadline)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for &TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = TlsStream::deadline(&self.write_timeout);
        // rustls' send buffer is empty here (every write flushes it), so it takes something
        // unless the connection is closed for sending; then 0 makes `write_all` fail.
        let n = lock(&self.conn).writer().write(buf)?;
        // Encrypted records go out before the next plaintext is taken: a writer never races
        // ahead of the socket by more than the send buffer.
        self.flush_tls(deadline)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let deadline = TlsStream::deadline(&self.write_timeout);
        self.flush_tls(deadline)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}
