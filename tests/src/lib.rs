//! Helpers for Godwit's end-to-end tests: build and start the real binaries on free ports,
//! talk to them over HTTPS, stop them with SIGTERM, and decide whether KVM tests run.
//!
//! As in production, every daemon runs with a certificate of a cluster CA: each test process
//! has one ([`TestCa::shared`]) that issues a host certificate per agent name, one for the
//! orchestrator, and the admin certificate the tests' clients hold. An agent started with
//! its own `--ca` or with `--insecure` is left as it is asked.
//!
//! The tests in `tests/tests/` are thin `#[test]` wrappers over these helpers.

#![forbid(unsafe_code)]

pub mod soak;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use godwit_daemon::client::ClientAuth;
use godwit_tls::ca::{self, Validity};
use godwit_tls::{Identity, Role, TlsFiles};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Whether tests that need KVM should run. Without `/dev/kvm` they are skipped with a printed
/// reason, unless `GODWIT_REQUIRE_KVM=1` (as in CI), where a missing KVM is a failure.
pub fn kvm_available(test: &str) -> bool {
    let present = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if present {
        return true;
    }
    if std::env::var("GODWIT_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: /dev/kvm cannot be opened and GODWIT_REQUIRE_KVM=1");
    }
    eprintln!(
        "SKIPPED {test}: /dev/kvm cannot be opened (set GODWIT_REQUIRE_KVM=1 to fail instead)"
    );
    false
}

/// The directory holding this build's binaries (`target/<profile>`), with the workspace's
/// binaries built once per test process so a test never runs a stale agent.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/<test binary>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .to_owned();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "--bins",
            "-p",
            "hypervisor-agent",
            "-p",
            "godwit-vmm",
            "-p",
            "orchestrator",
        ]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
        dir
    })
}

/// A cluster CA for tests, in a directory of its own, issuing each certificate once.
#[derive(Debug)]
pub struct TestCa {
    dir: PathBuf,
    issued: std::sync::Mutex<()>,
}

impl TestCa {
    /// A new CA in `dir`.
    pub fn new(dir: &Path) -> Result<TestCa> {
        ca::init(&dir.join("ca"), "test").map_err(|e| anyhow!(godwit_daemon::chain(&e)))?;
        Ok(TestCa {
            dir: dir.to_owned(),
            issued: std::sync::Mutex::new(()),
        })
    }

    /// The test process's CA (in a temporary directory kept until the process ends).
    pub fn shared() -> &'static TestCa {
        static CA: OnceLock<(tempfile::TempDir, TestCa)> = OnceLock::new();
        let (_, ca) = CA.get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("godwit-test-ca-")
                .tempdir()
                .expect("temporary directory");
            let ca = TestCa::new(dir.path()).expect("test CA");
            (dir, ca)
        });
        ca
    }

    /// The CA's certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca").join(ca::CA_CERT)
    }

    /// `who`'s certificate (issued on first use, valid for a day).
    pub fn files(&self, who: &Identity) -> Result<TlsFiles> {
        self.files_valid(who, Validity::days(1), "")
    }

    /// `who`'s certificate with the given validity, kept apart by `tag`.
    pub fn files_valid(&self, who: &Identity, validity: Validity, tag: &str) -> Result<TlsFiles> {
        let _one_at_a_time = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        let out = self
            .dir
            .join("issued")
            .join(format!("{}-{}{tag}", who.role, who.name));
        let files = TlsFiles {
            ca: out.join(ca::CA_CERT),
            cert: out.join(format!("{}.crt", who.name)),
            key: out.join(format!("{}.key", who.name)),
        };
        if !files.cert.exists() {
            ca::issue(&self.dir.join("ca"), who, &[], validity, &out)
                .map_err(|e| anyhow!(godwit_daemon::chain(&e)))?;
        }
        Ok(files)
    }

    /// `--ca`, `--cert`, `--key` for host `name`.
    pub fn host_args(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .files(&Identity {
                name: name.to_owned(),
                role: Role::Host,
            })?
            .flags())
    }

    /// A client holding `who`'s certificate.
    pub fn client(&self, who: &Identity) -> Result<ClientAuth> {
        let creds = self
            .files(who)?
            .load()
            .map_err(|e| anyhow!(godwit_daemon::chain(&e)))?;
        ClientAuth::certificate(&creds).map_err(|e| anyhow!(godwit_daemon::chain(&e)))
    }

    /// The `godwit` CLI's `--ca`, `--cert`, `--key` for the tests' admin.
    pub fn admin_args(&self) -> Result<Vec<String>> {
        Ok(self
            .files(&Identity {
                name: "test-admin".into(),
                role: Role::Admin,
            })?
            .flags())
    }

    /// A client holding the tests' admin certificate.
    pub fn admin(&self) -> Result<ClientAuth> {
        self.client(&Identity {
            name: "test-admin".into(),
            role: Role::Admin,
        })
    }
}

