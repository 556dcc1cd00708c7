//! The paravirtual block device's backends: a local raw file (with the dirty-block tracking a
//! disk move needs) or a disk that stayed on another host, reached through NBD.
//!
//! The guest side (docs/guest-abi.md, "Devices") is a request descriptor in guest memory whose
//! address the guest writes to a port; `Devices` decodes it and calls a [`BlockBackend`] on the
//! vCPU thread, so a request completes before the guest runs on.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Block size of the device, bytes.
pub const BLOCK_SIZE: u64 = 4096;

/// Where a VM's disk blocks live.
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// Capacity in blocks.
    fn blocks(&self) -> u64;
    /// Reads `buf.len()` bytes (whole blocks) from block `block`.
    fn read(&self, block: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` (whole blocks) at block `block`.
    fn write(&self, block: u64, data: &[u8]) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    /// `file PATH`, `nbd HOST:PORT/EXPORT`: for the VM's resource info.
    fn location(&self) -> String;
    /// Blocks written through this backend.
    fn writes(&self) -> u64;
}

/// Which blocks were written since tracking started or was last harvested.
#[derive(Debug, Default)]
pub struct DirtyBlocks {
    tracking: AtomicBool,
    words: Vec<AtomicU64>,
}

impl DirtyBlocks {
    fn new(blocks: u64) -> Self {
        DirtyBlocks {
            tracking: AtomicBool::new(false),
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn mark(&self, first: u64, count: u64) {
        if !self.tracking.load(Ordering::Acquire) {
            return;
        }
        for b in first..first + count {
            if let Some(w) = self.words.get((b / 64) as usize) {
                w.fetch_or(1 << (b % 64), Ordering::AcqRel);
            }
        }
    }

    /// Starts tracking with nothing dirty.
    pub fn start(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
        self.tracking.store(true, Ordering::Release);
    }

    pub fn stop(&self) {
        self.tracking.store(false, Ordering::Release);
    }

    /// The blocks written since the last harvest, in order; clears them.
    pub fn harvest(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                out.push(i as u64 * 64 + bit);
                bits &= bits - 1;
            }
        }
        out
    }
}

/// A raw disk image file on this host.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    path: PathBuf,
    blocks: u64,
    writes: AtomicU64,
    dirty: Arc<DirtyBlocks>,
}

impl FileDisk {
    /// Opens an existing image; its size must be whole blocks.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        if len == 0 || len % BLOCK_SIZE != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "disk image {} is {len} bytes, not a positive multiple of {BLOCK_SIZE}",
                    path.display()
                ),
            ));
        }
        let blocks = len / BLOCK_SIZE;
        Ok(FileDisk {
            file,
            path: path.to_owned(),
            blocks,
            writes: AtomicU64::new(0),
            dirty: Arc::new(DirtyBlocks::new(blocks)),
        })
    }

    /// Creates a zero-filled (sparse) image of `bytes`, which must be whole blocks.
    pub fn create(path: &Path, bytes: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(bytes)?;
        drop(file);
        Self::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dirty-block tracker, for a disk move.
    pub fn dirty(&self) -> &Arc<DirtyBlocks> {
        &self.dirty
    }

    /// Reads blocks for a copy (the mirror), bypassing dirty tracking.
    pub fn read_raw(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, block * BLOCK_SIZE)
    }

    /// Writes blocks received from a copy (the mirror's target side), untracked.
    pub fn write_raw(&self, block: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, block * BLOCK_SIZE)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn check(&self, block: u64, len: usize) -> io::Result<u64> {
        let count = len as u64 / BLOCK_SIZE;
        if len as u64 % BLOCK_SIZE != 0 || block.checked_add(count).is_none_or(|e| e > self.blocks)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "blocks {block}+{count} are outside a disk of {}",
                    self.blocks
                ),
            ));
        }
        Ok(count)
    }
}

impl BlockBackend for FileDisk {
    fn blocks(&self) -> u64 {
        self.blocks
    }

    fn read(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(block, buf.len())?;
        self.file.read_exact_at(buf, block * BLOCK_SIZE)
    }

    fn write(&self, block: u64, data: &[u8]) -> io::Result<()> {
        let count = self.check(block, data.len())?;
        self.file.write_all_at(data, block * BLOCK_SIZE)?;
        // Marked after the write: a mirror that harvests first reads the new data or sees the
        // bit again, never misses the write.
        self.dirty.mark(block, count);
        self.writes.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn location(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

/// A disk that stayed on another host, reached through its NBD export.
#[derive(Debug)]
pub struct NbdDisk {
    client: godwit_nbd::NbdClient,
    remote: String,
    blocks: u64,
    writes: AtomicU64,
}

impl NbdDisk {
    /// Connects to `remote` = `HOST:PORT/EXPORT`: `open(HOST:PORT, EXPORT)` gives the local
    /// address the NBD client connects to (a tunnel to the disk's host).
    pub fn connect(
        remote: &str,
        open: impl FnOnce(&str, &str) -> io::Result<String>,
    ) -> io::Result<Self> {
        let (addr, export) = remote.split_once('/').ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NBD address {remote:?} is not HOST:PORT/EXPORT"),
            )
        })?;
        let local = open(addr, export)?;
        let client = godwit_nbd::NbdClient::connect(&local, export, Duration::from_secs(5))
            .map_err(io::Error::other)?;
        let blocks = client.size() / BLOCK_SIZE;
        Ok(NbdDisk {
            client,
            remote: remote.to_owned(),
            blocks,
            writes: AtomicU64::new(0),
        })
    }
}

impl BlockBackend for NbdDisk {
    fn blocks(&self) -> u64 {
        self.blocks
    }

    fn read(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        self.client
            .read_at(block * BLOCK_SIZE, buf)
            .map_err(io::Error::other)
    }

    fn write(&self, block: u64, data: &[u8]) -> io::Result<()> {
        self.client
            .write_at(block * BLOCK_SIZE, data)
            .map_err(io::Error::other)?;
        self.writes
            .fetch_add(data.len() as u64 / BLOCK_SIZE, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.client.flush().map_err(io::Error::other)
    }

    fn location(&self) -> String {
        format!("nbd {}", self.remote)
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

/// The hash of one block in a disk digest.
pub fn block_hash(block: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(block)
}

/// A disk digest from its per-block hashes, in block order: `xxh3-blake3:` and 64 hex digits.
/// The target keeps the hashes of the blocks as they arrive (the last version of each counts);
/// the source computes the same over its frozen image, so the two compare without the target
/// reading its image again.
pub fn fold_digest(hashes: &[u64]) -> String {
    let mut hasher = blake3::Hasher::new();
    for h in hashes {
        hasher.update(&h.to_le_bytes());
    }
    format!("xxh3-blake3:{}", hasher.finalize().to_hex())
}

/// The digest of a whole image, read from its file.
pub fn image_digest(disk: &FileDisk) -> io::Result<String> {
    let mut hashes = Vec::with_capacity(disk.blocks as usize);
    let mut buf = vec![0u8; 1 << 20];
    let mut block = 0;
    while block < disk.blocks {
        let n = (disk.blocks - block).min(buf.len() as u64 / BLOCK_SIZE);
        let chunk = &mut buf[..(n * BLOCK_SIZE) as usize];
        disk.read_raw(block, chunk)?;
        hashes.extend(chunk.chunks(BLOCK_SIZE as usize).map(block_hash));
        block += n;
    }
    Ok(fold_digest(&hashes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_tracked_only_while_tracking() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FileDisk::create(&dir.path().join("d.img"), 256 * BLOCK_SIZE).unwrap();
        let block = vec![7u8; BLOCK_SIZE as usize];
        disk.write(3, &block).unwrap();
        disk.dirty().start();
        assert!(disk.dirty().harvest().is_empty());
        disk.write(5, &block).unwrap();
        disk.write(200, &[1u8; 2 * BLOCK_SIZE as usize]).unwrap();
        assert_eq!(disk.dirty().harvest(), vec![5, 200, 201]);
        assert!(disk.dirty().harvest().is_empty());
        disk.dirty().stop();
        disk.write(6, &block).unwrap();
        assert!(disk.dirty().harvest().is_empty());
        let mut back = vec![0u8; BLOCK_SIZE as usize];
        disk.read(5, &mut back).unwrap();
        assert_eq!(back, block);
        assert_eq!(disk.writes(), 5);
    }

    #[test]
    fn out_of_range_and_partial_blocks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FileDisk::create(&dir.path().join("d.img"), 4 * BLOCK_SIZE).unwrap();
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        assert!(disk.read(4, &mut buf).is_err());
        assert!(disk.write(3, &[0u8; 2 * BLOCK_SIZE as usize]).is_err());
        assert!(disk.write(0, &[0u8; 100]).is_err());
        assert!(disk.read(u64::MAX, &mut buf).is_err());
        std::fs::write(dir.path().join("odd.img"), [0u8; 100]).unwrap();
        assert!(FileDisk::open(&dir.path().join("odd.img")).is_err());
    }
}
