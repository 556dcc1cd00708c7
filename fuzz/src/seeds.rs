//! Valid inputs for each fuzz target, made by the real encoders, so that fuzzing starts from
//! the formats' real shapes rather than from nothing. `cargo run --example seeds` (in `fuzz/`)
//! writes them to `fuzz/seeds/<target>/`; each is a few KiB.
//!
//! Every input starts with the byte the target reads first (a flag or a kind), as its doc says.

use std::path::Path;

use godwit_vmm::microvm::devices::{DevicesState, SerialRegisters};
use godwit_vmm::microvm::state::{KvmVmState, VcpuState, VmConfig, VmState};
use godwit_vmm::snapshot::write_snapshot;
use page_transfer::codec::{Compression, PageEncoder};
use page_transfer::protocol::{
    Message, PageKind, PagesWriter, MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};
use page_transfer::testing::counter_page;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{resource_frame, T_ABORT, T_CHUNK, T_COMMIT, T_FILE_BEGIN, T_FILE_DATA, T_FILE_END};
use crate::{T_HELLO, T_ITEM};

/// One named input.
pub type Seed = (&'static str, Vec<u8>);

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Vec<Seed>)> {
    vec![
        ("frame_decoder", frame_decoder()),
        ("page_codec", page_codec()),
        ("saved_state", saved_state()),
        ("snapshot_file", snapshot_file()),
        ("resource_protocol", resource_protocol()),
    ]
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    msg.encode(&mut buf).expect("a seed message encodes");
    buf
}

/// A zstd page, as the source's encoder makes one.
fn zstd_page() -> Vec<u8> {
    let mut encoder = PageEncoder::new(Compression::Zstd).expect("a zstd context");
    let page = counter_page(3, 1);
    let (kind, data) = encoder.encode(&page);
    assert_eq!(kind, PageKind::Zstd);
    data.to_vec()
}

/// frame_decoder: a flag byte (0: checksums as they are), then a stream of frames.
pub fn frame_decoder() -> Vec<Seed> {
    let setup = Message::Setup {
        mode: 0,
        verify: true,
        regions: vec![(0, 64 << 10), (1 << 20, 16 << 10)],
        vm: br#"{"name":"vm"}"#.to_vec(),
    };
    let control = [
        Message::Hello {
            version: PROTOCOL_VERSION,
            min_version: MIN_PROTOCOL_VERSION,
            migration_id: *b"0123456789abcdef",
            channel: 0,
            channels: 3,
        },
        Message::HelloAck {
            version: PROTOCOL_VERSION,
        },
        setup.clone(),
        Message::SetupAck,
        Message::Marker {
            phase: 1,
            pages: 20,
        },
        Message::Discard {
            runs: vec![(0x3000, 1), (0x1_0000, 4)],
        },
        Message::State {
            blob: b"sealed state".to_vec(),
        },
        Message::Switchover {
            postcopy: false,
            markers_phase: 2,
            digest: "xxh3-blake3:00ff".into(),
        },
        Message::Resumed,
        Message::Keepalive,
        Message::Resume,
        Message::Present {
            last: true,
            runs: vec![(0, 4), (1 << 20, 1)],
        },
        Message::PageRequest {
            gpa: 0x4000,
            pages: 2,
        },
        Message::AllSent { phase: 2 },
        Message::Done {
            digest: "xxh3-blake3:00ff".into(),
            report: r#"{"faults":0}"#.into(),
        },
        Message::Abort {
            reason: "The migration was cancelled".into(),
        },
        Message::error("Bad frame"),
    ];
    let mut pages = PagesWriter::new();
    pages.push(0, PageKind::Zero, &[]).expect("a zero page");
    pages
        .push(0x1000, PageKind::Raw, &counter_page(1, 1))
        .expect("a raw page");
    pages
        .push(0x10_0000, PageKind::Zstd, &zstd_page())
        .expect("a zstd page");
    let mut data = vec![0];
    data.extend(frame(&setup));
    data.extend(pages.finish());
    data.extend(frame(&Message::Marker { phase: 1, pages: 3 }));

    let mut seeds: Vec<Seed> = vec![("data-channel", data)];
    let mut all = vec![0];
    for msg in &control {
        all.extend(frame(msg));
        let mut one = vec![0];
        one.extend(frame(msg));
        seeds.push((msg.command().name(), one));
    }
    seeds.push(("control-channel", all));
    seeds
}

/// page_codec: a page kind byte, then the page's data.
pub fn page_codec() -> Vec<Seed> {
    let with_kind = |kind: PageKind, data: &[u8]| {
        let mut seed = vec![kind as u8];
        seed.extend_from_slice(data);
        seed
    };
    vec![
        ("zero", with_kind(PageKind::Zero, &[])),
        ("raw", with_kind(PageKind::Raw, &counter_page(7, 2))),
        ("zstd", with_kind(PageKind::Zstd, &zstd_page())),
    ]
}

