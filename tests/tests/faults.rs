//! Migrations broken on purpose between real agents with real KVM guests: the source agent's
//! VMMs inject a fault into one migration channel (the `--test-migration-fault` hook, the same
//! seam the engine's tests use), and each case checks where the VM ends up running, that its
//! memory is right by the guest's own verifier, and that both agents keep answering.

use std::time::{Duration, Instant};

use godwit_api::{MigrationStatus, VmState};
use godwit_tests::{kvm_available, Agent};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);

fn dirty_vm(agent: &Agent, name: &str) {
    let _: Value = agent
        .post(
            "/v1/vms",
            &json!({"name": name, "vcpus": 1, "memory_mib": 128, "guest": {
                "kind": "dirty", "working_set_mib": 32, "rate_mib_s": 20.0, "pattern": "uniform"}}),
        )
        .unwrap();
    agent
        .wait_vm(name, WAIT, "the guest to make progress", |vm| {
            vm.guest.progress > 1000
        })
        .unwrap();
}

/// The VM runs on `agent` with its guest going on and its memory verified right.
fn runs_on_with_right_memory(agent: &Agent, name: &str) {
    let before = agent.vm(name).unwrap();
    assert_eq!(before.state, VmState::Running, "{before:?}");
    agent.goes_on(&before, 500, WAIT);
    let after = agent
        .wait_vm(name, WAIT, "pages verified", |vm| {
            vm.guest.verified_pages > before.guest.verified_pages
        })
        .unwrap();
    assert_eq!(after.guest.verify_errors, 0, "{after:?}");
}

fn absent(agent: &Agent, name: &str) -> bool {
    let (status, _) = agent
        .request(Method::GET, &format!("/v1/vms/{name}"), None)
        .unwrap();
    status == 404
}

#[test]
fn a_damaged_frame_fails_the_migration_before_the_guest_runs_on_the_target() {
    if !kvm_available("a_damaged_frame_fails_the_migration_before_the_guest_runs_on_the_target") {
        return;
    }
    // One byte flipped 1 MiB into the first bulk channel, above TLS (as a bug or a faulty
    // NIC before encryption would): only the frame checksum can catch it.
    let src = Agent::start_with(
        "fault-src",
        &["--test-migration-fault", "corrupt@2:1048576"],
    )
    .unwrap();
    let dst = Agent::start("fault-dst").unwrap();
    dirty_vm(&src, "d");
    for mode in ["stop-and-copy", "precopy", "auto"] {
        let id = src
            .migrate(
                &dst,
                "d",
                json!({"mode": mode, "channels": 2, "compress": "none"}),
            )
            .unwrap();
        let info = src.wait_migration(&id, WAIT).unwrap();
        assert_eq!(info.status, MigrationStatus::Failed, "{mode}: {info:?}");
        let error = info.error.clone().unwrap_or_default();
        assert!(error.contains("is damaged"), "{mode}: {error}");
        assert!(absent(&dst, "d"), "{mode}: the target kept a copy");
        runs_on_with_right_memory(&src, "d");
    }
    vmms_end(&dst);
}

