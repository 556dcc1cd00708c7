//! Host lifecycle through the orchestrator, with real agents and KVM guests: cordon keeps new
//! VMs and migrations away and survives an orchestrator restart; a drain moves every VM that
//! can move (each resource kind: a moving disk, a published endpoint, scratch data, an entropy
//! device) onto the other hosts, where they verify, and reports the one bound to a device no
//! other host has; a host that runs VMs cannot be forgotten, an empty one can.

use std::time::Duration;

use godwit_api::{
    ClusterHost, ClusterVm, ClusterVmCreated, DrainState, DrainStatus, DrainVmState, VmInfo,
};
use godwit_tests::{kvm_available, Agent, EchoClient, Orchestrator};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(180);

fn create(orch: &Orchestrator, body: Value) -> ClusterVm {
    let created: ClusterVmCreated = orch
        .send(Method::POST, "/v1/vms", &body)
        .unwrap_or_else(|e| panic!("create {body}: {e:#}"));
    created.vm
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn host(orch: &Orchestrator, name: &str) -> ClusterHost {
    orch.get(&format!("/v1/hosts/{name}")).unwrap()
}

#[test]
fn a_drained_host_is_left_by_every_vm_that_can_move() {
    if !kvm_available("a_drained_host_is_left_by_every_vm_that_can_move") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = "balancer = \"off\"\npoll_interval_ms = 500\nagent_timeout_ms = 5000\n";
    let mut orch = Orchestrator::start(&dir.path().join("orch"), config).unwrap();
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--orchestrator",
            orch.url.as_str(),
            "--dirty-probe-interval-s",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // host-1 alone has a `gpu`; every host has an entropy device.
    let a1 = common(&["--device", "entropy", "--device", "gpu"]);
    let a2 = common(&["--device", "entropy"]);
    let h1 = Agent::start_with("host-1", &args(&a1)).unwrap();
    let h2 = Agent::start_with("host-2", &args(&a2)).unwrap();
    let h3 = Agent::start_with("host-3", &args(&a2)).unwrap();
    drop((a1, a2));
    orch.wait::<Vec<ClusterHost>>("/v1/hosts", WAIT, "three hosts up", |h| {
        h.iter().filter(|h| h.up).count() == 3
    })
    .unwrap();

    let dirty = json!({"kind": "dirty", "working_set_mib": 8, "rate_mib_s": 4.0,
                       "disk_ops_s": 200});
    let vms = [
        json!({"name": "disk", "memory_mib": 64, "host": "host-1", "guest": dirty,
               "resources": [{"name": "root", "kind": "disk", "size_mib": 4,
                              "attachment": "unattached"}]}),
        json!({"name": "web", "memory_mib": 32, "host": "host-1", "guest": {"kind": "echo"},
               "resources": [{"name": "web", "kind": "endpoint"}]}),
        json!({"name": "cache", "memory_mib": 64, "host": "host-1", "guest": dirty,
               "resources": [{"name": "cache", "kind": "scratch", "size_mib": 2}]}),
        json!({"name": "rng", "memory_mib": 64, "host": "host-1", "guest": dirty,
               "resources": [{"name": "rng", "kind": "device", "class": "entropy"}]}),
        json!({"name": "gpu", "memory_mib": 32, "host": "host-1", "guest": {"kind": "idle"},
               "resources": [{"name": "gpu", "kind": "device", "class": "gpu",
                              "allow_global_ref": false}]}),
    ];
    for body in vms {
        let vm = create(&orch, body);
        assert_eq!(vm.host, "host-1", "{vm:?}");
    }
    orch.wait::<Vec<ClusterVm>>("/v1/vms", WAIT, "five VMs reported", |v| {
        v.iter().filter(|v| v.reported).count() == 5
    })
    .unwrap();
    let web: VmInfo = h1.vm("web").unwrap();
    let address = web
        .resources
        .iter()
        .find_map(|r| r.address.clone())
        .unwrap()
        .replace("0.0.0.0", "127.0.0.1");
    let client = EchoClient::start(&address);
    let before: Vec<VmInfo> = h1.get("/v1/vms").unwrap();

    // Cordoned: no new VM is placed there, no migration goes there, and it stays cordoned
    // across an orchestrator restart.
    let (status, body) = orch
        .request(Method::POST, "/v1/hosts/host-2/cordon", None)
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(host(&orch, "host-2").cordoned);
    let (status, body) = orch
        .request(
            Method::POST,
            "/v1/vms",
            Some(&json!({"name": "x", "memory_mib": 32, "host": "host-2",
                         "guest": {"kind": "idle"}})),
        )
        .unwrap();
    assert!(status == 409 || status == 507, "{status} {body}");
    let (status, body) = orch
        .request(
            Method::POST,
            "/v1/vms/disk/migrate",
            Some(&json!({"to": "host-2"})),
        )
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("cordoned"),
        "{body}"
    );
    let listen = godwit_tests::host_port(&orch.url).to_owned();
    orch.terminate().unwrap();
    orch = Orchestrator::start_at(&dir.path().join("orch"), config, &listen).unwrap();
    orch.wait::<Vec<ClusterHost>>("/v1/hosts", WAIT, "three hosts up again", |h| {
        h.iter().filter(|h| h.up).count() == 3
    })
    .unwrap();
    assert!(
        host(&orch, "host-2").cordoned,
        "the cordon did not survive a restart"
    );
    let (status, _) = orch
        .request(Method::POST, "/v1/hosts/host-2/uncordon", None)
        .unwrap();
    assert_eq!(status, 200);
    assert!(!host(&orch, "host-2").cordoned);

    // A host that runs VMs cannot be forgotten.
    let (status, body) = orch
        .request(Method::DELETE, "/v1/hosts/host-1", None)
        .unwrap();
    assert_eq!(status, 409, "{body}");

    // Drain host-1: every VM but the one bound to its gpu leaves, spread over the others.
    let (status, body) = orch
        .request(Method::POST, "/v1/hosts/host-1/drain", None)
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let drained = orch
        .wait::<DrainStatus>("/v1/hosts/host-1/drain", WAIT, "the drain to end", |d| {
            d.state != DrainState::Running
        })
        .unwrap();
    assert_eq!(drained.state, DrainState::Stuck, "{drained:?}");
    assert!(host(&orch, "host-1").cordoned);
    for v in &drained.vms {
        if v.vm == "gpu" {
            assert_eq!(v.state, DrainVmState::Stuck, "{v:?}");
            assert!(v.reason.contains("gpu"), "{v:?}");
        } else {
            assert_eq!(v.state, DrainVmState::Moved, "{v:?}");
        }
    }
    assert_eq!(drained.vms.len(), 5, "{drained:?}");
    let on_1: Vec<VmInfo> = h1.get("/v1/vms").unwrap();
    assert_eq!(
        on_1.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["gpu"]
    );
    let (on_2, on_3): (Vec<VmInfo>, Vec<VmInfo>) =
        (h2.get("/v1/vms").unwrap(), h3.get("/v1/vms").unwrap());
    assert_eq!(on_2.len() + on_3.len(), 4, "{on_2:?} {on_3:?}");
    for was in before.iter().filter(|v| v.name != "gpu") {
        let agent = if on_2.iter().any(|v| v.name == was.name) {
            &h2
        } else {
            &h3
        };
        let now = agent
            .wait_vm(&was.name, WAIT, "its guest going on", |vm| {
                vm.guest.progress > was.guest.progress + 200
            })
            .unwrap();
        assert_eq!(now.guest.verify_errors, 0, "{now:?}");
        if let Some(d) = &now.guest.devices {
            assert_eq!(d.disk_errors, 0, "{now:?}");
        }
    }
    assert!(client.finish() > 0);
}