/// A VM state as a microVM of one vCPU saves it (the registers KVM would fill left default).
pub fn sample_state() -> VmState {
    let vcpu = VcpuState {
        id: 0,
        cpuid: vec![Default::default(); 2],
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        msrs: vec![Default::default()],
        events: Default::default(),
        tsc_khz: 2_000_000,
    };
    VmState {
        config: VmConfig {
            vcpus: 1,
            memory_bytes: 64 << 20,
            guest_json: r#"{"kind":"idle"}"#.into(),
            tsc_khz: 2_000_000,
        },
        vcpus: vec![vcpu],
        vm: KvmVmState {
            irqchips: vec![Default::default(); 3],
            pit: Default::default(),
            clock: Default::default(),
        },
        devices: DevicesState {
            serial: SerialRegisters {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: b"ab".to_vec(),
            },
            stream_unread: b"unread".to_vec(),
        },
    }
}

/// saved_state: a mode byte (0: the bytes are a sealed blob; 1: they are the payload, which the
/// target seals), then the bytes.
pub fn saved_state() -> Vec<Seed> {
    let sealed = sample_state().encode().expect("the sample state encodes");
    let payload = sealed[godwit_vmm::sealed::HEADER_LEN..].to_vec();
    vec![
        ("sealed", [&[0][..], &sealed].concat()),
        ("payload", [&[1][..], &payload].concat()),
    ]
}

/// snapshot_file: a flag byte (0: checksums as they are), then a snapshot file of two regions,
/// with a few non-zero pages.
pub fn snapshot_file() -> Vec<Seed> {
    let layout = [(0u64, 16usize << 10), (64 << 10, 8 << 10)];
    let ranges: Vec<_> = layout
        .iter()
        .map(|&(gpa, size)| (GuestAddress(gpa), size))
        .collect();
    let memory: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_ranges(&ranges).expect("seed memory");
    for (gpa, fill) in [(0x1000, 1u8), (0x3000, 2), (0x11000, 3)] {
        memory
            .write_slice(&[fill; PAGE_SIZE], GuestAddress(gpa))
            .expect("a seed page");
    }
    let dir = std::env::temp_dir().join(format!("godwit-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let path = dir.join("seed.snap");
    write_snapshot(&path, b"sealed state", &memory).expect("a seed snapshot");
    let file = read(&path);
    let _ = std::fs::remove_dir_all(&dir);
    vec![("two-regions", [&[0][..], &file].concat())]
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A disk chunk payload: `[u16 name len][name][u64 block][u32 count][u8 zero][data]`.
fn chunk(name: &str, block: u64, count: u32, data: Option<&[u8]>) -> Vec<u8> {
    let mut f = (name.len() as u16).to_le_bytes().to_vec();
    f.extend_from_slice(name.as_bytes());
    f.extend_from_slice(&block.to_le_bytes());
    f.extend_from_slice(&count.to_le_bytes());
    f.push(u8::from(data.is_none()));
    f.extend_from_slice(data.unwrap_or_default());
    f
}

/// resource_protocol: what the resource listener reads on a connection: a header line, then
/// (for `GODWIT-RES`) the resource stream of a source moving disk `root` (1 MiB) and copying
/// scratch `cache`, the resources the target expects.
pub fn resource_protocol() -> Vec<Seed> {
    let hello = resource_frame(T_HELLO, br#"{"version":1,"min_version":1}"#);
    let mut transfer = b"GODWIT-RES id\n".to_vec();
    for f in [
        hello.clone(),
        resource_frame(T_ITEM, br#"{"name":"root","kind":"disk","bytes":1048576}"#),
        resource_frame(T_CHUNK, &chunk("root", 0, 64, None)),
        resource_frame(
            T_CHUNK,
            &chunk(
                "root",
                5,
                1,
                Some(&[0x5a; godwit_vmm::microvm::block::BLOCK_SIZE as usize]),
            ),
        ),
        resource_frame(T_ITEM, br#"{"name":"cache","kind":"scratch","bytes":0}"#),
        resource_frame(T_FILE_BEGIN, br#"{"name":"cache","file":"a.bin","size":5}"#),
        resource_frame(T_FILE_DATA, b"hello"),
        resource_frame(
            T_FILE_END,
            format!(r#"{{"blake3":"{}"}}"#, blake3::hash(b"hello").to_hex()).as_bytes(),
        ),
        resource_frame(T_COMMIT, &[]),
    ] {
        transfer.extend(f);
    }
    let mut abort = b"GODWIT-RES id\n".to_vec();
    abort.extend(hello);
    abort.extend(resource_frame(T_ABORT, &[]));
    vec![
        ("link", b"GODWIT-LINK vm web\n".to_vec()),
        ("transfer", transfer),
        ("abort", abort),
    ]
}
