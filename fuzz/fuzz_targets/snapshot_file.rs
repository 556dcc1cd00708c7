//! Snapshot files (vmm/src/snapshot.rs), as a restore opens one from disk.
//!
//! Input: a flag byte, then the file. With bit 0 of the flag set, the header checksum and the
//! file checksum are first made to fit, so that mutations reach the region table, the page
//! bitmaps and the pages. The file is written to this process's directory in /dev/shm and read
//! with `SnapshotReader::open` under small limits (64 KiB of state, 8 regions, 1 MiB of
//! memory, so a hostile header cannot make the fuzzer allocate much), then, if it opens, into
//! fresh guest memory of the snapshot's regions with `read_memory_into`. Properties checked
//! besides "no panic":
//! - what opens stays within the limits, and a file that reads whole was read to its end;
//! - a snapshot read whole, written again by `write_snapshot`, reads back as the same state
//!   and the same memory.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use godwit_vmm::snapshot::{write_snapshot, SnapshotLimits, SnapshotReader};
use libfuzzer_sys::fuzz_target;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn limits() -> SnapshotLimits {
    SnapshotLimits {
        max_state_len: 64 << 10,
        max_regions: 8,
        max_memory_bytes: 1 << 20,
    }
}

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| godwit_fuzz::scratch_dir("snapshot_file"))
}

/// Fresh (zero) guest memory of `regions`, if vm-memory can map that layout.
fn memory(regions: &[(u64, u64)]) -> Option<GuestMemoryMmap<AtomicBitmap>> {
    let ranges: Vec<_> = regions
        .iter()
        .map(|&(gpa, size)| (GuestAddress(gpa), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).ok()
}

fn contents(memory: &GuestMemoryMmap<AtomicBitmap>, regions: &[(u64, u64)]) -> Vec<u8> {
    let mut all = Vec::new();
    for &(gpa, size) in regions {
        let mut region = vec![0u8; size as usize];
        memory
            .read_slice(&mut region, GuestAddress(gpa))
            .expect("a region of the layout reads");
        all.extend(region);
    }
    all
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, file)) = data.split_first() else {
        return;
    };
    let mut file = file.to_vec();
    if flags & 1 == 1 {
        godwit_fuzz::reseal_snapshot(&mut file);
    }
    let path = dir().join("input.snap");
    std::fs::write(&path, &file).expect("the input is written to /dev/shm");
    let limits = limits();
    let Ok(reader) = SnapshotReader::open(&path, &limits) else {
        return;
    };
    let regions = reader.regions().to_vec();
    let state = reader.state().to_vec();
    assert!(state.len() <= limits.max_state_len);
    assert!(regions.len() <= limits.max_regions as usize);
    let total: u64 = regions.iter().map(|&(_, size)| size).sum();
    assert!(total <= limits.max_memory_bytes);

    let Some(restored) = memory(&regions) else {
        return;
    };
    let Ok(summary) = reader.read_memory_into(&restored) else {
        return;
    };
    assert_eq!(
        summary.bytes_written,
        file.len() as u64,
        "not read to its end"
    );
    assert_eq!(summary.memory_bytes, total);

    let copy = dir().join("copy.snap");
    write_snapshot(&copy, &state, &restored).expect("a restored snapshot is written again");
    let reader = SnapshotReader::open(&copy, &limits).expect("a written snapshot opens");
    assert_eq!(reader.state(), &state[..]);
    assert_eq!(reader.regions(), &regions[..]);
    let again = memory(&regions).expect("the same layout maps again");
    reader
        .read_memory_into(&again)
        .expect("a written snapshot reads whole");
    assert_eq!(
        contents(&again, &regions),
        contents(&restored, &regions),
        "memory changed on a round trip"
    );
});
