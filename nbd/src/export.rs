//! A supervised `qemu-nbd` serving one raw file over TCP.
//!
//! When a VM's disk stays on this host after a migration, the agent exports the file here and
//! the target's block device reaches it with [`NbdClient`]. qemu-nbd runs with `--persistent`
//! so clients may reconnect, `--shared=8` so several connections can be open at once, and
//! `--cache=writethrough` so a write the client saw complete is already in the file; that is
//! also why stopping the export with SIGKILL loses nothing.
//!
//! The process is a child of this one and is killed and reaped on [`Export::stop`] or drop.
//! If this process dies without dropping the export, qemu-nbd is left running.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::proto::MAX_EXPORT_NAME;
use crate::{NbdClient, NbdError};

const QEMU_NBD: &str = "qemu-nbd";
/// Connections qemu-nbd accepts at once: the agent's block device plus reconnects and probes.
const MAX_CLIENTS: u32 = 8;
/// Another process can take the port between our probe bind and qemu-nbd's; then we retry.
const PORT_ATTEMPTS: u32 = 5;
/// How long qemu-nbd gets to accept a client handshake.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How much of qemu-nbd's stderr we keep for error messages; the rest is read and dropped.
const STDERR_KEEP: usize = 8 * 1024;

/// Whether `qemu-nbd` is on this machine's `PATH`.
pub fn qemu_nbd_available() -> bool {
    on_path(OsStr::new(QEMU_NBD))
}

/// Whether `program` is an executable file: a path as given, or a name found on `PATH`.
fn on_path(program: &OsStr) -> bool {
    let executable = |p: &Path| {
        fs::metadata(p)
            .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if Path::new(program).components().count() > 1 {
        return executable(Path::new(program));
    }
    let Some(paths) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&paths).any(|dir| executable(&dir.join(program)))
}

/// Work for the process thread.
type Job = Box<dyn FnOnce() + Send>;

/// The thread that spawns and kills this crate's child processes. It lives as long as the
/// process: the kernel sends the parent-death signal (`setpriv --pdeathsig KILL`, below) when
/// the *thread* that forked the child ends, so a short-lived request thread must not be the one
/// that spawns. A process that confines itself with seccomp starts it first
/// ([`start_process_thread`]) and confines only its other threads: qemu-nbd then runs without
/// the parent's filter, and the parent needs neither fork/exec nor `kill`.
fn process_thread() -> &'static Mutex<mpsc::Sender<Job>> {
    static THREAD: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    THREAD.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let started = thread::Builder::new()
            .name("nbd-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            });
        if let Err(e) = started {
            // Requests then fail with "the spawner is gone" below.
            eprintln!("godwit-nbd: cannot start the spawner thread: {e}");
        }
        Mutex::new(tx)
    })
}

/// Starts the process thread now (it starts on first use otherwise): call it before
/// installing a per-thread seccomp filter that should not apply to qemu-nbd.
pub fn start_process_thread() {
    process_thread();
}

/// Runs `job` on the process thread and returns its result.
fn on_process_thread<T: Send + 'static>(
    job: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let gone = || io::Error::other("the qemu-nbd spawner thread is gone");
    let (reply, answer) = mpsc::channel();
    process_thread()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(Box::new(move || {
            let _ = reply.send(job());
        }))
        .map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}

/// Spawns `command` so that it cannot outlive this process: from the process thread, through
/// `setpriv --pdeathsig KILL` (util-linux) when it is installed. Without setpriv the export is
/// stopped by `Export::stop`/drop and the agent's shutdown only, and survives an agent killed
/// with SIGKILL.
fn spawn_tied(mut command: Command) -> io::Result<Child> {
    on_process_thread(move || command.spawn())
}

/// A running qemu-nbd serving one file as one named export.
#[derive(Debug)]
pub struct Export {
    child: Child,
    addr: SocketAddr,
    export_name: String,
    path: PathBuf,
    /// Drains qemu-nbd's stderr so it never blocks on a full pipe; returns what it kept.
    stderr: Option<JoinHandle<Vec<u8>>>,
    stopped: bool,
}

