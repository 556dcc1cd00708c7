//! One migration connection: plain TCP, or mutual TLS over it. The engine reads and writes a
//! [`Channel`] and never sees which; a clone shares the connection (the control channel has a
//! reader thread beside its writers). How a migration's channels are secured is the source's
//! [`ClientSecurity`] and the target's [`ServerSecurity`]; the handshake runs in
//! `transport::connect` / `transport::accept` before the protocol's own hello.
//!
//! For tests, [`ClientSecurity::Faulty`] wraps the source's channels in a [`Fault`]: a reset,
//! a link that goes silent without closing, or one flipped byte after N bytes, the bad
//! networks the engine must survive, injected at the same seam.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godwit_tls::rustls::{ClientConfig, ServerConfig};
use godwit_tls::{Identity, ServerName, TlsStream};

#[derive(Debug)]
enum Kind {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
    Faulty(Box<Faulty>),
}

/// What a faulty channel does to its connection (tests only; see [`ClientSecurity::Faulty`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Once `after` bytes were sent, the connection is reset: shut down both ways, and every
    /// later read and write fails.
    Reset { after: u64 },
    /// Once `after` bytes were sent, the link goes silent without closing: what is sent
    /// vanishes and nothing more arrives (reads wait out their timeout).
    Blackhole { after: u64 },
    /// The byte at offset `at` of what is sent arrives flipped.
    Corrupt { at: u64 },
}

impl Fault {
    /// Parses a test hook's `KIND@CHANNEL:BYTES` (`reset@2:8388608`, `blackhole@0:4096`,
    /// `corrupt@3:300000`): the fault and the migration channel it strikes.
    pub fn parse_spec(spec: &str) -> Result<(u16, Fault), String> {
        let bad = || {
            format!(
                "{spec:?} is not a fault: expected KIND@CHANNEL:BYTES with KIND reset, \
                 blackhole or corrupt"
            )
        };
        let (kind, rest) = spec.split_once('@').ok_or_else(bad)?;
        let (channel, bytes) = rest.split_once(':').ok_or_else(bad)?;
        let channel: u16 = channel.parse().map_err(|_| bad())?;
        let bytes: u64 = bytes.parse().map_err(|_| bad())?;
        let fault = match kind {
            "reset" => Fault::Reset { after: bytes },
            "blackhole" => Fault::Blackhole { after: bytes },
            "corrupt" => Fault::Corrupt { at: bytes },
            _ => return Err(bad()),
        };
        Ok((channel, fault))
    }
}

#[derive(Debug)]
struct Faulty {
    inner: Channel,
    fault: Fault,
    sent: AtomicU64,
    /// Reset, or silent: the fault has struck.
    struck: AtomicBool,
    /// Shut down by this end.
    closed: AtomicBool,
    read_timeout: Mutex<Option<Duration>>,
}

