//! Starting Godwit processes on this machine (for `godwit up`, `godwit demo` and the
//! benchmarks): the binaries are expected next to the running executable, listen on a free
//! loopback port and print their address as the first line on stdout.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// The directory of the running executable, where `cargo build` puts the sibling binaries.
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("Cannot find the running executable")?;
    exe.parent()
        .map(Path::to_owned)
        .ok_or_else(|| anyhow!("The executable {} has no directory", exe.display()))
}

/// A Godwit daemon started here; killed when dropped unless stopped first.
#[derive(Debug)]
struct Process {
    child: Child,
    url: String,
}

impl Process {
    /// Starts `binary` with `args` (stderr to `log`) and reads its address.
    fn start(binary: &str, args: &[&str], log: &Path) -> Result<Process> {
        let path = bin_dir()?.join(binary);
        if !path.exists() {
            bail!(
                "{} is missing: build it first (cargo build --release --bins)",
                path.display()
            );
        }
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("Cannot create log file {}", log.display()))?;
        let mut child = Command::new(&path)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("Cannot start {}", path.display()))?;
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{binary} did not start; see its log {}", log.display());
        };
        Ok(Process {
            url: url.to_owned(),
            child,
        })
    }

    /// SIGTERM, then wait.
    fn stop(mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn path_arg(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not valid UTF-8", p.display()))
}

/// An agent process started by the CLI.
#[derive(Debug)]
pub struct LocalAgent {
    process: Option<Process>,
    pub url: String,
    pub name: String,
    data_dir: PathBuf,
}

impl LocalAgent {
    /// Starts `hypervisor-agent` on a free loopback port with its data under `data_dir`.
    pub fn start(name: &str, data_dir: &Path, log: &Path) -> Result<Self> {
        Self::start_with(name, data_dir, log, &[])
    }

    /// As `start`, with extra agent arguments. The agent stops its VMs when it stops (a local
    /// cluster leaves no VMM process behind).
    pub fn start_with(name: &str, data_dir: &Path, log: &Path, extra: &[&str]) -> Result<Self> {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--data-dir",
            path_arg(data_dir)?,
            "--stop-vms-on-exit",
        ];
        args.extend_from_slice(extra);
        let process = Process::start("hypervisor-agent", &args, log)?;
        Ok(LocalAgent {
            url: process.url.clone(),
            name: name.to_owned(),
            data_dir: data_dir.to_owned(),
            process: Some(process),
        })
    }

    /// Stops the agent (and so its VMs) with SIGTERM and waits for it.
    pub fn stop(mut self) -> Result<()> {
        match self.process.take() {
            Some(p) => p.stop(),
            None => Ok(()),
        }
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        // Killed rather than stopped: its VMMs are killed too.
        drop(self.process.take());
        godwit_daemon::run_dir::kill_vmms(&self.data_dir);
    }
}

/// An orchestrator process started by the CLI.
#[derive(Debug)]
pub struct LocalOrchestrator {
    process: Process,
    pub url: String,
}

impl LocalOrchestrator {
    pub fn start(data_dir: &Path, log: &Path, extra: &[&str]) -> Result<Self> {
        let mut args = vec!["--listen", "127.0.0.1:0", "--data-dir", path_arg(data_dir)?];
        args.extend_from_slice(extra);
        let process = Process::start("orchestrator", &args, log)?;
        Ok(LocalOrchestrator {
            url: process.url.clone(),
            process,
        })
    }

    pub fn stop(self) -> Result<()> {
        self.process.stop()
    }
}
