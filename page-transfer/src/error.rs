//! What can end a migration.
//!
//! Each way a migration can end has its own variant, so a caller decides from the type, never
//! from the text; the text (with its source chain) is what the migration's record shows.
//! [`MigrationError::class`] folds the variants into the bounded label the metrics count.

use std::fmt;
use std::time::Duration;

use crate::codec::CodecError;
use crate::protocol::{Command, ProtocolError};
use crate::vm::VmAccessError;

const MIB: f64 = (1u64 << 20) as f64;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("Cannot connect to the target at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake on a channel failed: the target's certificate is not of the cluster
    /// CA or not for the address dialled, or the target refused this host's certificate.
    #[error("The TLS handshake on migration channel {channel} failed")]
    Tls {
        channel: u16,
        #[source]
        source: std::io::Error,
    },
    /// The target's address resolved, but to nothing.
    #[error("{addr} resolves to no address")]
    NoAddress { addr: String },
    /// The configured number of bulk channels is outside what the protocol allows.
    #[error("Channels must be 1-{max}, not {requested}")]
    ChannelCount { requested: u16, max: u16 },
    #[error("Migration channel {channel} failed")]
    Channel {
        channel: u16,
        #[source]
        source: ProtocolError,
    },
    /// Reading the control channel failed while the engine waited on it; `source` is `None`
    /// when the reader had already stopped.
    #[error("The control connection to the {peer} broke")]
    ControlBroke {
        /// "target" on the source, "source" on the target.
        peer: &'static str,
        #[source]
        source: Option<ProtocolError>,
    },
    /// A control message could not be written.
    #[error("Cannot send {command}")]
    Send {
        command: Command,
        #[source]
        source: ProtocolError,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("The VM could not be accessed")]
    Vm(#[from] VmAccessError),
    /// The peer said no, with its own words.
    #[error("The peer reported: {0}")]
    Remote(String),
    /// The target answered the switchover without starting the VM (and dropped its copy), so
    /// the VM runs on at the source.
    #[error("The target did not start the VM, so it runs on here: {0}")]
    SwitchoverRefused(String),
    #[error("The migration was cancelled")]
    Cancelled,
    /// Pre-copy ran out of rounds or time with more left than the downtime allows.
    #[error(
        "Pre-copy did not converge: after {rounds} rounds in {:.1} s the guest still dirtied \
         {:.1} MiB/s; {remaining_pages} pages remain, predicted to take {:.0} ms against a \
         downtime target of {} ms at {:.1} MiB/s",
        .elapsed.as_secs_f64(),
        .dirty_rate / MIB,
        .predicted.as_secs_f64() * 1000.0,
        .downtime.as_millis(),
        .bandwidth / MIB,
    )]
    NotConverged {
        /// Rounds done, the full pass included.
        rounds: u32,
        /// Since pre-copy began.
        elapsed: Duration,
        /// What the guest dirtied in the last round, bytes/s.
        dirty_rate: f64,
        /// Dirty pages still to send.
        remaining_pages: u64,
        /// How long sending them while paused would take.
        predicted: Duration,
        /// The configured downtime target.
        downtime: Duration,
        /// The measured (or capped) bandwidth, bytes/s.
        bandwidth: f64,
    },
    #[error("Timed out after {} s: {awaited}", .after.as_secs_f64())]
    Timeout {
        awaited: Awaited,
        /// How long it was waited for.
        after: Duration,
    },
    #[error("The migrated memory does not match: source {source_digest}, target {target_digest}")]
    DigestMismatch {
        source_digest: String,
        target_digest: String,
    },
    /// A local I/O step failed (cloning, configuring or polling a socket).
    #[error("Cannot {action}")]
    Io {
        /// What was being done, e.g. "clone the control socket".
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot start a thread")]
    Spawn(#[source] std::io::Error),
    /// One of the engine's own threads panicked.
    #[error("The {0} thread panicked")]
    Panicked(&'static str),
    /// The page codec could not be set up.
    #[error("Cannot set up {what}")]
    Codec {
        /// "compression" or "decompression".
        what: &'static str,
        #[source]
        source: CodecError,
    },
    /// The transport returned fewer channels than the engine needs.
    #[error("The {0} channel is missing")]
    NoChannel(&'static str),
    /// The source sent a page the target cannot decode.
    #[error("The source sent a page at {gpa:#x} that does not decode")]
    BadPage {
        gpa: u64,
        #[source]
        source: CodecError,
    },
    /// The source named memory the VM does not have.
    #[error("The source {what} at {gpa:#x}, outside guest memory")]
    OutsideMemory {
        /// "sent a page" or "discarded pages".
        what: &'static str,
        gpa: u64,
    },
    #[error("The source discarded more runs than there are pages ({pages})")]
    TooManyDiscards { pages: u64 },
    #[error("Unknown migration mode {0}")]
    UnknownMode(u8),
    /// A switchover (without post-copy) came before every page had arrived.
    #[error("Switchover with {received} of {total} pages received")]
    SwitchoverIncomplete { received: u64, total: u64 },
    /// The source said it had sent everything, and pages are still missing.
    #[error("All sent, yet {missing} of {total} pages are missing")]
    PagesMissing { missing: u64, total: u64 },
    /// A paused post-copy was given up on while it waited for its source to reconnect: the
    /// pages the target lacks are lost with the source's copy.
    #[error(
        "Gave up waiting for the source to resume the post-copy: {reason} (it paused on: {cause})"
    )]
    GaveUp { reason: String, cause: String },
}

/// What a migration waited for in vain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaited {
    /// The source's connections, on the target.
    Channels,
    /// Any frame from the peer (`source` or `target`) on the control channel: each side
    /// sends a keepalive every second, so silence means the peer or the link is gone.
    Silence(&'static str),
    /// Frames on this data channel, while the migration waited for its phase to end.
    DataChannel(u16),
}

impl fmt::Display for Awaited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Awaited::Channels => f.write_str("the source did not open all migration channels"),
            Awaited::Silence(peer) => write!(f, "the {peer} sent nothing on the control channel"),
            Awaited::DataChannel(channel) => write!(
                f,
                "migration channel {channel} went silent while the phase waited for it"
            ),
        }
    }
}

