//! Placement on scripted clusters: the hard rules, the score, and the explanations.

use super::*;
use crate::model::Vm;

const GIB: u64 = 1 << 30;

fn host(name: &str) -> Host {
    Host::new(name, 8.0, 32 * GIB)
}

fn req(name: &str) -> VmRequest {
    VmRequest {
        expected_cpu_cores: Some(1.0),
        ..VmRequest::new(name, 2, 2 * GIB)
    }
}

/// The view after adding `vm` where it was placed (as the orchestrator would).
fn with_vm(view: &ClusterView, vm: Vm) -> ClusterView {
    let mut hosts = view.hosts().to_vec();
    let h = hosts.iter_mut().find(|h| h.name == vm.host).unwrap();
    h.memory_free_bytes -= vm.memory_bytes;
    let mut vms = view.vms().to_vec();
    vms.push(vm);
    ClusterView::new(hosts, vms, 0).unwrap()
}

fn place_all(mut view: ClusterView, reqs: &[VmRequest]) -> (ClusterView, Vec<String>) {
    let params = Params::default();
    let mut chosen = Vec::new();
    for r in reqs {
        let p = place(&view, r, &params).unwrap();
        let mut vm = Vm::new(&r.name, &p.host, r.vcpus, r.memory_bytes);
        vm.cpu_usage_cores = r.cpu_cores();
        vm.affinity_group = r.affinity_group.clone();
        vm.anti_affinity_group = r.anti_affinity_group.clone();
        view = with_vm(&view, vm);
        chosen.push(p.host);
    }
    (view, chosen)
}

#[test]
fn identical_vms_spread_evenly() {
    let view =
        ClusterView::new((1..=4).map(|i| host(&format!("h{i}"))).collect(), vec![], 0).unwrap();
    let reqs: Vec<_> = (0..12).map(|i| req(&format!("vm{i}"))).collect();
    let (view, chosen) = place_all(view, &reqs);
    // Ties break by name, so the first four go h1..h4 in order.
    assert_eq!(chosen[..4], ["h1", "h2", "h3", "h4"]);
    for h in ["h1", "h2", "h3", "h4"] {
        assert_eq!(view.vms_on(h).count(), 3, "{h}");
    }
}

#[test]
fn prefers_the_cooler_host_and_explains_the_runner_up() {
    let mut vm = Vm::new("busy", "h1", 4, GIB);
    vm.cpu_usage_cores = 4.0;
    let view = ClusterView::new(vec![host("h1"), host("h2")], vec![vm], 0).unwrap();
    let p = place(&view, &req("new"), &Params::default()).unwrap();
    assert_eq!(p.host, "h2");
    assert_eq!(p.ranked.len(), 2);
    assert!((p.projected_load - 0.125).abs() < 1e-12);
    assert!(
        p.reason.starts_with("new -> h2: h2 scores 0.") && p.reason.contains("next best h1"),
        "{}",
        p.reason
    );
}

#[test]
fn respects_labels_memory_cores_down_and_ceiling_and_explains() {
    let mut down = host("a-down");
    down.up = false;
    let mut other_zone = host("b-zone");
    other_zone.labels.insert("zone".into(), "west".into());
    let mut no_label = host("c-nolabel");
    no_label.labels.clear();
    let mut full = host("d-full");
    full.labels.insert("zone".into(), "east".into());
    full.memory_free_bytes = GIB;
    let mut small = Host::new("e-small", 1.0, 32 * GIB);
    small.labels.insert("zone".into(), "east".into());
    let mut loaded = host("f-loaded");
    loaded.labels.insert("zone".into(), "east".into());
    loaded.own_load = Some(0.875);
    let mut good = host("g-good");
    good.labels.insert("zone".into(), "east".into());
    let view = ClusterView::new(
        vec![down, other_zone, no_label, full, small, loaded, good],
        vec![],
        0,
    )
    .unwrap();
    let mut r = req("db");
    r.required_labels.insert("zone".into(), "east".into());
    let p = place(&view, &r, &Params::default()).unwrap();
    assert_eq!(p.host, "g-good");
    let why: Vec<String> = p.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(
        why,
        [
            "a-down is down",
            "b-zone has label zone=west, not zone=east",
            "c-nolabel lacks label zone=east",
            "d-full has 768 MiB free beyond its reserve, the VM needs 2 GiB",
            "e-small has 1 cores, fewer than the VM's 2 vCPUs",
            "f-loaded would reach load 1.00, over the ceiling 0.90",
        ]
    );
    assert!(p.reason.contains("6 hosts rejected ("), "{}", p.reason);
    assert!(p.explain().contains("rejected: a-down is down"));
}

