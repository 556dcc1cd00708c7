//! userfaultfd: how the post-copy migration target learns which guest pages are still missing,
//! and how it installs them.
//!
//! The target maps guest memory as an anonymous private mapping and registers it here in MISSING
//! mode. A thread that touches a page that has not arrived yet blocks in the kernel (a vCPU
//! blocks inside KVM, also on the guest page-table walk) and the fault shows up on
//! [`Userfault::wait_fault`] or [`Userfault::read_faults`]. The fault-handling thread answers with
//! [`Userfault::copy`] of a small chunk around the faulting page, which wakes the waiters; the
//! page-arrival path pushes everything else in bulk with `copy(.., wake: false)`. [`discard`]
//! drops pages so that they fault again.
//!
//! Raw syscalls and ioctls through `libc`: the `userfaultfd` crate needs libclang to build. The
//! kernel ABI structs are defined here and checked against the UAPI layout in the tests.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// Kernel ABI, include/uapi/linux/userfaultfd.h. The numbers use the generic _IOC encoding that
// x86_64 and aarch64 share; a test recomputes them from the struct sizes.
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: u64 = 0xC018_AA3F;
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
const UFFDIO_UNREGISTER: u64 = 0x8010_AA01;
const UFFDIO_WAKE: u64 = 0x8010_AA02;
const UFFDIO_COPY: u64 = 0xC028_AA03;
const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04;
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;

/// Ioctls a fresh userfaultfd must offer (`1 << _UFFDIO_*`): REGISTER, UNREGISTER, API.
const API_IOCTLS: u64 = (1 << 0x00) | (1 << 0x01) | (1 << 0x3F);
/// Ioctls a registered range must offer: WAKE, COPY, ZEROPAGE.
const RANGE_IOCTLS: u64 = (1 << 0x02) | (1 << 0x03) | (1 << 0x04);

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;

/// Messages taken per read(2) by [`Userfault::read_faults`] (32 bytes each).
const READ_BATCH: usize = 64;
/// How often an EAGAIN without progress (the mm is changing under us) is retried before it is
/// reported. Only non-cooperative events cause it, and this module enables none.
const MAX_STALLS: u32 = 64;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`; `copy` comes back as bytes copied or a negative errno.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`; `zeropage` comes back like `uffdio_copy::copy`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`. The kernel declares it `__packed`, but every field is naturally aligned,
/// so `repr(C)` gives the same 32 bytes. Only the pagefault arm of the `arg` union is spelled
/// out: other events are recognised by `event` and skipped.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    pagefault: UffdPagefault,
}

/// The `arg.pagefault` arm of `struct uffd_msg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdPagefault {
    flags: u64,
    address: u64,
    _ptid: u32,
    _pad: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("Cannot create a userfaultfd")]
    Create {
        #[source]
        source: io::Error,
    },
    #[error("Cannot create a userfaultfd through /dev/userfaultfd after userfaultfd(2) was refused ({refused})")]
    CreateDevice {
        refused: io::Error,
        #[source]
        source: io::Error,
    },
    #[error("UFFDIO_API handshake failed")]
    Api {
        #[source]
        source: io::Error,
    },
    #[error("UFFDIO_API answered api {api:#x} with ioctls {ioctls:#x}, expected api 0xaa with REGISTER, UNREGISTER and API")]
    ApiMismatch { api: u64, ioctls: u64 },
    #[error("{op} of {len} bytes at {addr:#x} is empty, not page-aligned or wraps around")]
    BadRange {
        op: &'static str,
        addr: u64,
        len: usize,
    },
    #[error("UFFDIO_REGISTER of {len} bytes at {addr:#x} failed")]
    Register {
        addr: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("Range of {len} bytes at {addr:#x} offers ioctls {ioctls:#x}, not all of UFFDIO_COPY, UFFDIO_ZEROPAGE and UFFDIO_WAKE")]
    RangeIoctls { addr: u64, len: usize, ioctls: u64 },
    #[error("UFFDIO_UNREGISTER of {len} bytes at {addr:#x} failed")]
    Unregister {
        addr: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("Cannot poll the userfaultfd")]
    Poll {
        #[source]
        source: io::Error,
    },
    #[error("Cannot read events from the userfaultfd")]
    Read {
        #[source]
        source: io::Error,
    },
    #[error("Reading the userfaultfd returned {bytes} bytes, not whole 32-byte messages")]
    ShortRead { bytes: usize },
    /// `dst`/`len` are the part not handled; everything before `dst` was installed or present.
    #[error("UFFDIO_COPY of {len} bytes at {dst:#x} failed")]
    Copy {
        dst: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    /// `dst`/`len` are the part not handled; everything before `dst` was installed or present.
    #[error("UFFDIO_ZEROPAGE of {len} bytes at {dst:#x} failed")]
    Zeropage {
        dst: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("UFFDIO_WAKE of {len} bytes at {addr:#x} failed")]
    Wake {
        addr: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("MADV_DONTNEED of {len} bytes at {addr:#x} failed")]
    Discard {
        addr: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
}

/// A missing-page fault: some thread touched `addr`'s page and waits until it is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fault {
    /// Start of the faulting page.
    pub addr: u64,
    /// The access was a write.
    pub write: bool,
}

/// What [`Userfault::copy`] or [`Userfault::zeropage`] did with the range, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyOutcome {
    /// Bytes installed by this call.
    pub installed: usize,
    /// Bytes that were already present (EEXIST) and were left as they were.
    pub present: usize,
}

impl CopyOutcome {
    /// Nothing was installed: every page was already there.
    pub fn all_present(&self) -> bool {
        self.installed == 0 && self.present > 0
    }
}

