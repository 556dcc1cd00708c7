//! Carrying a VM's resource data to the target during a migration: a disk that moves (MV) or
//! is copied (CP) and scratch directories that are copied (CP) or moved (MV).
//!
//! One TCP connection per migration to the target agent's resource listener, opened with the
//! line `GODWIT-RES <migration id>\n`, then frames of `[u8 type][u32 length LE][payload]`
//! (payload at most [`MAX_FRAME`]):
//!
//! ```text
//! source                                   target
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
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use godwit_api::{
    IncomingResource, ResourceAction, ResourceKind, ResourceMigration, ResourceStatus,
};
use page_transfer::progress::Progress;
use serde::{Deserialize, Serialize};

use super::{scratch_files, Bound, BoundState, HostResources, VmResources};
use crate::microvm::block::{self, BlockBackend, FileDisk, BLOCK_SIZE};
use crate::microvm::stream::Stream;

/// First line of a resource data connection: `GODWIT-RES <migration id>`.
pub const RESOURCES_PREFIX: &str = "GODWIT-RES";
/// Largest frame payload.
pub const MAX_FRAME: usize = 2 << 20;
/// Blocks per disk chunk (256 KiB).
const CHUNK_BLOCKS: u64 = 64;
/// Dirty passes while the guest runs before the copier just waits for the pause.
const MAX_LIVE_PASSES: u32 = 1000;
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

const T_ITEM: u8 = 1;
const T_CHUNK: u8 = 2;
const T_FILE_BEGIN: u8 = 3;
const T_FILE_DATA: u8 = 4;
const T_FILE_END: u8 = 5;
const T_COMMIT: u8 = 6;
const T_ACK: u8 = 7;
const T_ABORT: u8 = 8;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Serialize, Deserialize)]
struct ItemBegin {
    name: String,
    kind: ResourceKind,
    bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileBegin {
    name: String,
    file: String,
    size: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEnd {
    blake3: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Ack {
    ok: bool,
    error: Option<String>,
    /// blake3 of each disk as committed on the target.
    digests: BTreeMap<String, String>,
}

fn write_frame(w: &mut impl Write, ty: u8, payload: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = ty;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)
}

fn write_json(w: &mut impl Write, ty: u8, v: &impl Serialize) -> io::Result<()> {
    write_frame(w, ty, &serde_json::to_vec(v).map_err(io::Error::other)?)
}

fn read_frame(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
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

fn parse<T: for<'de> Deserialize<'de>>(payload: &[u8], what: &str) -> io::Result<T> {
    serde_json::from_slice(payload).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("bad {what} frame: {e}"))
    })
}

/// Encodes a disk chunk: `[u16 name len][name][u64 block][u32 count][u8 zero][data]`.
fn chunk_frame(name: &str, block: u64, count: u32, data: Option<&[u8]>) -> Vec<u8> {
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

struct Chunk<'a> {
    name: &'a str,
    block: u64,
    count: u32,
    data: Option<&'a [u8]>,
}

fn parse_chunk(f: &[u8]) -> io::Result<Chunk<'_>> {
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

// ---------------------------------------------------------------------------------------------
// Source side.

/// One resource of a migrating VM with the action chosen for it.
#[derive(Debug, Clone)]
pub struct Planned {
    pub bound: Bound,
    pub action: ResourceAction,
    /// Index into the migration's resource records.
    pub record: usize,
}

type Records = Arc<Mutex<Vec<ResourceMigration>>>;

/// What the copier watches: `stop` ends the live dirty passes (the pause is near), `cancel`
/// ends everything (the migration failed).
struct Flags {
    stop: Arc<AtomicBool>,
    cancel: Arc<AtomicBool>,
}

/// The source's side of a migration's resources.
pub struct SourceTransfer {
    items: Vec<Planned>,
    records: Records,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    /// Every full pass is done: the copier only resends dirty blocks now.
    ready: Arc<AtomicBool>,
    /// The migration failed: the copier stops at once, even mid-pass.
    cancel: Arc<AtomicBool>,
    worker: Mutex<Option<JoinHandle<io::Result<TcpStream>>>>,
    conn: Mutex<Option<TcpStream>>,
    stream: Option<Arc<Stream>>,
    frozen: AtomicBool,
    started: Instant,
    /// Each moved or copied disk's digest as the target committed it.
    target_digests: Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for SourceTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceTransfer")
            .field("items", &self.items.len())
            .finish()
    }
}

