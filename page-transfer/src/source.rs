//! The source side of a migration: stop-and-copy, pre-copy, post-copy and auto.
//!
//! The caller gives a VM (through [`SourceVm`]), the target's migration address and a config;
//! [`migrate`] returns when the VM runs on the target with every page there (then the caller
//! frees its copy), or with an error. Before switchover an error leaves the VM running here;
//! after switchover the VM belongs to the target and is never resumed here.

use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use godwit_api::{MigrationMode, MigrationPhase};

use crate::bitmap::{AtomicPageBitmap, PageBitmap, PageMap};
use crate::channel::{Channel, ClientSecurity};
use crate::codec::{Compression, PageEncoder};
use crate::digest::PageDigests;
use crate::error::{Awaited, MigrationError};
use crate::limiter::Limiter;
use crate::progress::{Progress, Stage};
use crate::protocol::{
    read_message, write_message, Command, Message, PageKind, PagesWriter, ProtocolError, MAX_RUNS,
    PAGE_SIZE,
};
use crate::transport::{self, CONTROL, FIRST_BULK, URGENT};
use crate::vm::{SourceVm, VmAccessError};

const PAGE: u64 = PAGE_SIZE as u64;
/// Pages read from guest memory at once by a sender.
const CHUNK_PAGES: u64 = 64;
/// A page batch is flushed at this many pages.
const BATCH_PAGES: usize = 256;
/// Downtime spent outside the last pages (pause, state, start on the target), measured at
/// 2-5 ms here; pre-copy stops only when the remaining pages fit the rest of the target.
const SWITCHOVER_OVERHEAD: Duration = Duration::from_millis(4);
/// Auto switches to post-copy when a round keeps at least this share of the previous one.
const NOT_SHRINKING: f64 = 0.9;
/// How long a converged pre-copy waits between rounds for the VM's other data to catch up.
const READY_POLL: Duration = Duration::from_millis(20);
/// What the target may send on the control channel once the setup is done.
const CONTROL_MESSAGES: &str = "Marker, PageRequest, Resumed or Done";

/// How to migrate.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub mode: MigrationMode,
    /// Longest acceptable pause (pre-copy convergence target).
    pub downtime: Duration,
    /// Bandwidth cap, bytes/s; None = unlimited.
    pub bandwidth: Option<u64>,
    /// Bulk channels.
    pub channels: u16,
    pub compression: Compression,
    /// Pre-copy rounds after the full pass before giving up.
    pub max_rounds: u32,
    pub precopy_timeout: Duration,
    /// Hash every page on both sides and compare.
    pub verify: bool,
    pub migration_id: [u8; 16],
    pub connect_timeout: Duration,
    /// How long silence from the target is tolerated: no keepalive on the control channel, or
    /// a write that makes no progress ([`crate::vm::DEFAULT_PEER_TIMEOUT`] by default).
    pub peer_timeout: Duration,
    /// How the channels are secured (mutual TLS, or plain TCP).
    pub security: ClientSecurity,
}

/// Control messages the reader thread passes on.
enum Event {
    Resumed,
    Done {
        digest: String,
        report: String,
    },
    Remote(String),
    /// A message the target should not send on the control channel.
    Unexpected(Command),
    Closed(ProtocolError),
    /// Nothing, not even a keepalive, came for the peer timeout.
    Silent,
}

/// The events a wait returns; the others end it with an error.
enum Reply {
    Resumed,
    Done { digest: String, report: String },
}

struct Source<'a> {
    vm: &'a dyn SourceVm,
    cfg: &'a SourceConfig,
    progress: &'a Progress,
    cancel: &'a AtomicBool,
    map: PageMap,
    limiter: Limiter,
    /// Shared with the keepalive thread.
    control: Arc<Mutex<Channel>>,
    urgent: Channel,
    bulk: Vec<Channel>,
    events: Mutex<Receiver<Event>>,
    requests: Mutex<Receiver<(u64, u32)>>,
    /// The last phase the target has wholly applied (it acknowledges each).
    applied: Arc<(Mutex<u32>, Condvar)>,
    phase: u32,
    paused_at: Option<Instant>,
    /// The switchover went out: the VM belongs to the target, cancel no longer applies.
    switched: AtomicBool,
    /// The VM runs on the target and the post-copy push is on: a failure of the connections
    /// pauses the migration rather than end it (see [`resume_postcopy`]).
    in_postcopy: bool,
    /// With verification: the hash of every page as last sent, so at the switchover the
    /// digest of the paused memory (every page has been sent since it was last written).
    sent: Option<PageDigests>,
    zero_hash: u64,
}

