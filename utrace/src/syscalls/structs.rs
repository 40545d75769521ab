//! Structures a call reads or fills in user memory, shown as strace 6.1
//! shows them without `-v`: signal sets (`[USR1]`, `~[RT_1]`), `struct
//! sigaction`, `struct stat` (`{st_mode=S_IFREG|0644, st_size=67, ...}`),
//! `struct timespec`, `struct rlimit`, CPU sets, `clone3`'s `struct
//! clone_args`, and the count of a `getdents64` buffer's entries.
//!
//! Every read goes through [`UserMemory`]: the guest is untrusted, and a
//! structure that cannot be read (or makes no sense, as a signal set of
//! 300 bytes) is shown as its address, as strace does.

use super::format::{flags, hex, ptr, signal_name, UserMemory};
use super::names::SA_FLAGS;

/// Reads `N` bytes at `addr`, if they are all mapped.
fn read_array<const N: usize>(addr: u64, mem: &dyn UserMemory) -> Option<[u8; N]> {
    let mut b = [0u8; N];
    mem.read(addr, &mut b).then_some(b)
}

/// The little-endian u64 at `off` of `b`.
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// A signal set of `bytes` (bit n-1 is signal n) as strace prints it:
/// names without `SIG`, `RTMIN` and `RT_n` above 31, and `~[...]` (the
/// signals not in it) when two thirds or more of the bits are set.
pub fn sigset(bytes: &[u8]) -> String {
    let bits = bytes.len() * 8;
    let set = |i: usize| bytes[i / 8] & (1 << (i % 8)) != 0;
    let count = (0..bits).filter(|&i| set(i)).count();
    // strace counts in 32-bit words: a set of 8 bytes inverts from 42.
    let words = bytes.len().div_ceil(4);
    let invert = count >= words * 32 * 2 / 3 && count > 0;
    let mut out = String::from(if invert { "~[" } else { "[" });
    let mut first = true;
    for i in (0..bits).filter(|&i| set(i) != invert) {
        if !first {
            out.push(' ');
        }
        first = false;
        // `SIGRTMIN` and `SIGRT_n` above 31, as `signal_name` has them.
        out.push_str(signal_name(i as i32 + 1).trim_start_matches("SIG"));
    }
    out.push(']');
    out
}

/// The signal set at `addr` of `len` bytes (a call's `sigsetsize`):
/// `NULL`, the set, or the address when it cannot be read or `len` is
/// not a kernel sigset's size.
pub fn sigset_at(addr: u64, len: u64, mem: &dyn UserMemory) -> String {
    if addr == 0 {
        return "NULL".into();
    }
    if !(1..=8).contains(&len) {
        return ptr(addr);
    }
    let mut b = vec![0u8; len as usize];
    if !mem.read(addr, &mut b) {
        return ptr(addr);
    }
    sigset(&b)
}

/// The kernel's `struct sigaction` at `addr` (handler, flags, restorer,
/// mask: 8 bytes each): `{sa_handler=SIG_DFL, sa_mask=[], sa_flags=0}`,
/// with `sa_restorer` when `SA_RESTORER` is set.
pub fn sigaction_at(addr: u64, mem: &dyn UserMemory) -> String {
    if addr == 0 {
        return "NULL".into();
    }
    let Some(b) = read_array::<32>(addr, mem) else {
        return ptr(addr);
    };
    let (handler, sa_flags, restorer) = (u64_at(&b, 0), u64_at(&b, 8), u64_at(&b, 16));
    let handler = match handler as i64 {
        0 => "SIG_DFL".to_string(),
        1 => "SIG_IGN".to_string(),
        -1 => "SIG_ERR".to_string(),
        _ => format!("{handler:#x}"),
    };
    let mut s = format!(
        "{{sa_handler={handler}, sa_mask={}, sa_flags={}",
        sigset(&b[24..32]),
        flags(sa_flags, SA_FLAGS, "0")
    );
    if sa_flags & 0x0400_0000 != 0 {
        s.push_str(&format!(", sa_restorer={}", ptr(restorer)));
    }
    s.push('}');
    s
}

