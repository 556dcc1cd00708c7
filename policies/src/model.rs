//! The typed snapshot every policy decides on: hosts, the VMs on them, and how each VM may
//! be migrated.
//!
//! The orchestrator fills [`Host`] and [`Vm`] from what agents report and wraps them in a
//! [`ClusterView`](crate::view::ClusterView), which validates them with the checks here.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::params::Params;
use crate::rebinding::{Resource, TargetCapabilities};

/// One load measurement of a host: the fraction of its CPU capacity busy, at a time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoadSample {
    /// When it was taken, ms on the orchestrator's clock.
    pub at_ms: u64,
    /// Busy fraction of the host's CPU capacity (0-1; above 1 means runnable work waited).
    pub load: f64,
}

/// A host as the orchestrator last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    /// Unique name, also the host's id.
    pub name: String,
    /// Whether its agent answers; a down host is neither a source nor a target.
    pub up: bool,
    /// Cordoned by an operator: no new VM is placed there and no migration goes there; its
    /// VMs may leave (a drain moves them all).
    #[serde(default)]
    pub cordoned: bool,
    /// Labels VMs can require (`zone=a`, `cpu=avx512`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// CPU capacity in cores.
    pub cpu_cores: f64,
    /// Memory the host has for guests, bytes.
    pub memory_total_bytes: u64,
    /// Memory still free for guests, bytes (already net of the VMs running there).
    pub memory_free_bytes: u64,
    /// Recent load samples, oldest first, newest last.
    #[serde(default)]
    pub load_samples: Vec<LoadSample>,
    /// Load of the host itself (agent, kernel, anything not a VM), as a ratio of capacity.
    /// When absent, it is inferred as the part of the newest sample the VMs do not explain.
    #[serde(default)]
    pub own_load: Option<f64>,
    /// Measured migration bandwidth to other hosts, by host name, bytes/s.
    #[serde(default)]
    pub bandwidth_to: BTreeMap<String, f64>,
    /// Bandwidth to hosts not in `bandwidth_to`, bytes/s; else the policy default.
    #[serde(default)]
    pub default_bandwidth_bytes_per_s: Option<f64>,
    /// Migrations this host currently takes part in, as source or target.
    #[serde(default)]
    pub migrations_in_flight: u32,
    /// Disk space free for VM resources (disk images, scratch data), bytes. Unknown is 0: a
    /// host that does not say takes no resource data, only global references.
    #[serde(default)]
    pub disk_free_bytes: u64,
    /// Device classes the host offers VMs (`entropy`, `gpu`), matched exactly.
    #[serde(default)]
    pub device_classes: BTreeSet<String>,
    /// Whether the host's backend binds VM resources at all (its capabilities say); default
    /// true. A host whose backend cannot takes no VM with resources, new or migrating.
    #[serde(default = "yes")]
    pub binds_resources: bool,
}

fn yes() -> bool {
    true
}

impl Host {
    /// An up, idle host with all its memory free and nothing else set: no free disk for
    /// resources and no devices (VMs without resources do not care).
    pub fn new(name: impl Into<String>, cpu_cores: f64, memory_total_bytes: u64) -> Self {
        Self {
            name: name.into(),
            up: true,
            cordoned: false,
            labels: BTreeMap::new(),
            cpu_cores,
            memory_total_bytes,
            memory_free_bytes: memory_total_bytes,
            load_samples: Vec::new(),
            own_load: None,
            bandwidth_to: BTreeMap::new(),
            default_bandwidth_bytes_per_s: None,
            migrations_in_flight: 0,
            disk_free_bytes: 0,
            device_classes: BTreeSet::new(),
            binds_resources: true,
        }
    }

    /// What this host offers a migrating VM's resources, as the rebinding table sees it. The
    /// snapshot has no facts on reachability, so the source is taken to export and the host
    /// to reach it: GR is possible wherever the VM's spec allows it.
    pub fn capabilities(&self) -> TargetCapabilities {
        TargetCapabilities {
            device_classes: self.device_classes.clone(),
            binds_resources: self.binds_resources,
            ..TargetCapabilities::new(self.disk_free_bytes)
        }
    }

    /// Migration bandwidth from this host to `target`: measured, else this host's default,
    /// else the policy default.
    pub fn bandwidth_to(&self, target: &str, params: &Params) -> f64 {
        self.bandwidth_to
            .get(target)
            .copied()
            .or(self.default_bandwidth_bytes_per_s)
            .unwrap_or(params.migration.default_bandwidth_bytes_per_s)
    }

    /// Whether this host carries every label in `selector` with the same value.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.is_empty()
            || selector
                .iter()
                .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
    }
}

