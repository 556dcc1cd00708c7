//! Host drain (`godwit host drain NAME`): cordon the host, then live-migrate every VM away,
//! as KubeVirt's `evictionStrategy: LiveMigrate` and DRS maintenance mode do. Each VM's target
//! is chosen by the same placement policy as a new VM (labels, anti-affinity, memory, the
//! resources it can bind there), cordoned hosts excluded; the migration mode by the mode
//! policy; no more than `policy.limits.max_migrations_per_host` at once. A VM that cannot move
//! (pinned, no host can take it, its migration failed twice) is listed with the reason and
//! stays. The drain's status is `GET /v1/hosts/{name}/drain`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use godwit_api::{
    DrainState, DrainStatus, DrainVm, DrainVmState, MigrationStatus, MigrationTrigger, VmState,
};

use crate::balancer;
use crate::driver;
use crate::error::OrchError;
use crate::state::{lock, now_unix_ms, State};

/// How often a running drain looks again.
const TICK: Duration = Duration::from_millis(500);
/// Attempts per VM before it is reported stuck.
const ATTEMPTS: u32 = 2;
/// How long a VM the orchestrator has no record of may still be reported before it counts as
/// one that cannot move (a VM deleted a moment ago is reported until the agent's next
/// heartbeat).
const UNKNOWN_GRACE: Duration = Duration::from_secs(5);

/// Cordons `host` and starts draining it in the background; returns the drain's first status.
/// A drain already running is returned as it is.
pub fn start(state: &Arc<State>, host: &str) -> Result<DrainStatus, OrchError> {
    state.agent(host)?;
    if let Some(d) = lock(&state.drains).get(host) {
        if d.state == DrainState::Running {
            return Ok(d.clone());
        }
    }
    state.set_cordoned(host, true)?;
    let status = DrainStatus {
        host: host.to_owned(),
        state: DrainState::Running,
        started_unix_ms: now_unix_ms(),
        finished_unix_ms: None,
        vms: Vec::new(),
    };
    lock(&state.drains).insert(host.to_owned(), status.clone());
    tokio::spawn(run(state.clone(), host.to_owned()));
    tracing::info!(host, "drain started");
    Ok(status)
}

/// The VMs running on `host` now, by what its agent last reported.
fn vms_on(state: &State, host: &str) -> Vec<String> {
    state
        .agent(host)
        .map(|a| {
            a.vms
                .iter()
                .filter(|v| v.state != VmState::Crashed)
                .map(|v| v.name.clone())
                .collect()
        })
        .unwrap_or_default()
}

fn update(state: &State, host: &str, f: impl FnOnce(&mut DrainStatus)) {
    if let Some(d) = lock(&state.drains).get_mut(host) {
        f(d);
    }
}

fn set_vm(state: &State, host: &str, vm: DrainVm) {
    update(state, host, |d| {
        match d.vms.iter_mut().find(|v| v.vm == vm.vm) {
            Some(v) => *v = vm,
            None => d.vms.push(vm),
        }
    });
}

