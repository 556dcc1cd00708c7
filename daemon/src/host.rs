//! What a Godwit daemon knows about its host: cores, memory, and how busy the CPUs are (from
//! `/proc/stat`, sampled by the agent's background loop).

use std::fs;

/// Logical CPUs the agent may use.
pub fn cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// `MemTotal` from `/proc/meminfo`, bytes.
pub fn memory_total_bytes() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total(&text))
        .unwrap_or(0)
}

fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Cumulative CPU ticks of the whole host: (busy, total).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub busy: u64,
    pub total: u64,
}

impl CpuTicks {
    pub fn read() -> Option<Self> {
        parse_proc_stat(&fs::read_to_string("/proc/stat").ok()?)
    }

    /// Busy ratio (0-1) between an earlier sample and this one.
    pub fn busy_since(&self, earlier: &CpuTicks) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        (self.busy.saturating_sub(earlier.busy) as f64 / total as f64).clamp(0.0, 1.0)
    }
}

fn parse_proc_stat(text: &str) -> Option<CpuTicks> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    if fields.len() < 4 {
        return None;
    }
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some(CpuTicks {
        busy: total - idle,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:       24546812 kB\nMemFree:        1 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(24546812 * 1024));
        assert_eq!(parse_meminfo_total("nothing"), None);
    }

    #[test]
    fn parses_proc_stat_and_computes_busy_ratio() {
        let a = parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = parse_proc_stat("cpu  200 0 200 800 100 0 0 0 0 0\n").unwrap();
        assert_eq!(a.total, 1000);
        assert_eq!(a.busy, 200);
        assert!((b.busy_since(&a) - 200.0 / 300.0).abs() < 1e-9);
        assert_eq!(a.busy_since(&a), 0.0);
    }

    #[test]
    fn reads_this_host() {
        assert!(cores() >= 1);
        assert!(memory_total_bytes() > 0);
        assert!(CpuTicks::read().is_some());
    }
}
