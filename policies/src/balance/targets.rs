//! Where a VM can go: the coolest feasible targets, compared by predicted gain net of the
//! gain the migration's cost requires.

use std::fmt::Write;

use crate::cost::{self, Selection};
use crate::model::Vm;
use crate::params::Params;
use crate::plan::{Gain, ReasonClass};
use crate::rebinding;
use crate::units::Millis;
use crate::view::NONE;

use super::candidates::Ranked;
use super::{Planner, Trigger};

/// Why a host cannot be a VM's target; counted, not written, while scanning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blocker {
    Down,
    Hot,
    Labels,
    Cores,
    Memory,
    Resources,
    AntiAffinity,
    Affinity,
    MigrationLimit,
    TargetLoad,
    NoSafeMode,
    RaisesImbalance,
}

impl Blocker {
    const ALL: [Blocker; 12] = [
        Blocker::Down,
        Blocker::Hot,
        Blocker::Labels,
        Blocker::Cores,
        Blocker::Memory,
        Blocker::Resources,
        Blocker::AntiAffinity,
        Blocker::Affinity,
        Blocker::MigrationLimit,
        Blocker::TargetLoad,
        Blocker::NoSafeMode,
        Blocker::RaisesImbalance,
    ];

    fn describe(self, params: &Params) -> String {
        match self {
            Blocker::Down => "down".into(),
            Blocker::Hot => "hot themselves".into(),
            Blocker::Labels => "lack its required labels".into(),
            Blocker::Cores => "have fewer cores than its vCPUs".into(),
            Blocker::Memory => "lack the memory".into(),
            Blocker::Resources => "cannot bind its resources".into(),
            Blocker::AntiAffinity => "run a member of its anti-affinity group".into(),
            Blocker::Affinity => "run no member of its affinity group".into(),
            Blocker::MigrationLimit => format!(
                "at their limit of {} migrations",
                params.limits.max_migrations_per_host
            ),
            Blocker::TargetLoad => {
                format!("would go above load {:.2}", params.hotspot.threshold)
            }
            Blocker::NoSafeMode => "have no safe migration mode".into(),
            Blocker::RaisesImbalance => "would raise the imbalance".into(),
        }
    }

    fn class(self) -> ReasonClass {
        match self {
            Blocker::AntiAffinity | Blocker::Affinity => ReasonClass::AffinityRule,
            Blocker::MigrationLimit => ReasonClass::ConcurrencyLimit,
            Blocker::NoSafeMode => ReasonClass::NoSafeMode,
            _ => ReasonClass::NoTarget,
        }
    }
}

/// A feasible target for a VM, with its predicted effect.
#[derive(Debug, Clone, Copy)]
pub(super) struct Eval {
    pub(super) target: u32,
    pub(super) selection: Selection,
    pub(super) gain: Gain,
    /// Gain minus required gain.
    net: f64,
}

/// Why a VM has no move, as a note; and, when no host had room for it at all, the CPU use from
/// which any VM of its host would fare the same.
#[derive(Debug)]
pub(super) struct NoMove {
    pub(super) class: ReasonClass,
    pub(super) text: String,
    pub(super) no_room_from: Option<f64>,
}

/// The state of one VM's target search.
#[derive(Debug, Default)]
struct Search {
    /// Hosts rejected, by blocker.
    tally: [u32; Blocker::ALL.len()],
    examined: usize,
    feasible: usize,
    best: Option<Eval>,
    /// Mode selections by bandwidth (bits): most targets share a bandwidth.
    cache: Vec<(u64, Selection)>,
    /// The first host that could not bind the VM's resources, and why (for the note).
    unbindable: Option<(u32, String)>,
}

