//! The orchestrator's side of the policies: builds the cluster snapshot the `policies` crate
//! decides on from what agents reported, places new VMs, chooses migration modes, checks that
//! a manual migration's target can bind the VM's resources, and runs the balancing loop (off,
//! recommend: record the plan only, automatic: also migrate).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use godwit_api::{
    BalancerMode, ClusterCreateVm, Decision, MigrationMode, MigrationTrigger, PlanView, VmState,
};
use policies::{rebinding, ClusterView, Host, LoadSample, MigrationPolicy, Vm};

use crate::driver;
use crate::error::OrchError;
use crate::state::{lock, now_unix_ms, State, VmRecord};

const MIB: u64 = 1 << 20;
/// CPU each VM counts for at least, cores.
const MIN_VM_CORES: f64 = 0.01;

pub fn to_api_mode(mode: policies::Mode) -> MigrationMode {
    match mode {
        policies::Mode::StopAndCopy => MigrationMode::StopAndCopy,
        policies::Mode::Precopy => MigrationMode::Precopy,
        policies::Mode::Postcopy => MigrationMode::Postcopy,
        policies::Mode::Auto => MigrationMode::Auto,
    }
}

/// The resources of a VM spec as the policies see them.
fn resources(spec: &ClusterCreateVm) -> Vec<rebinding::Resource> {
    spec.resources.iter().map(|r| r.to_policy()).collect()
}

/// Disk a VM's resources take where it is created: its disks and scratch data.
fn resource_data_bytes(spec: &ClusterCreateVm) -> u64 {
    spec.resources.iter().map(|r| r.size_bytes()).sum()
}

