//! NBD wire constants and the fixed-size headers of the transmission phase.
//!
//! Everything on the wire is big-endian. Transmission is a sequence of
//!
//! ```text
//! client: request  magic u32 | flags u16 | type u16 | cookie u64 | offset u64 | length u32 | [data]
//! server: reply    magic u32 | error u32 | cookie u64 | [data for a successful read]
//! ```
//!
//! with one request in flight at a time. The negotiation that precedes it is in `handshake`.

use crate::NbdError;

/// First 8 bytes of every newstyle greeting ("NBDMAGIC").
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second 8 bytes of a newstyle greeting, and the prefix of every option the client sends.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Second 8 bytes of an oldstyle greeting, which we do not speak.
pub(crate) const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_GO: u32 = 7;

pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_FLAG_ERROR: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

pub(crate) const TRANS_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const TRANS_READ_ONLY: u16 = 1 << 1;
pub(crate) const TRANS_SEND_FLUSH: u16 = 1 << 2;

pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub(crate) const REQUEST_LEN: usize = 28;
pub(crate) const REPLY_LEN: usize = 16;
pub(crate) const OPTION_REPLY_LEN: usize = 20;

/// Longest option reply payload we accept; real ones are a few dozen bytes.
pub(crate) const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Longest export name the protocol allows.
pub(crate) const MAX_EXPORT_NAME: usize = 4096;
/// Largest payload of one read or write; the protocol's default maximum.
pub(crate) const MAX_REQUEST: u32 = 32 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub(crate) enum Command {
    Read = 0,
    Write = 1,
    Disconnect = 2,
    Flush = 3,
}

impl Command {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disconnect => "disconnect",
            Command::Flush => "flush",
        }
    }
}

pub(crate) fn encode_request(
    command: Command,
    cookie: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_LEN] {
    let mut buf = [0u8; REQUEST_LEN];
    buf[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // Bytes 4..6 are the command flags; we send none (no FUA, no DF).
    buf[6..8].copy_from_slice(&(command as u16).to_be_bytes());
    buf[8..16].copy_from_slice(&cookie.to_be_bytes());
    buf[16..24].copy_from_slice(&offset.to_be_bytes());
    buf[24..28].copy_from_slice(&len.to_be_bytes());
    buf
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SimpleReply {
    pub(crate) error: u32,
    pub(crate) cookie: u64,
}

pub(crate) fn decode_reply(buf: &[u8; REPLY_LEN]) -> Result<SimpleReply, NbdError> {
    let magic = be_u32(&buf[0..4]);
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SimpleReply {
            error: be_u32(&buf[4..8]),
            cookie: be_u64(&buf[8..16]),
        }),
        STRUCTURED_REPLY_MAGIC => Err(NbdError::Protocol(
            "the server sent a structured reply although none were negotiated".into(),
        )),
        other => Err(NbdError::Protocol(format!(
            "reply magic is {other:#010x}, expected {SIMPLE_REPLY_MAGIC:#010x}"
        ))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OptionReply {
    pub(crate) option: u32,
    pub(crate) kind: u32,
    pub(crate) len: u32,
}

pub(crate) fn decode_option_reply(buf: &[u8; OPTION_REPLY_LEN]) -> Result<OptionReply, NbdError> {
    let magic = be_u64(&buf[0..8]);
    if magic != OPTION_REPLY_MAGIC {
        return Err(NbdError::Handshake(format!(
            "option reply magic is {magic:#018x}, expected {OPTION_REPLY_MAGIC:#018x}"
        )));
    }
    let reply = OptionReply {
        option: be_u32(&buf[8..12]),
        kind: be_u32(&buf[12..16]),
        len: be_u32(&buf[16..20]),
    };
    if reply.len > MAX_OPTION_REPLY {
        return Err(NbdError::Handshake(format!(
            "option reply of {} bytes is longer than the {MAX_OPTION_REPLY}-byte limit",
            reply.len
        )));
    }
    Ok(reply)
}

/// The protocol's name for an option reply error type, for messages.
pub(crate) fn option_error_name(kind: u32) -> &'static str {
    match kind ^ REP_FLAG_ERROR {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        _ => "an unknown option error",
    }
}

/// The errno name for an error code in a reply. NBD fixes these values on the wire
/// whatever the server's platform uses.
pub(crate) fn errno_name(code: u32) -> &'static str {
    match code {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "an unknown error",
    }
}

pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[..8]);
    u64::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_matches_the_spec() {
        let buf = encode_request(Command::Write, 0x0102_0304_0506_0708, 0x1000, 512);
        assert_eq!(&buf[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&buf[4..8], &[0, 0, 0, 1]);
        assert_eq!(be_u64(&buf[8..16]), 0x0102_0304_0506_0708);
        assert_eq!(be_u64(&buf[16..24]), 0x1000);
        assert_eq!(be_u32(&buf[24..28]), 512);
    }

    #[test]
    fn replies_with_a_wrong_magic_are_protocol_errors() {
        let mut buf = [0u8; REPLY_LEN];
        buf[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        buf[4..8].copy_from_slice(&5u32.to_be_bytes());
        buf[8..16].copy_from_slice(&9u64.to_be_bytes());
        assert_eq!(
            decode_reply(&buf).unwrap(),
            SimpleReply {
                error: 5,
                cookie: 9
            }
        );

        buf[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let err = decode_reply(&buf).unwrap_err().to_string();
        assert!(err.contains("structured reply"), "{err}");

        buf[0..4].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let err = decode_reply(&buf).unwrap_err().to_string();
        assert!(err.contains("0xdeadbeef"), "{err}");
    }

    #[test]
    fn option_replies_longer_than_the_cap_are_refused() {
        let mut buf = [0u8; OPTION_REPLY_LEN];
        buf[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        buf[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        buf[12..16].copy_from_slice(&REP_INFO.to_be_bytes());
        buf[16..20].copy_from_slice(&MAX_OPTION_REPLY.to_be_bytes());
        assert_eq!(decode_option_reply(&buf).unwrap().len, MAX_OPTION_REPLY);

        buf[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = decode_option_reply(&buf).unwrap_err();
        assert!(matches!(err, NbdError::Handshake(_)), "{err}");
    }

    #[test]
    fn errno_and_option_error_names() {
        assert_eq!(errno_name(5), "EIO");
        assert_eq!(errno_name(28), "ENOSPC");
        assert_eq!(errno_name(4242), "an unknown error");
        assert_eq!(option_error_name(REP_ERR_UNKNOWN), "NBD_REP_ERR_UNKNOWN");
        assert_eq!(option_error_name(REP_ERR_UNSUP), "NBD_REP_ERR_UNSUP");
    }
}
