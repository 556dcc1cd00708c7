//! vCPU threads: one thread per vCPU runs `KVM_RUN` in a loop, dispatches port I/O to the
//! devices, and parks when asked to pause, serving state-save requests while parked.
//!
//! Pausing follows KVM_NOTES.md: the controller sets the desired state, then kicks the thread
//! with a real-time signal (handler installed without SA_RESTART) until the thread reports it
//! parked; `KVM_RUN` returns EINTR on the kick. Before parking, a thread whose last exit was
//! port I/O re-enters `KVM_RUN` once with `immediate_exit` set, which completes that
//! instruction, so saved registers never point into a half-done I/O.

use std::collections::VecDeque;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_mp_state, kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::cpu_time::ThreadCpuClock;
use super::devices::{Devices, PortAction};
use super::state::VcpuState;

/// Offset from SIGRTMIN of the signal that kicks a vCPU out of `KVM_RUN`.
const KICK_SIGNAL_OFFSET: i32 = 0;
/// How often an unanswered kick is repeated (a kick that lands just before `KVM_RUN` is lost).
const KICK_RETRY: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("Cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("Cannot start the thread of vCPU {0}")]
    Spawn(u32, #[source] std::io::Error),
    #[error("KVM call {call} failed on vCPU {id}")]
    Kvm {
        id: u32,
        call: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id} read or wrote {done} of {wanted} MSRs")]
    Msrs { id: u32, done: usize, wanted: usize },
    #[error("vCPU {0} did not stop within {1:?}")]
    PauseTimeout(u32, Duration),
    #[error("vCPU {0} is not paused")]
    NotPaused(u32),
    #[error("vCPU {0} thread is gone")]
    Gone(u32),
}

fn kvm_err(id: u32, call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, call, source }
}

/// What the controller wants the thread to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Desired {
    Run,
    Pause,
    Stop,
}

/// What the thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStatus {
    Starting,
    Running,
    Paused,
    Crashed,
    Exited,
}

enum Request {
    Save(mpsc::Sender<Result<VcpuState, VcpuError>>),
}

struct Control {
    desired: Desired,
    status: VcpuStatus,
    requests: VecDeque<Request>,
    crash_reason: Option<String>,
}

struct Shared {
    id: u32,
    control: Mutex<Control>,
    changed: Condvar,
    clock: ThreadCpuClock,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The controller's handle on one vCPU thread.
pub struct VcpuHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHandle")
            .field("id", &self.shared.id)
            .field("status", &self.status())
            .finish()
    }
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, handle_kick)
            .map_err(VcpuError::SignalHandler);
    });
    result
}

