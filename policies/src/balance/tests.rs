//! Scripted clusters for the balancer.

mod resources;

use super::plan;
use crate::cost::Mode;
use crate::model::{Host, LoadSample, Vm};
use crate::params::Params;
use crate::plan::{Plan, ReasonClass};
use crate::rebinding::{self, Action};
use crate::view::ClusterView;

const GIB: u64 = 1 << 30;
const NOW: u64 = 10_000_000;

/// A cluster written line by line; samples are filled in from the VMs' CPU use unless a
/// host was given its own.
#[derive(Default)]
struct Scenario {
    hosts: Vec<Host>,
    vms: Vec<Vm>,
    in_flight: u32,
}

impl Scenario {
    fn host(mut self, name: &str, cores: f64) -> Self {
        self.hosts.push(Host::new(name, cores, 64 * GIB));
        self
    }

    fn edit_host(mut self, name: &str, f: impl FnOnce(&mut Host)) -> Self {
        f(self.hosts.iter_mut().find(|h| h.name == name).unwrap());
        self
    }

    /// A VM with 2 vCPUs, 2 GiB and no dirtying.
    fn vm(self, name: &str, host: &str, cpu: f64) -> Self {
        self.vm_with(name, host, cpu, |_| {})
    }

    fn vm_with(mut self, name: &str, host: &str, cpu: f64, f: impl FnOnce(&mut Vm)) -> Self {
        let mut vm = Vm::new(name, host, 2, 2 * GIB);
        vm.cpu_usage_cores = cpu;
        f(&mut vm);
        self.vms.push(vm);
        self
    }

    fn view(&self) -> ClusterView {
        let mut hosts = self.hosts.clone();
        for h in &mut hosts {
            let on: Vec<&Vm> = self.vms.iter().filter(|v| v.host == h.name).collect();
            let load = on.iter().map(|v| v.cpu_usage_cores).sum::<f64>() / h.cpu_cores;
            h.memory_free_bytes = h
                .memory_free_bytes
                .saturating_sub(on.iter().map(|v| v.memory_bytes).sum());
            if h.load_samples.is_empty() {
                h.load_samples = (0..5)
                    .map(|i| LoadSample {
                        at_ms: NOW - 4000 + 1000 * i,
                        load,
                    })
                    .collect();
            }
        }
        ClusterView::new(hosts, self.vms.clone(), self.in_flight).unwrap()
    }

    fn plan(&self) -> Plan {
        self.plan_with(&Params::default())
    }

    fn plan_with(&self, params: &Params) -> Plan {
        let view = self.view();
        let p = plan(&view, params, NOW);
        check_invariants(&view, &p, params);
        p
    }
}

/// What must hold for every plan: no VM moves twice, targets are up and keep labels,
/// anti-affinity, memory and the threshold, and can bind the VM's resources on the disk the
/// plan's earlier moves leave; limits hold.
fn check_invariants(view: &ClusterView, plan: &Plan, params: &Params) {
    let mut hosts: Vec<Host> = view.hosts().to_vec();
    let mut vms: Vec<Vm> = view.vms().to_vec();
    let mut seen = std::collections::HashSet::new();
    let mut busy: std::collections::HashMap<String, u32> = Default::default();
    for m in &plan.moves {
        assert!(seen.insert(m.vm.clone()), "{} moved twice", m.vm);
        let vm = vms.iter_mut().find(|v| v.name == m.vm).unwrap();
        assert_eq!(vm.host, m.from);
        let target = hosts.iter_mut().find(|h| h.name == m.to).unwrap();
        assert!(target.up, "{m}");
        assert!(target.matches(&vm.required_labels), "{m}");
        let reserve = params.placement.memory_reserve_bytes;
        assert!(vm.memory_bytes + reserve <= target.memory_free_bytes, "{m}");
        target.memory_free_bytes -= vm.memory_bytes;
        let choices = rebinding::choose_all(&vm.resources, &target.capabilities())
            .unwrap_or_else(|e| panic!("{m}: {e}"));
        for (r, c) in vm.resources.iter().zip(&choices) {
            target.disk_free_bytes -= rebinding::disk_taken(c.action, r);
        }
        let freed: u64 = vm
            .resources
            .iter()
            .zip(&choices)
            .filter(|(_, c)| c.action == Action::Move)
            .map(|(r, _)| r.size_bytes)
            .sum();
        let source = hosts.iter_mut().find(|h| h.name == m.from).unwrap();
        source.disk_free_bytes += freed;
        assert!(
            m.gain.target_load.1 <= params.hotspot.threshold + 1e-12,
            "{m}"
        );
        assert!(m.gain.value >= m.gain.required, "{m}");
        vm.host = m.to.clone();
        *busy.entry(m.from.clone()).or_default() += 1;
        *busy.entry(m.to.clone()).or_default() += 1;
    }
    for (name, n) in busy {
        let h = view.host(&name).unwrap();
        assert!(h.migrations_in_flight + n <= params.limits.max_migrations_per_host);
    }
    assert!(
        view.migrations_in_flight() + plan.moves.len() as u32
            <= params.limits.max_migrations_cluster
            || plan.moves.is_empty()
    );
    let groups: Vec<(&str, &str)> = vms
        .iter()
        .filter_map(|v| Some((v.anti_affinity_group.as_deref()?, v.host.as_str())))
        .collect();
    for (i, a) in groups.iter().enumerate() {
        for b in &groups[i + 1..] {
            let moved = plan.moves.iter().any(|m| m.to == a.1);
            assert!(
                a != b || !moved,
                "anti-affinity group {} twice on {}",
                a.0,
                a.1
            );
        }
    }
}

