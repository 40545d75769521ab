//! Argument kinds of every system call from the running kernel's own
//! description of it.
//!
//! A kernel built with syscall tracepoints (`CONFIG_FTRACE_SYSCALLS`, as
//! Debian's are) keeps one `struct syscall_metadata` per `SYSCALL_DEFINEn`,
//! the symbol `__syscall_meta__NAME`: the handler's name, its argument
//! count, and each argument's C type and name as written in the source
//! (`"unsigned int"`, `"fd"`). [`read_params`] reads that record from guest
//! memory (guest data: every field is checked, every string bounded) and
//! [`kind_of`] turns a parameter into the [`Arg`] strace would show it as,
//! for the calls without a hand-written signature (`super::signature`):
//! `sendfile(1, 3, NULL, 16777216)` rather than six hex words.
//!
//! The minimal kernel is built with the option for this
//! (kernel-config/minimal.config); a kernel without the records leaves
//! such calls in hex, as strace's `printargs` shows an unknown call.

use guest_introspect::kernel::RunningKernel;
use guest_introspect::memory::PhysMemory;

use super::Arg;

/// `struct syscall_metadata`'s fields used here, with their offsets when
/// the kernel's BTF does not describe the struct: `const char *name` at 0,
/// `int nb_args` at 12, `const char **types` at 16, `const char **args` at
/// 24 (include/trace/syscall.h; unchanged since Linux 2.6.33).
const FIELDS: [(&str, u64); 4] = [("name", 0), ("nb_args", 12), ("types", 16), ("args", 24)];

/// Longest type or argument name read (the longest in Linux 6.12 is
/// `struct __kernel_old_timeval __user *`, 36 bytes).
const MAX_NAME: usize = 64;

/// One parameter of a call as the kernel's source declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Its C type (`"const char __user *"`).
    pub c_type: String,
    /// Its name (`"filename"`).
    pub name: String,
}

/// Where `struct syscall_metadata`'s fields are in this kernel.
#[derive(Debug, Clone, Copy)]
pub struct MetaLayout {
    name: u64,
    nb_args: u64,
    types: u64,
    args: u64,
}

impl MetaLayout {
    /// The layout from the kernel's BTF where it has the struct, else the
    /// one Linux has had since 2.6.33.
    pub fn of<M: PhysMemory + ?Sized>(k: &RunningKernel<'_, M>) -> Self {
        let at = |field: &str, default: u64| {
            k.types()
                .member("syscall_metadata", field)
                .map_or(default, |m| m.offset)
        };
        let [name, nb_args, types, args] = FIELDS.map(|(f, d)| at(f, d));
        Self {
            name,
            nb_args,
            types,
            args,
        }
    }
}

/// The parameters of the call whose handler is `sys_HANDLER` (`handler`
/// as in `__x64_sys_HANDLER`: `sendfile64`), from its
/// `__syscall_meta__HANDLER` record; None when the kernel has no record or
/// the record is not a well-formed one for that handler.
pub fn read_params<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    layout: &MetaLayout,
    handler: &str,
) -> Option<Vec<Param>> {
    let record = k.symbol(&format!("__syscall_meta__{handler}")).ok()?;
    let name_at = k
        .read_u64(record + layout.name, "syscall_metadata.name")
        .ok()?;
    // The record names its own handler: anything else is not a record.
    let name = k
        .read_cstr(name_at, MAX_NAME, "syscall_metadata.name")
        .ok()?;
    if name.strip_prefix("sys_") != Some(handler) {
        return None;
    }
    let count = k
        .read_u32(record + layout.nb_args, "syscall_metadata.nb_args")
        .ok()? as i32;
    if !(0..=6).contains(&count) {
        return None;
    }
    let count = count as u64;
    if count == 0 {
        return Some(Vec::new());
    }
    let types = k
        .read_u64(record + layout.types, "syscall_metadata.types")
        .ok()?;
    let names = k
        .read_u64(record + layout.args, "syscall_metadata.args")
        .ok()?;
    (0..count)
        .map(|i| {
            let text = |array: u64, what: &str| -> Option<String> {
                let at = k.read_u64(array + 8 * i, what).ok()?;
                let s = k.read_cstr(at, MAX_NAME, what).ok()?;
                let printable = !s.is_empty() && s.bytes().all(|b| (0x20..0x7f).contains(&b));
                printable.then_some(s)
            };
            Some(Param {
                c_type: text(types, "syscall_metadata.types")?,
                name: text(names, "syscall_metadata.args")?,
            })
        })
        .collect()
}

/// Names of `char *` parameters that are data, not a string: shown as an
/// address (strace shows their contents only where it knows the call).
const BUFFER_NAMES: &[&str] = &["buf", "ubuf", "optval", "value", "list", "data", "cmsg"];

