//! Scale benchmark for the policies: a generated cluster of 10,000 hosts and 200,000 VMs (some
//! hosts hot), timing one snapshot build, one `plan()` and one `place()`, and measuring the
//! memory each uses with a counting allocator. Prints a table; asserts nothing.
//!
//! ```text
//! cargo run --release -p policies --example scale_bench [-- HOSTS VMS]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use policies::{place, plan, ClusterView, Host, LoadSample, Params, Vm, VmRequest};

/// Counts live and peak heap bytes; all real work is the system allocator's.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc`
// contract; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours, passed through.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`; `new_size` is the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Runs `f`, returning its result, the time it took, the heap it left allocated and the peak
/// heap above the starting point while it ran.
fn measure<T>(f: impl FnOnce() -> T) -> (T, Duration, isize, usize) {
    let start_live = live();
    PEAK.store(start_live, Ordering::Relaxed);
    let t = Instant::now();
    let out = f();
    let took = t.elapsed();
    let retained = live() as isize - start_live as isize;
    let peak = PEAK.load(Ordering::Relaxed) - start_live;
    (out, took, retained, peak)
}

/// xorshift64*: deterministic, fast, good enough for a synthetic cluster.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

const GIB: u64 = 1 << 30;
const MIB: f64 = (1u64 << 20) as f64;
const NOW: u64 = 1_000_000_000;

/// A cluster of `hosts` hosts and `vms` VMs; about 3% of hosts run hot. VMs on the other hosts
/// use a fraction of their vCPUs drawn from `busy`.
fn generate(hosts: usize, vms: usize, busy: (f64, f64), seed: u64) -> (Vec<Host>, Vec<Vm>) {
    let mut rng = Rng(seed);
    let mut hs: Vec<Host> = (0..hosts)
        .map(|i| {
            let cores = [16.0, 32.0, 64.0][rng.below(3) as usize];
            let mut h = Host::new(format!("host-{i:05}"), cores, cores as u64 * 8 * GIB);
            h.labels
                .insert("zone".into(), format!("z{}", rng.below(10)));
            if rng.chance(0.05) {
                h.labels.insert("gpu".into(), "yes".into());
            }
            h.own_load = Some(0.02);
            h
        })
        .collect();
    let hot: Vec<bool> = (0..hosts).map(|_| rng.chance(0.03)).collect();
    let mut cpu = vec![0.0f64; hosts];
    let mut mem = vec![0u64; hosts];
    let mut out = Vec::with_capacity(vms);
    for i in 0..vms {
        // Bigger hosts get proportionally more VMs.
        let h = loop {
            let h = rng.below(hosts as u64) as usize;
            if rng.unit() < hs[h].cpu_cores / 64.0 {
                break h;
            }
        };
        let vcpus = 1 + rng.below(8) as u32;
        let mut vm = Vm::new(
            format!("vm-{i:06}"),
            hs[h].name.clone(),
            vcpus,
            (1 + rng.below(16)) * GIB,
        );
        let fraction = if hot[h] {
            0.45 + 0.3 * rng.unit()
        } else {
            busy.0 + (busy.1 - busy.0) * rng.unit()
        };
        vm.cpu_usage_cores = f64::from(vcpus) * fraction;
        vm.dirty_rate_bytes_per_s = if rng.chance(0.05) {
            2048.0 * MIB
        } else {
            200.0 * MIB * rng.unit()
        };
        if rng.chance(0.10) {
            vm.anti_affinity_group = Some(format!("anti-{}", i / 3));
        }
        if rng.chance(0.05) {
            vm.affinity_group = Some(format!("aff-{}", rng.below(vms as u64 / 20)));
        }
        if rng.chance(0.05) {
            vm.required_labels =
                BTreeMap::from([("zone".to_string(), hs[h].labels["zone"].clone())]);
        }
        if rng.chance(0.02) {
            vm.policy.allow_postcopy = false;
        }
        if rng.chance(0.05) {
            vm.last_moved_ms = Some(NOW - rng.below(3_600_000));
        }
        cpu[h] += vm.cpu_usage_cores;
        mem[h] += vm.memory_bytes;
        out.push(vm);
    }
    for (i, h) in hs.iter_mut().enumerate() {
        h.memory_total_bytes = h.memory_total_bytes.max(mem[i] + 64 * GIB);
        h.memory_free_bytes = h.memory_total_bytes - mem[i];
        let load = cpu[i] / h.cpu_cores + 0.02;
        h.load_samples = (0..5)
            .map(|s| LoadSample {
                at_ms: NOW - 4000 + 1000 * s,
                load: (load + 0.02 * (rng.unit() - 0.5)).max(0.0),
            })
            .collect();
    }
    (hs, out)
}

