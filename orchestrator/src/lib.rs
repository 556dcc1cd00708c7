//! Godwit's control plane: it knows every agent and VM, places new VMs, watches CPU load and
//! migrates VMs to relieve hot hosts, choosing the page-transfer mode per VM; it records every
//! decision and migration in an embedded store that survives restarts. Also the `godwit` CLI's
//! helpers for talking to agents and starting local clusters.

#![forbid(unsafe_code)]

pub mod agent_client;
pub mod api;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod drain;
pub mod driver;
pub mod error;
pub mod http;
pub mod local;
pub mod metrics;
pub mod state;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use godwit_api::{HostInfo, VmInfo};

use error::OrchError;
use state::State;

/// Polls every known agent for its host and VM state.
async fn poll_agents(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_millis(state.config.poll_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let agents = state.agents();
        // A hung agent must not hold up the round: each poll gets two intervals (at least 2 s).
        let limit = Duration::from_millis((state.config.poll_interval_ms * 2).max(2000));
        let polls = agents.into_iter().map(|agent| {
            let state = state.clone();
            async move {
                let poll = async {
                    let host = driver::get_from_host::<HostInfo>(
                        &state,
                        &agent.url,
                        &agent.name,
                        "/v1/host",
                    )
                    .await;
                    let vms = driver::get::<Vec<VmInfo>>(&state, &agent.url, "/v1/vms").await;
                    (host, vms)
                };
                match tokio::time::timeout(limit, poll).await {
                    Ok((Ok(host), Ok(vms))) if host.name == agent.name => {
                        state.observe(&agent.url, host, vms)
                    }
                    Ok((Ok(host), _)) if host.name != agent.name => tracing::warn!(
                        host = %agent.name, url = %agent.url, answered = %host.name,
                        "the agent at a host's URL says it is another host; not believed"
                    ),
                    Ok((Err(e @ OrchError::Forbidden(_)), _)) => {
                        tracing::warn!(host = %agent.name, error = %e, "poll refused")
                    }
                    _ => {}
                }
            }
        });
        futures_join_all(polls).await;
        state.metrics.observe_cluster(&state);
    }
}

/// Runs futures concurrently and waits for all (a tiny join_all without the futures crate).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl IntoIterator<Item = F>,
) {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}

async fn balance_loop(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_millis(state.config.balance_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = balancer::run_once(&state).await {
            tracing::warn!(error = %e, "balancer run failed");
        }
    }
}

/// Serves the API until `shutdown`; runs the poller and the balancer meanwhile. Migrations
/// that were running when the orchestrator last stopped are followed again.
pub async fn run(
    listener: godwit_daemon::https::ApiListener,
    access: Arc<godwit_daemon::auth::Access>,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    for m in state.running_migrations() {
        tracing::info!(id = %m.id, vm = %m.vm, "following a migration that was running before a restart");
        tokio::spawn(driver::follow(state.clone(), m.id.clone()));
    }
    let poller = tokio::spawn(poll_agents(state.clone()));
    let balancer = tokio::spawn(balance_loop(state.clone()));
    let result = godwit_daemon::https::serve(
        listener,
        godwit_daemon::auth::protect(api::router(state), access),
        shutdown,
    )
    .await;
    poller.abort();
    balancer.abort();
    result
}
