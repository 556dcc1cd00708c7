//! The orchestrator's Prometheus metrics (`GET /metrics`), listed in `docs/metrics.md`.
//!
//! Cluster-wide gauges (agents, host loads, hot hosts, moves per VM) are refreshed by the agent
//! poll loop (`observe_cluster`); the balancer's own numbers at each run; decisions, migrations
//! (with what they did to each resource) and placement failures when they happen. Per-host series are labelled `host` with the
//! agent's name, the value the agents' own series carry.

use std::collections::BTreeSet;
use std::sync::Mutex;

use godwit_api::{ResourceAction, ResourceKind, ResourceMigration, ResourceStatus};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

use crate::state::{lock, State};

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub agents: GaugeVec,
    pub agent_up: GaugeVec,
    pub host_load: GaugeVec,
    pub host_hot: GaugeVec,
    pub imbalance: Gauge,
    pub hot_hosts: Gauge,
    pub balancer_runs: IntCounter,
    pub balancer_seconds: Histogram,
    pub hotspots: IntCounterVec,
    pub decisions: IntCounterVec,
    pub migrations: IntCounterVec,
    pub resource_actions: IntCounterVec,
    pub placement_failures: IntCounter,
    pub host_cordoned: GaugeVec,
    pub drains: IntCounterVec,
    pub vm_moves_in_window: GaugeVec,
    /// VMs that have a `vm_moves_in_window` series, so deleted VMs' series can go.
    moves_series: Mutex<BTreeSet<String>>,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let opts = |n: &str, h: &str| Opts::new(n, h);
        let m = Metrics {
            agents: register(
                &r,
                GaugeVec::new(
                    opts(
                        "godwit_orchestrator_agents",
                        "Registered agents by state (up: heard from within the agent timeout, down).",
                    ),
                    &["state"],
                )
                .expect("valid"),
            ),
            agent_up: register(
                &r,
                GaugeVec::new(
                    opts(
                        "godwit_orchestrator_agent_up",
                        "1 while the orchestrator hears from the host's agent within the agent \
                         timeout, 0 once it is down.",
                    ),
                    &["host"],
                )
                .expect("valid"),
            ),
            host_load: register(
                &r,
                GaugeVec::new(
                    opts(
                        "godwit_orchestrator_host_load_ratio",
                        "Latest CPU load of each host as the balancer sees it: VM CPU over the \
                         host's CPU capacity (0-1).",
                    ),
                    &["host"],
                )
                .expect("valid"),
            ),
            host_hot: register(
                &r,
                GaugeVec::new(
                    opts(
                        "godwit_orchestrator_host_hot",
                        "1 if the last balancer run found the host hot, else 0.",
                    ),
                    &["host"],
                )
                .expect("valid"),
            ),
            imbalance: register(
                &r,
                Gauge::new(
                    "godwit_orchestrator_imbalance",
                    "Standard deviation of host load ratios at the last balancer run.",
                )
                .expect("valid"),
            ),
            hot_hosts: register(
                &r,
                Gauge::new(
                    "godwit_orchestrator_hot_hosts",
                    "Hosts found hot at the last balancer run.",
                )
                .expect("valid"),
            ),
            balancer_runs: register(
                &r,
                IntCounter::new(
                    "godwit_orchestrator_balancer_runs_total",
                    "Balancer runs (recommend or automatic mode).",
                )
                .expect("valid"),
            ),
            balancer_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "godwit_orchestrator_balancer_duration_seconds",
                        "Time one balancer run takes to plan, seconds.",
                    )
                    .buckets(vec![0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0]),
                )
                .expect("valid"),
            ),
            hotspots: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "godwit_orchestrator_hotspots_detected_total",
                        "Balancer runs that found a host hot, by host.",
                    ),
                    &["host"],
                )
                .expect("valid"),
            ),
            decisions: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "godwit_orchestrator_decisions_total",
                        "Decisions recorded, by action (place, migrate, skip) and reason class.",
                    ),
                    &["action", "class"],
                )
                .expect("valid"),
            ),
            migrations: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "godwit_orchestrator_migrations_total",
                        "Migrations the orchestrator drove to their end, by mode, trigger \
                         (manual, balancer) and outcome (completed, failed, cancelled).",
                    ),
                    &["mode", "trigger", "outcome"],
                )
                .expect("valid"),
            ),
            resource_actions: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "godwit_orchestrator_resource_actions_total",
                        "Resource actions of the migrations the orchestrator drove to their end, \
                         by resource kind (disk, endpoint, scratch, device), action (move, copy, \
                         global_ref, rebind) and outcome (done, failed).",
                    ),
                    &["kind", "action", "outcome"],
                )
                .expect("valid"),
            ),
            placement_failures: register(
                &r,
                IntCounter::new(
                    "godwit_orchestrator_placement_failures_total",
                    "VM creations no host could take.",
                )
                .expect("valid"),
            ),
            host_cordoned: register(
                &r,
                GaugeVec::new(
                    opts(
                        "godwit_orchestrator_host_cordoned",
                        "1 for a host an operator cordoned (nothing new placed or migrated \
                         there), 0 for the others.",
                    ),
                    &["host"],
                )
                .expect("valid"),
            ),
            drains: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "godwit_orchestrator_drains_total",
                        "Host drains ended, by outcome (done: every VM left; stuck: some VMs \
                         cannot move; cancelled: the host was uncordoned).",
                    ),
                    &["outcome"],
                )
                .expect("valid"),
            ),
            vm_moves_in_window: register(
                &r,
                GaugeVec::new(
                    opts(
                        "godwit_orchestrator_vm_moves_in_window",
                        "Completed moves of each VM within the anti-thrash window \
                         (policy.anti_thrash.move_window_ms).",
                    ),
                    &["vm"],
                )
                .expect("valid"),
            ),
            moves_series: Mutex::new(BTreeSet::new()),
            registry: r,
        };
        // Known label values start at zero, so rates and alerts see the first change.
        for mode in ["precopy", "stop-and-copy", "postcopy", "auto"] {
            for trigger in ["manual", "balancer", "drain"] {
                for outcome in ["completed", "failed", "cancelled"] {
                    m.migrations.with_label_values(&[mode, trigger, outcome]);
                }
            }
        }
        for outcome in ["done", "stuck", "cancelled"] {
            m.drains.with_label_values(&[outcome]);
        }
        for kind in ResourceKind::ALL {
            for action in ResourceAction::ALL {
                for outcome in ["done", "failed"] {
                    m.resource_actions.with_label_values(&[
                        kind.as_str(),
                        action.as_str(),
                        outcome,
                    ]);
                }
            }
        }
        for state in ["up", "down"] {
            m.agents.with_label_values(&[state]).set(0.0);
        }
        m
    }

    /// Counts what an ended migration did with each resource, from its final record: a
    /// resource whose action finished is `done`, one that failed or was still running when
    /// the migration ended is `failed`; one whose action never started is not counted.
    pub fn count_resource_actions(&self, resources: &[ResourceMigration]) {
        for r in resources {
            let outcome = match r.status {
                ResourceStatus::Done => "done",
                ResourceStatus::Failed | ResourceStatus::Running => "failed",
                ResourceStatus::Pending => continue,
            };
            self.resource_actions
                .with_label_values(&[r.kind.as_str(), r.action.as_str(), outcome])
                .inc();
        }
    }

    /// Refreshes the cluster-wide gauges from the orchestrator's state; the agent poll loop
    /// calls this after each poll.
    pub fn observe_cluster(&self, state: &State) {
        // As GET /v1/balancer: the last run's hot hosts, kept while the balancer is off.
        let hot = lock(&state.balancer).hot_hosts.clone();
        let (mut up, mut down) = (0, 0);
        for agent in state.agents() {
            let is_up = state.is_up(&agent);
            if is_up {
                up += 1;
            } else {
                down += 1;
            }
            let host = agent.name.as_str();
            self.agent_up
                .with_label_values(&[host])
                .set(if is_up { 1.0 } else { 0.0 });
            self.host_load
                .with_label_values(&[host])
                .set(agent.samples.back().map(|(_, l)| *l).unwrap_or(0.0));
            let is_hot = hot.iter().any(|h| h == host);
            self.host_hot
                .with_label_values(&[host])
                .set(if is_hot { 1.0 } else { 0.0 });
            self.host_cordoned
                .with_label_values(&[host])
                .set(if state.is_cordoned(host) { 1.0 } else { 0.0 });
        }
        self.agents.with_label_values(&["up"]).set(up as f64);
        self.agents.with_label_values(&["down"]).set(down as f64);

        let now = now_unix_ms();
        let window = state.config.policy.anti_thrash.move_window_ms;
        let records = state.vm_records();
        let mut series = lock(&self.moves_series);
        for gone in series.iter().filter(|vm| !records.contains_key(*vm)) {
            let _ = self.vm_moves_in_window.remove_label_values(&[gone]);
        }
        series.retain(|vm| records.contains_key(vm));
        for (name, r) in &records {
            let n = r
                .moves
                .iter()
                .filter(|&&t| now.saturating_sub(t) <= window)
                .count();
            self.vm_moves_in_window
                .with_label_values(&[name])
                .set(n as f64);
            series.insert(name.clone());
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_follows_the_names() {
        let m = Metrics::new();
        m.agent_up.with_label_values(&["h"]).set(1.0);
        m.host_load.with_label_values(&["h"]).set(0.5);
        m.host_hot.with_label_values(&["h"]).set(0.0);
        m.hotspots.with_label_values(&["h"]).inc();
        m.decisions.with_label_values(&["migrate", "hotspot"]).inc();
        m.vm_moves_in_window.with_label_values(&["v"]).set(1.0);
        m.host_cordoned.with_label_values(&["h"]).set(1.0);
        let text = m.render();
        let mut n = 0;
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (name, kind) = line.split_once(' ').unwrap();
            n += 1;
            assert!(name.starts_with("godwit_orchestrator_"), "{name}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
            let help = format!("# HELP {name} ");
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&help) && l.len() > help.len() + 10),
                "{name} has no HELP text"
            );
        }
        assert_eq!(n, 16, "{text}");
    }

    fn resource(
        name: &str,
        kind: ResourceKind,
        action: ResourceAction,
        status: ResourceStatus,
    ) -> ResourceMigration {
        ResourceMigration {
            name: name.into(),
            kind,
            action,
            first_choice: action,
            fallback: false,
            reason: String::new(),
            status,
            detail: String::new(),
            bytes: 0,
            duration_ms: 0.0,
            error: None,
        }
    }

    #[test]
    fn resource_actions_count_once_per_resource_by_outcome() {
        let m = Metrics::new();
        let get = |kind: &str, action: &str, outcome: &str| {
            m.resource_actions
                .with_label_values(&[kind, action, outcome])
                .get()
        };
        assert_eq!(get("disk", "global_ref", "done"), 0);
        m.count_resource_actions(&[
            resource(
                "root",
                ResourceKind::Disk,
                ResourceAction::GlobalRef,
                ResourceStatus::Done,
            ),
            resource(
                "cache",
                ResourceKind::Scratch,
                ResourceAction::Copy,
                ResourceStatus::Failed,
            ),
            resource(
                "web",
                ResourceKind::Endpoint,
                ResourceAction::GlobalRef,
                ResourceStatus::Running,
            ),
            resource(
                "rng",
                ResourceKind::Device,
                ResourceAction::Rebind,
                ResourceStatus::Pending,
            ),
        ]);
        assert_eq!(get("disk", "global_ref", "done"), 1);
        assert_eq!(get("scratch", "copy", "failed"), 1);
        assert_eq!(get("endpoint", "global_ref", "failed"), 1);
        assert_eq!(
            get("device", "rebind", "done") + get("device", "rebind", "failed"),
            0
        );
        let text = m.render();
        assert!(
            text.contains(
                "godwit_orchestrator_resource_actions_total{action=\"global_ref\",kind=\"disk\",outcome=\"done\"} 1"
            ),
            "{text}"
        );
    }
}
