//! `godwit`: the operator's command line for a Godwit cluster. Talks to the orchestrator
//! (`--server` or `GODWIT_SERVER`); `up` and `demo` start a local cluster first.
//! Tables for people, `--json` for scripts; an error is one line and a non-zero exit.

// Beside this file, not in src/bin/, where Cargo would take it for a binary of its own.
#[path = "godwit/ca.rs"]
mod ca;
#[path = "godwit/hosts.rs"]
mod hosts;
#[path = "godwit/profile.rs"]
mod profile;
#[path = "godwit/resources.rs"]
mod resources;
#[path = "godwit/token.rs"]
mod token;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use godwit_api::{
    BalancerMode, ClusterCreateVm, ClusterMigrate, ClusterMigration, DirtyPattern, GuestSpec,
    MigrationMode, MigrationPhase, MigrationStatus, PageContent, ResourceSpec,
};
use orchestrator::cli::Client;
use orchestrator::local::{LocalAgent, LocalCa, LocalOrchestrator, LOCAL_ADMIN};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Godwit: live migration and load balancing of VMs across hosts"
)]
struct Cli {
    /// The orchestrator's URL [default: `server` in the config file, else
    /// https://127.0.0.1:7000].
    #[arg(long, global = true, env = "GODWIT_SERVER")]
    server: Option<String>,
    /// The CLI's config file (server, ca, cert, key, token) [default:
    /// ~/.config/godwit/config.toml, if present].
    #[arg(long, global = true, env = "GODWIT_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// The cluster CA certificate, to check the orchestrator with.
    #[arg(long, global = true, env = "GODWIT_CA")]
    ca: Option<std::path::PathBuf>,
    /// Your operator certificate (`godwit ca issue --user NAME --role ROLE`). Instead of a
    /// certificate, a bearer token (`godwit token new`) may be given in GODWIT_TOKEN or as
    /// `token` in the config file (never as a flag, to keep it out of shell history and ps).
    #[arg(long, global = true, env = "GODWIT_CERT")]
    cert: Option<std::path::PathBuf>,
    /// The private key of --cert.
    #[arg(long, global = true, env = "GODWIT_KEY")]
    key: Option<std::path::PathBuf>,

    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List hosts with their load, VMs and state.
    Hosts,
    /// Cordon, uncordon, drain or forget a host.
    #[command(subcommand)]
    Host(hosts::HostCommand),
    /// Make the cluster's certificate authority and issue host and operator certificates.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Make bearer tokens for operators without a certificate.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Create, list, show and remove VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Live-migrate a VM to another host, with a progress bar; `migrate resume ID` resumes a
    /// paused post-copy.
    Migrate(MigrateArgs),
    /// Migrations the orchestrator drove: list them, or show one with its resources.
    Migrations {
        #[command(subcommand)]
        command: Option<MigrationsCommand>,
    },
    /// What the balancer would do now, and why.
    Plan,
    /// Recent decisions of the control plane.
    Decisions {
        #[arg(long, default_value_t = 30)]
        limit: usize,
    },
    /// Show or set the balancer mode (off, recommend, automatic).
    Balancer { mode: Option<String> },
    /// Start a local orchestrator and N agents, print their addresses, run until Ctrl-C.
    Up(UpArgs),
    /// A local cluster of 3 agents: load one host with spinning guests and watch the balancer
    /// find the hotspot and migrate VMs until the load is even.
    Demo(DemoArgs),
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Create a VM; the placement policy picks the host unless --host is given.
    Create(Box<CreateArgs>),
    List,
    Show {
        name: String,
    },
    #[command(alias = "delete")]
    Rm {
        name: String,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct MigrateArgs {
    #[command(subcommand)]
    action: Option<MigrateAction>,
    /// The VM to move.
    #[arg(required = true)]
    vm: Option<String>,
    /// Target host name.
    #[arg(long, required = true)]
    to: Option<String>,
    /// precopy, stop-and-copy, postcopy or auto; default: chosen by policy.
    #[arg(long)]
    mode: Option<String>,
    /// Bandwidth cap, MiB/s.
    #[arg(long)]
    bandwidth: Option<f64>,
    /// Return at once instead of following the migration.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Debug, Subcommand)]
enum MigrateAction {
    /// A post-copy whose connections failed (phase postcopy-paused, after its source stopped
    /// reconnecting by itself) reconnects now, for another recovery window.
    Resume {
        /// The migration's id (as `godwit migrations` lists it).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum MigrationsCommand {
    /// List them, oldest first (the default).
    List,
    /// One migration, with what it did to each of the VM's resources (MV, CP, GR, RB).
    Show {
        /// The migration's id (as `godwit migrations` lists it).
        id: String,
    },
}

#[derive(Debug, Args)]
struct CreateArgs {
    name: String,
    /// Guest kind: idle, dirty, spin, ticker or echo.
    #[arg(long, default_value = "idle")]
    guest: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Memory, MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// dirty: working set, MiB.
    #[arg(long, default_value_t = 64)]
    working_set: u64,
    /// dirty: write rate, MiB/s (0 = unlimited).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// dirty: uniform or hotcold.
    #[arg(long, default_value = "uniform")]
    pattern: String,
    /// spin: busy percent per vCPU.
    #[arg(long, default_value_t = 50)]
    duty: u32,
    /// dirty: disk blocks (4 KiB) written and re-read per second, with a disk (default 200).
    #[arg(long)]
    disk_ops: Option<u32>,
    /// ticker: interval, ms.
    #[arg(long, default_value_t = 1000)]
    interval: u64,
    /// A resource KIND:NAME[,key=value...] (repeatable). KIND is disk, endpoint, scratch or
    /// device; keys: binding (identifier, value, type), attachment (unattached, fastened,
    /// fixed), size_mib, class, allow_global_ref (true, false), port. E.g.
    /// disk:root,size_mib=64 or device:rng,class=entropy.
    #[arg(long = "resource", value_name = "SPEC", value_parser = resources::parse_resource)]
    resources: Vec<ResourceSpec>,
    /// Put it on this host.
    #[arg(long)]
    host: Option<String>,
    /// Required host label KEY=VALUE (repeatable).
    #[arg(long = "require-label")]
    require_labels: Vec<String>,
    #[arg(long)]
    affinity: Option<String>,
    #[arg(long)]
    anti_affinity: Option<String>,
    /// Never move it with post-copy.
    #[arg(long)]
    no_postcopy: bool,
    /// Never move it automatically.
    #[arg(long)]
    pinned: bool,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Agents to start.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// CPU capacity each agent declares to the balancer, cores.
    #[arg(long, default_value_t = 2.0)]
    capacity: f64,
    /// Where to keep data and logs (default: a new temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("godwit: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Up(args) => return up(args),
        Command::Demo(args) => return demo(args),
        _ => {}
    }
    let command = match cli.command {
        Command::Ca(cmd) => return ca::run(cmd, json),
        Command::Token(cmd) => return token::run(cmd, json),
        command => command,
    };
    let profile = profile::resolve(profile::Given {
        server: cli.server,
        config: cli.config,
        ca: cli.ca,
        cert: cli.cert,
        key: cli.key,
        token: std::env::var("GODWIT_TOKEN").ok(),
    })?;
    let c = Client::new(&profile.server, &profile.auth)?;
    match command {
        Command::Ca(_) | Command::Token(_) => unreachable!("handled above"),
        Command::Hosts => hosts(&c, json),
        Command::Host(cmd) => hosts::run(&c, cmd, json),
        Command::Vm(VmCommand::Create(args)) => {
            let created = c.create_vm(&create_spec(*args)?)?;
            if json {
                print_json(&created)
            } else {
                println!(
                    "{} created on {}: {}",
                    created.vm.name, created.host, created.reason
                );
                Ok(())
            }
        }
        Command::Vm(VmCommand::List) => vm_list(&c, json),
        Command::Vm(VmCommand::Show { name }) => {
            let vm = c.vm(&name)?;
            if json {
                return print_json(&vm);
            }
            println!("name:       {}", vm.name);
            println!(
                "host:       {}{}",
                vm.host,
                if vm.reported { "" } else { " (not reported)" }
            );
            println!("guest:      {}", vm.spec.guest.kind());
            println!("vcpus:      {}", vm.spec.vcpus);
            println!("memory:     {} MiB", vm.spec.memory_mib);
            println!("placement:  {}", vm.placement_reason);
            println!("moves:      {}", vm.moves.len());
            if let Some(i) = &vm.info {
                println!("state:      {}", api_name(&i.state));
                println!(
                    "cpu:        {:.2} cores ({:.1} s total)",
                    i.cpu_usage_cores, i.cpu_seconds
                );
                println!(
                    "dirty rate: {:.1} MiB/s",
                    i.dirty_rate_bytes_s / (1 << 20) as f64
                );
                println!(
                    "progress:   {} (verify errors {})",
                    i.guest.progress, i.guest.verify_errors
                );
            }
            resources::print_vm_resources(&vm);
            Ok(())
        }
        Command::Vm(VmCommand::Rm { name }) => {
            c.delete_vm(&name)?;
            if !json {
                println!("{name} removed");
            }
            Ok(())
        }
        Command::Migrate(MigrateArgs {
            action: Some(MigrateAction::Resume { id }),
            ..
        }) => {
            let info = c.resume_migration(&id)?;
            if json {
                return print_json(&info);
            }
            println!(
                "migration {id} of {} resumes: its source reconnects to {} now",
                info.vm, info.target
            );
            Ok(())
        }
        Command::Migrate(MigrateArgs {
            vm: Some(vm),
            to: Some(to),
            mode,
            bandwidth,
            no_wait,
            ..
        }) => migrate(&c, &vm, &to, mode, bandwidth, no_wait, json),
        Command::Migrate(_) => bail!("migrate needs a VM and --to HOST, or `resume ID`"),
        Command::Migrations { command: None }
        | Command::Migrations {
            command: Some(MigrationsCommand::List),
        } => migrations(&c, json),
        Command::Migrations {
            command: Some(MigrationsCommand::Show { id }),
        } => {
            let m = c.migration(&id)?;
            if json {
                return print_json(&m);
            }
            migration_show(&m);
            Ok(())
        }
        Command::Plan => plan(&c, json),
        Command::Decisions { limit } => {
            let d = c.decisions(limit)?;
            if json {
                return print_json(&d);
            }
            for d in d {
                println!(
                    "{} {:<8} {:<14} {:<10} {}",
                    time(d.unix_ms),
                    d.action,
                    d.class,
                    d.vm.unwrap_or_default(),
                    d.reason
                );
            }
            Ok(())
        }
        Command::Balancer { mode } => {
            let state = match mode {
                Some(m) => c.set_balancer(parse_enum(&m, "balancer mode")?)?,
                None => c.balancer()?,
            };
            if json {
                print_json(&state)
            } else {
                println!(
                    "mode {}, imbalance {:.3}, hot hosts [{}], {} runs",
                    api_name(&state.mode),
                    state.imbalance,
                    state.hot_hosts.join(", "),
                    state.runs
                );
                Ok(())
            }
        }
        Command::Up(_) | Command::Demo(_) => unreachable!("handled above"),
    }
}

fn parse_enum<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .with_context(|| format!("{text:?} is not a valid {what}"))
}

/// The API's own spelling of an enum value (`stop-and-copy`, `completed`, `automatic`).
fn api_name(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

fn create_spec(a: CreateArgs) -> Result<ClusterCreateVm> {
    let guest = match a.guest.as_str() {
        "idle" => GuestSpec::Idle,
        "dirty" => GuestSpec::Dirty {
            working_set_mib: a.working_set,
            rate_mib_s: a.rate,
            pattern: parse_enum::<DirtyPattern>(&a.pattern, "pattern")?,
            hot_mib: None,
            hot_percent: None,
            content: PageContent::Counter,
            disk_ops_s: a.disk_ops,
        },
        "spin" => GuestSpec::Spin {
            duty_percent: a.duty,
        },
        "ticker" => GuestSpec::Ticker {
            interval_ms: a.interval,
        },
        "echo" => GuestSpec::Echo,
        other => bail!("unknown guest kind {other:?}: use idle, dirty, spin, ticker or echo"),
    };
    let mut labels = BTreeMap::new();
    for l in a.require_labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("label {l:?} is not KEY=VALUE"))?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(ClusterCreateVm {
        name: a.name,
        vcpus: a.vcpus,
        memory_mib: a.memory,
        guest,
        host: a.host,
        require_labels: labels,
        affinity_group: a.affinity,
        anti_affinity_group: a.anti_affinity,
        allow_postcopy: !a.no_postcopy,
        downtime_ms: None,
        pinned: a.pinned,
        resources: a.resources,
    })
}

fn hosts(c: &Client, json: bool) -> Result<()> {
    let hosts = c.hosts()?;
    if json {
        return print_json(&hosts);
    }
    println!(
        "{:<12} {:<5} {:>6} {:>8} {:>4} {:>14}  {:<4} LABELS",
        "HOST", "UP", "LOAD", "CAPACITY", "VMS", "MEMORY (MiB)", "HOT"
    );
    for h in hosts {
        println!(
            "{:<12} {:<5} {:>5.0}% {:>8.1} {:>4} {:>14}  {:<4} {}",
            h.name,
            match (h.up, h.cordoned) {
                (true, false) => "yes",
                (true, true) => "CORD",
                (false, _) => "DOWN",
            },
            h.load * 100.0,
            h.capacity_cores,
            h.vm_count,
            format!("{}/{}", h.memory_vms_mib, h.memory_total_mib),
            if h.hot { "HOT" } else { "" },
            h.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    Ok(())
}

fn vm_list(c: &Client, json: bool) -> Result<()> {
    let vms = c.vms()?;
    if json {
        return print_json(&vms);
    }
    println!(
        "{:<14} {:<10} {:<7} {:>5} {:>7} {:>7} {:>11} {:>5}",
        "VM", "HOST", "GUEST", "VCPU", "MEM", "CPU", "DIRTY MiB/s", "MOVES"
    );
    for v in vms {
        let (cpu, dirty) = v
            .info
            .as_ref()
            .map(|i| (i.cpu_usage_cores, i.dirty_rate_bytes_s / (1 << 20) as f64))
            .unwrap_or((0.0, 0.0));
        println!(
            "{:<14} {:<10} {:<7} {:>5} {:>7} {:>7.2} {:>11.1} {:>5}",
            v.name,
            v.host,
            v.spec.guest.kind(),
            v.spec.vcpus,
            v.spec.memory_mib,
            cpu,
            dirty,
            v.moves.len()
        );
    }
    Ok(())
}

fn migrate(
    c: &Client,
    vm: &str,
    to: &str,
    mode: Option<String>,
    bandwidth: Option<f64>,
    no_wait: bool,
    json: bool,
) -> Result<()> {
    let mode = mode
        .map(|m| parse_enum::<MigrationMode>(&m, "migration mode"))
        .transpose()?;
    let m = c.migrate(
        vm,
        &ClusterMigrate {
            to: to.to_owned(),
            mode,
            bandwidth_mib_s: bandwidth,
        },
    )?;
    if no_wait {
        return if json {
            print_json(&m)
        } else {
            println!(
                "migration {} of {vm} to {to} started ({:?}): {}",
                m.id, m.mode, m.reason
            );
            Ok(())
        };
    }
    let bar = (!json).then(|| {
        let bar = indicatif::ProgressBar::new(100);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg:<40} [{bar:30}] {pos:>3}%")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    });
    let done = loop {
        let now = c.migration(&m.id)?;
        if let (Some(bar), Some(s)) = (&bar, &now.stats) {
            let total = s.memory_bytes.max(1) as f64;
            let pct = (100.0 * (1.0 - s.remaining_bytes as f64 / total)).clamp(0.0, 100.0);
            bar.set_position(pct as u64);
            bar.set_message(format!(
                "{vm} {:?} {}",
                s.phase,
                if s.phase == MigrationPhase::Precopy {
                    format!("round {}", s.rounds)
                } else {
                    String::new()
                }
            ));
        }
        if now.status != MigrationStatus::Running {
            break now;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if json {
        print_json(&done)?;
    } else if let Some(s) = &done.stats {
        println!(
            "{vm}: {} {} -> {} with {}: total {:.0} ms, downtime {:.1} ms, {:.1} MiB sent, {} rounds{}",
            api_name(&done.status),
            done.from,
            done.to,
            api_name(&done.mode),
            s.total_ms,
            s.downtime_ms.unwrap_or(0.0),
            s.pages.wire_bytes as f64 / (1 << 20) as f64,
            s.rounds,
            done.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    if done.status != MigrationStatus::Completed {
        bail!(
            "the migration ended {}: {}",
            api_name(&done.status),
            done.error.unwrap_or_default()
        );
    }
    Ok(())
}

fn migrations(c: &Client, json: bool) -> Result<()> {
    let ms = c.migrations()?;
    if json {
        return print_json(&ms);
    }
    println!(
        "{:<9} {:<12} {:<10} {:<10} {:<13} {:<9} {:<10} {:>9} {:>9}  REASON",
        "STARTED", "VM", "FROM", "TO", "MODE", "TRIGGER", "STATUS", "DOWNTIME", "TOTAL"
    );
    for m in ms {
        let (down, total) = m
            .stats
            .as_ref()
            .map(|s| (s.downtime_ms.unwrap_or(0.0), s.total_ms))
            .unwrap_or((0.0, 0.0));
        println!(
            "{:<9} {:<12} {:<10} {:<10} {:<13} {:<9} {:<10} {:>7.1}ms {:>7.0}ms  {}",
            time(m.started_unix_ms),
            m.vm,
            m.from,
            m.to,
            api_name(&m.mode),
            api_name(&m.trigger),
            api_name(&m.status),
            down,
            total,
            m.reason
        );
    }
    Ok(())
}

/// `migrations show`: the record, then what it did to each resource.
fn migration_show(m: &ClusterMigration) {
    println!("id:         {}", m.id);
    println!("vm:         {} ({} -> {})", m.vm, m.from, m.to);
    println!(
        "mode:       {} ({})",
        api_name(&m.mode),
        api_name(&m.trigger)
    );
    println!("status:     {}", api_name(&m.status));
    println!("reason:     {}", m.reason);
    println!("started:    {}", time(m.started_unix_ms));
    if let Some(s) = &m.stats {
        println!(
            "time:       total {:.0} ms, downtime {:.1} ms",
            s.total_ms,
            s.downtime_ms.unwrap_or(0.0)
        );
        println!(
            "memory:     {:.1} MiB sent in {} rounds{}",
            s.pages.wire_bytes as f64 / (1 << 20) as f64,
            s.rounds,
            if s.switched_to_postcopy {
                ", switched to post-copy"
            } else {
                ""
            }
        );
    }
    if let Some(e) = &m.error {
        println!("error:      {e}");
    }
    resources::print_migration_resources(m);
}

fn plan(c: &Client, json: bool) -> Result<()> {
    let p = c.plan()?;
    if json {
        return print_json(&p);
    }
    println!(
        "balancer {}; imbalance {:.3}; hot hosts: {}",
        api_name(&p.mode),
        p.imbalance,
        if p.hot_hosts.is_empty() {
            "none".into()
        } else {
            p.hot_hosts.join(", ")
        }
    );
    if p.moves.is_empty() {
        println!("no moves");
    }
    for m in &p.moves {
        println!(
            "move {} {} -> {} ({}): {}",
            m.vm.as_deref().unwrap_or("?"),
            m.from.as_deref().unwrap_or("?"),
            m.to.as_deref().unwrap_or("?"),
            api_name(&m.mode.unwrap_or_default()),
            m.reason
        );
    }
    for n in &p.notes {
        println!("note [{}] {}", n.class, n.reason);
    }
    Ok(())
}

/// A local cluster: an orchestrator and agents reporting to it. It is secure by default: a
/// CA in `DIR/ca` and a certificate for the orchestrator, each agent and the CLI's admin in
/// `DIR/tls/NAME` (each made once), so every API call and migration is mutual TLS; the CLI's
/// config file for it is `DIR/config.toml`.
struct LocalCluster {
    orchestrator: LocalOrchestrator,
    agents: Vec<LocalAgent>,
    dir: std::path::PathBuf,
    /// A client of the orchestrator as the local admin.
    client: Client,
    _temp: Option<tempfile::TempDir>,
}

fn start_cluster(
    n: usize,
    capacity: f64,
    dir: Option<std::path::PathBuf>,
    orch_args: &[&str],
) -> Result<LocalCluster> {
    let (dir, temp) = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            (d, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("godwit-cluster-")
                .tempdir()?;
            (t.path().to_owned(), Some(t))
        }
    };
    let ca = LocalCa::open(&dir)?;
    let mut args: Vec<String> = orch_args.iter().map(|s| s.to_string()).collect();
    args.extend(ca.host_args("orchestrator")?);
    let orchestrator = LocalOrchestrator::start(
        &dir.join("orchestrator"),
        &dir.join("orchestrator.log"),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let mut agents = Vec::new();
    for i in 1..=n {
        let name = format!("host-{i}");
        let mut args = vec![
            "--orchestrator".to_owned(),
            orchestrator.url.clone(),
            "--label".to_owned(),
            format!("cpu_capacity={capacity}"),
        ];
        args.extend(ca.host_args(&name)?);
        agents.push(LocalAgent::start_with(
            &name,
            &dir.join(&name),
            &dir.join(format!("{name}.log")),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )?);
    }
    // The CLI's config file for this cluster, as the local admin.
    let admin = ca.files(LOCAL_ADMIN, godwit_tls::Role::Admin)?;
    let config = toml::to_string(&serde_json::json!({
        "server": orchestrator.url,
        "ca": admin.ca,
        "cert": admin.cert,
        "key": admin.key,
    }))?;
    std::fs::write(dir.join("config.toml"), config)?;
    // Wait until every agent has reported.
    let c = Client::new(&orchestrator.url, &ca.admin()?)?;
    let t = Instant::now();
    while c.hosts()?.iter().filter(|h| h.up).count() < n {
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "the agents did not report to the orchestrator within 30 s (logs in {})",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(LocalCluster {
        orchestrator,
        agents,
        dir,
        client: c,
        _temp: temp,
    })
}

impl LocalCluster {
    fn stop(self) -> Result<()> {
        for a in self.agents {
            a.stop()?;
        }
        self.orchestrator.stop()
    }
}

fn up(args: UpArgs) -> Result<()> {
    let cluster = start_cluster(args.agents, args.capacity, args.dir, &[])?;
    println!("orchestrator: {}", cluster.orchestrator.url);
    for a in &cluster.agents {
        println!("agent {}: {}", a.name, a.url);
    }
    println!("data and logs: {}", cluster.dir.display());
    println!(
        "the CLI's config (server, CA, admin certificate): {}",
        cluster.dir.join("config.toml").display()
    );
    println!(
        "try: export GODWIT_CONFIG={}; godwit hosts",
        cluster.dir.join("config.toml").display()
    );
    println!("Ctrl-C stops the cluster.");
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc_channel(tx);
    let _ = rx.recv();
    cluster.stop()
}

/// Sends on `tx` at SIGINT/SIGTERM (a tiny signal wait without extra crates: a tokio runtime).
fn ctrlc_channel(tx: std::sync::mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(rt) = rt {
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
        }
        let _ = tx.send(());
    });
}

fn demo(args: DemoArgs) -> Result<()> {
    println!(
        "Starting a local cluster: an orchestrator and 3 agents (each declares 1 CPU core)..."
    );
    let cluster = start_cluster(3, 1.0, None, &["--balancer", "recommend"])?;
    let c = cluster.client.clone();
    println!(
        "  orchestrator {}; logs in {}",
        cluster.orchestrator.url,
        cluster.dir.display()
    );
    // Load host-1: four spinning guests of 25% plus a self-verifying writer.
    println!("Loading host-1 with four VMs that spin at 25% CPU each, plus a 'dirty' VM that writes and verifies its memory:");
    for i in 1..=4 {
        let name = format!("spin-{i}");
        c.create_vm(&ClusterCreateVm {
            name: name.clone(),
            vcpus: 1,
            memory_mib: 128,
            guest: GuestSpec::Spin { duty_percent: 25 },
            host: Some("host-1".into()),
            require_labels: BTreeMap::new(),
            affinity_group: None,
            anti_affinity_group: None,
            allow_postcopy: true,
            downtime_ms: None,
            pinned: false,
            resources: vec![],
        })?;
        println!("  {name} on host-1");
    }
    c.create_vm(&ClusterCreateVm {
        name: "writer".into(),
        vcpus: 1,
        memory_mib: 256,
        guest: GuestSpec::Dirty {
            working_set_mib: 64,
            rate_mib_s: 20.0,
            pattern: DirtyPattern::Hotcold,
            hot_mib: None,
            hot_percent: None,
            content: PageContent::Counter,
            disk_ops_s: None,
        },
        host: Some("host-1".into()),
        require_labels: BTreeMap::new(),
        affinity_group: None,
        anti_affinity_group: None,
        allow_postcopy: true,
        downtime_ms: None,
        pinned: false,
        resources: vec![],
    })?;
    println!("  writer on host-1");
    println!("Waiting for load samples, then switching the balancer to automatic...");
    std::thread::sleep(Duration::from_secs(4));
    print_loads(&c)?;
    c.set_balancer(BalancerMode::Automatic)?;
    let started = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    let mut resolved_after = None;
    let mut calm_since: Option<Instant> = None;
    while started.elapsed() < Duration::from_secs(args.timeout) {
        std::thread::sleep(Duration::from_secs(1));
        for m in c.migrations()? {
            let key = (m.id.clone(), format!("{:?}", m.status));
            if seen.insert(key) {
                match m.status {
                    MigrationStatus::Running => println!(
                        "[{:>5.1}s] balancer: migrate {} {} -> {} ({}) because {}",
                        started.elapsed().as_secs_f64(),
                        m.vm,
                        m.from,
                        m.to,
                        api_name(&m.mode),
                        m.reason
                    ),
                    status => println!(
                        "[{:>5.1}s] {} {}: downtime {:.1} ms, total {:.0} ms, {}{}",
                        started.elapsed().as_secs_f64(),
                        m.vm,
                        api_name(&status),
                        m.stats.as_ref().and_then(|s| s.downtime_ms).unwrap_or(0.0),
                        m.stats.as_ref().map(|s| s.total_ms).unwrap_or(0.0),
                        if m.stats.as_ref().is_some_and(|s| s.encrypted) {
                            "mutual TLS"
                        } else {
                            "plain TCP"
                        },
                        m.error.map(|e| format!(": {e}")).unwrap_or_default()
                    ),
                }
            }
        }
        let b = c.balancer()?;
        let running = c
            .migrations()?
            .iter()
            .any(|m| m.status == MigrationStatus::Running);
        let hosts = c.hosts()?;
        let max = hosts.iter().map(|h| h.load).fold(0.0, f64::max);
        if b.hot_hosts.is_empty() && !running && max < 0.75 && seen.len() > 1 {
            let since = *calm_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(3) {
                resolved_after = Some(started.elapsed() - Duration::from_secs(3));
                break;
            }
        } else {
            calm_since = None;
        }
    }
    print_loads(&c)?;
    let writer = c.vm("writer")?;
    let errors = writer
        .info
        .as_ref()
        .map(|i| i.guest.verify_errors)
        .unwrap_or(0);
    println!(
        "The writer VM is on {} and reports {} verify errors.",
        writer.host, errors
    );
    let _ = std::io::stdout().flush();
    cluster.stop()?;
    match resolved_after {
        Some(t) if errors == 0 => {
            println!(
                "Hotspot resolved by live migration in {:.1} s: every host under the 75% threshold.",
                t.as_secs_f64()
            );
            Ok(())
        }
        Some(_) => bail!("the writer VM reported verify errors"),
        None => bail!("the hotspot was not resolved within {} s", args.timeout),
    }
}

fn print_loads(c: &Client) -> Result<()> {
    let hosts = c.hosts()?;
    let vms = c.vms()?;
    for h in hosts {
        let names: Vec<String> = vms
            .iter()
            .filter(|v| v.host == h.name)
            .map(|v| v.name.clone())
            .collect();
        println!(
            "  {:<7} load {:>4.0}% {:<4} [{}]",
            h.name,
            h.load * 100.0,
            if h.hot { "HOT" } else { "" },
            names.join(", ")
        );
    }
    Ok(())
}
