//! The agent's VMs: a registry of named microVMs and the operations the API offers on them
//! (create, inspect, pause/resume, snapshot/restore, delete), with the checks that keep bad
//! requests from touching running VMs.
//!
//! Every method here blocks (KVM calls, memory copies, file I/O): the HTTP layer calls them on
//! tokio's blocking pool. A VM's own mutex serialises operations on that VM; the registry lock
//! is only held to look names up and to reserve them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use godwit_api::{
    CreateVm, DigestInfo, RestoreInfo, RestoreRequest, SnapshotInfo, SnapshotRequest, VmInfo,
    VmState as ApiVmState, VmmStatus,
};

use crate::error::AgentError;
use crate::guest;
use crate::host;
use crate::microvm::layout::MIB;
use crate::microvm::state::VmState;
use crate::microvm::{memory, KvmHost, MicroVm, VmError, VmPlacement};
use crate::resources::{HostResources, VmResources};
use crate::snapshot::{self, SnapshotLimits, SnapshotReader};

/// Agent settings that the manager needs.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub kvm_device: PathBuf,
    pub huge_pages: bool,
    /// Host memory kept back from VMs, bytes.
    pub reserved_memory_bytes: u64,
    /// Address incoming migrations listen on (a fresh port per migration).
    pub migration_ip: std::net::IpAddr,
    /// Touch a migration target's memory before pages arrive (not for post-copy).
    pub prefault: bool,
    /// Operator labels of this host.
    pub labels: std::collections::BTreeMap<String, String>,
    /// How often each VM's dirty rate is probed (one second of KVM dirty logging); None = never.
    pub dirty_probe_interval: Option<std::time::Duration>,
    /// Space this host offers VM resource data (disks, scratch), bytes.
    pub resource_capacity_bytes: u64,
    /// Device classes this host offers VMs (`entropy` is a real device here).
    pub device_classes: std::collections::BTreeSet<String>,
}

/// One VM and what the agent tracks about it.
#[derive(Debug)]
pub(crate) struct VmEntry {
    pub(crate) vm: Mutex<MicroVm>,
    /// Fixed for the VM's life; kept outside the VM's lock so accounting never waits on it.
    pub(crate) memory_bytes: u64,
    created_unix_ms: u64,
    restored_from: Option<String>,
    usage: Mutex<CpuUsage>,
    /// A migration of this VM is under way: no delete, pause, resume, snapshot or second
    /// migration meanwhile.
    pub(crate) migrating: std::sync::atomic::AtomicBool,
    probe: Mutex<DirtyProbe>,
    /// Why this VM can never run again here (a post-copy that broke with pages missing).
    broken: Mutex<Option<String>>,
    /// Its resources as bound on this host.
    pub(crate) resources: Mutex<VmResources>,
}

/// The periodic dirty-rate measurement of one VM: dirty logging on for about a second, then
/// the pages it caught divided by the time.
#[derive(Debug, Default)]
struct DirtyProbe {
    started: Option<Instant>,
    next: Option<Instant>,
    rate: f64,
}

impl VmEntry {
    pub(crate) fn new(
        vm: MicroVm,
        memory_bytes: u64,
        restored_from: Option<String>,
        resources: VmResources,
    ) -> Self {
        VmEntry {
            vm: Mutex::new(vm),
            memory_bytes,
            created_unix_ms: now_unix_ms(),
            restored_from,
            usage: Mutex::new(CpuUsage::default()),
            migrating: std::sync::atomic::AtomicBool::new(false),
            probe: Mutex::new(DirtyProbe::default()),
            broken: Mutex::new(None),
            resources: Mutex::new(resources),
        }
    }

    /// Stops the VM for good: it must not run (its memory is incomplete).
    pub(crate) fn mark_broken(&self, reason: &str) {
        tracing::error!(reason, "VM stopped");
        *lock(&self.broken) = Some(reason.to_owned());
        let mut vm = lock(&self.vm);
        if let Err(e) = vm.pause() {
            tracing::error!(error = %crate::error::chain(&e), "cannot stop a broken VM");
        }
    }

    fn broken(&self) -> Option<String> {
        lock(&self.broken).clone()
    }