fn moved(p: &Plan) -> Vec<(&str, &str, &str)> {
    p.moves
        .iter()
        .map(|m| (m.vm.as_str(), m.from.as_str(), m.to.as_str()))
        .collect()
}

fn note_texts(p: &Plan, class: ReasonClass) -> Vec<&str> {
    p.notes_of(class).map(|d| d.reason.as_str()).collect()
}

/// h1 (8 cores) carries eight 0.9-core VMs: load 0.9, hot. h2 and h3 idle at 0.1.
fn hot_h1() -> Scenario {
    let mut s = Scenario::default()
        .host("h1", 8.0)
        .host("h2", 8.0)
        .host("h3", 8.0)
        .vm("idle2", "h2", 0.8)
        .vm("idle3", "h3", 0.8);
    for i in 0..8 {
        s = s.vm(&format!("w{i}"), "h1", 0.9);
    }
    s
}

#[test]
fn balanced_cluster_does_nothing() {
    let p = Scenario::default()
        .host("h1", 8.0)
        .host("h2", 8.0)
        .vm("a", "h1", 4.0)
        .vm("b", "h2", 3.5)
        .plan();
    assert!(p.is_empty());
    assert!(p.hot_hosts.is_empty());
    let texts = note_texts(&p, ReasonClass::BelowThreshold);
    assert_eq!(texts.len(), 1);
    assert!(
        texts[0].starts_with("Nothing to do: no host is hot and the imbalance 0.031"),
        "{}",
        texts[0]
    );
}

#[test]
fn empty_or_all_down_cluster_plans_nothing() {
    let p = Scenario::default().plan();
    assert!(p.is_empty());
    assert_eq!(
        note_texts(&p, ReasonClass::BelowThreshold),
        [
            "Nothing to do: no host is hot and the imbalance 0.000 is within the target 0.100 \
             (mean load 0.00 over 0 hosts)"
        ]
    );
    let p = hot_h1()
        .edit_host("h1", |h| h.up = false)
        .edit_host("h2", |h| h.up = false)
        .edit_host("h3", |h| h.up = false)
        .plan();
    assert!(p.is_empty());
    assert_eq!(note_texts(&p, ReasonClass::HostDown).len(), 3);
}

#[test]
fn hot_host_sheds_until_under_threshold_with_composing_moves() {
    let p = hot_h1().plan();
    assert_eq!(p.hot_hosts, ["h1"]);
    // 0.9 -> 0.7875 -> 0.675: two moves; the second goes to h3, cooler than h2 by then.
    assert_eq!(moved(&p), [("w0", "h1", "h2"), ("w1", "h1", "h3")]);
    let last = &p.moves[1].gain;
    assert!(last.source_load.1 <= 0.75);
    assert!((last.source_load.1 - 0.675).abs() < 1e-9);
    assert!((p.moves[1].gain.source_load.0 - p.moves[0].gain.source_load.1).abs() < 1e-12);
    assert!(p.after.stddev < p.before.stddev);
    assert!(p.moves.iter().all(|m| m.class == ReasonClass::Hotspot));
    assert_eq!(p.moves[0].mode, Mode::Precopy);
    let r = &p.moves[0].reason;
    assert!(
        r.starts_with("h1 is hot (load 0.90 > 0.75): w0 (0.90 cores, 2 GiB) relieves 0.11"),
        "{r}"
    );
    assert!(r.contains("h2 is the best target (0.10 -> 0.21)"), "{r}");
    assert!(r.contains("pre-copy: converges"), "{r}");
    assert!(note_texts(&p, ReasonClass::Hotspot)[0].starts_with("h1 is hot: 5 of last 5"));
}

