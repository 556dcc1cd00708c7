//! Proof that a migration moved memory exactly: a 64-bit hash per page (xxh3) of the source's
//! memory at switchover and of the last version of each page the target received, folded into
//! one digest (blake3 over the hashes). The target computes it as pages arrive, so the guest
//! running on the target in the meantime does not blur it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::bitmap::PageMap;
use crate::protocol::PAGE_SIZE;
use crate::vm::{SourceVm, VmAccessError};

#[derive(Debug)]
pub struct PageDigests {
    hashes: Vec<AtomicU64>,
}

/// The hash of a page of zeros (fresh memory that nothing wrote).
pub fn zero_page_hash() -> u64 {
    xxhash_rust::xxh3::xxh3_64(&[0u8; PAGE_SIZE])
}

impl PageDigests {
    /// All pages start as zero pages.
    pub fn new(pages: u64) -> Self {
        let zero = zero_page_hash();
        PageDigests {
            hashes: (0..pages).map(|_| AtomicU64::new(zero)).collect(),
        }
    }

    pub fn set(&self, global_page: u64, data: &[u8]) {
        self.set_hash(global_page, xxhash_rust::xxh3::xxh3_64(data));
    }

    pub fn set_hash(&self, global_page: u64, hash: u64) {
        if let Some(h) = self.hashes.get(global_page as usize) {
            h.store(hash, Ordering::Relaxed);
        }
    }

    /// Hashes all of a (paused) source VM's memory.
    pub fn of_source(vm: &dyn SourceVm, map: &PageMap) -> Result<Self, VmAccessError> {
        const CHUNK: usize = 256;
        let digests = PageDigests::new(map.total_pages());
        let mut buf = vec![0u8; CHUNK * PAGE_SIZE];
        for (region, r) in map.regions().iter().enumerate() {
            let pages = map.pages(region);
            let mut page = 0;
            while page < pages {
                let n = (pages - page).min(CHUNK as u64) as usize;
                vm.read(r.gpa + page * PAGE_SIZE as u64, &mut buf[..n * PAGE_SIZE])?;
                for (i, data) in buf[..n * PAGE_SIZE].chunks_exact(PAGE_SIZE).enumerate() {
                    digests.set(map.global(region, page + i as u64), data);
                }
                page += n as u64;
            }
        }
        Ok(digests)
    }

    /// `xxh3-blake3:<hex>`.
    pub fn finish(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        for h in &self.hashes {
            hasher.update(&h.load(Ordering::Relaxed).to_le_bytes());
        }
        format!("xxh3-blake3:{}", hasher.finalize().to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_follows_page_contents() {
        let a = PageDigests::new(4);
        let b = PageDigests::new(4);
        assert_eq!(a.finish(), b.finish());
        a.set(2, &[1u8; PAGE_SIZE]);
        assert_ne!(a.finish(), b.finish());
        b.set(2, &[1u8; PAGE_SIZE]);
        assert_eq!(a.finish(), b.finish());
        b.set(3, &[0u8; PAGE_SIZE]);
        assert_eq!(
            a.finish(),
            b.finish(),
            "writing zeros is the same as never writing"
        );
    }
}
