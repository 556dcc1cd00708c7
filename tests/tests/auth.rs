//! Who may use the agent's and the orchestrator's APIs, tried on every endpoint of both with
//! real daemons: no client certificate, a certificate of another CA, an expired certificate,
//! an unknown token, a viewer (certificate or token) asking for a change, an admin sending a
//! heartbeat or announcing a migration, and a host certificate claiming another host's
//! heartbeat or announcing a migration from another host. Each is refused (401/403, or the
//! TLS handshake fails), nothing is created, the VM is not touched, and the daemon logs why
//! without the token. Admins and tokens of the config do get through.

use std::path::Path;
use std::time::Duration;

use godwit_api::{ClusterHost, ClusterVm, VmInfo, VmState};
use godwit_daemon::auth::token_hash;
use godwit_daemon::client::ClientAuth;
use godwit_tests::{kvm_available, Agent, Api, Orchestrator, TestCa};
use godwit_tls::ca::Validity;
use godwit_tls::{Credentials, Identity, Role};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const VIEWER_TOKEN: &str = "gdw_viewer-token-for-the-auth-test-0123456789";
const ADMIN_TOKEN: &str = "gdw_admin-token-for-the-auth-test-9876543210";

fn who(name: &str, role: Role) -> Identity {
    Identity {
        name: name.into(),
        role,
    }
}

/// Every endpoint of the agent's API, with a body where it takes one; `vm` exists there.
fn agent_endpoints(vm: &str) -> Vec<(Method, String, Option<Value>)> {
    let create = json!({"name": "intruder", "memory_mib": 64, "guest": {"kind": "idle"}});
    let incoming = json!({"id": "00112233445566778899aabbccddeeff", "vm": "intruder",
        "vcpus": 1, "memory_mib": 64, "mode": "precopy", "source": "auth-agent"});
    let id = "00112233445566778899aabbccddeeff";
    vec![
        (Method::GET, "/metrics".into(), None),
        (Method::GET, "/v1/host".into(), None),
        (Method::GET, "/v1/host/capabilities".into(), None),
        (Method::GET, "/v1/vms".into(), None),
        (Method::GET, format!("/v1/vms/{vm}"), None),
        (Method::GET, format!("/v1/vms/{vm}/console"), None),
        (Method::GET, format!("/v1/vms/{vm}/digest"), None),
        (Method::GET, "/v1/migrations".into(), None),
        (Method::GET, format!("/v1/migrations/{id}"), None),
        (Method::GET, "/v1/devices/entropy?bytes=16".into(), None),
        (Method::POST, "/v1/vms".into(), Some(create)),
        (
            Method::POST,
            "/v1/vms/restore".into(),
            Some(json!({"path": "x.snap", "name": "intruder"})),
        ),
        (Method::POST, format!("/v1/vms/{vm}/pause"), Some(json!({}))),
        (
            Method::POST,
            format!("/v1/vms/{vm}/resume"),
            Some(json!({})),
        ),
        (
            Method::POST,
            format!("/v1/vms/{vm}/snapshot"),
            Some(json!({"path": "stolen.snap"})),
        ),
        (
            Method::POST,
            format!("/v1/vms/{vm}/migrate"),
            Some(json!({"target": "127.0.0.1:1", "mode": "precopy"})),
        ),
        (
            Method::POST,
            "/v1/migrations/incoming".into(),
            Some(incoming),
        ),
        (
            Method::POST,
            format!("/v1/migrations/{id}/cancel"),
            Some(json!({})),
        ),
        (Method::DELETE, format!("/v1/vms/{vm}"), None),
        (Method::DELETE, format!("/v1/resources/{vm}"), None),
    ]
}