    /// Advances the dirty-rate probe. The VM lock is held while the migrating flag is checked
    /// and logging is switched, and a migration sets its flag before it takes that lock to
    /// start its own logging: the probe can never switch off a migration's dirty log.
    fn probe_dirty_rate(&self, interval: std::time::Duration) {
        let vm = lock(&self.vm);
        let mut probe = lock(&self.probe);
        let now = Instant::now();
        if self.is_migrating() || vm.is_paused() || vm.crash_reason().is_some() {
            probe.started = None;
            return;
        }
        match probe.started {
            None if probe.next.is_none_or(|next| now >= next) && vm.start_dirty_log().is_ok() => {
                probe.started = Some(now);
            }
            Some(started)
                if now.duration_since(started) >= std::time::Duration::from_millis(900) =>
            {
                if let Ok(words) = vm.harvest_dirty() {
                    let pages: u64 = words
                        .iter()
                        .flatten()
                        .map(|w| u64::from(w.count_ones()))
                        .sum();
                    probe.rate = pages as f64 * 4096.0 / now.duration_since(started).as_secs_f64();
                }
                let _ = vm.stop_dirty_log();
                probe.started = None;
                probe.next = Some(now + interval);
            }
            _ => {}
        }
    }

    pub(crate) fn is_migrating(&self) -> bool {
        self.migrating.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct CpuUsage {
    last_cpu_seconds: f64,
    cores: f64,
}

#[derive(Debug, Default)]
struct Registry {
    vms: HashMap<String, Arc<VmEntry>>,
    /// Names being created or restored, with their memory, so two requests cannot take the same
    /// name or the same memory.
    reserved: HashMap<String, u64>,
}

impl Registry {
    fn memory_in_use(&self) -> u64 {
        self.vms.values().map(|e| e.memory_bytes).sum::<u64>() + self.reserved.values().sum::<u64>()
    }
}

#[derive(Debug)]
pub struct Manager {
    config: ManagerConfig,
    kvm: Mutex<Option<Arc<KvmHost>>>,
    registry: Mutex<Registry>,
    pub(crate) migrations: crate::migration::Migrations,
    memory_total: u64,
    pub(crate) resources: Arc<HostResources>,
    /// Why this VMM has nothing left to do (its VM moved away, was deleted, or never
    /// arrived); the process exits once nothing else holds it (`crate::process`).
    pub(crate) ended: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

/// Releases a name reservation however the creation ends.
struct Reservation<'a> {
    manager: &'a Manager,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.manager.registry).reserved.remove(&self.name);
    }
}

impl Manager {
    pub fn new(mut config: ManagerConfig) -> Result<Self, AgentError> {
        std::fs::create_dir_all(config.data_dir.join("vms")).map_err(|e| {
            AgentError::Internal(format!(
                "Cannot create data directory {}: {e}",
                config.data_dir.display()
            ))
        })?;
        // Paths the API reports are absolute, whatever the agent was started with.
        config.data_dir = config.data_dir.canonicalize().map_err(|e| {
            AgentError::Internal(format!(
                "Cannot resolve data directory {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let resources = HostResources::start(
            &config.name,
            &config.data_dir,
            config.resource_capacity_bytes,
            config.device_classes.clone(),
            config.migration_ip,
        )?;
        let manager = Manager {
            resources,
            migrations: crate::migration::Migrations::default(),
            kvm: Mutex::new(None),
            registry: Mutex::new(Registry::default()),
            memory_total: host::memory_total_bytes(),
            ended: Mutex::new(None),
            config,
        };
        // Open KVM now so a missing device shows in /v1/host from the start; creation retries.
        if let Err(e) = manager.kvm() {
            tracing::warn!(error = %e, "KVM unavailable; VMs cannot be created until it is");
        }
        Ok(manager)
    }

    /// Releases what this host keeps for a VM that moved away and was deleted elsewhere.
    pub fn release_moved(&self, vm: &str) -> Result<Vec<String>, AgentError> {
        validate_name(vm)?;
        if self.entry(vm).is_ok() || lock(&self.registry).reserved.contains_key(vm) {
            return Err(AgentError::Conflict(format!(
                "VM {vm:?} runs (or is arriving) here; delete it instead"
            )));
        }
        let released = self.resources.release_moved(vm);
        self.set_ended(format!("released what it kept for VM {vm:?}"));
        Ok(released)
    }

    /// The URL peers reach this agent's API at (for devices other hosts' VMs use).
    pub fn set_api_url(&self, url: String) {
        *lock(&self.resources.api_url) = Some(url);
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    pub(crate) fn kvm(&self) -> Result<Arc<KvmHost>, AgentError> {
        let mut kvm = lock(&self.kvm);
        if let Some(host) = kvm.as_ref() {
            return Ok(host.clone());
        }
        let host = Arc::new(
            KvmHost::open(&self.config.kvm_device, self.config.huge_pages)
                .map_err(|e| AgentError::KvmUnavailable(crate::error::chain(&e)))?,
        );
        *kvm = Some(host.clone());
        Ok(host)
    }

    pub(crate) fn entry(&self, name: &str) -> Result<Arc<VmEntry>, AgentError> {
        lock(&self.registry)
            .vms
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("No VM named {name:?} on this host")))
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.config.data_dir.join("vms").join(name)
    }

    pub(crate) fn placement(&self, name: &str) -> Result<VmPlacement, AgentError> {
        let dir = self.vm_dir(name);
        std::fs::create_dir_all(&dir).map_err(|e| {
            AgentError::Internal(format!("Cannot create VM directory {}: {e}", dir.display()))
        })?;
        let console_path = dir.join("console.log");
        // A new instance starts a new console log.
        let _ = std::fs::remove_file(&console_path);
        Ok(VmPlacement {
            name: name.to_owned(),
            console_path,
            attachments: Default::default(),
        })
    }

    /// Claims `name` and `memory_bytes` until `release` (for work that outlives a request).
    pub(crate) fn claim(&self, name: &str, memory_bytes: u64) -> Result<(), AgentError> {
        self.claim_inner(name, memory_bytes)
    }

    pub(crate) fn release(&self, name: &str) {
        lock(&self.registry).reserved.remove(name);
    }

    /// Claims `name` and `memory_bytes` of host memory for a VM about to be built, until the
    /// returned guard drops.
    fn reserve(&self, name: &str, memory_bytes: u64) -> Result<Reservation<'_>, AgentError> {
        self.claim(name, memory_bytes)?;
        Ok(Reservation {
            manager: self,
            name: name.to_owned(),
        })
    }

    fn claim_inner(&self, name: &str, memory_bytes: u64) -> Result<(), AgentError> {
        validate_name(name)?;
        let mut registry = lock(&self.registry);
        if registry.vms.contains_key(name) || registry.reserved.contains_key(name) {
            return Err(AgentError::Conflict(format!(
                "A VM named {name:?} already exists on this host"
            )));
        }
        let in_use = registry.memory_in_use();
        let limit = self
            .memory_total
            .saturating_sub(self.config.reserved_memory_bytes);
        if in_use + memory_bytes > limit {
            return Err(AgentError::InsufficientMemory(format!(
                "Not enough host memory for {} MiB: {} MiB of {} MiB usable are already assigned to VMs",
                memory_bytes / MIB,
                in_use / MIB,
                limit / MIB
            )));
        }
        registry.reserved.insert(name.to_owned(), memory_bytes);
        Ok(())
    }

    pub(crate) fn insert(&self, name: &str, entry: VmEntry) {
        lock(&self.registry)
            .vms
            .insert(name.to_owned(), Arc::new(entry));
        *lock(&self.ended) = None;
    }

    pub fn create(&self, req: &CreateVm) -> Result<VmInfo, AgentError> {
        let memory_bytes = validate_create(req)?;
        let _reservation = self.reserve(&req.name, memory_bytes)?;
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
            vm_error(&req.name, "create", e)
        })?;
        tracing::info!(
            vm = %req.name,
            vcpus = req.vcpus,
            memory_mib = req.memory_mib,
            guest = req.guest.kind(),
            ms = ms_since(started),
            "VM created"
        );
        self.insert(&req.name, VmEntry::new(vm, memory_bytes, None, resources));
        self.info(&req.name)
    }