/// How a VM may be migrated (after KubeVirt's MigrationPolicy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrationPolicy {
    /// False pins the VM: no balancing move touches it. Default true.
    pub migratable: bool,
    /// Whether post-copy (and Auto, which may switch to it) may be used. Post-copy always
    /// converges but leaves the VM split across hosts if the source or link fails mid-way.
    /// Default true.
    pub allow_postcopy: bool,
    /// Longest acceptable pause, ms; else the policy default.
    pub downtime_target_ms: Option<u64>,
    /// Cap on the bandwidth one migration of this VM may use, bytes/s.
    pub max_bandwidth_bytes_per_s: Option<f64>,
}

impl Default for MigrationPolicy {
    fn default() -> Self {
        Self {
            migratable: true,
            allow_postcopy: true,
            downtime_target_ms: None,
            max_bandwidth_bytes_per_s: None,
        }
    }
}

/// A running VM as the orchestrator last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    /// Unique name.
    pub name: String,
    /// Name of the host it runs on.
    pub host: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// CPU it used recently (an average), cores.
    pub cpu_usage_cores: f64,
    /// Rate at which it dirties memory, measured from the dirty log, bytes/s.
    #[serde(default)]
    pub dirty_rate_bytes_per_s: f64,
    /// How it may be migrated.
    #[serde(default)]
    pub policy: MigrationPolicy,
    /// When it last finished a migration, ms.
    #[serde(default)]
    pub last_moved_ms: Option<u64>,
    /// When it finished its recent migrations, ms, oldest first (the orchestrator may trim
    /// entries older than the anti-thrash window).
    #[serde(default)]
    pub move_history_ms: Vec<u64>,
    /// VMs sharing an affinity group prefer to run together.
    #[serde(default)]
    pub affinity_group: Option<String>,
    /// No two VMs sharing an anti-affinity group ever run on one host.
    #[serde(default)]
    pub anti_affinity_group: Option<String>,
    /// Labels a host must carry to run it.
    #[serde(default)]
    pub required_labels: BTreeMap<String, String>,
    /// Resources it uses; a host is a target only if every one can be bound there
    /// ([`rebinding::eligible`](crate::rebinding::eligible)).
    #[serde(default)]
    pub resources: Vec<Resource>,
}

impl Vm {
    /// An idle VM with a default policy and no history, groups, label requirements or
    /// resources.
    pub fn new(
        name: impl Into<String>,
        host: impl Into<String>,
        vcpus: u32,
        memory_bytes: u64,
    ) -> Self {
        Self {
            name: name.into(),
            host: host.into(),
            vcpus,
            memory_bytes,
            cpu_usage_cores: 0.0,
            dirty_rate_bytes_per_s: 0.0,
            policy: MigrationPolicy::default(),
            last_moved_ms: None,
            move_history_ms: Vec::new(),
            affinity_group: None,
            anti_affinity_group: None,
            required_labels: BTreeMap::new(),
            resources: Vec::new(),
        }
    }

    /// Its last migration, from `last_moved_ms` or the history, whichever is later.
    pub fn last_moved(&self) -> Option<u64> {
        self.last_moved_ms
            .max(self.move_history_ms.iter().copied().max())
    }
}

/// Why a snapshot cannot be used.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ModelError {
    /// Two hosts share a name.
    #[error("Host {0:?} appears twice in the snapshot")]
    DuplicateHost(String),
    /// Two VMs share a name.
    #[error("VM {0:?} appears twice in the snapshot")]
    DuplicateVm(String),
    /// A VM names a host that is not in the snapshot.
    #[error("VM {vm:?} runs on host {host:?}, which is not in the snapshot")]
    UnknownHost {
        /// The VM.
        vm: String,
        /// The host it names.
        host: String,
    },
    /// A number is out of range (NaN, negative, zero capacity, free above total...).
    #[error("{subject} has {field} = {value}; it must be {expected}")]
    BadValue {
        /// `host "h1"` or `VM "web-1"`.
        subject: String,
        /// The field.
        field: &'static str,
        /// The value, formatted.
        value: String,
        /// What it must be.
        expected: &'static str,
    },
}

pub(crate) fn bad(
    subject: String,
    field: &'static str,
    value: impl ToString,
    expected: &'static str,
) -> ModelError {
    ModelError::BadValue {
        subject,
        field,
        value: value.to_string(),
        expected,
    }
}

