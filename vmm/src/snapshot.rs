//! Snapshot files: a paused VM's state blob and its guest memory, written to disk so the VM
//! can be restored later into a fresh VM, on this host or another.
//!
//! The state blob (vCPU and device state) is opaque here; the caller seals it with
//! [`crate::sealed`] and checks it again after reading. This module owns the memory image
//! and the file's integrity: every length is checked against [`SnapshotLimits`] before
//! anything is allocated, a crc32 covers everything after the header, and a damaged or
//! truncated file is an error, never a panic. All-zero pages are not stored, because a
//! restore target's fresh memory is already zero.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! header, 48 bytes
//!      0    8  magic b"GODWITSN"
//!      8    4  format version (1)
//!     12    4  flags (0)
//!     16    8  state_len: length of the state blob in bytes
//!     24    4  region_count
//!     28    4  page size (4096)
//!     32    4  crc32 of bytes 0..32
//!     36   12  zero padding
//! region table, region_count entries of 16 bytes, sorted by address, non-overlapping
//!      0    8  guest physical address, page-aligned
//!      8    8  size in bytes, a non-zero multiple of the page size
//! state blob, state_len bytes
//! for each region, in table order:
//!     page bitmap, ceil(pages / 64) u64 words; bit i of word w set = page 64 * w + i stored
//!     the stored pages, 4096 bytes each, in ascending address order
//! trailer, 12 bytes
//!      0    4  crc32 of everything from the region table to the end of the last page
//!      4    8  magic b"GODWITEN"
//! ```
//!
//! [`write_snapshot`] writes to `<path>.tmp`, syncs it and renames it over `<path>`, so a crash
//! never leaves a partial file at `path`.
#![deny(unsafe_code)]

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion,
};

/// Size of a guest page as stored in a snapshot.
pub const PAGE_SIZE: u64 = 4096;

/// Default for [`SnapshotLimits::max_state_len`]: 16 MiB.
pub const DEFAULT_MAX_STATE_LEN: usize = 16 << 20;

/// Default for [`SnapshotLimits::max_regions`].
pub const DEFAULT_MAX_REGIONS: u32 = 64;

const MAGIC: [u8; 8] = *b"GODWITSN";
const TRAILER_MAGIC: [u8; 8] = *b"GODWITEN";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 48;
const HEADER_CRC_COVERS: usize = 32;
const REGION_ENTRY_LEN: usize = 16;
const TRAILER_LEN: usize = 12;

/// Guest memory moves through a reusable buffer of this size (a multiple of the page size).
const COPY_CHUNK: usize = 1 << 20;
/// Buffer size for the file itself; large enough that writes reach the disk in big requests.
const FILE_BUFFER: usize = 4 << 20;

/// Upper bounds on what [`SnapshotReader::open`] accepts, checked before allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// Largest state blob accepted, in bytes.
    pub max_state_len: usize,
    /// Largest number of memory regions accepted.
    pub max_regions: u32,
    /// Largest total guest memory accepted, in bytes: what this host can hold.
    pub max_memory_bytes: u64,
}

impl SnapshotLimits {
    /// Default state and region limits, with the given cap on guest memory.
    pub fn new(max_memory_bytes: u64) -> Self {
        SnapshotLimits {
            max_state_len: DEFAULT_MAX_STATE_LEN,
            max_regions: DEFAULT_MAX_REGIONS,
            max_memory_bytes,
        }
    }
}

/// What a snapshot write or restore moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Size of the snapshot file in bytes (written, or read on restore).
    pub bytes_written: u64,
    /// Total guest memory covered by the snapshot, in bytes.
    pub memory_bytes: u64,
    /// Pages stored in the file.
    pub pages_stored: u64,
    /// All-zero pages left out of the file.
    pub zero_pages: u64,
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file system operation failed; the context says which and on what path.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Guest memory could not be read or written at an address the layout says exists.
    #[error("Cannot access guest memory at {gpa:#x}")]
    GuestMemory {
        gpa: u64,
        #[source]
        source: GuestMemoryError,
    },
    /// The memory to snapshot has a layout the format cannot describe.
    #[error("Cannot snapshot this guest memory: {0}")]
    UnsupportedMemoryLayout(String),
    /// The file does not start with the snapshot magic.
    #[error(
        "Not a snapshot file: expected magic \"{}\", found \"{}\"",
        MAGIC.escape_ascii(),
        found.escape_ascii()
    )]
    NotASnapshot { found: [u8; 8] },
    /// The file is a snapshot in a format version this build does not read.
    #[error(
        "Unsupported snapshot format version {found} (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion { found: u32 },
    /// The header sets flags this build does not know.
    #[error("Unsupported snapshot flags {0:#x}")]
    UnsupportedFlags(u32),
    /// The header names a page size other than 4096.
    #[error("Unsupported snapshot page size {0} (this build uses {PAGE_SIZE})")]
    UnsupportedPageSize(u32),
    /// The header is damaged.
    #[error("Snapshot header is corrupt: {0}")]
    CorruptHeader(&'static str),
    /// A length in the header is above the reader's limits.
    #[error("Snapshot {what} is {value}, above the limit of {limit}")]
    LimitExceeded {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    /// The region table is not a valid memory layout.
    #[error("Snapshot region table is invalid: {0}")]
    BadRegionTable(String),
    /// The file ends early.
    #[error("Snapshot is truncated: unexpected end of file while reading the {0}")]
    Truncated(&'static str),
    /// A page bitmap marks pages beyond the end of its region.
    #[error("Snapshot page bitmap of the region at {gpa:#x} marks pages past the region's end")]
    CorruptPageBitmap { gpa: u64 },
    /// The region table, state blob, bitmaps or pages do not match the stored checksum.
    #[error(
        "Snapshot checksum mismatch over the region table, state and memory: \
         stored {stored:#010x}, computed {computed:#010x}"
    )]
    ChecksumMismatch { stored: u32, computed: u32 },
    /// The trailer does not end with the trailer magic.
    #[error(
        "Snapshot trailer is corrupt: expected magic \"{}\", found \"{}\"",
        TRAILER_MAGIC.escape_ascii(),
        found.escape_ascii()
    )]
    BadTrailer { found: [u8; 8] },
    /// The target memory's regions differ from the snapshot's.
    #[error("Target memory regions {memory:x?} do not match the snapshot regions {snapshot:x?}")]
    LayoutMismatch {
        snapshot: Vec<(u64, u64)>,
        memory: Vec<(u64, u64)>,
    },
    /// The file continues after the trailer.
    #[error("Snapshot has {0} bytes of trailing data after the trailer")]
    TrailingData(u64),
}

