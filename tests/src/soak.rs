//! Migrations checked one by one: self-verifying guests moved between real agents, each move
//! held to what every migration must leave behind. Shared by the CI tests
//! (`tests/tests/soak.rs`, `tests/tests/concurrency.rs`) and `godwit-bench soak`, which runs
//! the same loop a thousand times.
//!
//! After every migration:
//! - it completed, and the target's record of it too;
//! - the source's and the target's digests are present and equal;
//! - the VM runs on the target and the source answers 404 for it (one host, not two);
//! - the guest's own verifier reports 0 errors and the guest goes on writing and verifying.

use std::fmt;
use std::time::{Duration, Instant};

use godwit_api::{
    CompressMode, CreateVm, DirtyPattern, GuestSpec, MigrateRequest, MigrationInfo, MigrationMode,
    MigrationStarted, MigrationStatus, PageContent, VmInfo, VmState,
};
use reqwest::Method;
use serde::Serialize;

use crate::{host_port, Api};

/// The modes in the order the soak cycles through them.
pub const MODES: [MigrationMode; 4] = [
    MigrationMode::StopAndCopy,
    MigrationMode::Precopy,
    MigrationMode::Postcopy,
    MigrationMode::Auto,
];

/// Longest a migration may run before the soak calls it stuck.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest the target's record of a migration may read running after the source's ended.
const TARGET_RECORD_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest an arrived guest may take to show it goes on.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Pages an arrived guest must write (and at least as many verify) to count as going on.
const PROGRESS_PAGES: u64 = 500;

/// One agent as the soak sees it: its name (for the records) and its API.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    pub name: &'a str,
    pub api: &'a Api,
}

/// How one migration is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Step {
    pub mode: MigrationMode,
    pub compress: CompressMode,
    /// MiB/s; None: no cap.
    pub bandwidth_mib_s: Option<f64>,
}

impl Step {
    /// A VM's `n`th move (from 0): the modes in turn, compression on for four moves and off
    /// for the next four (so every mode runs with both), and every fifth capped at 100 MiB/s
    /// (5 is prime to 8, so the cap falls on every mode and both compressions in turn).
    pub fn nth(n: usize) -> Step {
        Step {
            mode: MODES[n % MODES.len()],
            compress: if (n / MODES.len()) % 2 == 0 {
                CompressMode::Auto
            } else {
                CompressMode::None
            },
            bandwidth_mib_s: (n % 5 == 4).then_some(100.0),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, compress {}",
            mode_name(self.mode),
            name(&self.compress)
        )?;
        if let Some(cap) = self.bandwidth_mib_s {
            write!(f, ", capped at {cap} MiB/s")?;
        }
        Ok(())
    }
}

/// A mode as the API spells it (`stop-and-copy`).
pub fn mode_name(mode: MigrationMode) -> String {
    name(&mode)
}