/// The snapshot the policies decide on. Down hosts are included (marked down) so policies can
/// say why they are not used; VMs are those agents report running, with their records'
/// policies, resources and move history. A host's free disk and device classes are what its
/// agent reports, less the resource data of VMs placed there that it does not report yet.
pub fn view(state: &State) -> Result<ClusterView, OrchError> {
    let records = state.vm_records();
    let running = state.running_migrations();
    let agents = state.agents();
    let mut hosts = Vec::new();
    let mut vms = Vec::new();
    // VMs placed a moment ago that no agent reports yet still take room where they went.
    let reported: std::collections::HashSet<&str> = agents
        .iter()
        .flat_map(|a| a.vms.iter().map(|v| v.name.as_str()))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut pending: BTreeMap<&str, Vec<&VmRecord>> = BTreeMap::new();
    for r in records.values() {
        if !reported.contains(r.spec.name.as_str()) {
            pending.entry(r.host.as_str()).or_default().push(r);
        }
    }
    for agent in &agents {
        let capacity = state.capacity(&agent.host);
        let memory_total = agent.host.memory_total_mib * MIB;
        let waiting = pending
            .get(agent.name.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let used = agent.host.memory_vms_mib * MIB
            + waiting.iter().map(|r| r.spec.memory_mib * MIB).sum::<u64>();
        let disk_pending: u64 = waiting.iter().map(|r| resource_data_bytes(&r.spec)).sum();
        let in_flight = running
            .iter()
            .filter(|m| m.from == agent.name || m.to == agent.name)
            .count() as u32;
        hosts.push(Host {
            name: agent.name.clone(),
            up: state.is_up(agent),
            cordoned: state.is_cordoned(&agent.name),
            labels: agent.host.labels.clone(),
            cpu_cores: capacity,
            memory_total_bytes: memory_total,
            memory_free_bytes: memory_total.saturating_sub(used),
            load_samples: agent
                .samples
                .iter()
                .map(|&(at_ms, load)| LoadSample { at_ms, load })
                .collect(),
            // The VMs explain the load we measure (it is their CPU over capacity).
            own_load: Some(0.0),
            bandwidth_to: BTreeMap::new(),
            default_bandwidth_bytes_per_s: None,
            migrations_in_flight: in_flight,
            disk_free_bytes: agent.host.disk_free_bytes.saturating_sub(disk_pending),
            device_classes: agent.host.device_classes.iter().cloned().collect(),
            // An agent that reports no backends (an older one) is not second-guessed.
            binds_resources: agent.host.backends.is_empty()
                || agent.host.backends.iter().any(|b| b.resources),
        });
        for info in &agent.vms {
            if info.migrating || info.state != VmState::Running {
                continue;
            }
            // Two agents reporting one VM running (a split after a failed migration) must
            // not make the whole snapshot invalid: the first report counts.
            if !seen.insert(info.name.clone()) {
                tracing::warn!(vm = %info.name, agent = %agent.name, "VM reported running on two hosts");
                continue;
            }
            let record = records.get(&info.name);
            let mut vm = Vm::new(
                info.name.clone(),
                agent.name.clone(),
                info.vcpus,
                info.memory_mib * MIB,
            );
            // Every VM costs a little, so idle VMs still spread out.
            vm.cpu_usage_cores = info.cpu_usage_cores.max(MIN_VM_CORES);
            vm.dirty_rate_bytes_per_s = info.dirty_rate_bytes_s;
            if let Some(r) = record {
                vm.policy = MigrationPolicy {
                    migratable: !r.spec.pinned,
                    allow_postcopy: r.spec.allow_postcopy,
                    downtime_target_ms: r.spec.downtime_ms,
                    max_bandwidth_bytes_per_s: None,
                };
                vm.move_history_ms = r.moves.clone();
                vm.last_moved_ms = r.moves.last().copied();
                vm.affinity_group = r.spec.affinity_group.clone();
                vm.anti_affinity_group = r.spec.anti_affinity_group.clone();
                vm.required_labels = r.spec.require_labels.clone();
                vm.resources = resources(&r.spec);
            }
            // A VM in flight is not a candidate for another move.
            if running.iter().any(|m| m.vm == info.name) {
                vm.policy.migratable = false;
            }
            vms.push(vm);
        }
        for r in waiting {
            let mut vm = Vm::new(
                r.spec.name.clone(),
                agent.name.clone(),
                r.spec.vcpus,
                r.spec.memory_mib * MIB,
            );
            vm.cpu_usage_cores = expected_cpu(&r.spec).max(MIN_VM_CORES);
            // Not running yet: nothing to move.
            vm.policy.migratable = false;
            vm.anti_affinity_group = r.spec.anti_affinity_group.clone();
            vm.affinity_group = r.spec.affinity_group.clone();
            vm.resources = resources(&r.spec);
            vms.push(vm);
        }
    }
    ClusterView::new(hosts, vms, running.len() as u32)
        .map_err(|e| OrchError::Internal(format!("The cluster snapshot is inconsistent: {e}")))
}

/// CPU a new VM is expected to use, cores, from what its guest does: a spinning guest its duty
/// cycle, a writer a fifth of a core per vCPU, idle and ticking guests next to nothing.
fn expected_cpu(spec: &ClusterCreateVm) -> f64 {
    let vcpus = f64::from(spec.vcpus.max(1));
    match &spec.guest {
        godwit_api::GuestSpec::Spin { duty_percent } => vcpus * f64::from(*duty_percent) / 100.0,
        godwit_api::GuestSpec::Dirty { .. } => vcpus * 0.2,
        godwit_api::GuestSpec::Idle
        | godwit_api::GuestSpec::Ticker { .. }
        | godwit_api::GuestSpec::Echo => 0.01,
    }
}

/// Chooses a host for a new VM; returns it with the reason.
pub fn place(state: &State, spec: &ClusterCreateVm) -> Result<(String, String), OrchError> {
    let view = view(state)?;
    let req = policies::VmRequest {
        name: spec.name.clone(),
        vcpus: spec.vcpus,
        memory_bytes: spec.memory_mib * MIB,
        expected_cpu_cores: Some(expected_cpu(spec)),
        affinity_group: spec.affinity_group.clone(),
        anti_affinity_group: spec.anti_affinity_group.clone(),
        required_labels: spec.require_labels.clone(),
        resources: resources(spec),
    };
    match policies::place(&view, &req, &state.config.policy) {
        Ok(p) => Ok((p.host, p.reason)),
        Err(e) => Err(OrchError::NoCapacity(format!(
            "No host can take {}: {e}",
            spec.name
        ))),
    }
}

/// Refuses (409) moving `record` to host `to` when `to` is cordoned or cannot bind every one of the VM's
/// resources, with the rebinding table's reason; the balancer never plans such a move, and a
/// manual migration must not start one. An unknown target is left to the migration to report.
pub fn check_target(state: &State, record: &VmRecord, to: &str) -> Result<(), OrchError> {
    if state.is_cordoned(to) {
        return Err(OrchError::Conflict(format!(
            "Host {to} is cordoned: nothing is migrated there (godwit host uncordon {to})"
        )));
    }
    if record.spec.resources.is_empty() {
        return Ok(());
    }
    let view = view(state)?;
    let Some(host) = view.host(to) else {
        return Ok(());
    };
    rebinding::eligible(&resources(&record.spec), &host.capabilities()).map_err(|e| {
        OrchError::Conflict(format!(
            "Host {to} cannot take VM {:?}: {e}",
            record.spec.name
        ))
    })
}

/// Refuses (409) a migration in `mode` between hosts whose backends cannot both carry it out
/// (by what their agents report; an agent that reports no backends is not second-guessed).
pub fn check_mode(
    state: &State,
    from: &str,
    to: &str,
    mode: MigrationMode,
) -> Result<(), OrchError> {
    for name in [from, to] {
        let Ok(agent) = state.agent(name) else {
            continue;
        };
        let backends = &agent.host.backends;
        if !backends.is_empty() && !backends.iter().any(|b| b.modes.contains(&mode)) {
            return Err(OrchError::Conflict(format!(
                "Host {name}'s VM backend ({}) cannot migrate in mode {}",
                backends
                    .iter()
                    .map(|b| b.backend.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                mode.as_str()
            )));
        }
    }
    Ok(())
}

/// Chooses the mode for moving `record` to `to`.
pub fn choose_mode(
    state: &State,
    record: &VmRecord,
    to: &str,
) -> Result<(MigrationMode, String), OrchError> {
    let view = view(state)?;
    let vm = view
        .vms()
        .iter()
        .find(|v| v.name == record.spec.name)
        .ok_or_else(|| {
            OrchError::Conflict(format!(
                "VM {:?} is not running (or is migrating) and cannot be moved",
                record.spec.name
            ))
        })?;
    let bandwidth = view
        .host(&record.host)
        .map(|h| h.bandwidth_to(to, &state.config.policy))
        .unwrap_or(state.config.policy.migration.default_bandwidth_bytes_per_s);
    match policies::choose_mode(vm, bandwidth, &state.config.policy) {
        Ok(choice) => Ok((to_api_mode(choice.mode), choice.reason)),
        Err(e) => Err(OrchError::Conflict(format!(
            "No migration mode fits {}'s policy: {e}",
            record.spec.name
        ))),
    }
}

fn decision(action: &str, class: &str, reason: String, executed: bool) -> Decision {
    Decision {
        unix_ms: now_unix_ms(),
        action: action.into(),
        class: class.into(),
        vm: None,
        from: None,
        to: None,
        mode: None,
        reason,
        executed,
    }
}

/// Plans without acting.
pub fn plan_view(state: &State) -> Result<PlanView, OrchError> {
    let (view, plan) = plan_now(state)?;
    Ok(to_plan_view(state, &view, &plan, false))
}

fn plan_now(state: &State) -> Result<(ClusterView, policies::Plan), OrchError> {
    let view = view(state)?;
    let plan = policies::plan(&view, &state.config.policy, now_unix_ms());
    Ok((view, plan))
}

fn to_plan_view(
    state: &State,
    view: &ClusterView,
    plan: &policies::Plan,
    executed: bool,
) -> PlanView {
    let stats = policies::cluster_stats(view);
    let moves = plan
        .moves
        .iter()
        .map(|m| Decision {
            vm: Some(m.vm.clone()),
            from: Some(m.from.clone()),
            to: Some(m.to.clone()),
            mode: Some(to_api_mode(m.mode)),
            ..decision("migrate", m.class.as_str(), m.reason.clone(), executed)
        })
        .collect();
    let notes = plan
        .notes
        .iter()
        .map(|n| Decision {
            vm: n.vm.clone(),
            from: n.host.clone(),
            ..decision("skip", n.class.as_str(), n.reason.clone(), false)
        })
        .collect();
    PlanView {
        mode: lock(&state.balancer).mode,
        imbalance: stats.stddev,
        hot_hosts: plan.hot_hosts.clone(),
        moves,
        notes,
    }
}

/// One balancer run.
pub async fn run_once(state: &Arc<State>) -> Result<(), OrchError> {
    let mode = lock(&state.balancer).mode;
    if mode == BalancerMode::Off {
        return Ok(());
    }
    let t = Instant::now();
    let (view, plan) = plan_now(state)?;
    state
        .metrics
        .balancer_seconds
        .observe(t.elapsed().as_secs_f64());
    state.metrics.balancer_runs.inc();
    let executed = mode == BalancerMode::Automatic;
    let pv = to_plan_view(state, &view, &plan, executed);
    state.metrics.imbalance.set(pv.imbalance);
    state.metrics.hot_hosts.set(pv.hot_hosts.len() as f64);
    for h in &pv.hot_hosts {
        state.metrics.hotspots.with_label_values(&[h]).inc();
    }
    {
        let mut b = lock(&state.balancer);
        b.imbalance = pv.imbalance;
        b.hot_hosts = pv.hot_hosts.clone();
        b.last_run_unix_ms = now_unix_ms();
        b.runs += 1;
    }
    let now = now_unix_ms();
    let window = state.config.policy.anti_thrash.move_window_ms;
    for (name, r) in state.vm_records() {
        let n = r
            .moves
            .iter()
            .filter(|&&t| now.saturating_sub(t) <= window)
            .count();
        state
            .metrics
            .vm_moves_in_window
            .with_label_values(&[&name])
            .set(n as f64);
    }
    // Record what was decided: every move (executed once it really started), and notes only
    // when something was at stake (a hot host or a planned move), so a calm cluster does not
    // fill the store.
    let mut record: Vec<Decision> = pv.notes.clone();
    if pv.hot_hosts.is_empty() && pv.moves.is_empty() {
        record.clear();
    }
    if !executed {
        let moves: Vec<Decision> = pv.moves.clone();
        record.extend(moves);
        state.record_decisions(&record);
        return Ok(());
    }
    state.record_decisions(&record);
    for (m, decided) in plan.moves.iter().zip(&pv.moves) {
        let started = driver::start_migration(
            state,
            &m.vm,
            &m.to,
            to_api_mode(m.mode),
            MigrationTrigger::Balancer,
            m.reason.clone(),
            None,
        )
        .await;
        match started {
            Ok(_) => state.record_decisions(std::slice::from_ref(decided)),
            Err(e) => {
                tracing::warn!(vm = %m.vm, to = %m.to, error = %e, "planned migration did not start");
                state.record_decisions(&[
                    Decision {
                        executed: false,
                        ..decided.clone()
                    },
                    Decision {
                        vm: Some(m.vm.clone()),
                        from: Some(m.from.clone()),
                        to: Some(m.to.clone()),
                        ..decision("migrate", "start_failed", e.to_string(), false)
                    },
                ]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::Store;
    use godwit_api::{HostInfo, ResourceKind, ResourceSpec, VmInfo};

    fn state(dir: &tempfile::TempDir) -> State {
        let store = Store::open(&dir.path().join("o.redb")).unwrap();
        State::new(
            Config::default(),
            store,
            &godwit_daemon::client::ClientAuth::insecure(),
        )
        .unwrap()
    }

    fn host(name: &str, disk_free_mib: u64, classes: &[&str]) -> HostInfo {
        serde_json::from_value(serde_json::json!({
            "name": name, "version": "test", "cores": 8, "memory_total_mib": 16384,
            "memory_vms_mib": 0, "vm_count": 0, "vms_cpu_load": 0.0, "host_cpu_busy": 0.0,
            "kvm_available": true, "disk_free_bytes": disk_free_mib * MIB,
            "device_classes": classes,
        }))
        .unwrap()
    }

    /// A running VM as an agent reports it, with `resources` bound on `host`.
    fn vm(name: &str, host: &str, resources: &[ResourceSpec]) -> VmInfo {
        let resources: Vec<_> = resources
            .iter()
            .map(|r| {
                serde_json::json!({
                    "spec": r, "binding": r.kind.default_binding(),
                    "attachment": r.kind.default_attachment(),
                    "location": "somewhere", "host": host,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "name": name, "state": "running", "vcpus": 1, "memory_mib": 256,
            "guest": {"spec": {"kind": "idle"}, "progress": 0, "verify_errors": 0,
                      "first_error_page": null, "verified_pages": 0, "vcpu_progress": [0]},
            "cpu_seconds": 0.0, "vcpu_cpu_seconds": [0.0], "cpu_usage_cores": 0.1,
            "created_unix_ms": 0, "console_bytes": 0, "resources": resources,
        }))
        .unwrap()
    }

    fn gpu(allow_global_ref: bool) -> ResourceSpec {
        ResourceSpec {
            class: Some("gpu".into()),
            allow_global_ref,
            ..ResourceSpec::new("accel", ResourceKind::Device)
        }
    }

    fn spec(name: &str, resources: Vec<ResourceSpec>) -> ClusterCreateVm {
        serde_json::from_value(serde_json::json!({
            "name": name, "guest": {"kind": "idle"}, "resources": resources,
        }))
        .unwrap()
    }

    #[test]
    fn migrations_a_backend_cannot_carry_out_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = state(&dir);
        let mut h1 = host("h1", 0, &[]);
        h1.backends = vec![godwit_api::BackendCapabilities {
            backend: "precopy-only".into(),
            modes: vec![MigrationMode::Precopy],
            snapshot: false,
            resources: false,
            dirty_tracking: true,
            survives_agent_restart: true,
        }];
        s.observe("http://h1", h1, vec![]);
        // An agent that reports no backends (an older one) is not second-guessed.
        s.observe("http://h2", host("h2", 0, &[]), vec![]);
        assert!(check_mode(&s, "h2", "h1", MigrationMode::Precopy).is_ok());
        let e = check_mode(&s, "h2", "h1", MigrationMode::Postcopy).unwrap_err();
        assert!(matches!(e, OrchError::Conflict(_)), "{e}");
        assert!(
            e.to_string().contains("precopy-only") && e.to_string().contains("postcopy"),
            "{e}"
        );
        assert!(check_mode(&s, "h1", "h2", MigrationMode::StopAndCopy).is_err());
        assert!(check_mode(&s, "h2", "h2", MigrationMode::Postcopy).is_ok());
        // Its backend binds no resources: the policies' view says so.
        let v = view(&s).unwrap();
        assert!(!v.host("h1").unwrap().binds_resources);
        assert!(v.host("h2").unwrap().binds_resources);
    }

    #[test]
    fn the_view_carries_resource_facts_and_adopted_vms_keep_their_resources() {
        let dir = tempfile::tempdir().unwrap();
        let s = state(&dir);
        let root = ResourceSpec {
            size_mib: Some(64),
            ..ResourceSpec::new("root", ResourceKind::Disk)
        };
        s.observe(
            "http://h1",
            host("h1", 1024, &["entropy"]),
            vec![vm("db", "h1", std::slice::from_ref(&root))],
        );
        // Placed on h1 a moment ago, not reported yet: its scratch data is already counted.
        let cache = ResourceSpec {
            size_mib: Some(100),
            ..ResourceSpec::new("cache", ResourceKind::Scratch)
        };
        s.put_vm(VmRecord {
            spec: spec("new", vec![cache]),
            host: "h1".into(),
            moves: vec![],
            created_unix_ms: 0,
            placement_reason: String::new(),
        })
        .unwrap();
        let v = view(&s).unwrap();
        let h1 = v.host("h1").unwrap();
        assert_eq!(h1.disk_free_bytes, (1024 - 100) * MIB);
        assert_eq!(h1.device_classes.iter().collect::<Vec<_>>(), ["entropy"]);
        assert_eq!(
            s.vm_record("db").unwrap().spec.resources,
            std::slice::from_ref(&root)
        );
        let db = v.vms().iter().find(|vm| vm.name == "db").unwrap();
        assert_eq!(db.resources, [root.to_policy()]);
        let new = v.vms().iter().find(|vm| vm.name == "new").unwrap();
        assert_eq!(new.resources[0].size_bytes, 100 * MIB);
    }

    #[test]
    fn placement_and_manual_targets_must_bind_every_resource() {
        let dir = tempfile::tempdir().unwrap();
        let s = state(&dir);
        s.observe(
            "http://h1",
            host("h1", 1024, &["gpu"]),
            vec![vm("ml", "h1", &[gpu(false)])],
        );
        s.observe("http://h2", host("h2", 1024, &["entropy"]), vec![]);
        s.observe("http://h3", host("h3", 1024, &["gpu"]), vec![]);

        // h2 is as empty as h3 and sorts first, but has no gpu.
        let (placed, reason) = place(&s, &spec("ml2", vec![gpu(true)])).unwrap();
        assert_eq!(placed, "h3", "{reason}");
        assert!(
            reason.contains("h2 has no \"gpu\" device for the VM's device accel"),
            "{reason}"
        );

        let record = s.vm_record("ml").unwrap();
        let err = check_target(&s, &record, "h2").unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::CONFLICT);
        assert_eq!(
            err.to_string(),
            "Host h2 cannot take VM \"ml\": device accel (by type, fixed) cannot be bound on \
             this target: RB impossible (target has no \"gpu\" device, it offers entropy), GR \
             impossible (the VM's spec forbids a global reference)"
        );
        check_target(&s, &record, "h3").unwrap();
        // An unknown host is for the migration itself to report (404).
        check_target(&s, &record, "h9").unwrap();
        // With GR allowed, h2 takes the device by a global reference.
        let mut record = record;
        record.spec.resources = vec![gpu(true)];
        check_target(&s, &record, "h2").unwrap();
    }
}
