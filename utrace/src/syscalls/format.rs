//! strace-style rendering of system calls: `openat(AT_FDCWD,
//! "/etc/hostname", O_RDONLY) = 3`, `-1 ENOENT (No such file or
//! directory)`, strings quoted and cut at `-s` bytes as strace does.

use super::{has_out_args, kinds_for, names, signature, structs, Arg, Ret};

/// Reads the traced thread's user memory (the guest is untrusted: a read
/// may fail, and then the pointer is shown instead).
pub trait UserMemory {
    /// Fills `buf` from user address `addr`; false if any byte is unmapped.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;

    /// The path of the thread's open descriptor `fd` (`strace -y`), if
    /// known.
    fn fd_path(&self, _fd: u64) -> Option<String> {
        None
    }

    /// The thread's user stack pointer at this stop, if known
    /// (`rt_sigreturn` shows the mask of the signal frame there).
    fn user_sp(&self) -> Option<u64> {
        None
    }
}

/// Longest `argv` shown before `...`, as strace's default.
const MAX_ARRAY: usize = 32;

/// The largest `-s` accepted (1 MiB): a string argument is read from guest
/// memory up to this many bytes, once per argument, so the bound caps what a
/// guest (or a typo) can make the tracer allocate.
pub const MAX_STRING_LIMIT: usize = 1 << 20;

/// Checks a requested string limit against [`MAX_STRING_LIMIT`].
pub fn check_string_limit(n: usize) -> Result<usize, String> {
    if n > MAX_STRING_LIMIT {
        Err(format!(
            "string limit {n} is above the largest accepted, {MAX_STRING_LIMIT}"
        ))
    } else {
        Ok(n)
    }
}

/// Renders calls with strace's conventions.
#[derive(Debug, Clone, Copy)]
pub struct Formatter {
    /// `-s`: longest string shown (strace's default is 32).
    pub string_limit: usize,
    /// `-y`: a file descriptor shown with its file's path.
    pub decode_fds: bool,
}

impl Default for Formatter {
    fn default() -> Self {
        Self {
            string_limit: 32,
            decode_fds: false,
        }
    }
}

/// A call's arguments rendered at entry; those only known at exit are
/// `None` until [`Formatter::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Call name (`syscall_0x1b4` when the kernel has no name for it).
    pub name: String,
    /// Raw arguments.
    pub args: [u64; 6],
    /// How each argument is shown (empty for an unknown call).
    pub kinds: Vec<Arg>,
    /// How the return value is shown (None for an unknown call).
    pub ret: Option<Ret>,
    /// Rendered arguments.
    pub shown: Vec<Option<String>>,
}

impl Pending {
    /// The start of the call's line as strace prints it at entry: the name
    /// and the arguments known then, with `, ` if more follow at exit
    /// (`read(3, `; `getpid(`; `write(1, "x", 1`). [`Formatter::finish`]
    /// keeps those arguments, so its line starts with this.
    pub fn entry_prefix(&self) -> String {
        let known: Vec<&str> = self.shown.iter().map_while(|s| s.as_deref()).collect();
        let mut s = format!("{}({}", self.name, known.join(", "));
        if !known.is_empty() && known.len() < self.shown.len() {
            s.push_str(", ");
        }
        s
    }
}

impl Formatter {
    /// Renders the arguments known at entry.
    pub fn enter(&self, name: &str, args: [u64; 6], mem: &dyn UserMemory) -> Pending {
        self.enter_described(name, args, mem, None)
    }

    /// [`Formatter::enter`] with the argument kinds the running kernel
    /// describes for a call without a hand-written signature
    /// (`SyscallTable::described`): its arguments shown by kind, its
    /// return value in decimal, instead of six hex words.
    pub fn enter_described(
        &self,
        name: &str,
        args: [u64; 6],
        mem: &dyn UserMemory,
        described: Option<&[Arg]>,
    ) -> Pending {
        let (kinds, ret) = match (kinds_for(name, &args), described) {
            (Some((kinds, ret)), _) => (kinds, Some(ret)),
            (None, Some(kinds)) => (kinds.to_vec(), Some(Ret::Int)),
            (None, None) => (Vec::new(), None),
        };
        let shown = if name == "clone" {
            clone_args(args)
        } else if ret.is_some() {
            kinds
                .iter()
                .zip(args)
                .map(|(k, v)| self.entry_arg(*k, v, &args, mem))
                .collect()
        } else {
            // strace's printargs: C's `%#lx`, so 0 is `0`.
            args.iter().map(|a| Some(hex(*a))).collect()
        };
        Pending {
            name: name.to_string(),
            args,
            kinds,
            ret,
            shown,
        }
    }

    /// Whether the call's arguments are complete at entry (so a line can
    /// be shown as `name(args <unfinished ...>` while it runs).
    pub fn complete_at_entry(&self, name: &str) -> bool {
        signature(name).is_none_or(|(kinds, _)| !has_out_args(kinds))
    }

    /// Renders the remaining arguments and the return value: the whole
    /// line without a trailing newline.
    pub fn finish(&self, p: &Pending, ret: i64, mem: &dyn UserMemory) -> String {
        self.exit_line(p, &self.finish_args(p, ret, mem), ret, mem)
    }

    /// The line of call `p` with arguments `args` at its exit, where a
    /// returned descriptor can still be named (`-y`).
    pub fn exit_line(
        &self,
        p: &Pending,
        args: &[String],
        ret: i64,
        mem: &dyn UserMemory,
    ) -> String {
        let shown = match p.ret {
            Some(Ret::Fd) if errno_of(ret).is_none() => self.fd(ret as u64, mem),
            _ => self.ret(&p.name, ret),
        };
        format!("{}({}) = {shown}", p.name, args.join(", "))
    }

