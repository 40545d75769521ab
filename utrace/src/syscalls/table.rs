//! System call names from the running kernel: `sys_call_table[nr]` points
//! at `__x64_sys_NAME`, so the kernel itself says which number is which
//! call (no table in hvtrace to fall out of date).

use guest_introspect::error::{IntrospectError, Result};
use guest_introspect::kernel::RunningKernel;
use guest_introspect::memory::PhysMemory;

use super::meta::{kind_of, read_params, MetaLayout};
use super::{signature, Arg};

/// Most entries read from `sys_call_table` (Linux 6.12 has 463).
const MAX_SYSCALLS: u64 = 1024;

/// Number to name, and for calls without a hand-written signature the
/// argument kinds the kernel's own metadata gives (`meta.rs`).
#[derive(Debug, Clone, Default)]
pub struct SyscallTable {
    names: Vec<Option<String>>,
    described: Vec<Option<Vec<Arg>>>,
}

/// Handlers whose x86-64 call has another name in the ABI (and in
/// strace): the kernel kept the `new*` handlers of the old 32-bit ABI's
/// second versions, `umount2` is `sys_umount`, and `sendfile` is
/// `sys_sendfile64`.
const ABI_NAMES: [(&str, &str); 6] = [
    ("newstat", "stat"),
    ("newlstat", "lstat"),
    ("newfstat", "fstat"),
    ("newuname", "uname"),
    ("umount", "umount2"),
    ("sendfile64", "sendfile"),
];

/// The call name of a handler symbol (`__x64_sys_openat` -> `openat`,
/// `__x64_sys_newuname` -> `uname`); None for `sys_ni_syscall` and
/// anything that is not a handler.
pub fn call_name(symbol: &str) -> Option<&str> {
    handler_name(symbol).map(abi_name)
}

/// The call name of handler `sys_HANDLER` (`newuname` -> `uname`).
fn abi_name(handler: &str) -> &str {
    ABI_NAMES
        .iter()
        .find(|(h, _)| *h == handler)
        .map_or(handler, |(_, abi)| abi)
}

/// The handler's own name in a handler symbol (`__x64_sys_sendfile64` ->
/// `sendfile64`, as its `SYSCALL_DEFINE` names it).
fn handler_name(symbol: &str) -> Option<&str> {
    let name = symbol
        .strip_prefix("__x64_sys_")
        .or_else(|| symbol.strip_prefix("__ia32_sys_"))?;
    (name != "ni_syscall" && !name.is_empty()).then_some(name)
}

impl SyscallTable {
    /// A table of the given names (index = number).
    pub fn from_names(names: Vec<Option<String>>) -> Self {
        Self {
            names,
            described: Vec::new(),
        }
    }

    /// Reads `sys_call_table` of the kernel `k`. Its length is the distance
    /// to the next symbol (the table is `const sys_call_ptr_t[]` followed by
    /// other data), at most [`MAX_SYSCALLS`].
    pub fn read<M: PhysMemory + ?Sized>(k: &RunningKernel<'_, M>) -> Result<Self> {
        let syms = k.symbols();
        let link = syms
            .lookup("sys_call_table")
            .ok_or_else(|| IntrospectError::MissingSymbol("sys_call_table".into()))?;
        let next = syms
            .iter()
            .map(|s| s.addr)
            .filter(|&a| a > link)
            .min()
            .unwrap_or(link + 8 * MAX_SYSCALLS);
        let count = ((next - link) / 8).clamp(1, MAX_SYSCALLS);
        let base = k.runtime(link);
        let mut raw = vec![0u8; (count * 8) as usize];
        k.read(base, &mut raw, "sys_call_table")?;
        let offset = k.placement().virt_offset as u64;
        let layout = MetaLayout::of(k);
        let (names, described) = raw
            .chunks_exact(8)
            .map(|c| {
                let handler = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                let link = handler.wrapping_sub(offset);
                // The entry point, whichever alias of it the symbol table
                // would print (`__do_sys_getpid` shares its address with
                // `__x64_sys_getpid`).
                let Some(handler) = syms.at(link).iter().find_map(|s| handler_name(&s.name)) else {
                    return (None, None);
                };
                let name = abi_name(handler);
                // Only calls without a hand-written signature need them.
                let described = signature(name)
                    .is_none()
                    .then(|| read_params(k, &layout, handler))
                    .flatten()
                    .map(|params| params.iter().map(kind_of).collect());
                (Some(name.to_string()), described)
            })
            .unzip();
        Ok(Self { names, described })
    }

