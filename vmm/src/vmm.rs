//! The VMM: the one slot its VM lives in (empty, a VM arriving, or the VM), the KVM host,
//! the host's resources as this process sees them, and the VM's creation, restore and end.
//! What is done to the running VM is [`crate::vm`]; moving it is [`crate::migration`].

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godwit_api::{CreateVm, RestoreInfo, RestoreRequest, VmInfo, VmmStatus};

use crate::error::VmmError;
use crate::host;
use crate::microvm::layout::MIB;
use crate::microvm::state::VmState;
use crate::microvm::{memory, KvmHost, MicroVm, VmPlacement};
use crate::migration::Migrations;
use crate::resources::{HostResources, VmResources};
use crate::snapshot::{SnapshotLimits, SnapshotReader};
use crate::vm::{lock, ms_since, Vm};

/// The host settings a VMM runs under (its agent's, passed on the command line).
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The host's name in the cluster.
    pub name: String,
    pub data_dir: PathBuf,
    pub kvm_device: PathBuf,
    pub huge_pages: bool,
    /// Address incoming migrations listen on (a fresh port per migration).
    pub migration_ip: IpAddr,
    /// Touch a migration target's memory before pages arrive (not for post-copy).
    pub prefault: bool,
    /// How often the VM's dirty rate is probed (one second of KVM dirty logging); None = never.
    pub dirty_probe_interval: Option<Duration>,
    /// Space this host offers the VM's resource data (disks, scratch), bytes.
    pub resource_capacity_bytes: u64,
    /// Device classes this host offers VMs (`entropy` is a real device here).
    pub device_classes: BTreeSet<String>,
    /// This host's cluster certificate: migrations are mutual TLS with it; None = plain TCP.
    pub tls: Option<godwit_tls::Credentials>,
    /// Test hook: a fault injected into one channel of every migration this host sends
    /// (`page_transfer::channel::Fault::parse_spec`).
    pub test_fault: Option<(u16, page_transfer::channel::Fault)>,
    /// How long a migration tolerates silence from the peer (`--migration-peer-timeout-s`).
    pub migration_peer_timeout: Duration,
}

/// What the VMM holds.
#[derive(Debug, Default)]
enum Slot {
    #[default]
    Empty,
    /// A VM being created, restored or received under this name.
    Arriving {
        name: String,
        memory_bytes: u64,
    },
    Running(Arc<Vm>),
}

#[derive(Debug)]
pub struct Vmm {
    config: HostConfig,
    kvm: Mutex<Option<Arc<KvmHost>>>,
    slot: Mutex<Slot>,
    pub(crate) migrations: Migrations,
    memory_total: u64,
    pub(crate) resources: Arc<HostResources>,
    /// Why this VMM has nothing left to do (its VM moved away, was deleted, or never
    /// arrived); the process exits once nothing else holds it (`crate::process`).
    ended: Mutex<Option<String>>,
}

/// Empties an `Arriving` slot however the creation ends, unless the VM moved in.
struct Arrival<'a> {
    vmm: &'a Vmm,
    name: String,
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        self.vmm.release(&self.name);
    }
}

impl Vmm {
    pub fn new(mut config: HostConfig) -> Result<Self, VmmError> {
        config.data_dir = godwit_daemon::run_dir::open_data_dir(&config.data_dir).map_err(|e| {
            VmmError::io(
                format!("open data directory {}", config.data_dir.display()),
                e,
            )
        })?;
        let resources = HostResources::start(
            &config.name,
            &config.data_dir,
            config.resource_capacity_bytes,
            config.device_classes.clone(),
            config.migration_ip,
            match &config.tls {
                Some(creds) => godwit_daemon::client::ClientAuth::certificate(creds)?,
                None => godwit_daemon::client::ClientAuth::insecure(),
            },
            crate::resources::link::LinkSecurity::new(config.tls.as_ref())?,
        )?;
        let vmm = Vmm {
            resources,
            migrations: Migrations::new(config.data_dir.join("migrations")),
            kvm: Mutex::new(None),
            slot: Mutex::new(Slot::Empty),
            memory_total: host::memory_total_bytes(),
            ended: Mutex::new(None),
            config,
        };
        if let Err(e) = vmm.kvm() {
            tracing::warn!(error = %crate::error::chain(&e), "KVM unavailable");
        }
        Ok(vmm)
    }

    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// The URL peers reach this host's agent at (for devices other hosts' VMs use).
    pub fn set_api_url(&self, url: String) {
        *lock(&self.resources.api_url) = Some(url);
    }