    /// Descriptor `v` (an `int`), with `-y` its file's path as strace
    /// shows it: `3</etc/hostname>`.
    fn fd(&self, v: u64, mem: &dyn UserMemory) -> String {
        let n = v as i32;
        if self.decode_fds && n >= 0 {
            if let Some(path) = mem.fd_path(n as u64) {
                return format!("{n}<{}>", escape_path(&path));
            }
        }
        n.to_string()
    }

    /// Every argument of a returned call as its line shows it.
    pub fn finish_args(&self, p: &Pending, ret: i64, mem: &dyn UserMemory) -> Vec<String> {
        let kinds = &p.kinds;
        p.shown
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(s) => s.clone(),
                None => match kinds.get(i) {
                    Some(Arg::BufIn(n)) => self.buffer(p.args[i], p.args[*n], mem),
                    Some(k) => self.exit_arg(*k, p.args[i], &p.args, ret, mem),
                    None => hex(p.args[i]),
                },
            })
            .collect()
    }

    /// The line of call `name` with arguments `args` that returned `ret`.
    pub fn line(&self, name: &str, args: &[String], ret: i64) -> String {
        format!("{name}({}) = {}", args.join(", "), self.ret(name, ret))
    }

    /// The line of a call that did not return (`exit_group(0) = ?`).
    pub fn unreturned(&self, p: &Pending) -> String {
        self.unreturned_line(&p.name, &self.unreturned_args(p))
    }

    /// The line of call `name` with arguments `args` that did not return.
    pub fn unreturned_line(&self, name: &str, args: &[String]) -> String {
        format!("{name}({}) = ?", args.join(", "))
    }

    /// The arguments of a call that did not return, as its line shows them.
    pub fn unreturned_args(&self, p: &Pending) -> Vec<String> {
        p.shown
            .iter()
            .zip(p.args)
            .map(|(s, a)| s.clone().unwrap_or_else(|| hex(a)))
            .collect()
    }

    /// The return value as strace shows it.
    pub fn ret(&self, name: &str, ret: i64) -> String {
        if let Some(e) = errno_of(ret) {
            return match errno_name(e) {
                Some((n, msg)) if e >= 512 => format!("? {n} ({msg})"),
                Some((n, msg)) => format!("-1 {n} ({msg})"),
                None => format!("-1 E{e} (Unknown error {e})"),
            };
        }
        match signature(name).map(|s| s.1) {
            Some(Ret::Hex) => format!("{ret:#x}"),
            Some(Ret::NoReturn) => "?".into(),
            _ => ret.to_string(),
        }
    }

    fn entry_arg(&self, kind: Arg, v: u64, all: &[u64; 6], mem: &dyn UserMemory) -> Option<String> {
        Some(match kind {
            Arg::ArchPrctlCode => names::arch_prctl_code(v),
            Arg::Resource => names::resource(v),
            Arg::ClockId => names::clock(v),
            Arg::Advice => names::advice(v),
            Arg::WaitOptions => flags(v, names::WAIT_OPTIONS, "0"),
            Arg::AtFlags => flags(v, names::AT_FLAGS, "0"),
            Arg::IoctlRequest => names::ioctl_request(v),
            Arg::PipeFlags => flags(v, names::PIPE_FLAGS, "0"),
            Arg::SigSetIn(len) => structs::sigset_at(v, all[len], mem),
            Arg::SigActionIn => structs::sigaction_at(v, mem),
            Arg::TimespecIn => structs::timespec_at(v, mem),
            Arg::RlimitIn => structs::rlimit_at(v, mem),
            Arg::CpuSetIn(len) => structs::cpu_set_at(v, all[len], mem),
            Arg::SigreturnMask => return structs::sigreturn_mask(mem),
            Arg::PrctlOption => match v {
                15 => "PR_SET_NAME".into(),
                16 => "PR_GET_NAME".into(),
                _ => format!("{v:#x}"),
            },
            Arg::Int => (v as i32).to_string(),
            Arg::Fd => self.fd(v, mem),
            Arg::FcntlCmd => fcntl_cmd(v),
            Arg::Uint => v.to_string(),
            Arg::Hex => hex(v),
            Arg::Ptr => ptr(v),
            Arg::DirFd => {
                if v as i32 == AT_FDCWD {
                    "AT_FDCWD".into()
                } else {
                    self.fd(v, mem)
                }
            }
            // Pages the kernel has not touched yet (a fresh fork's
            // file-backed data) may not be mapped at entry: such arguments
            // are read again at exit, after the kernel faulted them in.
            Arg::Str if v != 0 => return self.try_c_string(v, mem),
            Arg::Str => "NULL".into(),
            Arg::BufIn(len_arg) => return self.try_buffer(v, all[len_arg], mem),
            Arg::OpenFlags => open_flags(v),
            Arg::Mode => format!("{:#o}", v & 0o7777).replacen("0o", "0", 1),
            Arg::Whence => match v {
                0 => "SEEK_SET".into(),
                1 => "SEEK_CUR".into(),
                2 => "SEEK_END".into(),
                3 => "SEEK_DATA".into(),
                4 => "SEEK_HOLE".into(),
                _ => v.to_string(),
            },
            Arg::Prot => flags(v, PROT, "PROT_NONE"),
            Arg::MapFlags => flags(v, MAP, "0"),
            Arg::CloneFlags => {
                let sig = v & 0xff;
                let mut s = flags(v & !0xff, CLONE, "");
                if sig != 0 {
                    if !s.is_empty() {
                        s.push('|');
                    }
                    s.push_str(&signal_name(sig as i32));
                }
                if s.is_empty() {
                    s.push('0');
                }
                s
            }
            Arg::Signal => signal_name(v as i32),
            Arg::SigHow => match v {
                0 => "SIG_BLOCK".into(),
                1 => "SIG_UNBLOCK".into(),
                2 => "SIG_SETMASK".into(),
                _ => v.to_string(),
            },
            Arg::Argv => return self.try_argv(v, mem),
            Arg::Envp => {
                let n = count_pointers(v, mem);
                match n {
                    Some(n) => format!("{} /* {n} var{} */", ptr(v), if n == 1 { "" } else { "s" }),
                    None => ptr(v),
                }
            }
            Arg::GrndFlags => flags(v, GRND, "0"),
            Arg::AccessMode => {
                if v == 0 {
                    "F_OK".into()
                } else {
                    flags(v, ACCESS, "F_OK")
                }
            }
            // Filled by the call: shown at exit.
            _ => {
                debug_assert!(kind.is_out(), "{kind:?} has no entry form");
                return None;
            }
        })
    }

    fn exit_arg(
        &self,
        kind: Arg,
        v: u64,
        all: &[u64; 6],
        ret: i64,
        mem: &dyn UserMemory,
    ) -> String {
        // The structures a failed call did not fill (the buffers, the wait
        // status, the name, utsname and clone3 show themselves).
        let out_struct = kind.is_out()
            && !matches!(
                kind,
                Arg::BufOut
                    | Arg::BufOutHex
                    | Arg::WaitStatus
                    | Arg::NameOut
                    | Arg::Utsname
                    | Arg::Clone3
            );
        if out_struct && (v == 0 || ret < 0) {
            // Nothing filled in: NULL or the address, as strace shows it.
            return if v == 0 { "NULL".into() } else { ptr(v) };
        }
        match kind {
            Arg::PipeFds => match structs::pipe_fds_at(v, mem) {
                Some([r, w]) => format!("[{}, {}]", self.fd(r, mem), self.fd(w, mem)),
                None => ptr(v),
            },
            Arg::SigSetOut(len) => structs::sigset_at(v, all[len], mem),
            Arg::SigActionOut => structs::sigaction_at(v, mem),
            Arg::StatOut => structs::stat_at(v, mem),
            Arg::TimespecOut => structs::timespec_at(v, mem),
            Arg::RlimitOut => structs::rlimit_at(v, mem),
            Arg::CpuSetOut => structs::cpu_set_at(v, ret as u64, mem),
            Arg::Dirents => structs::dirents_at(v, ret as u64, mem),
            Arg::Clone3 => structs::clone3_at(v, all[1], ret, mem),
            Arg::BufOut => {
                if ret < 0 {
                    ptr(v)
                } else {
                    self.buffer(v, ret as u64, mem)
                }
            }
            Arg::BufOutHex => {
                if ret < 0 {
                    ptr(v)
                } else {
                    self.try_buffer_with(v, ret as u64, mem, quote_hex)
                        .unwrap_or_else(|| ptr(v))
                }
            }
            Arg::WaitStatus => {
                if v == 0 {
                    return "NULL".into();
                }
                let mut b = [0u8; 4];
                if ret <= 0 || !mem.read(v, &mut b) {
                    return ptr(v);
                }
                format!("[{}]", wait_status(i32::from_le_bytes(b)))
            }
            Arg::Str => self.c_string(v, mem),
            Arg::NameOut if ret == 0 => self.c_string(v, mem),
            Arg::Utsname if ret == 0 => {
                // struct utsname: six char[65], sysname first, nodename next.
                const FIELD: u64 = 65;
                let field = |i: u64| {
                    let mut b = [0u8; FIELD as usize];
                    // A guest pointer near the top must not overflow.
                    mem.read(v.wrapping_add(i * FIELD), &mut b).then(|| {
                        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
                        self.quoted(&String::from_utf8_lossy(&b[..end]))
                    })
                };
                match (field(0), field(1)) {
                    (Some(sys), Some(node)) => {
                        format!("{{sysname={sys}, nodename={node}, ...}}")
                    }
                    _ => ptr(v),
                }
            }
            Arg::Argv => self.try_argv(v, mem).unwrap_or_else(|| ptr(v)),
            _ => format!("{v:#x}"),
        }
    }

    /// A NUL-terminated string: quoted, cut at the limit with `...`; the
    /// pointer if it cannot be read.
    pub fn c_string(&self, addr: u64, mem: &dyn UserMemory) -> String {
        if addr == 0 {
            return "NULL".into();
        }
        self.try_c_string(addr, mem).unwrap_or_else(|| ptr(addr))
    }

    /// A quoted Rust string, cut at the limit (an exec's file name).
    pub fn quoted(&self, s: &str) -> String {
        let b = s.as_bytes();
        let mut q = quote(&b[..b.len().min(self.string_limit)]);
        if b.len() > self.string_limit {
            q.push_str("...");
        }
        q
    }

    /// `["a", "b"]` from strings (an exec's argv).
    pub fn string_array(&self, items: &[String]) -> String {
        let mut shown: Vec<String> = items
            .iter()
            .take(MAX_ARRAY)
            .map(|s| self.quoted(s))
            .collect();
        if items.len() > MAX_ARRAY {
            shown.push("...".into());
        }
        format!("[{}]", shown.join(", "))
    }

    /// [`Formatter::c_string`], None if unreadable.
    pub fn try_c_string(&self, addr: u64, mem: &dyn UserMemory) -> Option<String> {
        let mut out = Vec::new();
        let mut terminated = false;
        // Page by page, so a string ending just before an unmapped page
        // still reads.
        let mut at = addr;
        while out.len() <= self.string_limit {
            let room = (4096 - (at & 4095)) as usize;
            let want = room.min(self.string_limit + 1 - out.len());
            let mut chunk = vec![0u8; want];
            if !mem.read(at, &mut chunk) {
                // Part of the chunk may still be readable (the reader's
                // mapping may end before the page does): byte by byte.
                let readable = (0..want)
                    .take_while(|&i| mem.read(at + i as u64, &mut chunk[i..=i]))
                    .count();
                chunk.truncate(readable);
                if !chunk.contains(&0) {
                    out.extend_from_slice(&chunk);
                    if out.is_empty() {
                        return None;
                    }
                    break;
                }
            }
            if let Some(nul) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..nul]);
                terminated = true;
                break;
            }
            out.extend_from_slice(&chunk);
            at += want as u64;
        }
        let cut = !terminated && out.len() > self.string_limit;
        out.truncate(self.string_limit);
        let mut s = quote(&out);
        if cut {
            s.push_str("...");
        }
        Some(s)
    }

    /// `len` bytes at `addr`: quoted, cut at the limit with `...`.
    pub fn buffer(&self, addr: u64, len: u64, mem: &dyn UserMemory) -> String {
        self.try_buffer(addr, len, mem).unwrap_or_else(|| ptr(addr))
    }

    fn try_buffer(&self, addr: u64, len: u64, mem: &dyn UserMemory) -> Option<String> {
        self.try_buffer_with(addr, len, mem, quote)
    }

    fn try_buffer_with(
        &self,
        addr: u64,
        len: u64,
        mem: &dyn UserMemory,
        quote: fn(&[u8]) -> String,
    ) -> Option<String> {
        let shown = (len as usize).min(self.string_limit);
        let mut buf = vec![0u8; shown];
        if !mem.read(addr, &mut buf) {
            return None;
        }
        let mut s = quote(&buf);
        if len as usize > shown {
            s.push_str("...");
        }
        Some(s)
    }

    fn try_argv(&self, addr: u64, mem: &dyn UserMemory) -> Option<String> {
        if addr == 0 {
            return Some("NULL".into());
        }
        let mut items = Vec::new();
        for i in 0..=MAX_ARRAY as u64 {
            let mut p = [0u8; 8];
            if !mem.read(addr + 8 * i, &mut p) {
                return None;
            }
            let p = u64::from_le_bytes(p);
            if p == 0 {
                break;
            }
            if items.len() == MAX_ARRAY {
                items.push("...".to_string());
                break;
            }
            items.push(self.try_c_string(p, mem)?);
        }
        Some(format!("[{}]", items.join(", ")))
    }
}