    /// The argument kinds the kernel's metadata gives call `nr`, for a
    /// call without a hand-written signature (None: unknown, or the
    /// kernel has no metadata).
    pub fn described(&self, nr: u64) -> Option<&[Arg]> {
        self.described.get(nr as usize)?.as_deref()
    }

    /// The name of call `nr`, if the kernel has one.
    pub fn name(&self, nr: u64) -> Option<&str> {
        self.names.get(nr as usize)?.as_deref()
    }

    /// The number of call `name`.
    pub fn number(&self, name: &str) -> Option<u64> {
        self.names
            .iter()
            .position(|n| n.as_deref() == Some(name))
            .map(|i| i as u64)
    }

    /// How many numbers the table has.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::format::{Formatter, UserMemory};
    use guest_introspect::kernel::KernelPlacement;
    use guest_introspect::paging::{AddressSpace, PagingLevels};
    use guest_introspect::symbols::{Symbol, SymbolMap};

    /// Where physical 0..2 MiB appears (the direct map).
    const DIRECT: u64 = 0xffff_8880_0000_0000;

    /// 2 MiB of guest memory, direct-mapped by page tables at 0x1000.
    struct Guest(Vec<u8>);

    impl Guest {
        fn new() -> Self {
            let mut g = Self(vec![0; 2 << 20]);
            g.put(0x1000 + 8 * ((DIRECT >> 39) & 511), 0x2000 | 3);
            g.put(0x2000, 0x3000 | 3);
            g.put(0x3000, 0x80 | 3);
            g
        }

        fn put(&mut self, pa: u64, v: u64) {
            self.0[pa as usize..pa as usize + 8].copy_from_slice(&v.to_le_bytes());
        }

        fn put_str(&mut self, pa: u64, s: &str) {
            self.0[pa as usize..pa as usize + s.len()].copy_from_slice(s.as_bytes());
        }

        /// A `struct syscall_metadata` at `pa` naming `name`, with
        /// `count` as its argument count and `params` (type, name) written
        /// out, its strings and arrays from `pa + 0x100` on.
        fn meta(&mut self, pa: u64, name: &str, count: u32, params: &[(&str, &str)]) {
            let (types, args, mut text) = (pa + 0x100, pa + 0x180, pa + 0x200);
            self.put(pa, DIRECT + text);
            self.put_str(text, name);
            text += 0x40;
            self.0[pa as usize + 12..pa as usize + 16].copy_from_slice(&count.to_le_bytes());
            self.put(pa + 16, DIRECT + types);
            self.put(pa + 24, DIRECT + args);
            for (i, (c_type, arg)) in params.iter().enumerate() {
                self.put(types + 8 * i as u64, DIRECT + text);
                self.put_str(text, c_type);
                self.put(args + 8 * i as u64, DIRECT + text + 0x40);
                self.put_str(text + 0x40, arg);
                text += 0x80;
            }
        }
    }

    /// A user page at 0x10000 holding `mount`'s strings.
    struct UserPage(Vec<u8>);

    impl UserMemory for UserPage {
        fn read(&self, va: u64, buf: &mut [u8]) -> bool {
            let Some(at) = va.checked_sub(0x10000).map(|a| a as usize) else {
                return false;
            };
            match self.0.get(at..at + buf.len()) {
                Some(bytes) => {
                    buf.copy_from_slice(bytes);
                    true
                }
                None => false,
            }
        }
    }

