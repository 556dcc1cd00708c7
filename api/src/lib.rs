//! Types of Godwit's HTTP/JSON APIs.
//!
//! The agent serves these, the orchestrator and the CLI consume them, and the end-to-end tests
//! use them to drive real processes. Every field is documented in `docs/agent-api.md`; keep the
//! two in step. Validation lives with the server that accepts a request, not here.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// Body of every error response: one sentence saying what was wrong.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}

/// `POST /v1/vms`: create and start a VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Unique on the host: 1-64 characters of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// Number of vCPUs, 1-4. Default 1.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Guest memory in MiB. Default 256.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// What runs inside.
    pub guest: GuestSpec,
    /// Start paused instead of running. Default false.
    #[serde(default)]
    pub paused: bool,
    /// Resources the VM uses (docs/resources.md): at most one disk, one endpoint and one
    /// `entropy` device, any number of scratch directories (up to 8 resources in all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceSpec>,
}

pub use policies::rebinding::{Action as ResourceAction, Attachment, Binding, ResourceKind};

/// One resource a VM declares when it is created; what happens to it when the VM migrates
/// follows from its binding and attachment (DESIGN.md section 4, `docs/resources.md`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    /// Unique within the VM: 1-32 characters of `[A-Za-z0-9_-]`.
    pub name: String,
    pub kind: ResourceKind,
    /// How the VM refers to it. Default: by the kind (disk and endpoint `identifier`, scratch
    /// `value`, device `type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<Binding>,
    /// How firmly it belongs to its host. Default: by the kind (disk `fastened`, scratch
    /// `unattached`, endpoint and device `fixed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Attachment>,
    /// Disk: capacity in MiB (default 16, at most 1024). Scratch: MiB of data the agent
    /// writes into the directory at creation (default 4, at most 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
    /// Device: the class the host must offer (`entropy` is visible to the guest; other classes,
    /// such as `gpu`, are matched against the host's advertised classes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Whether leaving it on the source behind a global reference (GR) is acceptable.
    /// Default true.
    #[serde(default = "default_true")]
    pub allow_global_ref: bool,
    /// Endpoint: the TCP port to publish on; absent = any free port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Default disk capacity, MiB.
pub const DEFAULT_DISK_MIB: u64 = 16;
/// Default scratch data, MiB.
pub const DEFAULT_SCRATCH_MIB: u64 = 4;

impl ResourceSpec {
    /// A resource of `kind` with every default.
    pub fn new(name: impl Into<String>, kind: ResourceKind) -> Self {
        ResourceSpec {
            name: name.into(),
            kind,
            binding: None,
            attachment: None,
            size_mib: None,
            class: None,
            allow_global_ref: true,
            port: None,
        }
    }

    /// Bytes of data it holds: a disk's capacity, a scratch directory's data, else 0.
    pub fn size_bytes(&self) -> u64 {
        let mib = match self.kind {
            ResourceKind::Disk => self.size_mib.unwrap_or(DEFAULT_DISK_MIB),
            ResourceKind::Scratch => self.size_mib.unwrap_or(DEFAULT_SCRATCH_MIB),
            ResourceKind::Endpoint | ResourceKind::Device => 0,
        };
        mib.saturating_mul(1 << 20)
    }

    /// The resource as the rebinding policy sees it, defaults applied.
    pub fn to_policy(&self) -> policies::rebinding::Resource {
        policies::rebinding::Resource {
            binding: self.binding.unwrap_or(self.kind.default_binding()),
            attachment: self.attachment.unwrap_or(self.kind.default_attachment()),
            size_bytes: self.size_bytes(),
            device_class: self.class.clone(),
            allow_global_ref: self.allow_global_ref,
            ..policies::rebinding::Resource::new(self.name.clone(), self.kind)
        }
    }
}

