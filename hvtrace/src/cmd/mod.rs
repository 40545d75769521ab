//! One module per subcommand.

pub mod boot;
pub mod cached;
pub mod run;
pub mod snapshot;
