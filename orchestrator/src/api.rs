//! The orchestrator's REST API (docs/orchestrator-api.md).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use godwit_api::{
    AgentHeartbeat, BalancerState, ClusterCreateVm, ClusterHost, ClusterMigrate, ClusterVm,
    ClusterVmCreated, CreateVm, Decision, MigrationTrigger,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use godwit_daemon::auth::Caller;

use crate::balancer;
use crate::driver;
use crate::error::OrchError;
use crate::state::{lock, now_unix_ms, State, VmRecord};

type Shared = Arc<State>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/agents/heartbeat", post(heartbeat))
        .route("/v1/hosts", get(hosts))
        .route("/v1/hosts/{name}", get(host).delete(forget_host))
        .route("/v1/hosts/{name}/cordon", post(cordon))
        .route("/v1/hosts/{name}/uncordon", post(uncordon))
        .route("/v1/hosts/{name}/drain", get(drain_status).post(drain))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{name}/migrate", post(migrate_vm))
        .route("/v1/migrations", get(migrations))
        .route("/v1/migrations/{id}", get(migration))
        .route("/v1/migrations/{id}/resume", post(resume_migration))
        .route("/v1/plan", get(plan))
        .route("/v1/decisions", get(decisions))
        .route("/v1/balancer", get(get_balancer).put(put_balancer))
        .fallback(|| async {
            OrchError::NotFound("No such API endpoint; see docs/orchestrator-api.md".into())
        })
        .method_not_allowed_fallback(|| async { OrchError::MethodNotAllowed })
        .with_state(state)
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, OrchError> {
    if body.is_empty() {
        return Err(OrchError::BadRequest(
            "The request needs a JSON body".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| OrchError::BadRequest(format!("Malformed JSON request body: {e}")))
}

async fn metrics(AxState(s): AxState<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn heartbeat(
    AxState(s): AxState<Shared>,
    caller: Option<axum::Extension<Caller>>,
    body: Bytes,
) -> Result<StatusCode, OrchError> {
    let beat: AgentHeartbeat = parse(&body)?;
    if beat.host.name.is_empty() || !beat.url.starts_with("http") {
        return Err(OrchError::BadRequest(
            "A heartbeat needs the agent's name and an http URL".into(),
        ));
    }
    // Only the host itself may report for it: else a host could claim another's name and
    // be sent its VMs.
    let caller = caller.map(|c| c.0).unwrap_or(Caller::Anonymous);
    if !caller.is_host(&beat.host.name) {
        tracing::warn!(%caller, claimed = %beat.host.name, "heartbeat refused: it claims another host");
        return Err(OrchError::Forbidden(format!(
            "{caller} cannot send heartbeats for host {}",
            beat.host.name
        )));
    }
    // The URL must lead to that host's own agent (its certificate names the host), checked
    // once per URL: else a host could pass another's agent off as its own.
    let known = lock(&s.verified_urls).get(&beat.host.name) == Some(&beat.url);
    if !known {
        let probe = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            driver::get_from_host::<godwit_api::HostInfo>(
                &s,
                &beat.url,
                &beat.host.name,
                "/v1/host",
            ),
        )
        .await;
        match probe {
            Ok(Ok(info)) if info.name == beat.host.name => {
                lock(&s.verified_urls).insert(beat.host.name.clone(), beat.url.clone());
            }
            Ok(Ok(info)) => {
                return Err(OrchError::Forbidden(format!(
                    "The agent at {} is host {}, not host {}",
                    beat.url, info.name, beat.host.name
                )))
            }
            Ok(Err(e)) => {
                tracing::warn!(host = %beat.host.name, url = %beat.url, error = %e, "heartbeat refused: its URL does not lead to the host's agent");
                return Err(OrchError::Forbidden(format!(
                    "The heartbeat's URL {} does not lead to host {}'s agent: {e}",
                    beat.url, beat.host.name
                )));
            }
            Err(_) => {
                return Err(OrchError::Unavailable(format!(
                    "The heartbeat's URL {} did not answer within 5 s",
                    beat.url
                )))
            }
        }
    }
    s.observe(&beat.url, beat.host, beat.vms);
    Ok(StatusCode::NO_CONTENT)
}

async fn hosts(AxState(s): AxState<Shared>) -> Json<Vec<ClusterHost>> {
    let hot = lock(&s.balancer).hot_hosts.clone();
    Json(s.agents().iter().map(|a| s.host_view(a, &hot)).collect())
}

fn host_of(s: &State, name: &str) -> Result<ClusterHost, OrchError> {
    let agent = s.agent(name)?;
    let hot = lock(&s.balancer).hot_hosts.clone();
    Ok(s.host_view(&agent, &hot))
}

async fn host(
    AxState(s): AxState<Shared>,
    Path(name): Path<String>,
) -> Result<Json<ClusterHost>, OrchError> {
    Ok(Json(host_of(&s, &name)?))
}

/// Nothing new is placed or migrated to the host; its VMs stay until moved.
async fn cordon(
    AxState(s): AxState<Shared>,
    Path(name): Path<String>,
) -> Result<Json<ClusterHost>, OrchError> {
    s.agent(&name)?;
    s.set_cordoned(&name, true)?;
    s.metrics.observe_cluster(&s);
    Ok(Json(host_of(&s, &name)?))
}

/// The host takes VMs again; a drain still running stops.
async fn uncordon(
    AxState(s): AxState<Shared>,
    Path(name): Path<String>,
) -> Result<Json<ClusterHost>, OrchError> {
    s.agent(&name)?;
    s.set_cordoned(&name, false)?;
    s.metrics.observe_cluster(&s);
    Ok(Json(host_of(&s, &name)?))
}

async fn drain(
    AxState(s): AxState<Shared>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<godwit_api::DrainStatus>), OrchError> {
    let status = crate::drain::start(&s, &name)?;
    s.metrics.observe_cluster(&s);
    Ok((StatusCode::ACCEPTED, Json(status)))
}

async fn drain_status(
    AxState(s): AxState<Shared>,
    Path(name): Path<String>,
) -> Result<Json<godwit_api::DrainStatus>, OrchError> {
    s.agent(&name)?;
    lock(&s.drains)
        .get(&name)
        .cloned()
        .map(Json)
        .ok_or_else(|| OrchError::NotFound(format!("Host {name} has not been drained")))
}

/// Forgets a host that is gone; refused while it runs VMs.
async fn forget_host(
    AxState(s): AxState<Shared>,
    Path(name): Path<String>,
) -> Result<StatusCode, OrchError> {
    s.forget_agent(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_vms(AxState(s): AxState<Shared>) -> Json<Vec<ClusterVm>> {
    Json(s.vm_records().values().map(|r| s.vm_view(r)).collect())
}

async fn get_vm(
    AxState(s): AxState<Shared>,
    Path(name): Path<String>,
) -> Result<Json<ClusterVm>, OrchError> {
    Ok(Json(s.vm_view(&s.vm_record(&name)?)))
}

async fn create_vm(
    AxState(s): AxState<Shared>,
    body: Bytes,
) -> Result<(StatusCode, Json<ClusterVmCreated>), OrchError> {
    let spec: ClusterCreateVm = parse(&body)?;
    if !(1..=4).contains(&spec.vcpus) {
        return Err(OrchError::BadRequest(format!(
            "vcpus must be 1-4, not {}",
            spec.vcpus
        )));
    }
    if spec.memory_mib < 4 {
        return Err(OrchError::BadRequest(
            "memory_mib must be at least 4".into(),
        ));
    }
    check_resource_names(&spec)?;
    if s.vm_record(&spec.name).is_ok() {
        return Err(OrchError::Conflict(format!(
            "A VM named {:?} already exists in the cluster",
            spec.name
        )));
    }
    let (host, reason) = match &spec.host {
        Some(h) => {
            s.up_agent(h)?;
            if s.is_cordoned(h) {
                return Err(OrchError::Conflict(format!(
                    "Host {h} is cordoned: nothing new is placed there (godwit host uncordon {h})"
                )));
            }
            (h.clone(), format!("pinned to {h} by the request"))
        }
        None => match balancer::place(&s, &spec) {
            Ok(choice) => choice,
            Err(e) => {
                s.metrics.placement_failures.inc();
                s.record_decisions(&[Decision {
                    unix_ms: now_unix_ms(),
                    action: "place".into(),
                    class: "no_capacity".into(),
                    vm: Some(spec.name.clone()),
                    from: None,
                    to: None,
                    mode: None,
                    reason: e.to_string(),
                    executed: false,
                }]);
                return Err(e);
            }
        },
    };
    let agent = s.up_agent(&host)?;
    let req = CreateVm {
        name: spec.name.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        guest: spec.guest.clone(),
        paused: false,
        resources: spec.resources.clone(),
    };
    driver::create_on(&s, &agent.url, &req).await?;
    let record = VmRecord {
        spec: spec.clone(),
        host: host.clone(),
        moves: vec![],
        created_unix_ms: now_unix_ms(),
        placement_reason: reason.clone(),
    };
    s.put_vm(record.clone())?;
    s.record_decisions(&[Decision {
        unix_ms: now_unix_ms(),
        action: "place".into(),
        class: "placement".into(),
        vm: Some(spec.name.clone()),
        from: None,
        to: Some(host.clone()),
        mode: None,
        reason: reason.clone(),
        executed: true,
    }]);
    tracing::info!(vm = %spec.name, %host, %reason, "VM placed");
    Ok((
        StatusCode::CREATED,
        Json(ClusterVmCreated {
            vm: s.vm_view(&record),
            host,
            reason,
        }),
    ))
}

/// Resource names must be there and unique: placement and the migration records refer to
/// resources by name. The agent checks the rest of each spec.
fn check_resource_names(spec: &ClusterCreateVm) -> Result<(), OrchError> {
    let mut seen = std::collections::BTreeSet::new();
    for r in &spec.resources {
        if r.name.is_empty() {
            return Err(OrchError::BadRequest(format!(
                "VM {:?} declares a resource of kind {} without a name",
                spec.name, r.kind
            )));
        }
        if !seen.insert(r.name.as_str()) {
            return Err(OrchError::BadRequest(format!(
                "VM {:?} declares two resources named {:?}",
                spec.name, r.name
            )));
        }
    }
    Ok(())
}

async fn delete_vm(
    AxState(s): AxState<Shared>,
    Path(name): Path<String>,
) -> Result<StatusCode, OrchError> {
    let record = s.vm_record(&name)?;
    if s.running_migrations().iter().any(|m| m.vm == name) {
        return Err(OrchError::Conflict(format!(
            "VM {name:?} is being migrated; delete it afterwards"
        )));
    }
    match s.up_agent(&record.host) {
        Ok(agent) => match driver::delete(&s, &agent.url, &format!("/v1/vms/{name}")).await {
            Ok(()) | Err(OrchError::NotFound(_)) => {}
            Err(e) => return Err(e),
        },
        // A VM on a dead host is forgotten; the host's agent will report it if it comes back.
        Err(OrchError::Unavailable(_)) | Err(OrchError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    s.remove_vm(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn migrate_vm(
    AxState(s): AxState<Shared>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<godwit_api::ClusterMigration>), OrchError> {
    let req: ClusterMigrate = parse(&body)?;
    let record = s.vm_record(&name)?;
    balancer::check_target(&s, &record, &req.to)?;
    let (mode, reason) = match req.mode {
        Some(m) => (m, "requested by the operator".to_owned()),
        None => balancer::choose_mode(&s, &record, &req.to)?,
    };
    let m = driver::start_migration(
        &s,
        &name,
        &req.to,
        mode,
        MigrationTrigger::Manual,
        reason,
        req.bandwidth_mib_s,
    )
    .await?;
    s.record_decisions(&[Decision {
        unix_ms: now_unix_ms(),
        action: "migrate".into(),
        class: "manual".into(),
        vm: Some(name.clone()),
        from: Some(m.from.clone()),
        to: Some(m.to.clone()),
        mode: Some(m.mode),
        reason: m.reason.clone(),
        executed: true,
    }]);
    Ok((StatusCode::ACCEPTED, Json(m)))
}

async fn migrations(AxState(s): AxState<Shared>) -> Json<Vec<godwit_api::ClusterMigration>> {
    Json(s.migrations())
}

async fn migration(
    AxState(s): AxState<Shared>,
    Path(id): Path<String>,
) -> Result<Json<godwit_api::ClusterMigration>, OrchError> {
    Ok(Json(s.migration(&id)?))
}

/// A paused post-copy (`postcopy-paused`) reconnects now: asked of its source agent, which
/// answers with its record (409 when the migration is not paused).
async fn resume_migration(
    AxState(s): AxState<Shared>,
    Path(id): Path<String>,
) -> Result<Json<godwit_api::MigrationInfo>, OrchError> {
    let record = s.migration(&id)?;
    let agent = s.up_agent(&record.from)?;
    let info = driver::post(
        &s,
        &agent.url,
        &format!("/v1/migrations/{id}/resume"),
        &serde_json::json!({}),
    )
    .await?;
    Ok(Json(info))
}

async fn plan(AxState(s): AxState<Shared>) -> Result<Json<godwit_api::PlanView>, OrchError> {
    Ok(Json(balancer::plan_view(&s)?))
}

#[derive(Debug, Deserialize)]
struct DecisionsQuery {
    limit: Option<usize>,
}

async fn decisions(
    AxState(s): AxState<Shared>,
    Query(q): Query<DecisionsQuery>,
) -> Result<Json<Vec<Decision>>, OrchError> {
    let limit = q.limit.unwrap_or(200).min(20_000);
    Ok(Json(s.store.decisions(limit).map_err(OrchError::store)?))
}

async fn get_balancer(AxState(s): AxState<Shared>) -> Json<BalancerState> {
    Json(lock(&s.balancer).clone())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BalancerUpdate {
    mode: godwit_api::BalancerMode,
}

async fn put_balancer(
    AxState(s): AxState<Shared>,
    body: Bytes,
) -> Result<Json<BalancerState>, OrchError> {
    let update: BalancerUpdate = parse(&body)?;
    s.store
        .set_meta("balancer_mode", &update.mode)
        .map_err(OrchError::store)?;
    let mut b = lock(&s.balancer);
    b.mode = update.mode;
    tracing::info!(mode = ?update.mode, "balancer mode changed");
    Ok(Json(b.clone()))
}