/// Wraps an I/O error with what was being done to which file.
fn io_error<'a>(action: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        context: format!("{action} {}", path.display()),
        source,
    }
}

/// Writes `state` and all of `memory` to a snapshot file at `path`.
///
/// The VM must be paused: memory that changes during the write yields a valid file whose
/// contents are not one consistent moment. Reading guest memory does not touch its dirty
/// bitmap.
///
/// # Errors
///
/// Fails if the memory layout cannot be described (regions not page-aligned) or on any file
/// system error; `path` is then left as it was and the temporary file is removed.
pub fn write_snapshot(
    path: &Path,
    state: &[u8],
    memory: &GuestMemoryMmap<AtomicBitmap>,
) -> Result<SnapshotSummary, SnapshotError> {
    let regions = memory_layout(memory);
    check_region_table(&regions).map_err(SnapshotError::UnsupportedMemoryLayout)?;

    let temp_path = temp_path(path);
    let file =
        File::create(&temp_path).map_err(io_error("Cannot create snapshot file", &temp_path))?;
    let written = write_contents(file, &temp_path, state, memory, &regions).and_then(|summary| {
        fs::rename(&temp_path, path).map_err(io_error(
            "Cannot rename the finished snapshot file to",
            path,
        ))?;
        Ok(summary)
    });
    match written {
        Ok(summary) => {
            sync_parent_dir(path)?;
            Ok(summary)
        }
        Err(error) => {
            // Best effort: the error being returned matters more than a leftover file.
            let _ = fs::remove_file(&temp_path);
            Err(error)
        }
    }
}

fn write_contents(
    file: File,
    path: &Path,
    state: &[u8],
    memory: &GuestMemoryMmap<AtomicBitmap>,
    regions: &[(u64, u64)],
) -> Result<SnapshotSummary, SnapshotError> {
    let mut out = HashingWriter {
        file: BufWriter::with_capacity(FILE_BUFFER, file),
        hasher: crc32fast::Hasher::new(),
        bytes: 0,
        path,
    };
    let mut summary = SnapshotSummary::default();

    // check_region_table has bounded the count, so it fits in a u32.
    let header = Header {
        version: FORMAT_VERSION,
        flags: 0,
        state_len: state.len() as u64,
        region_count: regions.len() as u32,
        page_size: PAGE_SIZE as u32,
    };
    out.write_plain(&header.encode())?;
    for &(gpa, size) in regions {
        out.write_hashed(&gpa.to_le_bytes())?;
        out.write_hashed(&size.to_le_bytes())?;
    }
    out.write_hashed(state)?;

    let mut buffer = vec![0u8; COPY_CHUNK];
    for &(gpa, size) in regions {
        // The bitmap precedes the pages, so one pass finds the stored pages and a second
        // copies them; on a paused VM both passes see the same memory.
        let bitmap = find_nonzero_pages(memory, gpa, size, &mut buffer)?;
        for word in &bitmap.words {
            out.write_hashed(&word.to_le_bytes())?;
        }
        for (first_page, page_count) in bitmap.runs(COPY_CHUNK as u64 / PAGE_SIZE) {
            let run_gpa = gpa + first_page * PAGE_SIZE;
            let chunk = &mut buffer[..(page_count * PAGE_SIZE) as usize];
            memory
                .read_slice(chunk, GuestAddress(run_gpa))
                .map_err(|source| SnapshotError::GuestMemory {
                    gpa: run_gpa,
                    source,
                })?;
            out.write_hashed(chunk)?;
        }
        let stored = bitmap.count_stored();
        summary.memory_bytes += size;
        summary.pages_stored += stored;
        summary.zero_pages += bitmap.pages - stored;
    }

    let checksum = out.hasher.clone().finalize();
    out.write_plain(&checksum.to_le_bytes())?;
    out.write_plain(&TRAILER_MAGIC)?;
    summary.bytes_written = out.bytes;

    let file = out
        .file
        .into_inner()
        .map_err(|error| io_error("Cannot write snapshot file", path)(error.into_error()))?;
    file.sync_all()
        .map_err(io_error("Cannot sync snapshot file", path))?;
    Ok(summary)
}

