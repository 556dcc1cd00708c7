//! Tests of the resource data protocol and a whole transfer over real TCP.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::net::TcpListener;

use godwit_api::{
    IncomingResource, MigrationMode, ResourceMigration, ResourceSpec, ResourceStatus,
};
use page_transfer::progress::Progress;

use super::*;
use crate::microvm::block::{self, BlockBackend, FileDisk, BLOCK_SIZE};
use crate::resources::{Bound, BoundState};

#[test]
fn chunks_round_trip_and_bad_ones_are_refused() {
    let data = vec![5u8; 2 * BLOCK_SIZE as usize];
    let f = chunk_frame("root", 7, 2, Some(&data));
    let c = parse_chunk(&f).unwrap();
    assert_eq!((c.name, c.block, c.count), ("root", 7, 2));
    assert_eq!(c.data.unwrap(), &data[..]);
    let z = chunk_frame("root", 0, 64, None);
    assert!(parse_chunk(&z).unwrap().data.is_none());
    assert!(parse_chunk(&chunk_frame("root", 0, 65, None)).is_err());
    assert!(parse_chunk(&chunk_frame("root", 0, 3, Some(&data))).is_err());
    assert!(parse_chunk(&f[..10]).is_err());
    assert!(parse_chunk(&[]).is_err());
}

fn record(name: &str, kind: ResourceKind, action: ResourceAction) -> ResourceMigration {
    ResourceMigration {
        name: name.into(),
        kind,
        action,
        first_choice: action,
        fallback: false,
        reason: String::new(),
        status: ResourceStatus::Pending,
        detail: String::new(),
        bytes: 0,
        duration_ms: 0.0,
        error: None,
    }
}

/// A target expecting disk `root` of `disk_mib` MiB moved and scratch `cache` (1 MiB) copied
/// into `dir`; returns it with the two specs.
fn target(dir: &std::path::Path, disk_mib: u64) -> (Arc<Incoming>, ResourceSpec, ResourceSpec) {
    let mut disk = ResourceSpec::new("root", ResourceKind::Disk);
    disk.size_mib = Some(disk_mib);
    let mut scratch = ResourceSpec::new("cache", ResourceKind::Scratch);
    scratch.size_mib = Some(1);
    let incoming = |spec: &ResourceSpec, action| IncomingResource {
        spec: spec.clone(),
        action,
        remote: None,
        remote_host: None,
        address: None,
    };
    let target = Arc::new(Incoming::new(
        "id",
        "vm",
        "a",
        vec![
            incoming(&disk, ResourceAction::Move),
            incoming(&scratch, ResourceAction::Copy),
        ],
        Vec::new(),
        dir.to_owned(),
    ));
    (target, disk, scratch)
}

/// Serves one connection to `incoming` on a thread; with `header`, the connection must start
/// with the resource header line, as the agent's resource listener sees it.
fn serve(
    incoming: &Arc<Incoming>,
    header: bool,
) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let inc = incoming.clone();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let conn = page_transfer::channel::Channel::plain(conn);
        if header {
            let line = super::super::endpoint::read_header_line(&conn, 200).unwrap();
            assert_eq!(line, "GODWIT-RES id");
        }
        inc.receive(conn);
    });
    (addr, server)
}

