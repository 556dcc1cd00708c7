//! The agent: its VMs (through a backend), their records, and the operations its API offers.
//! Decisions that belong to the host live here: names and memory ([`Registry`]), what a
//! backend can do ([`Capabilities`]), and what happens to a VM whose process died. Everything
//! a running guest needs lives in its VMM process, not here.

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::join_all;
use godwit_api::{
    CreateVm, DigestInfo, HostInfo, IncomingAccepted, IncomingMigration, MigrateRequest,
    MigrationInfo, MigrationStarted, MigrationStatus, RestoreInfo, RestoreRequest, SnapshotInfo,
    SnapshotRequest, VmInfo,
};

use crate::backend::{Backend, Capabilities, CapabilityChecks, Exit};
use crate::error::{chain, Error};
use crate::metrics::Metrics;
use crate::migrations::MigrationBook;
use crate::registry::{Registry, Slot};
use crate::sampler::HostSampler;

const MIB: u64 = 1 << 20;

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub kvm_device: PathBuf,
    /// Host memory kept back from VMs, bytes.
    pub reserved_memory_bytes: u64,
    /// Operator labels of this host.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Space this host offers VM resource data (disks, scratch), bytes.
    pub resource_capacity_bytes: u64,
    /// Device classes this host offers VMs.
    pub device_classes: std::collections::BTreeSet<String>,
}

/// How long one sample waits for a VMM's answers.
const SAMPLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The agent's state.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    backend: Arc<dyn Backend>,
    pub(crate) registry: Registry,
    pub(crate) migrations: MigrationBook,
    pub metrics: Metrics,
    pub(crate) sampler: HostSampler,
}

/// VM names follow one rule everywhere (the VMM's).
pub fn validate_name(name: &str) -> Result<(), Error> {
    Ok(godwit_vmm::validate_name(name)?)
}

