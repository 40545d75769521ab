//! Reading strace-format logs (Debian's strace in the guest, and `hvtrace
//! trace`) into comparable per-thread sequences of system calls: name,
//! return value and the quoted strings among the arguments, and each
//! call's whole line with only addresses and thread ids normalised.

use std::collections::{HashMap, HashSet};

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
    parse_lines(log, ignore)
        .into_iter()
        .map(|seq| seq.into_iter().map(|(call, _)| call).collect())
        .collect()
}

/// [`parse`], each call with its whole line (reassembled if strace split
/// it, without its `[pid N]` leader) as [`normalise_line`] leaves it; the
/// threads in the same order as `parse` gives them.
pub fn parse_lines(log: &str, ignore: &[&str]) -> Vec<Vec<(Call, String)>> {
    let log = &without_attach_notes(log);
    let tids = thread_ids(log);
    let mut seqs: HashMap<u32, Vec<(Call, String)>> = HashMap::new();
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
            let call = Call {
                name: "+++".into(),
                ret: text.to_string(),
                strings: vec![],
            };
            seqs.entry(pid)
                .or_default()
                .push((call, normalise_line(text, &tids)));
            live.retain(|p| *p != pid);
            continue;
        }
        if let Some(head) = text.strip_suffix("<unfinished ...>") {
            // Without the space both put before `<unfinished ...>`.
            unfinished.insert(pid, head.strip_suffix(' ').unwrap_or(head).to_string());
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
        let line = normalise_line(&full, &tids);
        let call = Call {
            name,
            ret,
            strings: quoted_strings(args),
        };
        seqs.entry(pid).or_default().push((call, line));
    }
    let mut out: Vec<Vec<(Call, String)>> =
        order.into_iter().filter_map(|p| seqs.remove(&p)).collect();
    // By the calls alone, so that two logs' threads pair up as `parse`'s do.
    out.sort_by(|a, b| a.iter().map(|c| &c.0).cmp(b.iter().map(|c| &c.0)));
    out
}

/// Every thread id a log shows: `[pid N]` leaders and the `-o` column,
/// and the values of the calls that return one.
fn thread_ids(log: &str) -> HashSet<String> {
    let mut tids = HashSet::new();
    for raw in log.lines() {
        let leader = raw
            .strip_prefix("[pid ")
            .and_then(|r| r.split_once(']'))
            .map(|(p, _)| p.trim())
            .or_else(|| raw.split_once(' ').map(|(p, _)| p));
        if let Some(p) = leader.filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
            tids.insert(p.to_string());
        }
        let text = raw.split_once("] ").map_or(raw, |(_, t)| t);
        let name = text.split('(').next().unwrap_or("");
        let name = name
            .strip_prefix("<... ")
            .map_or(name, |n| n.trim_end_matches(" resumed>"));
        if PID_RETURNS.contains(&name.split_whitespace().next().unwrap_or("")) {
            if let Some((_, ret)) = text.rsplit_once(" = ") {
                let ret = ret.split_whitespace().next().unwrap_or("");
                if ret.parse::<u32>().is_ok_and(|n| n > 1) {
                    tids.insert(ret.to_string());
                }
            }
        }
    }
    tids
}

/// The arguments (by position) that are process or thread ids.
fn pid_args(name: &str) -> &'static [usize] {
    match name {
        "kill" | "tkill" | "wait4" | "setpgid" | "getpgid" | "getsid" | "prlimit64"
        | "sched_setaffinity" | "sched_getaffinity" | "sched_getparam" | "sched_setparam"
        | "sched_getscheduler" | "sched_setscheduler" | "pidfd_open" => &[0],
        "tgkill" => &[0, 1],
        "waitid" | "ptrace" => &[1],
        _ => &[],
    }
}

/// Structure fields that hold a process or thread id.
const PID_FIELDS: &[&str] = &["si_pid=", "parent_tid=[", "child_tid=["];

