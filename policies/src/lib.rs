//! Godwit's control-plane policies: pure decision logic over typed snapshots.
//!
//! Nothing here does I/O, reads a clock or starts a thread: the orchestrator builds a
//! [`ClusterView`] from what its agents report, passes the time in as `now_ms`, and gets back
//! decisions that each carry a sentence saying why.
//!
//! - [`place`]: which host runs a new VM ([`Placement`], or [`PlacementError`] listing why
//!   every host was rejected).
//! - [`plan()`]: this round's migrations ([`Plan`]: [`Move`]s plus [`Decision`] notes on
//!   everything considered and not done).
//! - [`choose_mode`]: how to migrate one VM over one link ([`ModeChoice`]), from the cost
//!   model in [`cost`].
//! - [`hotspot::assess`] / [`hotspot::detect`]: which hosts are hot.
//! - [`load`]: host loads, the imbalance, and loads projected after hypothetical moves.
//! - [`rebinding`]: what becomes of each of a VM's resources (disk, endpoint, scratch,
//!   device) when it migrates: MV, CP, GR or RB per the classic table ([`rebinding::choose`],
//!   [`rebinding::choose_all`]), and whether a target can bind them all
//!   ([`rebinding::eligible`]).
//!
//! Tunables live in [`Params`], readable from TOML with every field optional.
//!
//! ```
//! use policies::{plan, ClusterView, Host, LoadSample, Mode, Params, Vm};
//!
//! const GIB: u64 = 1 << 30;
//! let now_ms = 100_000;
//! // h1 has run at 90% of its 4 cores for the last five samples; h2 is idle.
//! let mut h1 = Host::new("h1", 4.0, 64 * GIB);
//! h1.load_samples = (0..5)
//!     .map(|i| LoadSample { at_ms: now_ms - 4_000 + i * 1_000, load: 0.9 })
//!     .collect();
//! let vms = (0..3)
//!     .map(|i| Vm { cpu_usage_cores: 1.2, ..Vm::new(format!("web-{i}"), "h1", 2, 2 * GIB) })
//!     .collect();
//! let view = ClusterView::new(vec![h1, Host::new("h2", 4.0, 64 * GIB)], vms, 0).unwrap();
//!
//! let plan = plan(&view, &Params::default(), now_ms);
//! assert_eq!(plan.hot_hosts, ["h1"]);
//! let m = &plan.moves[0];
//! assert_eq!((m.vm.as_str(), m.from.as_str(), m.to.as_str()), ("web-0", "h1", "h2"));
//! assert_eq!(m.mode, Mode::Precopy);
//! assert!(m.reason.starts_with("h1 is hot (load 0.90 > 0.75): web-0 (1.20 cores, 2 GiB)"));
//! assert!(plan.after.stddev < plan.before.stddev);
//! ```
#![forbid(unsafe_code)]

pub mod balance;
pub mod cost;
mod fxhash;
pub mod hotspot;
pub mod load;
pub mod model;
pub mod params;
pub mod placement;
pub mod plan;
pub mod rebinding;
mod units;
pub mod view;

pub use balance::plan;
pub use cost::{choose_mode, estimate, Estimate, Mode, ModeChoice, NoSafeMode};
pub use hotspot::{Heat, HotspotVerdict};
pub use load::{cluster_stats, LoadStats, Projection};
pub use model::{Host, LoadSample, MigrationPolicy, ModelError, Vm};
pub use params::{Params, ParamsError};
pub use placement::{place, Placement, PlacementError, VmRequest};
pub use plan::{Decision, Gain, Move, Plan, ReasonClass};
pub use rebinding::{
    Action, Attachment, Binding, Choice, Refusal, Resource, ResourceKind, TargetCapabilities,
    Unbindable,
};
pub use view::ClusterView;