#[test]
fn plan_is_deterministic() {
    let s = hot_h1();
    assert_eq!(s.plan(), s.plan());
}

#[test]
fn picks_the_vm_with_the_best_benefit_per_cost() {
    // "big" relieves more but costs 32 GiB of transfer; "lean" relieves enough at 1 GiB.
    let s = Scenario::default()
        .host("h1", 8.0)
        .host("h2", 8.0)
        .vm_with("filler", "h1", 3.0, |v| v.memory_bytes = 8 * GIB)
        .vm_with("big", "h1", 2.0, |v| v.memory_bytes = 32 * GIB)
        .vm_with("lean", "h1", 1.5, |v| v.memory_bytes = GIB);
    let p = s.plan();
    let hotspot_moves = p.moves.iter().filter(|m| m.class == ReasonClass::Hotspot);
    assert_eq!(hotspot_moves.count(), 1);
    assert_eq!(moved(&p)[0], ("lean", "h1", "h2"));
    assert!(p.moves[0]
        .reason
        .contains("the best relief per migration cost among its movable VMs"));

    // Same CPU and memory: the VM that dirties memory fast costs more to move.
    let s = Scenario::default()
        .host("h1", 8.0)
        .host("h2", 8.0)
        .vm_with("filler", "h1", 5.0, |v| v.policy.migratable = false)
        .vm_with("dirty", "h1", 1.5, |v| {
            v.dirty_rate_bytes_per_s = 2.0 * GIB as f64
        })
        .vm("clean", "h1", 1.5);
    assert_eq!(moved(&s.plan())[0], ("clean", "h1", "h2"));
}

#[test]
fn anti_affinity_is_never_violated() {
    let base = || {
        hot_h1()
            .edit_host("h1", |_| {})
            .vm_with("db1", "h2", 0.1, |v| {
                v.anti_affinity_group = Some("db".into())
            })
    };
    // w0 (best ranked) is in group db: h2 runs db1, so it goes to h3.
    let mut s = base();
    s.vms
        .iter_mut()
        .find(|v| v.name == "w0")
        .unwrap()
        .anti_affinity_group = Some("db".into());
    let p = s.plan();
    assert_eq!(p.moves[0].vm, "w0");
    assert_eq!(p.moves[0].to, "h3");

    // Both other hosts run db: w0 stays (with a note) and the next VM moves instead.
    let mut s = base().vm_with("db3", "h3", 0.1, |v| {
        v.anti_affinity_group = Some("db".into())
    });
    s.vms
        .iter_mut()
        .find(|v| v.name == "w0")
        .unwrap()
        .anti_affinity_group = Some("db".into());
    let p = s.plan();
    assert!(p.moves.iter().all(|m| m.vm != "w0"));
    assert_eq!(p.moves[0].vm, "w1");
    assert!(p.moves[0].reason.contains("(1 ranked higher had none)"));
    let notes = note_texts(&p, ReasonClass::AffinityRule);
    assert_eq!(
        notes,
        ["w0 has no target among 2 host(s) examined: 2 run a member of its anti-affinity group"]
    );
}

#[test]
fn affinity_keeps_group_mates_together() {
    let mut s = hot_h1();
    for v in s
        .vms
        .iter_mut()
        .filter(|v| v.name == "w0" || v.name == "w1")
    {
        v.affinity_group = Some("web".into());
    }
    let p = s.plan();
    assert!(p.moves.iter().all(|m| m.vm != "w0" && m.vm != "w1"), "{p}");
    assert_eq!(moved(&p), [("w2", "h1", "h2"), ("w3", "h1", "h3")]);
    assert_eq!(
        note_texts(&p, ReasonClass::AffinityRule),
        [
            "w0 has no target: it stays with the 1 other member(s) of its affinity group web on \
             h1, and no other host runs the group",
            "w1 has no target: it stays with the 1 other member(s) of its affinity group web on \
             h1, and no other host runs the group",
        ]
    );

    // A mate already on h3: w0 may join it there.
    let s = {
        let mut s = hot_h1().vm_with("w9", "h3", 0.1, |v| v.affinity_group = Some("web".into()));
        for v in s
            .vms
            .iter_mut()
            .filter(|v| v.name == "w0" || v.name == "w1")
        {
            v.affinity_group = Some("web".into());
        }
        s
    };
    let p = s.plan();
    assert_eq!(p.moves[0].vm, "w0");
    assert_eq!(p.moves[0].to, "h3");
}