fn name(v: &impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

/// A self-verifying guest of `memory_mib` with 2 vCPUs: it writes half its memory at
/// `rate_mib_s`. `variant` picks what it writes: even, counter pages picked uniformly (they
/// compress); odd, random pages with a hot set (they do not), so a soak of two VMs moves both.
pub fn dirty_vm(name: &str, memory_mib: u64, rate_mib_s: f64, variant: usize) -> CreateVm {
    let working_set_mib = memory_mib / 2;
    let (pattern, hot_mib, content) = if variant % 2 == 0 {
        (DirtyPattern::Uniform, None, PageContent::Counter)
    } else {
        (
            DirtyPattern::Hotcold,
            Some((working_set_mib / 8).max(1)),
            PageContent::Random,
        )
    };
    CreateVm {
        name: name.to_owned(),
        vcpus: 2,
        memory_mib,
        guest: GuestSpec::Dirty {
            working_set_mib,
            rate_mib_s,
            pattern,
            hot_mib,
            hot_percent: hot_mib.map(|_| 90),
            content,
            disk_ops_s: None,
        },
        paused: false,
        resources: Vec::new(),
    }
}

/// Creates `vm` on `host` and waits until its guest has written and verified some pages.
pub fn create(host: Host<'_>, vm: &CreateVm) -> anyhow::Result<VmInfo> {
    let _: VmInfo = host.api.post("/v1/vms", vm)?;
    let started = Instant::now();
    loop {
        let info: VmInfo = host.api.get(&format!("/v1/vms/{}", vm.name))?;
        if info.guest.progress >= PROGRESS_PAGES && info.guest.verified_pages > 0 {
            return Ok(info);
        }
        if started.elapsed() > PROGRESS_TIMEOUT {
            anyhow::bail!("VM {} did not start writing pages: {info:?}", vm.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A migration that passed every check.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Its place in the run, from 0.
    pub n: usize,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub step: Step,
    /// The source's record.
    pub info: MigrationInfo,
    /// The guest on the target once it had gone on.
    pub progress: u64,
    pub verified_pages: u64,
    pub verify_errors: u64,
}

/// The first thing a migration got wrong, with everything known about it.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub n: usize,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub step: Step,
    /// What failed, in a sentence.
    pub what: String,
    /// The source's record of the migration, if it got that far.
    pub info: Option<MigrationInfo>,
    /// The VM as last seen, if it was.
    pub vm_info: Option<VmInfo>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "migration {} of {} from {} to {} ({}): {}",
            self.n, self.vm, self.from, self.to, self.step, self.what
        )?;
        if let Some(info) = &self.info {
            let json = serde_json::to_string_pretty(info).unwrap_or_default();
            write!(f, "\nthe source's record: {json}")?;
        }
        if let Some(vm) = &self.vm_info {
            let json = serde_json::to_string_pretty(vm).unwrap_or_default();
            write!(f, "\nthe VM: {json}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// One migration to make: which, what, from where to where, how.
#[derive(Debug, Clone)]
pub struct Move<'a> {
    /// Its place in the run, from 0.
    pub n: usize,
    pub vm: String,
    pub src: Host<'a>,
    pub dst: Host<'a>,
    pub step: Step,
}

impl<'a> Move<'a> {
    fn violation(
        &self,
        what: impl Into<String>,
        info: Option<&MigrationInfo>,
        vm_info: Option<&VmInfo>,
    ) -> Box<Violation> {
        Box::new(Violation {
            n: self.n,
            vm: self.vm.clone(),
            from: self.src.name.to_owned(),
            to: self.dst.name.to_owned(),
            step: self.step,
            what: what.into(),
            info: info.cloned(),
            vm_info: vm_info.cloned(),
        })
    }

    /// Asks the source to migrate the VM as the step says, digests on.
    pub fn start(self) -> Result<Started<'a>, Box<Violation>> {
        let request = MigrateRequest {
            target: host_port(&self.dst.api.url).to_owned(),
            mode: self.step.mode,
            downtime_ms: None,
            bandwidth_mib_s: self.step.bandwidth_mib_s,
            channels: None,
            compress: self.step.compress,
            max_rounds: None,
            precopy_timeout_s: None,
            verify: Some(true),
            postcopy_recovery_s: None,
        };
        let path = format!("/v1/vms/{}/migrate", self.vm);
        match self.src.api.post::<MigrationStarted>(&path, &request) {
            Ok(started) => Ok(Started {
                id: started.id,
                migration: self,
            }),
            Err(e) => {
                let vm = self.src.api.get(&format!("/v1/vms/{}", self.vm)).ok();
                Err(self.violation(format!("the source refused it: {e:#}"), None, vm.as_ref()))
            }
        }
    }
}

/// A migration asked for and not yet checked.
#[derive(Debug)]
pub struct Started<'a> {
    pub migration: Move<'a>,
    /// The migration's id on both agents.
    pub id: String,
}

impl Started<'_> {
    /// Waits for the migration to end, then checks everything it must leave behind.
    pub fn check(self) -> Result<Record, Box<Violation>> {
        let m = &self.migration;
        let (src, dst) = (m.src.api, m.dst.api);
        let path = format!("/v1/migrations/{}", self.id);
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        let info = loop {
            let info: MigrationInfo = src
                .get(&path)
                .map_err(|e| m.violation(format!("GET {path} on the source: {e:#}"), None, None))?;
            if info.status != MigrationStatus::Running {
                break info;
            }
            if Instant::now() > deadline {
                return Err(m.violation(
                    format!("still running after {MIGRATION_TIMEOUT:?}"),
                    Some(&info),
                    None,
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let fail = |what: String, vm: Option<&VmInfo>| Err(m.violation(what, Some(&info), vm));
        if info.status != MigrationStatus::Completed {
            return fail(format!("it ended {:?}", info.status), None);
        }
        match (&info.source_digest, &info.target_digest) {
            (Some(s), Some(t)) if s == t => {}
            (s, t) => return fail(format!("digests differ: source {s:?}, target {t:?}"), None),
        }
        // The target ends its record once its side has finished, a moment after the source.
        let deadline = Instant::now() + TARGET_RECORD_TIMEOUT;
        loop {
            match dst.get::<MigrationInfo>(&path) {
                Ok(theirs) if theirs.status == MigrationStatus::Completed => break,
                Ok(theirs) if theirs.status != MigrationStatus::Running => {
                    return fail(
                        format!("the target's record ended {:?}: {theirs:?}", theirs.status),
                        None,
                    )
                }
                Ok(theirs) if Instant::now() > deadline => {
                    return fail(
                        format!(
                            "the target's record still reads running {TARGET_RECORD_TIMEOUT:?} \
                             after the source's completed: {theirs:?}"
                        ),
                        None,
                    )
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return fail(format!("GET {path} on the target: {e:#}"), None),
            }
        }

        // On exactly one host: the target runs it, the source has no such VM.
        let vm_path = format!("/v1/vms/{}", m.vm);
        match src.request(Method::GET, &vm_path, None) {
            Ok((404, _)) => {}
            Ok((status, body)) => {
                return fail(
                    format!("the source still answers {status} for the VM: {body}"),
                    None,
                )
            }
            Err(e) => return fail(format!("GET {vm_path} on the source: {e:#}"), None),
        }
        let arrived: VmInfo = match dst.get(&vm_path) {
            Ok(vm) => vm,
            Err(e) => return fail(format!("GET {vm_path} on the target: {e:#}"), None),
        };

        // The guest's own verifier: no errors, and it goes on writing and checking pages.
        let deadline = Instant::now() + PROGRESS_TIMEOUT;
        let mut now = arrived.clone();
        loop {
            if now.guest.verify_errors != 0 {
                return fail(
                    format!(
                        "the guest found {} pages wrong (the first at working-set page {:?})",
                        now.guest.verify_errors, now.guest.first_error_page
                    ),
                    Some(&now),
                );
            }
            if now.state != VmState::Running {
                return fail(
                    format!("the VM is {:?} on the target", now.state),
                    Some(&now),
                );
            }
            if now.guest.progress >= arrived.guest.progress + PROGRESS_PAGES
                && now.guest.verified_pages >= arrived.guest.verified_pages + PROGRESS_PAGES
            {
                break;
            }
            if Instant::now() > deadline {
                return fail(
                    format!(
                        "the guest made no progress on the target in {PROGRESS_TIMEOUT:?} \
                         (from {} pages written and {} verified on arrival)",
                        arrived.guest.progress, arrived.guest.verified_pages
                    ),
                    Some(&now),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
            now = match dst.get(&vm_path) {
                Ok(vm) => vm,
                Err(e) => return fail(format!("GET {vm_path} on the target: {e:#}"), None),
            };
        }
        Ok(Record {
            n: m.n,
            vm: m.vm.clone(),
            from: m.src.name.to_owned(),
            to: m.dst.name.to_owned(),
            step: m.step,
            info,
            progress: now.guest.progress,
            verified_pages: now.guest.verified_pages,
            verify_errors: now.guest.verify_errors,
        })
    }
}

/// Moves the VMs named in `vms` (all running on `hosts[0]`) back and forth between the two
/// hosts, `migrations` times in all: migration `n` moves VM `n % vms.len()` to the other host
/// as [`Step::nth`] says for that VM's own count of moves (so each VM goes through every
/// mode, whatever the number of VMs), and is checked before the next starts. `each` sees
/// every record as it passes. Stops at the first violation.
pub fn run(
    hosts: [Host<'_>; 2],
    vms: &[String],
    migrations: usize,
    mut each: impl FnMut(&Record),
) -> Result<Vec<Record>, Box<Violation>> {
    let mut on = vec![0usize; vms.len()];
    let mut records = Vec::with_capacity(migrations);
    for n in 0..migrations {
        let k = n % vms.len();
        let (src, dst) = (hosts[on[k]], hosts[1 - on[k]]);
        let record = Move {
            n,
            vm: vms[k].clone(),
            src,
            dst,
            step: Step::nth(n / vms.len()),
        }
        .start()?
        .check()?;
        on[k] = 1 - on[k];
        each(&record);
        records.push(record);
    }
    Ok(records)
}