impl Export {
    /// Serves the raw file or block device at `path` as `export_name` on a free TCP port of
    /// `bind_ip`, and returns once a client handshake succeeds. With an unspecified `bind_ip`
    /// (0.0.0.0 or ::) qemu-nbd listens on every address and [`Export::addr`] reports that
    /// unspecified address: tell remote clients a routable one.
    pub fn start(path: &Path, bind_ip: IpAddr, export_name: &str) -> Result<Export, NbdError> {
        start_with(
            &[OsStr::new(QEMU_NBD)],
            READY_TIMEOUT,
            path,
            bind_ip,
            export_name,
        )
    }

    /// Where qemu-nbd listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn export_name(&self) -> &str {
        &self.export_name
    }

    /// The exported file, made absolute.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Process id of qemu-nbd.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether qemu-nbd is still running; reaps it if it has exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills qemu-nbd and waits for it to exit. Dropping the export does the same.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // Not reaped yet, so the pid is still this child's (running or a zombie) until the
        // wait below. Killed from the process thread, like it was spawned (see there).
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
                let _ = on_process_thread(move || {
                    rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                        .map_err(io::Error::from)
                });
            }
        }
        let _ = self.child.wait();
        // The drain thread ends when the pipe closes; not joined, so a stray holder of the
        // pipe cannot hang us here.
        self.stderr = None;
    }

    /// What qemu-nbd wrote to stderr; only call once it has exited.
    fn collect_stderr(&mut self) -> String {
        let kept = self
            .stderr
            .take()
            .and_then(|drain| drain.join().ok())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&kept).trim().to_string();
        if text.is_empty() {
            "it wrote nothing to stderr".to_string()
        } else {
            text
        }
    }

    fn wait_ready(&mut self, ready_timeout: Duration) -> Result<(), NbdError> {
        let probe_ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let probe_addr = SocketAddr::new(probe_ip, self.addr.port()).to_string();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().map_err(NbdError::Spawn)? {
                return Err(NbdError::QemuNbdExited {
                    status,
                    stderr: self.collect_stderr(),
                });
            }
            let error = match NbdClient::connect(&probe_addr, &self.export_name, PROBE_TIMEOUT) {
                Ok(client) => {
                    client.disconnect();
                    return Ok(());
                }
                Err(error) => error,
            };
            if started.elapsed() >= ready_timeout {
                return Err(NbdError::NotReady {
                    addr: self.addr,
                    waited: started.elapsed(),
                    source: Box::new(error),
                });
            }
            thread::sleep(PROBE_INTERVAL);
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// [`Export::start`] with the command that stands for `qemu-nbd` (program and leading
/// arguments) and the readiness timeout chosen by the caller, so tests can stand in for it.
pub(crate) fn start_with(
    command: &[&OsStr],
    ready_timeout: Duration,
    path: &Path,
    bind_ip: IpAddr,
    export_name: &str,
) -> Result<Export, NbdError> {
    let path_error = |source| NbdError::ExportPath {
        path: path.to_path_buf(),
        source,
    };
    // Absolute, so qemu never mistakes a name like "host:disk.img" for a protocol prefix.
    let path = fs::canonicalize(path).map_err(path_error)?;
    let file_type = fs::metadata(&path).map_err(path_error)?.file_type();
    if !file_type.is_file() && !file_type.is_block_device() {
        return Err(path_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        )));
    }
    if export_name.len() > MAX_EXPORT_NAME {
        return Err(NbdError::Spawn(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the export name is longer than {MAX_EXPORT_NAME} bytes"),
        )));
    }

    let mut attempt = 1;
    loop {
        let port = free_port(bind_ip)?;
        match launch(command, ready_timeout, &path, bind_ip, port, export_name) {
            Err(NbdError::QemuNbdExited { stderr, .. })
                if attempt < PORT_ATTEMPTS && stderr.contains("Address already in use") =>
            {
                attempt += 1;
            }
            result => return result,
        }
    }
}

