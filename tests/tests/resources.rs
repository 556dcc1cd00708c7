//! VM resources across migrations, with real agents and real KVM guests: a VM with a disk, a
//! published endpoint, scratch data and an entropy device migrates in every mode while its
//! guest writes and verifies the disk and a client talks to its endpoint; fallbacks when the
//! target lacks space or the device; refusals; a failed resource action.

use std::collections::BTreeMap;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use godwit_api::{
    ClusterHost, ClusterMigration, ClusterVm, MigrationInfo, MigrationStatus, ResourceAction,
    ResourceKind, ResourceStatus, VmInfo, VmState,
};
use godwit_tests::{bin_dir, kvm_available, Agent, EchoClient as Client, Orchestrator};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);

fn create(agent: &Agent, name: &str, resources: Value) -> VmInfo {
    agent
        .post(
            "/v1/vms",
            &json!({
                "name": name, "vcpus": 2, "memory_mib": 128,
                "guest": {"kind": "dirty", "working_set_mib": 16, "rate_mib_s": 8.0,
                          "disk_ops_s": 1000},
                "resources": resources,
            }),
        )
        .unwrap_or_else(|e| panic!("create {name}: {e:#}"))
}

fn migrate(src: &Agent, dst: &Agent, name: &str, mode: &str) -> MigrationInfo {
    let id = src
        .migrate(dst, name, json!({"mode": mode, "downtime_ms": 50}))
        .unwrap_or_else(|e| panic!("migrate {name}: {e:#}"));
    src.wait_migration(&id, WAIT).unwrap()
}

fn record<'a>(info: &'a MigrationInfo, name: &str) -> &'a godwit_api::ResourceMigration {
    info.resources
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no record for {name}: {info:?}"))
}

/// blake3 of every file of a directory, by name.
fn dir_digests(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let data = std::fs::read(e.path()).unwrap();
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            blake3::hash(&data).to_hex().to_string(),
        );
    }
    out
}

/// The guest wrote and verified its disk after `since` and found nothing wrong.
fn disk_verifies(agent: &Agent, name: &str, since: &VmInfo) -> VmInfo {
    let before = since.guest.devices.clone().unwrap_or_default();
    let vm = agent
        .wait_vm(name, WAIT, "a full disk verification pass", |vm| {
            vm.guest
                .devices
                .as_ref()
                .is_some_and(|d| d.disk_passes >= before.disk_passes + 2)
        })
        .unwrap();
    let d = vm.guest.devices.clone().unwrap();
    assert_eq!(d.disk_errors, 0, "disk read back wrong: {d:?}");
    assert_eq!(d.disk_io_errors, 0, "disk requests failed: {d:?}");
    assert!(d.disk_writes > before.disk_writes, "{d:?}");
    assert_eq!(vm.guest.verify_errors, 0);
    vm
}

fn entropy_id(vm: &VmInfo) -> String {
    let loc = &vm
        .resources
        .iter()
        .find(|r| r.spec.kind == ResourceKind::Device)
        .unwrap()
        .location;
    loc.split('#').nth(1).unwrap()[..8].to_owned()
}

