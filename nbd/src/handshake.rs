//! Fixed newstyle negotiation: from the server's greeting to the start of transmission.
//!
//! ```text
//! server: NBDMAGIC u64 | IHAVEOPT u64 | handshake flags u16
//! client: client flags u32
//! client: IHAVEOPT u64 | NBD_OPT_GO u32 | length u32 | name length u32 | name | 0 u16
//! server: option replies, magic u64 | option u32 | type u32 | length u32 | data:
//!         NBD_REP_INFO (NBD_INFO_EXPORT: size u64, transmission flags u16), ..., NBD_REP_ACK
//! ```
//!
//! If the server answers `NBD_OPT_GO` with `NBD_REP_ERR_UNSUP`, the older option follows:
//!
//! ```text
//! client: IHAVEOPT u64 | NBD_OPT_EXPORT_NAME u32 | length u32 | name
//! server: size u64 | transmission flags u16 | 124 zero bytes (none with NO_ZEROES)
//! ```
//!
//! Every length is checked before anything is allocated, and any surprise ends the
//! negotiation with [`NbdError::Handshake`].

use std::io::{self, Read, Write};

use crate::proto::*;
use crate::NbdError;

/// What the server told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub(crate) size: u64,
    pub(crate) transmission_flags: u16,
    /// The largest payload the server accepts, when it said so.
    pub(crate) max_payload: Option<u32>,
}

/// A server answers NBD_OPT_GO with a few INFO replies; more than this is a server gone wrong.
const MAX_GO_REPLIES: usize = 64;
/// How much of a server's error message we quote.
const MAX_QUOTED_MESSAGE: usize = 200;
/// Padding after the NBD_OPT_EXPORT_NAME answer unless both sides agreed to NO_ZEROES.
const EXPORT_NAME_PADDING: usize = 124;

pub(crate) fn negotiate<S: Read + Write>(
    stream: &mut S,
    export: &str,
) -> Result<Negotiated, NbdError> {
    if export.len() > MAX_EXPORT_NAME {
        return Err(NbdError::Handshake(format!(
            "the export name is {} bytes, longer than the {MAX_EXPORT_NAME}-byte limit",
            export.len()
        )));
    }

    let mut word = [0u8; 8];
    read_exact(stream, &mut word, "reading the greeting")?;
    let magic = u64::from_be_bytes(word);
    if magic != NBDMAGIC {
        return Err(NbdError::Handshake(format!(
            "the greeting starts with {magic:#018x} instead of NBDMAGIC; this is not an NBD server"
        )));
    }
    read_exact(stream, &mut word, "reading the greeting")?;
    match u64::from_be_bytes(word) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(NbdError::Handshake(
                "the server only speaks oldstyle negotiation, which is not supported".into(),
            ))
        }
        other => {
            return Err(NbdError::Handshake(format!(
                "the greeting has {other:#018x} where IHAVEOPT belongs"
            )))
        }
    }
    let mut flags = [0u8; 2];
    read_exact(stream, &mut flags, "reading the greeting")?;
    let handshake_flags = u16::from_be_bytes(flags);
    if handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Handshake(
            "the server does not offer fixed newstyle negotiation".into(),
        ));
    }
    let no_zeroes = handshake_flags & FLAG_NO_ZEROES != 0;
    let client_flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    write_all(
        stream,
        &client_flags.to_be_bytes(),
        "sending the client flags",
    )?;

    let negotiated = match go(stream, export)? {
        Some(negotiated) => negotiated,
        None => export_name(stream, export, no_zeroes)?,
    };
    if negotiated.transmission_flags & TRANS_HAS_FLAGS == 0 {
        return Err(NbdError::Handshake(format!(
            "the transmission flags {:#06x} lack NBD_FLAG_HAS_FLAGS",
            negotiated.transmission_flags
        )));
    }
    Ok(negotiated)
}