/// `clone` as strace shows it: only the arguments its flags use, named
/// (x86-64 order: flags, stack, parent_tid, child_tid, tls).
fn clone_args(a: [u64; 6]) -> Vec<Option<String>> {
    let f = a[0];
    let sig = f & 0xff;
    let mut fl = flags(f & !0xff, CLONE, "");
    if sig != 0 {
        if !fl.is_empty() {
            fl.push('|');
        }
        fl.push_str(&signal_name(sig as i32));
    }
    if fl.is_empty() {
        fl.push('0');
    }
    let mut out = vec![
        Some(format!("child_stack={}", ptr(a[1]))),
        Some(format!("flags={fl}")),
    ];
    if f & 0x100000 != 0 {
        out.push(Some(format!("parent_tid={}", ptr(a[2]))));
    }
    if f & 0x1200000 != 0 {
        out.push(Some(format!("child_tidptr={}", ptr(a[3]))));
    }
    if f & 0x80000 != 0 {
        out.push(Some(format!("tls={}", ptr(a[4]))));
    }
    out
}

fn count_pointers(addr: u64, mem: &dyn UserMemory) -> Option<u64> {
    for i in 0..4096u64 {
        let mut p = [0u8; 8];
        if !mem.read(addr + 8 * i, &mut p) {
            return None;
        }
        if p == [0; 8] {
            return Some(i);
        }
    }
    None
}

