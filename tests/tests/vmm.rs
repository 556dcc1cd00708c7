//! VMs outlive their agent: each runs in its own `godwit-vmm` process, which the agent spawns,
//! supervises and adopts again after a restart. Real agents, real VMM processes, real KVM
//! guests: an agent killed (-9) or stopped (SIGTERM) in the middle of everything, a VMM killed
//! on its own.

use std::process::Command;
use std::time::{Duration, Instant};

use godwit_api::{MigrationInfo, MigrationStatus, VmInfo, VmState};
use godwit_tests::{kvm_available, Agent, EchoClient};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn create(agent: &Agent, body: Value) -> VmInfo {
    agent
        .post("/v1/vms", &body)
        .unwrap_or_else(|e| panic!("create {body}: {e:#}"))
}

fn dirty(name: &str, memory_mib: u64, working_set_mib: u64, rate: f64) -> Value {
    json!({"name": name, "vcpus": 1, "memory_mib": memory_mib,
           "guest": {"kind": "dirty", "working_set_mib": working_set_mib, "rate_mib_s": rate,
                     "pattern": "uniform"}})
}

fn vms(agent: &Agent) -> Vec<VmInfo> {
    agent.get("/v1/vms").unwrap()
}

fn has(agent: &Agent, name: &str) -> bool {
    vms(agent).iter().any(|v| v.name == name)
}

fn goes_on(agent: &Agent, since: &VmInfo, by: u64) -> VmInfo {
    agent.goes_on(since, by, WAIT)
}