/// A resource of a VM as it is bound on this host now (`VmInfo::resources`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResourceInfo {
    pub spec: ResourceSpec,
    /// The binding and attachment in force (the spec's, defaults applied).
    pub binding: Binding,
    pub attachment: Attachment,
    /// Where it is: `file PATH`, `nbd HOST:PORT/EXPORT`, `scratch PATH`, `entropy HOST#ID`, ...
    pub location: String,
    /// The host holding its data or device (differs from the VM's host after a GR).
    pub host: String,
    /// Endpoint: the published address clients connect to (stays the same across moves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Disk: blocks the guest wrote through it on this host.
    #[serde(default)]
    pub writes: u64,
    /// Endpoint: client connections served (accepted or forwarded in) on this host.
    #[serde(default)]
    pub connections: u64,
}

/// Where a resource action of a migration is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ResourceStatus {
    Pending,
    Running,
    Done,
    Failed,
}

/// What a migration did with one resource, and why (`MigrationInfo::resources`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResourceMigration {
    pub name: String,
    pub kind: ResourceKind,
    /// The action taken: `move` (MV), `copy` (CP), `global_ref` (GR), `rebind` (RB).
    pub action: ResourceAction,
    /// The first choice of the table's row.
    pub first_choice: ResourceAction,
    /// Whether `action` is an alternative because the first choice was impossible.
    pub fallback: bool,
    /// The choice in one sentence.
    pub reason: String,
    pub status: ResourceStatus,
    /// What was done, in a sentence (bytes, passes, checksums, the new binding).
    #[serde(default)]
    pub detail: String,
    /// Resource data sent to the target, bytes.
    #[serde(default)]
    pub bytes: u64,
    /// Time spent on the action, milliseconds.
    #[serde(default)]
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the source tells the target about one resource of a migrating VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IncomingResource {
    pub spec: ResourceSpec,
    pub action: ResourceAction,
    /// For a GR: where the target reaches the resource (`HOST:PORT/EXPORT` of a disk's NBD
    /// export, `http://HOST:PORT` of a device's agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// The host holding the resource for a GR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_host: Option<String>,
    /// Endpoint: the published address, which stays where it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    256
}

/// A built-in guest workload (see `docs/guest-abi.md`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestSpec {
    /// Sleeps; memory stays zero.
    Idle,
    /// Writes pages over a working set at a set rate and verifies them.
    Dirty {
        /// Working-set size in MiB; must fit in guest memory with the guest's own overhead.
        working_set_mib: u64,
        /// Total write rate over all vCPUs in MiB/s; 0 means as fast as it can.
        rate_mib_s: f64,
        /// `uniform` (default) or `hotcold`.
        #[serde(default)]
        pattern: DirtyPattern,
        /// `hotcold`: size of the hot set in MiB. Default: an eighth of the working set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hot_mib: Option<u64>,
        /// `hotcold`: percent of writes that go to the hot set. Default 90.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hot_percent: Option<u32>,
        /// What the pages hold: `counter` (default; compresses about 7:1) or `random`
        /// (incompressible).
        #[serde(default, skip_serializing_if = "is_default")]
        content: PageContent,
        /// With a disk: blocks (4 KiB) written and re-read per second through it. Default 200.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk_ops_s: Option<u32>,
    },
    /// Burns CPU at a duty cycle on every vCPU.
    Spin {
        /// Busy percent of each 10 ms period, 0-100.
        duty_percent: u32,
    },
    /// Prints `tick N` on the serial console every interval.
    Ticker {
        /// Interval between lines in milliseconds, 1-3,600,000.
        interval_ms: u64,
    },
    /// Serves its devices and nothing else: answers each line received on the endpoint
    /// stream with the same line, and exercises the disk and entropy device if it has them.
    Echo,
}

impl GuestSpec {
    /// The `kind` tag, for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            GuestSpec::Idle => "idle",
            GuestSpec::Dirty { .. } => "dirty",
            GuestSpec::Spin { .. } => "spin",
            GuestSpec::Ticker { .. } => "ticker",
            GuestSpec::Echo => "echo",
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// What the `dirty` guest writes into a page.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PageContent {
    /// A counter pattern derived from the page and its generation.
    #[default]
    Counter,
    /// Pseudo-random words derived from the page and its generation.
    Random,
}

