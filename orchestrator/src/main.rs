//! `orchestrator`: Godwit's control-plane daemon. Reads its config, opens its store, binds its
//! API, and serves until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use orchestrator::config::Config;
use orchestrator::state::State;
use orchestrator::store::Store;

/// Godwit orchestrator: placement and load balancing by live migration.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the REST API (port 0 picks a free port, printed on startup).
    #[arg(
        long,
        default_value = "127.0.0.1:7000",
        env = "GODWIT_ORCHESTRATOR_LISTEN"
    )]
    listen: String,
    /// Directory of the orchestrator's database (created if missing).
    #[arg(
        long,
        default_value = "godwit-orchestrator-data",
        env = "GODWIT_ORCHESTRATOR_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// TOML config file; every key has a default (docs/orchestrator.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Balancer mode: off, recommend or automatic (overrides the config file; a mode set later
    /// through the API is remembered and wins over both).
    #[arg(long)]
    balancer: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.check()?;
    if let Some(mode) = &args.balancer {
        config.balancer = serde_json::from_value(serde_json::Value::String(mode.clone()))
            .with_context(|| {
                format!("--balancer must be off, recommend or automatic, not {mode:?}")
            })?;
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("Cannot create {}", args.data_dir.display()))?;
    let store = Store::open(&args.data_dir.join("orchestrator.redb"))?;
    let state = Arc::new(State::new(config, store)?);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("Cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("orchestrator listening on http://{addr}");
    tracing::info!(%addr, "orchestrator started");
    orchestrator::run(listener, state, godwit_daemon::shutdown_signal())
        .await
        .context("The API server failed")?;
    tracing::info!("orchestrator stopped");
    Ok(())
}
