//! `godwit-bench migration`: each page-transfer mode on the same guests, between two local
//! agents, next to the raw loopback TCP throughput measured in the same run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use godwit_api::{CreateVm, DirtyPattern, GuestSpec, MigrationInfo, MigrationStatus, PageContent};
use godwit_daemon::client::ClientAuth;
use orchestrator::agent_client::AgentClient;
use orchestrator::local::{LocalAgent, LocalCa};
use serde_json::json;

const MIB: f64 = (1 << 20) as f64;

/// Raw loopback TCP: one connection, 256 KiB writes, for about two seconds.
fn loopback_throughput() -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    let buf = vec![0x5au8; 256 << 10];
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < Duration::from_secs(2) {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    drop(s);
    let received = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    Ok(received.min(sent) as f64 / secs)
}

pub(crate) struct Pair {
    pub(crate) a: AgentClient,
    pub(crate) b: AgentClient,
    a_addr: String,
    b_addr: String,
    _agents: (LocalAgent, LocalAgent),
    pub(crate) dir: tempfile::TempDir,
}

/// `HOST:PORT` of an API URL (a migration's `target`).
pub(crate) fn address(url: &str) -> String {
    url.trim_start_matches("https://")
        .trim_start_matches("http://")
        .to_owned()
}

impl Pair {
    pub(crate) fn start(no_huge_pages: bool, no_prefault: bool) -> Result<Pair> {
        Self::start_secured(no_huge_pages, no_prefault, false)
    }

    /// Two agents; with `tls`, a cluster CA made for them and their API and migrations mutual
    /// TLS, else plain (`--insecure`, on loopback).
    pub(crate) fn start_secured(no_huge_pages: bool, no_prefault: bool, tls: bool) -> Result<Pair> {
        let dir = tempfile::Builder::new()
            .prefix("godwit-bench-mig-")
            .tempdir()?;
        let mut extra: Vec<String> = vec![];
        if no_huge_pages {
            extra.push("--no-huge-pages".into());
        }
        if no_prefault {
            extra.push("--no-prefault".into());
        }
        let ca = LocalCa::open(dir.path())?;
        let args = |name: &str| -> Result<Vec<String>> {
            let mut a = extra.clone();
            if tls {
                a.extend(ca.host_args(name)?);
            } else {
                a.push("--insecure".into());
            }
            Ok(a)
        };
        let auth = if tls {
            ca.admin()?
        } else {
            ClientAuth::insecure()
        };
        let (a_args, b_args) = (args("bench-a")?, args("bench-b")?);
        let a = LocalAgent::start_with(
            "bench-a",
            &dir.path().join("a"),
            &dir.path().join("a.log"),
            &strs(&a_args),
        )?;
        let b = LocalAgent::start_with(
            "bench-b",
            &dir.path().join("b"),
            &dir.path().join("b.log"),
            &strs(&b_args),
        )?;
        Ok(Pair {
            a: AgentClient::new(&a.url, &auth)?,
            b: AgentClient::new(&b.url, &auth)?,
            a_addr: address(&a.url),
            b_addr: address(&b.url),
            _agents: (a, b),
            dir,
        })
    }

    /// Creates a 2-vCPU VM with no resources on agent a.
    pub(crate) fn create(&self, name: &str, memory_mib: u64, guest: GuestSpec) -> Result<()> {
        self.a.create_vm(&CreateVm {
            name: name.into(),
            vcpus: 2,
            memory_mib,
            guest,
            paused: false,
            resources: Vec::new(),
        })?;
        Ok(())
    }

    /// Pauses every running VM of both agents; returns them by agent (for `resume_all`).
    pub(crate) fn pause_all(&self) -> Result<[Vec<String>; 2]> {
        let mut paused: [Vec<String>; 2] = Default::default();
        for (i, agent) in [&self.a, &self.b].into_iter().enumerate() {
            for vm in agent.vms()? {
                if vm.state == godwit_api::VmState::Running {
                    agent.pause(&vm.name)?;
                    paused[i].push(vm.name);
                }
            }
        }
        Ok(paused)
    }

    pub(crate) fn resume_all(&self, paused: &[Vec<String>; 2]) -> Result<()> {
        for (agent, names) in [&self.a, &self.b].into_iter().zip(paused) {
            for name in names {
                agent.resume(name)?;
            }
        }
        Ok(())
    }

    /// Where `name` runs now: (its agent, the other agent, the other's address).
    pub(crate) fn locate(&self, name: &str) -> Result<(&AgentClient, &AgentClient, &str)> {
        if self.a.vm(name).is_ok() {
            Ok((&self.a, &self.b, &self.b_addr))
        } else if self.b.vm(name).is_ok() {
            Ok((&self.b, &self.a, &self.a_addr))
        } else {
            bail!("VM {name} is on neither agent")
        }
    }

