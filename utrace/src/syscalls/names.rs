//! Symbolic names of scalar arguments, in the order and spelling of
//! strace 6.1's tables (the guest's strace is the oracle: Debian's
//! `strace` package, src/xlat/*.in): `ARCH_SET_FS`, `RLIMIT_STACK`,
//! `CLOCK_MONOTONIC`, `MADV_DONTNEED`, `WNOHANG`, `AT_EMPTY_PATH`,
//! `TIOCGWINSZ`.

/// `arch_prctl` codes (asm/prctl.h).
const ARCH_PRCTL: &[(u64, &str)] = &[
    (0x1001, "ARCH_SET_GS"),
    (0x1002, "ARCH_SET_FS"),
    (0x1003, "ARCH_GET_FS"),
    (0x1004, "ARCH_GET_GS"),
    (0x1011, "ARCH_GET_CPUID"),
    (0x1012, "ARCH_SET_CPUID"),
    (0x1021, "ARCH_GET_XCOMP_SUPP"),
    (0x1022, "ARCH_GET_XCOMP_PERM"),
    (0x1023, "ARCH_REQ_XCOMP_PERM"),
    (0x1024, "ARCH_GET_XCOMP_GUEST_PERM"),
    (0x1025, "ARCH_REQ_XCOMP_GUEST_PERM"),
    (0x2001, "ARCH_MAP_VDSO_X32"),
    (0x2002, "ARCH_MAP_VDSO_32"),
    (0x2003, "ARCH_MAP_VDSO_64"),
];

/// Resource limits (asm-generic/resource.h, x86-64 numbering).
const RESOURCES: &[&str] = &[
    "RLIMIT_CPU",
    "RLIMIT_FSIZE",
    "RLIMIT_DATA",
    "RLIMIT_STACK",
    "RLIMIT_CORE",
    "RLIMIT_RSS",
    "RLIMIT_NPROC",
    "RLIMIT_NOFILE",
    "RLIMIT_MEMLOCK",
    "RLIMIT_AS",
    "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
];

/// Clock ids (linux/time.h).
const CLOCKS: &[&str] = &[
    "CLOCK_REALTIME",
    "CLOCK_MONOTONIC",
    "CLOCK_PROCESS_CPUTIME_ID",
    "CLOCK_THREAD_CPUTIME_ID",
    "CLOCK_MONOTONIC_RAW",
    "CLOCK_REALTIME_COARSE",
    "CLOCK_MONOTONIC_COARSE",
    "CLOCK_BOOTTIME",
    "CLOCK_REALTIME_ALARM",
    "CLOCK_BOOTTIME_ALARM",
    "CLOCK_SGI_CYCLE",
    "CLOCK_TAI",
];

/// `madvise` advice (asm-generic/mman-common.h).
const ADVICE: &[(u64, &str)] = &[
    (0, "MADV_NORMAL"),
    (1, "MADV_RANDOM"),
    (2, "MADV_SEQUENTIAL"),
    (3, "MADV_WILLNEED"),
    (4, "MADV_DONTNEED"),
    (8, "MADV_FREE"),
    (9, "MADV_REMOVE"),
    (10, "MADV_DONTFORK"),
    (11, "MADV_DOFORK"),
    (12, "MADV_MERGEABLE"),
    (13, "MADV_UNMERGEABLE"),
    (14, "MADV_HUGEPAGE"),
    (15, "MADV_NOHUGEPAGE"),
    (16, "MADV_DONTDUMP"),
    (17, "MADV_DODUMP"),
    (18, "MADV_WIPEONFORK"),
    (19, "MADV_KEEPONFORK"),
    (20, "MADV_COLD"),
    (21, "MADV_PAGEOUT"),
    (22, "MADV_POPULATE_READ"),
    (23, "MADV_POPULATE_WRITE"),
    (24, "MADV_DONTNEED_LOCKED"),
    (100, "MADV_HWPOISON"),
    (101, "MADV_SOFT_OFFLINE"),
];

/// `wait4`/`waitid` options (linux/wait.h).
pub(crate) const WAIT_OPTIONS: &[(u64, &str)] = &[
    (1, "WNOHANG"),
    (2, "WUNTRACED"),
    (4, "WEXITED"),
    (8, "WCONTINUED"),
    (0x0100_0000, "WNOWAIT"),
    (0x8000_0000, "__WCLONE"),
    (0x4000_0000, "__WALL"),
    (0x2000_0000, "__WNOTHREAD"),
];