/// Selects the export with NBD_OPT_GO; `None` when the server does not know that option.
fn go<S: Read + Write>(stream: &mut S, export: &str) -> Result<Option<Negotiated>, NbdError> {
    let mut data = Vec::with_capacity(6 + export.len());
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    // No information requests: the server sends NBD_INFO_EXPORT regardless, and asking for
    // NBD_INFO_BLOCK_SIZE would oblige us to honour a minimum block size.
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(stream, OPT_GO, &data)?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut max_payload = None;
    for _ in 0..MAX_GO_REPLIES {
        let mut header = [0u8; OPTION_REPLY_LEN];
        read_exact(stream, &mut header, "waiting for the answer to NBD_OPT_GO")?;
        let reply = decode_option_reply(&header)?;
        if reply.option != OPT_GO {
            return Err(NbdError::Handshake(format!(
                "the server answered option {} while NBD_OPT_GO was pending",
                reply.option
            )));
        }
        // decode_option_reply capped the length, so this allocation is small.
        let mut payload = vec![0u8; reply.len as usize];
        read_exact(stream, &mut payload, "reading an option reply")?;
        match reply.kind {
            REP_INFO => parse_info(&payload, &mut export_info, &mut max_payload)?,
            REP_ACK => {
                let Some((size, transmission_flags)) = export_info else {
                    return Err(NbdError::Handshake(
                        "the server accepted NBD_OPT_GO without describing the export".into(),
                    ));
                };
                return Ok(Some(Negotiated {
                    size,
                    transmission_flags,
                    max_payload,
                }));
            }
            REP_ERR_UNSUP => return Ok(None),
            REP_ERR_UNKNOWN => {
                return Err(NbdError::Handshake(format!(
                    "the server has no export named {export:?}{}",
                    quote_message(&payload)
                )))
            }
            kind if kind & REP_FLAG_ERROR != 0 => {
                return Err(NbdError::Handshake(format!(
                    "the server refused export {export:?} with {}{}",
                    option_error_name(kind),
                    quote_message(&payload)
                )))
            }
            kind => {
                return Err(NbdError::Handshake(format!(
                    "the server answered NBD_OPT_GO with unknown reply type {kind}"
                )))
            }
        }
    }
    Err(NbdError::Handshake(format!(
        "the server sent more than {MAX_GO_REPLIES} replies to NBD_OPT_GO"
    )))
}

fn parse_info(
    payload: &[u8],
    export_info: &mut Option<(u64, u16)>,
    max_payload: &mut Option<u32>,
) -> Result<(), NbdError> {
    if payload.len() < 2 {
        return Err(NbdError::Handshake(format!(
            "an NBD_REP_INFO reply has {} bytes, too short for its type",
            payload.len()
        )));
    }
    let wrong_length = |name: &str, expected: usize| {
        NbdError::Handshake(format!(
            "{name} has {} bytes instead of {expected}",
            payload.len()
        ))
    };
    match be_u16(payload) {
        INFO_EXPORT => {
            if payload.len() != 12 {
                return Err(wrong_length("NBD_INFO_EXPORT", 12));
            }
            *export_info = Some((be_u64(&payload[2..10]), be_u16(&payload[10..12])));
        }
        INFO_BLOCK_SIZE => {
            if payload.len() != 14 {
                return Err(wrong_length("NBD_INFO_BLOCK_SIZE", 14));
            }
            let max = be_u32(&payload[10..14]);
            *max_payload = (max > 0).then_some(max);
        }
        // Names, descriptions and future information types do not concern us.
        _ => {}
    }
    Ok(())
}

/// Selects the export with the older NBD_OPT_EXPORT_NAME, which has no error reply: a server
/// without that export just closes the connection.
fn export_name<S: Read + Write>(
    stream: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<Negotiated, NbdError> {
    send_option(stream, OPT_EXPORT_NAME, export.as_bytes())?;
    let mut answer = [0u8; 10];
    stream.read_exact(&mut answer).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
            NbdError::Handshake(format!(
                "the server closed the connection after NBD_OPT_EXPORT_NAME; \
                 it probably has no export named {export:?}"
            ))
        }
        _ => io_error(e, "waiting for the answer to NBD_OPT_EXPORT_NAME"),
    })?;
    if !no_zeroes {
        let mut padding = [0u8; EXPORT_NAME_PADDING];
        read_exact(
            stream,
            &mut padding,
            "reading the NBD_OPT_EXPORT_NAME answer",
        )?;
    }
    Ok(Negotiated {
        size: be_u64(&answer[0..8]),
        transmission_flags: be_u16(&answer[8..10]),
        max_payload: None,
    })
}

fn send_option<S: Write>(stream: &mut S, option: u32, data: &[u8]) -> Result<(), NbdError> {
    let mut message = Vec::with_capacity(16 + data.len());
    message.extend_from_slice(&IHAVEOPT.to_be_bytes());
    message.extend_from_slice(&option.to_be_bytes());
    message.extend_from_slice(&(data.len() as u32).to_be_bytes());
    message.extend_from_slice(data);
    write_all(stream, &message, "sending an option")
}

