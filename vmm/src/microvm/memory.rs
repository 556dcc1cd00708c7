//! Guest memory: anonymous mmap regions (vm-memory) with the monitor's own dirty bitmap, their
//! registration as KVM memory slots, and a digest of their contents.
//!
//! The bitmap records every write the monitor itself makes to guest memory (loader, restore,
//! later the migration target). KVM's dirty log does not see those writes, so migration ORs the
//! two.

use std::io;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestUsize,
};

/// Guest memory as the monitor holds it.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Cannot map {bytes} bytes of guest memory")]
    Map {
        bytes: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("Cannot register guest memory slot {slot} with KVM")]
    Register {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Cannot read guest memory at {addr:#x}")]
    Read {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Maps `bytes` of zeroed guest memory at guest physical address 0, as one region.
///
/// With `huge_pages`, the host backs it with transparent huge pages where it can: fewer page
/// faults on first touch, which dominates VM start and restore time here.
pub fn allocate(bytes: u64, huge_pages: bool) -> Result<GuestMemory, MemoryError> {
    let memory = GuestMemory::from_ranges(&[(GuestAddress(0), bytes as usize)])
        .map_err(|source| MemoryError::Map { bytes, source })?;
    if huge_pages {
        for region in memory.iter() {
            advise_huge_pages(region.as_ptr(), region.len() as usize);
        }
    }
    Ok(memory)
}

fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: `addr..addr+len` is one whole mapping owned by the GuestMemory region we got it
    // from; MADV_HUGEPAGE only changes how the kernel backs it, never its contents or validity.
    let ret = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "MADV_HUGEPAGE refused; using small pages");
    }
}

/// Touches every page of `memory` so the host backs it now rather than on first write.
///
/// First touch of fresh memory is slow on this kind of host (about 107k 4 KiB faults/s, far
/// fewer with huge pages); a migration target prefaults before the guest pauses so the
/// page copy during downtime does not pay for it. Writing a zero into a fresh page leaves its
/// content unchanged. (`MADV_POPULATE_WRITE` measured 3-9x slower than touching here.)
pub fn prefault(memory: &GuestMemory) -> Result<(), MemoryError> {
    for region in memory.iter() {
        let start = region.start_addr().0;
        let mut offset = 0;
        while offset < region.len() {
            let addr = start + offset;
            memory
                .write_obj(0u8, GuestAddress(addr))
                .map_err(|source| MemoryError::Read { addr, source })?;
            offset += 4096;
        }
        // Touching is not a guest write: leave the monitor's dirty bitmap as it was.
        std::ops::Deref::deref(region).bitmap().reset();
    }
    Ok(())
}

/// Registers every region of `memory` as a KVM memory slot (slot = region index).
pub fn register(vm: &VmFd, memory: &GuestMemory, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len() as GuestUsize,
            userspace_addr: region.as_ptr() as u64,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by `memory`,
        // which the caller keeps alive for as long as the VM exists (MicroVm holds both and drops
        // the VM fd first).
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

/// Total bytes of guest memory.
pub fn size(memory: &GuestMemory) -> u64 {
    memory.iter().map(|region| region.len()).sum()
}

/// `blake3:<hex>` over all guest memory in address order. The same memory gives the same digest
/// on any host; a running guest changes it under our feet, so callers pause first when they
/// need a stable value.
pub fn digest(memory: &GuestMemory) -> Result<String, MemoryError> {
    const CHUNK: usize = 1 << 20;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    for region in memory.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut offset = 0u64;
        while offset < len {
            let n = (len - offset).min(CHUNK as u64) as usize;
            let addr = start + offset;
            memory
                .read_slice(&mut buf[..n], GuestAddress(addr))
                .map_err(|source| MemoryError::Read { addr, source })?;
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
    }
    Ok(format!("blake3:{}", hasher.finalize().to_hex()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_content_only() {
        let a = allocate(4 << 20, true).unwrap();
        let b = allocate(4 << 20, false).unwrap();
        assert_eq!(digest(&a).unwrap(), digest(&b).unwrap());
        a.write_obj(0xdead_beef_u32, GuestAddress(0x3000)).unwrap();
        assert_ne!(digest(&a).unwrap(), digest(&b).unwrap());
        b.write_obj(0xdead_beef_u32, GuestAddress(0x3000)).unwrap();
        assert_eq!(digest(&a).unwrap(), digest(&b).unwrap());
        assert_eq!(size(&a), 4 << 20);
    }

    #[test]
    fn monitor_writes_are_tracked_in_the_bitmap() {
        let memory = allocate(4 << 20, false).unwrap();
        memory.write_obj(1u64, GuestAddress(0x5000)).unwrap();
        use vm_memory::bitmap::Bitmap;
        let region = memory.iter().next().unwrap();
        assert!(region.bitmap().dirty_at(0x5000));
        assert!(!region.bitmap().dirty_at(0x6000));
    }
}
