//! The connections of one migration: channel 0 carries control messages both ways, channel
//! 1 carries pages that a post-copy fault waits for (so they never queue behind bulk pages),
//! channels 2.. carry bulk pages. Each is opened by the source, secured as the two ends were
//! told ([`ClientSecurity`], [`ServerSecurity`]: mutual TLS, or plain TCP), and starts with a
//! version handshake.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use godwit_tls::{Role, TlsStream};

use crate::channel::{Channel, ClientSecurity, ServerSecurity};

use crate::error::{Awaited, MigrationError};
use crate::protocol::{
    self, read_message, write_message, Message, ProtocolError, MAX_CHANNELS, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

pub const CONTROL: u16 = 0;
pub const URGENT: u16 = 1;
pub const FIRST_BULK: u16 = 2;

/// Connects `bulk + 2` channels to `addr`, secures and handshakes each. Returns them by index.
pub fn connect(
    addr: &str,
    migration_id: [u8; 16],
    bulk: u16,
    timeout: Duration,
    security: &ClientSecurity,
) -> Result<Vec<Channel>, MigrationError> {
    let channels = bulk.saturating_add(FIRST_BULK);
    if bulk == 0 || channels > MAX_CHANNELS {
        return Err(MigrationError::ChannelCount {
            requested: bulk,
            max: MAX_CHANNELS - FIRST_BULK,
        });
    }
    let sockaddr: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|source| MigrationError::Connect {
            addr: addr.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| MigrationError::NoAddress {
            addr: addr.to_owned(),
        })?;
    let mut streams = Vec::with_capacity(channels as usize);
    for channel in 0..channels {
        let tcp = TcpStream::connect_timeout(&sockaddr, timeout).map_err(|source| {
            MigrationError::Connect {
                addr: addr.to_owned(),
                source,
            }
        })?;
        tcp.set_nodelay(channel < FIRST_BULK)
            .and_then(|()| tcp.set_read_timeout(Some(timeout)))
            .and_then(|()| tcp.set_write_timeout(Some(crate::vm::DEFAULT_PEER_TIMEOUT)))
            .map_err(MigrationError::io("configure a migration channel"))?;
        let mut s = secure(tcp, channel, security, timeout)?;
        write_message(
            &mut s,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                min_version: MIN_PROTOCOL_VERSION,
                migration_id,
                channel,
                channels,
            },
        )
        .map_err(MigrationError::channel(channel))?;
        match read_message(&mut s).map_err(MigrationError::channel(channel))? {
            Message::HelloAck { version } => {
                protocol::negotiate(version, version).map_err(MigrationError::channel(channel))?;
            }
            Message::Error { message } | Message::Abort { reason: message } => {
                return Err(MigrationError::Remote(message))
            }
            other => {
                return Err(MigrationError::channel(channel)(ProtocolError::unexpected(
                    "HelloAck", &other,
                )))
            }
        }
        streams.push(s);
    }
    Ok(streams)
}

/// Secures channel `channel`'s connection as `security` says.
fn secure(
    tcp: TcpStream,
    channel: u16,
    security: &ClientSecurity,
    timeout: Duration,
) -> Result<Channel, MigrationError> {
    Ok(match security {
        ClientSecurity::Plain => Channel::plain(tcp),
        ClientSecurity::Tls {
            config,
            server_name,
        } => Channel::tls(
            TlsStream::client(tcp, config.clone(), server_name.clone(), timeout)
                .map_err(|source| MigrationError::Tls { channel, source })?,
        ),
        ClientSecurity::Faulty {
            inner,
            channel: faulty,
            fault,
        } => {
            let s = secure(tcp, channel, inner, timeout)?;
            if *faulty == channel {
                Channel::faulty(s, *fault)
            } else {
                s
            }
        }
    })
}

/// Accepts the source's channels for migration `migration_id` on `listener`, securing and
/// handshaking each; returns them ordered by channel index. A connection that fails the TLS
/// handshake, comes from another host than the announced source, or has the wrong id or a bad
/// hello is dropped (answered with an error where it can be); it does not end the wait.
pub fn accept(
    listener: &TcpListener,
    migration_id: [u8; 16],
    timeout: Duration,
    security: &ServerSecurity,
) -> Result<Vec<Channel>, MigrationError> {
    let deadline = Instant::now() + timeout;
    accept_until(listener, migration_id, security, &mut || {
        if Instant::now() > deadline {
            Err(MigrationError::Timeout {
                awaited: Awaited::Channels,
                after: timeout,
            })
        } else {
            Ok(())
        }
    })
}

