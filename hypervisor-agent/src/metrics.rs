//! The agent's Prometheus metrics, served on `GET /metrics`. Names follow Prometheus practice:
//! `godwit_` prefix, base units, `_total` on counters, ratios 0-1.

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder,
};

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub up: Gauge,
    pub vms: Gauge,
    pub host_cores: Gauge,
    pub host_memory_bytes: Gauge,
    pub host_vm_memory_bytes: Gauge,
    pub host_vms_cpu_load: Gauge,
    pub host_cpu_busy: Gauge,
    pub vm_cpu_seconds: CounterVec,
    pub vm_memory_bytes: GaugeVec,
    pub snapshots: IntCounterVec,
    pub api_requests: IntCounterVec,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("metric definition is valid");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let up = gauge(
            &registry,
            "godwit_agent_up",
            "1 while the agent serves its API.",
        );
        let vms = gauge(&registry, "godwit_agent_vms", "VMs on this agent.");
        let host_cores = gauge(
            &registry,
            "godwit_host_cpu_cores",
            "Logical CPUs of the host.",
        );
        let host_memory_bytes = gauge(&registry, "godwit_host_memory_bytes", "Memory of the host.");
        let host_vm_memory_bytes = gauge(
            &registry,
            "godwit_host_vm_memory_bytes",
            "Guest memory assigned to this agent's VMs.",
        );
        let host_vms_cpu_load = gauge(
            &registry,
            "godwit_host_vms_cpu_load_ratio",
            "CPU used by this agent's VMs over the last interval, as a ratio of all host cores.",
        );
        let host_cpu_busy = gauge(
            &registry,
            "godwit_host_cpu_busy_ratio",
            "CPU busy on the whole host over the last interval (from /proc/stat).",
        );
        let vm_cpu_seconds = CounterVec::new(
            Opts::new(
                "godwit_vm_cpu_seconds_total",
                "CPU time used by the VM's vCPU threads.",
            ),
            &["vm"],
        )
        .expect("metric definition is valid");
        let vm_memory_bytes = GaugeVec::new(
            Opts::new("godwit_vm_memory_bytes", "Guest memory size of the VM."),
            &["vm"],
        )
        .expect("metric definition is valid");
        let snapshots = IntCounterVec::new(
            Opts::new(
                "godwit_vm_snapshot_operations_total",
                "Snapshots written and restores done, by operation and outcome.",
            ),
            &["operation", "outcome"],
        )
        .expect("metric definition is valid");
        let api_requests = IntCounterVec::new(
            Opts::new(
                "godwit_agent_api_requests_total",
                "HTTP API requests by method and status class.",
            ),
            &["method", "status"],
        )
        .expect("metric definition is valid");
        for c in [
            Box::new(vm_cpu_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(vm_memory_bytes.clone()),
            Box::new(snapshots.clone()),
            Box::new(api_requests.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        up.set(1.0);
        Metrics {
            registry,
            up,
            vms,
            host_cores,
            host_memory_bytes,
            host_vm_memory_bytes,
            host_vms_cpu_load,
            host_cpu_busy,
            vm_cpu_seconds,
            vm_memory_bytes,
            snapshots,
            api_requests,
        }
    }

    /// Drops a deleted VM's series.
    pub fn forget_vm(&self, name: &str) {
        let _ = self.vm_cpu_seconds.remove_label_values(&[name]);
        let _ = self.vm_memory_bytes.remove_label_values(&[name]);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
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
    fn renders_with_help_and_prefix() {
        let m = Metrics::new();
        m.vm_cpu_seconds.with_label_values(&["a"]).inc_by(1.5);
        let text = m.render();
        assert!(text.contains("# HELP godwit_vm_cpu_seconds_total"));
        assert!(text.contains("godwit_vm_cpu_seconds_total{vm=\"a\"} 1.5"));
        assert!(text.contains("godwit_agent_up 1"));
        m.forget_vm("a");
        assert!(!m.render().contains("vm=\"a\""));
    }
}
