//! The VMM process's life: its run directory, the local API on a unix socket, the sample loop,
//! and when it ends.
//!
//! Run directory (`DATA_DIR/vms/<vm>/`, owned by this process while it runs):
//! - `vmm.sock`: the local API; `vmm.pid`: this process's id, written once the socket listens;
//! - `vmm.log`: its log (the agent points stderr there), `console.log`: the guest's serial;
//! - `exit.json`: written just before a deliberate exit, with why. A VMM that is gone without
//!   one crashed.
//!
//! The process exits on its own once it has nothing left to run or keep: its VM moved away
//! (and it keeps no forwarder, export or data for it), was deleted, or never arrived. It
//! exits on `POST /v1/vmm/stop` and on SIGTERM/SIGINT, stopping its VM. It does not exit when
//! its agent does: that is the point of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::VmmError;
use crate::vmm::{HostConfig, Vmm};

pub use godwit_daemon::run_dir::{EXIT_FILE, PID_FILE, SOCKET};

/// A VMM that got nothing to run within this long after it started exits (its agent died
/// before it asked for anything).
const ABANDONED_AFTER: Duration = Duration::from_secs(60);

/// `exit.json`: why a VMM ended on purpose.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitRecord {
    pub pid: u32,
    pub reason: String,
    pub unix_ms: u64,
}

/// What the VMM process runs with.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    pub host: HostConfig,
    /// The VM's run directory (socket, pid file, logs).
    pub run_dir: PathBuf,
    /// The agent's API URL as peers reach it.
    pub agent_url: Option<String>,
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `path` atomically (a temporary file renamed over it).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Serves the VMM until it ends (see the module doc); returns why.
pub async fn run(
    config: VmmConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<String, VmmError> {
    let run_dir = config.run_dir.clone();
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| VmmError::io(format!("create {}", run_dir.display()), e))?;
    let _ = std::fs::remove_file(run_dir.join(EXIT_FILE));
    let host_config = config.host.clone();
    let vmm = Arc::new(
        tokio::task::spawn_blocking(move || Vmm::new(host_config))
            .await
            .map_err(VmmError::Worker)??,
    );
    if let Some(url) = config.agent_url.clone() {
        vmm.set_api_url(url);
    }
    let socket = run_dir.join(SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| VmmError::io(format!("listen on {}", socket.display()), e))?;
    write_atomic(
        &run_dir.join(PID_FILE),
        std::process::id().to_string().as_bytes(),
    )
    .map_err(|e| VmmError::io("write the pid file", e))?;
    tracing::info!(socket = %socket.display(), pid = std::process::id(), "VMM listening");

    let stop = Arc::new(tokio::sync::Notify::new());
    let app = crate::api::router(vmm.clone(), stop.clone());
    let (quit, quit_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = quit_rx.await;
            })
            .await
    });

    let sampler_vmm = vmm.clone();
    let mut tick = tokio::time::interval(crate::SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle_check = tokio::time::interval(Duration::from_millis(100));
    let mut shutdown = std::pin::pin!(shutdown);
    let started = std::time::Instant::now();
    let reason = loop {
        tokio::select! {
            _ = tick.tick() => {
                let m = sampler_vmm.clone();
                let _ = tokio::task::spawn_blocking(move || m.sample()).await;
            }
            _ = idle_check.tick() => {
                let m = vmm.clone();
                let abandoned = started.elapsed() > ABANDONED_AFTER;
                let done = tokio::task::spawn_blocking(move || {
                    let status = m.status();
                    if !m.idle() {
                        return None;
                    }
                    match status.ended {
                        Some(why) => Some(why),
                        // Idle and never given anything: only the start can leave it so.
                        None if abandoned => Some(format!(
                            "nothing to run {} s after it started",
                            ABANDONED_AFTER.as_secs()
                        )),
                        None => None,
                    }
                })
                .await
                .ok()
                .flatten();
                if let Some(why) = done {
                    break why;
                }
            }
            _ = stop.notified() => break "stopped by its agent".to_owned(),
            _ = &mut shutdown => break "stopped by a signal".to_owned(),
        }
    };
    tracing::info!(%reason, "VMM exiting");
    // The request that ended it (the delete of its VM, say) still gets its answer.
    let _ = quit.send(());
    if tokio::time::timeout(Duration::from_secs(5), &mut server)
        .await
        .is_err()
    {
        server.abort();
    }
    let m = vmm.clone();
    let _ = tokio::task::spawn_blocking(move || m.shutdown()).await;
    let record = ExitRecord {
        pid: std::process::id(),
        reason: reason.clone(),
        unix_ms: now_unix_ms(),
    };
    if let Ok(bytes) = serde_json::to_vec_pretty(&record) {
        if let Err(e) = write_atomic(&run_dir.join(EXIT_FILE), &bytes) {
            tracing::warn!(error = %e, "cannot write the exit record");
        }
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(run_dir.join(PID_FILE));
    Ok(reason)
}