/// Scans a region and marks its non-zero pages.
fn find_nonzero_pages(
    memory: &GuestMemoryMmap<AtomicBitmap>,
    gpa: u64,
    size: u64,
    buffer: &mut [u8],
) -> Result<PageBitmap, SnapshotError> {
    let mut bitmap = PageBitmap::new(size / PAGE_SIZE);
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(buffer.len() as u64) as usize;
        let chunk = &mut buffer[..len];
        memory
            .read_slice(chunk, GuestAddress(gpa + offset))
            .map_err(|source| SnapshotError::GuestMemory {
                gpa: gpa + offset,
                source,
            })?;
        let first_page = offset / PAGE_SIZE;
        for (index, page) in chunk.chunks_exact(PAGE_SIZE as usize).enumerate() {
            if !is_zero(page) {
                bitmap.set(first_page + index as u64);
            }
        }
        offset += len as u64;
    }
    Ok(bitmap)
}

/// Tests 64 bytes at a time: the inner fold vectorizes, the outer `all` stops at the
/// first non-zero block, which for a used page is usually the first.
fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|block| block.iter().fold(0, |acc, &byte| acc | byte) == 0)
}

/// A snapshot file whose header, region table and state blob have been read and checked.
///
/// The state blob is covered by the file checksum, which is only verified at the end of
/// [`SnapshotReader::read_memory_into`]; a sealed blob also checks itself.
#[derive(Debug)]
pub struct SnapshotReader {
    input: HashingReader,
    regions: Vec<(u64, u64)>,
    state: Vec<u8>,
}

impl SnapshotReader {
    /// Opens a snapshot file and reads everything up to the memory image.
    ///
    /// # Errors
    ///
    /// Fails if the file cannot be read, is not a version 1 snapshot, has a damaged header or
    /// region table, exceeds `limits`, or ends early.
    pub fn open(path: &Path, limits: &SnapshotLimits) -> Result<Self, SnapshotError> {
        let file = File::open(path).map_err(io_error("Cannot open snapshot file", path))?;
        let mut input = HashingReader {
            file: BufReader::with_capacity(FILE_BUFFER, file),
            hasher: crc32fast::Hasher::new(),
            bytes: 0,
            path: path.to_path_buf(),
        };

        let mut header = [0u8; HEADER_LEN];
        input.read_plain(&mut header, "header")?;
        let header = Header::decode(&header)?;
        if header.region_count > limits.max_regions {
            return Err(SnapshotError::LimitExceeded {
                what: "region count",
                value: header.region_count.into(),
                limit: limits.max_regions.into(),
            });
        }
        let state_len = match usize::try_from(header.state_len) {
            Ok(len) if len <= limits.max_state_len => len,
            _ => {
                return Err(SnapshotError::LimitExceeded {
                    what: "state length in bytes",
                    value: header.state_len,
                    limit: limits.max_state_len as u64,
                })
            }
        };

        let mut regions = Vec::with_capacity(header.region_count as usize);
        for _ in 0..header.region_count {
            let mut entry = [0u8; REGION_ENTRY_LEN];
            input.read_hashed(&mut entry, "region table")?;
            let [a0, a1, a2, a3, a4, a5, a6, a7, s0, s1, s2, s3, s4, s5, s6, s7] = entry;
            regions.push((
                u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
                u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            ));
        }
        check_region_table(&regions).map_err(SnapshotError::BadRegionTable)?;
        let memory_bytes = total_size(&regions);
        if memory_bytes > limits.max_memory_bytes {
            return Err(SnapshotError::LimitExceeded {
                what: "guest memory size in bytes",
                value: memory_bytes,
                limit: limits.max_memory_bytes,
            });
        }

        let mut state = vec![0u8; state_len];
        input.read_hashed(&mut state, "state blob")?;
        Ok(SnapshotReader {
            input,
            regions,
            state,
        })
    }

    /// The guest memory regions as (guest physical address, size in bytes), sorted.
    pub fn regions(&self) -> &[(u64, u64)] {
        &self.regions
    }