/// How the `dirty` guest picks the pages it writes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DirtyPattern {
    /// Every page of the working set equally likely.
    #[default]
    Uniform,
    /// Most writes go to a small hot set.
    Hotcold,
}

/// Lifecycle state of a VM on an agent.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// vCPUs are running.
    Running,
    /// vCPUs are stopped; memory and state are kept.
    Paused,
    /// The guest ended abnormally (triple fault, internal error, guest panic); see `crash_reason`.
    Crashed,
}

/// What the built-in guest reports about itself (read from the ABI block in guest memory).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GuestInfo {
    /// The workload as requested.
    pub spec: GuestSpec,
    /// Sum over vCPUs: pages written (`dirty`), busy milliseconds (`spin`), lines (`ticker`).
    pub progress: u64,
    /// Pages whose content did not match their recorded generation. Must stay 0.
    pub verify_errors: u64,
    /// Working-set index of the first page that failed verification, if any.
    pub first_error_page: Option<u64>,
    /// Pages verified so far.
    pub verified_pages: u64,
    /// Per-vCPU progress counters.
    pub vcpu_progress: Vec<u64>,
    /// What the guest did with its devices (absent when it has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<GuestDevices>,
}

/// The guest's own account of its devices (`docs/guest-abi.md`, device status).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestDevices {
    /// Disk blocks the guest tracks (writes and verifies).
    pub disk_blocks: u64,
    pub disk_writes: u64,
    /// Blocks read back and compared with what the guest last wrote there.
    pub disk_verified: u64,
    /// Blocks that read back wrong. Must stay 0.
    pub disk_errors: u64,
    /// Block index of the first bad block, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_first_error: Option<u64>,
    /// Complete verification passes over every tracked block.
    pub disk_passes: u64,
    /// Disk requests the monitor failed (I/O errors seen by the guest).
    pub disk_io_errors: u64,
    /// 32-bit words read from the entropy device.
    pub entropy_reads: u64,
    /// Identifier of the entropy device last read (which host's device the VM is bound to).
    pub entropy_device: u64,
    /// Lines answered on the endpoint stream, and their bytes.
    pub echo_lines: u64,
    pub echo_bytes: u64,
}

/// `GET /v1/vms/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmInfo {
    pub name: String,
    pub state: VmState,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub guest: GuestInfo,
    /// CPU time of the VM's vCPU threads on this host, seconds.
    pub cpu_seconds: f64,
    /// Per-vCPU CPU time, seconds.
    pub vcpu_cpu_seconds: Vec<f64>,
    /// CPU used over the last sampling interval, in cores (1.0 = one core busy).
    pub cpu_usage_cores: f64,
    /// Guest memory written per second, from the last dirty-log probe (0 until one ran).
    #[serde(default)]
    pub dirty_rate_bytes_s: f64,
    /// A migration of this VM is under way on this agent.
    #[serde(default)]
    pub migrating: bool,
    /// When this VM instance was created on this host, Unix milliseconds.
    pub created_unix_ms: u64,
    /// Bytes written to the serial console so far.
    pub console_bytes: u64,
    /// Why the guest crashed, when `state` is `crashed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_reason: Option<String>,
    /// The snapshot file this instance was restored from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// The VM's resources as bound on this host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceInfo>,
}

