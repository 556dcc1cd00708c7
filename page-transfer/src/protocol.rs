//! The Godwit migration wire protocol: framing, messages, limits and version negotiation.
//!
//! A migration uses several TCP connections between the source and the target agent, all
//! speaking this protocol with blocking I/O (the engine runs each channel on its own thread).
//! Channel 0 is the control channel; the others are data channels that carry pages, one of
//! which the engine may reserve for post-copy page requests so that bulk pages never delay a
//! fault. Everything read here is validated before use: a frame that breaks a rule is a
//! [`ProtocolError`] whose message says what was wrong, never a panic, and no length from the
//! peer is used to allocate before it was checked against its limit.
//!
//! # Frame layout
//!
//! Every message is one frame: a 16-byte little-endian header followed by the payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic     0x4D57_4447 (the bytes "GDWM")
//!      4     2  command   a Command number
//!      6     2  flags     0; any other value is rejected (reserved for later versions)
//!      8     4  length    payload length in bytes, at most Command::max_payload()
//!     12     4  checksum  CRC-32 (IEEE) of the header's first 12 bytes and the payload
//!     16   len  payload   the command's fields, little-endian, layout documented on Command
//! ```
//!
//! The checksum is checked before a payload is decoded, so a page damaged on the way (by a
//! plaintext link, a faulty NIC or middlebox, a bug) is never written into guest memory: the
//! frame is a [`ProtocolError::BadChecksum`] and the migration fails. Under TLS the AEAD
//! already guarantees this for the bytes on the wire; the checksum costs little (crc32fast
//! runs at several GB/s per core) and also covers the bytes between encoding and encryption.
//!
//! Variable-length fields (strings, blobs, lists) carry a `u32` count first. Every payload is
//! consumed exactly: trailing bytes are an error, except in [`Command::Hello`], which a later
//! version may extend (an older peer must still be able to read the version fields).
//!
//! # Message sequence
//!
//! Channel 0 carries control messages both ways, channel 1 the pages a post-copy fault waits
//! for, channels 2.. the bulk pages (a page always travels on the same bulk channel).
//!
//! ```text
//! source                                               target
//!   every connection, channel 0 (control) first:
//!   Hello{version, min_version, id, channel, channels} ->
//!                                                      <- HelloAck{version}  (or Error)
//!   control channel:
//!   Setup{mode, verify, regions, vm}                   ->
//!                                                      <- SetupAck           (or Error)
//!   pre-copy, round after round (phase p = 1, 2, ...), on every data channel:
//!   Pages{...} ... Marker{phase: p, pages}             ->
//!                                  control channel:    <- Marker{phase: p, pages received}
//!                                                         (once every channel marked p; the
//!                                                          source waits for it each round)
//!   the source VM pauses; every data channel: the last dirty pages (all memory in
//!   stop-and-copy, none in post-copy)
//!   Pages{...} ... Marker{phase: s, pages}             ->
//!   auto, switching to post-copy, control channel:
//!   Discard{runs}                                      ->  stale pages, dropped at switchover
//!   control channel:
//!   State{blob}                                        ->
//!   Switchover{postcopy, markers_phase: s, digest}     ->  after Marker{s} on every channel
//!                                                         (and, without post-copy, a digest
//!                                                         that matches what arrived):
//!                                                         restore the state, run the VM
//!                                                      <- Resumed
//!                            or, the VM not started:   <- Error{message}  (the target's copy
//!                                                         is gone; the source resumes its own)
//!   post-copy only:
//!                                  control channel:    <- PageRequest{gpa, pages}
//!   urgent channel: Pages{...}                         ->  (answers, ahead of the push)
//!   bulk channels: Pages{...} ... Marker{phase: q}     ->  background push
//!   urgent channel: Marker{phase: q}                   ->
//!   control channel: AllSent{phase: q}                 ->  (right after Resumed, with q = s,
//!                                                          without post-copy)
//!                                                      <- Done{digest, report} once every
//!                                                         page is present
//!   post-copy whose connections failed, on a new set of connections (same id):
//!   control channel: Resume                            ->  (in place of Setup)
//!                                                      <- Present{last, runs}...  (pages it has)
//!                                                      <- PageRequest{...}  (faults it waits on)
//!   the push of the pages the target lacks, AllSent, Done, as in post-copy
//!   from SetupAck on, every second, control channel: <-> Keepalive  (silence for the
//!                                                         peer timeout ends the migration)
//!   at any time, either direction:                   <-> Abort{reason}
//!   in answer to a frame the receiver cannot accept: <-> Error{message}
//! ```
//!
//! Version negotiation: the source sends its range in [`Message::Hello`]; the target answers
//! with [`negotiate`]'s choice in [`Message::HelloAck`] (or an [`Message::Error`] naming both
//! ranges), and the source checks that answer with `negotiate(version, version)`.

use std::fmt;
use std::io::{self, Read, Write};

/// The frame magic, the little-endian bytes "GDWM".
pub const MAGIC: u32 = 0x4D57_4447;
/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 16;
/// Size of a guest page in bytes.
pub const PAGE_SIZE: usize = 4096;
/// The protocol version this build speaks best.
///
/// Version 2 put a checksum in the frame header (version 1 had a reserved 0 there) and the
/// source's digest in [`Message::Switchover`].
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 2;

/// Largest payload of any frame, in bytes (a full [`Command::State`] fits).
pub const MAX_PAYLOAD: usize = 17 << 20;
/// Largest string (an error text, a digest), in bytes of UTF-8.
pub const MAX_STRING: usize = 4096;
/// Most memory regions in a [`Message::Setup`].
pub const MAX_REGIONS: usize = 64;
/// Most page entries in one [`Message::Pages`] batch.
pub const MAX_PAGES_PER_BATCH: usize = 1024;
/// Most page runs in one [`Message::Discard`].
pub const MAX_RUNS: usize = 65536;
/// Largest vCPU and device state blob in a [`Message::State`], in bytes.
pub const MAX_STATE: usize = 16 << 20;
/// Largest VM configuration blob in a [`Message::Setup`], in bytes.
pub const MAX_SETUP_BLOB: usize = 1 << 20;
/// Most TCP connections (control included) one migration may use.
pub const MAX_CHANNELS: u16 = 64;

/// The fixed part of a Hello payload; a later version may append fields after it.
const HELLO_LEN: usize = 22;
/// Room left for those appended fields.
const MAX_HELLO_PAYLOAD: usize = 256;
/// Wire size of one page entry without its data: gpa u64, kind u8, data length u32.
const PAGE_ENTRY_HEADER: usize = 13;
/// Largest Pages payload: the count and a full batch of raw pages.
const MAX_PAGES_PAYLOAD: usize = 4 + MAX_PAGES_PER_BATCH * (PAGE_ENTRY_HEADER + PAGE_SIZE);
/// Offset of the payload length field in the header.
const LEN_OFFSET: usize = 8;
/// Offset of the checksum field in the header.
const CHECKSUM_OFFSET: usize = 12;

/// Frame commands. The number is the wire value; the doc says what the payload holds.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Source to target, first frame on every connection: `version u16, min_version u16,
    /// migration_id [u8; 16], channel u16, channels u16` (22 bytes; a later version may append).
    Hello = 1,
    /// Target to source: `version u16`, the version both sides speak from now on.
    HelloAck = 2,
    /// Source to target on the control channel: `mode u8, verify u8 (0 or 1), region count
    /// u32, regions (gpa u64, size u64)..., vm blob length u32, vm blob`.
    Setup = 3,
    /// Target to source: memory is prepared, pages may flow. Empty payload.
    SetupAck = 4,
    /// Source to target on a data channel: `count u32`, then per page `gpa u64, kind u8,
    /// data length u32, data` (see [`PageKind`]).
    Pages = 5,
    /// Source to target on a data channel: `phase u32, pages u64`: everything of that phase on
    /// this channel was sent, `pages` pages in all.
    Marker = 6,
    /// Source to target on the control channel: `blob length u32, blob` (vCPU and device state).
    State = 7,
    /// Source to target on the control channel: `postcopy u8 (0 or 1), markers_phase u32,
    /// digest length u32, digest (UTF-8; empty: nothing to compare)`.
    Switchover = 8,
    /// Target to source: the VM runs on the target. Empty payload.
    Resumed = 9,
    /// Source to target: `run count u32`, then per run `gpa u64, pages u32`: stale pages.
    Discard = 10,
    /// Target to source on the request channel: `gpa u64, pages u32` (a post-copy fault).
    PageRequest = 11,
    /// Source to target on the control channel: `phase u32`: every page was sent.
    AllSent = 12,
    /// Target to source: `digest length u32, digest (UTF-8)`: all pages are present.
    Done = 13,
    /// Either direction: `reason length u32, reason (UTF-8)`: the migration is cancelled.
    Abort = 14,
    /// Either direction: `message length u32, message (UTF-8)`: a frame was not accepted.
    Error = 15,
    /// Either direction on the control channel, empty: "still here", sent every
    /// [`KEEPALIVE_INTERVAL`], so that a peer that went silent is told from a quiet one.
    Keepalive = 16,
    /// Source to target on the control channel of a new set of connections, in place of
    /// Setup: resume the post-copy migration the Hello's id names. Empty payload.
    Resume = 17,
    /// Target to source, the answer to Resume: `last u8 (0 or 1), run count u32`, then per run
    /// `gpa u64, pages u32`: pages the target has; the source sends the others. Repeated
    /// while `last` is 0.
    Present = 18,
}

