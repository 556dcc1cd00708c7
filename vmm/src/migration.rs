//! Live migration of the VMM's VM: the source and target sides of page-transfer's engine bound
//! to the microVM, the migrate / incoming operations the API offers, and the records of this
//! process's migrations ([`Migrations`]: status, cancel, and the file each leaves behind).
//!
//! Flow: the source agent's `migrate` asks the target agent (HTTP, `POST
//! /v1/migrations/incoming`) to reserve the name and memory and to listen for the migration's
//! channels; then a source thread runs the engine against the target's port. The target builds
//! the VM from the incoming state and registers it under the same name when it starts; the
//! source removes its copy once the target confirms every page arrived.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use godwit_api::{
    CompressMode, IncomingAccepted, IncomingMigration, MigrateRequest, MigrationInfo,
    MigrationPhase, MigrationStarted, MigrationStatus,
};
use page_transfer::bitmap::PageBitmap;
use page_transfer::channel::{ClientSecurity, ServerSecurity};
use page_transfer::codec::Compression;
use page_transfer::progress::Progress;
use page_transfer::source::SourceConfig;
use page_transfer::target::ReceiveOptions;
use page_transfer::vm::{IncomingSetup, Region, SourceVm, TargetFactory, TargetVm, VmAccessError};
use page_transfer::MigrationError;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{chain, CancelRefusal, VmmError};
use crate::microvm::layout::MIB;
use crate::microvm::memory::{self, GuestMemory};
use crate::microvm::postcopy::{self, PostcopyMemory};
use crate::microvm::state::{VmConfig, VmState};
use crate::microvm::{KvmHost, MicroVm, PreparedVm};
use crate::resolve::{self, Resolution};
use crate::resources::plan::{self as resource_plan, MigrationPlan};
use crate::resources::transfer::{Incoming, SourceTransfer};
use crate::vm::{now_unix_ms, Vm};
use crate::vmm::{HostConfig, Vmm};

/// How often a source whose switchover went unanswered asks an unreachable target again.
const RESOLVE_RETRY: Duration = Duration::from_secs(5);

/// How long a source whose post-copy lost its connections reconnects before it waits for
/// `godwit migrate resume` (`postcopy_recovery_s` of the migrate request).
pub const DEFAULT_POSTCOPY_RECOVERY_S: u64 = 60;
/// How long a paused post-copy target waits for a source whose agent no longer knows the
/// migration before it gives up on it.
const SOURCE_GONE_AFTER: Duration = Duration::from_secs(30);

/// How long the target waits for the source's channels after accepting.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most migration records kept for `GET /v1/migrations`.
const MAX_RECORDS: usize = 1000;

/// One migration as this VMM sees it (source or target side).
#[derive(Debug)]
pub struct MigrationRecord {
    pub progress: Arc<Progress>,
    cancel: AtomicBool,
    /// `godwit migrate resume`: try a paused post-copy again now.
    resume: AtomicBool,
    order: u64,
    /// This agent is the migration's target (cancel belongs to the source).
    incoming: bool,
}

/// This VMM's migrations by id, and the directory their finished records go to.
#[derive(Debug)]
pub struct Migrations {
    records: Mutex<HashMap<String, Arc<MigrationRecord>>>,
    dir: PathBuf,
}

impl Migrations {
    /// Records finished migrations as `dir/ID.json`.
    pub fn new(dir: PathBuf) -> Self {
        Migrations {
            records: Mutex::default(),
            dir,
        }
    }

    fn add(&self, id: &str, progress: Arc<Progress>, incoming: bool) -> Arc<MigrationRecord> {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if records.len() >= MAX_RECORDS {
            // Forget the oldest finished one.
            if let Some(old) = records
                .iter()
                .filter(|(_, r)| r.progress.info().status != MigrationStatus::Running)
                .min_by_key(|(_, r)| r.order)
                .map(|(k, _)| k.clone())
            {
                records.remove(&old);
            }
        }
        let record = Arc::new(MigrationRecord {
            progress,
            cancel: AtomicBool::new(false),
            resume: AtomicBool::new(false),
            order: now_unix_ms(),
            incoming,
        });
        records.insert(id.to_owned(), record.clone());
        record
    }

    /// Migrations still running (either side).
    pub fn running(&self) -> u32 {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|r| r.progress.info().status == MigrationStatus::Running)
            .count() as u32
    }

    /// Running migrations with their ids (either side).
    fn running_records(&self) -> Vec<(String, Arc<MigrationRecord>)> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, r)| r.progress.info().status == MigrationStatus::Running)
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect()
    }

    fn get(&self, id: &str) -> Option<Arc<MigrationRecord>> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn all(&self) -> Vec<Arc<MigrationRecord>> {
        let mut v: Vec<_> = self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|r| r.order);
        v
    }
}

