//! The built-in guest workloads on the monitor's side: checking a requested workload against
//! the VM, loading the guest program and its parameters into guest memory, and reading the
//! status the guest publishes. The ABI is specified in `docs/guest-abi.md`.

mod image;

use godwit_api::{DirtyPattern, GuestDevices, GuestInfo, GuestSpec, PageContent};
use vm_memory::{Bytes, GuestAddress};

use crate::microvm::layout::{self, ABI_ADDR, GEN_TABLE_ADDR, IMAGE_ADDR, MIB, PAGE_SIZE};
use crate::microvm::memory::GuestMemory;

pub use image::GUEST_IMAGE;

pub const ABI_MAGIC: u32 = 0x5457_4447;
pub const ABI_VERSION: u32 = 1;
const STATUS_OFFSET: u64 = 0x100;
const STATUS_SIZE: u64 = 64;

/// Disk blocks written (and re-read) per second by a guest with a disk, unless the spec says.
pub const DEFAULT_DISK_OPS_PER_S: u32 = 200;
/// Where the guest keeps its device status, and its fields (docs/guest-abi.md, "Devices").
const DEVSTATUS_OFFSET: u64 = 0xc00;

/// Guest memory the built-in guests need besides a `dirty` working set: boot structures, stacks,
/// the program and the first 2 MiB page of the generation table.
pub const BASE_MEMORY_BYTES: u64 = 4 * MIB;

/// The workload's parameters as the ABI block carries them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestParams {
    pub kind: u32,
    pub vcpus: u32,
    pub tsc_hz: u64,
    pub ws_base: u64,
    pub ws_pages: u64,
    pub gen_base: u64,
    pub rate_bytes_per_s: u64,
    pub pattern: u32,
    pub hot_percent: u32,
    pub hot_pages: u64,
    pub duty_percent: u32,
    pub interval_ms: u32,
    pub seed: u64,
    pub content: u32,
    pub disk_ops_per_s: u32,
}

/// A workload that cannot run in the requested VM; the message is for the API caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidGuest(pub String);

/// Checks `spec` against the VM shape and turns it into ABI parameters.
pub fn params(
    spec: &GuestSpec,
    vcpus: u32,
    memory_bytes: u64,
    tsc_khz: u32,
    seed: u64,
) -> Result<GuestParams, InvalidGuest> {
    let mut p = GuestParams {
        vcpus,
        tsc_hz: u64::from(tsc_khz) * 1000,
        seed,
        ..Default::default()
    };
    if memory_bytes < BASE_MEMORY_BYTES {
        return Err(InvalidGuest(format!(
            "memory_mib must be at least {} for the built-in guests",
            BASE_MEMORY_BYTES / MIB
        )));
    }
    match spec {
        GuestSpec::Idle => p.kind = 0,
        GuestSpec::Dirty {
            working_set_mib,
            rate_mib_s,
            pattern,
            hot_mib,
            hot_percent,
            content,
            disk_ops_s,
        } => {
            p.kind = 1;
            p.disk_ops_per_s = disk_ops_s.unwrap_or(DEFAULT_DISK_OPS_PER_S);
            if p.disk_ops_per_s > 100_000 {
                return Err(InvalidGuest(format!(
                    "disk_ops_s must be 0-100000, not {}",
                    p.disk_ops_per_s
                )));
            }
            p.content = match content {
                PageContent::Counter => 0,
                PageContent::Random => 1,
            };
            if *working_set_mib == 0 {
                return Err(InvalidGuest("working_set_mib must be at least 1".into()));
            }
            let ws_pages = working_set_mib.saturating_mul(MIB / PAGE_SIZE);
            let ws_base = layout::working_set_base(ws_pages);
            let needed = ws_base.saturating_add(ws_pages.saturating_mul(PAGE_SIZE));
            if needed > memory_bytes {
                return Err(InvalidGuest(format!(
                    "a working set of {working_set_mib} MiB needs memory_mib of at least {} \
                     (generation table and guest overhead included)",
                    layout::align_up(needed, 2 * MIB) / MIB
                )));
            }
            if !rate_mib_s.is_finite() || *rate_mib_s < 0.0 {
                return Err(InvalidGuest(
                    "rate_mib_s must be a finite number >= 0 (0 = unlimited)".into(),
                ));
            }
            let hot_pages = match hot_mib {
                Some(0) => return Err(InvalidGuest("hot_mib must be at least 1".into())),
                Some(mib) if *mib > *working_set_mib => {
                    return Err(InvalidGuest(format!(
                        "hot_mib ({mib}) must not exceed working_set_mib ({working_set_mib})"
                    )))
                }
                Some(mib) => mib * (MIB / PAGE_SIZE),
                None => (ws_pages / 8).max(1),
            };
            let hot_percent = hot_percent.unwrap_or(90);
            if hot_percent > 100 {
                return Err(InvalidGuest(format!(
                    "hot_percent must be 0-100, not {hot_percent}"
                )));
            }
            p.ws_base = ws_base;
            p.ws_pages = ws_pages;
            p.gen_base = GEN_TABLE_ADDR;
            p.rate_bytes_per_s = (rate_mib_s * MIB as f64) as u64;
            p.pattern = match pattern {
                DirtyPattern::Uniform => 0,
                DirtyPattern::Hotcold => 1,
            };
            p.hot_pages = hot_pages;
            p.hot_percent = hot_percent;
        }
        GuestSpec::Spin { duty_percent } => {
            if *duty_percent > 100 {
                return Err(InvalidGuest(format!(
                    "duty_percent must be 0-100, not {duty_percent}"
                )));
            }
            p.kind = 2;
            p.duty_percent = *duty_percent;
        }
        GuestSpec::Ticker { interval_ms } => {
            if !(1..=3_600_000).contains(interval_ms) {
                return Err(InvalidGuest(format!(
                    "interval_ms must be 1-3600000, not {interval_ms}"
                )));
            }
            p.kind = 3;
            p.interval_ms = *interval_ms as u32;
        }
        GuestSpec::Echo => {
            p.kind = 4;
            p.disk_ops_per_s = DEFAULT_DISK_OPS_PER_S;
        }
    }
    Ok(p)
}