    pub fn info(&self, name: &str) -> Result<VmInfo, AgentError> {
        let entry = self.entry(name)?;
        vm_info(&entry)
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let entries: Vec<Arc<VmEntry>> = lock(&self.registry).vms.values().cloned().collect();
        let mut infos: Vec<VmInfo> = entries.iter().filter_map(|e| vm_info(e).ok()).collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    pub fn delete(&self, name: &str) -> Result<(), AgentError> {
        if self.entry(name)?.is_migrating() {
            return Err(AgentError::Conflict(format!(
                "VM {name:?} is being migrated; cancel the migration first"
            )));
        }
        let resources = lock(&self.entry(name)?.resources).clone();
        self.remove(name)?;
        self.resources.delete_vm(name, &resources);
        self.set_ended(format!("VM {name:?} deleted"));
        Ok(())
    }

    /// Removes a VM whatever it is doing (a migration that completed removes its source).
    pub(crate) fn remove(&self, name: &str) -> Result<(), AgentError> {
        let entry = lock(&self.registry)
            .vms
            .remove(name)
            .ok_or_else(|| AgentError::NotFound(format!("No VM named {name:?} on this host")))?;
        // Dropping the last reference stops the vCPU threads and frees the memory. A request
        // still holding the entry finishes first. The console log stays for post-mortems until
        // a VM of the same name replaces it.
        drop(entry);
        tracing::info!(vm = %name, "VM deleted");
        Ok(())
    }

    pub fn pause(&self, name: &str) -> Result<VmInfo, AgentError> {
        let entry = self.entry(name)?;
        refuse_while_migrating(name, &entry)?;
        {
            let mut vm = lock(&entry.vm);
            if !vm.is_paused() {
                vm.pause().map_err(|e| vm_error(name, "pause", e))?;
            }
        }
        vm_info(&entry)
    }

    pub fn resume(&self, name: &str) -> Result<VmInfo, AgentError> {
        let entry = self.entry(name)?;
        refuse_while_migrating(name, &entry)?;
        if let Some(reason) = entry.broken() {
            return Err(AgentError::Conflict(format!(
                "VM {name:?} cannot resume: {reason}"
            )));
        }
        {
            let mut vm = lock(&entry.vm);
            if let Some(reason) = vm.crash_reason() {
                return Err(AgentError::Conflict(format!(
                    "VM {name:?} crashed and cannot resume: {reason}"
                )));
            }
            vm.resume();
        }
        vm_info(&entry)
    }

    pub fn console(&self, name: &str, max_bytes: u64) -> Result<Vec<u8>, AgentError> {
        let entry = self.entry(name)?;
        let path = lock(&entry.vm).devices().console_path().to_owned();
        godwit_daemon::run_dir::read_tail(&path, max_bytes)
            .map_err(|e| AgentError::Internal(format!("Cannot read console log: {e}")))
    }

    pub fn digest(&self, name: &str) -> Result<DigestInfo, AgentError> {
        let entry = self.entry(name)?;
        let vm = lock(&entry.vm);
        Ok(DigestInfo {
            digest: vm.digest().map_err(|e| vm_error(name, "hash", e))?,
            memory_bytes: vm.config().memory_bytes,
            paused: vm.is_paused(),
        })
    }

    /// Resolves an API path: relative paths live under the data directory.
    fn resolve(&self, path: &str) -> Result<PathBuf, AgentError> {
        if path.is_empty() {
            return Err(AgentError::BadRequest("path must not be empty".into()));
        }
        let p = Path::new(path);
        Ok(if p.is_absolute() {
            p.to_owned()
        } else {
            self.config.data_dir.join(p)
        })
    }

    pub fn snapshot(&self, name: &str, req: &SnapshotRequest) -> Result<SnapshotInfo, AgentError> {
        let entry = self.entry(name)?;
        refuse_while_migrating(name, &entry)?;
        let path = self.resolve(&req.path)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                AgentError::BadRequest(format!(
                    "Cannot create directory {} for the snapshot: {e}",
                    parent.display()
                ))
            })?;
        }
        let mut vm = lock(&entry.vm);
        if let Some(reason) = vm.crash_reason() {
            return Err(AgentError::Conflict(format!(
                "VM {name:?} crashed and cannot be snapshotted: {reason}"
            )));
        }
        let started = Instant::now();
        let was_paused = vm.is_paused();
        if !was_paused {
            vm.pause().map_err(|e| vm_error(name, "pause", e))?;
        }
        let pause_ms = ms_since(started);
        let result = (|| {
            let t = Instant::now();
            let state = vm.save_state().map_err(|e| vm_error(name, "save", e))?;
            let blob = state
                .encode()
                .map_err(|e| vm_error(name, "encode", e.into()))?;
            let save_state_ms = ms_since(t);
            let digest = vm.digest().map_err(|e| vm_error(name, "hash", e))?;
            let t = Instant::now();
            let summary = snapshot::write_snapshot(&path, &blob, vm.memory()).map_err(|e| {
                AgentError::Internal(format!(
                    "Cannot snapshot VM {name:?}: {}",
                    crate::error::chain(&e)
                ))
            })?;
            Ok::<_, AgentError>((summary, digest, save_state_ms, ms_since(t)))
        })();
        if !was_paused && !req.leave_paused {
            vm.resume();
        }
        let (summary, digest, save_state_ms, write_ms) = result?;
        let info = SnapshotInfo {
            path: path.display().to_string(),
            file_bytes: summary.bytes_written,
            memory_bytes: summary.memory_bytes,
            pages_stored: summary.pages_stored,
            zero_pages: summary.zero_pages,
            digest,
            pause_ms,
            save_state_ms,
            write_ms,
            total_ms: ms_since(started),
        };
        tracing::info!(vm = %name, path = %info.path, total_ms = info.total_ms, "snapshot written");
        Ok(info)
    }

    pub fn restore(&self, req: &RestoreRequest) -> Result<RestoreInfo, AgentError> {
        let started = Instant::now();
        let path = self.resolve(&req.path)?;
        validate_name(&req.name)?;
        let limits = SnapshotLimits::new(self.memory_total);
        let reader = SnapshotReader::open(&path, &limits).map_err(|e| {
            AgentError::BadRequest(format!(
                "Cannot restore from {}: {}",
                path.display(),
                crate::error::chain(&e)
            ))
        })?;
        let state = VmState::decode(reader.state()).map_err(|e| {
            AgentError::BadRequest(format!(
                "Cannot restore from {}: {}",
                path.display(),
                crate::error::chain(&e)
            ))
        })?;
        let memory_bytes = state.config.memory_bytes;
        let _reservation = self.reserve(&req.name, memory_bytes)?;
        let kvm = self.kvm()?;
        let t = Instant::now();
        let memory = memory::allocate(memory_bytes, kvm.huge_pages)
            .map_err(|e| vm_error(&req.name, "restore", e.into()))?;
        reader.read_memory_into(&memory).map_err(|e| {
            AgentError::BadRequest(format!(
                "Cannot restore from {}: {}",
                path.display(),
                crate::error::chain(&e)
            ))
        })?;
        let read_ms = ms_since(t);
        let t = Instant::now();
        let placement = self.placement(&req.name)?;
        let vm = MicroVm::restore(&kvm, &placement, &state, memory, req.paused)
            .map_err(|e| vm_error(&req.name, "restore", e))?;
        let restore_state_ms = ms_since(t);
        self.insert(
            &req.name,
            VmEntry::new(
                vm,
                memory_bytes,
                Some(path.display().to_string()),
                VmResources::default(),
            ),
        );
        let info = RestoreInfo {
            vm: self.info(&req.name)?,
            read_ms,
            restore_state_ms,
            total_ms: ms_since(started),
        };
        tracing::info!(vm = %req.name, path = %path.display(), total_ms = info.total_ms, "VM restored");
        Ok(info)
    }

    /// Samples the VM's CPU use and advances its dirty-rate probe; the VMM's background loop
    /// calls this every interval.
    pub fn sample(&self) {
        // A VM migrating away is not probed; its last pre-copy round measured its dirty rate.
        let measured_by_migration = self.migration_dirty_rates();
        let entries: Vec<(String, Arc<VmEntry>)> = lock(&self.registry)
            .vms
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        for (name, entry) in &entries {
            if let Some(interval) = self.config.dirty_probe_interval {
                entry.probe_dirty_rate(interval);
            }
            if let Some(rate) = measured_by_migration.get(name) {
                lock(&entry.probe).rate = *rate;
            }
            let cpu: f64 = lock(&entry.vm).vcpu_cpu_seconds().iter().sum();
            let mut usage = lock(&entry.usage);
            let delta = (cpu - usage.last_cpu_seconds).max(0.0);
            usage.cores = delta / crate::SAMPLE_INTERVAL.as_secs_f64();
            usage.last_cpu_seconds = cpu;
        }
    }

    /// What this VMM process holds, for its agent.
    pub fn status(&self) -> VmmStatus {
        let registry = lock(&self.registry);
        let vm = registry.vms.keys().next().cloned();
        let memory_bytes = registry.memory_in_use();
        let arriving = !registry.reserved.is_empty();
        drop(registry);
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
        let entries: Vec<Arc<VmEntry>> = lock(&self.registry).vms.drain().map(|(_, e)| e).collect();
        let n = entries.len();
        drop(entries);
        self.resources.shutdown();
        tracing::info!(vms = n, "VM stopped");
    }
}

