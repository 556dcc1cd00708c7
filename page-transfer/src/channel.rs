//! One migration connection: plain TCP, or mutual TLS over it. The engine reads and writes a
//! [`Channel`] and never sees which; a clone shares the connection (the control channel has a
//! reader thread beside its writers). How a migration's channels are secured is the source's
//! [`ClientSecurity`] and the target's [`ServerSecurity`]; the handshake runs in
//! `transport::connect` / `transport::accept` before the protocol's own hello.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use godwit_tls::rustls::{ClientConfig, ServerConfig};
use godwit_tls::{Identity, ServerName, TlsStream};

#[derive(Debug)]
enum Kind {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
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

    /// Who the peer's certificate names (TLS only).
    pub fn peer(&self) -> Option<&Identity> {
        match &*self.0 {
            Kind::Plain(_) => None,
            Kind::Tls(s) => s.peer_identity(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(&*self.0, Kind::Tls(_))
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &*self.0 {
            Kind::Plain(s) => s.set_read_timeout(t),
            Kind::Tls(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &*self.0 {
            Kind::Plain(s) => s.set_write_timeout(t),
            Kind::Tls(s) => s.set_write_timeout(t),
        }
    }

    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match &*self.0 {
            Kind::Plain(s) => s.set_nodelay(nodelay),
            Kind::Tls(s) => s.set_nodelay(nodelay),
        }
    }

    /// Shuts the connection down; a reader blocked on it wakes up.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &*self.0 {
            Kind::Plain(s) => s.shutdown(how),
            Kind::Tls(s) => s.shutdown(how),
        }
    }
}

impl Read for &Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &*self.0 {
            Kind::Plain(s) => (&*s).read(buf),
            Kind::Tls(s) => (&**s).read(buf),
        }
    }
}

impl Write for &Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &*self.0 {
            Kind::Plain(s) => (&*s).write(buf),
            Kind::Tls(s) => (&**s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &*self.0 {
            Kind::Plain(s) => (&*s).flush(),
            Kind::Tls(s) => (&**s).flush(),
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
