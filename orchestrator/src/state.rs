//! What the orchestrator knows: agents (from heartbeats and polls) with their load history,
//! VM records (placed here or found on agents), migrations it drove, and the balancer's
//! state. VM records and migrations are written through to the store.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use godwit_api::{
    BalancerMode, BalancerState, ClusterCreateVm, ClusterHost, ClusterMigration, ClusterVm,
    Decision, HostInfo, MigrationStatus, VmInfo, VmState,
};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::OrchError;
use crate::metrics::Metrics;
use crate::store::Store;

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One agent as last heard from.
#[derive(Debug, Clone)]
pub struct Agent {
    pub name: String,
    pub url: String,
    pub last_seen: Instant,
    pub host: HostInfo,
    pub vms: Vec<VmInfo>,
    /// (Unix ms, load) newest last.
    pub samples: VecDeque<(u64, f64)>,
}

impl Agent {
    /// `host:port` of the agent's API, for agent-to-agent calls.
    pub fn address(&self) -> &str {
        self.url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
    }
}

/// A VM the orchestrator keeps a record of (persisted).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmRecord {
    pub spec: ClusterCreateVm,
    pub host: String,
    pub moves: Vec<u64>,
    pub created_unix_ms: u64,
    pub placement_reason: String,
}

#[derive(Debug)]
pub struct State {
    pub config: Config,
    pub store: Store,
    pub metrics: Metrics,
    agents: Mutex<BTreeMap<String, Agent>>,
    vms: Mutex<BTreeMap<String, VmRecord>>,
    migrations: Mutex<BTreeMap<String, ClusterMigration>>,
    /// Hosts an operator cordoned (persisted).
    cordoned: Mutex<std::collections::BTreeSet<String>>,
    /// Each host's last drain.
    pub drains: Mutex<BTreeMap<String, godwit_api::DrainStatus>>,
    pub balancer: Mutex<BalancerState>,
    pub http: reqwest::Client,
    /// Each host's agent URL, once a heartbeat's URL was found to lead to that host's agent.
    pub verified_urls: Mutex<BTreeMap<String, String>>,
}

impl State {
    /// Loads the records of an earlier run.
    /// `client` is how it calls agents (its host certificate, or plain HTTP).
    pub fn new(
        config: Config,
        store: Store,
        client: &godwit_daemon::client::ClientAuth,
    ) -> Result<Self, OrchError> {
        let vms: Vec<VmRecord> = store.vms().map_err(OrchError::store)?;
        let migrations: Vec<ClusterMigration> = store.migrations().map_err(OrchError::store)?;
        let mode: BalancerMode = store
            .meta("balancer_mode")
            .map_err(OrchError::store)?
            .unwrap_or(config.balancer);
        tracing::info!(
            vms = vms.len(),
            migrations = migrations.len(),
            ?mode,
            "records loaded"
        );
        let cordoned: std::collections::BTreeSet<String> = store
            .meta("cordoned_hosts")
            .map_err(OrchError::store)?
            .unwrap_or_default();
        let http = client
            .client(Duration::from_secs(30))
            .map_err(|e| OrchError::Internal(format!("Cannot build an HTTP client: {e}")))?;
        let state = State {
            metrics: Metrics::new(),
            store,
            agents: Mutex::new(BTreeMap::new()),
            vms: Mutex::new(vms.into_iter().map(|v| (v.spec.name.clone(), v)).collect()),
            migrations: Mutex::new(migrations.into_iter().map(|m| (m.id.clone(), m)).collect()),
            cordoned: Mutex::new(cordoned),
            drains: Mutex::new(BTreeMap::new()),
            balancer: Mutex::new(BalancerState {
                mode,
                imbalance: 0.0,
                hot_hosts: vec![],
                last_run_unix_ms: 0,
                runs: 0,
            }),
            http,
            verified_urls: Mutex::new(BTreeMap::new()),
            config,
        };
        Ok(state)
    }

    /// Records what an agent reported (heartbeat or poll).
    pub fn observe(&self, url: &str, host: HostInfo, vms: Vec<VmInfo>) {
        let now = now_unix_ms();
        let capacity = self.capacity(&host);
        let used: f64 = vms
            .iter()
            .filter(|v| v.state == VmState::Running)
            .map(|v| v.cpu_usage_cores)
            .sum();
        // An empty sum of f64 is -0.0; loads are never negative.
        let load = (used / capacity.max(0.01)).max(0.0);
        let name = host.name.clone();
        {
            let mut agents = lock(&self.agents);
            let agent = agents.entry(name.clone()).or_insert_with(|| {
                tracing::info!(agent = %name, %url, "agent joined");
                Agent {
                    name: name.clone(),
                    url: url.to_owned(),
                    last_seen: Instant::now(),
                    host: host.clone(),
                    vms: vec![],
                    samples: VecDeque::new(),
                }
            });
            agent.url = url.to_owned();
            agent.last_seen = Instant::now();
            // Heartbeats and polls both report; keep one sample per half poll interval.
            let fresh = agent
                .samples
                .back()
                .is_none_or(|(t, _)| now.saturating_sub(*t) >= self.config.poll_interval_ms / 2);
            if fresh {
                agent.samples.push_back((now, load));
                while agent.samples.len() > self.config.load_history {
                    agent.samples.pop_front();
                }
            }
            agent.host = host;
            agent.vms = vms.clone();
        }
        self.reconcile_vms(&name, &vms);
    }

