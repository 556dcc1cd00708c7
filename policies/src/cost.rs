//! The migration cost model and mode selection.
//!
//! For a VM of memory M dirtying D bytes/s over a link of B bytes/s with downtime target T
//! (DESIGN.md section 1):
//! - stop-and-copy pauses for all of M: downtime (M + state) / B.
//! - pre-copy sends M while the guest runs, then round after round what it dirtied meanwhile;
//!   each round is D/B of the one before (a geometric series, capped at M), until the rest fits
//!   in B x T. It converges only when D < B and that happens within `precopy_max_rounds`;
//!   otherwise the stop is forced and the downtime is whatever is left.
//! - post-copy pauses only for the vCPU and device state and sends M exactly once, but the
//!   guest runs on faulting pages for M / B; that period is charged `postcopy_fault_penalty`
//!   of its length as extra cost.
//! - auto is pre-copy that switches to post-copy once rounds stop shrinking.
//!
//! Zero pages and compression make real transfers smaller; the model ignores them, so its
//! bytes and times are upper bounds.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::Vm;
use crate::params::Params;
use crate::units::{Bytes, Millis, Rate};

/// vCPU and device state sent at switchover, beyond memory: a fixed part plus a part per vCPU.
const STATE_BASE_BYTES: f64 = 64.0 * 1024.0;
const STATE_PER_VCPU_BYTES: f64 = 16.0 * 1024.0;

/// How a migration moves memory. The orchestrator maps it to the agent API's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Pause, copy everything, resume on the target.
    StopAndCopy,
    /// Copy while running, resend dirtied pages, pause for the rest.
    Precopy,
    /// Pause for the state only; pages follow on demand and in the background.
    Postcopy,
    /// Pre-copy, switching to post-copy when rounds stop shrinking.
    Auto,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::StopAndCopy => "stop-and-copy",
            Mode::Precopy => "pre-copy",
            Mode::Postcopy => "post-copy",
            Mode::Auto => "auto",
        })
    }
}

/// What a migration is predicted to cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// The mode estimated.
    pub mode: Mode,
    /// Bandwidth assumed, bytes/s (the link, capped by the VM's policy).
    pub bandwidth_bytes_per_s: f64,
    /// From start until the VM runs on the target with all its memory, ms.
    pub total_ms: f64,
    /// How long the guest is paused, ms.
    pub downtime_ms: f64,
    /// Bytes sent, memory and state.
    pub bytes: u64,
    /// Pre-copy rounds run while the guest runs (the first full copy included).
    pub rounds: u32,
    /// Whether the downtime stays within the target without forcing the stop.
    pub converges: bool,
    /// Post-copy: how long the guest runs on the target while pages are still missing, ms.
    pub fault_period_ms: f64,
    /// The figure balancing ranks moves by: `total_ms` plus the post-copy fault penalty, ms.
    pub cost_ms: f64,
}

/// The mode chosen for one migration and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModeChoice {
    /// The mode.
    pub mode: Mode,
    /// Its predicted cost.
    pub estimate: Estimate,
    /// False when the predicted downtime exceeds the VM's target (a forced pre-copy).
    pub within_target: bool,
    /// Why this mode, in one sentence.
    pub reason: String,
}

/// No mode can move the VM within its policy.
#[derive(Debug, Clone, PartialEq, Error, Serialize)]
#[error("{reason}")]
pub struct NoSafeMode {
    /// Why, in one sentence.
    pub reason: String,
    /// The best the allowed modes could do (a forced pre-copy).
    pub estimate: Estimate,
}

/// The inputs of the model for one VM over one link.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    memory: f64,
    dirty: f64,
    state: f64,
    bandwidth: f64,
    target_ms: f64,
}

impl Transfer {
    fn new(vm: &Vm, bandwidth: f64, params: &Params) -> Self {
        let bandwidth = vm
            .policy
            .max_bandwidth_bytes_per_s
            .map_or(bandwidth, |cap| cap.min(bandwidth));
        Self {
            memory: vm.memory_bytes as f64,
            dirty: vm.dirty_rate_bytes_per_s,
            state: STATE_BASE_BYTES + STATE_PER_VCPU_BYTES * f64::from(vm.vcpus),
            bandwidth,
            target_ms: downtime_target_ms(vm, params) as f64,
        }
    }