impl SourceTransfer {
    /// Starts copying the data of MV/CP resources to `addr` while the VM runs.
    pub fn start(
        addr: Option<SocketAddr>,
        migration_id: &str,
        items: Vec<Planned>,
        records: Vec<ResourceMigration>,
        progress: Arc<Progress>,
        stream: Option<Arc<Stream>>,
    ) -> io::Result<Self> {
        let records: Records = Arc::new(Mutex::new(records));
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let cancel = Arc::new(AtomicBool::new(false));
        let data: Vec<Planned> = items
            .iter()
            .filter(|p| carries_data(p.bound.spec.kind, p.action))
            .cloned()
            .collect();
        let worker = match (data.is_empty(), addr) {
            (true, _) => {
                ready.store(true, Ordering::Release);
                None
            }
            (false, None) => {
                return Err(io::Error::other(
                    "the target offers no resource listener for the VM's data",
                ))
            }
            (false, Some(addr)) => {
                let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
                conn.set_nodelay(true)?;
                conn.write_all(format!("{RESOURCES_PREFIX} {migration_id}\n").as_bytes())?;
                let (records, progress, done) = (records.clone(), progress.clone(), ready.clone());
                let flags = Flags {
                    stop: stop.clone(),
                    cancel: cancel.clone(),
                };
                Some(
                    std::thread::Builder::new()
                        .name("resource-copy".into())
                        .spawn(move || {
                            copy_live(&mut conn, &data, &records, &progress, &flags, &done)?;
                            Ok(conn)
                        })?,
                )
            }
        };
        let me = SourceTransfer {
            items,
            records,
            progress,
            stop,
            ready,
            cancel,
            worker: Mutex::new(worker),
            conn: Mutex::new(None),
            stream,
            frozen: AtomicBool::new(false),
            started: Instant::now(),
            target_digests: Mutex::new(BTreeMap::new()),
        };
        me.publish();
        Ok(me)
    }

    fn publish(&self) {
        let records = lock(&self.records).clone();
        self.progress.update(|i| i.resources = records);
    }

    fn join_worker(&self) -> io::Result<()> {
        let handle = lock(&self.worker).take();
        if let Some(h) = handle {
            let conn = h
                .join()
                .map_err(|_| io::Error::other("the resource copier panicked"))??;
            *lock(&self.conn) = Some(conn);
        }
        Ok(())
    }

    /// Whether every resource's first full copy is done (pre-copy waits for it to stop).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Before the guest pauses: lets the copier finish its first full pass and stop
    /// iterating, so the pause only covers the last dirty blocks.
    pub fn before_pause(&self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        self.join_worker()
    }

    /// With the guest paused, before its state is saved: freezes the endpoint stream, sends
    /// the last dirty blocks and commits on the target.
    pub fn at_pause(&self) -> io::Result<()> {
        if let Some(s) = &self.stream {
            s.freeze();
            self.frozen.store(true, Ordering::Release);
        }
        self.join_worker()?;
        let mut conn_guard = lock(&self.conn);
        let Some(conn) = conn_guard.as_mut() else {
            return Ok(());
        };
        for p in &self.items {
            if !carries_data(p.bound.spec.kind, p.action) {
                continue;
            }
            if let BoundState::Disk {
                local: Some(disk), ..
            } = &p.bound.state
            {
                let dirty = disk.dirty().harvest();
                disk.dirty().stop();
                let never = AtomicBool::new(false);
                let bytes = send_blocks(conn, &p.bound.spec.name, disk, &dirty, &never)?;
                self.record(p.record, |r| {
                    r.bytes += bytes;
                    r.detail = format!(
                        "{}; {} blocks dirtied last sent in the pause",
                        r.detail,
                        dirty.len()
                    );
                });
            }
        }
        write_frame(conn, T_COMMIT, &[])?;
        conn.set_read_timeout(Some(ACK_TIMEOUT))?;
        let (ty, payload) = read_frame(conn)?;
        if ty != T_ACK {
            return Err(io::Error::other(format!(
                "the target answered the commit with frame type {ty}"
            )));
        }
        let ack: Ack = parse(&payload, "ack")?;
        if !ack.ok {
            return Err(io::Error::other(format!(
                "the target could not take the VM's resources: {}",
                ack.error.unwrap_or_else(|| "no reason given".into())
            )));
        }
        *lock(&self.target_digests) = ack.digests;
        Ok(())
    }

