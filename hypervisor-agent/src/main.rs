//! `hypervisor-agent`: the per-host Godwit daemon. Parses and checks its configuration, adopts
//! the VMM processes already running on its data directory, binds its API socket and serves
//! until SIGTERM/SIGINT. Its VMs run on after it stops unless `--stop-vms-on-exit`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hypervisor_agent::agent::{Agent, AgentConfig};
use hypervisor_agent::backend::microvm::{MicrovmBackend, MicrovmConfig};

/// Godwit per-host agent: runs KVM microVMs (one VMM process each) and serves their HTTP/JSON
/// API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the HTTP API. Port 0 picks a free port (printed on startup).
    #[arg(long, default_value = "127.0.0.1:7070", env = "GODWIT_AGENT_LISTEN")]
    listen: String,
    /// Name of this host in the cluster. Default: the system host name.
    #[arg(long, env = "GODWIT_AGENT_NAME")]
    name: Option<String>,
    /// Directory for VM run directories, resource data, snapshots and migration records
    /// (created if missing). A new agent on the same directory adopts the VMs running there.
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
    /// Seconds a migration tolerates silence from the other agent (no keepalive on the control
    /// connection, a data connection stalled mid-phase, a write that makes no progress) before
    /// it fails; applies to the migrations this host sends and receives. At least 3.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(3..=3600))]
    migration_peer_timeout_s: u64,
    /// Orchestrator to report to (heartbeats with host and VM state every 2 s), e.g.
    /// https://10.0.0.1:7000 (http:// for an --insecure orchestrator).
    #[arg(long, env = "GODWIT_ORCHESTRATOR")]
    orchestrator: Option<String>,
    /// URL the orchestrator reaches this agent at. Default: https://<the address it listens on>
    /// (http:// with --insecure).
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
    /// Stop every VM when the agent exits (by default they run on and the next agent started
    /// on the same data directory adopts them).
    #[arg(long)]
    stop_vms_on_exit: bool,
    /// The `godwit-vmm` executable. Default: next to this agent's executable.
    #[arg(long, env = "GODWIT_VMM_BINARY")]
    vmm_binary: Option<PathBuf>,
    /// The cluster CA certificate (`godwit ca init`). With --cert and --key: the API is HTTPS
    /// and takes client certificates of this CA (or tokens, --tokens), heartbeats and calls
    /// to other agents present this host's certificate, and migrations between VMMs are
    /// mutual TLS, a target taking channels only from the host the migration was announced
    /// from. Required unless --insecure.
    #[arg(long, env = "GODWIT_CA", requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// This host's certificate (`godwit ca issue --host NAME`, NAME being --name).
    #[arg(long, env = "GODWIT_CERT", requires_all = ["ca", "key"])]
    cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long, env = "GODWIT_KEY", requires_all = ["ca", "cert"])]
    key: Option<PathBuf>,
    /// Serve the API as plain HTTP without authentication and migrate over plain TCP: for
    /// trying Godwit on one machine only, refused unless --listen (and --migration-ip) is a
    /// loopback address. Without it the agent needs --ca, --cert and --key.
    #[arg(long, conflicts_with_all = ["ca", "cert", "key", "tokens"])]
    insecure: bool,
    /// A TOML file of bearer tokens operators may present instead of a client certificate:
    /// `[[tokens]]` entries with `name`, `role` (admin or viewer) and `sha256` (the token's
    /// SHA-256; `godwit token new` makes one). Read at start.
    #[arg(long, env = "GODWIT_AGENT_TOKENS")]
    tokens: Option<PathBuf>,
    /// Start VMMs without their seccomp filter (for debugging only: by default a VMM that
    /// makes a system call outside its allowlist is killed and its VM reported crashed).
    #[arg(long)]
    no_seccomp: bool,
    /// Test hook: system calls (comma-separated) taken out of every VMM's seccomp filter, so
    /// a test can make a VMM break it.
    #[arg(
        long,
        env = "GODWIT_VMM_SECCOMP_DENY",
        value_delimiter = ',',
        hide = true
    )]
    vmm_seccomp_deny: Vec<String>,
    /// Test hook: a fault (KIND@CHANNEL:BYTES, KIND reset, blackhole or corrupt) injected into
    /// one channel of every migration this agent's VMMs send.
    #[arg(long, env = "GODWIT_TEST_MIGRATION_FAULT", hide = true)]
    test_migration_fault: Option<String>,
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
    let name = args.name.clone().unwrap_or_else(host_name);
    let vmm_binary = match args.vmm_binary.clone() {
        Some(p) => p,
        None => std::env::current_exe()
            .context("Cannot find the agent's executable")?
            .with_file_name("godwit-vmm"),
    };
    if !vmm_binary.exists() {
        anyhow::bail!(
            "The VMM executable {} is missing: build it (cargo build --release --bins) or pass --vmm-binary",
            vmm_binary.display()
        );
    }
    let tls = match (&args.ca, &args.cert, &args.key) {
        (Some(ca), Some(cert), Some(key)) => {
            let files = godwit_tls::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }
            .absolute()
            .map_err(|e| anyhow::anyhow!(godwit_daemon::chain(&e)))?;
            // Checked here so a wrong certificate stops the agent, not its first migration.
            let creds = files
                .load_host(&name)
                .map_err(|e| anyhow::anyhow!(godwit_daemon::chain(&e)))?;
            Some((files, creds))
        }
        _ => None,
    };
    let migration_ip = args.migration_ip.unwrap_or(listen.ip());
    if tls.is_none() {
        if !args.insecure {
            anyhow::bail!(
                "The agent needs this host's certificate: give --ca, --cert and --key (made with \
                 `godwit ca init` and `godwit ca issue --host {name}`), or --insecure to serve \
                 plain HTTP on a loopback address"
            );
        }
        godwit_daemon::auth::check_insecure(&listen).map_err(anyhow::Error::msg)?;
        godwit_daemon::auth::check_insecure(&std::net::SocketAddr::new(migration_ip, 0))
            .map_err(|_| anyhow::anyhow!("--insecure migrates over plain TCP and is refused with --migration-ip {migration_ip}: only a loopback address may be insecure"))?;
        tracing::warn!(
            "--insecure: the API is plain HTTP without authentication and migrations are plain TCP"
        );
    }
    let (access, server_tls, client_auth) = match &tls {
        Some((_, creds)) => {
            let tokens = match &args.tokens {
                Some(path) => {
                    godwit_daemon::auth::Tokens::load(path).map_err(anyhow::Error::msg)?
                }
                None => godwit_daemon::auth::Tokens::default(),
            };
            let err = |e: godwit_tls::TlsError| anyhow::anyhow!(godwit_daemon::chain(&e));
            (
                godwit_daemon::auth::Access::tls(godwit_daemon::auth::Rules::Agent, tokens),
                Some(creds.api_server_config().map_err(err)?),
                godwit_daemon::client::ClientAuth::certificate(creds).map_err(err)?,
            )
        }
        None => (
            godwit_daemon::auth::Access::insecure(godwit_daemon::auth::Rules::Agent),
            None,
            godwit_daemon::client::ClientAuth::insecure(),
        ),
    };
    let data_dir = args.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("Cannot create data directory {}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("Cannot resolve data directory {}", data_dir.display()))?;
    if let Some(spec) = &args.test_migration_fault {
        page_transfer::channel::Fault::parse_spec(spec).map_err(anyhow::Error::msg)?;
        tracing::warn!(fault = %spec, "test hook: every migration sent from here is broken on purpose");
    }
    let backend = Arc::new(MicrovmBackend::new(MicrovmConfig {
        vmm_binary,
        data_dir: data_dir.clone(),
        host: name.clone(),
        kvm_device: args.kvm_device.clone(),
        huge_pages: !args.no_huge_pages,
        migration_ip,
        prefault: !args.no_prefault,
        dirty_probe_interval_s: args.dirty_probe_interval_s,
        migration_peer_timeout_s: args.migration_peer_timeout_s,
        devices: args.devices.clone(),
        tls: tls.map(|(files, _)| files),
        seccomp: !args.no_seccomp,
        seccomp_deny: args.vmm_seccomp_deny.clone(),
        test_migration_fault: args.test_migration_fault.clone(),
    }));
    let config = AgentConfig {
        labels: args.labels.into_iter().collect(),
        name,
        data_dir,
        kvm_device: args.kvm_device,
        reserved_memory_bytes: args.reserved_memory_mib.saturating_mul(1 << 20),
        resource_capacity_bytes: args.resource_capacity_mib.saturating_mul(1 << 20),
        device_classes: args.devices.into_iter().collect(),
    };
    let agent = Arc::new(Agent::new(config, backend.clone()).context("Cannot start the agent")?);
    let t = std::time::Instant::now();
    let adopted = agent.adopt().await;
    if adopted > 0 {
        tracing::info!(
            vms = adopted,
            ms = t.elapsed().as_secs_f64() * 1000.0,
            "adopted the VMs found running"
        );
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("Cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let listener = godwit_daemon::https::ApiListener::new(listener, server_tls);
    let scheme = listener.scheme();
    // Tests and scripts read this line to find the port.
    println!(
        "hypervisor-agent {} listening on {scheme}://{addr}",
        agent.config().name
    );
    tracing::info!(%addr, name = %agent.config().name, "agent started");
    let url = args
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{addr}"));
    backend.set_agent_url(url.clone());
    agent.announce_url(&url).await;
    let report = args
        .orchestrator
        .map(|orchestrator| hypervisor_agent::Report {
            orchestrator: orchestrator.trim_end_matches('/').to_owned(),
            url: url.clone(),
            auth: client_auth,
        });
    let on_exit = if args.stop_vms_on_exit {
        hypervisor_agent::OnExit::StopVms
    } else {
        hypervisor_agent::OnExit::KeepVms
    };
    hypervisor_agent::run(
        listener,
        access,
        agent,
        godwit_daemon::shutdown_signal(),
        Duration::from_secs(args.drain_seconds),
        report,
        on_exit,
    )
    .await
    .context("The API server failed")?;
    tracing::info!("agent stopped");
    Ok(())
}
