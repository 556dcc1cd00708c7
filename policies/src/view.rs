//! A validated, indexed snapshot: what placement and balancing read.
//!
//! The orchestrator builds a [`ClusterView`] from [`Host`]s and [`Vm`]s once per decision
//! round. Building it validates the data (so a policy never sees a NaN load or a VM on an
//! unknown host) and indexes it (VMs by host, group members by host, hosts by label), so that
//! no policy scans all VMs for each host.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::fxhash::{FxHashMap as HashMap, FxHasher};
use crate::model::{validate_host, validate_vm, Host, ModelError, Vm};

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
    /// Hosts running members of each affinity group, ascending.
    affinity_hosts: HashMap<u32, Vec<u32>>,
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
        let mut host_by_name = HashMap::with_capacity_and_hasher(hosts.len(), Default::default());
        let mut hosts_by_label: HashMap<String, HashMap<String, Vec<u32>>> = HashMap::default();
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

        let mut vm_host = Vec::with_capacity(vms.len());
        let mut vm_count = vec![0u32; hosts.len() + 1];
        let mut vm_cpu = vec![0.0f64; hosts.len()];
        let mut group_by_name: HashMap<String, u32> = HashMap::default();
        let mut vm_affinity = Vec::with_capacity(vms.len());
        let mut vm_anti_affinity = Vec::with_capacity(vms.len());
        let mut affinity_members = HashMap::default();
        let mut anti_affinity_members = HashMap::default();
        let mut name_keys = Vec::with_capacity(vms.len());
        for (i, vm) in vms.iter().enumerate() {
            validate_vm(vm)?;
            name_keys.push((hash_str(&vm.name), i as u32));
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
                let id = match group_by_name.get(g.as_str()) {
                    Some(&id) => id,
                    None => {
                        let id = group_by_name.len() as u32;
                        group_by_name.insert(g.clone(), id);
                        id
                    }
                };
                *members.entry((id, h)).or_insert(0) += 1;
                id
            };
            vm_affinity.push(intern(&vm.affinity_group, &mut affinity_members));
            vm_anti_affinity.push(intern(&vm.anti_affinity_group, &mut anti_affinity_members));
        }
        if let Some(dup) = first_duplicate(&vms, name_keys) {
            return Err(ModelError::DuplicateVm(dup.to_string()));
        }
        let mut affinity_hosts: HashMap<u32, Vec<u32>> = HashMap::default();
        for &(g, h) in affinity_members.keys() {
            affinity_hosts.entry(g).or_default().push(h);
        }
        for hosts in affinity_hosts.values_mut() {
            hosts.sort_unstable();
        }

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
            affinity_hosts,
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
        let (a, b) = (
            self.host_vm_start[h as usize],
            self.host_vm_start[h as usize + 1],
        );
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

    /// Hosts running members of affinity group `g` in the snapshot, ascending.
    pub(crate) fn affinity_hosts(&self, g: u32) -> &[u32] {
        self.affinity_hosts.get(&g).map_or(&[], Vec::as_slice)
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

fn hash_str(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = FxHasher::default();
    s.hash(&mut h);
    h.finish()
}

/// A VM name that appears twice, if any, given (name hash, index) for every VM. Sorting the
/// pairs and comparing names only where hashes are equal is faster than a hash set for
/// 200,000 VMs: the sort runs over a dense array instead of probing a table at random.
fn first_duplicate(vms: &[Vm], mut keyed: Vec<(u64, u32)>) -> Option<&str> {
    keyed.sort_unstable();
    for run in keyed.chunk_by(|a, b| a.0 == b.0).filter(|r| r.len() > 1) {
        for (i, a) in run.iter().enumerate() {
            let name = &vms[a.1 as usize].name;
            if run[i + 1..].iter().any(|b| vms[b.1 as usize].name == *name) {
                return Some(name);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoadSample;

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
            LoadSample {
                at_ms: 0,
                load: 0.2,
            },
            LoadSample {
                at_ms: 1000,
                load: 0.7,
            },
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
        h.load_samples = vec![LoadSample {
            at_ms: 5,
            load: f64::NAN,
        }];
        assert!(ClusterView::new(vec![h.clone()], vec![], 0).is_err());
        h.load_samples = vec![
            LoadSample {
                at_ms: 5,
                load: 0.1,
            },
            LoadSample {
                at_ms: 4,
                load: 0.1,
            },
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
        let view =
            ClusterView::new(vec![Host::new("h1", 4.0, GIB)], vec![vm("a", "h1", 1.0)], 2).unwrap();
        let json = serde_json::to_string(&view).unwrap();
        let back: ClusterView = serde_json::from_str(&json).unwrap();
        assert_eq!(back.vms(), view.vms());
        assert_eq!(back.migrations_in_flight(), 2);
        let broken = json.replace("\"host\":\"h1\"", "\"host\":\"h9\"");
        assert!(serde_json::from_str::<ClusterView>(&broken).is_err());
    }
}