/// Writes the guest program and the ABI block's parameters into fresh guest memory.
pub fn load(memory: &GuestMemory, p: &GuestParams) -> Result<(), vm_memory::GuestMemoryError> {
    memory.write_slice(GUEST_IMAGE, GuestAddress(IMAGE_ADDR))?;
    let a = |offset: u64| GuestAddress(ABI_ADDR + offset);
    memory.write_obj(ABI_MAGIC, a(0x00))?;
    memory.write_obj(ABI_VERSION, a(0x04))?;
    memory.write_obj(p.kind, a(0x08))?;
    memory.write_obj(p.vcpus, a(0x0c))?;
    memory.write_obj(p.tsc_hz, a(0x10))?;
    memory.write_obj(p.ws_base, a(0x18))?;
    memory.write_obj(p.ws_pages, a(0x20))?;
    memory.write_obj(p.gen_base, a(0x28))?;
    memory.write_obj(p.rate_bytes_per_s, a(0x30))?;
    memory.write_obj(p.pattern, a(0x38))?;
    memory.write_obj(p.hot_percent, a(0x3c))?;
    memory.write_obj(p.hot_pages, a(0x40))?;
    memory.write_obj(p.duty_percent, a(0x48))?;
    memory.write_obj(p.interval_ms, a(0x4c))?;
    memory.write_obj(p.seed, a(0x50))?;
    memory.write_obj(p.content, a(0x58))?;
    memory.write_obj(p.disk_ops_per_s, a(0x5c))?;
    Ok(())
}

/// Status one vCPU of the guest publishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuGuestStatus {
    pub progress: u64,
    pub verify_errors: u64,
    pub first_error_page: u64,
    pub verified_pages: u64,
    pub running: u64,
}

/// Reads the status block of every vCPU.
pub fn read_status(
    memory: &GuestMemory,
    vcpus: u32,
) -> Result<Vec<VcpuGuestStatus>, vm_memory::GuestMemoryError> {
    (0..u64::from(vcpus))
        .map(|i| {
            let base = ABI_ADDR + STATUS_OFFSET + i * STATUS_SIZE;
            let field = |offset: u64| memory.read_obj::<u64>(GuestAddress(base + offset));
            Ok(VcpuGuestStatus {
                progress: field(0x00)?,
                verify_errors: field(0x08)?,
                first_error_page: field(0x10)?,
                verified_pages: field(0x18)?,
                running: field(0x20)?,
            })
        })
        .collect()
}

