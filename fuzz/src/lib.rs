//! What Godwit's fuzz targets (`fuzz_targets/`, docs/fuzzing.md) share: the fix-ups that let
//! mutated inputs past a format's checksums, so that they reach the decoders behind them, a
//! scratch directory per fuzzing process, an in-memory connection, and [`seeds`], valid inputs
//! made by the real encoders.

pub mod seeds;

use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use page_transfer::protocol::{FrameHeader, HEADER_LEN};

/// Where a migration frame header keeps the payload length and the checksum
/// (page-transfer/src/protocol.rs, "Frame layout").
const FRAME_LEN_AT: usize = 8;
const FRAME_CHECKSUM_AT: usize = 12;

/// Snapshot file offsets (vmm/src/snapshot.rs, "Layout"): the header checksum covers bytes
/// 0..32 and sits at 32; the file checksum covers everything from the end of the 48-byte
/// header to the 12-byte trailer, which starts with it.
const SNAPSHOT_HEADER_CRC_COVERS: usize = 32;
const SNAPSHOT_HEADER_LEN: usize = 48;
const SNAPSHOT_TRAILER_LEN: usize = 12;

/// Resource stream frame types (vmm/src/resources/transfer/mod.rs; private there).
pub const T_ITEM: u8 = 1;
pub const T_CHUNK: u8 = 2;
pub const T_FILE_BEGIN: u8 = 3;
pub const T_FILE_DATA: u8 = 4;
pub const T_FILE_END: u8 = 5;
pub const T_COMMIT: u8 = 6;
pub const T_ACK: u8 = 7;
pub const T_ABORT: u8 = 8;
pub const T_HELLO: u8 = 9;
pub const T_HELLO_ACK: u8 = 10;

/// One resource stream frame: `[u8 type][u32 length LE][payload]`.
pub fn resource_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![ty];
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Rewrites the checksum of every frame in a stream of migration frames to fit the frame as it
/// is (header and as much of the payload as the stream holds).
pub fn reseal_frames(stream: &mut [u8]) {
    let mut at = 0;
    while let Some(header) = stream.get(at..at + HEADER_LEN) {
        let len = u32::from_le_bytes([
            header[FRAME_LEN_AT],
            header[FRAME_LEN_AT + 1],
            header[FRAME_LEN_AT + 2],
            header[FRAME_LEN_AT + 3],
        ]) as usize;
        let end = (at + HEADER_LEN).saturating_add(len).min(stream.len());
        let checksum = FrameHeader::checksum_of(header, &stream[at + HEADER_LEN..end]);
        stream[at + FRAME_CHECKSUM_AT..at + HEADER_LEN].copy_from_slice(&checksum.to_le_bytes());
        at = end;
    }
}

/// Rewrites a snapshot file's header checksum and file checksum to fit its bytes.
pub fn reseal_snapshot(file: &mut [u8]) {
    if file.len() >= SNAPSHOT_HEADER_LEN {
        let crc = crc32fast::hash(&file[..SNAPSHOT_HEADER_CRC_COVERS]);
        file[SNAPSHOT_HEADER_CRC_COVERS..SNAPSHOT_HEADER_CRC_COVERS + 4]
            .copy_from_slice(&crc.to_le_bytes());
    }
    if file.len() >= SNAPSHOT_HEADER_LEN + SNAPSHOT_TRAILER_LEN {
        let trailer = file.len() - SNAPSHOT_TRAILER_LEN;
        let crc = crc32fast::hash(&file[SNAPSHOT_HEADER_LEN..trailer]);
        file[trailer..trailer + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

/// An empty directory of this fuzzing process's own, in /dev/shm (memory, not the disk):
/// `/dev/shm/godwit-fuzz-<target>-<pid>`. Targets call it once and empty it after each input.
pub fn scratch_dir(target: &str) -> PathBuf {
    let dir = PathBuf::from(format!(
        "/dev/shm/godwit-fuzz-{target}-{}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A connection whose peer sends `input` and then closes; what is written to it is kept in
/// `output`.
#[derive(Debug)]
pub struct Duplex<'a> {
    pub input: &'a [u8],
    pub output: Vec<u8>,
}

impl<'a> Duplex<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Duplex {
            input,
            output: Vec::new(),
        }
    }
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
