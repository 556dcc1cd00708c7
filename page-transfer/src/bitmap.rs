//! Page bitmaps: which pages of a region are dirty, sent, received. A plain one for dirty
//! sets and an atomic one shared between channel threads.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// A bitmap over the pages of one region (bit set = page selected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl PageBitmap {
    pub fn new(pages: u64) -> Self {
        PageBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    pub fn full(pages: u64) -> Self {
        let mut b = Self::new(pages);
        for w in &mut b.words {
            *w = u64::MAX;
        }
        b.clear_tail();
        b
    }

    /// A bitmap from 64-bit words (as KVM returns them); bits past `pages` are ignored.
    pub fn from_words(mut words: Vec<u64>, pages: u64) -> Self {
        words.resize(pages.div_ceil(64) as usize, 0);
        let mut b = PageBitmap { words, pages };
        b.clear_tail();
        b
    }

    fn clear_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Clears `n` pages from `first` (those past the end are ignored).
    pub fn clear_range(&mut self, first: u64, n: u64) {
        for page in first..first.saturating_add(n).min(self.pages) {
            self.words[(page / 64) as usize] &= !(1 << (page % 64));
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// ORs `other` into this bitmap (same size).
    pub fn union(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Runs of set pages that never cross a multiple of `align` pages.
    pub fn aligned_runs(&self, align: u64) -> Vec<(u64, u64)> {
        let align = align.max(1);
        let mut out = Vec::new();
        for (first, n) in self.runs(u64::MAX) {
            let mut start = first;
            let end = first + n;
            while start < end {
                let boundary = (start / align + 1) * align;
                let stop = boundary.min(end);
                out.push((start, stop - start));
                start = stop;
            }
        }
        out
    }

    /// Runs of consecutive set pages as (first page, count), each at most `max_run` long.
    pub fn runs(&self, max_run: u64) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut start: Option<u64> = None;
        for (wi, &word) in self.words.iter().enumerate() {
            if word == 0 && start.is_none() {
                continue;
            }
            if word == u64::MAX && start.is_some() {
                continue;
            }
            for bit in 0..64 {
                let page = wi as u64 * 64 + bit;
                if page >= self.pages {
                    break;
                }
                if word & (1 << bit) != 0 {
                    if start.is_none() {
                        start = Some(page);
                    }
                } else if let Some(s) = start.take() {
                    push_runs(&mut runs, s, page - s, max_run);
                }
            }
        }
        if let Some(s) = start {
            push_runs(&mut runs, s, self.pages - s, max_run);
        }
        runs
    }
}

fn push_runs(runs: &mut Vec<(u64, u64)>, mut start: u64, mut len: u64, max_run: u64) {
    while len > 0 {
        let n = len.min(max_run.max(1));
        runs.push((start, n));
        start += n;
        len -= n;
    }
}

/// A bitmap several threads update at once.
#[derive(Debug)]
pub struct AtomicPageBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl AtomicPageBitmap {
    pub fn new(pages: u64) -> Self {
        AtomicPageBitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Sets the bit; returns whether it was already set.
    pub fn test_and_set(&self, page: u64) -> bool {
        if page >= self.pages {
            return true;
        }
        let mask = 1u64 << (page % 64);
        self.words[(page / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask != 0
    }

    /// Sets pages `first..first + n` (clipped to the bitmap), a word at a time.
    pub fn set_range(&self, first: u64, n: u64) {
        self.for_range(first, n, |word, mask| {
            word.fetch_or(mask, Ordering::AcqRel);
        });
    }

    /// Clears pages `first..first + n` (clipped to the bitmap).
    pub fn clear_range(&self, first: u64, n: u64) {
        self.for_range(first, n, |word, mask| {
            word.fetch_and(!mask, Ordering::AcqRel);
        });
    }

    /// Whether any of pages `first..first + n` is set.
    pub fn any_in_range(&self, first: u64, n: u64) -> bool {
        let mut any = false;
        self.for_range(first, n, |word, mask| {
            any |= word.load(Ordering::Acquire) & mask != 0;
        });
        any
    }

    fn for_range(&self, first: u64, n: u64, mut f: impl FnMut(&AtomicU64, u64)) {
        let end = first.saturating_add(n).min(self.pages);
        let mut page = first;
        while page < end {
            let bit = page % 64;
            let count = (64 - bit).min(end - page);
            let mask = if count == 64 {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << bit
            };
            f(&self.words[(page / 64) as usize], mask);
            page += count;
        }
    }

    pub fn clear(&self, page: u64) {
        if page < self.pages {
            let mask = 1u64 << (page % 64);
            self.words[(page / 64) as usize].fetch_and(!mask, Ordering::AcqRel);
        }
    }

    pub fn get(&self, page: u64) -> bool {
        page < self.pages
            && self.words[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// A plain copy.
    pub fn snapshot(&self) -> PageBitmap {
        PageBitmap::from_words(
            self.words
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
            self.pages,
        )
    }
}

/// Maps guest physical addresses to (region index, page index within the region) and back.
#[derive(Debug, Clone)]
pub struct PageMap {
    regions: Vec<crate::vm::Region>,
    /// Global index of each region's first page.
    first_page: Vec<u64>,
}

impl PageMap {
    pub fn new(regions: Vec<crate::vm::Region>) -> Self {
        let mut first_page = Vec::with_capacity(regions.len());
        let mut total = 0;
        for r in &regions {
            first_page.push(total);
            total += r.size / PAGE;
        }
        PageMap {
            regions,
            first_page,
        }
    }

    /// Index of a page counting across all regions in address order.
    pub fn global(&self, region: usize, page: u64) -> u64 {
        self.first_page[region] + page
    }

    /// (region, page) of a global page index below [`PageMap::total_pages`].
    pub fn from_global(&self, global: u64) -> (usize, u64) {
        let region = self.first_page.partition_point(|&first| first <= global) - 1;
        (region, global - self.first_page[region])
    }

    pub fn regions(&self) -> &[crate::vm::Region] {
        &self.regions
    }

    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.size / PAGE).sum()
    }

    /// (region, page) of `gpa`, if it is guest memory.
    pub fn locate(&self, gpa: u64) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (gpa >= r.gpa && gpa < r.gpa + r.size).then(|| (i, (gpa - r.gpa) / PAGE))
        })
    }

    pub fn gpa(&self, region: usize, page: u64) -> u64 {
        self.regions[region].gpa + page * PAGE
    }

    /// Pages of region `i`.
    pub fn pages(&self, i: usize) -> u64 {
        self.regions[i].size / PAGE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_and_cap() {
        let mut b = PageBitmap::new(200);
        for p in [0, 1, 2, 10, 63, 64, 65, 199] {
            b.set(p);
        }
        assert_eq!(b.runs(100), vec![(0, 3), (10, 1), (63, 3), (199, 1)]);
        assert_eq!(
            b.runs(2),
            vec![(0, 2), (2, 1), (10, 1), (63, 2), (65, 1), (199, 1)]
        );
        assert_eq!(b.count(), 8);
        assert_eq!(
            b.aligned_runs(64),
            vec![(0, 3), (10, 1), (63, 1), (64, 2), (199, 1)]
        );
        let f = PageBitmap::full(130);
        assert_eq!(f.count(), 130);
        assert_eq!(f.runs(1000), vec![(0, 130)]);
        assert_eq!(f.runs(64), vec![(0, 64), (64, 64), (128, 2)]);
    }

    #[test]
    fn from_words_ignores_bits_past_the_end() {
        let b = PageBitmap::from_words(vec![u64::MAX, u64::MAX], 70);
        assert_eq!(b.count(), 70);
        assert!(!b.get(70));
    }

    #[test]
    fn atomic_bitmap() {
        let b = AtomicPageBitmap::new(100);
        assert!(!b.test_and_set(5));
        assert!(b.test_and_set(5));
        assert!(b.get(5));
        b.clear(5);
        assert!(!b.get(5));
        assert!(b.test_and_set(1000), "out of range counts as set");
        b.test_and_set(99);
        assert_eq!(b.snapshot().runs(10), vec![(99, 1)]);
        b.set_range(10, 70);
        assert_eq!(b.snapshot().runs(1000), vec![(10, 70), (99, 1)]);
        assert!(b.any_in_range(0, 11));
        assert!(!b.any_in_range(0, 10));
        assert!(!b.any_in_range(80, 19));
        b.clear_range(0, 1000);
        assert_eq!(b.count(), 0);
        b.set_range(90, 1000);
        assert_eq!(b.count(), 10);
    }

    #[test]
    fn page_map_locates() {
        let m = PageMap::new(vec![
            crate::vm::Region { gpa: 0, size: 8192 },
            crate::vm::Region {
                gpa: 1 << 20,
                size: 4096,
            },
        ]);
        assert_eq!(m.total_pages(), 3);
        assert_eq!(m.locate(4096), Some((0, 1)));
        assert_eq!(m.locate(1 << 20), Some((1, 0)));
        assert_eq!(m.locate(8192), None);
        assert_eq!(m.gpa(1, 0), 1 << 20);
    }
}
