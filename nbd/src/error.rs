//! What can go wrong talking NBD or running qemu-nbd.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("Cannot connect to the NBD server at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The server is not an NBD server we can talk to, or refused the export.
    #[error("NBD handshake failed: {0}")]
    Handshake(String),
    #[error("The NBD connection failed")]
    Io(#[source] io::Error),
    /// A reply during transmission that cannot be a valid answer to our request.
    #[error("The NBD server broke the protocol: {0}")]
    Protocol(String),
    /// An earlier transport or protocol error left the stream out of step.
    #[error("The NBD connection is unusable after an earlier error; reconnect")]
    Broken,
    /// The server answered one request with an errno; the connection is still usable.
    #[error("The NBD server failed {op} of {len} bytes at offset {offset} with {errno} ({code})")]
    Server {
        op: &'static str,
        errno: &'static str,
        code: u32,
        offset: u64,
        len: u32,
    },
    #[error("Cannot {op} {len} bytes at offset {offset}: the export is only {size} bytes")]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("The export is read-only")]
    ReadOnly,
    #[error("qemu-nbd is not installed (Debian package qemu-utils)")]
    QemuNbdMissing,
    #[error("Cannot export {path}")]
    ExportPath {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot listen on {ip}")]
    Listen {
        ip: IpAddr,
        #[source]
        source: io::Error,
    },
    #[error("Cannot start qemu-nbd")]
    Spawn(#[source] io::Error),
    #[error("qemu-nbd exited early ({status}): {stderr}")]
    QemuNbdExited { status: ExitStatus, stderr: String },
    #[error("qemu-nbd did not accept NBD clients on {addr} within {waited:?}")]
    NotReady {
        addr: SocketAddr,
        waited: Duration,
        #[source]
        source: Box<NbdError>,
    },
}

impl NbdError {
    /// Whether the error leaves the byte stream out of step, so no further request can be sent.
    pub(crate) fn breaks_connection(&self) -> bool {
        matches!(self, NbdError::Io(_) | NbdError::Protocol(_))
    }
}
