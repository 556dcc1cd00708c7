//! The agent's HTTP/JSON API (documented in `docs/agent-api.md`). Handlers parse and validate,
//! then call the agent, which reaches the VM's process through its backend.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use godwit_api::{CreateVm, IncomingMigration, MigrateRequest, RestoreRequest, SnapshotRequest};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::agent::Agent;
use crate::error::AgentError;
use godwit_daemon::auth::Caller;

type Shared = Arc<Agent>;

pub fn router(agent: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/host", get(host))
        .route("/v1/host/capabilities", get(capabilities))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/restore", post(restore_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{name}/pause", post(pause_vm))
        .route("/v1/vms/{name}/resume", post(resume_vm))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/digest", get(digest))
        .route("/v1/vms/{name}/snapshot", post(snapshot_vm))
        .route("/v1/vms/{name}/migrate", post(migrate_vm))
        .route("/v1/migrations", get(list_migrations))
        .route("/v1/migrations/incoming", post(incoming_migration))
        .route("/v1/migrations/{id}", get(get_migration))
        .route("/v1/migrations/{id}/cancel", post(cancel_migration))
        .route("/v1/migrations/{id}/resume", post(resume_migration))
        .route("/v1/devices/entropy", get(read_entropy))
        .route("/v1/resources/{vm}", axum::routing::delete(release_moved))
        .fallback(|| async {
            AgentError::NotFound("No such API endpoint; see docs/agent-api.md".into())
        })
        .method_not_allowed_fallback(|| async {
            AgentError::MethodNotAllowed(
                "This endpoint does not accept that method; see docs/agent-api.md".into(),
            )
        })
        .layer(middleware::from_fn_with_state(
            agent.clone(),
            count_requests,
        ))
        .with_state(agent)
}

async fn count_requests(State(a): State<Shared>, request: Request, next: Next) -> Response {
    // Bounded label values: the methods the API uses, everything else as "other".
    let method = match request.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "DELETE" => "DELETE",
        _ => "other",
    };
    let response = next.run(request).await;
    let class = match response.status().as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    };
    a.metrics
        .api_requests
        .with_label_values(&[method, class])
        .inc();
    response
}

/// Parses a JSON body into `T`, answering a malformed one with a sentence.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, AgentError> {
    godwit_daemon::parse_body(body)
}

async fn migrate_vm(
    State(a): State<Shared>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, AgentError> {
    let req: MigrateRequest = parse(&body)?;
    let started = a.migrate(&name, &req).await?;
    Ok((StatusCode::ACCEPTED, Json(started)))
}

async fn incoming_migration(
    State(a): State<Shared>,
    caller: Option<axum::Extension<Caller>>,
    body: Bytes,
) -> Result<impl IntoResponse, AgentError> {
    let req: IncomingMigration = parse(&body)?;
    // The access layer let only hosts of the cluster through; the announcement must also come
    // from the host it names as the source, the only one whose channels the VMM will take.
    let caller = caller.map(|c| c.0).unwrap_or(Caller::Anonymous);
    if !caller.is_host(&req.source) {
        tracing::warn!(%caller, source = %req.source, vm = %req.vm, "incoming migration refused: announced by another host");
        return Err(AgentError::Forbidden(format!(
            "{caller} cannot announce a migration from host {}",
            req.source
        )));
    }
    Ok(Json(a.incoming(&req).await?))
}

async fn list_migrations(State(a): State<Shared>) -> impl IntoResponse {
    Json(a.migrations().await)
}

async fn get_migration(
    State(a): State<Shared>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(a.migration(&id).await?))
}

async fn cancel_migration(
    State(a): State<Shared>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(a.cancel_migration(&id).await?))
}

async fn resume_migration(
    State(a): State<Shared>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(a.resume_migration(&id).await?))
}

#[derive(Debug, Deserialize)]
struct EntropyQuery {
    bytes: Option<usize>,
}

/// Bytes from this host's entropy device, for a VM on another host that reaches it by a
/// global reference (GR).
async fn read_entropy(
    State(a): State<Shared>,
    Query(q): Query<EntropyQuery>,
) -> Result<impl IntoResponse, AgentError> {
    let n = q.bytes.unwrap_or(4096);
    if !(4..=65536).contains(&n) {
        return Err(AgentError::BadRequest(format!(
            "bytes must be 4-65536, not {n}"
        )));
    }
    let data = tokio::task::spawn_blocking(move || a.read_entropy(n))
        .await
        .map_err(|e| AgentError::Internal(format!("The entropy reader failed: {e}")))??;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data))
}

/// A VM that moved away from here was deleted where it ran: release what this host keeps
/// for it (exports, forwarders, data).
async fn release_moved(
    State(a): State<Shared>,
    Path(vm): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    let released = a.release_moved(&vm).await?;
    Ok(Json(serde_json::json!({ "released": released })))
}

async fn metrics(State(a): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        a.metrics.render(),
    )
}

async fn host(State(a): State<Shared>) -> impl IntoResponse {
    Json(a.host_info())
}

async fn capabilities(State(a): State<Shared>) -> impl IntoResponse {
    Json(a.capabilities())
}

async fn list_vms(State(a): State<Shared>) -> impl IntoResponse {
    Json(a.list().await)
}

async fn create_vm(State(a): State<Shared>, body: Bytes) -> Result<impl IntoResponse, AgentError> {
    let req: CreateVm = parse(&body)?;
    let info = a.create(&req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn get_vm(
    State(a): State<Shared>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(a.info(&name).await?))
}

async fn delete_vm(
    State(a): State<Shared>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    a.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause_vm(
    State(a): State<Shared>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(a.pause(&name).await?))
}

async fn resume_vm(
    State(a): State<Shared>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(a.resume(&name).await?))
}

#[derive(Debug, Deserialize)]
struct ConsoleQuery {
    /// Return at most this many bytes from the end of the log. Default 1 MiB.
    max_bytes: Option<String>,
}

async fn console(
    State(a): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<impl IntoResponse, AgentError> {
    let max = match q.max_bytes {
        None => 1 << 20,
        Some(text) => text.parse::<u64>().map_err(|_| {
            AgentError::BadRequest(format!(
                "max_bytes must be a whole number of bytes, not {text:?}"
            ))
        })?,
    };
    let bytes = a.console(&name, max).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes))
}

async fn digest(
    State(a): State<Shared>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(a.digest(&name).await?))
}

async fn snapshot_vm(
    State(a): State<Shared>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, AgentError> {
    let req: SnapshotRequest = parse(&body)?;
    Ok(Json(a.snapshot(&name, &req).await?))
}

async fn restore_vm(State(a): State<Shared>, body: Bytes) -> Result<impl IntoResponse, AgentError> {
    let req: RestoreRequest = parse(&body)?;
    let info = a.restore(&req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}