/// How often each side sends [`Command::Keepalive`] on the control channel.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Command {
    /// Every command, in wire order.
    pub const ALL: [Command; 18] = [
        Command::Hello,
        Command::HelloAck,
        Command::Setup,
        Command::SetupAck,
        Command::Pages,
        Command::Marker,
        Command::State,
        Command::Switchover,
        Command::Resumed,
        Command::Discard,
        Command::PageRequest,
        Command::AllSent,
        Command::Done,
        Command::Abort,
        Command::Error,
        Command::Keepalive,
        Command::Resume,
        Command::Present,
    ];

    /// The command's name as it appears in error messages.
    pub const fn name(self) -> &'static str {
        match self {
            Command::Hello => "Hello",
            Command::HelloAck => "HelloAck",
            Command::Setup => "Setup",
            Command::SetupAck => "SetupAck",
            Command::Pages => "Pages",
            Command::Marker => "Marker",
            Command::State => "State",
            Command::Switchover => "Switchover",
            Command::Resumed => "Resumed",
            Command::Discard => "Discard",
            Command::PageRequest => "PageRequest",
            Command::AllSent => "AllSent",
            Command::Done => "Done",
            Command::Abort => "Abort",
            Command::Error => "Error",
            Command::Keepalive => "Keepalive",
            Command::Resume => "Resume",
            Command::Present => "Present",
        }
    }

    /// The largest payload a frame of this command may declare, in bytes.
    pub const fn max_payload(self) -> usize {
        match self {
            Command::Hello => MAX_HELLO_PAYLOAD,
            Command::HelloAck => 2,
            Command::Setup => 2 + 4 + MAX_REGIONS * 16 + 4 + MAX_SETUP_BLOB,
            Command::SetupAck | Command::Resumed | Command::Keepalive | Command::Resume => 0,
            Command::Present => 1 + 4 + MAX_RUNS * 12,
            Command::Pages => MAX_PAGES_PAYLOAD,
            Command::Marker | Command::PageRequest => 12,
            Command::State => 4 + MAX_STATE,
            Command::Switchover => 5 + 4 + MAX_STRING,
            Command::Discard => 4 + MAX_RUNS * 12,
            Command::AllSent => 4,
            Command::Done => 2 * (4 + MAX_STRING),
            Command::Abort | Command::Error => 4 + MAX_STRING,
        }
    }

    /// Describes the payload length field of this command for [`ProtocolError::TooLarge`].
    const fn length_field(self) -> &'static str {
        match self {
            Command::Hello => "The payload length of a Hello frame",
            Command::HelloAck => "The payload length of a HelloAck frame",
            Command::Setup => "The payload length of a Setup frame",
            Command::SetupAck => "The payload length of a SetupAck frame",
            Command::Pages => "The payload length of a Pages frame",
            Command::Marker => "The payload length of a Marker frame",
            Command::State => "The payload length of a State frame",
            Command::Switchover => "The payload length of a Switchover frame",
            Command::Resumed => "The payload length of a Resumed frame",
            Command::Discard => "The payload length of a Discard frame",
            Command::PageRequest => "The payload length of a PageRequest frame",
            Command::AllSent => "The payload length of an AllSent frame",
            Command::Done => "The payload length of a Done frame",
            Command::Abort => "The payload length of an Abort frame",
            Command::Error => "The payload length of an Error frame",
            Command::Keepalive => "The payload length of a Keepalive frame",
            Command::Resume => "The payload length of a Resume frame",
            Command::Present => "The payload length of a Present frame",
        }
    }
}

// Every command's limit fits the global one, so checking per command is enough.
const _: () = {
    assert!(HELLO_LEN <= MAX_HELLO_PAYLOAD);
    let mut i = 0;
    while i < Command::ALL.len() {
        assert!(Command::ALL[i].max_payload() <= MAX_PAYLOAD);
        i += 1;
    }
};

impl TryFrom<u16> for Command {
    type Error = ProtocolError;

    fn try_from(value: u16) -> Result<Self, ProtocolError> {
        Command::ALL
            .into_iter()
            .find(|c| *c as u16 == value)
            .ok_or(ProtocolError::UnknownCommand(value))
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How one page travels in a [`Command::Pages`] frame.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageKind {
    /// The page is all zeros; no data.
    Zero = 0,
    /// The page as is: exactly [`PAGE_SIZE`] bytes of data.
    Raw = 1,
    /// One zstd frame of 1 to [`PAGE_SIZE`] bytes that inflates to exactly [`PAGE_SIZE`] bytes.
    Zstd = 2,
}

impl PageKind {
    /// Every kind, in wire order.
    pub const ALL: [PageKind; 3] = [PageKind::Zero, PageKind::Raw, PageKind::Zstd];

    /// The kind's lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            PageKind::Zero => "zero",
            PageKind::Raw => "raw",
            PageKind::Zstd => "zstd",
        }
    }

    /// Checks that `len` bytes of data are right for this kind; the error completes a sentence
    /// that starts with the entry's position.
    fn check_data_len(self, len: usize) -> Result<(), String> {
        match self {
            PageKind::Zero if len != 0 => Err(format!(
                "claims {len} bytes of data for a zero page, which carries none"
            )),
            PageKind::Raw if len != PAGE_SIZE => Err(format!(
                "claims {len} bytes of raw data; a raw page carries exactly {PAGE_SIZE}"
            )),
            PageKind::Zstd if len == 0 || len > PAGE_SIZE => Err(format!(
                "claims {len} bytes of zstd data; a zstd page carries 1 to {PAGE_SIZE}"
            )),
            _ => Ok(()),
        }
    }
}

impl TryFrom<u8> for PageKind {
    type Error = u8;

    /// Returns the unknown wire value as the error.
    fn try_from(value: u8) -> Result<Self, u8> {
        PageKind::ALL
            .into_iter()
            .find(|k| *k as u8 == value)
            .ok_or(value)
    }
}

impl fmt::Display for PageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that can go wrong reading, writing or negotiating the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed underneath the protocol.
    #[error("{action} failed")]
    Io {
        /// What was being done, e.g. "Reading a frame from the peer".
        action: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection part-way through a frame.
    #[error("The peer closed the connection in the middle of {what}")]
    Truncated {
        /// The part of the frame, e.g. "a frame header".
        what: &'static str,
    },
    /// The peer closed the connection cleanly, between two frames.
    #[error("The peer closed the connection")]
    Closed,
    /// The frame does not start with [`MAGIC`].
    #[error(
        "The frame starts with {found:#010x} instead of the magic {MAGIC:#010x}; the peer does \
         not speak the Godwit migration protocol or the stream lost its framing"
    )]
    BadMagic {
        /// The first four bytes, read as a little-endian u32.
        found: u32,
    },
    /// The header names a command this version does not know.
    #[error("The frame has unknown command {0}")]
    UnknownCommand(u16),
    /// The header's flags field is not 0.
    #[error("The {command} frame has flags {flags:#06x}; no flags are defined yet")]
    NonZeroFlags {
        /// The frame's command.
        command: Command,
        /// The flags found.
        flags: u16,
    },
    /// The frame's checksum does not match its header and payload: it was damaged on the way.
    #[error(
        "The {command} frame of {len} bytes is damaged: its checksum is {found:#010x}, its \
         contents give {computed:#010x}"
    )]
    BadChecksum {
        /// The frame's command (as its header says).
        command: Command,
        /// The payload length.
        len: u32,
        /// The checksum in the header.
        found: u32,
        /// The checksum of what arrived.
        computed: u32,
    },
    /// A length or count is over its limit (checked before allocating anything for it).
    #[error("{what} is {len}, over the limit of {limit}")]
    TooLarge {
        /// The length or count, e.g. "The region count of a Setup message".
        what: &'static str,
        /// The value found.
        len: u64,
        /// The largest value allowed.
        limit: u64,
    },
    /// A payload breaks a rule of its layout; the text says which and where.
    #[error("{0}")]
    Malformed(String),
    /// The two sides share no protocol version.
    #[error(
        "No common protocol version: this side speaks {}..={}, the peer speaks {}..={}",
        ours.0, ours.1, theirs.0, theirs.1
    )]
    VersionMismatch {
        /// Our (oldest, newest) version.
        ours: (u16, u16),
        /// The peer's (oldest, newest) version.
        theirs: (u16, u16),
    },
    /// The peer sent a well-formed message that does not fit the current step.
    #[error("Expected {expected} but the peer sent {got}")]
    Unexpected {
        /// What the step waits for, e.g. "SetupAck".
        expected: &'static str,
        /// The command received instead.
        got: Command,
    },
    /// The peer answered with an [`Message::Error`].
    #[error("The peer reported an error: {0}")]
    Remote(String),
    /// The peer sent [`Message::Abort`].
    #[error("The peer aborted the migration: {0}")]
    RemoteAbort(String),
    /// The source sent [`Message::Abort`] with [`CANCEL_REASON`]: an operator cancelled it.
    #[error("The peer aborted the migration: it was cancelled")]
    PeerCancelled,
}

/// The reason an [`Message::Abort`] carries when the source cancels on purpose; the target
/// reads it as [`ProtocolError::PeerCancelled`] rather than as a failure.
pub const CANCEL_REASON: &str = "The migration was cancelled";

impl ProtocolError {
    /// The error for receiving `got` while waiting for `expected`: the peer's own text when
    /// `got` is an [`Message::Error`] or [`Message::Abort`], else [`ProtocolError::Unexpected`].
    pub fn unexpected(expected: &'static str, got: &Message) -> Self {
        match got {
            Message::Error { message } => ProtocolError::Remote(message.clone()),
            Message::Abort { reason } if reason == CANCEL_REASON => ProtocolError::PeerCancelled,
            Message::Abort { reason } => ProtocolError::RemoteAbort(reason.clone()),
            other => ProtocolError::Unexpected {
                expected,
                got: other.command(),
            },
        }
    }

    /// A read or write that gave up after the socket's timeout (the peer sent nothing, or
    /// took nothing, for that long).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ProtocolError::Io { source, .. }
                if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
        )
    }

    fn read_io(source: io::Error, what: &'static str) -> Self {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            ProtocolError::Truncated { what }
        } else {
            ProtocolError::Io {
                action: "Reading a frame from the peer",
                source,
            }
        }
    }

    fn write_io(source: io::Error) -> Self {
        ProtocolError::Io {
            action: "Writing a frame to the peer",
            source,
        }
    }
}

/// Picks the protocol version to speak with a peer that speaks `peer_min..=peer_version`:
/// the newer common one, if both sides still accept it.
///
/// The target calls it with the peer's Hello; the source checks the target's HelloAck with
/// `negotiate(version, version)`.
pub fn negotiate(peer_version: u16, peer_min: u16) -> Result<u16, ProtocolError> {
    let version = PROTOCOL_VERSION.min(peer_version);
    if version >= MIN_PROTOCOL_VERSION && version >= peer_min {
        Ok(version)
    } else {
        Err(ProtocolError::VersionMismatch {
            ours: (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            theirs: (peer_min, peer_version),
        })
    }
}

/// A parsed, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The frame's command.
    pub command: Command,
    /// The payload length in bytes, within `command.max_payload()`.
    pub len: u32,
    /// CRC-32 of the first 12 header bytes and the payload (see [`FrameHeader::checksum_of`]).
    pub checksum: u32,
}

