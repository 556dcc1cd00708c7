//! What can end a migration.

use crate::protocol::ProtocolError;
use crate::vm::VmAccessError;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("Cannot connect to the target at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Migration channel {channel} failed")]
    Channel {
        channel: u16,
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
    #[error("The migration was cancelled")]
    Cancelled,
    #[error("Pre-copy did not converge: {0}")]
    NotConverged(String),
    #[error("Timed out: {0}")]
    Timeout(String),
    #[error("The migrated memory does not match: source {source_digest}, target {target_digest}")]
    DigestMismatch {
        source_digest: String,
        target_digest: String,
    },
    #[error("{0}")]
    Failed(String),
}

impl MigrationError {
    /// The source cancelled the migration on purpose (the target's view of a cancel).
    pub fn cancelled_by_peer(&self) -> bool {
        matches!(
            self,
            MigrationError::Protocol(crate::protocol::ProtocolError::PeerCancelled)
                | MigrationError::Channel {
                    source: crate::protocol::ProtocolError::PeerCancelled,
                    ..
                }
        )
    }

    pub(crate) fn channel(channel: u16) -> impl FnOnce(ProtocolError) -> MigrationError {
        move |source| MigrationError::Channel { channel, source }
    }
}
