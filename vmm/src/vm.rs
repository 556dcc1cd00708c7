//! The VM this VMM runs, and what can be done to it: inspect, pause/resume, console, digest,
//! snapshot, CPU and dirty-rate sampling. [`crate::vmm`] owns the slot the VM lives in and its
//! creation and end; [`crate::migration`] moves it.
//!
//! Every method blocks (KVM calls, memory copies, file I/O): the HTTP layer calls them on
//! tokio's blocking pool. The VM's mutex serialises operations on it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use godwit_api::{DigestInfo, SnapshotInfo, VmInfo, VmState as ApiVmState};

use crate::error::VmmError;
use crate::guest;
use crate::microvm::layout::MIB;
use crate::microvm::postcopy::PostcopyMemory;
use crate::microvm::MicroVm;
use crate::resources::VmResources;
use crate::snapshot;

/// The VM and what the VMM tracks about it.
#[derive(Debug)]
pub struct Vm {
    name: String,
    vm: Mutex<MicroVm>,
    /// Fixed for the VM's life; kept outside the VM's lock so accounting never waits on it.
    memory_bytes: u64,
    created_unix_ms: u64,
    restored_from: Option<String>,
    usage: Mutex<CpuUsage>,
    /// A migration of this VM is under way: no delete, pause, resume, snapshot or second
    /// migration meanwhile.
    migrating: AtomicBool,
    probe: Mutex<DirtyProbe>,
    /// Why this VM can never run again here (a post-copy that broke with pages missing).
    broken: Mutex<Option<String>>,
    /// Its memory is still arriving (post-copy): a vCPU may wait in the kernel for a page for
    /// as long as the source takes, so nothing that waits for every vCPU may run meanwhile
    /// (the dirty-rate probe's memory-slot update would, holding the VM's lock).
    memory_arriving: AtomicBool,
    /// The userfaultfd of a post-copy that broke: kept so that a missing page blocks whoever
    /// touches it rather than read as zeros, and released first when the VM goes (so vCPUs
    /// blocked on a missing page can be stopped).
    postcopy_memory: Mutex<Option<Arc<PostcopyMemory>>>,
    /// Its resources as bound on this host.
    resources: Mutex<VmResources>,
}