/// Every endpoint of the orchestrator's API; `host` (whose real `HostInfo` is `info`) and
/// `vm` exist there. The heartbeat claims the host with a lie about its memory and address.
fn orchestrator_endpoints(
    host: &str,
    info: &Value,
    vm: &str,
) -> Vec<(Method, String, Option<Value>)> {
    let mut lie = info.clone();
    lie["memory_total_mib"] = json!(1u64 << 30);
    let heartbeat = json!({"url": "https://127.0.0.1:1", "host": lie, "vms": []});
    let create = json!({"name": "intruder", "memory_mib": 64, "guest": {"kind": "idle"}});
    vec![
        (Method::GET, "/metrics".into(), None),
        (Method::GET, "/v1/hosts".into(), None),
        (Method::GET, format!("/v1/hosts/{host}"), None),
        (Method::GET, format!("/v1/hosts/{host}/drain"), None),
        (Method::GET, "/v1/vms".into(), None),
        (Method::GET, format!("/v1/vms/{vm}"), None),
        (Method::GET, "/v1/migrations".into(), None),
        (Method::GET, "/v1/migrations/nope".into(), None),
        (Method::GET, "/v1/plan".into(), None),
        (Method::GET, "/v1/decisions".into(), None),
        (Method::GET, "/v1/balancer".into(), None),
        (Method::POST, "/v1/agents/heartbeat".into(), Some(heartbeat)),
        (
            Method::POST,
            format!("/v1/hosts/{host}/cordon"),
            Some(json!({})),
        ),
        (
            Method::POST,
            format!("/v1/hosts/{host}/uncordon"),
            Some(json!({})),
        ),
        (
            Method::POST,
            format!("/v1/hosts/{host}/drain"),
            Some(json!({})),
        ),
        (Method::POST, "/v1/vms".into(), Some(create)),
        (
            Method::POST,
            format!("/v1/vms/{vm}/migrate"),
            Some(json!({"to": host})),
        ),
        (Method::DELETE, format!("/v1/hosts/{host}"), None),
        (Method::DELETE, format!("/v1/vms/{vm}"), None),
        (
            Method::PUT,
            "/v1/balancer".into(),
            Some(json!({"mode": "off"})),
        ),
    ]
}

fn is_read(method: &Method) -> bool {
    *method == Method::GET
}

/// What `api` answers to every endpoint: a status, or None when no HTTP answer came (the TLS
/// handshake failed).
fn answers(api: &Api, endpoints: &[(Method, String, Option<Value>)]) -> Vec<Option<u16>> {
    endpoints
        .iter()
        .map(|(method, path, body)| {
            api.request(method.clone(), path, body.as_ref())
                .ok()
                .map(|(status, _)| status)
        })
        .collect()
}

/// Asserts every endpoint answered as `expect` says, naming the ones that did not.
fn check(
    what: &str,
    endpoints: &[(Method, String, Option<Value>)],
    got: &[Option<u16>],
    expect: impl Fn(&Method, &str) -> Option<u16>,
) {
    let wrong: Vec<String> = endpoints
        .iter()
        .zip(got)
        .filter(|((m, p, _), g)| **g != expect(m, p))
        .map(|((m, p, _), g)| format!("{m} {p}: {g:?}, expected {:?}", expect(m, p)))
        .collect();
    assert!(wrong.is_empty(), "{what}:\n{}", wrong.join("\n"));
}