    /// Follows VMs to where they run: a VM reported running (not mid-migration) by an agent
    /// lives there; a VM nobody placed is adopted.
    fn reconcile_vms(&self, agent: &str, vms: &[VmInfo]) {
        let mut records = lock(&self.vms);
        for vm in vms {
            let settled = vm.state == VmState::Running && !vm.migrating;
            match records.get_mut(&vm.name) {
                Some(record) if settled && record.host != agent => {
                    tracing::info!(vm = %vm.name, from = %record.host, to = %agent, "VM found on another host");
                    record.host = agent.to_owned();
                    let _ = self.store.put_vm(&vm.name, record);
                }
                Some(_) => {}
                None => {
                    let record = VmRecord {
                        spec: ClusterCreateVm {
                            name: vm.name.clone(),
                            vcpus: vm.vcpus,
                            memory_mib: vm.memory_mib,
                            guest: vm.guest.spec.clone(),
                            host: None,
                            require_labels: BTreeMap::new(),
                            affinity_group: None,
                            anti_affinity_group: None,
                            allow_postcopy: true,
                            downtime_ms: None,
                            pinned: false,
                            resources: vm.resources.iter().map(|r| r.spec.clone()).collect(),
                        },
                        host: agent.to_owned(),
                        moves: vec![],
                        created_unix_ms: now_unix_ms(),
                        placement_reason: format!("found running on {agent}"),
                    };
                    tracing::info!(vm = %vm.name, %agent, "adopted a VM the agent reports");
                    let _ = self.store.put_vm(&vm.name, &record);
                    records.insert(vm.name.clone(), record);
                }
            }
        }
    }

