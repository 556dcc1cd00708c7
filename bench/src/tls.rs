//! `godwit-bench tls`: what mutual TLS costs a migration. Two pairs of local agents run side
//! by side in one run, one with plain TCP migration channels and one with mutual TLS (a
//! cluster CA made for the run); each gets the same guests, and every migration is done on
//! both, alternating which goes first, `--runs` times. While one pair migrates, the other
//! pair's guests are paused, so the two never compete for the CPU. Medians are reported with
//! the TLS / plain ratio.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use godwit_api::{DirtyPattern, MigrationInfo, PageContent};
use serde_json::json;

use crate::migration::{dirty_guest as dirty, Pair};

const MIB: f64 = (1 << 20) as f64;

#[derive(Default)]
struct Samples {
    rate: Vec<f64>,
    total: Vec<f64>,
    downtime: Vec<f64>,
}

impl Samples {
    fn add(&mut self, info: &MigrationInfo, stop_and_copy: bool) {
        // Pages over the time they took to go: the pause for stop-and-copy, else the whole run.
        let secs = if stop_and_copy {
            info.downtime.final_pages_ms / 1000.0
        } else {
            info.total_ms / 1000.0
        };
        self.rate
            .push(info.pages.wire_bytes as f64 / secs.max(1e-6) / MIB);
        self.total.push(info.total_ms);
        self.downtime.push(info.downtime_ms.unwrap_or(0.0));
    }
}

pub fn run(memory_mib: u64, runs: usize, channels: Option<u32>) -> Result<()> {
    let plain = Pair::start_secured(false, false, false)?;
    let tls = Pair::start_secured(false, false, true)?;
    let pairs = [&plain, &tls];
    let ws = memory_mib.saturating_sub(16).max(16);
    for p in pairs {
        // Incompressible memory the guest keeps rewriting at 64 MiB/s: the pages are what is
        // measured.
        p.create(
            "random",
            memory_mib,
            dirty(ws, 64.0, DirtyPattern::Uniform, None, PageContent::Random),
        )?;
        p.create(
            "hot",
            memory_mib,
            dirty(
                (memory_mib / 2).max(64),
                100.0,
                DirtyPattern::Hotcold,
                Some(64.min(memory_mib / 4)),
                PageContent::Counter,
            ),
        )?;
    }
    for p in pairs {
        let t = Instant::now();
        while p.a.vm("random")?.guest.progress < ws * 256 {
            if t.elapsed() > Duration::from_secs(300) {
                bail!("the random guest did not fill its memory in 5 minutes");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let cases = [
        ("random", "stop-and-copy"),
        ("random", "precopy"),
        ("random", "postcopy"),
        ("hot", "precopy"),
        ("hot", "postcopy"),
    ];
    let mut results: Vec<[Samples; 2]> = cases.iter().map(|_| Default::default()).collect();
    for run in 0..runs {
        for (case, (vm, mode)) in cases.iter().enumerate() {
            let mut body = json!({"mode": mode, "verify": false, "compress": "none"});
            if let Some(c) = channels {
                body["channels"] = json!(c);
            }
            // Alternate which pair goes first, so a drift of the machine hits both alike.
            let order: [usize; 2] = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let other = pairs[1 - i];
                let paused = other.pause_all()?;
                let info = pairs[i].migrate(vm, body.clone());
                other.resume_all(&paused)?;
                results[case][i].add(&info?, *mode == "stop-and-copy");
            }
        }
    }
    println!(
        "TLS benchmark: {memory_mib} MiB guests with 2 vCPUs, medians of {runs} runs, plain TCP and mutual TLS (rustls, ring, TLS 1.3) pairs side by side, compression off"
    );
    println!("| guest | mode | plain MiB/s | TLS MiB/s | TLS/plain | plain total | TLS total | plain downtime | TLS downtime | downtime TLS/plain |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for ((vm, mode), [p, t]) in cases.iter().zip(results) {
        let (pr, tr) = (crate::median(p.rate), crate::median(t.rate));
        let (pt, tt) = (crate::median(p.total), crate::median(t.total));
        let (pd, td) = (crate::median(p.downtime), crate::median(t.downtime));
        let guest = if *vm == "random" {
            "random (incompressible)"
        } else {
            "hot/cold 100 MiB/s"
        };
        println!(
            "| {guest} | {mode} | {pr:.0} | {tr:.0} | {:.2} | {pt:.0} ms | {tt:.0} ms | {pd:.1} ms | {td:.1} ms | {:.2} |",
            tr / pr.max(1e-9),
            td / pd.max(1e-9)
        );
    }
    Ok(())
}