/// `GET /v1/host`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostInfo {
    pub name: String,
    pub version: String,
    /// Logical CPUs of the host.
    pub cores: u32,
    /// Host memory, MiB.
    pub memory_total_mib: u64,
    /// Guest memory assigned to this agent's VMs, MiB.
    pub memory_vms_mib: u64,
    pub vm_count: u32,
    /// CPU used by this agent's VMs over the last interval, as a ratio of all cores (0-1).
    pub vms_cpu_load: f64,
    /// CPU busy on the whole host over the last interval (from /proc/stat), ratio 0-1.
    pub host_cpu_busy: f64,
    /// Whether VMs can be created (the KVM device opened).
    pub kvm_available: bool,
    /// Why KVM is unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_error: Option<String>,
    /// Labels the operator gave the host (`--label key=value`), e.g. device classes.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Migrations this agent is running as source or target.
    #[serde(default)]
    pub migrations_in_flight: u32,
    /// Space for VM resources (disks, scratch data) still free, bytes.
    #[serde(default)]
    pub disk_free_bytes: u64,
    /// Device classes this host offers VMs (`--device`), e.g. `entropy`.
    #[serde(default)]
    pub device_classes: Vec<String>,
    /// What this host's VM backends can do (absent from agents before the backend seam).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendCapabilities>,
}

/// What one VM backend of a host can do (`GET /v1/host/capabilities`), so a request it cannot
/// serve is refused with a reason before anything starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendCapabilities {
    /// The backend's name (`microvm`).
    pub backend: String,
    /// Migration modes it carries out.
    pub modes: Vec<MigrationMode>,
    pub snapshot: bool,
    /// VM resources (disk, endpoint, scratch, device) and their rebinding on migration.
    pub resources: bool,
    /// Dirty-page tracking (the dirty-rate probe and pre-copy).
    pub dirty_tracking: bool,
    /// VMs keep running while the agent is stopped or restarted.
    pub survives_agent_restart: bool,
}

/// `POST /v1/agents/heartbeat` on the orchestrator: an agent announces itself and its state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentHeartbeat {
    /// Base URL of the agent's API as the orchestrator should reach it.
    pub url: String,
    pub host: HostInfo,
    pub vms: Vec<VmInfo>,
}

/// `GET /v1/vms/{name}/digest`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DigestInfo {
    /// `blake3:` and the hex digest of all guest memory in address order.
    pub digest: String,
    pub memory_bytes: u64,
    /// Whether the VM was paused while hashing (a running guest's digest is a blur).
    pub paused: bool,
}

/// `POST /v1/vms/{name}/snapshot`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// File to write; relative paths are under the agent's data dir. Overwritten atomically.
    pub path: String,
    /// Leave the VM paused after the snapshot instead of resuming it. Default false.
    #[serde(default)]
    pub leave_paused: bool,
}

/// Result of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotInfo {
    /// Absolute path of the file written.
    pub path: String,
    /// Size of the file.
    pub file_bytes: u64,
    pub memory_bytes: u64,
    /// Pages stored (non-zero) and elided (zero).
    pub pages_stored: u64,
    pub zero_pages: u64,
    /// Memory digest at the snapshot point (the VM was paused).
    pub digest: String,
    /// Time to pause the vCPUs, save device and vCPU state, write the file, all milliseconds.
    pub pause_ms: f64,
    pub save_state_ms: f64,
    pub write_ms: f64,
    /// From the request to the VM running again (or left paused).
    pub total_ms: f64,
}

/// `POST /v1/vms/restore`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Snapshot file; relative paths are under the agent's data dir.
    pub path: String,
    /// Name of the restored VM (unique on the host).
    pub name: String,
    /// Keep it paused after restoring (to inspect its digest first). Default false.
    #[serde(default)]
    pub paused: bool,
}

