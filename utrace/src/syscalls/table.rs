//! System call names from the running kernel: `sys_call_table[nr]` points
//! at `__x64_sys_NAME`, so the kernel itself says which number is which
//! call (no table in hvtrace to fall out of date).

use guest_introspect::error::{IntrospectError, Result};
use guest_introspect::kernel::RunningKernel;
use guest_introspect::memory::PhysMemory;

/// Most entries read from `sys_call_table` (Linux 6.12 has 463).
const MAX_SYSCALLS: u64 = 1024;

/// Number to name.
#[derive(Debug, Clone, Default)]
pub struct SyscallTable {
    names: Vec<Option<String>>,
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
    let name = symbol
        .strip_prefix("__x64_sys_")
        .or_else(|| symbol.strip_prefix("__ia32_sys_"))?;
    if name == "ni_syscall" || name.is_empty() {
        return None;
    }
    Some(
        ABI_NAMES
            .iter()
            .find(|(handler, _)| *handler == name)
            .map_or(name, |(_, abi)| abi),
    )
}

impl SyscallTable {
    /// A table of the given names (index = number).
    pub fn from_names(names: Vec<Option<String>>) -> Self {
        Self { names }
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
        let names = raw
            .chunks_exact(8)
            .map(|c| {
                let handler = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                let link = handler.wrapping_sub(offset);
                // The entry point, whichever alias of it the symbol table
                // would print (`__do_sys_getpid` shares its address with
                // `__x64_sys_getpid`).
                syms.at(link)
                    .iter()
                    .find_map(|s| call_name(&s.name))
                    .map(str::to_string)
            })
            .collect();
        Ok(Self { names })
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