/// One call's line as the whole-line comparison sees it: addresses (hex
/// numbers of five digits or more, where the guest's layout puts things)
/// outside strings become `0x?`; thread ids (those of `tids`) become
/// `<pid>` where a pid goes (the arguments of [`pid_args`], the fields of
/// [`PID_FIELDS`], the value of a call that returns one) and inside
/// strings (a program prints its pid); then a string that held one
/// changes length with it, so the call's length and value become `<len>`.
/// strace's padding before ` = ` is one space. Nothing else changes.
pub fn normalise_line(line: &str, tids: &HashSet<String>) -> String {
    let (body, ret) = match line.rfind(" = ") {
        Some(i) => (line[..i].trim_end(), Some(&line[i + 3..])),
        None => (line, None),
    };
    let name = body.split('(').next().unwrap_or("");
    let pid_positions = pid_args(name);
    let mut out = String::with_capacity(line.len());
    let b = body.as_bytes();
    let (mut i, mut depth, mut arg) = (0, 0usize, 0usize);
    let (mut in_string, mut pid_in_string) = (false, false);
    while i < b.len() {
        let c = b[i];
        if in_string && c == b'\\' {
            // An escape, copied as it is (`\177` is no thread id).
            let n = 1 + body[i + 1..].chars().next().map_or(0, char::len_utf8);
            out.push_str(&body[i..i + n]);
            i += n;
            continue;
        }
        if c == b'"' {
            in_string = !in_string;
        } else if !in_string {
            match c {
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth = depth.saturating_sub(1),
                b',' if depth == 1 => arg += 1,
                _ => {}
            }
        }
        let word_start = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        if !(word_start && c.is_ascii_digit()) {
            let n = body[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&body[i..i + n]);
            i += n;
            continue;
        }
        let end = i + b[i..]
            .iter()
            .take_while(|d| d.is_ascii_alphanumeric() || **d == b'_')
            .count();
        let word = &body[i..end];
        let hex = word
            .strip_prefix("0x")
            .filter(|h| h.bytes().all(|d| d.is_ascii_hexdigit()));
        let pid_place = in_string
            || (depth == 1 && pid_positions.contains(&arg))
            || PID_FIELDS.iter().any(|f| out.ends_with(f));
        if !in_string && hex.is_some_and(|h| h.len() >= 5) {
            out.push_str("0x?");
        } else if pid_place && tids.contains(word) {
            out.push_str("<pid>");
            pid_in_string |= in_string;
        } else {
            out.push_str(word);
        }
        i = end;
    }
    let Some(ret) = ret else { return out };
    let value = ret.split_whitespace().next().unwrap_or("");
    let ret = if PID_RETURNS.contains(&name) && value.parse::<u32>().is_ok_and(|n| n > 0) {
        ret.replacen(value, "<pid>", 1)
    } else if pid_in_string && value.parse::<u32>().is_ok() {
        // The length argument too: the last one equal to the value.
        if let Some(at) = out.rfind(&format!(", {value}")) {
            out.replace_range(at + 2..at + 2 + value.len(), "<len>");
        }
        ret.replacen(value, "<len>", 1)
    } else {
        let addr = value
            .strip_prefix("0x")
            .is_some_and(|h| h.len() >= 5 && h.bytes().all(|d| d.is_ascii_hexdigit()));
        if addr {
            ret.replacen(value, "0x?", 1)
        } else {
            ret.to_string()
        }
    };
    format!("{out} = {ret}")
}

/// How many lines of the oracle's log `hv`'s equal, thread by thread in
/// the order [`parse_lines`] pairs them: (identical, the oracle's lines,
/// the pairs that differ as `(hvtrace's, the oracle's)`). Lines past the
/// shorter of two threads count as different, paired with an empty line.
///
/// Threads whose calls are alike (`parse_lines` pairs by calls, digits
/// blanked) are paired by their whole lines too: two threads of one
/// program that make the same calls and write "thread 1" and "thread 2"
/// start in either order from run to run, and each must meet the thread
/// that wrote the same, not the one that happened to start first.
pub fn line_share(
    hv: &[Vec<(Call, String)>],
    oracle: &[Vec<(Call, String)>],
) -> (usize, usize, Vec<(String, String)>) {
    let (hv, oracle) = (by_content(hv), by_content(oracle));
    let (mut same, mut total, mut diffs) = (0, 0, Vec::new());
    let empty = Vec::new();
    for t in 0..hv.len().max(oracle.len()) {
        let (h, o) = (
            hv.get(t).copied().unwrap_or(&empty),
            oracle.get(t).copied().unwrap_or(&empty),
        );
        for i in 0..h.len().max(o.len()) {
            let hl = h.get(i).map_or("", |c| c.1.as_str());
            let ol = o.get(i).map_or("", |c| c.1.as_str());
            if i < o.len() {
                total += 1;
            }
            if hl == ol {
                same += 1;
            } else {
                diffs.push((hl.to_string(), ol.to_string()));
            }
        }
    }
    (same, total, diffs)
}

