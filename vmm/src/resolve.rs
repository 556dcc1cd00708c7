//! After a switchover that got no answer: whether the target runs the VM, asked over the
//! target agent's API, so that the source resumes its paused copy only when the target never
//! started the VM (and, its migration having ended, never will), and drops it only when the
//! target runs it. Never two running copies.

use std::time::Duration;

use godwit_api::{MigrationInfo, MigrationPhase, MigrationStatus, VmInfo, VmState};

/// What the target's agent says about the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The target runs the VM with all its memory: the source's copy must go.
    TargetRuns,
    /// The target's migration ended before it started the VM: the source's copy is the only
    /// one and may run.
    NeverStarted,
    /// The target started the VM and lost it (a post-copy that broke): neither copy may run
    /// without an operator; the text says why.
    Split(String),
    /// No answer yet (the target is unreachable, or its migration still runs): ask again.
    Unknown(String),
}

/// Decides from the target's record of migration (None: it has none) and its view of the VM
/// (None: it does not hold it).
pub fn decide(record: Option<&MigrationInfo>, vm: Option<&VmInfo>) -> Resolution {
    let Some(record) = record else {
        return Resolution::Unknown("the target has no record of the migration".into());
    };
    match record.status {
        MigrationStatus::Running => {
            Resolution::Unknown("the migration still runs on the target".into())
        }
        MigrationStatus::Completed => Resolution::TargetRuns,
        // Its VMM died before it said how far it got: it may have started the VM (and died
        // with it), so the phase proves nothing.
        MigrationStatus::Failed if record.orphaned => Resolution::Split(format!(
            "the target's VMM process died during the migration, before it recorded whether it              had started the VM ({})",
            record.error.as_deref().unwrap_or("no reason recorded")
        )),
        MigrationStatus::Failed | MigrationStatus::Cancelled => {
            // The target's record moves past pre-copy only when it starts the VM.
            if matches!(
                record.phase,
                MigrationPhase::Setup | MigrationPhase::Precopy
            ) {
                return Resolution::NeverStarted;
            }
            match vm {
                Some(vm) if vm.state != VmState::Crashed => Resolution::TargetRuns,
                Some(vm) => Resolution::Split(format!(
                    "the target started the VM and stopped it: {}",
                    vm.crash_reason.as_deref().unwrap_or("crashed")
                )),
                None => {
                    Resolution::Split("the target started the VM and no longer holds it".to_owned())
                }
            }
        }
    }
}

/// Asks the target agent at `target` (HOST:PORT of its API) about migration `id` of `vm`.
pub fn ask(
    auth: &godwit_daemon::client::ClientAuth,
    target: &str,
    id: &str,
    vm: &str,
) -> Resolution {
    let unknown = |what: &str, e: &dyn std::fmt::Display| {
        Resolution::Unknown(format!(
            "cannot ask the target agent at {target} {what}: {e}"
        ))
    };
    let client = match auth.blocking_client(Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => return unknown("(no client)", &e),
    };
    let get = |path: String| -> Result<Option<reqwest::blocking::Response>, reqwest::Error> {
        let resp = client.get(format!("{}{path}", auth.url(target))).send()?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        resp.error_for_status().map(Some)
    };
    let record: Option<MigrationInfo> = match get(format!("/v1/migrations/{id}")) {
        Ok(Some(resp)) => match resp.json() {
            Ok(r) => Some(r),
            Err(e) => return unknown("about the migration", &e),
        },
        Ok(None) => None,
        Err(e) => return unknown("about the migration", &e),
    };
    let vm: Option<VmInfo> = match get(format!("/v1/vms/{vm}")) {
        Ok(Some(resp)) => match resp.json() {
            Ok(v) => Some(v),
            Err(e) => return unknown("about the VM", &e),
        },
        Ok(None) => None,
        Err(e) => return unknown("about the VM", &e),
    };
    decide(record.as_ref(), vm.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: MigrationStatus, phase: MigrationPhase) -> MigrationInfo {
        let progress = page_transfer::progress::Progress::new(
            "m",
            "vm",
            "a",
            "b",
            godwit_api::MigrationMode::Precopy,
            0,
        );
        progress.update(|i| i.phase = phase);
        let mut info = progress.info();
        info.status = status;
        info
    }

    fn vm(state: VmState) -> VmInfo {
        serde_json::from_value(serde_json::json!({
            "name": "vm", "state": state, "vcpus": 1, "memory_mib": 32,
            "guest": {"spec": {"kind": "idle"}, "progress": 0, "verify_errors": 0,
                      "first_error_page": null, "verified_pages": 0, "vcpu_progress": [0]},
            "cpu_seconds": 0.0, "vcpu_cpu_seconds": [0.0], "cpu_usage_cores": 0.0,
            "created_unix_ms": 0, "console_bytes": 0,
            "crash_reason": "post-copy migration failed"
        }))
        .unwrap()
    }

    #[test]
    fn only_a_target_that_never_started_the_vm_lets_the_source_run_it() {
        use MigrationPhase as P;
        use MigrationStatus as S;
        let failed_early = record(S::Failed, P::Precopy);
        assert_eq!(decide(Some(&failed_early), None), Resolution::NeverStarted);
        assert_eq!(
            decide(Some(&record(S::Cancelled, P::Setup)), None),
            Resolution::NeverStarted
        );
        // Started: it runs there (all memory was checked before the start), or it broke.
        let started = record(S::Failed, P::Completing);
        assert_eq!(
            decide(Some(&started), Some(&vm(VmState::Running))),
            Resolution::TargetRuns
        );
        assert!(matches!(
            decide(Some(&record(S::Failed, P::Postcopy)), Some(&vm(VmState::Crashed))),
            Resolution::Split(why) if why.contains("post-copy migration failed")
        ));
        assert!(matches!(decide(Some(&started), None), Resolution::Split(_)));
        // A record its agent ended when the VMM died: its phase is stale, nothing is proved.
        let mut orphan = record(S::Failed, P::Setup);
        orphan.orphaned = true;
        orphan.error = Some("The VM's VMM process died: killed by signal 9".into());
        assert!(matches!(
            decide(Some(&orphan), None),
            Resolution::Split(why) if why.contains("signal 9")
        ));
        assert_eq!(
            decide(Some(&record(S::Completed, P::Done)), None),
            Resolution::TargetRuns
        );
        // Still running there, or no record: ask again.
        assert!(matches!(
            decide(Some(&record(S::Running, P::Precopy)), None),
            Resolution::Unknown(_)
        ));
        assert!(matches!(decide(None, None), Resolution::Unknown(_)));
    }
}
