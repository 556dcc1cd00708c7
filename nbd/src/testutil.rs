//! Shared by the unit tests: qemu-nbd gating, disk patterns, and a scripted NBD server for the
//! cases a real server never produces (garbage, protocol violations, refusals).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::proto::*;
use crate::qemu_nbd_available;

/// Whether a test that needs qemu-nbd can run. Without qemu-nbd the test is skipped, unless
/// GODWIT_REQUIRE_KVM=1 says this machine must be able to run everything.
pub(crate) fn qemu_nbd_or_skip(test: &str) -> bool {
    if qemu_nbd_available() {
        return true;
    }
    let reason = "qemu-nbd is not installed (Debian package qemu-utils)";
    if std::env::var("GODWIT_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: {reason}, and GODWIT_REQUIRE_KVM=1 requires it");
    }
    eprintln!("skipping {test}: {reason}");
    false
}

/// The byte a test disk holds at `offset`: varies within and across sectors and pages.
pub(crate) fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ offset as u8
}

pub(crate) fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(pattern_byte).collect()
}

/// A temporary raw disk of `len` bytes filled with [`pattern`].
pub(crate) fn pattern_disk(len: usize) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&pattern(0, len)).unwrap();
    file.flush().unwrap();
    file
}

/// xorshift64*: reproducible garbage without a dependency.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }
}

/// Runs `script` on the first connection to a fresh 127.0.0.1 port; returns "host:port" and
/// the script's outcome, for tests that check what the server saw.
pub(crate) fn fake_server<T, F>(script: F) -> (String, JoinHandle<io::Result<T>>)
where
    T: Send + 'static,
    F: FnOnce(&mut TcpStream) -> io::Result<T> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        script(&mut stream)
    });
    (addr, server)
}

/// Sends a newstyle greeting and returns the client's flags.
pub(crate) fn greet(stream: &mut TcpStream, handshake_flags: u16) -> io::Result<u32> {
    stream.write_all(&NBDMAGIC.to_be_bytes())?;
    stream.write_all(&IHAVEOPT.to_be_bytes())?;
    stream.write_all(&handshake_flags.to_be_bytes())?;
    let mut client_flags = [0u8; 4];
    stream.read_exact(&mut client_flags)?;
    Ok(u32::from_be_bytes(client_flags))
}

/// Reads one option the client sent: its number and data.
pub(crate) fn read_option(stream: &mut TcpStream) -> io::Result<(u32, Vec<u8>)> {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header)?;
    assert_eq!(be_u64(&header[0..8]), IHAVEOPT, "option without IHAVEOPT");
    let len = be_u32(&header[12..16]);
    assert!(len <= 8192, "client sent a {len}-byte option");
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data)?;
    Ok((be_u32(&header[8..12]), data))
}

pub(crate) fn option_reply(
    stream: &mut TcpStream,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut reply = Vec::new();
    reply.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    reply.extend_from_slice(&option.to_be_bytes());
    reply.extend_from_slice(&kind.to_be_bytes());
    reply.extend_from_slice(&(data.len() as u32).to_be_bytes());
    reply.extend_from_slice(data);
    stream.write_all(&reply)
}

pub(crate) fn info_export(size: u64, transmission_flags: u16) -> Vec<u8> {
    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&size.to_be_bytes());
    info.extend_from_slice(&transmission_flags.to_be_bytes());
    info
}

/// Negotiates like a well-behaved server answering NBD_OPT_GO.
pub(crate) fn serve_go(stream: &mut TcpStream, size: u64, flags: u16) -> io::Result<()> {
    greet(stream, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
    let (option, _) = read_option(stream)?;
    assert_eq!(option, OPT_GO);
    option_reply(stream, OPT_GO, REP_INFO, &info_export(size, flags))?;
    option_reply(stream, OPT_GO, REP_ACK, &[])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) command: u16,
    pub(crate) cookie: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

/// Reads one request header (and discards a write's data).
pub(crate) fn read_request(stream: &mut TcpStream) -> io::Result<Request> {
    let mut header = [0u8; REQUEST_LEN];
    stream.read_exact(&mut header)?;
    assert_eq!(be_u32(&header[0..4]), REQUEST_MAGIC);
    let request = Request {
        command: be_u16(&header[6..8]),
        cookie: be_u64(&header[8..16]),
        offset: be_u64(&header[16..24]),
        len: be_u32(&header[24..28]),
    };
    if request.command == Command::Write as u16 {
        io::copy(&mut stream.take(u64::from(request.len)), &mut io::sink())?;
    }
    Ok(request)
}

pub(crate) fn simple_reply(
    stream: &mut TcpStream,
    error: u32,
    cookie: u64,
    data: &[u8],
) -> io::Result<()> {
    let mut reply = Vec::new();
    reply.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    reply.extend_from_slice(&error.to_be_bytes());
    reply.extend_from_slice(&cookie.to_be_bytes());
    reply.extend_from_slice(data);
    stream.write_all(&reply)
}

/// Reads until the client hangs up, so our unread bytes never turn its close into a reset.
pub(crate) fn drain(stream: &mut TcpStream) -> io::Result<()> {
    io::copy(stream, &mut io::sink()).map(drop)
}
