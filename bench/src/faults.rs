//! `godwit-bench faults`: the fault matrix. Each case breaks one migration between two local
//! agents (mutual TLS, real KVM guests) and reports where the VM ended up: a fault injected
//! into one migration channel through the agents' test hook (`--test-migration-fault`, see
//! docs/migration.md), or a process killed with SIGKILL while the migration moves memory. The
//! invariants, checked for every case and mode:
//!
//! - at most one host runs the VM, and one does unless the process that held its only running
//!   copy was killed (a source VMM before the target started the VM or during post-copy, a
//!   target VMM after it started it);
//! - the copy that runs goes on, and its guest's own verifier reports 0 errors;
//! - both agents answer, and both records end with a reason.
//!
//! A row that breaks one says `VIOLATION` and the command exits 1.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use godwit_api::{CreateVm, MigrationInfo, MigrationPhase, MigrationStatus, VmInfo, VmState};
use orchestrator::agent_client::AgentClient;
use orchestrator::local::{LocalAgent, LocalCa};
use serde_json::json;

const MODES: [&str; 4] = ["stop-and-copy", "precopy", "postcopy", "auto"];
/// `--migration-peer-timeout-s` of both agents: a stalled link is noticed within this.
const PEER_TIMEOUT_S: &str = "3";
/// A case whose migration has not ended by then is reported as such.
const CASE_TIMEOUT: Duration = Duration::from_secs(180);
const VM: &str = "f";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    SourceVmm,
    TargetVmm,
    SourceAgent,
    TargetAgent,
}

impl Who {
    fn label(self) -> &'static str {
        match self {
            Who::SourceVmm => "kill -9 source VMM",
            Who::TargetVmm => "kill -9 target VMM",
            Who::SourceAgent => "kill -9 source agent",
            Who::TargetAgent => "kill -9 target agent",
        }
    }
}

#[derive(Debug, Clone)]
enum Fault {
    /// A `--test-migration-fault` spec for the source agent.
    Channel(String),
    /// Kill this process once the migration moves memory (the mode's transfer phase).
    Kill(Who),
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    fault: Fault,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    // Channel 0 after the setup (4 KiB in: keepalives, the state, the switchover), channel 1
    // (fault answers, post-copy only) 64 KiB in, the first bulk channel 1 MiB in.
    for kind in ["reset", "blackhole", "corrupt"] {
        for (channel, offset, where_) in [
            (0, 4096, "control"),
            (1, 65536, "urgent"),
            (2, 1 << 20, "bulk"),
        ] {
            out.push(Case {
                name: format!("{kind} {where_}"),
                fault: Fault::Channel(format!("{kind}@{channel}:{offset}")),
            });
        }
    }
    for who in [
        Who::SourceVmm,
        Who::TargetVmm,
        Who::SourceAgent,
        Who::TargetAgent,
    ] {
        out.push(Case {
            name: who.label().to_owned(),
            fault: Fault::Kill(who),
        });
    }
    out
}

/// One agent of a case, restartable at its address.
struct Host {
    name: String,
    dir: PathBuf,
    listen: String,
    args: Vec<String>,
    agent: Option<LocalAgent>,
    client: AgentClient,
    restarts: u32,
}

