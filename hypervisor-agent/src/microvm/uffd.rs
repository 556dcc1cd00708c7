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
            mode: if wake { 0 } else { UFFDIO_ZEROPAGE_MODE_DONTWAKE },
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
                1.. => return Ok(true),
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

