//! Carrying a VM's resource data to the target during a migration: a disk that moves (MV) or
//! is copied (CP) and scratch directories that are copied (CP) or moved (MV).
//!
//! One connection per migration to the target host's resource listener (mutual TLS between
//! hosts, `super::link`), opened with the line `GODWIT-RES <migration id>\n`, then frames of
//! `[u8 type][u32 length LE][payload]` (payload at most [`MAX_FRAME`]). As in the migration
//! protocol, the versions are agreed first: the source offers the range it speaks, the target
//! answers with the version both use (the highest in both ranges) or refuses with a sentence.
//!
//! ```text
//! source                                   target
//!   Hello {version, min_version}     ->
//!                                    <-      HelloAck {version}   (or Ack {ok: false, error})
//!   ItemBegin {name, kind, bytes}    ->      stage resources/<vm>/.incoming-<id>/<name>/
//!   DiskChunk {name, block, count, zero?, data}   (first a full pass, then dirty blocks again
//!   ...                                            and again while the guest runs: drive-mirror)
//!   FileBegin / FileData* / FileEnd {blake3}   (scratch files, verified as they arrive)
//!   --- the guest is paused ---
//!   DiskChunk ... (the blocks dirtied last)
//!   Commit                           ->      verify, move into place, fold each disk's
//!                                            per-block hashes (kept as blocks arrived)
//!                                    <-      Ack {ok, error, digests}
//!   (Abort {reason} instead: the target drops what it staged)
//! ```
//!
//! Scratch files are checked by blake3 before the commit: a file that did not arrive whole
//! fails the migration while the VM can still resume here. Disks are checked end to end after
//! the switchover, without stretching the pause: the source hashes its frozen image (which no
//! longer changes) and compares it with the digest the target folded from the blocks it
//! received; a difference marks the disk's action failed.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use godwit_api::{ResourceAction, ResourceKind};
use serde::{Deserialize, Serialize};

use crate::microvm::block::BLOCK_SIZE;

mod source;
mod target;
#[cfg(test)]
mod tests;

pub use source::{Planned, SourceTransfer};
pub use target::Incoming;

/// First line of a resource data connection: `GODWIT-RES <migration id>`.
pub const RESOURCES_PREFIX: &str = "GODWIT-RES";
/// Largest frame payload.
pub const MAX_FRAME: usize = 2 << 20;
/// The resource stream's version: this side speaks [`MIN_VERSION`]..=[`VERSION`].
pub const VERSION: u16 = 1;
pub const MIN_VERSION: u16 = 1;
/// Blocks per disk chunk (256 KiB).
pub(super) const CHUNK_BLOCKS: u64 = 64;
/// Dirty passes while the guest runs before the copier just waits for the pause.
pub(super) const MAX_LIVE_PASSES: u32 = 1000;
pub(super) const ACK_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) const T_ITEM: u8 = 1;
pub(super) const T_CHUNK: u8 = 2;
pub(super) const T_FILE_BEGIN: u8 = 3;
pub(super) const T_FILE_DATA: u8 = 4;
pub(super) const T_FILE_END: u8 = 5;
pub(super) const T_COMMIT: u8 = 6;
pub(super) const T_ACK: u8 = 7;
pub(super) const T_ABORT: u8 = 8;
pub(super) const T_HELLO: u8 = 9;
pub(super) const T_HELLO_ACK: u8 = 10;

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Hello {
    pub(super) version: u16,
    pub(super) min_version: u16,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct HelloAck {
    pub(super) version: u16,
}

/// The version two sides speaking `[min, max]` and `[MIN_VERSION, VERSION]` agree on.
pub(super) fn negotiate(min: u16, max: u16) -> Result<u16, String> {
    let version = max.min(VERSION);
    if version < min.max(MIN_VERSION) {
        return Err(format!(
            "resource stream versions {min}..={max} offered, this host speaks \
             {MIN_VERSION}..={VERSION}"
        ));
    }
    Ok(version)
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ItemBegin {
    pub(super) name: String,
    pub(super) kind: ResourceKind,
    pub(super) bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct FileBegin {
    pub(super) name: String,
    pub(super) file: String,
    pub(super) size: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct FileEnd {
    pub(super) blake3: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Ack {
    pub(super) ok: bool,
    pub(super) error: Option<String>,
    /// blake3 of each disk as committed on the target.
    pub(super) digests: BTreeMap<String, String>,
}

/// Writes one frame with a single write, so a small frame never waits on Nagle's algorithm.
pub(super) fn write_frame(w: &mut impl Write, ty: u8, payload: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(ty);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    w.write_all(&frame)
}

pub(super) fn write_json(w: &mut impl Write, ty: u8, v: &impl Serialize) -> io::Result<()> {
    write_frame(w, ty, &serde_json::to_vec(v).map_err(io::Error::other)?)
}

pub(super) fn read_frame(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("resource frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

pub(super) fn parse<T: for<'de> Deserialize<'de>>(payload: &[u8], what: &str) -> io::Result<T> {
    serde_json::from_slice(payload)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad {what} frame: {e}")))
}

/// Encodes a disk chunk: `[u16 name len][name][u64 block][u32 count][u8 zero][data]`.
pub(super) fn chunk_frame(name: &str, block: u64, count: u32, data: Option<&[u8]>) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + name.len() + data.map_or(0, <[u8]>::len));
    f.extend_from_slice(&(name.len() as u16).to_le_bytes());
    f.extend_from_slice(name.as_bytes());
    f.extend_from_slice(&block.to_le_bytes());
    f.extend_from_slice(&count.to_le_bytes());
    f.push(u8::from(data.is_none()));
    if let Some(d) = data {
        f.extend_from_slice(d);
    }
    f
}

pub(super) struct Chunk<'a> {
    pub(super) name: &'a str,
    pub(super) block: u64,
    pub(super) count: u32,
    pub(super) data: Option<&'a [u8]>,
}

pub(super) fn parse_chunk(f: &[u8]) -> io::Result<Chunk<'_>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("bad disk chunk: {m}"));
    if f.len() < 2 {
        return Err(bad("too short"));
    }
    let n = u16::from_le_bytes([f[0], f[1]]) as usize;
    if f.len() < 2 + n + 13 {
        return Err(bad("too short"));
    }
    let name = std::str::from_utf8(&f[2..2 + n]).map_err(|_| bad("name is not UTF-8"))?;
    let rest = &f[2 + n..];
    let block = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default());
    let count = u32::from_le_bytes(rest[8..12].try_into().unwrap_or_default());
    let zero = rest[12] == 1;
    let data = &rest[13..];
    if count == 0 || u64::from(count) > CHUNK_BLOCKS {
        return Err(bad("count out of range"));
    }
    if zero != data.is_empty() || (!zero && data.len() as u64 != u64::from(count) * BLOCK_SIZE) {
        return Err(bad("data does not match the count"));
    }
    Ok(Chunk {
        name,
        block,
        count,
        data: (!zero).then_some(data),
    })
}

/// Whether a resource's data must travel for `action`.
pub fn carries_data(kind: ResourceKind, action: ResourceAction) -> bool {
    matches!(kind, ResourceKind::Disk | ResourceKind::Scratch)
        && matches!(action, ResourceAction::Move | ResourceAction::Copy)
}