impl FrameHeader {
    /// Parses and validates a header: magic, command, flags, and the payload length against
    /// the command's limit. The checksum is checked once the payload is read.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let [m0, m1, m2, m3, c0, c1, f0, f1, l0, l1, l2, l3, r0, r1, r2, r3] = *bytes;
        let magic = u32::from_le_bytes([m0, m1, m2, m3]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        let command = Command::try_from(u16::from_le_bytes([c0, c1]))?;
        let flags = u16::from_le_bytes([f0, f1]);
        if flags != 0 {
            return Err(ProtocolError::NonZeroFlags { command, flags });
        }
        let checksum = u32::from_le_bytes([r0, r1, r2, r3]);
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        check_limit(command.length_field(), len as usize, command.max_payload())?;
        Ok(FrameHeader {
            command,
            len,
            checksum,
        })
    }

    /// The header's wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&(self.command as u16).to_le_bytes());
        out[LEN_OFFSET..LEN_OFFSET + 4].copy_from_slice(&self.len.to_le_bytes());
        out[CHECKSUM_OFFSET..].copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    /// The checksum of a frame: CRC-32 over the header up to the checksum field (magic,
    /// command, flags, length) and the payload.
    pub fn checksum_of(header: &[u8], payload: &[u8]) -> u32 {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header[..CHECKSUM_OFFSET]);
        crc.update(payload);
        crc.finalize()
    }

    /// Checks `payload` (read after this header) against the checksum.
    pub fn verify(&self, payload: &[u8]) -> Result<(), ProtocolError> {
        let computed = Self::checksum_of(&self.to_bytes(), payload);
        if computed == self.checksum {
            Ok(())
        } else {
            Err(ProtocolError::BadChecksum {
                command: self.command,
                len: self.len,
                found: self.checksum,
                computed,
            })
        }
    }
}

/// Writes the length and the checksum of the frame that starts at `start` of `buf` and runs
/// to its end.
fn seal(buf: &mut [u8], start: usize) -> Result<(), ProtocolError> {
    let payload = buf.len() - start - HEADER_LEN;
    check_limit("The payload length of a frame", payload, MAX_PAYLOAD)?;
    let frame = &mut buf[start..];
    frame[LEN_OFFSET..LEN_OFFSET + 4].copy_from_slice(&(payload as u32).to_le_bytes());
    let (header, body) = frame.split_at_mut(HEADER_LEN);
    let checksum = FrameHeader::checksum_of(header, body);
    header[CHECKSUM_OFFSET..].copy_from_slice(&checksum.to_le_bytes());
    Ok(())
}

fn check_limit(what: &'static str, len: usize, limit: usize) -> Result<(), ProtocolError> {
    if len > limit {
        Err(ProtocolError::TooLarge {
            what,
            len: len as u64,
            limit: limit as u64,
        })
    } else {
        Ok(())
    }
}

/// Reads one frame header. A clean end of stream before its first byte is
/// [`ProtocolError::Closed`]; one part-way through is [`ProtocolError::Truncated`].
pub fn read_header<R: Read + ?Sized>(r: &mut R) -> Result<FrameHeader, ProtocolError> {
    let mut bytes = [0; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let rest = bytes.get_mut(filled..).unwrap_or_default();
        match r.read(rest) {
            Ok(0) if filled == 0 => return Err(ProtocolError::Closed),
            Ok(0) => {
                return Err(ProtocolError::Truncated {
                    what: "a frame header",
                })
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::read_io(e, "a frame header")),
        }
    }
    FrameHeader::parse(&bytes)
}

/// Reads one frame into `payload` (cleared first, its capacity reused) and returns its
/// command. The declared length is checked before anything is allocated for it, and the
/// buffer grows only as bytes actually arrive.
pub fn read_frame<R: Read + ?Sized>(
    r: &mut R,
    payload: &mut Vec<u8>,
) -> Result<Command, ProtocolError> {
    let header = read_header(r)?;
    payload.clear();
    let len = header.len as usize;
    if len > 0 {
        let got = r
            .take(u64::from(header.len))
            .read_to_end(payload)
            .map_err(|e| ProtocolError::read_io(e, "a frame payload"))?;
        if got != len {
            return Err(ProtocolError::Truncated {
                what: "a frame payload",
            });
        }
    }
    // A version-1 peer sends 0 there; its Hello and its Error (a refusal of our Hello) are
    // still read, so that version negotiation can say what is wrong.
    let unversioned =
        header.checksum == 0 && matches!(header.command, Command::Hello | Command::Error);
    if !unversioned {
        header.verify(payload)?;
    }
    Ok(header.command)
}

/// Reads and decodes one message.
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Message, ProtocolError> {
    let mut payload = Vec::new();
    let command = read_frame(r, &mut payload)?;
    Message::decode(command, &payload)
}

/// Encodes and writes one message.
pub fn write_message<W: Write + ?Sized>(w: &mut W, msg: &Message) -> Result<(), ProtocolError> {
    let mut frame = Vec::new();
    msg.encode(&mut frame)?;
    write_frame(w, &frame)
}

/// Writes an already encoded frame (e.g. from [`PagesWriter::finish`]).
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &[u8]) -> Result<(), ProtocolError> {
    w.write_all(frame).map_err(ProtocolError::write_io)
}

/// One page of a [`Message::Pages`] batch, owning its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageEntry {
    /// Guest physical address, page aligned.
    pub gpa: u64,
    /// How the data is encoded.
    pub kind: PageKind,
    /// The encoded page: empty for zero pages, see [`PageKind`].
    pub data: Vec<u8>,
}

/// A protocol message with its typed payload. See the module docs for the sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First frame the source sends on every connection.
    Hello {
        /// The newest version the source speaks.
        version: u16,
        /// The oldest version the source speaks.
        min_version: u16,
        /// Identifies the migration, so data connections join the right control channel.
        migration_id: [u8; 16],
        /// This connection's index; 0 is the control channel.
        channel: u16,
        /// How many connections the migration uses, 1 to [`MAX_CHANNELS`].
        channels: u16,
    },
    /// The target's answer to Hello: the version both speak.
    HelloAck {
        /// The negotiated version.
        version: u16,
    },
    /// What is migrated: mode, verification, memory layout and the VM's configuration.
    Setup {
        /// The migration mode, as the engine numbers it.
        mode: u8,
        /// Whether the target computes a digest of the received memory.
        verify: bool,
        /// Guest memory regions as (gpa, size): at least one, at most [`MAX_REGIONS`], sorted,
        /// non-overlapping, page aligned and non-empty.
        regions: Vec<(u64, u64)>,
        /// Opaque VM configuration from the agent, at most [`MAX_SETUP_BLOB`] bytes.
        vm: Vec<u8>,
    },
    /// The target accepted Setup and prepared memory.
    SetupAck,
    /// A batch of at most [`MAX_PAGES_PER_BATCH`] pages. The engine's fast paths are
    /// [`PagesWriter`] and [`PagesView`].
    Pages {
        /// The pages.
        pages: Vec<PageEntry>,
    },
    /// Everything of `phase` on this channel was sent.
    Marker {
        /// The phase (pre-copy round, switchover, post-copy push).
        phase: u32,
        /// How many pages this channel sent in that phase.
        pages: u64,
    },
    /// vCPU and device state at switchover, opaque, at most [`MAX_STATE`] bytes.
    State {
        /// The state.
        blob: Vec<u8>,
    },
    /// The source is paused; the target resumes after Marker{`markers_phase`} on every
    /// channel and the State. The target answers [`Message::Resumed`] once the VM runs; an
    /// `Error` or `Abort` instead means it did not start the VM and has discarded its copy
    /// (so the source may resume its own).
    Switchover {
        /// Whether missing pages are fetched on demand after resuming.
        postcopy: bool,
        /// The phase whose markers close the switchover.
        markers_phase: u32,
        /// Without post-copy, with verification: the digest of every page as the source sent
        /// it (so of its paused memory), which the target compares with the digest of what it
        /// received before it starts the VM. Empty otherwise.
        digest: String,
    },
    /// The VM runs on the target.
    Resumed,
    /// Still here (either direction, control channel).
    Keepalive,
    /// Resume the interrupted post-copy migration over these connections (source to target).
    Resume,
    /// Pages the target has, as (gpa, page count) runs (its answer to [`Message::Resume`]).
    Present {
        /// The last of the answer's messages.
        last: bool,
        /// At most [`MAX_RUNS`] runs, each page aligned and at least one page long.
        runs: Vec<(u64, u32)>,
    },
    /// Pages that are stale on the target, as (gpa, page count) runs: drop them so they fault.
    Discard {
        /// At most [`MAX_RUNS`] runs, each page aligned and at least one page long.
        runs: Vec<(u64, u32)>,
    },
    /// A post-copy fault: send these pages first.
    PageRequest {
        /// First page, page aligned.
        gpa: u64,
        /// Number of pages, at least 1.
        pages: u32,
    },
    /// Every page was sent; see the markers of `phase`.
    AllSent {
        /// The phase of the last markers.
        phase: u32,
    },
    /// All pages are present on the target.
    Done {
        /// Digest of the received memory; empty when verification was off.
        digest: String,
        /// The target's own statistics (post-copy fault service) as JSON; may be empty.
        report: String,
    },
    /// The migration is cancelled; the VM stays on (or returns to) the source.
    Abort {
        /// Why, at most [`MAX_STRING`] bytes.
        reason: String,
    },
    /// The receiver could not accept a frame.
    Error {
        /// The receiver's error text, at most [`MAX_STRING`] bytes.
        message: String,
    },
}