/// Result of a restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestoreInfo {
    pub vm: VmInfo,
    /// Time to read the file into fresh memory, to restore vCPU/device state, all milliseconds.
    pub read_ms: f64,
    pub restore_state_ms: f64,
    pub total_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_specs_parse_as_documented() {
        let dirty: GuestSpec = serde_json::from_str(
            r#"{"kind":"dirty","working_set_mib":64,"rate_mib_s":20,"pattern":"uniform"}"#,
        )
        .unwrap();
        assert_eq!(
            dirty,
            GuestSpec::Dirty {
                working_set_mib: 64,
                rate_mib_s: 20.0,
                pattern: DirtyPattern::Uniform,
                hot_mib: None,
                hot_percent: None,
                content: PageContent::Counter,
                disk_ops_s: None,
            }
        );
        let spin: GuestSpec = serde_json::from_str(r#"{"kind":"spin","duty_percent":50}"#).unwrap();
        assert_eq!(spin, GuestSpec::Spin { duty_percent: 50 });
        let ticker: GuestSpec =
            serde_json::from_str(r#"{"kind":"ticker","interval_ms":100}"#).unwrap();
        assert_eq!(ticker.kind(), "ticker");
        let idle: GuestSpec = serde_json::from_str(r#"{"kind":"idle"}"#).unwrap();
        assert_eq!(idle, GuestSpec::Idle);
    }

    #[test]
    fn unknown_kind_and_fields_are_rejected() {
        assert!(serde_json::from_str::<GuestSpec>(r#"{"kind":"bitcoin"}"#).is_err());
        assert!(
            serde_json::from_str::<GuestSpec>(r#"{"kind":"spin","duty_percent":5,"x":1}"#).is_err()
        );
    }

    #[test]
    fn create_vm_defaults() {
        let vm: CreateVm = serde_json::from_str(r#"{"name":"a","guest":{"kind":"idle"}}"#).unwrap();
        assert_eq!((vm.vcpus, vm.memory_mib, vm.paused), (1, 256, false));
    }
}

/// How a migration moves memory (see DESIGN.md section 1).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    /// Copy memory while the guest runs, resend what it dirtied, pause for the rest.
    #[default]
    Precopy,
    /// Pause, copy everything, resume on the target.
    StopAndCopy,
    /// Pause, move vCPU/device state, resume on the target at once; pages follow on demand and
    /// in the background.
    Postcopy,
    /// Pre-copy, switching to post-copy when rounds stop shrinking.
    Auto,
}

impl MigrationMode {
    /// The name as serialized (`precopy`, `stop-and-copy`, `postcopy`, `auto`), for logs and
    /// metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::Precopy => "precopy",
            MigrationMode::StopAndCopy => "stop-and-copy",
            MigrationMode::Postcopy => "postcopy",
            MigrationMode::Auto => "auto",
        }
    }
}

/// Page compression on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CompressMode {
    /// zstd where pages compress, raw where they do not (adaptive).
    #[default]
    Auto,
    Zstd,
    None,
}

/// `POST /v1/vms/{name}/migrate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `HOST:PORT` of the target agent's API.
    pub target: String,
    #[serde(default)]
    pub mode: MigrationMode,
    /// Longest acceptable pause, milliseconds (pre-copy's convergence target). Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Bandwidth cap in MiB/s; absent or 0 = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mib_s: Option<f64>,
    /// Bulk TCP connections, 1-32. Default: the number of host cores, at least 2 and at most 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<u32>,
    #[serde(default)]
    pub compress: CompressMode,
    /// Pre-copy rounds after the first full pass before giving up (fail, or switch in auto).
    /// Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// Give up on pre-copy after this many seconds (fail, or switch in auto). Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_timeout_s: Option<u64>,
    /// Hash every page on both sides and compare (costs CPU). Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<bool>,
    /// A post-copy whose connections fail reconnects by itself for this many seconds, then
    /// waits (`postcopy-paused`) for `godwit migrate resume`. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_recovery_s: Option<u64>,
}

/// `{"id": ...}` answer to a migrate request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationStarted {
    pub id: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStatus {
    Running,
    Completed,
    Failed,
    Cancelled,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Connecting, handshaking, the target preparing memory.
    Setup,
    /// Copying memory while the guest runs.
    Precopy,
    /// The guest is paused; the last pages and the state are moving.
    StopAndCopy,
    /// The guest runs on the target; missing pages are served on demand and pushed.
    Postcopy,
    /// Post-copy whose connections failed: the guest runs on the target and waits for the
    /// pages it still lacks while the source reconnects (automatically for a while, then on
    /// `godwit migrate resume ID`).
    PostcopyPaused,
    /// Waiting for the target's final confirmation.
    Completing,
    Done,
}

/// Pages and bytes sent, by page encoding.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageCounts {
    pub zero_pages: u64,
    pub raw_pages: u64,
    pub compressed_pages: u64,
    /// Payload bytes of raw pages (zero pages carry none).
    pub raw_bytes: u64,
    /// Payload bytes of compressed pages.
    pub compressed_bytes: u64,
    /// Everything written to the sockets, headers included.
    pub wire_bytes: u64,
}