/// What the agent `extra` arguments start: the shared CA's host certificate and an admin
/// client, unless they bring their own `--ca` or say `--insecure` (then no TLS from here;
/// a test that brings its own CA talks to that agent with [`Api::with_auth`]).
fn security(name: &str, extra: &[&str]) -> Result<(Vec<String>, ClientAuth)> {
    if extra.contains(&"--insecure") {
        return Ok((Vec::new(), ClientAuth::insecure()));
    }
    if extra.contains(&"--ca") {
        let i = extra.iter().position(|a| *a == "--ca").expect("present");
        let (cert, key) = (flag_value(extra, "--cert"), flag_value(extra, "--key"));
        let creds = godwit_tls::Credentials::load(
            Path::new(extra.get(i + 1).copied().unwrap_or_default()),
            Path::new(cert.unwrap_or_default()),
            Path::new(key.unwrap_or_default()),
        )
        .map_err(|e| anyhow!(godwit_daemon::chain(&e)))?;
        // The agent's own certificate: a host may read and drive an agent.
        let auth =
            ClientAuth::certificate(&creds).map_err(|e| anyhow!(godwit_daemon::chain(&e)))?;
        return Ok((Vec::new(), auth));
    }
    let ca = TestCa::shared();
    Ok((ca.host_args(name)?, ca.admin()?))
}

fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| *a == flag)?;
    args.get(i + 1).copied()
}

/// `HOST:PORT` of an API URL.
pub fn host_port(url: &str) -> &str {
    url.trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
}

/// Starts a Godwit daemon (stderr inherited, or appended to `log`; RUST_LOG defaulting to
/// `warn`) and reads the address it prints as its first line on stdout.
fn spawn_daemon(cmd: &mut Command, what: &str, log: Option<&Path>) -> Result<(Child, String)> {
    let stderr = match log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("Cannot open {}", path.display()))?,
        ),
        None => Stdio::piped(),
    };
    let mut child = cmd
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        // A daemon's error says why in a line or two; a backtrace of main would bury it.
        .env(
            "RUST_LIB_BACKTRACE",
            std::env::var("RUST_LIB_BACKTRACE").unwrap_or_else(|_| "0".into()),
        )
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("Cannot start {what}"))?;
    // The daemon's log goes to the test's output (shown when the test fails), and its last
    // lines are kept to say why a daemon that did not start gave up.
    let tail = Arc::new(Mutex::new(VecDeque::<String>::new()));
    let forwarder = child.stderr.take().map(|stderr| {
        let tail = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                let mut tail = tail.lock().unwrap();
                if tail.len() == 20 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        })
    });
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://") || w.starts_with("https://"));
    let Some(url) = url else {
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            match child.try_wait()? {
                Some(status) => break status.to_string(),
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break "killed (did not exit)".to_owned();
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        if let Some(forwarder) = forwarder {
            let _ = forwarder.join();
        }
        let tail = Vec::from(tail.lock().unwrap().clone()).join("\n");
        let log = match log {
            Some(path) => format!("its log is {}", path.display()),
            None => format!("its log ends:\n{tail}"),
        };
        bail!("{what} did not print its address, said {line:?}, {status}; {log}");
    };
    Ok((child, url.to_owned()))
}

