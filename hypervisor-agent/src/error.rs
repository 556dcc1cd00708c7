//! The agent's errors, typed: what failed, on which VM or process, and the underlying error
//! as its source. Code inside the agent decides on the variant, never on a message. The API
//! edge turns an [`Error`] into an HTTP status and a sentence in one place ([`Error::status`]
//! and the `From` impl below, giving the `AgentError` every Godwit API answers with). A VMM's
//! own refusal ([`Error::Vmm`]) keeps the status and the sentence the VMM gave it.

use axum::http::StatusCode;
pub use godwit_daemon::{chain, AgentError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed or out of range; the sentence says which and why.
    #[error("{0}")]
    Invalid(String),
    /// A check the agent makes with the VMM's own rules (names, VM definitions).
    #[error(transparent)]
    Rules(#[from] godwit_vmm::VmmError),
    /// The VM's VMM answered with a refusal or a failure: its status and its sentence.
    #[error("{message}")]
    Vmm { status: u16, message: String },
    #[error("The VM's VMM process does not answer on {socket}")]
    VmmUnreachable {
        socket: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("The VM's VMM process did not answer {path} within {timeout:?}")]
    VmmTimeout {
        path: String,
        timeout: std::time::Duration,
    },
    #[error("The VMM answered {path} with nonsense")]
    VmmNonsense {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Cannot start the VMM for {vm:?}: {what}")]
    Spawn {
        vm: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The VMM process came up wrong: it ended at once or never answered.
    #[error("The VMM for {vm:?} did not start: {why}")]
    NotStarted { vm: String, why: String },
    /// A snapshot path that is empty or leaves the data directory.
    #[error(transparent)]
    Path(#[from] godwit_daemon::paths::PathError),
    #[error("No VM named {name:?} on this host")]
    NoSuchVm { name: String },
    #[error("No migration {id:?} on this host")]
    NoSuchMigration { id: String },
    #[error("Migration {id} has ended: its VM's process is gone")]
    MigrationGone { id: String },
    #[error("A VM named {name:?} already exists on this host")]
    NameTaken { name: String },
    #[error(
        "Not enough host memory for {want_mib} MiB: {used_mib} MiB of {limit_mib} MiB usable are \
         already assigned to VMs"
    )]
    OutOfMemory {
        want_mib: u64,
        used_mib: u64,
        limit_mib: u64,
    },
    #[error("Not enough host memory for the {mib} MiB of snapshot {path}")]
    SnapshotTooBig { mib: u64, path: String },
    #[error("Not enough space for the VM's resources: {need_mib} MiB needed, {free_mib} MiB free")]
    OutOfDisk { need_mib: u64, free_mib: u64 },
    #[error("VM {name:?} crashed ({how}); delete it")]
    Crashed { name: String, how: String },
    #[error("VM {name:?} runs (or is arriving) here; delete it instead")]
    StillHere { name: String },
    /// The host's backend lacks a capability the request needs.
    #[error("The {backend} backend cannot {what}")]
    Unsupported { backend: String, what: String },
    #[error("This host offers no entropy device")]
    NoEntropy,
    /// A file, device or thread of this host failed.
    #[error("Cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The request's worker failed")]
    Worker(#[source] tokio::task::JoinError),
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The VM or migration is not here (said by the agent or by its VMM).
    pub fn is_not_found(&self) -> bool {
        self.status() == StatusCode::NOT_FOUND
    }

    /// The VMM did not answer at all (it may have died).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Error::VmmUnreachable { .. } | Error::VmmTimeout { .. }
        )
    }

    /// The HTTP status the API answers this error with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Invalid(_) | Error::Path(_) | Error::Unsupported { .. } => {
                StatusCode::BAD_REQUEST
            }
            Error::Rules(e) => e.status(),
            Error::Vmm { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            Error::NoSuchVm { .. } | Error::NoSuchMigration { .. } | Error::NoEntropy => {
                StatusCode::NOT_FOUND
            }
            Error::MigrationGone { .. }
            | Error::NameTaken { .. }
            | Error::Crashed { .. }
            | Error::StillHere { .. } => StatusCode::CONFLICT,
            Error::OutOfMemory { .. } | Error::SnapshotTooBig { .. } | Error::OutOfDisk { .. } => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            Error::VmmUnreachable { .. }
            | Error::VmmTimeout { .. }
            | Error::VmmNonsense { .. }
            | Error::Spawn { .. }
            | Error::NotStarted { .. }
            | Error::Io { .. }
            | Error::Worker(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The API edge: the status, and the error with its sources as one sentence.
impl From<Error> for AgentError {
    fn from(e: Error) -> Self {
        AgentError::from_status(e.status().as_u16(), chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vmm_answer_keeps_its_status_and_sentence() {
        let e = Error::Vmm {
            status: 409,
            message: "VM \"a\" is being migrated".into(),
        };
        let edge = AgentError::from(e);
        assert_eq!(edge.status(), StatusCode::CONFLICT);
        assert_eq!(edge.to_string(), "VM \"a\" is being migrated");
    }

    #[test]
    fn statuses_follow_the_variant() {
        assert!(Error::NoSuchVm { name: "a".into() }.is_not_found());
        assert!(Error::Vmm {
            status: 404,
            message: String::new()
        }
        .is_not_found());
        let rules = Error::from(godwit_vmm::validate_name("a/b").unwrap_err());
        assert_eq!(rules.status(), StatusCode::BAD_REQUEST);
        let e = Error::Crashed {
            name: "a".into(),
            how: "killed by signal 9".into(),
        };
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert!(!e.is_unreachable());
    }
}
