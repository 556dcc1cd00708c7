//! Dirty-page tracking for pre-copy: KVM's dirty log (the guest's writes) ORed with the
//! monitor's own bitmap (writes the monitor makes to guest memory, which KVM does not see).

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{self, GuestMemory, MemoryError};

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error(transparent)]
    Register(#[from] MemoryError),
    #[error("Cannot read KVM's dirty log of slot {slot}")]
    Harvest {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Turns KVM dirty logging on for every slot and clears the monitor's bitmap, so the first
/// harvest reports the writes made from now on.
pub fn start(vm: &VmFd, memory: &GuestMemory) -> Result<(), DirtyLogError> {
    for region in memory.iter() {
        std::ops::Deref::deref(region).bitmap().reset();
    }
    memory::register(vm, memory, true)?;
    Ok(())
}

/// Turns dirty logging off.
pub fn stop(vm: &VmFd, memory: &GuestMemory) -> Result<(), DirtyLogError> {
    memory::register(vm, memory, false)?;
    Ok(())
}

/// Pages written since the last harvest (or `start`), as 64-bit words per region (bit = 4 KiB
/// page), and resets both logs.
pub fn harvest(vm: &VmFd, memory: &GuestMemory) -> Result<Vec<Vec<u64>>, DirtyLogError> {
    memory
        .iter()
        .enumerate()
        .map(|(slot, region)| {
            let slot = slot as u32;
            let mut words = vm
                .get_dirty_log(slot, region.len() as usize)
                .map_err(|source| DirtyLogError::Harvest { slot, source })?;
            let ours = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (w, o) in words.iter_mut().zip(ours) {
                *w |= o;
            }
            Ok(words)
        })
        .collect()
}
