//! Reading strace-format logs (Debian's strace in the guest, and `hvtrace
//! trace`) into comparable per-thread sequences of system calls: name,
//! return value and the quoted strings among the arguments.

use std::collections::HashMap;

/// One call as the oracle comparison sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    /// Call name, or `+++` for an exit line.
    pub name: String,
    /// Normalised return value.
    pub ret: String,
    /// Quoted strings in the arguments, digits replaced by `#`.
    pub strings: Vec<String>,
}

/// Calls whose return value is a thread id (differs between runs).
const PID_RETURNS: &[&str] = &[
    "clone",
    "clone3",
    "fork",
    "vfork",
    "wait4",
    "waitid",
    "getpid",
    "gettid",
    "getppid",
    "set_tid_address",
    // The value of the call its signal interrupted (a wait4's child pid).
    "rt_sigreturn",
];

fn quoted_strings(args: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = args.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            let end = (i + 1).min(b.len());
            let mut s = args[start..end].to_string();
            if args[end..].starts_with("...") {
                s.push_str("...");
            }
            out.push(
                s.chars()
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .collect(),
            );
        }
        i += 1;
    }
    out
}

fn normalise_ret(name: &str, ret: &str) -> String {
    let ret = ret.trim();
    // `-1 ENOENT (No such file or directory)` -> `-1 ENOENT`
    if ret.starts_with("-1 ") || ret.starts_with("? ") {
        return ret.split(" (").next().unwrap_or(ret).to_string();
    }
    if ret.starts_with("0x") {
        return "<address>".into();
    }
    if PID_RETURNS.contains(&name) && ret != "0" && !ret.starts_with('-') {
        return "<pid>".into();
    }
    ret.split_whitespace().next().unwrap_or(ret).to_string()
}