/// How strace would show parameter `p` of a call it has no decoder for,
/// as near as its C type and name tell: descriptors and counts in
/// decimal, paths as strings, `*at` directories as `AT_FDCWD`, modes in
/// octal, flags and other words in hex, pointers as `NULL` or an address.
pub fn kind_of(p: &Param) -> Arg {
    let c_type = p.c_type.as_str();
    let name = p.name.as_str();
    if c_type.contains('*') {
        let string = c_type.contains("char")
            && c_type.matches('*').count() == 1
            && !BUFFER_NAMES.contains(&name);
        return if string { Arg::Str } else { Arg::Ptr };
    }
    let integer = !c_type.starts_with("struct ") && !c_type.starts_with("union ");
    if !integer {
        return Arg::Hex;
    }
    if name == "dfd" || name.ends_with("_dfd") || name.ends_with("dirfd") {
        return Arg::DirFd;
    }
    if name == "fd" || name.ends_with("_fd") || (name.ends_with("fd") && name.len() <= 5) {
        return Arg::Fd;
    }
    if c_type == "umode_t" || (name == "mode" && c_type.contains("mode")) {
        return Arg::Mode;
    }
    if name.contains("flag") || name == "mask" || name.ends_with("_mask") {
        return Arg::Hex;
    }
    if is_address(name) {
        // An address passed as a word (`unsigned long addr`, `start`).
        return Arg::Hex;
    }
    let unsigned = c_type.starts_with("unsigned") || c_type.starts_with('u') || c_type == "size_t";
    if unsigned {
        Arg::Uint
    } else {
        Arg::Int
    }
}

/// Whether an integer parameter called `name` holds an address or an
/// opaque word (strace shows those in hex): `addr`, `start`, `brk`,
/// `arg2`.
fn is_address(name: &str) -> bool {
    name.contains("addr") || matches!(name, "start" | "brk" | "ptr") || name.starts_with("arg")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(params: &[(&str, &str)]) -> Vec<Arg> {
        params
            .iter()
            .map(|(t, n)| {
                kind_of(&Param {
                    c_type: t.to_string(),
                    name: n.to_string(),
                })
            })
            .collect()
    }

    /// Calls as Linux 6.1 declares them, each shown as strace shows it:
    /// `sendfile(1, 3, NULL, 16777216)`, `mount("none", "/mnt", "tmpfs",
    /// 0, NULL)`, `umount2("/mnt", 0)`, `utimensat(AT_FDCWD, "/tmp/a",
    /// NULL, 0)`, `mkdirat(AT_FDCWD, "d", 0755)`, `munmap(0x7f.., 8192)`.
    #[test]
    fn kernel_declarations_give_straces_kinds() {
        use Arg::*;
        assert_eq!(
            kinds(&[
                ("int", "out_fd"),
                ("int", "in_fd"),
                ("loff_t __user *", "offset"),
                ("size_t", "count")
            ]),
            [Fd, Fd, Ptr, Uint]
        );
        assert_eq!(
            kinds(&[
                ("char __user *", "dev_name"),
                ("char __user *", "dir_name"),
                ("char __user *", "type"),
                ("unsigned long", "flags"),
                ("void __user *", "data"),
            ]),
            [Str, Str, Str, Hex, Ptr]
        );
        assert_eq!(
            kinds(&[("char __user *", "name"), ("int", "flags")]),
            [Str, Hex]
        );
        assert_eq!(
            kinds(&[
                ("int", "dfd"),
                ("const char __user *", "filename"),
                ("struct __kernel_timespec __user *", "utimes"),
                ("int", "flags"),
            ]),
            [DirFd, Str, Ptr, Hex]
        );
        assert_eq!(
            kinds(&[
                ("int", "dfd"),
                ("const char __user *", "pathname"),
                ("umode_t", "mode")
            ]),
            [DirFd, Str, Mode]
        );
        assert_eq!(
            kinds(&[("unsigned long", "addr"), ("size_t", "len")]),
            [Hex, Uint]
        );
        assert_eq!(
            kinds(&[
                ("const char __user *const __user *", "argv"),
                ("char __user *", "buf")
            ]),
            [Ptr, Ptr],
            "arrays of strings and data buffers are addresses"
        );
        assert_eq!(
            kinds(&[("pid_t", "pid"), ("unsigned int", "nr_events")]),
            [Int, Uint]
        );
        assert_eq!(
            kinds(&[("unsigned int", "fd"), ("unsigned long", "length")]),
            [Fd, Uint],
            "ftruncate(3, 10)"
        );
        assert_eq!(
            kinds(&[("int", "option"), ("unsigned long", "arg2")]),
            [Int, Hex]
        );
    }
}
