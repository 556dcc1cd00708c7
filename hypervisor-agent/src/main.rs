//! `hypervisor-agent`: the per-host Godwit daemon. Parses and checks its configuration, binds
//! its API socket, serves until SIGTERM/SIGINT, then stops its VMs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hypervisor_agent::manager::{Manager, ManagerConfig};

/// Godwit per-host agent: runs KVM microVMs and serves their HTTP/JSON API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the HTTP API. Port 0 picks a free port (printed on startup).
    #[arg(long, default_value = "127.0.0.1:7070", env = "GODWIT_AGENT_LISTEN")]
    listen: String,
    /// Name of this host in the cluster. Default: the system host name.
    #[arg(long, env = "GODWIT_AGENT_NAME")]
    name: Option<String>,
    /// Directory for console logs and snapshots (created if missing).
    #[arg(
        long,
        default_value = "godwit-agent-data",
        env = "GODWIT_AGENT_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Host memory kept back from VMs, MiB.
    #[arg(long, default_value_t = 1024)]
    reserved_memory_mib: u64,
    /// Do not ask for transparent huge pages for guest memory.
    #[arg(long)]
    no_huge_pages: bool,
    /// Address incoming migrations listen on (each gets a fresh port). Default: the IP of
    /// --listen.
    #[arg(long)]
    migration_ip: Option<std::net::IpAddr>,
    /// Do not prefault the memory of incoming stop-and-copy migrations (by default it is
    /// touched at setup, before the guest pauses, because first touch is slow).
    #[arg(long)]
    no_prefault: bool,
    /// Host label KEY=VALUE (repeatable), e.g. a device class the host offers.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Seconds between probes of each VM's dirty rate (1 s of dirty logging each); 0 = never.
    #[arg(long, default_value_t = 10)]
    dirty_probe_interval_s: u64,
    /// Orchestrator to report to (heartbeats with host and VM state every 2 s), e.g.
    /// http://10.0.0.1:7000.
    #[arg(long, env = "GODWIT_ORCHESTRATOR")]
    orchestrator: Option<String>,
    /// URL the orchestrator reaches this agent at. Default: http://<the address it listens on>.
    #[arg(long)]
    advertise_url: Option<String>,
    /// A device class this host offers VMs (repeatable). `entropy` is served from
    /// /dev/urandom to guests through a port; other classes (`gpu`) are advertised for
    /// placement only.
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Space offered to VM resource data (disks and scratch directories) in the data
    /// directory, MiB.
    #[arg(long, default_value_t = 4096)]
    resource_capacity_mib: u64,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 10)]
    drain_seconds: u64,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("label {text:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("label {text:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
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
    let listen: std::net::SocketAddr = tokio::net::lookup_host(&args.listen)
        .await
        .with_context(|| format!("Cannot resolve --listen {}", args.listen))?
        .next()
        .with_context(|| format!("--listen {} resolves to no address", args.listen))?;
    let config = ManagerConfig {
        migration_ip: args.migration_ip.unwrap_or(listen.ip()),
        prefault: !args.no_prefault,
        labels: args.labels.into_iter().collect(),
        dirty_probe_interval: (args.dirty_probe_interval_s > 0)
            .then(|| Duration::from_secs(args.dirty_probe_interval_s)),
        name: args.name.unwrap_or_else(host_name),
        data_dir: args.data_dir,
        kvm_device: args.kvm_device,
        huge_pages: !args.no_huge_pages,
        reserved_memory_bytes: args.reserved_memory_mib.saturating_mul(1 << 20),
        resource_capacity_bytes: args.resource_capacity_mib.saturating_mul(1 << 20),
        device_classes: args.devices.into_iter().collect(),
    };
    let manager = Arc::new(
        tokio::task::spawn_blocking(move || Manager::new(config))
            .await?
            .context("Cannot start the agent")?,
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("Cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to find the port.
    println!(
        "hypervisor-agent {} listening on http://{addr}",
        manager.config().name
    );
    tracing::info!(%addr, name = %manager.config().name, "agent started");
    manager.set_api_url(
        args.advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}")),
    );
    let report = args
        .orchestrator
        .map(|orchestrator| hypervisor_agent::Report {
            orchestrator: orchestrator.trim_end_matches('/').to_owned(),
            url: args
                .advertise_url
                .unwrap_or_else(|| format!("http://{addr}")),
        });
    hypervisor_agent::run(
        listener,
        manager,
        godwit_daemon::shutdown_signal(),
        Duration::from_secs(args.drain_seconds),
        report,
    )
    .await
    .context("The API server failed")?;
    tracing::info!("agent stopped");
    Ok(())
}
