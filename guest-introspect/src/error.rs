//! The one error type of a live-kernel request (ps, inspect, symbol checks).
//!
//! Guest memory is untrusted: every failure names what was being read and
//! where, so a user can tell a hostile or corrupt guest from a bug.

use crate::btf::BtfError;
use crate::paging::VirtReadError;

/// Why a request about a running kernel failed.
#[derive(Debug, thiserror::Error)]
pub enum IntrospectError {
    /// A guest-virtual read failed.
    #[error("cannot read {what} at {va:#x}: {source}")]
    Read {
        /// What was being read (e.g. "task_struct.tasks of pid 12").
        what: String,
        /// The address.
        va: u64,
        /// Why.
        source: VirtReadError,
    },
    /// A symbol the request needs is not in the symbol source.
    #[error("symbol `{0}` is not in the kernel's symbol table")]
    MissingSymbol(String),
    /// A type or member the request needs is not in the BTF.
    #[error(transparent)]
    Types(#[from] BtfError),
    /// The kernel's placement could not be determined.
    #[error("cannot locate the running kernel: {0}")]
    Kaslr(String),
    /// The symbol source belongs to another kernel.
    #[error("the symbol source does not match the running kernel: {0}")]
    Mismatch(String),
    /// Guest data that no sane kernel produces (a cycle, an absurd count).
    #[error("guest data is inconsistent: {0}")]
    Corrupt(String),
}

/// Result alias for introspection requests.
pub type Result<T> = std::result::Result<T, IntrospectError>;