#[test]
fn labels_and_memory_constrain_targets() {
    let s = hot_h1()
        .edit_host("h2", |h| {
            h.labels.insert("zone".into(), "a".into());
        })
        .edit_host("h3", |h| {
            h.labels.insert("zone".into(), "b".into());
        })
        .host("h4", 8.0);
    let mut s = s;
    for v in s.vms.iter_mut().filter(|v| v.host == "h1") {
        v.required_labels.insert("zone".into(), "b".into());
    }
    let p = s.plan();
    assert!(!p.moves.is_empty());
    assert!(p.moves.iter().all(|m| m.to == "h3"), "{p}");

    // A label no other host carries: the VM stays, and says why; unlabelled VMs still move.
    let mut s = hot_h1();
    s.vms[2].required_labels.insert("gpu".into(), "a100".into()); // w0
    let p = s.plan();
    assert_eq!(
        note_texts(&p, ReasonClass::NoTarget),
        ["w0 has no target: no other host carries its required labels gpu=a100"]
    );
    assert_eq!(moved(&p), [("w1", "h1", "h2"), ("w2", "h1", "h3")]);

    // h2 and h4 (the coolest) lack memory: everything goes to h3.
    let p = hot_h1()
        .host("h4", 8.0)
        .edit_host("h2", |h| h.memory_free_bytes = 4 * GIB)
        .edit_host("h4", |h| h.memory_free_bytes = GIB)
        .plan();
    assert!(p.moves.iter().all(|m| m.to == "h3"), "{p}");
}

#[test]
fn anti_thrash_keeps_recently_moved_vms() {
    let mut s = hot_h1();
    s.vms[2].last_moved_ms = Some(NOW - 60_000); // w0: a minute ago
    s.vms[3].move_history_ms = vec![NOW - 3_000_000, NOW - 2_000_000, NOW - 1_000_000]; // w1
    let p = s.plan();
    assert_eq!(moved(&p), [("w2", "h1", "h2"), ("w3", "h1", "h3")]);
    assert_eq!(
        note_texts(&p, ReasonClass::AntiThrash),
        [
            "w0 moved 60.0 s ago, less than the minimum interval of 10.0 min",
            "w1 moved 3 times in the last 60.0 min, the limit is 3",
        ]
    );
    // Old history outside the window does not count.
    let mut s = hot_h1();
    s.vms[2].move_history_ms = vec![1, 2, 3];
    assert_eq!(s.plan().moves[0].vm, "w0");
}

#[test]
fn cluster_limit_counts_in_flight_migrations() {
    let mut s = hot_h1();
    s.in_flight = 5;
    let p = s.plan();
    assert!(p.is_empty());
    assert_eq!(
        note_texts(&p, ReasonClass::ConcurrencyLimit),
        ["No moves: 5 migrations are already in flight (cluster limit 5)"]
    );

    s.in_flight = 4;
    let p = s.plan();
    assert_eq!(p.moves.len(), 1);
    assert_eq!(
        note_texts(&p, ReasonClass::ConcurrencyLimit),
        ["h1 stays hot at 0.79: the cluster limit of 5 migrations is reached"]
    );
}

#[test]
fn per_host_limits_apply_to_sources_and_targets() {
    let p = hot_h1()
        .edit_host("h1", |h| h.migrations_in_flight = 1)
        .plan();
    assert_eq!(p.moves.len(), 1);
    assert_eq!(
        note_texts(&p, ReasonClass::ConcurrencyLimit),
        ["h1 stays hot at 0.79: it takes part in 2 migrations (limit 2)"]
    );
    // h2 is busy: both moves go to h3.
    let p = hot_h1()
        .edit_host("h2", |h| h.migrations_in_flight = 2)
        .plan();
    assert_eq!(moved(&p), [("w0", "h1", "h3"), ("w1", "h1", "h3")]);
}

