//! Checks the BTF reader against pahole (Debian package dwarves) on the
//! project's minimal 6.1 kernel.
//!
//! pahole is run twice per struct, once reading the vmlinux's DWARF (an
//! oracle independent of BTF) and once reading its BTF. Every member pahole
//! lists at the top level of each struct (anonymous struct/union members
//! included) must have the same offset and size in `KernelTypes`, and the
//! members hvtrace relies on are checked by name. The test fails, never
//! skips, if pahole or the kernel is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use guest_introspect::btf::{BtfError, KernelTypes};

const STRUCTS: &[&str] = &[
    "task_struct",
    "list_head",
    "thread_info",
    "cred",
    "mm_struct",
    "signal_struct",
    "pt_regs",
    "file",
    "path",
    "dentry",
    "qstr",
];

/// Members hvtrace reads; `|` separates alternatives of which at least one
/// must exist, `?` marks a member that may be absent.
const USED: &[(&str, &[&str])] = &[
    (
        "task_struct",
        &[
            "__state|state",
            "flags",
            "tasks",
            "pid",
            "tgid",
            "real_parent",
            "parent",
            "comm",
            "stack",
            "mm",
            "cred",
            "real_cred",
            "thread_info",
            "thread_group|thread_node",
            "signal",
            "exit_state",
            "exit_code",
            "on_cpu",
            "group_leader",
            "children",
            "sibling",
            "files",
        ],
    ),
    ("thread_info", &["flags", "syscall_work"]),
    ("cred", &["uid", "gid", "euid"]),
    ("mm_struct", &["pgd", "exe_file"]),
    ("signal_struct", &["thread_head?"]),
    ("pt_regs", &["orig_ax", "ip", "sp", "di"]),
    ("file", &["f_path"]),
    ("path", &["dentry", "mnt"]),
    ("dentry", &["d_name", "d_parent", "d_iname"]),
    ("qstr", &["name"]),
];

/// One member line of pahole's output.
#[derive(Debug, Clone)]
struct PMember {
    /// Name, or `outer.name` for members inside a named nested body.
    name: String,
    offset: u64,
    /// `(bit position in the storage unit at offset, width)` for bitfields.
    bitfield: Option<(u64, u32)>,
    size: u64,
}

impl PMember {
    fn bit_offset(&self) -> u64 {
        self.offset * 8 + self.bitfield.map_or(0, |b| b.0)
    }
}

#[derive(Debug, Default)]
struct PStruct {
    name: String,
    size: Option<u64>,
    /// Top-level members in order, anonymous bodies flattened.
    members: Vec<PMember>,
    /// Members inside named nested bodies, as dotted paths.
    nested: Vec<PMember>,
}

/// The project's kernel build directory (built on first use, cached after).
fn kernel_dir() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernel-config/build.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("run kernel-config/build.sh");
    assert!(
        out.status.success(),
        "kernel-config/build.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn pahole(format: &str, vmlinux: &Path) -> String {
    let out = Command::new("pahole")
        .args(["-F", format, "-C", &STRUCTS.join(",")])
        .arg(vmlinux)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "\n\n*** pahole could not be run ({e}). This test needs it as its oracle: \
                 install Debian's `dwarves` package (apt-get install dwarves). ***\n\n"
            )
        });
    assert!(
        out.status.success(),
        "pahole -F {format} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("pahole output is UTF-8")
}

/// The text of the comment at the end of a line, e.g. `  1424     4 ` from
/// `pid_t pid; /*  1424     4 */`.
fn trailing_comment(line: &str) -> Option<&str> {
    let start = line.rfind("/*")?;
    line[start + 2..].strip_suffix("*/")
}

/// Parses `off size` or `off: bit size`.
fn parse_place(comment: &str) -> (u64, Option<u64>, u64) {
    let spaced = comment.replace(':', ": ");
    let toks: Vec<&str> = spaced.split_whitespace().collect();
    let num = |s: &str| -> u64 {
        s.parse()
            .unwrap_or_else(|_| panic!("number in `{comment}`"))
    };
    match toks.as_slice() {
        [off, bit, size] if off.ends_with(':') => {
            (num(off.trim_end_matches(':')), Some(num(bit)), num(size))
        }
        [off, size] => (num(off), None, num(size)),
        _ => panic!("unexpected pahole comment `{comment}`"),
    }
}