impl Host {
    fn start(
        name: &str,
        root: &Path,
        ca: &LocalCa,
        auth: &godwit_daemon::client::ClientAuth,
        extra: &[String],
    ) -> Result<Host> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = ca.host_args(name)?;
        args.extend(["--migration-peer-timeout-s".into(), PEER_TIMEOUT_S.into()]);
        args.extend(extra.iter().cloned());
        let dir = root.join(name);
        let agent = LocalAgent::start_at(
            name,
            &dir,
            &root.join(format!("{name}.log")),
            &listen,
            &strs(&args),
        )?;
        let client = AgentClient::new(&agent.url, auth)?;
        Ok(Host {
            name: name.to_owned(),
            dir,
            listen,
            args,
            agent: Some(agent),
            client,
            restarts: 0,
        })
    }

    /// SIGKILL to the agent alone; its VMMs run on.
    fn kill_agent(&mut self) {
        if let Some(a) = self.agent.as_mut() {
            a.kill();
        }
    }

    /// Starts the agent again on its data directory and address (it adopts its VMMs).
    fn restart(&mut self) -> Result<()> {
        self.restarts += 1;
        let log = self
            .dir
            .with_file_name(format!("{}.{}.log", self.name, self.restarts));
        self.agent = Some(LocalAgent::start_at(
            &self.name,
            &self.dir,
            &log,
            &self.listen,
            &strs(&self.args),
        )?);
        Ok(())
    }

    fn kill_vmm(&self) -> Result<()> {
        let pid_file = self
            .dir
            .join("vms")
            .join(VM)
            .join(godwit_daemon::run_dir::PID_FILE);
        let pid = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("no VMM pid in {}", pid_file.display()))?;
        std::process::Command::new("kill")
            .args(["-9", pid.trim()])
            .status()?;
        Ok(())
    }

    /// The VM as this agent sees it: `Ok(None)` when it holds none.
    fn vm(&self) -> Result<Option<VmInfo>> {
        Ok(self.client.vms()?.into_iter().find(|v| v.name == VM))
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// What a case came to.
struct Row {
    case: String,
    mode: &'static str,
    source: String,
    target: String,
    vm: String,
    verify_errors: u64,
    secs: f64,
    verdict: Result<(), String>,
}

fn record_text(info: &Option<MigrationInfo>) -> String {
    match info {
        None => "-".into(),
        Some(i) => format!(
            "{}/{}{}",
            api_name(json!(i.status)),
            api_name(json!(i.phase)),
            if i.postcopy_pauses > 0 {
                format!(" {}p", i.postcopy_pauses)
            } else {
                String::new()
            }
        ),
    }
}

/// An enum's API spelling (`json!` of it is a string).
fn api_name(v: serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// The phase in which `mode` moves most of the memory.
fn transfer_phase(mode: &str) -> MigrationPhase {
    match mode {
        "stop-and-copy" => MigrationPhase::StopAndCopy,
        "postcopy" => MigrationPhase::Postcopy,
        _ => MigrationPhase::Precopy,
    }
}

fn run_case(case: &Case, mode: &'static str, memory_mib: u64) -> Result<Row> {
    let tmp = tempfile::Builder::new()
        .prefix("godwit-bench-faults-")
        .tempdir()?;
    // GODWIT_BENCH_KEEP=1 keeps each case's directory (agent and VMM logs) for a post-mortem.
    let (_cleanup, root) = if std::env::var_os("GODWIT_BENCH_KEEP").is_some() {
        let kept = tmp.keep();
        eprintln!("{} {mode}: {}", case.name, kept.display());
        (None, kept)
    } else {
        let path = tmp.path().to_owned();
        (Some(tmp), path)
    };
    let ca = LocalCa::open(&root)?;
    let auth = ca.admin()?;
    let src_extra = match &case.fault {
        Fault::Channel(spec) => vec!["--test-migration-fault".to_owned(), spec.clone()],
        Fault::Kill(_) => vec![],
    };
    let mut src = Host::start("fault-a", &root, &ca, &auth, &src_extra)?;
    let mut dst = Host::start("fault-b", &root, &ca, &auth, &[])?;
    src.client.create_vm(&CreateVm {
        name: VM.into(),
        vcpus: 1,
        memory_mib,
        guest: serde_json::from_value(json!({
            "kind": "dirty", "working_set_mib": (memory_mib / 4).max(8), "rate_mib_s": 5.0,
            "pattern": "uniform"}))?,
        paused: false,
        resources: vec![],
    })?;
    wait_progress(&src.client, 500)?;
    let t = Instant::now();
    let id = src.client.migrate(
        VM,
        &json!({
            "target": dst.listen, "mode": mode, "channels": 2, "compress": "none",
            "bandwidth_mib_s": 64.0, "postcopy_recovery_s": 30,
        }),
    )?;
    let mut killed = None;
    if let Fault::Kill(who) = &case.fault {
        // Once the memory moves (or the migration ended first: then it kills afterwards).
        let phase = transfer_phase(mode);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match src.client.migration(&id) {
                Ok(i) if i.phase == phase || i.status != MigrationStatus::Running => break,
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let at = src.client.migration(&id).ok();
        match who {
            Who::SourceVmm => src.kill_vmm()?,
            Who::TargetVmm => dst.kill_vmm()?,
            Who::SourceAgent => src.kill_agent(),
            Who::TargetAgent => dst.kill_agent(),
        }
        killed = Some((*who, at.map(|i| i.phase)));
        if matches!(who, Who::SourceAgent | Who::TargetAgent) {
            std::thread::sleep(Duration::from_secs(2));
            match who {
                Who::SourceAgent => src.restart()?,
                _ => dst.restart()?,
            }
        }
    }
    // Until both records end (each agent must answer), at most CASE_TIMEOUT.
    let deadline = Instant::now() + CASE_TIMEOUT;
    let mut records = (None, None);
    while Instant::now() < deadline {
        records = (
            src.client.migration(&id).ok(),
            dst.client.migration(&id).ok(),
        );
        let ended = |r: &Option<MigrationInfo>| {
            r.as_ref()
                .is_some_and(|i| i.status != MigrationStatus::Running)
        };
        // A target that never heard of it (refused, or killed before it recorded it) counts
        // as ended once the source's record has.
        if ended(&records.0) && (ended(&records.1) || records.1.is_none()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = t.elapsed().as_secs_f64();
    // Where it runs, once the dust settles.
    std::thread::sleep(Duration::from_secs(1));
    let on_src = src.vm().context("the source agent does not answer")?;
    let on_dst = dst.vm().context("the target agent does not answer")?;
    let running: Vec<(&str, &Host, &VmInfo)> = [("a", &src, &on_src), ("b", &dst, &on_dst)]
        .into_iter()
        .filter_map(|(n, h, v)| {
            v.as_ref()
                .filter(|v| v.state == VmState::Running)
                .map(|v| (n, h, v))
        })
        .collect();
    let mut verify_errors = 0;
    let mut verdict = Ok(());
    for (name, host, vm) in &running {
        match goes_on(&host.client, vm) {
            Ok(v) => verify_errors += v.guest.verify_errors,
            Err(e) => verdict = Err(format!("the VM on {name} does not go on: {e:#}")),
        }
    }
    let state = |v: &Option<VmInfo>| {
        v.as_ref()
            .map_or("-".to_owned(), |v| api_name(json!(v.state)))
    };
    let vm = match running.as_slice() {
        [(n, _, _)] => format!("runs on {n}"),
        [] => format!("lost (a: {}, b: {})", state(&on_src), state(&on_dst)),
        _ => "runs on BOTH".to_owned(),
    };
    let lost_allowed = match killed {
        // The only running copy died with its VMM.
        Some((Who::SourceVmm, _)) => true,
        Some((Who::TargetVmm, phase)) => {
            mode == "postcopy"
                || phase.is_some_and(|p| {
                    matches!(
                        p,
                        MigrationPhase::Postcopy
                            | MigrationPhase::PostcopyPaused
                            | MigrationPhase::Completing
                            | MigrationPhase::Done
                    )
                })
        }
        _ => false,
    };
    if verdict.is_ok() {
        verdict = if running.len() > 1 {
            Err("two running copies".into())
        } else if running.is_empty() && !lost_allowed {
            Err("no running copy, and no process holding one was killed".into())
        } else if verify_errors > 0 {
            Err(format!("{verify_errors} verify errors"))
        } else if records
            .0
            .as_ref()
            .is_none_or(|i| i.status == MigrationStatus::Running)
        {
            Err(format!("still running after {} s", CASE_TIMEOUT.as_secs()))
        } else if records.0.as_ref().is_some_and(|i| {
            i.status != MigrationStatus::Completed && i.error.as_deref().is_none_or(str::is_empty)
        }) {
            Err("the source's record ended without a reason".into())
        } else {
            Ok(())
        };
    }
    Ok(Row {
        case: case.name.clone(),
        mode,
        source: record_text(&records.0),
        target: record_text(&records.1),
        vm,
        verify_errors,
        secs,
        verdict,
    })
}

fn wait_progress(client: &AgentClient, by: u64) -> Result<VmInfo> {
    let start = client.vm(VM)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let vm = client.vm(VM)?;
        if vm.guest.progress >= start.guest.progress + by {
            return Ok(vm);
        }
        anyhow::ensure!(Instant::now() < deadline, "no guest progress: {vm:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The running VM makes progress and its verifier checks more pages.
fn goes_on(client: &AgentClient, since: &VmInfo) -> Result<VmInfo> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let vm = client.vm(VM)?;
        if vm.guest.progress > since.guest.progress + 200
            && vm.guest.verified_pages > since.guest.verified_pages
        {
            return Ok(vm);
        }
        anyhow::ensure!(vm.state == VmState::Running, "it stopped: {vm:?}");
        anyhow::ensure!(Instant::now() < deadline, "no progress: {vm:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(memory_mib: u64, only: &[String], modes: &[String]) -> Result<()> {
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| only.is_empty() || only.iter().any(|o| c.name.contains(o.as_str())))
        .collect();
    let modes: Vec<&'static str> = MODES
        .into_iter()
        .filter(|m| modes.is_empty() || modes.iter().any(|x| x == m))
        .collect();
    println!(
        "fault matrix: {} cases x {} modes, {memory_mib} MiB dirtying guests, 64 MiB/s cap, \
         peer timeout {PEER_TIMEOUT_S} s, mutual TLS",
        cases.len(),
        modes.len()
    );
    println!(
        "{:<24} {:<14} {:<26} {:<26} {:<34} {:>6} {:>7}  VERDICT",
        "CASE", "MODE", "SOURCE RECORD", "TARGET RECORD", "VM", "VERIFY", "SECS"
    );
    let mut violations = 0;
    for case in &cases {
        for &mode in &modes {
            let row = match run_case(case, mode, memory_mib) {
                Ok(r) => r,
                Err(e) => Row {
                    case: case.name.clone(),
                    mode,
                    source: "?".into(),
                    target: "?".into(),
                    vm: "?".into(),
                    verify_errors: 0,
                    secs: 0.0,
                    verdict: Err(format!("the case could not run: {e:#}")),
                },
            };
            if row.verdict.is_err() {
                violations += 1;
            }
            println!(
                "{:<24} {:<14} {:<26} {:<26} {:<34} {:>6} {:>7.1}  {}",
                row.case,
                row.mode,
                row.source,
                row.target,
                row.vm,
                row.verify_errors,
                row.secs,
                match &row.verdict {
                    Ok(()) => "ok".to_owned(),
                    Err(why) => format!("VIOLATION: {why}"),
                }
            );
        }
    }
    println!(
        "{} cases, {violations} violations",
        cases.len() * modes.len()
    );
    anyhow::ensure!(violations == 0, "{violations} cases broke an invariant");
    Ok(())
}
