//! Godwit's per-host agent. It supervises one VMM process per VM (`godwit-vmm`) through a
//! backend seam, keeps the host's books (names, memory, resource space, migration records),
//! samples host load, serves an HTTP/JSON API with Prometheus metrics, and reports to an
//! orchestrator. VMs keep running while the agent stops, restarts or is upgraded: on start it
//! adopts the VMMs it finds. See `docs/architecture.md`.

#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod backend;
pub mod error;
pub mod metrics;
pub mod migrations;
pub mod registry;
pub mod sampler;
pub mod vmm_client;

use std::sync::Arc;
use std::time::Duration;

use agent::Agent;

/// How often the agent samples its VMs and the host.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Where and as what the agent reports itself to an orchestrator.
#[derive(Debug, Clone)]
pub struct Report {
    /// The orchestrator's base URL.
    pub orchestrator: String,
    /// This agent's API URL as the orchestrator should use it.
    pub url: String,
    /// How heartbeats reach the orchestrator (this host's certificate, or plain HTTP).
    pub auth: godwit_daemon::client::ClientAuth,
}

/// How often the agent sends a heartbeat to its orchestrator.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

async fn heartbeats(agent: Arc<Agent>, report: Report) {
    let client = match report.auth.client(Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the heartbeat client; no heartbeats");
            return;
        }
    };
    let url = format!("{}/v1/agents/heartbeat", report.orchestrator);
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut failing = false;
    loop {
        tick.tick().await;
        let beat = godwit_api::AgentHeartbeat {
            url: report.url.clone(),
            host: agent.host_info(),
            vms: agent.list_cached(),
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

/// What the agent does with its VMs when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// Leave them running (the default): the next agent on this data directory adopts them.
    KeepVms,
    /// Stop every VM (`--stop-vms-on-exit`).
    StopVms,
}

/// Serves the API on `listener` behind `access` until `shutdown` completes.
///
/// In-flight requests get `drain` to finish after the shutdown signal. With `report`, the
/// agent sends heartbeats to an orchestrator. VMs keep running unless `on_exit` says to stop
/// them.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    listener: godwit_daemon::https::ApiListener,
    access: Arc<godwit_daemon::auth::Access>,
    agent: Arc<Agent>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
    report: Option<Report>,
    on_exit: OnExit,
) -> std::io::Result<()> {
    let reporter = report.map(|r| tokio::spawn(heartbeats(agent.clone(), r)));
    let sampler_agent = agent.clone();
    let sampler = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            sampler_agent.sample().await;
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = godwit_daemon::https::serve(
        listener,
        godwit_daemon::auth::protect(api::router(agent.clone()), access),
        async move {
            shutdown.await;
            let _ = stop_tx.send(());
        },
    );
    let server = tokio::spawn(server);
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
    agent.metrics.up.set(0.0);
    match on_exit {
        OnExit::KeepVms => {
            let n = agent.registry.slots().len();
            tracing::info!(
                vms = n,
                "agent stopped; its VMs run on and the next agent adopts them"
            );
        }
        OnExit::StopVms => {
            agent.stop_all().await;
            tracing::info!("all VMs stopped");
        }
    }
    Ok(())
}
