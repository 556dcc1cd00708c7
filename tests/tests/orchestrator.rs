//! The control plane end to end: a real orchestrator and three real agents running KVM
//! guests. Placement spreads VMs; a host loaded with spinning guests becomes hot and the
//! balancer migrates VMs away until the spread is under target; recommend mode moves nothing;
//! a killed agent is marked down and avoided; a restarted orchestrator keeps its records; bad
//! requests get clear errors.

use std::time::Duration;

use godwit_api::{
    BalancerState, ClusterHost, ClusterMigration, ClusterVm, Decision, MigrationStatus, PlanView,
};
use godwit_tests::{kvm_available, Agent, Orchestrator};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);

/// Fast loops for tests; anti-thrash long enough that no VM may move twice during a test.
/// Four guests spinning at 25% ask one core of host-1; with other tests' guests on the same
/// two physical cores they get less, so the hot threshold sits at 0.6, not 0.75.
fn config(balancer: &str) -> String {
    format!(
        r#"
balancer = "{balancer}"
poll_interval_ms = 500
agent_timeout_ms = 3000
balance_interval_ms = 1000
load_history = 8

[policy.hotspot]
threshold = 0.6

[policy.balance]
imbalance_target = 0.15

[policy.anti_thrash]
min_move_interval_ms = 600000
move_window_ms = 600000
max_moves_per_window = 1
"#
    )
}

struct Cluster {
    orch: Orchestrator,
    agents: Vec<Agent>,
    _dir: tempfile::TempDir,
}

fn cluster(balancer: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let orch = Orchestrator::start(&dir.path().join("orch"), &config(balancer)).unwrap();
    let agents: Vec<Agent> = (1..=3)
        .map(|i| {
            Agent::start_with(
                &format!("host-{i}"),
                &[
                    "--orchestrator",
                    &orch.url,
                    "--label",
                    "cpu_capacity=1",
                    "--dirty-probe-interval-s",
                    "0",
                ],
            )
            .unwrap()
        })
        .collect();
    orch.wait::<Vec<ClusterHost>>("/v1/hosts", WAIT, "three hosts up", |h| {
        h.iter().filter(|h| h.up).count() == 3
    })
    .unwrap();
    Cluster {
        orch,
        agents,
        _dir: dir,
    }
}

fn create(orch: &Orchestrator, body: Value) -> Value {
    orch.send(Method::POST, "/v1/vms", &body)
        .unwrap_or_else(|e| panic!("create {body}: {e:#}"))
}

fn spin(name: &str, host: Option<&str>, duty: u32) -> Value {
    let mut v =
        json!({"name": name, "memory_mib": 64, "guest": {"kind": "spin", "duty_percent": duty}});
    if let Some(h) = host {
        v["host"] = json!(h);
    }
    v
}