fn vm_info(entry: &VmEntry) -> Result<VmInfo, AgentError> {
    let broken = entry.broken();
    let vm = lock(&entry.vm);
    // A broken VM's memory may have holes that block a reader: do not look.
    let status = match broken {
        Some(_) => vec![Default::default(); vm.config().vcpus as usize],
        None => vm
            .guest_status()
            .map_err(|e| vm_error(vm.name(), "inspect", e))?,
    };
    let state = vm_state(&vm, broken.is_some());
    let devices = if broken.is_some() {
        None
    } else {
        vm.guest_devices()
    };
    let crash_reason = broken.or_else(|| vm.crash_reason());
    let vcpu_cpu_seconds = vm.vcpu_cpu_seconds();
    Ok(VmInfo {
        name: vm.name().to_owned(),
        state,
        vcpus: vm.config().vcpus,
        memory_mib: vm.config().memory_bytes / MIB,
        guest: guest::summarize(vm.guest(), &status, devices),
        cpu_seconds: vcpu_cpu_seconds.iter().sum(),
        vcpu_cpu_seconds,
        cpu_usage_cores: lock(&entry.usage).cores,
        dirty_rate_bytes_s: lock(&entry.probe).rate,
        migrating: entry.is_migrating(),
        created_unix_ms: entry.created_unix_ms,
        console_bytes: vm.devices().console_bytes(),
        crash_reason,
        restored_from: entry.restored_from.clone(),
        resources: lock(&entry.resources).info(),
    })
}