/// Downtime and what it was spent on, milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DowntimeBreakdown {
    /// Stopping the vCPUs.
    pub pause_ms: f64,
    /// Sending the pages still dirty (pre-copy) or all memory (stop-and-copy).
    pub final_pages_ms: f64,
    /// Saving and sending vCPU/device state.
    pub state_ms: f64,
    /// From sending the switchover to the target reporting the VM running.
    pub target_resume_ms: f64,
}

/// Post-copy fault service as the target saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FaultStats {
    /// Guest page faults on missing pages.
    pub faults: u64,
    /// Page requests sent to the source (a request covers a chunk around the fault).
    pub requests: u64,
    /// Fault to page installed, microseconds: median, 99th percentile, max.
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub latency_max_us: f64,
    /// Histogram: upper bounds in microseconds, and counts per bucket (one more count than
    /// bounds: the last counts samples above the last bound).
    pub latency_buckets_us: Vec<f64>,
    pub latency_counts: Vec<u64>,
    /// Sum of all latencies, microseconds (with the counts, the histogram Prometheus exports).
    /// Absent from an older agent's report.
    #[serde(default)]
    pub latency_sum_us: f64,
}

/// `GET /v1/migrations/{id}`: live while running, final afterwards. In the spirit of QEMU's
/// `query-migrate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrationInfo {
    pub id: String,
    pub vm: String,
    /// Agent names.
    pub source: String,
    pub target: String,
    pub mode: MigrationMode,
    pub status: MigrationStatus,
    pub phase: MigrationPhase,
    /// Why it failed or was cancelled; while `postcopy-paused`, why it paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Auto mode switched from pre-copy to post-copy.
    pub switched_to_postcopy: bool,
    /// Times the post-copy paused on failed connections and resumed over new ones (a pause
    /// in progress counts).
    #[serde(default)]
    pub postcopy_pauses: u32,
    /// The agent ended this record because the VMM process that ran the migration died
    /// before it wrote one: `phase` is the last one the agent saw, not necessarily where the
    /// migration got to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub orphaned: bool,
    pub started_unix_ms: u64,
    /// Connect, handshake and target preparation.
    pub setup_ms: f64,
    /// From start to now (running) or to the end.
    pub total_ms: f64,
    /// Guest paused on the source until running on the target; absent before switchover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    pub downtime: DowntimeBreakdown,
    pub memory_bytes: u64,
    /// Completed pre-copy passes (the first full pass counts as round 1).
    pub rounds: u32,
    pub pages: PageCounts,
    /// Wire bytes by phase.
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub postcopy_bytes: u64,
    /// Guest dirty rate measured in the last pre-copy round, bytes/s.
    pub dirty_rate_bytes_s: f64,
    /// Wire throughput over the migration so far, bytes/s.
    pub throughput_bytes_s: f64,
    /// Memory still to send, bytes (best estimate).
    pub remaining_bytes: u64,
    pub faults: FaultStats,
    /// Per-page digests of source memory at switchover and of what the target received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_digest: Option<String>,
    /// What happened to each of the VM's resources.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceMigration>,
    /// How it ended, as the metrics count it: `completed`, `cancelled`, or a failure's bounded
    /// class (`connect`, `tls`, `channel`, `protocol`, `vm`, `peer`, `not_converged`, `timeout`,
    /// `digest_mismatch`, `resources`, `other`). Absent while running. A target's record
    /// of a cancelled migration reads `failed` with outcome `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The migration's channels are mutual TLS (both agents have cluster certificates; see
    /// docs/security.md); false for plain TCP. Set once the channels are open.
    #[serde(default)]
    pub encrypted: bool,
}