    pub(crate) fn kvm(&self) -> Result<Arc<KvmHost>, VmmError> {
        let mut kvm = lock(&self.kvm);
        if let Some(host) = kvm.as_ref() {
            return Ok(host.clone());
        }
        let host = Arc::new(
            KvmHost::open(&self.config.kvm_device, self.config.huge_pages)
                .map_err(VmmError::Kvm)?,
        );
        *kvm = Some(host.clone());
        Ok(host)
    }

    /// The VM, if it is the one named `name`.
    pub fn vm(&self, name: &str) -> Result<Arc<Vm>, VmmError> {
        match &*lock(&self.slot) {
            Slot::Running(vm) if vm.name() == name => Ok(vm.clone()),
            _ => Err(VmmError::NoSuchVm {
                name: name.to_owned(),
            }),
        }
    }

    /// The VM's run directory, with a fresh console log.
    pub(crate) fn placement(&self, name: &str) -> Result<VmPlacement, VmmError> {
        let dir = self.config.data_dir.join("vms").join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| VmmError::io(format!("create VM directory {}", dir.display()), e))?;
        let console_path = dir.join("console.log");
        // A new instance starts a new console log.
        let _ = std::fs::remove_file(&console_path);
        Ok(VmPlacement {
            name: name.to_owned(),
            console_path,
            attachments: Default::default(),
        })
    }

    /// Takes the empty slot for a VM named `name` of `memory_bytes` about to arrive, until
    /// [`Vmm::release`] or [`Vmm::insert`]. The agent accounts for the host's memory across
    /// its VMMs; here a VM may not exceed the host.
    pub(crate) fn claim(&self, name: &str, memory_bytes: u64) -> Result<(), VmmError> {
        crate::validate_name(name)?;
        let mut slot = lock(&self.slot);
        match &*slot {
            Slot::Empty => {}
            Slot::Arriving { name: holds, .. } if holds == name => {
                return Err(VmmError::NameTaken { name: name.into() })
            }
            Slot::Running(vm) if vm.name() == name => {
                return Err(VmmError::NameTaken { name: name.into() })
            }
            Slot::Arriving { name: holds, .. } => {
                return Err(VmmError::Occupied {
                    holds: holds.clone(),
                    wanted: name.into(),
                })
            }
            Slot::Running(vm) => {
                return Err(VmmError::Occupied {
                    holds: vm.name().to_owned(),
                    wanted: name.into(),
                })
            }
        }
        if memory_bytes > self.memory_total {
            return Err(VmmError::OutOfMemory {
                want_mib: memory_bytes / MIB,
                used_mib: 0,
                limit_mib: self.memory_total / MIB,
            });
        }
        *slot = Slot::Arriving {
            name: name.to_owned(),
            memory_bytes,
        };
        Ok(())
    }

    /// Empties the slot if `name` is still arriving there.
    pub(crate) fn release(&self, name: &str) {
        let mut slot = lock(&self.slot);
        if matches!(&*slot, Slot::Arriving { name: n, .. } if n == name) {
            *slot = Slot::Empty;
        }
    }

    fn arrive(&self, name: &str, memory_bytes: u64) -> Result<Arrival<'_>, VmmError> {
        self.claim(name, memory_bytes)?;
        Ok(Arrival {
            vmm: self,
            name: name.to_owned(),
        })
    }

    /// The VM arrived: it runs in the slot.
    pub(crate) fn insert(&self, vm: Vm) -> Arc<Vm> {
        let vm = Arc::new(vm);
        *lock(&self.slot) = Slot::Running(vm.clone());
        *lock(&self.ended) = None;
        vm
    }

    pub fn create(&self, req: &CreateVm) -> Result<VmInfo, VmmError> {
        let memory_bytes = crate::validate_create(req)?;
        let _arrival = self.arrive(&req.name, memory_bytes)?;
        let kvm = self.kvm()?;
        let mut placement = self.placement(&req.name)?;
        let started = Instant::now();
        let resources = self.resources.create(&req.name, &req.resources)?;
        placement.attachments = resources.attachments();
        let vm = MicroVm::create(
            &kvm,
            &placement,
            req.vcpus,
            memory_bytes,
            &req.guest,
            req.paused,
        )
        .map_err(|e| {
            self.resources.delete_vm(&req.name, &resources);
            VmmError::vm(&req.name, "create", e)
        })?;
        tracing::info!(
            vm = %req.name,
            vcpus = req.vcpus,
            memory_mib = req.memory_mib,
            guest = req.guest.kind(),
            ms = ms_since(started),
            "VM created"
        );
        self.insert(Vm::new(vm, memory_bytes, None, resources))
            .info()
    }

    /// The VM, listed (none or one).
    pub fn list(&self) -> Vec<VmInfo> {
        let vm = match &*lock(&self.slot) {
            Slot::Running(vm) => Some(vm.clone()),
            _ => None,
        };
        vm.and_then(|vm| vm.info().ok()).into_iter().collect()
    }

    pub fn delete(&self, name: &str) -> Result<(), VmmError> {
        let vm = self.vm(name)?;
        vm.refuse_delete_while_migrating()?;
        let resources = vm.resources();
        drop(vm);
        self.remove(name)?;
        self.resources.delete_vm(name, &resources);
        self.set_ended(format!("VM {name:?} deleted"));
        Ok(())
    }

    /// Empties the slot whatever the VM is doing (a migration that completed removes its
    /// source).
    pub(crate) fn remove(&self, name: &str) -> Result<(), VmmError> {
        let vm = {
            let mut slot = lock(&self.slot);
            match std::mem::take(&mut *slot) {
                Slot::Running(vm) if vm.name() == name => vm,
                other => {
                    *slot = other;
                    return Err(VmmError::NoSuchVm { name: name.into() });
                }
            }
        };
        // Dropping the last reference stops the vCPU threads and frees the memory; a request
        // still holding the VM finishes first. The console log stays for post-mortems until a
        // VM of the same name replaces it.
        drop(vm);
        tracing::info!(vm = %name, "VM deleted");
        Ok(())
    }

    /// Releases what this host keeps for a VM that moved away and was deleted elsewhere.
    pub fn release_moved(&self, vm: &str) -> Result<Vec<String>, VmmError> {
        crate::validate_name(vm)?;
        let here = match &*lock(&self.slot) {
            Slot::Empty => false,
            Slot::Arriving { name, .. } => name == vm,
            Slot::Running(running) => running.name() == vm,
        };
        if here {
            return Err(VmmError::StillHere { name: vm.into() });
        }
        let released = self.resources.release_moved(vm);
        self.set_ended(format!("released what it kept for VM {vm:?}"));
        Ok(released)
    }

    /// Resolves an API path, confined to the data directory (relative paths live under it).
    pub fn resolve(&self, path: &str) -> Result<PathBuf, VmmError> {
        Ok(godwit_daemon::paths::confine(&self.config.data_dir, path)?)
    }

    pub fn restore(&self, req: &RestoreRequest) -> Result<RestoreInfo, VmmError> {
        let started = Instant::now();
        let path = self.resolve(&req.path)?;
        crate::validate_name(&req.name)?;
        let limits = SnapshotLimits::new(self.memory_total);
        let reader =
            SnapshotReader::open(&path, &limits).map_err(|source| VmmError::RestoreFrom {
                path: path.clone(),
                source,
            })?;
        let state = VmState::decode(reader.state()).map_err(|source| VmmError::RestoreState {
            path: path.clone(),
            source,
        })?;
        let memory_bytes = state.config.memory_bytes;
        let _arrival = self.arrive(&req.name, memory_bytes)?;
        let kvm = self.kvm()?;
        let t = Instant::now();
        let memory =
            memory::allocate(memory_bytes, kvm.huge_pages).map_err(|source| VmmError::Memory {
                name: req.name.clone(),
                source,
            })?;
        reader
            .read_memory_into(&memory)
            .map_err(|source| VmmError::RestoreFrom {
                path: path.clone(),
                source,
            })?;
        let read_ms = ms_since(t);
        let t = Instant::now();
        let placement = self.placement(&req.name)?;
        let vm = MicroVm::restore(&kvm, &placement, &state, memory, req.paused)
            .map_err(|e| VmmError::vm(&req.name, "restore", e))?;
        let restore_state_ms = ms_since(t);
        let vm = self.insert(Vm::new(
            vm,
            memory_bytes,
            Some(path.display().to_string()),
            VmResources::default(),
        ));
        let info = RestoreInfo {
            vm: vm.info()?,
            read_ms,
            restore_state_ms,
            total_ms: ms_since(started),
        };
        tracing::info!(vm = %req.name, path = %path.display(), total_ms = info.total_ms, "VM restored");
        Ok(info)
    }

    /// Samples the VM's CPU use and advances its dirty-rate probe; the process's background
    /// loop calls this every [`crate::SAMPLE_INTERVAL`].
    pub fn sample(&self) {
        let vm = match &*lock(&self.slot) {
            Slot::Running(vm) => vm.clone(),
            _ => return,
        };
        // A VM migrating away is not probed; its last pre-copy round measured its dirty rate.
        let migration_rate = self.migrations.outgoing_dirty_rate();
        vm.sample(
            crate::SAMPLE_INTERVAL,
            self.config.dirty_probe_interval,
            migration_rate,
        );
    }

    /// What this VMM process holds, for its agent.
    pub fn status(&self) -> VmmStatus {
        let (vm, memory_bytes, arriving) = match &*lock(&self.slot) {
            Slot::Empty => (None, 0, false),
            Slot::Arriving { memory_bytes, .. } => (None, *memory_bytes, true),
            Slot::Running(vm) => (Some(vm.name().to_owned()), vm.memory_bytes(), false),
        };
        let mut keeps = self.resources.kept();
        let disk_used = self.resources.disk_used_bytes();
        if vm.is_none() && disk_used > 0 {
            keeps.push(format!("data ({} MiB)", disk_used.div_ceil(MIB)));
        }
        VmmStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            vm,
            memory_bytes,
            arriving,
            keeps,
            disk_used_bytes: disk_used,
            migrations_running: self.migrations.running(),
            ended: lock(&self.ended).clone(),
            agent_url: lock(&self.resources.api_url).clone(),
        }
    }

    /// Notes why this VMM has nothing left to run (the process exits once idle).
    pub(crate) fn set_ended(&self, why: String) {
        *lock(&self.ended) = Some(why);
    }

    /// Nothing runs, arrives, migrates or is kept here: the process may exit.
    pub fn idle(&self) -> bool {
        let s = self.status();
        s.vm.is_none() && !s.arriving && s.keeps.is_empty() && s.migrations_running == 0
    }

    /// Stops the VM and releases what this process keeps (the VMM is about to exit).
    pub fn shutdown(&self) {
        let slot = std::mem::take(&mut *lock(&self.slot));
        let stopped = matches!(slot, Slot::Running(_));
        drop(slot);
        self.resources.shutdown();
        tracing::info!(stopped, "VMM shut down");
    }
}

/// Checks a creation request without touching anything (the agent calls this before it
/// spends memory or a process on it); returns the VM's memory in bytes.
pub fn validate_create(req: &CreateVm) -> Result<u64, VmmError> {
    if req.memory_mib == 0 {
        return Err(VmmError::Invalid("memory_mib must be at least 4".into()));
    }
    let memory_bytes = req
        .memory_mib
        .checked_mul(MIB)
        .ok_or_else(|| VmmError::Invalid(format!("memory_mib {} is too large", req.memory_mib)))?;
    validate_name(&req.name)?;
    MicroVm::validate(req.vcpus, memory_bytes, &req.guest)
        .map_err(|e| VmmError::vm(&req.name, "create", e))?;
    crate::resources::validate_specs(&req.resources)?;
    Ok(memory_bytes)
}

pub fn validate_name(name: &str) -> Result<(), VmmError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name != "."
        && name != ".."
        // `/v1/vms/restore` is an endpoint, so a VM of that name could not be addressed.
        && name != "restore";
    if ok {
        Ok(())
    } else {
        Err(VmmError::Invalid(format!(
            "VM name {name:?} is invalid: use 1-64 characters of A-Z a-z 0-9 _ . -"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web-1.prod_a").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "restore", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