#[test]
fn all_resource_kinds_follow_the_vm_in_every_mode() {
    if !kvm_available("all_resource_kinds_follow_the_vm_in_every_mode") {
        return;
    }
    let a = Agent::start_with("res-a", &["--device", "entropy"]).unwrap();
    let b = Agent::start_with("res-b", &["--device", "entropy"]).unwrap();
    let name = "rvm";
    let vm = create(
        &a,
        name,
        json!([
            {"name": "root", "kind": "disk", "size_mib": 8, "attachment": "unattached"},
            {"name": "web", "kind": "endpoint"},
            {"name": "cache", "kind": "scratch", "size_mib": 3},
            {"name": "rng", "kind": "device", "class": "entropy"},
        ]),
    );
    let address = vm
        .resources
        .iter()
        .find_map(|r| r.address.clone())
        .unwrap()
        .replace("0.0.0.0", "127.0.0.1");
    let scratch = dir_digests(&a.data_dir.path().join("resources").join(name).join("cache"));
    assert_eq!(scratch.len(), 3);
    let mut last = disk_verifies(&a, name, &vm);
    let client = Client::start(&address);

    let hops: [(&Agent, &Agent, &str); 4] = [
        (&a, &b, "precopy"),
        (&b, &a, "stop-and-copy"),
        (&a, &b, "postcopy"),
        (&b, &a, "auto"),
    ];
    for (src, dst, mode) in hops {
        let echoed = last.guest.devices.clone().unwrap().echo_lines;
        let info = migrate(src, dst, name, mode);
        assert_eq!(info.status, MigrationStatus::Completed, "{mode}: {info:?}");
        for r in &info.resources {
            assert_eq!(r.status, ResourceStatus::Done, "{mode}: {r:?}");
        }
        let root = record(&info, "root");
        assert_eq!(root.action, ResourceAction::Move, "{root:?}");
        assert!(
            root.detail.contains("source image and target commit both"),
            "{root:?}"
        );
        assert!(root.bytes > 0);
        let cache = record(&info, "cache");
        assert_eq!(cache.action, ResourceAction::Copy, "{cache:?}");
        assert_eq!(record(&info, "web").action, ResourceAction::GlobalRef);
        assert_eq!(record(&info, "rng").action, ResourceAction::Rebind);
        let (status, _) = src
            .request(Method::GET, &format!("/v1/vms/{name}"), None)
            .unwrap();
        assert_eq!(status, 404, "{mode}: still on the source");
        // The disk moved: gone from the source, on the target.
        let src_disk = src
            .data_dir
            .path()
            .join("resources")
            .join(name)
            .join("root");
        assert!(!src_disk.exists(), "{mode}: source disk left behind");
        let dst_dir = dst.data_dir.path().join("resources").join(name);
        assert!(dst_dir.join("root/disk.img").exists());
        assert_eq!(dir_digests(&dst_dir.join("cache")), scratch, "{mode}");
        // The guest goes on verifying its disk there, reads the target's entropy device and
        // keeps answering the client.
        let on_dst = disk_verifies(dst, name, &last);
        assert_eq!(on_dst.state, VmState::Running);
        let dev = on_dst.guest.devices.clone().unwrap();
        assert_eq!(
            format!("{:08x}", dev.entropy_device),
            entropy_id(&on_dst),
            "{mode}"
        );
        assert!(entropy_id(&on_dst) != entropy_id(&last) || src.name == dst.name);
        assert!(
            dev.echo_lines > echoed,
            "{mode}: no echo on the target: {dev:?}"
        );
        let disk_info = on_dst
            .resources
            .iter()
            .find(|r| r.spec.name == "root")
            .unwrap();
        assert_eq!(disk_info.host, dst.name);
        last = on_dst;
    }
    let lines = client.finish();
    assert!(lines > 30, "the client exchanged only {lines} lines");
}

#[test]
fn targets_lacking_space_or_devices_fall_back_or_refuse() {
    if !kvm_available("targets_lacking_space_or_devices_fall_back_or_refuse") {
        return;
    }
    let a = Agent::start_with("fb-a", &["--device", "entropy"]).unwrap();
    // No entropy device, and room for 4 MiB of resource data only.
    let c = Agent::start_with("fb-c", &["--resource-capacity-mib", "4"]).unwrap();

    // A device that must stay local: c is not eligible, nothing moves.
    let strict = create(
        &a,
        "strict",
        json!([{"name": "rng", "kind": "device", "class": "entropy", "allow_global_ref": false}]),
    );
    let (status, body) = a
        .request(
            Method::POST,
            "/v1/vms/strict/migrate",
            Some(&json!({"target": c.address()})),
        )
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no \"entropy\" device"),
        "{body}"
    );
    let still = a.vm("strict").unwrap();
    assert_eq!(still.state, VmState::Running);
    assert_eq!(still.created_unix_ms, strict.created_unix_ms);

    // A disk that would rather move, too big for c: it stays on a behind an NBD export; the
    // entropy device is used remotely.
    let vm = create(
        &a,
        "big",
        json!([
            {"name": "root", "kind": "disk", "size_mib": 8, "attachment": "unattached"},
            {"name": "rng", "kind": "device", "class": "entropy"},
        ]),
    );
    let before = disk_verifies(&a, "big", &vm);
    let info = migrate(&a, &c, "big", "precopy");
    assert_eq!(info.status, MigrationStatus::Completed, "{info:?}");
    let root = record(&info, "root");
    assert_eq!(root.action, ResourceAction::GlobalRef, "{root:?}");
    assert!(
        root.fallback && root.first_choice == ResourceAction::Move,
        "{root:?}"
    );
    assert!(root.reason.contains("MV impossible"), "{root:?}");
    let rng = record(&info, "rng");
    assert_eq!(rng.action, ResourceAction::GlobalRef, "{rng:?}");
    assert!(rng.reason.contains("no \"entropy\" device"), "{rng:?}");
    // The disk is still a file on a, and the guest on c verifies through the export.
    assert!(a
        .data_dir
        .path()
        .join("resources/big/root/disk.img")
        .exists());
    let on_c = disk_verifies(&c, "big", &before);
    let disk = on_c
        .resources
        .iter()
        .find(|r| r.spec.name == "root")
        .unwrap();
    assert!(disk.location.starts_with("nbd "), "{disk:?}");
    assert_eq!(disk.host, a.name);
    let dev = on_c.guest.devices.clone().unwrap();
    assert_eq!(format!("{:08x}", dev.entropy_device), entropy_id(&before));
    assert!(dev.entropy_reads > before.guest.devices.clone().unwrap().entropy_reads);

    // Deleting the VM where it runs releases what its old host keeps for it: the export
    // stops and the disk image goes, and the space is free again.
    let kept = a.data_dir.path().join("resources/big");
    assert!(kept.exists());
    let free_before: godwit_api::HostInfo = a.get("/v1/host").unwrap();
    let (status, _) = c.request(Method::DELETE, "/v1/vms/big", None).unwrap();
    assert_eq!(status, 204);
    let deadline = Instant::now() + Duration::from_secs(20);
    while kept.exists() {
        assert!(Instant::now() < deadline, "{} still kept", kept.display());
        thread::sleep(Duration::from_millis(50));
    }
    // The space is the agent's to count again once the VMM that kept the disk has exited.
    loop {
        let free_after: godwit_api::HostInfo = a.get("/v1/host").unwrap();
        if free_after.disk_free_bytes == free_before.disk_free_bytes + (8 << 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the released disk's space is not free again: {} -> {}",
            free_before.disk_free_bytes,
            free_after.disk_free_bytes
        );
        thread::sleep(Duration::from_millis(50));
    }
    // A VM of that name that runs here is not released by mistake.
    let (status, _) = a
        .request(Method::DELETE, "/v1/resources/strict", None)
        .unwrap();
    assert_eq!(status, 409);
}