#[test]
fn placement_spreads_vms_and_bad_requests_are_clear() {
    if !kvm_available("placement_spreads_vms_and_bad_requests_are_clear") {
        return;
    }
    let c = cluster("off");
    for i in 0..6 {
        create(
            &c.orch,
            json!({"name": format!("vm{i}"), "memory_mib": 64, "guest": {"kind": "idle"}}),
        );
    }
    let vms: Vec<ClusterVm> = c.orch.get("/v1/vms").unwrap();
    for host in ["host-1", "host-2", "host-3"] {
        let n = vms.iter().filter(|v| v.host == host).count();
        assert_eq!(n, 2, "placement put {n} VMs on {host}: {vms:?}");
    }
    assert!(vms.iter().all(|v| !v.placement_reason.is_empty()));
    // Anti-affinity is a hard rule: a fourth member of a group cannot be placed on 3 hosts.
    for i in 0..3 {
        create(
            &c.orch,
            json!({"name": format!("aa{i}"), "memory_mib": 64,
            "guest": {"kind": "idle"}, "anti_affinity_group": "db"}),
        );
    }
    let vms: Vec<ClusterVm> = c.orch.get("/v1/vms").unwrap();
    let mut aa: Vec<&str> = vms
        .iter()
        .filter(|v| v.name.starts_with("aa"))
        .map(|v| v.host.as_str())
        .collect();
    aa.sort();
    assert_eq!(aa, ["host-1", "host-2", "host-3"]);
    let (status, body) = c
        .orch
        .request(
            Method::POST,
            "/v1/vms",
            Some(&json!({"name": "aa3",
        "memory_mib": 64, "guest": {"kind": "idle"}, "anti_affinity_group": "db"})),
        )
        .unwrap();
    assert_eq!(status, 507, "{body}");
    assert!(body["error"].as_str().unwrap().contains("aa3"), "{body}");

    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"name": "vm0", "guest": {"kind": "idle"}}),
            409,
            "already exists",
        ),
        (
            json!({"name": "x", "guest": {"kind": "nope"}}),
            400,
            "unknown variant",
        ),
        (
            json!({"name": "x", "guest": {"kind": "idle"}, "host": "nowhere"}),
            404,
            "nowhere",
        ),
        (json!({"guest": {"kind": "idle"}}), 400, "name"),
    ];
    for (body, want, needle) in cases {
        let (status, resp) = c
            .orch
            .request(Method::POST, "/v1/vms", Some(&body))
            .unwrap();
        assert_eq!(status, want, "{body} -> {resp}");
        assert!(
            resp["error"].as_str().unwrap_or("").contains(needle),
            "{body} -> {resp}"
        );
    }
    let (status, _) = c
        .orch
        .request(Method::GET, "/v1/vms/missing", None)
        .unwrap();
    assert_eq!(status, 404);
    let (status, resp) = c
        .orch
        .request(
            Method::POST,
            "/v1/vms/vm0/migrate",
            Some(&json!({"to": "nowhere"})),
        )
        .unwrap();
    assert_eq!(status, 404, "{resp}");
    let (status, resp) = c
        .orch
        .request(
            Method::PUT,
            "/v1/balancer",
            Some(&json!({"mode": "sometimes"})),
        )
        .unwrap();
    assert_eq!(status, 400, "{resp}");
    let (status, _) = c.orch.request(Method::DELETE, "/v1/vms/vm0", None).unwrap();
    assert_eq!(status, 204);
    let vms: Vec<ClusterVm> = c.orch.get("/v1/vms").unwrap();
    assert!(!vms.iter().any(|v| v.name == "vm0"));
}

