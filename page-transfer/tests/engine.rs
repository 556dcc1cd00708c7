//! The engine against in-memory VMs over real loopback TCP: every mode moves memory exactly,
//! pre-copy resends what a writing "guest" dirtied, post-copy serves a reading guest's faults,
//! cancel leaves the source running, and a refused setup reaches the source as text.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use godwit_api::{MigrationMode, MigrationPhase};
use page_transfer::bitmap::PageBitmap;
use page_transfer::channel::{ClientSecurity, Fault, ServerSecurity};
use page_transfer::codec::Compression;
use page_transfer::error::Awaited;
use page_transfer::progress::Progress;
use page_transfer::protocol::{
    read_message, write_frame, write_message, Message, PageKind, PagesWriter,
};
use page_transfer::source::{migrate, resume_postcopy, SourceConfig};
use page_transfer::target::{receive, ReceiveOptions};
use page_transfer::vm::{IncomingSetup, Region, SourceVm, TargetFactory, TargetVm, VmAccessError};
use page_transfer::MigrationError;

const PAGE: usize = 4096;

/// A source VM whose "guest" thread rewrites random pages while it runs.
struct MemSource {
    memory: Mutex<Vec<u8>>,
    dirty: Mutex<PageBitmap>,
    tracking: AtomicBool,
    paused: AtomicBool,
    resumed: AtomicBool,
    writes: AtomicU64,
    stop: AtomicBool,
}