impl Agent {
    pub fn new(mut config: AgentConfig, backend: Arc<dyn Backend>) -> Result<Self, Error> {
        config.data_dir = godwit_daemon::run_dir::open_data_dir(&config.data_dir).map_err(|e| {
            Error::io(
                format!("open data directory {}", config.data_dir.display()),
                e,
            )
        })?;
        let memory_total = godwit_daemon::host::memory_total_bytes();
        let metrics = Metrics::new(&config.name);
        let sampler = HostSampler::new(&config.kvm_device);
        metrics
            .host_cores
            .set(f64::from(godwit_daemon::host::cores()));
        metrics.host_memory_bytes.set(memory_total as f64);
        Ok(Agent {
            registry: Registry::new(
                memory_total.saturating_sub(config.reserved_memory_bytes),
                config.resource_capacity_bytes,
            ),
            migrations: MigrationBook::load(&config.data_dir, &config.name),
            metrics,
            sampler,
            backend,
            config,
        })
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn capabilities(&self) -> Capabilities {
        self.backend.capabilities()
    }

    /// The refusal of a request the host's backend cannot carry out.
    fn unsupported(&self, what: &str) -> Error {
        Error::Unsupported {
            backend: self.capabilities().backend,
            what: what.to_owned(),
        }
    }

    /// Finds the VMs whose processes outlived the last agent (or died meanwhile) and takes
    /// them on again.
    pub async fn adopt(&self) -> usize {
        let found = self.backend.adopt().await;
        let n = found.len();
        for a in found {
            let slot = Slot::new(&a.name, a.handle.clone(), 0);
            if let Some(info) = a.last_info {
                slot.set_info(info);
            }
            let slot = self.registry.insert(slot);
            self.refresh(&slot).await;
        }
        n
    }

    /// Tells every running VM process where this agent's API is (it may have moved since the
    /// process was started by an earlier agent).
    pub async fn announce_url(&self, url: &str) {
        let slots = self.registry.slots();
        join_all(slots.iter().filter(|s| s.handle.exited().is_none()).map(|slot| async move {
            if let Err(e) = slot.handle.set_agent_url(url).await {
                tracing::warn!(vm = %slot.name, error = %chain(&e), "cannot tell a VMM the agent's URL");
            }
        }))
        .await;
    }

    /// Asks a slot's process what it holds now (and notes a death).
    /// Returns whether it answered.
    pub(crate) async fn refresh(&self, slot: &Arc<Slot>) -> bool {
        if slot.handle.exited().is_some() {
            return false;
        }
        let Ok(status) = slot.handle.status().await else {
            return false;
        };
        let has_vm = status.vm.is_some();
        slot.set_status(status);
        if has_vm {
            if let Ok(info) = slot.handle.info().await {
                self.metrics.vm_seen(&info);
                slot.set_info(info);
            }
        } else {
            // It moved away (the process keeps things for it) or has not arrived yet.
            self.metrics.forget_vm(&slot.name);
        }
        true
    }

    pub async fn create(&self, req: &CreateVm) -> Result<VmInfo, Error> {
        validate_name(&req.name)?;
        self.backend.validate(req)?;
        let memory_bytes = req.memory_mib * MIB;
        if !req.resources.is_empty() && !self.capabilities().resources {
            return Err(self.unsupported("bind VM resources"));
        }
        let disk_bytes: u64 = req.resources.iter().map(|s| s.size_bytes()).sum();
        self.settle(&req.name).await;
        let reservation = self
            .registry
            .reserve(&req.name, memory_bytes, disk_bytes, false)?;
        let budget = self.registry.disk_free() + disk_bytes;
        let (handle, info) = self.backend.create(req, budget).await?;
        let slot = Slot::new(&req.name, handle, memory_bytes);
        slot.set_info(info.clone());
        let slot = self.registry.insert(slot);
        drop(reservation);
        self.refresh(&slot).await;
        tracing::info!(vm = %req.name, pid = slot.handle.pid(), "VM created");
        Ok(info)
    }

    pub async fn restore(&self, req: &RestoreRequest) -> Result<RestoreInfo, Error> {
        validate_name(&req.name)?;
        if !self.capabilities().snapshot {
            return Err(self.unsupported("restore snapshots"));
        }
        let result = self.restore_checked(req).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .snapshots
            .with_label_values(&["restore", outcome])
            .inc();
        result
    }

    async fn restore_checked(&self, req: &RestoreRequest) -> Result<RestoreInfo, Error> {
        // Checked before a VMM is started for it (which checks it again).
        godwit_daemon::paths::confine(&self.config.data_dir, &req.path)?;
        // The snapshot says how much memory it needs; the VMM reads it, and the memory is
        // checked against what is free once it has.
        let reservation = self.registry.reserve(&req.name, 0, 0, false)?;
        let (handle, info) = self.backend.restore(req).await?;
        let memory_bytes = info.vm.memory_mib * MIB;
        let slot = Slot::new(&req.name, handle.clone(), memory_bytes);
        slot.set_info(info.vm.clone());
        drop(reservation);
        let slot = self.registry.insert(slot);
        if self.registry.memory_used() > self.registry_limit() {
            let _ = handle.stop().await;
            self.registry.remove(&slot);
            return Err(Error::SnapshotTooBig {
                mib: info.vm.memory_mib,
                path: req.path.clone(),
            });
        }
        self.refresh(&slot).await;
        Ok(info)
    }

    fn registry_limit(&self) -> u64 {
        godwit_daemon::host::memory_total_bytes().saturating_sub(self.config.reserved_memory_bytes)
    }

    /// The target side of a migration: a VMM (new, or the one that keeps things for a VM of
    /// this name that left earlier) gets ready to receive the VM.
    pub async fn incoming(&self, req: &IncomingMigration) -> Result<IncomingAccepted, Error> {
        validate_name(&req.vm)?;
        self.capabilities().check_mode(req.mode)?;
        let memory_bytes = req
            .memory_mib
            .checked_mul(MIB)
            .filter(|&b| b > 0)
            .ok_or_else(|| Error::Invalid("memory_mib is out of range".into()))?;
        self.settle(&req.vm).await;
        let reservation = self.registry.reserve(&req.vm, memory_bytes, 0, true)?;
        let existing = self
            .registry
            .get(&req.vm)
            .filter(|s| s.handle.exited().is_none())
            .map(|s| s.handle.clone());
        let budget = self.registry.disk_free();
        let (handle, accepted) = self.backend.incoming(req, existing.clone(), budget).await?;
        if existing.is_none() {
            self.registry
                .insert(Slot::new(&req.vm, handle, memory_bytes));
        }
        drop(reservation);
        self.migrations.started(&req.id, &req.vm);
        if let Some(slot) = self.registry.get(&req.vm) {
            self.refresh(&slot).await;
        }
        Ok(accepted)
    }

    /// The slot of VM `name` as it is now: a process that just received its VM is asked
    /// again rather than trusting the last sample, one that ended on purpose has no VM.
    async fn vm_slot(&self, name: &str) -> Result<Arc<Slot>, Error> {
        let not_found = || Error::NoSuchVm { name: name.into() };
        let slot = self.registry.get(name).ok_or_else(not_found)?;
        match slot.handle.exited() {
            Some(Exit::Done(_)) => return Err(not_found()),
            Some(Exit::Crashed(_)) => {}
            None if !slot.has_vm() => {
                self.refresh(&slot).await;
            }
            None => {}
        }
        if slot.has_vm() {
            Ok(slot)
        } else {
            Err(not_found())
        }
    }

    /// Brings the slot of `name` up to date before the name is reused: a process that ended
    /// on purpose is forgotten, a live one is asked what it holds now.
    async fn settle(&self, name: &str) {
        let Some(slot) = self.registry.get(name) else {
            return;
        };
        match slot.handle.exited() {
            Some(exit @ Exit::Done(_)) => self.ended(&slot, exit),
            Some(Exit::Crashed(_)) => {}
            None => {
                let answered = self.refresh(&slot).await;
                // A process with nothing left is on its way out: let it go first.
                let leaving = slot.status().is_none_or(|s| {
                    s.vm.is_none() && !s.arriving && s.keeps.is_empty() && s.ended.is_some()
                });
                if !answered || leaving {
                    slot.handle
                        .wait_exit(std::time::Duration::from_secs(3))
                        .await;
                    if let Some(exit @ Exit::Done(_)) = slot.handle.exited() {
                        self.ended(&slot, exit);
                    }
                }
            }
        }
    }

    pub async fn info(&self, name: &str) -> Result<VmInfo, Error> {
        let slot = self.vm_slot(name).await?;
        if let Some(info) = slot.crashed_info() {
            self.metrics.vm_seen(&info);
            return Ok(info);
        }
        match slot.handle.info().await {
            Ok(info) => {
                slot.set_info(info.clone());
                Ok(info)
            }
            // A process that stops answering may just have died: say so if it did.
            Err(e) if e.is_unreachable() => {
                slot.handle
                    .wait_exit(std::time::Duration::from_millis(500))
                    .await;
                match slot.handle.exited() {
                    Some(Exit::Done(_)) => Err(Error::NoSuchVm { name: name.into() }),
                    Some(Exit::Crashed(_)) => {
                        let info = slot.crashed_info().ok_or(e)?;
                        self.metrics.vm_seen(&info);
                        Ok(info)
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Every VM here, running or crashed. Every VMM is asked at once, so one slow to answer
    /// holds the list up by its own time only.
    pub async fn list(&self) -> Vec<VmInfo> {
        let slots = self.registry.slots();
        let answers = join_all(slots.iter().map(|slot| self.info(&slot.name))).await;
        let mut out = Vec::new();
        for (slot, answer) in slots.iter().zip(answers) {
            match answer {
                Ok(info) => out.push(info),
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(vm = %slot.name, error = %chain(&e), "cannot describe a VM");
                    if let Some(info) = slot.last_info() {
                        out.push(info);
                    }
                }
            }
        }
        out
    }

    /// The VMs as last sampled (for heartbeats: no call to every VMM).
    pub fn list_cached(&self) -> Vec<VmInfo> {
        self.registry
            .slots()
            .iter()
            .filter(|s| s.has_vm())
            .filter_map(|s| s.crashed_info().or_else(|| s.last_info()))
            .collect()
    }

    /// A VM whose process runs.
    async fn live(&self, name: &str) -> Result<Arc<Slot>, Error> {
        let slot = self.vm_slot(name).await?;
        if let Some(Exit::Crashed(how)) = slot.handle.exited() {
            return Err(Error::Crashed {
                name: name.into(),
                how,
            });
        }
        Ok(slot)
    }

    pub async fn pause(&self, name: &str) -> Result<VmInfo, Error> {
        self.live(name).await?.handle.pause().await
    }

    pub async fn resume(&self, name: &str) -> Result<VmInfo, Error> {
        self.live(name).await?.handle.resume().await
    }

    pub async fn console(&self, name: &str, max_bytes: u64) -> Result<Vec<u8>, Error> {
        self.vm_slot(name).await?.handle.console(max_bytes).await
    }

    pub async fn digest(&self, name: &str) -> Result<DigestInfo, Error> {
        self.live(name).await?.handle.digest().await
    }

    pub async fn snapshot(&self, name: &str, req: &SnapshotRequest) -> Result<SnapshotInfo, Error> {
        if !self.capabilities().snapshot {
            return Err(self.unsupported("write snapshots"));
        }
        // The VMM checks it too; a bad path is refused before it reaches one.
        godwit_daemon::paths::confine(&self.config.data_dir, &req.path)?;
        let result = self.live(name).await?.handle.snapshot(req).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .snapshots
            .with_label_values(&["snapshot", outcome])
            .inc();
        result
    }

    pub async fn migrate(
        &self,
        name: &str,
        req: &MigrateRequest,
    ) -> Result<MigrationStarted, Error> {
        self.capabilities().check_mode(req.mode)?;
        let slot = self.live(name).await?;
        let started = slot.handle.migrate(req).await?;
        self.migrations.started(&started.id, name);
        // Meter it from its first moment.
        if let Ok(info) = slot.handle.migration(&started.id).await {
            self.migrations.observe(info, &self.metrics);
        }
        Ok(started)
    }

    /// A migration's record: fresh from its VMM while that runs, else as last known.
    pub async fn migration(&self, id: &str) -> Result<MigrationInfo, Error> {
        let not_found = || Error::NoSuchMigration { id: id.into() };
        let (vm, last) = self.migrations.get(id).ok_or_else(not_found)?;
        if last.status == MigrationStatus::Running {
            if let Some(slot) = self.registry.get(&vm) {
                if let Ok(info) = slot.handle.migration(id).await {
                    self.migrations.observe(info.clone(), &self.metrics);
                    return Ok(info);
                }
            }
            if let Some(info) = self.migrations.read_record(id) {
                self.migrations.observe(info.clone(), &self.metrics);
                return Ok(info);
            }
        }
        if last.started_unix_ms == 0 && last.status == MigrationStatus::Running {
            // Known by id only, and its VMM cannot say more yet. (One whose VMM died first
            // is answered: failed, orphaned, with why.)
            return Err(not_found());
        }
        Ok(last)
    }

    pub async fn migrations(&self) -> Vec<MigrationInfo> {
        for slot in self.registry.slots() {
            if slot.handle.exited().is_none() {
                if let Ok(list) = slot.handle.migrations().await {
                    for info in list {
                        self.migrations.observe(info, &self.metrics);
                    }
                }
            }
        }
        self.migrations
            .all()
            .into_iter()
            .filter(|i| i.started_unix_ms != 0)
            .collect()
    }

    pub async fn cancel_migration(&self, id: &str) -> Result<MigrationInfo, Error> {
        self.migration_handle(id)?.cancel(id).await
    }

    /// `godwit migrate resume`: a paused post-copy sent from here reconnects now.
    pub async fn resume_migration(&self, id: &str) -> Result<MigrationInfo, Error> {
        self.migration_handle(id)?.resume_migration(id).await
    }

    /// The live VMM that runs migration `id`.
    fn migration_handle(&self, id: &str) -> Result<Arc<dyn crate::backend::VmHandle>, Error> {
        let (vm, _) = self
            .migrations
            .get(id)
            .ok_or_else(|| Error::NoSuchMigration { id: id.into() })?;
        let slot = self
            .registry
            .get(&vm)
            .filter(|s| s.handle.exited().is_none())
            .ok_or_else(|| Error::MigrationGone { id: id.into() })?;
        Ok(slot.handle.clone())
    }

    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        let slot = self.vm_slot(name).await?;
        match slot.handle.exited() {
            Some(_) => self.forget_dead(&slot),
            None => {
                slot.handle.delete().await?;
                self.registry.remove(&slot);
            }
        }
        self.metrics.forget_vm(name);
        tracing::info!(vm = %name, "VM deleted");
        Ok(())
    }

    /// Forgets a VM whose process died: its run state and resource data go.
    fn forget_dead(&self, slot: &Arc<Slot>) {
        let run_dir = self.config.data_dir.join("vms").join(&slot.name);
        let _ = std::fs::remove_file(run_dir.join("vmm.pid"));
        let _ = std::fs::remove_file(run_dir.join("vmm.sock"));
        let _ = std::fs::remove_file(run_dir.join(crate::backend::microvm::LAST_INFO_FILE));
        let data = self.config.data_dir.join("resources").join(&slot.name);
        if data.exists() {
            if let Err(e) = std::fs::remove_dir_all(&data) {
                tracing::warn!(vm = %slot.name, error = %e, "cannot remove the resource data of a crashed VM");
            }
        }
        self.registry.remove(slot);
    }

    /// Releases what this host keeps for a VM that moved away and was deleted elsewhere.
    pub async fn release_moved(&self, vm: &str) -> Result<Vec<String>, Error> {
        validate_name(vm)?;
        let Some(slot) = self.registry.get(vm) else {
            return Ok(Vec::new());
        };
        if slot.has_vm() || self.registry.is_reserved(vm) {
            return Err(Error::StillHere { name: vm.into() });
        }
        if slot.handle.exited().is_some() {
            self.registry.remove(&slot);
            return Ok(Vec::new());
        }
        let released = slot.handle.release_moved().await?;
        self.registry.remove(&slot);
        Ok(released)
    }

    /// Stops every VM on purpose (`--stop-vms-on-exit`).
    pub async fn stop_all(&self) {
        for slot in self.registry.slots() {
            if let Err(e) = slot.handle.stop().await {
                tracing::warn!(vm = %slot.name, error = %e, "cannot stop a VM");
            }
            self.registry.remove(&slot);
        }
    }

    /// One sample: each VM's process asked what it holds, deaths noted, migrations and host
    /// load metered. The agent's background loop calls this every second. The VMMs are asked
    /// at once, each for at most [`SAMPLE_TIMEOUT`]: a hung VMM keeps its last sample and holds
    /// up no other.
    pub async fn sample(&self) {
        let slots = self.registry.slots();
        join_all(slots.iter().map(|slot| async move {
            match slot.handle.exited() {
                None => {
                    let asked = tokio::time::timeout(SAMPLE_TIMEOUT, async {
                        self.refresh(slot).await;
                        if let Ok(list) = slot.handle.migrations().await {
                            for info in list {
                                self.migrations.observe(info, &self.metrics);
                            }
                        }
                    })
                    .await;
                    if asked.is_err() {
                        tracing::warn!(vm = %slot.name, pid = slot.handle.pid(), "VMM did not answer the sample in time");
                    }
                    if let Some(info) = slot.last_info() {
                        self.sampler.keep_last_info(&self.config.data_dir, &info);
                    }
                }
                Some(exit) => self.ended(slot, exit),
            }
        }))
        .await;
        let (_, counts) = self.migrations.in_progress();
        self.metrics.set_in_progress(&counts);
        let info = self.host_info();
        self.sampler.meter_host(&self.metrics, &info);
    }

    /// A slot's process is gone: a VM that ended on purpose is forgotten, a crashed one stays
    /// listed as crashed until deleted. Migrations it ran end with their record (or, if it
    /// died first, failed with why).
    fn ended(&self, slot: &Arc<Slot>, exit: Exit) {
        for id in self.migrations.running_of(&slot.name) {
            match self.migrations.read_record(&id) {
                Some(info) if info.status != MigrationStatus::Running => {
                    self.migrations.observe(info, &self.metrics)
                }
                _ => {
                    let why = match &exit {
                        Exit::Crashed(how) => format!("The VM's VMM process died: {how}"),
                        Exit::Done(why) => format!("The VM's VMM process ended: {why}"),
                    };
                    self.migrations.fail_orphan(&id, &why, &self.metrics);
                }
            }
        }
        match exit {
            Exit::Done(why) => {
                tracing::info!(vm = %slot.name, pid = slot.handle.pid(), %why, "VMM ended");
                if !self.registry.is_reserved(&slot.name) {
                    self.metrics.forget_vm(&slot.name);
                }
                self.registry.remove(slot);
            }
            Exit::Crashed(how) => {
                if !slot.has_vm() {
                    tracing::warn!(vm = %slot.name, %how, "a VMM without a VM died");
                    self.registry.remove(slot);
                    return;
                }
                if let Some(info) = slot.crashed_info() {
                    self.metrics.vm_seen(&info);
                }
            }
        }
    }

    pub fn host_info(&self) -> HostInfo {
        let slots = self.registry.slots();
        let vms: Vec<VmInfo> = slots
            .iter()
            .filter(|s| s.has_vm())
            .filter_map(|s| s.crashed_info().or_else(|| s.last_info()))
            .collect();
        let cores = godwit_daemon::host::cores();
        let used_cores: f64 = vms.iter().map(|v| v.cpu_usage_cores).sum();
        let (kvm_available, kvm_error) = self.sampler.kvm();
        let (in_flight, _) = self.migrations.in_progress();
        HostInfo {
            name: self.config.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cores,
            memory_total_mib: godwit_daemon::host::memory_total_bytes() / MIB,
            memory_vms_mib: self.registry.memory_used() / MIB,
            vm_count: vms.len() as u32,
            vms_cpu_load: (used_cores / f64::from(cores.max(1))).clamp(0.0, 1.0),
            host_cpu_busy: self.sampler.busy(),
            kvm_available,
            kvm_error,
            labels: self.config.labels.clone(),
            migrations_in_flight: in_flight,
            disk_free_bytes: self.registry.disk_free(),
            device_classes: self.config.device_classes.iter().cloned().collect(),
            backends: vec![self.capabilities()],
        }
    }

    /// `n` bytes from this host's entropy device, for a VM elsewhere that reads it (GR).
    pub fn read_entropy(&self, n: usize) -> Result<Vec<u8>, Error> {
        use std::io::Read;
        if !self.config.device_classes.contains("entropy") {
            return Err(Error::NoEntropy);
        }
        let mut buf = vec![0u8; n];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut buf))
            .map_err(|e| Error::io("read the entropy device", e))?;
        Ok(buf)
    }
}