    /// The state blob, as the writer passed it.
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// Fills `memory` with the snapshot's pages and verifies the rest of the file.
    ///
    /// `memory` must have exactly the snapshot's regions and be zero-filled, as fresh
    /// anonymous memory is: pages the snapshot left out as all-zero are not written. Writes
    /// go through vm-memory, so they mark the written pages in its dirty bitmap. On error,
    /// `memory` holds a partial image and must be discarded.
    ///
    /// # Errors
    ///
    /// Fails if the layouts differ, the file ends early, a bitmap or the checksum does not
    /// match, the trailer is damaged or data follows it.
    pub fn read_memory_into(
        mut self,
        memory: &GuestMemoryMmap<AtomicBitmap>,
    ) -> Result<SnapshotSummary, SnapshotError> {
        let layout = memory_layout(memory);
        if layout != self.regions {
            return Err(SnapshotError::LayoutMismatch {
                snapshot: self.regions,
                memory: layout,
            });
        }

        let mut summary = SnapshotSummary::default();
        let mut buffer = vec![0u8; COPY_CHUNK];
        for &(gpa, size) in &self.regions {
            let mut bitmap = PageBitmap::new(size / PAGE_SIZE);
            for word in &mut bitmap.words {
                let mut bytes = [0u8; 8];
                self.input.read_hashed(&mut bytes, "page bitmap")?;
                *word = u64::from_le_bytes(bytes);
            }
            if bitmap.has_bits_past_end() {
                return Err(SnapshotError::CorruptPageBitmap { gpa });
            }
            for (first_page, page_count) in bitmap.runs(COPY_CHUNK as u64 / PAGE_SIZE) {
                let run_gpa = gpa + first_page * PAGE_SIZE;
                let chunk = &mut buffer[..(page_count * PAGE_SIZE) as usize];
                self.input.read_hashed(chunk, "memory pages")?;
                memory
                    .write_slice(chunk, GuestAddress(run_gpa))
                    .map_err(|source| SnapshotError::GuestMemory {
                        gpa: run_gpa,
                        source,
                    })?;
            }
            let stored = bitmap.count_stored();
            summary.memory_bytes += size;
            summary.pages_stored += stored;
            summary.zero_pages += bitmap.pages - stored;
        }

        let computed = self.input.hasher.clone().finalize();
        let mut trailer = [0u8; TRAILER_LEN];
        self.input.read_plain(&mut trailer, "trailer")?;
        let [c0, c1, c2, c3, m0, m1, m2, m3, m4, m5, m6, m7] = trailer;
        let stored = u32::from_le_bytes([c0, c1, c2, c3]);
        if stored != computed {
            return Err(SnapshotError::ChecksumMismatch { stored, computed });
        }
        let magic = [m0, m1, m2, m3, m4, m5, m6, m7];
        if magic != TRAILER_MAGIC {
            return Err(SnapshotError::BadTrailer { found: magic });
        }

        let file_len = self
            .input
            .file
            .get_ref()
            .metadata()
            .map_err(io_error("Cannot stat snapshot file", &self.input.path))?
            .len();
        if file_len > self.input.bytes {
            return Err(SnapshotError::TrailingData(file_len - self.input.bytes));
        }
        summary.bytes_written = self.input.bytes;
        Ok(summary)
    }
}

/// The fixed header fields after the magic; the checksum and padding are checked on decode.
struct Header {
    version: u32,
    flags: u32,
    state_len: u64,
    region_count: u32,
    page_size: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0..8].copy_from_slice(&MAGIC);
        bytes[8..12].copy_from_slice(&self.version.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.flags.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.state_len.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.region_count.to_le_bytes());
        bytes[28..32].copy_from_slice(&self.page_size.to_le_bytes());
        let checksum = crc32fast::hash(&bytes[..HEADER_CRC_COVERS]);
        bytes[32..36].copy_from_slice(&checksum.to_le_bytes());
        bytes
    }

    /// Checks in order of diagnosis: what the file is, whether this build can read that
    /// version's header, whether the header is intact, and whether its settings are known.
    /// Constant indices into the fixed-size array are bounds-checked at compile time.
    fn decode(h: &[u8; HEADER_LEN]) -> Result<Self, SnapshotError> {
        let magic = [h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]];
        if magic != MAGIC {
            return Err(SnapshotError::NotASnapshot { found: magic });
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion { found: version });
        }
        let stored = u32::from_le_bytes([h[32], h[33], h[34], h[35]]);
        if stored != crc32fast::hash(&h[..HEADER_CRC_COVERS]) {
            return Err(SnapshotError::CorruptHeader("checksum mismatch"));
        }
        if h[36..].iter().any(|&byte| byte != 0) {
            return Err(SnapshotError::CorruptHeader("padding is not zero"));
        }
        let header = Header {
            version,
            flags: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
            state_len: u64::from_le_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]),
            region_count: u32::from_le_bytes([h[24], h[25], h[26], h[27]]),
            page_size: u32::from_le_bytes([h[28], h[29], h[30], h[31]]),
        };
        if header.flags != 0 {
            return Err(SnapshotError::UnsupportedFlags(header.flags));
        }
        if u64::from(header.page_size) != PAGE_SIZE {
            return Err(SnapshotError::UnsupportedPageSize(header.page_size));
        }
        Ok(header)
    }
}