/// `threads` ordered by their calls, then by their whole lines.
fn by_content(threads: &[Vec<(Call, String)>]) -> Vec<&Vec<(Call, String)>> {
    let mut sorted: Vec<&Vec<(Call, String)>> = threads.iter().collect();
    sorted.sort_by(|a, b| {
        let calls = a.iter().map(|c| &c.0).cmp(b.iter().map(|c| &c.0));
        calls.then_with(|| a.iter().map(|c| &c.1).cmp(b.iter().map(|c| &c.1)))
    });
    sorted
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

    #[test]
    fn whole_lines_normalise_addresses_ids_and_padding_only() {
        let log = "clone(child_stack=NULL, flags=SIGCHLD) = 42\n\
                   [pid    42] write(1, \"pid 42\\n\\42\", 9) = 9\n\
                   [pid    42] +++ exited with 0 +++\n\
                   mmap(NULL, 8192, PROT_READ, MAP_PRIVATE, 3, 0) = 0x7f12345000\n\
                   newfstatat(1, \"\", 0x7ffc1000, 0x1000)   = 0\n\
                   kill(42, SIGTERM) = 0\n\
                   prlimit64(0, 42, NULL, 0x7ffc1000) = 0\n";
        let seqs = parse_lines(log, &[]);
        let lines: Vec<&str> = seqs.iter().flatten().map(|c| c.1.as_str()).collect();
        assert_eq!(
            lines,
            [
                "clone(child_stack=NULL, flags=SIGCHLD) = <pid>",
                "mmap(NULL, 8192, PROT_READ, MAP_PRIVATE, 3, 0) = 0x?",
                "newfstatat(1, \"\", 0x?, 0x1000) = 0",
                "kill(<pid>, SIGTERM) = 0",
                "prlimit64(0, 42, NULL, 0x?) = 0",
                "write(1, \"pid <pid>\\n\\42\", <len>) = <len>",
                "+++ exited with 0 +++",
            ]
        );
        let other = parse_lines(&log.replace("0x1000)", "AT_EMPTY_PATH)"), &[]);
        let (same, total, diffs) = line_share(&seqs, &other);
        assert_eq!((same, total), (6, 7));
        assert_eq!(diffs[0].1, "newfstatat(1, \"\", 0x?, AT_EMPTY_PATH) = 0");
    }

    /// Two threads alike in their calls but not in what they write pair
    /// with the oracle's threads that wrote the same, whichever started
    /// first in either log; a thread that wrote something else still
    /// counts as different.
    #[test]
    fn alike_threads_pair_by_what_they_wrote() {
        let log = |first: u32, second: u32| {
            format!(
                "clone(child_stack=NULL, flags=CLONE_VM) = 42\n\
                 clone(child_stack=NULL, flags=CLONE_VM) = 43\n\
                 [pid    42] write(1, \"thread {first}\\n\", 9) = 9\n\
                 [pid    43] write(1, \"thread {second}\\n\", 9) = 9\n\
                 [pid    42] +++ exited with 0 +++\n\
                 [pid    43] +++ exited with 0 +++\n"
            )
        };
        let one_first = parse_lines(&log(1, 2), &[]);
        let two_first = parse_lines(&log(2, 1), &[]);
        assert_eq!(line_share(&one_first, &two_first), (6, 6, vec![]));
        let wrong = parse_lines(&log(1, 3), &[]);
        let (same, total, diffs) = line_share(&wrong, &two_first);
        assert_eq!((same, total), (5, 6));
        assert_eq!(
            diffs,
            [(
                "write(1, \"thread 3\\n\", 9) = 9".to_string(),
                "write(1, \"thread 2\\n\", 9) = 9".to_string()
            )]
        );
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