/// strace's `strace: Process N attached` notes go to the same stderr as
/// the trace and can land in the middle of a line; removing each with its
/// newline puts the line back together.
pub fn without_attach_notes(log: &str) -> String {
    const HEAD: &str = "strace: Process ";
    let mut out = String::with_capacity(log.len());
    let mut rest = log;
    while let Some(i) = rest.find(HEAD) {
        let after = &rest[i + HEAD.len()..];
        let digits = after.chars().take_while(char::is_ascii_digit).count();
        let tail = &after[digits..];
        if digits > 0 && tail.starts_with(" attached") {
            out.push_str(&rest[..i]);
            let skip = tail.find('\n').map_or(tail.len(), |n| n + 1);
            rest = &tail[skip..];
        } else {
            out.push_str(&rest[..i + HEAD.len()]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Parses a log into per-thread call sequences (in the order each
/// thread's lines appear), ignoring signal lines, strace's own messages
/// and the calls named in `ignore`.
pub fn parse(log: &str, ignore: &[&str]) -> Vec<Vec<Call>> {
    let log = &without_attach_notes(log);
    let mut seqs: HashMap<u32, Vec<Call>> = HashMap::new();
    let mut order: Vec<u32> = Vec::new();
    let mut live: Vec<u32> = Vec::new();
    let mut unfinished: HashMap<u32, String> = HashMap::new();
    // Lines are unprefixed while one thread is traced, so the first
    // thread's id is learnt when it first appears prefixed: the first
    // prefixed id that no clone returned.
    let mut children: Vec<u32> = Vec::new();
    let mut main_alias: Option<u32> = None;
    const MAIN: u32 = 0;
    for raw in log.lines() {
        // strace's leader in a file with -f: the id in a column, every line.
        let column = raw
            .split_once(' ')
            .filter(|(p, _)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let (pid, text) = match raw.strip_prefix("[pid ") {
            _ if column.is_some() => {
                let (p, t) = column.expect("checked");
                (p.parse().unwrap_or(MAIN), t.trim_start())
            }
            Some(rest) => match rest.split_once("] ") {
                Some((p, t)) => {
                    let p: u32 = p.trim().parse().unwrap_or(MAIN);
                    if main_alias.is_none()
                        && order.first() == Some(&MAIN)
                        && !order.contains(&p)
                        && !children.contains(&p)
                    {
                        main_alias = Some(p);
                    }
                    (if main_alias == Some(p) { MAIN } else { p }, t)
                }
                None => continue,
            },
            None => (
                // Unprefixed: the only live thread, else the first one.
                if live.len() == 1 {
                    live[0]
                } else {
                    *order.first().unwrap_or(&MAIN)
                },
                raw,
            ),
        };
        let text = text.trim_end();
        if text.is_empty() || text.starts_with("---") || text.starts_with("strace:") {
            continue;
        }
        if !order.contains(&pid) {
            order.push(pid);
            live.push(pid);
        }
        if text.starts_with("+++") {
            seqs.entry(pid).or_default().push(Call {
                name: "+++".into(),
                ret: text.to_string(),
                strings: vec![],
            });
            live.retain(|p| *p != pid);
            continue;
        }
        if let Some(head) = text.strip_suffix("<unfinished ...>") {
            unfinished.insert(pid, head.to_string());
            continue;
        }
        let full = if let Some(rest) = text.strip_prefix("<... ") {
            let Some((_, tail)) = rest.split_once(" resumed>") else {
                continue;
            };
            format!("{}{}", unfinished.remove(&pid).unwrap_or_default(), tail)
        } else {
            text.to_string()
        };
        let Some(paren) = full.find('(') else {
            continue;
        };
        let name = full[..paren].to_string();
        if ignore.contains(&name.as_str()) {
            continue;
        }
        // strace pads before " = " to a column; hvtrace does not.
        let (args, ret) = match full.rfind(" = ") {
            Some(i) => (full[paren..i].trim_end(), &full[i + 3..]),
            None => continue,
        };
        if matches!(name.as_str(), "clone" | "clone3" | "fork" | "vfork") {
            if let Ok(child) = ret.trim().parse::<u32>() {
                children.push(child);
            }
        }
        let ret = normalise_ret(&name, ret);
        seqs.entry(pid).or_default().push(Call {
            name,
            ret,
            strings: quoted_strings(args),
        });
    }
    let mut out: Vec<Vec<Call>> = order.into_iter().filter_map(|p| seqs.remove(&p)).collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_unfinished_calls_and_normalisation() {
        let log = "execve(\"/bin/x\", [\"x\"], 0x7ffd /* 3 vars */) = 0\n\
                   clone(child_stack=NULL, flags=SIGCHLD) = 42\n\
                   [pid    42] write(1, \"pid 42\\n\"..., 7 <unfinished ...>\n\
                   [pid    41] wait4(-1,  <unfinished ...>\n\
                   [pid    42] <... write resumed>) = 7\n\
                   [pid    42] +++ exited with 0 +++\n\
                   <... wait4 resumed>[{WIFEXITED(s) && WEXITSTATUS(s) == 0}], 0, NULL) = 42\n\
                   --- SIGCHLD {si_signo=SIGCHLD} ---\n\
                   openat(AT_FDCWD, \"/nope\", O_RDONLY) = -1 ENOENT (No such file or directory)\n\
                   brk(NULL)                  = 0x55d000\n";
        let seqs = parse(log, &[]);
        assert_eq!(seqs.len(), 2);
        let split = "clone(child_stack=NULL, flags=SIGCHLDstrace: Process 9 attached\n, child_tidptr=0x1) = 9\n";
        let one = parse(split, &[]);
        assert_eq!(one[0][0].name, "clone");
        assert_eq!(one[0][0].ret, "<pid>");
        let child = seqs.iter().find(|s| s[0].name == "write").unwrap();
        assert_eq!(child[0].strings, vec!["\"pid ##\\n\"...".to_string()]);
        assert_eq!(child[1].name, "+++");
        let parent = seqs.iter().find(|s| s[0].name == "execve").unwrap();
        let names: Vec<&str> = parent.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["execve", "clone", "wait4", "openat", "brk"]);
        assert_eq!(parent[1].ret, "<pid>");
        assert_eq!(parent[2].ret, "<pid>");
        assert_eq!(parent[3].ret, "-1 ENOENT");
        assert_eq!(parent[4].ret, "<address>");
    }

    /// strace's `-o FILE -f` leader (`41    read(...)`) parses as the
    /// `[pid N]` form does.
    #[test]
    fn the_pid_column_parses_as_the_brackets_do() {
        let brackets = "clone(child_stack=NULL, flags=SIGCHLD) = 42\n\
                        [pid    42] write(1, \"hi\\n\", 3) = 3\n\
                        [pid    41] wait4(-1,  <unfinished ...>\n\
                        [pid    42] +++ exited with 0 +++\n\
                        <... wait4 resumed>NULL, 0, NULL) = 42\n";
        let column = "41    clone(child_stack=NULL, flags=SIGCHLD) = 42\n\
                      42    write(1, \"hi\\n\", 3) = 3\n\
                      41    wait4(-1,  <unfinished ...>\n\
                      42    +++ exited with 0 +++\n\
                      41    <... wait4 resumed>NULL, 0, NULL) = 42\n";
        let seqs = parse(column, &[]);
        assert_eq!(seqs.len(), 2);
        assert_eq!(seqs, parse(brackets, &[]));
    }
}
