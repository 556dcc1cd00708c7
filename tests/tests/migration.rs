//! Live migration between real agent processes with real KVM guests: every mode, idle and
//! dirtying guests, a guest that dirties faster than the link, cancel, ping-pong, concurrent
//! migrations, refusing targets and a peer that sends garbage.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use godwit_api::{MigrationInfo, MigrationStatus, VmInfo, VmState};
use godwit_tests::{kvm_available, Agent};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);

fn create(agent: &Agent, name: &str, guest: Value) -> VmInfo {
    agent
        .post(
            "/v1/vms",
            &json!({"name": name, "vcpus": 2, "memory_mib": 256, "guest": guest}),
        )
        .unwrap_or_else(|e| panic!("create {name}: {e:#}"))
}

fn dirty(rate: f64) -> Value {
    json!({"kind":"dirty","working_set_mib":64,"rate_mib_s":rate,"pattern":"hotcold"})
}

/// Starts a migration; returns its id.
fn start(src: &Agent, dst: &Agent, name: &str, body: Value) -> String {
    src.migrate(dst, name, body)
        .unwrap_or_else(|e| panic!("migrate {name}: {e:#}"))
}

/// Polls the source until the migration ends.
fn finish(src: &Agent, id: &str) -> MigrationInfo {
    src.wait_migration(id, WAIT).unwrap()
}

