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

/// `-s N`: a number no larger than utrace's `MAX_STRING_LIMIT`.
pub fn parse_string_limit(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("`{s}` is not a string length"))?;
    utrace::syscalls::format::check_string_limit(n)
}