fn finite_non_negative(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

pub(crate) fn validate_host(h: &Host) -> Result<(), ModelError> {
    let who = || format!("Host {:?}", h.name);
    if h.name.is_empty() {
        return Err(bad("A host".into(), "name", "\"\"", "non-empty"));
    }
    if !(h.cpu_cores.is_finite() && h.cpu_cores > 0.0) {
        return Err(bad(
            who(),
            "cpu_cores",
            h.cpu_cores,
            "a positive number of cores",
        ));
    }
    if h.memory_free_bytes > h.memory_total_bytes {
        return Err(bad(
            who(),
            "memory_free_bytes",
            h.memory_free_bytes,
            "at most memory_total_bytes",
        ));
    }
    if let Some(own) = h.own_load {
        if !finite_non_negative(own) {
            return Err(bad(who(), "own_load", own, "a finite ratio, zero or more"));
        }
    }
    let mut prev = 0;
    for s in &h.load_samples {
        if !finite_non_negative(s.load) {
            return Err(bad(
                who(),
                "load_samples.load",
                s.load,
                "a finite ratio, zero or more",
            ));
        }
        if s.at_ms < prev {
            return Err(bad(
                who(),
                "load_samples.at_ms",
                s.at_ms,
                "non-decreasing (oldest first)",
            ));
        }
        prev = s.at_ms;
    }
    for &bw in h
        .bandwidth_to
        .values()
        .chain(&h.default_bandwidth_bytes_per_s)
    {
        if !(bw.is_finite() && bw > 0.0) {
            return Err(bad(
                who(),
                "bandwidth",
                bw,
                "a positive number of bytes per second",
            ));
        }
    }
    Ok(())
}

pub(crate) fn validate_vm(vm: &Vm) -> Result<(), ModelError> {
    let who = || format!("VM {:?}", vm.name);
    if vm.name.is_empty() {
        return Err(bad("A VM".into(), "name", "\"\"", "non-empty"));
    }
    if vm.vcpus == 0 {
        return Err(bad(who(), "vcpus", 0, "at least 1"));
    }
    if !finite_non_negative(vm.cpu_usage_cores) {
        return Err(bad(
            who(),
            "cpu_usage_cores",
            vm.cpu_usage_cores,
            "finite, zero or more",
        ));
    }
    if !finite_non_negative(vm.dirty_rate_bytes_per_s) {
        return Err(bad(
            who(),
            "dirty_rate_bytes_per_s",
            vm.dirty_rate_bytes_per_s,
            "finite, zero or more",
        ));
    }
    if let Some(bw) = vm.policy.max_bandwidth_bytes_per_s {
        if !(bw.is_finite() && bw > 0.0) {
            return Err(bad(
                who(),
                "policy.max_bandwidth_bytes_per_s",
                bw,
                "a positive number of bytes per second",
            ));
        }
    }
    if vm.policy.downtime_target_ms == Some(0) {
        return Err(bad(who(), "policy.downtime_target_ms", 0, "at least 1 ms"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn vm(name: &str, host: &str, cpu: f64) -> Vm {
        Vm {
            cpu_usage_cores: cpu,
            ..Vm::new(name, host, 2, GIB)
        }
    }

    #[test]
    fn bandwidth_falls_back_to_host_then_policy_default() {
        let p = Params::default();
        let mut h = Host::new("h1", 4.0, GIB);
        assert_eq!(
            h.bandwidth_to("h2", &p),
            p.migration.default_bandwidth_bytes_per_s
        );
        h.default_bandwidth_bytes_per_s = Some(5e8);
        h.bandwidth_to.insert("h3".into(), 2e9);
        assert_eq!(h.bandwidth_to("h2", &p), 5e8);
        assert_eq!(h.bandwidth_to("h3", &p), 2e9);
    }

    #[test]
    fn resource_facts_default_to_none_and_feed_the_capabilities() {
        let h: Host = serde_json::from_str(
            r#"{"name": "h1", "up": true, "cpu_cores": 4, "memory_total_bytes": 1024,
                "memory_free_bytes": 1024}"#,
        )
        .unwrap();
        assert_eq!(h, Host::new("h1", 4.0, 1024));
        assert_eq!((h.disk_free_bytes, h.device_classes.len()), (0, 0));
        let mut h = h;
        h.disk_free_bytes = 5 * GIB;
        h.device_classes.insert("entropy".into());
        let caps = h.capabilities();
        assert_eq!(caps.disk_free_bytes, 5 * GIB);
        assert!(caps.device_classes.contains("entropy"));
        assert!(caps.can_reach_source && caps.source_can_export);
        let vm: Vm = serde_json::from_str(
            r#"{"name": "a", "host": "h1", "vcpus": 1, "memory_bytes": 1024,
                "cpu_usage_cores": 0.5,
                "resources": [{"name": "root", "kind": "disk", "size_bytes": 1024}]}"#,
        )
        .unwrap();
        assert_eq!(vm.resources[0].size_bytes, 1024);
        assert!(vm.resources[0].allow_global_ref);
    }

    #[test]
    fn last_moved_takes_the_latest_of_both_fields() {
        let mut v = vm("a", "h1", 0.0);
        assert_eq!(v.last_moved(), None);
        v.move_history_ms = vec![10, 50];
        v.last_moved_ms = Some(20);
        assert_eq!(v.last_moved(), Some(50));
    }
}