#[test]
fn anti_affinity_is_a_hard_rule() {
    let view = ClusterView::new(vec![host("h1"), host("h2"), host("h3")], vec![], 0).unwrap();
    let reqs: Vec<_> = (0..3)
        .map(|i| VmRequest {
            anti_affinity_group: Some("etcd".into()),
            ..req(&format!("etcd{i}"))
        })
        .collect();
    let (view, chosen) = place_all(view, &reqs);
    assert_eq!(chosen, ["h1", "h2", "h3"]);
    // A fourth member has nowhere to go, even though every host has room.
    let fourth = VmRequest {
        anti_affinity_group: Some("etcd".into()),
        ..req("etcd3")
    };
    let err = place(&view, &fourth, &Params::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "No host can run VM \"etcd3\": 3 hosts rejected (3 anti-affinity): h1 already runs \
         1 member(s) of anti-affinity group etcd; h2 already runs 1 member(s) of \
         anti-affinity group etcd; h3 already runs 1 member(s) of anti-affinity group etcd"
    );
}

#[test]
fn affinity_prefers_hosts_running_the_group() {
    let mut web = Vm::new("web0", "h2", 2, GIB);
    web.cpu_usage_cores = 2.0;
    web.affinity_group = Some("web".into());
    let view = ClusterView::new(vec![host("h1"), host("h2"), host("h3")], vec![web], 0).unwrap();
    let r = VmRequest {
        affinity_group: Some("web".into()),
        ..req("web1")
    };
    let p = place(&view, &r, &Params::default()).unwrap();
    // h2 is busier, but runs the group.
    assert_eq!(p.host, "h2");
    assert!(p.ranked[0].runs_affinity_group);
    assert!(p.reason.contains("runs the affinity group"));
    // Soft: when h2 cannot take it, another host still can.
    let mut hosts = view.hosts().to_vec();
    hosts[1].memory_free_bytes = 0;
    let view = ClusterView::new(hosts, view.vms().to_vec(), 0).unwrap();
    assert_eq!(place(&view, &r, &Params::default()).unwrap().host, "h1");
}

#[test]
fn no_hosts_and_invalid_requests_are_errors() {
    let view = ClusterView::new(vec![], vec![], 0).unwrap();
    let err = place(&view, &req("a"), &Params::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "No host can run VM \"a\": the cluster has no hosts"
    );
    let view = ClusterView::new(vec![host("h1")], vec![], 0).unwrap();
    let err = place(&view, &VmRequest::new("z", 0, GIB), &Params::default()).unwrap_err();
    assert!(matches!(err, PlacementError::InvalidRequest { .. }));
}

#[test]
fn unknown_cpu_use_counts_all_vcpus() {
    let view = ClusterView::new(vec![host("h1")], vec![], 0).unwrap();
    let p = place(&view, &VmRequest::new("a", 4, GIB), &Params::default()).unwrap();
    assert!((p.projected_load - 0.5).abs() < 1e-12);
    let err = place(&view, &VmRequest::new("b", 8, GIB), &Params::default()).unwrap_err();
    assert!(err.to_string().contains("over the ceiling"), "{err}");
}

fn with_devices(mut h: Host, disk_gib: u64, classes: &[&str]) -> Host {
    h.disk_free_bytes = disk_gib * GIB;
    h.device_classes = classes.iter().map(|c| c.to_string()).collect();
    h
}