/// Load host-1 with spinning guests: recommend mode plans moves off it but makes none; automatic
/// mode migrates VMs away until no host is hot and the spread is under target, moving no VM
/// twice. Then the orchestrator restarts and still has every record.
#[test]
fn balancer_resolves_a_hotspot_and_records_survive_a_restart() {
    if !kvm_available("balancer_resolves_a_hotspot_and_records_survive_a_restart") {
        return;
    }
    let mut c = cluster("recommend");
    for i in 0..4 {
        create(&c.orch, spin(&format!("s{i}"), Some("host-1"), 25));
    }
    // Moves off host-1 planned: host-1 is hot (four 25% guests on one core) or, when the
    // machine is busy with other tests and the guests get less CPU than they ask for (CI saw
    // host-1 at 0.51), at least the busiest host above the imbalance target.
    let plan: PlanView = c
        .orch
        .wait(
            "/v1/plan",
            WAIT,
            "moves off host-1 planned",
            |p: &PlanView| !p.moves.is_empty(),
        )
        .unwrap();
    assert!(plan
        .moves
        .iter()
        .all(|m| m.from.as_deref() == Some("host-1")));
    assert!(plan.moves.iter().all(|m| !m.reason.is_empty()));
    std::thread::sleep(Duration::from_secs(3));
    let migrations: Vec<ClusterMigration> = c.orch.get("/v1/migrations").unwrap();
    assert!(
        migrations.is_empty(),
        "recommend mode migrated: {migrations:?}"
    );
    let decisions: Vec<Decision> = c.orch.get("/v1/decisions?limit=500").unwrap();
    assert!(
        decisions
            .iter()
            .any(|d| d.action == "migrate" && !d.executed),
        "recommend mode recorded no recommendation: {decisions:?}"
    );

    let _: BalancerState = c
        .orch
        .send(Method::PUT, "/v1/balancer", &json!({"mode": "automatic"}))
        .unwrap();
    let hosts: Vec<ClusterHost> = c
        .orch
        .wait(
            "/v1/hosts",
            WAIT,
            "the hotspot resolved",
            |hosts: &Vec<ClusterHost>| {
                let b: BalancerState = c.orch.get("/v1/balancer").unwrap();
                let ms: Vec<ClusterMigration> = c.orch.get("/v1/migrations").unwrap();
                !ms.is_empty()
                    && ms.iter().all(|m| m.status != MigrationStatus::Running)
                    && b.hot_hosts.is_empty()
                    && hosts.iter().all(|h| h.load < 0.6)
            },
        )
        .unwrap();
    // Four 25% guests on three hosts of one core: 2/1/1 is the best split (spread 0.12),
    // under the configured target of 0.15.
    let b: BalancerState = c
        .orch
        .wait(
            "/v1/balancer",
            WAIT,
            "the spread under target",
            |b: &BalancerState| b.imbalance < 0.15,
        )
        .unwrap();
    assert!(b.hot_hosts.is_empty(), "{b:?}");
    // Stop balancing (the mode is remembered across the restart below) and let the last
    // migration finish, so the records are settled.
    let _: BalancerState = c
        .orch
        .send(Method::PUT, "/v1/balancer", &json!({"mode": "off"}))
        .unwrap();
    let migrations: Vec<ClusterMigration> = c
        .orch
        .wait(
            "/v1/migrations",
            WAIT,
            "migrations settled",
            |ms: &Vec<ClusterMigration>| ms.iter().all(|m| m.status != MigrationStatus::Running),
        )
        .unwrap();
    assert!(
        migrations
            .iter()
            .all(|m| m.status == MigrationStatus::Completed),
        "{migrations:?}"
    );
    let mut moved: Vec<&str> = migrations.iter().map(|m| m.vm.as_str()).collect();
    moved.sort();
    let n = moved.len();
    moved.dedup();
    assert_eq!(moved.len(), n, "a VM moved twice: {migrations:?}");
    let vms: Vec<ClusterVm> = c.orch.get("/v1/vms").unwrap();
    assert!(
        vms.iter().filter(|v| v.host != "host-1").count() >= 1,
        "{vms:?} {hosts:?}"
    );

    // Restart: every VM record, migration and decision is still there, and the mode too.
    let decisions_before: Vec<Decision> = c.orch.get("/v1/decisions?limit=20000").unwrap();
    let data = c.orch.data_dir.clone();
    c.orch.terminate().unwrap();
    let listen = godwit_tests::host_port(&c.orch.url).to_owned();
    c.orch = Orchestrator::start_at(&data, &config("automatic"), &listen).unwrap();
    let mode: BalancerState = c.orch.get("/v1/balancer").unwrap();
    assert_eq!(mode.mode, godwit_api::BalancerMode::Off);
    let vms_after: Vec<ClusterVm> = c.orch.get("/v1/vms").unwrap();
    let names = |v: &[ClusterVm]| {
        let mut n: Vec<(String, String)> =
            v.iter().map(|v| (v.name.clone(), v.host.clone())).collect();
        n.sort();
        n
    };
    assert_eq!(names(&vms_after), names(&vms));
    let migrations_after: Vec<ClusterMigration> = c.orch.get("/v1/migrations").unwrap();
    assert_eq!(migrations_after.len(), migrations.len());
    let decisions_after: Vec<Decision> = c.orch.get("/v1/decisions?limit=20000").unwrap();
    assert!(decisions_after.len() >= decisions_before.len());
    // And the agents find the restarted orchestrator again.
    c.orch
        .wait::<Vec<ClusterHost>>("/v1/hosts", WAIT, "hosts back", |h| {
            h.iter().filter(|h| h.up).count() == 3
        })
        .unwrap();
    drop(c.agents);
}

#[test]
fn a_killed_agent_is_marked_down_and_avoided() {
    if !kvm_available("a_killed_agent_is_marked_down_and_avoided") {
        return;
    }
    let mut c = cluster("automatic");
    c.agents[2].crash_host();
    c.orch
        .wait::<Vec<ClusterHost>>("/v1/hosts", WAIT, "host-3 down", |h| {
            h.iter().any(|h| h.name == "host-3" && !h.up)
        })
        .unwrap();
    for i in 0..4 {
        let created = create(
            &c.orch,
            json!({"name": format!("v{i}"), "memory_mib": 64, "guest": {"kind": "idle"}}),
        );
        assert_ne!(created["host"], "host-3", "{created}");
    }
    let (status, resp) = c
        .orch
        .request(
            Method::POST,
            "/v1/vms",
            Some(&spin("pinned", Some("host-3"), 10)),
        )
        .unwrap();
    assert_eq!(status, 503, "{resp}");
    assert!(resp["error"].as_str().unwrap().contains("down"), "{resp}");
    // A hot host does not shed load onto the dead one.
    for i in 0..4 {
        create(&c.orch, spin(&format!("s{i}"), Some("host-1"), 25));
    }
    std::thread::sleep(Duration::from_secs(12));
    let migrations: Vec<ClusterMigration> = c.orch.get("/v1/migrations").unwrap();
    assert!(
        migrations.iter().all(|m| m.to != "host-3"),
        "{migrations:?}"
    );
}