impl MigrationError {
    /// The connections failed (broke, went silent, delivered a damaged frame, could not be
    /// opened), not a decision of either side: a post-copy can resume over new ones.
    pub fn is_link_failure(&self) -> bool {
        use MigrationError as E;
        if self.cancelled_by_peer() {
            return false;
        }
        matches!(
            self,
            E::Channel { .. }
                | E::ControlBroke { .. }
                | E::Send { .. }
                | E::Connect { .. }
                | E::Tls { .. }
                | E::Timeout { .. }
        )
    }

    /// The source cancelled the migration on purpose (the target's view of a cancel).
    pub fn cancelled_by_peer(&self) -> bool {
        matches!(
            self,
            MigrationError::Protocol(ProtocolError::PeerCancelled)
                | MigrationError::Channel {
                    source: ProtocolError::PeerCancelled,
                    ..
                }
        )
    }

    /// The failure's class, a bounded label for metrics: `connect`, `channel`, `protocol`,
    /// `vm`, `peer`, `not_converged`, `timeout`, `digest_mismatch`, `cancelled` (a cancel on
    /// either side) or `other` (a local failure: I/O, a thread, the codec, the config).
    pub fn class(&self) -> &'static str {
        use MigrationError as E;
        if self.cancelled_by_peer() {
            return "cancelled";
        }
        match self {
            E::Connect { .. } | E::NoAddress { .. } => "connect",
            E::Tls { .. } => "tls",
            E::Channel { .. } | E::ControlBroke { .. } | E::Send { .. } => "channel",
            E::Protocol(_)
            | E::BadPage { .. }
            | E::OutsideMemory { .. }
            | E::TooManyDiscards { .. }
            | E::UnknownMode(_)
            | E::SwitchoverIncomplete { .. }
            | E::PagesMissing { .. } => "protocol",
            E::Vm(_) => "vm",
            E::Remote(_) | E::SwitchoverRefused(_) | E::GaveUp { .. } => "peer",
            E::NotConverged { .. } => "not_converged",
            E::Timeout { .. } => "timeout",
            E::DigestMismatch { .. } => "digest_mismatch",
            E::Cancelled => "cancelled",
            E::ChannelCount { .. }
            | E::Io { .. }
            | E::Spawn(_)
            | E::Panicked(_)
            | E::Codec { .. }
            | E::NoChannel(_) => "other",
        }
    }

    pub(crate) fn channel(channel: u16) -> impl FnOnce(ProtocolError) -> MigrationError {
        move |source| MigrationError::Channel { channel, source }
    }

    pub(crate) fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
        move |source| MigrationError::Io { action, source }
    }
}