/// Cuts `text` to at most [`MAX_STRING`] bytes on a character boundary.
fn clip(mut text: String) -> String {
    if text.len() > MAX_STRING {
        let mut end = MAX_STRING;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl Message {
    /// An [`Message::Error`], its text cut to [`MAX_STRING`] bytes so it always encodes.
    pub fn error(message: impl Into<String>) -> Self {
        Message::Error {
            message: clip(message.into()),
        }
    }

    /// An [`Message::Abort`], its reason cut to [`MAX_STRING`] bytes so it always encodes.
    pub fn abort(reason: impl Into<String>) -> Self {
        Message::Abort {
            reason: clip(reason.into()),
        }
    }

    /// The message's command.
    pub fn command(&self) -> Command {
        match self {
            Message::Hello { .. } => Command::Hello,
            Message::HelloAck { .. } => Command::HelloAck,
            Message::Setup { .. } => Command::Setup,
            Message::SetupAck => Command::SetupAck,
            Message::Pages { .. } => Command::Pages,
            Message::Marker { .. } => Command::Marker,
            Message::State { .. } => Command::State,
            Message::Switchover { .. } => Command::Switchover,
            Message::Resumed => Command::Resumed,
            Message::Keepalive => Command::Keepalive,
            Message::Resume => Command::Resume,
            Message::Present { .. } => Command::Present,
            Message::Discard { .. } => Command::Discard,
            Message::PageRequest { .. } => Command::PageRequest,
            Message::AllSent { .. } => Command::AllSent,
            Message::Done { .. } => Command::Done,
            Message::Abort { .. } => Command::Abort,
            Message::Error { .. } => Command::Error,
        }
    }

    /// Appends the message as a complete frame to `buf`. The same rules as on decoding are
    /// checked first, so a message the peer would reject is an error here and `buf` is left
    /// as it was.
    pub fn encode(&self, buf: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let start = buf.len();
        buf.extend_from_slice(
            &FrameHeader {
                command: self.command(),
                len: 0,
                checksum: 0,
            }
            .to_bytes(),
        );
        if let Err(e) = self.encode_payload(buf) {
            buf.truncate(start);
            return Err(e);
        }
        seal(buf, start).inspect_err(|_| buf.truncate(start))
    }

    fn encode_payload(&self, buf: &mut Vec<u8>) -> Result<(), ProtocolError> {
        match self {
            Message::Hello {
                version,
                min_version,
                migration_id,
                channel,
                channels,
            } => {
                check_channels(*channel, *channels).map_err(ProtocolError::Malformed)?;
                put_u16(buf, *version);
                put_u16(buf, *min_version);
                buf.extend_from_slice(migration_id);
                put_u16(buf, *channel);
                put_u16(buf, *channels);
            }
            Message::HelloAck { version } => put_u16(buf, *version),
            Message::Setup {
                mode,
                verify,
                regions,
                vm,
            } => {
                check_limit(SETUP_REGIONS, regions.len(), MAX_REGIONS)?;
                check_regions(regions).map_err(ProtocolError::Malformed)?;
                check_limit(SETUP_BLOB, vm.len(), MAX_SETUP_BLOB)?;
                buf.push(*mode);
                buf.push(u8::from(*verify));
                put_u32(buf, regions.len() as u32);
                for &(gpa, size) in regions {
                    put_u64(buf, gpa);
                    put_u64(buf, size);
                }
                put_bytes(buf, vm);
            }
            Message::SetupAck | Message::Resumed | Message::Keepalive | Message::Resume => {}
            Message::Present { last, runs } => {
                buf.push(u8::from(*last));
                put_runs(buf, runs, PRESENT_RUNS, "Present")?;
            }
            Message::Pages { pages } => {
                check_limit(PAGES_COUNT, pages.len(), MAX_PAGES_PER_BATCH)?;
                put_u32(buf, pages.len() as u32);
                for (i, page) in pages.iter().enumerate() {
                    check_entry(page.gpa, page.kind, page.data.len())
                        .map_err(|e| ProtocolError::Malformed(format!("Page entry {i} {e}")))?;
                    put_entry_header(buf, page.gpa, page.kind, page.data.len());
                    buf.extend_from_slice(&page.data);
                }
            }
            Message::Marker { phase, pages } => {
                put_u32(buf, *phase);
                put_u64(buf, *pages);
            }
            Message::State { blob } => {
                check_limit(STATE_BLOB, blob.len(), MAX_STATE)?;
                put_bytes(buf, blob);
            }
            Message::Switchover {
                postcopy,
                markers_phase,
                digest,
            } => {
                buf.push(u8::from(*postcopy));
                put_u32(buf, *markers_phase);
                put_string(buf, digest, SWITCHOVER_DIGEST)?;
            }
            Message::Discard { runs } => put_runs(buf, runs, DISCARD_RUNS, "Discard")?,
            Message::PageRequest { gpa, pages } => {
                check_run(*gpa, *pages)
                    .map_err(|e| ProtocolError::Malformed(format!("The page request {e}")))?;
                put_u64(buf, *gpa);
                put_u32(buf, *pages);
            }
            Message::AllSent { phase } => put_u32(buf, *phase),
            Message::Done { digest, report } => {
                put_string(buf, digest, DONE_DIGEST)?;
                put_string(buf, report, DONE_REPORT)?;
            }
            Message::Abort { reason } => put_string(buf, reason, ABORT_REASON)?,
            Message::Error { message } => put_string(buf, message, ERROR_MESSAGE)?,
        }
        Ok(())
    }

    /// Decodes and validates the payload of a frame of `command`.
    pub fn decode(command: Command, payload: &[u8]) -> Result<Message, ProtocolError> {
        let mut r = PayloadReader::new(command, payload);
        let msg = match command {
            Command::Hello => {
                let version = r.u16()?;
                let min_version = r.u16()?;
                let migration_id = r.array::<16>()?;
                let channel = r.u16()?;
                let channels = r.u16()?;
                check_channels(channel, channels)
                    .map_err(|e| ProtocolError::Malformed(format!("The Hello {e}")))?;
                // Fields a later version appended are not ours to read.
                return Ok(Message::Hello {
                    version,
                    min_version,
                    migration_id,
                    channel,
                    channels,
                });
            }
            Command::HelloAck => Message::HelloAck { version: r.u16()? },
            Command::Setup => {
                let mode = r.u8()?;
                let verify = r.bool("verify")?;
                let count = r.u32()? as usize;
                check_limit(SETUP_REGIONS, count, MAX_REGIONS)?;
                r.expect_items(count, 16, "regions")?;
                let mut regions = Vec::with_capacity(count);
                for _ in 0..count {
                    regions.push((r.u64()?, r.u64()?));
                }
                check_regions(&regions)
                    .map_err(|e| ProtocolError::Malformed(format!("The Setup {e}")))?;
                let vm = r.bytes(SETUP_BLOB, MAX_SETUP_BLOB)?.to_vec();
                Message::Setup {
                    mode,
                    verify,
                    regions,
                    vm,
                }
            }
            Command::SetupAck => Message::SetupAck,
            Command::Pages => {
                let view = PagesView::parse(payload)?;
                return Ok(Message::Pages {
                    pages: view
                        .map(|(gpa, kind, data)| PageEntry {
                            gpa,
                            kind,
                            data: data.to_vec(),
                        })
                        .collect(),
                });
            }
            Command::Marker => Message::Marker {
                phase: r.u32()?,
                pages: r.u64()?,
            },
            Command::State => Message::State {
                blob: r.bytes(STATE_BLOB, MAX_STATE)?.to_vec(),
            },
            Command::Switchover => Message::Switchover {
                postcopy: r.bool("postcopy")?,
                markers_phase: r.u32()?,
                digest: r.string(SWITCHOVER_DIGEST)?,
            },
            Command::Resumed => Message::Resumed,
            Command::Keepalive => Message::Keepalive,
            Command::Resume => Message::Resume,
            Command::Present => Message::Present {
                last: r.bool("last")?,
                runs: r.runs(PRESENT_RUNS, "Present")?,
            },
            Command::Discard => Message::Discard {
                runs: r.runs(DISCARD_RUNS, "Discard")?,
            },
            Command::PageRequest => {
                let (gpa, pages) = (r.u64()?, r.u32()?);
                check_run(gpa, pages)
                    .map_err(|e| ProtocolError::Malformed(format!("The PageRequest {e}")))?;
                Message::PageRequest { gpa, pages }
            }
            Command::AllSent => Message::AllSent { phase: r.u32()? },
            Command::Done => Message::Done {
                digest: r.string(DONE_DIGEST)?,
                report: r.string(DONE_REPORT)?,
            },
            Command::Abort => Message::Abort {
                reason: r.string(ABORT_REASON)?,
            },
            Command::Error => Message::Error {
                message: r.string(ERROR_MESSAGE)?,
            },
        };
        r.finish()?;
        Ok(msg)
    }
}

const SETUP_REGIONS: &str = "The region count of a Setup message";
const SETUP_BLOB: &str = "The VM blob length of a Setup message";
const PAGES_COUNT: &str = "The page count of a Pages batch";
const STATE_BLOB: &str = "The blob length of a State message";
const DISCARD_RUNS: &str = "The run count of a Discard message";
const PRESENT_RUNS: &str = "The run count of a Present message";

/// Appends `runs` (count first), each checked as a page run of a `what` message.
fn put_runs(
    buf: &mut Vec<u8>,
    runs: &[(u64, u32)],
    field: &'static str,
    what: &str,
) -> Result<(), ProtocolError> {
    check_limit(field, runs.len(), MAX_RUNS)?;
    put_u32(buf, runs.len() as u32);
    for (i, &(gpa, pages)) in runs.iter().enumerate() {
        check_run(gpa, pages)
            .map_err(|e| ProtocolError::Malformed(format!("{what} run {i} {e}")))?;
        put_u64(buf, gpa);
        put_u32(buf, pages);
    }
    Ok(())
}
const DONE_DIGEST: &str = "The digest length of a Done message";
const SWITCHOVER_DIGEST: &str = "The digest length of a Switchover message";
const DONE_REPORT: &str = "The report length of a Done message";
const ABORT_REASON: &str = "The reason length of an Abort message";
const ERROR_MESSAGE: &str = "The text length of an Error message";

fn check_channels(channel: u16, channels: u16) -> Result<(), String> {
    if channels == 0 || channels > MAX_CHANNELS {
        Err(format!(
            "announces {channels} channels; a migration uses 1 to {MAX_CHANNELS}"
        ))
    } else if channel >= channels {
        Err(format!(
            "names channel {channel} of {channels}; channels are numbered from 0"
        ))
    } else {
        Ok(())
    }
}

fn check_regions(regions: &[(u64, u64)]) -> Result<(), String> {
    if regions.is_empty() {
        return Err("lists no memory regions".to_string());
    }
    let mut prev_end = 0u64;
    for (i, &(gpa, size)) in regions.iter().enumerate() {
        if gpa % PAGE_SIZE as u64 != 0 || size % PAGE_SIZE as u64 != 0 {
            return Err(format!(
                "region {i} ({gpa:#x}, {size:#x} bytes) is not page aligned"
            ));
        }
        if size == 0 {
            return Err(format!("region {i} at {gpa:#x} is empty"));
        }
        let Some(end) = gpa.checked_add(size) else {
            return Err(format!(
                "region {i} ({gpa:#x}, {size:#x} bytes) extends past the end of the address space"
            ));
        };
        if i > 0 && gpa < prev_end {
            return Err(format!(
                "region {i} at {gpa:#x} overlaps or precedes the region before it, which ends at \
                 {prev_end:#x}; regions must be sorted and disjoint"
            ));
        }
        prev_end = end;
    }
    Ok(())
}

fn check_run(gpa: u64, pages: u32) -> Result<(), String> {
    if gpa % PAGE_SIZE as u64 != 0 {
        return Err(format!("starts at unaligned gpa {gpa:#x}"));
    }
    if pages == 0 {
        return Err(format!("at {gpa:#x} covers no pages"));
    }
    if gpa
        .checked_add(u64::from(pages) * PAGE_SIZE as u64)
        .is_none()
    {
        return Err(format!(
            "at {gpa:#x} of {pages} pages extends past the end of the address space"
        ));
    }
    Ok(())
}

/// Checks one page entry's fields; the error completes a sentence naming the entry.
fn check_entry(gpa: u64, kind: PageKind, len: usize) -> Result<(), String> {
    if gpa % PAGE_SIZE as u64 != 0 {
        return Err(format!("has unaligned gpa {gpa:#x}"));
    }
    if gpa.checked_add(PAGE_SIZE as u64).is_none() {
        return Err(format!(
            "has gpa {gpa:#x}, whose page extends past the end of the address space"
        ));
    }
    kind.check_data_len(len)
}

fn put_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

/// Writes a length-prefixed blob whose length the caller checked against a limit below 4 GiB.
fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(buf, bytes.len() as u32);
    buf.extend_from_slice(bytes);
}

fn put_string(buf: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), ProtocolError> {
    check_limit(what, s.len(), MAX_STRING)?;
    put_bytes(buf, s.as_bytes());
    Ok(())
}

fn put_entry_header(buf: &mut Vec<u8>, gpa: u64, kind: PageKind, len: usize) {
    put_u64(buf, gpa);
    buf.push(kind as u8);
    put_u32(buf, len as u32);
}

/// A bounds-checked cursor over one payload.
struct PayloadReader<'a> {
    buf: &'a [u8],
    pos: usize,
    command: Command,
}