/// A userfaultfd with the API handshake done. Any number of threads may use it at once: one or
/// more fault handlers reading events while page-arrival threads install pages.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    /// Features the kernel supports (UFFDIO_API answer); none is enabled.
    features: u64,
}

impl Userfault {
    /// Creates a userfaultfd (O_CLOEXEC, O_NONBLOCK) that also handles faults taken in kernel
    /// mode, as KVM's are. Falls back to `/dev/userfaultfd` when userfaultfd(2) is refused
    /// (`vm.unprivileged_userfaultfd = 0`) or missing.
    pub fn new() -> Result<Self, UffdError> {
        let fd = match open_syscall() {
            Ok(fd) => fd,
            Err(refused) if matches!(refused.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) => {
                open_device().map_err(|source| UffdError::CreateDevice { refused, source })?
            }
            Err(source) => return Err(UffdError::Create { source }),
        };
        Self::handshake(fd)
    }

    /// Runs UFFDIO_API with no optional feature: no fork/remap/remove events (an enabled REMOVE
    /// event would block [`discard`] until the handler reads it) and no SIGBUS mode.
    fn handshake(fd: OwnedFd) -> Result<Self, UffdError> {
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API takes a `struct uffdio_api`, which `api` is.
        unsafe { uffd_ioctl(fd.as_fd(), UFFDIO_API, &mut api) }
            .map_err(|source| UffdError::Api { source })?;
        if api.api != UFFD_API || api.ioctls & API_IOCTLS != API_IOCTLS {
            return Err(UffdError::ApiMismatch {
                api: api.api,
                ioctls: api.ioctls,
            });
        }
        Ok(Self {
            fd,
            features: api.features,
        })
    }

    /// The `UFFD_FEATURE_*` bits the kernel supports.
    pub fn supported_features(&self) -> u64 {
        self.features
    }

    /// Registers `addr..addr + len` in MISSING mode: from now on, a touch of a page that is not
    /// present blocks until [`copy`](Self::copy) or [`zeropage`](Self::zeropage) installs it.
    ///
    /// Never touch a missing page of the range from a thread that serves its faults: it would
    /// wait for itself.
    ///
    /// # Safety
    ///
    /// For as long as the range is registered:
    /// - it is (part of) a private anonymous mapping that the caller owns and keeps mapped, and
    /// - no Rust value lives in it (nothing reached through a reference, `Box`, `Vec` or stack
    ///   slot): it is accessed only through raw pointers or volatile accesses, as vm-memory and
    ///   KVM do with guest memory.
    ///
    /// This is the promise that makes [`copy`](Self::copy) and [`zeropage`](Self::zeropage) safe:
    /// they may fill any missing page of the range, from any thread, with any content.
    pub unsafe fn register_missing(&self, addr: *mut u8, len: usize) -> Result<(), UffdError> {
        let start = addr as u64;
        check_range("UFFDIO_REGISTER", start, len)?;
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`, which `reg` is. The kernel
        // writes no user memory besides it; that faults in the range now wait for us is what
        // the caller vouched for.
        unsafe { uffd_ioctl(self.fd.as_fd(), UFFDIO_REGISTER, &mut reg) }.map_err(|source| {
            UffdError::Register {
                addr: start,
                len,
                source,
            }
        })?;
        if reg.ioctls & RANGE_IOCTLS != RANGE_IOCTLS {
            // Best effort: the range is useless to us, and the error below is the one to report.
            let _ = self.unregister(addr, len);
            return Err(UffdError::RangeIoctls {
                addr: start,
                len,
                ioctls: reg.ioctls,
            });
        }
        Ok(())
    }

    /// Unregisters `addr..addr + len`. Threads waiting on its missing pages are woken and, like
    /// any later touch, get zero-filled pages. Safe: it only gives the range back its ordinary
    /// demand-zero behaviour.
    pub fn unregister(&self, addr: *mut u8, len: usize) -> Result<(), UffdError> {
        let start = addr as u64;
        check_range("UFFDIO_UNREGISTER", start, len)?;
        let mut range = UffdioRange {
            start,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`, which `range` is; the kernel
        // writes no user memory.
        unsafe { uffd_ioctl(self.fd.as_fd(), UFFDIO_UNREGISTER, &mut range) }.map_err(|source| {
            UffdError::Unregister {
                addr: start,
                len,
                source,
            }
        })
    }