fn mib(bytes: isize) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn row(op: &str, time: &str, peak: &str, retained: &str) {
    println!("{op:<46} {time:>24} {peak:>10} {retained:>10}");
}

/// Median and minimum of five runs of `f`, with the heap of the last run.
fn five<T>(mut f: impl FnMut() -> T) -> (T, String, isize, usize) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let (out, t, retained, peak) = measure(&mut f);
        times.push(t);
        last = Some((out, retained, peak));
    }
    times.sort();
    let (out, retained, peak) = last.expect("ran five times");
    (
        out,
        format!("{} (min {})", ms(times[2]), ms(times[0])),
        retained,
        peak,
    )
}

fn scenario(name: &str, hosts: usize, vms: usize, busy: (f64, f64)) {
    let ((hs, vs), gen_time, snapshot_bytes, _) =
        measure(|| generate(hosts, vms, busy, 0x5eed_cafe));
    println!();
    println!(
        "== {name}: {hosts} hosts, {vms} VMs, VMs on cool hosts {:.0}-{:.0}% busy (generated in {})",
        busy.0 * 100.0,
        busy.1 * 100.0,
        ms(gen_time)
    );
    row("operation", "time", "peak heap", "retained");
    row(
        &"-".repeat(46),
        &"-".repeat(24),
        &"-".repeat(10),
        &"-".repeat(10),
    );
    row(
        "snapshot (hosts + VMs as given)",
        "-",
        "-",
        &mib(snapshot_bytes),
    );
    let (view, build_time, index_bytes, build_peak) =
        measure(|| ClusterView::new(hs, vs, 3).expect("generated snapshot is valid"));
    row(
        "ClusterView::new (validate + index)",
        &ms(build_time),
        &mib(build_peak as isize),
        &mib(index_bytes),
    );

    let default_params = Params::default();
    let mut wide = Params::default();
    wide.limits.max_migrations_cluster = 1_000;
    wide.limits.max_migrations_per_host = 4;
    let mut unlimited = Params::default();
    unlimited.limits.max_migrations_cluster = u32::MAX;
    unlimited.limits.max_migrations_per_host = u32::MAX;
    let mut plans = Vec::new();
    for (label, params) in [
        (
            "plan(), default limits (5 cluster, 2/host)",
            &default_params,
        ),
        ("plan(), limits 1,000 cluster, 4/host", &wide),
        ("plan(), no migration limits", &unlimited),
    ] {
        let (p, time, retained, peak) = five(|| plan(&view, params, NOW));
        row(label, &time, &mib(peak as isize), &mib(retained));
        plans.push((label, p));
    }
    let req = VmRequest {
        expected_cpu_cores: Some(2.0),
        anti_affinity_group: Some("anti-7".into()),
        ..VmRequest::new("new-vm", 4, 8 * GIB)
    };
    let (placement, time, retained, peak) = five(|| place(&view, &req, &default_params));
    row("place() one VM", &time, &mib(peak as isize), &mib(retained));
    println!();
    for (label, p) in &plans {
        println!("{label}: {}", p.summary());
        let mut by_class: BTreeMap<&str, usize> = BTreeMap::new();
        for n in &p.notes {
            *by_class.entry(n.class.as_str()).or_default() += 1;
        }
        println!("  notes by class: {by_class:?}");
        if std::env::var_os("SHOW_NOTES").is_some() {
            let mut shown = std::collections::BTreeSet::new();
            for n in &p.notes {
                if shown.insert(n.class) {
                    println!("  e.g. {n}");
                }
            }
        }
    }
    match placement {
        Ok(p) => println!(
            "place(): {} -> {} (score {:.3}, load {:.2} -> {:.2}, {} VMs there, {} hosts ranked, {} rejected)",
            p.vm,
            p.host,
            p.score,
            p.ranked[0].load,
            p.projected_load,
            view.vms_on(&p.host).count(),
            p.ranked.len(),
            p.rejected.len()
        ),
        Err(e) => println!("place(): {e}"),
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let hosts = args.first().copied().unwrap_or(10_000);
    let vms = args.get(1).copied().unwrap_or(200_000);
    println!("policies scale benchmark (times: median of 5 runs; heap: counting allocator)");
    let only = std::env::var("SCENARIO").ok();
    for (name, busy) in [
        ("roomy", (0.0, 0.3)),
        ("tight", (0.1, 0.35)),
        ("overloaded", (0.15, 0.45)),
    ] {
        if only.as_deref().is_none_or(|o| o == name) {
            scenario(name, hosts, vms, busy);
        }
    }
}
