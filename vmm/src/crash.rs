//! Recognising a guest kernel's crash reports on its console: panics,
//! oopses and BUGs, lockups and hung tasks. (RCU stall warnings are left
//! alone: the kernel goes on after them, and an emulated guest can cause
//! them by its slowness alone.) A session that
//! sees one ends the run with the report instead of waiting for a guest
//! that will never answer.

/// What kind of failure a console line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashKind {
    /// `Kernel panic - not syncing: ...`
    Panic,
    /// An oops or BUG: the kernel's `die()` banner (`... [#1] ...`), `BUG:`
    /// lines, `kernel BUG at`, a general protection fault.
    Oops,
    /// `watchdog: BUG: soft lockup` or a hard lockup.
    Lockup,
    /// `INFO: task X blocked for more than N seconds.`
    HungTask,
}

impl CrashKind {
    /// How the report names it.
    pub fn describe(self) -> &'static str {
        match self {
            CrashKind::Panic => "panicked",
            CrashKind::Oops => "oopsed",
            CrashKind::Lockup => "reported a lockup",
            CrashKind::HungTask => "reported a hung task",
        }
    }

    /// Whether the report can be an artefact of a slow, emulated guest
    /// rather than a kernel bug: the lockup and hung-task detectors measure
    /// wall-clock time, and on PVM KVM a boot-time loop of the kernel runs
    /// a thousand times slower than it was written for.
    pub fn may_be_slowness(self) -> bool {
        matches!(self, CrashKind::Lockup | CrashKind::HungTask)
    }
}

/// The line without printk's `[   12.345678] ` time stamp.
fn message(line: &str) -> &str {
    let t = line.trim_start();
    if let Some(rest) = t.strip_prefix('[') {
        if let Some(end) = rest.find("] ") {
            let stamp = &rest[..end];
            if stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.') {
                return &rest[end + 2..];
            }
        }
    }
    t
}

/// The failure a kernel console line reports, if any. Warnings
/// (`WARNING:`) are not failures: the kernel goes on after them.
pub fn classify(line: &str) -> Option<CrashKind> {
    let m = message(line);
    if m.starts_with("Kernel panic - not syncing") {
        Some(CrashKind::Panic)
    } else if m.contains("soft lockup") || m.contains("hard LOCKUP") {
        Some(CrashKind::Lockup)
    } else if m.starts_with("INFO: task ") && m.contains("blocked for more than") {
        Some(CrashKind::HungTask)
    } else if m.starts_with("BUG: ")
        || m.starts_with("kernel BUG at")
        || m.starts_with("Oops: ")
        || m.starts_with("general protection fault")
        || is_die_banner(m)
    {
        Some(CrashKind::Oops)
    } else {
        None
    }
}

/// x86's `die()` banner: `<what>: <4 hex digits> [#<n>] ...`, e.g.
/// `invalid opcode: 0000 [#1] PREEMPT SMP`.
fn is_die_banner(m: &str) -> bool {
    let Some((_, rest)) = m.split_once(": ") else {
        return false;
    };
    let mut words = rest.split_whitespace();
    let (Some(code), Some(count)) = (words.next(), words.next()) else {
        return false;
    };
    code.len() == 4
        && code.chars().all(|c| c.is_ascii_hexdigit())
        && count.starts_with("[#")
        && count.ends_with(']')
        && count[2..count.len() - 1]
            .chars()
            .all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_kernels_crash_reports() {
        let cases = [
            ("[   51.904011] Kernel panic - not syncing: sysrq triggered crash", Some(CrashKind::Panic)),
            ("[    9.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009", Some(CrashKind::Panic)),
            ("[   12.000001] BUG: kernel NULL pointer dereference, address: 0000000000000000", Some(CrashKind::Oops)),
            ("[   12.000002] Oops: 0002 [#1] PREEMPT SMP NOPTI", Some(CrashKind::Oops)),
            ("[   12.000003] invalid opcode: 0000 [#1] SMP", Some(CrashKind::Oops)),
            ("[   12.000004] kernel BUG at drivers/misc/lkdtm/bugs.c:78!", Some(CrashKind::Oops)),
            ("[   12.000005] general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP", Some(CrashKind::Oops)),
            ("[   40.5] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:35]", Some(CrashKind::Lockup)),
            ("[  250.1] INFO: task sh:35 blocked for more than 122 seconds.", Some(CrashKind::HungTask)),
            ("[  300.2] rcu: INFO: rcu_sched self-detected stall on CPU", None),
            ("[    1.2] WARNING: CPU: 0 PID: 1 at kernel/foo.c:1 bar+0x1/0x2", None),
            ("[    0.0] Linux version 6.1.192 (root@vm)", None),
            ("[    2.0] Freeing unused kernel image (initmem) memory: 1024K", None),
            ("[    3.0] random: crng init done", None),
            ("echo BUG: this is user output, not the kernel's", None),
        ];
        for (line, want) in cases {
            assert_eq!(classify(line), want, "{line}");
        }
    }
}