fn new_id(vm: &str) -> (String, [u8; 16]) {
    let mut hasher = blake3::Hasher::new();
    hasher.update(vm.as_bytes());
    hasher.update(
        &SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .to_le_bytes(),
    );
    hasher.update(&std::process::id().to_le_bytes());
    let hash = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash.as_bytes()[..16]);
    (hex(&bytes), bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_id(id: &str) -> Option<[u8; 16]> {
    if id.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(id.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What the source tells the target about the VM (the setup message's opaque blob).
#[derive(Debug, Serialize, Deserialize)]
struct MigratingVm {
    name: String,
    config: VmConfig,
}

/// The source side's view of a VM for the engine.
struct VmSource {
    vm: Arc<Vm>,
    memory: GuestMemory,
    blob: Vec<u8>,
    /// The VM's resource data on its way to the target.
    transfer: Arc<SourceTransfer>,
    /// A resource action failed (the failure's class for the metrics).
    resource_failed: AtomicBool,
    /// The resources and the target's resource listener, for the endpoint's handover.
    planned: Vec<crate::resources::transfer::Planned>,
    link: Option<std::net::SocketAddr>,
}

fn vm_err(what: &str, e: impl std::error::Error) -> VmAccessError {
    VmAccessError::new(format!("{what}: {}", chain(&e)))
}

impl VmSource {
    fn with_vm<T>(&self, f: impl FnOnce(&mut MicroVm) -> T) -> T {
        f(&mut self.vm.monitor())
    }
}

impl SourceVm for VmSource {
    fn regions(&self) -> Vec<Region> {
        self.memory
            .iter()
            .map(|r| Region {
                gpa: r.start_addr().0,
                size: r.len(),
            })
            .collect()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmAccessError> {
        self.memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| vm_err("Cannot read guest memory", e))
    }

    fn start_dirty_tracking(&self) -> Result<(), VmAccessError> {
        self.with_vm(|vm| vm.start_dirty_log())
            .map_err(|e| vm_err("Cannot start dirty logging", e))
    }

    fn harvest_dirty(&self) -> Result<Vec<PageBitmap>, VmAccessError> {
        let words = self
            .with_vm(|vm| vm.harvest_dirty())
            .map_err(|e| vm_err("Cannot read the dirty log", e))?;
        Ok(words
            .into_iter()
            .zip(self.memory.iter())
            .map(|(w, r)| PageBitmap::from_words(w, r.len() / 4096))
            .collect())
    }

    fn stop_dirty_tracking(&self) {
        if let Err(e) = self.with_vm(|vm| vm.stop_dirty_log()) {
            tracing::warn!(error = %chain(&e), "cannot stop dirty logging");
        }
    }

    fn ready_to_stop(&self) -> bool {
        self.transfer.ready()
    }

    fn before_pause(&self) -> Result<(), VmAccessError> {
        // The disk copy's first full pass ends while the guest still runs.
        self.transfer.before_pause().map_err(|e| {
            self.resource_failed.store(true, Ordering::Release);
            vm_err("Cannot copy the VM's resources", e)
        })
    }

    fn target_running(&self) {
        if let Some(link) = self.link {
            if let Some(detail) = resource_plan::hand_over_endpoint(&self.planned, link) {
                self.transfer.note_endpoint(&detail);
            }
        }
    }

    fn pause(&self) -> Result<(), VmAccessError> {
        self.with_vm(|vm| vm.pause())
            .map_err(|e| vm_err("Cannot pause the VM", e))
    }

    fn resume(&self) -> Result<(), VmAccessError> {
        self.with_vm(|vm| vm.resume());
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<u8>, VmAccessError> {
        // Resources first: the endpoint stream freezes (its unread bytes go into the state)
        // and the target commits the VM's disk and scratch data before the switchover.
        self.transfer.at_pause().map_err(|e| {
            self.resource_failed.store(true, Ordering::Release);
            vm_err("Cannot carry the VM's resources over", e)
        })?;
        let state = self
            .with_vm(|vm| vm.save_state())
            .map_err(|e| vm_err("Cannot save the VM state", e))?;
        state
            .encode()
            .map_err(|e| vm_err("Cannot encode the VM state", e))
    }

    fn config_blob(&self) -> Vec<u8> {
        self.blob.clone()
    }
}

/// The target side: memory prepared at setup, the VM built at switchover.
struct IncomingVm {
    vmm: Arc<Vmm>,
    host: Arc<KvmHost>,
    name: String,
    memory: GuestMemory,
    /// The KVM VM built at setup, taken at switchover.
    prepared: Mutex<Option<PreparedVm>>,
    /// Set once when post-copy begins; no lock, so the fault thread waiting for faults never
    /// holds up the channels installing pages.
    postcopy: OnceLock<Arc<PostcopyMemory>>,
    started: AtomicBool,
    prefaulted: bool,
    resources: Arc<Incoming>,
}

impl IncomingVm {
    fn with_postcopy<T>(
        &self,
        f: impl FnOnce(&PostcopyMemory) -> Result<T, postcopy::PostcopyError>,
    ) -> Result<T, VmAccessError> {
        let pm = self
            .postcopy
            .get()
            .ok_or_else(|| VmAccessError::new("post-copy memory is not registered"))?;
        f(pm).map_err(|e| vm_err("Post-copy memory", e))
    }
}

impl TargetVm for IncomingVm {
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), VmAccessError> {
        self.memory
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| vm_err("Cannot write guest memory", e))
    }

    fn install(&self, gpa: u64, data: &[u8]) -> Result<(), VmAccessError> {
        self.with_postcopy(|pm| pm.install(gpa, data))
    }

    fn install_zero(&self, gpa: u64, pages: u64) -> Result<(), VmAccessError> {
        self.with_postcopy(|pm| pm.install_zero(gpa, pages))
    }

    fn discard(&self, gpa: u64, pages: u64) -> Result<(), VmAccessError> {
        postcopy::discard(&self.memory, gpa, pages).map_err(|e| vm_err("Cannot drop pages", e))
    }

    fn enable_postcopy(&self) -> Result<(), VmAccessError> {
        let pm = PostcopyMemory::register(&self.memory)
            .map_err(|e| vm_err("Cannot register memory for post-copy", e))?;
        self.postcopy
            .set(Arc::new(pm))
            .map_err(|_| VmAccessError::new("post-copy memory was registered twice"))
    }

    fn wait_faults(&self, out: &mut Vec<u64>, timeout: Duration) -> Result<(), VmAccessError> {
        self.with_postcopy(|pm| pm.wait_faults(out, timeout))
    }

    fn wake(&self, gpa: u64, pages: u64) -> Result<(), VmAccessError> {
        self.with_postcopy(|pm| pm.wake(gpa, pages))
    }

    fn start(&self, state: &[u8]) -> Result<(), VmAccessError> {
        let state =
            VmState::decode(state).map_err(|e| vm_err("The incoming VM state is unusable", e))?;
        let mut placement = self
            .vmm
            .placement(&self.name)
            .map_err(|e| vm_err("Cannot place the migrated VM", e))?;
        let resources = self
            .resources
            .bind(&self.vmm.resources)
            .map_err(|e| vm_err("Cannot bind the VM's resources here", e))?;
        placement.attachments = resources.attachments();
        let prepared = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| VmAccessError::new("the VM was already started"))?;
        let vm = MicroVm::restore_prepared(&self.host, &placement, &state, prepared, false)
            .map_err(|e| vm_err("Cannot start the migrated VM", e))?;
        let bytes = state.config.memory_bytes;
        let vm = Vm::new(vm, bytes, None, resources);
        vm.set_memory_arriving(self.postcopy.get().is_some());
        self.vmm.insert(vm);
        self.started.store(true, Ordering::Release);
        tracing::info!(vm = %self.name, "migrated VM running on this host");
        Ok(())
    }

    fn finish_postcopy(&self) -> Result<(), VmAccessError> {
        self.with_postcopy(|pm| pm.unregister())?;
        if let Ok(vm) = self.vmm.vm(&self.name) {
            vm.set_memory_arriving(false);
        }
        Ok(())
    }

    fn abort(&self) {
        if !self.started.load(Ordering::Acquire) {
            self.resources.discard();
            tracing::info!(vm = %self.name, "incoming migration aborted; memory released");
            return;
        }
        // Post-copy broke with pages still on the source: stop the VM rather than let it read
        // holes. Its memory stays registered (the VM holds the userfaultfd) so nothing reads a
        // missing page as zeros, until the VM is deleted.
        let reason = "post-copy migration failed with pages still missing; the VM is stopped \
                      here and its memory is incomplete";
        match self.vmm.vm(&self.name) {
            Ok(vm) => {
                if let Some(pm) = self.postcopy.get() {
                    vm.hold_postcopy_memory(pm.clone());
                }
                vm.mark_broken(reason);
                vm.set_memory_arriving(false);
            }
            Err(_) => tracing::error!(vm = %self.name, "{reason}"),
        }
    }

    fn prepopulated(&self) -> bool {
        self.prefaulted
    }
}

struct Factory {
    vmm: Arc<Vmm>,
    host: Arc<KvmHost>,
    name: String,
    memory_bytes: u64,
    vcpus: u32,
    resources: Arc<Incoming>,
}

impl TargetFactory for Factory {
    fn prepare(&self, setup: &IncomingSetup) -> Result<Arc<dyn TargetVm>, VmAccessError> {
        let vm: MigratingVm = serde_json::from_slice(&setup.config_blob)
            .map_err(|e| VmAccessError::new(format!("The VM description does not parse: {e}")))?;
        if vm.name != self.name || vm.config.memory_bytes != self.memory_bytes {
            return Err(VmAccessError::new(format!(
                "The source describes VM {:?} of {} MiB, but {:?} of {} MiB was announced",
                vm.name,
                vm.config.memory_bytes / MIB,
                self.name,
                self.memory_bytes / MIB
            )));
        }
        let size: u64 = setup.regions.iter().map(|r| r.size).sum();
        if setup.regions.len() != 1 || setup.regions[0].gpa != 0 || size != self.memory_bytes {
            return Err(VmAccessError::new(
                "The source's memory layout is not one region from address 0 of the VM's size",
            ));
        }
        // Post-copy installs 4 KiB pages; huge pages only help memory that is written.
        let huge = self.host.huge_pages && !setup.postcopy_from_start;
        let memory =
            memory::allocate(size, huge).map_err(|e| vm_err("Cannot allocate guest memory", e))?;
        if vm.config.vcpus != self.vcpus {
            return Err(VmAccessError::new(format!(
                "The source describes {} vCPUs, but {} were announced",
                vm.config.vcpus, self.vcpus
            )));
        }
        // First touch of fresh memory is slow here. Stop-and-copy pays it inside the downtime,
        // so its target memory is touched at setup, before the guest pauses; pre-copy pays it
        // while the guest still runs, and an idle guest's zero pages never need it.
        let prefault = setup.stop_and_copy && self.vmm.config().prefault;
        if prefault {
            let t = std::time::Instant::now();
            memory::prefault(&memory).map_err(|e| vm_err("Cannot prefault guest memory", e))?;
            tracing::info!(vm = %self.name, ms = t.elapsed().as_secs_f64() * 1000.0, "guest memory prefaulted");
        }
        let prepared = MicroVm::prepare(&self.host, memory.clone(), vm.config.vcpus)
            .map_err(|e| vm_err("Cannot create the VM", e))?;
        Ok(Arc::new(IncomingVm {
            vmm: self.vmm.clone(),
            host: self.host.clone(),
            name: self.name.clone(),
            memory,
            prepared: Mutex::new(Some(prepared)),
            postcopy: OnceLock::new(),
            started: AtomicBool::new(false),
            prefaulted: prefault,
            resources: self.resources.clone(),
        }))
    }
}

fn compression(mode: CompressMode) -> Compression {
    match mode {
        CompressMode::Auto => Compression::Auto,
        CompressMode::Zstd => Compression::Zstd,
        CompressMode::None => Compression::None,
    }
}

/// How the source secures the channels to the target at `target_host`: mutual TLS with this
/// host's certificate when it has one (the target must present a cluster certificate for
/// that address), else plain TCP.
fn client_security(config: &HostConfig, target_host: &str) -> Result<ClientSecurity, VmmError> {
    let security = match &config.tls {
        None => ClientSecurity::Plain,
        Some(creds) => ClientSecurity::Tls {
            config: creds.client_config()?,
            server_name: godwit_tls::server_name(target_host)?,
        },
    };
    Ok(match config.test_fault {
        Some((channel, fault)) => ClientSecurity::Faulty {
            inner: Box::new(security),
            channel,
            fault,
        },
        None => security,
    })
}

/// How the target secures the channels it accepts: with a certificate, only channels from
/// the host the migration was announced from (`source`, the source agent's name).
fn server_security(config: &HostConfig, source: &str) -> Result<ServerSecurity, VmmError> {
    Ok(match &config.tls {
        None => ServerSecurity::Plain,
        Some(creds) => ServerSecurity::Tls {
            config: creds.server_config()?,
            source: source.to_owned(),
        },
    })
}

/// Splits `HOST:PORT` and checks it.
fn target_host(target: &str) -> Result<&str, VmmError> {
    let bad = || VmmError::Invalid(format!("target must be HOST:PORT, not {target:?}"));
    let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(host)
}

/// Starts migrating the VM `name` to another agent; returns at once with the migration's id.
pub fn migrate(
    vmm: &Arc<Vmm>,
    name: &str,
    req: &MigrateRequest,
) -> Result<MigrationStarted, VmmError> {
    let host = target_host(&req.target)?;
    let channels = req
        .channels
        .unwrap_or_else(|| crate::host::cores().clamp(2, 8));
    if !(1..=32).contains(&channels) {
        return Err(VmmError::Invalid(format!(
            "channels must be 1-32, not {channels}"
        )));
    }
    if let Some(b) = req.bandwidth_mib_s {
        if !b.is_finite() || b < 0.0 {
            return Err(VmmError::Invalid(
                "bandwidth_mib_s must be a number >= 0 (0 = unlimited)".into(),
            ));
        }
    }
    let vm = vmm.vm(name)?;
    vm.start_migrating()?;
    let result = start_migration(vmm, req, host, channels, &vm);
    if result.is_err() {
        vm.stop_migrating();
    }
    result
}

fn start_migration(
    vmm: &Arc<Vmm>,
    req: &MigrateRequest,
    host: &str,
    channels: u32,
    vm: &Arc<Vm>,
) -> Result<MigrationStarted, VmmError> {
    let name = vm.name();
    let (config, memory) = {
        let monitor = vm.monitor();
        Vm::refuse_if_crashed(&monitor, "be migrated")?;
        if monitor.is_paused() {
            return Err(VmmError::Paused { name: name.into() });
        }
        (monitor.config().clone(), monitor.memory().clone())
    };
    let blob = serde_json::to_vec(&MigratingVm {
        name: name.to_owned(),
        config: config.clone(),
    })
    .map_err(|e| VmmError::io("describe the VM", e.into()))?;
    let (id, id_bytes) = new_id(name);
    let vm_resources = vm.resources();
    let plan = if vm_resources.items.is_empty() {
        MigrationPlan::default()
    } else {
        let info = resource_plan::target_info(&vmm.resources.client, &req.target)?;
        resource_plan::plan(
            &vmm.resources,
            name,
            &vm_resources,
            &info,
            &vmm.resources.advertise_host(),
            &vmm.resources.api_url(),
        )?
    };
    let incoming = IncomingMigration {
        id: id.clone(),
        vm: name.to_owned(),
        vcpus: config.vcpus,
        memory_mib: config.memory_bytes / MIB,
        mode: req.mode,
        source: vmm.config().name.clone(),
        resources: plan.incoming.clone(),
        source_api: Some(vmm.resources.api_url()),
        previous_hosts: if vm_resources.items.is_empty() {
            Vec::new()
        } else {
            let mut hosts = vm_resources.visited.clone();
            let me = vmm.resources.api_url();
            if !hosts.contains(&me) {
                hosts.push(me);
            }
            hosts
        },
    };
    let accepted = match ask_target(&vmm.resources.client, &req.target, &incoming) {
        Ok(a) => a,
        Err(e) => {
            resource_plan::undo_exports(&vmm.resources, name, &plan.planned);
            return Err(e);
        }
    };
    let progress = Arc::new(Progress::new(
        &id,
        name,
        &vmm.config().name,
        &accepted.agent,
        req.mode,
        now_unix_ms(),
    ));
    let record = vmm.migrations.add(&id, progress.clone(), false);
    let target_ip = accepted.host.as_deref().unwrap_or(host).to_owned();
    let security = match client_security(vmm.config(), &target_ip) {
        Ok(s) => s,
        Err(e) => {
            resource_plan::undo_exports(&vmm.resources, name, &plan.planned);
            progress.finish_as(MigrationStatus::Failed, Some(chain(&e)), "tls");
            vmm.migrations.persist(&progress.info());
            return Err(e);
        }
    };
    let cfg = SourceConfig {
        mode: req.mode,
        downtime: Duration::from_millis(req.downtime_ms.unwrap_or(300)),
        bandwidth: req
            .bandwidth_mib_s
            .filter(|&b| b > 0.0)
            .map(|b| (b * MIB as f64) as u64),
        channels: channels as u16,
        compression: compression(req.compress),
        max_rounds: req.max_rounds.unwrap_or(30),
        precopy_timeout: Duration::from_secs(req.precopy_timeout_s.unwrap_or(300)),
        verify: req.verify.unwrap_or(true),
        migration_id: id_bytes,
        connect_timeout: Duration::from_secs(10),
        peer_timeout: vmm.config().migration_peer_timeout,
        security,
    };
    let resource_addr: Option<std::net::SocketAddr> =
        format!("{target_ip}:{}", accepted.resource_port)
            .parse()
            .ok()
            .or_else(|| {
                std::net::ToSocketAddrs::to_socket_addrs(&(
                    target_ip.as_str(),
                    accepted.resource_port,
                ))
                .ok()
                .and_then(|mut a| a.next())
            });
    let transfer = match SourceTransfer::start(
        &vmm.resources.links,
        resource_addr.filter(|_| accepted.resource_port != 0),
        &id,
        plan.planned.clone(),
        plan.records.clone(),
        progress.clone(),
        vm_resources.stream(),
    ) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            let e = VmmError::ResourceCopy(e);
            resource_plan::undo_exports(&vmm.resources, name, &plan.planned);
            progress.finish_as(MigrationStatus::Failed, Some(chain(&e)), "resources");
            vmm.migrations.persist(&progress.info());
            return Err(e);
        }
    };
    let source = VmSource {
        vm: vm.clone(),
        memory,
        blob,
        transfer: transfer.clone(),
        resource_failed: AtomicBool::new(false),
        planned: plan.planned.clone(),
        link: resource_addr,
    };
    let addr = format!("{target_ip}:{}", accepted.port);
    let planned = plan.planned;
    let target_name = accepted.agent.clone();
    let worker = vmm.clone();
    let vm_name = name.to_owned();
    let mode = req.mode;
    let target_api = req.target.clone();
    let peer_timeout = cfg.peer_timeout;
    let recovery_window = Duration::from_secs(
        req.postcopy_recovery_s
            .unwrap_or(DEFAULT_POSTCOPY_RECOVERY_S),
    );
    let migration_id = id.clone();
    let spawn_progress = progress.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("migrate-{name}"))
        .spawn(move || {
            let vmm = worker;
            tracing::info!(vm = %vm_name, %addr, ?mode, "migration started");
            let result =
                page_transfer::source::migrate(&source, &addr, &cfg, &progress, &record.cancel);
            let switched = progress.switched();
            let result = match result {
                // The target runs the VM (or may: post-copy's switchover answer can be what
                // was lost) and lacks pages only this copy has: reconnect and go on.
                Err(e) if switched && e.is_link_failure() && progress.in_postcopy() => {
                    let paused = PausedPostcopy {
                        vmm: &vmm,
                        source: &source,
                        addr: &addr,
                        cfg: &cfg,
                        progress: &progress,
                        record: &record,
                        target_api: &target_api,
                        migration_id: &migration_id,
                        vm_name: &vm_name,
                        window: recovery_window,
                    };
                    paused.recover(e)
                }
                other => other,
            };
            match result {
                Ok(()) => {
                    // Every resource action is over once the target confirmed: the record
                    // says so before the migration reads completed.
                    source.transfer.verify_disks();
                    source.transfer.complete(&BTreeMap::new());
                    progress.finish(MigrationStatus::Completed, None);
                    let _ = vmm.remove(&vm_name);
                    let details = resource_plan::finish_source(
                        &vmm.resources,
                        &vm_name,
                        &planned,
                        &target_name,
                    );
                    source.transfer.complete(&details);
                    let info = progress.info();
                    vmm.migrations.persist(&info);
                    vmm.set_ended(format!("VM {vm_name:?} moved to {target_name}"));
                    tracing::info!(
                        vm = %vm_name,
                        total_ms = info.total_ms,
                        downtime_ms = info.downtime_ms.unwrap_or(0.0),
                        "migration completed; the VM now runs on the target"
                    );
                }
                Err(e) => {
                    let (status, outcome) = if matches!(e, page_transfer::MigrationError::Cancelled)
                    {
                        (MigrationStatus::Cancelled, "cancelled")
                    } else if source.resource_failed.load(Ordering::Acquire) {
                        (MigrationStatus::Failed, "resources")
                    } else {
                        (MigrationStatus::Failed, e.class())
                    };
                    let text = chain(&e);
                    if !switched {
                        tracing::warn!(vm = %vm_name, error = %text, "migration did not complete");
                        source.transfer.abort(&text);
                        resource_plan::undo_exports(&vmm.resources, &vm_name, &planned);
                        progress.finish_as(status, Some(text), outcome);
                        vmm.migrations.persist(&progress.info());
                        // The operator can act on this copy again.
                        source.vm.stop_migrating();
                        return;
                    }
                    // The switchover went out and no answer settled it: the target's agent
                    // says whether it runs the VM. Until it does, the VM stays paused here and
                    // locked (still marked migrating), so nobody resumes a second copy.
                    let ask = || {
                        resolve::ask(&vmm.resources.client, &target_api, &migration_id, &vm_name)
                    };
                    let deadline = std::time::Instant::now() + 3 * peer_timeout;
                    let mut resolution = ask();
                    while matches!(resolution, Resolution::Unknown(_))
                        && std::time::Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_secs(1));
                        resolution = ask();
                    }
                    if let Resolution::Unknown(why) = &resolution {
                        let text = format!(
                            "{text}; the switchover had been sent and whether the target runs \
                             the VM is unknown ({why}): it stays paused and locked here (resume, \
                             delete and migrate are refused) while this host keeps asking the \
                             target"
                        );
                        tracing::warn!(vm = %vm_name, error = %text, "migration did not complete");
                        progress.finish_as(status, Some(text), outcome);
                        vmm.migrations.persist(&progress.info());
                        while let Resolution::Unknown(_) = resolution {
                            std::thread::sleep(RESOLVE_RETRY);
                            resolution = ask();
                        }
                    }
                    let settled = match resolution {
                        Resolution::TargetRuns => {
                            source.transfer.complete(&BTreeMap::new());
                            let _ = vmm.remove(&vm_name);
                            let details = resource_plan::finish_source(
                                &vmm.resources,
                                &vm_name,
                                &planned,
                                &target_name,
                            );
                            source.transfer.complete(&details);
                            vmm.set_ended(format!("VM {vm_name:?} moved to {target_name}"));
                            "its agent says it runs the VM, so this paused copy was removed"
                                .to_owned()
                        }
                        Resolution::NeverStarted => {
                            if let Err(e) = source.resume() {
                                tracing::error!(vm = %vm_name, error = %chain(&e), "cannot resume");
                            }
                            source.transfer.abort(&text);
                            resource_plan::undo_exports(&vmm.resources, &vm_name, &planned);
                            source.vm.stop_migrating();
                            "its agent says it never started the VM, so it runs on here".to_owned()
                        }
                        Resolution::Split(why) => {
                            // The operator decides; this copy holds the pages the target lacks.
                            source.vm.stop_migrating();
                            format!("{why}; the VM stays paused here")
                        }
                        Resolution::Unknown(_) => unreachable!("asked until known"),
                    };
                    let text =
                        format!("{text}; the switchover had been sent; the target: {settled}");
                    tracing::warn!(vm = %vm_name, error = %text, "migration did not complete");
                    progress.finish_as(status, Some(text), outcome);
                    vmm.migrations.persist(&progress.info());
                }
            }
        });
    if let Err(e) = spawned {
        let e = VmmError::io("start the migration thread", e);
        spawn_progress.finish_as(MigrationStatus::Failed, Some(chain(&e)), "other");
        vmm.migrations.persist(&spawn_progress.info());
        return Err(e);
    }
    Ok(MigrationStarted { id })
}