#[test]
fn a_failed_resource_action_leaves_the_vm_running_on_the_source() {
    if !kvm_available("a_failed_resource_action_leaves_the_vm_running_on_the_source") {
        return;
    }
    let a = Agent::start("fail-a").unwrap();
    let b = Agent::start("fail-b").unwrap();
    let vm = create(
        &a,
        "fragile",
        json!([
            {"name": "root", "kind": "disk", "size_mib": 4, "attachment": "unattached"},
            {"name": "cache", "kind": "scratch", "size_mib": 2},
            {"name": "web", "kind": "endpoint"},
        ]),
    );
    let address = vm.resources.iter().find_map(|r| r.address.clone()).unwrap();
    let client = Client::start(&address.replace("0.0.0.0", "127.0.0.1"));
    // The scratch data vanishes behind the agent's back: copying it must fail.
    std::fs::remove_dir_all(a.data_dir.path().join("resources/fragile/cache")).unwrap();
    let t = Instant::now();
    let info = migrate(&a, &b, "fragile", "precopy");
    assert_eq!(info.status, MigrationStatus::Failed, "{info:?}");
    let error = info.error.clone().unwrap_or_default();
    assert!(
        error.contains("resources"),
        "failed for another reason: {error}"
    );
    let cache = record(&info, "cache");
    assert_eq!(cache.status, ResourceStatus::Failed, "{cache:?}");
    assert!(cache.error.is_some());
    let metrics = a.text("/metrics").unwrap();
    let counted = |name: &str, labels: &[&str]| {
        metrics.lines().any(|l| {
            l.starts_with(name) && labels.iter().all(|x| l.contains(x)) && l.ends_with(" 1")
        })
    };
    assert!(
        counted(
            "godwit_migration_failures_total{",
            &["reason=\"resources\"", "role=\"source\""]
        ),
        "{metrics}"
    );
    assert!(
        counted(
            "godwit_migration_resource_actions_total{",
            &["kind=\"scratch\"", "action=\"copy\"", "outcome=\"failed\""]
        ),
        "{metrics}"
    );
    assert!(t.elapsed() < WAIT);
    // Still here, still running, still verifying its disk and answering.
    let here = disk_verifies(&a, "fragile", &a.vm("fragile").unwrap());
    assert_eq!(here.state, VmState::Running);
    assert!(!here.migrating);
    let (status, _) = b.request(Method::GET, "/v1/vms/fragile", None).unwrap();
    assert_eq!(status, 404);
    assert!(!b.data_dir.path().join("resources/fragile/root").exists());
    assert!(client.finish() > 0);
}