    /// `sys_call_table` of three handlers: a call with a hand-written
    /// signature (getpid), one the kernel's metadata describes (mount,
    /// declared as in Linux 6.1) and one whose record is hostile (an
    /// argument count of 7).
    #[test]
    fn calls_without_a_signature_take_their_kinds_from_the_kernels_metadata() {
        let mut g = Guest::new();
        let handlers = [0x50000u64, 0x50010, 0x50020];
        for (i, h) in handlers.iter().enumerate() {
            g.put(0x40000 + 8 * i as u64, DIRECT + h);
        }
        let mount = [
            ("char __user *", "dev_name"),
            ("char __user *", "dir_name"),
            ("char __user *", "type"),
            ("unsigned long", "flags"),
            ("void __user *", "data"),
        ];
        g.meta(0x60000, "sys_mount", 5, &mount);
        g.meta(0x70000, "sys_hostile", 7, &mount);
        g.meta(0x80000, "sys_getpid", 0, &[]);
        let symbol = |addr: u64, name: &str| Symbol {
            addr: DIRECT + addr,
            kind: 'D',
            name: name.into(),
        };
        let symbols = SymbolMap::from_symbols(vec![
            symbol(0x40000, "sys_call_table"),
            symbol(0x40018, "after_the_table"),
            symbol(handlers[0], "__x64_sys_getpid"),
            symbol(handlers[1], "__x64_sys_mount"),
            symbol(handlers[2], "__x64_sys_hostile"),
            symbol(0x60000, "__syscall_meta__mount"),
            symbol(0x70000, "__syscall_meta__hostile"),
            symbol(0x80000, "__syscall_meta__getpid"),
        ]);
        // No `struct syscall_metadata` in it: the record's fixed layout.
        let types = crate::hv::tests::empty_types();
        let k = RunningKernel::assume(
            g.0.as_slice(),
            AddressSpace {
                cr3: 0x1000,
                levels: PagingLevels::Four,
            },
            &symbols,
            &types,
            KernelPlacement {
                virt_offset: 0,
                text: 0xffff_ffff_8100_0000,
                text_phys: 0x100_0000,
            },
        );
        let t = SyscallTable::read(&k).unwrap();
        assert_eq!(t.name(1), Some("mount"));
        assert_eq!(t.described(0), None, "getpid has a hand-written signature");
        use Arg::*;
        assert_eq!(t.described(1), Some([Str, Str, Str, Hex, Ptr].as_slice()));
        assert_eq!(
            t.described(2),
            None,
            "a record with 7 arguments is not believed"
        );
        // As strace shows busybox's `mount -t tmpfs none /mnt`.
        let user = UserPage(b"none\0/mnt\0tmpfs\0".to_vec());
        let f = Formatter::default();
        let args = [0x10000, 0x10005, 0x1000a, 0, 0, 0xbeef];
        let p = f.enter_described("mount", args, &user, t.described(1));
        assert_eq!(
            f.finish(&p, 0, &user),
            r#"mount("none", "/mnt", "tmpfs", 0, NULL) = 0"#
        );
        assert_eq!(
            f.finish(&p, -1, &user),
            r#"mount("none", "/mnt", "tmpfs", 0, NULL) = -1 EPERM (Operation not permitted)"#
        );
        let unknown = f.enter_described("hostile", args, &user, t.described(2));
        assert_eq!(
            f.finish(&unknown, 0, &user),
            "hostile(0x10000, 0x10005, 0x1000a, 0, 0, 0xbeef) = 0"
        );
    }

    #[test]
    fn handler_symbols_name_calls() {
        assert_eq!(call_name("__x64_sys_openat"), Some("openat"));
        assert_eq!(call_name("__x64_sys_ni_syscall"), None);
        assert_eq!(call_name("do_sys_openat2"), None);
        assert_eq!(call_name("__x64_sys_newuname"), Some("uname"));
        assert_eq!(call_name("__x64_sys_newfstat"), Some("fstat"));
        assert_eq!(
            call_name("__x64_sys_newfstatat"),
            Some("newfstatat"),
            "strace keeps this one"
        );
        assert_eq!(call_name("__x64_sys_umount"), Some("umount2"));
        assert_eq!(call_name("__x64_sys_sendfile64"), Some("sendfile"));
        let t = SyscallTable::from_names(vec![Some("read".into()), None, Some("open".into())]);
        assert_eq!(t.name(2), Some("open"));
        assert_eq!(t.name(1), None);
        assert_eq!(t.name(99), None);
        assert_eq!(t.number("read"), Some(0));
    }
}