/// The VM's lifecycle state as the API and the metrics report it.
fn vm_state(vm: &MicroVm, broken: bool) -> ApiVmState {
    if broken || vm.crash_reason().is_some() {
        ApiVmState::Crashed
    } else if vm.is_paused() {
        ApiVmState::Paused
    } else {
        ApiVmState::Running
    }
}

/// Maps a monitor error to the API: the caller's mistakes are 4xx, the host's are 5xx.
fn vm_error(name: &str, what: &str, e: VmError) -> AgentError {
    let message = format!("Cannot {what} VM {name:?}: {}", crate::error::chain(&e));
    match e {
        VmError::Invalid(_) | VmError::Guest(_) => AgentError::BadRequest(message),
        VmError::NotPaused => AgentError::Conflict(message),
        VmError::KvmUnavailable { .. } => AgentError::KvmUnavailable(message),
        VmError::Memory(memory::MemoryError::Map { .. }) => AgentError::InsufficientMemory(message),
        _ => AgentError::Internal(message),
    }
}

fn refuse_while_migrating(name: &str, entry: &VmEntry) -> Result<(), AgentError> {
    if entry.is_migrating() {
        return Err(AgentError::Conflict(format!(
            "VM {name:?} is being migrated; wait for the migration or cancel it"
        )));
    }
    Ok(())
}

/// Checks a creation request without touching anything (the agent calls this before it
/// spends memory or a process on it); returns the VM's memory in bytes.
pub fn validate_create(req: &CreateVm) -> Result<u64, AgentError> {
    if req.memory_mib == 0 {
        return Err(AgentError::BadRequest(
            "memory_mib must be at least 4".into(),
        ));
    }
    let memory_bytes = req.memory_mib.checked_mul(MIB).ok_or_else(|| {
        AgentError::BadRequest(format!("memory_mib {} is too large", req.memory_mib))
    })?;
    validate_name(&req.name)?;
    MicroVm::validate(req.vcpus, memory_bytes, &req.guest)
        .map_err(|e| vm_error(&req.name, "create", e))?;
    crate::resources::validate_specs(&req.resources)?;
    Ok(memory_bytes)
}

pub fn validate_name(name: &str) -> Result<(), AgentError> {
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
        Err(AgentError::BadRequest(format!(
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
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