    fn ms(&self, bytes: f64) -> f64 {
        bytes / self.bandwidth * 1000.0
    }
}

/// The downtime target that applies to a VM: its policy's, else the default.
pub fn downtime_target_ms(vm: &Vm, params: &Params) -> u64 {
    vm.policy
        .downtime_target_ms
        .unwrap_or(params.migration.default_downtime_target_ms)
}

/// Predicts the cost of moving `vm` in `mode` over a link of `bandwidth_bytes_per_s`.
pub fn estimate(mode: Mode, vm: &Vm, bandwidth_bytes_per_s: f64, params: &Params) -> Estimate {
    estimate_transfer(
        mode,
        &Transfer::new(vm, bandwidth_bytes_per_s, params),
        params,
    )
}

fn estimate_transfer(mode: Mode, t: &Transfer, params: &Params) -> Estimate {
    let m = &params.migration;
    let switchover = m.switchover_ms;
    let state_pause = t.ms(t.state) + switchover;
    let mut e = Estimate {
        mode,
        bandwidth_bytes_per_s: t.bandwidth,
        total_ms: 0.0,
        downtime_ms: 0.0,
        bytes: 0,
        rounds: 0,
        converges: true,
        fault_period_ms: 0.0,
        cost_ms: 0.0,
    };
    match mode {
        Mode::StopAndCopy => {
            e.downtime_ms = t.ms(t.memory) + state_pause;
            e.total_ms = e.downtime_ms;
            e.bytes = (t.memory + t.state) as u64;
            e.converges = e.downtime_ms <= t.target_ms;
        }
        Mode::Postcopy => {
            e.downtime_ms = state_pause;
            e.fault_period_ms = t.ms(t.memory);
            e.total_ms = state_pause + e.fault_period_ms;
            e.bytes = (t.memory + t.state) as u64;
        }
        Mode::Precopy | Mode::Auto => {
            let r = precopy_rounds(t, params);
            e.rounds = r.rounds;
            e.converges = r.converged;
            if r.converged || mode == Mode::Precopy {
                e.downtime_ms = t.ms(r.remaining) + state_pause;
                e.total_ms = t.ms(r.sent) + e.downtime_ms;
                e.bytes = (r.sent + r.remaining + t.state) as u64;
            } else {
                // Auto gives up on pre-copy and post-copies what is left.
                e.downtime_ms = state_pause;
                e.fault_period_ms = t.ms(r.remaining);
                e.total_ms = t.ms(r.sent) + state_pause + e.fault_period_ms;
                e.bytes = (r.sent + r.remaining + t.state) as u64;
            }
        }
    }
    e.cost_ms = e.total_ms + m.postcopy_fault_penalty * e.fault_period_ms;
    e
}

/// The outcome of the pre-copy series.
#[derive(Debug, Clone, Copy)]
struct Rounds {
    rounds: u32,
    /// Bytes sent while the guest ran.
    sent: f64,
    /// Dirty bytes left for the pause.
    remaining: f64,
    converged: bool,
}

/// Runs the geometric series: round 1 sends all memory; each next round sends what the guest
/// dirtied during the previous one (D x its duration, at most all memory). Stops when the rest
/// fits the downtime budget (converged), or when rounds stop shrinking or hit the limit.
fn precopy_rounds(t: &Transfer, params: &Params) -> Rounds {
    let m = &params.migration;
    // Bytes that fit in the pause: the target minus the switchover, minus the state.
    let budget = t.bandwidth * (t.target_ms - m.switchover_ms).max(0.0) / 1000.0 - t.state;
    let mut r = Rounds {
        rounds: 1,
        sent: t.memory,
        remaining: (t.dirty * t.memory / t.bandwidth).min(t.memory),
        converged: false,
    };
    let mut last = t.memory;
    loop {
        if r.remaining <= budget {
            r.converged = true;
            return r;
        }
        if r.rounds >= m.precopy_max_rounds || r.remaining >= last {
            return r;
        }
        last = r.remaining;
        r.sent += r.remaining;
        r.remaining = (t.dirty * r.remaining / t.bandwidth).min(t.memory);
        r.rounds += 1;
    }
}

