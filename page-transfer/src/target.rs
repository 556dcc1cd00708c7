//! The target side of a migration: accepts the source's channels, builds the VM through a
//! [`TargetFactory`], writes arriving pages (or, in post-copy, installs them and asks the
//! source for pages the guest faults on), starts the VM at switchover and confirms when every
//! page is present.

use std::collections::HashMap;
use std::net::{Shutdown, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use godwit_api::{FaultStats, MigrationPhase};

use crate::bitmap::{AtomicPageBitmap, PageMap};
use crate::channel::{Channel, ServerSecurity};
use crate::codec::PageDecoder;
use crate::digest::{zero_page_hash, PageDigests};
use crate::error::{Awaited, MigrationError};
use crate::progress::{LatencyRecorder, Progress, Stage};
use crate::protocol::{
    read_frame, read_message, write_message, Command, Message, PageKind, PagesView, ProtocolError,
    MAX_CHANNELS, MAX_RUNS, PAGE_SIZE,
};
use crate::transport;
use crate::vm::{IncomingSetup, Region, TargetFactory, TargetVm, VmAccessError};

const PAGE: u64 = PAGE_SIZE as u64;
/// Pages requested per fault: the faulting page and the missing ones after it.
const FAULT_CHUNK: u64 = 16;
/// Contiguous pages installed with one call.
const RUN_PAGES: usize = 64;

/// What the target knows and shares between its channel threads.
struct Shared {
    vm: Arc<dyn TargetVm>,
    map: PageMap,
    received: Vec<AtomicPageBitmap>,
    /// Pages written with data at least once (backed by memory; zero pages are not written).
    populated: Vec<AtomicPageBitmap>,
    requested: Vec<AtomicPageBitmap>,
    digests: Option<PageDigests>,
    postcopy: AtomicBool,
    markers: Mutex<Vec<u32>>,
    markers_changed: Condvar,
    /// The first failure of a channel thread, until the control loop takes it.
    failure: Mutex<Option<MigrationError>>,
    /// The failure is the source's cancel (its abort carried `CANCEL_REASON`).
    cancelled: AtomicBool,
    /// For waking the control loop out of its read.
    control: Mutex<Channel>,
    /// The data channels of the current connections, for closing them when post-copy pauses.
    data_channels: Mutex<Vec<Channel>>,
    /// Every message to the source goes through here, so frames never interleave.
    control_tx: Mutex<Channel>,
    pending: Mutex<HashMap<u64, Instant>>,
    pending_count: AtomicUsize,
    latency: LatencyRecorder,
    faults: AtomicU64,
    requests: AtomicU64,
    stop: AtomicBool,
    progress: Arc<Progress>,
    /// When each data channel last delivered a frame, ms since `epoch`.
    last_frame: Vec<AtomicU64>,
    epoch: Instant,
    /// How long silence from the source is tolerated.
    peer_timeout: Duration,
}

impl Shared {
    fn send(&self, msg: &Message) -> Result<(), ProtocolError> {
        let mut tx = self.control_tx.lock().unwrap_or_else(|e| e.into_inner());
        write_message(&mut *tx, msg)
    }

    /// Records the first failure of a channel thread and wakes the control loop to report it.
    fn fail(&self, error: MigrationError) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(error);
        }
        drop(f);
        self.markers_changed.notify_all();
        // Wake the control loop out of its read.
        let control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let _ = control.shutdown(Shutdown::Read);
    }

    /// Takes the recorded failure, as the error it stands for: a cancel if the source
    /// cancelled on any channel. The control loop ends with it, so it is taken once.
    fn take_failure(&self) -> Option<MigrationError> {
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        if self.cancelled.load(Ordering::Acquire) {
            Some(MigrationError::Protocol(ProtocolError::PeerCancelled))
        } else {
            Some(failure)
        }
    }

    fn received_pages(&self) -> u64 {
        self.received.iter().map(AtomicPageBitmap::count).sum()
    }

    /// Notes that data channel `slot` delivered a frame.
    fn heard(&self, slot: usize) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_frame[slot].store(now, Ordering::Relaxed);
    }

    /// A data channel that has not marked `phase` and has been silent for the peer timeout:
    /// its link stalls (the others may have finished the phase long ago).
    fn check_stalled(&self, markers: &[u32], phase: u32) -> Result<(), MigrationError> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let limit = self.peer_timeout.as_millis() as u64;
        for (slot, &marked) in markers.iter().enumerate() {
            let last = self.last_frame[slot].load(Ordering::Relaxed);
            if marked < phase && now.saturating_sub(last) > limit {
                return Err(MigrationError::Timeout {
                    awaited: Awaited::DataChannel(slot as u16 + 1),
                    after: self.peer_timeout,
                });
            }
        }
        Ok(())
    }

    /// Waits until every data channel has marked `phase` (or one stalls).
    fn wait_markers(&self, phase: u32) -> Result<(), MigrationError> {
        let mut markers = self.markers.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(e) = self.take_failure() {
                return Err(e);
            }
            if markers.iter().all(|&m| m >= phase) {
                return Ok(());
            }
            self.check_stalled(&markers, phase)?;
            markers = self
                .markers_changed
                .wait_timeout(markers, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Records pages as present and notes fault latencies.
    fn mark_received(&self, region: usize, first: u64, n: u64, data: bool) {
        if data {
            self.populated[region].set_range(first, n);
        }
        self.received[region].set_range(first, n);
        if self.pending_count.load(Ordering::Acquire) > 0 {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for p in first..first + n {
                if let Some(t) = pending.remove(&self.map.global(region, p)) {
                    self.latency.record(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            self.pending_count.store(pending.len(), Ordering::Release);
        }
    }
}

/// Contiguous pages waiting to be written with one call.
struct Run {
    region: usize,
    first: u64,
    data: Vec<u8>,
    zeros: u64,
}

impl Run {
    fn pages(&self) -> u64 {
        if self.zeros > 0 {
            self.zeros
        } else {
            (self.data.len() / PAGE_SIZE) as u64
        }
    }

    fn flush(&mut self, shared: &Shared) -> Result<(), VmAccessError> {
        let n = self.pages();
        if n == 0 {
            return Ok(());
        }
        let gpa = shared.map.gpa(self.region, self.first);
        let postcopy = shared.postcopy.load(Ordering::Acquire);
        if self.zeros > 0 {
            if postcopy {
                shared.vm.install_zero(gpa, n)?;
            } else {
                // Fresh memory is zero: only pages that held data need zeroing.
                if shared.populated[self.region].any_in_range(self.first, n) {
                    let zero = [0u8; PAGE_SIZE];
                    for p in self.first..self.first + n {
                        if shared.populated[self.region].get(p) {
                            shared.vm.write(shared.map.gpa(self.region, p), &zero)?;
                        }
                    }
                    shared.populated[self.region].clear_range(self.first, n);
                }
            }
            shared.mark_received(self.region, self.first, n, false);
        } else {
            if postcopy {
                shared.vm.install(gpa, &self.data)?;
            } else {
                shared.vm.write(gpa, &self.data)?;
            }
            shared.mark_received(self.region, self.first, n, true);
        }
        self.data.clear();
        self.zeros = 0;
        Ok(())
    }

    /// Adds a page, flushing first when it does not extend the run.
    fn push(
        &mut self,
        shared: &Shared,
        region: usize,
        page: u64,
        data: Option<&[u8]>,
    ) -> Result<(), VmAccessError> {
        let n = self.pages();
        let contiguous = n > 0 && region == self.region && page == self.first + n;
        let same_kind = (self.zeros > 0) == data.is_none();
        if n > 0 && (!contiguous || !same_kind || n as usize >= RUN_PAGES) {
            self.flush(shared)?;
        }
        if self.pages() == 0 {
            self.region = region;
            self.first = page;
        }
        match data {
            Some(d) => self.data.extend_from_slice(d),
            None => self.zeros += 1,
        }
        Ok(())
    }
}

/// Receives pages on one data channel until it closes or the migration ends.
fn receive_pages(shared: &Shared, mut stream: Channel, slot: usize) {
    let mut payload = Vec::new();
    let mut decoder = match PageDecoder::new() {
        Ok(d) => d,
        Err(source) => {
            return shared.fail(MigrationError::Codec {
                what: "decompression",
                source,
            })
        }
    };
    let mut page = [0u8; PAGE_SIZE];
    let zero_hash = zero_page_hash();
    let mut run = Run {
        region: 0,
        first: 0,
        data: Vec::with_capacity(RUN_PAGES * PAGE_SIZE),
        zeros: 0,
    };
    let channel = slot as u16 + 1;
    let on_channel = |source| MigrationError::Channel { channel, source };
    let result: Result<(), MigrationError> = (|| loop {
        let command = match read_frame(&mut stream, &mut payload) {
            Ok(c) => {
                shared.heard(slot);
                c
            }
            // The source closed the channel between frames: it sent all it meant to on it.
            // If a phase still waits for it, `check_stalled` says so after the peer timeout;
            // a source that died also closed the control channel, which ends the migration
            // at once, unless it died after a switchover that had everything: then the VM
            // runs here rather than being thrown away whole.
            Err(ProtocolError::Closed) => return Ok(()),
            Err(e) => {
                if shared.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                return Err(on_channel(e));
            }
        };
        match command {
            Command::Pages => {
                let view = PagesView::parse(&payload).map_err(on_channel)?;
                for (gpa, kind, data) in view {
                    let (region, index) =
                        shared
                            .map
                            .locate(gpa)
                            .ok_or(MigrationError::OutsideMemory {
                                what: "sent a page",
                                gpa,
                            })?;
                    let global = shared.map.global(region, index);
                    if kind == PageKind::Zero {
                        if let Some(d) = &shared.digests {
                            d.set_hash(global, zero_hash);
                        }
                        run.push(shared, region, index, None)?;
                    } else if kind == PageKind::Raw && !shared.postcopy.load(Ordering::Acquire) {
                        // Straight from the frame into guest memory: one copy instead of three.
                        if let Some(d) = &shared.digests {
                            d.set(global, data);
                        }
                        run.flush(shared)?;
                        shared.vm.write(gpa, data)?;
                        shared.mark_received(region, index, 1, true);
                    } else {
                        decoder
                            .decode(kind, data, &mut page)
                            .map_err(|source| MigrationError::BadPage { gpa, source })?;
                        if let Some(d) = &shared.digests {
                            d.set(global, &page);
                        }
                        run.push(shared, region, index, Some(&page))?;
                    }
                }
                run.flush(shared)?;
            }
            Command::Marker => {
                run.flush(shared)?;
                let phase = match Message::decode(command, &payload).map_err(on_channel)? {
                    Message::Marker { phase, .. } => phase,
                    other => return Err(on_channel(ProtocolError::unexpected("Marker", &other))),
                };
                let mut markers = shared.markers.lock().unwrap_or_else(|e| e.into_inner());
                markers[slot] = phase;
                shared.markers_changed.notify_all();
                // The last channel to finish a phase tells the source it has all of it, so the
                // source paces its rounds by what really arrived.
                if markers.iter().all(|&m| m >= phase) {
                    drop(markers);
                    let pages = shared.received_pages();
                    shared
                        .send(&Message::Marker { phase, pages })
                        .map_err(|source| MigrationError::Send {
                            command: Command::Marker,
                            source,
                        })?;
                }
            }
            Command::Abort | Command::Error => {
                return Err(
                    match Message::decode(command, &payload).map_err(on_channel)? {
                        Message::Abort { reason } if reason == crate::protocol::CANCEL_REASON => {
                            shared.cancelled.store(true, Ordering::Release);
                            MigrationError::Protocol(ProtocolError::PeerCancelled)
                        }
                        Message::Abort { reason } => MigrationError::Remote(reason),
                        Message::Error { message } => MigrationError::Remote(message),
                        other => on_channel(ProtocolError::unexpected("Abort or Error", &other)),
                    },
                );
            }
            other => {
                return Err(on_channel(ProtocolError::Unexpected {
                    expected: "Pages or Marker",
                    got: other,
                }))
            }
        }
    })();
    if let Err(e) = result {
        shared.fail(e);
    }
}

/// Post-copy: turns guest faults into page requests.
fn serve_faults(shared: &Shared) {
    let mut faults = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        faults.clear();
        if let Err(e) = shared
            .vm
            .wait_faults(&mut faults, Duration::from_millis(20))
        {
            return shared.fail(e.into());
        }
        for &gpa in &faults {
            shared.faults.fetch_add(1, Ordering::Relaxed);
            let Some((region, page)) = shared.map.locate(gpa) else {
                continue;
            };
            if shared.received[region].get(page) {
                // It arrived between the fault and now.
                if let Err(e) = shared.vm.wake(gpa & !(PAGE - 1), 1) {
                    return shared.fail(e.into());
                }
                continue;
            }
            {
                let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
                pending
                    .entry(shared.map.global(region, page))
                    .or_insert_with(Instant::now);
                shared.pending_count.store(pending.len(), Ordering::Release);
            }
            if shared.requested[region].test_and_set(page) {
                continue;
            }
            let mut n = 1;
            while n < FAULT_CHUNK
                && page + n < shared.map.pages(region)
                && !shared.received[region].get(page + n)
                && !shared.requested[region].test_and_set(page + n)
            {
                n += 1;
            }
            shared.requests.fetch_add(1, Ordering::Relaxed);
            let msg = Message::PageRequest {
                gpa: shared.map.gpa(region, page),
                pages: n as u32,
            };
            if let Err(e) = shared.send(&msg) {
                return shared.fail(MigrationError::Send {
                    command: Command::PageRequest,
                    source: e,
                });
            }
        }
    }
}

/// How the target waits for its source (see [`receive`]).
pub struct ReceiveOptions<'a> {
    /// How long the source has to open its connections.
    pub accept_timeout: Duration,
    pub security: &'a ServerSecurity,
    /// How long silence from the source is tolerated on a connection.
    pub peer_timeout: Duration,
    /// Asked about once a second while a post-copy migration waits for its source to
    /// reconnect (`postcopy-paused`): `Some(reason)` gives up, and the VM, which lacks pages
    /// only the source has, is stopped with that reason.
    pub give_up: &'a (dyn Fn() -> Option<String> + Sync),
}

impl std::fmt::Debug for ReceiveOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveOptions")
            .field("accept_timeout", &self.accept_timeout)
            .field("security", &self.security)
            .field("peer_timeout", &self.peer_timeout)
            .finish_non_exhaustive()
    }
}

