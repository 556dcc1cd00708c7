//! The balancing planner: which running VMs to migrate where, this round.
//!
//! 1. Hot hosts (see `hotspot`), hottest first, shed VMs until their projected load is at or
//!    under the threshold (Sandpiper).
//! 2. While the imbalance (stddev of host loads, as in VMware DRS) is above its target, the
//!    busiest host sheds a VM to a cooler one.
//!
//! For a source host, its VMs are ranked by benefit per cost: the share of the host's
//! capacity the VM's CPU use relieves, over the predicted cost of migrating it (Sandpiper's
//! volume-to-size ratio, with size replaced by the cost model's time). The best few are tried
//! in order; for each, the coolest feasible targets are compared (labels, cores, memory,
//! anti-affinity, affinity, per-host migration limits, target load kept under the
//! threshold), and the move is accepted if its gain (the narrowing of the load gap between
//! source and target, or the overload it removes from a hot source) reaches the minimum gain
//! plus a charge per minute of migration. Anti-thrash and the cluster migration limit bound
//! everything. Each accepted move updates the projected loads, memory, free disk (what the
//! resources' MV, CP or RB put on the target, and what an MV frees on the source) and group
//! membership, so the moves of one plan compose. Everything considered and not done becomes a note.
//!
//! Cost: hosts are kept in a tree ordered by projected load, so finding the busiest source or
//! the coolest targets is logarithmic; a VM looks at no more than `target_scan_limit` hosts.

mod candidates;
mod targets;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::fxhash::FxHashMap;
use crate::hotspot::{self, Heat};
use crate::load::{LoadStats, Projection};
use crate::params::Params;
use crate::plan::{Decision, Move, Plan, ReasonClass};
use crate::rebinding::{self, Action, TargetCapabilities};
use crate::units::Bytes;
use crate::view::{ClusterView, NONE};

use targets::Eval;

/// Busiest hosts tried, for imbalance, that turn out to have no acceptable move before the
/// planner gives up: bounds the work on a cluster where little can move.
const MAX_FAILED_SOURCES: usize = 32;

/// Plans this round's migrations for `view` at time `now_ms`.
pub fn plan(view: &ClusterView, params: &Params, now_ms: u64) -> Plan {
    let mut p = Planner::new(view, params, now_ms);
    p.note_down_hosts();
    let hot = p.find_hot_hosts();
    let before = p.proj.stats();
    let hot_hosts: Vec<String> = hot.iter().map(|&h| view.host_at(h).name.clone()).collect();
    let target = params.balance.imbalance_target;

    if hot.is_empty() && before.stddev <= target {
        p.note(
            ReasonClass::BelowThreshold,
            None,
            None,
            format!(
                "Nothing to do: no host is hot and the imbalance {:.3} is within the target \
                 {target:.3} (mean load {:.2} over {} hosts)",
                before.stddev, before.mean, before.hosts
            ),
        );
    } else if p.budget == 0 {
        p.note(
            ReasonClass::ConcurrencyLimit,
            None,
            None,
            format!(
                "No moves: {} migrations are already in flight (cluster limit {})",
                view.migrations_in_flight(),
                params.limits.max_migrations_cluster
            ),
        );
    } else {
        for &h in &hot {
            p.relieve(h);
        }
        p.rebalance();
    }
    let after = LoadStats::of(
        view.hosts()
            .iter()
            .enumerate()
            .filter(|(_, h)| h.up)
            .map(|(i, _)| p.proj.load_at(i as u32)),
    );
    Plan {
        moves: p.moves,
        notes: p.notes,
        hot_hosts,
        before,
        after,
    }
}

/// What triggered the search for a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Hotspot,
    Imbalance,
}

