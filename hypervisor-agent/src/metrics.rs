//! The agent's Prometheus metrics, served on `GET /metrics` and listed in `docs/metrics.md`.
//!
//! Names follow Prometheus practice: `godwit_` prefix, base units, `_total` on counters, ratios
//! 0-1, bounded labels (vm, mode, role, phase, outcome, reason class; never a migration id).
//! Every series carries `host`, the agent's name, the same value the orchestrator's series use,
//! so agent and orchestrator series join without relabelling.
//!
//! Host and VM values are sampled by the agent's 1 s loop (`Manager::sample`). A migration
//! counts as started when its record is made, its byte counters and live gauges move every
//! sample while it runs, and its outcome, histograms and post-copy faults are recorded when it
//! ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use godwit_api::{MigrationInfo, MigrationMode, MigrationPhase, VmState};
use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

mod fault_latency;

use fault_latency::FaultLatency;

/// Every migration mode, for series that exist from the start.
pub const MODES: [MigrationMode; 4] = [
    MigrationMode::Precopy,
    MigrationMode::StopAndCopy,
    MigrationMode::Postcopy,
    MigrationMode::Auto,
];

/// The phases a running migration can be in.
const RUNNING_PHASES: [MigrationPhase; 6] = [
    MigrationPhase::Setup,
    MigrationPhase::Precopy,
    MigrationPhase::StopAndCopy,
    MigrationPhase::Postcopy,
    MigrationPhase::PostcopyPaused,
    MigrationPhase::Completing,
];

const VM_STATES: [VmState; 3] = [VmState::Running, VmState::Paused, VmState::Crashed];

pub fn phase_label(phase: MigrationPhase) -> &'static str {
    match phase {
        MigrationPhase::Setup => "setup",
        MigrationPhase::Precopy => "precopy",
        MigrationPhase::StopAndCopy => "stop-and-copy",
        MigrationPhase::Postcopy => "postcopy",
        MigrationPhase::PostcopyPaused => "postcopy-paused",
        MigrationPhase::Completing => "completing",
        MigrationPhase::Done => "done",
    }
}

pub fn state_label(state: VmState) -> &'static str {
    match state {
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Crashed => "crashed",
    }
}

/// Which side of a migration this agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Target,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Target => "target",
        }
    }

    fn index(self) -> usize {
        match self {
            Role::Source => 0,
            Role::Target => 1,
        }
    }
}

/// How a migration ended. A failure carries a bounded reason class (`connect`, `timeout`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Cancelled,
    Failed(&'static str),
}

