//! `godwit host ...`: cordon, uncordon, drain and forget hosts (docs/orchestrator.md#host-lifecycle).

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Subcommand;
use godwit_api::{DrainState, DrainStatus, DrainVmState};
use orchestrator::cli::Client;

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Nothing new is placed or migrated to the host; its VMs stay.
    Cordon { name: String },
    /// The host takes VMs again (a running drain stops).
    Uncordon { name: String },
    /// Cordon the host and live-migrate every VM away, with progress; lists the VMs that
    /// cannot move, with why. Exits non-zero if some VMs stay.
    Drain {
        name: String,
        /// Start the drain and return at once (follow it with `godwit host drain-status`).
        #[arg(long)]
        no_wait: bool,
    },
    /// Show a host's last drain.
    DrainStatus { name: String },
    /// Forget a host that is gone (refused while it runs VMs).
    Rm { name: String },
}

pub fn run(c: &Client, cmd: HostCommand, json: bool) -> Result<()> {
    match cmd {
        HostCommand::Cordon { name } => cordon(c, &name, true, json),
        HostCommand::Uncordon { name } => cordon(c, &name, false, json),
        HostCommand::Drain { name, no_wait } => drain(c, &name, no_wait, json),
        HostCommand::DrainStatus { name } => {
            let d = c.drain_status(&name)?;
            if json {
                return super::print_json(&d);
            }
            print_drain(&d);
            Ok(())
        }
        HostCommand::Rm { name } => {
            c.forget_host(&name)?;
            if !json {
                println!("{name} forgotten");
            }
            Ok(())
        }
    }
}

fn cordon(c: &Client, name: &str, cordoned: bool, json: bool) -> Result<()> {
    let h = c.cordon(name, cordoned)?;
    if json {
        return super::print_json(&h);
    }
    let what = if h.cordoned { "cordoned" } else { "uncordoned" };
    println!("{name} {what} ({} VMs on it)", h.vm_count);
    Ok(())
}

fn drain(c: &Client, name: &str, no_wait: bool, json: bool) -> Result<()> {
    let mut d = c.drain(name)?;
    if !no_wait {
        let mut shown = String::new();
        while d.state == DrainState::Running {
            if !json {
                let line = progress(&d);
                if line != shown {
                    println!("{line}");
                    shown = line;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
            d = c.drain_status(name)?;
        }
    }
    if json {
        super::print_json(&d)?;
    } else {
        print_drain(&d);
    }
    if d.state == DrainState::Stuck {
        bail!("{name} still runs VMs that cannot move");
    }
    Ok(())
}

fn progress(d: &DrainStatus) -> String {
    let count = |s: DrainVmState| d.vms.iter().filter(|v| v.state == s).count();
    format!(
        "draining {}: {} moved, {} migrating, {} waiting, {} cannot move",
        d.host,
        count(DrainVmState::Moved),
        count(DrainVmState::Migrating),
        count(DrainVmState::Waiting),
        count(DrainVmState::Stuck)
    )
}

fn print_drain(d: &DrainStatus) {
    println!("{} ({})", progress(d), super::api_name(&d.state));
    println!("{:<16} {:<10} {:<12} REASON", "VM", "STATE", "TO");
    for v in &d.vms {
        println!(
            "{:<16} {:<10} {:<12} {}",
            v.vm,
            super::api_name(&v.state),
            v.to.as_deref().unwrap_or("-"),
            v.reason
        );
    }
}