/// The message with its causes, one line, as a migration's record shows it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::io;

    use super::*;

    fn io_error() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "broken pipe")
    }

    #[test]
    fn every_variant_has_a_bounded_class() {
        let cases = [
            (
                MigrationError::Connect {
                    addr: "10.0.0.2:7000".into(),
                    source: io_error(),
                },
                "connect",
            ),
            (
                MigrationError::NoAddress {
                    addr: "nowhere:1".into(),
                },
                "connect",
            ),
            (
                MigrationError::ChannelCount {
                    requested: 0,
                    max: 30,
                },
                "other",
            ),
            (MigrationError::channel(2)(ProtocolError::Closed), "channel"),
            (
                MigrationError::ControlBroke {
                    peer: "target",
                    source: None,
                },
                "channel",
            ),
            (
                MigrationError::Send {
                    command: Command::State,
                    source: ProtocolError::Closed,
                },
                "channel",
            ),
            (MigrationError::Protocol(ProtocolError::Closed), "protocol"),
            (MigrationError::Vm(VmAccessError::new("gone")), "vm"),
            (MigrationError::Remote("no room".into()), "peer"),
            (
                MigrationError::SwitchoverRefused("digests differ".into()),
                "peer",
            ),
            (MigrationError::Cancelled, "cancelled"),
            (
                MigrationError::Protocol(ProtocolError::PeerCancelled),
                "cancelled",
            ),
            (
                MigrationError::channel(3)(ProtocolError::PeerCancelled),
                "cancelled",
            ),
            (
                MigrationError::NotConverged {
                    rounds: 3,
                    elapsed: Duration::from_secs(2),
                    dirty_rate: 0.0,
                    remaining_pages: 1,
                    predicted: Duration::ZERO,
                    downtime: Duration::ZERO,
                    bandwidth: 0.0,
                },
                "not_converged",
            ),
            (
                MigrationError::Timeout {
                    awaited: Awaited::Channels,
                    after: Duration::from_secs(30),
                },
                "timeout",
            ),
            (
                MigrationError::DigestMismatch {
                    source_digest: "a".into(),
                    target_digest: "b".into(),
                },
                "digest_mismatch",
            ),
            (
                MigrationError::io("poll the migration listener")(io_error()),
                "other",
            ),
            (MigrationError::Spawn(io_error()), "other"),
            (MigrationError::Panicked("page sender"), "other"),
            (
                MigrationError::Codec {
                    what: "compression",
                    source: CodecError::ShortPage(1),
                },
                "other",
            ),
            (MigrationError::NoChannel("control"), "other"),
            (
                MigrationError::BadPage {
                    gpa: 0x1000,
                    source: CodecError::ShortPage(1),
                },
                "protocol",
            ),
            (
                MigrationError::OutsideMemory {
                    what: "sent a page",
                    gpa: 0x1000,
                },
                "protocol",
            ),
            (MigrationError::TooManyDiscards { pages: 4 }, "protocol"),
            (MigrationError::UnknownMode(9), "protocol"),
            (
                MigrationError::SwitchoverIncomplete {
                    received: 1,
                    total: 2,
                },
                "protocol",
            ),
            (
                MigrationError::PagesMissing {
                    missing: 1,
                    total: 2,
                },
                "protocol",
            ),
        ];
        for (error, class) in cases {
            assert_eq!(error.class(), class, "{error:?}");
        }
    }

    #[test]
    fn not_converged_reads_as_before() {
        let e = MigrationError::NotConverged {
            rounds: 3,
            elapsed: Duration::from_millis(2500),
            dirty_rate: 12.0 * MIB,
            remaining_pages: 4096,
            predicted: Duration::from_millis(160),
            downtime: Duration::from_millis(50),
            bandwidth: 100.0 * MIB,
        };
        assert_eq!(
            e.to_string(),
            "Pre-copy did not converge: after 3 rounds in 2.5 s the guest still dirtied 12.0 \
             MiB/s; 4096 pages remain, predicted to take 160 ms against a downtime target of \
             50 ms at 100.0 MiB/s"
        );
        assert!(e.source().is_none());
    }

    #[test]
    fn timeouts_say_what_did_not_come() {
        let e = MigrationError::Timeout {
            awaited: Awaited::Channels,
            after: Duration::from_secs(30),
        };
        assert_eq!(
            e.to_string(),
            "Timed out after 30 s: the source did not open all migration channels"
        );
        let e = MigrationError::Timeout {
            awaited: Awaited::Silence("target"),
            after: Duration::from_secs(10),
        };
        assert_eq!(
            e.to_string(),
            "Timed out after 10 s: the target sent nothing on the control channel"
        );
        let e = MigrationError::Timeout {
            awaited: Awaited::DataChannel(2),
            after: Duration::from_millis(2500),
        };
        assert_eq!(
            e.to_string(),
            "Timed out after 2.5 s: migration channel 2 went silent while the phase waited for it"
        );
    }

    #[test]
    fn wrapped_errors_keep_their_cause_out_of_the_message() {
        let e = MigrationError::io("clone the control socket")(io_error());
        assert_eq!(e.to_string(), "Cannot clone the control socket");
        assert_eq!(chain(&e), "Cannot clone the control socket: broken pipe");
        let io = e.source().and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(io.map(io::Error::kind), Some(io::ErrorKind::BrokenPipe));

        let e = MigrationError::Spawn(io_error());
        assert_eq!(chain(&e), "Cannot start a thread: broken pipe");

        let e = MigrationError::Codec {
            what: "decompression",
            source: CodecError::Context(io_error()),
        };
        assert_eq!(
            chain(&e),
            "Cannot set up decompression: Could not create a zstd context: broken pipe"
        );
    }

    #[test]
    fn a_broken_control_connection_names_its_cause_when_there_is_one() {
        let e = MigrationError::ControlBroke {
            peer: "target",
            source: Some(ProtocolError::Closed),
        };
        assert_eq!(
            chain(&e),
            "The control connection to the target broke: The peer closed the connection"
        );
        let e = MigrationError::ControlBroke {
            peer: "source",
            source: None,
        };
        assert!(e.source().is_none());
        assert_eq!(chain(&e), "The control connection to the source broke");
    }
}