impl Outcome {
    /// How a record says it ended (`MigrationInfo::outcome`); unknown classes count as `other`.
    pub fn of(info: &MigrationInfo) -> Outcome {
        const CLASSES: [&str; 11] = [
            "connect",
            "tls",
            "channel",
            "protocol",
            "vm",
            "peer",
            "not_converged",
            "timeout",
            "digest_mismatch",
            "resources",
            "other",
        ];
        match info.outcome.as_deref() {
            Some("completed") => Outcome::Completed,
            Some("cancelled") => Outcome::Cancelled,
            None if info.status == godwit_api::MigrationStatus::Completed => Outcome::Completed,
            None if info.status == godwit_api::MigrationStatus::Cancelled => Outcome::Cancelled,
            Some(class) => Outcome::Failed(
                CLASSES
                    .iter()
                    .find(|&&c| c == class)
                    .copied()
                    .unwrap_or("other"),
            ),
            None => Outcome::Failed("other"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// Running migrations by role and phase, as counted by one sample.
#[derive(Debug, Default)]
pub struct InProgress([[i64; RUNNING_PHASES.len()]; 2]);

impl InProgress {
    pub fn count(&mut self, role: Role, phase: MigrationPhase) {
        if let Some(p) = RUNNING_PHASES.iter().position(|&r| r == phase) {
            self.0[role.index()][p] += 1;
        }
    }
}

/// What one running migration had sent when last counted, so each sample adds only the
/// difference. Keyed by migration id, which never becomes a label.
#[derive(Debug)]
struct Meter {
    vm: String,
    role: Role,
    mode: &'static str,
    pages: [u64; 3],
    payload: [u64; 2],
    wire: [u64; 3],
    phase: Option<&'static str>,
    last_wire: u64,
    last_at: Instant,
}

/// Byte and page kinds, in the order `Meter` keeps them.
const PAGE_KINDS: [&str; 3] = ["zero", "raw", "compressed"];
const PAYLOAD_KINDS: [&str; 2] = ["raw", "compressed"];
const WIRE_STAGES: [&str; 3] = ["precopy", "downtime", "postcopy"];

fn page_counts(info: &MigrationInfo) -> [u64; 3] {
    let p = &info.pages;
    [p.zero_pages, p.raw_pages, p.compressed_pages]
}

fn payload_counts(info: &MigrationInfo) -> [u64; 2] {
    [info.pages.raw_bytes, info.pages.compressed_bytes]
}

fn wire_counts(info: &MigrationInfo) -> [u64; 3] {
    [info.precopy_bytes, info.downtime_bytes, info.postcopy_bytes]
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub up: Gauge,
    pub vms: Gauge,
    pub host_cores: Gauge,
    pub host_memory_bytes: Gauge,
    pub host_vm_memory_bytes: Gauge,
    pub host_vms_cpu_load: Gauge,
    pub host_cpu_busy: Gauge,
    pub vm_cpu_seconds: CounterVec,
    pub vm_memory_bytes: GaugeVec,
    pub vm_vcpus: GaugeVec,
    pub vm_dirty_rate: GaugeVec,
    vm_state: GaugeVec,
    pub vm_migrating: GaugeVec,
    pub snapshots: IntCounterVec,
    pub api_requests: IntCounterVec,
    migrations_started: IntCounterVec,
    migrations_ended: IntCounterVec,
    migration_failures: IntCounterVec,
    migrations_in_progress: IntGaugeVec,
    migration_phase: IntGaugeVec,
    migration_remaining_bytes: GaugeVec,
    migration_throughput: GaugeVec,
    migration_pages: IntCounterVec,
    migration_payload_bytes: IntCounterVec,
    migration_wire_bytes: IntCounterVec,
    migration_rounds: HistogramVec,
    migration_downtime: HistogramVec,
    migration_duration: HistogramVec,
    postcopy_faults: IntCounterVec,
    postcopy_requests: IntCounterVec,
    fault_latency: FaultLatency,
    resource_actions: IntCounterVec,
    resource_bytes: IntCounterVec,
    resource_duration: HistogramVec,
    meters: Mutex<HashMap<String, Meter>>,
    /// Each VM's CPU seconds when last seen, so the counter adds only the difference.
    vm_cpu: Mutex<HashMap<String, f64>>,
}

/// (kind, action) pairs of resource actions an agent carries out.
const RESOURCE_ACTIONS: [(&str, &str); 10] = [
    ("disk", "move"),
    ("disk", "copy"),
    ("disk", "global_ref"),
    ("scratch", "move"),
    ("scratch", "copy"),
    ("scratch", "global_ref"),
    ("scratch", "rebind"),
    ("endpoint", "global_ref"),
    ("device", "rebind"),
    ("device", "global_ref"),
];

fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    register(
        registry,
        Gauge::new(name, help).expect("metric definition is valid"),
    )
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    register(
        registry,
        GaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid"),
    )
}

fn int_gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid"),
    )
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid"),
    )
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    register(
        registry,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .expect("metric definition is valid"),
    )
}

