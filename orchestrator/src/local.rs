//! Starting Godwit processes on this machine (for `godwit demo` and trying things out): the
//! binaries are expected next to the running `godwit` executable.

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

/// An agent process started by the CLI; killed when dropped.
#[derive(Debug)]
pub struct LocalAgent {
    child: Child,
    pub url: String,
    pub name: String,
}

impl LocalAgent {
    /// Starts `hypervisor-agent` on a free loopback port with its data under `data_dir`.
    pub fn start(name: &str, data_dir: &Path, log: &Path) -> Result<Self> {
        Self::start_with(name, data_dir, log, &[])
    }

    /// As `start`, with extra agent arguments.
    pub fn start_with(name: &str, data_dir: &Path, log: &Path, extra: &[&str]) -> Result<Self> {
        let agent = bin_dir()?.join("hypervisor-agent");
        if !agent.exists() {
            bail!(
                "{} is missing: build it first (cargo build --release --bins)",
                agent.display()
            );
        }
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("Cannot create log file {}", log.display()))?;
        let mut child = Command::new(&agent)
            .args(["--listen", "127.0.0.1:0", "--name", name, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("Cannot start {}", agent.display()))?;
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) else {
            let _ = child.kill();
            bail!("Agent {name} did not start; see its log {}", log.display());
        };
        Ok(LocalAgent {
            url: url.to_owned(),
            name: name.to_owned(),
            child,
        })
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop(mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An orchestrator process started by the CLI; killed when dropped.
#[derive(Debug)]
pub struct LocalOrchestrator {
    child: Child,
    pub url: String,
}

impl LocalOrchestrator {
    pub fn start(data_dir: &Path, log: &Path, extra: &[&str]) -> Result<Self> {
        let bin = bin_dir()?.join("orchestrator");
        if !bin.exists() {
            bail!(
                "{} is missing: build it first (cargo build --release --bins)",
                bin.display()
            );
        }
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("Cannot create log file {}", log.display()))?;
        let mut child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("Cannot start {}", bin.display()))?;
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) else {
            let _ = child.kill();
            bail!(
                "The orchestrator did not start; see its log {}",
                log.display()
            );
        };
        Ok(LocalOrchestrator {
            url: url.to_owned(),
            child,
        })
    }

    pub fn stop(mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for LocalOrchestrator {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
