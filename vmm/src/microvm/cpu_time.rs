//! CPU time of a vCPU thread, readable from any thread.
//!
//! A vCPU that runs guest code natively makes few exits, so the thread cannot report its own
//! CPU time often enough; instead it publishes its POSIX CPU-time clock id and the monitor reads
//! that clock directly. When the thread ends it publishes its final time instead.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct ThreadCpuClock {
    clock_id: AtomicI32,
    live: AtomicBool,
    final_ns: AtomicU64,
}

impl ThreadCpuClock {
    /// Publishes the calling thread's CPU clock. Call from the vCPU thread when it starts.
    pub fn attach_current_thread(&self) {
        let mut clock_id: libc::clockid_t = 0;
        // SAFETY: pthread_self() is always a valid thread handle for the calling thread, and
        // `clock_id` is a valid out pointer for the duration of the call.
        let ret = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock_id) };
        if ret == 0 {
            self.clock_id.store(clock_id, Ordering::Release);
            self.live.store(true, Ordering::Release);
        }
    }

    /// Stores the calling thread's final CPU time. Call from the vCPU thread just before it ends.
    pub fn detach_current_thread(&self) {
        let ns = read_clock(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0);
        self.final_ns.store(ns, Ordering::Release);
        self.live.store(false, Ordering::Release);
    }

    /// CPU time the thread has used, nanoseconds.
    pub fn nanos(&self) -> u64 {
        if self.live.load(Ordering::Acquire) {
            if let Some(ns) = read_clock(self.clock_id.load(Ordering::Acquire)) {
                return ns;
            }
        }
        self.final_ns.load(Ordering::Acquire)
    }
}

fn read_clock(clock_id: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; an invalid clock id (a thread that just ended) makes
    // the call fail with EINVAL, which we report as None.
    let ret = unsafe { libc::clock_gettime(clock_id, &mut ts) };
    (ret == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn measures_another_threads_cpu_time() {
        let clock = Arc::new(ThreadCpuClock::default());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread_clock = clock.clone();
        let thread = std::thread::spawn(move || {
            thread_clock.attach_current_thread();
            started_tx.send(()).unwrap();
            let mut x = 0u64;
            while stop_rx.try_recv().is_err() {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            thread_clock.detach_current_thread();
        });
        started_rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let busy = clock.nanos();
        assert!(busy > 10_000_000, "spinning thread used only {busy} ns");
        stop_tx.send(()).unwrap();
        thread.join().unwrap();
        assert!(clock.nanos() >= busy);
    }
}
