//! The host side of the agent's 1 s sample: how busy the host's CPUs are (`/proc/stat`),
//! whether KVM can be opened, and the host series; plus each VM's last description kept in its
//! run directory, so a VM found crashed after an agent restart can still be described.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use godwit_api::{HostInfo, VmInfo};
use godwit_daemon::host::CpuTicks;

use crate::metrics::Metrics;

/// How often a VM's last description is written to its run directory.
const LAST_INFO_EVERY: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct Load {
    last_ticks: Option<CpuTicks>,
    busy: f64,
}

/// Host load and KVM availability, sampled.
#[derive(Debug)]
pub struct HostSampler {
    kvm_device: PathBuf,
    load: Mutex<Load>,
    kvm: Mutex<Option<(Instant, Result<(), String>)>>,
    written: Mutex<HashMap<String, Instant>>,
}

impl HostSampler {
    pub fn new(kvm_device: &Path) -> Self {
        HostSampler {
            kvm_device: kvm_device.to_owned(),
            load: Mutex::new(Load::default()),
            kvm: Mutex::new(None),
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the KVM device opens (checked at most once a second), and why not.
    pub fn kvm(&self) -> (bool, Option<String>) {
        let mut kvm = lock(&self.kvm);
        let fresh = kvm
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(1));
        if !fresh {
            let result = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.kvm_device)
                .map(drop)
                .map_err(|e| {
                    format!(
                        "Cannot open the KVM device {}: {e}",
                        self.kvm_device.display()
                    )
                });
            *kvm = Some((Instant::now(), result));
        }
        match kvm.as_ref().map(|(_, r)| r) {
            Some(Ok(())) => (true, None),
            Some(Err(e)) => (false, Some(e.clone())),
            None => (false, None),
        }
    }

    /// The host's CPU busy ratio over the last sample interval.
    pub fn busy(&self) -> f64 {
        lock(&self.load).busy
    }

    /// Reads `/proc/stat` and sets the host series from `info`.
    pub fn meter_host(&self, metrics: &Metrics, info: &HostInfo) {
        let mut load = lock(&self.load);
        if let Some(now) = CpuTicks::read() {
            if let Some(before) = load.last_ticks {
                load.busy = now.busy_since(&before);
            }
            load.last_ticks = Some(now);
        }
        metrics.host_vms_cpu_load.set(info.vms_cpu_load);
        metrics.host_cpu_busy.set(load.busy);
        metrics
            .host_vm_memory_bytes
            .set((info.memory_vms_mib << 20) as f64);
    }

    /// Keeps `info` in the VM's run directory (every few seconds).
    pub fn keep_last_info(&self, data_dir: &Path, info: &VmInfo) {
        let mut written = lock(&self.written);
        if written
            .get(&info.name)
            .is_some_and(|at| at.elapsed() < LAST_INFO_EVERY)
        {
            return;
        }
        written.insert(info.name.clone(), Instant::now());
        drop(written);
        let dir = data_dir.join("vms").join(&info.name);
        let path = dir.join(crate::backend::microvm::LAST_INFO_FILE);
        let tmp = dir.join(".last-info.json.tmp");
        if let Ok(bytes) = serde_json::to_vec(info) {
            if std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .is_err()
            {
                tracing::debug!(vm = %info.name, "cannot keep the VM's last description");
            }
        }
    }
}
