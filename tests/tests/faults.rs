//! Migrations broken on purpose between real agents with real KVM guests: the source agent's
//! VMMs inject a fault into one migration channel (the `--test-migration-fault` hook, the same
//! seam the engine's tests use), and each case checks where the VM ends up running, that its
//! memory is right by the guest's own verifier, and that both agents keep answering.

use std::time::{Duration, Instant};

use godwit_api::{MigrationInfo, MigrationPhase, MigrationStatus, VmState};
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

/// The migration's record on `agent`, once `until` holds (polling its API, which must answer).
fn wait_record(
    agent: &Agent,
    id: &str,
    what: &str,
    until: impl Fn(&MigrationInfo) -> bool,
) -> MigrationInfo {
    let t = Instant::now();
    loop {
        let info: MigrationInfo = agent.get(&format!("/v1/migrations/{id}")).unwrap();
        if until(&info) {
            return info;
        }
        assert!(t.elapsed() < WAIT, "waited for {what}: {info:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_post_copy_whose_link_keeps_breaking_resumes_and_completes() {
    if !kvm_available("a_post_copy_whose_link_keeps_breaking_resumes_and_completes") {
        return;
    }
    // The first bulk channel resets 512 KiB into every set of connections: the VM runs on the
    // target with pages still on the source each time; the source reconnects, the target says
    // which pages it has, and the rest follows until all are there.
    let src = Agent::start_with("pc-src", &["--test-migration-fault", "reset@2:524288"]).unwrap();
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
    assert_eq!(info.status, MigrationStatus::Completed, "{info:?}");
    assert!(info.postcopy_pauses >= 2, "{info:?}");
    assert_eq!(info.source_digest, info.target_digest);
    let on_target: MigrationInfo = dst.get(&format!("/v1/migrations/{id}")).unwrap();
    assert_eq!(
        on_target.status,
        MigrationStatus::Completed,
        "{on_target:?}"
    );
    assert!(on_target.postcopy_pauses >= 2, "{on_target:?}");
    eprintln!(
        "post-copy over a link that keeps resetting: {} pauses, {:.1} s",
        info.postcopy_pauses,
        info.total_ms / 1000.0
    );
    runs_on_with_right_memory(&dst, "p");
    assert!(absent(&src, "p"));
}

#[test]
fn a_paused_post_copy_resumes_by_hand_and_is_given_up_when_its_source_dies() {
    if !kvm_available("a_paused_post_copy_resumes_by_hand_and_is_given_up_when_its_source_dies") {
        return;
    }
    // No automatic reconnection (postcopy_recovery_s 0): after the first reset the migration
    // waits, paused on both sides, for `migrate resume`.
    let src = Agent::start_with("pr-src", &["--test-migration-fault", "reset@2:524288"]).unwrap();
    let dst = Agent::start("pr-dst").unwrap();
    dirty_vm(&src, "r");
    let id = src
        .migrate(
            &dst,
            "r",
            json!({"mode": "postcopy", "channels": 2, "compress": "none",
                   "postcopy_recovery_s": 0}),
        )
        .unwrap();
    let paused = wait_record(&src, &id, "the source to pause", |i| {
        i.phase == MigrationPhase::PostcopyPaused && i.error.is_some()
    });
    assert_eq!(paused.status, MigrationStatus::Running);
    assert!(
        paused
            .error
            .as_deref()
            .is_some_and(|e| e.contains("waiting for `godwit migrate resume`")),
        "{paused:?}"
    );
    wait_record(&dst, &id, "the target to pause", |i| {
        i.phase == MigrationPhase::PostcopyPaused
    });
    // The VM is the target's, waiting for pages; the source keeps its paused copy.
    assert_eq!(dst.vm("r").unwrap().state, VmState::Running);
    assert_eq!(src.vm("r").unwrap().state, VmState::Paused);
    // Resume belongs to the source.
    let (status, body) = dst
        .request(
            Method::POST,
            &format!("/v1/migrations/{id}/resume"),
            Some(&json!({})),
        )
        .unwrap();
    assert_eq!(status, 409, "{body}");
    // By hand: it reconnects, gets further, and breaks again 512 KiB later.
    let (status, body) = src
        .request(
            Method::POST,
            &format!("/v1/migrations/{id}/resume"),
            Some(&json!({})),
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let again = wait_record(&src, &id, "a second pause", |i| {
        i.postcopy_pauses >= 2 && i.phase == MigrationPhase::PostcopyPaused
    });
    assert_eq!(again.status, MigrationStatus::Running, "{again:?}");
    // The source's VMM dies with the pages the target lacks: its agent records the migration
    // failed, the target gives up on it and stops the VM there, saying why.
    let pid = src.vmm_pids()["r"];
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let t = Instant::now();
    let vm = dst
        .wait_vm("r", WAIT, "the target to give up", |vm| {
            vm.state == VmState::Crashed
        })
        .unwrap();
    let on_target = wait_record(&dst, &id, "the target's record to end", |i| {
        i.status != MigrationStatus::Running
    });
    assert_eq!(on_target.status, MigrationStatus::Failed, "{on_target:?}");
    let why = on_target.error.unwrap_or_default();
    assert!(why.contains("Gave up waiting for the source"), "{why}");
    eprintln!(
        "source VMM killed while paused: the target gave up after {:.1} s: {why}; VM: {:?}",
        t.elapsed().as_secs_f64(),
        vm.crash_reason
    );
    // Deleting the stopped VM ends its VMM (its vCPUs waited on pages that never came).
    let (status, body) = dst.request(Method::DELETE, "/v1/vms/r", None).unwrap();
    assert_eq!(status, 204, "{body}");
    vmms_end(&dst);
}