    /// After the switchover: compares each moved or copied disk's frozen image here with what
    /// the target committed. Returns false if any differs (its record says failed).
    pub fn verify_disks(&self) -> bool {
        let mut all_ok = true;
        for p in &self.items {
            let BoundState::Disk {
                local: Some(disk), ..
            } = &p.bound.state
            else {
                continue;
            };
            if !carries_data(p.bound.spec.kind, p.action) {
                continue;
            }
            let name = &p.bound.spec.name;
            let theirs = lock(&self.target_digests).get(name).cloned();
            let t = Instant::now();
            let ours = block::image_digest(disk);
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            match (ours, theirs) {
                (Ok(ours), Some(theirs)) if ours == theirs => self.record(p.record, |r| {
                    r.detail = format!(
                        "{}; source image and target commit both {ours} (checked in {ms:.0} ms \
                         after the switchover)",
                        r.detail
                    );
                }),
                (ours, theirs) => {
                    all_ok = false;
                    let text = format!(
                        "disk {name} differs: source image {}, target committed {}",
                        ours.unwrap_or_else(|e| format!("unreadable ({e})")),
                        theirs.unwrap_or_else(|| "nothing".into())
                    );
                    tracing::error!(%text, "disk move check failed");
                    self.record(p.record, |r| {
                        r.status = ResourceStatus::Failed;
                        r.error = Some(text);
                    });
                }
            }
        }
        all_ok
    }

    fn record(&self, i: usize, f: impl FnOnce(&mut ResourceMigration)) {
        if let Some(r) = lock(&self.records).get_mut(i) {
            f(r);
        }
        self.publish();
    }

    /// The migration failed before the switchover and the VM resumes here: the target drops
    /// what it staged, the stream takes the bytes held meanwhile.
    pub fn abort(&self, reason: &str) {
        self.cancel.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        let worker_err = self.join_worker().err();
        if let Some(conn) = lock(&self.conn).as_mut() {
            let _ = write_json(conn, T_ABORT, &serde_json::json!({ "reason": reason }));
        }
        for p in &self.items {
            if let BoundState::Disk {
                local: Some(disk), ..
            } = &p.bound.state
            {
                disk.dirty().stop();
            }
        }
        if self.frozen.swap(false, Ordering::AcqRel) {
            if let Some(s) = &self.stream {
                s.thaw();
            }
        }
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let worker_err = worker_err.map(|e| e.to_string());
        for r in lock(&self.records).iter_mut() {
            if r.status != ResourceStatus::Done {
                r.status = ResourceStatus::Failed;
                r.duration_ms = ms;
                r.error = Some(worker_err.clone().unwrap_or_else(|| reason.to_owned()));
            }
        }
        self.publish();
    }

    /// The migration completed: every action is done.
    pub fn complete(&self, details: &BTreeMap<usize, String>) {
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        for (i, r) in lock(&self.records).iter_mut().enumerate() {
            if r.status != ResourceStatus::Failed {
                r.status = ResourceStatus::Done;
            }
            if r.duration_ms == 0.0 {
                r.duration_ms = ms;
            }
            if let Some(d) = details.get(&i) {
                if r.detail.is_empty() {
                    r.detail = d.clone();
                } else {
                    r.detail = format!("{}; {d}", r.detail);
                }
            }
        }
        self.publish();
    }

    /// Records the endpoint's handover (done as soon as the target runs the VM).
    pub fn note_endpoint(&self, detail: &str) {
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        for p in &self.items {
            if p.bound.spec.kind == ResourceKind::Endpoint {
                self.record(p.record, |r| {
                    r.detail = detail.to_owned();
                    r.duration_ms = ms;
                    r.status = ResourceStatus::Done;
                });
            }
        }
    }

    pub fn records(&self) -> Vec<ResourceMigration> {
        lock(&self.records).clone()
    }
}