#[test]
fn imbalance_without_hotspots_is_reduced() {
    let mut s = Scenario::default();
    for h in ["h1", "h2", "h3", "h4"] {
        s = s.host(h, 8.0);
    }
    for i in 0..7 {
        s = s
            .vm(&format!("a{i}"), "h1", 0.8)
            .vm(&format!("b{i}"), "h2", 0.8);
    }
    s = s.vm("c", "h3", 0.8).vm("d", "h4", 0.8);
    let p = s.plan();
    assert!(p.hot_hosts.is_empty());
    assert!(p.before.stddev > 0.25);
    assert!(p.after.stddev <= 0.10 + 1e-9, "{p}");
    assert!(p.moves.iter().all(|m| m.class == ReasonClass::Imbalance));
    assert!(p.moves.iter().all(|m| m.to == "h3" || m.to == "h4"));
    assert!(p.moves[0]
        .reason
        .starts_with("imbalance 0.300 is above the target 0.100"));
    assert!(note_texts(&p, ReasonClass::Imbalance)[0].starts_with("Imbalance 0.300 is above"));
}

#[test]
fn small_gains_do_not_pay_for_expensive_moves() {
    // Imbalance 0.1125 > 0.10 on two hosts, but the only movable VM has 512 GiB: its ~9 min
    // migration demands a gain the move cannot give.
    let mut s = Scenario::default()
        .host("h1", 8.0)
        .host("h2", 8.0)
        .vm_with("pinned", "h1", 1.3, |v| v.policy.migratable = false)
        .vm_with("huge", "h1", 0.5, |v| v.memory_bytes = 512 * GIB)
        .edit_host("h1", |h| h.memory_total_bytes = 1024 * GIB)
        .edit_host("h2", |h| h.memory_total_bytes = 1024 * GIB);
    for h in &mut s.hosts {
        h.memory_free_bytes = h.memory_total_bytes;
    }
    let p = s.plan();
    assert!(p.is_empty(), "{p}");
    let notes = note_texts(&p, ReasonClass::CostExceedsGain);
    assert_eq!(notes.len(), 1);
    assert!(
        notes[0].starts_with("huge -> h2: the move would gain 0.125 (load gap 0.23 -> 0.10)"),
        "{}",
        notes[0]
    );
    assert_eq!(
        note_texts(&p, ReasonClass::Imbalance)[1],
        "Imbalance stays 0.113, above the target 0.100: no busy host has an acceptable move"
    );
}

#[test]
fn no_target_when_every_other_host_is_busy() {
    let p = hot_h1().vm("x2", "h2", 4.8).vm("x3", "h3", 4.8).plan();
    assert!(p.is_empty(), "{p}");
    let notes = note_texts(&p, ReasonClass::NoTarget);
    assert_eq!(
        notes[0],
        "w0 has no target: no host is cool enough to take its 0.90 cores and stay at or under \
         0.75 (the coolest, h2, is at 0.70)"
    );
    assert!(notes.contains(&"h1 stays hot at 0.90: none of its VMs has an acceptable move"));
    assert!(p.hot_hosts == ["h1"]);

    // A small host with room on paper (0.60) but whose 4 cores cannot absorb 0.9 of them, and
    // a big one too close to the threshold for anything.
    let p = hot_h1()
        .edit_host("h2", |h| h.cpu_cores = 4.0)
        .vm("x2", "h2", 1.6)
        .edit_host("h3", |h| h.cpu_cores = 64.0)
        .vm("x3", "h3", 46.6)
        .plan();
    assert!(p.is_empty(), "{p}");
    assert_eq!(
        note_texts(&p, ReasonClass::NoTarget)[0],
        "w0 has no target among 1 host(s) examined: 1 would go above load 0.75"
    );
}

#[test]
fn down_hosts_are_neither_sources_nor_targets() {
    let p = hot_h1()
        .host("h0", 8.0)
        .edit_host("h0", |h| h.up = false)
        .edit_host("h2", |h| h.up = false)
        .plan();
    assert!(p.moves.iter().all(|m| m.to == "h3"), "{p}");
    assert_eq!(
        note_texts(&p, ReasonClass::HostDown),
        [
            "h2 is down: its 1 VM(s) are not moved and it takes no VMs",
            "h0 is down: its 0 VM(s) are not moved and it takes no VMs"
        ]
    );
}

#[test]
fn pinned_and_unsafe_vms_stay() {
    let mut s = hot_h1();
    s.vms[2].policy.migratable = false; // w0
    let w1 = &mut s.vms[3];
    w1.policy.allow_postcopy = false;
    w1.dirty_rate_bytes_per_s = 4.0 * GIB as f64;
    let p = s.plan();
    assert_eq!(moved(&p), [("w2", "h1", "h2"), ("w3", "h1", "h3")]);
    assert_eq!(
        note_texts(&p, ReasonClass::NotMigratable),
        ["w0 is pinned by its policy (not migratable)"]
    );
    let unsafe_notes = note_texts(&p, ReasonClass::NoSafeMode);
    assert!(unsafe_notes[0].starts_with("w1: no safe mode: pre-copy would not converge"));
}

