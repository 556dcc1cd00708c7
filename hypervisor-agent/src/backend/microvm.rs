//! The microVM backend: one `godwit-vmm` process per VM (crate `godwit-vmm`), spawned in the
//! VM's run directory `DATA_DIR/vms/<vm>/` and driven over its unix socket.
//!
//! A VMM runs in its own process group with its log in `vmm.log`, so neither a signal to the
//! agent's group nor the agent's death reaches it. The agent reaps the VMMs it spawned (their
//! exit status is known); VMMs it adopted after a restart are watched through `/proc` (a
//! process that is not our child has no exit status for us: a crash then says so).

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use godwit_api::{
    CreateVm, DigestInfo, IncomingAccepted, IncomingMigration, MigrateRequest, MigrationInfo,
    MigrationMode, MigrationStarted, RestoreInfo, RestoreRequest, SnapshotInfo, SnapshotRequest,
    VmInfo, VmmStatus,
};
use hyper::Method;
use serde::Deserialize;

use super::{Adopted, Backend, Capabilities, Exit, VmHandle};
use crate::error::Error;
use crate::vmm_client::{VmmClient, DEFAULT_TIMEOUT};

use godwit_daemon::run_dir::{
    read_tail, vmm_alive, CONSOLE_FILE, EXIT_FILE, LOG_FILE, PID_FILE, SOCKET,
};
/// The agent's last view of the VM, for a VM found crashed after a restart.
pub const LAST_INFO_FILE: &str = "last-info.json";

/// How long a new VMM gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a VMM gets to exit after it was told to.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Writing a snapshot of a large guest takes a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// What every VMM of this agent is started with.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// The `godwit-vmm` executable.
    pub vmm_binary: PathBuf,
    pub data_dir: PathBuf,
    /// This host's name.
    pub host: String,
    pub kvm_device: PathBuf,
    pub huge_pages: bool,
    pub migration_ip: std::net::IpAddr,
    pub prefault: bool,
    pub dirty_probe_interval_s: u64,
    /// `--migration-peer-timeout-s`, passed to every VMM.
    pub migration_peer_timeout_s: u64,
    pub devices: Vec<String>,
    /// The host's certificate, passed to every VMM: migrations are mutual TLS.
    pub tls: Option<godwit_tls::TlsFiles>,
    /// Whether VMMs run under their seccomp filter (`--no-seccomp` turns it off, for
    /// debugging).
    pub seccomp: bool,
    /// Test hook: system calls taken out of every VMM's filter (`GODWIT_VMM_SECCOMP_DENY`), so
    /// a test can make a VMM break it.
    pub seccomp_deny: Vec<String>,
    /// Test hook: a fault injected into every migration the VMMs send
    /// (`GODWIT_TEST_MIGRATION_FAULT`, `KIND@CHANNEL:BYTES`).
    pub test_migration_fault: Option<String>,
}

