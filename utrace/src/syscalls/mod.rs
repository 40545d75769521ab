//! x86-64 system calls: names (from the running kernel's own
//! `sys_call_table`), argument kinds for the common calls (by hand) and
//! for the rest from the kernel's own metadata where it has some
//! ([`meta`]), and strace-style rendering ([`format`]).

pub mod format;
pub mod meta;
pub mod names;
pub mod structs;
pub mod table;

pub use format::{Formatter, UserMemory};
pub use table::SyscallTable;

/// How one argument is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// Signed decimal (`int`, `pid_t`).
    Int,
    /// A file descriptor: signed decimal, with `-y` the open file's path
    /// after it (`3</etc/hostname>`).
    Fd,
    /// Unsigned decimal (`size_t`, counts).
    Uint,
    /// Hexadecimal.
    Hex,
    /// A pointer: `NULL` or hex.
    Ptr,
    /// A directory fd for the `*at` calls (`AT_FDCWD`).
    DirFd,
    /// A NUL-terminated path or name read at entry.
    Str,
    /// A buffer the call reads from user memory, of the length in argument
    /// N (write, sendto): shown at entry.
    BufIn(usize),
    /// A buffer the call fills, of the length the call returns (read,
    /// recvfrom): shown at exit.
    BufOut,
    /// Like `BufOut`, every byte shown as `\xNN` (strace's
    /// `QUOTE_FORCE_HEX`, for random bytes).
    BufOutHex,
    /// `open` flags (`O_RDONLY|O_CLOEXEC`).
    OpenFlags,
    /// A file mode in octal (`0644`).
    Mode,
    /// `lseek` whence.
    Whence,
    /// `mmap`/`mprotect` protection.
    Prot,
    /// `mmap` flags.
    MapFlags,
    /// `clone` flags (with the exit signal in the low byte).
    CloneFlags,
    /// A signal number (`SIGCHLD`).
    Signal,
    /// `rt_sigprocmask` how.
    SigHow,
    /// An `argv`/`envp` array: shown as strace does (`["a", "b"]`).
    Argv,
    /// An `envp` array: shown as `0x... /* N vars */`.
    Envp,
    /// `wait4`'s status pointer: `[{WIFEXITED(s) && WEXITSTATUS(s) == 0}]`.
    WaitStatus,
    /// `access`/`faccessat` mode (`F_OK`, `R_OK|X_OK`).
    AccessMode,
    /// `prctl` option (`PR_SET_NAME`).
    PrctlOption,
    /// A thread name the call fills (`prctl(PR_GET_NAME)`): shown at exit.
    NameOut,
    /// `fcntl` command (`F_DUPFD_CLOEXEC`, `F_GETFL`).
    FcntlCmd,
    /// `getrandom` flags (`GRND_NONBLOCK`).
    GrndFlags,
    /// A `struct utsname` the call fills (`uname`): shown at exit as
    /// strace does without `-v`, `{sysname="Linux", nodename="...", ...}`.
    Utsname,
    /// `arch_prctl` code (`ARCH_SET_FS`).
    ArchPrctlCode,
    /// A resource limit (`RLIMIT_STACK`).
    Resource,
    /// A clock id (`CLOCK_MONOTONIC`).
    ClockId,
    /// `madvise` advice (`MADV_DONTNEED`).
    Advice,
    /// `wait4` options (`WNOHANG`).
    WaitOptions,
    /// The `*at` calls' flags (`AT_EMPTY_PATH`).
    AtFlags,
    /// An `ioctl` request (`TIOCGWINSZ`).
    IoctlRequest,
    /// `pipe2` flags (`O_CLOEXEC`, `0`).
    PipeFlags,
    /// The two descriptors `pipe` fills: `[3, 4]` at exit.
    PipeFds,
    /// A signal set the call reads, of the size in argument N: `[USR1]`.
    SigSetIn(usize),
    /// A signal set the call fills, of the size in argument N: at exit.
    SigSetOut(usize),
    /// A `struct sigaction` the call reads.
    SigActionIn,
    /// A `struct sigaction` the call fills: at exit.
    SigActionOut,
    /// A `struct stat` the call fills: at exit.
    StatOut,
    /// A `struct timespec` the call reads.
    TimespecIn,
    /// A `struct timespec` the call fills: at exit.
    TimespecOut,
    /// A `struct rlimit` the call reads.
    RlimitIn,
    /// A `struct rlimit` the call fills: at exit.
    RlimitOut,
    /// A CPU set the call reads, of the size in argument N: `[0 1]`.
    CpuSetIn(usize),
    /// A CPU set the call fills (as many bytes as it returns): at exit.
    CpuSetOut,
    /// A `getdents64` buffer: its address and entry count, at exit.
    Dirents,
    /// `clone3`'s `struct clone_args` (its size in the next argument):
    /// shown at exit with the thread id the kernel stored.
    Clone3,
    /// `rt_sigreturn`'s mask, read from the signal frame on the stack.
    SigreturnMask,
}

