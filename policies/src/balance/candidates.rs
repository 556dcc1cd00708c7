//! Which VMs of a source host are worth moving: those that may move (migratable, not moved
//! too recently or too often, with a safe migration mode), ranked by benefit per cost.

use crate::cost;
use crate::model::Vm;
use crate::params::Params;
use crate::plan::ReasonClass;
use crate::units::Millis;

use super::Planner;

/// A VM of a source host, ranked.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ranked {
    pub(super) vm: u32,
    /// Relief per second of predicted migration cost.
    score: f64,
}

impl Planner<'_> {
    /// VMs of `s` that may move and have not moved in this plan, best benefit/cost first, at
    /// most `vm_candidates` of them. The ranking of a host is computed once per plan (a VM's
    /// relief and cost do not change as other VMs move), then only filtered.
    pub(super) fn rank_vms(&mut self, s: u32) -> Vec<Ranked> {
        if !self.rankings.contains_key(&s) {
            let ranking = self.rank_all(s);
            self.rankings.insert(s, ranking);
        }
        self.rankings[&s]
            .iter()
            .filter(|r| !self.moved[r.vm as usize])
            .take(self.params.balance.vm_candidates)
            .copied()
            .collect()
    }

    /// Every VM of `s` that may move, best benefit/cost first; notes the others.
    fn rank_all(&mut self, s: u32) -> Vec<Ranked> {
        let source = self.view.host_at(s);
        let bandwidth = source
            .default_bandwidth_bytes_per_s
            .unwrap_or(self.params.migration.default_bandwidth_bytes_per_s);
        let min_gain = self.params.balance.min_gain;
        let mut ranked = Vec::new();
        for &v in self.view.vm_ids_on(s) {
            let vm = self.view.vm_at(v);
            if self.moved[v as usize] || vm.cpu_usage_cores <= 0.0 {
                continue;
            }
            if !vm.policy.migratable {
                let text = format!("{} is pinned by its policy (not migratable)", vm.name);
                self.note_vm(ReasonClass::NotMigratable, v, text);
                continue;
            }
            if let Some(text) = anti_thrash(vm, self.params, self.now) {
                self.note_vm(ReasonClass::AntiThrash, v, text);
                continue;
            }
            let relief = vm.cpu_usage_cores / source.cpu_cores;
            // The most a move can gain: the source's drop plus the largest possible target rise.
            if relief + vm.cpu_usage_cores / self.min_cores < min_gain {
                continue;
            }
            let selection = cost::select(vm, bandwidth, self.params);
            if !selection.is_possible() {
                if let Err(e) = selection.explain(self.params) {
                    self.note_vm(ReasonClass::NoSafeMode, v, format!("{}: {e}", vm.name));
                }
                continue;
            }
            ranked.push(Ranked {
                vm: v,
                score: relief / selection.estimate.cost_ms.max(f64::MIN_POSITIVE),
            });
        }
        let view = self.view;
        ranked.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| view.vm_at(a.vm).name.cmp(&view.vm_at(b.vm).name))
        });
        ranked
    }
}

/// Why `vm` may not move now, if it may not.
fn anti_thrash(vm: &Vm, params: &Params, now: u64) -> Option<String> {
    let a = &params.anti_thrash;
    if let Some(last) = vm.last_moved() {
        let ago = now.saturating_sub(last);
        if ago < a.min_move_interval_ms {
            return Some(format!(
                "{} moved {} ago, less than the minimum interval of {}",
                vm.name,
                Millis(ago as f64),
                Millis(a.min_move_interval_ms as f64)
            ));
        }
    }
    let since = now.saturating_sub(a.move_window_ms);
    let in_window = |t: u64| t >= since && t <= now;
    let mut count = vm.move_history_ms.iter().filter(|&&t| in_window(t)).count();
    if let Some(last) = vm.last_moved_ms {
        if in_window(last) && !vm.move_history_ms.contains(&last) {
            count += 1;
        }
    }
    (count >= a.max_moves_per_window as usize).then(|| {
        format!(
            "{} moved {count} times in the last {}, the limit is {}",
            vm.name,
            Millis(a.move_window_ms as f64),
            a.max_moves_per_window
        )
    })
}