/// A loopback address for a daemon that a test may restart on the same address: a port below
/// the kernel's ephemeral range, so no connection or `:0` listener in the meantime can take it
/// (with port 0 one did, once in CI), and never one this process handed out before.
pub fn restartable_address() -> String {
    static NEXT: Mutex<u16> = Mutex::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(12000);
    let low = 10000u16;
    let span = ephemeral_low - low;
    let mut next = NEXT.lock().unwrap();
    if *next == 0 {
        // Test processes that run side by side start far apart.
        *next = low + (std::process::id() % u32::from(span / 100)) as u16 * 100;
    }
    for _ in 0..span {
        let port = *next;
        *next = if port + 1 >= ephemeral_low {
            low
        } else {
            port + 1
        };
        // A port someone holds (even in TIME_WAIT: no SO_REUSEADDR here) is passed over.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return format!("127.0.0.1:{port}");
        }
    }
    panic!("no free loopback port in {low}..{ephemeral_low}");
}

/// A Godwit HTTP/JSON API at `url` (an agent's or the orchestrator's).
#[derive(Debug)]
pub struct Api {
    pub url: String,
    http: reqwest::blocking::Client,
}

impl Api {
    /// A client of the API at `url` with `auth`'s identity.
    pub fn new(url: String, timeout: Duration, auth: &ClientAuth) -> Result<Api> {
        Ok(Api {
            url,
            http: auth.blocking_client(timeout)?,
        })
    }

    /// The same API as someone else (another certificate, a token, none).
    pub fn with_auth(&self, auth: &ClientAuth) -> Result<Api> {
        Api::new(self.url.clone(), Duration::from_secs(30), auth)
    }

    /// Sends a request; returns the status and the body parsed as JSON (Null when empty).
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send()?;
        let status = resp.status().as_u16();
        let text = resp.text()?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    /// Sends raw bytes as a JSON body (for malformed-input tests).
    pub fn post_raw(&self, path: &str, body: &'static [u8]) -> Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().unwrap_or(Value::Null)))
    }

    /// GET that must succeed, parsed into `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (status, value) = self.request(reqwest::Method::GET, path, None)?;
        if status != 200 {
            bail!("GET {path} answered {status}: {value}");
        }
        Ok(serde_json::from_value(value)?)
    }

    /// A request with a JSON body that must succeed (2xx), parsed into `T`.
    pub fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T> {
        let body = serde_json::to_value(body)?;
        let (status, value) = self.request(method.clone(), path, Some(&body))?;
        if !(200..300).contains(&status) {
            bail!("{method} {path} answered {status}: {value}");
        }
        Ok(serde_json::from_value(value)?)
    }

    /// POST that must succeed (2xx), parsed into `T`.
    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.send(reqwest::Method::POST, path, body)
    }

    pub fn text(&self, path: &str) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}{path}", self.url))
            .send()?
            .error_for_status()?
            .text()?)
    }
}

/// A real `orchestrator` process on a free loopback port.
#[derive(Debug)]
pub struct Orchestrator {
    child: Option<Child>,
    pub data_dir: PathBuf,
    api: Api,
}

impl std::ops::Deref for Orchestrator {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Orchestrator {
    /// Starts an orchestrator keeping its data in `data_dir` (reuse it to restart).
    pub fn start(data_dir: &Path, config_toml: &str) -> Result<Orchestrator> {
        Self::start_at(data_dir, config_toml, &restartable_address())
    }

    /// As `start`, on a given address (a restart keeps the address its agents report to).
    pub fn start_at(data_dir: &Path, config_toml: &str, listen: &str) -> Result<Orchestrator> {
        Self::start_logged(data_dir, config_toml, listen, None)
    }

    /// As `start_at`, its log (stderr) appended to `log`.
    pub fn start_logged(
        data_dir: &Path,
        config_toml: &str,
        listen: &str,
        log: Option<&Path>,
    ) -> Result<Orchestrator> {
        std::fs::create_dir_all(data_dir)?;
        let config = data_dir.join("config.toml");
        std::fs::write(&config, config_toml)?;
        let ca = TestCa::shared();
        let (child, url) = spawn_daemon(
            Command::new(bin_dir().join("orchestrator"))
                .args(["--listen", listen, "--data-dir"])
                .arg(data_dir)
                .arg("--config")
                .arg(&config)
                .args(ca.host_args("orchestrator")?),
            "orchestrator",
            log,
        )?;
        Ok(Orchestrator {
            child: Some(child),
            data_dir: data_dir.to_owned(),
            api: Api::new(url, Duration::from_secs(60), &ca.admin()?)?,
        })
    }

