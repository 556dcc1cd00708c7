//! `orchestrator`: Godwit's control-plane daemon. Reads its config, opens its store, binds its
//! API, and serves until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use godwit_daemon::auth::{Access, Rules};
use godwit_daemon::client::ClientAuth;
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
    /// The cluster CA certificate (`godwit ca init`). With --cert and --key the API is HTTPS
    /// and takes client certificates of this CA (hosts, admins, viewers) or the config's
    /// bearer tokens; the orchestrator calls agents with its certificate. Required unless
    /// --insecure.
    #[arg(long, env = "GODWIT_ORCHESTRATOR_CA", requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// The orchestrator's host certificate (`godwit ca issue --host NAME`).
    #[arg(long, env = "GODWIT_ORCHESTRATOR_CERT", requires_all = ["ca", "key"])]
    cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long, env = "GODWIT_ORCHESTRATOR_KEY", requires_all = ["ca", "cert"])]
    key: Option<PathBuf>,
    /// Serve plain HTTP without authentication and call agents over plain HTTP: for trying
    /// Godwit on one machine only, refused unless --listen is a loopback address.
    #[arg(long, conflicts_with_all = ["ca", "cert", "key"])]
    insecure: bool,
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
    let listen: std::net::SocketAddr = tokio::net::lookup_host(&args.listen)
        .await
        .with_context(|| format!("Cannot resolve --listen {}", args.listen))?
        .next()
        .with_context(|| format!("--listen {} resolves to no address", args.listen))?;
    let tls_err = |e: godwit_tls::TlsError| anyhow::anyhow!(godwit_daemon::chain(&e));
    let (access, server_tls, client) = match (&args.ca, &args.cert, &args.key) {
        (Some(ca), Some(cert), Some(key)) => {
            let creds = godwit_tls::Credentials::load(ca, cert, key).map_err(tls_err)?;
            creds.check_issued().map_err(tls_err)?;
            if creds.identity().role != godwit_tls::Role::Host {
                anyhow::bail!(
                    "{} is the certificate of {}; the orchestrator needs a host certificate \
                     (godwit ca issue --host NAME)",
                    cert.display(),
                    creds.identity()
                );
            }
            (
                Access::tls(Rules::Orchestrator, config.tokens()?),
                Some(creds.api_server_config().map_err(tls_err)?),
                ClientAuth::certificate(&creds).map_err(tls_err)?,
            )
        }
        _ if args.insecure => {
            godwit_daemon::auth::check_insecure(&listen).map_err(anyhow::Error::msg)?;
            tracing::warn!("--insecure: the API is plain HTTP without authentication");
            (
                Access::insecure(Rules::Orchestrator),
                None,
                ClientAuth::insecure(),
            )
        }
        _ => anyhow::bail!(
            "The orchestrator needs a certificate: give --ca, --cert and --key (made with \
             `godwit ca init` and `godwit ca issue --host orchestrator`), or --insecure to serve \
             plain HTTP on a loopback address"
        ),
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("Cannot create {}", args.data_dir.display()))?;
    let store = Store::open(&args.data_dir.join("orchestrator.redb"))?;
    let state = Arc::new(State::new(config, store, &client)?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("Cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let listener = godwit_daemon::https::ApiListener::new(listener, server_tls);
    println!("orchestrator listening on {}://{addr}", listener.scheme());
    tracing::info!(%addr, "orchestrator started");
    orchestrator::run(listener, access, state, godwit_daemon::shutdown_signal())
        .await
        .context("The API server failed")?;
    tracing::info!("orchestrator stopped");
    Ok(())
}