/// How the return value is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    /// Decimal, `-1 ERRNO (message)` on error.
    Int,
    /// A new file descriptor: like `Int`, with `-y` its file's path.
    Fd,
    /// Hex (an address: brk, mmap), `-1 ERRNO` on error.
    Hex,
    /// Never returns (`= ?`).
    NoReturn,
}

/// The argument kinds of a known call, by name.
pub fn signature(name: &str) -> Option<(&'static [Arg], Ret)> {
    use Arg::*;
    Some(match name {
        "read" => (&[Fd, BufOut, Uint], Ret::Int),
        "pread64" => (&[Fd, BufOut, Uint, Int], Ret::Int),
        "write" => (&[Fd, BufIn(2), Uint], Ret::Int),
        "pwrite64" => (&[Fd, BufIn(2), Uint, Int], Ret::Int),
        "open" => (&[Str, OpenFlags, Mode], Ret::Fd),
        "openat" => (&[DirFd, Str, OpenFlags, Mode], Ret::Fd),
        "close" | "fsync" => (&[Fd], Ret::Int),
        "dup" => (&[Fd], Ret::Fd),
        // The offset pointer shows as NULL or its address (strace shows a
        // non-NULL one's value before and after: `[0] => [N]`).
        "sendfile" => (&[Fd, Fd, Ptr, Uint], Ret::Int),
        "dup2" => (&[Fd, Fd], Ret::Fd),
        "dup3" => (&[Fd, Fd, OpenFlags], Ret::Fd),
        "lseek" => (&[Fd, Int, Whence], Ret::Int),
        "unlink" | "rmdir" | "chdir" => (&[Str], Ret::Int),
        "unlinkat" => (&[DirFd, Str, AtFlags], Ret::Int),
        "mkdir" => (&[Str, Mode], Ret::Int),
        "mkdirat" => (&[DirFd, Str, Mode], Ret::Int),
        "access" => (&[Str, AccessMode], Ret::Int),
        "faccessat" | "faccessat2" => (&[DirFd, Str, AccessMode], Ret::Int),
        "stat" | "lstat" => (&[Str, StatOut], Ret::Int),
        "fstat" => (&[Fd, StatOut], Ret::Int),
        "uname" => (&[Utsname], Ret::Int),
        "newfstatat" => (&[DirFd, Str, StatOut, AtFlags], Ret::Int),
        "readlink" => (&[Str, BufOut, Uint], Ret::Int),
        "readlinkat" => (&[DirFd, Str, BufOut, Uint], Ret::Int),
        "rename" => (&[Str, Str], Ret::Int),
        "renameat" | "renameat2" => (&[DirFd, Str, DirFd, Str], Ret::Int),
        "execve" => (&[Str, Argv, Envp], Ret::Int),
        "exit" | "exit_group" => (&[Int], Ret::NoReturn),
        "brk" => (&[Ptr], Ret::Hex),
        "mmap" => (&[Ptr, Uint, Prot, MapFlags, Fd, Hex], Ret::Hex),
        "munmap" => (&[Ptr, Uint], Ret::Int),
        "mprotect" => (&[Ptr, Uint, Prot], Ret::Int),
        "clone" => (&[CloneFlags, Ptr, Ptr, Ptr, Hex], Ret::Int),
        "fork" | "vfork" | "getpid" | "getppid" | "gettid" | "getuid" | "geteuid" | "getgid"
        | "getegid" | "sched_yield" | "pause" | "setsid" | "getpgrp" => (&[], Ret::Int),
        "wait4" => (&[Int, WaitStatus, WaitOptions, Ptr], Ret::Int),
        "kill" => (&[Int, Signal], Ret::Int),
        "tkill" => (&[Int, Signal], Ret::Int),
        "tgkill" => (&[Int, Int, Signal], Ret::Int),
        "rt_sigaction" => (&[Signal, SigActionIn, SigActionOut, Uint], Ret::Int),
        "rt_sigprocmask" => (&[SigHow, SigSetIn(3), SigSetOut(3), Uint], Ret::Int),
        "rt_sigreturn" => (&[SigreturnMask], Ret::Int),
        "rt_sigpending" => (&[SigSetOut(1), Uint], Ret::Int),
        "pipe" => (&[PipeFds], Ret::Int),
        "pipe2" => (&[PipeFds, PipeFlags], Ret::Int),
        "nanosleep" => (&[TimespecIn, Ptr], Ret::Int),
        "set_tid_address" => (&[Ptr], Ret::Int),
        "set_robust_list" => (&[Ptr, Uint], Ret::Int),
        "arch_prctl" => (&[ArchPrctlCode, Hex], Ret::Int),
        "ioctl" => (&[Fd, IoctlRequest, Hex], Ret::Int),
        "fcntl" => (&[Fd, FcntlCmd, Hex], Ret::Int),
        "chroot" | "acct" | "swapoff" => (&[Str], Ret::Int),
        "sethostname" => (&[BufIn(1), Uint], Ret::Int),
        "rseq" => (&[Ptr, Hex, Hex, Hex], Ret::Int),
        "prlimit64" => (&[Int, Resource, RlimitIn, RlimitOut], Ret::Int),
        "getrlimit" => (&[Resource, RlimitOut], Ret::Int),
        "setrlimit" => (&[Resource, RlimitIn], Ret::Int),
        "clock_gettime" | "clock_getres" => (&[ClockId, TimespecOut], Ret::Int),
        "clock_nanosleep" => (&[ClockId, Hex, TimespecIn, Ptr], Ret::Int),
        "madvise" => (&[Ptr, Uint, Advice], Ret::Int),
        "futex" => (&[Ptr, Hex, Int, Ptr], Ret::Int),
        "prctl" => (&[PrctlOption, Hex, Hex, Hex, Hex], Ret::Int),
        "clone3" => (&[Clone3, Uint], Ret::Int),
        "getcwd" => (&[BufOut, Uint], Ret::Int),
        "getrandom" => (&[BufOutHex, Uint, GrndFlags], Ret::Int),
        "chmod" => (&[Str, Mode], Ret::Int),
        "fchmodat" => (&[DirFd, Str, Mode], Ret::Int),
        "symlink" | "link" => (&[Str, Str], Ret::Int),
        "getdents64" => (&[Fd, Dirents, Uint], Ret::Int),
        "sched_getaffinity" => (&[Int, Uint, CpuSetOut], Ret::Int),
        "sched_setaffinity" => (&[Int, Uint, CpuSetIn(1)], Ret::Int),
        "poll" => (&[Ptr, Uint, Int], Ret::Int),
        "sysinfo" | "times" => (&[Ptr], Ret::Int),
        "umask" => (&[Mode], Ret::Int),
        "setpgid" => (&[Int, Int], Ret::Int),
        "getpgid" | "getsid" => (&[Int], Ret::Int),
        "sigaltstack" => (&[Ptr, Ptr], Ret::Int),
        "rt_sigsuspend" => (&[SigSetIn(1), Uint], Ret::Int),
        "statfs" => (&[Str, Ptr], Ret::Int),
        "fstatfs" => (&[Fd, Ptr], Ret::Int),
        _ => return None,
    })
}

