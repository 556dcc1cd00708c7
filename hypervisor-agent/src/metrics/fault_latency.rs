//! `godwit_migration_postcopy_fault_latency_seconds`: a histogram merged from the fault
//! histograms incoming post-copy migrations report, since the samples themselves stay inside
//! page-transfer's target.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily};

use super::lock;

/// `godwit_migration_postcopy_fault_latency_seconds`: the target's per-fault latencies (fault
/// to page installed), merged per migration from the histogram page-transfer keeps. Its buckets
/// are page-transfer's own bounds, so no sample changes bucket on the way; `_sum` is the exact
/// sum page-transfer reports.
#[derive(Debug, Clone)]
pub(super) struct FaultLatency {
    desc: Desc,
    bounds_s: Vec<f64>,
    by_mode: Arc<Mutex<BTreeMap<&'static str, LatencyCounts>>>,
}

#[derive(Debug, Default, Clone)]
struct LatencyCounts {
    /// Per bucket, not cumulative; one more than the bounds (the overflow).
    counts: Vec<u64>,
    sum_s: f64,
}

impl FaultLatency {
    pub(super) fn new() -> Self {
        FaultLatency {
            desc: Desc::new(
                "godwit_migration_postcopy_fault_latency_seconds".into(),
                "Post-copy fault service latency on the target, from the guest's fault to the \
                 page installed, by mode, seconds; observed when the migration completes."
                    .into(),
                vec!["mode".into()],
                HashMap::new(),
            )
            .expect("metric definition is valid"),
            bounds_s: page_transfer::progress::LATENCY_BOUNDS_US
                .iter()
                .map(|us| us / 1e6)
                .collect(),
            by_mode: Default::default(),
        }
    }

    pub(super) fn init(&self, mode: &'static str) {
        let n = self.bounds_s.len() + 1;
        lock(&self.by_mode).entry(mode).or_insert(LatencyCounts {
            counts: vec![0; n],
            sum_s: 0.0,
        });
    }

    /// Adds one migration's fault histogram. One made with other bounds is ignored (it cannot
    /// be merged without moving samples between buckets).
    pub(super) fn observe(&self, mode: &'static str, faults: &godwit_api::FaultStats) {
        let n = self.bounds_s.len() + 1;
        let same_bounds = faults.latency_buckets_us.len() + 1 == n
            && faults
                .latency_buckets_us
                .iter()
                .zip(&self.bounds_s)
                .all(|(us, s)| (us / 1e6 - s).abs() < 1e-12);
        if faults.latency_counts.len() != n || !same_bounds {
            return;
        }
        let mut by_mode = lock(&self.by_mode);
        let entry = by_mode.entry(mode).or_insert(LatencyCounts {
            counts: vec![0; n],
            sum_s: 0.0,
        });
        for (total, add) in entry.counts.iter_mut().zip(&faults.latency_counts) {
            *total += add;
        }
        entry.sum_s += faults.latency_sum_us / 1e6;
    }
}

impl Collector for FaultLatency {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(proto::MetricType::HISTOGRAM);
        let metrics = lock(&self.by_mode)
            .iter()
            .map(|(mode, c)| {
                let mut label = proto::LabelPair::default();
                label.set_name("mode".into());
                label.set_value((*mode).into());
                let mut cumulative = 0;
                let buckets = self
                    .bounds_s
                    .iter()
                    .zip(&c.counts)
                    .map(|(&bound, &count)| {
                        cumulative += count;
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(bound);
                        b.set_cumulative_count(cumulative);
                        b
                    })
                    .collect();
                let mut h = proto::Histogram::default();
                h.set_bucket(buckets);
                h.set_sample_count(c.counts.iter().sum());
                h.set_sample_sum(c.sum_s);
                let mut m = proto::Metric::from_label(vec![label]);
                m.set_histogram(h);
                m
            })
            .collect();
        family.set_metric(metrics);
        vec![family]
    }
}