    /// Waits up to `timeout` for one page fault; `Ok(None)` if none came. Other events are
    /// skipped.
    pub fn wait_fault(&self, timeout: Duration) -> Result<Option<Fault>, UffdError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut msg = [UffdMsg::default()];
        loop {
            if self.next_messages(&mut msg, deadline)? == 0 {
                return Ok(None);
            }
            if let Some(fault) = Fault::from_msg(&msg[0]) {
                return Ok(Some(fault));
            }
        }
    }

    /// Waits up to `timeout` for page faults and appends every one pending (up to 64 per call,
    /// in one read) to `out`. Returns how many were appended, 0 on timeout. Several threads may
    /// fault on one page: expect duplicates.
    pub fn read_faults(&self, out: &mut Vec<Fault>, timeout: Duration) -> Result<usize, UffdError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut msgs = [UffdMsg::default(); READ_BATCH];
        loop {
            let n = self.next_messages(&mut msgs, deadline)?;
            if n == 0 {
                return Ok(0);
            }
            let before = out.len();
            out.extend(msgs[..n].iter().filter_map(Fault::from_msg));
            if out.len() > before {
                return Ok(out.len() - before);
            }
        }
    }

    /// Installs `src` at `dst` (UFFDIO_COPY); `src.len()` is a non-zero multiple of the page
    /// size. Pages already present are left alone and counted in [`CopyOutcome::present`]; a
    /// partial copy is continued. With `wake`, threads waiting on the range are woken, also
    /// those waiting on pages that turned out present (installed earlier without a wake).
    /// Without it, waiters stay blocked until a later [`wake`](Self::wake) or waking copy.
    pub fn copy(&self, dst: u64, src: &[u8], wake: bool) -> Result<CopyOutcome, UffdError> {
        check_range("UFFDIO_COPY", dst, src.len())?;
        self.fill(dst, src.len(), Some(src), wake)
    }

    /// Maps the zero page over `dst..dst + len` (UFFDIO_ZEROPAGE): cheaper than copying zeros,
    /// and a later write takes an ordinary copy-on-write fault, not a userfault. Present pages
    /// and `wake` are handled as in [`copy`](Self::copy).
    pub fn zeropage(&self, dst: u64, len: usize, wake: bool) -> Result<CopyOutcome, UffdError> {
        check_range("UFFDIO_ZEROPAGE", dst, len)?;
        self.fill(dst, len, None, wake)
    }

    /// Wakes the threads waiting on `addr..addr + len` (UFFDIO_WAKE). Those whose page is still
    /// missing fault again.
    pub fn wake(&self, addr: u64, len: usize) -> Result<(), UffdError> {
        check_range("UFFDIO_WAKE", addr, len)?;
        let mut range = UffdioRange {
            start: addr,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`, which `range` is; the kernel writes
        // no user memory.
        unsafe { uffd_ioctl(self.fd.as_fd(), UFFDIO_WAKE, &mut range) }
            .map_err(|source| UffdError::Wake { addr, len, source })
    }

    /// One loop for COPY (`src` given) and ZEROPAGE: the kernel stops at the first present page
    /// (EEXIST if it is the first, else a partial count with EAGAIN), so skip such pages one by
    /// one and go on with the rest.
    fn fill(
        &self,
        dst: u64,
        len: usize,
        src: Option<&[u8]>,
        wake: bool,
    ) -> Result<CopyOutcome, UffdError> {
        let page = page_size();
        let mut outcome = CopyOutcome::default();
        let mut done = 0;
        let mut stalls = 0;
        while done < len {
            let at = dst + done as u64;
            let rest = len - done;
            let (result, progress) = match src {
                Some(src) => self.copy_once(at, &src[done..], wake),
                None => self.zeropage_once(at, rest, wake),
            };
            // The kernel counts in whole pages; round down all the same, so `done` stays aligned.
            let progress = usize::try_from(progress).unwrap_or(0).min(rest) & !(page - 1);
            match result.as_ref().map_err(io::Error::raw_os_error) {
                Ok(()) => {
                    outcome.installed += rest;
                    done = len;
                }
                Err(Some(libc::EAGAIN)) if progress > 0 => {
                    outcome.installed += progress;
                    done += progress;
                    stalls = 0;
                }
                Err(Some(libc::EEXIST)) => {
                    outcome.present += page;
                    done += page;
                }
                Err(Some(libc::EAGAIN)) if stalls < MAX_STALLS => {
                    stalls += 1;
                    std::thread::yield_now();
                }
                Err(_) => {
                    let source = result.unwrap_err();
                    return Err(match src {
                        Some(_) => UffdError::Copy {
                            dst: at,
                            len: rest,
                            source,
                        },
                        None => UffdError::Zeropage {
                            dst: at,
                            len: rest,
                            source,
                        },
                    });
                }
            }
        }
        // The kernel wakes only what it installed; a waiter may sit on a page that was installed
        // without a wake. One wake over the whole range covers both.
        if wake && outcome.present > 0 {
            self.wake(dst, len)?;
        }
        Ok(outcome)
    }

    /// One UFFDIO_COPY; returns the ioctl result and the kernel's `copy` field.
    fn copy_once(&self, dst: u64, src: &[u8], wake: bool) -> (io::Result<()>, i64) {
        let mut copy = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`, which `copy` is. The kernel reads
        // `len` bytes at `src`, which the borrowed slice keeps readable. It writes only pages of
        // `dst..dst + len` that are missing in a registered range (ENOENT for unregistered
        // memory, EEXIST for present pages), and `register_missing`'s contract says no Rust
        // value lives there.
        let result = unsafe { uffd_ioctl(self.fd.as_fd(), UFFDIO_COPY, &mut copy) };
        (result, copy.copy)
    }

    /// One UFFDIO_ZEROPAGE; returns the ioctl result and the kernel's `zeropage` field.
    fn zeropage_once(&self, dst: u64, len: usize, wake: bool) -> (io::Result<()>, i64) {
        let mut zero = UffdioZeropage {
            range: UffdioRange {
                start: dst,
                len: len as u64,
            },
            mode: if wake {
                0
            } else {
                UFFDIO_ZEROPAGE_MODE_DONTWAKE
            },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage`, which `zero` is. It maps the
        // zero page only over missing pages of a registered range, where `register_missing`'s
        // contract says no Rust value lives.
        let result = unsafe { uffd_ioctl(self.fd.as_fd(), UFFDIO_ZEROPAGE, &mut zero) };
        (result, zero.zeropage)
    }

    /// Reads pending messages into `buf`, polling until `deadline` (`None`: forever) when there
    /// are none. Returns how many were read, 0 once the deadline has passed.
    fn next_messages(
        &self,
        buf: &mut [UffdMsg],
        deadline: Option<Instant>,
    ) -> Result<usize, UffdError> {
        loop {
            // Read first: under load events are already queued and the poll would be wasted.
            let n = self.read_messages(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if !self.poll_readable(deadline)? {
                return Ok(0);
            }
        }
    }

    /// One non-blocking read; 0 when nothing is queued (or another reader took it).
    fn read_messages(&self, buf: &mut [UffdMsg]) -> Result<usize, UffdError> {
        // SAFETY: the kernel writes at most `size_of_val(buf)` bytes into `buf`, which we borrow
        // mutably, and any bytes are a valid `UffdMsg` (integers only).
        let ret = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                std::mem::size_of_val(buf),
            )
        };
        if ret < 0 {
            let source = io::Error::last_os_error();
            return match source.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(UffdError::Read { source }),
            };
        }
        let bytes = ret as usize;
        if bytes % size_of::<UffdMsg>() != 0 {
            return Err(UffdError::ShortRead { bytes });
        }
        Ok(bytes / size_of::<UffdMsg>())
    }

    /// Polls for readability until `deadline`; false on timeout.
    fn poll_readable(&self, deadline: Option<Instant>) -> Result<bool, UffdError> {
        loop {
            let timeout_ms = match deadline {
                None => -1,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    // Round up: a 300 us wait must not become a busy poll.
                    let ms = left.as_nanos().div_ceil(1_000_000);
                    i32::try_from(ms).unwrap_or(i32::MAX)
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid `pollfd` that outlives the call.
            let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            match ret {
                0 => return Ok(false),
                1.. if pfd.revents & libc::POLLIN != 0 => return Ok(true),
                // POLLERR: the fd is blocking or not initialised, neither of which `new` makes.
                1.. => {
                    let revents = pfd.revents;
                    let source = io::Error::other(format!("poll revents {revents:#x}"));
                    return Err(UffdError::Poll { source });
                }
                _ => {
                    let source = io::Error::last_os_error();
                    if source.kind() != io::ErrorKind::Interrupted {
                        return Err(UffdError::Poll { source });
                    }
                }
            }
        }
    }
}

impl AsFd for Userfault {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Fault {
    fn from_msg(msg: &UffdMsg) -> Option<Self> {
        (msg.event == UFFD_EVENT_PAGEFAULT).then(|| Fault {
            addr: msg.pagefault.address & !(page_size() as u64 - 1),
            write: msg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
        })
    }
}

/// Drops the pages of `addr..addr + len` (MADV_DONTNEED) so that the next touch faults again:
/// into the handler if the range is registered, else onto a zero-filled page.
///
/// # Safety
///
/// The range is (part of) a private anonymous mapping that the caller owns and in which no Rust
/// value lives (see [`Userfault::register_missing`]): its contents are thrown away.
pub unsafe fn discard(addr: *mut u8, len: usize) -> Result<(), UffdError> {
    check_range("MADV_DONTNEED", addr as u64, len)?;
    // SAFETY: the range is page-aligned and, per the caller, an owned private anonymous mapping
    // that holds no Rust value, so dropping its pages invalidates nothing.
    let ret = unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTNEED) };
    if ret != 0 {
        return Err(UffdError::Discard {
            addr: addr as u64,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The kernel rejects these too (EINVAL), but checking first gives an error that says which
/// range was wrong, and keeps `len == 0` (which UFFDIO_WAKE reads as "everything") out.
fn check_range(op: &'static str, addr: u64, len: usize) -> Result<(), UffdError> {
    let page = page_size() as u64;
    let aligned = addr % page == 0 && len as u64 % page == 0;
    if len == 0 || !aligned || addr.checked_add(len as u64).is_none() {
        return Err(UffdError::BadRange { op, addr, len });
    }
    Ok(())
}

fn page_size() -> usize {
    static PAGE_SIZE: OnceLock<usize> = OnceLock::new();
    *PAGE_SIZE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system and touches no memory of ours.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size).unwrap_or(4096)
    })
}

fn open_syscall() -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes one flags argument and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall succeeded, so `ret` is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

fn open_device() -> io::Result<OwnedFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd or -1.
    let ret = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            USERFAULTFD_IOC_NEW as libc::Ioctl,
            libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl succeeded, so `ret` is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

/// Issues a userfaultfd ioctl whose argument is a pointer to `T`.
///
/// # Safety
///
/// `request` must be a userfaultfd ioctl that takes a pointer to a `T`, and whatever user memory
/// the request itself reads or writes (beyond `*arg`) must be valid for that.
unsafe fn uffd_ioctl<T>(fd: BorrowedFd<'_>, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a valid, exclusive `T` for the call; the rest is the caller's promise.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg as *mut T) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::mem::offset_of;
    use std::ptr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread;

    use super::*;

    const PAGE: usize = 4096;
    const WAIT: Duration = Duration::from_secs(5);

    /// An anonymous private mapping like the target's guest memory, unmapped on drop.
    struct Anon {
        ptr: *mut u8,
        len: usize,
    }

    impl Anon {
        fn new(len: usize) -> Self {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            // SAFETY: a fresh anonymous mapping at an address of the kernel's choice.
            let ptr = unsafe { libc::mmap(ptr::null_mut(), len, prot, flags, -1, 0) };
            assert_ne!(ptr, libc::MAP_FAILED, "{}", io::Error::last_os_error());
            Self {
                ptr: ptr.cast(),
                len,
            }
        }

        fn base(&self) -> u64 {
            self.ptr as u64
        }

        fn page(&self, index: usize) -> u64 {
            self.base() + (index * PAGE) as u64
        }

        /// Which pages are present (mincore), so the test never reads a missing page from a
        /// thread that would then wait forever.
        fn resident(&self) -> Vec<bool> {
            let mut vec = vec![0u8; self.len / PAGE];
            // SAFETY: the mapping is ours and `vec` has one byte per page.
            let ret = unsafe { libc::mincore(self.ptr.cast(), self.len, vec.as_mut_ptr()) };
            assert_eq!(ret, 0, "{}", io::Error::last_os_error());
            vec.iter().map(|b| b & 1 != 0).collect()
        }

        /// Registers the whole mapping.
        fn register(&self, uffd: &Userfault) {
            // SAFETY: the mapping is ours, private anonymous, outlives its registration (the
            // fd or the mapping goes first, either ends it) and holds no Rust value: the tests
            // access it only through `read`/`write` below.
            unsafe { uffd.register_missing(self.ptr, self.len) }.unwrap();
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping created in `new`, which nothing references.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    /// Reads the `word`th u64 of the page at `page` (may block on a missing page).
    fn read(page: u64, word: usize) -> u64 {
        // SAFETY: the tests pass addresses inside a live `Anon` mapping, aligned to 8.
        unsafe { ptr::read_volatile((page as *const u64).add(word)) }
    }

    fn write(page: u64, word: usize, value: u64) {
        // SAFETY: as in `read`.
        unsafe { ptr::write_volatile((page as *mut u64).add(word), value) }
    }

    /// The content the handler installs at page `index` of the mapping.
    fn pattern(index: usize, word: usize) -> u64 {
        (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ word as u64
    }

    fn fill_pattern(buf: &mut [u8], first_page: usize) {
        for (i, word) in buf.chunks_exact_mut(8).enumerate() {
            let value = pattern(first_page + i * 8 / PAGE, i % (PAGE / 8));
            word.copy_from_slice(&value.to_ne_bytes());
        }
    }

    fn uffd_or_skip(test: &str) -> Option<Userfault> {
        match Userfault::new() {
            Ok(uffd) => Some(uffd),
            Err(e) => {
                let cause = e.source().map(ToString::to_string).unwrap_or_default();
                println!("skipping {test}: userfaultfd not permitted here ({e}: {cause})");
                None
            }
        }
    }

    /// Reads `addr` on another thread; the value read arrives on the channel.
    fn touch_in_thread(addr: u64) -> mpsc::Receiver<u64> {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || tx.send(read(addr, 0)).unwrap());
        rx
    }

    /// Writes `value` at `addr` on another thread and reads back the page's word 1.
    fn write_in_thread(addr: u64, value: u64) -> mpsc::Receiver<u64> {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            write(addr, 0, value);
            tx.send(read(addr, 1)).unwrap();
        });
        rx
    }

    fn percentile(sorted: &[Duration], p: f64) -> Duration {
        sorted[((sorted.len() - 1) as f64 * p).round() as usize]
    }

    #[test]
    fn abi_layout_matches_the_kernel() {
        assert_eq!(size_of::<UffdioApi>(), 24);
        assert_eq!(size_of::<UffdioRange>(), 16);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        assert_eq!(offset_of!(UffdioRegister, mode), 16);
        assert_eq!(offset_of!(UffdioRegister, ioctls), 24);
        assert_eq!(size_of::<UffdioCopy>(), 40);
        assert_eq!(offset_of!(UffdioCopy, mode), 24);
        assert_eq!(offset_of!(UffdioCopy, copy), 32);
        assert_eq!(size_of::<UffdioZeropage>(), 32);
        assert_eq!(offset_of!(UffdioZeropage, zeropage), 24);
        assert_eq!(size_of::<UffdMsg>(), 32);
        assert_eq!(offset_of!(UffdMsg, event), 0);
        assert_eq!(offset_of!(UffdMsg, pagefault.flags), 8);
        assert_eq!(offset_of!(UffdMsg, pagefault.address), 16);
        assert_eq!(offset_of!(UffdMsg, pagefault._ptid), 24);
    }

    #[test]
    fn ioctl_numbers_match_their_ioc_encoding() {
        // _IOC(dir, 0xAA, nr, size) with dir 1 = write, 2 = read, 3 = both.
        fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
            dir << 30 | (size as u64) << 16 | 0xAA << 8 | nr
        }
        assert_eq!(UFFDIO_API, ioc(3, 0x3F, size_of::<UffdioApi>()));
        assert_eq!(UFFDIO_REGISTER, ioc(3, 0x00, size_of::<UffdioRegister>()));
        assert_eq!(UFFDIO_UNREGISTER, ioc(2, 0x01, size_of::<UffdioRange>()));
        assert_eq!(UFFDIO_WAKE, ioc(2, 0x02, size_of::<UffdioRange>()));
        assert_eq!(UFFDIO_COPY, ioc(3, 0x03, size_of::<UffdioCopy>()));
        assert_eq!(UFFDIO_ZEROPAGE, ioc(3, 0x04, size_of::<UffdioZeropage>()));
        assert_eq!(USERFAULTFD_IOC_NEW, ioc(0, 0x00, 0));
        assert_eq!(page_size(), PAGE);
    }

    #[test]
    fn userfault_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Userfault>();
    }

    #[test]
    fn device_node_gives_a_working_userfaultfd() {
        let Ok(fd) = open_device() else {
            println!("skipping: /dev/userfaultfd cannot be opened here");
            return;
        };
        let uffd = Userfault::handshake(fd).unwrap();
        assert_ne!(uffd.supported_features(), 0);
        let mem = Anon::new(4 * PAGE);
        mem.register(&uffd);
        let outcome = uffd.copy(mem.page(1), &[7u8; PAGE], true).unwrap();
        assert_eq!(outcome.installed, PAGE);
        assert_eq!(read(mem.page(1), 0), u64::from_ne_bytes([7; 8]));
    }

    /// 8 threads touch every page of 16 MiB in different orders (so they meet on pages), some
    /// pages written by one owner; one handler serves each fault with the 64 KiB chunk around
    /// it, every fourth chunk with the zero page.
    #[test]
    fn threads_see_the_pages_the_handler_installs() {
        const PAGES: usize = 4096;
        const CHUNK: usize = 16;
        const THREADS: usize = 8;
        let Some(uffd) = uffd_or_skip("threads_see_the_pages_the_handler_installs") else {
            return;
        };
        let uffd = Arc::new(uffd);
        let mem = Anon::new(PAGES * PAGE);
        mem.register(&uffd);
        let base = mem.base();
        fn zero_chunk(page: usize) -> bool {
            (page / CHUNK) % 4 == 3
        }
        fn expected(page: usize, word: usize) -> u64 {
            if zero_chunk(page) {
                0
            } else {
                pattern(page, word)
            }
        }
        fn written(page: usize) -> bool {
            page % 8 == 0
        }
        fn owner(page: usize) -> usize {
            (page / 8) % THREADS
        }
        fn marker(page: usize) -> u64 {
            0xFFFF_0000_0000_0000 | page as u64
        }

        let stop = Arc::new(AtomicBool::new(false));
        let handler = {
            let (uffd, stop) = (Arc::clone(&uffd), Arc::clone(&stop));
            thread::spawn(move || {
                let mut installed = vec![false; PAGES / CHUNK];
                let (mut latencies, mut faults, mut duplicates, mut writes) =
                    (vec![], vec![], 0, 0);
                let mut buf = vec![0u8; CHUNK * PAGE];
                let result = (|| {
                    while !stop.load(Ordering::Relaxed) {
                        faults.clear();
                        uffd.read_faults(&mut faults, Duration::from_millis(20))?;
                        let read_at = Instant::now();
                        for fault in &faults {
                            let page = ((fault.addr - base) as usize) / PAGE;
                            let chunk = page / CHUNK;
                            let first = chunk * CHUNK;
                            writes += usize::from(fault.write);
                            if installed[chunk] {
                                // Another thread's fault on a page served already.
                                let outcome = uffd.copy(fault.addr, &[0xEE; PAGE], true)?;
                                assert_eq!(
                                    outcome,
                                    CopyOutcome {
                                        installed: 0,
                                        present: PAGE
                                    }
                                );
                                duplicates += 1;
                            } else {
                                let dst = base + (first * PAGE) as u64;
                                let outcome = if zero_chunk(page) {
                                    uffd.zeropage(dst, CHUNK * PAGE, true)?
                                } else {
                                    fill_pattern(&mut buf, first);
                                    uffd.copy(dst, &buf, true)?
                                };
                                assert_eq!(outcome.installed, CHUNK * PAGE);
                                installed[chunk] = true;
                            }
                            latencies.push(read_at.elapsed());
                        }
                    }
                    Ok::<_, UffdError>(())
                })();
                if result.is_err() {
                    // Release the touchers (they get zero pages and fail their checks).
                    let _ = uffd.unregister(base as *mut u8, PAGES * PAGE);
                }
                result.map(|()| (latencies, duplicates, writes))
            })
        };

        let touchers: Vec<_> = (0..THREADS)
            .map(|t| {
                thread::spawn(move || {
                    for k in 0..PAGES {
                        let page = (k * 1021 + t * 512) % PAGES;
                        let addr = base + (page * PAGE) as u64;
                        if written(page) {
                            if owner(page) != t {
                                continue;
                            }
                            // A blind write: the first touch of a chunk is a write fault.
                            write(addr, 0, marker(page));
                            assert_eq!(read(addr, 0), marker(page));
                        }
                        let words: &[usize] = if written(page) {
                            &[255, 511]
                        } else {
                            &[0, 255, 511]
                        };
                        for &word in words {
                            let value = read(addr, word);
                            assert_eq!(value, expected(page, word), "page {page} word {word}");
                        }
                    }
                })
            })
            .collect();
        for toucher in touchers {
            toucher.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let (mut latencies, duplicates, writes) = handler.join().unwrap().unwrap();

        assert!(mem.resident().iter().all(|&r| r));
        for page in 0..PAGES {
            let want = if written(page) {
                marker(page)
            } else {
                expected(page, 0)
            };
            assert_eq!(read(mem.page(page), 0), want, "page {page}");
            assert_eq!(
                read(mem.page(page), 511),
                expected(page, 511),
                "page {page}"
            );
        }
        assert!(latencies.len() >= PAGES / CHUNK);
        latencies.sort();
        println!(
            "{} faults ({duplicates} on served pages, {writes} writes), handler p50 {:?} p99 {:?}",
            latencies.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
        );
    }

    #[test]
    fn copy_into_a_present_page_reports_it_and_wakes_the_waiter() {
        let Some(uffd) = uffd_or_skip("copy_into_a_present_page_reports_it_and_wakes_the_waiter")
        else {
            return;
        };
        let mem = Anon::new(4 * PAGE);
        mem.register(&uffd);
        let toucher = touch_in_thread(mem.page(1));
        let fault = uffd.wait_fault(WAIT).unwrap().expect("a fault");
        assert_eq!(
            fault,
            Fault {
                addr: mem.page(1),
                write: false
            }
        );

        // Installed without a wake: the toucher keeps waiting.
        let outcome = uffd.copy(mem.page(1), &[0x11; PAGE], false).unwrap();
        assert_eq!(
            outcome,
            CopyOutcome {
                installed: PAGE,
                present: 0
            }
        );
        assert!(toucher.recv_timeout(Duration::from_millis(100)).is_err());

        // A second copy finds the page present, leaves it alone and wakes the toucher.
        let outcome = uffd.copy(mem.page(1), &[0x22; PAGE], true).unwrap();
        assert!(outcome.all_present());
        assert_eq!(
            toucher.recv_timeout(WAIT),
            Ok(u64::from_ne_bytes([0x11; 8]))
        );
    }

    #[test]
    fn copy_installs_many_pages_and_skips_present_ones() {
        let Some(uffd) = uffd_or_skip("copy_installs_many_pages_and_skips_present_ones") else {
            return;
        };
        let mem = Anon::new(512 * PAGE);
        mem.register(&uffd);
        let mut buf = vec![0u8; 256 * PAGE];
        fill_pattern(&mut buf, 0);
        let outcome = uffd.copy(mem.base(), &buf, false).unwrap();
        assert_eq!(
            outcome,
            CopyOutcome {
                installed: 256 * PAGE,
                present: 0
            }
        );

        // Pages 261 and 265 arrive first; the chunk 256..272 then copies around them.
        for page in [261, 265] {
            uffd.copy(mem.page(page), &[0xAB; PAGE], false).unwrap();
        }
        let mut chunk = vec![0u8; 16 * PAGE];
        fill_pattern(&mut chunk, 256);
        let outcome = uffd.copy(mem.page(256), &chunk, true).unwrap();
        assert_eq!(
            outcome,
            CopyOutcome {
                installed: 14 * PAGE,
                present: 2 * PAGE
            }
        );
        let zero = uffd.zeropage(mem.page(256), 32 * PAGE, false).unwrap();
        assert_eq!(
            zero,
            CopyOutcome {
                installed: 16 * PAGE,
                present: 16 * PAGE
            }
        );

        let resident = mem.resident();
        assert!(resident[..288].iter().all(|&r| r) && !resident[288]);
        for page in 0..288 {
            let want = match page {
                261 | 265 => u64::from_ne_bytes([0xAB; 8]),
                272.. => 0,
                _ => pattern(page, 7),
            };
            assert_eq!(read(mem.page(page), 7), want, "page {page}");
        }
    }

    #[test]
    fn discarded_page_faults_again() {
        let Some(uffd) = uffd_or_skip("discarded_page_faults_again") else {
            return;
        };
        let mem = Anon::new(4 * PAGE);
        mem.register(&uffd);
        uffd.copy(mem.page(2), &[0x33; PAGE], true).unwrap();
        assert_eq!(read(mem.page(2), 0), u64::from_ne_bytes([0x33; 8]));

        // SAFETY: page 2 of our registered mapping, which holds no Rust value.
        unsafe { discard(mem.page(2) as *mut u8, PAGE) }.unwrap();
        assert!(!mem.resident()[2]);
        let toucher = write_in_thread(mem.page(2), 0x55);
        let fault = uffd
            .wait_fault(WAIT)
            .unwrap()
            .expect("a fault after discard");
        assert_eq!(
            fault,
            Fault {
                addr: mem.page(2),
                write: true
            }
        );
        uffd.copy(fault.addr, &[0x44; PAGE], true).unwrap();
        assert_eq!(
            toucher.recv_timeout(WAIT),
            Ok(u64::from_ne_bytes([0x44; 8]))
        );
        assert_eq!(read(mem.page(2), 0), 0x55);

        // SAFETY: as above; the call fails on the misaligned address before touching anything.
        let misaligned = unsafe { discard((mem.page(2) + 1) as *mut u8, PAGE) };
        assert!(matches!(misaligned, Err(UffdError::BadRange { .. })));
    }

    #[test]
    fn unregistered_range_no_longer_faults() {
        let Some(uffd) = uffd_or_skip("unregistered_range_no_longer_faults") else {
            return;
        };
        let mem = Anon::new(4 * PAGE);
        mem.register(&uffd);
        let waiter = touch_in_thread(mem.page(0));
        assert!(uffd.wait_fault(WAIT).unwrap().is_some());
        uffd.unregister(mem.ptr, mem.len).unwrap();
        // Unregistering woke the waiter onto a zero page, and new touches do not fault.
        assert_eq!(waiter.recv_timeout(WAIT), Ok(0));
        assert_eq!(touch_in_thread(mem.page(1)).recv_timeout(WAIT), Ok(0));
        assert_eq!(uffd.wait_fault(Duration::ZERO).unwrap(), None);
        match uffd.copy(mem.page(3), &[1; PAGE], true) {
            Err(UffdError::Copy { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("copy into an unregistered range gave {other:?}"),
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let Some(uffd) = uffd_or_skip("bad_arguments_are_errors") else {
            return;
        };
        let mem = Anon::new(4 * PAGE);
        mem.register(&uffd);
        let bad = |r: Result<CopyOutcome, UffdError>| matches!(r, Err(UffdError::BadRange { .. }));
        assert!(bad(uffd.copy(mem.base() + 8, &[0; PAGE], true)));
        assert!(bad(uffd.copy(mem.base(), &[0; 100], true)));
        assert!(bad(uffd.copy(mem.base(), &[], true)));
        assert!(bad(uffd.copy(
            u64::MAX - PAGE as u64 + 1,
            &[0; 2 * PAGE],
            true
        )));
        assert!(bad(uffd.zeropage(mem.base() + 1, PAGE, true)));
        assert!(bad(uffd.zeropage(mem.base(), 0, true)));
        assert!(uffd.wake(mem.base(), 0).is_err());
        assert!(uffd.wake(mem.base() + 4, PAGE).is_err());
        assert!(uffd.unregister(mem.ptr.wrapping_add(1), PAGE).is_err());
        // SAFETY: the calls fail on the argument check, before the kernel sees the range.
        let misaligned = unsafe { uffd.register_missing(mem.ptr.wrapping_add(8), PAGE) };
        assert!(matches!(misaligned, Err(UffdError::BadRange { .. })));
        let err = uffd.copy(mem.base() + 8, &[0; PAGE], true).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("UFFDIO_COPY of 4096 bytes at 0x"),
            "{err}"
        );

        // The kernel's own refusals come back as errors too: a copy overrunning the mapping.
        let outcome = uffd.copy(mem.page(3), &[0; 2 * PAGE], true);
        assert!(
            matches!(outcome, Err(UffdError::Copy { .. })),
            "{outcome:?}"
        );
    }

    #[test]
    fn wait_fault_times_out_without_faults() {
        let Some(uffd) = uffd_or_skip("wait_fault_times_out_without_faults") else {
            return;
        };
        let start = Instant::now();
        assert_eq!(uffd.wait_fault(Duration::from_millis(30)).unwrap(), None);
        assert!(start.elapsed() >= Duration::from_millis(30));
        let mut faults = Vec::new();
        assert_eq!(uffd.read_faults(&mut faults, Duration::ZERO).unwrap(), 0);
    }

    // Measurements, not tests: run with
    // `cargo test --release -- --ignored --nocapture --test-threads=1 uffd::tests::measure`.

    const BENCH_BYTES: usize = 64 << 20;

    /// One thread reads 64 MiB in order; the handler serves each fault with a copy of `chunk`
    /// pages. Prints handler latency (event read to copy done), the toucher's wait per fault,
    /// and the whole run.
    #[test]
    #[ignore = "measurement"]
    fn measure_fault_service() {
        let Some(uffd) = uffd_or_skip("measure_fault_service") else {
            return;
        };
        let uffd = Arc::new(uffd);
        println!("chunk pages | faults | run ms | handler p50 / p99 us | toucher p50 / p99 us");
        for chunk in [1usize, 16, 64] {
            let mem = Anon::new(BENCH_BYTES);
            mem.register(&uffd);
            let (base, pages) = (mem.base(), BENCH_BYTES / PAGE);
            let stop = Arc::new(AtomicBool::new(false));
            let handler = {
                let (uffd, stop) = (Arc::clone(&uffd), Arc::clone(&stop));
                thread::spawn(move || {
                    let src = vec![0x5Au8; chunk * PAGE];
                    let (mut faults, mut latencies) = (Vec::new(), Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        faults.clear();
                        uffd.read_faults(&mut faults, Duration::from_millis(10))
                            .unwrap();
                        let read_at = Instant::now();
                        for fault in &faults {
                            let first = (fault.addr - base) & !((chunk * PAGE) as u64 - 1);
                            uffd.copy(base + first, &src, true).unwrap();
                            latencies.push(read_at.elapsed());
                        }
                    }
                    latencies
                })
            };
            let start = Instant::now();
            let mut waits = Vec::with_capacity(pages / chunk);
            for page in 0..pages {
                let t = Instant::now();
                read(mem.page(page), 0);
                if page % chunk == 0 {
                    waits.push(t.elapsed());
                }
            }
            let run = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            let mut latencies = handler.join().unwrap();
            latencies.sort();
            waits.sort();
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            println!(
                "{chunk:>11} | {:>6} | {:>6.1} | {:>8.1} / {:>8.1} | {:>8.1} / {:>8.1}",
                latencies.len(),
                run.as_secs_f64() * 1e3,
                us(percentile(&latencies, 0.5)),
                us(percentile(&latencies, 0.99)),
                us(percentile(&waits, 0.5)),
                us(percentile(&waits, 0.99)),
            );
        }
    }

    /// Installs 64 MiB with no one waiting (the background push), per call size.
    #[test]
    #[ignore = "measurement"]
    fn measure_bulk_install() {
        let Some(uffd) = uffd_or_skip("measure_bulk_install") else {
            return;
        };
        let mut src = vec![0u8; BENCH_BYTES];
        fill_pattern(&mut src, 0);
        println!("operation              | ms     | pages/s");
        let cases: [(&str, usize, bool, bool); 5] = [
            ("copy 1 page", 1, false, false),
            ("copy 16 pages", 16, false, false),
            ("copy 64 pages", 64, false, false),
            ("copy 64 pages, wake", 64, true, false),
            ("zeropage 64 pages", 64, false, true),
        ];
        for (name, pages, wake, zero) in cases {
            let mem = Anon::new(BENCH_BYTES);
            mem.register(&uffd);
            let step = pages * PAGE;
            let start = Instant::now();
            for offset in (0..BENCH_BYTES).step_by(step) {
                let dst = mem.base() + offset as u64;
                let outcome = if zero {
                    uffd.zeropage(dst, step, wake).unwrap()
                } else {
                    uffd.copy(dst, &src[offset..offset + step], wake).unwrap()
                };
                assert_eq!(outcome.installed, step);
            }
            let elapsed = start.elapsed();
            assert_eq!(
                read(mem.page(1000), 3),
                if zero { 0 } else { pattern(1000, 3) }
            );
            println!(
                "{name:<22} | {:>6.1} | {:>9.0}",
                elapsed.as_secs_f64() * 1e3,
                (BENCH_BYTES / PAGE) as f64 / elapsed.as_secs_f64(),
            );
        }
    }
}