/// A file mode as strace's `print_symbolic_mode_t`: `S_IFREG|0644`.
fn symbolic_mode(mode: u32) -> String {
    const TYPES: &[(u32, &str)] = &[
        (0o140_000, "S_IFSOCK"),
        (0o120_000, "S_IFLNK"),
        (0o100_000, "S_IFREG"),
        (0o060_000, "S_IFBLK"),
        (0o040_000, "S_IFDIR"),
        (0o020_000, "S_IFCHR"),
        (0o010_000, "S_IFIFO"),
    ];
    let kind = mode & 0o170_000;
    let mut s = String::new();
    if kind != 0 {
        match TYPES.iter().find(|(t, _)| *t == kind) {
            Some((_, name)) => {
                s.push_str(name);
                s.push('|');
            }
            None => return format!("{mode:#o}").replacen("0o", "0", 1),
        }
    }
    for (bit, name) in [
        (0o4000, "S_ISUID|"),
        (0o2000, "S_ISGID|"),
        (0o1000, "S_ISVTX|"),
    ] {
        if mode & bit != 0 {
            s.push_str(name);
        }
    }
    // C's `%#03o`: a leading 0 (none for 0 itself), at least 3 digits.
    let perms = mode & 0o777;
    let digits = if perms == 0 {
        "0".to_string()
    } else {
        format!("0{perms:o}")
    };
    s.push_str(&format!("{digits:0>3}"));
    s
}

/// A device number as strace shows it: `makedev(0x88, 0)`.
fn makedev(dev: u64) -> String {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    format!("makedev({}, {})", hex(major), hex(minor))
}

/// The x86-64 `struct stat` at `addr` (st_mode at 24, st_rdev at 40,
/// st_size at 48): `{st_mode=S_IFREG|0644, st_size=67, ...}`, a device's
/// `st_rdev` instead of its size.
pub fn stat_at(addr: u64, mem: &dyn UserMemory) -> String {
    let Some(b) = read_array::<56>(addr, mem) else {
        return ptr(addr);
    };
    let mode = u32::from_le_bytes(b[24..28].try_into().expect("4 bytes"));
    let tail = match mode & 0o170_000 {
        0o020_000 | 0o060_000 => format!("st_rdev={}", makedev(u64_at(&b, 40))),
        _ => format!("st_size={}", u64_at(&b, 48) as i64),
    };
    format!("{{st_mode={}, {tail}, ...}}", symbolic_mode(mode))
}

/// The two descriptors `pipe` stored at `addr`.
pub fn pipe_fds_at(addr: u64, mem: &dyn UserMemory) -> Option<[u64; 2]> {
    let b = read_array::<8>(addr, mem)?;
    let fd = |i: usize| i32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes")) as u64;
    Some([fd(0), fd(4)])
}

/// A structure of two 64-bit words at `addr`, shown by `show`: `NULL`,
/// or the address when it cannot be read.
fn two_words_at(addr: u64, mem: &dyn UserMemory, show: impl Fn(u64, u64) -> String) -> String {
    if addr == 0 {
        return "NULL".into();
    }
    match read_array::<16>(addr, mem) {
        Some(b) => show(u64_at(&b, 0), u64_at(&b, 8)),
        None => ptr(addr),
    }
}

/// A `struct timespec` at `addr`: `{tv_sec=1, tv_nsec=500000000}`.
pub fn timespec_at(addr: u64, mem: &dyn UserMemory) -> String {
    two_words_at(addr, mem, |sec, nsec| {
        format!("{{tv_sec={}, tv_nsec={}}}", sec as i64, nsec as i64)
    })
}

/// A resource limit value: `RLIM64_INFINITY`, `8192*1024`, or decimal.
fn rlim(v: u64) -> String {
    if v == u64::MAX {
        "RLIM64_INFINITY".into()
    } else if v > 1024 && v.is_multiple_of(1024) {
        format!("{}*1024", v / 1024)
    } else {
        v.to_string()
    }
}

/// A `struct rlimit` at `addr`: `{rlim_cur=8192*1024,
/// rlim_max=RLIM64_INFINITY}`.
pub fn rlimit_at(addr: u64, mem: &dyn UserMemory) -> String {
    two_words_at(addr, mem, |cur, max| {
        format!("{{rlim_cur={}, rlim_max={}}}", rlim(cur), rlim(max))
    })
}

/// The CPU set of `len` bytes at `addr`: the CPUs in it, `[0 1]`. Sets
/// past 1 KiB (8,192 CPUs) are shown by address.
pub fn cpu_set_at(addr: u64, len: u64, mem: &dyn UserMemory) -> String {
    if addr == 0 {
        return "NULL".into();
    }
    if len == 0 || len > 1024 {
        return ptr(addr);
    }
    let mut b = vec![0u8; len as usize];
    if !mem.read(addr, &mut b) {
        return ptr(addr);
    }
    let cpus: Vec<String> = (0..b.len() * 8)
        .filter(|&i| b[i / 8] & (1 << (i % 8)) != 0)
        .map(|i| i.to_string())
        .collect();
    format!("[{}]", cpus.join(" "))
}