/// Checks that regions form a layout the format can describe, returning why not.
fn check_region_table(regions: &[(u64, u64)]) -> Result<(), String> {
    if regions.is_empty() {
        return Err("there are no regions".to_string());
    }
    if regions.len() > u32::MAX as usize {
        return Err(format!("{} regions do not fit the table", regions.len()));
    }
    let mut previous_end = None;
    for (index, &(gpa, size)) in regions.iter().enumerate() {
        if size == 0 {
            return Err(format!("region {index} at {gpa:#x} is empty"));
        }
        if gpa % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
            return Err(format!(
                "region {index} at {gpa:#x} with size {size:#x} is not aligned to \
                 the {PAGE_SIZE}-byte page size"
            ));
        }
        let Some(end) = gpa.checked_add(size) else {
            return Err(format!(
                "region {index} at {gpa:#x} with size {size:#x} ends past the address space"
            ));
        };
        if let Some(previous_end) = previous_end {
            if gpa < previous_end {
                return Err(format!(
                    "region {index} at {gpa:#x} is out of order or overlaps the region \
                     before it, which ends at {previous_end:#x}"
                ));
            }
        }
        previous_end = Some(end);
    }
    Ok(())
}

fn total_size(regions: &[(u64, u64)]) -> u64 {
    regions
        .iter()
        .fold(0, |total, &(_, size)| total.saturating_add(size))
}

/// The regions of `memory` as (guest physical address, size), sorted by address.
fn memory_layout(memory: &GuestMemoryMmap<AtomicBitmap>) -> Vec<(u64, u64)> {
    let mut layout: Vec<(u64, u64)> = memory
        .iter()
        .map(|region| (region.start_addr().raw_value(), region.len()))
        .collect();
    layout.sort_unstable();
    layout
}

fn temp_path(path: &Path) -> PathBuf {
    let mut temp = OsString::from(path.as_os_str());
    temp.push(".tmp");
    PathBuf::from(temp)
}

/// Makes the rename durable: it lives in the directory, not in the file.
fn sync_parent_dir(path: &Path) -> Result<(), SnapshotError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error("Cannot sync directory", dir))
}

/// One bit per page of a region, set when the page is stored in the file.
struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl PageBitmap {
    /// `pages` comes from a region size that was checked against the memory limit.
    fn new(pages: u64) -> Self {
        PageBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    fn set(&mut self, page: u64) {
        if let Some(word) = self.words.get_mut((page / 64) as usize) {
            *word |= 1 << (page % 64);
        }
    }

    fn is_set(&self, page: u64) -> bool {
        page < self.pages
            && self
                .words
                .get((page / 64) as usize)
                .is_some_and(|word| word >> (page % 64) & 1 == 1)
    }

    fn count_stored(&self) -> u64 {
        self.words
            .iter()
            .map(|word| u64::from(word.count_ones()))
            .sum()
    }

    fn has_bits_past_end(&self) -> bool {
        let used_bits = self.pages % 64;
        match self.words.last() {
            Some(&last) if used_bits != 0 => last >> used_bits != 0,
            _ => false,
        }
    }

    /// The first stored page at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64> {
        let mut index = (from / 64) as usize;
        let mut word = self.words.get(index)? & (u64::MAX << (from % 64));
        while word == 0 {
            index += 1;
            word = *self.words.get(index)?;
        }
        let page = index as u64 * 64 + u64::from(word.trailing_zeros());
        (page < self.pages).then_some(page)
    }

    /// Runs of consecutive stored pages as (first page, page count), at most `max_pages` long.
    fn runs(&self, max_pages: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut page = 0;
        std::iter::from_fn(move || {
            let first = self.next_set(page)?;
            page = first + 1;
            while page - first < max_pages && self.is_set(page) {
                page += 1;
            }
            Some((first, page - first))
        })
    }
}

/// Writes the file, feeding everything after the header to the checksum.
struct HashingWriter<'a> {
    file: BufWriter<File>,
    hasher: crc32fast::Hasher,
    bytes: u64,
    path: &'a Path,
}

impl HashingWriter<'_> {
    fn write_plain(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.file
            .write_all(bytes)
            .map_err(io_error("Cannot write snapshot file", self.path))?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn write_hashed(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.hasher.update(bytes);
        self.write_plain(bytes)
    }
}

/// Reads the file, feeding everything after the header to the checksum.
#[derive(Debug)]
struct HashingReader {
    file: BufReader<File>,
    hasher: crc32fast::Hasher,
    bytes: u64,
    path: PathBuf,
}

