//! Post-copy target memory: guest memory registered with userfaultfd so that the first touch
//! of a missing page (by a vCPU inside KVM, or by the monitor) waits until the page arrives,
//! and the engine can install arriving pages atomically. This module turns guest physical
//! addresses into the host addresses `uffd` works on, so its callers need no unsafe.

use std::time::Duration;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemory;
use super::uffd::{self, Fault, UffdError, Userfault};

const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("Guest range {gpa:#x}+{len:#x} is not inside guest memory")]
    OutOfRange { gpa: u64, len: u64 },
}

/// Host mapping of one guest memory region.
#[derive(Debug, Clone, Copy)]
struct HostRange {
    gpa: u64,
    host: u64,
    len: u64,
}

fn host_ranges(memory: &GuestMemory) -> Vec<HostRange> {
    memory
        .iter()
        .map(|r| HostRange {
            gpa: r.start_addr().0,
            host: r.as_ptr() as u64,
            len: r.len(),
        })
        .collect()
}

fn to_host(ranges: &[HostRange], gpa: u64, len: u64) -> Result<u64, PostcopyError> {
    ranges
        .iter()
        .find(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|end| end <= r.gpa + r.len))
        .map(|r| r.host + (gpa - r.gpa))
        .ok_or(PostcopyError::OutOfRange { gpa, len })
}

/// Guest memory registered for missing-page faults.
#[derive(Debug)]
///
/// Dropping it closes the userfaultfd, which ends the registration: a page still missing then
/// reads as zeros. A failed post-copy therefore keeps it with the broken VM until the VM is
/// deleted (see `Vm::hold_postcopy_memory`).
pub struct PostcopyMemory {
    uffd: Userfault,
    ranges: Vec<HostRange>,
    /// Keeps the mappings alive for as long as they are registered.
    _memory: GuestMemory,
}

impl PostcopyMemory {
    /// Registers all of `memory`. Pages already populated stay; the others fault.
    pub fn register(memory: &GuestMemory) -> Result<Self, PostcopyError> {
        let uffd = Userfault::new()?;
        let ranges = host_ranges(memory);
        for r in &ranges {
            // SAFETY: the range is a whole private anonymous mapping made by vm-memory for
            // `memory`; we keep a clone of `memory` (which shares the mapping) in the returned
            // value, so it stays mapped while registered. Nothing holds Rust references into
            // guest memory: vm-memory and KVM access it through raw pointers and volatile
            // copies only.
            unsafe { uffd.register_missing(r.host as *mut u8, r.len as usize)? };
        }
        Ok(PostcopyMemory {
            uffd,
            ranges,
            _memory: memory.clone(),
        })
    }

    /// Installs whole pages at `gpa` and wakes whoever waits on them; pages already present
    /// are kept.
    pub fn install(&self, gpa: u64, data: &[u8]) -> Result<(), PostcopyError> {
        let host = to_host(&self.ranges, gpa, data.len() as u64)?;
        self.uffd.copy(host, data, true)?;
        Ok(())
    }

    pub fn install_zero(&self, gpa: u64, pages: u64) -> Result<(), PostcopyError> {
        let host = to_host(&self.ranges, gpa, pages * PAGE)?;
        self.uffd.zeropage(host, (pages * PAGE) as usize, true)?;
        Ok(())
    }

    pub fn wake(&self, gpa: u64, pages: u64) -> Result<(), PostcopyError> {
        let host = to_host(&self.ranges, gpa, pages * PAGE)?;
        self.uffd.wake(host, (pages * PAGE) as usize)?;
        Ok(())
    }

    /// Waits up to `timeout` for faults; appends the guest physical page addresses.
    pub fn wait_faults(&self, out: &mut Vec<u64>, timeout: Duration) -> Result<(), PostcopyError> {
        let mut faults: Vec<Fault> = Vec::new();
        self.uffd.read_faults(&mut faults, timeout)?;
        for f in faults {
            if let Some(r) = self
                .ranges
                .iter()
                .find(|r| f.addr >= r.host && f.addr < r.host + r.len)
            {
                out.push(r.gpa + (f.addr - r.host) / PAGE * PAGE);
            }
        }
        Ok(())
    }

    /// Ends fault handling: memory behaves normally again.
    pub fn unregister(&self) -> Result<(), PostcopyError> {
        for r in &self.ranges {
            self.uffd.unregister(r.host as *mut u8, r.len as usize)?;
        }
        Ok(())
    }
}

/// Drops guest pages so they read as missing (zero, or a fault once registered).
pub fn discard(memory: &GuestMemory, gpa: u64, pages: u64) -> Result<(), PostcopyError> {
    let ranges = host_ranges(memory);
    let host = to_host(&ranges, gpa, pages * PAGE)?;
    // SAFETY: `host..host + pages*4096` lies inside a private anonymous mapping owned by
    // `memory` (checked by `to_host`); dropping its pages only makes them read as zero or fault
    // again, and no Rust reference points into guest memory.
    unsafe { uffd::discard(host as *mut u8, (pages * PAGE) as usize)? };
    Ok(())
}
