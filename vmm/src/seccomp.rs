//! The VMM's seccomp filter: the process may make only the system calls a VMM needs, and any
//! other call kills the whole process with SIGSYS (`SECCOMP_RET_KILL_PROCESS`), which its agent
//! reports as a crash of that one VM. `main` installs it on its own thread before the tokio
//! runtime or any vCPU or worker thread exists, so every thread started afterwards inherits
//! it; `--no-seccomp` leaves it off for debugging. See `docs/security.md`, "VMM confinement".
//!
//! One thread is started before the filter and stays outside it: godwit-nbd's process thread,
//! which spawns and kills the `qemu-nbd` exports of global references
//! ([`godwit_nbd::start_process_thread`]). A filter is inherited across fork and exec, so
//! qemu-nbd spawned from a confined thread would run under the VMM's list (and need
//! io_uring, capabilities, memory policies...); spawned from that thread it runs as before, and
//! the VMM's own threads need neither `fork`/`execve` nor `kill` (only `wait4` for their
//! children). That thread shares the VMM's memory, so against code already running inside the
//! VMM this is a seam, not a wall: it does only what the crate sends it.
//!
//! The list was found by tracing the VMMs of the whole end-to-end suite (create, pause/resume,
//! snapshot/restore, migrations in every mode with post-copy over userfaultfd, TLS, resource
//! links and disks, console, dirty probes, adoption by a restarted agent) with `strace -f`, and
//! then completed, by reading rather than tracing, with the calls of rare paths (a panic, an
//! interrupted sleep, DNS for a host name). Like Firecracker's, it also restricts the
//! arguments of a few calls that can do much more than the VMM needs: `ioctl` only on KVM,
//! userfaultfd and three file-descriptor requests, `socket` only for unix, IPv4 and IPv6
//! sockets, `clone` only for threads, `prctl` only for thread names. No confined thread can
//! start a program (`execve` is not allowed).
//!
//! x86_64 only: the syscall numbers are that architecture's; elsewhere [`install`] answers
//! [`SeccompError::Unsupported`] (start the VMM with `--no-seccomp` there).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("The seccomp filter is written for x86_64 only; start the VMM with --no-seccomp here")]
    Unsupported,
    #[error("--seccomp-deny {0}: the VMM's filter does not allow a system call of that name")]
    UnknownSyscall(String),
    #[error("Cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("Cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// A system call the filter allows: its name, number and the argument checks, if any.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    pub name: &'static str,
    pub number: i64,
    /// Arguments it is allowed with; `Any` when the call is allowed whatever they are.
    pub args: Args,
}

/// The argument checks of an allowed call (each `OneOf` alternative is one BPF rule).
#[derive(Debug, Clone, Copy)]
pub enum Args {
    Any,
    /// Argument `index` (as 32 bits) equals one of these values.
    OneOf {
        index: u8,
        values: &'static [u64],
    },
    /// Argument `index` (as 32 bits) masked by `mask` equals one of these values.
    MaskedOneOf {
        index: u8,
        mask: u64,
        values: &'static [u64],
    },
    /// `ioctl`: a KVM or userfaultfd request (by the request's type byte), or one of `values`.
    Ioctl {
        values: &'static [u64],
    },
}

#[cfg(target_arch = "x86_64")]
mod list {
    use super::{Allowed, Args};

    macro_rules! allow {
        ($($name:ident),* $(,)?) => {
            [$(Allowed { name: stringify!($name), number: libc::$name, args: Args::Any }),*]
        };
    }

    /// `ioctl` type bytes (bits 8-15 of a request): every KVM request (kvm-ioctls, on the
    /// /dev/kvm, VM and vCPU descriptors) and every userfaultfd request (post-copy).
    pub const KVMIO: u64 = 0xAE;
    pub const UFFDIO: u64 = 0xAA;
    /// `FIONBIO` (std's `set_nonblocking` on sockets), `FIOCLEX` (std's `set_cloexec`),
    /// `TCGETS` (`isatty`, read-only).
    const IOCTL_OTHERS: &[u64] = &[0x5421, 0x5451, 0x5401];

    /// Memory: the allocator, thread stacks, guest memory (MAP_NORESERVE, huge-page advice,
    /// `MADV_DONTNEED` when post-copy drops pages), the vCPUs' `kvm_run` mappings.
    const MEMORY: [Allowed; 7] = allow!(
        SYS_brk,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_madvise,
        SYS_mincore,
    );

