//! One module per subcommand.

pub mod attach;
pub mod boot;
pub mod cached;
pub mod ps;
pub mod run;
pub mod sites;
pub mod snapshot;
pub mod symbols;
pub mod trace;
