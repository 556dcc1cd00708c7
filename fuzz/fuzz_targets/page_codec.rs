//! The page codec on its own: one page of a Pages batch as the target decodes it, faster than
//! through whole frames.
//!
//! Input: a page kind byte (0 zero, 1 raw, 2 zstd, anything else unknown), then the page's
//! data. `PageDecoder::decode` must give a whole page or an error, never a panic, and never
//! inflate beyond the page (a zstd bomb is an error). When the data holds a page or more, its
//! first 4096 bytes also make a round trip through the encoder in each compression setting:
//! decode(encode(page)) == page.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use page_transfer::codec::{Compression, PageDecoder, PageEncoder};
use page_transfer::protocol::{PageKind, PAGE_SIZE};

struct Codec {
    decoder: PageDecoder,
    /// zstd and none: Auto compresses like zstd but remembers past pages, which would make a
    /// run depend on the inputs before it.
    encoders: [PageEncoder; 2],
}

thread_local! {
    static CODEC: RefCell<Codec> = RefCell::new(Codec {
        decoder: PageDecoder::new().expect("a zstd decompression context"),
        encoders: [Compression::Zstd, Compression::None]
            .map(|mode| PageEncoder::new(mode).expect("a zstd compression context")),
    });
}

fuzz_target!(|input: &[u8]| {
    let Some((&kind, data)) = input.split_first() else {
        return;
    };
    CODEC.with_borrow_mut(|codec| {
        let mut page = [0xAA; PAGE_SIZE];
        if let Ok(kind) = PageKind::try_from(kind) {
            if codec.decoder.decode(kind, data, &mut page).is_ok() {
                match kind {
                    PageKind::Zero => assert!(data.is_empty() && page.iter().all(|&b| b == 0)),
                    PageKind::Raw => assert_eq!(&page[..], data),
                    PageKind::Zstd => assert!((1..=PAGE_SIZE).contains(&data.len())),
                }
            }
        }
        if let Some(original) = data.first_chunk::<PAGE_SIZE>() {
            for encoder in &mut codec.encoders {
                let (kind, encoded) = encoder.encode(original);
                let encoded = encoded.to_vec();
                codec
                    .decoder
                    .decode(kind, &encoded, &mut page)
                    .unwrap_or_else(|e| panic!("an encoded {kind} page does not decode: {e}"));
                assert_eq!(&page, original, "a {kind} page changed on the way");
            }
        }
    });
});
