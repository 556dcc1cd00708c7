//! Tunables of every policy, with the defaults an operator gets when a value is left out.
//!
//! `Params` is read from the orchestrator's TOML config: every section and every field may be
//! omitted (`#[serde(default)]`), unknown fields are an error so that a typo is not silently
//! ignored, and [`Params::validate`] checks ranges before the orchestrator starts deciding.
//! Units are in the field names: `_ms` milliseconds, `_bytes` bytes, loads are ratios of a
//! host's CPU capacity (0-1, may exceed 1 when overcommitted). The crate README has them all
//! in one table.
//!
//! ```toml
//! [hotspot]
//! threshold = 0.8
//! [limits]
//! max_migrations_cluster = 10
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;

const GIB: f64 = (1u64 << 30) as f64;

/// All policy tunables, grouped the way they appear in the TOML config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// When a host counts as hot.
    pub hotspot: HotspotParams,
    /// When the cluster counts as unbalanced and when a move is worth it.
    pub balance: BalanceParams,
    /// How often one VM may be moved.
    pub anti_thrash: AntiThrashParams,
    /// How many migrations may run at once.
    pub limits: LimitParams,
    /// The migration cost model and mode selection.
    pub migration: MigrationParams,
    /// Where new VMs go.
    pub placement: PlacementParams,
}

/// Hotspot detection (Sandpiper): k of the last n samples above the threshold, and a trend
/// that does not predict the load falling back under it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HotspotParams {
    /// Load ratio above which a sample counts as hot; also the ceiling a balancing move must
    /// keep its target under. Default 0.75.
    pub threshold: f64,
    /// Samples (of the last `window`) that must exceed the threshold. Default 3.
    pub k: usize,
    /// How many of the newest samples are looked at. Default 5.
    pub window: usize,
    /// How far ahead the least-squares trend over the window is extrapolated, in ms. A host
    /// whose trend predicts a load under the threshold by then is cooling, not hot.
    /// Default 10,000 (10 s).
    pub trend_horizon_ms: u64,
    /// Samples whose newest one is older than this (relative to `now_ms`) are stale and make
    /// no verdict. Default 60,000 (60 s).
    pub max_sample_age_ms: u64,
}

impl Default for HotspotParams {
    fn default() -> Self {
        Self {
            threshold: 0.75,
            k: 3,
            window: 5,
            trend_horizon_ms: 10_000,
            max_sample_age_ms: 60_000,
        }
    }
}

/// Imbalance (VMware DRS) and the cost/benefit rule for accepting a move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalanceParams {
    /// Standard deviation of host loads above which the cluster is unbalanced. Default 0.10.
    pub imbalance_target: f64,
    /// Smallest gain a move must bring, as a load ratio: the narrowing of the load gap between
    /// its source and target, or the part of a hot source's overload it removes. Default 0.05.
    pub min_gain: f64,
    /// Extra gain demanded per minute of predicted migration time (including the post-copy
    /// fault penalty), so an expensive move must be worth more. Default 0.02.
    pub gain_per_migration_minute: f64,
    /// How many VMs of one source host are tried, best benefit/cost first. Default 8.
    pub vm_candidates: usize,
    /// How many feasible target hosts (coolest first) are compared for one VM. Default 16.
    pub target_candidates: usize,
    /// How many hosts are examined at most when looking for those targets. Default 512.
    pub target_scan_limit: usize,
}

impl Default for BalanceParams {
    fn default() -> Self {
        Self {
            imbalance_target: 0.10,
            min_gain: 0.05,
            gain_per_migration_minute: 0.02,
            vm_candidates: 8,
            target_candidates: 16,
            target_scan_limit: 512,
        }
    }
}

/// Anti-thrash: a VM that moved recently, or often, stays where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AntiThrashParams {
    /// A VM is not moved again within this long of its last move, in ms. Default 600,000
    /// (10 min).
    pub min_move_interval_ms: u64,
    /// Sliding window for `max_moves_per_window`, in ms. Default 3,600,000 (1 h).
    pub move_window_ms: u64,
    /// A VM that moved this many times within the window is not moved. Default 3.
    pub max_moves_per_window: u32,
}

impl Default for AntiThrashParams {
    fn default() -> Self {
        Self {
            min_move_interval_ms: 600_000,
            move_window_ms: 3_600_000,
            max_moves_per_window: 3,
        }
    }
}