impl Faulty {
    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let sent = self.sent.load(Ordering::Acquire);
        match self.fault {
            Fault::Reset { after } | Fault::Blackhole { after } => {
                let struck = self.struck.load(Ordering::Acquire);
                if struck || sent >= after {
                    self.strike();
                    return match self.fault {
                        Fault::Reset { .. } => Err(io::ErrorKind::ConnectionReset.into()),
                        _ => Ok(buf.len()),
                    };
                }
                // Up to the fault's offset, as the bytes before it get through.
                let room = usize::try_from(after - sent).unwrap_or(usize::MAX);
                let n = (&self.inner).write(&buf[..buf.len().min(room)])?;
                self.sent.fetch_add(n as u64, Ordering::AcqRel);
                Ok(n)
            }
            Fault::Corrupt { at } => {
                let n = if at >= sent && at < sent + buf.len() as u64 {
                    let mut copy = buf.to_vec();
                    copy[(at - sent) as usize] ^= 0xff;
                    // Only as far as the flipped byte, so it is sent for sure.
                    let upto = (at - sent) as usize + 1;
                    (&self.inner).write(&copy[..upto])?
                } else {
                    (&self.inner).write(buf)?
                };
                self.sent.fetch_add(n as u64, Ordering::AcqRel);
                Ok(n)
            }
        }
    }

    fn strike(&self) {
        if !self.struck.swap(true, Ordering::AcqRel) {
            if let Fault::Reset { .. } = self.fault {
                let _ = self.inner.shutdown(Shutdown::Both);
            }
        }
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.struck.load(Ordering::Acquire) {
            return (&self.inner).read(buf);
        }
        match self.fault {
            Fault::Reset { .. } => Err(io::ErrorKind::ConnectionReset.into()),
            // Silence: wait out the read timeout (or for ever), as on a dead link.
            _ => {
                let timeout = *self.read_timeout.lock().unwrap_or_else(|e| e.into_inner());
                let start = Instant::now();
                loop {
                    if self.closed.load(Ordering::Acquire) {
                        return Ok(0);
                    }
                    if timeout.is_some_and(|t| start.elapsed() >= t) {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// A migration connection, shared by its clones.
#[derive(Debug, Clone)]
pub struct Channel(Arc<Kind>);

impl Channel {
    pub fn plain(s: TcpStream) -> Self {
        Channel(Arc::new(Kind::Plain(s)))
    }

    pub fn tls(s: TlsStream) -> Self {
        Channel(Arc::new(Kind::Tls(Box::new(s))))
    }

    /// `inner` with `fault` injected (tests).
    pub fn faulty(inner: Channel, fault: Fault) -> Self {
        Channel(Arc::new(Kind::Faulty(Box::new(Faulty {
            inner,
            fault,
            sent: AtomicU64::new(0),
            struck: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            read_timeout: Mutex::new(None),
        }))))
    }

    /// Who the peer's certificate names (TLS only).
    pub fn peer(&self) -> Option<&Identity> {
        match &*self.0 {
            Kind::Plain(_) => None,
            Kind::Tls(s) => s.peer_identity(),
            Kind::Faulty(f) => f.inner.peer(),
        }
    }

    pub fn is_tls(&self) -> bool {
        match &*self.0 {
            Kind::Plain(_) => false,
            Kind::Tls(_) => true,
            Kind::Faulty(f) => f.inner.is_tls(),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &*self.0 {
            Kind::Plain(s) => s.set_read_timeout(t),
            Kind::Tls(s) => s.set_read_timeout(t),
            Kind::Faulty(f) => {
                *f.read_timeout.lock().unwrap_or_else(|e| e.into_inner()) = t;
                f.inner.set_read_timeout(t)
            }
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &*self.0 {
            Kind::Plain(s) => s.set_write_timeout(t),
            Kind::Tls(s) => s.set_write_timeout(t),
            Kind::Faulty(f) => f.inner.set_write_timeout(t),
        }
    }

    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match &*self.0 {
            Kind::Plain(s) => s.set_nodelay(nodelay),
            Kind::Tls(s) => s.set_nodelay(nodelay),
            Kind::Faulty(f) => f.inner.set_nodelay(nodelay),
        }
    }

    /// Shuts the connection down; a reader blocked on it wakes up.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &*self.0 {
            Kind::Plain(s) => s.shutdown(how),
            Kind::Tls(s) => s.shutdown(how),
            Kind::Faulty(f) => {
                // A silenced reader waits for its timeout; shutting down ends that too.
                f.closed.store(true, Ordering::Release);
                f.inner.shutdown(how)
            }
        }
    }
}

impl Read for &Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &*self.0 {
            Kind::Plain(s) => (&*s).read(buf),
            Kind::Tls(s) => (&**s).read(buf),
            Kind::Faulty(f) => f.read(buf),
        }
    }
}

impl Write for &Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &*self.0 {
            Kind::Plain(s) => (&*s).write(buf),
            Kind::Tls(s) => (&**s).write(buf),
            Kind::Faulty(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &*self.0 {
            Kind::Plain(s) => (&*s).flush(),
            Kind::Tls(s) => (&**s).flush(),
            Kind::Faulty(f) => (&f.inner).flush(),
        }
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

/// How the source secures its channels.
#[derive(Debug, Clone, Default)]
pub enum ClientSecurity {
    /// Plain TCP (only where the operator asked for it).
    #[default]
    Plain,
    /// Mutual TLS: the source presents `config`'s certificate and checks the target's against
    /// the cluster CA and `server_name` (the address it dials).
    Tls {
        config: Arc<ClientConfig>,
        server_name: ServerName<'static>,
    },
    /// `inner`, with `fault` injected into channel `channel` (tests only: the seam where the
    /// reliability tests break the network).
    Faulty {
        inner: Box<ClientSecurity>,
        channel: u16,
        fault: Fault,
    },
}

/// How the target secures the channels it accepts.
#[derive(Debug, Clone, Default)]
pub enum ServerSecurity {
    /// Plain TCP (only where the operator asked for it).
    #[default]
    Plain,
    /// Mutual TLS: every channel must present a certificate of the cluster CA naming the host
    /// `source`, the one the migration was announced from.
    Tls {
        config: Arc<ServerConfig>,
        source: String,
    },
}