impl<'a> PayloadReader<'a> {
    fn new(command: Command, buf: &'a [u8]) -> Self {
        PayloadReader {
            buf,
            pos: 0,
            command,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let bytes = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or_else(|| {
                ProtocolError::Malformed(format!(
                    "The {} payload of {} bytes ends before the {n} bytes expected at offset {}",
                    self.command,
                    self.buf.len(),
                    self.pos
                ))
            })?;
        self.pos += n;
        Ok(bytes)
    }

    /// Checks that `count` items of `size` bytes can follow, before allocating for them.
    fn expect_items(&self, count: usize, size: usize, items: &str) -> Result<(), ProtocolError> {
        let left = self.buf.len().saturating_sub(self.pos);
        if count.checked_mul(size).is_some_and(|need| need <= left) {
            Ok(())
        } else {
            Err(ProtocolError::Malformed(format!(
                "The {} payload announces {count} {items} of {size} bytes at offset {} but only \
                 {left} bytes follow",
                self.command, self.pos
            )))
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let bytes = self.take(N)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bool(&mut self, field: &str) -> Result<bool, ProtocolError> {
        let at = self.pos;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(ProtocolError::Malformed(format!(
                "The {} field {field} at offset {at} is {v}; a flag is 0 or 1",
                self.command
            ))),
        }
    }

    /// A count, then that many page runs (`gpa u64, pages u32`) of a `what` message.
    fn runs(&mut self, field: &'static str, what: &str) -> Result<Vec<(u64, u32)>, ProtocolError> {
        let count = self.u32()? as usize;
        check_limit(field, count, MAX_RUNS)?;
        self.expect_items(count, 12, "runs")?;
        let mut runs = Vec::with_capacity(count);
        for i in 0..count {
            let (gpa, pages) = (self.u64()?, self.u32()?);
            check_run(gpa, pages)
                .map_err(|e| ProtocolError::Malformed(format!("Run {i} of the {what} {e}")))?;
            runs.push((gpa, pages));
        }
        Ok(runs)
    }

    fn bytes(&mut self, what: &'static str, limit: usize) -> Result<&'a [u8], ProtocolError> {
        let len = self.u32()? as usize;
        check_limit(what, len, limit)?;
        self.take(len)
    }

    fn string(&mut self, what: &'static str) -> Result<String, ProtocolError> {
        let at = self.pos;
        let bytes = self.bytes(what, MAX_STRING)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(ProtocolError::Malformed(format!(
                "The {} text at offset {at} is not UTF-8: {e}",
                self.command
            ))),
        }
    }

    fn finish(self) -> Result<(), ProtocolError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed(format!(
                "The {} payload has {} bytes after its last field, which ends at offset {}",
                self.command,
                self.buf.len() - self.pos,
                self.pos
            )))
        }
    }
}

/// Builds [`Command::Pages`] frames in a reusable buffer, without copying pages twice.
///
/// ```
/// use page_transfer::protocol::{PageKind, PagesWriter, PAGE_SIZE};
/// let mut w = PagesWriter::new();
/// w.push(0x1000, PageKind::Zero, &[]).unwrap();
/// w.push(0x2000, PageKind::Raw, &[7; PAGE_SIZE]).unwrap();
/// let frame: &[u8] = w.finish(); // header and payload, ready to write
/// # assert_eq!(frame.len(), 16 + 4 + 13 + 13 + PAGE_SIZE);
/// w.clear(); // the next batch reuses the allocation
/// ```
#[derive(Clone)]
pub struct PagesWriter {
    buf: Vec<u8>,
    count: u32,
}

impl fmt::Debug for PagesWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagesWriter")
            .field("pages", &self.count)
            .field("frame_len", &self.buf.len())
            .finish()
    }
}

impl Default for PagesWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl PagesWriter {
    /// An empty batch.
    pub fn new() -> Self {
        let mut w = PagesWriter {
            buf: Vec::new(),
            count: 0,
        };
        w.clear();
        w
    }

    /// Empties the batch, keeping the buffer's allocation.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(
            &FrameHeader {
                command: Command::Pages,
                len: 0,
                checksum: 0,
            }
            .to_bytes(),
        );
        put_u32(&mut self.buf, 0);
        self.count = 0;
    }

    /// Number of pages in the batch.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch holds no pages.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the batch holds [`MAX_PAGES_PER_BATCH`] pages and must be sent.
    pub fn is_full(&self) -> bool {
        self.len() >= MAX_PAGES_PER_BATCH
    }

    /// Size of the frame so far (header included), in bytes.
    pub fn frame_len(&self) -> usize {
        self.buf.len()
    }

    /// Appends one page; `data` must fit `kind` (see [`PageKind`]) and `gpa` be page aligned.
    /// On error the batch is unchanged.
    pub fn push(&mut self, gpa: u64, kind: PageKind, data: &[u8]) -> Result<(), ProtocolError> {
        if self.is_full() {
            return Err(ProtocolError::TooLarge {
                what: PAGES_COUNT,
                len: self.len() as u64 + 1,
                limit: MAX_PAGES_PER_BATCH as u64,
            });
        }
        check_entry(gpa, kind, data.len())
            .map_err(|e| ProtocolError::Malformed(format!("The page entry at gpa {gpa:#x} {e}")))?;
        put_entry_header(&mut self.buf, gpa, kind, data.len());
        self.buf.extend_from_slice(data);
        self.count += 1;
        Ok(())
    }

    /// Completes the header and count and returns the whole frame. More pages may still be
    /// pushed afterwards (call `finish` again); [`PagesWriter::clear`] starts a new batch.
    pub fn finish(&mut self) -> &[u8] {
        let count_at = HEADER_LEN;
        self.buf[count_at..count_at + 4].copy_from_slice(&self.count.to_le_bytes());
        // A full batch is far below MAX_PAYLOAD, so sealing cannot fail.
        let _ = seal(&mut self.buf, 0);
        &self.buf
    }
}

/// A validated view of a received [`Command::Pages`] payload, iterating its entries as
/// `(gpa, kind, data)` without allocating.
///
/// [`PagesView::parse`] checks the whole payload first (count, every entry, no trailing bytes),
/// so iteration cannot fail.
#[derive(Clone)]
pub struct PagesView<'a> {
    rest: &'a [u8],
    remaining: u32,
}

impl fmt::Debug for PagesView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagesView")
            .field("remaining", &self.remaining)
            .field("bytes", &self.rest.len())
            .finish()
    }
}

impl<'a> PagesView<'a> {
    /// Validates a Pages payload (the bytes after the frame header).
    pub fn parse(payload: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = PayloadReader::new(Command::Pages, payload);
        let count = r.u32()?;
        check_limit(PAGES_COUNT, count as usize, MAX_PAGES_PER_BATCH)?;
        let entries = r.buf.get(r.pos..).unwrap_or_default();
        let mut check = PagesView {
            rest: entries,
            remaining: count,
        };
        while check.remaining > 0 {
            let offset = payload.len() - check.rest.len();
            check.next_entry().map_err(|problem| {
                ProtocolError::Malformed(format!("The page entry at offset {offset} {problem}"))
            })?;
        }
        if !check.rest.is_empty() {
            return Err(ProtocolError::Malformed(format!(
                "The Pages payload has {} bytes after its {count} entries",
                check.rest.len()
            )));
        }
        Ok(PagesView {
            rest: entries,
            remaining: count,
        })
    }