/// The declared name in a member declaration such as
/// `struct task_struct * real_parent`, `char comm[16]`,
/// `unsigned int in_execve:1` or `long (*fn)(struct file *, long)`.
fn decl_name(decl: &str) -> (String, Option<u32>) {
    let decl = decl.split("__attribute__").next().unwrap_or(decl).trim();
    if let Some(p) = decl.find("(*") {
        let rest = &decl[p + 2..];
        return (
            rest[..rest.find(')').unwrap_or(rest.len())].to_string(),
            None,
        );
    }
    let last = decl.split_whitespace().last().unwrap_or("");
    let last = last.split('[').next().unwrap_or(last);
    match last.split_once(':') {
        Some((name, bits)) => (name.to_string(), bits.parse().ok()),
        None => (last.to_string(), None),
    }
}

fn parse_pahole(text: &str) -> Vec<PStruct> {
    let mut done = Vec::new();
    let mut cur = PStruct::default();
    // One frame per open body: the members seen in it so far.
    let mut stack: Vec<Vec<PMember>> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if stack.is_empty() {
            if let Some(rest) = line.strip_prefix("struct ") {
                if let Some(name) = rest.strip_suffix('{') {
                    cur = PStruct {
                        name: name.trim().to_string(),
                        ..Default::default()
                    };
                    stack.push(Vec::new());
                }
            }
            continue;
        }
        if let Some(rest) = t.strip_prefix("/* size:") {
            let n = rest.split(',').next().unwrap().trim();
            cur.size = Some(n.parse().expect("size number"));
        } else if t.ends_with('{') {
            stack.push(Vec::new());
        } else if let Some(rest) = t.strip_prefix('}') {
            let body = stack.pop().unwrap();
            if stack.is_empty() {
                cur.members = body;
                done.push(std::mem::take(&mut cur));
                continue;
            }
            let decl = rest.split(';').next().unwrap_or("");
            let (name, _) = decl_name(decl);
            let parent = stack.last_mut().unwrap();
            if name.is_empty() {
                // Anonymous struct/union: its members belong to the parent,
                // as C sees them.
                parent.extend(body);
            } else {
                let comment = trailing_comment(t).expect("closing line has offset/size");
                let (offset, _, size) = parse_place(comment);
                parent.push(PMember {
                    name: name.clone(),
                    offset,
                    bitfield: None,
                    size,
                });
                cur.nested.extend(body.into_iter().map(|m| PMember {
                    name: format!("{name}.{}", m.name),
                    ..m
                }));
            }
        } else if let Some(comment) = trailing_comment(t) {
            let decl = t[..t.rfind("/*").unwrap()].trim();
            let Some(decl) = decl.strip_suffix(';') else {
                continue; // a comment line such as "/* XXX 4 bytes hole */"
            };
            let (name, width) = decl_name(decl);
            let (offset, bit, size) = parse_place(comment);
            let bitfield = match (bit, width) {
                (Some(b), Some(w)) => Some((b, w)),
                (None, None) => None,
                _ => panic!("bitfield position and width disagree in `{t}`"),
            };
            stack.last_mut().unwrap().push(PMember {
                name,
                offset,
                bitfield,
                size,
            });
        }
    }
    assert!(stack.is_empty(), "unterminated struct in pahole output");
    done
}

fn load() -> (KernelTypes, PathBuf) {
    let vmlinux = kernel_dir().join("vmlinux");
    let elf = std::fs::read(&vmlinux).unwrap_or_else(|e| panic!("read {vmlinux:?}: {e}"));
    let start = std::time::Instant::now();
    let kt = KernelTypes::from_elf(&elf).expect("parse the .BTF section");
    eprintln!(
        "{} BTF types parsed in {:?}",
        kt.type_count(),
        start.elapsed()
    );
    (kt, vmlinux)
}

/// Compares one pahole struct with ours; returns the mismatches.
fn compare(kt: &KernelTypes, ps: &PStruct, format: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let name = &ps.name;
    let want_size = ps.size.unwrap_or_else(|| panic!("no size line for {name}"));
    match kt.struct_size(name) {
        Ok(s) if s == want_size => {}
        other => bad.push(format!(
            "[{format}] sizeof(struct {name}): pahole {want_size}, ours {other:?}"
        )),
    }
    for pm in ps.members.iter().chain(&ps.nested) {
        match kt.member(name, &pm.name) {
            Ok(m) => {
                let width = pm.bitfield.map_or(0, |b| b.1);
                if m.bit_offset != pm.bit_offset() || m.size != pm.size || m.bit_size != width {
                    bad.push(format!(
                        "[{format}] {name}.{}: pahole {pm:?}, ours {m:?}",
                        pm.name
                    ));
                }
            }
            Err(e) => bad.push(format!("[{format}] {name}.{}: {e}", pm.name)),
        }
    }
    // The flattened listing must be pahole's top level, in order.
    let ours: Vec<(String, u64, u64)> = kt
        .members(name)
        .unwrap_or_else(|e| panic!("members({name}): {e}"))
        .into_iter()
        .map(|m| (m.name, m.bit_offset, m.size))
        .collect();
    let theirs: Vec<(String, u64, u64)> = ps
        .members
        .iter()
        .map(|m| (m.name.clone(), m.bit_offset(), m.size))
        .collect();
    if ours != theirs {
        bad.push(format!(
            "[{format}] members({name}) differs from pahole's top level:\n  ours   {ours:?}\n  pahole {theirs:?}"
        ));
    }
    bad
}