/// Migrates `name` from `src` to `dst` and checks everything the issue asks of a migration:
/// completed, digests equal, gone from the source, running on the target with its progress
/// still advancing and no verify errors.
fn migrate_and_check(src: &Agent, dst: &Agent, name: &str, body: Value) -> MigrationInfo {
    let before = src.vm(name).unwrap();
    let id = start(src, dst, name, body);
    let info = finish(src, &id);
    assert_eq!(info.status, MigrationStatus::Completed, "{info:?}");
    let (s, t) = (info.source_digest.clone(), info.target_digest.clone());
    assert!(s.is_some(), "no digest: {info:?}");
    assert_eq!(s, t, "memory differs after migration: {info:?}");
    assert!(info.downtime_ms.is_some());
    let (status, _) = src
        .request(Method::GET, &format!("/v1/vms/{name}"), None)
        .unwrap();
    assert_eq!(status, 404, "{name} is still listed on the source");
    let on_target = dst.vm(name).unwrap();
    assert_eq!(on_target.state, VmState::Running);
    if before.guest.progress > 0 {
        let after = dst
            .wait_vm(name, WAIT, "progress on the target", |vm| {
                vm.guest.progress > before.guest.progress + 500
            })
            .unwrap();
        assert_eq!(after.guest.verify_errors, 0, "{after:?}");
    }
    // The target's own record of the migration completed too (it is marked so just after the
    // target sent its Done, so it may trail the source's by a moment on a busy machine).
    let deadline = Instant::now() + Duration::from_secs(30);
    let theirs = loop {
        let theirs: MigrationInfo = dst.get(&format!("/v1/migrations/{id}")).unwrap();
        if theirs.status != MigrationStatus::Running || Instant::now() > deadline {
            break theirs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(theirs.status, MigrationStatus::Completed, "{theirs:?}");
    info
}

fn agents(prefix: &str) -> (Agent, Agent) {
    (
        Agent::start(&format!("{prefix}-a")).unwrap(),
        Agent::start(&format!("{prefix}-b")).unwrap(),
    )
}

fn each_guest_in_mode(mode: &str) {
    let (a, b) = agents(mode);
    create(&a, "idle", json!({"kind":"idle"}));
    create(&a, "low", dirty(10.0));
    a.wait_vm("low", WAIT, "progress", |vm| vm.guest.progress > 1000)
        .unwrap();
    let body = json!({"mode": mode});
    let idle = migrate_and_check(&a, &b, "idle", body.clone());
    assert!(idle.pages.zero_pages > 60_000, "{:?}", idle.pages);
    migrate_and_check(&a, &b, "low", body.clone());
    // And back, so each side has been source and target.
    migrate_and_check(&b, &a, "low", body);
}

#[test]
fn precopy_moves_idle_and_dirtying_guests() {
    if kvm_available("precopy_moves_idle_and_dirtying_guests") {
        each_guest_in_mode("precopy");
    }
}

#[test]
fn stop_and_copy_moves_idle_and_dirtying_guests() {
    if kvm_available("stop_and_copy_moves_idle_and_dirtying_guests") {
        each_guest_in_mode("stop-and-copy");
    }
}

#[test]
fn postcopy_moves_idle_and_dirtying_guests() {
    if !kvm_available("postcopy_moves_idle_and_dirtying_guests") {
        return;
    }
    each_guest_in_mode("postcopy");
}

#[test]
fn auto_moves_idle_and_dirtying_guests() {
    if kvm_available("auto_moves_idle_and_dirtying_guests") {
        each_guest_in_mode("auto");
    }
}

/// A guest that dirties faster than the bandwidth cap: pre-copy fails cleanly (the VM runs on
/// at the source), auto switches to post-copy and completes, post-copy and stop-and-copy just
/// complete.
#[test]
fn a_guest_dirtying_faster_than_the_link() {
    if !kvm_available("a_guest_dirtying_faster_than_the_link") {
        return;
    }
    let (a, b) = agents("fast");
    let guest = json!({"kind":"dirty","working_set_mib":16,"rate_mib_s":40,"pattern":"uniform"});
    create(&a, "hot", guest);
    a.wait_vm("hot", WAIT, "progress", |vm| vm.guest.progress > 5000)
        .unwrap();
    let capped = |mode: &str| {
        json!({"mode": mode, "bandwidth_mib_s": 10, "compress": "none",
               "downtime_ms": 50, "max_rounds": 3})
    };

    let id = start(&a, &b, "hot", capped("precopy"));
    let info = finish(&a, &id);
    assert_eq!(info.status, MigrationStatus::Failed, "{info:?}");
    assert!(
        info.error
            .as_deref()
            .unwrap_or("")
            .contains("did not converge"),
        "{info:?}"
    );
    let still = a
        .wait_vm("hot", WAIT, "progress after the failed pre-copy", |vm| {
            vm.state == VmState::Running && vm.guest.progress > 1000
        })
        .unwrap();
    let p = still.guest.progress;
    a.wait_vm("hot", WAIT, "progress", |vm| vm.guest.progress > p + 1000)
        .unwrap();
    assert_eq!(a.vm("hot").unwrap().guest.verify_errors, 0);
    let (status, _) = b.request(Method::GET, "/v1/vms/hot", None).unwrap();
    assert_eq!(status, 404, "the target kept a copy of a failed migration");

    let auto = migrate_and_check(&a, &b, "hot", capped("auto"));
    assert!(auto.switched_to_postcopy, "{auto:?}");
    assert!(auto.postcopy_bytes > 0);

    let post = migrate_and_check(&b, &a, "hot", capped("postcopy"));
    assert!(post.faults.faults > 0, "{:?}", post.faults);
    migrate_and_check(&a, &b, "hot", capped("stop-and-copy"));
}

#[test]
fn cancel_mid_precopy_leaves_the_vm_running_on_the_source() {
    if !kvm_available("cancel_mid_precopy_leaves_the_vm_running_on_the_source") {
        return;
    }
    let (a, b) = agents("cancel");
    create(&a, "c", dirty(20.0));
    a.wait_vm("c", WAIT, "progress", |vm| vm.guest.progress > 1000)
        .unwrap();
    let id = start(
        &a,
        &b,
        "c",
        json!({"mode":"precopy","bandwidth_mib_s":2,"compress":"none"}),
    );
    std::thread::sleep(Duration::from_millis(700));
    let _: MigrationInfo = a
        .post(&format!("/v1/migrations/{id}/cancel"), &json!({}))
        .unwrap();
    let info = finish(&a, &id);
    assert_eq!(info.status, MigrationStatus::Cancelled, "{info:?}");
    let p = a.vm("c").unwrap().guest.progress;
    let vm = a
        .wait_vm("c", WAIT, "progress after cancel", |vm| {
            vm.guest.progress > p + 500
        })
        .unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.guest.verify_errors, 0);
    let (status, _) = b.request(Method::GET, "/v1/vms/c", None).unwrap();
    assert_eq!(status, 404);
    // The name and memory are free again on the target: a real migration now works.
    migrate_and_check(&a, &b, "c", json!({"mode":"precopy"}));
}

#[test]
fn ten_round_trips_and_two_migrations_at_once() {
    if !kvm_available("ten_round_trips_and_two_migrations_at_once") {
        return;
    }
    let (a, b) = agents("pingpong");
    create(&a, "p", dirty(20.0));
    create(&a, "q", dirty(5.0));
    a.wait_vm("p", WAIT, "progress", |vm| vm.guest.progress > 1000)
        .unwrap();
    let modes = ["precopy", "postcopy", "stop-and-copy", "auto"];
    for i in 0..10 {
        let (src, dst) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        migrate_and_check(src, dst, "p", json!({"mode": modes[i % modes.len()]}));
    }
    // p is back on a (ten moves). Move p and q to b at the same time.
    let id_p = start(&a, &b, "p", json!({"mode":"precopy"}));
    let id_q = start(&a, &b, "q", json!({"mode":"postcopy"}));
    for id in [id_p, id_q] {
        let info = finish(&a, &id);
        assert_eq!(info.status, MigrationStatus::Completed, "{info:?}");
        assert_eq!(info.source_digest, info.target_digest);
    }
    for name in ["p", "q"] {
        let vm = b.vm(name).unwrap();
        let p = vm.guest.progress;
        let vm = b
            .wait_vm(name, WAIT, "progress", |vm| vm.guest.progress > p + 100)
            .unwrap();
        assert_eq!(vm.guest.verify_errors, 0);
    }
    let left: Vec<VmInfo> = a.get("/v1/vms").unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn refusing_targets_and_garbage_peers() {
    if !kvm_available("refusing_targets_and_garbage_peers") {
        return;
    }
    let a = Agent::start("refuse-a").unwrap();
    let b = Agent::start("refuse-b").unwrap();
    // A target with (almost) no memory for VMs.
    let tiny = Agent::start_with("refuse-tiny", &["--reserved-memory-mib", "1000000000"]).unwrap();
    create(&a, "x", dirty(5.0));
    create(&b, "x", json!({"kind":"idle"}));

    let mut body = json!({"mode":"precopy"});
    body["target"] = json!(godwit_tests::host_port(&b.url));
    let (status, resp) = a
        .request(Method::POST, "/v1/vms/x/migrate", Some(&body))
        .unwrap();
    assert_eq!(status, 409, "{resp}");
    assert!(
        resp["error"].as_str().unwrap().contains("already exists"),
        "{resp}"
    );

    body["target"] = json!(godwit_tests::host_port(&tiny.url));
    let (status, resp) = a
        .request(Method::POST, "/v1/vms/x/migrate", Some(&body))
        .unwrap();
    assert_eq!(status, 507, "{resp}");
    assert!(
        resp["error"]
            .as_str()
            .unwrap()
            .contains("Not enough host memory"),
        "{resp}"
    );

    body["target"] = json!("127.0.0.1:1");
    let (status, resp) = a
        .request(Method::POST, "/v1/vms/x/migrate", Some(&body))
        .unwrap();
    assert_eq!(status, 502, "{resp}");

    body["target"] = json!("no-port");
    let (status, _) = a
        .request(Method::POST, "/v1/vms/x/migrate", Some(&body))
        .unwrap();
    assert_eq!(status, 400);

    // A host of the cluster announces a migration, then its port gets garbage (no TLS
    // handshake, a protocol header, zeros): the target refuses each connection, keeps
    // running, and after its accept timeout frees the name and memory.
    let evil = godwit_tests::TestCa::shared()
        .client(&godwit_tls::Identity {
            name: "evil".into(),
            role: godwit_tls::Role::Host,
        })
        .unwrap();
    let incoming = json!({"id": "00112233445566778899aabbccddeeff", "vm": "ghost",
                          "vcpus": 1, "memory_mib": 64, "mode": "precopy", "source": "evil"});
    let accepted: Value = b
        .with_auth(&evil)
        .unwrap()
        .post("/v1/migrations/incoming", &incoming)
        .unwrap();
    let port = accepted["port"].as_u64().unwrap();
    let host = godwit_tests::host_port(&b.url)
        .rsplit_once(':')
        .unwrap()
        .0
        .to_owned();
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[
            0x47, 0x44, 0x57, 0x4d, 0x01, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ],
        &[0u8; 64][..],
    ] {
        let mut s = TcpStream::connect((host.as_str(), port as u16)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(garbage).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
    }
    let (status, resp) = b
        .request(
            Method::POST,
            "/v1/vms",
            Some(&json!({"name":"ghost","memory_mib":64,"guest":{"kind":"idle"}})),
        )
        .unwrap();
    assert_eq!(
        status, 409,
        "the name is held while the migration waits: {resp}"
    );
    // Both agents are healthy and the VMs unharmed.
    let x = a.vm("x").unwrap();
    assert_eq!(x.state, VmState::Running);
    assert_eq!(b.vm("x").unwrap().state, VmState::Running);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = b
            .request(
                Method::POST,
                "/v1/vms",
                Some(&json!({"name":"ghost","memory_mib":64,"guest":{"kind":"idle"}})),
            )
            .unwrap();
        if status == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed incoming migration kept its name"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let ghost: MigrationInfo = b
        .get("/v1/migrations/00112233445566778899aabbccddeeff")
        .unwrap();
    assert_eq!(ghost.status, MigrationStatus::Failed, "{ghost:?}");
    assert_eq!(a.vm("x").unwrap().guest.verify_errors, 0);
}