    /// Number of entries not yet iterated.
    pub fn remaining(&self) -> usize {
        self.remaining as usize
    }

    fn next_entry(&mut self) -> Result<(u64, PageKind, &'a [u8]), String> {
        let Some((head, rest)) = self.rest.split_first_chunk::<PAGE_ENTRY_HEADER>() else {
            return Err(format!(
                "is cut short: {} bytes left where a {PAGE_ENTRY_HEADER}-byte entry header was \
                 expected",
                self.rest.len()
            ));
        };
        let [g0, g1, g2, g3, g4, g5, g6, g7, k, l0, l1, l2, l3] = *head;
        let gpa = u64::from_le_bytes([g0, g1, g2, g3, g4, g5, g6, g7]);
        let kind = PageKind::try_from(k).map_err(|k| format!("has unknown page kind {k}"))?;
        let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
        check_entry(gpa, kind, len)?;
        let (Some(data), Some(rest)) = (rest.get(..len), rest.get(len..)) else {
            return Err(format!(
                "claims {len} bytes of data but only {} remain",
                rest.len()
            ));
        };
        self.rest = rest;
        self.remaining -= 1;
        Ok((gpa, kind, data))
    }
}

impl<'a> Iterator for PagesView<'a> {
    type Item = (u64, PageKind, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        // parse() validated every entry, so this cannot fail; stop rather than panic if it did.
        self.next_entry().ok()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining(), Some(self.remaining()))
    }
}

