//! The seam between the agent and what runs its VMs. A [`Backend`] makes VMs (create, restore,
//! accept an incoming migration) and finds the ones already running when the agent starts; a
//! [`VmHandle`] is one VM it runs. The agent keeps policy and bookkeeping (names, memory and
//! disk accounting, records, metrics) and never holds a guest's memory.
//!
//! Backends today: [`microvm`], one `godwit-vmm` process per KVM microVM. A backend says what
//! it can do in [`Capabilities`], so a request it cannot serve is refused with a reason before
//! anything starts.

pub mod microvm;

use std::sync::Arc;

use async_trait::async_trait;
use godwit_api::{
    CreateVm, DigestInfo, IncomingAccepted, IncomingMigration, MigrateRequest, MigrationInfo,
    MigrationMode, MigrationStarted, RestoreInfo, RestoreRequest, SnapshotInfo, SnapshotRequest,
    VmInfo, VmmStatus,
};

use crate::error::Error;

/// What a backend can do, reported in `GET /v1/host` and checked before a request reaches it.
pub type Capabilities = godwit_api::BackendCapabilities;

/// The checks the agent makes with a backend's capabilities.
pub trait CapabilityChecks {
    /// Refuses a migration mode the backend does not carry out.
    fn check_mode(&self, mode: MigrationMode) -> Result<(), Error>;
}

impl CapabilityChecks for Capabilities {
    fn check_mode(&self, mode: MigrationMode) -> Result<(), Error> {
        if self.modes.contains(&mode) {
            Ok(())
        } else {
            Err(Error::Unsupported {
                backend: self.backend.clone(),
                what: format!("migrate in mode {}", mode.as_str()),
            })
        }
    }
}

/// How a VM's process ended, once it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It ended on purpose (its VM moved away, was deleted, or it was stopped): why.
    Done(String),
    /// It died: how (exit status or signal) and the tail of its log.
    Crashed(String),
}

/// A VM found running (or found dead) when the agent started.
#[derive(Debug)]
pub struct Adopted {
    pub name: String,
    pub handle: Arc<dyn VmHandle>,
    /// The VM's last known description (for a VM found crashed).
    pub last_info: Option<VmInfo>,
}

/// What makes VMs and finds them again.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    fn capabilities(&self) -> Capabilities;
    /// Checks a creation request the way the backend will (before memory or a process is
    /// spent on it).
    fn validate(&self, req: &CreateVm) -> Result<(), Error>;
    /// Starts a VM from `req`. `disk_budget_bytes` is the resource space it may use.
    async fn create(
        &self,
        req: &CreateVm,
        disk_budget_bytes: u64,
    ) -> Result<(Arc<dyn VmHandle>, VmInfo), Error>;
    /// Starts a VM from a snapshot.
    async fn restore(
        &self,
        req: &RestoreRequest,
    ) -> Result<(Arc<dyn VmHandle>, RestoreInfo), Error>;
    /// Gets ready to receive a migrating VM: in `existing` (a handle that keeps things for a
    /// VM of that name that moved away earlier and is coming back) or in a new one.
    async fn incoming(
        &self,
        req: &IncomingMigration,
        existing: Option<Arc<dyn VmHandle>>,
        disk_budget_bytes: u64,
    ) -> Result<(Arc<dyn VmHandle>, IncomingAccepted), Error>;
    /// The VMs this backend runs (or ran) on this host, found after an agent (re)start.
    async fn adopt(&self) -> Vec<Adopted>;
}

/// One VM a backend runs: the operations the agent's API offers on it.
#[async_trait]
pub trait VmHandle: Send + Sync + std::fmt::Debug {
    /// What the VM's process holds (its VM, reserved memory, kept resources).
    async fn status(&self) -> Result<VmmStatus, Error>;
    async fn info(&self) -> Result<VmInfo, Error>;
    async fn pause(&self) -> Result<VmInfo, Error>;
    async fn resume(&self) -> Result<VmInfo, Error>;
    /// The last `max_bytes` of the serial console (readable after a crash too).
    async fn console(&self, max_bytes: u64) -> Result<Vec<u8>, Error>;
    async fn digest(&self) -> Result<DigestInfo, Error>;
    async fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotInfo, Error>;
    async fn migrate(&self, req: &MigrateRequest) -> Result<MigrationStarted, Error>;
    async fn migrations(&self) -> Result<Vec<MigrationInfo>, Error>;
    async fn migration(&self, id: &str) -> Result<MigrationInfo, Error>;
    async fn cancel(&self, id: &str) -> Result<MigrationInfo, Error>;
    /// Asks a paused post-copy to reconnect now.
    async fn resume_migration(&self, id: &str) -> Result<MigrationInfo, Error>;
    /// Deletes the VM and everything bound to it here.
    async fn delete(&self) -> Result<(), Error>;
    /// Releases what is kept here for the VM that moved away and was deleted elsewhere.
    async fn release_moved(&self) -> Result<Vec<String>, Error>;
    /// Tells the VM's process where the agent's API is now (after a restart elsewhere).
    async fn set_agent_url(&self, url: &str) -> Result<(), Error>;
    /// Stops the VM and its process on purpose.
    async fn stop(&self) -> Result<(), Error>;
    /// Waits up to `timeout` for the process to end; true if it has.
    async fn wait_exit(&self, timeout: std::time::Duration) -> bool;
    /// How the process ended, once it has.
    fn exited(&self) -> Option<Exit>;
    /// The process id, for the record.
    fn pid(&self) -> u32;
}
