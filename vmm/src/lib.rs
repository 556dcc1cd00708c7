//! Godwit's VMM: everything one running microVM is, in its own process. The KVM VM, guest
//! memory, vCPU threads, devices and their backends (disk, entropy, endpoint stream), the
//! console log, snapshot/restore, and both ends of the VM's live migrations live here, so a
//! guest and its clients do not depend on the agent being up: the agent spawns, supervises and
//! re-adopts VMM processes (see `docs/architecture.md`).
//!
//! The process serves a local HTTP/JSON API on a unix socket in the VM's run directory
//! ([`api`], documented in `docs/vmm-api.md`); [`run`] is its main loop.

pub mod api;
pub mod error;
pub mod guest;
pub mod microvm;
pub mod migration;
pub mod process;
pub mod resolve;
pub mod resources;
pub mod sealed;
pub mod seccomp;
pub mod snapshot;
pub mod vm;
pub mod vmm;

pub use godwit_daemon::host;

pub use error::VmmError;
pub use process::{run, VmmConfig};
pub use vmm::{validate_create, validate_name, HostConfig, Vmm};

use std::time::Duration;

/// How often the VMM samples its VM's CPU use and probes its dirty rate.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
