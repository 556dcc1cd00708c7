//! Page codec micro-benchmark: encode and decode speed and ratio per memory pattern and
//! compression setting, and `is_zero` speed. Prints a table, asserts nothing.
//!
//! `cargo run --release -p page-transfer --example codec_bench [MiB per pattern, default 64]`

use std::hint::black_box;
use std::time::Instant;

use page_transfer::codec::{is_zero, Compression, PageDecoder, PageEncoder};
use page_transfer::protocol::{PageKind, PAGE_SIZE};
use page_transfer::testing::{counter_page, XorShift};

/// `pages` pages of one pattern, written byte by byte so that no page is the kernel's shared
/// zero page (which would make reads of zero memory look faster than they are).
fn memory(pattern: &str, pages: usize) -> Vec<u8> {
    let mut mem = vec![0xFFu8; pages * PAGE_SIZE];
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for (p, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
        match pattern {
            "zero" => page.fill(black_box(0)),
            "counter" => page.copy_from_slice(&counter_page(p as u64, 1 + p as u64 % 7)),
            "random" => rng.fill(page),
            _ => {
                let (data, zeros) = page.split_at_mut(PAGE_SIZE / 2);
                rng.fill(data);
                zeros.fill(black_box(0));
            }
        }
    }
    mem
}

fn mb_per_s(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e6
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64);
    let pages = mib * (1 << 20) / PAGE_SIZE;
    println!("{mib} MiB ({pages} pages) per pattern, one thread\n");
    println!(
        "{:<10} {:<5} {:>11} {:>11} {:>7} {:>9} {:>7} {:>7} {:>7}",
        "pattern", "mode", "encode MB/s", "decode MB/s", "ratio", "attempts", "zero", "raw", "zstd"
    );
    for pattern in ["zero", "counter", "random", "half-zero"] {
        let mem = memory(pattern, pages);
        for mode in [Compression::Auto, Compression::Zstd, Compression::None] {
            let mut enc = PageEncoder::new(mode).expect("zstd context");
            let start = Instant::now();
            for page in mem.chunks_exact(PAGE_SIZE) {
                black_box(enc.encode(page));
            }
            let encode = start.elapsed().as_secs_f64();
            let stats = enc.take_stats();

            // Keep the encoded stream (untimed), then decode it into fresh memory.
            let mut stream = Vec::with_capacity(stats.bytes_out as usize);
            let mut index: Vec<(PageKind, usize, usize)> = Vec::with_capacity(pages);
            for page in mem.chunks_exact(PAGE_SIZE) {
                let (kind, data) = enc.encode(page);
                index.push((kind, stream.len(), data.len()));
                stream.extend_from_slice(data);
            }
            let mut dec = PageDecoder::new().expect("zstd context");
            let mut out = vec![0xFFu8; mem.len()];
            let start = Instant::now();
            for (page, &(kind, at, len)) in out.chunks_exact_mut(PAGE_SIZE).zip(&index) {
                let page: &mut [u8; PAGE_SIZE] = page.try_into().expect("page sized");
                dec.decode(kind, &stream[at..at + len], page)
                    .expect("decodes");
            }
            let decode = start.elapsed().as_secs_f64();
            assert!(out == mem, "round trip changed {pattern} memory");

            println!(
                "{:<10} {:<5} {:>11.0} {:>11.0} {:>7.3} {:>9} {:>7} {:>7} {:>7}",
                pattern,
                mode.name(),
                mb_per_s(mem.len(), encode),
                mb_per_s(mem.len(), decode),
                stats.ratio(),
                stats.compress_attempts,
                stats.zero_pages,
                stats.raw_pages,
                stats.zstd_pages
            );
        }
    }

    println!("\nis_zero");
    let zeros = memory("zero", pages);
    let mut last_byte = zeros.clone();
    for page in last_byte.chunks_exact_mut(PAGE_SIZE) {
        page[PAGE_SIZE - 1] = 1;
    }
    let one_page = vec![black_box(0u8); PAGE_SIZE];
    let cases: [(&str, &[u8], usize); 3] = [
        ("zero pages, from memory", &zeros, 4),
        ("last byte set, from memory", &last_byte, 4),
        ("one zero page, in cache", &one_page, 200_000),
    ];
    for (name, mem, repeat) in cases {
        let start = Instant::now();
        let mut found = 0usize;
        for _ in 0..repeat {
            for page in mem.chunks_exact(PAGE_SIZE) {
                found += usize::from(is_zero(black_box(page)));
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        black_box(found);
        println!(
            "  {name:<28} {:>6.1} GB/s",
            (mem.len() * repeat) as f64 / seconds / 1e9
        );
    }
}
