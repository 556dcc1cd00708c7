//! Migration channels under mutual TLS between real agents and VMM processes: every
//! migration between hosts of one cluster CA is encrypted and completes; a host of another CA
//! and a plain-TCP peer are refused, and the VM runs on at its source.

use std::path::Path;
use std::time::Duration;

use godwit_api::{MigrationInfo, MigrationStatus, VmInfo, VmState};
use godwit_tests::{kvm_available, Agent};
use godwit_tls::ca::{self, Validity};
use godwit_tls::{Identity, Role};
use reqwest::Method;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

/// A CA in `dir/ca` and a host certificate for each of `names`; returns each host's agent
/// arguments (`--ca --cert --key`).
fn certificates(dir: &Path, names: &[&str]) -> Vec<Vec<String>> {
    ca::init(&dir.join("ca"), "test").unwrap();
    names
        .iter()
        .map(|n| {
            let who = Identity {
                name: (*n).into(),
                role: Role::Host,
            };
            let i = ca::issue(&dir.join("ca"), &who, &[], Validity::days(1), &dir.join(n)).unwrap();
            godwit_tls::TlsFiles {
                ca: i.ca,
                cert: i.cert,
                key: i.key,
            }
            .flags()
        })
        .collect()
}

fn start(name: &str, args: &[String]) -> Agent {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start_with(name, &args).unwrap()
}

fn create(agent: &Agent, name: &str) -> VmInfo {
    let vm: VmInfo = agent
        .post(
            "/v1/vms",
            &json!({"name": name, "vcpus": 2, "memory_mib": 128,
                    "guest": {"kind": "dirty", "working_set_mib": 32, "rate_mib_s": 10.0}}),
        )
        .unwrap();
    agent
        .wait_vm(name, WAIT, "progress", |vm| vm.guest.progress > 500)
        .unwrap();
    vm
}

fn migrate(src: &Agent, dst: &Agent, vm: &str, mode: &str) -> MigrationInfo {
    let id = src.migrate(dst, vm, json!({ "mode": mode })).unwrap();
    src.wait_migration(&id, WAIT).unwrap()
}

/// The VM still runs at `agent` and its guest goes on, unharmed.
fn runs_on(agent: &Agent, vm: &str) {
    let before = agent.vm(vm).unwrap();
    assert_eq!(before.state, VmState::Running, "{before:?}");
    agent.goes_on(&before, 201, WAIT);
}

#[test]
fn migrations_between_hosts_of_one_ca_are_mutual_tls_and_strangers_are_refused() {
    if !kvm_available("migrations_between_hosts_of_one_ca_are_mutual_tls_and_strangers_are_refused")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ours = certificates(&dir.path().join("ours"), &["tls-a", "tls-b"]);
    let theirs = certificates(&dir.path().join("theirs"), &["tls-x"]);
    let a = start("tls-a", &ours[0]);
    let b = start("tls-b", &ours[1]);
    create(&a, "web");

    // There and back in two modes, over TLS.
    for (src, dst, mode) in [(&a, &b, "precopy"), (&b, &a, "postcopy")] {
        let info = migrate(src, dst, "web", mode);
        assert_eq!(info.status, MigrationStatus::Completed, "{info:?}");
        assert_eq!(info.source_digest, info.target_digest);
        assert!(info.encrypted, "{info:?}");
        let theirs: MigrationInfo = dst.get(&format!("/v1/migrations/{}", info.id)).unwrap();
        assert!(theirs.encrypted, "the target's record: {theirs:?}");
        runs_on(dst, "web");
    }

    // A host of another CA as the target: the source VMM cannot even announce the migration
    // (the target's API certificate is not of its CA), the VM stays.
    let x = start("tls-x", &theirs[0]);
    let refused = |dst: &Agent, mode: &str| {
        let body = json!({ "target": dst.address(), "mode": mode });
        let (status, answer) = a
            .request(Method::POST, "/v1/vms/web/migrate", Some(&body))
            .unwrap();
        assert_eq!(status, 502, "{answer}");
        answer.to_string()
    };
    let error = refused(&x, "precopy");
    assert!(error.contains("certificate"), "{error}");
    runs_on(&a, "web");
    let (status, _) = x.request(Method::GET, "/v1/vms/web", None).unwrap();
    assert_eq!(status, 404, "a stranger got the VM");

    // A plain (--insecure) agent as the target: refused too.
    let plain = Agent::start_with("tls-plain", &["--insecure"]).unwrap();
    refused(&plain, "stop-and-copy");
    runs_on(&a, "web");
    let (status, _) = plain.request(Method::GET, "/v1/vms/web", None).unwrap();
    assert_eq!(status, 404);

    // An agent whose certificate names another host does not start, and says why.
    let out = std::process::Command::new(godwit_tests::bin_dir().join("hypervisor-agent"))
        .args(["--listen", "127.0.0.1:0", "--name", "tls-c", "--data-dir"])
        .arg(dir.path().join("c-data"))
        .args(&ours[1])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not of host tls-c"), "{stderr}");
}