    /// Polls until `pred` holds on the value of GET `path`.
    pub fn wait<T: DeserializeOwned + std::fmt::Debug>(
        &self,
        path: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&T) -> bool,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let v: T = self.get(path)?;
            if pred(&v) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}; last: {v:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A real `hypervisor-agent` process on a free loopback port.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    pub name: String,
    pub data_dir: tempfile::TempDir,
    api: Api,
    /// Its arguments (with the certificate the harness gave it, if it did).
    extra: Vec<String>,
    /// Where its log goes (None: the test's stderr).
    log: Option<PathBuf>,
}

impl std::ops::Deref for Agent {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Agent {
    pub fn start(name: &str) -> Result<Agent> {
        Self::start_with(name, &[])
    }

    /// Starts an agent with extra command-line arguments.
    pub fn start_with(name: &str, extra: &[&str]) -> Result<Agent> {
        Self::start_logged(name, extra, None)
    }

    /// As `start_with`, its log (stderr) appended to `log`.
    pub fn start_logged(name: &str, extra: &[&str], log: Option<&Path>) -> Result<Agent> {
        let data_dir = tempfile::Builder::new()
            .prefix(&format!("godwit-{name}-"))
            .tempdir()?;
        let (tls, auth) = security(name, extra)?;
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(tls);
        let strs: Vec<&str> = args.iter().map(String::as_str).collect();
        let listen = restartable_address();
        let (child, url) = Self::spawn(name, data_dir.path(), &listen, &strs, log)?;
        let agent = Agent {
            child: Some(child),
            name: name.to_owned(),
            data_dir,
            api: Api::new(url, Duration::from_secs(120), &auth)?,
            extra: args,
            log: log.map(Path::to_owned),
        };
        agent.wait_healthy()?;
        Ok(agent)
    }

    fn spawn(
        name: &str,
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Result<(Child, String)> {
        spawn_daemon(
            Command::new(bin_dir().join("hypervisor-agent"))
                .args(["--listen", listen, "--name", name, "--data-dir"])
                .arg(data_dir)
                .args(extra),
            "hypervisor-agent",
            log,
        )
    }

    /// Starts the agent again (after `kill` or `terminate`) on the same data directory and
    /// address, with the arguments it first had.
    pub fn restart(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "the agent still runs");
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let (child, url) = Self::spawn(
            &self.name,
            self.data_dir.path(),
            self.address(),
            &extra,
            self.log.as_deref(),
        )?;
        assert_eq!(url, self.url, "the agent came back on another address");
        self.child = Some(child);
        self.wait_healthy()
    }

    /// Starts the agent again on the same data directory but a new address (as an agent moved
    /// to another port would).
    pub fn restart_elsewhere(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "the agent still runs");
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let (child, url) = Self::spawn(
            &self.name,
            self.data_dir.path(),
            "127.0.0.1:0",
            &extra,
            self.log.as_deref(),
        )?;
        self.child = Some(child);
        self.api = Api {
            url,
            http: self.api.http.clone(),
        };
        self.wait_healthy()
    }

