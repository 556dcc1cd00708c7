//! `godwit-bench soak`: self-verifying guests moved back and forth between two local agents,
//! a thousand times by default, every migration checked before the next one starts (the loop
//! and the checks are `godwit_tests::soak`, which the CI test runs 50 times). Stops at the
//! first migration that breaks a rule and prints it with its record; otherwise prints, per
//! mode, how long migrations and their downtimes took.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use godwit_api::{MigrationMode, VmInfo};
use godwit_tests::soak::{self, Host, Record, Violation};
use godwit_tests::Api;
use orchestrator::local::{LocalAgent, LocalCa};
use serde_json::json;

/// A progress line after this many migrations.
const PROGRESS_EVERY: usize = 25;

/// What `godwit-bench soak` was asked for.
#[derive(Debug)]
pub struct Options<'a> {
    pub migrations: usize,
    pub memory_mib: u64,
    pub vms: usize,
    pub rate_mib_s: f64,
    pub json: Option<&'a Path>,
}

pub fn run(opts: &Options<'_>) -> Result<()> {
    if opts.vms == 0 || opts.migrations == 0 {
        bail!("--vms and --migrations must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("godwit-bench-soak-")
        .tempdir()?;
    // Mutual TLS between the agents, as in production.
    let ca = LocalCa::open(dir.path())?;
    let auth = ca.admin()?;
    let names = ["soak-a", "soak-b"];
    let mut agents = Vec::new();
    let mut apis = Vec::new();
    for name in names {
        let args = ca.host_args(name)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = LocalAgent::start_with(
            name,
            &dir.path().join(name),
            &dir.path().join(format!("{name}.log")),
            &args,
        )?;
        apis.push(Api::new(agent.url.clone(), Duration::from_secs(60), &auth)?);
        agents.push(agent);
    }
    let hosts = [
        Host {
            name: names[0],
            api: &apis[0],
        },
        Host {
            name: names[1],
            api: &apis[1],
        },
    ];
    let vms: Vec<String> = (0..opts.vms).map(|k| format!("soak-{k}")).collect();
    for (k, name) in vms.iter().enumerate() {
        soak::create(
            hosts[0],
            &soak::dirty_vm(name, opts.memory_mib, opts.rate_mib_s, k),
        )
        .with_context(|| format!("Cannot start VM {name}"))?;
    }

    println!(
        "soak: {} migrations of {} VM(s) of {} MiB (2 vCPUs, dirty guests writing {} MiB/s over half their memory), between {} and {}; logs in {}",
        opts.migrations,
        opts.vms,
        opts.memory_mib,
        opts.rate_mib_s,
        names[0],
        names[1],
        dir.path().display()
    );
    let t = Instant::now();
    let mut records: Vec<Record> = Vec::with_capacity(opts.migrations);
    let outcome = soak::run(hosts, &vms, opts.migrations, |r| {
        records.push(r.clone());
        let done = r.n + 1;
        if done % PROGRESS_EVERY == 0 || done == opts.migrations {
            println!(
                "soak: {done}/{} migrations in {:.0} s, all checked; last: {} to {} ({}), {:.0} ms",
                opts.migrations,
                t.elapsed().as_secs_f64(),
                r.vm,
                r.to,
                r.step,
                r.info.total_ms
            );
        }
    });
    let elapsed = t.elapsed();
    let violation = outcome.err();
    if let Some(v) = &violation {
        eprintln!("soak: FAILED at {v}");
    }
    let guests = guests(&hosts, &vms);
    print_table(&records, violation.as_deref(), &guests, opts, elapsed);
    if let Some(path) = opts.json {
        let all = json!({
            "migrations": records,
            "violation": violation,
            "vms": guests,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)
            .with_context(|| format!("Cannot write {}", path.display()))?;
    }
    if let Some(v) = violation {
        // Keep the agents' logs for whoever looks into it.
        let kept = dir.keep();
        drop(agents);
        bail!(
            "migration {} of {} broke a rule: {}; the agents' logs are in {}",
            v.n,
            v.vm,
            v.what,
            kept.display()
        );
    }
    for agent in agents {
        agent.stop()?;
    }
    Ok(())
}

/// Each VM as its host reports it now (a VM on neither host is left out: the soak says why).
fn guests(hosts: &[Host<'_>; 2], vms: &[String]) -> Vec<VmInfo> {
    vms.iter()
        .filter_map(|name| {
            hosts
                .iter()
                .find_map(|h| h.api.get::<VmInfo>(&format!("/v1/vms/{name}")).ok())
        })
        .collect()
}

/// Nearest-rank percentile `p` (0-100) of `v`, or NaN when empty.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn print_table(
    records: &[Record],
    violation: Option<&Violation>,
    guests: &[VmInfo],
    opts: &Options<'_>,
    elapsed: Duration,
) {
    let done = violation.map_or(records.len(), |v| v.n + 1);
    println!(
        "soak: {done} of {} migrations in {:.0} s, {}",
        opts.migrations,
        elapsed.as_secs_f64(),
        match violation {
            Some(_) => "stopped at the first failure",
            None => "every one checked",
        }
    );
    println!("| mode | migrations | failures | total p50 / p99 | downtime p50 / p99 | post-copy pauses | notes |");
    println!("|---|---|---|---|---|---|---|");
    let mut rows: Vec<(String, Vec<&Record>, usize)> = soak::MODES
        .iter()
        .map(|&mode| {
            let of_mode: Vec<&Record> = records.iter().filter(|r| r.step.mode == mode).collect();
            let failed = usize::from(violation.is_some_and(|v| v.step.mode == mode));
            (soak::mode_name(mode), of_mode, failed)
        })
        .collect();
    rows.push((
        "all".into(),
        records.iter().collect(),
        usize::from(violation.is_some()),
    ));
    for (mode, rs, failed) in rows {
        let total: Vec<f64> = rs.iter().map(|r| r.info.total_ms).collect();
        let down: Vec<f64> = rs.iter().filter_map(|r| r.info.downtime_ms).collect();
        let pauses: u32 = rs.iter().map(|r| r.info.postcopy_pauses).sum();
        let capped = rs
            .iter()
            .filter(|r| r.step.bandwidth_mib_s.is_some())
            .count();
        let mut notes = format!("{capped} capped");
        if mode == soak::mode_name(MigrationMode::Auto) {
            let switched = rs.iter().filter(|r| r.info.switched_to_postcopy).count();
            notes.push_str(&format!(", {switched} switched to post-copy"));
        }
        println!(
            "| {mode} | {} | {failed} | {:.0} / {:.0} ms | {:.1} / {:.1} ms | {pauses} | {notes} |",
            rs.len() + failed,
            percentile(&total, 50.0),
            percentile(&total, 99.0),
            percentile(&down, 50.0),
            percentile(&down, 99.0),
        );
    }
    let errors: u64 = guests.iter().map(|g| g.guest.verify_errors).sum();
    let verified: u64 = guests.iter().map(|g| g.guest.verified_pages).sum();
    println!(
        "guests: {} of {} found, {errors} verify errors, {verified} pages verified",
        guests.len(),
        opts.vms
    );
}