/// Concurrency limits (KubeVirt's parallel migration limits), counting migrations already in
/// flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitParams {
    /// Migrations a host may take part in at once, as source or target. Default 2.
    pub max_migrations_per_host: u32,
    /// Migrations in the whole cluster at once. Default 5.
    pub max_migrations_cluster: u32,
}

impl Default for LimitParams {
    fn default() -> Self {
        Self {
            max_migrations_per_host: 2,
            max_migrations_cluster: 5,
        }
    }
}

/// Migration cost model and mode selection (see `cost`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationParams {
    /// Bandwidth assumed between two hosts when none was measured, bytes/s. Default 1 GiB/s.
    pub default_bandwidth_bytes_per_s: f64,
    /// Downtime target for VMs whose policy sets none, ms. Default 300.
    pub default_downtime_target_ms: u64,
    /// Fixed cost of the switchover (pause, handshake, resume), ms. Default 10.
    pub switchover_ms: f64,
    /// Pre-copy rounds after which a migration that has not converged is forced to stop.
    /// Default 30.
    pub precopy_max_rounds: u32,
    /// Dirty rate / bandwidth ratio above which a converging pre-copy runs as Auto (falls back
    /// to post-copy if rounds stop shrinking) when the VM allows post-copy. Default 0.7.
    pub auto_mode_ratio: f64,
    /// The post-copy fault period (the guest runs while its pages arrive) counts this fraction
    /// of its length as extra cost. Default 0.5.
    pub postcopy_fault_penalty: f64,
    /// When post-copy is forbidden and pre-copy will not converge, a forced pre-copy is still
    /// used if its predicted downtime is at most this multiple of the target; beyond it the VM
    /// is not moved. Default 4.0.
    pub max_downtime_overrun: f64,
}

impl Default for MigrationParams {
    fn default() -> Self {
        Self {
            default_bandwidth_bytes_per_s: GIB,
            default_downtime_target_ms: 300,
            switchover_ms: 10.0,
            precopy_max_rounds: 30,
            auto_mode_ratio: 0.7,
            postcopy_fault_penalty: 0.5,
            max_downtime_overrun: 4.0,
        }
    }
}

/// Placement of new VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementParams {
    /// A host whose projected load with the new VM would exceed this is not chosen.
    /// Default 0.9.
    pub max_load: f64,
    /// Memory kept free on every host, bytes; a VM fits when its memory is at most the host's
    /// free memory minus this. Also applies to balancing targets. Default 256 MiB.
    pub memory_reserve_bytes: u64,
    /// Weight of CPU headroom (1 - projected load) in a host's score. Default 0.7.
    pub cpu_weight: f64,
    /// Weight of the free-memory fraction left after placing in a host's score. Default 0.3.
    pub memory_weight: f64,
    /// Score bonus for a host already running a member of the VM's affinity group.
    /// Default 0.25.
    pub affinity_bonus: f64,
}

impl Default for PlacementParams {
    fn default() -> Self {
        Self {
            max_load: 0.9,
            memory_reserve_bytes: 256 << 20,
            cpu_weight: 0.7,
            memory_weight: 0.3,
            affinity_bonus: 0.25,
        }
    }
}

/// A parameter outside its valid range.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("Policy parameter {field} is {value}; it must be {expected}")]
pub struct ParamsError {
    /// Dotted path of the field, as in the TOML config.
    pub field: &'static str,
    /// The offending value, formatted.
    pub value: String,
    /// What it must be.
    pub expected: &'static str,
}