struct Planner<'v> {
    view: &'v ClusterView,
    params: &'v Params,
    now: u64,
    proj: Projection<'v>,
    /// Possible targets (hosts up and not hot), by (projected load bits, name rank, index):
    /// coolest first.
    order: BTreeSet<(u64, u32, u32)>,
    /// Hosts still eligible as imbalance sources, same keys.
    sources: BTreeSet<(u64, u32, u32)>,
    /// Position of each host in name order, for deterministic ties.
    name_rank: Vec<u32>,
    /// Hot by its samples: never a target.
    hot: Vec<bool>,
    /// Migrations each host takes part in, in flight plus planned.
    busy: Vec<u32>,
    /// Free memory beyond the reserve, after planned moves.
    available: Vec<u64>,
    /// What each host offers migrating resources, its free disk after planned moves.
    caps: Vec<TargetCapabilities>,
    /// Changes to group membership by planned moves, (group, host) -> delta.
    affinity_delta: FxHashMap<(u32, u32), i32>,
    anti_affinity_delta: FxHashMap<(u32, u32), i32>,
    /// Hosts that received members of each affinity group in this plan.
    affinity_gained: FxHashMap<u32, Vec<u32>>,
    /// Movable VMs of each source host considered so far, best first.
    rankings: FxHashMap<u32, Vec<candidates::Ranked>>,
    /// VMs moved in this plan.
    moved: Vec<bool>,
    /// VMs that already have a note (one note per VM).
    noted: Vec<bool>,
    /// Cluster migrations still allowed.
    budget: u32,
    /// Smallest and largest capacity among hosts that are up: they bound how much a move can
    /// gain and how loaded a host can be and still take a VM.
    min_cores: f64,
    max_cores: f64,
    moves: Vec<Move>,
    notes: Vec<Decision>,
}

impl<'v> Planner<'v> {
    fn new(view: &'v ClusterView, params: &'v Params, now: u64) -> Self {
        let hosts = view.hosts();
        let mut by_name: Vec<u32> = (0..hosts.len() as u32).collect();
        by_name.sort_unstable_by(|&a, &b| hosts[a as usize].name.cmp(&hosts[b as usize].name));
        let mut name_rank = vec![0; hosts.len()];
        for (rank, &h) in by_name.iter().enumerate() {
            name_rank[h as usize] = rank as u32;
        }
        let reserve = params.placement.memory_reserve_bytes;
        let mut p = Self {
            view,
            params,
            now,
            proj: Projection::new(view),
            order: BTreeSet::new(),
            sources: BTreeSet::new(),
            name_rank,
            hot: vec![false; hosts.len()],
            busy: hosts.iter().map(|h| h.migrations_in_flight).collect(),
            available: hosts
                .iter()
                .map(|h| h.memory_free_bytes.saturating_sub(reserve))
                .collect(),
            caps: hosts.iter().map(|h| h.capabilities()).collect(),
            affinity_delta: FxHashMap::default(),
            anti_affinity_delta: FxHashMap::default(),
            affinity_gained: FxHashMap::default(),
            rankings: FxHashMap::default(),
            moved: vec![false; view.vms().len()],
            noted: vec![false; view.vms().len()],
            budget: params
                .limits
                .max_migrations_cluster
                .saturating_sub(view.migrations_in_flight()),
            min_cores: hosts
                .iter()
                .filter(|h| h.up)
                .map(|h| h.cpu_cores)
                .fold(f64::INFINITY, f64::min),
            max_cores: hosts
                .iter()
                .filter(|h| h.up)
                .map(|h| h.cpu_cores)
                .fold(0.0, f64::max),
            moves: Vec::new(),
            notes: Vec::new(),
        };
        for (h, host) in hosts.iter().enumerate() {
            if host.up {
                let key = p.key(h as u32);
                // A cordoned host's VMs may leave; nothing moves there.
                if !host.cordoned {
                    p.order.insert(key);
                }
                p.sources.insert(key);
            }
        }
        p
    }

    fn key(&self, h: u32) -> (u64, u32, u32) {
        // Loads are finite and non-negative, so their bit patterns sort like the numbers.
        (
            self.proj.load_at(h).to_bits(),
            self.name_rank[h as usize],
            h,
        )
    }

