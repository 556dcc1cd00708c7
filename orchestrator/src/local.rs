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
        let Some(url) = line
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))
        else {
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

/// A local cluster's certificate authority (`DIR/ca`, made once) and the certificates it
/// issued (`DIR/tls/NAME/`, each issued once): `godwit up`, `godwit demo` and the benchmarks
/// run their clusters over mutual TLS with it.
#[derive(Debug, Clone)]
pub struct LocalCa {
    dir: PathBuf,
}

/// The operator certificate a local cluster's CLI uses.
pub const LOCAL_ADMIN: &str = "admin";

impl LocalCa {
    /// Opens the CA in `dir/ca`, making it first if there is none.
    pub fn open(dir: &Path) -> Result<LocalCa> {
        use godwit_tls::ca;
        let ca_dir = dir.join("ca");
        if !ca_dir.join(ca::CA_CERT).exists() {
            ca::init(&ca_dir, "local").map_err(|e| anyhow!(godwit_daemon::chain(&e)))?;
        }
        Ok(LocalCa {
            dir: dir.to_owned(),
        })
    }

    /// The certificate of `name` in `role` (issued on first use), with absolute paths.
    pub fn files(&self, name: &str, role: godwit_tls::Role) -> Result<godwit_tls::TlsFiles> {
        use godwit_tls::ca;
        let out = self.dir.join("tls").join(name);
        let files = godwit_tls::TlsFiles {
            ca: out.join(ca::CA_CERT),
            cert: out.join(format!("{name}.crt")),
            key: out.join(format!("{name}.key")),
        };
        if !files.cert.exists() {
            let who = godwit_tls::Identity {
                name: name.to_owned(),
                role,
            };
            ca::issue(
                &self.dir.join("ca"),
                &who,
                &[],
                ca::Validity::days(365),
                &out,
            )
            .map_err(|e| anyhow!(godwit_daemon::chain(&e)))?;
        }
        files
            .absolute()
            .map_err(|e| anyhow!(godwit_daemon::chain(&e)))
    }

    /// `--ca`, `--cert` and `--key` with host `name`'s certificate, for a daemon's arguments.
    pub fn host_args(&self, name: &str) -> Result<Vec<String>> {
        Ok(self.files(name, godwit_tls::Role::Host)?.flags())
    }

    /// A client holding the local admin's certificate.
    pub fn admin(&self) -> Result<godwit_daemon::client::ClientAuth> {
        let creds = self
            .files(LOCAL_ADMIN, godwit_tls::Role::Admin)?
            .load()
            .map_err(|e| anyhow!(godwit_daemon::chain(&e)))?;
        godwit_daemon::client::ClientAuth::certificate(&creds)
            .map_err(|e| anyhow!(godwit_daemon::chain(&e)))
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
    /// Dropping it kills the VMMs of its data directory (not after `kill`).
    kills_vmms: bool,
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
        Self::start_at(name, data_dir, log, "127.0.0.1:0", extra)
    }

    /// As `start_with`, listening on `listen` (`HOST:PORT`): an agent restarted on its data
    /// directory and address is the same host to its peers.
    pub fn start_at(
        name: &str,
        data_dir: &Path,
        log: &Path,
        listen: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut args = vec![
            "--listen",
            listen,
            "--name",
            name,
            "--data-dir",
            path_arg(data_dir)?,
            "--stop-vms-on-exit",
        ];
        args.extend_from_slice(extra);
        let process = Process::start("hypervisor-agent", &args, log)?;
        Ok(LocalAgent {
            kills_vmms: true,
            url: process.url.clone(),
            name: name.to_owned(),
            data_dir: data_dir.to_owned(),
            process: Some(process),
        })
    }

    /// Kills the agent process alone (SIGKILL), as a crash would: its VMMs run on, also when
    /// this is dropped (an agent started again on the data directory adopts them).
    pub fn kill(&mut self) {
        self.kills_vmms = false;
        if let Some(mut p) = self.process.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
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
        if self.kills_vmms {
            godwit_daemon::run_dir::kill_vmms(&self.data_dir);
        }
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