/// A client whose certificate is `files`' but which trusts the tests' CA (so the server's
/// side of the handshake is what decides).
fn client_with(ca: &TestCa, files: &godwit_tls::TlsFiles) -> ClientAuth {
    let creds = Credentials::load(&ca.ca_cert(), &files.cert, &files.key).unwrap();
    ClientAuth::certificate(&creds).unwrap()
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn every_endpoint_refuses_callers_without_the_right_identity() {
    if !kvm_available("every_endpoint_refuses_callers_without_the_right_identity") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::shared();
    let tokens = format!(
        "[[tokens]]\nname = \"ann\"\nrole = \"viewer\"\nsha256 = \"{}\"\n\n\
         [[tokens]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
        token_hash(VIEWER_TOKEN),
        token_hash(ADMIN_TOKEN)
    );
    let token_file = dir.path().join("tokens.toml");
    std::fs::write(&token_file, &tokens).unwrap();
    let orch_log = dir.path().join("orchestrator.log");
    let orch = Orchestrator::start_logged(
        &dir.path().join("orch"),
        &format!("balancer = \"off\"\n{tokens}"),
        "127.0.0.1:0",
        Some(&orch_log),
    )
    .unwrap();
    let agent_log = dir.path().join("agent.log");
    let agent = Agent::start_logged(
        "auth-agent",
        &[
            "--orchestrator",
            &orch.url,
            "--tokens",
            token_file.to_str().unwrap(),
            "--dirty-probe-interval-s",
            "0",
        ],
        Some(&agent_log),
    )
    .unwrap();
    orch.wait::<Vec<ClusterHost>>("/v1/hosts", WAIT, "the agent up", |h| {
        h.iter().any(|h| h.name == "auth-agent" && h.up)
    })
    .unwrap();
    let _: Value = orch
        .post(
            "/v1/vms",
            &json!({"name": "web", "memory_mib": 64, "host": "auth-agent",
                    "guest": {"kind": "dirty", "working_set_mib": 16, "rate_mib_s": 5.0}}),
        )
        .unwrap();
    let before = agent
        .wait_vm("web", WAIT, "progress", |v| v.guest.progress > 100)
        .unwrap();
    let agent_eps = agent_endpoints("web");
    let info: Value = agent.get("/v1/host").unwrap();
    let orch_eps = orchestrator_endpoints("auth-agent", &info, "web");

    // The identities tried.
    let other_ca = TestCa::new(&dir.path().join("other")).unwrap();
    let stranger = client_with(
        ca,
        &other_ca.files(&who("test-admin", Role::Admin)).unwrap(),
    );
    let expired_files = ca
        .files_valid(
            &who("old-admin", Role::Admin),
            Validity::expired(),
            "-expired",
        )
        .unwrap();
    let expired = client_with(ca, &expired_files);
    let certless = ClientAuth::ca_only(&ca.ca_cert()).unwrap();
    let viewer_cert = ca.client(&who("vic", Role::Viewer)).unwrap();
    let viewer_token = certless.clone().with_token(Some(VIEWER_TOKEN.into()));
    let bad_token = certless
        .clone()
        .with_token(Some("gdw_not-a-token-we-know".into()));
    let other_host = ca.client(&who("auth-other", Role::Host)).unwrap();
    let admin = ca.admin().unwrap();
    let admin_token = certless.clone().with_token(Some(ADMIN_TOKEN.into()));

    for (name, api, eps) in [
        ("agent", &*agent, &agent_eps),
        ("orchestrator", &*orch, &orch_eps),
    ] {
        // No identity at all: 401 everywhere, /healthz still answers.
        let got = answers(&api.with_auth(&certless).unwrap(), eps);
        check(&format!("{name}, no certificate"), eps, &got, |_, _| {
            Some(401)
        });
        let (status, _) = api
            .with_auth(&certless)
            .unwrap()
            .request(Method::GET, "/healthz", None)
            .unwrap();
        assert_eq!(status, 200);
        // A certificate of another CA, an expired one: no TLS connection at all.
        for (what, client) in [("another CA", &stranger), ("expired", &expired)] {
            let got = answers(&api.with_auth(client).unwrap(), eps);
            check(&format!("{name}, {what}"), eps, &got, |_, _| None);
        }
        // An unknown token: 401.
        let got = answers(&api.with_auth(&bad_token).unwrap(), eps);
        check(&format!("{name}, unknown token"), eps, &got, |_, _| {
            Some(401)
        });
        // Viewers (certificate or token) read, and may change nothing (403).
        for (what, client) in [
            ("viewer certificate", &viewer_cert),
            ("viewer token", &viewer_token),
        ] {
            let writes: Vec<_> = eps
                .iter()
                .filter(|(m, _, _)| !is_read(m))
                .cloned()
                .collect();
            let got = answers(&api.with_auth(client).unwrap(), &writes);
            check(&format!("{name}, {what} writing"), &writes, &got, |_, _| {
                Some(403)
            });
            let (status, _) = api
                .with_auth(client)
                .unwrap()
                .request(Method::GET, "/v1/vms", None)
                .unwrap();
            assert_eq!(status, 200, "{name}, {what} reading");
        }
    }
    // An admin may not pose as a host: no heartbeats, no announced migrations.
    let heartbeat = &orch_eps
        .iter()
        .find(|e| e.1 == "/v1/agents/heartbeat")
        .unwrap();
    let incoming = &agent_eps
        .iter()
        .find(|e| e.1 == "/v1/migrations/incoming")
        .unwrap();
    for (api, (m, p, body)) in [(&*orch, heartbeat), (&*agent, incoming)] {
        let (status, answer) = api.request(m.clone(), p, body.as_ref()).unwrap();
        assert_eq!(status, 403, "admin {m} {p}: {answer}");
    }
    // Another host of the cluster claims auth-agent's heartbeat, or announces a migration
    // from auth-agent: 403.
    for (api, (m, p, body)) in [(&*orch, heartbeat), (&*agent, incoming)] {
        let (status, answer) = api
            .with_auth(&other_host)
            .unwrap()
            .request(m.clone(), p, body.as_ref())
            .unwrap();
        assert_eq!(status, 403, "host auth-other {m} {p}: {answer}");
        assert!(answer.to_string().contains("auth-agent"), "{answer}");
    }
    // Nor may it report under its own name with another host's agent as its URL.
    let mut own = info.clone();
    own["name"] = json!("auth-other");
    let (status, answer) = orch
        .with_auth(&other_host)
        .unwrap()
        .request(
            Method::POST,
            "/v1/agents/heartbeat",
            Some(&json!({"url": agent.url, "host": own, "vms": []})),
        )
        .unwrap();
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer.to_string().contains("not of host auth-other"),
        "{answer}"
    );
    // And a host may not drive the orchestrator.
    let (status, _) = orch
        .with_auth(&other_host)
        .unwrap()
        .request(
            Method::PUT,
            "/v1/balancer",
            Some(&json!({"mode": "automatic"})),
        )
        .unwrap();
    assert_eq!(status, 403);

    // Nothing was created or touched.
    let vms: Vec<VmInfo> = agent.get("/v1/vms").unwrap();
    assert_eq!(vms.len(), 1, "{vms:?}");
    let after = agent.goes_on(&before, 200, WAIT);
    assert_eq!(after.state, VmState::Running);
    let migrations: Vec<Value> = agent.get("/v1/migrations").unwrap();
    assert!(migrations.is_empty(), "{migrations:?}");
    let hosts: Vec<ClusterHost> = orch.get("/v1/hosts").unwrap();
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert!(!hosts[0].cordoned && hosts[0].up, "{hosts:?}");
    assert_eq!(hosts[0].url, agent.url, "a fake heartbeat took: {hosts:?}");
    assert_eq!(
        hosts[0].memory_total_mib,
        info["memory_total_mib"].as_u64().unwrap(),
        "a fake heartbeat took"
    );
    let cluster_vms: Vec<ClusterVm> = orch.get("/v1/vms").unwrap();
    assert_eq!(cluster_vms.len(), 1);
    let balancer: Value = orch.get("/v1/balancer").unwrap();
    assert_eq!(balancer["mode"], "off", "{balancer}");
    assert!(!agent.data_dir.path().join("stolen.snap").exists());

    // The right identities get through: an admin token pauses and resumes the VM; a viewer
    // token reads the orchestrator.
    let ops = agent.with_auth(&admin_token).unwrap();
    let paused: VmInfo = ops.post("/v1/vms/web/pause", &json!({})).unwrap();
    assert_eq!(paused.state, VmState::Paused);
    let _: VmInfo = ops.post("/v1/vms/web/resume", &json!({})).unwrap();
    let _: Vec<ClusterHost> = orch
        .with_auth(&viewer_token)
        .unwrap()
        .get("/v1/hosts")
        .unwrap();
    let _: Vec<ClusterHost> = orch.with_auth(&admin).unwrap().get("/v1/hosts").unwrap();

    // Each refusal was logged with its reason; no token appears in a log.
    for (name, log) in [
        ("agent", log_of(&agent_log)),
        ("orchestrator", log_of(&orch_log)),
    ] {
        assert!(log.contains("API request refused"), "{name} log:\n{log}");
        assert!(
            log.contains("needs a client certificate"),
            "{name} log:\n{log}"
        );
        assert!(log.contains("may only read"), "{name} log:\n{log}");
        assert!(log.contains("TLS handshake failed"), "{name} log:\n{log}");
        for token in [VIEWER_TOKEN, ADMIN_TOKEN, "gdw_not-a-token-we-know"] {
            assert!(!log.contains(token), "{name} logged a token");
        }
    }
    let orch_text = log_of(&orch_log);
    assert!(orch_text.contains("heartbeat refused"), "{orch_text}");
    let agent_text = log_of(&agent_log);
    assert!(
        agent_text.contains("incoming migration refused"),
        "{agent_text}"
    );
}

/// The daemons refuse to start without a certificate unless `--insecure`, and refuse
/// `--insecure` off loopback.
#[test]
fn plaintext_needs_insecure_and_loopback() {
    let bin = godwit_tests::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let run = |binary: &str, args: &[&str]| {
        let out = std::process::Command::new(bin.join(binary))
            .args(args)
            .arg("--data-dir")
            .arg(dir.path().join(binary))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{binary} {args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for binary in ["hypervisor-agent", "orchestrator"] {
        let e = run(binary, &["--listen", "127.0.0.1:0"]);
        assert!(e.contains("--ca, --cert and --key"), "{binary}: {e}");
        let e = run(binary, &["--listen", "0.0.0.0:0", "--insecure"]);
        assert!(e.contains("only a loopback address"), "{binary}: {e}");
    }
}
