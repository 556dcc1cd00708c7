//! Every VMM runs under a seccomp filter: a VMM that makes a system call outside it is killed
//! by the kernel (SIGSYS) and dies alone; its agent reports that VM crashed with the signal
//! while its other VMs run on. Real agent, real VMM processes, real KVM guests, a real
//! forbidden call (no fake): the agent's hidden test hook takes one call out of its VMMs'
//! filters.

use std::time::Duration;

use godwit_api::{VmInfo, VmState};
use godwit_tests::{kvm_available, Agent};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn goes_on(agent: &Agent, since: &VmInfo, by: u64) -> VmInfo {
    agent.goes_on(since, by, WAIT)
}

#[test]
fn a_vmm_breaking_its_seccomp_filter_is_crashed_and_the_rest_runs_on() {
    if !kvm_available("a_vmm_breaking_its_seccomp_filter_is_crashed_and_the_rest_runs_on") {
        return;
    }
    // Every VMM of this agent runs with `fsync` taken out of its filter. A VMM calls fsync
    // only to make a snapshot durable (and when it receives a resource's files), never while
    // its guest just runs: so the VMM we ask for a snapshot breaks its filter, at a moment the
    // test chooses, and the other one, with the same filter, never does.
    let agent = Agent::start_with("seccomp", &["--vmm-seccomp-deny", "fsync"]).unwrap();
    let victim: VmInfo = agent
        .post(
            "/v1/vms",
            &json!({"name": "victim", "memory_mib": 32,
                    "guest": {"kind": "spin", "duty_percent": 20}}),
        )
        .unwrap();
    let other: VmInfo = agent
        .post(
            "/v1/vms",
            &json!({"name": "other", "vcpus": 1, "memory_mib": 64,
                    "guest": {"kind": "dirty", "working_set_mib": 16, "rate_mib_s": 10.0,
                              "pattern": "uniform"}}),
        )
        .unwrap();
    // Both run under the filter (it allows everything they do until the snapshot).
    goes_on(&agent, &victim, 20);
    let other = goes_on(&agent, &other, 500);
    let pids = agent.vmm_pids();
    let log = std::fs::read_to_string(agent.data_dir.path().join("vms/victim/vmm.log")).unwrap();
    assert!(
        log.contains("seccomp filter on") && log.contains("fsync"),
        "{log}"
    );

    let (status, body) = agent
        .request(
            reqwest::Method::POST,
            "/v1/vms/victim/snapshot",
            Some(&json!({"path": "victim.snap"})),
        )
        .unwrap();
    assert!(status >= 500, "the snapshot answered {status}: {body}");
    let crashed = agent
        .wait_vm("victim", WAIT, "crashed", |vm| vm.state == VmState::Crashed)
        .unwrap();
    let reason = crashed.crash_reason.unwrap_or_default();
    assert!(reason.contains("signal 31 (SIGSYS)"), "{reason}");
    assert!(!agent.vmm_pids().contains_key("victim"));

    // The other VM, its VMM the same process as before, runs on.
    assert_eq!(agent.vmm_pids().get("other"), pids.get("other"));
    let other = goes_on(&agent, &other, 500);
    assert_eq!(agent.vm("other").unwrap().state, VmState::Running);
    // It can still do what its filter allows: pause and resume.
    let paused: VmInfo = agent.post("/v1/vms/other/pause", &json!({})).unwrap();
    assert_eq!(paused.state, VmState::Paused);
    let resumed: VmInfo = agent.post("/v1/vms/other/resume", &json!({})).unwrap();
    assert_eq!(resumed.state, VmState::Running);
    goes_on(&agent, &other, 500);
}