fn launch(
    command: &[&OsStr],
    ready_timeout: Duration,
    path: &Path,
    bind_ip: IpAddr,
    port: u16,
    export_name: &str,
) -> Result<Export, NbdError> {
    let (program, leading_args) = command
        .split_first()
        .ok_or_else(|| NbdError::Spawn(io::ErrorKind::InvalidInput.into()))?;
    if !on_path(program) {
        return Err(NbdError::QemuNbdMissing);
    }
    let mut command = if on_path(OsStr::new("setpriv")) {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    command
        .args(leading_args)
        .arg("--format=raw")
        .arg("--persistent")
        .arg(format!("--shared={MAX_CLIENTS}"))
        .arg(format!("--export-name={export_name}"))
        .arg(format!("--bind={bind_ip}"))
        .arg(format!("--port={port}"))
        .arg("--cache=writethrough")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = spawn_tied(command).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => NbdError::QemuNbdMissing,
        _ => NbdError::Spawn(e),
    })?;

    // From here on, dropping `export` on an error path kills and reaps the child.
    let mut export = Export {
        child,
        addr: SocketAddr::new(bind_ip, port),
        export_name: export_name.to_string(),
        path: path.to_path_buf(),
        stderr: None,
        stopped: false,
    };
    if let Some(pipe) = export.child.stderr.take() {
        let drain = thread::Builder::new()
            .name("qemu-nbd-stderr".into())
            .spawn(move || drain(pipe))
            .map_err(NbdError::Spawn)?;
        export.stderr = Some(drain);
    }
    export.wait_ready(ready_timeout)?;
    Ok(export)
}

/// A port that was free on `ip` a moment ago.
fn free_port(ip: IpAddr) -> Result<u16, NbdError> {
    let listen_error = |source| NbdError::Listen { ip, source };
    let listener = TcpListener::bind((ip, 0)).map_err(listen_error)?;
    Ok(listener.local_addr().map_err(listen_error)?.port())
}