#[derive(Debug)]
pub struct MicrovmBackend {
    cfg: MicrovmConfig,
    /// The agent's API URL as peers reach it, once it listens.
    agent_url: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MicrovmBackend {
    pub fn new(cfg: MicrovmConfig) -> Self {
        MicrovmBackend {
            cfg,
            agent_url: Mutex::new(None),
        }
    }

    pub fn set_agent_url(&self, url: String) {
        *lock(&self.agent_url) = Some(url);
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(name)
    }

    /// Starts a VMM process for VM `name` and waits until it answers.
    async fn spawn(&self, name: &str, disk_budget_bytes: u64) -> Result<Arc<VmmProcess>, Error> {
        let run_dir = self.run_dir(name);
        let internal = |what: &str, source: std::io::Error| Error::Spawn {
            vm: name.to_owned(),
            what: what.to_owned(),
            source,
        };
        std::fs::create_dir_all(&run_dir).map_err(|e| internal("run directory", e))?;
        for stale in [EXIT_FILE, PID_FILE, SOCKET, LAST_INFO_FILE] {
            let _ = std::fs::remove_file(run_dir.join(stale));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join(LOG_FILE))
            .map_err(|e| internal("log file", e))?;
        let mut cmd = Command::new(&self.cfg.vmm_binary);
        cmd.arg("--run-dir")
            .arg(&run_dir)
            .arg("--data-dir")
            .arg(&self.cfg.data_dir)
            .args(["--host", &self.cfg.host])
            .arg("--kvm-device")
            .arg(&self.cfg.kvm_device)
            .args(["--migration-ip", &self.cfg.migration_ip.to_string()])
            .args([
                "--dirty-probe-interval-s",
                &self.cfg.dirty_probe_interval_s.to_string(),
            ])
            .args([
                "--migration-peer-timeout-s",
                &self.cfg.migration_peer_timeout_s.to_string(),
            ])
            .args([
                "--resource-capacity-mib",
                &(disk_budget_bytes >> 20).to_string(),
            ]);
        if let Some(url) = lock(&self.agent_url).clone() {
            cmd.args(["--agent-url", &url]);
        }
        if !self.cfg.huge_pages {
            cmd.arg("--no-huge-pages");
        }
        if !self.cfg.prefault {
            cmd.arg("--no-prefault");
        }
        for d in &self.cfg.devices {
            cmd.args(["--device", d]);
        }
        if !self.cfg.seccomp {
            cmd.arg("--no-seccomp");
        }
        for call in &self.cfg.seccomp_deny {
            cmd.args(["--seccomp-deny", call]);
        }
        if let Some(fault) = &self.cfg.test_migration_fault {
            cmd.args(["--test-migration-fault", fault]);
        }
        if let Some(tls) = &self.cfg.tls {
            cmd.arg("--ca")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.cert)
                .arg("--key")
                .arg(&tls.key);
        }
        let stdout = log.try_clone().map_err(|e| internal("log file", e))?;
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            // Its own process group: a Ctrl-C or a signal to the agent's group is not its.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| internal(&format!("{}", self.cfg.vmm_binary.display()), e))?;
        let pid = child.id();
        let exit = Arc::new(Mutex::new(None::<ExitStatus>));
        let waiter_exit = exit.clone();
        std::thread::Builder::new()
            .name(format!("vmm-wait-{pid}"))
            .spawn(move || {
                if let Ok(status) = child.wait() {
                    *lock(&waiter_exit) = Some(status);
                }
            })
            .map_err(|e| internal("waiter thread", e))?;
        let process = Arc::new(VmmProcess {
            name: name.to_owned(),
            client: VmmClient::new(&run_dir.join(SOCKET)),
            run_dir,
            pid,
            child_exit: Some(exit),
        });
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(exit) = process.exited() {
                return Err(Error::NotStarted {
                    vm: name.to_owned(),
                    why: format!("it ended as it started: {}", exit_text(&exit)),
                });
            }
            if let Ok(status) = process.client.get::<VmmStatus>("/v1/vmm").await {
                if status.pid == pid {
                    tracing::info!(vm = %name, pid, "VMM started");
                    return Ok(process);
                }
            }
            if Instant::now() > deadline {
                process.kill();
                return Err(Error::NotStarted {
                    vm: name.to_owned(),
                    why: format!("pid {pid} did not answer within {START_TIMEOUT:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops a VMM that was started for a request that then failed.
    async fn discard(&self, process: &VmmProcess) {
        if let Err(e) = process.stop().await {
            tracing::warn!(vm = %process.name, error = %e, "cannot stop an unused VMM");
        }
    }
}

fn exit_text(exit: &Exit) -> &str {
    match exit {
        Exit::Done(s) | Exit::Crashed(s) => s,
    }
}

#[async_trait]
impl Backend for MicrovmBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            backend: "microvm".into(),
            modes: vec![
                MigrationMode::StopAndCopy,
                MigrationMode::Precopy,
                MigrationMode::Postcopy,
                MigrationMode::Auto,
            ],
            snapshot: true,
            resources: true,
            dirty_tracking: true,
            survives_agent_restart: true,
        }
    }

    fn validate(&self, req: &CreateVm) -> Result<(), Error> {
        Ok(godwit_vmm::validate_create(req).map(drop)?)
    }

    async fn create(
        &self,
        req: &CreateVm,
        disk_budget_bytes: u64,
    ) -> Result<(Arc<dyn VmHandle>, VmInfo), Error> {
        let process = self.spawn(&req.name, disk_budget_bytes).await?;
        match process
            .client
            .call::<VmInfo>(Method::POST, "/v1/vms", Some(req), DEFAULT_TIMEOUT)
            .await
        {
            Ok(info) => Ok((process, info)),
            Err(e) => {
                self.discard(&process).await;
                Err(e)
            }
        }
    }

    async fn restore(
        &self,
        req: &RestoreRequest,
    ) -> Result<(Arc<dyn VmHandle>, RestoreInfo), Error> {
        let process = self.spawn(&req.name, 0).await?;
        match process
            .client
            .call::<RestoreInfo>(Method::POST, "/v1/vms/restore", Some(req), SNAPSHOT_TIMEOUT)
            .await
        {
            Ok(info) => Ok((process, info)),
            Err(e) => {
                self.discard(&process).await;
                Err(e)
            }
        }
    }

    async fn incoming(
        &self,
        req: &IncomingMigration,
        existing: Option<Arc<dyn VmHandle>>,
        disk_budget_bytes: u64,
    ) -> Result<(Arc<dyn VmHandle>, IncomingAccepted), Error> {
        let (handle, fresh): (Arc<dyn VmHandle>, Option<Arc<VmmProcess>>) = match existing {
            Some(h) => (h, None),
            None => {
                let p = self.spawn(&req.vm, disk_budget_bytes).await?;
                (p.clone(), Some(p))
            }
        };
        let accepted = match &fresh {
            Some(p) => p.client.clone(),
            None => VmmClient::new(&self.run_dir(&req.vm).join(SOCKET)),
        }
        .call::<IncomingAccepted>(
            Method::POST,
            "/v1/migrations/incoming",
            Some(req),
            Duration::from_secs(60),
        )
        .await;
        match accepted {
            Ok(a) => Ok((handle, a)),
            Err(e) => {
                if let Some(p) = fresh {
                    self.discard(&p).await;
                }
                Err(e)
            }
        }
    }

    async fn adopt(&self) -> Vec<Adopted> {
        let mut found = Vec::new();
        let Ok(dirs) = std::fs::read_dir(self.cfg.data_dir.join("vms")) else {
            return found;
        };
        for dir in dirs.flatten() {
            let run_dir = dir.path();
            let Some(name) = run_dir
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned)
            else {
                continue;
            };
            let Some(pid) = std::fs::read_to_string(run_dir.join(PID_FILE))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let process = Arc::new(VmmProcess {
                name: name.clone(),
                client: VmmClient::new(&run_dir.join(SOCKET)),
                run_dir: run_dir.clone(),
                pid,
                child_exit: None,
            });
            let last_info = std::fs::read(run_dir.join(LAST_INFO_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<VmInfo>(&b).ok());
            match process.exited() {
                None => tracing::info!(vm = %name, pid, "adopted a running VMM"),
                Some(Exit::Done(why)) => {
                    tracing::info!(vm = %name, pid, %why, "a VMM ended while the agent was away");
                    let _ = std::fs::remove_file(run_dir.join(PID_FILE));
                    continue;
                }
                Some(Exit::Crashed(how)) => {
                    tracing::warn!(vm = %name, pid, %how, "found a crashed VMM");
                }
            }
            found.push(Adopted {
                name,
                handle: process,
                last_info,
            });
        }
        found
    }
}

/// One `godwit-vmm` process.
#[derive(Debug)]
pub struct VmmProcess {
    name: String,
    run_dir: PathBuf,
    pid: u32,
    client: VmmClient,
    /// Set by the waiter thread when the process is our child and has ended; None when
    /// the process was adopted.
    child_exit: Option<Arc<Mutex<Option<ExitStatus>>>>,
}

/// `exit.json`, as the VMM writes it.
#[derive(Debug, Deserialize)]
struct ExitRecord {
    pid: u32,
    reason: String,
}

impl VmmProcess {
    fn vm_path(&self, rest: &str) -> String {
        format!("/v1/vms/{}{rest}", self.name)
    }

    /// Whether the process still runs (not gone, not a zombie, still a VMM of this run dir).
    fn alive(&self) -> bool {
        vmm_alive(self.pid, &self.run_dir)
    }

    fn exit_record(&self) -> Option<ExitRecord> {
        let bytes = std::fs::read(self.run_dir.join(EXIT_FILE)).ok()?;
        serde_json::from_slice::<ExitRecord>(&bytes)
            .ok()
            .filter(|r| r.pid == self.pid)
    }

    fn log_tail(&self) -> String {
        let text = read_tail(&self.run_dir.join(LOG_FILE), 4096).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().rev().take(8).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn crashed(&self, how: String) -> Exit {
        let tail = self.log_tail();
        Exit::Crashed(if tail.is_empty() {
            how
        } else {
            format!("{how}; the end of its log ({}):\n{tail}", LOG_FILE)
        })
    }

    fn kill(&self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            if self.alive() {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }

    async fn vm_call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        rest: &str,
        body: Option<&(impl serde::Serialize + Sync)>,
        timeout: Duration,
    ) -> Result<T, Error> {
        self.client
            .call(method, &self.vm_path(rest), body, timeout)
            .await
    }
}

/// How a child's exit status reads.
fn describe(status: ExitStatus) -> String {
    if let Some(sig) = status.signal() {
        let name = match sig {
            6 => " (SIGABRT)",
            9 => " (SIGKILL)",
            11 => " (SIGSEGV)",
            15 => " (SIGTERM)",
            31 => " (SIGSYS)",
            _ => "",
        };
        // SIGSYS is the seccomp filter's: the VMM made a system call it does not allow.
        let why = if sig == 31 {
            ", a system call its seccomp filter does not allow"
        } else {
            ""
        };
        format!("the VMM process was killed by signal {sig}{name}{why}")
    } else {
        format!(
            "the VMM process exited with status {}",
            status.code().unwrap_or(-1)
        )
    }
}

#[async_trait]
impl VmHandle for VmmProcess {
    async fn status(&self) -> Result<VmmStatus, Error> {
        self.client.get("/v1/vmm").await
    }

    async fn info(&self) -> Result<VmInfo, Error> {
        self.client.get(&self.vm_path("")).await
    }

    async fn pause(&self) -> Result<VmInfo, Error> {
        self.vm_call(Method::POST, "/pause", None::<&()>, DEFAULT_TIMEOUT)
            .await
    }

    async fn resume(&self) -> Result<VmInfo, Error> {
        self.vm_call(Method::POST, "/resume", None::<&()>, DEFAULT_TIMEOUT)
            .await
    }

    async fn console(&self, max_bytes: u64) -> Result<Vec<u8>, Error> {
        let path = self.run_dir.join(CONSOLE_FILE);
        tokio::task::spawn_blocking(move || read_tail(&path, max_bytes))
            .await
            .map_err(Error::Worker)?
            .map_err(|e| Error::io("read the console log", e))
    }

    async fn digest(&self) -> Result<DigestInfo, Error> {
        self.vm_call(Method::GET, "/digest", None::<&()>, SNAPSHOT_TIMEOUT)
            .await
    }

    async fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotInfo, Error> {
        self.vm_call(Method::POST, "/snapshot", Some(req), SNAPSHOT_TIMEOUT)
            .await
    }

    async fn migrate(&self, req: &MigrateRequest) -> Result<MigrationStarted, Error> {
        // The VMM asks the target agent, which starts a VMM there: allow for both.
        self.vm_call(Method::POST, "/migrate", Some(req), Duration::from_secs(90))
            .await
    }

    async fn migrations(&self) -> Result<Vec<MigrationInfo>, Error> {
        self.client.get("/v1/migrations").await
    }

    async fn migration(&self, id: &str) -> Result<MigrationInfo, Error> {
        self.client.get(&format!("/v1/migrations/{id}")).await
    }

    async fn cancel(&self, id: &str) -> Result<MigrationInfo, Error> {
        self.client
            .call(
                Method::POST,
                &format!("/v1/migrations/{id}/cancel"),
                None::<&()>,
                DEFAULT_TIMEOUT,
            )
            .await
    }

    async fn resume_migration(&self, id: &str) -> Result<MigrationInfo, Error> {
        self.client
            .call(
                Method::POST,
                &format!("/v1/migrations/{id}/resume"),
                None::<&()>,
                DEFAULT_TIMEOUT,
            )
            .await
    }

    async fn delete(&self) -> Result<(), Error> {
        self.vm_call::<()>(Method::DELETE, "", None::<&()>, DEFAULT_TIMEOUT)
            .await?;
        // With its VM gone the VMM exits by itself; the run directory is free once it has.
        if !self.wait_exit(EXIT_TIMEOUT).await {
            tracing::warn!(vm = %self.name, pid = self.pid, "VMM did not exit after its VM was deleted; killing it");
            self.kill();
        }
        Ok(())
    }

    async fn release_moved(&self) -> Result<Vec<String>, Error> {
        #[derive(Deserialize)]
        struct Released {
            released: Vec<String>,
        }
        let r: Released = self
            .client
            .call(
                Method::DELETE,
                &format!("/v1/resources/{}", self.name),
                None::<&()>,
                DEFAULT_TIMEOUT,
            )
            .await?;
        if !self.wait_exit(EXIT_TIMEOUT).await {
            tracing::warn!(vm = %self.name, pid = self.pid, "VMM did not exit after its release; killing it");
            self.kill();
        }
        Ok(r.released)
    }

    async fn set_agent_url(&self, url: &str) -> Result<(), Error> {
        let body = godwit_api::VmmAgent {
            url: url.to_owned(),
        };
        self.client
            .call::<()>(Method::PUT, "/v1/vmm/agent", Some(&body), DEFAULT_TIMEOUT)
            .await
    }

    async fn stop(&self) -> Result<(), Error> {
        if self.exited().is_some() {
            return Ok(());
        }
        let asked = self
            .client
            .call::<()>(Method::POST, "/v1/vmm/stop", None::<&()>, DEFAULT_TIMEOUT)
            .await;
        if asked.is_err() || !self.wait_exit(EXIT_TIMEOUT).await {
            tracing::warn!(vm = %self.name, pid = self.pid, "VMM did not stop when asked; killing it");
            self.kill();
            self.wait_exit(Duration::from_secs(5)).await;
        }
        Ok(())
    }

    async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited().is_some() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn exited(&self) -> Option<Exit> {
        let status = match &self.child_exit {
            Some(exit) => Some((*lock(exit))?),
            None if self.alive() => return None,
            None => None,
        };
        if let Some(record) = self.exit_record() {
            return Some(Exit::Done(record.reason));
        }
        Some(match status {
            Some(status) => self.crashed(describe(status)),
            None => self.crashed(format!(
                "the VMM process (pid {}) is gone; it ended while this agent was not its \
                 parent, so its exit status is unknown",
                self.pid
            )),
        })
    }

    fn pid(&self) -> u32 {
        self.pid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_well() {
        assert!(describe(ExitStatus::from_raw(9)).contains("signal 9 (SIGKILL)"));
        assert!(describe(ExitStatus::from_raw(3 << 8)).contains("status 3"));
        assert!(describe(ExitStatus::from_raw(31)).contains("signal 31 (SIGSYS), a system call"));
    }
}