/// Hexadecimal as C's `%#x` prints it: `0` for zero, else `0x..`.
pub(crate) fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

pub(crate) fn ptr(v: u64) -> String {
    if v == 0 {
        "NULL".into()
    } else {
        format!("{v:#x}")
    }
}

/// `"\x5b\x4c..."`: every byte in hex, as strace quotes random bytes.
pub fn quote_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 4 + 2);
    s.push('"');
    for b in bytes {
        s.push_str(&format!("\\x{b:02x}"));
    }
    s.push('"');
    s
}

/// Quotes bytes as strace does: C escapes for `\t\n\v\f\r"\\`, printable
/// ASCII as is, anything else in octal (three digits when an octal digit
/// follows, so the escape stays unambiguous).
pub fn quote(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 2);
    s.push('"');
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            b'\t' => s.push_str("\\t"),
            b'\n' => s.push_str("\\n"),
            0x0b => s.push_str("\\v"),
            0x0c => s.push_str("\\f"),
            b'\r' => s.push_str("\\r"),
            0x20..=0x7e => s.push(char::from(b)),
            _ => {
                let next_is_octal = bytes.get(i + 1).is_some_and(|n| (b'0'..=b'7').contains(n));
                if next_is_octal {
                    s.push_str(&format!("\\{b:03o}"));
                } else {
                    s.push_str(&format!("\\{b:o}"));
                }
            }
        }
    }
    s.push('"');
    s
}