/// A server's error text as a suffix for our message: printable, bounded, maybe empty.
fn quote_message(payload: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(payload)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_QUOTED_MESSAGE)
        .collect();
    if text.is_empty() {
        String::new()
    } else {
        format!(" ({text})")
    }
}

fn read_exact<S: Read>(stream: &mut S, buf: &mut [u8], what: &str) -> Result<(), NbdError> {
    stream.read_exact(buf).map_err(|e| io_error(e, what))
}

fn write_all<S: Write>(stream: &mut S, buf: &[u8], what: &str) -> Result<(), NbdError> {
    stream
        .write_all(buf)
        .and_then(|()| stream.flush())
        .map_err(|e| io_error(e, what))
}

/// A peer that hangs up or stalls mid-negotiation is a failed handshake, not a transport
/// fault worth a stack of sources.
fn io_error(e: io::Error, what: &str) -> NbdError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => {
            NbdError::Handshake(format!("the server closed the connection while {what}"))
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            NbdError::Handshake(format!("the server went silent while {what}"))
        }
        _ => NbdError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::testutil::*;
    use crate::NbdClient;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// What a scripted server does with the connection.
    type Script = Box<dyn FnOnce(&mut TcpStream) -> io::Result<()> + Send>;

    /// Connects to a scripted server and returns the handshake error's message.
    fn handshake_error<F>(script: F) -> String
    where
        F: FnOnce(&mut TcpStream) -> io::Result<()> + Send + 'static,
    {
        let (addr, server) = fake_server(script);
        let err = NbdClient::connect(&addr, "disk", TIMEOUT).unwrap_err();
        let _ = server.join().unwrap();
        assert!(matches!(err, NbdError::Handshake(_)), "{err:?}");
        err.to_string()
    }

    #[test]
    fn random_bytes_are_a_handshake_error() {
        for seed in 1..=16 {
            handshake_error(move |s| {
                let _ = s.write_all(&Rng::new(seed).bytes(4096));
                drain(s)
            });
        }
    }

    #[test]
    fn random_bytes_after_a_valid_greeting_are_a_handshake_error() {
        for seed in 1..=16 {
            handshake_error(move |s| {
                greet(s, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
                let _ = s.write_all(&Rng::new(seed).bytes(4096));
                drain(s)
            });
        }
    }

    #[test]
    fn a_huge_option_reply_is_refused_before_allocating() {
        let started = Instant::now();
        let err = handshake_error(|s| {
            greet(s, FLAG_FIXED_NEWSTYLE)?;
            read_option(s)?;
            let mut header = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
            header.extend_from_slice(&OPT_GO.to_be_bytes());
            header.extend_from_slice(&REP_INFO.to_be_bytes());
            header.extend_from_slice(&u32::MAX.to_be_bytes());
            s.write_all(&header)?;
            drain(s)
        });
        assert!(err.contains("65536-byte limit"), "{err}");
        // It did not wait for 4 GiB that will never come.
        assert!(started.elapsed() < TIMEOUT);
    }

    #[test]
    fn endless_option_replies_are_cut_off() {
        let err = handshake_error(|s| {
            greet(s, FLAG_FIXED_NEWSTYLE)?;
            read_option(s)?;
            for _ in 0..100 {
                // An information type we do not know, which a client ignores.
                if option_reply(s, OPT_GO, REP_INFO, &[0, 42]).is_err() {
                    break;
                }
            }
            drain(s)
        });
        assert!(err.contains("more than 64 replies"), "{err}");
    }

    #[test]
    fn malformed_greetings_and_answers_are_named() {
        let cases: Vec<(&str, Script)> = vec![
            (
                "oldstyle",
                Box::new(|s| {
                    s.write_all(&NBDMAGIC.to_be_bytes())?;
                    s.write_all(&OLDSTYLE_MAGIC.to_be_bytes())?;
                    s.write_all(&[0u8; 8 + 4 + 124])?;
                    drain(s)
                }),
            ),
            (
                "fixed newstyle",
                Box::new(|s| {
                    s.write_all(&NBDMAGIC.to_be_bytes())?;
                    s.write_all(&IHAVEOPT.to_be_bytes())?;
                    s.write_all(&0u16.to_be_bytes())?;
                    drain(s)
                }),
            ),
            ("closed the connection", Box::new(|_| Ok(()))),
            (
                "without describing the export",
                Box::new(|s| {
                    greet(s, FLAG_FIXED_NEWSTYLE)?;
                    read_option(s)?;
                    option_reply(s, OPT_GO, REP_ACK, &[])?;
                    drain(s)
                }),
            ),
            (
                "NBD_INFO_EXPORT has 3 bytes instead of 12",
                Box::new(|s| {
                    greet(s, FLAG_FIXED_NEWSTYLE)?;
                    read_option(s)?;
                    option_reply(s, OPT_GO, REP_INFO, &[0, 0, 7])?;
                    drain(s)
                }),
            ),
            (
                "lack NBD_FLAG_HAS_FLAGS",
                Box::new(|s| {
                    greet(s, FLAG_FIXED_NEWSTYLE)?;
                    read_option(s)?;
                    option_reply(s, OPT_GO, REP_INFO, &info_export(4096, 0))?;
                    option_reply(s, OPT_GO, REP_ACK, &[])?;
                    drain(s)
                }),
            ),
            (
                "answered option 1 while NBD_OPT_GO was pending",
                Box::new(|s| {
                    greet(s, FLAG_FIXED_NEWSTYLE)?;
                    read_option(s)?;
                    option_reply(s, OPT_EXPORT_NAME, REP_ACK, &[])?;
                    drain(s)
                }),
            ),
            (
                "no export named \"disk\" (no such export)",
                Box::new(|s| {
                    greet(s, FLAG_FIXED_NEWSTYLE)?;
                    read_option(s)?;
                    option_reply(s, OPT_GO, REP_ERR_UNKNOWN, b"no such\nexport")?;
                    drain(s)
                }),
            ),
            (
                "NBD_REP_ERR_POLICY",
                Box::new(|s| {
                    greet(s, FLAG_FIXED_NEWSTYLE)?;
                    read_option(s)?;
                    option_reply(s, OPT_GO, REP_FLAG_ERROR | 2, &[])?;
                    drain(s)
                }),
            ),
        ];
        for (expected, script) in cases {
            let err = handshake_error(script);
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn a_silent_server_times_out() {
        let (addr, server) = fake_server(|s| {
            greet(s, FLAG_FIXED_NEWSTYLE)?;
            drain(s)
        });
        let started = Instant::now();
        let err = NbdClient::connect(&addr, "disk", Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("went silent"), "{err}");
        assert!(started.elapsed() < TIMEOUT);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn an_overlong_export_name_is_refused_before_sending() {
        let (addr, server) = fake_server(|s| {
            let mut seen = Vec::new();
            s.read_to_end(&mut seen)?;
            Ok(seen.len())
        });
        let name = "x".repeat(MAX_EXPORT_NAME + 1);
        let err = NbdClient::connect(&addr, &name, TIMEOUT).unwrap_err();
        assert!(err.to_string().contains("4096-byte limit"), "{err}");
        assert_eq!(
            server.join().unwrap().unwrap(),
            0,
            "the client sent something"
        );
    }

    #[test]
    fn falls_back_to_export_name_when_go_is_unsupported() {
        let (addr, server) = fake_server(|s| {
            // No NO_ZEROES: the EXPORT_NAME answer carries its 124 bytes of padding.
            let client_flags = greet(s, FLAG_FIXED_NEWSTYLE)?;
            assert_eq!(client_flags, FLAG_C_FIXED_NEWSTYLE);
            let (option, _) = read_option(s)?;
            assert_eq!(option, OPT_GO);
            option_reply(s, OPT_GO, REP_ERR_UNSUP, &[])?;
            let (option, name) = read_option(s)?;
            assert_eq!((option, name.as_slice()), (OPT_EXPORT_NAME, &b"disk"[..]));
            s.write_all(&4096u64.to_be_bytes())?;
            s.write_all(&(TRANS_HAS_FLAGS | TRANS_READ_ONLY).to_be_bytes())?;
            s.write_all(&[0u8; EXPORT_NAME_PADDING])?;

            let read = read_request(s)?;
            assert_eq!((read.command, read.offset, read.len), (0, 100, 8));
            simple_reply(s, 0, read.cookie, b"fallback")?;
            // Neither the refused write nor the unsupported flush reaches the server.
            Ok(read_request(s)?.command)
        });
        let client = NbdClient::connect(&addr, "disk", TIMEOUT).unwrap();
        assert_eq!(client.size(), 4096);
        assert!(client.read_only());
        let mut buf = [0u8; 8];
        client.read_at(100, &mut buf).unwrap();
        assert_eq!(&buf, b"fallback");
        assert!(matches!(client.write_at(0, b"x"), Err(NbdError::ReadOnly)));
        client.flush().unwrap();
        client.disconnect();
        let last = server.join().unwrap().unwrap();
        assert_eq!(last, crate::proto::Command::Disconnect as u16);
    }
}
