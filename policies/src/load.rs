//! Host loads, the cluster's imbalance, and loads projected after hypothetical moves.
//!
//! A host's load is its VMs' CPU usage over its capacity plus its own load (see
//! [`ClusterView::load`]). The imbalance is the standard deviation of the loads of the hosts
//! that are up, as in VMware DRS. [`Projection`] applies moves to a copy of the loads and keeps
//! the running sums, so the balancer can ask "what would the imbalance be after this move?" in
//! constant time.

use std::fmt;

use serde::Serialize;
use thiserror::Error;

use crate::fxhash::FxHashMap;
use crate::view::ClusterView;

/// Mean and spread of the loads of the hosts that are up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LoadStats {
    /// Hosts counted (those up).
    pub hosts: usize,
    /// Mean load.
    pub mean: f64,
    /// Population standard deviation of the loads: the imbalance.
    pub stddev: f64,
}

impl LoadStats {
    /// Stats of a set of loads.
    pub fn of(loads: impl IntoIterator<Item = f64>) -> Self {
        let (mut n, mut sum, mut sumsq) = (0usize, 0.0, 0.0);
        for l in loads {
            n += 1;
            sum += l;
            sumsq += l * l;
        }
        Self::from_sums(n, sum, sumsq)
    }

    fn from_sums(n: usize, sum: f64, sumsq: f64) -> Self {
        if n == 0 {
            return Self {
                hosts: 0,
                mean: 0.0,
                stddev: 0.0,
            };
        }
        let mean = sum / n as f64;
        let var = (sumsq / n as f64 - mean * mean).max(0.0);
        Self {
            hosts: n,
            mean,
            stddev: var.sqrt(),
        }
    }
}

impl fmt::Display for LoadStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mean load {:.2}, imbalance (stddev) {:.3} over {} hosts",
            self.mean, self.stddev, self.hosts
        )
    }
}

/// Imbalance of the cluster as it is now.
pub fn cluster_stats(view: &ClusterView) -> LoadStats {
    LoadStats::of(
        view.hosts()
            .iter()
            .zip(view.loads())
            .filter(|(h, _)| h.up)
            .map(|(_, &l)| l),
    )
}

/// A move a projection cannot apply.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ProjectionError {
    /// No VM by that name.
    #[error("VM {0:?} is not in the snapshot")]
    UnknownVm(String),
    /// No host by that name.
    #[error("Host {0:?} is not in the snapshot")]
    UnknownHost(String),
}

/// Host loads after a sequence of hypothetical moves.
#[derive(Debug, Clone)]
pub struct Projection<'v> {
    view: &'v ClusterView,
    load: Vec<f64>,
    /// Where moved VMs are now (VM index -> host index).
    moved: FxHashMap<u32, u32>,
    n: usize,
    sum: f64,
    sumsq: f64,
}

impl<'v> Projection<'v> {
    /// Loads as they are in the snapshot.
    pub fn new(view: &'v ClusterView) -> Self {
        let mut p = Self {
            view,
            load: view.loads().to_vec(),
            moved: FxHashMap::default(),
            n: 0,
            sum: 0.0,
            sumsq: 0.0,
        };
        for (h, &l) in view.hosts().iter().zip(&p.load) {
            if h.up {
                p.n += 1;
                p.sum += l;
                p.sumsq += l * l;
            }
        }
        p
    }

    /// Moves the named VM (from wherever it is in this projection) to the named host.
    pub fn apply(&mut self, vm: &str, to: &str) -> Result<(), ProjectionError> {
        let v = self
            .view
            .vms()
            .iter()
            .position(|x| x.name == vm)
            .ok_or_else(|| ProjectionError::UnknownVm(vm.into()))? as u32;
        let t = self
            .view
            .host_index(to)
            .ok_or_else(|| ProjectionError::UnknownHost(to.into()))?;
        let from = self.location(v);
        self.move_cpu(from, t, self.view.vm_at(v).cpu_usage_cores);
        self.moved.insert(v, t);
        Ok(())
    }

    /// Projected load of the named host.
    pub fn load(&self, host: &str) -> Option<f64> {
        self.view.host_index(host).map(|h| self.load[h as usize])
    }

    /// Projected imbalance.
    pub fn stats(&self) -> LoadStats {
        LoadStats::from_sums(self.n, self.sum, self.sumsq)
    }

    /// Where VM `v` runs in this projection.
    pub(crate) fn location(&self, v: u32) -> u32 {
        self.moved
            .get(&v)
            .copied()
            .unwrap_or_else(|| self.view.host_of(v))
    }

    pub(crate) fn load_at(&self, h: u32) -> f64 {
        self.load[h as usize]
    }