/// A post-copy whose connections failed, on the source: the VM runs on the target (or may)
/// and waits for the pages only this paused copy has.
struct PausedPostcopy<'a> {
    vmm: &'a Arc<Vmm>,
    source: &'a VmSource,
    addr: &'a str,
    cfg: &'a SourceConfig,
    progress: &'a Progress,
    record: &'a MigrationRecord,
    target_api: &'a str,
    migration_id: &'a str,
    vm_name: &'a str,
    /// How long it reconnects by itself before it waits for `godwit migrate resume`.
    window: Duration,
}

impl PausedPostcopy<'_> {
    /// Reconnects, every second for the window (and again for a window after each
    /// `godwit migrate resume`), until a resumed migration completes. Returns the error to
    /// settle by when the target's migration ended without it (its agent says so) or a try
    /// failed for another reason than the connections.
    fn recover(&self, first: MigrationError) -> Result<(), MigrationError> {
        let mut last = first;
        let mut deadline = Instant::now() + self.window;
        self.pause(&last, deadline);
        let mut asked = Instant::now() - RESOLVE_RETRY;
        // A resume by hand tries at least once, whatever the window.
        let mut by_hand = false;
        loop {
            if self.record.resume.swap(false, Ordering::AcqRel) {
                deadline = Instant::now() + self.window;
                by_hand = true;
                self.pause(&last, deadline);
            }
            let waiting = !by_hand && Instant::now() >= deadline;
            if waiting && asked.elapsed() < RESOLVE_RETRY {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            // A target whose migration ended waits for nobody: settle by what it says.
            asked = Instant::now();
            let resolution = resolve::ask(
                &self.vmm.resources.client,
                self.target_api,
                self.migration_id,
                self.vm_name,
            );
            if !matches!(resolution, Resolution::Unknown(_)) {
                return Err(last);
            }
            if waiting {
                continue;
            }
            by_hand = false;
            tracing::info!(vm = %self.vm_name, "resuming the paused post-copy");
            match page_transfer::source::resume_postcopy(
                self.source,
                self.addr,
                self.cfg,
                self.progress,
                &self.record.cancel,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if e.is_link_failure() => {
                    // Resumed and broke again, or could not reconnect.
                    let resumed = self.progress.info().phase == MigrationPhase::Postcopy;
                    last = e;
                    if resumed {
                        self.pause(&last, deadline);
                    } else {
                        self.progress
                            .update(|i| i.error = Some(paused_text(&last, deadline)));
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn pause(&self, why: &MigrationError, deadline: Instant) {
        self.progress.update(|i| {
            if i.phase != MigrationPhase::PostcopyPaused {
                tracing::warn!(vm = %self.vm_name, error = %chain(why), "post-copy paused");
                i.postcopy_pauses += 1;
            }
            i.phase = MigrationPhase::PostcopyPaused;
            i.error = Some(paused_text(why, deadline));
        });
    }
}

/// How the API spells an enum value (`failed`, `postcopy-paused`).
fn api_name(v: impl Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A paused post-copy's `error`: why, and what happens next.
fn paused_text(why: &MigrationError, deadline: Instant) -> String {
    let left = deadline.saturating_duration_since(Instant::now()).as_secs();
    let next = if left > 0 {
        format!("reconnecting to the target for {left} s more")
    } else {
        "waiting for `godwit migrate resume`".to_owned()
    };
    format!(
        "post-copy paused: {}; the VM runs on the target and waits for the pages it lacks; {next}",
        chain(why)
    )
}

/// On a paused post-copy target: whether the source's agent at `source_api` says the
/// migration is over there (so nobody will resume it). Only definite answers count: its
/// record ended, or it has had none for [`SOURCE_GONE_AFTER`] (`unknown_since`).
fn source_gone(
    auth: &godwit_daemon::client::ClientAuth,
    source_api: &str,
    id: &str,
    unknown_since: &Mutex<Option<Instant>>,
) -> Option<String> {
    let client = auth.blocking_client(Duration::from_secs(5)).ok()?;
    let resp = client
        .get(format!("{}/v1/migrations/{id}", auth.url(source_api)))
        .send()
        .ok()?;
    let mut since = unknown_since.lock().unwrap_or_else(|e| e.into_inner());
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        let first = *since.get_or_insert_with(Instant::now);
        return (first.elapsed() >= SOURCE_GONE_AFTER).then(|| {
            format!(
                "the source's agent at {source_api} has had no record of the migration for {} s",
                SOURCE_GONE_AFTER.as_secs()
            )
        });
    }
    *since = None;
    let info: MigrationInfo = resp.error_for_status().ok()?.json().ok()?;
    (info.status != MigrationStatus::Running).then(|| {
        format!(
            "the source's agent says the migration is {}{}",
            api_name(info.status),
            info.error.map(|e| format!(": {e}")).unwrap_or_default()
        )
    })
}

/// The target side: takes the VMM's slot for the VM, listens for the source's channels and
/// runs the engine in the background.
pub fn incoming(vmm: &Arc<Vmm>, req: &IncomingMigration) -> Result<IncomingAccepted, VmmError> {
    let id_bytes =
        parse_id(&req.id).ok_or_else(|| VmmError::Invalid("id must be 32 hex digits".into()))?;
    crate::validate_name(&req.vm)?;
    let memory_bytes = req
        .memory_mib
        .checked_mul(MIB)
        .filter(|&b| b > 0)
        .ok_or_else(|| VmmError::Invalid("memory_mib is out of range".into()))?;
    let host = vmm.kvm()?;
    let security = server_security(vmm.config(), &req.source)?;
    vmm.resources.check_incoming_resources(req)?;
    vmm.claim(&req.vm, memory_bytes)?;
    let listener = match TcpListener::bind((vmm.config().migration_ip, 0)) {
        Ok(l) => l,
        Err(e) => {
            vmm.release(&req.vm);
            return Err(VmmError::io("listen for the migration", e));
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let progress = Arc::new(Progress::new(
        &req.id,
        &req.vm,
        &req.source,
        &vmm.config().name,
        req.mode,
        now_unix_ms(),
    ));
    vmm.migrations.add(&req.id, progress.clone(), true);
    let resources = Arc::new(Incoming::new(
        &req.id,
        &req.vm,
        &req.source,
        req.resources.clone(),
        req.previous_hosts.clone(),
        vmm.resources.vm_dir(&req.vm),
    ));
    vmm.resources
        .incoming
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(req.id.clone(), resources.clone());
    progress.update(|i| i.resources = resource_plan::target_records(&req.resources));
    let factory = Factory {
        vmm: vmm.clone(),
        host,
        name: req.vm.clone(),
        memory_bytes,
        vcpus: req.vcpus,
        resources: resources.clone(),
    };
    let worker = vmm.clone();
    let name = req.vm.clone();
    let migration_id = req.id.clone();
    let spawn_progress = progress.clone();
    let peer_timeout = vmm.config().migration_peer_timeout;
    let source_api = req.source_api.clone();
    let client = vmm.resources.client.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("incoming-{name}"))
        .spawn(move || {
            let vmm = worker;
            let unknown_since = Mutex::new(None);
            let give_up = || {
                // Without the source's address (an older source) it waits until the VM is
                // deleted here.
                let api = source_api.as_deref()?;
                source_gone(&client, api, &migration_id, &unknown_since)
            };
            let result = page_transfer::target::receive(
                &listener,
                id_bytes,
                &factory,
                progress.clone(),
                &ReceiveOptions {
                    accept_timeout: ACCEPT_TIMEOUT,
                    security: &security,
                    peer_timeout,
                    give_up: &give_up,
                },
            );
            vmm.release(&name);
            vmm.resources
                .incoming
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&migration_id);
            let bound = vmm.vm(&name).ok().map(|vm| vm.resources().info());
            resource_plan::finish_target_records(
                bound.as_deref(),
                &progress,
                result.is_ok(),
                resources.bytes(),
            );
            let ended = match result {
                Ok(_) => {
                    progress.finish(MigrationStatus::Completed, None);
                    None
                }
                Err(e) if e.cancelled_by_peer() => {
                    tracing::info!(vm = %name, "incoming migration cancelled by the source");
                    // The record says failed, as docs/migration.md promises for the target's
                    // side; the metrics count what happened, a cancel.
                    progress.finish_as(MigrationStatus::Failed, Some(chain(&e)), "cancelled");
                    Some(format!("incoming migration {migration_id} was cancelled"))
                }
                Err(e) => {
                    tracing::warn!(vm = %name, error = %chain(&e), "incoming migration failed");
                    progress.finish_as(MigrationStatus::Failed, Some(chain(&e)), e.class());
                    Some(format!("incoming migration {migration_id} failed"))
                }
            };
            // The record is on disk before this process may exit.
            vmm.migrations.persist(&progress.info());
            if let Some(why) = ended {
                vmm.set_ended(why);
            }
        });
    if let Err(e) = spawned {
        vmm.release(&req.vm);
        let e = VmmError::io("start the migration thread", e);
        spawn_progress.finish_as(MigrationStatus::Failed, Some(chain(&e)), "other");
        vmm.migrations.persist(&spawn_progress.info());
        vmm.set_ended(format!("incoming migration {} did not start", req.id));
        return Err(e);
    }
    let ip = vmm.config().migration_ip;
    Ok(IncomingAccepted {
        resource_port: vmm.resources.listener_port(),
        port,
        agent: vmm.config().name.clone(),
        // A specific migration address is where the source must connect; a wildcard means "the
        // address you reached my API at".
        host: (!ip.is_unspecified()).then(|| ip.to_string()),
    })
}

impl Migrations {
    /// The dirty rate the VM's migration away last measured, if one runs.
    pub(crate) fn outgoing_dirty_rate(&self) -> Option<f64> {
        self.running_records().into_iter().find_map(|(_, record)| {
            let info = record.progress.info();
            (!record.incoming && info.dirty_rate_bytes_s > 0.0).then_some(info.dirty_rate_bytes_s)
        })
    }

    /// Writes a finished migration's record to `DIR/ID.json`, where the agent finds it after
    /// this process is gone (and after an agent restart).
    pub(crate) fn persist(&self, info: &MigrationInfo) {
        let result = std::fs::create_dir_all(&self.dir).and_then(|()| {
            let bytes = serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?;
            let tmp = self.dir.join(format!(".{}.json.tmp", info.id));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, self.dir.join(format!("{}.json", info.id)))
        });
        if let Err(e) = result {
            tracing::warn!(id = %info.id, error = %e, "cannot write the migration record");
        }
    }

    pub fn info(&self, id: &str) -> Result<MigrationInfo, VmmError> {
        self.get(id)
            .map(|r| r.progress.info())
            .ok_or_else(|| VmmError::NoSuchMigration { id: id.into() })
    }

    pub fn list(&self) -> Vec<MigrationInfo> {
        self.all().iter().map(|r| r.progress.info()).collect()
    }

    /// Asks a paused post-copy sent from here to reconnect now, for another recovery window.
    pub fn resume(&self, id: &str) -> Result<MigrationInfo, VmmError> {
        let record = self
            .get(id)
            .ok_or_else(|| VmmError::NoSuchMigration { id: id.into() })?;
        let info = record.progress.info();
        let refuse = |why: String| {
            Err(VmmError::CannotResume {
                id: id.to_owned(),
                why,
            })
        };
        if record.incoming {
            return refuse("this host is its target; resume it on the source agent".into());
        }
        if info.status != MigrationStatus::Running {
            return refuse(format!("it is already {:?}", info.status));
        }
        if info.phase != MigrationPhase::PostcopyPaused {
            return refuse(format!(
                "it is not paused (phase {}); only a post-copy whose connections failed is",
                api_name(info.phase)
            ));
        }
        record.resume.store(true, Ordering::Release);
        Ok(info)
    }

    /// Cancels a migration that has not reached switchover.
    pub fn cancel(&self, id: &str) -> Result<MigrationInfo, VmmError> {
        let record = self
            .get(id)
            .ok_or_else(|| VmmError::NoSuchMigration { id: id.into() })?;
        let info = record.progress.info();
        let refuse = |why| {
            Err(VmmError::CannotCancel {
                id: id.to_owned(),
                why,
            })
        };
        if record.incoming {
            return refuse(CancelRefusal::OnTarget);
        }
        if info.status != MigrationStatus::Running {
            return refuse(CancelRefusal::Finished(info.status));
        }
        if record.progress.switched() || info.phase == MigrationPhase::StopAndCopy {
            return refuse(CancelRefusal::PastSwitchover);
        }
        record.cancel.store(true, Ordering::Release);
        Ok(info)
    }
}

/// Asks the target agent to get ready; its refusal comes back with its status.
fn ask_target(
    auth: &godwit_daemon::client::ClientAuth,
    target: &str,
    req: &IncomingMigration,
) -> Result<IncomingAccepted, VmmError> {
    let unreachable = |source| VmmError::TargetUnreachable {
        target: target.to_owned(),
        source,
    };
    let client = auth
        .blocking_client(Duration::from_secs(30))
        .map_err(unreachable)?;
    let resp = client
        .post(format!("{}/v1/migrations/incoming", auth.url(target)))
        .json(req)
        .send()
        .map_err(unreachable)?;
    let status = resp.status();
    if status.is_success() {
        return resp.json().map_err(unreachable);
    }
    let message = resp
        .json::<godwit_api::ErrorBody>()
        .map(|b| b.error)
        .unwrap_or_else(|_| status.to_string());
    Err(VmmError::TargetRefused {
        target: target.to_owned(),
        status: status.as_u16(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        let (id, bytes) = new_id("vm");
        assert_eq!(id.len(), 32);
        assert_eq!(parse_id(&id), Some(bytes));
        assert_eq!(parse_id("xyz"), None);
        assert_eq!(parse_id(&"g".repeat(32)), None);
    }

    #[test]
    fn targets_are_host_port() {
        assert_eq!(target_host("10.0.0.2:7070").unwrap(), "10.0.0.2");
        assert_eq!(target_host("localhost:1").unwrap(), "localhost");
        for bad in ["nohost", ":7070", "h:port", "h:70000"] {
            assert!(target_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_mode_is_precopy() {
        assert_eq!(
            godwit_api::MigrationMode::default(),
            godwit_api::MigrationMode::Precopy
        );
    }

    #[test]
    fn cancels_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let migrations = Migrations::new(dir.path().to_owned());
        let progress = Arc::new(Progress::new(
            "m1",
            "vm",
            "a",
            "b",
            godwit_api::MigrationMode::Precopy,
            0,
        ));
        migrations.add("m1", progress.clone(), true);
        let e = migrations.cancel("m1").unwrap_err();
        assert!(matches!(
            e,
            VmmError::CannotCancel {
                why: CancelRefusal::OnTarget,
                ..
            }
        ));
        assert!(matches!(
            migrations.cancel("m2").unwrap_err(),
            VmmError::NoSuchMigration { .. }
        ));
        migrations.persist(&progress.info());
        assert!(dir.path().join("m1.json").exists());
    }
}
