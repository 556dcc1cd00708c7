//! End-to-end tests of one or two real `hypervisor-agent` processes running real KVM guests.

use std::time::Duration;

use godwit_api::{DigestInfo, RestoreInfo, SnapshotInfo, VmInfo, VmState};
use godwit_tests::{kvm_available, Agent};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

fn create(agent: &Agent, body: Value) -> VmInfo {
    agent
        .post("/v1/vms", &body)
        .unwrap_or_else(|e| panic!("create {body}: {e:#}"))
}

/// Progress of a running VM moves forward by at least `by` within WAIT.
fn advances(agent: &Agent, name: &str, by: u64) -> VmInfo {
    let start = agent.vm(name).unwrap().guest.progress;
    agent
        .wait_vm(name, WAIT, "progress", |vm| vm.guest.progress >= start + by)
        .unwrap()
}

#[test]
fn every_guest_kind_runs_and_four_vms_run_at_once() {
    if !kvm_available("every_guest_kind_runs_and_four_vms_run_at_once") {
        return;
    }
    let agent = Agent::start("kinds").unwrap();
    create(
        &agent,
        json!({"name":"d","vcpus":2,"memory_mib":128,
               "guest":{"kind":"dirty","working_set_mib":32,"rate_mib_s":20,"pattern":"uniform"}}),
    );
    create(
        &agent,
        json!({"name":"s","memory_mib":32,"guest":{"kind":"spin","duty_percent":50}}),
    );
    create(
        &agent,
        json!({"name":"t","memory_mib":32,"guest":{"kind":"ticker","interval_ms":50}}),
    );
    create(
        &agent,
        json!({"name":"i","memory_mib":64,"guest":{"kind":"idle"}}),
    );
    let vms: Vec<VmInfo> = agent.get("/v1/vms").unwrap();
    assert_eq!(vms.len(), 4);

    let d = advances(&agent, "d", 2000);
    assert_eq!(d.guest.vcpu_progress.len(), 2);
    let d = agent
        .wait_vm("d", WAIT, "both vCPUs writing and verifying", |vm| {
            vm.guest.vcpu_progress.iter().all(|&p| p > 0) && vm.guest.verified_pages > 0
        })
        .unwrap();
    assert_eq!(d.guest.verify_errors, 0, "{d:?}");

    advances(&agent, "s", 100);
    let t = advances(&agent, "t", 5);
    let console = agent.text("/v1/vms/t/console").unwrap();
    assert!(console.contains("tick 1\n"), "console: {console:?}");
    assert!(t.console_bytes > 0);

    let i = agent.vm("i").unwrap();
    assert_eq!(i.state, VmState::Running);
    assert_eq!(i.guest.progress, 0);

    // The spinning VM burns CPU, the idle one almost none.
    let s = agent
        .wait_vm("s", WAIT, "CPU time", |vm| vm.cpu_seconds > 0.2)
        .unwrap();
    let i = agent.vm("i").unwrap();
    assert!(
        i.cpu_seconds < s.cpu_seconds / 4.0,
        "idle {i:?} vs spin {s:?}"
    );

    let host: godwit_api::HostInfo = agent.get("/v1/host").unwrap();
    assert_eq!(host.vm_count, 4);
    assert_eq!(host.memory_vms_mib, 128 + 32 + 32 + 64);
    assert!(host.kvm_available);

    let metrics = agent.text("/metrics").unwrap();
    // Every agent series carries the agent's name as `host`.
    assert!(
        metrics.contains("godwit_agent_vms{host=\"kinds\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("godwit_vm_cpu_seconds_total{vm=\"s\",host=\"kinds\"}"),
        "{metrics}"
    );

    for name in ["d", "s", "t", "i"] {
        let (status, _) = agent
            .request(Method::DELETE, &format!("/v1/vms/{name}"), None)
            .unwrap();
        assert_eq!(status, 204);
    }
    let vms: Vec<VmInfo> = agent.get("/v1/vms").unwrap();
    assert!(vms.is_empty());
}

#[test]
fn pause_stops_progress_and_resume_continues_it() {
    if !kvm_available("pause_stops_progress_and_resume_continues_it") {
        return;
    }
    let agent = Agent::start("pause").unwrap();
    create(
        &agent,
        json!({"name":"p","memory_mib":64,"guest":{"kind":"ticker","interval_ms":20}}),
    );
    advances(&agent, "p", 3);
    let paused: VmInfo = agent.post("/v1/vms/p/pause", &json!({})).unwrap();
    assert_eq!(paused.state, VmState::Paused);
    std::thread::sleep(Duration::from_millis(300));
    let still = agent.vm("p").unwrap();
    assert_eq!(still.guest.progress, paused.guest.progress);
    let resumed: VmInfo = agent.post("/v1/vms/p/resume", &json!({})).unwrap();
    assert_eq!(resumed.state, VmState::Running);
    advances(&agent, "p", 3);
}

/// Snapshot a `dirty` VM on one agent, restore it on another: memory identical at the snapshot
/// point, and the guest carries on writing and verifying with no errors.
#[test]
fn snapshot_and_restore_continue_the_guest_with_identical_memory() {
    if !kvm_available("snapshot_and_restore_continue_the_guest_with_identical_memory") {
        return;
    }
    let source = Agent::start("snap-src").unwrap();
    let target = Agent::start("snap-dst").unwrap();
    create(
        &source,
        json!({"name":"w","vcpus":2,"memory_mib":256,
               "guest":{"kind":"dirty","working_set_mib":64,"rate_mib_s":50,"pattern":"hotcold"}}),
    );
    advances(&source, "w", 5000);
    let path = source.data_dir.path().join("w.snap");
    let snap: SnapshotInfo = source
        .post(
            "/v1/vms/w/snapshot",
            &json!({"path": path.to_str().unwrap(), "leave_paused": true}),
        )
        .unwrap();
    assert!(snap.zero_pages > 0 && snap.pages_stored > 0, "{snap:?}");
    let at_snapshot = source.vm("w").unwrap();
    assert_eq!(at_snapshot.state, VmState::Paused);
    let source_digest: DigestInfo = source.get("/v1/vms/w/digest").unwrap();
    assert!(source_digest.paused);
    assert_eq!(source_digest.digest, snap.digest);

    // Snapshot paths stay in an agent's data directory: the operator moves the file over.
    std::fs::copy(&path, target.data_dir.path().join("w.snap")).unwrap();
    let restored: RestoreInfo = target
        .post(
            "/v1/vms/restore",
            &json!({"path": "w.snap", "name": "w2", "paused": true}),
        )
        .unwrap();
    assert_eq!(restored.vm.state, VmState::Paused);
    assert_eq!(restored.vm.guest.progress, at_snapshot.guest.progress);
    let target_digest: DigestInfo = target.get("/v1/vms/w2/digest").unwrap();
    assert_eq!(target_digest.digest, source_digest.digest);

    let (status, _) = source.request(Method::DELETE, "/v1/vms/w", None).unwrap();
    assert_eq!(status, 204);
    target
        .post::<VmInfo>("/v1/vms/w2/resume", &json!({}))
        .unwrap();
    let after = target
        .wait_vm("w2", WAIT, "progress past the snapshot", |vm| {
            vm.guest.progress > at_snapshot.guest.progress + 5000
                && vm.guest.verified_pages > at_snapshot.guest.verified_pages + 5000
        })
        .unwrap();
    assert_eq!(after.guest.verify_errors, 0, "{after:?}");
    assert_eq!(after.state, VmState::Running);
    let copied = target
        .data_dir
        .path()
        .canonicalize()
        .unwrap()
        .join("w.snap");
    assert_eq!(after.restored_from.as_deref(), copied.to_str());

    // Restoring the same file twice under one name is a clash, not a second VM.
    let (status, body) = target
        .request(
            Method::POST,
            "/v1/vms/restore",
            Some(&json!({"path": "w.snap", "name": "w2"})),
        )
        .unwrap();
    assert_eq!(status, 409, "{body}");
}

/// A snapshot taken while running (the agent pauses, saves and resumes by itself) restores too.
#[test]
fn snapshot_of_a_running_vm_resumes_it_and_restores() {
    if !kvm_available("snapshot_of_a_running_vm_resumes_it_and_restores") {
        return;
    }
    let agent = Agent::start("snap-live").unwrap();
    create(
        &agent,
        json!({"name":"t","memory_mib":64,"guest":{"kind":"ticker","interval_ms":10}}),
    );
    advances(&agent, "t", 5);
    let snap: SnapshotInfo = agent
        .post("/v1/vms/t/snapshot", &json!({"path": "snaps/t.snap"}))
        .unwrap();
    assert!(snap.path.ends_with("snaps/t.snap"));
    assert_eq!(agent.vm("t").unwrap().state, VmState::Running);
    advances(&agent, "t", 5);
    let restored: RestoreInfo = agent
        .post(
            "/v1/vms/restore",
            &json!({"path": "snaps/t.snap", "name": "t-copy"}),
        )
        .unwrap();
    assert_eq!(restored.vm.state, VmState::Running);
    advances(&agent, "t-copy", 5);
    let console = agent.text("/v1/vms/t-copy/console").unwrap();
    assert!(console.contains("tick "), "{console:?}");
}

/// Every kind of bad input gets a clear 4xx/5xx and leaves a running VM alone.
#[test]
fn bad_requests_get_clear_errors_and_running_vms_are_unaffected() {
    if !kvm_available("bad_requests_get_clear_errors_and_running_vms_are_unaffected") {
        return;
    }
    let agent = Agent::start("bad").unwrap();
    create(
        &agent,
        json!({"name":"ok","memory_mib":64,
               "guest":{"kind":"dirty","working_set_mib":16,"rate_mib_s":10}}),
    );
    advances(&agent, "ok", 100);

    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"name":"x","guest":{"kind":"bitcoin"}}),
            400,
            "unknown variant",
        ),
        (
            json!({"name":"x","memory_mib":0,"guest":{"kind":"idle"}}),
            400,
            "memory_mib",
        ),
        (
            json!({"name":"x","memory_mib":3,"guest":{"kind":"idle"}}),
            400,
            "memory",
        ),
        (
            json!({"name":"x","memory_mib":100_000_000u64,"guest":{"kind":"idle"}}),
            400,
            "between 2 MiB and 64 GiB",
        ),
        (
            json!({"name":"x","memory_mib":65_536,"guest":{"kind":"idle"}}),
            507,
            "Not enough host memory",
        ),
        (
            json!({"name":"ok","guest":{"kind":"idle"}}),
            409,
            "already exists",
        ),
        (
            json!({"name":"x","vcpus":9,"guest":{"kind":"idle"}}),
            400,
            "vcpus",
        ),
        (json!({"name":"a/b","guest":{"kind":"idle"}}), 400, "name"),
        (
            json!({"name":"x","memory_mib":64,"guest":{"kind":"dirty","working_set_mib":64,"rate_mib_s":1}}),
            400,
            "working set",
        ),
        (
            json!({"name":"x","guest":{"kind":"spin","duty_percent":200}}),
            400,
            "duty_percent",
        ),
        (json!({"guest":{"kind":"idle"}}), 400, "name"),
    ];
    for (body, want, needle) in cases {
        let (status, resp) = agent.request(Method::POST, "/v1/vms", Some(&body)).unwrap();
        let msg = resp["error"].as_str().unwrap_or_default().to_owned();
        assert_eq!(status, want, "{body} -> {resp}");
        assert!(msg.contains(needle), "{body} -> {msg:?} lacks {needle:?}");
    }
    for raw in [&b"{not json"[..], b"", b"[1,2,3]", b"{\"name\": 5}"] {
        let (status, resp) = agent.post_raw("/v1/vms", raw).unwrap();
        assert_eq!(status, 400, "{raw:?} -> {resp}");
        assert!(resp["error"].as_str().is_some(), "{resp}");
    }
    let (status, _) = agent.request(Method::GET, "/v1/vms/nope", None).unwrap();
    assert_eq!(status, 404);
    let (status, _) = agent
        .request(Method::POST, "/v1/vms/nope/pause", None)
        .unwrap();
    assert_eq!(status, 404);
    let (status, _) = agent.request(Method::GET, "/v2/whatever", None).unwrap();
    assert_eq!(status, 404);
    let (status, resp) = agent.request(Method::PUT, "/v1/vms", None).unwrap();
    assert_eq!(status, 405, "{resp}");
    assert!(resp["error"].as_str().is_some(), "{resp}");
    let (status, resp) = agent
        .request(Method::GET, "/v1/vms/ok/console?max_bytes=lots", None)
        .unwrap();
    assert_eq!(status, 400, "{resp}");
    assert!(
        resp["error"].as_str().unwrap().contains("max_bytes"),
        "{resp}"
    );
    let (status, resp) = agent
        .request(
            Method::POST,
            "/v1/vms",
            Some(&json!({"name":"restore","guest":{"kind":"idle"}})),
        )
        .unwrap();
    assert_eq!(status, 400, "{resp}");

    // Restoring garbage, a truncated snapshot, or a missing file.
    let garbage = agent.data_dir.path().join("garbage.snap");
    std::fs::write(&garbage, b"this is not a snapshot").unwrap();
    let snap: SnapshotInfo = agent
        .post("/v1/vms/ok/snapshot", &json!({"path": "good.snap"}))
        .unwrap();
    let bytes = std::fs::read(&snap.path).unwrap();
    let truncated = agent.data_dir.path().join("truncated.snap");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let flipped = agent.data_dir.path().join("flipped.snap");
    let mut b = bytes.clone();
    let middle = b.len() / 2;
    b[middle] ^= 0x40;
    std::fs::write(&flipped, &b).unwrap();
    for (path, name) in [
        (garbage.to_str().unwrap(), "g"),
        (truncated.to_str().unwrap(), "tr"),
        (flipped.to_str().unwrap(), "fl"),
        ("missing/x.snap", "nx"),
    ] {
        let (status, resp) = agent
            .request(
                Method::POST,
                "/v1/vms/restore",
                Some(&json!({"path": path, "name": name})),
            )
            .unwrap();
        assert_eq!(status, 400, "{path} -> {resp}");
        assert!(
            resp["error"].as_str().unwrap().contains("Cannot restore"),
            "{resp}"
        );
        let (status, _) = agent
            .request(Method::GET, &format!("/v1/vms/{name}"), None)
            .unwrap();
        assert_eq!(status, 404, "failed restore left VM {name} behind");
    }

    // Snapshot and restore paths stay in the data directory: `..`, an absolute path outside
    // it, and a symbolic link inside it that leads out are refused before anything is written.
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), agent.data_dir.path().join("out")).unwrap();
    let escape = outside.path().join("x.snap");
    for (path, needle) in [
        ("../x.snap", "`..`"),
        ("snaps/../../x.snap", "`..`"),
        (escape.to_str().unwrap(), "outside the data directory"),
        ("/etc/passwd", "outside the data directory"),
        ("out/x.snap", "symbolic link"),
    ] {
        let (status, resp) = agent
            .request(
                Method::POST,
                "/v1/vms/ok/snapshot",
                Some(&json!({ "path": path })),
            )
            .unwrap();
        assert_eq!(status, 400, "snapshot to {path} -> {resp}");
        let msg = resp["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{path} -> {msg:?} lacks {needle:?}");
        let (status, resp) = agent
            .request(
                Method::POST,
                "/v1/vms/restore",
                Some(&json!({"path": path, "name": "esc"})),
            )
            .unwrap();
        assert_eq!(status, 400, "restore from {path} -> {resp}");
    }
    assert!(!escape.exists(), "a snapshot escaped the data directory");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    let (status, _) = agent.request(Method::GET, "/v1/vms/esc", None).unwrap();
    assert_eq!(status, 404);

    let ok = advances(&agent, "ok", 100);
    assert_eq!(ok.state, VmState::Running);
    assert_eq!(ok.guest.verify_errors, 0);
    let vms: Vec<VmInfo> = agent.get("/v1/vms").unwrap();
    assert_eq!(vms.len(), 1);
}

