//! Live migration statistics: counters the channel threads bump without locks, and the rest
//! behind a mutex; `info()` assembles the API's `MigrationInfo` at any moment.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use godwit_api::{
    DowntimeBreakdown, FaultStats, MigrationInfo, MigrationMode, MigrationPhase, MigrationStatus,
    PageCounts,
};

use crate::protocol::PageKind;

/// Which phase wire bytes count towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Precopy,
    Downtime,
    Postcopy,
}

#[derive(Debug, Default)]
struct Counters {
    zero_pages: AtomicU64,
    raw_pages: AtomicU64,
    compressed_pages: AtomicU64,
    raw_bytes: AtomicU64,
    compressed_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    precopy_bytes: AtomicU64,
    downtime_bytes: AtomicU64,
    postcopy_bytes: AtomicU64,
    remaining_pages: AtomicU64,
}

#[derive(Debug)]
pub struct Progress {
    started: Instant,
    switched: std::sync::atomic::AtomicBool,
    counters: Counters,
    info: Mutex<MigrationInfo>,
}

impl Progress {
    pub fn new(
        id: &str,
        vm: &str,
        source: &str,
        target: &str,
        mode: MigrationMode,
        started_unix_ms: u64,
    ) -> Self {
        Progress {
            started: Instant::now(),
            switched: std::sync::atomic::AtomicBool::new(false),
            counters: Counters::default(),
            info: Mutex::new(MigrationInfo {
                id: id.to_owned(),
                vm: vm.to_owned(),
                source: source.to_owned(),
                target: target.to_owned(),
                mode,
                status: MigrationStatus::Running,
                phase: MigrationPhase::Setup,
                error: None,
                switched_to_postcopy: false,
                postcopy_pauses: 0,
                orphaned: false,
                started_unix_ms,
                setup_ms: 0.0,
                total_ms: 0.0,
                downtime_ms: None,
                downtime: DowntimeBreakdown::default(),
                memory_bytes: 0,
                rounds: 0,
                pages: PageCounts::default(),
                precopy_bytes: 0,
                downtime_bytes: 0,
                postcopy_bytes: 0,
                dirty_rate_bytes_s: 0.0,
                throughput_bytes_s: 0.0,
                remaining_bytes: 0,
                faults: FaultStats::default(),
                source_digest: None,
                target_digest: None,
                resources: Vec::new(),
                encrypted: false,
                outcome: None,
            }),
        }
    }

    /// The source sent the switchover: from now on the VM belongs to the target.
    pub fn mark_switched(&self) {
        self.switched.store(true, Ordering::Release);
    }

    /// The target refused the switchover (it did not start the VM and dropped its copy): the
    /// VM is the source's again.
    pub fn switch_refused(&self) {
        self.switched.store(false, Ordering::Release);
    }

    pub fn switched(&self) -> bool {
        self.switched.load(Ordering::Acquire)
    }

    /// The switchover went out as a post-copy one: the target may run the VM while pages it
    /// lacks are still only here.
    pub fn in_postcopy(&self) -> bool {
        self.switched() && {
            let i = self.info();
            i.mode == godwit_api::MigrationMode::Postcopy || i.switched_to_postcopy
        }
    }