/// Accepts one migration on `listener` and runs it to the end. On success the VM runs here
/// with all its pages; on failure before the VM started, it has been thrown away.
///
/// A post-copy whose connections fail after the VM started here does not end: the VM keeps
/// running (a vCPU that touches a missing page waits for it), the migration reads
/// `postcopy-paused`, and the target accepts a new set of connections for the same migration
/// on `listener`, on which the source sends [`Message::Resume`]; the target answers with the
/// pages it has, and the source sends the rest. It ends only when the source says so (Abort),
/// or `give_up` does.
pub fn receive(
    listener: &TcpListener,
    migration_id: [u8; 16],
    factory: &dyn TargetFactory,
    progress: Arc<Progress>,
    opts: &ReceiveOptions,
) -> Result<Arc<dyn TargetVm>, MigrationError> {
    let peer_timeout = opts.peer_timeout;
    let streams = transport::accept(listener, migration_id, opts.accept_timeout, opts.security)?;
    progress.update(|i| i.encrypted = streams.iter().all(Channel::is_tls));
    let (mut control, data) = split_channels(streams, peer_timeout)?;

    let (setup, verify) = match read_message(&mut control)? {
        Message::Setup {
            mode,
            verify,
            regions,
            vm,
        } => {
            if mode > 3 {
                let e = MigrationError::UnknownMode(mode);
                let _ = write_message(&mut control, &Message::error(e.to_string()));
                return Err(e);
            }
            (
                IncomingSetup {
                    postcopy_from_start: mode == 2,
                    stop_and_copy: mode == 1,
                    regions: regions
                        .into_iter()
                        .map(|(gpa, size)| Region { gpa, size })
                        .collect(),
                    config_blob: vm,
                },
                verify,
            )
        }
        other => {
            let e = ProtocolError::unexpected("Setup", &other);
            let _ = write_message(&mut control, &Message::error(e.to_string()));
            return Err(e.into());
        }
    };
    let vm = match factory.prepare(&setup) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = write_message(&mut control, &Message::error(e.to_string()));
            return Err(e.into());
        }
    };
    let map = PageMap::new(setup.regions.clone());
    progress.update(|i| i.memory_bytes = map.total_pages() * PAGE);
    let bitmaps = || -> Vec<AtomicPageBitmap> {
        (0..map.regions().len())
            .map(|i| AtomicPageBitmap::new(map.pages(i)))
            .collect()
    };
    let shared = Shared {
        vm: vm.clone(),
        received: bitmaps(),
        populated: bitmaps(),
        requested: bitmaps(),
        digests: verify.then(|| PageDigests::new(map.total_pages())),
        postcopy: AtomicBool::new(false),
        markers: Mutex::new(Vec::new()),
        markers_changed: Condvar::new(),
        failure: Mutex::new(None),
        cancelled: AtomicBool::new(false),
        control: Mutex::new(control.clone()),
        data_channels: Mutex::new(Vec::new()),
        control_tx: Mutex::new(control.clone()),
        pending: Mutex::new(HashMap::new()),
        pending_count: AtomicUsize::new(0),
        latency: LatencyRecorder::default(),
        faults: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        progress,
        last_frame: (0..MAX_CHANNELS).map(|_| AtomicU64::new(0)).collect(),
        epoch: Instant::now(),
        peer_timeout,
        map,
    };
    if setup.postcopy_from_start {
        if let Err(e) = vm.enable_postcopy() {
            let _ = write_message(&mut control, &Message::error(e.to_string()));
            vm.abort();
            return Err(e.into());
        }
        shared.postcopy.store(true, Ordering::Release);
    }
    write_message(&mut control, &Message::SetupAck)?;
    shared
        .progress
        .update(|i| i.phase = MigrationPhase::Precopy);

    let mut started = false;
    let mut connections = (control, data);
    let result = loop {
        let (control, data) = connections;
        let result = run_connections(&shared, control, data, &mut started);
        match result {
            Err(e) if started && shared.postcopy.load(Ordering::Acquire) && e.is_link_failure() => {
                match await_source(listener, migration_id, opts, &shared, &e) {
                    Ok(c) => connections = c,
                    Err(e) => break Err(e),
                }
            }
            other => break other,
        }
    };
    match result {
        Ok(()) => Ok(vm),
        Err(e) => {
            // Before the start it was discarded in run_connections. After it, only a
            // post-copy can still be missing pages; abort stops that VM rather than let it
            // read holes.
            if started && shared.postcopy.load(Ordering::Acquire) {
                vm.abort();
            }
            Err(e)
        }
    }
}

