//! One module per subcommand.

pub mod attach;
pub mod boot;
pub mod cached;
pub mod control;
pub mod events;
pub mod ps;
pub mod replay;
pub mod run;
pub mod sites;
pub mod snapshot;
pub mod symbols;
pub mod trace;

/// strace's time-stamp options (`trace` and `attach`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StampArgs {
    /// Start each line with the time of day (`strace -t`); `-tt` adds
    /// microseconds, `-ttt` gives seconds since the epoch.
    #[arg(short = 't', action = clap::ArgAction::Count)]
    pub time: u8,
    /// Start each line with the time since the previous one (`strace -r`).
    #[arg(short = 'r', conflicts_with = "time")]
    pub relative: bool,
}

/// strace's options that choose and annotate lines (`trace` and
/// `attach`): `-y`, `-z`, `-Z`, `-q`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LineArgs {
    /// Show each file descriptor with the path of its file
    /// (`3</etc/hostname>`, `1<pipe:[1234]>`), read from the guest
    /// kernel's file table of the thread (`strace -y`).
    #[arg(short = 'y')]
    pub decode_fds: bool,
    /// Only calls that returned without an error (`strace -z`, the same
    /// as `-e status=successful`).
    #[arg(short = 'z', conflicts_with = "failed_only")]
    pub successful_only: bool,
    /// Only calls that returned an error (`strace -Z`, `-e status=failed`).
    #[arg(short = 'Z')]
    pub failed_only: bool,
    /// Quieter, as strace's `-q`: no "attached to process" note (`attach`);
    /// given twice (`-qq`), no `+++ exited with N +++` lines either.
    #[arg(short = 'q', action = clap::ArgAction::Count)]
    pub quiet: u8,
}

impl LineArgs {
    /// The `-e status=` set in force, as written: `-z` and `-Z` win over
    /// the expression's `status` (each replaces the set, as in strace).
    pub fn status_spec(&self, status: Option<String>) -> Option<String> {
        if self.successful_only {
            Some("successful".into())
        } else if self.failed_only {
            Some("failed".into())
        } else {
            status
        }
    }
}

impl StampArgs {
    /// The renderer's stamp these options ask for, with the host's local
    /// time offset.
    pub fn stamp(&self) -> Option<(utrace::strace::text::Stamp, i64)> {
        use utrace::strace::text::Stamp;
        let stamp = match (self.time, self.relative) {
            (_, true) => Stamp::Relative,
            (0, false) => return None,
            (1, false) => Stamp::Time,
            (2, false) => Stamp::Micros,
            _ => Stamp::Epoch,
        };
        Some((stamp, local_utc_offset()))
    }
}

/// The host's local time offset from UTC now, in seconds (0 if unknown).
fn local_utc_offset() -> i64 {
    // SAFETY: time(NULL) only returns the time; localtime_r writes only the
    // `tm` it is given, which is a plain C struct for which all-zero bytes
    // are a valid value.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return 0;
        }
        tm.tm_gmtoff
    }
}

/// `-s N`: a number no larger than utrace's `MAX_STRING_LIMIT`.
pub fn parse_string_limit(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("`{s}` is not a string length"))?;
    utrace::syscalls::format::check_string_limit(n)
}