impl HashingReader {
    /// Fills `buffer`; `what` names the section for the truncation error.
    fn read_plain(&mut self, buffer: &mut [u8], what: &'static str) -> Result<(), SnapshotError> {
        self.file.read_exact(buffer).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                SnapshotError::Truncated(what)
            } else {
                let action = format!("Cannot read the {what} of snapshot file");
                io_error(&action, &self.path)(source)
            }
        })?;
        self.bytes += buffer.len() as u64;
        Ok(())
    }

    fn read_hashed(&mut self, buffer: &mut [u8], what: &'static str) -> Result<(), SnapshotError> {
        self.read_plain(buffer, what)?;
        self.hasher.update(buffer);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Two regions with a gap; the second has 259 pages, so its last bitmap word is partial.
    const LAYOUT: [(u64, u64); 2] = [(0, 2 * MIB), (4 * MIB, MIB + 3 * PAGE_SIZE)];
    const STATE: &[u8] = b"sealed vcpu and device state";

    fn limits() -> SnapshotLimits {
        SnapshotLimits::new(64 * MIB)
    }

    fn new_memory(layout: &[(u64, u64)]) -> GuestMemoryMmap<AtomicBitmap> {
        let ranges: Vec<_> = layout
            .iter()
            .map(|&(gpa, size)| (GuestAddress(gpa), size as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    /// Fills every third page and the last page of each region; the rest stay zero.
    fn sample_memory() -> (GuestMemoryMmap<AtomicBitmap>, u64) {
        let memory = new_memory(&LAYOUT);
        let mut stored = 0;
        for &(gpa, size) in &LAYOUT {
            let pages = size / PAGE_SIZE;
            for page in 0..pages {
                if page % 3 == 0 || page == pages - 1 {
                    let addr = gpa + page * PAGE_SIZE;
                    let fill: Vec<u8> = (0..PAGE_SIZE)
                        .map(|i| (addr.wrapping_mul(31) ^ i.wrapping_mul(7)) as u8 | 1)
                        .collect();
                    memory.write_slice(&fill, GuestAddress(addr)).unwrap();
                    stored += 1;
                }
            }
        }
        (memory, stored)
    }

    fn memory_bytes(memory: &GuestMemoryMmap<AtomicBitmap>) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (gpa, size) in memory_layout(memory) {
            let mut region = vec![0u8; size as usize];
            memory.read_slice(&mut region, GuestAddress(gpa)).unwrap();
            bytes.extend_from_slice(&region);
        }
        bytes
    }

    /// Writes the sample snapshot into a temp dir and returns the dir, file and source memory.
    fn sample_snapshot() -> (tempfile::TempDir, PathBuf, GuestMemoryMmap<AtomicBitmap>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.snap");
        let (memory, _) = sample_memory();
        write_snapshot(&path, STATE, &memory).unwrap();
        (dir, path, memory)
    }

    /// Opens and restores a file into fresh memory of the sample layout.
    fn restore(
        path: &Path,
        limits: &SnapshotLimits,
    ) -> Result<(Vec<u8>, GuestMemoryMmap<AtomicBitmap>, SnapshotSummary), SnapshotError> {
        let reader = SnapshotReader::open(path, limits)?;
        let state = reader.state().to_vec();
        let memory = new_memory(reader.regions());
        let summary = reader.read_memory_into(&memory)?;
        Ok((state, memory, summary))
    }

    /// Offsets of each section in the sample file.
    struct Sections {
        table: u64,
        state: u64,
        first_bitmap: u64,
        first_pages: u64,
        trailer: u64,
        end: u64,
    }

    fn sections(path: &Path) -> Sections {
        let end = fs::metadata(path).unwrap().len();
        let table = HEADER_LEN as u64;
        let state = table + (LAYOUT.len() * REGION_ENTRY_LEN) as u64;
        let first_bitmap = state + STATE.len() as u64;
        let first_pages = first_bitmap + (LAYOUT[0].1 / PAGE_SIZE).div_ceil(64) * 8;
        Sections {
            table,
            state,
            first_bitmap,
            first_pages,
            trailer: end - TRAILER_LEN as u64,
            end,
        }
    }

    fn write_variant(dir: &Path, bytes: &[u8]) -> PathBuf {
        let path = dir.join("variant.snap");
        fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn round_trip_restores_memory_and_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.snap");
        let (memory, stored) = sample_memory();
        let written = write_snapshot(&path, STATE, &memory).unwrap();

        let total_pages = total_size(&LAYOUT) / PAGE_SIZE;
        assert_eq!(written.memory_bytes, total_size(&LAYOUT));
        assert_eq!(written.pages_stored, stored);
        assert_eq!(written.zero_pages, total_pages - stored);
        assert_eq!(written.bytes_written, fs::metadata(&path).unwrap().len());

        let reader = SnapshotReader::open(&path, &limits()).unwrap();
        assert_eq!(reader.regions(), &LAYOUT);
        assert_eq!(reader.state(), STATE);
        let (state, restored, read) = restore(&path, &limits()).unwrap();
        assert_eq!(state, STATE);
        assert_eq!(read, written);
        assert!(memory_bytes(&restored) == memory_bytes(&memory));
    }

    #[test]
    fn zero_pages_are_not_stored() {
        let (_dir, path, _) = sample_snapshot();
        let (_, stored) = sample_memory();
        let bitmap_bytes: u64 = LAYOUT
            .iter()
            .map(|&(_, size)| (size / PAGE_SIZE).div_ceil(64) * 8)
            .sum();
        let expected = HEADER_LEN as u64
            + (LAYOUT.len() * REGION_ENTRY_LEN) as u64
            + STATE.len() as u64
            + bitmap_bytes
            + stored * PAGE_SIZE
            + TRAILER_LEN as u64;
        assert_eq!(fs::metadata(&path).unwrap().len(), expected);
        assert!(expected < total_size(&LAYOUT) / 2);

        // All-zero memory stores no pages at all.
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.snap");
        let summary = write_snapshot(&empty, b"", &new_memory(&LAYOUT)).unwrap();
        assert_eq!(summary.pages_stored, 0);
        assert_eq!(
            summary.bytes_written,
            expected - stored * PAGE_SIZE - STATE.len() as u64
        );
        let (_, restored, _) = restore(&empty, &limits()).unwrap();
        assert!(memory_bytes(&restored).iter().all(|&byte| byte == 0));
    }

    #[test]
    fn temp_file_does_not_remain() {
        let (dir, path, memory) = sample_snapshot();
        assert!(!temp_path(&path).exists());
        // Overwriting an existing snapshot replaces it whole.
        write_snapshot(&path, b"second", &memory).unwrap();
        assert!(!temp_path(&path).exists());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["vm.snap"]);
        assert_eq!(restore(&path, &limits()).unwrap().0, b"second");
    }

    #[test]
    fn failed_write_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails after the contents are written.
        let path = dir.path().join("occupied");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), b"x").unwrap();
        let (memory, _) = sample_memory();
        let error = write_snapshot(&path, STATE, &memory).unwrap_err();
        assert!(matches!(error, SnapshotError::Io { .. }), "{error}");
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        let (dir, path, _) = sample_snapshot();
        let bytes = fs::read(&path).unwrap();
        let s = sections(&path);
        let mut offsets: Vec<u64> = Vec::new();
        for boundary in [
            0,
            s.table,
            s.state,
            s.first_bitmap,
            s.first_pages,
            s.trailer,
            s.end,
        ] {
            offsets.extend(boundary.saturating_sub(3)..(boundary + 3).min(s.end));
        }
        offsets.extend((0..s.end).step_by(4093));
        offsets.sort_unstable();
        offsets.dedup();

        for length in offsets {
            let truncated = write_variant(dir.path(), &bytes[..length as usize]);
            match restore(&truncated, &limits()) {
                Err(SnapshotError::Truncated(_)) => {}
                other => panic!("truncation at {length} gave {:?}", other.map(|r| r.2)),
            }
        }
    }

    #[test]
    fn trailing_data_is_an_error() {
        let (dir, path, _) = sample_snapshot();
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(b"extra");
        let extended = write_variant(dir.path(), &bytes);
        assert!(matches!(
            restore(&extended, &limits()),
            Err(SnapshotError::TrailingData(5))
        ));
    }

    #[test]
    fn bit_flips_are_errors() {
        let (dir, path, _) = sample_snapshot();
        let bytes = fs::read(&path).unwrap();
        let s = sections(&path);
        let mut bits: Vec<u64> = (0..(s.first_bitmap + 8) * 8).collect();
        bits.extend((s.first_pages * 8..s.end * 8).step_by(7919));
        bits.extend((s.trailer * 8)..(s.end * 8));

        for bit in bits {
            let mut flipped = bytes.clone();
            flipped[(bit / 8) as usize] ^= 1 << (bit % 8);
            let variant = write_variant(dir.path(), &flipped);
            if let Ok((_, _, summary)) = restore(&variant, &limits()) {
                panic!("flipping bit {bit} went unnoticed: {summary:?}");
            }
        }
    }

    #[test]
    fn header_errors_say_what_is_wrong() {
        let (dir, path, _) = sample_snapshot();
        let bytes = fs::read(&path).unwrap();
        let error_for = |at: usize, value: u8| {
            let mut changed = bytes.clone();
            changed[at] = value;
            let variant = write_variant(dir.path(), &changed);
            SnapshotReader::open(&variant, &limits()).unwrap_err()
        };
        assert!(matches!(
            error_for(0, b'X'),
            SnapshotError::NotASnapshot { .. }
        ));
        assert_eq!(
            error_for(8, 2).to_string(),
            "Unsupported snapshot format version 2 (this build reads version 1)"
        );
        assert!(matches!(
            error_for(16, 0xff),
            SnapshotError::CorruptHeader("checksum mismatch")
        ));
        assert!(matches!(
            error_for(40, 1),
            SnapshotError::CorruptHeader("padding is not zero")
        ));
    }

    /// Rewrites header fields with a valid checksum, as a crafted file would.
    fn with_header(bytes: &[u8], edit: impl FnOnce(&mut Header)) -> Vec<u8> {
        let mut header = Header::decode(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
        edit(&mut header);
        let mut changed = bytes.to_vec();
        changed[..HEADER_LEN].copy_from_slice(&header.encode());
        changed
    }

    #[test]
    fn limits_are_checked_before_allocating() {
        let (dir, path, _) = sample_snapshot();
        let bytes = fs::read(&path).unwrap();

        let huge_state = with_header(&bytes, |header| header.state_len = u64::MAX);
        let error =
            SnapshotReader::open(&write_variant(dir.path(), &huge_state), &limits()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "Snapshot state length in bytes is {}, above the limit of {}",
                u64::MAX,
                DEFAULT_MAX_STATE_LEN
            )
        );

        let many_regions = with_header(&bytes, |header| header.region_count = u32::MAX);
        let error =
            SnapshotReader::open(&write_variant(dir.path(), &many_regions), &limits()).unwrap_err();
        assert!(matches!(
            error,
            SnapshotError::LimitExceeded {
                what: "region count",
                value: 0xffff_ffff,
                limit: 64
            }
        ));

        let small_host = SnapshotLimits::new(2 * MIB);
        let error = SnapshotReader::open(&path, &small_host).unwrap_err();
        assert!(matches!(
            error,
            SnapshotError::LimitExceeded {
                what: "guest memory size in bytes",
                ..
            }
        ));

        let strict_state = SnapshotLimits {
            max_state_len: STATE.len() - 1,
            ..limits()
        };
        assert!(SnapshotReader::open(&path, &strict_state).is_err());
    }

    #[test]
    fn bad_region_tables_are_rejected() {
        let (dir, path, _) = sample_snapshot();
        let bytes = fs::read(&path).unwrap();
        let table = HEADER_LEN;
        let cases: [(&str, usize, u64); 4] = [
            ("is empty", table + 8, 0),
            ("not aligned", table + 16, 4 * MIB + 1),
            ("out of order or overlaps", table + 16, MIB),
            ("past the address space", table + 16, u64::MAX - 4095),
        ];
        for (reason, at, value) in cases {
            let mut changed = bytes.clone();
            changed[at..at + 8].copy_from_slice(&value.to_le_bytes());
            let variant = write_variant(dir.path(), &changed);
            let error = SnapshotReader::open(&variant, &limits()).unwrap_err();
            assert!(
                matches!(&error, SnapshotError::BadRegionTable(why) if why.contains(reason)),
                "expected \"{reason}\", got: {error}"
            );
        }

        let no_regions = with_header(&bytes, |header| header.region_count = 0);
        let error =
            SnapshotReader::open(&write_variant(dir.path(), &no_regions), &limits()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "Snapshot region table is invalid: there are no regions"
        );
    }

    #[test]
    fn layout_mismatch_is_rejected() {
        let (_dir, path, _) = sample_snapshot();
        for layout in [
            vec![LAYOUT[0]],
            vec![LAYOUT[0], (4 * MIB, MIB)],
            vec![(0, 2 * MIB), (8 * MIB, MIB + 3 * PAGE_SIZE)],
        ] {
            let reader = SnapshotReader::open(&path, &limits()).unwrap();
            let error = reader.read_memory_into(&new_memory(&layout)).unwrap_err();
            assert!(
                matches!(error, SnapshotError::LayoutMismatch { .. }),
                "{error}"
            );
        }
    }

    #[test]
    fn bits_past_the_region_end_are_rejected() {
        let (dir, path, _) = sample_snapshot();
        let mut bytes = fs::read(&path).unwrap();
        // The second region has 259 pages: its fifth bitmap word uses 3 bits.
        let s = sections(&path);
        let stored_in_first = bytes[s.first_bitmap as usize..s.first_pages as usize]
            .iter()
            .map(|byte| u64::from(byte.count_ones()))
            .sum::<u64>();
        let second_bitmap = s.first_pages + stored_in_first * PAGE_SIZE;
        let last_word = (second_bitmap + 4 * 8) as usize;
        bytes[last_word + 7] |= 0x80;
        let variant = write_variant(dir.path(), &bytes);
        let error = restore(&variant, &limits()).unwrap_err();
        assert!(
            matches!(error, SnapshotError::CorruptPageBitmap { gpa } if gpa == LAYOUT[1].0),
            "{error}"
        );
    }

    #[test]
    fn unaligned_memory_cannot_be_snapshotted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.snap");
        let memory = new_memory(&[(0, MIB + 512)]);
        let error = write_snapshot(&path, STATE, &memory).unwrap_err();
        assert!(
            matches!(error, SnapshotError::UnsupportedMemoryLayout(_)),
            "{error}"
        );
        assert!(!path.exists() && !temp_path(&path).exists());
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.snap");
        let error = SnapshotReader::open(&path, &limits()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("Cannot open snapshot file {}", path.display())
        );
        assert!(std::error::Error::source(&error).is_some());
    }

    #[test]
    fn page_runs_cover_exactly_the_set_bits() {
        let mut bitmap = PageBitmap::new(200);
        let set = [0, 1, 2, 63, 64, 65, 127, 128, 190, 191, 192, 199];
        for page in set {
            bitmap.set(page);
        }
        let runs: Vec<_> = bitmap.runs(2).collect();
        assert_eq!(
            runs,
            [
                (0, 2),
                (2, 1),
                (63, 2),
                (65, 1),
                (127, 2),
                (190, 2),
                (192, 1),
                (199, 1)
            ]
        );
        assert_eq!(bitmap.count_stored(), set.len() as u64);
        assert!(!bitmap.has_bits_past_end());
        bitmap.words[3] |= 1 << 8;
        assert!(bitmap.has_bits_past_end());
    }
}
