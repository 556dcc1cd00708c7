//! What the balancer decides: the moves to make, and notes on everything it considered and
//! did not do, each with a reason class (for metrics and filtering) and a sentence (for
//! people).

use std::fmt;

use serde::Serialize;

use crate::cost::{Estimate, Mode};
use crate::load::LoadStats;

/// Why something was, or was not, done. Stable snake_case names suit metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonClass {
    /// A host is hot.
    Hotspot,
    /// The cluster's load is unbalanced.
    Imbalance,
    /// Nothing crosses a threshold: a host is not hot, or the cluster is balanced.
    BelowThreshold,
    /// No host can take the VM (labels, memory, cores, load, resources it cannot bind).
    NoTarget,
    /// The VM moved too recently or too often.
    AntiThrash,
    /// A per-host or cluster migration limit is reached.
    ConcurrencyLimit,
    /// Affinity or anti-affinity rules leave no target.
    AffinityRule,
    /// The move's gain does not pay for its migration.
    CostExceedsGain,
    /// The VM's policy pins it.
    NotMigratable,
    /// No migration mode the VM's policy allows stays within its downtime limits.
    NoSafeMode,
    /// The host is down.
    HostDown,
    /// The host's load samples are too old to judge by.
    StaleSamples,
}

impl ReasonClass {
    /// The snake_case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReasonClass::Hotspot => "hotspot",
            ReasonClass::Imbalance => "imbalance",
            ReasonClass::BelowThreshold => "below_threshold",
            ReasonClass::NoTarget => "no_target",
            ReasonClass::AntiThrash => "anti_thrash",
            ReasonClass::ConcurrencyLimit => "concurrency_limit",
            ReasonClass::AffinityRule => "affinity_rule",
            ReasonClass::CostExceedsGain => "cost_exceeds_gain",
            ReasonClass::NotMigratable => "not_migratable",
            ReasonClass::NoSafeMode => "no_safe_mode",
            ReasonClass::HostDown => "host_down",
            ReasonClass::StaleSamples => "stale_samples",
        }
    }
}

impl fmt::Display for ReasonClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something considered, with what came of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The kind of reason.
    pub class: ReasonClass,
    /// The host it is about, if any.
    pub host: Option<String>,
    /// The VM it is about, if any.
    pub vm: Option<String>,
    /// The reason, in a sentence or two.
    pub reason: String,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.class, self.reason)
    }
}

/// What a move is predicted to gain.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gain {
    /// Source load before and after.
    pub source_load: (f64, f64),
    /// Target load before and after.
    pub target_load: (f64, f64),
    /// Cluster imbalance (stddev of host loads) before and after this move.
    pub imbalance: (f64, f64),
    /// How much the load gap between source and target narrows.
    pub gap_narrowing: f64,
    /// How much of a hot source's load above the threshold the move removes.
    pub overload_removed: f64,
    /// The gain the move is judged by: the larger of the two above.
    pub value: f64,
    /// What it had to reach: the minimum gain plus the charge for its migration time.
    pub required: f64,
}

impl Gain {
    /// How much the cluster's imbalance drops.
    pub fn imbalance_reduction(&self) -> f64 {
        self.imbalance.0 - self.imbalance.1
    }
}

/// One planned migration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Move {
    /// The VM.
    pub vm: String,
    /// Its host now.
    pub from: String,
    /// Where it goes.
    pub to: String,
    /// How to migrate it.
    pub mode: Mode,
    /// What triggered it: [`ReasonClass::Hotspot`] or [`ReasonClass::Imbalance`].
    pub class: ReasonClass,
    /// Predicted gain.
    pub gain: Gain,
    /// Predicted cost.
    pub cost: Estimate,
    /// Why this VM, this target and this mode.
    pub reason: String,
}

impl fmt::Display for Move {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "move {} {} -> {} ({}): {}",
            self.vm, self.from, self.to, self.mode, self.reason
        )
    }
}

/// The balancer's decision for one round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Migrations to start, in order. Their effects compose: each was chosen on the loads the
    /// earlier ones leave.
    pub moves: Vec<Move>,
    /// Things considered and not done, and the triggers found.
    pub notes: Vec<Decision>,
    /// Hosts found hot, hottest first.
    pub hot_hosts: Vec<String>,
    /// Load statistics now.
    pub before: LoadStats,
    /// Load statistics once the moves are done.
    pub after: LoadStats,
}

impl Plan {
    /// True when nothing is to be moved.
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// Notes of one class.
    pub fn notes_of(&self, class: ReasonClass) -> impl Iterator<Item = &Decision> + '_ {
        self.notes.iter().filter(move |d| d.class == class)
    }

    /// One line: how many moves, hot hosts, and the imbalance before and after.
    pub fn summary(&self) -> String {
        format!(
            "{} move{}, {} hot host{}, imbalance {:.3} -> {:.3} (mean load {:.2}), {} note{}",
            self.moves.len(),
            plural(self.moves.len()),
            self.hot_hosts.len(),
            plural(self.hot_hosts.len()),
            self.before.stddev,
            self.after.stddev,
            self.before.mean,
            self.notes.len(),
            plural(self.notes.len()),
        )
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary())?;
        for m in &self.moves {
            writeln!(f, "  {m}")?;
        }
        for n in &self.notes {
            writeln!(f, "  {n}")?;
        }
        Ok(())
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
