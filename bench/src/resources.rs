//! `godwit-bench resources`: what carrying a VM's disk costs a migration. The same dirtying
//! guest migrates with no disk, with a disk left on the source (GR: an NBD export) and with a
//! disk that moves (MV: copied while the guest runs, dirty blocks resent, the last ones in the
//! pause), runs interleaved so the variants see the same machine.
//!
//! The guest writes and verifies the first 112 MiB of its disk (what its generation table
//! covers); the bench fills the rest of the image with random data before the first move, so
//! an MV copies a disk that is mostly data rather than zeros the copier could elide.

use std::io::Write;

use anyhow::{Context, Result};
use godwit_api::{CreateVm, DirtyPattern, GuestSpec, MigrationInfo, PageContent, ResourceSpec};
use serde_json::json;

use crate::median;
use crate::migration::Pair;

/// Blocks the guest tracks (docs/guest-abi.md, "Devices").
const TRACKED_BYTES: u64 = 28672 * 4096;

struct Variant {
    name: &'static str,
    disk: Option<(u64, &'static str)>,
}

pub fn run(
    memory_mib: u64,
    disk_mib: u64,
    runs: usize,
    modes: &[String],
    json_out: Option<&std::path::Path>,
) -> Result<()> {
    let pair = Pair::start(false, false)?;
    let variants = [
        Variant {
            name: "no disk",
            disk: None,
        },
        Variant {
            name: "GR disk (NBD export)",
            disk: Some((disk_mib, "fastened")),
        },
        Variant {
            name: "MV disk",
            disk: Some((disk_mib, "unattached")),
        },
    ];
    for (i, v) in variants.iter().enumerate() {
        let mut resources = Vec::new();
        if let Some((mib, attachment)) = v.disk {
            let mut disk = ResourceSpec::new("root", godwit_api::ResourceKind::Disk);
            disk.size_mib = Some(mib);
            disk.attachment = Some(serde_json::from_value(json!(attachment))?);
            resources.push(disk);
        }
        let name = format!("res{i}");
        pair.a.create_vm(&CreateVm {
            name: name.clone(),
            vcpus: 2,
            memory_mib,
            guest: GuestSpec::Dirty {
                working_set_mib: memory_mib / 2,
                rate_mib_s: 20.0,
                pattern: DirtyPattern::Hotcold,
                hot_mib: Some(16),
                hot_percent: Some(95),
                content: PageContent::Counter,
                disk_ops_s: Some(500),
            },
            paused: false,
            resources,
        })?;
        if v.disk.is_some() {
            fill_untracked(&pair, &name, disk_mib)?;
        }
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut results: Vec<Vec<Vec<MigrationInfo>>> =
        vec![vec![Vec::new(); variants.len()]; modes.len()];
    for _ in 0..runs {
        for (m, mode) in modes.iter().enumerate() {
            for (i, _) in variants.iter().enumerate() {
                let name = format!("res{i}");
                let info = pair
                    .migrate(&name, json!({"mode": mode, "downtime_ms": 50}))
                    .with_context(|| format!("{mode} of {name}"))?;
                results[m][i].push(info);
            }
        }
    }
    if let Some(path) = json_out {
        let all: Vec<&MigrationInfo> = results.iter().flatten().flatten().collect();
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    println!(
        "\nMigration with a disk: {memory_mib} MiB guest dirtying 20 MiB/s (hot/cold), disk of \
         {disk_mib} MiB written at 500 blocks/s; medians of {runs} interleaved runs"
    );
    println!(
        "{:<15} {:<22} {:>9} {:>10} {:>8} {:>12} {:>8} {:>14} {:>10}",
        "mode",
        "variant",
        "setup ms",
        "total ms",
        "x none",
        "downtime ms",
        "rounds",
        "disk MiB sent",
        "disk ms"
    );
    for (m, mode) in modes.iter().enumerate() {
        let base = median(results[m][0].iter().map(|i| i.total_ms).collect());
        for (i, v) in variants.iter().enumerate() {
            let rs = &results[m][i];
            let total = median(rs.iter().map(|i| i.total_ms).collect());
            let down = median(rs.iter().map(|i| i.downtime_ms.unwrap_or(0.0)).collect());
            let setup = median(rs.iter().map(|i| i.setup_ms).collect());
            let rounds = median(rs.iter().map(|i| f64::from(i.rounds)).collect());
            let disk_bytes = median(
                rs.iter()
                    .map(|i| i.resources.iter().map(|r| r.bytes).sum::<u64>() as f64)
                    .collect(),
            );
            let disk_ms = median(
                rs.iter()
                    .map(|i| i.resources.iter().map(|r| r.duration_ms).sum::<f64>())
                    .collect(),
            );
            let disk_ms = if v.disk.is_some() {
                format!("{disk_ms:.0}")
            } else {
                "-".into()
            };
            println!(
                "{:<15} {:<22} {:>9.0} {:>10.0} {:>8.2} {:>12.1} {:>8.0} {:>14.1} {:>10}",
                mode,
                v.name,
                setup,
                total,
                total / base,
                down,
                rounds,
                disk_bytes / (1 << 20) as f64,
                disk_ms
            );
        }
    }
    Ok(())
}

/// Writes random data into the part of the disk image the guest does not track.
fn fill_untracked(pair: &Pair, name: &str, disk_mib: u64) -> Result<()> {
    let path = pair
        .dir
        .path()
        .join("a/resources")
        .join(name)
        .join("root/disk.img");
    let size = disk_mib << 20;
    if size <= TRACKED_BYTES {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(TRACKED_BYTES))?;
    let mut xof = blake3::Hasher::new().update(name.as_bytes()).finalize_xof();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size - TRACKED_BYTES;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        std::io::Read::read_exact(&mut xof, &mut buf[..n])?;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}