/// Chooses how to move `vm` over a link of `bandwidth_bytes_per_s`:
/// stop-and-copy when all of memory moves within the downtime target; else pre-copy when it
/// is predicted to converge (auto instead when the dirty rate is a large fraction of the
/// bandwidth and post-copy is allowed, as a safety net); else post-copy; and when the VM's
/// policy forbids post-copy, a forced pre-copy if its downtime stays within
/// `max_downtime_overrun` times the target, or no move at all.
pub fn choose_mode(
    vm: &Vm,
    bandwidth_bytes_per_s: f64,
    params: &Params,
) -> Result<ModeChoice, NoSafeMode> {
    select(vm, bandwidth_bytes_per_s, params).explain(params)
}

/// Which rule of [`choose_mode`] applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    FitsOutright,
    Converges,
    ThinMargin,
    NotConverging,
    ForcedOverTarget,
    Refused,
}

/// A mode decision before its reason is written (balancing evaluates many and explains few).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Selection {
    transfer: Transfer,
    stop_and_copy: Estimate,
    precopy: Estimate,
    rule: Rule,
    /// The chosen mode's estimate (for `Refused`, the forced pre-copy's).
    pub(crate) estimate: Estimate,
}

impl Selection {
    /// False when no mode is allowed to move the VM.
    pub(crate) fn is_possible(&self) -> bool {
        self.rule != Rule::Refused
    }

    /// Writes the reason.
    pub(crate) fn explain(&self, params: &Params) -> Result<ModeChoice, NoSafeMode> {
        let t = &self.transfer;
        let m = &params.migration;
        let target = Millis(t.target_ms);
        let (sc, pre, e) = (&self.stop_and_copy, &self.precopy, &self.estimate);
        let ratio = t.dirty / t.bandwidth;
        let choice = |within_target, reason| {
            Ok(ModeChoice {
                mode: e.mode,
                estimate: *e,
                within_target,
                reason,
            })
        };
        let converging = || {
            format!(
                "converges in {} rounds (dirty rate {} is {ratio:.2} of bandwidth {}), sends {} \
                 in {}, pauses {} (target {target}; stop-and-copy would pause {})",
                pre.rounds,
                Rate(t.dirty),
                Rate(t.bandwidth),
                Bytes(pre.bytes as f64),
                Millis(pre.total_ms),
                Millis(pre.downtime_ms),
                Millis(sc.downtime_ms),
            )
        };
        let why_not = || {
            if t.dirty >= t.bandwidth {
                format!(
                    "pre-copy would not converge (dirty rate {} is at least the bandwidth {})",
                    Rate(t.dirty),
                    Rate(t.bandwidth)
                )
            } else {
                format!(
                    "pre-copy would not converge (after {} rounds it still pauses {}, over the \
                     {target} target)",
                    pre.rounds,
                    Millis(pre.downtime_ms)
                )
            }
        };
        match self.rule {
            Rule::FitsOutright => choice(
                true,
                format!(
                    "stop-and-copy: all {} moves in {}, within the {target} downtime target",
                    Bytes(t.memory),
                    Millis(sc.downtime_ms),
                ),
            ),
            Rule::Converges => choice(true, format!("pre-copy: {}", converging())),
            Rule::ThinMargin => choice(
                true,
                format!(
                    "auto: pre-copy {}, but a dirty/bandwidth ratio of {ratio:.2} (at least \
                     {:.2}) leaves a thin margin, so it may switch to post-copy if rounds stop \
                     shrinking",
                    converging(),
                    m.auto_mode_ratio
                ),
            ),
            Rule::NotConverging => choice(
                true,
                format!(
                    "post-copy: {}; post-copy pauses {}, sends {} once and the guest faults in \
                     missing pages for {}",
                    why_not(),
                    Millis(e.downtime_ms),
                    Bytes(e.bytes as f64),
                    Millis(e.fault_period_ms),
                ),
            ),
            Rule::ForcedOverTarget => choice(
                false,
                format!(
                    "pre-copy over target: {} and the VM's policy forbids post-copy; forcing the \
                     stop pauses {}, over the target but within {:.1}x of it",
                    why_not(),
                    Millis(pre.downtime_ms),
                    m.max_downtime_overrun
                ),
            ),
            Rule::Refused => Err(NoSafeMode {
                reason: format!(
                    "no safe mode: {}, the VM's policy forbids post-copy, and forcing the stop \
                     would pause {}, more than {:.1}x the {target} target",
                    why_not(),
                    Millis(pre.downtime_ms),
                    m.max_downtime_overrun
                ),
                estimate: *pre,
            }),
        }
    }
}