impl Params {
    /// Checks every range; the orchestrator calls this once after reading its config.
    pub fn validate(&self) -> Result<(), ParamsError> {
        let h = &self.hotspot;
        let b = &self.balance;
        let m = &self.migration;
        let p = &self.placement;
        ratio(
            "hotspot.threshold",
            h.threshold,
            "between 0 and 1 (exclusive of 0)",
        )?;
        positive_count("hotspot.window", h.window)?;
        if h.k == 0 || h.k > h.window {
            return Err(ParamsError {
                field: "hotspot.k",
                value: h.k.to_string(),
                expected: "at least 1 and at most hotspot.window",
            });
        }
        non_negative("balance.imbalance_target", b.imbalance_target)?;
        non_negative("balance.min_gain", b.min_gain)?;
        non_negative(
            "balance.gain_per_migration_minute",
            b.gain_per_migration_minute,
        )?;
        positive_count("balance.vm_candidates", b.vm_candidates)?;
        positive_count("balance.target_candidates", b.target_candidates)?;
        positive_count("balance.target_scan_limit", b.target_scan_limit)?;
        if !(m.default_bandwidth_bytes_per_s.is_finite() && m.default_bandwidth_bytes_per_s > 0.0) {
            return Err(ParamsError {
                field: "migration.default_bandwidth_bytes_per_s",
                value: m.default_bandwidth_bytes_per_s.to_string(),
                expected: "a positive number of bytes per second",
            });
        }
        if m.default_downtime_target_ms == 0 {
            return Err(ParamsError {
                field: "migration.default_downtime_target_ms",
                value: "0".into(),
                expected: "at least 1 ms",
            });
        }
        non_negative("migration.switchover_ms", m.switchover_ms)?;
        if m.precopy_max_rounds == 0 {
            return Err(ParamsError {
                field: "migration.precopy_max_rounds",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        ratio(
            "migration.auto_mode_ratio",
            m.auto_mode_ratio,
            "between 0 and 1",
        )?;
        non_negative("migration.postcopy_fault_penalty", m.postcopy_fault_penalty)?;
        if !(m.max_downtime_overrun.is_finite() && m.max_downtime_overrun >= 1.0) {
            return Err(ParamsError {
                field: "migration.max_downtime_overrun",
                value: m.max_downtime_overrun.to_string(),
                expected: "at least 1.0",
            });
        }
        if !(p.max_load.is_finite() && p.max_load > 0.0) {
            return Err(ParamsError {
                field: "placement.max_load",
                value: p.max_load.to_string(),
                expected: "a positive load ratio",
            });
        }
        non_negative("placement.cpu_weight", p.cpu_weight)?;
        non_negative("placement.memory_weight", p.memory_weight)?;
        non_negative("placement.affinity_bonus", p.affinity_bonus)?;
        Ok(())
    }
}

fn ratio(field: &'static str, v: f64, expected: &'static str) -> Result<(), ParamsError> {
    if v.is_finite() && v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(ParamsError {
            field,
            value: v.to_string(),
            expected,
        })
    }
}

fn non_negative(field: &'static str, v: f64) -> Result<(), ParamsError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(ParamsError {
            field,
            value: v.to_string(),
            expected: "a finite number, zero or more",
        })
    }
}

fn positive_count(field: &'static str, v: usize) -> Result<(), ParamsError> {
    if v > 0 {
        Ok(())
    } else {
        Err(ParamsError {
            field,
            value: v.to_string(),
            expected: "at least 1",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Params::default().validate().unwrap();
    }

    #[test]
    fn empty_toml_gives_defaults() {
        let p: Params = toml::from_str("").unwrap();
        assert_eq!(p, Params::default());
    }

    #[test]
    fn partial_toml_overrides_only_what_it_names() {
        let p: Params =
            toml::from_str("[hotspot]\nthreshold = 0.8\n[limits]\nmax_migrations_cluster = 10\n")
                .unwrap();
        assert_eq!(p.hotspot.threshold, 0.8);
        assert_eq!(p.hotspot.k, 3);
        assert_eq!(p.limits.max_migrations_cluster, 10);
        assert_eq!(p.limits.max_migrations_per_host, 2);
        assert_eq!(p.balance, BalanceParams::default());
    }

    #[test]
    fn unknown_field_is_an_error() {
        let err = toml::from_str::<Params>("[hotspot]\nthreshhold = 0.8\n").unwrap_err();
        assert!(err.to_string().contains("threshhold"), "{err}");
    }

    #[test]
    fn round_trips_through_toml() {
        let p = Params::default();
        let text = toml::to_string(&p).unwrap();
        assert_eq!(toml::from_str::<Params>(&text).unwrap(), p);
    }

    #[test]
    fn validate_rejects_k_above_window() {
        let mut p = Params::default();
        p.hotspot.k = 6;
        let err = p.validate().unwrap_err();
        assert_eq!(err.field, "hotspot.k");
        assert_eq!(
            err.to_string(),
            "Policy parameter hotspot.k is 6; it must be at least 1 and at most hotspot.window"
        );
    }

    #[test]
    fn validate_rejects_bad_threshold_and_bandwidth() {
        let mut p = Params::default();
        p.hotspot.threshold = 1.5;
        assert_eq!(p.validate().unwrap_err().field, "hotspot.threshold");
        let mut p = Params::default();
        p.migration.default_bandwidth_bytes_per_s = 0.0;
        assert_eq!(
            p.validate().unwrap_err().field,
            "migration.default_bandwidth_bytes_per_s"
        );
    }
}