/// Migrates `vm` to the target agent's migration listener at `addr`.
pub fn migrate(
    vm: &dyn SourceVm,
    addr: &str,
    cfg: &SourceConfig,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<(), MigrationError> {
    let regions = vm.regions();
    let map = PageMap::new(regions.clone());
    progress.update(|i| i.memory_bytes = map.total_pages() * PAGE);
    progress.set_remaining_pages(map.total_pages());

    let mut connections = Connections::open(addr, cfg)?;
    progress.update(|i| i.encrypted = connections.all().all(Channel::is_tls));
    let control = &mut connections.control;
    write_message(
        control,
        &Message::Setup {
            mode: mode_code(cfg.mode),
            verify: cfg.verify,
            regions: regions.iter().map(|r| (r.gpa, r.size)).collect(),
            vm: vm.config_blob(),
        },
    )
    .map_err(MigrationError::channel(CONTROL))?;
    match read_message(control).map_err(MigrationError::channel(CONTROL))? {
        Message::SetupAck => {}
        Message::Error { message } | Message::Abort { reason: message } => {
            return Err(MigrationError::Remote(message))
        }
        other => {
            return Err(MigrationError::channel(CONTROL)(ProtocolError::unexpected(
                "SetupAck", &other,
            )))
        }
    }
    progress.update(|i| i.setup_ms = progress.elapsed_ms());
    // Post-copy sends no switchover digest: nothing to fold.
    let sent = (cfg.verify && cfg.mode != MigrationMode::Postcopy)
        .then(|| PageDigests::new(map.total_pages()));
    drive(
        vm,
        cfg,
        progress,
        cancel,
        map,
        connections,
        sent,
        false,
        |s| s.run(),
    )
}

/// Resumes a post-copy migration whose connections failed (`postcopy-paused`), with the VM
/// paused here since its switchover: opens new connections to the target's migration
/// listener at `addr`, sends Resume, and on the target's answer (the pages it has) pushes the
/// rest while serving its faults first, then completes as [`migrate`] does. A failed try
/// leaves the migration paused on both sides (when the connections failed again, see
/// [`MigrationError::is_link_failure`]) and may be tried again.
pub fn resume_postcopy(
    vm: &dyn SourceVm,
    addr: &str,
    cfg: &SourceConfig,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<(), MigrationError> {
    let map = PageMap::new(vm.regions());
    let mut connections = Connections::open(addr, cfg)?;
    let control = &mut connections.control;
    write_message(control, &Message::Resume).map_err(MigrationError::channel(CONTROL))?;
    let mut missing = (0..map.regions().len())
        .map(|i| PageBitmap::full(map.pages(i)))
        .collect::<Vec<_>>();
    loop {
        match read_message(control).map_err(MigrationError::channel(CONTROL))? {
            Message::Present { last, runs } => {
                for (gpa, pages) in runs {
                    let Some((region, first)) = map.locate(gpa) else {
                        return Err(MigrationError::OutsideMemory {
                            what: "has pages",
                            gpa,
                        });
                    };
                    let n = u64::from(pages).min(map.pages(region) - first);
                    missing[region].clear_range(first, n);
                }
                if last {
                    break;
                }
            }
            Message::Error { message } | Message::Abort { reason: message } => {
                return Err(MigrationError::Remote(message))
            }
            other => {
                return Err(MigrationError::channel(CONTROL)(ProtocolError::unexpected(
                    "Present", &other,
                )))
            }
        }
    }
    progress.update(|i| {
        i.phase = MigrationPhase::Postcopy;
        i.error = None;
    });
    drive(
        vm,
        cfg,
        progress,
        cancel,
        map,
        connections,
        None,
        true,
        |s| s.postcopy_push(missing),
    )
}

/// One set of a migration's connections, handshaken.
struct Connections {
    control: Channel,
    urgent: Channel,
    bulk: Vec<Channel>,
}

impl Connections {
    /// Opens, secures and handshakes every channel to the target at `addr`.
    fn open(addr: &str, cfg: &SourceConfig) -> Result<Connections, MigrationError> {
        let mut streams = transport::connect(
            addr,
            cfg.migration_id,
            cfg.channels,
            cfg.connect_timeout,
            &cfg.security,
        )?;
        let bulk = streams.split_off(FIRST_BULK as usize);
        let urgent = streams.pop().ok_or(MigrationError::NoChannel("urgent"))?;
        let control = streams.pop().ok_or(MigrationError::NoChannel("control"))?;
        Ok(Connections {
            control,
            urgent,
            bulk,
        })
    }

    fn all(&self) -> impl Iterator<Item = &Channel> {
        std::iter::once(&self.control)
            .chain([&self.urgent])
            .chain(&self.bulk)
    }
}

/// Runs `body` over `connections` with the keepalive and control reader threads around it,
/// then recovers from its failure (see [`Source::recover`]) and closes the connections.
#[allow(clippy::too_many_arguments)]
fn drive(
    vm: &dyn SourceVm,
    cfg: &SourceConfig,
    progress: &Progress,
    cancel: &AtomicBool,
    map: PageMap,
    connections: Connections,
    sent: Option<PageDigests>,
    switched: bool,
    body: impl FnOnce(&mut Source) -> Result<(), MigrationError>,
) -> Result<(), MigrationError> {
    // From here on the target sends a keepalive every second: silence for the peer timeout
    // means it or the link is gone. A write that makes no progress for as long fails too.
    let _ = connections.control.set_read_timeout(Some(cfg.peer_timeout));
    for s in connections.all() {
        let _ = s.set_write_timeout(Some(cfg.peer_timeout));
    }
    let Connections {
        control,
        urgent,
        bulk,
    } = connections;
    let control = Arc::new(Mutex::new(control));
    let keepalive_stop = Arc::new(AtomicBool::new(false));
    let keepalive = {
        let (control, stop) = (control.clone(), keepalive_stop.clone());
        std::thread::Builder::new()
            .name("migrate-keepalive".into())
            .spawn(move || transport::send_keepalives(&control, &stop))
            .map_err(MigrationError::Spawn)?
    };

    let (event_tx, events) = mpsc::channel();
    let (request_tx, requests) = mpsc::channel();
    let reader = control.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let applied = Arc::new((Mutex::new(0u32), Condvar::new()));
    let reader_applied = applied.clone();
    let reader_thread = std::thread::Builder::new()
        .name("migrate-ctl".into())
        .spawn(move || read_control(reader, event_tx, request_tx, reader_applied))
        .map_err(MigrationError::Spawn)?;

    let mut source = Source {
        vm,
        cfg,
        progress,
        cancel,
        map,
        sent,
        zero_hash: crate::digest::zero_page_hash(),
        limiter: Limiter::new(cfg.bandwidth),
        control,
        urgent,
        bulk,
        events: Mutex::new(events),
        requests: Mutex::new(requests),
        applied,
        phase: 0,
        paused_at: None,
        switched: AtomicBool::new(switched),
        in_postcopy: switched,
    };
    let result = body(&mut source).map_err(|e| source.explain(e));
    if let Err(e) = &result {
        source.recover(e);
    }
    // Closing the sockets ends the reader and keepalive threads.
    keepalive_stop.store(true, Ordering::Release);
    if let Ok(c) = source.control.lock() {
        let _ = c.shutdown(Shutdown::Both);
    }
    for s in std::iter::once(&source.urgent).chain(&source.bulk) {
        let _ = s.shutdown(Shutdown::Both);
    }
    let _ = reader_thread.join();
    let _ = keepalive.join();
    result
}

fn mode_code(mode: MigrationMode) -> u8 {
    match mode {
        MigrationMode::Precopy => 0,
        MigrationMode::StopAndCopy => 1,
        MigrationMode::Postcopy => 2,
        MigrationMode::Auto => 3,
    }
}

fn read_control(
    mut s: Channel,
    events: Sender<Event>,
    requests: Sender<(u64, u32)>,
    applied: Arc<(Mutex<u32>, Condvar)>,
) {
    loop {
        let event = match read_message(&mut s) {
            Ok(Message::Marker { phase, .. }) => {
                let (lock, changed) = &*applied;
                let mut a = lock.lock().unwrap_or_else(|e| e.into_inner());
                *a = (*a).max(phase);
                changed.notify_all();
                continue;
            }
            Ok(Message::Resumed) => Event::Resumed,
            Ok(Message::PageRequest { gpa, pages }) => {
                let _ = requests.send((gpa, pages));
                continue;
            }
            Ok(Message::Done { digest, report }) => Event::Done { digest, report },
            Ok(Message::Keepalive) => continue,
            Ok(Message::Error { message }) => Event::Remote(message),
            Ok(Message::Abort { reason }) => Event::Remote(reason),
            Ok(other) => Event::Unexpected(other.command()),
            Err(e) if e.is_timeout() => Event::Silent,
            Err(e) => Event::Closed(e),
        };
        let stop = matches!(
            event,
            Event::Closed(_)
                | Event::Silent
                | Event::Remote(_)
                | Event::Unexpected(_)
                | Event::Done { .. }
        );
        if events.send(event).is_err() || stop {
            return;
        }
    }
}

impl Source<'_> {
    fn run(&mut self) -> Result<(), MigrationError> {
        match self.cfg.mode {
            MigrationMode::StopAndCopy => self.stop_and_copy(),
            MigrationMode::Precopy | MigrationMode::Auto => self.precopy(),
            MigrationMode::Postcopy => self.postcopy(),
        }
    }

    /// A cancel counts only before the switchover; after it the VM is the target's.
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) && !self.switched.load(Ordering::Acquire)
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        // A target that gave up says so on the control channel.
        match self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_recv()
        {
            Ok(Event::Remote(m)) => Err(MigrationError::Remote(m)),
            Ok(Event::Unexpected(got)) => Err(out_of_order(CONTROL_MESSAGES, got)),
            Ok(Event::Closed(e)) => Err(control_broke(Some(e))),
            Ok(Event::Silent) => Err(self.silent()),
            Err(TryRecvError::Disconnected) => Err(control_broke(None)),
            _ => Ok(()),
        }
    }

    fn silent(&self) -> MigrationError {
        MigrationError::Timeout {
            awaited: Awaited::Silence("target"),
            after: self.cfg.peer_timeout,
        }
    }

    fn all_pages(&self) -> Vec<PageBitmap> {
        (0..self.map.regions().len())
            .map(|i| PageBitmap::full(self.map.pages(i)))
            .collect()
    }

    fn pause(&mut self) -> Result<(), MigrationError> {
        self.vm.before_pause()?;
        let t = Instant::now();
        self.paused_at = Some(t);
        self.vm.pause()?;
        let ms = ms(t);
        self.progress.update(|i| {
            i.phase = MigrationPhase::StopAndCopy;
            i.downtime.pause_ms = ms;
        });
        Ok(())
    }

    fn send_control(&self, msg: &Message) -> Result<(), MigrationError> {
        let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = Vec::new();
        msg.encode(&mut buf)?;
        self.progress.wire(Stage::Downtime, buf.len());
        crate::protocol::write_frame(&mut *c, &buf).map_err(|source| MigrationError::Send {
            command: msg.command(),
            source,
        })
    }

    /// Sends the state and the switchover, then waits for the target to run the VM.
    fn switchover(&mut self, postcopy: bool, markers_phase: u32) -> Result<(), MigrationError> {
        let t = Instant::now();
        let state = self.vm.save_state()?;
        // Every page has been sent since it was last written, so this is the digest of the
        // paused memory; the target checks what it received against it before it starts.
        let digest = match &self.sent {
            Some(sent) if !postcopy => sent.finish(),
            _ => String::new(),
        };
        self.send_control(&Message::State { blob: state })?;
        self.send_control(&Message::Switchover {
            postcopy,
            markers_phase,
            digest,
        })?;
        // From here on the VM belongs to the target: never resume it here, unless the target
        // says it did not start it.
        self.switched.store(true, Ordering::Release);
        self.progress.mark_switched();
        let state_ms = ms(t);
        let t = Instant::now();
        match self.wait_event() {
            Ok(Reply::Resumed) => {}
            Ok(Reply::Done { .. }) => return Err(out_of_order("Resumed", Command::Done)),
            Err(MigrationError::Remote(message)) => {
                // An answer other than Resumed: the target did not start the VM and has
                // dropped its copy (the protocol's promise), so the VM is ours to resume.
                self.switched.store(false, Ordering::Release);
                self.progress.switch_refused();
                return Err(MigrationError::SwitchoverRefused(message));
            }
            // No answer, or a broken link: whether the target runs the VM is unknown, so it
            // stays paused here.
            Err(e) => return Err(e),
        }
        let resume_ms = ms(t);
        self.vm.target_running();
        let downtime = self.paused_at.map(ms).unwrap_or(0.0);
        self.progress.update(|i| {
            i.downtime.state_ms = state_ms;
            i.downtime.target_resume_ms = resume_ms;
            i.downtime_ms = Some(downtime);
            i.phase = if postcopy {
                MigrationPhase::Postcopy
            } else {
                MigrationPhase::Completing
            };
        });
        Ok(())
    }

    /// Waits for the next control event; Done and Resumed are returned, anything else is an
    /// error. It waits as long as the target keeps sending keepalives: a target that goes
    /// silent ends the wait after the peer timeout.
    fn wait_event(&self) -> Result<Reply, MigrationError> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        match events.recv() {
            Ok(Event::Remote(m)) => Err(MigrationError::Remote(m)),
            Ok(Event::Unexpected(got)) => Err(out_of_order(CONTROL_MESSAGES, got)),
            Ok(Event::Closed(e)) => Err(control_broke(Some(e))),
            Ok(Event::Silent) => Err(self.silent()),
            Ok(Event::Resumed) => Ok(Reply::Resumed),
            Ok(Event::Done { digest, report }) => Ok(Reply::Done { digest, report }),
            Err(_) => Err(control_broke(None)),
        }
    }

    /// Waits until the target has applied every page of `phase`.
    fn wait_applied(&self, phase: u32) -> Result<(), MigrationError> {
        // As long as it takes while the target keeps sending keepalives (a large round over a
        // capped link takes minutes); a target that stops, or a data channel it finds silent,
        // ends the wait through the control events.
        let (lock, changed) = &*self.applied;
        let mut a = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *a < phase {
            drop(a);
            self.check_cancel()?;
            a = lock.lock().unwrap_or_else(|e| e.into_inner());
            a = changed
                .wait_timeout(a, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Tells the target everything is sent and waits for its confirmation and digest.
    fn complete(&mut self, phase: u32) -> Result<(), MigrationError> {
        self.send_control(&Message::AllSent { phase })?;
        self.progress
            .update(|i| i.phase = MigrationPhase::Completing);
        let (digest, report) = loop {
            match self.wait_event()? {
                Reply::Done { digest, report } => break (digest, report),
                Reply::Resumed => continue,
            }
        };
        let total = self.progress.elapsed_ms();
        if let Ok(faults) = serde_json::from_str(&report) {
            self.progress.update(|i| i.faults = faults);
        }
        self.progress.update(|i| i.total_ms = total);
        if self.cfg.verify {
            let ours = PageDigests::of_source(self.vm, &self.map)?.finish();
            self.progress.update(|i| {
                i.source_digest = Some(ours.clone());
                i.target_digest = Some(digest.clone());
            });
            if ours != digest {
                return Err(MigrationError::DigestMismatch {
                    source_digest: ours,
                    target_digest: digest,
                });
            }
        }
        Ok(())
    }

    fn stop_and_copy(&mut self) -> Result<(), MigrationError> {
        self.check_cancel()?;
        self.pause()?;
        let t = Instant::now();
        self.phase = 1;
        let all = self.all_pages();
        self.send_pages(&all, Stage::Downtime, None)?;
        let final_ms = ms(t);
        self.progress
            .update(|i| i.downtime.final_pages_ms = final_ms);
        self.switchover(false, self.phase)?;
        self.complete(self.phase)
    }

    fn precopy(&mut self) -> Result<(), MigrationError> {
        let started = Instant::now();
        self.vm.start_dirty_tracking()?;
        self.progress.update(|i| i.phase = MigrationPhase::Precopy);
        // Round 1: everything.
        self.phase = 1;
        let mut round_start = Instant::now();
        let mut wire_before = self.progress.wire_bytes();
        let all = self.all_pages();
        let mut pages_sent = self.send_pages(&all, Stage::Precopy, None)?;
        self.wait_applied(self.phase)?;
        self.progress.update(|i| i.rounds = 1);
        let mut previous_dirty: Option<u64> = None;
        let mut stalled_rounds = 0;
        loop {
            self.check_cancel()?;
            let round_time = round_start.elapsed().as_secs_f64().max(1e-6);
            let round_wire = (self.progress.wire_bytes() - wire_before) as f64;
            let dirty = self.vm.harvest_dirty()?;
            let n: u64 = dirty.iter().map(PageBitmap::count).sum();
            let mut bandwidth = round_wire / round_time;
            if let Some(cap) = self.cfg.bandwidth {
                bandwidth = bandwidth.min(cap as f64);
            }
            let dirty_rate = n as f64 * PAGE as f64 / round_time;
            // What one dirty page costs to move. The full pass is mostly zero pages, which cost
            // next to nothing and say little about dirty ones; later rounds are dirty pages,
            // measured end to end (read, compress, send, applied on the target).
            let per_page_s = if self.phase == 1 {
                (PAGE as f64 / bandwidth.max(1.0)).max(round_time / pages_sent.max(1) as f64)
            } else {
                round_time / pages_sent.max(1) as f64
            };
            let predicted = Duration::from_secs_f64(n as f64 * per_page_s);
            // Pausing, sending the state and starting the VM on the target cost a few ms too.
            let budget = self.cfg.downtime.saturating_sub(SWITCHOVER_OVERHEAD);
            let rounds = self.phase;
            self.progress.set_remaining_pages(n);
            self.progress.update(|i| {
                i.rounds = rounds;
                i.dirty_rate_bytes_s = dirty_rate;
            });
            // Memory has converged but the VM's other data (a mirrored disk) has not: keep
            // resending dirty pages, without counting these rounds against convergence.
            let waiting = predicted <= budget;
            if waiting && self.vm.ready_to_stop() {
                return self.precopy_finish(dirty);
            }
            if waiting && started.elapsed() < self.cfg.precopy_timeout {
                std::thread::sleep(READY_POLL);
                self.phase += 1;
                round_start = Instant::now();
                wire_before = self.progress.wire_bytes();
                pages_sent = self.send_pages(&dirty, Stage::Precopy, None)?;
                self.wait_applied(self.phase)?;
                continue;
            }
            if previous_dirty.is_some_and(|p| n as f64 >= p as f64 * NOT_SHRINKING) {
                stalled_rounds += 1;
            } else {
                stalled_rounds = 0;
            }
            previous_dirty = Some(n);
            let out_of_rounds = self.phase > self.cfg.max_rounds;
            let out_of_time = started.elapsed() >= self.cfg.precopy_timeout;
            let hopeless = dirty_rate >= bandwidth && self.phase >= 2;
            if self.cfg.mode == MigrationMode::Auto
                && (stalled_rounds >= 2 || hopeless || out_of_rounds || out_of_time)
            {
                return self.switch_to_postcopy(dirty);
            }
            if out_of_rounds || out_of_time {
                return Err(MigrationError::NotConverged {
                    rounds: self.phase,
                    elapsed: started.elapsed(),
                    dirty_rate,
                    remaining_pages: n,
                    predicted,
                    downtime: self.cfg.downtime,
                    bandwidth,
                });
            }
            self.phase += 1;
            round_start = Instant::now();
            wire_before = self.progress.wire_bytes();
            pages_sent = self.send_pages(&dirty, Stage::Precopy, None)?;
            self.wait_applied(self.phase)?;
        }
    }

    fn precopy_finish(&mut self, mut dirty: Vec<PageBitmap>) -> Result<(), MigrationError> {
        self.check_cancel()?;
        self.pause()?;
        let t = Instant::now();
        let last = self.vm.harvest_dirty()?;
        self.vm.stop_dirty_tracking();
        for (d, l) in dirty.iter_mut().zip(&last) {
            d.union(l);
        }
        self.phase += 1;
        self.send_pages(&dirty, Stage::Downtime, None)?;
        let final_ms = ms(t);
        self.progress
            .update(|i| i.downtime.final_pages_ms = final_ms);
        self.switchover(false, self.phase)?;
        self.complete(self.phase)
    }

    /// Auto: pre-copy is not converging. Pause, tell the target which pages are stale, run
    /// the VM there and push the stale pages while serving faults.
    fn switch_to_postcopy(&mut self, mut dirty: Vec<PageBitmap>) -> Result<(), MigrationError> {
        self.check_cancel()?;
        self.pause()?;
        let last = self.vm.harvest_dirty()?;
        self.vm.stop_dirty_tracking();
        for (d, l) in dirty.iter_mut().zip(&last) {
            d.union(l);
        }
        self.progress.update(|i| i.switched_to_postcopy = true);
        let mut runs = Vec::new();
        for (region, bitmap) in dirty.iter().enumerate() {
            for (page, n) in bitmap.runs(u64::from(u32::MAX)) {
                runs.push((self.map.gpa(region, page), n as u32));
            }
        }
        for chunk in runs.chunks(MAX_RUNS) {
            self.send_control(&Message::Discard {
                runs: chunk.to_vec(),
            })?;
        }
        let precopy_phase = self.phase;
        self.switchover(true, precopy_phase)?;
        self.postcopy_push(dirty)
    }

    fn postcopy(&mut self) -> Result<(), MigrationError> {
        self.check_cancel()?;
        self.pause()?;
        self.switchover(true, 0)?;
        let all = self.all_pages();
        self.postcopy_push(all)
    }

    /// Pushes `pages` on the bulk channels while the urgent channel serves the target's
    /// fault requests first.
    fn postcopy_push(&mut self, pages: Vec<PageBitmap>) -> Result<(), MigrationError> {
        self.in_postcopy = true;
        self.phase += 1;
        let total: u64 = pages.iter().map(PageBitmap::count).sum();
        self.progress.set_remaining_pages(total);
        let sent: Vec<AtomicPageBitmap> = (0..self.map.regions().len())
            .map(|i| AtomicPageBitmap::new(self.map.pages(i)))
            .collect();
        let bulk_done = AtomicBool::new(false);
        let phase = self.phase;
        let urgent_result = std::thread::scope(|scope| {
            let urgent = scope.spawn(|| self.serve_requests(phase, &sent, &bulk_done));
            let bulk = self.send_pages_inner(&pages, Stage::Postcopy, Some(&sent));
            bulk_done.store(true, Ordering::Release);
            let urgent = urgent
                .join()
                .unwrap_or(Err(MigrationError::Panicked("urgent sender")));
            bulk.and(urgent)
        });
        urgent_result?;
        self.complete(phase)
    }

    /// The urgent channel: answers page requests until the bulk push is over, then marks the
    /// phase on its channel.
    fn serve_requests(
        &self,
        phase: u32,
        sent: &[AtomicPageBitmap],
        bulk_done: &AtomicBool,
    ) -> Result<(), MigrationError> {
        let mut stream = &self.urgent;
        let requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let mut encoder = self.encoder()?;
        let mut writer = PagesWriter::new();
        let mut buf = vec![0u8; (CHUNK_PAGES * PAGE) as usize];
        let mut count = 0u64;
        loop {
            let (gpa, pages) = match requests.recv_timeout(Duration::from_millis(5)) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    if bulk_done.load(Ordering::Acquire) {
                        break;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let Some((region, first)) = self.map.locate(gpa) else {
                continue;
            };
            let n = u64::from(pages)
                .min(CHUNK_PAGES)
                .min(self.map.pages(region) - first);
            if n == 0 {
                continue;
            }
            let bytes = (n * PAGE) as usize;
            self.vm
                .read(self.map.gpa(region, first), &mut buf[..bytes])?;
            writer.clear();
            for i in 0..n {
                let page = first + i;
                if !sent[region].test_and_set(page) {
                    self.progress.sub_remaining_pages(1);
                }
                let data = &buf[(i * PAGE) as usize..((i + 1) * PAGE) as usize];
                let (kind, encoded) = encoder.encode(data);
                self.note_sent(region, page, kind, data);
                self.progress.page(kind, encoded.len());
                writer.push(self.map.gpa(region, page), kind, encoded)?;
            }
            count += n;
            let frame = writer.finish();
            self.progress.wire(Stage::Postcopy, frame.len());
            // Fault answers skip the bandwidth cap's queue: they are what the guest waits on.
            crate::protocol::write_frame(&mut stream, frame)
                .map_err(MigrationError::channel(URGENT))?;
        }
        write_message(
            &mut stream,
            &Message::Marker {
                phase,
                pages: count,
            },
        )
        .map_err(MigrationError::channel(URGENT))?;
        Ok(())
    }

    /// Sends `pages` over the bulk channels as phase `self.phase` (and marks the phase on the
    /// urgent channel too, so the target can wait on every data channel alike). Returns pages
    /// sent.
    fn send_pages(
        &mut self,
        pages: &[PageBitmap],
        stage: Stage,
        skip: Option<&[AtomicPageBitmap]>,
    ) -> Result<u64, MigrationError> {
        let n = self.send_pages_inner(pages, stage, skip)?;
        let mut urgent = &self.urgent;
        write_message(
            &mut urgent,
            &Message::Marker {
                phase: self.phase,
                pages: 0,
            },
        )
        .map_err(MigrationError::channel(URGENT))?;
        Ok(n)
    }

    fn send_pages_inner(
        &self,
        pages: &[PageBitmap],
        stage: Stage,
        skip: Option<&[AtomicPageBitmap]>,
    ) -> Result<u64, MigrationError> {
        // Every page always travels on the same channel (by its 64-page chunk): a channel
        // delivers in order, so a newer version of a page can never be overtaken by an older
        // one sent in an earlier round on another channel.
        let channels = self.bulk.len().max(1);
        let mut work: Vec<Vec<(usize, u64, u64)>> = vec![Vec::new(); channels];
        for (region, bitmap) in pages.iter().enumerate() {
            for (first, n) in bitmap.aligned_runs(CHUNK_PAGES) {
                let chunk = self.map.global(region, first) / CHUNK_PAGES;
                work[(chunk % channels as u64) as usize].push((region, first, n));
            }
        }
        let phase = self.phase;
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .bulk
                .iter()
                .enumerate()
                .zip(&work)
                .map(|((i, stream), work)| {
                    let channel = FIRST_BULK + i as u16;
                    scope.spawn(move || self.bulk_sender(stream, channel, work, phase, stage, skip))
                })
                .collect();
            let mut total = 0;
            let mut first_error = None;
            for h in handles {
                match h.join() {
                    Ok(Ok(n)) => total += n,
                    Ok(Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                    Err(_) => {
                        first_error.get_or_insert(MigrationError::Panicked("page sender"));
                    }
                }
            }
            match first_error {
                Some(e) => Err(e),
                None => Ok(total),
            }
        })
    }

    fn bulk_sender(
        &self,
        mut stream: &Channel,
        channel: u16,
        work: &[(usize, u64, u64)],
        phase: u32,
        stage: Stage,
        skip: Option<&[AtomicPageBitmap]>,
    ) -> Result<u64, MigrationError> {
        let mut encoder = self.encoder()?;
        let mut writer = PagesWriter::new();
        let mut buf = vec![0u8; (CHUNK_PAGES * PAGE) as usize];
        let mut count = 0u64;
        let flush =
            |writer: &mut PagesWriter, stream: &mut &Channel| -> Result<(), MigrationError> {
                if writer.is_empty() {
                    return Ok(());
                }
                let frame = writer.finish();
                self.progress.wire(stage, frame.len());
                transport::send_frame(stream, frame, &self.limiter)
                    .map_err(MigrationError::channel(channel))?;
                writer.clear();
                Ok(())
            };
        for &(region, first, n) in work {
            if self.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            let mut sent_here = 0u64;
            let bytes = (n * PAGE) as usize;
            self.vm
                .read(self.map.gpa(region, first), &mut buf[..bytes])?;
            for p in 0..n {
                let page = first + p;
                if let Some(skip) = skip {
                    if skip[region].test_and_set(page) {
                        continue;
                    }
                }
                let data = &buf[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
                let (kind, encoded) = encoder.encode(data);
                self.note_sent(region, page, kind, data);
                self.progress.page(kind, encoded.len());
                writer.push(self.map.gpa(region, page), kind, encoded)?;
                count += 1;
                sent_here += 1;
                if writer.len() >= BATCH_PAGES {
                    flush(&mut writer, &mut stream)?;
                }
            }
            // Pages already answered on the urgent channel were counted there.
            self.progress.sub_remaining_pages(sent_here);
        }
        flush(&mut writer, &mut stream)?;
        write_message(
            &mut stream,
            &Message::Marker {
                phase,
                pages: count,
            },
        )
        .map_err(MigrationError::channel(channel))?;
        Ok(count)
    }

    /// Folds the page just encoded into the digest of what was sent.
    fn note_sent(&self, region: usize, page: u64, kind: PageKind, data: &[u8]) {
        if let Some(sent) = &self.sent {
            let global = self.map.global(region, page);
            if kind == PageKind::Zero {
                sent.set_hash(global, self.zero_hash);
            } else {
                sent.set(global, data);
            }
        }
    }

    fn encoder(&self) -> Result<PageEncoder, MigrationError> {
        PageEncoder::new(self.cfg.compression).map_err(|source| MigrationError::Codec {
            what: "compression",
            source,
        })
    }

    /// A connection that broke before the switchover is often the target hanging up on
    /// something it refused (a damaged frame, a failed write): its reason, if it gives one on
    /// the control channel, says more than the symptom.
    fn explain(&self, error: MigrationError) -> MigrationError {
        let symptom = matches!(
            error,
            MigrationError::Channel { .. }
                | MigrationError::Send { .. }
                | MigrationError::ControlBroke { .. }
        );
        if !symptom || self.switched.load(Ordering::Acquire) {
            return error;
        }
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match events.recv_timeout(left) {
                Ok(Event::Remote(message)) => return MigrationError::Remote(message),
                Ok(Event::Closed(_)) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        error
    }

    /// After a failure: before switchover the VM goes on here and the target drops its copy.
    fn recover(&mut self, error: &MigrationError) {
        if self.in_postcopy && error.is_link_failure() {
            // The target keeps the VM and waits for new connections: an Abort that still got
            // through would end the migration there and lose the pages it lacks.
            return;
        }
        let reason = match error {
            MigrationError::Cancelled => crate::protocol::CANCEL_REASON.to_owned(),
            // The target records this text as the reason: it gets the causes too.
            other => crate::error::chain(other),
        };
        let _ = self.send_control(&Message::abort(reason));
        if self.switched.load(Ordering::Acquire) {
            return;
        }
        self.vm.stop_dirty_tracking();
        if self.paused_at.is_some() {
            if let Err(e) = self.vm.resume() {
                // Nothing more can be done here; the caller reports the migration error.
                let _: VmAccessError = e;
            }
        }
    }
}

fn control_broke(source: Option<ProtocolError>) -> MigrationError {
    MigrationError::ControlBroke {
        peer: "target",
        source,
    }
}

/// The target sent `got` on the control channel while the source waited for `expected`.
fn out_of_order(expected: &'static str, got: Command) -> MigrationError {
    MigrationError::Protocol(ProtocolError::Unexpected { expected, got })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}
