//! The tracer's syscall-argument decoding (utrace's `syscalls::format`):
//! strace-style rendering of a call's arguments read from the traced
//! thread's memory, which a hostile guest controls. For every call name
//! utrace knows, plus one name taken from the input, the target renders
//! the call at entry ([`Formatter::enter`]) and exit
//! ([`Formatter::finish`]) and as unfinished, with arguments, return value
//! and user memory from the input.
//!
//! Input layout: 6 argument words, the return value and the user stack
//! pointer (8 bytes LE each, 0..64), a flags byte (64: bit 0 `-y`, bits
//! 1-2 the `-s` string limit), a name length and up to 31 name bytes
//! (65..97), then user memory (97..).

use utrace::syscalls::{signature, Formatter, UserMemory};

/// Where the input's user memory starts.
const MEMORY_AT: usize = 97;
/// User address of the memory's first byte; it repeats every `len` bytes
/// up to the end of the user half, so every pointer reads hostile bytes.
pub const USER_BASE: u64 = 0x1000;
/// End of the user half of the address space.
const USER_END: u64 = 1 << 47;

/// Every call name utrace has a signature for, read from the source of
/// `utrace::syscalls::signature` (utrace exports no list), plus `clone`
/// (rendered by its own code) and one it does not know.
pub fn call_names() -> Vec<&'static str> {
    let src = include_str!("../../../utrace/src/syscalls/mod.rs");
    let start = src
        .find("pub fn signature(")
        .expect("utrace defines signature()");
    let body = &src[start..];
    let body = &body[..body.find("\n}\n").unwrap_or(body.len())];
    let mut names: Vec<&'static str> = body
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|n| signature(n).is_some())
        .collect();
    names.extend(["clone", "syscall_0x1b4"]);
    names.sort_unstable();
    names.dedup();
    names
}

/// Hostile user memory: the input's bytes, repeated over the user half.
struct Memory<'a> {
    bytes: &'a [u8],
    sp: u64,
}

impl UserMemory for Memory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let end = addr.checked_add(buf.len() as u64);
        if self.bytes.is_empty() || addr < USER_BASE || end.is_none_or(|e| e > USER_END) {
            return false;
        }
        let len = self.bytes.len();
        let mut at = ((addr - USER_BASE) % len as u64) as usize;
        for chunk in buf.chunks_mut(len) {
            let first = chunk.len().min(len - at);
            chunk[..first].copy_from_slice(&self.bytes[at..at + first]);
            let rest = chunk.len() - first;
            chunk[first..].copy_from_slice(&self.bytes[..rest]);
            at = (at + chunk.len()) % len;
        }
        true
    }

    fn fd_path(&self, fd: u64) -> Option<String> {
        let mut b = [0u8; 24];
        self.read(USER_BASE.checked_add(fd)?, &mut b)
            .then(|| String::from_utf8_lossy(&b).into_owned())
    }

    fn user_sp(&self) -> Option<u64> {
        (self.sp != 0).then_some(self.sp)
    }
}

/// Renders every known call (and the input's own name) over the input.
pub fn render(data: &[u8]) {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        for (k, x) in b.iter_mut().enumerate() {
            *x = data.get(i * 8 + k).copied().unwrap_or(0);
        }
        u64::from_le_bytes(b)
    };
    let args = [word(0), word(1), word(2), word(3), word(4), word(5)];
    let ret = word(6) as i64;
    let flags = data.get(64).copied().unwrap_or(0);
    let f = Formatter {
        string_limit: [32, 0, 1, 4096][usize::from(flags >> 1 & 3)],
        decode_fds: flags & 1 != 0,
    };
    let mem = Memory {
        bytes: data.get(MEMORY_AT..).unwrap_or_default(),
        sp: word(7),
    };
    let name_len = usize::from(data.get(65).copied().unwrap_or(0) & 31);
    let own = data.get(66..66 + name_len).unwrap_or_default();
    let own = String::from_utf8_lossy(own);
    for name in call_names().into_iter().chain([own.as_ref()]) {
        let p = f.enter(name, args, &mem);
        let _ = p.entry_prefix();
        let _ = f.complete_at_entry(name);
        let _ = f.finish(&p, ret, &mem);
        let _ = f.unreturned(&p);
    }
}

/// Inputs whose pointers land on a path, an argv array, text and
/// structure-like bytes, with several argument shapes (pointers first,
/// descriptor-buffer-length, `AT_FDCWD`-path-flags-mode, small integers)
/// and return values (success, a descriptor, `-ENOENT`).
pub fn seeds() -> Vec<Vec<u8>> {
    let mut memory = vec![0u8; 0x400];
    let put = |m: &mut Vec<u8>, at: usize, b: &[u8]| m[at..at + b.len()].copy_from_slice(b);
    put(&mut memory, 0, b"/etc/hostname\0");
    for (i, p) in [USER_BASE + 0x80, USER_BASE + 0xa0, 0]
        .into_iter()
        .enumerate()
    {
        put(&mut memory, 0x40 + 8 * i, &p.to_le_bytes());
    }
    put(&mut memory, 0x80, b"/bin/sh\0");
    put(&mut memory, 0xa0, b"-c\0");
    put(&mut memory, 0xc0, b"hello \"world\"\n\x01\xff tab\t\0");
    for (i, b) in memory[0x100..0x400].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(1);
    }
    let b = USER_BASE;
    let shapes: [([u64; 6], i64, u8); 4] = [
        (
            [b, b + 0x40, b + 0x100, b + 0xc0, b + 0x200, b + 0x300],
            0,
            0,
        ),
        ([3, b + 0xc0, 20, b + 0x100, 0, 0], 20, 1),
        ([0xffff_ff9c, b, 0o100 | 2, 0o644, 0, 0], 3, 1 | 2 << 1),
        ([1, 2, 0, 15, 1030, 0x20], -2, 3 << 1),
    ];
    shapes
        .into_iter()
        .map(|(args, ret, flags)| {
            let mut v = Vec::new();
            for a in args {
                v.extend_from_slice(&a.to_le_bytes());
            }
            v.extend_from_slice(&ret.to_le_bytes());
            v.extend_from_slice(&(b + 0x100).to_le_bytes()); // user sp
            v.push(flags);
            v.push(5);
            v.extend_from_slice(b"write");
            v.resize(MEMORY_AT, 0);
            v.extend_from_slice(&memory);
            v
        })
        .collect()
}