/// The copier: a full pass over each disk and every scratch file, then dirty disk blocks
/// again and again until `stop`.
fn copy_live(
    conn: &mut TcpStream,
    items: &[Planned],
    records: &Records,
    progress: &Progress,
    flags: &Flags,
    ready: &AtomicBool,
) -> io::Result<()> {
    let stop = &flags.stop;
    let set = |i: usize, f: &dyn Fn(&mut ResourceMigration)| {
        let snapshot = {
            let mut r = lock(records);
            if let Some(rec) = r.get_mut(i) {
                f(rec);
            }
            r.clone()
        };
        progress.update(|info| info.resources = snapshot);
    };
    let mut disks: Vec<(&Planned, &Arc<FileDisk>, Instant)> = Vec::new();
    for p in items {
        let name = &p.bound.spec.name;
        let t = Instant::now();
        set(p.record, &|r| r.status = ResourceStatus::Running);
        match &p.bound.state {
            BoundState::Disk {
                local: Some(disk), ..
            } => {
                write_json(
                    conn,
                    T_ITEM,
                    &ItemBegin {
                        name: name.clone(),
                        kind: ResourceKind::Disk,
                        bytes: disk.blocks() * BLOCK_SIZE,
                    },
                )?;
                disk.dirty().start();
                let all: Vec<u64> = (0..disk.blocks()).collect();
                let bytes = send_blocks(conn, name, disk, &all, &flags.cancel)?;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                set(p.record, &|r| {
                    r.bytes += bytes;
                    r.detail = format!(
                        "full pass of {} MiB ({} bytes sent, zero chunks elided) in {ms:.0} ms",
                        disk.blocks() * BLOCK_SIZE >> 20,
                        bytes
                    );
                });
                disks.push((p, disk, t));
            }
            BoundState::Scratch { dir: Some(dir), .. } => {
                write_json(
                    conn,
                    T_ITEM,
                    &ItemBegin {
                        name: name.clone(),
                        kind: ResourceKind::Scratch,
                        bytes: 0,
                    },
                )?;
                let (files, bytes) = send_dir(conn, name, dir, &flags.cancel)?;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                set(p.record, &|r| {
                    r.bytes += bytes;
                    r.duration_ms = ms;
                    r.detail = format!(
                        "{files} files, {bytes} bytes copied, each checked by blake3 on the target"
                    );
                });
            }
            _ => {
                return Err(io::Error::other(format!(
                    "resource {name} has no local data to send"
                )))
            }
        }
    }
    if disks.is_empty() {
        ready.store(true, Ordering::Release);
    }
    // Dirty passes while the guest runs, until the pause is near.
    let mut passes = 0u32;
    let mut first = true;
    let mut resent = vec![0u64; disks.len()];
    while !stop.load(Ordering::Acquire) && !disks.is_empty() && passes < MAX_LIVE_PASSES {
        for (i, (p, disk, _)) in disks.iter().enumerate() {
            let dirty = disk.dirty().harvest();
            if !dirty.is_empty() {
                let bytes = send_blocks(conn, &p.bound.spec.name, disk, &dirty, &flags.cancel)?;
                resent[i] += dirty.len() as u64;
                set(p.record, &|r| r.bytes += bytes);
            }
        }
        passes += 1;
        if first {
            // One dirty pass after the full one: what is left is what the guest writes now.
            ready.store(true, Ordering::Release);
            first = false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ready.store(true, Ordering::Release);
    for (i, (p, _, t)) in disks.iter().enumerate() {
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let n = resent[i];
        set(p.record, &|r| {
            r.duration_ms = ms;
            r.detail = format!(
                "{}; {n} dirty blocks resent in {passes} passes while the guest ran",
                r.detail
            );
        });
    }
    Ok(())
}

/// Sends `blocks` (sorted) of `disk` in runs of up to [`CHUNK_BLOCKS`]; all-zero chunks go
/// without data. Returns the bytes written.
fn send_blocks(
    conn: &mut TcpStream,
    name: &str,
    disk: &FileDisk,
    blocks: &[u64],
    cancel: &AtomicBool,
) -> io::Result<u64> {
    let mut sent = 0u64;
    let mut buf = vec![0u8; (CHUNK_BLOCKS * BLOCK_SIZE) as usize];
    let mut i = 0;
    while i < blocks.len() {
        if cancel.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "the migration ended"));
        }
        let first = blocks[i];
        let mut n = 1;
        while i + n < blocks.len()
            && (n as u64) < CHUNK_BLOCKS
            && blocks[i + n] == first + n as u64
        {
            n += 1;
        }
        let data = &mut buf[..n * BLOCK_SIZE as usize];
        disk.read_raw(first, data)?;
        let zero = data.iter().all(|&b| b == 0);
        let frame = chunk_frame(name, first, n as u32, (!zero).then_some(&data[..]));
        write_frame(conn, T_CHUNK, &frame)?;
        sent += frame.len() as u64 + 5;
        i += n;
    }
    Ok(sent)
}