/// A `getdents64` buffer that the call filled with `len` bytes: its
/// address and how many entries (`0x... /* 5 entries */`), counted by each
/// record's `d_reclen` (at offset 16); a record that runs past the end or
/// has a zero length stops the count.
pub fn dirents_at(addr: u64, len: u64, mem: &dyn UserMemory) -> String {
    const HEADER: u64 = 19;
    // The return value is the guest kernel's word: a walk up to a huge one
    // over well-formed records would read for minutes on the vCPU thread
    // (found by fuzzing). Real buffers are tens of KiB (glibc: 32 KiB);
    // past this only the address is shown.
    const MAX_WALKED: u64 = 1 << 20;
    if len > MAX_WALKED {
        return ptr(addr);
    }
    let mut count = 0;
    let mut off = 0u64;
    while off + HEADER <= len {
        let Some(b) = read_array::<2>(addr + off + 16, mem) else {
            return ptr(addr);
        };
        let reclen = u64::from(u16::from_le_bytes(b));
        if reclen < HEADER || off + reclen > len {
            break;
        }
        count += 1;
        off += reclen;
    }
    format!("{} /* {count} entries */", ptr(addr))
}

/// `clone3`'s `struct clone_args` at `addr` of `size` bytes, as strace
/// shows it at exit: the fields it reads (`{flags=..., child_tid=...,
/// parent_tid=..., exit_signal=..., stack=..., stack_size=..., tls=...}`)
/// and, once the call has returned a thread id, ` => {parent_tid=[N]}`
/// with what the kernel stored there.
pub fn clone3_at(addr: u64, size: u64, ret: i64, mem: &dyn UserMemory) -> String {
    const CLONE_PIDFD: u64 = 0x1000;
    const CLONE_SETTLS: u64 = 0x80000;
    const CLONE_PARENT_SETTID: u64 = 0x100000;
    const CLONE_CHILD_CLEARTID: u64 = 0x200000;
    const CLONE_CHILD_SETTID: u64 = 0x1000000;
    // flags .. tls: the fields every clone3 caller passes.
    if size < 64 {
        return ptr(addr);
    }
    let Some(b) = read_array::<64>(addr, mem) else {
        return ptr(addr);
    };
    let field = |i: usize| u64_at(&b, i * 8);
    let fl = field(0);
    let mut s = format!("{{flags={}", super::format::clone_flag_names(fl));
    if fl & CLONE_PIDFD != 0 {
        s.push_str(&format!(", pidfd={}", ptr(field(1))));
    }
    if fl & (CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID) != 0 {
        s.push_str(&format!(", child_tid={}", ptr(field(2))));
    }
    if fl & CLONE_PARENT_SETTID != 0 {
        s.push_str(&format!(", parent_tid={}", ptr(field(3))));
    }
    let exit_signal = field(4);
    let exit_signal = if exit_signal < i32::MAX as u64 {
        signal_name(exit_signal as i32)
    } else {
        exit_signal.to_string()
    };
    s.push_str(&format!(
        ", exit_signal={exit_signal}, stack={}",
        ptr(field(5))
    ));
    s.push_str(&format!(", stack_size={}", hex(field(6))));
    if fl & CLONE_SETTLS != 0 {
        s.push_str(&format!(", tls={}", ptr(field(7))));
    }
    s.push('}');
    if ret > 0 && fl & CLONE_PARENT_SETTID != 0 {
        if let Some(t) = read_array::<4>(field(3), mem) {
            s.push_str(&format!(" => {{parent_tid=[{}]}}", i32::from_le_bytes(t)));
        }
    }
    s
}

