//! The VMM's local HTTP/JSON API, served on the unix socket in its run directory for its
//! agent (documented in `docs/vmm-api.md`). The VM routes are the agent's own (the agent passes
//! them through), plus `/v1/vmm` for the process itself. Handlers parse and validate, then run
//! the VMM's blocking work on tokio's blocking pool; this is where a [`VmmError`] becomes a
//! status and a sentence ([`AgentError`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use godwit_api::{CreateVm, IncomingMigration, MigrateRequest, RestoreRequest, SnapshotRequest};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{AgentError, VmmError};
use crate::migration;
use crate::vmm::Vmm;

type Shared = Arc<Vmm>;

/// The API; `stop` is notified when the agent asks the process to stop its VM and exit.
pub fn router(vmm: Shared, stop: Arc<tokio::sync::Notify>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/vmm", get(status))
        .route(
            "/v1/vmm/stop",
            post(move || async move {
                stop.notify_one();
                StatusCode::ACCEPTED
            }),
        )
        .route("/v1/vmm/agent", axum::routing::put(set_agent))
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
        .route("/v1/resources/{vm}", axum::routing::delete(release_moved))
        .fallback(|| async {
            AgentError::NotFound("No such API endpoint; see docs/agent-api.md".into())
        })
        .method_not_allowed_fallback(|| async {
            AgentError::MethodNotAllowed(
                "This endpoint does not accept that method; see docs/agent-api.md".into(),
            )
        })
        .with_state(vmm)
}

/// Parses a JSON body into `T`, answering a malformed one with a sentence.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, AgentError> {
    godwit_daemon::parse_body(body)
}

/// Runs blocking VMM work off the async workers.
async fn blocking<T, F>(m: &Shared, f: F) -> Result<T, AgentError>
where
    T: Send + 'static,
    F: FnOnce(&Arc<Vmm>) -> Result<T, VmmError> + Send + 'static,
{
    let m = m.clone();
    Ok(tokio::task::spawn_blocking(move || f(&m))
        .await
        .map_err(VmmError::Worker)??)
}

async fn migrate_vm(
    State(m): State<Shared>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, AgentError> {
    let req: MigrateRequest = parse(&body)?;
    let started = blocking(&m, move |m| migration::migrate(m, &name, &req)).await?;
    Ok((StatusCode::ACCEPTED, Json(started)))
}

async fn incoming_migration(
    State(m): State<Shared>,
    body: Bytes,
) -> Result<impl IntoResponse, AgentError> {
    let req: IncomingMigration = parse(&body)?;
    Ok(Json(
        blocking(&m, move |m| migration::incoming(m, &req)).await?,
    ))
}

async fn list_migrations(State(m): State<Shared>) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(blocking(&m, |m| Ok(m.migrations.list())).await?))
}

async fn get_migration(
    State(m): State<Shared>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(blocking(&m, move |m| m.migrations.info(&id)).await?))
}

async fn cancel_migration(
    State(m): State<Shared>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(blocking(&m, move |m| m.migrations.cancel(&id)).await?))
}

async fn resume_migration(
    State(m): State<Shared>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(blocking(&m, move |m| m.migrations.resume(&id)).await?))
}

/// A VM that moved away from here was deleted where it ran: release what this host keeps
/// for it (exports, forwarders, data).
async fn release_moved(
    State(m): State<Shared>,
    Path(vm): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    let released = blocking(&m, move |m| m.release_moved(&vm)).await?;
    Ok(Json(serde_json::json!({ "released": released })))
}

/// The agent's API moved (it restarted elsewhere): devices and records name the new URL.
async fn set_agent(State(m): State<Shared>, body: Bytes) -> Result<impl IntoResponse, AgentError> {
    let req: godwit_api::VmmAgent = parse(&body)?;
    if !req.url.starts_with("http://") && !req.url.starts_with("https://") {
        return Err(AgentError::BadRequest(format!(
            "url must be http://HOST:PORT, not {:?}",
            req.url
        )));
    }
    m.set_api_url(req.url);
    Ok(StatusCode::NO_CONTENT)
}

async fn status(State(m): State<Shared>) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(blocking(&m, |m| Ok(m.status())).await?))
}

async fn list_vms(State(m): State<Shared>) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(blocking(&m, |m| Ok(m.list())).await?))
}

async fn create_vm(State(m): State<Shared>, body: Bytes) -> Result<impl IntoResponse, AgentError> {
    let req: CreateVm = parse(&body)?;
    let info = blocking(&m, move |m| m.create(&req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn get_vm(
    State(m): State<Shared>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(blocking(&m, move |m| m.vm(&name)?.info()).await?))
}

async fn delete_vm(
    State(m): State<Shared>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    blocking(&m, move |m| m.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause_vm(
    State(m): State<Shared>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(blocking(&m, move |m| m.vm(&name)?.pause()).await?))
}

async fn resume_vm(
    State(m): State<Shared>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(blocking(&m, move |m| m.vm(&name)?.resume()).await?))
}

#[derive(Debug, Deserialize)]
struct ConsoleQuery {
    /// Return at most this many bytes from the end of the log. Default 1 MiB.
    max_bytes: Option<String>,
}

async fn console(
    State(m): State<Shared>,
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
    let bytes = blocking(&m, move |m| m.vm(&name)?.console(max)).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes))
}

async fn digest(
    State(m): State<Shared>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(blocking(&m, move |m| m.vm(&name)?.digest()).await?))
}

async fn snapshot_vm(
    State(m): State<Shared>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, AgentError> {
    let req: SnapshotRequest = parse(&body)?;
    Ok(Json(
        blocking(&m, move |m| {
            let path = m.resolve(&req.path)?;
            m.vm(&name)?.snapshot(&path, req.leave_paused)
        })
        .await?,
    ))
}

async fn restore_vm(State(m): State<Shared>, body: Bytes) -> Result<impl IntoResponse, AgentError> {
    let req: RestoreRequest = parse(&body)?;
    let info = blocking(&m, move |m| m.restore(&req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}
