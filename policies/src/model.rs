//! The typed snapshot every policy decides on: hosts, the VMs on them, and the migrations
//! already running.
//!
//! The orchestrator fills [`Host`] and [`Vm`] from what agents report and builds a
//! [`ClusterView`] once per decision round. Building it validates the data (so a policy never
//! sees a NaN load or a VM on an unknown host) and indexes it (VMs by host, group members by
//! host, hosts by label), so that placement and balancing never scan all VMs for each host.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::params::Params;

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
}

impl Host {
    /// An up, idle host with all its memory free and nothing else set.
    pub fn new(name: impl Into<String>, cpu_cores: f64, memory_total_bytes: u64) -> Self {
        Self {
            name: name.into(),
            up: true,
            labels: BTreeMap::new(),
            cpu_cores,
            memory_total_bytes,
            memory_free_bytes: memory_total_bytes,
            load_samples: Vec::new(),
            own_load: None,
            bandwidth_to: BTreeMap::new(),
            default_bandwidth_bytes_per_s: None,
            migrations_in_flight: 0,
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
        selector
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
}

impl Vm {
    /// An idle VM with a default policy and no history, groups or label requirements.
    pub fn new(name: impl Into<String>, host: impl Into<String>, vcpus: u32, memory_bytes: u64) -> Self {
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
        }
    }

    /// Its last migration, from `last_moved_ms` or the history, whichever is later.
    pub fn last_moved(&self) -> Option<u64> {
        self.last_moved_ms.max(self.move_history_ms.iter().copied().max())
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

/// Marks "no group" / "no index" in the dense tables.
pub(crate) const NONE: u32 = u32::MAX;

/// A validated, indexed snapshot of the cluster. Hosts and VMs keep the order they were
/// given in; policies break ties by name, never by order.
#[derive(Debug, Clone)]
pub struct ClusterView {
    hosts: Vec<Host>,
    vms: Vec<Vm>,
    migrations_in_flight: u32,
    host_by_name: HashMap<String, u32>,
    /// Host index of each VM.
    vm_host: Vec<u32>,
    /// VMs of host `h` are `host_vms[host_vm_start[h]..host_vm_start[h + 1]]`.
    host_vm_start: Vec<u32>,
    host_vms: Vec<u32>,
    /// Current load of each host (VM usage / capacity + own load).
    load: Vec<f64>,
    /// Interned group names (affinity and anti-affinity share the table).
    group_by_name: HashMap<String, u32>,
    vm_affinity: Vec<u32>,
    vm_anti_affinity: Vec<u32>,
    /// Members of (group, host), for affinity and anti-affinity groups respectively.
    affinity_members: HashMap<(u32, u32), u32>,
    anti_affinity_members: HashMap<(u32, u32), u32>,
    /// Hosts carrying label key -> value -> host indices (ascending).
    hosts_by_label: HashMap<String, HashMap<String, Vec<u32>>>,
}

impl ClusterView {
    /// Validates and indexes a snapshot.
    pub fn new(
        hosts: Vec<Host>,
        vms: Vec<Vm>,
        migrations_in_flight: u32,
    ) -> Result<Self, ModelError> {
        let mut host_by_name = HashMap::with_capacity(hosts.len());
        let mut hosts_by_label: HashMap<String, HashMap<String, Vec<u32>>> = HashMap::new();
        for (i, h) in hosts.iter().enumerate() {
            validate_host(h)?;
            if host_by_name.insert(h.name.clone(), i as u32).is_some() {
                return Err(ModelError::DuplicateHost(h.name.clone()));
            }
            for (k, v) in &h.labels {
                hosts_by_label
                    .entry(k.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default()
                    .push(i as u32);
            }
        }

        let mut vm_names = std::collections::HashSet::with_capacity(vms.len());
        let mut vm_host = Vec::with_capacity(vms.len());
        let mut vm_count = vec![0u32; hosts.len() + 1];
        let mut vm_cpu = vec![0.0f64; hosts.len()];
        let mut group_by_name: HashMap<String, u32> = HashMap::new();
        let mut vm_affinity = Vec::with_capacity(vms.len());
        let mut vm_anti_affinity = Vec::with_capacity(vms.len());
        let mut affinity_members = HashMap::new();
        let mut anti_affinity_members = HashMap::new();
        for vm in &vms {
            validate_vm(vm)?;
            if !vm_names.insert(vm.name.as_str()) {
                return Err(ModelError::DuplicateVm(vm.name.clone()));
            }
            let Some(&h) = host_by_name.get(vm.host.as_str()) else {
                return Err(ModelError::UnknownHost {
                    vm: vm.name.clone(),
                    host: vm.host.clone(),
                });
            };
            vm_host.push(h);
            vm_count[h as usize + 1] += 1;
            vm_cpu[h as usize] += vm.cpu_usage_cores;
            let mut intern = |g: &Option<String>, members: &mut HashMap<(u32, u32), u32>| {
                let Some(g) = g else { return NONE };
                let next = group_by_name.len() as u32;
                let id = *group_by_name.entry(g.clone()).or_insert(next);
                *members.entry((id, h)).or_insert(0) += 1;
                id
            };
            vm_affinity.push(intern(&vm.affinity_group, &mut affinity_members));
            vm_anti_affinity.push(intern(&vm.anti_affinity_group, &mut anti_affinity_members));
        }
        drop(vm_names);

        // Counting sort of VMs by host: the CSR layout keeps VMs of a host contiguous.
        for i in 1..vm_count.len() {
            vm_count[i] += vm_count[i - 1];
        }
        let host_vm_start = vm_count.clone();
        let mut host_vms = vec![0u32; vms.len()];
        for (v, &h) in vm_host.iter().enumerate() {
            let slot = &mut vm_count[h as usize];
            host_vms[*slot as usize] = v as u32;
            *slot += 1;
        }

        let load = hosts
            .iter()
            .zip(&vm_cpu)
            .map(|(h, &cpu)| {
                let vm_load = cpu / h.cpu_cores;
                let own = h.own_load.unwrap_or_else(|| {
                    h.load_samples
                        .last()
                        .map_or(0.0, |s| (s.load - vm_load).max(0.0))
                });
                vm_load + own
            })
            .collect();

        Ok(Self {
            hosts,
            vms,
            migrations_in_flight,
            host_by_name,
            vm_host,
            host_vm_start,
            host_vms,
            load,
            group_by_name,
            vm_affinity,
            vm_anti_affinity,
            affinity_members,
            anti_affinity_members,
            hosts_by_label,
        })
    }

    /// All hosts, in snapshot order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// All VMs, in snapshot order.
    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }

    /// Migrations running in the cluster now.
    pub fn migrations_in_flight(&self) -> u32 {
        self.migrations_in_flight
    }

    /// The host with this name.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.host_index(name).map(|h| &self.hosts[h as usize])
    }

    /// The VMs running on the named host (none for an unknown host).
    pub fn vms_on(&self, host: &str) -> impl Iterator<Item = &Vm> + '_ {
        let ids = self.host_index(host).map_or(&[][..], |h| self.vm_ids_on(h));
        ids.iter().map(|&v| &self.vms[v as usize])
    }

    /// Current load of the named host: its VMs' CPU usage over its capacity plus its own
    /// load (given, or inferred from the newest sample).
    pub fn load(&self, host: &str) -> Option<f64> {
        self.host_index(host).map(|h| self.load[h as usize])
    }

    pub(crate) fn host_index(&self, name: &str) -> Option<u32> {
        self.host_by_name.get(name).copied()
    }

    pub(crate) fn host_at(&self, h: u32) -> &Host {
        &self.hosts[h as usize]
    }

    pub(crate) fn vm_at(&self, v: u32) -> &Vm {
        &self.vms[v as usize]
    }

    pub(crate) fn vm_ids_on(&self, h: u32) -> &[u32] {
        let (a, b) = (self.host_vm_start[h as usize], self.host_vm_start[h as usize + 1]);
        &self.host_vms[a as usize..b as usize]
    }

    pub(crate) fn host_of(&self, v: u32) -> u32 {
        self.vm_host[v as usize]
    }

    pub(crate) fn loads(&self) -> &[f64] {
        &self.load
    }

    pub(crate) fn group_id(&self, name: &str) -> u32 {
        self.group_by_name.get(name).copied().unwrap_or(NONE)
    }

    pub(crate) fn affinity_of(&self, v: u32) -> u32 {
        self.vm_affinity[v as usize]
    }

    pub(crate) fn anti_affinity_of(&self, v: u32) -> u32 {
        self.vm_anti_affinity[v as usize]
    }

    /// Members of affinity group `g` on host `h` in the snapshot.
    pub(crate) fn affinity_members(&self, g: u32, h: u32) -> u32 {
        if g == NONE {
            return 0;
        }
        self.affinity_members.get(&(g, h)).copied().unwrap_or(0)
    }

    /// Members of anti-affinity group `g` on host `h` in the snapshot.
    pub(crate) fn anti_affinity_members(&self, g: u32, h: u32) -> u32 {
        if g == NONE {
            return 0;
        }
        self.anti_affinity_members
            .get(&(g, h))
            .copied()
            .unwrap_or(0)
    }

    /// Hosts carrying `key=value`, ascending by index.
    pub(crate) fn hosts_with_label(&self, key: &str, value: &str) -> &[u32] {
        self.hosts_by_label
            .get(key)
            .and_then(|vals| vals.get(value))
            .map_or(&[], Vec::as_slice)
    }

    /// The smallest set of hosts that can satisfy `selector`: the hosts of its rarest label.
    /// `None` for an empty selector (any host may match).
    pub(crate) fn label_candidates(&self, selector: &BTreeMap<String, String>) -> Option<&[u32]> {
        selector
            .iter()
            .map(|(k, v)| self.hosts_with_label(k, v))
            .min_by_key(|hosts| hosts.len())
    }
}

impl Serialize for ClusterView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Snapshot {
            hosts: self.hosts.clone(),
            vms: self.vms.clone(),
            migrations_in_flight: self.migrations_in_flight,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for ClusterView {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Snapshot::deserialize(d)?;
        ClusterView::new(s.hosts, s.vms, s.migrations_in_flight).map_err(serde::de::Error::custom)
    }
}

/// The serialized form of a view (a dump for replaying a decision).
#[derive(Serialize, Deserialize)]
struct Snapshot {
    hosts: Vec<Host>,
    vms: Vec<Vm>,
    #[serde(default)]
    migrations_in_flight: u32,
}

fn bad(subject: String, field: &'static str, value: impl ToString, expected: &'static str) -> ModelError {
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

fn validate_host(h: &Host) -> Result<(), ModelError> {
    let who = || format!("Host {:?}", h.name);
    if h.name.is_empty() {
        return Err(bad("A host".into(), "name", "\"\"", "non-empty"));
    }
    if !(h.cpu_cores.is_finite() && h.cpu_cores > 0.0) {
        return Err(bad(who(), "cpu_cores", h.cpu_cores, "a positive number of cores"));
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
            return Err(bad(who(), "load_samples.load", s.load, "a finite ratio, zero or more"));
        }
        if s.at_ms < prev {
            return Err(bad(who(), "load_samples.at_ms", s.at_ms, "non-decreasing (oldest first)"));
        }
        prev = s.at_ms;
    }
    for &bw in h.bandwidth_to.values().chain(&h.default_bandwidth_bytes_per_s) {
        if !(bw.is_finite() && bw > 0.0) {
            return Err(bad(who(), "bandwidth", bw, "a positive number of bytes per second"));
        }
    }
    Ok(())
}

fn validate_vm(vm: &Vm) -> Result<(), ModelError> {
    let who = || format!("VM {:?}", vm.name);
    if vm.name.is_empty() {
        return Err(bad("A VM".into(), "name", "\"\"", "non-empty"));
    }
    if vm.vcpus == 0 {
        return Err(bad(who(), "vcpus", 0, "at least 1"));
    }
    if !finite_non_negative(vm.cpu_usage_cores) {
        return Err(bad(who(), "cpu_usage_cores", vm.cpu_usage_cores, "finite, zero or more"));
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
    fn indexes_vms_by_host_and_computes_load() {
        let mut h2 = Host::new("h2", 4.0, 16 * GIB);
        h2.own_load = Some(0.1);
        let view = ClusterView::new(
            vec![Host::new("h1", 8.0, 32 * GIB), h2],
            vec![vm("a", "h2", 1.0), vm("b", "h1", 2.0), vm("c", "h2", 1.0)],
            0,
        )
        .unwrap();
        let on_h2: Vec<_> = view.vms_on("h2").map(|v| v.name.as_str()).collect();
        assert_eq!(on_h2, ["a", "c"]);
        assert_eq!(view.vms_on("nope").count(), 0);
        assert!((view.load("h1").unwrap() - 0.25).abs() < 1e-12);
        assert!((view.load("h2").unwrap() - 0.6).abs() < 1e-12);
    }

    #[test]
    fn own_load_is_inferred_from_the_newest_sample() {
        let mut h = Host::new("h1", 4.0, 16 * GIB);
        h.load_samples = vec![
            LoadSample { at_ms: 0, load: 0.2 },
            LoadSample { at_ms: 1000, load: 0.7 },
        ];
        let view = ClusterView::new(vec![h], vec![vm("a", "h1", 2.0)], 0).unwrap();
        // VMs explain 0.5 of the newest 0.7; the host itself is taken to use the other 0.2.
        assert!((view.load("h1").unwrap() - 0.7).abs() < 1e-12);
    }

    #[test]
    fn rejects_duplicates_and_unknown_hosts() {
        let h = || Host::new("h1", 4.0, GIB);
        assert_eq!(
            ClusterView::new(vec![h(), h()], vec![], 0).unwrap_err(),
            ModelError::DuplicateHost("h1".into())
        );
        let err = ClusterView::new(vec![h()], vec![vm("a", "h1", 0.0), vm("a", "h1", 0.0)], 0)
            .unwrap_err();
        assert_eq!(err, ModelError::DuplicateVm("a".into()));
        let err = ClusterView::new(vec![h()], vec![vm("a", "h9", 0.0)], 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VM \"a\" runs on host \"h9\", which is not in the snapshot"
        );
    }

    #[test]
    fn rejects_bad_numbers_with_a_sentence() {
        let mut h = Host::new("h1", 0.0, GIB);
        let err = ClusterView::new(vec![h.clone()], vec![], 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Host \"h1\" has cpu_cores = 0; it must be a positive number of cores"
        );
        h.cpu_cores = 4.0;
        h.load_samples = vec![LoadSample { at_ms: 5, load: f64::NAN }];
        assert!(ClusterView::new(vec![h.clone()], vec![], 0).is_err());
        h.load_samples = vec![
            LoadSample { at_ms: 5, load: 0.1 },
            LoadSample { at_ms: 4, load: 0.1 },
        ];
        assert!(ClusterView::new(vec![h.clone()], vec![], 0).is_err());
        h.load_samples.clear();
        h.memory_free_bytes = 2 * GIB;
        assert!(ClusterView::new(vec![h], vec![], 0).is_err());
        let mut v = vm("a", "h1", -1.0);
        let ok_host = Host::new("h1", 4.0, GIB);
        assert!(ClusterView::new(vec![ok_host.clone()], vec![v.clone()], 0).is_err());
        v.cpu_usage_cores = 1.0;
        v.vcpus = 0;
        assert!(ClusterView::new(vec![ok_host], vec![v], 0).is_err());
    }

    #[test]
    fn group_and_label_indexes() {
        let mut h1 = Host::new("h1", 4.0, GIB);
        h1.labels.insert("zone".into(), "a".into());
        let mut h2 = Host::new("h2", 4.0, GIB);
        h2.labels.insert("zone".into(), "b".into());
        h2.labels.insert("gpu".into(), "yes".into());
        let mut a = vm("a", "h1", 0.0);
        a.anti_affinity_group = Some("db".into());
        let mut b = vm("b", "h1", 0.0);
        b.affinity_group = Some("db".into());
        let view = ClusterView::new(vec![h1, h2], vec![a, b], 0).unwrap();
        let g = view.group_id("db");
        assert_eq!(view.anti_affinity_members(g, 0), 1);
        assert_eq!(view.affinity_members(g, 0), 1);
        assert_eq!(view.anti_affinity_members(g, 1), 0);
        assert_eq!(view.hosts_with_label("zone", "b"), &[1]);
        let sel: BTreeMap<_, _> = [("zone".into(), "b".into()), ("gpu".into(), "yes".into())]
            .into_iter()
            .collect();
        assert_eq!(view.label_candidates(&sel), Some(&[1u32][..]));
        assert!(view.host("h2").unwrap().matches(&sel));
        assert!(!view.host("h1").unwrap().matches(&sel));
    }

    #[test]
    fn serde_round_trip_validates() {
        let view = ClusterView::new(vec![Host::new("h1", 4.0, GIB)], vec![vm("a", "h1", 1.0)], 2)
            .unwrap();
        let json = serde_json::to_string(&view).unwrap();
        let back: ClusterView = serde_json::from_str(&json).unwrap();
        assert_eq!(back.vms(), view.vms());
        assert_eq!(back.migrations_in_flight(), 2);
        let broken = json.replace("\"host\":\"h1\"", "\"host\":\"h9\"");
        assert!(serde_json::from_str::<ClusterView>(&broken).is_err());
    }

    #[test]
    fn bandwidth_falls_back_to_host_then_policy_default() {
        let p = Params::default();
        let mut h = Host::new("h1", 4.0, GIB);
        assert_eq!(h.bandwidth_to("h2", &p), p.migration.default_bandwidth_bytes_per_s);
        h.default_bandwidth_bytes_per_s = Some(5e8);
        h.bandwidth_to.insert("h3".into(), 2e9);
        assert_eq!(h.bandwidth_to("h2", &p), 5e8);
        assert_eq!(h.bandwidth_to("h3", &p), 2e9);
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
