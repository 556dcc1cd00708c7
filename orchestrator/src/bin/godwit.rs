//! `godwit`: the operator's command line.
//!
//! For now it has `demo`, which starts two local agents, runs a self-verifying guest on one,
//! moves it to the other through a snapshot and shows that the guest carried on with intact
//! memory. The cluster commands (hosts, vm, migrate, plan) arrive with the orchestrator.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use godwit_api::{CreateVm, DirtyPattern, GuestSpec, RestoreRequest, SnapshotRequest, VmInfo};
use orchestrator::agent_client::AgentClient;
use orchestrator::local::LocalAgent;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(version, about = "Godwit: live migration of VMs across hosts")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start two local agents, run a self-verifying guest, move it between them through a
    /// snapshot, and show that it kept running with intact memory.
    Demo {
        /// Seconds to watch the guest on each host.
        #[arg(long, default_value_t = 3)]
        watch_seconds: u64,
        /// Guest memory of the demo VM, MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// Print the summary as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo {
            watch_seconds,
            memory_mib,
            json,
        } => demo(watch_seconds, memory_mib, json),
    };
    if let Err(e) = result {
        eprintln!("godwit: {e:#}");
        std::process::exit(1);
    }
}

fn watch(
    client: &AgentClient,
    host: &str,
    name: &str,
    seconds: u64,
    quiet: bool,
) -> Result<VmInfo> {
    let start = client.vm(name)?;
    let t0 = Instant::now();
    let mut last = start.clone();
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        let now = client.vm(name)?;
        if !quiet {
            let pages = now.guest.progress.saturating_sub(last.guest.progress);
            println!(
                "  {host:<7} {name:<7} {:<8} progress {:>10} pages (+{:>6.1} MiB/s)  verified {:>10}  verify errors {}  cpu {:.2}s",
                format!("{:?}", now.state).to_lowercase(),
                now.guest.progress,
                pages as f64 * 4096.0 / (1 << 20) as f64,
                now.guest.verified_pages,
                now.guest.verify_errors,
                now.cpu_seconds
            );
        }
        last = now;
    }
    if last.guest.progress <= start.guest.progress {
        bail!("the guest on {host} made no progress in {seconds} s");
    }
    Ok(last)
}

fn demo(watch_seconds: u64, memory_mib: u64, as_json: bool) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("godwit-demo-").tempdir()?;
    let quiet = as_json;
    let say = |s: &str| {
        if !quiet {
            println!("{s}");
        }
    };
    say("Starting two agents (host-a, host-b) on loopback...");
    let a_dir = dir.path().join("host-a");
    let b_dir = dir.path().join("host-b");
    let agent_a = LocalAgent::start("host-a", &a_dir, &dir.path().join("host-a.log"))?;
    let agent_b = LocalAgent::start("host-b", &b_dir, &dir.path().join("host-b.log"))?;
    let a = AgentClient::new(&agent_a.url)?;
    let b = AgentClient::new(&agent_b.url)?;
    let host = a.host()?;
    if !host.kvm_available {
        bail!(
            "KVM is not usable on this machine: {}",
            host.kvm_error.unwrap_or_default()
        );
    }
    say(&format!(
        "  host-a at {}, host-b at {} ({} cores, {} MiB)",
        agent_a.url, agent_b.url, host.cores, host.memory_total_mib
    ));

    let spec = CreateVm {
        name: "demo".into(),
        vcpus: 2,
        memory_mib,
        guest: GuestSpec::Dirty {
            working_set_mib: (memory_mib / 4).max(1),
            rate_mib_s: 40.0,
            pattern: DirtyPattern::Hotcold,
            hot_mib: None,
            hot_percent: None,
            content: godwit_api::PageContent::Counter,
        },
        paused: false,
    };
    let t = Instant::now();
    a.create_vm(&spec).context("Cannot create the demo VM")?;
    let create_ms = t.elapsed().as_secs_f64() * 1000.0;
    say(&format!(
        "Created VM 'demo' on host-a in {create_ms:.0} ms: 2 vCPUs, {memory_mib} MiB, guest 'dirty' \
         writing 40 MiB/s over {} MiB (hot/cold) and verifying every page it wrote.",
        (memory_mib / 4).max(1)
    ));
    let before = watch(&a, "host-a", "demo", watch_seconds, quiet)?;

    say("Snapshotting 'demo' on host-a (pause, save vCPU + device state, write memory)...");
    let snap_path = dir.path().join("demo.snap");
    let snap = a.snapshot(
        "demo",
        &SnapshotRequest {
            path: snap_path.display().to_string(),
            leave_paused: true,
        },
    )?;
    say(&format!(
        "  {:.1} MiB file ({} pages stored, {} zero pages elided) in {:.0} ms; digest {}",
        snap.file_bytes as f64 / (1 << 20) as f64,
        snap.pages_stored,
        snap.zero_pages,
        snap.total_ms,
        &snap.digest[..23]
    ));
    say("Restoring it on host-b as 'demo' (paused), comparing memory digests...");
    let restored = b.restore(&RestoreRequest {
        path: snap_path.display().to_string(),
        name: "demo".into(),
        paused: true,
    })?;
    let target_digest = b.digest("demo")?;
    let digests_match = target_digest.digest == snap.digest;
    say(&format!(
        "  restored in {:.0} ms; digest on host-b {} the snapshot's",
        restored.total_ms,
        if digests_match {
            "equals"
        } else {
            "DIFFERS FROM"
        }
    ));
    a.delete_vm("demo")?;
    b.resume("demo")?;
    say("Deleted it on host-a and resumed it on host-b:");
    let after = watch(&b, "host-b", "demo", watch_seconds, quiet)?;
    let left_on_a = a.vms()?.len();

    let ok = digests_match
        && after.guest.verify_errors == 0
        && after.guest.progress > before.guest.progress
        && left_on_a == 0;
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "ok": ok,
                "create_ms": create_ms,
                "snapshot": snap,
                "restore_ms": restored.total_ms,
                "digests_match": digests_match,
                "progress_before": before.guest.progress,
                "progress_after": after.guest.progress,
                "verify_errors": after.guest.verify_errors,
            }))?
        );
    } else {
        println!(
            "Result: the guest went on from {} to {} pages written on host-b, {} verify errors, \
             memory identical at the move: {}.",
            before.guest.progress,
            after.guest.progress,
            after.guest.verify_errors,
            if digests_match { "yes" } else { "NO" }
        );
    }
    agent_a.stop()?;
    agent_b.stop()?;
    if !ok {
        bail!("the demo found a problem (see above)");
    }
    Ok(())
}