fn kill_9(pid: u32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn vms_outlive_a_killed_agent_and_are_adopted_again() {
    if !kvm_available("vms_outlive_a_killed_agent_and_are_adopted_again") {
        return;
    }
    let mut a = Agent::start("outlive-a").unwrap();
    let b = Agent::start("outlive-b").unwrap();
    create(&a, dirty("dirty", 128, 32, 20.0));
    create(
        &a,
        json!({"name": "spin", "memory_mib": 32, "guest": {"kind": "spin", "duty_percent": 30}}),
    );
    let echo = create(
        &a,
        json!({"name": "echo", "memory_mib": 32, "guest": {"kind": "echo"},
               "resources": [{"name": "web", "kind": "endpoint"}]}),
    );
    // Incompressible pages, all written before the migration starts (48 MiB at 6 MiB/s), sent
    // at 12 MiB/s: a pre-copy of several seconds that converges.
    let mut mover = dirty("mover", 128, 48, 6.0);
    mover["guest"]["content"] = json!("random");
    create(&a, mover);
    let address = echo
        .resources
        .iter()
        .find_map(|r| r.address.clone())
        .unwrap()
        .replace("0.0.0.0", "127.0.0.1");
    let client = EchoClient::start(&address);
    a.wait_vm("mover", WAIT, "its working set written", |vm| {
        vm.guest.progress > 12_500
    })
    .unwrap();
    let dirty_before = goes_on(&a, &a.vm("dirty").unwrap(), 1000);
    let spin_before = a.vm("spin").unwrap();

    // A slow pre-copy, so the agent dies in the middle of it.
    let id = a
        .migrate(
            &b,
            "mover",
            json!({"mode": "precopy", "bandwidth_mib_s": 12}),
        )
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let info: MigrationInfo = a.get(&format!("/v1/migrations/{id}")).unwrap();
        assert_eq!(
            info.status,
            MigrationStatus::Running,
            "ended too soon: {info:?}"
        );
        if info.precopy_bytes > 16 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the migration does not move: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = a.vmm_pids();
    assert_eq!(pids.len(), 4, "{pids:?}");
    a.kill();
    std::thread::sleep(Duration::from_secs(2));
    let still = a.vmm_pids();
    for vm in ["dirty", "spin", "echo"] {
        assert_eq!(
            still.get(vm),
            pids.get(vm),
            "the VMM of {vm} did not outlive its agent"
        );
    }

    let t = Instant::now();
    a.restart().unwrap();
    eprintln!("agent restart with {} VMs: {:?}", still.len(), t.elapsed());
    for vm in ["dirty", "spin", "echo"] {
        assert!(
            has(&a, vm),
            "{vm} not listed after the restart: {:?}",
            vms(&a)
        );
    }
    // The guests ran on while the agent was down, and verify.
    let dirty_after = a.vm("dirty").unwrap();
    assert!(
        dirty_after.guest.progress > dirty_before.guest.progress + 1000,
        "{dirty_before:?} -> {dirty_after:?}"
    );
    goes_on(&a, &dirty_after, 1000);
    goes_on(&a, &spin_before, 50);
    let spin = a.vm("spin").unwrap();
    assert!(spin.cpu_seconds > spin_before.cpu_seconds, "{spin:?}");

    // The migration ended, and the record says how; the VM runs on exactly one host.
    let info = a.wait_migration(&id, Duration::from_secs(180)).unwrap();
    let (on_a, on_b) = (has(&a, "mover"), has(&b, "mover"));
    assert!(
        on_a != on_b,
        "mover on a: {on_a}, on b: {on_b}; record {info:?}"
    );
    match info.status {
        MigrationStatus::Completed => {
            assert!(on_b, "{info:?}");
            goes_on(&b, &b.vm("mover").unwrap(), 1000);
        }
        _ => {
            assert!(on_a && info.error.is_some(), "{info:?}");
            goes_on(&a, &a.vm("mover").unwrap(), 1000);
        }
    }
    let target: MigrationInfo = b.get(&format!("/v1/migrations/{id}")).unwrap();
    assert_ne!(target.status, MigrationStatus::Running, "{target:?}");

    // The client kept its connection and never lost a line.
    std::thread::sleep(Duration::from_millis(500));
    let lines = client.finish();
    assert!(lines > 30, "only {lines} lines echoed");
}

#[test]
fn a_killed_vmm_is_crashed_and_the_rest_runs_on() {
    if !kvm_available("a_killed_vmm_is_crashed_and_the_rest_runs_on") {
        return;
    }
    let agent = Agent::start("vmm-crash").unwrap();
    create(
        &agent,
        json!({"name": "victim", "memory_mib": 32, "guest": {"kind": "spin", "duty_percent": 20}}),
    );
    let other = create(&agent, dirty("other", 64, 16, 10.0));
    let victim = agent.vmm_pids()["victim"];
    kill_9(victim);
    let crashed = agent
        .wait_vm("victim", WAIT, "crashed", |vm| vm.state == VmState::Crashed)
        .unwrap();
    let reason = crashed.crash_reason.unwrap();
    assert!(reason.contains("signal 9 (SIGKILL)"), "{reason}");
    goes_on(&agent, &other, 500);
    let metrics = agent.text("/metrics").unwrap();
    let state = metrics
        .lines()
        .find(|l| {
            l.starts_with("godwit_vm_state{")
                && l.contains("vm=\"victim\"")
                && l.contains("state=\"crashed\"")
        })
        .unwrap_or_else(|| panic!("no crashed state series: {metrics}"));
    assert!(state.ends_with(" 1"), "{state} in {metrics}");
    // A crashed VM cannot run, but can be deleted; its name is free again.
    let (status, _) = agent
        .request(reqwest::Method::POST, "/v1/vms/victim/resume", None)
        .unwrap();
    assert_eq!(status, 409);
    let (status, _) = agent
        .request(reqwest::Method::DELETE, "/v1/vms/victim", None)
        .unwrap();
    assert_eq!(status, 204);
    assert_eq!(vms(&agent).len(), 1);
    create(
        &agent,
        json!({"name": "victim", "memory_mib": 32, "guest": {"kind": "idle"}}),
    );
}

#[test]
fn sigterm_leaves_vms_running_for_the_next_agent() {
    if !kvm_available("sigterm_leaves_vms_running_for_the_next_agent") {
        return;
    }
    let mut agent = Agent::start("vmm-term").unwrap();
    let d = create(&agent, dirty("d", 64, 16, 10.0));
    create(
        &agent,
        json!({"name": "s", "memory_mib": 32, "guest": {"kind": "spin", "duty_percent": 20}}),
    );
    let d = goes_on(&agent, &d, 500);
    let pids = agent.vmm_pids();
    assert_eq!(agent.terminate(Duration::from_secs(20)).unwrap(), Some(0));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.vmm_pids(), pids, "SIGTERM on the agent stopped VMs");
    agent.restart().unwrap();
    assert_eq!(vms(&agent).len(), 2);
    let d = goes_on(&agent, &d, 500);
    // An agent that comes back on another address tells the VMMs it adopts where it is now.
    let old_url = agent.url.clone();
    agent.terminate(Duration::from_secs(20)).unwrap();
    // Held so the new agent cannot get the old port back.
    let _old_port = std::net::TcpListener::bind(agent.address()).ok();
    agent.restart_elsewhere().unwrap();
    assert_ne!(agent.url, old_url);
    assert_eq!(
        agent.vmm_status("d").unwrap().agent_url.as_deref(),
        Some(agent.url.as_str())
    );
    // The VMM's socket (no authentication) and the run directories are the agent user's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        let vms = agent.data_dir.path().join("vms");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&vms), 0o700);
        let socket = mode(&vms.join("d").join(godwit_daemon::run_dir::SOCKET));
        assert_eq!(socket & 0o077, 0, "the VMM socket is {socket:o}");
    }
    goes_on(&agent, &d, 500);
    // An adopted VMM is the agent's like any other: it can be stopped for good.
    let (status, _) = agent
        .request(reqwest::Method::DELETE, "/v1/vms/s", None)
        .unwrap();
    assert_eq!(status, 204);
    assert!(!agent.vmm_pids().contains_key("s"));
    // With --stop-vms-on-exit an agent stops its VMs on SIGTERM.
    agent.terminate(Duration::from_secs(20)).unwrap();
    let mut stopping = Agent::start_with("vmm-stop", &["--stop-vms-on-exit"]).unwrap();
    create(&stopping, dirty("x", 64, 16, 10.0));
    assert_eq!(stopping.vmm_pids().len(), 1);
    assert_eq!(
        stopping.terminate(Duration::from_secs(30)).unwrap(),
        Some(0)
    );
    assert!(stopping.vmm_pids().is_empty());
}