    fn host_name(&self, h: u32) -> &'v str {
        &self.view.host_at(h).name
    }

    fn note(&mut self, class: ReasonClass, host: Option<u32>, vm: Option<u32>, text: String) {
        self.notes.push(Decision {
            class,
            host: host.map(|h| self.host_name(h).to_string()),
            vm: vm.map(|v| self.view.vm_at(v).name.clone()),
            reason: text,
        });
    }

    /// Notes a VM once per plan.
    fn note_vm(&mut self, class: ReasonClass, v: u32, text: String) {
        if !std::mem::replace(&mut self.noted[v as usize], true) {
            let host = self.proj.location(v);
            self.note(class, Some(host), Some(v), text);
        }
    }

    fn note_down_hosts(&mut self) {
        for (h, host) in self.view.hosts().iter().enumerate() {
            if !host.up {
                let n = self.view.vm_ids_on(h as u32).len();
                self.note(
                    ReasonClass::HostDown,
                    Some(h as u32),
                    None,
                    format!(
                        "{} is down: its {n} VM(s) are not moved and it takes no VMs",
                        host.name
                    ),
                );
            }
        }
    }

    /// Judges every host that is up; returns the hot ones, hottest first, and notes the
    /// others that came close (some samples above the threshold) or could not be judged.
    fn find_hot_hosts(&mut self) -> Vec<u32> {
        let mut hot = Vec::new();
        for (h, host) in self.view.hosts().iter().enumerate() {
            if !host.up {
                continue;
            }
            let h = h as u32;
            let v = hotspot::assess(host, &self.params.hotspot, self.now);
            match v.heat {
                Heat::Hot => {
                    self.hot[h as usize] = true;
                    let key = self.key(h);
                    self.order.remove(&key);
                    hot.push(h);
                    let text = format!("{}; load now {:.2}", v.reason(), self.proj.load_at(h));
                    self.note(ReasonClass::Hotspot, Some(h), None, text);
                }
                Heat::Cooling => self.note(ReasonClass::BelowThreshold, Some(h), None, v.reason()),
                Heat::BelowK if v.above > 0 => {
                    self.note(ReasonClass::BelowThreshold, Some(h), None, v.reason())
                }
                Heat::Stale => self.note(ReasonClass::StaleSamples, Some(h), None, v.reason()),
                Heat::BelowK | Heat::NoSamples => {}
            }
        }
        hot.sort_by(|&a, &b| {
            self.proj
                .load_at(b)
                .total_cmp(&self.proj.load_at(a))
                .then(self.name_rank[a as usize].cmp(&self.name_rank[b as usize]))
        });
        hot
    }

    /// Moves VMs off hot host `s` until its projected load is at or under the threshold.
    fn relieve(&mut self, s: u32) {
        let threshold = self.params.hotspot.threshold;
        let per_host = self.params.limits.max_migrations_per_host;
        let name = self.host_name(s);
        let mut shed = 0;
        loop {
            let load = self.proj.load_at(s);
            if load <= threshold {
                if shed == 0 {
                    self.note(
                        ReasonClass::BelowThreshold,
                        Some(s),
                        None,
                        format!(
                            "{name} is hot by its samples, but its projected load {load:.2} is \
                             already at or under {threshold:.2}: nothing to shed"
                        ),
                    );
                }
                return;
            }
            let stuck = |why: String| format!("{name} stays hot at {load:.2}: {why}");
            if self.budget == 0 {
                let text = stuck(format!(
                    "the cluster limit of {} migrations is reached",
                    self.params.limits.max_migrations_cluster
                ));
                self.note(ReasonClass::ConcurrencyLimit, Some(s), None, text);
                return;
            }
            if self.busy[s as usize] >= per_host {
                let text = stuck(format!(
                    "it takes part in {} migrations (limit {per_host})",
                    self.busy[s as usize]
                ));
                self.note(ReasonClass::ConcurrencyLimit, Some(s), None, text);
                return;
            }
            match self.best_move(s, Trigger::Hotspot) {
                Some((m, v)) => {
                    self.apply(m, v, Trigger::Hotspot);
                    shed += 1;
                }
                None => {
                    let text = stuck("none of its VMs has an acceptable move".into());
                    self.note(ReasonClass::NoTarget, Some(s), None, text);
                    return;
                }
            }
        }
    }

    /// While the imbalance is above its target, moves a VM off the busiest host.
    fn rebalance(&mut self) {
        let target = self.params.balance.imbalance_target;
        let stats = self.proj.stats();
        if stats.stddev <= target {
            return;
        }
        self.note(
            ReasonClass::Imbalance,
            None,
            None,
            format!(
                "Imbalance {:.3} is above the target {target:.3} (mean load {:.2}): moving load \
                 off the busiest hosts",
                stats.stddev, stats.mean
            ),
        );
        let mut failures = 0;
        let mut limited = 0;
        let stop_reason = loop {
            let stats = self.proj.stats();
            if stats.stddev <= target {
                return;
            }
            if self.budget == 0 {
                break format!(
                    "the cluster limit of {} migrations is reached",
                    self.params.limits.max_migrations_cluster
                );
            }
            let exhausted = || {
                let mut why = String::from("no busy host has an acceptable move");
                if limited > 0 {
                    let _ = write!(
                        why,
                        " ({limited} skipped at their limit of {} migrations)",
                        self.params.limits.max_migrations_per_host
                    );
                }
                why
            };
            let Some(&(_, _, s)) = self.sources.iter().next_back() else {
                break exhausted();
            };
            if self.proj.load_at(s) <= stats.mean {
                break exhausted();
            }
            let key = self.key(s);
            if self.busy[s as usize] >= self.params.limits.max_migrations_per_host {
                self.sources.remove(&key);
                limited += 1;
                continue;
            }
            match self.best_move(s, Trigger::Imbalance) {
                Some((m, v)) => self.apply(m, v, Trigger::Imbalance),
                None => {
                    self.sources.remove(&key);
                    failures += 1;
                    if failures >= MAX_FAILED_SOURCES {
                        break format!(
                            "the {failures} busiest hosts tried have no acceptable move"
                        );
                    }
                }
            }
        };
        let stats = self.proj.stats();
        self.note(
            ReasonClass::Imbalance,
            None,
            None,
            format!(
                "Imbalance stays {:.3}, above the target {target:.3}: {stop_reason}",
                stats.stddev
            ),
        );
    }

    /// The best acceptable move off `s`, with the VM's rank among its ranked VMs.
    fn best_move(&mut self, s: u32, trigger: Trigger) -> Option<(Eval, (u32, usize))> {
        let ranked = self.rank_vms(s);
        // Once a VM finds no host with room for it, VMs using at least as much CPU would not
        // either: they are skipped, and the first VM's note speaks for them.
        let mut no_room_from = f64::INFINITY;
        for (i, r) in ranked.iter().enumerate() {
            if self.view.vm_at(r.vm).cpu_usage_cores >= no_room_from {
                continue;
            }
            match self.find_target(r, s, trigger) {
                Ok(eval) => return Some((eval, (r.vm, i))),
                Err(no) => {
                    if let Some(cpu) = no.no_room_from {
                        no_room_from = no_room_from.min(cpu);
                    }
                    self.note_vm(no.class, r.vm, no.text);
                }
            }
        }
        None
    }

    /// Records move `e` of VM `v` (ranked `rank` among its host's VMs) and updates every
    /// projection.
    fn apply(&mut self, e: Eval, (v, rank): (u32, usize), trigger: Trigger) {
        let vm = self.view.vm_at(v);
        let s = self.proj.location(v);
        let t = e.target;
        let Ok(choice) = e.selection.explain(self.params) else {
            return; // `evaluate` admits only possible selections.
        };
        // Re-key both hosts in the load-ordered sets around the load change.
        let was_in = [s, t].map(|h| {
            let key = self.key(h);
            (self.order.remove(&key), self.sources.remove(&key))
        });
        self.proj.move_cpu(s, t, vm.cpu_usage_cores);
        self.proj.record_location(v, t);
        for (h, (in_order, in_sources)) in [s, t].into_iter().zip(was_in) {
            let key = self.key(h);
            if in_order {
                self.order.insert(key);
            }
            if in_sources {
                self.sources.insert(key);
            }
        }
        self.busy[s as usize] += 1;
        self.busy[t as usize] += 1;
        self.budget = self.budget.saturating_sub(1);
        self.available[t as usize] = self.available[t as usize].saturating_sub(vm.memory_bytes);
        self.available[s as usize] = self.available[s as usize].saturating_add(vm.memory_bytes);
        let resources = self.bind_resources(v, s, t);
        for (g, deltas) in [
            (self.view.affinity_of(v), &mut self.affinity_delta),
            (self.view.anti_affinity_of(v), &mut self.anti_affinity_delta),
        ] {
            if g != NONE {
                *deltas.entry((g, s)).or_insert(0) -= 1;
                *deltas.entry((g, t)).or_insert(0) += 1;
            }
        }
        self.moved[v as usize] = true;
        let affinity = self.view.affinity_of(v);
        if affinity != NONE {
            self.affinity_gained.entry(affinity).or_default().push(t);
        }

        let g = &e.gain;
        let (from, to) = (self.host_name(s), self.host_name(t));
        let threshold = self.params.hotspot.threshold;
        let what = format!(
            "{} ({:.2} cores, {})",
            vm.name,
            vm.cpu_usage_cores,
            Bytes(vm.memory_bytes as f64)
        );
        let why_vm = if rank == 0 {
            "the best relief per migration cost among its movable VMs".to_string()
        } else {
            format!("the best relief per migration cost among its VMs with an acceptable move ({rank} ranked higher had none)")
        };
        let (class, opening) = if trigger == Trigger::Hotspot {
            (
                ReasonClass::Hotspot,
                format!(
                    "{from} is hot (load {:.2} > {threshold:.2})",
                    g.source_load.0
                ),
            )
        } else {
            (
                ReasonClass::Imbalance,
                format!(
                    "imbalance {:.3} is above the target {:.3} and {from} is the busiest host \
                     with a move (load {:.2})",
                    g.imbalance.0, self.params.balance.imbalance_target, g.source_load.0
                ),
            )
        };
        let reason = format!(
            "{opening}: {what} relieves {:.2} of its capacity, {why_vm}; {to} is the best target \
             ({:.2} -> {:.2}), {from} goes {:.2} -> {:.2}; gain {:.3} (gap narrows by {:.3}, \
             overload drops by {:.3}) >= {:.3} required; imbalance {:.3} -> {:.3}; {}{resources}",
            vm.cpu_usage_cores / self.view.host_at(s).cpu_cores,
            g.target_load.0,
            g.target_load.1,
            g.source_load.0,
            g.source_load.1,
            g.value,
            g.gap_narrowing,
            g.overload_removed,
            g.required,
            g.imbalance.0,
            g.imbalance.1,
            choice.reason
        );
        self.moves.push(Move {
            vm: vm.name.clone(),
            from: from.to_string(),
            to: to.to_string(),
            mode: choice.mode,
            class,
            gain: e.gain,
            cost: choice.estimate,
            reason,
        });
    }

    /// Projects where VM `v`'s resources go when it moves from `s` to `t`: the target's free
    /// disk loses what their MV, CP or RB put there, the source's gains what an MV takes away.
    /// Returns `; resources: root GR, cache CP` for the move's reason (empty without
    /// resources). The agents choose again at migration time, on the facts they have then.
    fn bind_resources(&mut self, v: u32, s: u32, t: u32) -> String {
        let resources = &self.view.vm_at(v).resources;
        if resources.is_empty() {
            return String::new();
        }
        // `evaluate` admitted `t`, so every resource binds.
        let Ok(choices) = rebinding::choose_all(resources, &self.caps[t as usize]) else {
            return String::new();
        };
        let (mut taken, mut freed) = (0u64, 0u64);
        let mut summary = String::from("; resources:");
        for (r, c) in resources.iter().zip(&choices) {
            taken = taken.saturating_add(rebinding::disk_taken(c.action, r));
            if c.action == Action::Move {
                freed = freed.saturating_add(r.size_bytes);
            }
            let _ = write!(summary, " {} {}", r.name, c.action);
            if c.fallback {
                summary.push_str(" (fallback)");
            }
            summary.push(',');
        }
        summary.pop();
        let target = &mut self.caps[t as usize].disk_free_bytes;
        *target = target.saturating_sub(taken);
        let source = &mut self.caps[s as usize].disk_free_bytes;
        *source = source.saturating_add(freed);
        summary
    }
}
