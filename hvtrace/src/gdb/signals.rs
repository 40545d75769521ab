//! Linux signal numbers to gdb's and back: the remote protocol carries
//! gdb's own numbering (`gdb/signals.def`), which differs from Linux's
//! after SIGTRAP (Linux's SIGBUS, 7, is gdb's 10; gdb's 7 is SIGEMT).

use gdbstub::common::Signal;

/// gdb's number of each Linux signal 1..=31, by Linux number - 1.
const LINUX_TO_GDB: [u8; 31] = [
    1,  // SIGHUP
    2,  // SIGINT
    3,  // SIGQUIT
    4,  // SIGILL
    5,  // SIGTRAP
    6,  // SIGABRT
    10, // SIGBUS
    8,  // SIGFPE
    9,  // SIGKILL
    30, // SIGUSR1
    11, // SIGSEGV
    31, // SIGUSR2
    13, // SIGPIPE
    14, // SIGALRM
    15, // SIGTERM
    0,  // SIGSTKFLT: no gdb number
    20, // SIGCHLD
    19, // SIGCONT
    17, // SIGSTOP
    18, // SIGTSTP
    21, // SIGTTIN
    22, // SIGTTOU
    16, // SIGURG
    24, // SIGXCPU
    25, // SIGXFSZ
    26, // SIGVTALRM
    27, // SIGPROF
    28, // SIGWINCH
    23, // SIGIO
    32, // SIGPWR
    12, // SIGSYS
];

/// gdb's `GDB_SIGNAL_REALTIME_33`; 34..=63 follow it.
const GDB_REALTIME_33: u8 = 45;
/// gdb's `GDB_SIGNAL_REALTIME_32`.
const GDB_REALTIME_32: u8 = 77;
/// gdb's `GDB_SIGNAL_REALTIME_64`.
const GDB_REALTIME_64: u8 = 78;
/// gdb's `GDB_SIGNAL_UNKNOWN`.
const GDB_UNKNOWN: u8 = 143;

/// gdb's number for Linux signal `signo`.
pub fn to_gdb(signo: i32) -> Signal {
    let n = match signo {
        1..=31 => match LINUX_TO_GDB[signo as usize - 1] {
            0 => GDB_UNKNOWN,
            n => n,
        },
        32 => GDB_REALTIME_32,
        33..=63 => GDB_REALTIME_33 + (signo - 33) as u8,
        64 => GDB_REALTIME_64,
        _ => GDB_UNKNOWN,
    };
    Signal(n)
}

/// The Linux signal for gdb's number, if Linux has it.
pub fn from_gdb(signal: Signal) -> Option<i32> {
    let n = signal.0;
    if let Some(i) = LINUX_TO_GDB.iter().position(|&g| g == n && g != 0) {
        return Some(i as i32 + 1);
    }
    match n {
        GDB_REALTIME_32 => Some(32),
        GDB_REALTIME_64 => Some(64),
        _ if (GDB_REALTIME_33..GDB_REALTIME_33 + 31).contains(&n) => {
            Some(33 + (n - GDB_REALTIME_33) as i32)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_linux_signal_round_trips() {
        for s in (1..=64).filter(|&s| s != 16) {
            assert_eq!(from_gdb(to_gdb(s)), Some(s), "signal {s}");
        }
    }

    #[test]
    fn numbers_gdb_documents() {
        // gdb/signals.def: SIGSEGV 11, SIGUSR1 30, SIGBUS 10, SIGCHLD 20.
        assert_eq!(to_gdb(11).0, 11);
        assert_eq!(to_gdb(10).0, 30);
        assert_eq!(to_gdb(7).0, 10);
        assert_eq!(to_gdb(17).0, 20);
    }
}
