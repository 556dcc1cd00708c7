//! The orchestrator's Prometheus metrics (`GET /metrics`).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub agents: GaugeVec,
    pub host_load: GaugeVec,
    pub imbalance: Gauge,
    pub hot_hosts: Gauge,
    pub balancer_runs: IntCounter,
    pub balancer_seconds: Histogram,
    pub hotspots: IntCounterVec,
    pub decisions: IntCounterVec,
    pub migrations: IntCounterVec,
    pub placement_failures: IntCounter,
    pub vm_moves_in_window: GaugeVec,
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
        Metrics {
            agents: register(
                &r,
                GaugeVec::new(
                    opts("godwit_orchestrator_agents", "Registered agents by state (up, down)."),
                    &["state"],
                )
                .expect("valid"),
            ),
            host_load: register(
                &r,
                GaugeVec::new(
                    opts(
                        "godwit_orchestrator_host_load_ratio",
                        "Latest CPU load of each host as the balancer sees it (VM CPU over capacity).",
                    ),
                    &["host"],
                )
                .expect("valid"),
            ),
            imbalance: register(
                &r,
                Gauge::new(
                    "godwit_orchestrator_imbalance",
                    "Standard deviation of host loads at the last balancer run.",
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
                IntCounter::new("godwit_orchestrator_balancer_runs_total", "Balancer runs.")
                    .expect("valid"),
            ),
            balancer_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "godwit_orchestrator_balancer_duration_seconds",
                        "Time one balancer run takes to plan.",
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
                        "Decisions taken, by action and reason class.",
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
                        "Migrations the orchestrator drove, by mode, trigger and outcome.",
                    ),
                    &["mode", "trigger", "outcome"],
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
            vm_moves_in_window: register(
                &r,
                GaugeVec::new(
                    opts(
                        "godwit_orchestrator_vm_moves_in_window",
                        "Moves of each VM within the anti-thrash window.",
                    ),
                    &["vm"],
                )
                .expect("valid"),
            ),
            registry: r,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