    /// Loads of `from` and `to` after moving `cores` of CPU usage between them.
    pub(crate) fn loads_after(&self, from: u32, to: u32, cores: f64) -> (f64, f64) {
        let (f, t) = (self.view.host_at(from), self.view.host_at(to));
        (
            (self.load[from as usize] - cores / f.cpu_cores).max(0.0),
            self.load[to as usize] + cores / t.cpu_cores,
        )
    }

    /// Imbalance after moving `cores` from `from` to `to`, without applying it.
    pub(crate) fn stats_after(&self, from: u32, to: u32, cores: f64) -> LoadStats {
        let (sum, sumsq) = self.sums_after(from, to, cores);
        LoadStats::from_sums(self.n, sum, sumsq)
    }

    fn sums_after(&self, from: u32, to: u32, cores: f64) -> (f64, f64) {
        let (lf, lt) = (self.load[from as usize], self.load[to as usize]);
        let (nf, nt) = self.loads_after(from, to, cores);
        let (mut sum, mut sumsq) = (self.sum, self.sumsq);
        if self.view.host_at(from).up {
            sum += nf - lf;
            sumsq += nf * nf - lf * lf;
        }
        if self.view.host_at(to).up {
            sum += nt - lt;
            sumsq += nt * nt - lt * lt;
        }
        (sum, sumsq)
    }

    pub(crate) fn move_cpu(&mut self, from: u32, to: u32, cores: f64) {
        if from == to {
            return;
        }
        let (sum, sumsq) = self.sums_after(from, to, cores);
        let (nf, nt) = self.loads_after(from, to, cores);
        self.sum = sum;
        self.sumsq = sumsq;
        self.load[from as usize] = nf;
        self.load[to as usize] = nt;
    }

    /// Records that VM `v` now runs on `to` (after `move_cpu`).
    pub(crate) fn record_location(&mut self, v: u32, to: u32) {
        self.moved.insert(v, to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Host, Vm};

    const GIB: u64 = 1 << 30;

    fn view() -> ClusterView {
        let mut down = Host::new("h3", 4.0, GIB);
        down.up = false;
        let vms = [
            ("a", "h1", 3.0),
            ("b", "h1", 1.0),
            ("c", "h2", 1.0),
            ("d", "h3", 4.0),
        ]
        .into_iter()
        .map(|(n, h, cpu)| Vm {
            cpu_usage_cores: cpu,
            ..Vm::new(n, h, 4, GIB)
        })
        .collect();
        ClusterView::new(
            vec![Host::new("h1", 4.0, GIB), Host::new("h2", 4.0, GIB), down],
            vms,
            0,
        )
        .unwrap()
    }

    #[test]
    fn stats_of_known_values() {
        let s = LoadStats::of([0.2, 0.4, 0.6, 0.8]);
        assert_eq!(s.hosts, 4);
        assert!((s.mean - 0.5).abs() < 1e-12);
        assert!((s.stddev - 0.05f64.sqrt()).abs() < 1e-12);
        assert_eq!(LoadStats::of([]).stddev, 0.0);
    }

    #[test]
    fn cluster_stats_skip_down_hosts() {
        let s = cluster_stats(&view());
        assert_eq!(s.hosts, 2);
        assert!((s.mean - 0.625).abs() < 1e-12); // (1.0 + 0.25) / 2
        assert!((s.stddev - 0.375).abs() < 1e-12);
    }

    #[test]
    fn projection_composes_moves_and_tracks_stats() {
        let view = view();
        let mut p = Projection::new(&view);
        p.apply("b", "h2").unwrap();
        assert!((p.load("h1").unwrap() - 0.75).abs() < 1e-12);
        assert!((p.load("h2").unwrap() - 0.5).abs() < 1e-12);
        // "b" is now on h2: moving it again starts from there.
        p.apply("b", "h1").unwrap();
        assert!((p.load("h1").unwrap() - 1.0).abs() < 1e-12);
        p.apply("a", "h2").unwrap();
        let s = p.stats();
        let exact = LoadStats::of([p.load("h1").unwrap(), p.load("h2").unwrap()]);
        assert!((s.mean - exact.mean).abs() < 1e-12);
        assert!((s.stddev - exact.stddev).abs() < 1e-12);
        // h1 0.25, h2 1.0: the same spread as before, mirrored.
        assert!((s.stddev - 0.375).abs() < 1e-12);
        assert!(p.apply("zz", "h1").is_err());
        assert!(p.apply("a", "h9").is_err());
    }

    #[test]
    fn stats_after_matches_applying() {
        let view = view();
        let mut p = Projection::new(&view);
        let predicted = p.stats_after(0, 1, 1.0);
        p.move_cpu(0, 1, 1.0);
        assert_eq!(predicted, p.stats());
        assert!(predicted.stddev < cluster_stats(&view).stddev);
    }
}