#[test]
fn cooling_and_stale_hosts_are_not_hot() {
    let falling: Vec<LoadSample> = [0.99, 0.95, 0.9, 0.85, 0.8]
        .iter()
        .enumerate()
        .map(|(i, &load)| LoadSample {
            at_ms: NOW - 4000 + 1000 * i as u64,
            load,
        })
        .collect();
    let p = hot_h1()
        .edit_host("h1", |h| h.load_samples = falling)
        .plan();
    assert!(p.hot_hosts.is_empty());
    assert!(note_texts(&p, ReasonClass::BelowThreshold)[0].starts_with("h1 is cooling, not hot"));

    let p = hot_h1()
        .edit_host("h1", |h| {
            h.load_samples = vec![LoadSample {
                at_ms: NOW - 120_000,
                load: 0.95,
            }]
        })
        .plan();
    assert!(p.hot_hosts.is_empty());
    assert_eq!(note_texts(&p, ReasonClass::StaleSamples).len(), 1);
}

#[test]
fn several_hot_hosts_are_relieved_hottest_first() {
    let mut s = hot_h1().host("h4", 8.0).host("h5", 8.0);
    for i in 0..7 {
        s = s.vm(&format!("v{i}"), "h4", 1.0); // 0.875
    }
    let p = s.plan();
    assert_eq!(p.hot_hosts, ["h1", "h4"]);
    let hotspot_moves: Vec<&str> = p
        .moves
        .iter()
        .filter(|m| m.class == ReasonClass::Hotspot)
        .map(|m| m.from.as_str())
        .collect();
    assert_eq!(hotspot_moves, ["h1", "h1", "h4"]);
    // Then the imbalance left (h5 is empty) is worked on with the remaining budget.
    assert!(p.moves[3..]
        .iter()
        .all(|m| m.class == ReasonClass::Imbalance));
    // h1, h4 and h5 (the coolest target) reach their limit of 2 migrations.
    assert_eq!(p.moves.len(), 4);
    assert_eq!(
        note_texts(&p, ReasonClass::Imbalance)[1],
        "Imbalance stays 0.209, above the target 0.100: no busy host has an acceptable move \
         (2 skipped at their limit of 2 migrations)"
    );
    // h4 sheds one 1-core VM: 0.875 -> 0.75.
    assert!((p.moves[2].gain.source_load.1 - 0.75).abs() < 1e-9);
    assert!(p
        .to_string()
        .starts_with("4 moves, 2 hot hosts, imbalance 0.404 -> 0.209"));
}

#[test]
fn mode_follows_the_vm() {
    let mut s = hot_h1();
    for v in s.vms.iter_mut().filter(|v| v.host == "h1") {
        v.policy.migratable = false;
    }
    let w0 = &mut s.vms[2];
    w0.policy.migratable = true;
    w0.memory_bytes = 128 << 20; // tiny: stop-and-copy
    let w1 = &mut s.vms[3];
    w1.policy.migratable = true;
    w1.dirty_rate_bytes_per_s = 3.0 * GIB as f64; // dirties faster than the link: post-copy
    let p = s.plan();
    let modes: Vec<(&str, Mode)> = p.moves.iter().map(|m| (m.vm.as_str(), m.mode)).collect();
    assert_eq!(modes, [("w0", Mode::StopAndCopy), ("w1", Mode::Postcopy)]);
    assert!(p.moves[1]
        .reason
        .contains("post-copy: pre-copy would not converge"));
    assert!(p.moves[1].cost.downtime_ms < 20.0);
}

#[test]
fn slow_links_raise_the_price_of_a_target() {
    // h2 is the coolest, but the link to it moves 1 MiB/s: 2 GiB would take 34 min.
    let mut s = hot_h1().edit_host("h1", |h| {
        h.bandwidth_to.insert("h2".into(), (1u64 << 20) as f64);
    });
    s.vms[1].cpu_usage_cores = 1.0; // idle3: h3 a little warmer than h2
    let p = s.plan();
    assert_eq!(moved(&p)[0], ("w0", "h1", "h3"));
    assert!(p.moves.iter().all(|m| m.to != "h2"), "{p}");
    assert!(p.moves[0].cost.total_ms < 3_000.0);
}