/// Every VMM process of `agent` ends (a VMM exits once it holds nothing).
fn vmms_end(agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent.vmm_pids().is_empty() {
        assert!(
            Instant::now() < deadline,
            "VMMs still there: {:?}",
            agent.vmm_pids()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stalled_link_fails_the_migration_within_the_peer_timeout_and_the_vm_runs_on() {
    if !kvm_available(
        "a_stalled_link_fails_the_migration_within_the_peer_timeout_and_the_vm_runs_on",
    ) {
        return;
    }
    // The first bulk channel goes silent 1 MiB in without closing (packets dropped): the
    // target finds it stalled after the peer timeout (3 s here, 10 s by default) instead of
    // waiting for ever, refuses, and the source runs on.
    let timeout = ["--migration-peer-timeout-s", "3"];
    let src = Agent::start_with(
        "stall-src",
        &[
            &timeout[..],
            &["--test-migration-fault", "blackhole@2:1048576"],
        ]
        .concat(),
    )
    .unwrap();
    let dst = Agent::start_with("stall-dst", &timeout).unwrap();
    dirty_vm(&src, "s");
    let id = src
        .migrate(
            &dst,
            "s",
            json!({"mode": "precopy", "channels": 2, "compress": "none"}),
        )
        .unwrap();
    let info = src.wait_migration(&id, WAIT).unwrap();
    assert_eq!(info.status, MigrationStatus::Failed, "{info:?}");
    let error = info.error.clone().unwrap_or_default();
    assert!(error.contains("migration channel 2 went silent"), "{error}");
    runs_on_with_right_memory(&src, "s");
    assert!(absent(&dst, "s"));
    vmms_end(&dst);
}

#[test]
fn a_switchover_that_gets_no_answer_is_settled_by_asking_the_target() {
    if !kvm_available("a_switchover_that_gets_no_answer_is_settled_by_asking_the_target") {
        return;
    }
    // The control channel goes silent 4 KiB in (after the setup): the state and switchover
    // vanish, or the target's answer is never read. Either way the source cannot know from
    // the migration whether the target runs the VM: it asks the target's agent, and the VM
    // ends up running on exactly one host.
    let timeout = ["--migration-peer-timeout-s", "3"];
    let src = Agent::start_with(
        "ask-src",
        &[
            &timeout[..],
            &["--test-migration-fault", "blackhole@0:4096"],
        ]
        .concat(),
    )
    .unwrap();
    let dst = Agent::start_with("ask-dst", &timeout).unwrap();
    dirty_vm(&src, "q");
    let id = src
        .migrate(&dst, "q", json!({"mode": "stop-and-copy", "channels": 2}))
        .unwrap();
    let info = src.wait_migration(&id, WAIT).unwrap();
    assert_eq!(info.status, MigrationStatus::Failed, "{info:?}");
    let error = info.error.clone().unwrap_or_default();
    assert!(error.contains("the target: its agent says"), "{error}");
    if error.contains("never started the VM") {
        runs_on_with_right_memory(&src, "q");
        assert!(absent(&dst, "q"));
        vmms_end(&dst);
    } else {
        assert!(error.contains("this paused copy was removed"), "{error}");
        runs_on_with_right_memory(&dst, "q");
        assert!(absent(&src, "q"));
    }
    eprintln!("switchover without an answer: {error}");
}

#[test]
fn a_post_copy_that_breaks_leaves_the_target_answering_and_its_vm_deletable() {
    if !kvm_available("a_post_copy_that_breaks_leaves_the_target_answering_and_its_vm_deletable") {
        return;
    }
    // The first bulk channel resets 1 MiB into the background push: the VM already runs on
    // the target with pages still on the source.
    let src = Agent::start_with("pc-src", &["--test-migration-fault", "reset@2:1048576"]).unwrap();
    let dst = Agent::start("pc-dst").unwrap();
    dirty_vm(&src, "p");
    let id = src
        .migrate(
            &dst,
            "p",
            json!({"mode": "postcopy", "channels": 2, "compress": "none"}),
        )
        .unwrap();
    let info = src.wait_migration(&id, WAIT).unwrap();
    assert_eq!(info.status, MigrationStatus::Failed, "{info:?}");
    // The target's API answers (it used to wedge behind the dirty-rate probe), the VM is
    // stopped there rather than run on missing pages.
    let t = Instant::now();
    let vm = dst
        .wait_vm("p", WAIT, "the broken VM to be stopped", |vm| {
            vm.state == VmState::Crashed
        })
        .unwrap();
    assert!(
        vm.crash_reason
            .as_deref()
            .is_some_and(|r| r.contains("post-copy")),
        "{vm:?}"
    );
    let vms: Vec<Value> = dst.get("/v1/vms").unwrap();
    assert_eq!(vms.len(), 1);
    eprintln!(
        "broken post-copy: target answered in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The source keeps its paused copy, and says why.
    let on_source = src.vm("p").unwrap();
    assert_eq!(on_source.state, VmState::Paused, "{on_source:?}");
    assert!(
        info.error
            .as_deref()
            .is_some_and(|e| e.contains("stays paused")),
        "{info:?}"
    );
    // Deleting the broken VM ends its VMM (its vCPUs waited on pages that never came).
    let (status, body) = dst.request(Method::DELETE, "/v1/vms/p", None).unwrap();
    assert_eq!(status, 204, "{body}");
    vmms_end(&dst);
}