    pub(crate) fn migrate(&self, name: &str, mut body: serde_json::Value) -> Result<MigrationInfo> {
        let (src, _, target) = self.locate(name)?;
        body["target"] = json!(target);
        let id = src.migrate(name, &body)?;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let info = src.migration(&id)?;
            if info.status != MigrationStatus::Running {
                if info.status != MigrationStatus::Completed {
                    bail!(
                        "migration of {name} ended {:?}: {:?}",
                        info.status,
                        info.error
                    );
                }
                if info.source_digest != info.target_digest {
                    bail!("migration of {name}: memory differs");
                }
                return Ok(info);
            }
            if Instant::now() > deadline {
                bail!("migration of {name} takes over 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub(crate) fn dirty_guest(
    ws: u64,
    rate: f64,
    pattern: DirtyPattern,
    hot: Option<u64>,
    content: PageContent,
) -> GuestSpec {
    GuestSpec::Dirty {
        working_set_mib: ws,
        rate_mib_s: rate,
        pattern,
        hot_mib: hot,
        hot_percent: hot.map(|_| 95),
        content,
        disk_ops_s: None,
    }
}

struct Row {
    scenario: String,
    mode: String,
    info: MigrationInfo,
    note: String,
}

pub fn run(
    memory_mib: u64,
    no_huge_pages: bool,
    no_prefault: bool,
    channels: Option<u32>,
    only: &[String],
) -> Result<()> {
    let tcp = loopback_throughput().context("loopback TCP measurement")?;
    let pair = Pair::start(no_huge_pages, no_prefault)?;
    let mut rows: Vec<Row> = Vec::new();
    let body = |mode: &str, extra: serde_json::Value| {
        let mut b = json!({"mode": mode, "verify": false});
        if let Some(c) = channels {
            b["channels"] = json!(c);
        }
        if let serde_json::Value::Object(m) = extra {
            for (k, v) in m {
                b[k] = v;
            }
        }
        b
    };
    let want = |s: &str| only.iter().any(|o| o == s);
    let create = |name: &str, guest: GuestSpec| pair.create(name, memory_mib, guest);

    if want("idle") {
        create("idle", GuestSpec::Idle)?;
        for mode in ["stop-and-copy", "precopy", "postcopy", "auto"] {
            let info = pair.migrate("idle", body(mode, json!({})))?;
            rows.push(Row {
                scenario: "idle".into(),
                mode: mode.into(),
                info,
                note: String::new(),
            });
        }
    }

    if want("random") {
        // Fill all of memory with incompressible data, then move it with each mode while the
        // guest keeps rewriting it at full speed.
        let ws = memory_mib - 16;
        create(
            "random",
            dirty_guest(ws, 0.0, DirtyPattern::Uniform, None, PageContent::Random),
        )?;
        let pages = ws * 256;
        let t = Instant::now();
        while pair.a.vm("random")?.guest.progress < pages * 3 {
            if t.elapsed() > Duration::from_secs(300) {
                bail!("the random guest did not fill its memory in 5 minutes");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for (mode, compress) in [
            ("stop-and-copy", "none"),
            ("stop-and-copy", "auto"),
            ("postcopy", "none"),
        ] {
            let info = pair.migrate("random", body(mode, json!({"compress": compress})))?;
            let secs = if mode == "stop-and-copy" {
                info.downtime.final_pages_ms / 1000.0
            } else {
                info.total_ms / 1000.0
            };
            let rate = info.pages.wire_bytes as f64 / secs;
            rows.push(Row {
                scenario: format!("random ({compress})"),
                mode: mode.into(),
                note: format!(
                    "{:.0} MiB/s = {:.0}% of raw TCP",
                    rate / MIB,
                    100.0 * rate / tcp
                ),
                info,
            });
        }
        let (src, _, _) = pair.locate("random")?;
        src.delete_vm("random")?;
    }

    if want("hotcold") {
        let ws = (memory_mib / 2).max(128);
        create(
            "hot",
            dirty_guest(
                ws,
                100.0,
                DirtyPattern::Hotcold,
                Some(64),
                PageContent::Counter,
            ),
        )?;
        std::thread::sleep(Duration::from_secs(3));
        for (mode, downtime) in [
            ("precopy", 10),
            ("postcopy", 10),
            ("auto", 10),
            ("stop-and-copy", 10),
        ] {
            let info = pair.migrate("hot", body(mode, json!({"downtime_ms": downtime})))?;
            let (_, dst, _) = pair.locate("hot").map(|(a, b, c)| (b, a, c))?;
            let _ = dst;
            let note = format!(
                "sent {:.2}x memory",
                info.pages.wire_bytes as f64 / info.memory_bytes.max(1) as f64
            );
            rows.push(Row {
                scenario: "hotcold 100 MiB/s, 64 MiB hot".into(),
                mode: mode.into(),
                info,
                note,
            });
        }
        let vm = pair.locate("hot")?.0.vm("hot")?;
        if vm.guest.verify_errors != 0 {
            bail!(
                "the hot/cold guest reported {} verify errors",
                vm.guest.verify_errors
            );
        }
    }

    println!(
        "migration benchmark: {memory_mib} MiB guests with 2 vCPUs, huge pages {}, target prefault {}, raw loopback TCP {:.0} MiB/s (one connection, 256 KiB writes)",
        if no_huge_pages { "off" } else { "on" },
        if no_prefault { "off" } else { "on" },
        tcp / MIB
    );
    println!("| scenario | mode | total | downtime (pause / pages / state / resume) | rounds | wire | zero/raw/zstd pages | faults p50/p99 | note |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let i = &r.info;
        let d = &i.downtime;
        println!(
            "| {} | {} | {:.0} ms | {:.1} ms ({:.1} / {:.1} / {:.1} / {:.1}) | {} | {:.1} MiB | {}/{}/{} | {} | {} |",
            r.scenario,
            r.mode,
            i.total_ms,
            i.downtime_ms.unwrap_or(0.0),
            d.pause_ms,
            d.final_pages_ms,
            d.state_ms,
            d.target_resume_ms,
            i.rounds,
            i.pages.wire_bytes as f64 / MIB,
            i.pages.zero_pages,
            i.pages.raw_pages,
            i.pages.compressed_pages,
            if i.faults.faults > 0 {
                format!("{} faults, {:.0}/{:.0} us", i.faults.faults, i.faults.latency_p50_us, i.faults.latency_p99_us)
            } else {
                "-".into()
            },
            r.note
        );
    }
    Ok(())
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