/// Reads what the guest reports about its devices.
pub fn read_devices(memory: &GuestMemory) -> Result<GuestDevices, vm_memory::GuestMemoryError> {
    let field = |i: u64| memory.read_obj::<u64>(GuestAddress(ABI_ADDR + DEVSTATUS_OFFSET + 8 * i));
    let first_error = field(4)?;
    Ok(GuestDevices {
        disk_blocks: field(0)?,
        disk_writes: field(1)?,
        disk_verified: field(2)?,
        disk_errors: field(3)?,
        disk_first_error: first_error.checked_sub(1),
        disk_passes: field(5)?,
        disk_io_errors: field(6)?,
        entropy_reads: field(7)?,
        entropy_device: field(8)?,
        echo_lines: field(9)?,
        echo_bytes: field(10)?,
    })
}

/// Sums per-vCPU status into the API's view; `devices` is what the guest reports about its
/// devices, for a VM that has any.
pub fn summarize(
    spec: &GuestSpec,
    status: &[VcpuGuestStatus],
    devices: Option<GuestDevices>,
) -> GuestInfo {
    GuestInfo {
        devices,
        spec: spec.clone(),
        progress: status.iter().map(|s| s.progress).sum(),
        verify_errors: status.iter().map(|s| s.verify_errors).sum(),
        first_error_page: status
            .iter()
            .filter(|s| s.first_error_page != 0)
            .map(|s| s.first_error_page - 1)
            .min(),
        verified_pages: status.iter().map(|s| s.verified_pages).sum(),
        vcpu_progress: status.iter().map(|s| s.progress).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirty(ws: u64) -> GuestSpec {
        GuestSpec::Dirty {
            working_set_mib: ws,
            rate_mib_s: 10.0,
            pattern: DirtyPattern::Hotcold,
            hot_mib: None,
            hot_percent: None,
            content: PageContent::Counter,
            disk_ops_s: None,
        }
    }

    #[test]
    fn dirty_parameters_follow_the_layout() {
        let p = params(&dirty(64), 2, 256 * MIB, 2_000_000, 7).unwrap();
        assert_eq!(p.kind, 1);
        assert_eq!(p.ws_pages, 16384);
        assert_eq!(p.ws_base, 4 * MIB);
        assert_eq!(p.hot_pages, 2048);
        assert_eq!(p.hot_percent, 90);
        assert_eq!(p.rate_bytes_per_s, 10 * MIB);
        assert_eq!(p.tsc_hz, 2_000_000_000);
    }

    #[test]
    fn working_set_must_fit() {
        assert!(params(&dirty(252), 1, 256 * MIB, 1, 0).is_ok());
        let err = params(&dirty(253), 1, 256 * MIB, 1, 0).unwrap_err();
        assert!(err.0.contains("at least 258"), "{err}");
        assert!(params(&dirty(0), 1, 256 * MIB, 1, 0).is_err());
    }

    #[test]
    fn out_of_range_parameters_are_rejected() {
        let spin = GuestSpec::Spin { duty_percent: 101 };
        assert!(params(&spin, 1, 64 * MIB, 1, 0).is_err());
        let ticker = GuestSpec::Ticker { interval_ms: 0 };
        assert!(params(&ticker, 1, 64 * MIB, 1, 0).is_err());
        let bad_rate = GuestSpec::Dirty {
            working_set_mib: 8,
            rate_mib_s: f64::NAN,
            pattern: DirtyPattern::Uniform,
            hot_mib: None,
            hot_percent: None,
            content: PageContent::Random,
            disk_ops_s: None,
        };
        assert!(params(&bad_rate, 1, 64 * MIB, 1, 0).is_err());
        assert!(params(&GuestSpec::Idle, 1, MIB, 1, 0).is_err());
    }

    #[test]
    fn load_writes_program_and_parameters() {
        let memory = crate::microvm::memory::allocate(8 * MIB, false).unwrap();
        let p = params(&GuestSpec::Spin { duty_percent: 30 }, 1, 8 * MIB, 1000, 0).unwrap();
        load(&memory, &p).unwrap();
        let magic: u32 = memory.read_obj(GuestAddress(ABI_ADDR)).unwrap();
        assert_eq!(magic, ABI_MAGIC);
        let duty: u32 = memory.read_obj(GuestAddress(ABI_ADDR + 0x48)).unwrap();
        assert_eq!(duty, 30);
        let mut first = [0u8; 16];
        memory
            .read_slice(&mut first, GuestAddress(IMAGE_ADDR))
            .unwrap();
        assert_eq!(&first[..], &GUEST_IMAGE[..16]);
        let status = read_status(&memory, 1).unwrap();
        assert_eq!(status[0], VcpuGuestStatus::default());
    }
}
