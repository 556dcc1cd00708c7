//! The migration frame decoder, on what a hostile or broken peer could send on any channel.
//!
//! Input: a flag byte, then a stream of frames. With bit 0 of the flag set, every frame's
//! checksum is first made to fit, so that mutated frames reach the payload decoders.
//!
//! Each frame goes through what the target runs on it (page-transfer/src/target.rs):
//! `read_frame` (header, limits, checksum), `Message::decode`, and for a Pages batch
//! `PagesView::parse` and every page through the `PageDecoder` (zstd included) and the address
//! map of the last Setup's regions. Properties checked besides "no panic":
//! - a header that parses writes back as the same 16 bytes;
//! - a decoded message encodes again, to the very payload it came from (a Hello may have had
//!   more after its fields), and reads back equal;
//! - `PagesView` accepts exactly the batches `Message::decode` accepts, and `PagesWriter`
//!   rebuilds the frame `Message::encode` makes;
//! - a decoded page is a whole page, and a zstd page survives re-encoding;
//! - a gpa the Setup's map places maps back to itself, and so does its global page index;
//! - a Present answer (resuming a post-copy) clears, from the source's record of missing
//!   pages, the pages of its runs that are guest memory and no others;
//! - a negotiated version is one both sides speak.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use page_transfer::bitmap::{PageBitmap, PageMap};
use page_transfer::codec::{Compression, PageDecoder, PageEncoder};
use page_transfer::protocol::{
    negotiate, read_frame, read_message, Command, FrameHeader, Message, PageKind, PagesView,
    PagesWriter, HEADER_LEN, MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};
use page_transfer::vm::Region;

/// Largest Setup (in pages) whose Present answers are followed through a bitmap of missing
/// pages: the source makes one of its own memory, the peer's Setup could ask for petabytes.
const MAX_BITMAP_PAGES: u64 = 1 << 20;

struct Codec {
    decoder: PageDecoder,
    encoder: PageEncoder,
}

thread_local! {
    // zstd contexts are costly to make; the target keeps one per channel thread too.
    static CODEC: RefCell<Codec> = RefCell::new(Codec {
        decoder: PageDecoder::new().expect("a zstd decompression context"),
        encoder: PageEncoder::new(Compression::Zstd).expect("a zstd compression context"),
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    let mut stream = stream.to_vec();
    if flags & 1 == 1 {
        godwit_fuzz::reseal_frames(&mut stream);
    }
    if let Some(first) = stream.first_chunk::<HEADER_LEN>() {
        if let Ok(header) = FrameHeader::parse(first) {
            assert_eq!(
                &header.to_bytes(),
                first,
                "a parsed header writes back differently"
            );
        }
    }
    CODEC.with_borrow_mut(|codec| receive(&stream, codec));
});

/// Reads frames until the stream ends or a frame cannot be read (after which the target
/// would not read on either); a frame that does not decode is skipped.
fn receive(stream: &[u8], codec: &mut Codec) {
    let mut r = stream;
    let mut payload = Vec::new();
    let mut map: Option<PageMap> = None;
    while let Ok(command) = read_frame(&mut r, &mut payload) {
        let decoded = Message::decode(command, &payload);
        if command == Command::Pages {
            let view = PagesView::parse(&payload);
            assert_eq!(
                view.is_ok(),
                decoded.is_ok(),
                "PagesView and Message::decode disagree: {view:?} / {decoded:?}"
            );
            if let Ok(view) = view {
                pages(view, map.as_ref(), codec);
            }
        }
        let Ok(msg) = decoded else {
            continue;
        };
        round_trip(command, &payload, &msg);
        match msg {
            Message::Setup { regions, .. } => {
                map = Some(PageMap::new(
                    regions
                        .into_iter()
                        .map(|(gpa, size)| Region { gpa, size })
                        .collect(),
                ));
            }
            Message::Present { runs, .. } => {
                if let Some(map) = map.as_ref() {
                    if map.total_pages() <= MAX_BITMAP_PAGES {
                        present(map, &runs);
                    }
                }
            }
            Message::Hello {
                version,
                min_version,
                ..
            } => {
                if let Ok(v) = negotiate(version, min_version) {
                    assert!(
                        v >= min_version && v <= version,
                        "{v} outside the peer's range"
                    );
                    assert!((MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v));
                    assert_eq!(negotiate(v, v).ok(), Some(v), "the source refuses {v}");
                }
            }
            _ => {}
        }
    }
}

fn round_trip(command: Command, payload: &[u8], msg: &Message) {
    let mut frame = Vec::new();
    if let Err(e) = msg.encode(&mut frame) {
        panic!("a decoded {command} does not encode: {e}");
    }
    let encoded = &frame[HEADER_LEN..];
    if command == Command::Hello {
        assert!(payload.starts_with(encoded), "Hello encodes differently");
    } else {
        assert_eq!(encoded, payload, "{command} encodes differently");
    }
    match read_message(&mut &frame[..]) {
        Ok(again) => assert_eq!(&again, msg, "{command} reads back differently"),
        Err(e) => panic!("an encoded {command} does not read back: {e}"),
    }
    if let Message::Pages { pages } = msg {
        let mut writer = PagesWriter::new();
        for p in pages {
            writer
                .push(p.gpa, p.kind, &p.data)
                .expect("a decoded page entry is pushed");
        }
        assert_eq!(writer.finish(), &frame[..], "PagesWriter and encode differ");
    }
}

fn pages(view: PagesView<'_>, map: Option<&PageMap>, codec: &mut Codec) {
    let mut page = [0u8; PAGE_SIZE];
    for (gpa, kind, data) in view {
        if codec.decoder.decode(kind, data, &mut page).is_ok() {
            match kind {
                PageKind::Zero => assert!(page.iter().all(|&b| b == 0)),
                PageKind::Raw => assert_eq!(&page[..], data),
                PageKind::Zstd => {
                    let (kind, again) = codec.encoder.encode(&page);
                    let again = again.to_vec();
                    let mut back = [0u8; PAGE_SIZE];
                    codec
                        .decoder
                        .decode(kind, &again, &mut back)
                        .expect("a re-encoded page decodes");
                    assert_eq!(back, page, "a {kind} page changed on the way");
                }
            }
        }
        let Some(map) = map else {
            continue;
        };
        if let Some((region, index)) = map.locate(gpa) {
            assert!(index < map.pages(region));
            assert_eq!(map.gpa(region, index), gpa, "gpa {gpa:#x} maps elsewhere");
            let global = map.global(region, index);
            assert!(global < map.total_pages());
            assert_eq!(map.from_global(global), (region, index));
        }
    }
}

/// What the source does with a Present answer (page-transfer/src/source.rs): each run clears
/// its pages, up to the end of the region it starts in, from the bitmap of missing pages.
fn present(map: &PageMap, runs: &[(u64, u32)]) {
    let mut missing: Vec<PageBitmap> = (0..map.regions().len())
        .map(|i| PageBitmap::full(map.pages(i)))
        .collect();
    for &(gpa, pages) in runs {
        // The source fails the resume on a run outside memory; the others still count here.
        let Some((region, first)) = map.locate(gpa) else {
            continue;
        };
        let n = u64::from(pages).min(map.pages(region) - first);
        let before = missing[region].count();
        missing[region].clear_range(first, n);
        let cleared = before - missing[region].count();
        assert!(cleared <= n, "{cleared} pages cleared by a run of {n}");
        assert!(!missing[region].get(first) && !missing[region].get(first + n - 1));
    }
}
