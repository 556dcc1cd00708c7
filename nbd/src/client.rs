//! The NBD client: one TCP connection to one export, shared by the threads of a block device.
//!
//! Requests take turns on a mutex, one in flight at a time, so a reply always belongs to the
//! request just sent; its cookie is checked anyway. Large reads and writes are split into
//! requests no larger than the server's maximum payload.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::handshake;
use crate::proto::{
    decode_reply, encode_request, errno_name, Command, MAX_REQUEST, REPLY_LEN, TRANS_READ_ONLY,
    TRANS_SEND_FLUSH,
};
use crate::NbdError;

/// Read and write timeout once the export is negotiated: a server that does not answer a
/// request within this time is treated as gone.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one NBD export. `Send + Sync`: share it behind an `Arc`.
#[derive(Debug)]
pub struct NbdClient {
    conn: Mutex<Conn>,
    size: u64,
    transmission_flags: u16,
    /// Largest payload of one request; bigger reads and writes are split.
    max_request: u32,
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    next_cookie: u64,
    /// Set after a transport or protocol error: the stream is out of step.
    broken: bool,
    closed: bool,
}

enum Payload<'a> {
    None,
    Write(&'a [u8]),
    Read(&'a mut [u8]),
}

impl NbdClient {
    /// Connects to `addr` ("host:port"), negotiates `export` and checks it is usable.
    /// `timeout` bounds the TCP connect and each read or write of the negotiation.
    pub fn connect(addr: &str, export: &str, timeout: Duration) -> Result<NbdClient, NbdError> {
        Self::connect_with_limit(addr, export, timeout, MAX_REQUEST)
    }

    /// [`NbdClient::connect`] with a smaller request size cap, so tests can see splitting.
    pub(crate) fn connect_with_limit(
        addr: &str,
        export: &str,
        timeout: Duration,
        max_request: u32,
    ) -> Result<NbdClient, NbdError> {
        let connect_error = |source| NbdError::Connect {
            addr: addr.to_string(),
            source,
        };
        let mut stream = open(addr, timeout).map_err(connect_error)?;
        stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(Some(timeout)))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(connect_error)?;

        let negotiated = handshake::negotiate(&mut stream, export)?;

        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(NbdError::Io)?;
        let max_request = negotiated
            .max_payload
            .map_or(max_request, |server_max| server_max.min(max_request))
            .max(1);
        Ok(NbdClient {
            conn: Mutex::new(Conn {
                stream,
                next_cookie: 1,
                broken: false,
                closed: false,
            }),
            size: negotiated.size,
            transmission_flags: negotiated.transmission_flags,
            max_request,
        })
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server refuses writes to this export.
    pub fn read_only(&self) -> bool {
        self.transmission_flags & TRANS_READ_ONLY != 0
    }

    /// Fills `buf` with the export's bytes from `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_range(Command::Read, offset, buf.len())?;
        let mut offset = offset;
        for chunk in buf.chunks_mut(self.max_request as usize) {
            let len = chunk.len() as u64;
            self.request(Command::Read, offset, Payload::Read(chunk))?;
            offset += len;
        }
        Ok(())
    }

    /// Writes `data` to the export at `offset`. Durable only after [`NbdClient::flush`].
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        if self.read_only() {
            return Err(NbdError::ReadOnly);
        }
        self.check_range(Command::Write, offset, data.len())?;
        let mut offset = offset;
        for chunk in data.chunks(self.max_request as usize) {
            self.request(Command::Write, offset, Payload::Write(chunk))?;
            offset += chunk.len() as u64;
        }
        Ok(())
    }

    /// Asks the server to make completed writes durable. A server that does not support
    /// flushing has nothing to flush, so this is then a no-op.
    pub fn flush(&self) -> Result<(), NbdError> {
        if self.transmission_flags & TRANS_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(Command::Flush, 0, Payload::None)
    }

    /// Tells the server we are leaving and closes the connection. Dropping the client does
    /// the same.
    pub fn disconnect(self) {
        self.close();
    }

    fn check_range(&self, command: Command, offset: u64, len: usize) -> Result<(), NbdError> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(NbdError::OutOfRange {
                op: command.name(),
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn request(&self, command: Command, offset: u64, payload: Payload<'_>) -> Result<(), NbdError> {
        let mut conn = self.lock()?;
        let result = conn.transact(command, offset, payload);
        if let Err(e) = &result {
            if e.breaks_connection() {
                conn.broken = true;
            }
        }
        result
    }

    fn lock(&self) -> Result<MutexGuard<'_, Conn>, NbdError> {
        // A poisoned lock means a caller panicked mid-request: the stream is out of step.
        let conn = self.conn.lock().map_err(|_| NbdError::Broken)?;
        if conn.broken {
            return Err(NbdError::Broken);
        }
        Ok(conn)
    }

    fn close(&self) {
        let (mut conn, usable) = match self.conn.lock() {
            Ok(conn) => (conn, true),
            Err(poisoned) => (poisoned.into_inner(), false),
        };
        if conn.closed {
            return;
        }
        conn.closed = true;
        if usable && !conn.broken {
            let cookie = conn.take_cookie();
            let request = encode_request(Command::Disconnect, cookie, 0, 0);
            // Best effort: the server may already be gone, and there is no reply to wait for.
            let _ = conn.stream.write_all(&request);
        }
        let _ = conn.stream.shutdown(Shutdown::Both);
    }

    /// How many requests this client has sent, for tests that check splitting.
    #[cfg(test)]
    pub(crate) fn requests_sent(&self) -> u64 {
        self.conn.lock().unwrap().next_cookie - 1
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.close();
    }
}

impl Conn {
    fn take_cookie(&mut self) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        cookie
    }

    fn transact(
        &mut self,
        command: Command,
        offset: u64,
        payload: Payload<'_>,
    ) -> Result<(), NbdError> {
        // Callers split requests at max_request, a u32, so the length fits.
        let len = match &payload {
            Payload::None => 0,
            Payload::Write(data) => data.len() as u32,
            Payload::Read(buf) => buf.len() as u32,
        };
        let cookie = self.take_cookie();
        let header = encode_request(command, cookie, offset, len);
        let data: &[u8] = match &payload {
            Payload::Write(data) => data,
            _ => &[],
        };
        write_all_vectored(
            &mut self.stream,
            &mut [IoSlice::new(&header), IoSlice::new(data)],
        )
        .map_err(NbdError::Io)?;

        let mut reply = [0u8; REPLY_LEN];
        self.stream.read_exact(&mut reply).map_err(NbdError::Io)?;
        let reply = decode_reply(&reply)?;
        if reply.cookie != cookie {
            return Err(NbdError::Protocol(format!(
                "the reply carries cookie {:#x} but the request in flight is {cookie:#x}",
                reply.cookie
            )));
        }
        if reply.error != 0 {
            // With simple replies a failed read carries no data, so the stream stays in step.
            return Err(NbdError::Server {
                op: command.name(),
                errno: errno_name(reply.error),
                code: reply.error,
                offset,
                len,
            });
        }
        if let Payload::Read(buf) = payload {
            self.stream.read_exact(buf).map_err(NbdError::Io)?;
        }
        Ok(())
    }
}

fn open(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
    for candidate in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&candidate, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

/// Sends the request header and its data in one segment where the kernel allows.
fn write_all_vectored(stream: &mut TcpStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