/// [`accept`], for as long as `go_on` (asked between connections, every few milliseconds)
/// says to: its error ends the wait. A new channel 0 starts the set afresh, so a source that
/// retries after a failed attempt is not refused for the channels its last try left open.
pub fn accept_until(
    listener: &TcpListener,
    migration_id: [u8; 16],
    security: &ServerSecurity,
    go_on: &mut dyn FnMut() -> Result<(), MigrationError>,
) -> Result<Vec<Channel>, MigrationError> {
    listener
        .set_nonblocking(true)
        .map_err(MigrationError::io("poll the migration listener"))?;
    let mut slots: Vec<Option<Channel>> = Vec::new();
    let mut expected: Option<u16> = None;
    loop {
        if let Some(n) = expected {
            if slots.iter().filter(|s| s.is_some()).count() == n as usize {
                break;
            }
        }
        go_on()?;
        let tcp = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(MigrationError::io("accept a migration channel")(e)),
        };
        let _ = tcp.set_nonblocking(false);
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = tcp.set_write_timeout(Some(Duration::from_secs(10)));
        let (mut s, refusal) = match security {
            ServerSecurity::Plain => (Channel::plain(tcp), None),
            ServerSecurity::Tls { config, source } => {
                // A stranger (no certificate, another CA, expired) fails the handshake.
                let Ok(tls) = TlsStream::server(tcp, config.clone(), Duration::from_secs(10))
                else {
                    continue;
                };
                let s = Channel::tls(tls);
                let from = s.peer().cloned();
                let refusal = (!from
                    .as_ref()
                    .is_some_and(|p| p.role == Role::Host && p.name == *source))
                .then(|| {
                    let who = from.map_or("an unnamed peer".to_owned(), |p| p.to_string());
                    format!("this migration was announced from host {source}, not from {who}")
                });
                (s, refusal)
            }
        };
        match handshake(&mut s, migration_id, expected, refusal) {
            Ok((channel, channels)) => {
                if channel == CONTROL {
                    // A new attempt: what an earlier one left open is dropped.
                    slots.clear();
                }
                expected = Some(channels);
                slots.resize_with(channels as usize, || None);
                let _ = s.set_nodelay(channel < FIRST_BULK);
                let _ = s.set_read_timeout(Some(crate::vm::DEFAULT_PEER_TIMEOUT));
                let _ = s.set_write_timeout(Some(crate::vm::DEFAULT_PEER_TIMEOUT));
                if slots[channel as usize].is_some() {
                    let _ = write_message(
                        &mut s,
                        &Message::error(format!("channel {channel} is already open")),
                    );
                    continue;
                }
                slots[channel as usize] = Some(s);
            }
            Err(message) => {
                tracing_free_log(&message);
                let _ = write_message(&mut s, &Message::error(message));
            }
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

fn tracing_free_log(message: &str) {
    // The engine has no logger of its own; the agent logs the migration's outcome.
    let _ = message;
}

/// Reads the source's hello and answers it; `refusal` (the peer is not the announced source)
/// is the answer once the hello is read, so the peer gets it rather than a reset connection.
fn handshake(
    s: &mut Channel,
    migration_id: [u8; 16],
    expected: Option<u16>,
    refusal: Option<String>,
) -> Result<(u16, u16), String> {
    let msg = read_message(s).map_err(|e| format!("bad hello: {e}"))?;
    if let Some(refusal) = refusal {
        return Err(refusal);
    }
    let Message::Hello {
        version,
        min_version,
        migration_id: id,
        channel,
        channels,
    } = msg
    else {
        return Err(format!("expected Hello, got {}", msg.command()));
    };
    if id != migration_id {
        return Err("this target expects another migration".into());
    }
    if !(FIRST_BULK + 1..=MAX_CHANNELS).contains(&channels) || channel >= channels {
        return Err(format!("channel {channel} of {channels} is out of range"));
    }
    // Channel 0 opens a new set (see accept_until).
    if channel != CONTROL && expected.is_some_and(|n| n != channels) {
        return Err(format!("channel count changed to {channels}"));
    }
    let version = protocol::negotiate(version, min_version).map_err(|e| e.to_string())?;
    write_message(s, &Message::HelloAck { version }).map_err(|e| e.to_string())?;
    Ok((channel, channels))
}

/// Writes a whole frame, counting it against the bandwidth cap first.
pub fn send_frame(
    s: &mut impl Write,
    frame: &[u8],
    limiter: &crate::limiter::Limiter,
) -> Result<(), ProtocolError> {
    limiter.take(frame.len());
    protocol::write_frame(s, frame)
}

/// Reads one message, with a clear error when the peer is gone.
pub fn recv(s: &mut impl Read) -> Result<Message, ProtocolError> {
    read_message(s)
}

/// Sends a keepalive on the control channel every [`protocol::KEEPALIVE_INTERVAL`] until `stop`, or
/// until the channel fails (the engine's own sends report that).
pub fn send_keepalives(control: &Mutex<Channel>, stop: &AtomicBool) {
    let mut frame = Vec::new();
    if Message::Keepalive.encode(&mut frame).is_err() {
        return;
    }
    let mut last = Instant::now();
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() < protocol::KEEPALIVE_INTERVAL {
            continue;
        }
        last = Instant::now();
        let mut c = control.lock().unwrap_or_else(|e| e.into_inner());
        if protocol::write_frame(&mut *c, &frame).is_err() {
            return;
        }
    }
}
