//! The source side of a migration's resource data: the live disk mirror and scratch copy,
//! the commit in the pause, the check after the switchover.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use godwit_api::{ResourceAction, ResourceKind, ResourceMigration, ResourceStatus};
use page_transfer::channel::Channel;
use page_transfer::progress::Progress;

use super::*;
use crate::microvm::block::{self, BlockBackend, FileDisk};
use crate::microvm::stream::Stream;
use crate::resources::link::LinkSecurity;
use crate::resources::{scratch_files, Bound, BoundState};
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
    worker: Mutex<Option<JoinHandle<io::Result<Channel>>>>,
    conn: Mutex<Option<Channel>>,
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
        links: &LinkSecurity,
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
                let mut conn = links.connect(addr)?;
                conn.write_all(format!("{RESOURCES_PREFIX} {migration_id}\n").as_bytes())?;
                hello(&mut conn)?;
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

    /// Whether every resource's first full copy is done (pre-copy waits for it to stop), or
    /// the copier gave up (then the pause reports its error at once).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            || lock(&self.worker).as_ref().is_some_and(|h| h.is_finished())
    }

    /// Before the guest pauses: lets the copier finish its first full pass and stop
    /// iterating, so the pause only covers the last dirty blocks.
    ///
    /// Waits for `ready` (the full pass and one dirty pass after it) rather than only the full
    /// pass, so the pause carries the blocks of one 50 ms pass, not everything written during
    /// the full copy (what stop-and-copy and post-copy, which pause at once, would otherwise
    /// send in the downtime).
    pub fn before_pause(&self) -> io::Result<()> {
        loop {
            let finished = lock(&self.worker).as_ref().is_none_or(|h| h.is_finished());
            if self.ready.load(Ordering::Acquire) || finished {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
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
    conn: &mut Channel,
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
                let bytes = send_blocks(conn, name, disk, &all, &flags.cancel)
                    .map_err(|e| context(e, &format!("disk {name} ({})", disk.path().display())))?;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                set(p.record, &|r| {
                    r.bytes += bytes;
                    r.detail = format!(
                        "full pass of {} MiB ({} bytes sent, zero chunks elided) in {ms:.0} ms",
                        (disk.blocks() * BLOCK_SIZE) >> 20,
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
                let (files, bytes) = send_dir(conn, name, dir, &flags.cancel)
                    .map_err(|e| context(e, &format!("scratch {name} ({})", dir.display())))?;
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
    conn: &mut Channel,
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
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the migration ended",
            ));
        }
        let first = blocks[i];
        let mut n = 1;
        while i + n < blocks.len() && (n as u64) < CHUNK_BLOCKS && blocks[i + n] == first + n as u64
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
    conn: &mut Channel,
    name: &str,
    dir: &Path,
    cancel: &AtomicBool,
) -> io::Result<(usize, u64)> {
    let files = scratch_files(dir)?;
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for path in &files {
        if cancel.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the migration ended",
            ));
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

/// `e` with what it happened to, keeping its kind.
fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Agrees on the resource stream's version with the target (see the module docs).
fn hello(conn: &mut Channel) -> io::Result<u16> {
    write_json(
        conn,
        T_HELLO,
        &Hello {
            version: VERSION,
            min_version: MIN_VERSION,
        },
    )?;
    conn.set_read_timeout(Some(ACK_TIMEOUT))?;
    let (ty, payload) = read_frame(conn)?;
    conn.set_read_timeout(None)?;
    match ty {
        T_HELLO_ACK => {
            let ack: HelloAck = parse(&payload, "hello answer")?;
            negotiate(ack.version, ack.version)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        }
        T_ACK => {
            let ack: Ack = parse(&payload, "answer")?;
            Err(io::Error::other(format!(
                "the target refused the resource stream: {}",
                ack.error.unwrap_or_default()
            )))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the target answered the hello with frame type {other}"),
        )),
    }
}
