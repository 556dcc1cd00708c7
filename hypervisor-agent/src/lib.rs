//! Godwit's per-host agent: a KVM microVM monitor running built-in guest workloads, with an
//! HTTP/JSON API and Prometheus metrics. See `docs/architecture.md` for where it fits.

pub mod api;
pub mod error;
pub mod guest;
pub mod host;
pub mod manager;
pub mod metrics;
pub mod microvm;
pub mod migration;
pub mod resources;
pub mod sealed;
pub mod snapshot;

use std::time::Duration;

/// How often the agent samples VM and host CPU use.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Where and as what the agent reports itself to an orchestrator.
#[derive(Debug, Clone)]
pub struct Report {
    /// The orchestrator's base URL.
    pub orchestrator: String,
    /// This agent's API URL as the orchestrator should use it.
    pub url: String,
}

/// How often the agent sends a heartbeat to its orchestrator.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

async fn heartbeats(manager: std::sync::Arc<manager::Manager>, report: Report) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    let url = format!("{}/v1/agents/heartbeat", report.orchestrator);
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut failing = false;
    loop {
        tick.tick().await;
        let m = manager.clone();
        let Ok(beat) = tokio::task::spawn_blocking(move || godwit_api::AgentHeartbeat {
            url: String::new(),
            host: m.host_info(),
            vms: m.list(),
        })
        .await
        else {
            continue;
        };
        let beat = godwit_api::AgentHeartbeat {
            url: report.url.clone(),
            ..beat
        };
        match client.post(&url).json(&beat).send().await {
            Ok(r) if r.status().is_success() => {
                if failing {
                    tracing::info!(orchestrator = %report.orchestrator, "heartbeats accepted again");
                }
                failing = false;
            }
            result => {
                if !failing {
                    let why = match result {
                        Ok(r) => format!("HTTP {}", r.status()),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(orchestrator = %report.orchestrator, %why, "heartbeat failed; retrying every 2 s");
                }
                failing = true;
            }
        }
    }
}

/// Serves the API on `listener` until `shutdown` completes, then stops every VM.
///
/// In-flight requests get `drain` to finish after the shutdown signal. With `report`, the
/// agent sends heartbeats to an orchestrator.
pub async fn run(
    listener: tokio::net::TcpListener,
    manager: std::sync::Arc<manager::Manager>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
    report: Option<Report>,
) -> std::io::Result<()> {
    let reporter = report.map(|r| tokio::spawn(heartbeats(manager.clone(), r)));
    let sampler_manager = manager.clone();
    let sampler = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let m = sampler_manager.clone();
            let _ = tokio::task::spawn_blocking(move || m.sample()).await;
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server =
        axum::serve(listener, api::router(manager.clone())).with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(());
        });
    let server = tokio::spawn(async move { server.await });
    let mut server = std::pin::pin!(server);
    tokio::select! {
        result = &mut server => {
            result.map_err(std::io::Error::other)??;
        }
        _ = stop_rx => {
            tracing::info!("shutting down: draining requests");
            if tokio::time::timeout(drain, &mut server).await.is_err() {
                tracing::warn!(?drain, "requests still running after the drain timeout");
            }
        }
    }
    sampler.abort();
    if let Some(r) = reporter {
        r.abort();
    }
    manager.metrics.up.set(0.0);
    let m = manager.clone();
    let _ = tokio::task::spawn_blocking(move || m.shutdown()).await;
    Ok(())
}
