//! Guest physical memory layout of a microVM running a built-in guest, and the boot-time
//! structures the monitor writes there (GDT, identity-mapped page tables).
//!
//! `docs/guest-abi.md` is the contract; these constants must match it and the guest program in
//! `hypervisor-agent/guest/`.

use vm_memory::{Bytes, GuestAddress};

use super::memory::GuestMemory;

pub const PAGE_SIZE: u64 = 4096;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

pub const GDT_ADDR: u64 = 0x1000;
pub const PML4_ADDR: u64 = 0x2000;
pub const PDPT_ADDR: u64 = 0x3000;
/// Page directories, one per GiB of guest memory.
pub const PD_ADDR: u64 = 0x4000;
/// Page directories fit below the ABI block: 64 of them map 64 GiB.
pub const MAX_MEMORY_BYTES: u64 = 64 * GIB;
pub const ABI_ADDR: u64 = 0x5_0000;
pub const STACKS_ADDR: u64 = 0x6_0000;
pub const STACK_SIZE: u64 = 0x4000;
pub const IMAGE_ADDR: u64 = 0x10_0000;
pub const IMAGE_MAX: u64 = MIB;
/// Generation table of the `dirty` guest, followed by its working set.
pub const GEN_TABLE_ADDR: u64 = 0x20_0000;

/// Most vCPUs a microVM gets (stacks and ABI status slots are sized for this).
pub const MAX_VCPUS: u32 = 4;

/// User-mode selectors: the guest runs at CPL3.
pub const USER_CODE_SELECTOR: u16 = 0x33;
pub const USER_DATA_SELECTOR: u16 = 0x2b;

/// Present, writable, user, accessed, dirty: the A/D bits are preset so the hardware page walk
/// never writes the page tables (guest memory then only changes where the guest writes).
const TABLE_FLAGS: u64 = 0x67;
/// As above plus PS: a 2 MiB page.
const HUGE_PAGE_FLAGS: u64 = 0xe7;

/// GDT entries: null, kernel code, kernel data, two unused, user data, user code.
const GDT: [u64; 7] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0,
    0,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
];

pub const GDT_LIMIT: u16 = (GDT.len() * 8 - 1) as u16;

// The layout's regions do not overlap.
const _: () = assert!(GDT_ADDR + 8 * GDT.len() as u64 <= PML4_ADDR);
const _: () = assert!(PD_ADDR + (MAX_MEMORY_BYTES / GIB) * PAGE_SIZE <= ABI_ADDR);
const _: () = assert!(ABI_ADDR + PAGE_SIZE <= STACKS_ADDR);
const _: () = assert!(IMAGE_ADDR + IMAGE_MAX <= GEN_TABLE_ADDR);

/// Top of vCPU `index`'s stack.
pub fn stack_top(index: u32) -> u64 {
    STACKS_ADDR + (u64::from(index) + 1) * STACK_SIZE
}

/// Where the `dirty` guest's working set starts: after a generation table of `ws_pages` u32
/// entries, 2 MiB aligned.
pub fn working_set_base(ws_pages: u64) -> u64 {
    align_up(GEN_TABLE_ADDR + ws_pages * 4, 2 * MIB)
}

pub fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

/// Writes the GDT and the identity-mapped page tables covering `memory_bytes`.
pub fn write_boot_structures(
    memory: &GuestMemory,
    memory_bytes: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in GDT.iter().enumerate() {
        memory.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    memory.write_obj(PDPT_ADDR | TABLE_FLAGS, GuestAddress(PML4_ADDR))?;
    let gibs = memory_bytes.div_ceil(GIB);
    for gib in 0..gibs {
        let pd = PD_ADDR + gib * PAGE_SIZE;
        memory.write_obj(pd | TABLE_FLAGS, GuestAddress(PDPT_ADDR + gib * 8))?;
        for entry in 0..512u64 {
            let gpa = gib * GIB + entry * 2 * MIB;
            if gpa >= memory_bytes {
                break;
            }
            memory.write_obj(gpa | HUGE_PAGE_FLAGS, GuestAddress(pd + entry * 8))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_fit_below_the_image() {
        assert!(stack_top(MAX_VCPUS - 1) <= IMAGE_ADDR);
    }

    #[test]
    fn working_set_follows_generation_table() {
        assert_eq!(working_set_base(0), 2 * MIB);
        assert_eq!(working_set_base(1), 4 * MIB);
        // 64 MiB working set: 16384 pages, 64 KiB of generations.
        assert_eq!(working_set_base(16384), 4 * MIB);
        // 4 GiB working set: 1 Mi pages, 4 MiB of generations.
        assert_eq!(working_set_base(1 << 20), 6 * MIB);
    }

    #[test]
    fn selectors_index_the_user_descriptors() {
        assert_eq!(
            GDT[usize::from(USER_CODE_SELECTOR >> 3)],
            0x00af_fb00_0000_ffff
        );
        assert_eq!(
            GDT[usize::from(USER_DATA_SELECTOR >> 3)],
            0x00cf_f300_0000_ffff
        );
    }
}