/// The rules of [`choose_mode`], without writing the reason.
pub(crate) fn select(vm: &Vm, bandwidth_bytes_per_s: f64, params: &Params) -> Selection {
    let t = Transfer::new(vm, bandwidth_bytes_per_s, params);
    let m = &params.migration;
    let sc = estimate_transfer(Mode::StopAndCopy, &t, params);
    let pre = if sc.converges {
        sc
    } else {
        estimate_transfer(Mode::Precopy, &t, params)
    };
    let (rule, estimate) = if sc.converges {
        (Rule::FitsOutright, sc)
    } else if pre.converges {
        if vm.policy.allow_postcopy && t.dirty / t.bandwidth >= m.auto_mode_ratio {
            (
                Rule::ThinMargin,
                Estimate {
                    mode: Mode::Auto,
                    ..pre
                },
            )
        } else {
            (Rule::Converges, pre)
        }
    } else if vm.policy.allow_postcopy {
        (
            Rule::NotConverging,
            estimate_transfer(Mode::Postcopy, &t, params),
        )
    } else if pre.downtime_ms <= t.target_ms * m.max_downtime_overrun {
        (Rule::ForcedOverTarget, pre)
    } else {
        (Rule::Refused, pre)
    };
    Selection {
        transfer: t,
        stop_and_copy: sc,
        precopy: pre,
        rule,
        estimate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const BW: f64 = GIB as f64;

    fn vm(memory: u64, dirty: f64) -> Vm {
        Vm {
            dirty_rate_bytes_per_s: dirty,
            ..Vm::new("v", "h1", 2, memory)
        }
    }

    fn choose(vm: &Vm) -> ModeChoice {
        choose_mode(vm, BW, &Params::default()).unwrap()
    }

    #[test]
    fn small_idle_vm_is_stop_and_copy() {
        let c = choose(&vm(128 * MIB, 0.0));
        assert_eq!(c.mode, Mode::StopAndCopy);
        assert!(c.estimate.downtime_ms < 300.0 && c.estimate.downtime_ms > 125.0);
        assert_eq!(
            c.reason,
            "stop-and-copy: all 128 MiB moves in 135 ms, within the 300 ms downtime target"
        );
    }

    #[test]
    fn big_vm_with_low_dirty_rate_is_precopy() {
        let c = choose(&vm(16 * GIB, 50.0 * MIB as f64));
        assert_eq!(c.mode, Mode::Precopy, "{}", c.reason);
        assert!(c.within_target && c.estimate.converges);
        assert!(c.estimate.downtime_ms <= 300.0);
        assert!(c.estimate.rounds >= 2);
        assert!(
            c.reason.starts_with("pre-copy: converges in"),
            "{}",
            c.reason
        );
        assert!(
            c.reason.contains("stop-and-copy would pause 16.0 s"),
            "{}",
            c.reason
        );
    }

    #[test]
    fn dirty_rate_above_bandwidth_is_postcopy() {
        let c = choose(&vm(4 * GIB, 2.0 * BW));
        assert_eq!(c.mode, Mode::Postcopy);
        assert!(c.estimate.downtime_ms < 20.0);
        assert_eq!(c.estimate.bytes, 4 * GIB + 96 * 1024);
        assert!(
            c.reason.starts_with(
                "post-copy: pre-copy would not converge (dirty rate 2 GiB/s is at least the \
                 bandwidth 1 GiB/s)"
            ),
            "{}",
            c.reason
        );
    }

    #[test]
    fn thin_margin_is_auto() {
        // D/B = 0.8: converges (2 GiB, 0.8^n shrinks under the budget) but barely.
        let c = choose(&vm(2 * GIB, 0.8 * BW));
        assert_eq!(c.mode, Mode::Auto, "{}", c.reason);
        assert!(c.estimate.converges);
        assert!(c.reason.contains("thin margin"));
    }

    #[test]
    fn postcopy_forbidden_forces_precopy_or_refuses() {
        let params = Params::default();
        // Slowly converging: after 30 rounds a modest set remains -> forced pre-copy.
        let mut v = vm(GIB, 0.97 * BW);
        v.policy.allow_postcopy = false;
        let c = choose_mode(&v, BW, &params).unwrap();
        assert_eq!(c.mode, Mode::Precopy);
        assert!(!c.within_target);
        assert!(c.estimate.downtime_ms > 300.0 && c.estimate.downtime_ms <= 1200.0);
        assert!(
            c.reason.starts_with("pre-copy over target:"),
            "{}",
            c.reason
        );
        assert!(c.reason.contains("forbids post-copy"));

        // Dirty rate above bandwidth: the forced pause is all of memory -> no move.
        let mut v = vm(8 * GIB, 2.0 * BW);
        v.policy.allow_postcopy = false;
        let err = choose_mode(&v, BW, &params).unwrap_err();
        assert!(err.reason.starts_with("no safe mode:"), "{}", err.reason);
        assert!(err.estimate.downtime_ms > 8000.0);
    }

    #[test]
    fn precopy_bytes_follow_the_geometric_series() {
        // D/B = 1/2, M = 1 GiB: rounds send M, M/2, M/4, ... until the rest fits
        // B x (300 - 10) ms - state, i.e. about 290 MiB: M, M/2 sent; M/4 = 256 MiB left.
        let p = Params::default();
        let e = estimate(Mode::Precopy, &vm(GIB, 0.5 * BW), BW, &p);
        assert!(e.converges);
        assert_eq!(e.rounds, 2);
        let expected_sent = GIB as f64 * (1.0 + 0.5);
        let remaining = GIB as f64 * 0.25;
        let state = STATE_BASE_BYTES + 2.0 * STATE_PER_VCPU_BYTES;
        assert_eq!(e.bytes, (expected_sent + remaining + state) as u64);
        // Sum of the series in closed form: M (1 - r^n) / (1 - r).
        let closed = GIB as f64 * (1.0 - 0.5f64.powi(3)) / 0.5;
        assert!(((expected_sent + remaining) - closed).abs() < 1.0);
        assert!((e.downtime_ms - (250.0 + state / BW * 1000.0 + 10.0)).abs() < 1e-6);
        assert!((e.total_ms - (1500.0 + e.downtime_ms)).abs() < 1e-6);
    }

    #[test]
    fn costs_per_mode_are_consistent() {
        let p = Params::default();
        let v = vm(4 * GIB, 0.1 * BW);
        let sc = estimate(Mode::StopAndCopy, &v, BW, &p);
        let pre = estimate(Mode::Precopy, &v, BW, &p);
        let post = estimate(Mode::Postcopy, &v, BW, &p);
        assert!(sc.downtime_ms > pre.downtime_ms && pre.downtime_ms > post.downtime_ms);
        assert!(pre.bytes > post.bytes && post.bytes == sc.bytes);
        assert!((post.cost_ms - post.total_ms * 1.5).abs() < 20.0);
        assert_eq!(sc.cost_ms, sc.total_ms);
        // Auto on a non-converging VM: one full round, then post-copies the rest.
        let hot = vm(4 * GIB, 2.0 * BW);
        let auto = estimate(Mode::Auto, &hot, BW, &p);
        assert!(!auto.converges);
        assert_eq!(auto.rounds, 1);
        assert!(auto.bytes > 2 * 4 * GIB && auto.downtime_ms < 20.0);
    }

    #[test]
    fn policy_bandwidth_cap_applies() {
        let mut v = vm(GIB, 0.0);
        v.policy.max_bandwidth_bytes_per_s = Some(BW / 4.0);
        let e = estimate(Mode::StopAndCopy, &v, BW, &Params::default());
        assert_eq!(e.bandwidth_bytes_per_s, BW / 4.0);
        assert!(e.downtime_ms > 4000.0);
    }

    #[test]
    fn per_vm_downtime_target_is_used() {
        let mut v = vm(GIB, 0.0);
        assert_eq!(choose(&v).mode, Mode::Precopy);
        v.policy.downtime_target_ms = Some(2000);
        assert_eq!(choose(&v).mode, Mode::StopAndCopy);
    }
}