fn send_dir(
    conn: &mut TcpStream,
    name: &str,
    dir: &Path,
    cancel: &AtomicBool,
) -> io::Result<(usize, u64)> {
    let files = scratch_files(dir)?;
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for path in &files {
        if cancel.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "the migration ended"));
        }
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::other(format!("{} has no usable name", path.display())))?
            .to_owned();
        let mut f = std::fs::File::open(path)?;
        let size = f.metadata()?.len();
        write_json(
            conn,
            T_FILE_BEGIN,
            &FileBegin {
                name: name.to_owned(),
                file: file_name,
                size,
            },
        )?;
        let mut hasher = blake3::Hasher::new();
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            write_frame(conn, T_FILE_DATA, &buf[..n])?;
            bytes += n as u64;
        }
        write_json(
            conn,
            T_FILE_END,
            &FileEnd {
                blake3: hasher.finalize().to_hex().to_string(),
            },
        )?;
    }
    Ok((files.len(), bytes))
}

// ---------------------------------------------------------------------------------------------
// Target side.

/// What the target knows of an incoming migration's resources.
#[derive(Debug)]
pub struct Incoming {
    pub id: String,
    pub vm: String,
    pub resources: Vec<IncomingResource>,
    dir: PathBuf,
    staging: PathBuf,
    state: Mutex<IncomingState>,
}

#[derive(Debug, Default)]
struct IncomingState {
    committed: bool,
    /// Directories moved into place at commit (removed again if the VM never starts here).
    placed: Vec<PathBuf>,
    bytes: u64,
}

impl Incoming {
    pub fn new(id: &str, vm: &str, resources: Vec<IncomingResource>, dir: PathBuf) -> Self {
        let staging = dir.join(format!(".incoming-{id}"));
        Incoming {
            id: id.to_owned(),
            vm: vm.to_owned(),
            resources,
            dir,
            staging,
            state: Mutex::new(IncomingState::default()),
        }
    }

    /// Whether any resource's data comes over the resource connection.
    pub fn expects_data(&self) -> bool {
        self.resources
            .iter()
            .any(|r| carries_data(r.spec.kind, r.action))
    }

    pub fn committed(&self) -> bool {
        lock(&self.state).committed
    }

    /// Serves the source's resource connection to the end.
    pub fn receive(&self, mut conn: TcpStream) {
        let result = self.receive_inner(&mut conn);
        if let Err(e) = &result {
            tracing::warn!(vm = %self.vm, error = %e, "incoming resource data failed");
            let _ = write_json(
                &mut conn,
                T_ACK,
                &Ack {
                    ok: false,
                    error: Some(e.to_string()),
                    digests: BTreeMap::new(),
                },
            );
        }
        let _ = std::fs::remove_dir_all(&self.staging);
    }