#[test]
fn layouts_match_pahole() {
    let (kt, vmlinux) = load();
    let mut bad = Vec::new();
    for format in ["dwarf", "btf"] {
        let parsed = parse_pahole(&pahole(format, &vmlinux));
        let names: Vec<&str> = parsed.iter().map(|p| p.name.as_str()).collect();
        for want in STRUCTS {
            assert!(
                names.contains(want),
                "pahole -F {format} printed no struct {want}: {names:?}"
            );
        }
        for ps in &parsed {
            let n = ps.members.len() + ps.nested.len();
            eprintln!("[{format}] struct {}: {n} members compared", ps.name);
            bad.extend(compare(&kt, ps, format));
        }
        let task = parsed.iter().find(|p| p.name == "task_struct").unwrap();
        assert!(
            task.members.len() > 100,
            "pahole listed only {} task_struct members",
            task.members.len()
        );
        // The anonymous union's members are part of the top level.
        assert!(task.members.iter().any(|m| m.name == "rcu_users"));

        // The members hvtrace uses, by name.
        for (strukt, members) in USED {
            let ps = parsed.iter().find(|p| p.name == *strukt).unwrap();
            for spec in *members {
                let optional = spec.ends_with('?');
                let alts: Vec<&str> = spec.trim_end_matches('?').split('|').collect();
                let present: Vec<&&str> =
                    alts.iter().filter(|a| kt.has_member(strukt, a)).collect();
                if present.is_empty() {
                    assert!(optional, "struct {strukt} has none of {alts:?}");
                    continue;
                }
                let m = kt.member_any(strukt, &alts).unwrap();
                let Some(pm) = ps.members.iter().find(|p| p.name == m.name) else {
                    bad.push(format!(
                        "[{format}] pahole does not list {strukt}.{}",
                        m.name
                    ));
                    continue;
                };
                if m.offset != pm.offset || m.size != pm.size {
                    bad.push(format!(
                        "[{format}] used member {strukt}.{}: pahole {pm:?}, ours {m:?}",
                        m.name
                    ));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn spellings_and_errors_on_the_real_kernel() {
    let (kt, _) = load();
    let ty = |s: &str, p: &str| kt.member(s, p).unwrap().type_name;
    assert_eq!(ty("task_struct", "pid"), "pid_t");
    assert_eq!(ty("task_struct", "comm"), "char[16]");
    assert_eq!(ty("task_struct", "real_parent"), "struct task_struct *");
    assert_eq!(ty("task_struct", "tasks"), "struct list_head");
    assert_eq!(ty("task_struct", "cred"), "const struct cred *");
    assert_eq!(ty("task_struct", "__state"), "unsigned int");
    assert_eq!(ty("qstr", "name"), "const unsigned char *");

    // Paths through nested structs add up.
    let ti = kt.member("task_struct", "thread_info").unwrap();
    let flags = kt.member("thread_info", "flags").unwrap();
    assert_eq!(
        kt.member("task_struct", "thread_info.flags")
            .unwrap()
            .offset,
        ti.offset + flags.offset
    );
    let d_name = kt.member("dentry", "d_name").unwrap().offset;
    let qname = kt.member("qstr", "name").unwrap().offset;
    assert_eq!(
        kt.member("dentry", "d_name.name").unwrap().offset,
        d_name + qname
    );
    // qstr's `len` sits in an anonymous struct inside an anonymous union.
    assert_eq!(
        kt.member("dentry", "d_name.len").unwrap().offset,
        d_name + 4
    );

    let e = kt.member("task_struct", "real_parent.pid").unwrap_err();
    assert!(matches!(e, BtfError::PointerMember { .. }), "{e}");
    assert!(
        e.to_string().contains("`real_parent`") && e.to_string().contains("pointer"),
        "{e}"
    );
    let e = kt.member("task_struct", "foo").unwrap_err();
    assert_eq!(e.to_string(), "struct task_struct has no member `foo`");
    let e = kt
        .member_any("task_struct", &["nope", "neither"])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "struct task_struct has none of the members `nope`, `neither`"
    );
    assert_eq!(
        kt.member_any("task_struct", &["state", "__state"])
            .unwrap()
            .name,
        "__state"
    );
    assert!(matches!(
        kt.struct_size("no_such_struct_xyz"),
        Err(BtfError::NoSuchStruct(_))
    ));
}