/// The `*at` calls' flags (linux/fcntl.h).
pub(crate) const AT_FLAGS: &[(u64, &str)] = &[
    (0x100, "AT_SYMLINK_NOFOLLOW"),
    (0x200, "AT_REMOVEDIR"),
    (0x400, "AT_SYMLINK_FOLLOW"),
    (0x800, "AT_NO_AUTOMOUNT"),
    (0x1000, "AT_EMPTY_PATH"),
    (0x8000, "AT_RECURSIVE"),
];

/// `pipe2`'s flags (the `open` flags it accepts).
pub(crate) const PIPE_FLAGS: &[(u64, &str)] = &[
    (0o4000, "O_NONBLOCK"),
    (0o40_000, "O_DIRECT"),
    (0o2_000_000, "O_CLOEXEC"),
];

/// Terminal and file `ioctl` requests programs make every day
/// (asm-generic/ioctls.h).
const IOCTLS: &[(u64, &str)] = &[
    (0x5401, "TCGETS"),
    (0x5402, "TCSETS"),
    (0x5403, "TCSETSW"),
    (0x5404, "TCSETSF"),
    (0x5409, "TCSBRK"),
    (0x540b, "TCFLSH"),
    (0x540e, "TIOCSCTTY"),
    (0x540f, "TIOCGPGRP"),
    (0x5410, "TIOCSPGRP"),
    (0x5413, "TIOCGWINSZ"),
    (0x5414, "TIOCSWINSZ"),
    (0x541b, "FIONREAD"),
    (0x5421, "FIONBIO"),
    (0x5422, "TIOCNOTTY"),
    (0x5429, "TIOCGSID"),
    (0x5450, "FIONCLEX"),
    (0x5451, "FIOCLEX"),
    (0x5452, "FIOASYNC"),
];

/// `sa_flags` of `struct sigaction`, strace's order.
pub(crate) const SA_FLAGS: &[(u64, &str)] = &[
    (0x0400_0000, "SA_RESTORER"),
    (0x0800_0000, "SA_ONSTACK"),
    (0x1000_0000, "SA_RESTART"),
    (0x2000_0000, "SA_INTERRUPT"),
    (0x4000_0000, "SA_NODEFER"),
    (0x8000_0000, "SA_RESETHAND"),
    (4, "SA_SIGINFO"),
    (1, "SA_NOCLDSTOP"),
    (2, "SA_NOCLDWAIT"),
];

/// `v`'s name in `table`, if it has one.
fn named(v: u64, table: &[(u64, &'static str)]) -> Option<&'static str> {
    table.iter().find(|(n, _)| *n == v).map(|(_, name)| *name)
}

/// An `arch_prctl` code: `ARCH_SET_FS`, else hex.
pub fn arch_prctl_code(v: u64) -> String {
    named(v, ARCH_PRCTL).map_or_else(|| format!("{v:#x}"), str::to_string)
}

/// A resource limit: `RLIMIT_STACK`, else decimal.
pub fn resource(v: u64) -> String {
    RESOURCES
        .get(v as usize)
        .map_or_else(|| (v as i32).to_string(), |s| s.to_string())
}

/// A clock id: `CLOCK_MONOTONIC`, else decimal (a CPU-time or fd clock).
pub fn clock(v: u64) -> String {
    CLOCKS
        .get(v as usize)
        .map_or_else(|| (v as i32).to_string(), |s| s.to_string())
}

/// `madvise` advice: `MADV_DONTNEED`, else decimal.
pub fn advice(v: u64) -> String {
    named(v, ADVICE).map_or_else(|| (v as i32).to_string(), str::to_string)
}

/// An `ioctl` request: `TIOCGWINSZ`, else hex.
pub fn ioctl_request(v: u64) -> String {
    let v = v & 0xffff_ffff;
    named(v, IOCTLS).map_or_else(|| format!("{v:#x}"), str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_and_unknown_ones_shown_as_numbers() {
        assert_eq!(arch_prctl_code(0x1002), "ARCH_SET_FS");
        assert_eq!(arch_prctl_code(0x9999), "0x9999");
        assert_eq!(resource(3), "RLIMIT_STACK");
        assert_eq!(resource(7), "RLIMIT_NOFILE");
        assert_eq!(resource(99), "99");
        assert_eq!(clock(1), "CLOCK_MONOTONIC");
        assert_eq!(clock(u64::MAX - 5), "-6");
        assert_eq!(advice(4), "MADV_DONTNEED");
        assert_eq!(ioctl_request(0x5413), "TIOCGWINSZ");
        assert_eq!(ioctl_request(0xc0045877), "0xc0045877");
    }
}