/// `rt_sigreturn`'s argument as strace shows it: the signal mask the
/// return restores, from the signal frame's `uc_sigmask` at the user
/// stack pointer (the restorer's `ret` popped `pretcode`, so the stack
/// pointer is at the frame's `struct ucontext`: uc_flags, uc_link,
/// uc_stack (24 bytes) and uc_mcontext (256) come first).
pub fn sigreturn_mask(mem: &dyn UserMemory) -> Option<String> {
    const UC_SIGMASK: u64 = 8 + 8 + 24 + 256;
    let sp = mem.user_sp()?;
    let b = read_array::<8>(sp.checked_add(UC_SIGMASK)?, mem)?;
    Some(format!("{{mask={}}}", sigset(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(u64, Vec<u8>);
    impl UserMemory for Mem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let Some(off) = addr.checked_sub(self.0) else {
                return false;
            };
            match self.1.get(off as usize..off as usize + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
        fn user_sp(&self) -> Option<u64> {
            Some(self.0)
        }
    }

    fn words(ws: &[u64]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn signal_sets_as_strace_prints_them() {
        assert_eq!(sigset(&0u64.to_le_bytes()), "[]");
        assert_eq!(sigset(&(1u64 << 9).to_le_bytes()), "[USR1]");
        assert_eq!(sigset(&(3u64 << 31).to_le_bytes()), "[RTMIN RT_1]");
        assert_eq!(sigset(&(!0u64).to_le_bytes()), "~[]");
        assert_eq!(sigset(&(!(1u64 << 32)).to_le_bytes()), "~[RT_1]");
        assert_eq!(sigset_at(0, 8, &Mem(0x1000, vec![])), "NULL");
        assert_eq!(sigset_at(0x1000, 300, &Mem(0x1000, vec![0; 300])), "0x1000");
    }

    #[test]
    fn sigaction_stat_rlimit_and_timespec() {
        let sa = Mem(
            0x1000,
            words(&[0x401000, 0x0400_0000 | 0x1000_0000, 0x402000, 1 << 16]),
        );
        assert_eq!(
            sigaction_at(0x1000, &sa),
            "{sa_handler=0x401000, sa_mask=[CHLD], sa_flags=SA_RESTORER|SA_RESTART, sa_restorer=0x402000}"
        );
        let dfl = Mem(0x1000, words(&[0, 0, 0, 0]));
        assert_eq!(
            sigaction_at(0x1000, &dfl),
            "{sa_handler=SIG_DFL, sa_mask=[], sa_flags=0}"
        );
        let mut st = vec![0u8; 144];
        st[24..28].copy_from_slice(&0o100644u32.to_le_bytes());
        st[48..56].copy_from_slice(&67u64.to_le_bytes());
        assert_eq!(
            stat_at(0x1000, &Mem(0x1000, st.clone())),
            "{st_mode=S_IFREG|0644, st_size=67, ...}"
        );
        st[24..28].copy_from_slice(&0o20620u32.to_le_bytes());
        st[40..48].copy_from_slice(&0x8800u64.to_le_bytes());
        assert_eq!(
            stat_at(0x1000, &Mem(0x1000, st)),
            "{st_mode=S_IFCHR|0620, st_rdev=makedev(0x88, 0), ...}"
        );
        assert_eq!(stat_at(0x2000, &Mem(0x1000, vec![])), "0x2000");
        let rl = Mem(0x1000, words(&[8 << 20, u64::MAX]));
        assert_eq!(
            rlimit_at(0x1000, &rl),
            "{rlim_cur=8192*1024, rlim_max=RLIM64_INFINITY}"
        );
        let ts = Mem(0x1000, words(&[1, 500]));
        assert_eq!(timespec_at(0x1000, &ts), "{tv_sec=1, tv_nsec=500}");
    }

    /// Memory where every address holds a well-formed 19-byte record.
    struct EndlessRecords;
    impl UserMemory for EndlessRecords {
        fn read(&self, _addr: u64, buf: &mut [u8]) -> bool {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = if i % 2 == 0 { 19 } else { 0 };
            }
            true
        }
    }

    /// A guest-chosen `getdents64` return value bounds nothing: a huge one
    /// over endless well-formed records is shown as the address at once
    /// (it walked for minutes to centuries before; found by fuzzing).
    #[test]
    fn a_huge_dirents_length_is_not_walked() {
        let started = std::time::Instant::now();
        assert_eq!(dirents_at(0x10000, 1 << 40, &EndlessRecords), "0x10000");
        assert_eq!(
            dirents_at(0x10000, 19 * 1000, &EndlessRecords),
            "0x10000 /* 1000 entries */"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn cpu_sets_dirents_clone3_and_sigreturn() {
        assert_eq!(
            cpu_set_at(0x1000, 8, &Mem(0x1000, words(&[0b101]))),
            "[0 2]"
        );
        // Two records of 24 bytes, then a hostile zero length.
        let mut d = vec![0u8; 64];
        d[16..18].copy_from_slice(&24u16.to_le_bytes());
        d[40..42].copy_from_slice(&24u16.to_le_bytes());
        assert_eq!(
            dirents_at(0x10000, 64, &Mem(0x10000, d)),
            "0x10000 /* 2 entries */"
        );
        let mut args = words(&[
            0x100 | 0x100000 | 0x80000,
            0,
            0,
            0x2000,
            0,
            0x3000,
            0x800,
            0x4000,
        ]);
        args.resize(0x1008, 0);
        let mut mem = Mem(0x1000, args);
        mem.1[0x1000..0x1004].copy_from_slice(&77i32.to_le_bytes());
        assert_eq!(
            clone3_at(0x1000, 88, 77, &mem),
            "{flags=CLONE_VM|CLONE_SETTLS|CLONE_PARENT_SETTID, parent_tid=0x2000, exit_signal=0, \
             stack=0x3000, stack_size=0x800, tls=0x4000} => {parent_tid=[77]}"
        );
        let mut frame = vec![0u8; 304];
        frame[296..304].copy_from_slice(&(1u64 << 9).to_le_bytes());
        assert_eq!(
            sigreturn_mask(&Mem(0x1000, frame)).as_deref(),
            Some("{mask=[USR1]}")
        );
    }
}