/// The periodic dirty-rate measurement: dirty logging on for about a second, then the pages
/// it caught divided by the time.
#[derive(Debug, Default)]
struct DirtyProbe {
    started: Option<Instant>,
    next: Option<Instant>,
    rate: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct CpuUsage {
    last_cpu_seconds: f64,
    cores: f64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

impl Vm {
    pub(crate) fn new(
        vm: MicroVm,
        memory_bytes: u64,
        restored_from: Option<String>,
        resources: VmResources,
    ) -> Self {
        Vm {
            name: vm.name().to_owned(),
            vm: Mutex::new(vm),
            memory_bytes,
            created_unix_ms: now_unix_ms(),
            restored_from,
            usage: Mutex::new(CpuUsage::default()),
            migrating: AtomicBool::new(false),
            probe: Mutex::new(DirtyProbe::default()),
            broken: Mutex::new(None),
            memory_arriving: AtomicBool::new(false),
            postcopy_memory: Mutex::new(None),
            resources: Mutex::new(resources),
        }
    }

    /// Keeps a broken post-copy's registration for as long as the VM exists.
    pub(crate) fn hold_postcopy_memory(&self, memory: Arc<PostcopyMemory>) {
        *lock(&self.postcopy_memory) = Some(memory);
    }

    /// Marks the VM's memory as still arriving by post-copy, or complete.
    pub(crate) fn set_memory_arriving(&self, arriving: bool) {
        self.memory_arriving.store(arriving, Ordering::Release);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// The monitor, locked (a migration's source reads and steers the VM through it).
    pub(crate) fn monitor(&self) -> MutexGuard<'_, MicroVm> {
        lock(&self.vm)
    }

    pub(crate) fn resources(&self) -> VmResources {
        lock(&self.resources).clone()
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

    pub fn is_migrating(&self) -> bool {
        self.migrating.load(Ordering::Acquire)
    }

    /// Marks the VM as migrating, unless it already is.
    pub(crate) fn start_migrating(&self) -> Result<(), VmmError> {
        self.refuse_while_arriving()?;
        self.migrating
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(drop)
            .map_err(|_| VmmError::AlreadyMigrating {
                name: self.name.clone(),
            })
    }

    /// The operator can act on this copy again (its migration ended without moving it).
    pub(crate) fn stop_migrating(&self) {
        self.migrating.store(false, Ordering::Release);
    }

    /// Refuses what would wait for a vCPU, or move or save memory, while post-copy still
    /// brings pages in.
    fn refuse_while_arriving(&self) -> Result<(), VmmError> {
        if self.memory_arriving.load(Ordering::Acquire) {
            return Err(VmmError::Arriving {
                name: self.name.clone(),
            });
        }
        Ok(())
    }

    fn refuse_while_migrating(&self) -> Result<(), VmmError> {
        self.refuse_while_arriving()?;
        if self.is_migrating() {
            return Err(VmmError::Migrating {
                name: self.name.clone(),
            });
        }
        Ok(())
    }

    /// The refusal for operations on a VM being migrated away, for deletion.
    pub(crate) fn refuse_delete_while_migrating(&self) -> Result<(), VmmError> {
        self.refuse_while_arriving()?;
        if self.is_migrating() {
            return Err(VmmError::MigratingNoDelete {
                name: self.name.clone(),
            });
        }
        Ok(())
    }

    /// The crash that keeps the VM from `op`, if it crashed.
    pub(crate) fn refuse_if_crashed(vm: &MicroVm, op: &'static str) -> Result<(), VmmError> {
        match vm.crash_reason() {
            Some(reason) => Err(VmmError::Crashed {
                name: vm.name().to_owned(),
                op,
                reason,
            }),
            None => Ok(()),
        }
    }

    pub fn info(&self) -> Result<VmInfo, VmmError> {
        let broken = self.broken();
        let vm = lock(&self.vm);
        // A broken VM's memory may have holes that block a reader: do not look.
        let status = match broken {
            Some(_) => vec![Default::default(); vm.config().vcpus as usize],
            None => vm
                .guest_status()
                .map_err(|e| VmmError::vm(&self.name, "inspect", e))?,
        };
        let state = if broken.is_some() || vm.crash_reason().is_some() {
            ApiVmState::Crashed
        } else if vm.is_paused() {
            ApiVmState::Paused
        } else {
            ApiVmState::Running
        };
        let devices = if broken.is_some() {
            None
        } else {
            vm.guest_devices()
        };
        let crash_reason = broken.or_else(|| vm.crash_reason());
        let vcpu_cpu_seconds = vm.vcpu_cpu_seconds();
        Ok(VmInfo {
            name: self.name.clone(),
            state,
            vcpus: vm.config().vcpus,
            memory_mib: vm.config().memory_bytes / MIB,
            guest: guest::summarize(vm.guest(), &status, devices),
            cpu_seconds: vcpu_cpu_seconds.iter().sum(),
            vcpu_cpu_seconds,
            cpu_usage_cores: lock(&self.usage).cores,
            dirty_rate_bytes_s: lock(&self.probe).rate,
            migrating: self.is_migrating(),
            created_unix_ms: self.created_unix_ms,
            console_bytes: vm.devices().console_bytes(),
            crash_reason,
            restored_from: self.restored_from.clone(),
            resources: lock(&self.resources).info(),
        })
    }

    pub fn pause(&self) -> Result<VmInfo, VmmError> {
        self.refuse_while_migrating()?;
        {
            let mut vm = lock(&self.vm);
            if !vm.is_paused() {
                vm.pause()
                    .map_err(|e| VmmError::vm(&self.name, "pause", e))?;
            }
        }
        self.info()
    }

    pub fn resume(&self) -> Result<VmInfo, VmmError> {
        self.refuse_while_migrating()?;
        if let Some(reason) = self.broken() {
            return Err(VmmError::Broken {
                name: self.name.clone(),
                reason,
            });
        }
        {
            let mut vm = lock(&self.vm);
            Self::refuse_if_crashed(&vm, "resume")?;
            vm.resume();
        }
        self.info()
    }

    /// The last `max_bytes` of the guest's serial console.
    pub fn console(&self, max_bytes: u64) -> Result<Vec<u8>, VmmError> {
        let path = lock(&self.vm).devices().console_path().to_owned();
        godwit_daemon::run_dir::read_tail(&path, max_bytes)
            .map_err(|e| VmmError::io("read the console log", e))
    }

    pub fn digest(&self) -> Result<DigestInfo, VmmError> {
        let vm = lock(&self.vm);
        Ok(DigestInfo {
            digest: vm
                .digest()
                .map_err(|e| VmmError::vm(&self.name, "hash", e))?,
            memory_bytes: vm.config().memory_bytes,
            paused: vm.is_paused(),
        })
    }

    /// Writes the VM's state and memory to `path`; the VM pauses meanwhile and resumes after
    /// unless `leave_paused`.
    pub fn snapshot(&self, path: &Path, leave_paused: bool) -> Result<SnapshotInfo, VmmError> {
        self.refuse_while_migrating()?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| VmmError::SnapshotDir {
                path: parent.to_owned(),
                source,
            })?;
        }
        let name = self.name.as_str();
        let mut vm = lock(&self.vm);
        Self::refuse_if_crashed(&vm, "be snapshotted")?;
        let started = Instant::now();
        let was_paused = vm.is_paused();
        if !was_paused {
            vm.pause().map_err(|e| VmmError::vm(name, "pause", e))?;
        }
        let pause_ms = ms_since(started);
        let result = (|| {
            let t = Instant::now();
            let state = vm.save_state().map_err(|e| VmmError::vm(name, "save", e))?;
            let blob = state.encode().map_err(|source| VmmError::EncodeState {
                name: name.to_owned(),
                source,
            })?;
            let save_state_ms = ms_since(t);
            let digest = vm.digest().map_err(|e| VmmError::vm(name, "hash", e))?;
            let t = Instant::now();
            let summary = snapshot::write_snapshot(path, &blob, vm.memory()).map_err(|source| {
                VmmError::SnapshotWrite {
                    name: name.to_owned(),
                    source,
                }
            })?;
            Ok::<_, VmmError>((summary, digest, save_state_ms, ms_since(t)))
        })();
        if !was_paused && !leave_paused {
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

    /// One sample: the CPU the vCPUs used since the last one (over `interval`), and the
    /// dirty-rate probe advanced (`probe_every` apart; None = never). `migration_rate` is the
    /// rate a migration of the VM measured, which replaces the probe's meanwhile.
    pub(crate) fn sample(
        &self,
        interval: Duration,
        probe_every: Option<Duration>,
        migration_rate: Option<f64>,
    ) {
        if let Some(every) = probe_every {
            self.probe_dirty_rate(every);
        }
        if let Some(rate) = migration_rate {
            lock(&self.probe).rate = rate;
        }
        let cpu: f64 = lock(&self.vm).vcpu_cpu_seconds().iter().sum();
        let mut usage = lock(&self.usage);
        let delta = (cpu - usage.last_cpu_seconds).max(0.0);
        usage.cores = delta / interval.as_secs_f64();
        usage.last_cpu_seconds = cpu;
    }

    /// Advances the dirty-rate probe. The VM lock is held while the migrating flag is checked
    /// and logging is switched, and a migration sets its flag before it takes that lock to
    /// start its own logging: the probe can never switch off a migration's dirty log.
    fn probe_dirty_rate(&self, interval: Duration) {
        if self.memory_arriving.load(Ordering::Acquire) {
            return;
        }
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
            Some(started) if now.duration_since(started) >= Duration::from_millis(900) => {
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
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A broken post-copy's vCPUs may wait in the kernel for a page that never comes:
        // closing the userfaultfd lets those faults finish (as zeros, in a VM being thrown
        // away) so the vCPU threads can be stopped when the VM's fields drop next.
        drop(lock(&self.postcopy_memory).take());
    }
}