    fn receive_inner(&self, conn: &mut TcpStream) -> io::Result<()> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        std::fs::create_dir_all(&self.staging)?;
        let mut disks: BTreeMap<String, (FileDisk, Vec<u64>)> = BTreeMap::new();
        let mut file: Option<(std::fs::File, blake3::Hasher, String, u64, u64)> = None;
        let mut mismatches = Vec::new();
        loop {
            let (ty, payload) = read_frame(conn)?;
            match ty {
                T_ITEM => {
                    let item: ItemBegin = parse(&payload, "item")?;
                    let expected = self
                        .resources
                        .iter()
                        .find(|r| r.spec.name == item.name && carries_data(r.spec.kind, r.action))
                        .ok_or_else(|| bad(format!("unexpected resource {:?}", item.name)))?;
                    let dir = self.staging.join(&item.name);
                    std::fs::create_dir_all(&dir)?;
                    if item.kind == ResourceKind::Disk {
                        if item.bytes != expected.spec.size_bytes() {
                            return Err(bad(format!(
                                "disk {} is {} bytes, {} were announced",
                                item.name,
                                item.bytes,
                                expected.spec.size_bytes()
                            )));
                        }
                        let disk = FileDisk::create(&dir.join("disk.img"), item.bytes)?;
                        let zero = block::block_hash(&[0u8; BLOCK_SIZE as usize]);
                        let hashes = vec![zero; disk.blocks() as usize];
                        disks.insert(item.name, (disk, hashes));
                    }
                }
                T_CHUNK => {
                    let c = parse_chunk(&payload)?;
                    let (disk, hashes) = disks
                        .get_mut(c.name)
                        .ok_or_else(|| bad(format!("chunk for unknown disk {:?}", c.name)))?;
                    if c.block + u64::from(c.count) > disk.blocks() {
                        return Err(bad(format!("chunk past the end of disk {}", c.name)));
                    }
                    let zeros;
                    let data = match c.data {
                        Some(d) => d,
                        None => {
                            zeros = vec![0u8; (u64::from(c.count) * BLOCK_SIZE) as usize];
                            &zeros
                        }
                    };
                    disk.write_raw(c.block, data)?;
                    for (i, b) in data.chunks(BLOCK_SIZE as usize).enumerate() {
                        hashes[c.block as usize + i] = block::block_hash(b);
                    }
                    lock(&self.state).bytes += data.len() as u64;
                }
                T_FILE_BEGIN => {
                    let fb: FileBegin = parse(&payload, "file")?;
                    if fb.file.contains('/') || fb.file.starts_with('.') || fb.file.is_empty() {
                        return Err(bad(format!("bad scratch file name {:?}", fb.file)));
                    }
                    let dir = self.staging.join(&fb.name);
                    if !dir.is_dir() {
                        return Err(bad(format!("file for unknown scratch {:?}", fb.name)));
                    }
                    let f = std::fs::File::create(dir.join(&fb.file))?;
                    file = Some((f, blake3::Hasher::new(), fb.file, fb.size, 0));
                }
                T_FILE_DATA => {
                    let (f, h, _, size, got) = file
                        .as_mut()
                        .ok_or_else(|| bad("file data outside a file".into()))?;
                    *got += payload.len() as u64;
                    if *got > *size {
                        return Err(bad("more file data than announced".into()));
                    }
                    f.write_all(&payload)?;
                    h.update(&payload);
                    lock(&self.state).bytes += payload.len() as u64;
                }
                T_FILE_END => {
                    let end: FileEnd = parse(&payload, "file end")?;
                    let (f, h, name, size, got) =
                        file.take().ok_or_else(|| bad("file end outside a file".into()))?;
                    f.sync_all()?;
                    let digest = h.finalize().to_hex().to_string();
                    if digest != end.blake3 || got != size {
                        mismatches.push(format!(
                            "{name}: received {got} of {size} bytes, blake3 {digest} vs {}",
                            end.blake3
                        ));
                    }
                }
                T_COMMIT => {
                    let ack = self.commit(&disks, &mismatches);
                    let ok = ack.ok;
                    write_json(conn, T_ACK, &ack)?;
                    if ok {
                        // The connection ends with the migration.
                        let _ = read_frame(conn);
                    }
                    return Ok(());
                }
                T_ABORT => {
                    tracing::info!(vm = %self.vm, "the source aborted the resource transfer");
                    return Ok(());
                }
                other => return Err(bad(format!("unknown resource frame type {other}"))),
            }
        }
    }

    fn commit(&self, disks: &BTreeMap<String, (FileDisk, Vec<u64>)>, mismatches: &[String]) -> Ack {
        let fail = |e: String| Ack {
            ok: false,
            error: Some(e),
            digests: BTreeMap::new(),
        };
        if !mismatches.is_empty() {
            return fail(format!("scratch files differ: {}", mismatches.join(", ")));
        }
        let mut digests = BTreeMap::new();
        // No fsync here: the image is as durable as the VM's memory, which is only on this
        // host from now on either way; the guest's own flushes sync it.
        for (name, (_, hashes)) in disks {
            digests.insert(name.clone(), block::fold_digest(hashes));
        }
        let mut placed = Vec::new();
        for r in &self.resources {
            if !carries_data(r.spec.kind, r.action) {
                continue;
            }
            let from = self.staging.join(&r.spec.name);
            let to = self.dir.join(&r.spec.name);
            if to.exists() {
                let _ = std::fs::remove_dir_all(&to);
            }
            if let Err(e) = std::fs::rename(&from, &to) {
                for p in &placed {
                    let _ = std::fs::remove_dir_all(p);
                }
                return fail(format!(
                    "cannot move resource {} into {}: {e}",
                    r.spec.name,
                    to.display()
                ));
            }
            placed.push(to);
        }
        let mut st = lock(&self.state);
        st.committed = true;
        st.placed = placed;
        Ack {
            ok: true,
            error: None,
            digests,
        }
    }

    /// The VM never started here: removes what the commit put in place.
    pub fn discard(&self) {
        let st = lock(&self.state);
        for p in &st.placed {
            let _ = std::fs::remove_dir_all(p);
        }
        let _ = std::fs::remove_dir_all(&self.staging);
    }

    pub fn bytes(&self) -> u64 {
        lock(&self.state).bytes
    }

    /// Binds the arriving VM's resources on this host, per the actions chosen.
    pub fn bind(&self, host: &HostResources) -> io::Result<VmResources> {
        if self.expects_data() && !self.committed() {
            return Err(io::Error::other(
                "the VM's resource data never arrived (no commit)",
            ));
        }
        let mut items = Vec::new();
        let mut local_bytes = 0u64;
        for r in &self.resources {
            let name = &r.spec.name;
            let dir = self.dir.join(name);
            let remote_host = r.remote_host.clone().unwrap_or_default();
            let (state, holder) = match (r.spec.kind, r.action) {
                (ResourceKind::Disk, ResourceAction::Move | ResourceAction::Copy) => {
                    let disk = Arc::new(FileDisk::open(&dir.join("disk.img"))?);
                    local_bytes += r.spec.size_bytes();
                    (
                        BoundState::Disk {
                            local: Some(disk.clone()),
                            backend: disk,
                            remote: None,
                        },
                        host.host().to_owned(),
                    )
                }
                (ResourceKind::Disk, _) => {
                    let remote = r.remote.as_deref().ok_or_else(|| {
                        io::Error::other(format!("disk {name} kept remote has no address"))
                    })?;
                    (HostResources::remote_disk(remote)?, remote_host)
                }
                (ResourceKind::Scratch, ResourceAction::Move | ResourceAction::Copy) => {
                    local_bytes += r.spec.size_bytes();
                    (
                        BoundState::Scratch {
                            dir: Some(dir),
                            remote: None,
                        },
                        host.host().to_owned(),
                    )
                }
                (ResourceKind::Scratch, ResourceAction::Rebind) => {
                    std::fs::create_dir_all(&dir)?;
                    (
                        BoundState::Scratch {
                            dir: Some(dir),
                            remote: None,
                        },
                        host.host().to_owned(),
                    )
                }
                (ResourceKind::Scratch, _) => (
                    BoundState::Scratch {
                        dir: None,
                        remote: r.remote.clone(),
                    },
                    remote_host,
                ),
                (ResourceKind::Endpoint, _) => {
                    let stream = Arc::new(Stream::new());
                    let endpoint = host.arriving_endpoint(&self.vm, name, stream.clone())?;
                    (
                        BoundState::Endpoint {
                            endpoint,
                            stream,
                            address: r.address.clone().unwrap_or_default(),
                        },
                        r.remote_host.clone().unwrap_or_default(),
                    )
                }
                (ResourceKind::Device, ResourceAction::Rebind) => (
                    host.bind_device(r.spec.class.as_deref().unwrap_or_default()),
                    host.host().to_owned(),
                ),
                (ResourceKind::Device, _) => {
                    let url = r.remote.as_deref().unwrap_or_default();
                    (
                        HostResources::remote_device(
                            r.spec.class.as_deref().unwrap_or_default(),
                            url,
                            &remote_host,
                        ),
                        remote_host,
                    )
                }
            };
            items.push(Bound {
                spec: r.spec.clone(),
                host: holder,
                state,
            });
        }
        host.add_used(&self.vm, local_bytes);
        Ok(VmResources { items })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        let mut f = vec![T_CHUNK];
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut &f[..]).is_err());
    }
}