#[test]
fn a_host_lacking_a_device_class_is_never_chosen() {
    // h1 is idle and would win on score; only h2 offers a gpu.
    let mut busy = Vm::new("busy", "h2", 4, GIB);
    busy.cpu_usage_cores = 4.0;
    let view = ClusterView::new(
        vec![
            with_devices(host("h1"), 64, &["entropy"]),
            with_devices(host("h2"), 64, &["entropy", "gpu"]),
        ],
        vec![busy],
        0,
    )
    .unwrap();
    let mut r = req("ml");
    r.resources = vec![Resource::device("accel", "gpu")];
    let p = place(&view, &r, &Params::default()).unwrap();
    assert_eq!(p.host, "h2");
    assert_eq!(
        p.rejected[0].to_string(),
        "h1 has no \"gpu\" device for the VM's device accel (by type, fixed), it offers \
         entropy"
    );
    // A global reference is no way out at creation (there is no source to refer to),
    // even though the device allows one.
    r.resources = vec![Resource::device("accel", "tpu")];
    assert!(r.resources[0].allow_global_ref);
    let err = place(&view, &r, &Params::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("2 hosts rejected (2 missing a device)"),
        "{err}"
    );
    r.resources = vec![Resource::new("accel", ResourceKind::Device)];
    let err = place(&view, &r, &Params::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Request for VM \"ml\" is invalid: one of its devices names no device class"
    );
}

#[test]
fn disk_and_scratch_data_must_fit_the_free_disk_together() {
    let view = ClusterView::new(
        vec![
            with_devices(host("h1"), 10, &[]),
            with_devices(host("h2"), 12, &[]),
        ],
        vec![],
        0,
    )
    .unwrap();
    let mut r = req("db");
    r.resources = vec![
        Resource {
            size_bytes: 8 * GIB,
            ..Resource::new("root", ResourceKind::Disk)
        },
        Resource {
            size_bytes: 4 * GIB,
            ..Resource::new("cache", ResourceKind::Scratch)
        },
        // Endpoints and devices take no disk.
        Resource::new("web", ResourceKind::Endpoint),
    ];
    let p = place(&view, &r, &Params::default()).unwrap();
    assert_eq!(p.host, "h2");
    assert_eq!(
        p.rejected[0].to_string(),
        "h1 has 10 GiB of disk free for resources, the VM's disk and scratch data need 12 GiB"
    );
    // Unlike a migration, a disk that allows GR still needs its space at creation.
    assert!(r.resources[0].allow_global_ref);
    r.resources[1].size_bytes = 5 * GIB;
    let err = place(&view, &r, &Params::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("2 hosts rejected (2 not enough disk)"),
        "{err}"
    );
}

#[test]
fn a_backend_that_binds_no_resources_takes_no_vm_with_resources() {
    // h1 would win on disk; its backend cannot bind resources.
    let mut plain = with_devices(host("h1"), 64, &["entropy"]);
    plain.binds_resources = false;
    let view = ClusterView::new(vec![plain, with_devices(host("h2"), 8, &[])], vec![], 0).unwrap();
    let mut r = req("web");
    r.resources = vec![Resource::new("ep", ResourceKind::Endpoint)];
    let p = place(&view, &r, &Params::default()).unwrap();
    assert_eq!(p.host, "h2");
    assert_eq!(
        p.rejected[0].to_string(),
        "h1 has a backend that cannot bind the VM's resources"
    );
    // Nor is it a migration target for such a VM; a VM without resources may go there.
    let caps = view.host("h1").unwrap().capabilities();
    let e = crate::rebinding::eligible(&r.resources, &caps).unwrap_err();
    assert!(
        e.reason
            .contains("the target's backend cannot bind VM resources"),
        "{}",
        e.reason
    );
    assert_eq!(
        place(&view, &req("plain"), &Params::default())
            .unwrap()
            .host,
        "h1"
    );
}

#[test]
fn many_rejections_are_summarised() {
    let mut hosts: Vec<_> = (0..20).map(|i| host(&format!("h{i:02}"))).collect();
    for h in &mut hosts {
        h.up = false;
    }
    let view = ClusterView::new(hosts, vec![], 0).unwrap();
    let err = place(&view, &req("a"), &Params::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("20 hosts rejected (20 down)"), "{text}");
    assert!(text.ends_with("h04 is down; and 15 more"), "{text}");
}