impl VcpuHandle {
    /// Starts the thread of an already configured vCPU, running or paused.
    pub fn spawn(
        fd: VcpuFd,
        id: u32,
        vm_name: &str,
        devices: Arc<Devices>,
        msr_indices: Arc<Vec<u32>>,
        start_paused: bool,
    ) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let shared = Arc::new(Shared {
            id,
            control: Mutex::new(Control {
                desired: if start_paused {
                    Desired::Pause
                } else {
                    Desired::Run
                },
                status: VcpuStatus::Starting,
                requests: VecDeque::new(),
                crash_reason: None,
            }),
            changed: Condvar::new(),
            clock: ThreadCpuClock::default(),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}-{vm_name}"))
            .spawn(move || {
                let mut runner = Runner {
                    fd,
                    shared: thread_shared,
                    devices,
                    msr_indices,
                    pending_io: false,
                };
                runner.shared.clock.attach_current_thread();
                runner.run_loop();
                runner.shared.clock.detach_current_thread();
                let mut control = runner.shared.lock();
                control.status = VcpuStatus::Exited;
                runner.shared.changed.notify_all();
            })
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuHandle {
            shared,
            thread: Some(thread),
        })
    }

    pub fn id(&self) -> u32 {
        self.shared.id
    }

    pub fn status(&self) -> VcpuStatus {
        self.shared.lock().status
    }

    pub fn crash_reason(&self) -> Option<String> {
        self.shared.lock().crash_reason.clone()
    }

    /// CPU time this vCPU's thread has used, seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.shared.clock.nanos() as f64 / 1e9
    }

    fn kick(&self) {
        if let Some(thread) = &self.thread {
            // A failed kick (thread already gone) is fine: the status check below ends the wait.
            let _ = thread.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
        }
    }

    /// Asks the thread to park; returns at once. Follow with `wait_parked`.
    pub fn request_pause(&self) {
        let mut control = self.shared.lock();
        if control.desired == Desired::Run {
            control.desired = Desired::Pause;
        }
        self.shared.changed.notify_all();
    }

    /// Kicks the thread until it has parked (or crashed, or ended).
    pub fn wait_parked(&self, timeout: Duration) -> Result<(), VcpuError> {
        let deadline = Instant::now() + timeout;
        let mut control = self.shared.lock();
        loop {
            if matches!(
                control.status,
                VcpuStatus::Paused | VcpuStatus::Crashed | VcpuStatus::Exited
            ) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VcpuError::PauseTimeout(self.shared.id, timeout));
            }
            drop(control);
            self.kick();
            control = self.shared.lock();
            control = self
                .shared
                .changed
                .wait_timeout(control, KICK_RETRY)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn resume(&self) {
        let mut control = self.shared.lock();
        if control.desired == Desired::Pause {
            control.desired = Desired::Run;
        }
        self.shared.changed.notify_all();
    }

    /// Saves the vCPU's state; the vCPU must be parked.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let (tx, rx) = mpsc::channel();
        {
            let mut control = self.shared.lock();
            if control.status != VcpuStatus::Paused {
                return Err(VcpuError::NotPaused(self.shared.id));
            }
            control.requests.push_back(Request::Save(tx));
            self.shared.changed.notify_all();
        }
        rx.recv().map_err(|_| VcpuError::Gone(self.shared.id))?
    }

    /// Ends the thread and waits for it.
    pub fn stop(&mut self) {
        {
            let mut control = self.shared.lock();
            control.desired = Desired::Stop;
            self.shared.changed.notify_all();
        }
        let Some(thread) = self.thread.take() else {
            return;
        };
        loop {
            let control = self.shared.lock();
            if control.status == VcpuStatus::Exited {
                break;
            }
            drop(control);
            let _ = thread.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
            let control = self.shared.lock();
            let _ = self
                .shared
                .changed
                .wait_timeout(control, KICK_RETRY)
                .unwrap_or_else(|e| e.into_inner());
        }
        if thread.join().is_err() {
            tracing::error!(vcpu = self.shared.id, "vCPU thread panicked");
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread side.
struct Runner {
    fd: VcpuFd,
    shared: Arc<Shared>,
    devices: Arc<Devices>,
    msr_indices: Arc<Vec<u32>>,
    /// The last exit was port I/O that `KVM_RUN` has not completed yet.
    pending_io: bool,
}

impl Runner {
    fn run_loop(&mut self) {
        loop {
            if !self.wait_until_runnable() {
                return;
            }
            let outcome = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => Some(self.devices.io_out(port, data)),
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.devices.io_in(port, data);
                    Some(PortAction::Continue)
                }
                Ok(VcpuExit::MmioRead(_, data)) => {
                    data.fill(0xff);
                    None
                }
                Ok(VcpuExit::MmioWrite(..)) => None,
                Ok(VcpuExit::Hlt) => Some(PortAction::Sleep(None)),
                Ok(VcpuExit::Shutdown) => Some(PortAction::Crash(format!(
                    "the guest triple-faulted (KVM_EXIT_SHUTDOWN) at rip {:#x}",
                    self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
                ))),
                Ok(VcpuExit::InternalError) => {
                    let suberror =
                        // SAFETY: KVM filled the `internal` member of the union for this exit.
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    Some(PortAction::Crash(format!(
                        "KVM internal error, suberror {suberror}"
                    )))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(PortAction::Crash(format!(
                    "KVM could not enter the guest: hardware reason {reason:#x} on cpu {cpu}"
                ))),
                Ok(exit) => {
                    tracing::warn!(vcpu = self.shared.id, ?exit, "unexpected vCPU exit");
                    None
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(PortAction::Crash(format!("KVM_RUN failed: {e}"))),
            };
            // Any I/O exit needs one more KVM_RUN to complete; others don't, but re-entering
            // once more with immediate_exit costs nothing.
            self.pending_io = outcome.is_some();
            match outcome {
                Some(PortAction::Sleep(duration)) => self.sleep(duration),
                Some(PortAction::Crash(reason)) => self.crash(reason),
                Some(PortAction::Continue) | None => {}
            }
        }
    }

    /// Parks while paused (serving requests); returns false when the thread must end.
    fn wait_until_runnable(&mut self) -> bool {
        let shared = self.shared.clone();
        let mut control = shared.lock();
        loop {
            match (control.desired, control.status) {
                (Desired::Stop, _) => return false,
                (Desired::Run, status) if status != VcpuStatus::Crashed => {
                    if status != VcpuStatus::Running {
                        control.status = VcpuStatus::Running;
                        shared.changed.notify_all();
                    }
                    return true;
                }
                (desired, status) => {
                    if desired == Desired::Pause
                        && status != VcpuStatus::Paused
                        && status != VcpuStatus::Crashed
                    {
                        self.complete_pending_io();
                        control.status = VcpuStatus::Paused;
                        shared.changed.notify_all();
                    }
                    while let Some(request) = control.requests.pop_front() {
                        match request {
                            Request::Save(reply) => {
                                let _ =
                                    reply.send(save_vcpu(&self.fd, shared.id, &self.msr_indices));
                            }
                        }
                    }
                    control = shared
                        .changed
                        .wait(control)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    fn complete_pending_io(&mut self) {
        if !self.pending_io {
            return;
        }
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            other => tracing::warn!(
                vcpu = self.shared.id,
                result = ?other.map(|exit| format!("{exit:?}")),
                "completing pending I/O did not return EINTR"
            ),
        }
        self.fd.set_kvm_immediate_exit(0);
        self.pending_io = false;
    }

    /// Parks for `duration` (or until woken), ending early on a pause or stop.
    fn sleep(&self, duration: Option<Duration>) {
        let deadline = duration.map(|d| Instant::now() + d);
        let mut control = self.shared.lock();
        while control.desired == Desired::Run {
            control = match deadline {
                None => self
                    .shared
                    .changed
                    .wait(control)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    self.shared
                        .changed
                        .wait_timeout(control, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    fn crash(&mut self, reason: String) {
        tracing::error!(vcpu = self.shared.id, %reason, "guest crashed");
        self.complete_pending_io();
        let mut control = self.shared.lock();
        control.status = VcpuStatus::Crashed;
        control.crash_reason = Some(reason);
        self.shared.changed.notify_all();
    }
}

/// Reads every piece of vCPU state KVM holds. The vCPU must not be in `KVM_RUN`.
pub fn save_vcpu(fd: &VcpuFd, id: u32, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(id, "KVM_GET_CPUID2"))?;
    let mp_state = fd.get_mp_state().map_err(kvm_err(id, "KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm_err(id, "KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm_err(id, "KVM_GET_XCRS"))?;
    let debugregs = fd
        .get_debug_regs()
        .map_err(kvm_err(id, "KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    let events = fd
        .get_vcpu_events()
        .map_err(kvm_err(id, "KVM_GET_VCPU_EVENTS"))?;
    let tsc_khz = fd.get_tsc_khz().map_err(kvm_err(id, "KVM_GET_TSC_KHZ"))?;
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
        id,
        done: 0,
        wanted: entries.len(),
    })?;
    let done = fd
        .get_msrs(&mut msrs)
        .map_err(kvm_err(id, "KVM_GET_MSRS"))?;
    if done != entries.len() {
        return Err(VcpuError::Msrs {
            id,
            done,
            wanted: entries.len(),
        });
    }
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs: msrs.as_slice().to_vec(),
        events,
        tsc_khz,
    })
}

/// Writes saved state into a fresh vCPU that has not run yet (a PVM vCPU's privilege level can
/// only be set before its first run). Order as Firecracker's restore: cpuid first, MSRs after
/// the LAPIC, events last.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuError> {
    let id = state.id;
    let cpuid = kvm_bindings::CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::Kvm {
        id,
        call: "KVM_SET_CPUID2",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs)
        .map_err(kvm_err(id, "KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
    // SAFETY: `state.xsave` is a whole `kvm_xsave` (4 KiB), the size KVM_SET_XSAVE expects when
    // the VM has not enabled KVM_CAP_XSAVE2, which Godwit never does.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm_err(id, "KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs)
        .map_err(kvm_err(id, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm_err(id, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|_| VcpuError::Msrs {
        id,
        done: 0,
        wanted: state.msrs.len(),
    })?;
    let done = fd.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    if done != state.msrs.len() {
        return Err(VcpuError::Msrs {
            id,
            done,
            wanted: state.msrs.len(),
        });
    }
    fd.set_vcpu_events(&state.events)
        .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// With an in-kernel irqchip, vCPUs other than 0 start UNINITIALIZED (waiting for an INIT/SIPI
/// the built-in guests never send): make them runnable.
pub fn make_runnable(fd: &VcpuFd, id: u32) -> Result<(), VcpuError> {
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(kvm_err(id, "KVM_SET_MP_STATE"))
}