/// `fcntl`'s commands that return a new descriptor.
const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;

impl Arg {
    /// Whether the call fills this argument: it is shown at exit.
    pub fn is_out(self) -> bool {
        matches!(
            self,
            Arg::BufOut
                | Arg::BufOutHex
                | Arg::WaitStatus
                | Arg::NameOut
                | Arg::Utsname
                | Arg::PipeFds
                | Arg::SigSetOut(_)
                | Arg::SigActionOut
                | Arg::StatOut
                | Arg::TimespecOut
                | Arg::RlimitOut
                | Arg::CpuSetOut
                | Arg::Dirents
                | Arg::Clone3
        )
    }
}

/// Whether the call's line is completed at exit with data it wrote
/// (strace prints such calls whole at exit).
pub fn has_out_args(args: &[Arg]) -> bool {
    args.iter().any(|a| a.is_out())
}

/// The argument kinds of one call with these arguments: [`signature`],
/// narrowed where an argument decides what the others are (`prctl`'s
/// option, `open`'s mode only with `O_CREAT`).
pub fn kinds_for(name: &str, args: &[u64; 6]) -> Option<(Vec<Arg>, Ret)> {
    let (kinds, ret) = signature(name)?;
    let mut kinds = kinds.to_vec();
    if name == "prctl" {
        kinds = match args[0] {
            15 => vec![Arg::PrctlOption, Arg::Str],
            16 => vec![Arg::PrctlOption, Arg::NameOut],
            _ => kinds,
        };
    }
    let mut ret = ret;
    if name == "fcntl" && matches!(args[1], F_DUPFD | F_DUPFD_CLOEXEC) {
        // A new descriptor numbered at least the third argument.
        kinds = vec![Arg::Fd, Arg::FcntlCmd, Arg::Int];
        ret = Ret::Fd;
    }
    if let Some(fi) = kinds.iter().position(|k| *k == Arg::OpenFlags) {
        const O_CREAT: u64 = 0o100;
        const O_TMPFILE: u64 = 0o20_200_000;
        // O_TMPFILE holds O_DIRECTORY's bit: only both bits make it.
        let creates = args[fi] & O_CREAT != 0 || args[fi] & O_TMPFILE == O_TMPFILE;
        if kinds.get(fi + 1) == Some(&Arg::Mode) && !creates {
            kinds.truncate(fi + 1);
        }
    }
    Some((kinds, ret))
}
