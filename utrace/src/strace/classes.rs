//! strace's system-call classes (`-e trace=%file`, `%desc`, ...) on x86-64.
//!
//! Which call belongs to which class is strace's own decision (a flag per
//! call in its system-call table), not something the kernel says, so the
//! membership below follows strace 6.1 (Debian bookworm's, the strace the
//! guest image carries and the tests compare with) for the x86-64 calls.
//! Calls are named as the ABI and strace name them (`stat`, `umount2`,
//! `sendfile`), which is how [`crate::syscalls::SyscallTable`] names them.

/// A class of system calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `%desc`: calls that take or return a file descriptor.
    Desc,
    /// `%file`: calls that take a file name.
    File,
    /// `%ipc`: System V IPC.
    Ipc,
    /// `%net`, `%network`: sockets.
    Network,
    /// `%process`: process life cycle (and the calls that signal one).
    Process,
    /// `%signal`: signal handling.
    Signal,
    /// `%memory`: memory mapping.
    Memory,
    /// `%creds`: user and group ids, capabilities.
    Creds,
    /// `%clock`: reading and setting clocks.
    Clock,
    /// `%stat`: `stat` itself.
    Stat,
    /// `%lstat`: `lstat` itself.
    Lstat,
    /// `%fstat`: the stat calls on a descriptor.
    Fstat,
    /// `%%stat`: every stat variant.
    StatLike,
    /// `%statfs`: `statfs` itself.
    Statfs,
    /// `%fstatfs`: `fstatfs` itself.
    Fstatfs,
    /// `%%statfs`: every statfs variant.
    StatfsLike,
    /// `%pure`: calls without arguments that always succeed.
    Pure,
}

impl Class {
    /// The class a set token names: `%file`, `%%stat`, or one of strace's
    /// older bare names (`file`, `desc`, ...), any case; None otherwise.
    pub fn named(token: &str) -> Option<Class> {
        let t = token.to_ascii_lowercase();
        Some(match t.as_str() {
            "%desc" | "desc" => Class::Desc,
            "%file" | "file" => Class::File,
            "%ipc" | "ipc" => Class::Ipc,
            "%net" | "%network" | "network" => Class::Network,
            "%process" | "process" => Class::Process,
            "%signal" | "signal" => Class::Signal,
            "%memory" | "memory" => Class::Memory,
            "%creds" => Class::Creds,
            "%clock" => Class::Clock,
            "%stat" => Class::Stat,
            "%lstat" => Class::Lstat,
            "%fstat" => Class::Fstat,
            "%%stat" => Class::StatLike,
            "%statfs" => Class::Statfs,
            "%fstatfs" => Class::Fstatfs,
            "%%statfs" => Class::StatfsLike,
            "%pure" => Class::Pure,
            _ => return None,
        })
    }

    /// The calls of this class.
    pub fn members(self) -> &'static [&'static str] {
        match self {
            Class::Desc => DESC,
            Class::File => FILE,
            Class::Ipc => IPC,
            Class::Network => NETWORK,
            Class::Process => PROCESS,
            Class::Signal => SIGNAL,
            Class::Memory => MEMORY,
            Class::Creds => CREDS,
            Class::Clock => CLOCK,
            Class::Stat => &["stat"],
            Class::Lstat => &["lstat"],
            Class::Fstat => &["fstat", "newfstatat", "statx"],
            Class::StatLike => &["stat", "fstat", "lstat", "newfstatat", "statx"],
            Class::Statfs => &["statfs"],
            Class::Fstatfs => &["fstatfs"],
            Class::StatfsLike => &["ustat", "statfs", "fstatfs"],
            Class::Pure => PURE,
        }
    }

    /// Whether call `name` belongs to this class.
    pub fn contains(self, name: &str) -> bool {
        self.members().contains(&name)
    }
}

