//! Talking to agents: their HTTP API, VM creation on a chosen host, and driving migrations
//! from start to the end (polling the source agent), recording the outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use godwit_api::{
    ClusterMigration, CreateVm, ErrorBody, MigrateRequest, MigrationInfo, MigrationMode,
    MigrationStarted, MigrationStatus, MigrationTrigger,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::OrchError;
use crate::state::{now_unix_ms, State};

async fn answer<T: DeserializeOwned>(
    resp: Result<reqwest::Response, reqwest::Error>,
    what: &str,
) -> Result<T, OrchError> {
    let resp =
        resp.map_err(|e| OrchError::Agent(format!("Cannot reach the agent for {what}: {e}")))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| OrchError::Agent(format!("The agent's answer to {what} broke off: {e}")))?;
    if !status.is_success() {
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or(text);
        let message = format!("The agent refused {what}: {message}");
        return Err(match status.as_u16() {
            400 => OrchError::BadRequest(message),
            404 => OrchError::NotFound(message),
            409 => OrchError::Conflict(message),
            507 => OrchError::NoCapacity(message),
            _ => OrchError::Agent(message),
        });
    }
    let text = if text.is_empty() {
        "null".to_owned()
    } else {
        text
    };
    serde_json::from_str(&text)
        .map_err(|e| OrchError::Agent(format!("The agent's answer to {what} does not parse: {e}")))
}

pub async fn get<T: DeserializeOwned>(
    state: &State,
    base: &str,
    path: &str,
) -> Result<T, OrchError> {
    answer(state.http.get(format!("{base}{path}")).send().await, path).await
}

/// GET `path` from the agent at `base` that should be host `host`: over TLS, its certificate
/// must name that host. (A client checks a server's certificate against the address it
/// dials; this also binds the URL a heartbeat gave to the host that sent it, so a host cannot
/// pass another host's agent off as its own.) Such an impostor is `OrchError::Forbidden`.
pub async fn get_from_host<T: DeserializeOwned>(
    state: &State,
    base: &str,
    host: &str,
    path: &str,
) -> Result<T, OrchError> {
    let resp = state.http.get(format!("{base}{path}")).send().await;
    if let Ok(r) = &resp {
        if let Some(tls) = r.extensions().get::<reqwest::tls::TlsInfo>() {
            let who = tls.peer_certificate().and_then(|der| {
                godwit_tls::identity_of(&godwit_tls::rustls::pki_types::CertificateDer::from(der))
            });
            let expected = godwit_tls::Identity {
                name: host.to_owned(),
                role: godwit_tls::Role::Host,
            };
            if who.as_ref() != Some(&expected) {
                return Err(OrchError::Forbidden(format!(
                    "The agent at {base} presented the certificate of {}, not of host {host}",
                    who.map_or("nobody".to_owned(), |w| w.to_string())
                )));
            }
        }
    }
    answer(resp, path).await
}

pub async fn post<T: DeserializeOwned>(
    state: &State,
    base: &str,
    path: &str,
    body: &impl Serialize,
) -> Result<T, OrchError> {
    answer(
        state
            .http
            .post(format!("{base}{path}"))
            .json(body)
            .send()
            .await,
        path,
    )
    .await
}

pub async fn delete(state: &State, base: &str, path: &str) -> Result<(), OrchError> {
    let _: serde_json::Value = answer(
        state.http.delete(format!("{base}{path}")).send().await,
        path,
    )
    .await?;
    Ok(())
}

/// Creates a VM on an agent.
pub async fn create_on(
    state: &State,
    base: &str,
    req: &CreateVm,
) -> Result<godwit_api::VmInfo, OrchError> {
    post(state, base, "/v1/vms", req).await
}