/// A disk being written while it is mirrored, and a scratch directory, reach a target over
/// real TCP whole: the committed image equals the frozen source image.
#[test]
fn a_disk_written_during_the_copy_and_scratch_files_arrive_whole() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let disk = Arc::new(FileDisk::create(&src.path().join("disk.img"), 8 << 20).unwrap());
    let scratch = src.path().join("cache");
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("a.bin"), vec![7u8; 300_000]).unwrap();
    std::fs::write(scratch.join("b.bin"), b"hello").unwrap();

    let (incoming, disk_spec, scratch_spec) = target(dst.path(), 8);
    let (addr, server) = serve(&incoming, true);

    // The "guest" writes blocks all through the live copy.
    let stop = Arc::new(AtomicBool::new(false));
    let (d, st) = (disk.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        let mut n = 0u64;
        while !st.load(Ordering::Acquire) {
            let block = (n * 7919) % d.blocks();
            d.write(block, &[(n % 251) as u8 + 1; BLOCK_SIZE as usize])
                .unwrap();
            n += 1;
        }
        n
    });
    let bound = |spec: &ResourceSpec, state: BoundState| Bound {
        spec: spec.clone(),
        host: "a".into(),
        state,
    };
    let planned = vec![
        Planned {
            bound: bound(
                &disk_spec,
                BoundState::Disk {
                    local: Some(disk.clone()),
                    backend: disk.clone(),
                    remote: None,
                },
            ),
            action: ResourceAction::Move,
            record: 0,
        },
        Planned {
            bound: bound(
                &scratch_spec,
                BoundState::Scratch {
                    dir: Some(scratch.clone()),
                    remote: None,
                },
            ),
            action: ResourceAction::Copy,
            record: 1,
        },
    ];
    let progress = Arc::new(Progress::new(
        "id",
        "vm",
        "a",
        "b",
        MigrationMode::Precopy,
        0,
    ));
    let transfer = SourceTransfer::start(
        &crate::resources::link::LinkSecurity::default(),
        Some(addr),
        "id",
        planned,
        vec![
            record("root", ResourceKind::Disk, ResourceAction::Move),
            record("cache", ResourceKind::Scratch, ResourceAction::Copy),
        ],
        progress,
        None,
    )
    .unwrap();
    while !transfer.ready() {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(120));
    transfer.before_pause().unwrap();
    // "Pause": the writer stops, then the last dirty blocks go in the commit.
    stop.store(true, Ordering::Release);
    let writes = writer.join().unwrap();
    transfer.at_pause().unwrap();
    assert!(writes > 100, "only {writes} writes during the copy");
    assert!(incoming.committed());
    let moved = FileDisk::open(&dst.path().join("root/disk.img")).unwrap();
    assert_eq!(
        block::image_digest(&moved).unwrap(),
        block::image_digest(&disk).unwrap()
    );
    assert!(transfer.verify_disks());
    for f in ["a.bin", "b.bin"] {
        assert_eq!(
            std::fs::read(dst.path().join("cache").join(f)).unwrap(),
            std::fs::read(scratch.join(f)).unwrap()
        );
    }
    transfer.complete(&BTreeMap::new());
    let records = transfer.records();
    assert!(records.iter().all(|r| r.status == ResourceStatus::Done));
    assert!(
        records[0].detail.contains("dirty blocks resent"),
        "{records:?}"
    );
    drop(transfer);
    server.join().unwrap();
}

#[test]
fn oversized_frames_are_refused_before_allocating() {
    let mut f = vec![T_CHUNK];
    f.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(read_frame(&mut &f[..]).is_err());
}

type Frames = Vec<(u8, Vec<u8>)>;

/// Runs `Incoming::receive` on a connection fed `frames`; returns the target's answer (the
/// Ack it sent, if any) and whether it committed.
fn feed(frames: &[(u8, Vec<u8>)]) -> (Option<Ack>, bool, bool) {
    let dst = tempfile::tempdir().unwrap();
    let (incoming, _, _) = target(dst.path(), 1);
    let (addr, server) = serve(&incoming, false);
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    for (ty, payload) in frames {
        if write_frame(&mut conn, *ty, payload).is_err() {
            break;
        }
    }
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    // The hello's answer first, if it got one; then the verdict.
    let mut answer = read_frame(&mut conn).ok();
    if answer.as_ref().is_some_and(|(ty, _)| *ty == T_HELLO_ACK) {
        answer = read_frame(&mut conn).ok();
    }
    let ack = answer
        .filter(|(ty, _)| *ty == T_ACK)
        .and_then(|(_, p)| serde_json::from_slice::<Ack>(&p).ok());
    server.join().unwrap();
    let staging_left = std::fs::read_dir(dst.path())
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".incoming"))
        })
        .unwrap_or(false);
    (ack, incoming.committed(), staging_left)
}