    /// Threads, their synchronisation and signals: tokio's workers and blocking pool, vCPU
    /// threads (kicked out of `KVM_RUN` by a real-time signal sent with `tgkill`), a panic's
    /// abort, the return from a signal handler or an interrupted call, and `wait4` for the
    /// qemu-nbd children (which the unconfined process thread spawns and kills).
    const THREADS: [Allowed; 18] = allow!(
        SYS_clone3,
        SYS_futex,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_getpid,
        SYS_gettid,
        SYS_tgkill,
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_restart_syscall,
        SYS_prlimit64,
        SYS_wait4,
        SYS_exit,
        SYS_exit_group,
    );

    /// Time: clocks the vDSO does not serve (thread CPU time for the CPU-use samples), sleeps.
    const TIME: [Allowed; 5] = allow!(
        SYS_clock_gettime,
        SYS_clock_getres,
        SYS_gettimeofday,
        SYS_nanosleep,
        SYS_clock_nanosleep,
    );

    /// Files: the run directory (socket, pid and exit files, logs, console), snapshots
    /// (written to a temporary file, synced, renamed), disk images, resource data and its
    /// transfer, migration records, path confinement (`canonicalize`), certificates.
    const FILES: [Allowed; 32] = allow!(
        SYS_openat,
        SYS_open,
        SYS_close,
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_lseek,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_access,
        SYS_fsync,
        SYS_fdatasync,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_mkdir,
        SYS_mkdirat,
        SYS_unlink,
        SYS_unlinkat,
        SYS_rmdir,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
        SYS_readlink,
        SYS_getdents64,
        SYS_getcwd,
        SYS_fcntl,
    );

    /// Sockets: the API's unix socket, migration channels (plain or TLS), resource links,
    /// NBD, endpoint handover and forwarders, HTTP calls to agents (and, for a host name, the
    /// resolver's datagrams); `socketpair` for tokio's signal wake-up.
    const NETWORK: [Allowed; 17] = allow!(
        SYS_socketpair,
        SYS_bind,
        SYS_listen,
        SYS_accept,
        SYS_accept4,
        SYS_connect,
        SYS_shutdown,
        SYS_getsockname,
        SYS_getpeername,
        SYS_setsockopt,
        SYS_getsockopt,
        SYS_sendto,
        SYS_recvfrom,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_sendmmsg,
        SYS_recvmmsg,
    );

    /// Waiting: tokio's epoll reactor and its eventfd, vCPU interrupt lines (irqfd eventfds),
    /// the userfaultfd handler's `poll`.
    const POLLING: [Allowed; 8] = allow!(
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_poll,
        SYS_ppoll,
        SYS_eventfd2,
        SYS_pipe2,
    );

    /// Guest machinery: randomness (TLS, migration ids, the entropy device), userfaultfd for
    /// post-copy (with `/dev/userfaultfd` as fallback, through `openat` and `ioctl`).
    const GUEST: [Allowed; 2] = allow!(SYS_getrandom, SYS_userfaultfd);

    /// Calls allowed with some arguments only.
    fn restricted() -> [Allowed; 4] {
        [
            Allowed {
                name: "ioctl",
                number: libc::SYS_ioctl,
                args: Args::Ioctl {
                    values: IOCTL_OTHERS,
                },
            },
            // Unix (the API socket), IPv4 and IPv6: no netlink, packet or raw sockets.
            Allowed {
                name: "socket",
                number: libc::SYS_socket,
                args: Args::OneOf {
                    index: 0,
                    values: &[
                        libc::AF_UNIX as u64,
                        libc::AF_INET as u64,
                        libc::AF_INET6 as u64,
                    ],
                },
            },
            // glibc creates threads with clone3; should it fall back to clone, only a
            // thread (CLONE_THREAD) may be made, not a process.
            Allowed {
                name: "clone",
                number: libc::SYS_clone,
                args: Args::MaskedOneOf {
                    index: 0,
                    mask: libc::CLONE_THREAD as u64,
                    values: &[libc::CLONE_THREAD as u64],
                },
            },
            // Thread names (std and tokio name their threads).
            Allowed {
                name: "prctl",
                number: libc::SYS_prctl,
                args: Args::OneOf {
                    index: 0,
                    values: &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64],
                },
            },
        ]
    }

    pub fn all() -> Vec<Allowed> {
        let mut all = Vec::new();
        all.extend(MEMORY);
        all.extend(THREADS);
        all.extend(TIME);
        all.extend(FILES);
        all.extend(NETWORK);
        all.extend(POLLING);
        all.extend(GUEST);
        all.extend(restricted());
        // `libc::SYS_<call>` is the constant; the name is `<call>`.
        for a in &mut all {
            a.name = a.name.strip_prefix("SYS_").unwrap_or(a.name);
        }
        all
    }
}

