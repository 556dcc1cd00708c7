//! `godwit-vmm`: one microVM in its own process. Started by the agent (never by hand in normal
//! use), it serves the VM's local API on `RUN_DIR/vmm.sock` and runs until its VM is gone; see
//! `godwit_vmm::process` and `docs/vmm-api.md`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use godwit_vmm::{HostConfig, VmmConfig};

/// Godwit VMM: runs one KVM microVM and serves its local API on a unix socket.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The VM's run directory (socket, pid file, console and logs), DATA_DIR/vms/NAME.
    #[arg(long)]
    run_dir: PathBuf,
    /// The agent's data directory (resource data, snapshots, migration records).
    #[arg(long)]
    data_dir: PathBuf,
    /// Name of this host in the cluster (the agent's name).
    #[arg(long)]
    host: String,
    /// The agent's API URL as peers reach it (for devices other hosts' VMs use and for the
    /// hosts a VM visited).
    #[arg(long)]
    agent_url: Option<String>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Do not ask for transparent huge pages for guest memory.
    #[arg(long)]
    no_huge_pages: bool,
    /// Address incoming migrations and resource links listen on.
    #[arg(long, default_value = "127.0.0.1")]
    migration_ip: std::net::IpAddr,
    /// Do not prefault the memory of an incoming stop-and-copy migration.
    #[arg(long)]
    no_prefault: bool,
    /// Seconds between probes of the VM's dirty rate; 0 = never.
    #[arg(long, default_value_t = 10)]
    dirty_probe_interval_s: u64,
    /// Seconds a migration tolerates silence from the peer agent before it fails.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(3..=3600))]
    migration_peer_timeout_s: u64,
    /// Space the agent leaves this VM's resource data, MiB.
    #[arg(long, default_value_t = 4096)]
    resource_capacity_mib: u64,
    /// A device class this host offers VMs (repeatable).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// The cluster CA certificate (with --cert and --key: migrations are mutual TLS).
    #[arg(long, requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// This host's certificate, issued by the cluster CA for the agent's --name.
    #[arg(long, requires_all = ["ca", "key"])]
    cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long, requires_all = ["ca", "cert"])]
    key: Option<PathBuf>,
    /// Run without the seccomp filter (for debugging only: by default any system call outside
    /// the VMM's allowlist kills it; see docs/security.md).
    #[arg(long)]
    no_seccomp: bool,
    /// Test hook: takes SYSCALL out of the seccomp allowlist (repeatable), so a test can make
    /// this VMM break its filter on purpose.
    #[arg(long = "seccomp-deny", value_name = "SYSCALL", hide = true)]
    seccomp_deny: Vec<String>,
    /// Test hook: injects a fault (KIND@CHANNEL:BYTES, KIND reset, blackhole or corrupt) into
    /// one channel of every migration this VMM sends, so tests can break a migration on purpose.
    #[arg(long, value_name = "FAULT", value_parser = page_transfer::channel::Fault::parse_spec, hide = true)]
    test_migration_fault: Option<(u16, page_transfer::channel::Fault)>,
}

/// Installs the seccomp filter unless `--no-seccomp`, on this thread before any other but
/// qemu-nbd's process thread exists: every thread started afterwards inherits it.
fn confine(args: &Args) -> anyhow::Result<()> {
    // Outside the filter, so qemu-nbd exports are not under it (see `godwit_vmm::seccomp`).
    godwit_nbd::start_process_thread();
    if args.no_seccomp {
        tracing::warn!("seccomp filter off (--no-seccomp): this VMM may make any system call");
        return Ok(());
    }
    let allowed = godwit_vmm::seccomp::install(&args.seccomp_deny)
        .map_err(|e| anyhow::anyhow!(godwit_daemon::chain(&e)))?;
    if args.seccomp_deny.is_empty() {
        tracing::info!(
            syscalls = allowed,
            "seccomp filter on: any other system call kills the VMM"
        );
    } else {
        tracing::warn!(
            syscalls = allowed,
            denied = ?args.seccomp_deny,
            "seccomp filter on, with system calls taken out for a test"
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Its log is a file in the run directory, read by people and by the agent.
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let tls = match (&args.ca, &args.cert, &args.key) {
        (Some(ca), Some(cert), Some(key)) => Some(
            godwit_tls::Credentials::load(ca, cert, key)
                .map_err(|e| anyhow::anyhow!(godwit_daemon::chain(&e)))?,
        ),
        _ => None,
    };
    // What the VMM makes (its API socket, which has no authentication, snapshots, resource
    // data, records) is the agent user's alone.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
    confine(&args)?;
    // Built by hand (not `#[tokio::main]`) so its threads start after the filter is on.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("Cannot start the VMM's runtime")?;
    runtime.block_on(serve(args, tls))
}

async fn serve(args: Args, tls: Option<godwit_tls::Credentials>) -> anyhow::Result<()> {
    let config = VmmConfig {
        run_dir: args.run_dir,
        host: HostConfig {
            name: args.host,
            data_dir: args.data_dir,
            kvm_device: args.kvm_device,
            huge_pages: !args.no_huge_pages,
            migration_ip: args.migration_ip,
            prefault: !args.no_prefault,
            dirty_probe_interval: (args.dirty_probe_interval_s > 0)
                .then(|| Duration::from_secs(args.dirty_probe_interval_s)),
            resource_capacity_bytes: args.resource_capacity_mib.saturating_mul(1 << 20),
            device_classes: args.devices.into_iter().collect(),
            tls,
            test_fault: args.test_migration_fault,
            migration_peer_timeout: Duration::from_secs(args.migration_peer_timeout_s),
        },
        agent_url: args.agent_url,
    };
    let reason = godwit_vmm::run(config, godwit_daemon::shutdown_signal())
        .await
        .map_err(|e| anyhow::anyhow!(godwit_daemon::chain(&e)))
        .context("The VMM failed")?;
    tracing::info!(%reason, "VMM stopped");
    Ok(())
}
