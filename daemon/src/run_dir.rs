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