impl ExactSizeIterator for PagesView<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::XorShift;

    /// One message of every command, with non-trivial fields.
    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                version: 1,
                min_version: 1,
                migration_id: *b"0123456789abcdef",
                channel: 3,
                channels: 4,
            },
            Message::HelloAck { version: 1 },
            Message::Setup {
                mode: 2,
                verify: true,
                regions: vec![(0, 0x10_0000), (0x20_0000, 0x1000), (1 << 32, 1 << 30)],
                vm: b"{\"vcpus\":2}".to_vec(),
            },
            Message::SetupAck,
            Message::Pages {
                pages: vec![
                    PageEntry {
                        gpa: 0x1000,
                        kind: PageKind::Zero,
                        data: vec![],
                    },
                    PageEntry {
                        gpa: 0x2000,
                        kind: PageKind::Raw,
                        data: (0..PAGE_SIZE).map(|i| i as u8).collect(),
                    },
                    PageEntry {
                        gpa: 0xFFFF_F000,
                        kind: PageKind::Zstd,
                        data: vec![0x28, 0xB5, 0x2F, 0xFD, 1, 2, 3],
                    },
                ],
            },
            Message::Marker {
                phase: 7,
                pages: 1 << 40,
            },
            Message::State {
                blob: vec![0xAB; 10_000],
            },
            Message::Switchover {
                postcopy: true,
                markers_phase: 9,
                digest: String::new(),
            },
            Message::Switchover {
                postcopy: false,
                markers_phase: 3,
                digest: "xxh3-blake3:00ff".to_string(),
            },
            Message::Resumed,
            Message::Keepalive,
            Message::Resume,
            Message::Present {
                last: false,
                runs: vec![(0, 16), (0x10_0000, 1)],
            },
            Message::Present {
                last: true,
                runs: vec![],
            },
            Message::Discard {
                runs: vec![(0x3000, 1), (0x10_0000, 512)],
            },
            Message::PageRequest {
                gpa: 0x7000,
                pages: 2,
            },
            Message::AllSent { phase: 11 },
            Message::Done {
                digest: "blake3:00ff".to_string(),
                report: "{\"faults\":3}".to_string(),
            },
            Message::Abort {
                reason: "Operator cancelled — über".to_string(),
            },
            Message::Error {
                message: String::new(),
            },
        ]
    }

    fn frame(msg: &Message) -> Vec<u8> {
        let mut buf = Vec::new();
        msg.encode(&mut buf).expect("encodes");
        buf
    }

    fn read(bytes: &[u8]) -> Result<Message, ProtocolError> {
        read_message(&mut &bytes[..])
    }

    /// A frame for `command` with a hand-made payload.
    fn raw_frame(command: Command, payload: &[u8]) -> Vec<u8> {
        let mut buf = FrameHeader {
            command,
            len: 0,
            checksum: 0,
        }
        .to_bytes()
        .to_vec();
        buf.extend_from_slice(payload);
        seal(&mut buf, 0).unwrap();
        buf
    }

    /// `f` with its checksum made right again for the payload its header declares (as much
    /// of it as is there), so a hand-patched frame reaches the decoders.
    fn resealed(mut f: Vec<u8>) -> Vec<u8> {
        if f.len() >= HEADER_LEN {
            let len = u32::from_le_bytes(f[LEN_OFFSET..LEN_OFFSET + 4].try_into().unwrap());
            let end = (HEADER_LEN + len as usize).min(f.len());
            let checksum = FrameHeader::checksum_of(&f[..HEADER_LEN], &f[HEADER_LEN..end]);
            f[CHECKSUM_OFFSET..HEADER_LEN].copy_from_slice(&checksum.to_le_bytes());
        }
        f
    }

    fn malformed(result: Result<Message, ProtocolError>) -> String {
        match result {
            Err(ProtocolError::Malformed(text)) => text,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn command_numbers_are_fixed() {
        for (i, c) in Command::ALL.iter().enumerate() {
            assert_eq!(*c as u16, i as u16 + 1, "{c}");
            assert_eq!(Command::try_from(*c as u16).unwrap(), *c);
        }
        assert_eq!(Command::Keepalive as u16, 16);
        assert_eq!(Command::Present as u16, 18);
        assert_eq!(MAGIC.to_le_bytes(), *b"GDWM");
        for kind in PageKind::ALL {
            assert_eq!(PageKind::try_from(kind as u8), Ok(kind));
        }
        assert_eq!(PageKind::try_from(3), Err(3));
    }

    #[test]
    fn every_message_round_trips() {
        let samples = samples();
        for c in Command::ALL {
            assert!(samples.iter().any(|m| m.command() == c), "no sample of {c}");
        }
        let mut stream = Vec::new();
        for msg in &samples {
            let bytes = frame(msg);
            assert_eq!(read(&bytes).unwrap(), *msg);
            write_message(&mut stream, msg).unwrap();
        }
        // Back to back on one stream, through one reused payload buffer.
        let mut r = &stream[..];
        let mut payload = Vec::new();
        for msg in &samples {
            let command = read_frame(&mut r, &mut payload).unwrap();
            assert_eq!(Message::decode(command, &payload).unwrap(), *msg);
        }
        assert!(matches!(read_message(&mut r), Err(ProtocolError::Closed)));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for msg in samples() {
            let bytes = frame(&msg);
            for cut in 0..bytes.len() {
                let err = read(&bytes[..cut]).unwrap_err();
                match cut {
                    0 => assert!(matches!(err, ProtocolError::Closed)),
                    1..HEADER_LEN => assert_eq!(
                        err.to_string(),
                        "The peer closed the connection in the middle of a frame header"
                    ),
                    _ => assert!(
                        matches!(
                            err,
                            ProtocolError::Truncated {
                                what: "a frame payload"
                            }
                        ),
                        "{msg:?} cut at {cut}: {err}"
                    ),
                }
            }
            // A frame whose header agrees with a short payload is malformed instead.
            let payload = &bytes[HEADER_LEN..];
            for cut in 0..payload.len() {
                let short = raw_frame(msg.command(), &payload[..cut]);
                assert!(
                    matches!(read(&short), Err(ProtocolError::Malformed(_))),
                    "{} payload cut at {cut}",
                    msg.command()
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected_except_after_hello() {
        for msg in samples() {
            let mut payload = frame(&msg)[HEADER_LEN..].to_vec();
            payload.push(0);
            let result = read(&raw_frame(msg.command(), &payload));
            if msg.command() == Command::Hello {
                // A later version may append to Hello; the fields we know still read.
                assert_eq!(result.unwrap(), msg);
            } else if msg.command().max_payload() < payload.len() {
                assert!(matches!(result, Err(ProtocolError::TooLarge { .. })));
            } else {
                assert!(malformed(result).contains("after"), "{}", msg.command());
            }
        }
    }

    #[test]
    fn bad_headers_are_rejected() {
        let good = frame(&Message::Marker { phase: 1, pages: 2 });
        let patched = |at: usize, bytes: &[u8]| {
            let mut f = good.clone();
            f[at..at + bytes.len()].copy_from_slice(bytes);
            read(&f).unwrap_err()
        };
        let err = patched(0, b"HTTP");
        assert!(matches!(
            err,
            ProtocolError::BadMagic { found: 0x5054_5448 }
        ));
        assert!(err
            .to_string()
            .starts_with("The frame starts with 0x50545448"));
        for cmd in [0u16, 19, 0xFFFF] {
            assert!(matches!(
                patched(4, &cmd.to_le_bytes()),
                ProtocolError::UnknownCommand(c) if c == cmd
            ));
        }
        assert!(matches!(
            patched(6, &[0, 0x80]),
            ProtocolError::NonZeroFlags {
                command: Command::Marker,
                flags: 0x8000
            }
        ));
        let err = patched(15, &[1]);
        assert!(
            matches!(
                err,
                ProtocolError::BadChecksum {
                    command: Command::Marker,
                    len: 12,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err
            .to_string()
            .starts_with("The Marker frame of 12 bytes is damaged"));
        // Every single-bit flip in the header and in the payload is caught.
        for bit in 0..good.len() * 8 {
            let mut f = good.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            let result = read(&f);
            assert!(result.is_err(), "bit {bit}: {result:?}");
        }
    }

    #[test]
    fn a_version_1_hello_is_read_so_negotiation_can_refuse_it() {
        let hello = Message::Hello {
            version: 1,
            min_version: 1,
            migration_id: [3; 16],
            channel: 0,
            channels: 3,
        };
        let mut f = frame(&hello);
        f[CHECKSUM_OFFSET..HEADER_LEN].fill(0);
        assert_eq!(read(&f).unwrap(), hello);
        let err = negotiate(1, 1).unwrap_err().to_string();
        assert!(err.contains("the peer speaks 1..=1"), "{err}");
        // Any other frame needs its checksum.
        let mut f = frame(&Message::SetupAck);
        f[CHECKSUM_OFFSET..HEADER_LEN].fill(0);
        assert!(matches!(read(&f), Err(ProtocolError::BadChecksum { .. })));
    }

    #[test]
    fn a_damaged_page_frame_is_rejected_before_its_pages_are_seen() {
        let mut w = PagesWriter::new();
        w.push(0x1000, PageKind::Raw, &[7; PAGE_SIZE]).unwrap();
        w.push(0x2000, PageKind::Zero, &[]).unwrap();
        let good = w.finish().to_vec();
        let mut payload = Vec::new();
        assert_eq!(
            read_frame(&mut &good[..], &mut payload).unwrap(),
            Command::Pages
        );
        for at in [HEADER_LEN + 4, HEADER_LEN + 4 + 13 + 100, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            let err = read_frame(&mut &bad[..], &mut payload).unwrap_err();
            assert!(
                matches!(err, ProtocolError::BadChecksum { .. }),
                "byte {at}: {err}"
            );
        }
    }

    /// A reader that serves a header and fails the test if anything reads further.
    struct HeaderOnly(Vec<u8>, usize);

    impl Read for HeaderOnly {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let rest = &self.0[self.1..];
            assert!(!rest.is_empty(), "the payload of a rejected frame was read");
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            self.1 += n;
            Ok(n)
        }
    }

    #[test]
    fn oversize_lengths_are_rejected_before_reading_or_allocating() {
        for command in Command::ALL {
            for len in [command.max_payload() as u32 + 1, u32::MAX] {
                let header = FrameHeader {
                    command,
                    len,
                    checksum: 0,
                }
                .to_bytes();
                let mut payload = Vec::new();
                let err = read_frame(&mut HeaderOnly(header.to_vec(), 0), &mut payload)
                    .expect_err("oversize");
                match err {
                    ProtocolError::TooLarge {
                        len: got, limit, ..
                    } => {
                        assert_eq!((got, limit), (len as u64, command.max_payload() as u64));
                    }
                    other => panic!("{command}: {other}"),
                }
                assert_eq!(
                    payload.capacity(),
                    0,
                    "{command}: allocated for the payload"
                );
            }
        }
        let header = FrameHeader {
            command: Command::Pages,
            len: u32::MAX,
            checksum: 0,
        };
        assert_eq!(
            FrameHeader::parse(&header.to_bytes())
                .unwrap_err()
                .to_string(),
            "The payload length of a Pages frame is 4294967295, over the limit of 4207620"
        );
        // A frame that claims the full State limit but sends little allocates only what came.
        let mut f = FrameHeader {
            command: Command::State,
            len: Command::State.max_payload() as u32,
            checksum: 0,
        }
        .to_bytes()
        .to_vec();
        f.extend_from_slice(&[0; 100]);
        let mut payload = Vec::new();
        let err = read_frame(&mut &f[..], &mut payload).unwrap_err();
        assert!(matches!(err, ProtocolError::Truncated { .. }));
        assert!(payload.capacity() < 1 << 20, "{}", payload.capacity());
    }

    #[test]
    fn inner_counts_are_checked_before_allocating() {
        let mut payload = vec![0, 0];
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = read(&raw_frame(Command::Setup, &payload)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "The region count of a Setup message is 4294967295, over the limit of 64"
        );
        let err = read(&raw_frame(Command::Discard, &65536u32.to_le_bytes())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "The Discard payload announces 65536 runs of 12 bytes at offset 4 but only 0 bytes \
             follow"
        );
        let err = read(&raw_frame(Command::Pages, &1025u32.to_le_bytes())).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { len: 1025, .. }));
        let mut state = (MAX_STATE as u32 + 1).to_le_bytes().to_vec();
        state.extend_from_slice(&[0; 8]);
        assert!(matches!(
            read(&raw_frame(Command::State, &state)),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut text = 4097u32.to_le_bytes().to_vec();
        text.extend_from_slice(&[b'a'; 10]);
        assert!(matches!(
            read(&raw_frame(Command::Error, &text)),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn fuzzed_frames_never_panic() {
        let mut rng = XorShift(0x5EED_0F60_D717);
        let corpus: Vec<Vec<u8>> = samples().iter().map(frame).collect();
        let mut payload = Vec::new();
        let mut accepted = 0;
        for i in 0..50_000 {
            let mut f = if i % 10 == 0 {
                // Pure noise, sometimes behind a valid magic so it reaches the decoders.
                let mut f: Vec<u8> = (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect();
                if i % 20 == 0 && f.len() >= 16 {
                    f[..4].copy_from_slice(&MAGIC.to_le_bytes());
                    f[6..8].fill(0);
                    f[12..16].fill(0);
                }
                f
            } else {
                corpus[rng.below(corpus.len())].clone()
            };
            for _ in 0..1 + rng.below(4) {
                if f.is_empty() {
                    break;
                }
                let at = rng.below(f.len());
                match rng.below(6) {
                    0 => f[at] ^= 1 << rng.below(8),
                    1 => f[at] = rng.next_u64() as u8,
                    2 => f.truncate(at),
                    3 => f.insert(at, rng.next_u64() as u8),
                    4 => {
                        // A random length field, where lengths live.
                        let len = (rng.next_u64() as u32).to_le_bytes();
                        let at = at.min(f.len().saturating_sub(4));
                        let end = (at + 4).min(f.len());
                        f[at..end].copy_from_slice(&len[..end - at]);
                    }
                    _ => {
                        f.remove(at);
                    }
                }
            }
            // Mostly with a checksum that fits, so the mutations reach the decoders.
            if rng.below(4) != 0 {
                f = resealed(f);
            }
            if let Ok(command) = read_frame(&mut &f[..], &mut payload) {
                if let Ok(msg) = Message::decode(command, &payload) {
                    accepted += 1;
                    // Whatever decodes must encode back to the same meaning.
                    assert_eq!(read(&frame(&msg)).unwrap(), msg);
                }
                if let Ok(view) = PagesView::parse(&payload) {
                    assert_eq!(view.len(), view.count());
                }
            }
        }
        assert!(accepted > 1000, "only {accepted} mutated frames decoded");
    }

    fn counter_page(seed: u64) -> Vec<u8> {
        (0..PAGE_SIZE as u64 / 8)
            .flat_map(|w| (seed + w).to_le_bytes())
            .collect()
    }

    #[test]
    fn pages_writer_and_view_round_trip() {
        let entries: Vec<(u64, PageKind, Vec<u8>)> = (0..MAX_PAGES_PER_BATCH as u64)
            .map(|i| {
                let gpa = i * 3 * PAGE_SIZE as u64;
                match i % 3 {
                    0 => (gpa, PageKind::Zero, vec![]),
                    1 => (gpa, PageKind::Raw, counter_page(i)),
                    _ => (
                        gpa,
                        PageKind::Zstd,
                        vec![i as u8; 1 + i as usize % PAGE_SIZE],
                    ),
                }
            })
            .collect();
        let mut w = PagesWriter::new();
        for round in 0..2 {
            w.clear();
            assert!(w.is_empty());
            for (gpa, kind, data) in &entries {
                w.push(*gpa, *kind, data).unwrap();
            }
            assert!(w.is_full());
            assert_eq!(w.len(), MAX_PAGES_PER_BATCH);
            let err = w.push(0, PageKind::Zero, &[]).unwrap_err();
            assert!(
                matches!(err, ProtocolError::TooLarge { len: 1025, .. }),
                "{err}"
            );
            let f = w.finish().to_vec();
            assert_eq!(f.len(), w.frame_len());
            let mut payload = Vec::new();
            assert_eq!(
                read_frame(&mut &f[..], &mut payload).unwrap(),
                Command::Pages
            );
            let view = PagesView::parse(&payload).unwrap();
            assert_eq!(view.len(), entries.len(), "round {round}");
            for (got, want) in view.zip(&entries) {
                assert_eq!((got.0, got.1, got.2), (want.0, want.1, &want.2[..]));
            }
            // The owned path reads the same frame.
            let Message::Pages { pages } = read(&f).unwrap() else {
                panic!("not Pages");
            };
            assert_eq!(pages.len(), entries.len());
            assert_eq!(pages[1].data, entries[1].2);
        }
        // An empty batch is a valid frame too.
        w.clear();
        assert_eq!(read(w.finish()).unwrap(), Message::Pages { pages: vec![] });
        // finish() may be called again after more pushes.
        w.push(0x5000, PageKind::Zero, &[]).unwrap();
        w.finish();
        w.push(0x6000, PageKind::Zero, &[]).unwrap();
        let Message::Pages { pages } = read(w.finish()).unwrap() else {
            panic!("not Pages");
        };
        assert_eq!(
            pages.iter().map(|p| p.gpa).collect::<Vec<_>>(),
            [0x5000, 0x6000]
        );
    }

    #[test]
    fn bad_page_entries_are_rejected() {
        let mut w = PagesWriter::new();
        w.push(0x1000, PageKind::Zero, &[]).unwrap();
        let before = w.frame_len();
        let bad: [(u64, PageKind, usize); 8] = [
            (0x1001, PageKind::Zero, 0),
            (0x800, PageKind::Raw, PAGE_SIZE),
            (u64::MAX - 4095, PageKind::Zero, 0),
            (0, PageKind::Zero, 1),
            (0, PageKind::Raw, PAGE_SIZE - 1),
            (0, PageKind::Raw, 5000),
            (0, PageKind::Zstd, 0),
            (0, PageKind::Zstd, PAGE_SIZE + 1),
        ];
        for (gpa, kind, len) in bad {
            assert!(
                w.push(gpa, kind, &vec![1; len]).is_err(),
                "{gpa:#x} {kind} {len}"
            );
            assert_eq!(w.frame_len(), before, "a rejected push changed the batch");
            let msg = Message::Pages {
                pages: vec![PageEntry {
                    gpa,
                    kind,
                    data: vec![1; len],
                }],
            };
            let mut buf = vec![9];
            assert!(msg.encode(&mut buf).is_err());
            assert_eq!(buf, [9], "a rejected message left bytes behind");
            // The same entry, forced onto the wire, is rejected by the reader.
            let mut payload = 1u32.to_le_bytes().to_vec();
            put_entry_header(&mut payload, gpa, kind, len);
            payload.extend_from_slice(&vec![1; len]);
            let text = malformed(read(&raw_frame(Command::Pages, &payload)));
            assert!(text.starts_with("The page entry at offset 4 "), "{text}");
            assert!(PagesView::parse(&payload).is_err());
        }
        let mut payload = 1u32.to_le_bytes().to_vec();
        put_entry_header(&mut payload, 0x1001, PageKind::Zero, 0);
        assert_eq!(
            malformed(read(&raw_frame(Command::Pages, &payload))),
            "The page entry at offset 4 has unaligned gpa 0x1001"
        );
        let mut payload = 2u32.to_le_bytes().to_vec();
        put_entry_header(&mut payload, 0x1000, PageKind::Zero, 0);
        put_entry_header(&mut payload, 0x2000, PageKind::Raw, 5000);
        payload.extend_from_slice(&[0; 5000]);
        assert_eq!(
            malformed(read(&raw_frame(Command::Pages, &payload))),
            "The page entry at offset 17 claims 5000 bytes of raw data; a raw page carries \
             exactly 4096"
        );
        let mut payload = 1u32.to_le_bytes().to_vec();
        put_entry_header(&mut payload, 0x1000, PageKind::Raw, PAGE_SIZE);
        payload.extend_from_slice(&[0; 100]);
        assert_eq!(
            malformed(read(&raw_frame(Command::Pages, &payload))),
            "The page entry at offset 4 claims 4096 bytes of data but only 100 remain"
        );
        payload[12] = 7;
        assert_eq!(
            malformed(read(&raw_frame(Command::Pages, &payload))),
            "The page entry at offset 4 has unknown page kind 7"
        );
        let mut payload = 2u32.to_le_bytes().to_vec();
        put_entry_header(&mut payload, 0x1000, PageKind::Zero, 0);
        assert_eq!(
            malformed(read(&raw_frame(Command::Pages, &payload))),
            "The page entry at offset 17 is cut short: 0 bytes left where a 13-byte entry \
             header was expected"
        );
    }

    #[test]
    fn negotiation() {
        assert_eq!(
            negotiate(PROTOCOL_VERSION, MIN_PROTOCOL_VERSION).unwrap(),
            2
        );
        // A newer peer that still speaks ours.
        assert_eq!(negotiate(5, 1).unwrap(), 2);
        // The source checking the target's answer.
        assert_eq!(negotiate(2, 2).unwrap(), 2);
        // A newer peer that dropped ours, an older one we dropped (version 1 had no frame
        // checksums), a nonsense range.
        for (version, min) in [(5, 3), (1, 1), (0, 0), (2, 3)] {
            let err = negotiate(version, min).unwrap_err();
            assert!(
                matches!(err, ProtocolError::VersionMismatch { ours: (2, 2), theirs } if theirs == (min, version)),
                "{err}"
            );
        }
        assert_eq!(
            negotiate(5, 3).unwrap_err().to_string(),
            "No common protocol version: this side speaks 2..=2, the peer speaks 3..=5"
        );
    }

    #[test]
    fn setup_is_validated() {
        let setup = |regions: Vec<(u64, u64)>, vm: Vec<u8>| Message::Setup {
            mode: 0,
            verify: false,
            regions,
            vm,
        };
        let page = PAGE_SIZE as u64;
        let bad = [
            (vec![], "lists no memory regions"),
            (vec![(0x800, page)], "is not page aligned"),
            (vec![(0, 100)], "is not page aligned"),
            (vec![(0, 0)], "is empty"),
            (
                vec![(0x2000, page), (0x1000, page)],
                "must be sorted and disjoint",
            ),
            (
                vec![(0, 2 * page), (page, page)],
                "must be sorted and disjoint",
            ),
            (
                vec![(u64::MAX - page + 1, page)],
                "past the end of the address space",
            ),
        ];
        for (regions, want) in bad {
            // Encoding refuses; hand-made bytes are refused on decoding.
            let msg = setup(regions.clone(), vec![]);
            let err = msg.encode(&mut Vec::new()).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
            let mut payload = vec![0, 0];
            payload.extend_from_slice(&(regions.len() as u32).to_le_bytes());
            for (gpa, size) in &regions {
                payload.extend_from_slice(&gpa.to_le_bytes());
                payload.extend_from_slice(&size.to_le_bytes());
            }
            payload.extend_from_slice(&0u32.to_le_bytes());
            let text = malformed(read(&raw_frame(Command::Setup, &payload)));
            assert!(
                text.starts_with("The Setup ") && text.contains(want),
                "{text}"
            );
        }
        let many = (0..65).map(|i| (i * 0x1000, 0x1000)).collect();
        assert!(matches!(
            setup(many, vec![]).encode(&mut Vec::new()),
            Err(ProtocolError::TooLarge { len: 65, .. })
        ));
        let max = (0..64).map(|i| (i * 0x1000, 0x1000)).collect();
        let big = setup(max, vec![7; MAX_SETUP_BLOB]);
        assert_eq!(read(&frame(&big)).unwrap(), big);
        assert!(matches!(
            setup(vec![(0, page)], vec![0; MAX_SETUP_BLOB + 1]).encode(&mut Vec::new()),
            Err(ProtocolError::TooLarge { .. })
        ));
        // Flags are 0 or 1.
        let mut f = frame(&setup(vec![(0, page)], vec![]));
        f[HEADER_LEN + 1] = 2;
        assert_eq!(
            malformed(read(&resealed(f))),
            "The Setup field verify at offset 1 is 2; a flag is 0 or 1"
        );
    }

    #[test]
    fn hello_channels_are_validated() {
        for (channel, channels) in [(0, 0), (1, 1), (0, MAX_CHANNELS + 1), (7, 3)] {
            let msg = Message::Hello {
                version: 1,
                min_version: 1,
                migration_id: [0; 16],
                channel,
                channels,
            };
            assert!(msg.encode(&mut Vec::new()).is_err());
            let mut payload = [1, 0, 1, 0].to_vec();
            payload.extend_from_slice(&[0; 16]);
            payload.extend_from_slice(&channel.to_le_bytes());
            payload.extend_from_slice(&channels.to_le_bytes());
            assert!(malformed(read(&raw_frame(Command::Hello, &payload))).starts_with("The Hello"));
        }
    }

    #[test]
    fn runs_and_requests_are_validated() {
        for (gpa, pages) in [(0x1001, 1), (0x1000, 0), (u64::MAX - 0xFFF, 1)] {
            let discard = Message::Discard {
                runs: vec![(0, 1), (gpa, pages)],
            };
            assert!(discard.encode(&mut Vec::new()).is_err());
            let request = Message::PageRequest { gpa, pages };
            assert!(request.encode(&mut Vec::new()).is_err());
            let mut payload = gpa.to_le_bytes().to_vec();
            payload.extend_from_slice(&pages.to_le_bytes());
            assert!(malformed(read(&raw_frame(Command::PageRequest, &payload)))
                .starts_with("The PageRequest "));
            let mut payload = 1u32.to_le_bytes().to_vec();
            payload.extend_from_slice(&gpa.to_le_bytes());
            payload.extend_from_slice(&pages.to_le_bytes());
            assert!(malformed(read(&raw_frame(Command::Discard, &payload)))
                .starts_with("Run 0 of the Discard "));
        }
        let most = Message::Discard {
            runs: (0..MAX_RUNS as u64).map(|i| (i << 20, 3)).collect(),
        };
        assert_eq!(read(&frame(&most)).unwrap(), most);
        let too_many = Message::Discard {
            runs: vec![(0, 1); MAX_RUNS + 1],
        };
        assert!(matches!(
            too_many.encode(&mut Vec::new()),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn state_takes_the_full_blob() {
        let state = Message::State {
            blob: vec![0x5A; MAX_STATE],
        };
        assert_eq!(read(&frame(&state)).unwrap(), state);
        let over = Message::State {
            blob: vec![0; MAX_STATE + 1],
        };
        assert!(matches!(
            over.encode(&mut Vec::new()),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn strings_are_limited_and_utf8() {
        let long = "é".repeat(MAX_STRING);
        let err = Message::Done {
            digest: long.clone(),
            report: String::new(),
        }
        .encode(&mut Vec::new())
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "The digest length of a Done message is 8192, over the limit of 4096"
        );
        // The constructors cut on a character boundary so the message always goes out.
        let Message::Abort { reason } = Message::abort(long.clone()) else {
            panic!("not Abort");
        };
        assert_eq!(reason.len(), MAX_STRING);
        let Message::Error { message } = Message::error(format!("x{long}")) else {
            panic!("not Error");
        };
        assert_eq!(message.len(), MAX_STRING - 1);
        assert!(read(&frame(&Message::error(long))).is_ok());
        let mut payload = 2u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&[0xC3, 0x28]);
        let text = malformed(read(&raw_frame(Command::Error, &payload)));
        assert!(
            text.starts_with("The Error text at offset 0 is not UTF-8"),
            "{text}"
        );
    }

    #[test]
    fn unexpected_surfaces_the_peers_text() {
        let err = ProtocolError::unexpected("SetupAck", &Message::error("Not enough memory"));
        assert_eq!(
            err.to_string(),
            "The peer reported an error: Not enough memory"
        );
        let err = ProtocolError::unexpected("SetupAck", &Message::abort("Cancelled"));
        assert_eq!(err.to_string(), "The peer aborted the migration: Cancelled");
        let err = ProtocolError::unexpected("SetupAck", &Message::Resumed);
        assert_eq!(
            err.to_string(),
            "Expected SetupAck but the peer sent Resumed"
        );
    }

    #[test]
    fn io_errors_keep_their_source() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
            }
        }
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "pipe"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = read_message(&mut Broken).unwrap_err();
        assert_eq!(err.to_string(), "Reading a frame from the peer failed");
        let source = std::error::Error::source(&err).expect("has a source");
        assert_eq!(source.to_string(), "reset");
        let err = write_message(&mut Broken, &Message::Resumed).unwrap_err();
        assert_eq!(err.to_string(), "Writing a frame to the peer failed");
    }
}