impl Planner<'_> {
    fn affinity_count(&self, g: u32, h: u32) -> i64 {
        i64::from(self.view.affinity_members(g, h))
            + i64::from(*self.affinity_delta.get(&(g, h)).unwrap_or(&0))
    }

    fn anti_affinity_count(&self, g: u32, h: u32) -> i64 {
        i64::from(self.view.anti_affinity_members(g, h))
            + i64::from(*self.anti_affinity_delta.get(&(g, h)).unwrap_or(&0))
    }

    /// The best feasible target for VM `r.vm` on `s`, or the note saying why there is none.
    pub(super) fn find_target(&self, r: &Ranked, s: u32, trigger: Trigger) -> Result<Eval, NoMove> {
        let v = r.vm;
        let vm = self.view.vm_at(v);
        let bp = &self.params.balance;
        let threshold = self.params.hotspot.threshold;
        let source_load = self.proj.load_at(s);
        let affinity = self.view.affinity_of(v);
        // Moving a VM away from group mates on its host would split them: only hosts already
        // running the group qualify.
        let affinity_bound = affinity != NONE && self.affinity_count(affinity, s) > 1;

        let mut search = Search::default();
        let consider = |search: &mut Search, t: u32| {
            if t == s {
                return;
            }
            search.examined += 1;
            match self.evaluate(vm, v, s, t, trigger, affinity_bound, search) {
                Err(b) => search.tally[b as usize] += 1,
                Ok(e) => {
                    search.feasible += 1;
                    let better = search.best.as_ref().is_none_or(|cur| self.prefer(&e, cur));
                    if better {
                        search.best = Some(e);
                    }
                }
            }
        };

        let labelled = self
            .view
            .label_candidates(&vm.required_labels)
            .filter(|h| h.len() <= bp.target_scan_limit);
        if affinity_bound {
            let mut hosts: Vec<u32> = self.view.affinity_hosts(affinity).to_vec();
            hosts.extend(self.affinity_gained.get(&affinity).into_iter().flatten());
            hosts.sort_unstable();
            hosts.dedup();
            for t in hosts.into_iter().take(bp.target_scan_limit) {
                consider(&mut search, t);
            }
        } else if let Some(hosts) = labelled {
            for &t in hosts {
                consider(&mut search, t);
            }
        } else {
            // Coolest first. Past `ceiling`, even the largest host would go over the threshold
            // with this VM, so the scan can stop.
            let ceiling = threshold - vm.cpu_usage_cores / self.max_cores;
            for &(_, _, t) in &self.order {
                let load = self.proj.load_at(t);
                if search.examined >= bp.target_scan_limit
                    || search.feasible >= bp.target_candidates
                    || load > ceiling
                    || (trigger == Trigger::Imbalance && load >= source_load)
                {
                    break;
                }
                consider(&mut search, t);
            }
        }
        let Search {
            tally,
            examined,
            best,
            unbindable,
            ..
        } = search;

        match best {
            Some(e) if e.net >= 0.0 => Ok(e),
            Some(e) => {
                let g = &e.gain;
                Err(NoMove {
                    class: ReasonClass::CostExceedsGain,
                    no_room_from: None,
                    text: format!(
                        "{} -> {}: the move would gain {:.3} (load gap {:.2} -> {:.2}), less \
                         than the {:.3} required for a migration costing {}",
                        vm.name,
                        self.host_name(e.target),
                        g.value,
                        g.source_load.0 - g.target_load.0,
                        (g.source_load.1 - g.target_load.1).abs(),
                        g.required,
                        Millis(e.selection.estimate.cost_ms),
                    ),
                })
            }
            None => {
                let dominant = Blocker::ALL
                    .iter()
                    .copied()
                    .filter(|&b| tally[b as usize] > 0)
                    .max_by_key(|&b| tally[b as usize]);
                let mut text = format!("{} has no target", vm.name);
                if affinity_bound && examined == 0 {
                    let mates = self.affinity_count(affinity, s) - 1;
                    let _ = write!(
                        text,
                        ": it stays with the {mates} other member(s) of its affinity group {} on \
                         {}, and no other host runs the group",
                        vm.affinity_group.as_deref().unwrap_or_default(),
                        self.host_name(s)
                    );
                    return Err(NoMove {
                        class: ReasonClass::AffinityRule,
                        text,
                        no_room_from: None,
                    });
                }
                let mut no_room_from = None;
                if examined == 0 && labelled.is_some() {
                    let labels: Vec<String> = vm
                        .required_labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    let _ = write!(
                        text,
                        ": no other host carries its required labels {}",
                        labels.join(", ")
                    );
                } else if examined == 0 {
                    let coolest = self.order.iter().map(|k| k.2).find(|&t| t != s);
                    match coolest {
                        None => text.push_str(": no other host is up"),
                        Some(c)
                            if trigger == Trigger::Imbalance
                                && self.proj.load_at(c) >= source_load =>
                        {
                            let _ = write!(
                                text,
                                ": no other host is cooler than {} ({source_load:.2})",
                                self.host_name(s)
                            );
                            no_room_from = Some(0.0);
                        }
                        Some(c) => {
                            let _ = write!(
                                text,
                                ": no host is cool enough to take its {:.2} cores and stay at or \
                                 under {threshold:.2} (the coolest, {}, is at {:.2})",
                                vm.cpu_usage_cores,
                                self.host_name(c),
                                self.proj.load_at(c)
                            );
                            no_room_from = Some(vm.cpu_usage_cores);
                        }
                    }
                } else {
                    let _ = write!(text, " among {examined} host(s) examined:");
                    let mut first = true;
                    for b in Blocker::ALL {
                        let n = tally[b as usize];
                        if n > 0 {
                            let sep = if first { " " } else { ", " };
                            let _ = write!(text, "{sep}{n} {}", b.describe(self.params));
                            if let (Blocker::Resources, Some((t, why))) = (b, &unbindable) {
                                let _ = write!(text, " ({}: {why})", self.host_name(*t));
                            }
                            first = false;
                        }
                    }
                }
                Err(NoMove {
                    class: dominant.map_or(ReasonClass::NoTarget, Blocker::class),
                    text,
                    no_room_from,
                })
            }
        }
    }

    /// Whether target `a` beats `b`: a move that pays for itself beats one that does not;
    /// among those that pay, the lower imbalance after wins (the cooler target, weighed by
    /// capacity); among those that do not, the higher net gain; then the name.
    fn prefer(&self, a: &Eval, b: &Eval) -> bool {
        const TIE: f64 = 1e-12;
        let (pa, pb) = (a.net >= 0.0, b.net >= 0.0);
        if pa != pb {
            return pa;
        }
        let (ka, kb) = if pa {
            (-a.gain.imbalance.1, -b.gain.imbalance.1)
        } else {
            (a.net, b.net)
        };
        if (ka - kb).abs() > TIE {
            return ka > kb;
        }
        self.name_rank[a.target as usize] < self.name_rank[b.target as usize]
    }

    /// Whether `t` can take VM `v` from `s`, and what the move would gain.
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &self,
        vm: &Vm,
        v: u32,
        s: u32,
        t: u32,
        trigger: Trigger,
        affinity_bound: bool,
        search: &mut Search,
    ) -> Result<Eval, Blocker> {
        let host = self.view.host_at(t);
        if !host.up {
            return Err(Blocker::Down);
        }
        if self.hot[t as usize] {
            return Err(Blocker::Hot);
        }
        if !host.matches(&vm.required_labels) {
            return Err(Blocker::Labels);
        }
        if f64::from(vm.vcpus) > host.cpu_cores {
            return Err(Blocker::Cores);
        }
        if self.available[t as usize] < vm.memory_bytes {
            return Err(Blocker::Memory);
        }
        if !vm.resources.is_empty() {
            if let Err(e) = rebinding::eligible(&vm.resources, &self.caps[t as usize]) {
                search.unbindable.get_or_insert((t, e.reason));
                return Err(Blocker::Resources);
            }
        }
        let anti = self.view.anti_affinity_of(v);
        if anti != NONE && self.anti_affinity_count(anti, t) > 0 {
            return Err(Blocker::AntiAffinity);
        }
        if affinity_bound && self.affinity_count(self.view.affinity_of(v), t) <= 0 {
            return Err(Blocker::Affinity);
        }
        if self.busy[t as usize] >= self.params.limits.max_migrations_per_host {
            return Err(Blocker::MigrationLimit);
        }
        let threshold = self.params.hotspot.threshold;
        let cores = vm.cpu_usage_cores;
        let (ls, lt) = (self.proj.load_at(s), self.proj.load_at(t));
        let (ls2, lt2) = self.proj.loads_after(s, t, cores);
        if lt2 > threshold {
            return Err(Blocker::TargetLoad);
        }
        let bandwidth = self.view.host_at(s).bandwidth_to(&host.name, self.params);
        let key = bandwidth.to_bits();
        let selection = match search.cache.iter().find(|(k, _)| *k == key) {
            Some((_, sel)) => *sel,
            None => {
                let sel = cost::select(vm, bandwidth, self.params);
                search.cache.push((key, sel));
                sel
            }
        };
        if !selection.is_possible() {
            return Err(Blocker::NoSafeMode);
        }
        let before = self.proj.stats();
        let after = self.proj.stats_after(s, t, cores);
        if trigger == Trigger::Imbalance && after.stddev > before.stddev {
            return Err(Blocker::RaisesImbalance);
        }
        let gap_narrowing = (ls - lt) - (ls2 - lt2).abs();
        let overload_removed = if trigger == Trigger::Hotspot {
            (ls - threshold).max(0.0) - (ls2 - threshold).max(0.0)
        } else {
            0.0
        };
        let value = gap_narrowing.max(overload_removed);
        let bp = &self.params.balance;
        let required =
            bp.min_gain + bp.gain_per_migration_minute * selection.estimate.cost_ms / 60_000.0;
        Ok(Eval {
            target: t,
            selection,
            gain: Gain {
                source_load: (ls, ls2),
                target_load: (lt, lt2),
                imbalance: (before.stddev, after.stddev),
                gap_narrowing,
                overload_removed,
                value,
                required,
            },
            net: value - required,
        })
    }
}
