//! The VMM's errors, typed: what failed, on what, and the underlying error as its source.
//! Code inside the VMM decides on the variant, never on a message; the API edge turns a
//! [`VmmError`] into an HTTP status and a sentence in one place ([`VmmError::status`] and the
//! `From` impl below), and the agent passes both on to its own callers.

use std::path::PathBuf;

use axum::http::StatusCode;
pub use godwit_daemon::{chain, AgentError};

use crate::microvm::memory::MemoryError;
use crate::microvm::state::StateError;
use crate::microvm::VmError;
use crate::snapshot::SnapshotError;

/// Why a migration cannot be cancelled here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRefusal {
    /// This VMM is the migration's target; the source decides.
    OnTarget,
    /// It already ended.
    Finished(godwit_api::MigrationStatus),
    /// The switchover was sent: the VM is moving to the target.
    PastSwitchover,
}

impl std::fmt::Display for CancelRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CancelRefusal::OnTarget => {
                f.write_str("this host is its target; cancel it on the source agent")
            }
            CancelRefusal::Finished(status) => write!(f, "it is already {status:?}"),
            CancelRefusal::PastSwitchover => {
                f.write_str("it is past the point of no return: the VM is moving to the target")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A request field is malformed or out of range; the sentence says which and why.
    #[error("{0}")]
    Invalid(String),
    /// A snapshot path that is empty or leaves the data directory.
    #[error(transparent)]
    Path(#[from] godwit_daemon::paths::PathError),
    #[error("No VM named {name:?} on this host")]
    NoSuchVm { name: String },
    #[error("No migration {id:?} on this host")]
    NoSuchMigration { id: String },
    #[error("A VM named {name:?} already exists on this host")]
    NameTaken { name: String },
    /// Each VM has its own VMM process.
    #[error("This VMM already holds VM {holds:?}; VM {wanted:?} needs a VMM process of its own")]
    Occupied { holds: String, wanted: String },
    #[error("VM {name:?} is being migrated; wait for the migration or cancel it")]
    Migrating { name: String },
    #[error("VM {name:?} is being migrated; cancel the migration first")]
    MigratingNoDelete { name: String },
    #[error("VM {name:?} is already being migrated")]
    AlreadyMigrating { name: String },
    /// A post-copy migration is still bringing the VM's memory here.
    #[error("VM {name:?} is still arriving: its post-copy migration has pages to bring; wait until it completes")]
    Arriving { name: String },
    #[error("VM {name:?} crashed and cannot {op}: {reason}")]
    Crashed {
        name: String,
        op: &'static str,
        reason: String,
    },
    /// A post-copy broke with pages missing: the VM must never run again.
    #[error("VM {name:?} cannot resume: {reason}")]
    Broken { name: String, reason: String },
    #[error("VM {name:?} is paused; resume it before migrating")]
    Paused { name: String },
    #[error("VM {name:?} runs (or is arriving) here; delete it instead")]
    StillHere { name: String },
    #[error("Migration {id} cannot be cancelled: {why}")]
    CannotCancel { id: String, why: CancelRefusal },
    /// `migrate resume` of a migration that is not a paused post-copy sent from here.
    #[error("Migration {id} cannot be resumed: {why}")]
    CannotResume { id: String, why: String },
    #[error(
        "Not enough host memory for {want_mib} MiB: {used_mib} MiB of {limit_mib} MiB usable are \
         already assigned to VMs"
    )]
    OutOfMemory {
        want_mib: u64,
        used_mib: u64,
        limit_mib: u64,
    },
    #[error("The VM's {what} need {need_mib} MiB, this host has {free_mib} MiB free for them")]
    OutOfDisk {
        what: &'static str,
        need_mib: u64,
        free_mib: u64,
    },
    #[error("This host has no {class:?} device (it offers: {offers})")]
    NoDevice { class: String, offers: String },
    #[error(
        "This host still serves resources of a VM named {name:?} that moved away (an export or \
         a forwarded endpoint); use another name"
    )]
    ServesMoved { name: String },
    #[error("Cannot publish endpoint {resource} on {addr}")]
    Publish {
        resource: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The rebinding table finds no way to bind one of the VM's resources on the target.
    #[error("Host {host} cannot take VM {vm:?}: {reason}")]
    Unplaceable {
        host: String,
        vm: String,
        reason: String,
    },
    #[error("KVM is unavailable")]
    Kvm(#[source] VmError),
    #[error("Cannot {op} VM {name:?}")]
    Vm {
        name: String,
        op: &'static str,
        #[source]
        source: VmError,
    },
    #[error("Cannot allocate memory for VM {name:?}")]
    Memory {
        name: String,
        #[source]
        source: MemoryError,
    },
    #[error("Cannot encode the state of VM {name:?}")]
    EncodeState {
        name: String,
        #[source]
        source: StateError,
    },
    #[error("Cannot restore from {}", path.display())]
    RestoreFrom {
        path: PathBuf,
        #[source]
        source: SnapshotError,
    },
    #[error("Cannot restore from {}", path.display())]
    RestoreState {
        path: PathBuf,
        #[source]
        source: StateError,
    },
    #[error("Cannot create directory {} for the snapshot", path.display())]
    SnapshotDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot snapshot VM {name:?}")]
    SnapshotWrite {
        name: String,
        #[source]
        source: SnapshotError,
    },
    /// A file, socket or thread of this host failed.
    #[error("Cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot export disk {resource} of {vm}")]
    Export {
        vm: String,
        resource: String,
        #[source]
        source: godwit_nbd::NbdError,
    },
    #[error("Cannot start copying the VM's resources")]
    ResourceCopy(#[source] std::io::Error),
    #[error("Cannot reach the target agent at {target}")]
    TargetUnreachable {
        target: String,
        #[source]
        source: reqwest::Error,
    },
    /// The target agent said no; `status` is its HTTP status, passed on.
    #[error("The target agent at {target} refused: {message}")]
    TargetRefused {
        target: String,
        status: u16,
        message: String,
    },
    #[error("The request's worker failed")]
    Worker(#[source] tokio::task::JoinError),
    #[error("Cannot set up TLS")]
    Tls(#[from] godwit_tls::TlsError),
}

impl VmmError {
    /// `Io` for `what` ("create directory /x") failing with `source`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io {
            what: what.into(),
            source,
        }
    }

    /// `Vm` for the VM operation `op` (a verb: "create", "pause") on `name`.
    pub fn vm(name: &str, op: &'static str, source: VmError) -> Self {
        VmmError::Vm {
            name: name.to_owned(),
            op,
            source,
        }
    }

    /// The HTTP status the API answers this error with: the caller's mistakes are 4xx, the
    /// host's are 5xx.
    pub fn status(&self) -> StatusCode {
        use VmmError as E;
        match self {
            E::Invalid(_) | E::Path(_) | E::RestoreFrom { .. } | E::RestoreState { .. } => {
                StatusCode::BAD_REQUEST
            }
            E::SnapshotDir { .. } => StatusCode::BAD_REQUEST,
            E::NoSuchVm { .. } | E::NoSuchMigration { .. } => StatusCode::NOT_FOUND,
            E::NameTaken { .. }
            | E::Occupied { .. }
            | E::Migrating { .. }
            | E::MigratingNoDelete { .. }
            | E::AlreadyMigrating { .. }
            | E::Arriving { .. }
            | E::Crashed { .. }
            | E::Broken { .. }
            | E::Paused { .. }
            | E::StillHere { .. }
            | E::CannotCancel { .. }
            | E::CannotResume { .. }
            | E::NoDevice { .. }
            | E::ServesMoved { .. }
            | E::Publish { .. }
            | E::Unplaceable { .. } => StatusCode::CONFLICT,
            E::OutOfMemory { .. } | E::OutOfDisk { .. } => StatusCode::INSUFFICIENT_STORAGE,
            E::Kvm(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Vm { source, .. } => vm_status(source),
            E::Memory {
                source: MemoryError::Map { .. },
                ..
            } => StatusCode::INSUFFICIENT_STORAGE,
            E::ResourceCopy(_) | E::TargetUnreachable { .. } => StatusCode::BAD_GATEWAY,
            // The target's own refusal keeps its meaning; anything odd it said is a bad gateway.
            E::TargetRefused { status, .. } => match status {
                400 | 409 | 503 | 507 => {
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
                }
                _ => StatusCode::BAD_GATEWAY,
            },
            E::Memory { .. }
            | E::EncodeState { .. }
            | E::SnapshotWrite { .. }
            | E::Io { .. }
            | E::Export { .. }
            | E::Worker(_)
            | E::Tls(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A monitor error's status: bad VM definitions are the caller's, the rest the host's.
fn vm_status(e: &VmError) -> StatusCode {
    match e {
        VmError::Invalid(_) | VmError::Guest(_) => StatusCode::BAD_REQUEST,
        VmError::NotPaused => StatusCode::CONFLICT,
        VmError::KvmUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        VmError::Memory(MemoryError::Map { .. }) => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The API edge: the status, and the error with its sources as one sentence.
impl From<VmmError> for AgentError {
    fn from(e: VmmError) -> Self {
        AgentError::from_status(e.status().as_u16(), chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_variant() {
        let busy = VmmError::Migrating { name: "a".into() };
        assert_eq!(busy.status(), StatusCode::CONFLICT);
        let gone = VmmError::NoSuchVm { name: "a".into() };
        assert_eq!(AgentError::from(gone).status(), StatusCode::NOT_FOUND);
        let refused = |status| VmmError::TargetRefused {
            target: "t:1".into(),
            status,
            message: "no".into(),
        };
        assert_eq!(refused(507).status(), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(refused(500).status(), StatusCode::BAD_GATEWAY);
        let bad_guest = VmmError::vm("a", "create", VmError::Invalid("0 vCPUs".into()));
        assert_eq!(bad_guest.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn sentences_carry_their_sources() {
        let e = VmmError::io(
            "create VM directory /x",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        let text = AgentError::from(e).to_string();
        assert_eq!(text, "Cannot create VM directory /x: permission denied");
        let e = VmmError::CannotCancel {
            id: "m1".into(),
            why: CancelRefusal::OnTarget,
        };
        assert!(
            e.to_string().ends_with("cancel it on the source agent"),
            "{e}"
        );
    }
}