#[test]
fn the_orchestrator_places_and_moves_vms_only_where_their_resources_bind() {
    if !kvm_available("the_orchestrator_places_and_moves_vms_only_where_their_resources_bind") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let orch = Orchestrator::start(
        &dir.path().join("orch"),
        "balancer = \"off\"\npoll_interval_ms = 500\n",
    )
    .unwrap();
    // host-1: no devices, 4 MiB for resource data; host-2: an entropy device, the default room.
    let common = [
        "--orchestrator",
        orch.url.as_str(),
        "--dirty-probe-interval-s",
        "0",
    ];
    let h1 = Agent::start_with(
        "host-1",
        &[&common[..], &["--resource-capacity-mib", "4"]].concat(),
    )
    .unwrap();
    let mut h2 =
        Agent::start_with("host-2", &[&common[..], &["--device", "entropy"]].concat()).unwrap();
    orch.wait::<Vec<ClusterHost>>("/v1/hosts", WAIT, "two hosts up", |h| {
        h.iter().filter(|h| h.up).count() == 2
    })
    .unwrap();
    let create = |body: Value| -> ClusterVm {
        let created: godwit_api::ClusterVmCreated = orch
            .send(Method::POST, "/v1/vms", &body)
            .unwrap_or_else(|e| panic!("create {body}: {e:#}"));
        created.vm
    };
    let echo = json!({"kind": "echo"});
    // Only host-2 has the device; only host-2 has room for 8 MiB of disk.
    for name in ["rng1", "rng2"] {
        let vm = create(json!({"name": name, "memory_mib": 64, "guest": echo,
            "resources": [{"name": "rng", "kind": "device", "class": "entropy",
                           "allow_global_ref": false}]}));
        assert_eq!(vm.host, "host-2", "{vm:?}");
    }
    let big = create(json!({"name": "big", "memory_mib": 64, "guest": echo,
        "resources": [{"name": "root", "kind": "disk", "size_mib": 8},
                      {"name": "cache", "kind": "scratch", "size_mib": 2}]}));
    assert_eq!(big.host, "host-2", "{big:?}");
    orch.wait::<Vec<ClusterVm>>("/v1/vms", WAIT, "three VMs reported", |v| {
        v.iter().filter(|v| v.reported).count() == 3
    })
    .unwrap();

    // A manual move of a VM whose device must stay local, to a host without it: refused.
    let (status, body) = orch
        .request(
            Method::POST,
            "/v1/vms/rng1/migrate",
            Some(&json!({"to": "host-1"})),
        )
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("entropy"),
        "{body}"
    );

    // The disk (by identifier, fastened) stays behind an export; the scratch data fits and is
    // copied. The orchestrator's record and the CLI show both.
    let started: ClusterMigration = orch
        .send(
            Method::POST,
            "/v1/vms/big/migrate",
            &json!({"to": "host-1", "mode": "precopy"}),
        )
        .unwrap();
    let done = orch
        .wait::<ClusterMigration>(
            &format!("/v1/migrations/{}", started.id),
            WAIT,
            "the migration to end",
            |m| m.status != MigrationStatus::Running,
        )
        .unwrap();
    assert_eq!(done.status, MigrationStatus::Completed, "{done:?}");
    let stats = done.stats.clone().unwrap();
    let actions: BTreeMap<String, ResourceAction> = stats
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.action))
        .collect();
    assert_eq!(actions["root"], ResourceAction::GlobalRef, "{stats:?}");
    assert_eq!(actions["cache"], ResourceAction::Copy, "{stats:?}");
    let on_h1 = h1.vm("big").unwrap();
    assert!(on_h1
        .resources
        .iter()
        .any(|r| r.location.starts_with("nbd ")));
    let out = std::process::Command::new(bin_dir().join("godwit"))
        .args(["--server", &orch.url, "migrations", "show", &started.id])
        .args(godwit_tests::TestCa::shared().admin_args().unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in ["root", "GR", "cache", "CP"] {
        assert!(
            text.contains(want),
            "`godwit migrations show` lacks {want}:\n{text}"
        );
    }
    let metrics = orch.text("/metrics").unwrap();
    assert!(
        metrics.contains(
            "godwit_orchestrator_resource_actions_total{action=\"copy\",kind=\"scratch\",outcome=\"done\"} 1"
        ),
        "{metrics}"
    );

    // The export of the disk left on host-2 is a qemu-nbd process held by the VMM that keeps
    // the VM's things there; it outlives the agent, and dies with a host that fails.
    let dir = h2.data_dir.path().to_owned();
    assert_eq!(qemu_nbd_serving(&dir), 1, "no export serving host-2's disk");
    // It listens on loopback only: other hosts reach it through a TLS resource link.
    let loopback = qemu_nbd_commands(&dir)
        .iter()
        .all(|c| c.contains("--bind=127.0.0.1 "));
    assert!(loopback, "{:?}", qemu_nbd_commands(&dir));
    h2.kill();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(qemu_nbd_serving(&dir), 1, "the export died with the agent");
    h2.crash_host();
    let deadline = Instant::now() + Duration::from_secs(10);
    while qemu_nbd_serving(&dir) > 0 {
        assert!(Instant::now() < deadline, "qemu-nbd outlived its host");
        thread::sleep(Duration::from_millis(50));
    }
}

/// qemu-nbd processes serving a file under `dir`.
fn qemu_nbd_serving(dir: &Path) -> usize {
    qemu_nbd_commands(dir).len()
}

/// The command lines of the qemu-nbd processes serving a file under `dir`.
fn qemu_nbd_commands(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with("qemu-nbd") && c.contains(&dir))
        .collect()
}