    pub fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    /// Counts one page sent.
    pub fn page(&self, kind: PageKind, payload: usize) {
        let c = &self.counters;
        match kind {
            PageKind::Zero => c.zero_pages.fetch_add(1, Ordering::Relaxed),
            PageKind::Raw => {
                c.raw_bytes.fetch_add(payload as u64, Ordering::Relaxed);
                c.raw_pages.fetch_add(1, Ordering::Relaxed)
            }
            PageKind::Zstd => {
                c.compressed_bytes
                    .fetch_add(payload as u64, Ordering::Relaxed);
                c.compressed_pages.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    /// Counts bytes written to a socket.
    pub fn wire(&self, stage: Stage, bytes: usize) {
        let c = &self.counters;
        let b = bytes as u64;
        c.wire_bytes.fetch_add(b, Ordering::Relaxed);
        match stage {
            Stage::Precopy => c.precopy_bytes.fetch_add(b, Ordering::Relaxed),
            Stage::Downtime => c.downtime_bytes.fetch_add(b, Ordering::Relaxed),
            Stage::Postcopy => c.postcopy_bytes.fetch_add(b, Ordering::Relaxed),
        };
    }

    pub fn wire_bytes(&self) -> u64 {
        self.counters.wire_bytes.load(Ordering::Relaxed)
    }

    pub fn set_remaining_pages(&self, pages: u64) {
        self.counters
            .remaining_pages
            .store(pages, Ordering::Relaxed);
    }

    pub fn sub_remaining_pages(&self, pages: u64) {
        let _ =
            self.counters
                .remaining_pages
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                    Some(r.saturating_sub(pages))
                });
    }

    /// Changes what is not a counter.
    pub fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut info);
    }

    /// The statistics now.
    pub fn info(&self) -> MigrationInfo {
        let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        info.pages = PageCounts {
            zero_pages: get(&c.zero_pages),
            raw_pages: get(&c.raw_pages),
            compressed_pages: get(&c.compressed_pages),
            raw_bytes: get(&c.raw_bytes),
            compressed_bytes: get(&c.compressed_bytes),
            wire_bytes: get(&c.wire_bytes),
        };
        info.precopy_bytes = get(&c.precopy_bytes);
        info.downtime_bytes = get(&c.downtime_bytes);
        info.postcopy_bytes = get(&c.postcopy_bytes);
        info.remaining_bytes = get(&c.remaining_pages) * crate::protocol::PAGE_SIZE as u64;
        if info.status == MigrationStatus::Running {
            info.total_ms = self.elapsed_ms();
        }
        if info.total_ms > 0.0 {
            info.throughput_bytes_s = info.pages.wire_bytes as f64 / (info.total_ms / 1000.0);
        }
        info
    }

    /// Marks the end; `error` None = completed. `outcome` is the class the metrics count
    /// (`MigrationInfo::outcome`).
    pub fn finish_as(&self, status: MigrationStatus, error: Option<String>, outcome: &str) {
        self.update(|i| i.outcome = Some(outcome.to_owned()));
        self.finish(status, error);
    }

    /// Marks the end; `error` None = completed.
    pub fn finish(&self, status: MigrationStatus, error: Option<String>) {
        let total = self.elapsed_ms();
        self.update(|i| {
            if i.outcome.is_none() {
                i.outcome = Some(
                    match status {
                        MigrationStatus::Completed => "completed",
                        MigrationStatus::Cancelled => "cancelled",
                        _ => "other",
                    }
                    .to_owned(),
                );
            }
            i.status = status;
            i.error = error;
            i.total_ms = total;
            if status == MigrationStatus::Completed {
                i.phase = MigrationPhase::Done;
            }
        });
        if status == MigrationStatus::Completed {
            self.set_remaining_pages(0);
        }
    }
}

/// A latency histogram with fixed bounds (microseconds) and exact quantiles from samples.
#[derive(Debug, Default)]
pub struct LatencyRecorder {
    samples: Mutex<Vec<f64>>,
}

/// Upper bounds of the fault-latency histogram buckets, microseconds.
/// `latency_counts` has one more entry: samples above the last bound.
pub const LATENCY_BOUNDS_US: [f64; 11] = [
    25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 50_000.0, 250_000.0,
];

impl LatencyRecorder {
    pub fn record(&self, us: f64) {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(us);
    }

    pub fn fill(&self, stats: &mut FaultStats) {
        let mut s = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| {
            if s.is_empty() {
                0.0
            } else {
                s[((s.len() - 1) as f64 * p).round() as usize]
            }
        };
        stats.latency_p50_us = q(0.5);
        stats.latency_p99_us = q(0.99);
        stats.latency_max_us = s.last().copied().unwrap_or(0.0);
        stats.latency_sum_us = s.iter().sum();
        stats.latency_buckets_us = LATENCY_BOUNDS_US.to_vec();
        let mut counts = vec![0u64; LATENCY_BOUNDS_US.len() + 1];
        for v in &s {
            let bucket = LATENCY_BOUNDS_US
                .iter()
                .position(|&hi| *v <= hi)
                .unwrap_or(LATENCY_BOUNDS_US.len());
            counts[bucket] += 1;
        }
        stats.latency_counts = counts;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_quantiles() {
        let p = Progress::new("m", "vm", "a", "b", MigrationMode::Precopy, 0);
        p.page(PageKind::Zero, 0);
        p.page(PageKind::Raw, 4096);
        p.page(PageKind::Zstd, 100);
        p.wire(Stage::Precopy, 5000);
        p.wire(Stage::Downtime, 10);
        let info = p.info();
        assert_eq!(info.pages.zero_pages, 1);
        assert_eq!(info.pages.compressed_bytes, 100);
        assert_eq!(info.pages.wire_bytes, 5010);
        assert_eq!(info.downtime_bytes, 10);
        let l = LatencyRecorder::default();
        for v in 1..=100 {
            l.record(v as f64);
        }
        let mut f = FaultStats::default();
        l.fill(&mut f);
        assert_eq!(f.latency_p50_us, 51.0);
        assert_eq!(f.latency_p99_us, 99.0);
        assert_eq!(f.latency_counts.iter().sum::<u64>(), 100);
        assert_eq!(f.latency_counts[0], 25);
        assert_eq!(f.latency_sum_us, 5050.0);
    }
}