    /// Capacity the balancer assumes for a host, cores: the agent's `cpu_capacity` label, the
    /// config's `host_capacity_cores`, or the host's cores.
    pub fn capacity(&self, host: &HostInfo) -> f64 {
        host.labels
            .get("cpu_capacity")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|c| *c > 0.0)
            .or((self.config.host_capacity_cores > 0.0).then_some(self.config.host_capacity_cores))
            .unwrap_or(f64::from(host.cores.max(1)))
    }

    pub fn is_up(&self, agent: &Agent) -> bool {
        agent.last_seen.elapsed() <= Duration::from_millis(self.config.agent_timeout_ms)
    }

    pub fn agents(&self) -> Vec<Agent> {
        lock(&self.agents).values().cloned().collect()
    }

    pub fn agent(&self, name: &str) -> Result<Agent, OrchError> {
        lock(&self.agents)
            .get(name)
            .cloned()
            .ok_or_else(|| OrchError::NotFound(format!("No host named {name:?} has registered")))
    }

    pub fn up_agent(&self, name: &str) -> Result<Agent, OrchError> {
        let agent = self.agent(name)?;
        if !self.is_up(&agent) {
            return Err(OrchError::Unavailable(format!(
                "Host {name:?} is down (last heard from {:.1} s ago)",
                agent.last_seen.elapsed().as_secs_f64()
            )));
        }
        Ok(agent)
    }

    pub fn host_view(&self, agent: &Agent, hot: &[String]) -> ClusterHost {
        ClusterHost {
            name: agent.name.clone(),
            url: agent.url.clone(),
            up: self.is_up(agent),
            last_seen_ms_ago: agent.last_seen.elapsed().as_millis() as u64,
            capacity_cores: self.capacity(&agent.host),
            load: agent.samples.back().map(|(_, l)| *l).unwrap_or(0.0),
            load_samples: agent.samples.iter().map(|(_, l)| *l).collect(),
            hot: hot.contains(&agent.name),
            vm_count: agent.host.vm_count,
            memory_total_mib: agent.host.memory_total_mib,
            memory_vms_mib: agent.host.memory_vms_mib,
            labels: agent.host.labels.clone(),
            cordoned: self.is_cordoned(&agent.name),
            info: Some(agent.host.clone()),
        }
    }

    pub fn is_cordoned(&self, host: &str) -> bool {
        lock(&self.cordoned).contains(host)
    }

    /// Cordons (`true`) or uncordons a host, and writes the set to the store.
    pub fn set_cordoned(&self, host: &str, cordoned: bool) -> Result<(), OrchError> {
        let mut set = lock(&self.cordoned);
        let changed = if cordoned {
            set.insert(host.to_owned())
        } else {
            set.remove(host)
        };
        if changed {
            self.store
                .set_meta("cordoned_hosts", &*set)
                .map_err(OrchError::store)?;
            tracing::info!(host, cordoned, "host cordon changed");
        }
        Ok(())
    }

    /// Forgets a host (`godwit host rm`): refused while it runs VMs or VM records place VMs
    /// there.
    pub fn forget_agent(&self, name: &str) -> Result<(), OrchError> {
        let agent = self.agent(name)?;
        let running: Vec<String> = agent.vms.iter().map(|v| v.name.clone()).collect();
        let recorded: Vec<String> = lock(&self.vms)
            .values()
            .filter(|r| r.host == name)
            .map(|r| r.spec.name.clone())
            .collect();
        if !running.is_empty() || !recorded.is_empty() {
            let mut all = running;
            all.extend(recorded);
            all.sort();
            all.dedup();
            return Err(OrchError::Conflict(format!(
                "Host {name} still runs VMs ({}); drain it or delete them first",
                all.join(", ")
            )));
        }
        lock(&self.agents).remove(name);
        lock(&self.drains).remove(name);
        self.set_cordoned(name, false)?;
        let _ = self.metrics.agent_up.remove_label_values(&[name]);
        let _ = self.metrics.host_load.remove_label_values(&[name]);
        let _ = self.metrics.host_hot.remove_label_values(&[name]);
        let _ = self.metrics.host_cordoned.remove_label_values(&[name]);
        tracing::info!(host = name, "host forgotten");
        Ok(())
    }

    pub fn vm_records(&self) -> BTreeMap<String, VmRecord> {
        lock(&self.vms).clone()
    }

    pub fn vm_record(&self, name: &str) -> Result<VmRecord, OrchError> {
        lock(&self.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| OrchError::NotFound(format!("No VM named {name:?} in the cluster")))
    }

    pub fn put_vm(&self, record: VmRecord) -> Result<(), OrchError> {
        self.store
            .put_vm(&record.spec.name, &record)
            .map_err(OrchError::store)?;
        lock(&self.vms).insert(record.spec.name.clone(), record);
        Ok(())
    }

    pub fn remove_vm(&self, name: &str) -> Result<(), OrchError> {
        self.store.remove_vm(name).map_err(OrchError::store)?;
        lock(&self.vms).remove(name);
        Ok(())
    }

    /// The API view of a VM: its record plus what its agent reports.
    pub fn vm_view(&self, record: &VmRecord) -> ClusterVm {
        let agents = lock(&self.agents);
        let info = agents
            .get(&record.host)
            .and_then(|a| a.vms.iter().find(|v| v.name == record.spec.name).cloned());
        ClusterVm {
            name: record.spec.name.clone(),
            host: record.host.clone(),
            reported: info.is_some(),
            spec: record.spec.clone(),
            info,
            moves: record.moves.clone(),
            created_unix_ms: record.created_unix_ms,
            placement_reason: record.placement_reason.clone(),
        }
    }

    /// Records a migration in memory and in the store.
    pub fn put_migration(&self, m: ClusterMigration) {
        if let Err(e) = self.store.put_migration(&m.id, &m) {
            tracing::error!(error = %e, "cannot record a migration");
        }
        lock(&self.migrations).insert(m.id.clone(), m);
    }

    /// Updates a running migration's live statistics in memory only: the store keeps its
    /// start and its end, not every poll.
    pub fn refresh_migration(&self, m: ClusterMigration) {
        lock(&self.migrations).insert(m.id.clone(), m);
    }

    pub fn migrations(&self) -> Vec<ClusterMigration> {
        let mut v: Vec<_> = lock(&self.migrations).values().cloned().collect();
        v.sort_by_key(|m| m.started_unix_ms);
        v
    }

    pub fn migration(&self, id: &str) -> Result<ClusterMigration, OrchError> {
        lock(&self.migrations)
            .get(id)
            .cloned()
            .ok_or_else(|| OrchError::NotFound(format!("No migration {id:?}")))
    }

    /// Migrations still running, by VM.
    pub fn running_migrations(&self) -> Vec<ClusterMigration> {
        lock(&self.migrations)
            .values()
            .filter(|m| m.status == MigrationStatus::Running)
            .cloned()
            .collect()
    }

    /// Records a VM's completed move.
    pub fn moved(&self, vm: &str, to: &str, at_unix_ms: u64) {
        let mut records = lock(&self.vms);
        if let Some(record) = records.get_mut(vm) {
            record.host = to.to_owned();
            record.moves.push(at_unix_ms);
            let _ = self.store.put_vm(vm, record);
        }
    }

    pub fn record_decisions(&self, decisions: &[Decision]) {
        for d in decisions {
            self.metrics
                .decisions
                .with_label_values(&[&d.action, &d.class])
                .inc();
        }
        if let Err(e) = self.store.append_decisions(decisions) {
            tracing::error!(error = %e, "cannot record decisions");
        }
    }
}
