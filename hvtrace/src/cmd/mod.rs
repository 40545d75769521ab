//! One module per subcommand.

pub mod boot;
pub mod run;
pub mod snapshot;