impl Metrics {
    /// The agent's metrics; every series is labelled `host=<host>`.
    pub fn new(host: &str) -> Self {
        let registry = Registry::new_custom(
            None,
            Some(HashMap::from([("host".to_owned(), host.to_owned())])),
        )
        .expect("the host label is valid");
        let r = &registry;
        let m = Metrics {
            up: gauge(r, "godwit_agent_up", "1 while the agent serves its API."),
            vms: gauge(r, "godwit_agent_vms", "VMs on this agent."),
            host_cores: gauge(
                r,
                "godwit_host_cpu_cores",
                "CPU capacity of the host: logical CPUs available to the agent.",
            ),
            host_memory_bytes: gauge(r, "godwit_host_memory_bytes", "Memory of the host (MemTotal), bytes."),
            host_vm_memory_bytes: gauge(
                r,
                "godwit_host_vm_memory_bytes",
                "Guest memory assigned to this agent's VMs, bytes.",
            ),
            host_vms_cpu_load: gauge(
                r,
                "godwit_host_vms_cpu_load_ratio",
                "CPU used by this agent's VMs over the last second, as a ratio of all host cores (0-1).",
            ),
            host_cpu_busy: gauge(
                r,
                "godwit_host_cpu_busy_ratio",
                "CPU busy on the whole host over the last second, from /proc/stat (0-1).",
            ),
            vm_cpu_seconds: register(
                r,
                CounterVec::new(
                    Opts::new(
                        "godwit_vm_cpu_seconds_total",
                        "CPU time used by the VM's vCPU threads, seconds.",
                    ),
                    &["vm"],
                )
                .expect("metric definition is valid"),
            ),
            vm_memory_bytes: gauge_vec(
                r,
                "godwit_vm_memory_bytes",
                "Guest memory size of the VM, bytes.",
                &["vm"],
            ),
            vm_vcpus: gauge_vec(r, "godwit_vm_vcpus", "vCPUs of the VM.", &["vm"]),
            vm_dirty_rate: gauge_vec(
                r,
                "godwit_vm_dirty_rate_bytes_per_second",
                "Guest memory the VM dirtied per second, from the last dirty-log probe or, while \
                 it migrates away, the last pre-copy round.",
                &["vm"],
            ),
            vm_state: gauge_vec(
                r,
                "godwit_vm_state",
                "1 for the VM's current state (running, paused, crashed), 0 for the others.",
                &["vm", "state"],
            ),
            vm_migrating: gauge_vec(
                r,
                "godwit_vm_migrating",
                "1 while this agent migrates the VM away, else 0.",
                &["vm"],
            ),
            snapshots: counter_vec(
                r,
                "godwit_vm_snapshot_operations_total",
                "Snapshots written and restores done, by operation and outcome.",
                &["operation", "outcome"],
            ),
            api_requests: counter_vec(
                r,
                "godwit_agent_api_requests_total",
                "HTTP API requests by method and status class.",
                &["method", "status"],
            ),
            migrations_started: counter_vec(
                r,
                "godwit_migrations_started_total",
                "Migrations started on this agent, by mode and role (source or target).",
                &["mode", "role"],
            ),
            migrations_ended: counter_vec(
                r,
                "godwit_migrations_total",
                "Migrations ended on this agent, by mode, role and outcome (completed, failed, \
                 cancelled).",
                &["mode", "role", "outcome"],
            ),
            migration_failures: counter_vec(
                r,
                "godwit_migration_failures_total",
                "Failed migrations by mode, role and reason class (connect, tls, channel, \
                 protocol, vm, peer, not_converged, timeout, digest_mismatch, resources, other).",
                &["mode", "role", "reason"],
            ),
            migrations_in_progress: int_gauge_vec(
                r,
                "godwit_migrations_in_progress",
                "Migrations running on this agent, by role and phase.",
                &["role", "phase"],
            ),
            migration_phase: int_gauge_vec(
                r,
                "godwit_migration_phase",
                "1 for the phase a running migration of the VM is in; the series goes when it ends.",
                &["vm", "role", "phase"],
            ),
            migration_remaining_bytes: gauge_vec(
                r,
                "godwit_migration_remaining_bytes",
                "Guest memory a running outgoing migration of the VM still has to send \
                 (best estimate), bytes.",
                &["vm"],
            ),
            migration_throughput: gauge_vec(
                r,
                "godwit_migration_throughput_bytes_per_second",
                "Wire throughput of a running outgoing migration of the VM over the last \
                 sample, bytes per second.",
                &["vm"],
            ),
            migration_pages: counter_vec(
                r,
                "godwit_migration_pages_total",
                "Guest pages sent by outgoing migrations, by mode and encoding (zero, raw, \
                 compressed).",
                &["mode", "kind"],
            ),
            migration_payload_bytes: counter_vec(
                r,
                "godwit_migration_payload_bytes_total",
                "Page payload bytes sent by outgoing migrations, by mode and encoding (raw, \
                 compressed; zero pages carry none).",
                &["mode", "kind"],
            ),
            migration_wire_bytes: counter_vec(
                r,
                "godwit_migration_wire_bytes_total",
                "Bytes outgoing migrations wrote to their sockets, headers included, by mode and \
                 stage (precopy, downtime, postcopy).",
                &["mode", "stage"],
            ),
            migration_rounds: histogram_vec(
                r,
                "godwit_migration_precopy_rounds",
                "Pre-copy rounds of completed outgoing migrations, by mode (0 for stop-and-copy \
                 and post-copy).",
                &["mode"],
                &[0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0],
            ),
            migration_downtime: histogram_vec(
                r,
                "godwit_migration_downtime_seconds",
                "Guest downtime of completed outgoing migrations (paused on the source until \
                 running on the target), by mode, seconds.",
                &["mode"],
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ],
            ),
            migration_duration: histogram_vec(
                r,
                "godwit_migration_duration_seconds",
                "Total time of completed outgoing migrations, from start to the target's \
                 confirmation, by mode, seconds.",
                &["mode"],
                &[
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                    1800.0,
                ],
            ),
            postcopy_faults: counter_vec(
                r,
                "godwit_migration_postcopy_faults_total",
                "Guest page faults on pages not yet received, served by incoming post-copy \
                 migrations, by mode; counted when the migration completes.",
                &["mode"],
            ),
            postcopy_requests: counter_vec(
                r,
                "godwit_migration_postcopy_page_requests_total",
                "Page requests incoming post-copy migrations sent to the source for faults, by \
                 mode; counted when the migration completes.",
                &["mode"],
            ),
            fault_latency: register(r, FaultLatency::new()),
            resource_actions: counter_vec(
                r,
                "godwit_migration_resource_actions_total",
                "Resource actions of outgoing migrations, by resource kind (disk, endpoint, \
                 scratch, device), action (move, copy, global_ref, rebind) and outcome (done, \
                 failed).",
                &["kind", "action", "outcome"],
            ),
            resource_bytes: counter_vec(
                r,
                "godwit_migration_resource_bytes_total",
                "Resource data outgoing migrations sent (disk blocks, scratch files), by kind and \
                 action, bytes.",
                &["kind", "action"],
            ),
            resource_duration: histogram_vec(
                r,
                "godwit_migration_resource_action_duration_seconds",
                "Time of completed resource actions of outgoing migrations, by kind and action, \
                 seconds.",
                &["kind", "action"],
                &[0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0],
            ),
            meters: Mutex::new(HashMap::new()),
            vm_cpu: Mutex::new(HashMap::new()),
            registry,
        };
        m.up.set(1.0);
        m.init_migration_series();
        m
    }

    /// Series whose labels are known in advance exist from the start at zero, so rates and
    /// alerts see a change from the first migration on.
    fn init_migration_series(&self) {
        for mode in MODES.map(MigrationMode::as_str) {
            for role in [Role::Source, Role::Target] {
                self.migrations_started
                    .with_label_values(&[mode, role.label()]);
                for outcome in [
                    Outcome::Completed,
                    Outcome::Cancelled,
                    Outcome::Failed("other"),
                ] {
                    self.migrations_ended
                        .with_label_values(&[mode, role.label(), outcome.label()]);
                }
            }
            for kind in PAGE_KINDS {
                self.migration_pages.with_label_values(&[mode, kind]);
            }
            for kind in PAYLOAD_KINDS {
                self.migration_payload_bytes
                    .with_label_values(&[mode, kind]);
            }
            for stage in WIRE_STAGES {
                self.migration_wire_bytes.with_label_values(&[mode, stage]);
            }
            self.migration_rounds.with_label_values(&[mode]);
            self.migration_downtime.with_label_values(&[mode]);
            self.migration_duration.with_label_values(&[mode]);
        }
        // The resource actions the agent can carry out (docs/resources.md).
        for (kind, action) in RESOURCE_ACTIONS {
            for outcome in ["done", "failed"] {
                self.resource_actions
                    .with_label_values(&[kind, action, outcome]);
            }
            self.resource_bytes.with_label_values(&[kind, action]);
            self.resource_duration.with_label_values(&[kind, action]);
        }
        for mode in [MigrationMode::Postcopy, MigrationMode::Auto].map(MigrationMode::as_str) {
            self.postcopy_faults.with_label_values(&[mode]);
            self.postcopy_requests.with_label_values(&[mode]);
            self.fault_latency.init(mode);
        }
        self.set_in_progress(&InProgress::default());
    }

    /// Sets a VM's sampled series.
    pub fn set_vm(&self, vm: &str, state: VmState, vcpus: u32, dirty_rate: f64, migrating: bool) {
        for s in VM_STATES {
            self.vm_state
                .with_label_values(&[vm, state_label(s)])
                .set(if s == state { 1.0 } else { 0.0 });
        }
        self.vm_vcpus.with_label_values(&[vm]).set(f64::from(vcpus));
        self.vm_dirty_rate.with_label_values(&[vm]).set(dirty_rate);
        self.vm_migrating
            .with_label_values(&[vm])
            .set(if migrating { 1.0 } else { 0.0 });
    }

    /// A VM as its process describes it: its sampled series. The first sight of a VM (a new
    /// one, or one adopted after an agent restart) starts its CPU counter where it is.
    pub fn vm_seen(&self, info: &godwit_api::VmInfo) {
        let vm = info.name.as_str();
        let mut cpu = lock(&self.vm_cpu);
        let delta = match cpu.insert(vm.to_owned(), info.cpu_seconds) {
            Some(last) => (info.cpu_seconds - last).max(0.0),
            None => {
                self.vms.inc();
                0.0
            }
        };
        drop(cpu);
        self.vm_cpu_seconds.with_label_values(&[vm]).inc_by(delta);
        self.vm_memory_bytes
            .with_label_values(&[vm])
            .set((info.memory_mib << 20) as f64);
        self.set_vm(
            vm,
            info.state,
            info.vcpus,
            info.dirty_rate_bytes_s,
            info.migrating,
        );
    }

    /// Drops a deleted VM's series.
    pub fn forget_vm(&self, name: &str) {
        if lock(&self.vm_cpu).remove(name).is_some() {
            self.vms.dec();
        }
        let _ = self.vm_cpu_seconds.remove_label_values(&[name]);
        let _ = self.vm_memory_bytes.remove_label_values(&[name]);
        let _ = self.vm_vcpus.remove_label_values(&[name]);
        let _ = self.vm_dirty_rate.remove_label_values(&[name]);
        let _ = self.vm_migrating.remove_label_values(&[name]);
        for s in VM_STATES {
            let _ = self.vm_state.remove_label_values(&[name, state_label(s)]);
        }
    }

    /// A migration record was made: counts the start and begins metering it.
    pub fn migration_started(&self, id: &str, vm: &str, role: Role, mode: MigrationMode) {
        let mode = mode.as_str();
        self.migrations_started
            .with_label_values(&[mode, role.label()])
            .inc();
        lock(&self.meters).insert(
            id.to_owned(),
            Meter {
                vm: vm.to_owned(),
                role,
                mode,
                pages: [0; 3],
                payload: [0; 2],
                wire: [0; 3],
                phase: None,
                last_wire: 0,
                last_at: Instant::now(),
            },
        );
    }

    /// A sample of a running migration: adds what it sent since the last sample and sets its
    /// live gauges. Does nothing once the migration has ended.
    pub fn migration_progress(&self, id: &str, info: &MigrationInfo) {
        let mut meters = lock(&self.meters);
        let Some(meter) = meters.get_mut(id) else {
            return;
        };
        self.add_sent(meter, info);
        let phase = phase_label(info.phase);
        if meter.phase != Some(phase) {
            if let Some(old) = meter.phase {
                let _ =
                    self.migration_phase
                        .remove_label_values(&[&meter.vm, meter.role.label(), old]);
            }
            self.migration_phase
                .with_label_values(&[&meter.vm, meter.role.label(), phase])
                .set(1);
            meter.phase = Some(phase);
        }
        if meter.role == Role::Source {
            let vm = meter.vm.as_str();
            self.migration_remaining_bytes
                .with_label_values(&[vm])
                .set(info.remaining_bytes as f64);
            let now = Instant::now();
            let elapsed = now.duration_since(meter.last_at).as_secs_f64();
            if elapsed >= 0.2 {
                let wire = info.pages.wire_bytes;
                let rate = wire.saturating_sub(meter.last_wire) as f64 / elapsed;
                self.migration_throughput.with_label_values(&[vm]).set(rate);
                meter.last_wire = wire;
                meter.last_at = now;
            }
        }
    }

    /// Counts what an outgoing migration did with each resource, once its actions ended.
    pub fn resource_actions(&self, resources: &[godwit_api::ResourceMigration]) {
        for r in resources {
            let (kind, action) = (r.kind.as_str(), r.action.as_str());
            let outcome = match r.status {
                godwit_api::ResourceStatus::Done => "done",
                godwit_api::ResourceStatus::Failed => "failed",
                _ => continue,
            };
            self.resource_actions
                .with_label_values(&[kind, action, outcome])
                .inc();
            self.resource_bytes
                .with_label_values(&[kind, action])
                .inc_by(r.bytes);
            if outcome == "done" {
                self.resource_duration
                    .with_label_values(&[kind, action])
                    .observe(r.duration_ms / 1000.0);
            }
        }
    }

    /// A migration ended: adds its last bytes, drops its live series and records its outcome,
    /// times and post-copy faults. A migration not metered (or already ended) is ignored.
    pub fn migration_ended(&self, id: &str, info: &MigrationInfo, outcome: Outcome) {
        let Some(mut meter) = lock(&self.meters).remove(id) else {
            return;
        };
        self.add_sent(&mut meter, info);
        let (vm, role, mode) = (meter.vm.as_str(), meter.role.label(), meter.mode);
        if let Some(phase) = meter.phase {
            let _ = self.migration_phase.remove_label_values(&[vm, role, phase]);
        }
        if meter.role == Role::Source {
            let _ = self.migration_remaining_bytes.remove_label_values(&[vm]);
            let _ = self.migration_throughput.remove_label_values(&[vm]);
        }
        self.migrations_ended
            .with_label_values(&[mode, role, outcome.label()])
            .inc();
        if let Outcome::Failed(reason) = outcome {
            self.migration_failures
                .with_label_values(&[mode, role, reason])
                .inc();
        }
        if outcome != Outcome::Completed {
            return;
        }
        match meter.role {
            Role::Source => {
                self.migration_rounds
                    .with_label_values(&[mode])
                    .observe(f64::from(info.rounds));
                if let Some(ms) = info.downtime_ms {
                    self.migration_downtime
                        .with_label_values(&[mode])
                        .observe(ms / 1000.0);
                }
                self.migration_duration
                    .with_label_values(&[mode])
                    .observe(info.total_ms / 1000.0);
            }
            Role::Target => {
                let f = &info.faults;
                if f.faults > 0 || f.requests > 0 {
                    self.postcopy_faults
                        .with_label_values(&[mode])
                        .inc_by(f.faults);
                    self.postcopy_requests
                        .with_label_values(&[mode])
                        .inc_by(f.requests);
                }
                self.fault_latency.observe(mode, f);
            }
        }
    }

    /// Bytes and pages are counted on the source, the only side that sends them.
    fn add_sent(&self, meter: &mut Meter, info: &MigrationInfo) {
        if meter.role != Role::Source {
            return;
        }
        let mode = meter.mode;
        let add = |c: &IntCounterVec, labels: [&str; 2], last: &mut u64, now: u64| {
            if now > *last {
                c.with_label_values(&labels).inc_by(now - *last);
                *last = now;
            }
        };
        for ((kind, last), now) in PAGE_KINDS
            .iter()
            .zip(meter.pages.iter_mut())
            .zip(page_counts(info))
        {
            add(&self.migration_pages, [mode, kind], last, now);
        }
        for ((kind, last), now) in PAYLOAD_KINDS
            .iter()
            .zip(meter.payload.iter_mut())
            .zip(payload_counts(info))
        {
            add(&self.migration_payload_bytes, [mode, kind], last, now);
        }
        for ((stage, last), now) in WIRE_STAGES
            .iter()
            .zip(meter.wire.iter_mut())
            .zip(wire_counts(info))
        {
            add(&self.migration_wire_bytes, [mode, stage], last, now);
        }
    }

    /// Sets the running-migration gauges from one sample's count.
    pub fn set_in_progress(&self, counts: &InProgress) {
        for role in [Role::Source, Role::Target] {
            for (p, phase) in RUNNING_PHASES.iter().enumerate() {
                self.migrations_in_progress
                    .with_label_values(&[role.label(), phase_label(*phase)])
                    .set(counts.0[role.index()][p]);
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
