//! Reproducible data for tests and benchmarks, with no rand crate: an xorshift64 generator and
//! the page patterns the built-in guests write. Used by this crate's tests, its `codec_bench`
//! example and the agent's tests; not part of the migration engine.

use crate::protocol::PAGE_SIZE;

/// xorshift64 (Marsaglia): deterministic, so a failing fuzz case or a benchmark input
/// reproduces. The seed must not be 0.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// What the `dirty` guest writes into page `p` at generation `g` (counter content): 64-bit
/// word `w` is `((p << 32) | g) + w`. Compresses about 7:1.
pub fn counter_page(p: u64, g: u64) -> Vec<u8> {
    (0..PAGE_SIZE as u64 / 8)
        .flat_map(|w| ((p << 32) | g).wrapping_add(w).to_le_bytes())
        .collect()
}

/// An incompressible page.
pub fn random_page(rng: &mut XorShift) -> Vec<u8> {
    let mut page = vec![0; PAGE_SIZE];
    rng.fill(&mut page);
    page
}

/// Random first half, zero second half.
pub fn half_zero_page(rng: &mut XorShift) -> Vec<u8> {
    let mut page = vec![0; PAGE_SIZE];
    rng.fill(&mut page[..PAGE_SIZE / 2]);
    page
}
