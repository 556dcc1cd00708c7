//! A VM's run directory, `DATA_DIR/vms/<vm>/`: the files by which a VMM process and its agent
//! find each other (the VMM writes them, the agent reads them, test harnesses and local
//! clusters use them to leave no VMM behind).

use std::path::Path;

/// The VMM's local API socket.
pub const SOCKET: &str = "vmm.sock";
/// The VMM's process id, written once its socket listens; removed when it exits on purpose.
pub const PID_FILE: &str = "vmm.pid";
/// Written by the VMM just before a deliberate exit, with why. A VMM gone without one crashed.
pub const EXIT_FILE: &str = "exit.json";
/// The VMM's own log (stdout and stderr).
pub const LOG_FILE: &str = "vmm.log";
/// The guest's serial console.
pub const CONSOLE_FILE: &str = "console.log";

/// Makes `data_dir` and its `vms/` directory if need be; returns its absolute path (paths the
/// APIs report are absolute, whatever the daemon was started with). `vms/` is the daemon
/// user's alone (mode 0700): it holds each VM's run directory with the VMM's unsecured API
/// socket, its console and its log.
pub fn open_data_dir(data_dir: &Path) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let vms = data_dir.join("vms");
    std::fs::create_dir_all(&vms)?;
    // Changed only when it differs: a VMM (under seccomp, without chmod) finds it done by its
    // agent.
    if std::fs::metadata(&vms)?.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(&vms, std::fs::Permissions::from_mode(0o700))?;
    }
    data_dir.canonicalize()
}

/// The last `max_bytes` of a file (empty if it does not exist): console and VMM log tails.
pub fn read_tail(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len > max_bytes {
        file.seek(SeekFrom::Start(len - max_bytes))?;
    }
    let mut buf = Vec::with_capacity(len.min(max_bytes) as usize);
    file.take(max_bytes).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Whether `pid` is a live VMM process serving `run_dir` (not gone, not a zombie, and not
/// another process that reused the id).
pub fn vmm_alive(pid: u32, run_dir: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.trim_start().chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains("godwit-vmm") && cmdline.contains(&*run_dir.to_string_lossy())
}

/// Kills (SIGKILL) every VMM process still running for the VMs under `data_dir`; returns how
/// many. For test harnesses and local clusters that must leave nothing behind.
pub fn kill_vmms(data_dir: &Path) -> usize {
    let mut killed = 0;
    let Ok(dirs) = std::fs::read_dir(data_dir.join("vms")) else {
        return 0;
    };
    for dir in dirs.flatten() {
        let run_dir = dir.path();
        let Some(pid) = std::fs::read_to_string(run_dir.join(PID_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if !vmm_alive(pid, &run_dir) {
            continue;
        }
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            if rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok() {
                killed += 1;
            }
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_run_directories_are_the_daemons_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = open_data_dir(&dir.path().join("data")).unwrap();
        let mode = std::fs::metadata(data.join("vms"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    }

    use super::*;

    #[test]
    fn tails_read_the_end() {
        let dir = std::env::temp_dir().join(format!("godwit-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.log");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_tail(&path, 4).unwrap(), b"6789");
        assert_eq!(read_tail(&path, 100).unwrap(), b"0123456789");
        assert!(read_tail(&dir.join("none"), 4).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn this_process_is_not_a_vmm() {
        assert!(!vmm_alive(std::process::id(), Path::new("/nowhere")));
        assert_eq!(kill_vmms(Path::new("/nowhere")), 0);
    }
}