/// Starts migrating `vm` to host `to` and follows it in the background.
pub async fn start_migration(
    state: &Arc<State>,
    vm: &str,
    to: &str,
    mode: MigrationMode,
    trigger: MigrationTrigger,
    reason: String,
    bandwidth_mib_s: Option<f64>,
) -> Result<ClusterMigration, OrchError> {
    let record = state.vm_record(vm)?;
    if record.host == to {
        return Err(OrchError::Conflict(format!(
            "VM {vm:?} already runs on {to}"
        )));
    }
    if state.running_migrations().iter().any(|m| m.vm == vm) {
        return Err(OrchError::Conflict(format!(
            "VM {vm:?} is already being migrated"
        )));
    }
    let src = state.up_agent(&record.host)?;
    let dst = state.up_agent(to)?;
    crate::balancer::check_mode(state, &src.name, to, mode)?;
    let req = MigrateRequest {
        target: dst.address().to_owned(),
        mode,
        // The downtime target the policy planned with.
        downtime_ms: Some(
            record
                .spec
                .downtime_ms
                .unwrap_or(state.config.policy.migration.default_downtime_target_ms),
        ),
        bandwidth_mib_s,
        channels: None,
        compress: Default::default(),
        max_rounds: None,
        precopy_timeout_s: None,
        verify: None,
        postcopy_recovery_s: None,
    };
    let started: MigrationStarted =
        post(state, &src.url, &format!("/v1/vms/{vm}/migrate"), &req).await?;
    let m = ClusterMigration {
        id: started.id.clone(),
        vm: vm.to_owned(),
        from: src.name.clone(),
        to: to.to_owned(),
        mode,
        trigger,
        reason,
        status: MigrationStatus::Running,
        started_unix_ms: now_unix_ms(),
        finished_unix_ms: None,
        error: None,
        stats: None,
    };
    tracing::info!(vm, from = %m.from, to, ?mode, ?trigger, reason = %m.reason, "migration started");
    state.put_migration(m.clone());
    tokio::spawn(follow(state.clone(), m.id.clone()));
    Ok(m)
}

/// Polls a migration's source agent until the migration ends, then records the outcome.
pub async fn follow(state: Arc<State>, id: String) {
    let poll = Duration::from_millis(state.config.migration_poll_ms);
    let mut unreachable_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(poll).await;
        let Ok(mut m) = state.migration(&id) else {
            return;
        };
        if m.status != MigrationStatus::Running {
            return;
        }
        let info: Result<MigrationInfo, OrchError> = match state.agent(&m.from) {
            Ok(src) => get(&state, &src.url, &format!("/v1/migrations/{id}")).await,
            Err(e) => Err(e),
        };
        match info {
            Ok(info) => {
                unreachable_since = None;
                let done = info.status != MigrationStatus::Running;
                m.status = info.status;
                m.error = info.error.clone();
                m.stats = Some(info);
                if done {
                    finish(&state, m);
                    return;
                }
                state.refresh_migration(m);
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(state.config.agent_timeout_ms * 2) {
                    m.status = MigrationStatus::Failed;
                    m.error = Some(format!("Lost contact with the source agent: {e}"));
                    finish(&state, m);
                    return;
                }
            }
        }
    }
}

fn finish(state: &State, mut m: ClusterMigration) {
    let now = now_unix_ms();
    m.finished_unix_ms = Some(now);
    let outcome = match m.status {
        MigrationStatus::Completed => "completed",
        MigrationStatus::Cancelled => "cancelled",
        _ => "failed",
    };
    if m.status == MigrationStatus::Completed {
        state.moved(&m.vm, &m.to, now);
    }
    state
        .metrics
        .migrations
        .with_label_values(&[m.mode.as_str(), trigger_label(m.trigger), outcome])
        .inc();
    if let Some(stats) = &m.stats {
        state.metrics.count_resource_actions(&stats.resources);
    }
    tracing::info!(
        vm = %m.vm,
        from = %m.from,
        to = %m.to,
        outcome,
        downtime_ms = m.stats.as_ref().and_then(|s| s.downtime_ms).unwrap_or(0.0),
        total_ms = m.stats.as_ref().map(|s| s.total_ms).unwrap_or(0.0),
        error = m.error.as_deref().unwrap_or(""),
        "migration ended"
    );
    state.put_migration(m);
}

pub fn trigger_label(t: MigrationTrigger) -> &'static str {
    match t {
        MigrationTrigger::Manual => "manual",
        MigrationTrigger::Balancer => "balancer",
        MigrationTrigger::Drain => "drain",
    }
}