/// Channel 0 and the data channels, with the timeouts the engine runs them with.
fn split_channels(
    mut streams: Vec<Channel>,
    peer_timeout: Duration,
) -> Result<(Channel, Vec<Channel>), MigrationError> {
    let data = streams.split_off(1);
    let control = streams.pop().ok_or(MigrationError::NoChannel("control"))?;
    // The source sends a keepalive every second on the control channel: silence for the peer
    // timeout means it or the link is gone. A data channel may be quiet between phases; one
    // that stays silent while a phase waits for it is caught by `check_stalled`.
    let _ = control.set_read_timeout(Some(peer_timeout));
    for s in &data {
        let _ = s.set_read_timeout(None);
        let _ = s.set_write_timeout(Some(peer_timeout));
    }
    let _ = control.set_write_timeout(Some(peer_timeout));
    Ok((control, data))
}

/// Runs the migration over one set of connections until it ends or they fail.
fn run_connections(
    shared: &Shared,
    mut control: Channel,
    data: Vec<Channel>,
    started: &mut bool,
) -> Result<(), MigrationError> {
    *shared.control.lock().unwrap_or_else(|e| e.into_inner()) = control.clone();
    *shared.control_tx.lock().unwrap_or_else(|e| e.into_inner()) = control.clone();
    *shared
        .data_channels
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = data.clone();
    *shared.markers.lock().unwrap_or_else(|e| e.into_inner()) = vec![0; data.len()];
    let now = shared.epoch.elapsed().as_millis() as u64;
    for t in &shared.last_frame {
        t.store(now, Ordering::Relaxed);
    }
    shared
        .failure
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    shared.stop.store(false, Ordering::Release);
    std::thread::scope(|scope| {
        let data_threads: Vec<_> = data
            .into_iter()
            .enumerate()
            .map(|(slot, stream)| scope.spawn(move || receive_pages(shared, stream, slot)))
            .collect();
        let keepalive =
            scope.spawn(|| transport::send_keepalives(&shared.control_tx, &shared.stop));
        // Resumed connections serve faults from the start.
        let mut fault_thread = started.then(|| scope.spawn(move || serve_faults(shared)));
        let result = control_loop(shared, &mut control, started, &mut |shared| {
            fault_thread = Some(scope.spawn(move || serve_faults(shared)));
        });
        if let (Err(e), false) = (&result, *started) {
            // The protocol's promise to a source waiting on its switchover: an error instead
            // of Resumed means the VM did not start here and this copy is gone, so the source
            // may resume its own. Discard first, then say so.
            shared.vm.abort();
            let _ = shared.send(&Message::error(crate::error::chain(e)));
        }
        shared.stop.store(true, Ordering::Release);
        let _ = control.shutdown(Shutdown::Both);
        if result.is_err() {
            // Their threads end now rather than when the source closes them.
            for s in shared
                .data_channels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        if let Some(t) = fault_thread {
            let _ = t.join();
        }
        let _ = keepalive.join();
        // On success, data channels end when the source closes them.
        for t in data_threads {
            let _ = t.join();
        }
        result
    })
}

/// Post-copy paused: the VM runs on here and its vCPUs wait for the pages it lacks while the
/// source reconnects. Returns the new connections once the source sent Resume and got the
/// pages this side has; fails when `give_up` says so.
fn await_source(
    listener: &TcpListener,
    migration_id: [u8; 16],
    opts: &ReceiveOptions,
    shared: &Shared,
    cause: &MigrationError,
) -> Result<(Channel, Vec<Channel>), MigrationError> {
    let why = crate::error::chain(cause);
    shared.progress.update(|i| {
        i.phase = MigrationPhase::PostcopyPaused;
        i.error = Some(format!(
            "post-copy paused: {why}; waiting for the source to reconnect"
        ));
        i.postcopy_pauses += 1;
    });
    // Requests in flight on the old connections are lost: ask again once resumed.
    for (region, requested) in shared.requested.iter().enumerate() {
        let received = shared.received[region].snapshot();
        for page in 0..received.pages() {
            if !received.get(page) {
                requested.clear(page);
            }
        }
    }
    let mut asked = Instant::now();
    loop {
        let streams = transport::accept_until(listener, migration_id, opts.security, &mut || {
            if asked.elapsed() < Duration::from_secs(1) {
                return Ok(());
            }
            asked = Instant::now();
            match (opts.give_up)() {
                Some(reason) => Err(MigrationError::GaveUp {
                    reason,
                    cause: why.clone(),
                }),
                None => Ok(()),
            }
        })?;
        let (mut control, data) = split_channels(streams, opts.peer_timeout)?;
        // A source that fails between its connections and its Resume tries again.
        match read_message(&mut control) {
            Ok(Message::Resume) => {}
            Ok(other) => {
                let e = ProtocolError::unexpected("Resume", &other);
                let _ = write_message(&mut control, &Message::error(e.to_string()));
                continue;
            }
            Err(_) => continue,
        }
        if send_present(shared, &mut control).is_err() {
            continue;
        }
        shared.progress.update(|i| {
            i.phase = MigrationPhase::Postcopy;
            i.error = None;
        });
        // The faults waiting since the pause are asked for again on the new connections
        // (their requests may have been lost with the old ones).
        let pending: Vec<u64> = shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        for global in pending {
            let (region, page) = shared.map.from_global(global);
            if !shared.received[region].get(page) && !shared.requested[region].test_and_set(page) {
                let msg = Message::PageRequest {
                    gpa: shared.map.gpa(region, page),
                    pages: 1,
                };
                let mut c = &control;
                if write_message(&mut c, &msg).is_err() {
                    break;
                }
                shared.requests.fetch_add(1, Ordering::Relaxed);
            }
        }
        return Ok((control, data));
    }
}

/// Answers Resume: the pages this side has, as runs, `MAX_RUNS` to a message.
fn send_present(shared: &Shared, control: &mut Channel) -> Result<(), ProtocolError> {
    let mut runs = Vec::new();
    for (region, received) in shared.received.iter().enumerate() {
        for (first, n) in received.snapshot().runs(u64::from(u32::MAX)) {
            runs.push((shared.map.gpa(region, first), n as u32));
        }
    }
    let mut chunks = runs.chunks(MAX_RUNS).peekable();
    if chunks.peek().is_none() {
        return write_message(
            control,
            &Message::Present {
                last: true,
                runs: Vec::new(),
            },
        );
    }
    while let Some(chunk) = chunks.next() {
        write_message(
            control,
            &Message::Present {
                last: chunks.peek().is_none(),
                runs: chunk.to_vec(),
            },
        )?;
    }
    Ok(())
}

fn control_loop<'s>(
    shared: &'s Shared,
    control: &mut Channel,
    started: &mut bool,
    spawn_fault_thread: &mut dyn FnMut(&'s Shared),
) -> Result<(), MigrationError> {
    let total_pages = shared.map.total_pages();
    let mut state: Option<Vec<u8>> = None;
    let mut discards: Vec<(u64, u32)> = Vec::new();
    loop {
        let msg = match read_message(control) {
            Ok(m) => m,
            Err(e) => {
                if let Some(failure) = shared.take_failure() {
                    return Err(failure);
                }
                return Err(if e.is_timeout() {
                    MigrationError::Timeout {
                        awaited: Awaited::Silence("source"),
                        after: shared.peer_timeout,
                    }
                } else {
                    MigrationError::ControlBroke {
                        peer: "source",
                        source: Some(e),
                    }
                });
            }
        };
        match msg {
            Message::Keepalive => {
                let markers = shared.markers.lock().unwrap_or_else(|e| e.into_inner());
                let ahead = markers.iter().copied().max().unwrap_or(0);
                shared.check_stalled(&markers, ahead)?;
            }
            Message::State { blob } => state = Some(blob),
            Message::Discard { runs } => {
                if discards.len() + runs.len() > total_pages as usize {
                    return Err(MigrationError::TooManyDiscards { pages: total_pages });
                }
                discards.extend(runs);
            }
            Message::Switchover {
                postcopy,
                markers_phase,
                digest,
            } => {
                shared.wait_markers(markers_phase)?;
                let blob = state.take().ok_or(ProtocolError::Unexpected {
                    expected: "State",
                    got: Command::Switchover,
                })?;
                if postcopy {
                    enter_postcopy(shared, &discards)?;
                } else {
                    let have = shared.received_pages();
                    if have != total_pages {
                        return Err(MigrationError::SwitchoverIncomplete {
                            received: have,
                            total: total_pages,
                        });
                    }
                    // What arrived is what the source's paused memory holds, or the guest
                    // does not run here.
                    if let (Some(d), false) = (&shared.digests, digest.is_empty()) {
                        let ours = d.finish();
                        if ours != digest {
                            return Err(MigrationError::DigestMismatch {
                                source_digest: digest,
                                target_digest: ours,
                            });
                        }
                    }
                }
                shared.vm.start(&blob)?;
                *started = true;
                shared.send(&Message::Resumed)?;
                shared.progress.update(|i| {
                    i.phase = if postcopy {
                        MigrationPhase::Postcopy
                    } else {
                        MigrationPhase::Completing
                    }
                });
                if postcopy {
                    spawn_fault_thread(shared);
                }
            }
            Message::AllSent { phase } => {
                shared.wait_markers(phase)?;
                let have = shared.received_pages();
                if have != total_pages {
                    return Err(MigrationError::PagesMissing {
                        missing: total_pages - have,
                        total: total_pages,
                    });
                }
                shared.stop.store(true, Ordering::Release);
                if shared.postcopy.load(Ordering::Acquire) {
                    shared.vm.finish_postcopy()?;
                }
                let digest = shared
                    .digests
                    .as_ref()
                    .map(PageDigests::finish)
                    .unwrap_or_default();
                let mut stats = FaultStats {
                    faults: shared.faults.load(Ordering::Relaxed),
                    requests: shared.requests.load(Ordering::Relaxed),
                    ..FaultStats::default()
                };
                shared.latency.fill(&mut stats);
                let report = serde_json::to_string(&stats).unwrap_or_default();
                shared.progress.update(|i| {
                    i.faults = stats.clone();
                    i.target_digest = Some(digest.clone());
                });
                shared.send(&Message::Done { digest, report })?;
                return Ok(());
            }
            Message::Abort { reason } if reason == crate::protocol::CANCEL_REASON => {
                return Err(MigrationError::Protocol(ProtocolError::PeerCancelled))
            }
            Message::Abort { reason } => return Err(MigrationError::Remote(reason)),
            Message::Error { message } => return Err(MigrationError::Remote(message)),
            other => {
                let e = ProtocolError::unexpected("a control message", &other);
                let _ = shared.send(&Message::error(e.to_string()));
                return Err(e.into());
            }
        }
        shared.progress.wire(Stage::Precopy, 0);
    }
}

/// Drops stale pages and registers memory for faults; pages known to be zero but never
/// written get zero pages so they do not fault.
fn enter_postcopy(shared: &Shared, discards: &[(u64, u32)]) -> Result<(), MigrationError> {
    for &(gpa, pages) in discards {
        let Some((region, first)) = shared.map.locate(gpa) else {
            return Err(MigrationError::OutsideMemory {
                what: "discarded pages",
                gpa,
            });
        };
        let n = u64::from(pages).min(shared.map.pages(region) - first);
        shared.vm.discard(gpa, n)?;
        for p in first..first + n {
            shared.received[region].clear(p);
            shared.populated[region].clear(p);
        }
    }
    if !shared.postcopy.load(Ordering::Acquire) {
        shared.vm.enable_postcopy()?;
        // Prefaulted memory has every page present already: nothing to zero-fill.
        let regions = if shared.vm.prepopulated() {
            0
        } else {
            shared.map.regions().len()
        };
        for region in 0..regions {
            let received = shared.received[region].snapshot();
            let populated = shared.populated[region].snapshot();
            let mut zero_only = crate::bitmap::PageBitmap::new(received.pages());
            for p in 0..received.pages() {
                if received.get(p) && !populated.get(p) {
                    zero_only.set(p);
                }
            }
            for (first, n) in zero_only.runs(u64::from(u32::MAX)) {
                shared.vm.install_zero(shared.map.gpa(region, first), n)?;
            }
        }
        shared.postcopy.store(true, Ordering::Release);
    }
    Ok(())
}