/// `GET /v1/vmm` on a VMM process's local socket: what the process holds, for its agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmmStatus {
    pub pid: u32,
    pub version: String,
    /// The VM it runs now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Guest memory it holds or has reserved for an arriving VM, bytes.
    pub memory_bytes: u64,
    /// An incoming migration has reserved the VM's name here and not ended yet.
    pub arriving: bool,
    /// What it keeps for its VM after the VM moved away (forwarders, exports, kept data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keeps: Vec<String>,
    /// Resource data (disks, scratch) it accounts for, bytes.
    pub disk_used_bytes: u64,
    pub migrations_running: u32,
    /// Why it has nothing left to run (moved away, deleted, never arrived), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// Its agent's API URL as it knows it (`PUT /v1/vmm/agent` updates it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
}

/// `PUT /v1/vmm/agent` on a VMM process's local socket: where its agent's API is now (an agent
/// that restarted on another address tells the VMMs it adopted).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmmAgent {
    /// The agent's API URL as peers reach it (`http://HOST:PORT`).
    pub url: String,
}

/// `POST /v1/migrations/incoming` (agent to agent): the source asks the target to get ready.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IncomingMigration {
    /// The migration's id (32 hex digits), also sent in every channel's handshake.
    pub id: String,
    /// Name the VM will have on the target (its name on the source).
    pub vm: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub mode: MigrationMode,
    /// Name of the source agent, for the record.
    pub source: String,
    /// The VM's resources and the action chosen for each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<IncomingResource>,
    /// API URLs of the agents the VM ran on before, which may still serve its resources
    /// (exports, forwarders, kept data); the target tells them when the VM is deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_hosts: Vec<String>,
    /// API URL of the source agent: a paused post-copy target asks it whether the source
    /// still means to resume. Absent from an older source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_api: Option<String>,
}

/// The target's answer: where to open the migration channels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IncomingAccepted {
    /// TCP port on the target agent's host for the migration channels.
    pub port: u16,
    /// The target agent's name.
    pub agent: String,
    /// Address to connect to; absent = the host of the target's API address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// TCP port of the target agent's resource listener (resource data, endpoint links), on
    /// the same address as `port`.
    #[serde(default)]
    pub resource_port: u16,
}

// ---------------------------------------------------------------------------------------------
// The orchestrator's API (docs/orchestrator-api.md).

/// `POST /v1/vms` on the orchestrator: create a VM where the placement policy says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterCreateVm {
    pub name: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    pub guest: GuestSpec,
    /// Put it on this host instead of asking the placement policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Host labels the VM needs (every key=value must match).
    #[serde(default)]
    pub require_labels: std::collections::BTreeMap<String, String>,
    /// VMs of one affinity group prefer the same host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_group: Option<String>,
    /// VMs of one anti-affinity group never share a host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity_group: Option<String>,
    /// Whether the balancer may move it with post-copy. Default true.
    #[serde(default = "default_true")]
    pub allow_postcopy: bool,
    /// Longest pause a migration of this VM may cause, ms. Default: the cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Never move it automatically. Default false.
    #[serde(default)]
    pub pinned: bool,
    /// Resources the VM uses; placement and balancing only pick hosts where every one can be
    /// bound.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceSpec>,
}

fn default_true() -> bool {
    true
}

/// A VM as the orchestrator knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterVm {
    pub name: String,
    /// The host it runs on (as last reported), or where it was placed.
    pub host: String,
    /// Whether an agent currently reports it.
    pub reported: bool,
    pub spec: ClusterCreateVm,
    /// The agent's view, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<VmInfo>,
    /// When it was moved by a migration, Unix ms.
    pub moves: Vec<u64>,
    pub created_unix_ms: u64,
    /// Why it was placed where it is.
    pub placement_reason: String,
}

/// Answer to a cluster VM creation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterVmCreated {
    pub vm: ClusterVm,
    pub host: String,
    pub reason: String,
}