fn json(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

/// A source that sends garbage or lies gets a refusal with a reason; nothing is committed,
/// nothing staged is left behind, and the agent does not panic.
#[test]
fn garbage_and_lies_from_a_source_are_refused() {
    let disk = |bytes: u64| {
        (
            T_ITEM,
            json(serde_json::json!({"name": "root", "kind": "disk", "bytes": bytes})),
        )
    };
    let scratch = (
        T_ITEM,
        json(serde_json::json!({"name": "cache", "kind": "scratch", "bytes": 0})),
    );
    let cases: Vec<(&str, Frames, &str)> = vec![
        (
            "unknown frame",
            vec![(99, vec![1, 2, 3])],
            "unknown resource frame type 99",
        ),
        (
            "not JSON",
            vec![(T_ITEM, b"{{{".to_vec())],
            "bad item frame",
        ),
        (
            "undeclared resource",
            vec![(
                T_ITEM,
                json(serde_json::json!({"name": "other", "kind": "disk", "bytes": 4096})),
            )],
            "unexpected resource",
        ),
        ("wrong disk size", vec![disk(4096)], "were announced"),
        (
            "chunk for no disk",
            vec![(T_CHUNK, chunk_frame("root", 0, 1, None))],
            "unknown disk",
        ),
        (
            "chunk past the end",
            vec![disk(1 << 20), (T_CHUNK, chunk_frame("root", 255, 2, None))],
            "past the end",
        ),
        (
            "file name with a slash",
            vec![
                scratch.clone(),
                (
                    T_FILE_BEGIN,
                    json(serde_json::json!({"name": "cache", "file": "../x", "size": 1})),
                ),
            ],
            "bad scratch file name",
        ),
        (
            "a disk announced as scratch",
            vec![(
                T_ITEM,
                json(serde_json::json!({"name": "root", "kind": "scratch", "bytes": 0})),
            )],
            "unexpected resource",
        ),
        (
            "file for the staging directory's parent",
            vec![
                scratch.clone(),
                (
                    T_FILE_BEGIN,
                    json(serde_json::json!({"name": "..", "file": "a", "size": 1})),
                ),
            ],
            "file for unknown scratch",
        ),
        (
            "file for an absolute directory",
            vec![
                scratch.clone(),
                (
                    T_FILE_BEGIN,
                    json(serde_json::json!({"name": "/tmp", "file": "a", "size": 1})),
                ),
            ],
            "file for unknown scratch",
        ),
        (
            "file for a disk",
            vec![
                disk(1 << 20),
                (
                    T_FILE_BEGIN,
                    json(serde_json::json!({"name": "root", "file": "a", "size": 1})),
                ),
            ],
            "file for unknown scratch",
        ),
        (
            "more data than announced",
            vec![
                scratch.clone(),
                (
                    T_FILE_BEGIN,
                    json(serde_json::json!({"name": "cache", "file": "a", "size": 1})),
                ),
                (T_FILE_DATA, vec![0u8; 10]),
            ],
            "more file data than announced",
        ),
        (
            "checksum mismatch at commit",
            vec![
                scratch.clone(),
                (
                    T_FILE_BEGIN,
                    json(serde_json::json!({"name": "cache", "file": "a", "size": 2})),
                ),
                (T_FILE_DATA, vec![1u8, 2]),
                (T_FILE_END, json(serde_json::json!({"blake3": "00"}))),
                (T_COMMIT, Vec::new()),
            ],
            "scratch files differ",
        ),
    ];
    let hello = |version: u16, min: u16| {
        (
            T_HELLO,
            json(serde_json::json!({"version": version, "min_version": min})),
        )
    };
    let mut cases: Vec<(&str, Frames, &str)> = cases
        .into_iter()
        .map(|(what, frames, want)| {
            let mut all = vec![hello(VERSION, MIN_VERSION)];
            all.extend(frames);
            (what, all, want)
        })
        .collect();
    cases.push((
        "no hello",
        vec![scratch.clone()],
        "starts with frame type 1, not a hello",
    ));
    cases.push((
        "a version this host does not speak",
        vec![hello(9, 7)],
        "versions 7..=9 offered",
    ));
    for (what, frames, want) in cases {
        let (ack, committed, staging_left) = feed(&frames);
        let ack = ack.unwrap_or_else(|| panic!("{what}: no answer"));
        assert!(!ack.ok, "{what}: accepted");
        let error = ack.error.unwrap_or_default();
        assert!(error.contains(want), "{what}: {error:?} lacks {want:?}");
        assert!(!committed, "{what}: committed");
        assert!(!staging_left, "{what}: staging left behind");
    }
    // A source that just hangs up: nothing committed, nothing left.
    let (_, committed, staging_left) = feed(&[disk(1 << 20)]);
    assert!(!committed && !staging_left);
}

/// A connection that reads `input` (then its peer has closed it) and keeps what is written to
/// it.
struct Replay<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl std::io::Read for Replay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Replay<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Found by the resource_protocol fuzz target (fuzz/): a chunk of 14 blocks at block 2^64 - 2
/// overflowed the bounds check: a panic where overflow is checked, and where it is not, an error
/// only because the wrapped file offset made the write fail.
#[test]
fn a_chunk_whose_end_overflows_is_refused() {
    let mut input: &[u8] = b"GODWIT-RES id\n\
        \t\x1d\0\0\0{\"version\":1,\"min_version\":1}\
        \x01-\0\0\0{\"name\":\"root\",\"kind\":\"disk\",\"bytes\":1048576}\
        \x02\x13\0\0\0\x04\0root\xfe\xff\xff\xff\xff\xff\xff\xff\x0e\0\0\0\x01";
    let header = super::super::endpoint::read_header_line(&mut input, 200).unwrap();
    assert_eq!(header, "GODWIT-RES id");
    let dst = tempfile::tempdir().unwrap();
    let (incoming, _, _) = target(dst.path(), 1);
    let mut conn = Replay {
        input,
        output: Vec::new(),
    };
    incoming.receive(&mut conn);
    let mut answers = &conn.output[..];
    assert_eq!(read_frame(&mut answers).unwrap().0, T_HELLO_ACK);
    let (ty, ack) = read_frame(&mut answers).unwrap();
    assert_eq!(ty, T_ACK);
    let ack: Ack = serde_json::from_slice(&ack).unwrap();
    assert!(!ack.ok);
    let error = ack.error.unwrap_or_default();
    assert!(error.contains("chunk past the end of disk root"), "{error}");
    assert!(!incoming.committed());
}
