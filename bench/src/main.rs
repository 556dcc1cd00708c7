//! `godwit-bench`: measurements on real agents and real KVM guests, printed as tables.
//! Benchmarks report; they never assert timings (this machine is noisy: compare ratios
//! measured side by side in one run).
//!
//! `godwit-bench agent`: VM start, snapshot and restore times for small and large guests.
//! `godwit-bench migration`: the page-transfer modes side by side on the same guests.
//! `godwit-bench resources`: what moving a disk (MV) or leaving it behind (GR) costs.
//! `godwit-bench faults`: the fault matrix: migrations broken on purpose, and where each VM
//! ended up.
//! `godwit-bench soak`: a thousand checked migrations of self-verifying guests, every mode.

#![forbid(unsafe_code)]

mod faults;
mod migration;
mod resources;
mod soak;
mod tls;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use godwit_api::{CreateVm, DirtyPattern, GuestSpec, RestoreRequest, SnapshotRequest};
use orchestrator::agent_client::AgentClient;
use orchestrator::local::LocalAgent;

#[derive(Debug, Parser)]
#[command(about = "Godwit benchmarks on real agents and guests")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Live migration between two local agents: every mode on idle, random-filled and
    /// hot/cold-dirtying 1 GiB guests, against raw loopback TCP measured in the same run.
    Migration {
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
        /// Start agents with --no-huge-pages.
        #[arg(long)]
        no_huge_pages: bool,
        /// Bulk channels per migration (default: the agent's choice).
        #[arg(long)]
        channels: Option<u32>,
        /// Start agents with --no-prefault.
        #[arg(long)]
        no_prefault: bool,
        /// Only these scenarios (comma-separated: idle, random, hotcold).
        #[arg(long, value_delimiter = ',', default_value = "idle,random,hotcold")]
        only: Vec<String>,
    },
    /// What a VM's disk costs a migration: no disk, a disk left on the source (GR, NBD) and
    /// a disk that moves (MV), interleaved on the same dirtying guests.
    Resources {
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 512)]
        memory_mib: u64,
        /// Disk size, MiB (the guest writes the first 112; the rest is filled with random data).
        #[arg(long, default_value_t = 512)]
        disk_mib: u64,
        /// Interleaved repetitions (medians are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Modes to compare (comma-separated).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "precopy,stop-and-copy,postcopy"
        )]
        modes: Vec<String>,
        /// Also write every migration's full record (MigrationInfo) to this JSON file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// What mutual TLS costs migrations: a plain and a TLS pair of agents side by side,
    /// the same guests, every mode on both.
    Tls {
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 512)]
        memory_mib: u64,
        /// Repetitions (medians are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Bulk channels per migration (default: the agent's choice).
        #[arg(long)]
        channels: Option<u32>,
    },
    /// Self-verifying guests moved back and forth between two local agents, cycling through
    /// every mode, compression on and off and now and then a 100 MiB/s cap; every migration
    /// is checked (completed, digests equal, the VM on one host only, its guest's verifier at
    /// 0 errors and going on) and the first that fails stops the soak.
    Soak {
        /// Migrations in all (VM k of the run moves at migrations k, k + vms, ...).
        #[arg(long, default_value_t = 1000)]
        migrations: usize,
        /// Guest memory, MiB (the guest writes half of it).
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        /// Guests moved in turn (even ones write compressible pages, odd ones random pages
        /// with a hot set).
        #[arg(long, default_value_t = 2)]
        vms: usize,
        /// Each guest's write rate, MiB/s.
        #[arg(long, default_value_t = 16.0)]
        rate_mib_s: f64,
        /// Also write every migration's record (and the failure, if any) to this JSON file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// The fault matrix: every mode with a reset, a stall (blackhole) or a flipped byte on
    /// the control, urgent and first bulk channel, and with the source or target VMM or agent
    /// killed (-9) while memory moves; checks where the VM ends up (one running copy, its
    /// guest's verifier at 0 errors) and prints a row per case. Exits 1 on a violation.
    Faults {
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        /// Only cases whose name contains one of these (comma-separated: reset, blackhole,
        /// corrupt, control, urgent, bulk, kill, VMM, agent...).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Only these modes (comma-separated; default all four).
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
    },
    /// VM start, snapshot and restore times.
    Agent {
        /// Guest sizes to measure, MiB.
        #[arg(long, value_delimiter = ',', default_value = "64,1024")]
        sizes: Vec<u64>,
        /// Repetitions per size (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Start agents with --no-huge-pages.
        #[arg(long)]
        no_huge_pages: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Bench::Agent {
            sizes,
            runs,
            no_huge_pages,
        } => agent_bench(&sizes, runs, no_huge_pages),
        Bench::Migration {
            memory_mib,
            no_huge_pages,
            no_prefault,
            channels,
            only,
        } => migration::run(memory_mib, no_huge_pages, no_prefault, channels, &only),
        Bench::Tls {
            memory_mib,
            runs,
            channels,
        } => tls::run(memory_mib, runs, channels),
        Bench::Faults {
            memory_mib,
            only,
            modes,
        } => faults::run(memory_mib, &only, &modes),
        Bench::Resources {
            memory_mib,
            disk_mib,
            runs,
            modes,
            json,
        } => resources::run(memory_mib, disk_mib, runs, &modes, json.as_deref()),
        Bench::Soak {
            migrations,
            memory_mib,
            vms,
            rate_mib_s,
            json,
        } => soak::run(&soak::Options {
            migrations,
            memory_mib,
            vms,
            rate_mib_s,
            json: json.as_deref(),
        }),
    };
    if let Err(e) = result {
        eprintln!("godwit-bench: {e:#}");
        std::process::exit(1);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

#[derive(Debug, Default)]
struct Row {
    create_idle: Vec<f64>,
    create_dirty: Vec<f64>,
    first_progress: Vec<f64>,
    fill: Vec<f64>,
    snapshot: Vec<f64>,
    snapshot_write: Vec<f64>,
    file_mib: Vec<f64>,
    restore: Vec<f64>,
    restore_read: Vec<f64>,
    restored_progress: Vec<f64>,
}

fn agent_bench(sizes: &[u64], runs: usize, no_huge_pages: bool) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("godwit-bench-").tempdir()?;
    let mut extra = vec!["--insecure"];
    if no_huge_pages {
        extra.push("--no-huge-pages");
    }
    let agent = LocalAgent::start_with(
        "bench",
        &dir.path().join("agent"),
        &dir.path().join("agent.log"),
        &extra,
    )?;
    let a = AgentClient::new(&agent.url, &godwit_daemon::client::ClientAuth::insecure())?;
    let mut rows = vec![];
    for &mib in sizes {
        let mut row = Row::default();
        for run in 0..runs {
            let name = format!("idle-{mib}-{run}");
            let t = Instant::now();
            a.create_vm(&CreateVm {
                name: name.clone(),
                vcpus: 1,
                memory_mib: mib,
                guest: GuestSpec::Idle,
                paused: false,
                resources: Vec::new(),
            })?;
            row.create_idle.push(ms(t));
            a.delete_vm(&name)?;

            // A dirty guest that fills (nearly) all its memory as fast as it can.
            let name = format!("dirty-{mib}-{run}");
            let ws = mib - 8;
            let t = Instant::now();
            a.create_vm(&CreateVm {
                name: name.clone(),
                vcpus: 1,
                memory_mib: mib,
                guest: GuestSpec::Dirty {
                    working_set_mib: ws,
                    rate_mib_s: 0.0,
                    pattern: DirtyPattern::Uniform,
                    hot_mib: None,
                    hot_percent: None,
                    content: godwit_api::PageContent::Counter,
                    disk_ops_s: None,
                },
                paused: false,
                resources: Vec::new(),
            })?;
            row.create_dirty.push(ms(t));
            while a.vm(&name)?.guest.progress == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            row.first_progress.push(ms(t));
            let target_pages = ws * 256 * 2;
            let t = Instant::now();
            while a.vm(&name)?.guest.progress < target_pages {
                if t.elapsed() > Duration::from_secs(120) {
                    bail!("guest {name} did not write {target_pages} pages in 120 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            row.fill.push(ms(t));
            // Snapshot paths are confined to the agent's data directory.
            let path = format!("snaps/{name}.snap");
            let snap = a.snapshot(
                &name,
                &SnapshotRequest {
                    path: path.clone(),
                    leave_paused: true,
                },
            )?;
            row.snapshot.push(snap.total_ms);
            row.snapshot_write.push(snap.write_ms);
            row.file_mib.push(snap.file_bytes as f64 / (1 << 20) as f64);
            a.delete_vm(&name)?;
            let t = Instant::now();
            let restored = a.restore(&RestoreRequest {
                path: path.clone(),
                name: name.clone(),
                paused: false,
            })?;
            row.restore.push(restored.total_ms);
            row.restore_read.push(restored.read_ms);
            let p0 = restored.vm.guest.progress;
            while a.vm(&name)?.guest.progress <= p0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            row.restored_progress.push(ms(t));
            a.delete_vm(&name)?;
            std::fs::remove_file(dir.path().join("agent").join(&path))?;
        }
        rows.push((mib, row));
    }
    println!(
        "agent benchmark: medians of {runs} runs, huge pages {}",
        if no_huge_pages { "off" } else { "on" }
    );
    println!(
        "| guest | create idle | create dirty | first progress | fill 2x | snapshot (write) | file | restore (read) | restored to progress |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (mib, r) in rows {
        println!(
            "| {mib} MiB | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} ms | {:.0} ms ({:.0}) | {:.0} MiB | {:.0} ms ({:.0}) | {:.0} ms |",
            median(r.create_idle),
            median(r.create_dirty),
            median(r.first_progress),
            median(r.fill),
            median(r.snapshot),
            median(r.snapshot_write),
            median(r.file_mib),
            median(r.restore),
            median(r.restore_read),
            median(r.restored_progress),
        );
    }
    agent.stop()?;
    Ok(())
}