/// An `fcntl` command by its name, as strace shows the common ones.
fn fcntl_cmd(v: u64) -> String {
    const NAMES: &[(u64, &str)] = &[
        (0, "F_DUPFD"),
        (1, "F_GETFD"),
        (2, "F_SETFD"),
        (3, "F_GETFL"),
        (4, "F_SETFL"),
        (5, "F_GETLK"),
        (6, "F_SETLK"),
        (7, "F_SETLKW"),
        (8, "F_SETOWN"),
        (9, "F_GETOWN"),
        (1024, "F_SETLEASE"),
        (1025, "F_GETLEASE"),
        (1030, "F_DUPFD_CLOEXEC"),
        (1031, "F_SETPIPE_SZ"),
        (1032, "F_GETPIPE_SZ"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == v & 0xffff_ffff)
        .map_or_else(|| format!("{v:#x}"), |(_, name)| name.to_string())
}

/// A path inside strace's `<...>`: bytes that are not printable, `<`, `>`
/// and `\`, as `\xNN`, so a file name can neither end the annotation nor
/// forge another line.
fn escape_path(path: &str) -> String {
    let mut s = String::with_capacity(path.len());
    for b in path.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'<' && b != b'>' && b != b'\\' {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// The errno of a raw return value, if it is an error (-4095..-1).
pub fn errno_of(ret: i64) -> Option<i64> {
    // `then`, not `then_some`: `-i64::MIN` overflows (found by fuzzing).
    (-4095..0).contains(&ret).then(|| -ret)
}

/// Name and message of an errno (glibc's `strerror` text), including the
/// kernel-internal restart codes strace shows.
pub fn errno_name(e: i64) -> Option<(&'static str, &'static str)> {
    ERRNOS
        .iter()
        .find(|(n, _, _)| *n == e)
        .map(|(_, name, msg)| (*name, *msg))
}

const ERRNOS: &[(i64, &str, &str)] = &[
    (1, "EPERM", "Operation not permitted"),
    (2, "ENOENT", "No such file or directory"),
    (3, "ESRCH", "No such process"),
    (4, "EINTR", "Interrupted system call"),
    (5, "EIO", "Input/output error"),
    (6, "ENXIO", "No such device or address"),
    (7, "E2BIG", "Argument list too long"),
    (8, "ENOEXEC", "Exec format error"),
    (9, "EBADF", "Bad file descriptor"),
    (10, "ECHILD", "No child processes"),
    (11, "EAGAIN", "Resource temporarily unavailable"),
    (12, "ENOMEM", "Cannot allocate memory"),
    (13, "EACCES", "Permission denied"),
    (14, "EFAULT", "Bad address"),
    (16, "EBUSY", "Device or resource busy"),
    (17, "EEXIST", "File exists"),
    (18, "EXDEV", "Invalid cross-device link"),
    (19, "ENODEV", "No such device"),
    (20, "ENOTDIR", "Not a directory"),
    (21, "EISDIR", "Is a directory"),
    (22, "EINVAL", "Invalid argument"),
    (23, "ENFILE", "Too many open files in system"),
    (24, "EMFILE", "Too many open files"),
    (25, "ENOTTY", "Inappropriate ioctl for device"),
    (26, "ETXTBSY", "Text file busy"),
    (27, "EFBIG", "File too large"),
    (28, "ENOSPC", "No space left on device"),
    (29, "ESPIPE", "Illegal seek"),
    (30, "EROFS", "Read-only file system"),
    (31, "EMLINK", "Too many links"),
    (32, "EPIPE", "Broken pipe"),
    (33, "EDOM", "Numerical argument out of domain"),
    (34, "ERANGE", "Numerical result out of range"),
    (35, "EDEADLK", "Resource deadlock avoided"),
    (36, "ENAMETOOLONG", "File name too long"),
    (38, "ENOSYS", "Function not implemented"),
    (39, "ENOTEMPTY", "Directory not empty"),
    (40, "ELOOP", "Too many levels of symbolic links"),
    (61, "ENODATA", "No data available"),
    (95, "EOPNOTSUPP", "Operation not supported"),
    (110, "ETIMEDOUT", "Connection timed out"),
    (512, "ERESTARTSYS", "To be restarted if SA_RESTART is set"),
    (513, "ERESTARTNOINTR", "To be restarted"),
    (514, "ERESTARTNOHAND", "To be restarted if no handler"),
    (516, "ERESTART_RESTARTBLOCK", "Interrupted by signal"),
];

const SIGNALS: [&str; 32] = [
    "0",
    "SIGHUP",
    "SIGINT",
    "SIGQUIT",
    "SIGILL",
    "SIGTRAP",
    "SIGABRT",
    "SIGBUS",
    "SIGFPE",
    "SIGKILL",
    "SIGUSR1",
    "SIGSEGV",
    "SIGUSR2",
    "SIGPIPE",
    "SIGALRM",
    "SIGTERM",
    "SIGSTKFLT",
    "SIGCHLD",
    "SIGCONT",
    "SIGSTOP",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGURG",
    "SIGXCPU",
    "SIGXFSZ",
    "SIGVTALRM",
    "SIGPROF",
    "SIGWINCH",
    "SIGIO",
    "SIGPWR",
    "SIGSYS",
];

/// A signal by name (`SIGUSR1`, `USR1`) or number (1..=64).
pub fn signal_number(name: &str) -> Option<i32> {
    if let Ok(n) = name.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let full = if name.starts_with("SIG") {
        name.to_string()
    } else {
        format!("SIG{name}")
    };
    if full == "SIGRTMIN" {
        return Some(32);
    }
    if let Some(n) = full
        .strip_prefix("SIGRT_")
        .and_then(|n| n.parse::<i32>().ok())
    {
        return (0..=32).contains(&n).then_some(32 + n);
    }
    SIGNALS
        .iter()
        .position(|s| *s == full)
        .filter(|&i| i > 0)
        .map(|i| i as i32)
}

/// `SIGCHLD` for 17; `SIGRTMIN+n` above 31.
pub fn signal_name(sig: i32) -> String {
    match sig {
        1..=31 => SIGNALS[sig as usize].to_string(),
        // strace's signal table ends with SIGRTMIN (32).
        32 => "SIGRTMIN".to_string(),
        33..=64 => format!("SIGRT_{}", sig - 32),
        _ => sig.to_string(),
    }
}

const AT_FDCWD: i32 = -100;

/// `open` flags in strace 6.1's order (src/xlat/open_mode_flags.in),
/// each multi-bit flag before the flag its bits include (O_SYNC before
/// O_DSYNC, O_TMPFILE before O_DIRECTORY).
const OPEN: &[(u64, &str)] = &[
    (0o100, "O_CREAT"),
    (0o200, "O_EXCL"),
    (0o400, "O_NOCTTY"),
    (0o1000, "O_TRUNC"),
    (0o2000, "O_APPEND"),
    (0o4000, "O_NONBLOCK"),
    (0o4_010_000, "O_SYNC"),
    (0o10_000, "O_DSYNC"),
    (0o40_000, "O_DIRECT"),
    (0o100_000, "O_LARGEFILE"),
    (0o400_000, "O_NOFOLLOW"),
    (0o1_000_000, "O_NOATIME"),
    (0o2_000_000, "O_CLOEXEC"),
    (0o10_000_000, "O_PATH"),
    (0o20_200_000, "O_TMPFILE"),
    (0o200_000, "O_DIRECTORY"),
    (0o20_000, "FASYNC"),
];

const PROT: &[(u64, &str)] = &[(1, "PROT_READ"), (2, "PROT_WRITE"), (4, "PROT_EXEC")];

const MAP: &[(u64, &str)] = &[
    (0x1, "MAP_SHARED"),
    (0x2, "MAP_PRIVATE"),
    (0x10, "MAP_FIXED"),
    (0x20, "MAP_ANONYMOUS"),
    (0x100, "MAP_GROWSDOWN"),
    (0x800, "MAP_DENYWRITE"),
    (0x1000, "MAP_EXECUTABLE"),
    (0x2000, "MAP_LOCKED"),
    (0x4000, "MAP_NORESERVE"),
    (0x8000, "MAP_POPULATE"),
    (0x10000, "MAP_NONBLOCK"),
    (0x20000, "MAP_STACK"),
    (0x40000, "MAP_HUGETLB"),
    (0x100000, "MAP_FIXED_NOREPLACE"),
];

const CLONE: &[(u64, &str)] = &[
    (0x100, "CLONE_VM"),
    (0x200, "CLONE_FS"),
    (0x400, "CLONE_FILES"),
    (0x800, "CLONE_SIGHAND"),
    (0x1000, "CLONE_PIDFD"),
    (0x2000, "CLONE_PTRACE"),
    (0x4000, "CLONE_VFORK"),
    (0x8000, "CLONE_PARENT"),
    (0x10000, "CLONE_THREAD"),
    (0x20000, "CLONE_NEWNS"),
    (0x40000, "CLONE_SYSVSEM"),
    (0x80000, "CLONE_SETTLS"),
    (0x100000, "CLONE_PARENT_SETTID"),
    (0x200000, "CLONE_CHILD_CLEARTID"),
    (0x400000, "CLONE_DETACHED"),
    (0x800000, "CLONE_UNTRACED"),
    (0x1000000, "CLONE_CHILD_SETTID"),
];

const ACCESS: &[(u64, &str)] = &[(4, "R_OK"), (2, "W_OK"), (1, "X_OK")];

const GRND: &[(u64, &str)] = &[
    (1, "GRND_NONBLOCK"),
    (2, "GRND_RANDOM"),
    (4, "GRND_INSECURE"),
];

/// `A|B|0x40` for the set bits of `v` (multi-bit flags first when listed
/// so), or `none` for 0.
pub(crate) fn flags(v: u64, table: &[(u64, &str)], none: &str) -> String {
    if v == 0 {
        return none.to_string();
    }
    let mut rest = v;
    let mut parts = Vec::new();
    for &(bit, name) in table {
        if bit != 0 && rest & bit == bit {
            parts.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    parts.join("|")
}

/// `clone` flags without an exit signal: `CLONE_VM|CLONE_FS`, `0`.
pub(crate) fn clone_flag_names(v: u64) -> String {
    flags(v, CLONE, "0")
}

/// `open` flags: the access mode, then the flags (strace's order).
pub fn open_flags(v: u64) -> String {
    let mode = match v & 3 {
        0 => "O_RDONLY",
        1 => "O_WRONLY",
        2 => "O_RDWR",
        _ => "O_ACCMODE",
    };
    match flags(v & !3, OPEN, "") {
        rest if rest.is_empty() => mode.to_string(),
        rest => format!("{mode}|{rest}"),
    }
}

/// A wait status as strace shows it.
pub fn wait_status(s: i32) -> String {
    let sig = s & 0x7f;
    if sig == 0 {
        format!("{{WIFEXITED(s) && WEXITSTATUS(s) == {}}}", (s >> 8) & 0xff)
    } else if sig == 0x7f {
        format!(
            "{{WIFSTOPPED(s) && WSTOPSIG(s) == {}}}",
            signal_name((s >> 8) & 0xff)
        )
    } else {
        let core = if s & 0x80 != 0 {
            " && WCOREDUMP(s)"
        } else {
            ""
        };
        format!(
            "{{WIFSIGNALED(s) && WTERMSIG(s) == {}{core}}}",
            signal_name(sig)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// User memory as a few byte runs.
    struct Mem(BTreeMap<u64, Vec<u8>>);
    impl UserMemory for Mem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            for (start, bytes) in &self.0 {
                let end = start + bytes.len() as u64;
                if addr >= *start && addr + buf.len() as u64 <= end {
                    let o = (addr - start) as usize;
                    buf.copy_from_slice(&bytes[o..o + buf.len()]);
                    return true;
                }
            }
            false
        }
    }

    fn mem(runs: &[(u64, &[u8])]) -> Mem {
        Mem(runs.iter().map(|(a, b)| (*a, b.to_vec())).collect())
    }

    /// Hostile words found by fuzzing: the lowest return value and a
    /// `uname` buffer at the top of the address space (each overflowed,
    /// a panic in a build with overflow checks, `cargo test` without
    /// `--release`).
    #[test]
    fn extreme_words_render_without_overflow() {
        assert_eq!(errno_of(i64::MIN), None);
        assert_eq!(errno_of(-2), Some(2));
        let f = Formatter::default();
        let m = mem(&[]);
        let p = f.enter("uname", [u64::MAX - 10, 0, 0, 0, 0, 0], &m);
        assert_eq!(f.finish(&p, 0, &m), "uname(0xfffffffffffffff5) = 0");
    }

    #[test]
    fn quoting_follows_strace() {
        assert_eq!(quote(b"hi\n\"x\\"), r#""hi\n\"x\\""#);
        assert_eq!(quote(b"\x1b[0m"), r#""\33[0m""#);
        assert_eq!(quote(b"\x001"), r#""\0001""#, "octal digit follows");
        assert_eq!(quote(b"\x00a\xff"), r#""\0a\377""#);
    }

    #[test]
    fn openat_read_write_and_errors() {
        let f = Formatter::default();
        let m = mem(&[(0x1000, b"/etc/hostname\0"), (0x2000, b"hvtrace\n")]);
        let p = f.enter(
            "openat",
            [(-100i64) as u64, 0x1000, 0o2_000_000, 0, 0, 0],
            &m,
        );
        assert_eq!(
            f.finish(&p, 3, &m),
            r#"openat(AT_FDCWD, "/etc/hostname", O_RDONLY|O_CLOEXEC) = 3"#
        );
        let p = f.enter(
            "openat",
            [(-100i64) as u64, 0x1000, 0o2_001_102, 0o644, 0, 0],
            &m,
        );
        assert_eq!(
            f.finish(&p, -2, &m),
            r#"openat(AT_FDCWD, "/etc/hostname", O_RDWR|O_CREAT|O_TRUNC|O_CLOEXEC, 0644) = -1 ENOENT (No such file or directory)"#
        );
        let p = f.enter("read", [3, 0x2000, 256, 0, 0, 0], &m);
        assert_eq!(p.entry_prefix(), "read(3, ");
        assert!(f.finish(&p, 8, &m).starts_with(&p.entry_prefix()));
        assert_eq!(f.enter("getpid", [0; 6], &m).entry_prefix(), "getpid(");
        let w = f.enter("write", [1, 0x2000, 8, 0, 0, 0], &m);
        assert_eq!(w.entry_prefix(), r#"write(1, "hvtrace\n", 8"#);
        assert!(!f.complete_at_entry("read"));
        assert_eq!(f.finish(&p, 8, &m), r#"read(3, "hvtrace\n", 256) = 8"#);
        let p = f.enter("write", [1, 0x2000, 8, 0, 0, 0], &m);
        assert_eq!(f.finish(&p, 8, &m), r#"write(1, "hvtrace\n", 8) = 8"#);
        let p = f.enter("read", [3, 0x9000, 256, 0, 0, 0], &m);
        assert_eq!(
            f.finish(&p, -9, &m),
            "read(3, 0x9000, 256) = -1 EBADF (Bad file descriptor)"
        );
    }

    /// Memory plus a file table (`-y`).
    struct WithFiles(Mem, BTreeMap<u64, &'static str>);
    impl UserMemory for WithFiles {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            self.0.read(addr, buf)
        }
        fn fd_path(&self, fd: u64) -> Option<String> {
            self.1.get(&fd).map(|p| p.to_string())
        }
    }

    #[test]
    fn descriptors_carry_their_paths_with_y_only() {
        let files = BTreeMap::from([(1, "pipe:[77]"), (3, "/etc/host>name\n"), (4, "/dir")]);
        let m = WithFiles(mem(&[(0x1000, b"x\0"), (0x2000, b"ok\n")]), files);
        let y = Formatter {
            decode_fds: true,
            ..Formatter::default()
        };
        let p = y.enter("openat", [4, 0x1000, 0, 0, 0, 0], &m);
        assert_eq!(
            y.finish(&p, 3, &m),
            r#"openat(4</dir>, "x", O_RDONLY) = 3</etc/host\x3ename\x0a>"#,
            "a path cannot close the annotation or start a line"
        );
        let p = y.enter("write", [1, 0x2000, 3, 0, 0, 0], &m);
        assert_eq!(y.finish(&p, 3, &m), r#"write(1<pipe:[77]>, "ok\n", 3) = 3"#);
        // Not open, an error, -1 for an anonymous map: plain numbers.
        let p = y.enter("close", [9, 0, 0, 0, 0, 0], &m);
        assert_eq!(
            y.finish(&p, -9, &m),
            "close(9) = -1 EBADF (Bad file descriptor)"
        );
        let p = y.enter("mmap", [0, 4096, 3, 0x22, u64::MAX, 0], &m);
        assert!(y.finish(&p, 0x7000, &m).contains(", -1, 0) = 0x7000"));
        let p = y.enter("fcntl", [3, 1030, 10, 0, 0, 0], &m);
        assert_eq!(
            y.finish(&p, 10, &m),
            "fcntl(3</etc/host\\x3ename\\x0a>, F_DUPFD_CLOEXEC, 10) = 10",
            "fd 10 is not open in this table"
        );
        // Without -y, the numbers alone.
        let f = Formatter::default();
        let p = f.enter("write", [1, 0x2000, 3, 0, 0, 0], &m);
        assert_eq!(f.finish(&p, 3, &m), r#"write(1, "ok\n", 3) = 3"#);
    }

    #[test]
    fn uname_shows_the_first_two_fields_as_strace_does() {
        let f = Formatter::default();
        let mut uts = vec![0u8; 65 * 6];
        uts[..5].copy_from_slice(b"Linux");
        uts[65..65 + 13].copy_from_slice(b"hvtrace-guest");
        let m = mem(&[(0x4000, &uts)]);
        let p = f.enter("uname", [0x4000, 0, 0, 0, 0, 0], &m);
        assert_eq!(
            f.finish(&p, 0, &m),
            r#"uname({sysname="Linux", nodename="hvtrace-guest", ...}) = 0"#
        );
        let p = f.enter("uname", [0x9000, 0, 0, 0, 0, 0], &m);
        assert_eq!(
            f.finish(&p, -14, &m),
            "uname(0x9000) = -1 EFAULT (Bad address)"
        );
    }

    #[test]
    fn long_strings_are_cut_and_bad_pointers_shown() {
        let f = Formatter {
            string_limit: 4,
            ..Formatter::default()
        };
        let m = mem(&[(0x1000, b"abcdefgh\0")]);
        assert_eq!(f.c_string(0x1000, &m), r#""abcd"..."#);
        assert_eq!(f.c_string(0x5000, &m), "0x5000");
        assert_eq!(f.c_string(0, &m), "NULL");
        assert_eq!(f.buffer(0x1000, 9, &m), r#""abcd"..."#);
        let f = Formatter::default();
        assert_eq!(
            f.c_string(0x1000, &m),
            r#""abcdefgh""#,
            "NUL before the end of the run"
        );
    }

    #[test]
    fn execve_exit_group_wait4_clone_and_brk() {
        let f = Formatter::default();
        let mut argv = Vec::new();
        for p in [0x1100u64, 0x1110, 0] {
            argv.extend_from_slice(&p.to_le_bytes());
        }
        let envp = [0x1100u64.to_le_bytes(), [0; 8]].concat();
        let status = (3i32 << 8).to_le_bytes();
        let m = mem(&[
            (0x1000, &argv),
            (0x1100, b"/bin/sh\0\0\0\0\0\0\0\0\0-c\0"),
            (0x2000, &envp),
            (0x3000, &status),
        ]);
        let p = f.enter("execve", [0x1100, 0x1000, 0x2000, 0, 0, 0], &m);
        assert_eq!(
            f.finish(&p, 0, &m),
            r#"execve("/bin/sh", ["/bin/sh", "-c"], 0x2000 /* 1 var */) = 0"#
        );
        let p = f.enter("exit_group", [0, 0, 0, 0, 0, 0], &m);
        assert_eq!(f.unreturned(&p), "exit_group(0) = ?");
        let p = f.enter("wait4", [u64::MAX, 0x3000, 0, 0, 0, 0], &m);
        assert_eq!(
            f.finish(&p, 42, &m),
            "wait4(-1, [{WIFEXITED(s) && WEXITSTATUS(s) == 3}], 0, NULL) = 42"
        );
        let p = f.enter("clone", [0x1200011, 0, 0, 0x4c8750, 0, 0], &m);
        assert_eq!(
            f.finish(&p, 7, &m),
            "clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, child_tidptr=0x4c8750) = 7"
        );
        let p = f.enter("brk", [0; 6], &m);
        assert_eq!(f.finish(&p, 0x4c6000, &m), "brk(NULL) = 0x4c6000");
        assert_eq!(
            f.ret("wait4", -512),
            "? ERESTARTSYS (To be restarted if SA_RESTART is set)"
        );
        assert_eq!(wait_status(9), "{WIFSIGNALED(s) && WTERMSIG(s) == SIGKILL}");
        let name = mem(&[(0x4000, b"true\0")]);
        let p = f.enter("getrandom", [0x2000, 3, 1, 0, 0, 0], &m);
        assert_eq!(
            f.finish(&p, 3, &m),
            r#"getrandom("\x00\x11\x00", 3, GRND_NONBLOCK) = 3"#
        );
        let p = f.enter("getrandom", [0x2000, 8, 1, 0, 0, 0], &m);
        assert_eq!(
            f.finish(&p, -11, &m),
            "getrandom(0x2000, 8, GRND_NONBLOCK) = -1 EAGAIN (Resource temporarily unavailable)"
        );
        let p = f.enter("prctl", [16, 0x4000, 0, 0, 0, 0], &name);
        assert!(!f.complete_at_entry("read"));
        assert_eq!(f.finish(&p, 0, &name), r#"prctl(PR_GET_NAME, "true") = 0"#);
        let p = f.enter("syscall_0x3e7", [1, 2, 3, 4, 5, 6], &m);
        assert_eq!(
            f.finish(&p, 0, &m),
            "syscall_0x3e7(0x1, 0x2, 0x3, 0x4, 0x5, 0x6) = 0"
        );
    }
}
