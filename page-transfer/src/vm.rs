//! How the engine sees a VM: small traits the agent implements for its microVMs (and a test
//! implements over plain memory). The engine never learns what a vCPU or an ioctl is.

use std::sync::Arc;
use std::time::Duration;

use crate::bitmap::PageBitmap;

/// A failure inside the VM layer, as a sentence for the migration's error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct VmAccessError(pub String);

impl VmAccessError {
    pub fn new(message: impl Into<String>) -> Self {
        VmAccessError(message.into())
    }
}

/// One guest memory region: guest physical address and size, both page aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub gpa: u64,
    pub size: u64,
}

/// The VM being migrated away.
pub trait SourceVm: Send + Sync {
    /// Guest memory regions, sorted by address.
    fn regions(&self) -> Vec<Region>;
    /// Copies guest memory at `gpa` into `buf` (whole pages, within one region).
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmAccessError>;
    /// Starts recording which pages the guest (and the monitor) writes.
    fn start_dirty_tracking(&self) -> Result<(), VmAccessError>;
    /// Pages written since tracking started or since the last harvest, one bitmap per region,
    /// and resets the record.
    fn harvest_dirty(&self) -> Result<Vec<PageBitmap>, VmAccessError>;
    /// Stops recording.
    fn stop_dirty_tracking(&self);
    /// Whether what else must reach the target before the pause (a disk being mirrored) has
    /// caught up: pre-copy keeps going round while this says no. Default: always ready.
    fn ready_to_stop(&self) -> bool {
        true
    }
    /// Runs just before the pause, while the guest still runs and before the downtime clock
    /// starts: waits for work that must end live (a mirror's first full pass). Default: none.
    fn before_pause(&self) -> Result<(), VmAccessError> {
        Ok(())
    }
    /// Stops the vCPUs.
    fn pause(&self) -> Result<(), VmAccessError>;
    /// The target reported the VM running: what follows the VM at once (a client
    /// connection's forwarding) can move now, even while post-copy still pushes pages.
    /// Default: nothing.
    fn target_running(&self) {}
    /// Lets the vCPUs run again (a migration that failed before switchover).
    fn resume(&self) -> Result<(), VmAccessError>;
    /// vCPU and device state of the paused VM, as an opaque blob for the target.
    fn save_state(&self) -> Result<Vec<u8>, VmAccessError>;
    /// What the target needs to build the VM before any state arrives (opaque).
    fn config_blob(&self) -> Vec<u8>;
}

/// The VM being migrated in, built by a [`TargetFactory`] from the source's setup.
pub trait TargetVm: Send + Sync {
    /// Writes whole pages at `gpa` (pre-copy and stop-and-copy: memory is not registered for
    /// faults).
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), VmAccessError>;
    /// Post-copy: installs whole pages at `gpa` atomically and wakes vCPUs waiting on them.
    /// Pages already present are left alone (a page can arrive twice: on demand and pushed).
    fn install(&self, gpa: u64, data: &[u8]) -> Result<(), VmAccessError>;
    /// Post-copy: installs `pages` zero pages at `gpa`, as `install`.
    fn install_zero(&self, gpa: u64, pages: u64) -> Result<(), VmAccessError>;
    /// Drops pages so they count as missing again (stale after pre-copy, before post-copy).
    fn discard(&self, gpa: u64, pages: u64) -> Result<(), VmAccessError>;
    /// Registers memory so that touching a missing page becomes a fault for `wait_faults`.
    fn enable_postcopy(&self) -> Result<(), VmAccessError>;
    /// Waits up to `timeout` for guest faults on missing pages; appends their page-aligned
    /// addresses to `out`.
    fn wait_faults(&self, out: &mut Vec<u64>, timeout: Duration) -> Result<(), VmAccessError>;
    /// Wakes vCPUs waiting on pages that are already present.
    fn wake(&self, gpa: u64, pages: u64) -> Result<(), VmAccessError>;
    /// Restores the vCPU and device state and runs the VM.
    fn start(&self, state: &[u8]) -> Result<(), VmAccessError>;
    /// All pages are present: stop fault handling.
    fn finish_postcopy(&self) -> Result<(), VmAccessError>;
    /// The migration failed. Before `start`: throw the VM away. After `start` (post-copy with
    /// pages missing): stop it, so it never runs on memory that is not all there.
    fn abort(&self);
    /// Whether all of memory is already backed (prefaulted): pages received as zero are then
    /// present, and need no zero page installed when post-copy begins.
    fn prepopulated(&self) -> bool {
        false
    }
}

/// What the source announced in its setup message.
#[derive(Debug, Clone)]
pub struct IncomingSetup {
    pub postcopy_from_start: bool,
    /// Stop-and-copy: every page arrives while the guest is paused.
    pub stop_and_copy: bool,
    pub regions: Vec<Region>,
    pub config_blob: Vec<u8>,
}

/// Builds the target VM for an incoming migration.
pub trait TargetFactory: Send + Sync {
    fn prepare(&self, setup: &IncomingSetup) -> Result<Arc<dyn TargetVm>, VmAccessError>;
}

/// The default `peer_timeout` of both sides: how long silence from the peer is tolerated (no
/// keepalive on the control channel, no frame on a data channel a phase waits for, a write
/// that makes no progress) before the link is called dead.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(10);