/// Calls on descriptors: the fd ones, the `*at` ones (a directory fd) and
/// those that create one.
const DESC: &[&str] = &[
    "read",
    "write",
    "open",
    "close",
    "fstat",
    "poll",
    "lseek",
    "mmap",
    "ioctl",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "pipe",
    "select",
    "dup",
    "dup2",
    "sendfile",
    "fcntl",
    "flock",
    "fsync",
    "fdatasync",
    "ftruncate",
    "getdents",
    "fchdir",
    "creat",
    "fchmod",
    "fchown",
    "fstatfs",
    "readahead",
    "fsetxattr",
    "fgetxattr",
    "flistxattr",
    "fremovexattr",
    "epoll_create",
    "getdents64",
    "fadvise64",
    "epoll_wait",
    "epoll_ctl",
    "mq_open",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
    "inotify_init",
    "inotify_add_watch",
    "inotify_rm_watch",
    "openat",
    "mkdirat",
    "mknodat",
    "fchownat",
    "futimesat",
    "newfstatat",
    "unlinkat",
    "renameat",
    "linkat",
    "symlinkat",
    "readlinkat",
    "fchmodat",
    "faccessat",
    "pselect6",
    "ppoll",
    "splice",
    "tee",
    "sync_file_range",
    "vmsplice",
    "utimensat",
    "epoll_pwait",
    "signalfd",
    "timerfd_create",
    "eventfd",
    "fallocate",
    "timerfd_settime",
    "timerfd_gettime",
    "signalfd4",
    "eventfd2",
    "epoll_create1",
    "dup3",
    "pipe2",
    "inotify_init1",
    "preadv",
    "pwritev",
    "perf_event_open",
    "fanotify_init",
    "fanotify_mark",
    "name_to_handle_at",
    "open_by_handle_at",
    "syncfs",
    "setns",
    "finit_module",
    "renameat2",
    "memfd_create",
    "kexec_file_load",
    "bpf",
    "execveat",
    "userfaultfd",
    "copy_file_range",
    "preadv2",
    "pwritev2",
    "statx",
    "pidfd_send_signal",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "pidfd_open",
    "openat2",
    "pidfd_getfd",
    "faccessat2",
    "process_madvise",
    "epoll_pwait2",
    "mount_setattr",
    "quotactl_fd",
    "landlock_create_ruleset",
    "landlock_add_rule",
    "landlock_restrict_self",
    "memfd_secret",
    "process_mrelease",
];

/// Calls that take a file name (a path argument).
const FILE: &[&str] = &[
    "open",
    "stat",
    "lstat",
    "access",
    "execve",
    "truncate",
    "getcwd",
    "chdir",
    "rename",
    "mkdir",
    "rmdir",
    "creat",
    "link",
    "unlink",
    "symlink",
    "readlink",
    "chmod",
    "chown",
    "lchown",
    "utime",
    "mknod",
    "uselib",
    "statfs",
    "pivot_root",
    "chroot",
    "acct",
    "mount",
    "umount2",
    "swapon",
    "swapoff",
    "quotactl",
    "setxattr",
    "lsetxattr",
    "getxattr",
    "lgetxattr",
    "listxattr",
    "llistxattr",
    "removexattr",
    "lremovexattr",
    "utimes",
    "inotify_add_watch",
    "openat",
    "mkdirat",
    "mknodat",
    "fchownat",
    "futimesat",
    "newfstatat",
    "unlinkat",
    "renameat",
    "linkat",
    "symlinkat",
    "readlinkat",
    "fchmodat",
    "faccessat",
    "utimensat",
    "fanotify_mark",
    "name_to_handle_at",
    "renameat2",
    "execveat",
    "statx",
    "open_tree",
    "move_mount",
    "fsconfig",
    "fspick",
    "openat2",
    "faccessat2",
    "mount_setattr",
];

const IPC: &[&str] = &[
    "shmget",
    "shmat",
    "shmctl",
    "semget",
    "semop",
    "semctl",
    "shmdt",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "semtimedop",
];