/// Reads the pipe to its end, keeping the first [`STDERR_KEEP`] bytes.
fn drain(mut pipe: ChildStderr) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match pipe.read(&mut chunk) {
            Ok(0) => return kept,
            Ok(n) => {
                let room = STDERR_KEEP - kept.len();
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return kept,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::testutil::*;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn process_exists(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    /// Starts an export with `sh -c script` standing in for qemu-nbd; the script gets
    /// qemu-nbd's arguments as "$@".
    fn start_scripted(
        disk: &Path,
        script: &str,
        ready_timeout: Duration,
    ) -> Result<Export, NbdError> {
        let command = [OsStr::new("sh"), OsStr::new("-c"), OsStr::new(script)];
        let command: Vec<&OsStr> = command
            .into_iter()
            .chain([OsStr::new("qemu-nbd")])
            .collect();
        start_with(&command, ready_timeout, disk, LOCALHOST, "disk")
    }

    #[test]
    fn a_missing_file_is_refused_before_spawning() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-disk.img");
        let err = Export::start(&missing, LOCALHOST, "disk").unwrap_err();
        assert!(matches!(err, NbdError::ExportPath { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("Cannot export {}", missing.display())
        );

        let err = Export::start(dir.path(), LOCALHOST, "disk").unwrap_err();
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert_eq!(source, "not a regular file or block device");
    }

    #[test]
    fn a_missing_qemu_nbd_is_named_with_its_package() {
        let disk = pattern_disk(4096);
        let command = [OsStr::new("/nonexistent/qemu-nbd")];
        let err = start_with(&command, READY_TIMEOUT, disk.path(), LOCALHOST, "disk").unwrap_err();
        assert_eq!(
            err.to_string(),
            "qemu-nbd is not installed (Debian package qemu-utils)"
        );
    }

    #[test]
    fn an_early_exit_reports_stderr() {
        let disk = pattern_disk(4096);
        let script = "echo 'qemu-nbd: cannot open disk' >&2; exit 3";
        let err = start_scripted(disk.path(), script, READY_TIMEOUT).unwrap_err();
        assert!(matches!(err, NbdError::QemuNbdExited { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("exit status: 3"), "{message}");
        assert!(message.contains("qemu-nbd: cannot open disk"), "{message}");
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        let disk = pattern_disk(4096);
        // An export name no other test serves: should a concurrent test's qemu-nbd get the
        // port this stand-in was given (free when picked, never bound by `sleep`), the probe
        // still finds no such export there instead of taking it for ours.
        let command = [
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new("exec sleep 30"),
            OsStr::new("qemu-nbd"),
        ];
        let err = start_with(
            &command,
            Duration::from_millis(300),
            disk.path(),
            LOCALHOST,
            "never-answers",
        )
        .unwrap_err();
        assert!(matches!(err, NbdError::NotReady { .. }), "{err:?}");
        let source = std::error::Error::source(&err).unwrap();
        let source = source.downcast_ref::<Box<NbdError>>().unwrap();
        assert!(
            matches!(
                **source,
                NbdError::Connect { .. } | NbdError::Handshake(_) | NbdError::Server { .. }
            ),
            "{source:?}"
        );
    }

    #[test]
    fn serves_and_stops_without_leaving_a_process() {
        if !qemu_nbd_or_skip("serves_and_stops_without_leaving_a_process") {
            return;
        }
        let disk = pattern_disk(1024 * 1024);
        let mut export = Export::start(disk.path(), LOCALHOST, "vm-1-disk").unwrap();
        assert_eq!(export.export_name(), "vm-1-disk");
        assert_eq!(export.path(), fs::canonicalize(disk.path()).unwrap());
        assert_eq!(export.addr().ip(), LOCALHOST);
        assert!(export.is_running());
        let pid = export.pid();
        assert!(process_exists(pid));

        let client =
            NbdClient::connect(&export.addr().to_string(), "vm-1-disk", READY_TIMEOUT).unwrap();
        assert_eq!(client.size(), 1024 * 1024);
        drop(client);

        export.stop();
        assert!(!process_exists(pid), "qemu-nbd {pid} is still there");
    }

    #[test]
    fn serves_on_ipv6_loopback() {
        if !qemu_nbd_or_skip("serves_on_ipv6_loopback") {
            return;
        }
        let disk = pattern_disk(4096);
        let export = match Export::start(disk.path(), IpAddr::V6(Ipv6Addr::LOCALHOST), "disk") {
            Err(NbdError::Listen { .. }) => return eprintln!("skipping: no IPv6 loopback here"),
            result => result.unwrap(),
        };
        let client = NbdClient::connect(&export.addr().to_string(), "disk", READY_TIMEOUT).unwrap();
        let mut buf = [0u8; 4096];
        client.read_at(0, &mut buf).unwrap();
        assert!(buf.to_vec() == pattern(0, 4096));
    }

    #[test]
    fn dropping_an_export_reaps_qemu_nbd() {
        if !qemu_nbd_or_skip("dropping_an_export_reaps_qemu_nbd") {
            return;
        }
        let disk = pattern_disk(4096);
        let export = Export::start(disk.path(), LOCALHOST, "disk").unwrap();
        let pid = export.pid();
        drop(export);
        assert!(!process_exists(pid), "qemu-nbd {pid} is still there");
    }

    #[test]
    fn a_killed_qemu_nbd_is_noticed() {
        if !qemu_nbd_or_skip("a_killed_qemu_nbd_is_noticed") {
            return;
        }
        let disk = pattern_disk(4096);
        let mut export = Export::start(disk.path(), LOCALHOST, "disk").unwrap();
        let pid = export.pid();
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(5);
        while export.is_running() {
            assert!(Instant::now() < deadline, "qemu-nbd {pid} outlived SIGKILL");
            thread::sleep(Duration::from_millis(20));
        }
        // is_running reaped it.
        assert!(!process_exists(pid));
    }

    #[test]
    fn a_taken_port_is_retried() {
        if !qemu_nbd_or_skip("a_taken_port_is_retried") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("failed-once");
        // The first launch fails the way qemu-nbd does when the port was taken meanwhile.
        let script = format!(
            "if [ ! -e '{mark}' ]; then : > '{mark}'; \
             echo 'qemu-nbd: Failed to bind socket: Address already in use' >&2; exit 1; fi; \
             exec qemu-nbd \"$@\"",
            mark = mark.display()
        );
        let disk = pattern_disk(4096);
        let mut export = start_scripted(disk.path(), &script, READY_TIMEOUT).unwrap();
        assert!(mark.exists());
        assert!(export.is_running());
    }
}