/// A host (agent) as the orchestrator sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterHost {
    pub name: String,
    pub url: String,
    pub up: bool,
    /// Milliseconds since the agent was last heard from.
    pub last_seen_ms_ago: u64,
    /// CPU capacity the balancer assumes, cores.
    pub capacity_cores: f64,
    /// Latest load: VM CPU use over capacity (ratio; above 1 = overcommitted).
    pub load: f64,
    /// Recent load samples, oldest first.
    pub load_samples: Vec<f64>,
    pub hot: bool,
    pub vm_count: u32,
    pub memory_total_mib: u64,
    pub memory_vms_mib: u64,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Cordoned by an operator: nothing new is placed or migrated there.
    #[serde(default)]
    pub cordoned: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<HostInfo>,
}

/// `GET /v1/hosts/{name}/drain`: a host's drain (the last one, running or ended).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrainStatus {
    pub host: String,
    pub state: DrainState,
    pub started_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_unix_ms: Option<u64>,
    /// Every VM the drain found on the host and what became of it.
    pub vms: Vec<DrainVm>,
}

/// Where a drain is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DrainState {
    /// Migrating VMs away.
    Running,
    /// Every VM left the host.
    Done,
    /// It ended with VMs that cannot move (listed with their reasons).
    Stuck,
    /// Stopped because the host was uncordoned.
    Cancelled,
}

/// One VM of a drained host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrainVm {
    pub vm: String,
    pub state: DrainVmState,
    /// The host it went (or is going) to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// Why it went there, or why it cannot move.
    pub reason: String,
}

/// What became of one VM of a drained host.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DrainVmState {
    Waiting,
    Migrating,
    Moved,
    /// It cannot move (pinned, no host can take it, its migration failed).
    Stuck,
}

/// `POST /v1/vms/{name}/migrate` on the orchestrator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterMigrate {
    /// Target host name.
    pub to: String,
    /// Mode; absent = chosen by the mode-selection policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigrationMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mib_s: Option<f64>,
}

/// What started a migration.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MigrationTrigger {
    Manual,
    Balancer,
    /// A host drain (`godwit host drain`).
    Drain,
}

/// A migration the orchestrator drove.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterMigration {
    /// The source agent's migration id.
    pub id: String,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub mode: MigrationMode,
    pub trigger: MigrationTrigger,
    /// Why it was started.
    pub reason: String,
    pub status: MigrationStatus,
    pub started_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The source agent's final (or latest) statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<MigrationInfo>,
}

/// How the balancer acts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BalancerMode {
    /// No balancing.
    Off,
    /// Plan and record, move nothing (dry run).
    Recommend,
    /// Plan and migrate.
    #[default]
    Automatic,
}

/// `GET`/`PUT /v1/balancer`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BalancerState {
    pub mode: BalancerMode,
    /// Standard deviation of host loads (the imbalance) at the last run.
    #[serde(default)]
    pub imbalance: f64,
    /// Hosts found hot at the last run.
    #[serde(default)]
    pub hot_hosts: Vec<String>,
    #[serde(default)]
    pub last_run_unix_ms: u64,
    #[serde(default)]
    pub runs: u64,
}

/// One recorded decision of the control plane.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Decision {
    pub unix_ms: u64,
    /// `migrate`, `skip`, `place`, `hotspot`, ...
    pub action: String,
    /// A bounded class of reason, for metrics: `hotspot`, `imbalance`, `anti_thrash`, ...
    pub class: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigrationMode>,
    /// In words.
    pub reason: String,
    /// Whether it was acted on (automatic mode) or only recommended.
    pub executed: bool,
}

/// `GET /v1/plan`: what the balancer would do now, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanView {
    pub mode: BalancerMode,
    pub imbalance: f64,
    pub hot_hosts: Vec<String>,
    /// Planned moves (as decisions with action `migrate`).
    pub moves: Vec<Decision>,
    /// Things considered and not done.
    pub notes: Vec<Decision>,
}