const NETWORK: &[&str] = &[
    "sendfile",
    "socket",
    "connect",
    "accept",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "shutdown",
    "bind",
    "listen",
    "getsockname",
    "getpeername",
    "socketpair",
    "setsockopt",
    "getsockopt",
    "getpmsg",
    "putpmsg",
    "accept4",
    "recvmmsg",
    "sendmmsg",
];

const PROCESS: &[&str] = &[
    "clone",
    "fork",
    "vfork",
    "execve",
    "exit",
    "wait4",
    "kill",
    "rt_sigqueueinfo",
    "tkill",
    "exit_group",
    "tgkill",
    "waitid",
    "rt_tgsigqueueinfo",
    "execveat",
    "pidfd_send_signal",
    "clone3",
];

const SIGNAL: &[&str] = &[
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "pause",
    "kill",
    "rt_sigpending",
    "rt_sigtimedwait",
    "rt_sigqueueinfo",
    "rt_sigsuspend",
    "sigaltstack",
    "tkill",
    "tgkill",
    "signalfd",
    "signalfd4",
    "rt_tgsigqueueinfo",
    "pidfd_send_signal",
    "io_uring_enter",
];

const MEMORY: &[&str] = &[
    "mmap",
    "mprotect",
    "munmap",
    "brk",
    "mremap",
    "msync",
    "mincore",
    "madvise",
    "shmat",
    "shmdt",
    "mlock",
    "munlock",
    "mlockall",
    "munlockall",
    "io_setup",
    "io_destroy",
    "remap_file_pages",
    "mbind",
    "set_mempolicy",
    "get_mempolicy",
    "migrate_pages",
    "move_pages",
    "mlock2",
    "pkey_mprotect",
    "io_uring_register",
    "set_mempolicy_home_node",
];

const CREDS: &[&str] = &[
    "getuid",
    "getgid",
    "setuid",
    "setgid",
    "geteuid",
    "getegid",
    "setreuid",
    "setregid",
    "getgroups",
    "setgroups",
    "setresuid",
    "getresuid",
    "setresgid",
    "getresgid",
    "setfsuid",
    "setfsgid",
    "capget",
    "capset",
    "prctl",
];

const CLOCK: &[&str] = &[
    "gettimeofday",
    "adjtimex",
    "settimeofday",
    "time",
    "clock_settime",
    "clock_gettime",
    "clock_getres",
    "clock_adjtime",
];

const PURE: &[&str] = &[
    "getpid", "getuid", "getgid", "geteuid", "getegid", "getppid", "getpgrp", "gettid",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_find_their_class() {
        assert_eq!(Class::named("%file"), Some(Class::File));
        assert_eq!(Class::named("file"), Some(Class::File));
        assert_eq!(Class::named("%NET"), Some(Class::Network));
        assert_eq!(Class::named("%%stat"), Some(Class::StatLike));
        assert_eq!(Class::named("%files"), None);
        assert_eq!(Class::named("openat"), None);
    }

    #[test]
    fn the_classes_strace_users_rely_on() {
        assert!(Class::File.contains("openat") && Class::Desc.contains("openat"));
        assert!(Class::Desc.contains("read") && !Class::File.contains("read"));
        assert!(Class::Process.contains("execve") && Class::Process.contains("wait4"));
        assert!(Class::Memory.contains("mmap") && !Class::Memory.contains("read"));
        assert!(Class::Network.contains("socket") && !Class::Desc.contains("socket"));
        assert!(Class::Signal.contains("rt_sigaction") && Class::Process.contains("kill"));
        assert!(Class::Pure.contains("getpid") && !Class::Pure.contains("getcwd"));
        assert!(Class::File.contains("getcwd"));
    }

    #[test]
    fn no_class_lists_a_call_twice() {
        for c in [
            Class::Desc,
            Class::File,
            Class::Ipc,
            Class::Network,
            Class::Process,
            Class::Signal,
            Class::Memory,
            Class::Creds,
            Class::Clock,
            Class::Pure,
        ] {
            let m = c.members();
            let mut sorted = m.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), m.len(), "{c:?}");
        }
    }
}