    /// `GET /v1/vmm` straight from VM `vm`'s VMM process, over its unix socket.
    pub fn vmm_status(&self, vm: &str) -> Result<godwit_api::VmmStatus> {
        use std::io::{Read, Write};
        let socket = self
            .data_dir
            .path()
            .join("vms")
            .join(vm)
            .join(godwit_daemon::run_dir::SOCKET);
        let mut s = std::os::unix::net::UnixStream::connect(&socket)
            .with_context(|| format!("connect to {}", socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /v1/vmm HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .with_context(|| format!("no HTTP answer: {answer:?}"))?;
        ensure!(head.starts_with("HTTP/1.1 200"), "VMM answered {head:?}");
        Ok(serde_json::from_str(body)?)
    }

    /// The pids of the VMM processes running this agent's VMs, by VM name.
    pub fn vmm_pids(&self) -> std::collections::BTreeMap<String, u32> {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(dirs) = std::fs::read_dir(self.data_dir.path().join("vms")) {
            for d in dirs.flatten() {
                let run_dir = d.path();
                let pid = std::fs::read_to_string(run_dir.join(godwit_daemon::run_dir::PID_FILE))
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                if let Some(pid) = pid.filter(|&p| godwit_daemon::run_dir::vmm_alive(p, &run_dir)) {
                    out.insert(d.file_name().to_string_lossy().into_owned(), pid);
                }
            }
        }
        out
    }

    /// A whole host fails: the agent and every VMM process of it are killed.
    pub fn crash_host(&mut self) {
        self.kill();
        godwit_daemon::run_dir::kill_vmms(self.data_dir.path());
    }

    fn wait_healthy(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.url)).send() {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("agent {} did not become healthy", self.name)
    }

    /// `HOST:PORT` of this agent's API, as a migration `target`.
    pub fn address(&self) -> &str {
        host_port(&self.url)
    }

    /// Starts migrating `vm` to `dst` with the `MigrateRequest` fields in `body`; returns the
    /// migration id.
    pub fn migrate(&self, dst: &Agent, vm: &str, mut body: Value) -> Result<String> {
        body["target"] = Value::String(dst.address().to_owned());
        let started: godwit_api::MigrationStarted =
            self.post(&format!("/v1/vms/{vm}/migrate"), &body)?;
        Ok(started.id)
    }

    /// Polls this (source) agent until migration `id` ends.
    pub fn wait_migration(&self, id: &str, timeout: Duration) -> Result<godwit_api::MigrationInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let info: godwit_api::MigrationInfo = self.get(&format!("/v1/migrations/{id}"))?;
            if info.status != godwit_api::MigrationStatus::Running {
                return Ok(info);
            }
            if Instant::now() > deadline {
                bail!("migration {id} still running after {timeout:?}: {info:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn vm(&self, name: &str) -> Result<godwit_api::VmInfo> {
        self.get(&format!("/v1/vms/{name}"))
    }

    /// Polls a VM until `pred` holds, or fails after `timeout` with the last state seen.
    pub fn wait_vm(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&godwit_api::VmInfo) -> bool,
    ) -> Result<godwit_api::VmInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.vm(name)?;
            if pred(&info) {
                return Ok(info);
            }
            if Instant::now() > deadline {
                bail!(
                    "VM {name} on {}: timed out waiting for {what}; last: {info:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until VM `since.name`'s guest has made `by` more progress than in `since`, then
    /// checks it runs and verifies (panics otherwise, as a test assertion).
    pub fn goes_on(
        &self,
        since: &godwit_api::VmInfo,
        by: u64,
        timeout: Duration,
    ) -> godwit_api::VmInfo {
        let vm = self
            .wait_vm(&since.name, timeout, "guest progress", |vm| {
                vm.guest.progress >= since.guest.progress + by
            })
            .unwrap();
        assert_eq!(vm.state, godwit_api::VmState::Running, "{vm:?}");
        assert_eq!(vm.guest.verify_errors, 0, "{vm:?}");
        vm
    }

    /// Kills the agent process outright (its VMs run on in their VMM processes).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the process; returns its exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("agent {} ignored SIGTERM for {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Tests leave no VMM process behind.
        godwit_daemon::run_dir::kill_vmms(self.data_dir.path());
    }
}

/// A client that sends numbered lines to an endpoint and checks every echo, in order.
#[derive(Debug)]
pub struct EchoClient {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Result<u64, String>>,
}

impl EchoClient {
    pub fn start(address: &str) -> EchoClient {
        let stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
            let mut reader = BufReader::new(stream);
            let mut n = 0u64;
            while !s.load(std::sync::atomic::Ordering::Acquire) {
                // A few lines in flight at a time, to have bytes in every buffer at the pause.
                for k in 0..3 {
                    writeln!(writer, "line {} of the endpoint test", n + k)
                        .map_err(|e| format!("send after {n} lines: {e}"))?;
                }
                for k in 0..3 {
                    let mut line = String::new();
                    reader
                        .read_line(&mut line)
                        .map_err(|e| format!("no echo after {n} lines: {e}"))?;
                    let want = format!("line {} of the endpoint test\n", n + k);
                    if line != want {
                        return Err(format!("got {line:?}, expected {want:?}"));
                    }
                }
                n += 3;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(n)
        });
        EchoClient { stop, handle }
    }

    /// Stops sending; returns how many lines came back (panics on a lost or wrong one).
    pub fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.handle
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("endpoint client: {e}"))
    }
}