async fn run(state: Arc<State>, host: String) {
    let mut attempts: BTreeMap<String, u32> = BTreeMap::new();
    let mut unknown_since: BTreeMap<String, std::time::Instant> = BTreeMap::new();
    let per_host = state.config.policy.limits.max_migrations_per_host.max(1) as usize;
    loop {
        if !state.is_cordoned(&host) {
            finish(&state, &host, DrainState::Cancelled);
            return;
        }
        let here = vms_on(&state, &host);
        // A VM that left the host while it waited (deleted, or moved by someone else) is no
        // longer the drain's.
        update(&state, &host, |d| {
            d.vms
                .retain(|v| v.state != DrainVmState::Waiting || here.contains(&v.vm))
        });
        let current = lock(&state.drains).get(&host).cloned();
        let Some(current) = current else { return };
        // Follow the migrations this drain started.
        for v in current
            .vms
            .iter()
            .filter(|v| v.state == DrainVmState::Migrating)
        {
            let Some(id) = &v.migration else { continue };
            let Ok(m) = state.migration(id) else { continue };
            match m.status {
                MigrationStatus::Running => {}
                MigrationStatus::Completed => set_vm(
                    &state,
                    &host,
                    DrainVm {
                        state: DrainVmState::Moved,
                        ..v.clone()
                    },
                ),
                _ => {
                    let n = attempts.get(&v.vm).copied().unwrap_or(0);
                    let why = m.error.unwrap_or_else(|| format!("{:?}", m.status));
                    set_vm(
                        &state,
                        &host,
                        DrainVm {
                            state: if n >= ATTEMPTS {
                                DrainVmState::Stuck
                            } else {
                                DrainVmState::Waiting
                            },
                            reason: format!("its migration to {} failed: {why}", m.to),
                            to: None,
                            migration: None,
                            vm: v.vm.clone(),
                        },
                    );
                }
            }
        }
        let current = lock(&state.drains).get(&host).cloned().unwrap_or(current);
        let known = |vm: &str| current.vms.iter().find(|v| v.vm == vm).cloned();
        let mut in_flight = current
            .vms
            .iter()
            .filter(|v| v.state == DrainVmState::Migrating)
            .count();
        for vm in &here {
            let entry = known(vm);
            match entry.as_ref().map(|v| v.state) {
                Some(DrainVmState::Migrating) | Some(DrainVmState::Stuck) => continue,
                // Reported here again after it moved: a stale report; wait for the next.
                Some(DrainVmState::Moved) => continue,
                _ => {}
            }
            if in_flight >= per_host {
                if entry.is_none() {
                    set_vm(&state, &host, waiting(vm, "waiting for a migration slot"));
                }
                continue;
            }
            match plan_move(&state, vm) {
                Ok((to, reason)) => {
                    *attempts.entry(vm.clone()).or_default() += 1;
                    let record = state.vm_record(vm);
                    let mode = record
                        .as_ref()
                        .ok()
                        .and_then(|r| balancer::choose_mode(&state, r, &to).ok())
                        .map(|(m, _)| m)
                        .unwrap_or_default();
                    match driver::start_migration(
                        &state,
                        vm,
                        &to,
                        mode,
                        MigrationTrigger::Drain,
                        format!("draining {host}: {reason}"),
                        None,
                    )
                    .await
                    {
                        Ok(m) => {
                            in_flight += 1;
                            set_vm(
                                &state,
                                &host,
                                DrainVm {
                                    vm: vm.clone(),
                                    state: DrainVmState::Migrating,
                                    to: Some(to),
                                    migration: Some(m.id),
                                    reason,
                                },
                            );
                        }
                        Err(e) => {
                            let n = attempts.get(vm).copied().unwrap_or(0);
                            let mut v = waiting(vm, &format!("cannot start its migration: {e}"));
                            if n >= ATTEMPTS {
                                v.state = DrainVmState::Stuck;
                            }
                            set_vm(&state, &host, v);
                        }
                    }
                }
                Err(Unmovable::Unknown(reason)) => {
                    let since = *unknown_since
                        .entry(vm.clone())
                        .or_insert_with(std::time::Instant::now);
                    let mut v = waiting(vm, &reason);
                    if since.elapsed() >= UNKNOWN_GRACE {
                        v.state = DrainVmState::Stuck;
                    }
                    set_vm(&state, &host, v);
                }
                Err(Unmovable::Stuck(reason)) => set_vm(
                    &state,
                    &host,
                    DrainVm {
                        vm: vm.clone(),
                        state: DrainVmState::Stuck,
                        to: None,
                        migration: None,
                        reason,
                    },
                ),
            }
        }
        // Done when nothing runs here but what cannot move, and nothing is in flight.
        let latest = lock(&state.drains).get(&host).cloned();
        let Some(latest) = latest else { return };
        let state_of = |vm: &str| latest.vms.iter().find(|v| v.vm == vm).map(|v| v.state);
        let migrating = latest
            .vms
            .iter()
            .any(|v| v.state == DrainVmState::Migrating);
        let left = here
            .iter()
            .filter(|vm| {
                !matches!(
                    state_of(vm),
                    Some(DrainVmState::Stuck | DrainVmState::Moved)
                )
            })
            .count();
        if !migrating && left == 0 {
            let stuck = latest.vms.iter().any(|v| v.state == DrainVmState::Stuck);
            finish(
                &state,
                &host,
                if stuck {
                    DrainState::Stuck
                } else {
                    DrainState::Done
                },
            );
            return;
        }
        tokio::time::sleep(TICK).await;
    }
}

fn waiting(vm: &str, reason: &str) -> DrainVm {
    DrainVm {
        vm: vm.to_owned(),
        state: DrainVmState::Waiting,
        to: None,
        migration: None,
        reason: reason.to_owned(),
    }
}

/// Why a VM does not move now.
enum Unmovable {
    /// The orchestrator has no record of it (yet, or any more).
    Unknown(String),
    /// It cannot move: pinned, or no host can take it.
    Stuck(String),
}

/// Where `vm` should go, with why; or why it cannot move.
fn plan_move(state: &State, vm: &str) -> Result<(String, String), Unmovable> {
    let record = state.vm_record(vm).map_err(|_| {
        Unmovable::Unknown(
            "the orchestrator has no record of it (it was not created through the \
             orchestrator), so it is not moved"
                .to_owned(),
        )
    })?;
    if record.spec.pinned {
        return Err(Unmovable::Stuck("it is pinned to its host".into()));
    }
    let stuck = |e: OrchError| Unmovable::Stuck(e.to_string());
    let (to, reason) = balancer::place(state, &record.spec).map_err(stuck)?;
    balancer::check_target(state, &record, &to).map_err(stuck)?;
    Ok((to, reason))
}

fn finish(state: &State, host: &str, outcome: DrainState) {
    update(state, host, |d| {
        d.state = outcome;
        d.finished_unix_ms = Some(now_unix_ms());
    });
    let label = match outcome {
        DrainState::Done => "done",
        DrainState::Stuck => "stuck",
        DrainState::Cancelled | DrainState::Running => "cancelled",
    };
    state.metrics.drains.with_label_values(&[label]).inc();
    tracing::info!(host, outcome = label, "drain ended");
}