#[test]
fn missing_kvm_device_is_a_clear_503() {
    // Needs no KVM: the agent is pointed at a device that does not exist.
    let agent = Agent::start_with("nokvm", &["--kvm-device", "/nonexistent/kvm"]).unwrap();
    let host: godwit_api::HostInfo = agent.get("/v1/host").unwrap();
    assert!(!host.kvm_available);
    assert!(host.kvm_error.unwrap().contains("/nonexistent/kvm"));
    let (status, resp) = agent
        .request(
            Method::POST,
            "/v1/vms",
            Some(&json!({"name":"x","guest":{"kind":"idle"}})),
        )
        .unwrap();
    assert_eq!(status, 503, "{resp}");
    assert!(
        resp["error"]
            .as_str()
            .unwrap()
            .contains("KVM is not available"),
        "{resp}"
    );
}

#[test]
fn sigterm_stops_the_agent_and_its_vms_cleanly() {
    if !kvm_available("sigterm_stops_the_agent_and_its_vms_cleanly") {
        return;
    }
    let mut agent = Agent::start_with("term", &["--stop-vms-on-exit"]).unwrap();
    create(
        &agent,
        json!({"name":"a","vcpus":2,"memory_mib":64,"guest":{"kind":"spin","duty_percent":100}}),
    );
    create(
        &agent,
        json!({"name":"b","memory_mib":64,"guest":{"kind":"idle"}}),
    );
    advances(&agent, "a", 50);
    assert_eq!(agent.vmm_pids().len(), 2);
    let code = agent.terminate(Duration::from_secs(20)).unwrap();
    assert_eq!(code, Some(0));
    assert!(
        agent.vmm_pids().is_empty(),
        "VMMs left: {:?}",
        agent.vmm_pids()
    );
}