/// The system calls the VMM's filter allows, by purpose (x86_64; empty elsewhere).
pub fn allowed() -> Vec<Allowed> {
    #[cfg(target_arch = "x86_64")]
    {
        list::all()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

fn condition(
    index: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    // Dword: the kernel reads these arguments (a request, a domain, flags, an option) as
    // 32-bit ints, so the upper half of the register must not decide anything.
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
}

fn rules(args: Args) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let one = |c: SeccompCondition| SeccompRule::new(vec![c]);
    match args {
        Args::Any => Ok(Vec::new()),
        Args::OneOf { index, values } => values
            .iter()
            .map(|&v| one(condition(index, SeccompCmpOp::Eq, v)?))
            .collect(),
        Args::MaskedOneOf {
            index,
            mask,
            values,
        } => values
            .iter()
            .map(|&v| one(condition(index, SeccompCmpOp::MaskedEq(mask), v)?))
            .collect(),
        #[cfg(target_arch = "x86_64")]
        Args::Ioctl { values } => [list::KVMIO, list::UFFDIO]
            .iter()
            .map(|&ty| one(condition(1, SeccompCmpOp::MaskedEq(0xff00), ty << 8)?))
            .chain(
                values
                    .iter()
                    .map(|&v| one(condition(1, SeccompCmpOp::Eq, v)?)),
            )
            .collect(),
        #[cfg(not(target_arch = "x86_64"))]
        Args::Ioctl { .. } => Ok(Vec::new()),
    }
}

/// Compiles the filter: the allowed calls minus `deny` (names of allowed calls, for tests
/// that make a VMM break its filter); returns the program and how many calls it allows.
pub fn compile(deny: &[String]) -> Result<(BpfProgram, usize), SeccompError> {
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = deny;
        Err(SeccompError::Unsupported)
    }
    #[cfg(target_arch = "x86_64")]
    {
        let allowed = allowed();
        if let Some(unknown) = deny.iter().find(|d| !allowed.iter().any(|a| a.name == *d)) {
            return Err(SeccompError::UnknownSyscall(unknown.clone()));
        }
        let mut map = BTreeMap::new();
        for a in allowed.iter().filter(|a| !deny.iter().any(|d| d == a.name)) {
            map.insert(a.number, rules(a.args).map_err(SeccompError::Build)?);
        }
        let count = map.len();
        let filter = SeccompFilter::new(
            map,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            seccompiler::TargetArch::x86_64,
        )
        .map_err(SeccompError::Build)?;
        let program = BpfProgram::try_from(filter).map_err(SeccompError::Build)?;
        Ok((program, count))
    }
}

/// Installs the filter on the calling thread, which every thread it starts afterwards
/// inherits (call it before starting any other); returns how many system calls it allows.
/// Irreversible; it also sets no-new-privileges.
pub fn install(deny: &[String]) -> Result<usize, SeccompError> {
    let (program, count) = compile(deny)?;
    seccompiler::apply_filter(&program).map_err(SeccompError::Install)?;
    Ok(count)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn the_default_filter_compiles() {
        let (program, count) = compile(&[]).unwrap();
        assert_eq!(count, allowed().len(), "a call is listed twice");
        assert!(count > 50 && count < 200, "{count}");
        // An instruction or more per call, and a few per argument check.
        assert!(program.len() > count, "{} instructions", program.len());
        // BPF jumps are 8-bit relative: seccompiler splits long programs, but a classic BPF
        // program may not exceed 4096 instructions.
        assert!(program.len() <= 4096, "{} instructions", program.len());
    }

    #[test]
    fn names_are_plain_and_unique() {
        let all = allowed();
        for a in &all {
            assert!(!a.name.starts_with("SYS_"), "{}", a.name);
            assert_eq!(
                all.iter().filter(|b| b.name == a.name).count(),
                1,
                "{}",
                a.name
            );
            assert_eq!(
                all.iter().filter(|b| b.number == a.number).count(),
                1,
                "{}",
                a.name
            );
        }
        for needed in [
            "ioctl",
            "futex",
            "epoll_wait",
            "userfaultfd",
            "fsync",
            "mmap",
        ] {
            assert!(all.iter().any(|a| a.name == needed), "{needed}");
        }
        for forbidden in [
            "execve", "fork", "vfork", "ptrace", "mount", "kill", "setuid",
        ] {
            assert!(!all.iter().any(|a| a.name == forbidden), "{forbidden}");
        }
    }

    #[test]
    fn a_denied_call_leaves_the_list() {
        let (_, all) = compile(&[]).unwrap();
        let (_, fewer) = compile(&["fsync".to_owned()]).unwrap();
        assert_eq!(fewer, all - 1);
        let err = compile(&["execve".to_owned()]).unwrap_err();
        assert!(err.to_string().contains("--seccomp-deny execve"), "{err}");
    }
}