impl MemSource {
    fn new(pages: usize) -> Arc<Self> {
        let mut memory = vec![0u8; pages * PAGE];
        // Some pages with data, some compressible, the rest zero.
        for p in 0..pages / 2 {
            let v = (p as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            memory[p * PAGE..p * PAGE + 8].copy_from_slice(&v.to_le_bytes());
            if p % 3 == 0 {
                for b in &mut memory[p * PAGE + 8..(p + 1) * PAGE] {
                    *b = (v >> 7) as u8 ^ 0x5a;
                }
            }
        }
        if NOISE.with(|n| n.get()) {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for w in memory.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
        }
        Arc::new(MemSource {
            memory: Mutex::new(memory),
            dirty: Mutex::new(PageBitmap::new(pages as u64)),
            tracking: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            resumed: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    /// Writes `per_ms` random pages every millisecond while not paused.
    fn run_guest(self: &Arc<Self>, per_ms: usize) -> JoinHandle<()> {
        let vm = self.clone();
        std::thread::spawn(move || {
            let mut x = 0x1234_5678_u64;
            while !vm.stop.load(Ordering::Relaxed) {
                if !vm.paused.load(Ordering::Acquire) {
                    let mut mem = vm.memory.lock().unwrap();
                    // Re-check under the lock: pause() takes it too.
                    if !vm.paused.load(Ordering::Acquire) {
                        let pages = mem.len() / PAGE;
                        for _ in 0..per_ms {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let p = (x % pages as u64) as usize;
                            let n = vm.writes.fetch_add(1, Ordering::Relaxed);
                            mem[p * PAGE..p * PAGE + 8].copy_from_slice(&n.to_le_bytes());
                            if vm.tracking.load(Ordering::Relaxed) {
                                vm.dirty.lock().unwrap().set(p as u64);
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    }
}

impl SourceVm for MemSource {
    fn regions(&self) -> Vec<Region> {
        let size = self.memory.lock().unwrap().len() as u64;
        vec![Region { gpa: 0, size }]
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmAccessError> {
        let mem = self.memory.lock().unwrap();
        let start = gpa as usize;
        buf.copy_from_slice(&mem[start..start + buf.len()]);
        Ok(())
    }
    fn start_dirty_tracking(&self) -> Result<(), VmAccessError> {
        self.tracking.store(true, Ordering::Relaxed);
        Ok(())
    }
    fn harvest_dirty(&self) -> Result<Vec<PageBitmap>, VmAccessError> {
        let mut d = self.dirty.lock().unwrap();
        let out = d.clone();
        *d = PageBitmap::new(d.pages());
        Ok(vec![out])
    }
    fn stop_dirty_tracking(&self) {
        self.tracking.store(false, Ordering::Relaxed);
    }
    fn pause(&self) -> Result<(), VmAccessError> {
        let _held = self.memory.lock().unwrap();
        self.paused.store(true, Ordering::Release);
        Ok(())
    }
    fn resume(&self) -> Result<(), VmAccessError> {
        self.paused.store(false, Ordering::Release);
        self.resumed.store(true, Ordering::Release);
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, VmAccessError> {
        Ok(b"vcpu-state".to_vec())
    }
    fn config_blob(&self) -> Vec<u8> {
        b"config".to_vec()
    }
}

/// A target VM; after start, its "guest" reads pages and blocks on missing ones (post-copy).
struct MemTarget {
    memory: Mutex<Vec<u8>>,
    present: Mutex<Vec<bool>>,
    arrived: Condvar,
    registered: AtomicBool,
    faults_tx: Mutex<Sender<u64>>,
    faults_rx: Mutex<Receiver<u64>>,
    started: AtomicBool,
    aborted: AtomicBool,
    guest_reads: AtomicU64,
    stop: AtomicBool,
}

impl MemTarget {
    fn guest(self: &Arc<Self>) -> JoinHandle<()> {
        let vm = self.clone();
        std::thread::spawn(move || {
            let mut x = 0xdead_beef_u64;
            let pages = vm.present.lock().unwrap().len() as u64;
            while !vm.stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = (x % pages) as usize;
                let mut present = vm.present.lock().unwrap();
                if vm.registered.load(Ordering::Acquire) && !present[p] {
                    let _ = vm.faults_tx.lock().unwrap().send((p * PAGE) as u64);
                    while !present[p] && !vm.stop.load(Ordering::Relaxed) {
                        present = vm
                            .arrived
                            .wait_timeout(present, Duration::from_millis(50))
                            .unwrap()
                            .0;
                    }
                }
                vm.guest_reads.fetch_add(1, Ordering::Relaxed);
                drop(present);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    }

    fn put(&self, gpa: u64, data: &[u8], only_missing: bool) {
        let mut mem = self.memory.lock().unwrap();
        let mut present = self.present.lock().unwrap();
        for (i, page) in data.chunks(PAGE).enumerate() {
            let p = gpa as usize / PAGE + i;
            if only_missing && present[p] {
                continue;
            }
            mem[p * PAGE..(p + 1) * PAGE].copy_from_slice(page);
            present[p] = true;
        }
        self.arrived.notify_all();
    }
}

impl TargetVm for MemTarget {
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), VmAccessError> {
        self.put(gpa, data, false);
        Ok(())
    }
    fn install(&self, gpa: u64, data: &[u8]) -> Result<(), VmAccessError> {
        self.put(gpa, data, true);
        Ok(())
    }
    fn install_zero(&self, gpa: u64, pages: u64) -> Result<(), VmAccessError> {
        self.put(gpa, &vec![0u8; pages as usize * PAGE], true);
        Ok(())
    }
    fn discard(&self, gpa: u64, pages: u64) -> Result<(), VmAccessError> {
        let mut mem = self.memory.lock().unwrap();
        let mut present = self.present.lock().unwrap();
        for p in gpa as usize / PAGE..gpa as usize / PAGE + pages as usize {
            mem[p * PAGE..(p + 1) * PAGE].fill(0);
            present[p] = false;
        }
        Ok(())
    }
    fn enable_postcopy(&self) -> Result<(), VmAccessError> {
        self.registered.store(true, Ordering::Release);
        Ok(())
    }
    fn wait_faults(&self, out: &mut Vec<u64>, timeout: Duration) -> Result<(), VmAccessError> {
        let rx = self.faults_rx.lock().unwrap();
        if let Ok(f) = rx.recv_timeout(timeout) {
            out.push(f);
            while let Ok(f) = rx.try_recv() {
                out.push(f);
            }
        }
        Ok(())
    }
    fn wake(&self, _gpa: u64, _pages: u64) -> Result<(), VmAccessError> {
        self.arrived.notify_all();
        Ok(())
    }
    fn start(&self, state: &[u8]) -> Result<(), VmAccessError> {
        assert_eq!(state, b"vcpu-state");
        self.started.store(true, Ordering::Release);
        Ok(())
    }
    fn finish_postcopy(&self) -> Result<(), VmAccessError> {
        assert!(self.present.lock().unwrap().iter().all(|&p| p));
        self.registered.store(false, Ordering::Release);
        Ok(())
    }
    fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
    }
}

struct Factory {
    made: Mutex<Option<Arc<MemTarget>>>,
    refuse: Option<String>,
}

impl TargetFactory for Factory {
    fn prepare(&self, setup: &IncomingSetup) -> Result<Arc<dyn TargetVm>, VmAccessError> {
        if let Some(r) = &self.refuse {
            return Err(VmAccessError::new(r.clone()));
        }
        assert_eq!(setup.config_blob, b"config");
        let size: u64 = setup.regions.iter().map(|r| r.size).sum();
        let pages = size as usize / PAGE;
        let (tx, rx) = mpsc::channel();
        let vm = Arc::new(MemTarget {
            memory: Mutex::new(vec![0u8; pages * PAGE]),
            present: Mutex::new(vec![false; pages]),
            arrived: Condvar::new(),
            registered: AtomicBool::new(false),
            faults_tx: Mutex::new(tx),
            faults_rx: Mutex::new(rx),
            started: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            guest_reads: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        *self.made.lock().unwrap() = Some(vm.clone());
        Ok(vm)
    }
}

struct Run {
    source: Arc<MemSource>,
    target: Option<Arc<MemTarget>>,
    source_result: Result<(), MigrationError>,
    target_result: Result<(), MigrationError>,
    info: godwit_api::MigrationInfo,
    target_info: godwit_api::MigrationInfo,
}

fn config(mode: MigrationMode) -> SourceConfig {
    SourceConfig {
        mode,
        downtime: Duration::from_millis(50),
        bandwidth: None,
        channels: 2,
        compression: Compression::Auto,
        max_rounds: 8,
        precopy_timeout: Duration::from_secs(20),
        verify: true,
        migration_id: *b"0123456789abcdef",
        connect_timeout: Duration::from_secs(5),
        peer_timeout: Duration::from_secs(3),
        security: ClientSecurity::Plain,
    }
}

fn run(
    pages: usize,
    guest_per_ms: usize,
    cfg: SourceConfig,
    refuse: Option<&str>,
    cancel_after: Option<Duration>,
) -> Run {
    run_secured(
        pages,
        guest_per_ms,
        cfg,
        refuse,
        cancel_after,
        ServerSecurity::Plain,
    )
}

fn run_secured(
    pages: usize,
    guest_per_ms: usize,
    cfg: SourceConfig,
    refuse: Option<&str>,
    cancel_after: Option<Duration>,
    server: ServerSecurity,
) -> Run {
    run_resuming(
        pages,
        guest_per_ms,
        cfg,
        refuse,
        cancel_after,
        server,
        Vec::new(),
    )
}

/// [`run_secured`]; a post-copy whose connections fail is resumed with each of `resumes` in
/// turn (once the target reads `postcopy-paused`) while it keeps failing so.
fn run_resuming(
    pages: usize,
    guest_per_ms: usize,
    cfg: SourceConfig,
    refuse: Option<&str>,
    cancel_after: Option<Duration>,
    server: ServerSecurity,
    resumes: Vec<SourceConfig>,
) -> Run {
    let source = MemSource::new(pages);
    let source_guest = (guest_per_ms > 0).then(|| source.run_guest(guest_per_ms));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let factory = Arc::new(Factory {
        made: Mutex::new(None),
        refuse: refuse.map(str::to_owned),
    });
    let target_progress = Arc::new(Progress::new("m", "vm", "a", "b", cfg.mode, 0));
    let f = factory.clone();
    let id = cfg.migration_id;
    // A paused post-copy target waits for its source until the source is done trying.
    let source_done = Arc::new(AtomicBool::new(false));
    let (done, tp) = (source_done.clone(), target_progress.clone());
    let target_thread = std::thread::spawn(move || {
        let give_up =
            || (done.load(Ordering::Acquire)).then(|| "the source stopped trying".to_owned());
        let result = receive(
            &listener,
            id,
            &*f,
            tp,
            &ReceiveOptions {
                accept_timeout: Duration::from_secs(10),
                security: &server,
                peer_timeout: Duration::from_secs(3),
                give_up: &give_up,
            },
        );
        result.map(|_| ())
    });
    // A guest on the target that touches pages once it runs.
    let guest_factory = factory.clone();
    let target_guest = std::thread::spawn(move || {
        for _ in 0..500 {
            if let Some(vm) = guest_factory.made.lock().unwrap().clone() {
                return Some(vm.guest());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    });
    let progress = Progress::new("m", "vm", "a", "b", cfg.mode, 0);
    let cancel = AtomicBool::new(false);
    let source_result = std::thread::scope(|s| {
        if let Some(after) = cancel_after {
            let cancel = &cancel;
            s.spawn(move || {
                std::thread::sleep(after);
                cancel.store(true, Ordering::Relaxed);
            });
        }
        let mut result = migrate(&*source, &addr, &cfg, &progress, &cancel);
        for resume in &resumes {
            match &result {
                Err(e) if e.is_link_failure() => {}
                _ => break,
            }
            let paused = std::time::Instant::now();
            while target_progress.info().phase != MigrationPhase::PostcopyPaused {
                assert!(paused.elapsed() < Duration::from_secs(10), "{result:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            result = resume_postcopy(&*source, &addr, resume, &progress, &cancel);
        }
        result
    });
    source_done.store(true, Ordering::Release);
    let target_result = target_thread.join().unwrap();
    let target = factory.made.lock().unwrap().clone();
    source.stop.store(true, Ordering::Relaxed);
    if let Some(t) = &target {
        t.stop.store(true, Ordering::Relaxed);
    }
    if let Some(g) = source_guest {
        g.join().unwrap();
    }
    if let Some(g) = target_guest.join().unwrap() {
        g.join().unwrap();
    }
    Run {
        source,
        target,
        source_result,
        target_result,
        info: progress.info(),
        target_info: target_progress.info(),
    }
}

fn assert_identical(r: &Run) {
    r.source_result.as_ref().expect("source");
    r.target_result.as_ref().expect("target");
    let target = r.target.as_ref().unwrap();
    assert!(target.started.load(Ordering::Acquire));
    let a = r.source.memory.lock().unwrap();
    let b = target.memory.lock().unwrap();
    let diff = a
        .chunks(PAGE)
        .zip(b.chunks(PAGE))
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(diff, 0, "{diff} pages differ");
    assert_eq!(r.info.source_digest, r.info.target_digest);
    assert!(r.info.source_digest.is_some());
    assert!(r.info.downtime_ms.is_some());
}

#[test]
fn stop_and_copy_moves_memory_exactly() {
    let r = run(4096, 5, config(MigrationMode::StopAndCopy), None, None);
    assert_identical(&r);
    assert!(r.info.pages.zero_pages > 1000, "{:?}", r.info.pages);
    assert!(r.info.pages.compressed_pages > 0, "{:?}", r.info.pages);
    assert!(!r.info.encrypted, "plain TCP reads as encrypted");
}

#[test]
fn precopy_resends_dirty_pages_and_converges() {
    let r = run(8192, 20, config(MigrationMode::Precopy), None, None);
    assert_identical(&r);
    let p = &r.info.pages;
    let sent = p.zero_pages + p.raw_pages + p.compressed_pages;
    assert!(sent > 8192, "dirty pages were not resent: {:?}", r.info);
    assert!(r.info.downtime_bytes > 0);
    assert!(!r.info.switched_to_postcopy);
}

#[test]
fn precopy_that_cannot_converge_fails_and_the_source_runs_on() {
    let mut cfg = config(MigrationMode::Precopy);
    cfg.bandwidth = Some(2 << 20);
    cfg.max_rounds = 2;
    cfg.downtime = Duration::from_millis(1);
    let r = run(2048, 200, cfg, None, None);
    let err = r.source_result.unwrap_err();
    match &err {
        MigrationError::NotConverged {
            rounds,
            remaining_pages,
            ..
        } => {
            // The full pass, then max_rounds more.
            assert_eq!(*rounds, 3, "{err}");
            assert!(*remaining_pages > 0, "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("did not converge"), "{err}");
    assert_eq!(err.class(), "not_converged");
    // A failure is not a cancel to the target.
    match &r.target_result {
        Err(e) => assert!(!e.cancelled_by_peer(), "{e:?}"),
        Ok(()) => panic!("the target completed a failed migration"),
    }
    assert!(r.target.unwrap().aborted.load(Ordering::Acquire));
    assert!(!r.source.paused.load(Ordering::Acquire));
}

#[test]
fn postcopy_serves_faults_and_pushes_the_rest() {
    let r = run(8192, 5, config(MigrationMode::Postcopy), None, None);
    assert_identical(&r);
    assert_eq!(r.info.precopy_bytes, 0);
    assert!(r.info.postcopy_bytes > 0);
    let target = r.target.as_ref().unwrap();
    assert!(target.guest_reads.load(Ordering::Relaxed) > 0);
    assert!(r.info.faults.faults > 0, "{:?}", r.info.faults);
    assert!(r.info.faults.requests > 0, "{:?}", r.info.faults);
}

#[test]
fn auto_switches_to_postcopy_when_precopy_stalls() {
    let mut cfg = config(MigrationMode::Auto);
    cfg.bandwidth = Some(8 << 20);
    cfg.downtime = Duration::from_millis(1);
    let r = run(4096, 300, cfg, None, None);
    assert_identical(&r);
    assert!(r.info.switched_to_postcopy, "{:?}", r.info);
}

#[test]
fn cancel_before_switchover_leaves_the_vm_running_on_the_source() {
    let mut cfg = config(MigrationMode::Precopy);
    cfg.bandwidth = Some(4 << 20);
    cfg.compression = Compression::None;
    cfg.downtime = Duration::from_millis(1);
    let r = run(8192, 50, cfg, None, Some(Duration::from_millis(300)));
    assert!(
        matches!(r.source_result, Err(MigrationError::Cancelled)),
        "{:?}",
        r.source_result
    );
    // The target learns it was a cancel, not a failure, whichever channel read the abort.
    match &r.target_result {
        Err(e) => {
            assert!(e.cancelled_by_peer(), "{e:?}");
            assert_eq!(e.class(), "cancelled");
        }
        Ok(()) => panic!("the target completed a cancelled migration"),
    }
    assert!(r.target.unwrap().aborted.load(Ordering::Acquire));
    assert!(!r.source.paused.load(Ordering::Acquire));
}

#[test]
fn a_refusing_target_reports_why() {
    let r = run(
        256,
        0,
        config(MigrationMode::Precopy),
        Some("no room for 1 MiB"),
        None,
    );
    match r.source_result {
        Err(ref e @ MigrationError::Remote(ref m)) => {
            assert!(m.contains("no room"), "{m}");
            assert_eq!(e.class(), "peer");
        }
        other => panic!("{other:?}"),
    }
}

/// Credentials of hosts `names`, issued by a CA made in `dir` (`dir` keeps the files).
fn hosts(dir: &std::path::Path, names: &[&str]) -> Vec<godwit_tls::Credentials> {
    use godwit_tls::ca::{self, Validity};
    ca::init(&dir.join("ca"), "test").unwrap();
    names
        .iter()
        .map(|n| {
            let who = godwit_tls::Identity {
                name: (*n).into(),
                role: godwit_tls::Role::Host,
            };
            let i = ca::issue(&dir.join("ca"), &who, &[], Validity::days(1), &dir.join(n)).unwrap();
            godwit_tls::Credentials::load(&i.ca, &i.cert, &i.key).unwrap()
        })
        .collect()
}

fn tls_client(c: &godwit_tls::Credentials) -> ClientSecurity {
    ClientSecurity::Tls {
        config: c.client_config().unwrap(),
        server_name: godwit_tls::server_name("127.0.0.1").unwrap(),
    }
}

#[test]
fn every_mode_migrates_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let creds = hosts(dir.path(), &["src", "dst"]);
    let server = ServerSecurity::Tls {
        config: creds[1].server_config().unwrap(),
        source: "src".into(),
    };
    for mode in [
        MigrationMode::StopAndCopy,
        MigrationMode::Precopy,
        MigrationMode::Postcopy,
    ] {
        let mut cfg = config(mode);
        cfg.security = tls_client(&creds[0]);
        let r = run_secured(8192, 20, cfg, None, None, server.clone());
        assert_identical(&r);
        assert!(r.info.encrypted, "{:?}", r.info);
    }
}

#[test]
fn a_source_the_migration_was_not_announced_from_or_a_stranger_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let creds = hosts(dir.path(), &["src", "dst", "mallory"]);
    let server = || ServerSecurity::Tls {
        config: creds[1].server_config().unwrap(),
        source: "src".into(),
    };
    // A host of the cluster, but not the one the target was told to expect.
    let mut cfg = config(MigrationMode::StopAndCopy);
    cfg.security = tls_client(&creds[2]);
    let r = run_secured(256, 0, cfg, None, None, server());
    let e = r.source_result.unwrap_err();
    assert!(
        e.to_string()
            .contains("announced from host src, not from host mallory"),
        "{e}"
    );
    assert!(
        r.target_result.is_err(),
        "the target took a VM from mallory"
    );
    assert!(r.target.is_none());

    // A certificate of another CA: the handshake fails on both sides.
    let other = hosts(&dir.path().join("other"), &["src"]);
    let mut cfg = config(MigrationMode::StopAndCopy);
    cfg.security = tls_client(&other[0]);
    let r = run_secured(256, 0, cfg, None, None, server());
    let e = r.source_result.unwrap_err();
    assert_eq!(e.class(), "tls", "{e}");
    assert!(r.target.is_none());

    // An expired certificate of our CA, naming the right host: refused in the handshake.
    let old = godwit_tls::ca::issue(
        &dir.path().join("ca"),
        &godwit_tls::Identity {
            name: "src".into(),
            role: godwit_tls::Role::Host,
        },
        &[],
        godwit_tls::ca::Validity::expired(),
        &dir.path().join("expired"),
    )
    .unwrap();
    let old = godwit_tls::Credentials::load(&old.ca, &old.cert, &old.key).unwrap();
    let mut cfg = config(MigrationMode::StopAndCopy);
    cfg.security = tls_client(&old);
    let r = run_secured(256, 0, cfg, None, None, server());
    // In TLS 1.3 the server judges the client's certificate after the client finished its
    // side of the handshake: the source learns it on its first read, as a broken channel.
    let e = r.source_result.unwrap_err();
    assert!(["tls", "channel"].contains(&e.class()), "{e}");
    assert!(r.target_result.is_err());
    assert!(r.target.is_none());

    // Plain TCP to a TLS target.
    let r = run_secured(
        256,
        0,
        config(MigrationMode::StopAndCopy),
        None,
        None,
        server(),
    );
    assert!(r.source_result.is_err());
    assert!(r.target.is_none());
}

/// Stop-and-copy of 256 MiB of incompressible memory over plain TCP and over mutual TLS,
/// alternating (a measurement, not a check: `cargo test --release -p page-transfer --test
/// engine -- --ignored --nocapture tls_cost`).
#[test]
#[ignore = "measurement"]
fn tls_cost() {
    let dir = tempfile::tempdir().unwrap();
    let creds = hosts(dir.path(), &["src", "dst"]);
    let pages = 65536;
    for round in 0..6 {
        for tls in [round % 2 != 0, round % 2 == 0] {
            let mut cfg = config(MigrationMode::StopAndCopy);
            cfg.compression = Compression::None;
            cfg.verify = false;
            let server = if tls {
                cfg.security = tls_client(&creds[0]);
                ServerSecurity::Tls {
                    config: creds[1].server_config().unwrap(),
                    source: "src".into(),
                }
            } else {
                ServerSecurity::Plain
            };
            let r = run_noise(pages, cfg, server);
            let secs = r.info.downtime.final_pages_ms / 1000.0;
            println!(
                "{}: {:.0} MiB in {:.0} ms = {:.0} MiB/s",
                if tls { "TLS  " } else { "plain" },
                r.info.pages.wire_bytes as f64 / (1 << 20) as f64,
                secs * 1000.0,
                r.info.pages.wire_bytes as f64 / (1 << 20) as f64 / secs
            );
        }
    }
}

/// `run_secured` on memory full of incompressible bytes.
fn run_noise(pages: usize, cfg: SourceConfig, server: ServerSecurity) -> Run {
    NOISE.with(|n| n.set(true));
    let r = run_secured(pages, 0, cfg, None, None, server);
    NOISE.with(|n| n.set(false));
    r
}

thread_local! {
    static NOISE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// An uncompressed post-copy config with `fault` on the first bulk channel of every set of
/// connections, and the same config without it (for a resume that gets through).
fn postcopy_with_bulk_fault(fault: Fault) -> (SourceConfig, SourceConfig) {
    let mut cfg = config(MigrationMode::Postcopy);
    cfg.compression = Compression::None;
    let clean = cfg.clone();
    cfg.security = ClientSecurity::Faulty {
        inner: Box::new(ClientSecurity::Plain),
        channel: page_transfer::transport::FIRST_BULK,
        fault,
    };
    (cfg, clean)
}

/// A `mode` migration of 8192 pages, uncompressed (so offsets are guest bytes), with `fault`
/// injected into the source's first bulk channel (plain TCP underneath) and a guest writing
/// `guest_per_ms` pages a millisecond.
fn run_with_bulk_fault(mode: MigrationMode, fault: Fault, guest_per_ms: usize) -> Run {
    let mut cfg = config(mode);
    cfg.compression = Compression::None;
    cfg.security = ClientSecurity::Faulty {
        inner: Box::new(ClientSecurity::Plain),
        channel: page_transfer::transport::FIRST_BULK,
        fault,
    };
    run(8192, guest_per_ms, cfg, None, None)
}

#[test]
fn a_reset_channel_before_the_switchover_fails_the_migration_and_the_source_runs_on() {
    for mode in [MigrationMode::StopAndCopy, MigrationMode::Precopy] {
        // A bulk channel, after its hello and some pages.
        let r = run_with_bulk_fault(mode, Fault::Reset { after: 256 << 10 }, 5);
        let err = r.source_result.as_ref().unwrap_err();
        assert!(r.target_result.is_err(), "{mode:?}: the target completed");
        let target = r.target.as_ref().unwrap();
        assert!(!target.started.load(Ordering::Acquire), "{mode:?}");
        assert!(target.aborted.load(Ordering::Acquire), "{mode:?}");
        assert!(
            !r.source.paused.load(Ordering::Acquire),
            "{mode:?}: the source stays paused after {err}"
        );
    }
}

/// A bulk channel that goes silent mid-round (its bytes vanish, the connection stays up):
/// the target finds it stalled while the others finished the phase, within the peer timeout
/// (3 s here), refuses, and the source runs on.
#[test]
fn a_link_that_goes_silent_fails_the_migration_and_the_source_runs_on() {
    let t = std::time::Instant::now();
    let r = run_with_bulk_fault(
        MigrationMode::Precopy,
        Fault::Blackhole { after: 256 << 10 },
        5,
    );
    eprintln!(
        "silent link: the migration ended after {:.1} s: {:?}",
        t.elapsed().as_secs_f64(),
        r.source_result
    );
    let err = page_transfer::error::chain(r.source_result.as_ref().unwrap_err());
    assert!(err.contains("migration channel 2 went silent"), "{err}");
    assert!(matches!(
        r.target_result,
        Err(MigrationError::Timeout {
            awaited: Awaited::DataChannel(2),
            ..
        })
    ));
    assert!(!r.target.as_ref().unwrap().started.load(Ordering::Acquire));
    assert!(!r.source.paused.load(Ordering::Acquire));
}

/// The control channel goes silent after the setup (the source's keepalives vanish, and the
/// target's are never read): the migration ends within the peer timeout on both sides,
/// instead of waiting for ever, and the source runs on.
#[test]
fn a_silent_control_channel_ends_the_migration_on_both_sides() {
    let mut cfg = config(MigrationMode::Precopy);
    // Hello and Setup get through (about 90 bytes), nothing after them.
    cfg.security = ClientSecurity::Faulty {
        inner: Box::new(ClientSecurity::Plain),
        channel: page_transfer::transport::CONTROL,
        fault: Fault::Blackhole { after: 100 },
    };
    // Round 1 takes about 2 s (16 MiB of data at 8 MiB/s), so the fault strikes inside it, at the
    // first keepalive after a second, long before the switchover.
    cfg.compression = Compression::None;
    cfg.bandwidth = Some(8 << 20);
    let r = run(8192, 0, cfg, None, None);
    // Both sides wait the same peer timeout: the target either calls the source silent first,
    // or the source gives up first and closes the connection, which the target reads as a
    // broken control channel (CI saw both). Either way it ends, and never starts the VM.
    assert!(
        matches!(
            r.target_result,
            Err(MigrationError::Timeout {
                awaited: Awaited::Silence("source"),
                ..
            }) | Err(MigrationError::ControlBroke { peer: "source", .. })
        ),
        "{:?}",
        r.target_result
    );
    let err = page_transfer::error::chain(r.source_result.as_ref().unwrap_err());
    assert!(
        err.contains("the target sent nothing on the control channel"),
        "{err}"
    );
    assert!(!r.target.as_ref().unwrap().started.load(Ordering::Acquire));
    assert!(!r.source.paused.load(Ordering::Acquire));
}

/// Every page the target holds is the source's page: a damaged one was never written.
fn assert_no_damaged_page_installed(r: &Run) {
    let target = r.target.as_ref().unwrap();
    let a = r.source.memory.lock().unwrap();
    let b = target.memory.lock().unwrap();
    let present = target.present.lock().unwrap();
    let wrong = (0..present.len())
        .filter(|&p| present[p] && a[p * PAGE..(p + 1) * PAGE] != b[p * PAGE..(p + 1) * PAGE])
        .count();
    assert_eq!(
        wrong, 0,
        "{wrong} pages on the target differ from the source's"
    );
}

#[test]
fn a_flipped_byte_on_the_wire_never_reaches_guest_memory() {
    // Before the switchover (stop-and-copy, pre-copy): the migration fails, the target drops
    // its copy and says so, the source runs on with its memory.
    for mode in [MigrationMode::StopAndCopy, MigrationMode::Precopy] {
        let r = run_with_bulk_fault(mode, Fault::Corrupt { at: 300 << 10 }, 0);
        let err = page_transfer::error::chain(r.source_result.as_ref().unwrap_err());
        assert!(err.contains("is damaged"), "{mode:?}: {err}");
        let target_err = page_transfer::error::chain(r.target_result.as_ref().unwrap_err());
        assert!(target_err.contains("is damaged"), "{mode:?}: {target_err}");
        let target = r.target.as_ref().unwrap();
        assert!(!target.started.load(Ordering::Acquire), "{mode:?}");
        assert!(target.aborted.load(Ordering::Acquire), "{mode:?}");
        assert!(!r.source.paused.load(Ordering::Acquire), "{mode:?}: {err}");
        assert_no_damaged_page_installed(&r);
    }
    // During the post-copy push the VM already runs on the target: the damaged frame is
    // refused and the migration pauses; a source that never comes back leaves the target
    // to stop its VM rather than run on holes, and no page it holds is wrong.
    let r = run_with_bulk_fault(MigrationMode::Postcopy, Fault::Corrupt { at: 300 << 10 }, 0);
    let err = page_transfer::error::chain(r.target_result.as_ref().unwrap_err());
    assert!(err.contains("is damaged"), "{err}");
    assert!(err.contains("Gave up waiting for the source"), "{err}");
    assert!(r.source_result.is_err());
    let target = r.target.as_ref().unwrap();
    assert!(target.started.load(Ordering::Acquire));
    assert!(target.aborted.load(Ordering::Acquire));
    assert_no_damaged_page_installed(&r);
    // A source that resumes gets the migration through: the damaged page is sent again.
    let (cfg, clean) = postcopy_with_bulk_fault(Fault::Corrupt { at: 300 << 10 });
    let r = run_resuming(8192, 0, cfg, None, None, ServerSecurity::Plain, vec![clean]);
    assert_identical(&r);
    assert_eq!(r.target_info.postcopy_pauses, 1);
}

/// The issue's case: the link resets three times during one post-copy migration (a bulk
/// channel, after 2 MiB on each new set of connections); each time the target keeps the
/// running VM, the source reconnects and sends only what the target lacks, and the fourth
/// set of connections completes it with every page identical.
#[test]
fn a_postcopy_whose_link_resets_three_times_resumes_and_completes() {
    let (cfg, clean) = postcopy_with_bulk_fault(Fault::Reset { after: 2 << 20 });
    let resumes = vec![cfg.clone(), cfg.clone(), clean];
    let r = run_resuming(8192, 0, cfg, None, None, ServerSecurity::Plain, resumes);
    assert_identical(&r);
    assert_eq!(r.target_info.postcopy_pauses, 3);
    assert_eq!(r.target_info.error, None);
    // The guest on the target faulted while it ran, paused or not.
    assert!(
        r.target
            .as_ref()
            .unwrap()
            .guest_reads
            .load(Ordering::Relaxed)
            > 0
    );
}

/// A source speaking the protocol by hand: `pages` on every data channel, then the state and
/// a switchover carrying `digest`. Returns the control messages the target sent back.
fn hand_source(addr: &str, id: [u8; 16], pages: u64, digest: &str) -> Vec<Message> {
    hand_source_until(addr, id, pages, digest, false)
}

/// [`hand_source`]; with `hang_up`, it closes every connection right after the switchover
/// (a source that dies then) and returns nothing.
fn hand_source_until(
    addr: &str,
    id: [u8; 16],
    pages: u64,
    digest: &str,
    hang_up: bool,
) -> Vec<Message> {
    let mut streams = page_transfer::transport::connect(
        addr,
        id,
        1,
        Duration::from_secs(5),
        &ClientSecurity::Plain,
    )
    .unwrap();
    let mut bulk = streams.pop().unwrap();
    let mut urgent = streams.pop().unwrap();
    let mut control = streams.pop().unwrap();
    write_message(
        &mut control,
        &Message::Setup {
            mode: 1,
            verify: true,
            regions: vec![(0, pages * PAGE as u64)],
            vm: b"config".to_vec(),
        },
    )
    .unwrap();
    assert_eq!(read_message(&mut control).unwrap(), Message::SetupAck);
    let mut w = PagesWriter::new();
    for p in 0..pages {
        w.push(p * PAGE as u64, PageKind::Raw, &[p as u8 + 1; PAGE])
            .unwrap();
    }
    write_frame(&mut bulk, w.finish()).unwrap();
    let marker = Message::Marker { phase: 1, pages };
    write_message(&mut bulk, &marker).unwrap();
    write_message(&mut urgent, &Message::Marker { phase: 1, pages: 0 }).unwrap();
    write_message(
        &mut control,
        &Message::State {
            blob: b"vcpu-state".to_vec(),
        },
    )
    .unwrap();
    write_message(
        &mut control,
        &Message::Switchover {
            postcopy: false,
            markers_phase: 1,
            digest: digest.to_owned(),
        },
    )
    .unwrap();
    if hang_up {
        return Vec::new();
    }
    let mut got = Vec::new();
    while let Ok(m) = read_message(&mut control) {
        let end = matches!(m, Message::Resumed | Message::Error { .. });
        got.push(m);
        if end {
            break;
        }
    }
    got
}

/// A target receiving migration `id` in the background (for a hand source): its address,
/// its factory (which holds the VM it made) and its thread.
fn spawn_target(id: [u8; 16]) -> (String, Arc<Factory>, JoinHandle<Result<(), MigrationError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let factory = Arc::new(Factory {
        made: Mutex::new(None),
        refuse: None,
    });
    let f = factory.clone();
    let target = std::thread::spawn(move || {
        let progress = Arc::new(Progress::new(
            "m",
            "vm",
            "a",
            "b",
            MigrationMode::Precopy,
            0,
        ));
        receive(
            &listener,
            id,
            &*f,
            progress,
            &ReceiveOptions {
                accept_timeout: Duration::from_secs(10),
                security: &ServerSecurity::Plain,
                peer_timeout: Duration::from_secs(3),
                give_up: &|| None,
            },
        )
        .map(|_| ())
    });
    (addr, factory, target)
}

/// The target receives `pages` pages, the state and a switchover from a hand source that
/// closes everything right after it (`hang_up`); returns the target's result and its VM.
fn target_of_a_vanishing_source(pages: u64) -> (Result<(), MigrationError>, Arc<MemTarget>) {
    let id = *b"0a1b2c3d4e5f6a7b";
    let (addr, factory, target) = spawn_target(id);
    hand_source_until(&addr, id, pages, "", true);
    let result = target.join().unwrap();
    let vm = factory.made.lock().unwrap().clone().unwrap();
    (result, vm)
}

/// A stop-and-copy target that has every page, the state and the switchover when its source
/// dies runs the VM: the data channels closing cleanly after their last marker is not a
/// failure (it used to be, and the VM, whole, was thrown away).
#[test]
fn a_target_with_everything_runs_the_vm_when_its_source_dies_after_the_switchover() {
    for _ in 0..20 {
        let (result, vm) = target_of_a_vanishing_source(64);
        assert!(vm.started.load(Ordering::Acquire), "{result:?}");
        assert!(!vm.aborted.load(Ordering::Acquire), "{result:?}");
        // It cannot tell the source, nor hear AllSent: its record ends failed, the VM runs.
        assert!(result.is_err());
    }
}

#[test]
fn a_target_whose_memory_does_not_match_the_sources_digest_never_starts_the_vm() {
    let id = *b"fedcba9876543210";
    let (addr, factory, target) = spawn_target(id);
    let got = hand_source(&addr, id, 4, "xxh3-blake3:not-the-digest-of-these-pages");
    let result = target.join().unwrap();
    let vm = factory.made.lock().unwrap().clone().unwrap();
    assert!(!vm.started.load(Ordering::Acquire));
    assert!(vm.aborted.load(Ordering::Acquire));
    assert!(
        matches!(result, Err(MigrationError::DigestMismatch { .. })),
        "{result:?}"
    );
    // The source hears it instead of Resumed (after the phase's acknowledgement).
    match got.last() {
        Some(Message::Error { message }) => {
            assert!(message.contains("does not match"), "{message}")
        }
        other => panic!("expected an Error, got {other:?} in {got:?}"),
    }
}

/// A target speaking the protocol by hand that answers the switchover with an error.
#[test]
fn a_source_whose_switchover_is_refused_resumes_its_vm() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let id = *b"0123456789abcdef";
    let target = std::thread::spawn(move || {
        let mut streams = page_transfer::transport::accept(
            &listener,
            id,
            Duration::from_secs(10),
            &ServerSecurity::Plain,
        )
        .unwrap();
        let data: Vec<_> = streams.split_off(1);
        let mut control = streams.pop().unwrap();
        assert!(matches!(
            read_message(&mut control).unwrap(),
            Message::Setup { .. }
        ));
        write_message(&mut control, &Message::SetupAck).unwrap();
        // Drain the data channels; answer the control channel.
        let drains: Vec<_> = data
            .into_iter()
            .map(|mut c| std::thread::spawn(move || while read_message(&mut c).is_ok() {}))
            .collect();
        loop {
            match read_message(&mut control).unwrap() {
                Message::Switchover { digest, .. } => {
                    assert!(digest.starts_with("xxh3-blake3:"), "{digest}");
                    write_message(
                        &mut control,
                        &Message::error("the VM cannot start here: no room"),
                    )
                    .unwrap();
                    break;
                }
                _ => continue,
            }
        }
        // Wait for the source's abort, then let go.
        let _ = read_message(&mut control);
        drop(control);
        drop(drains);
    });
    let source = MemSource::new(256);
    let progress = Progress::new("m", "vm", "a", "b", MigrationMode::StopAndCopy, 0);
    let cancel = AtomicBool::new(false);
    let result = migrate(
        &*source,
        &addr,
        &config(MigrationMode::StopAndCopy),
        &progress,
        &cancel,
    );
    target.join().unwrap();
    match result {
        Err(MigrationError::SwitchoverRefused(m)) => assert!(m.contains("no room"), "{m}"),
        other => panic!("expected a refused switchover, got {other:?}"),
    }
    assert!(!progress.switched());
    assert!(
        !source.paused.load(Ordering::Acquire),
        "the source stayed paused"
    );
    assert!(source.resumed.load(Ordering::Acquire));
}
