//! `hvtrace cached-snapshot`: where the snapshot cache keeps a guest.

use anyhow::{bail, Result};
use clap::Args;
use vmm::kvm_kind::KvmKind;

use crate::cmd::run::GuestArgs;
use crate::snapcache;

/// Arguments of `hvtrace cached-snapshot`.
#[derive(Args, Debug)]
pub struct CachedArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
}

/// Prints the path of the cached snapshot of this guest definition; fails
/// if `hvtrace run` has not cached it yet.
pub fn cached(args: CachedArgs) -> Result<i32> {
    let config = args.guest.config()?;
    let path = snapcache::path(&snapcache::key(&config, KvmKind::detect())?);
    if !path.exists() {
        bail!(
            "no cached snapshot for this guest yet (expected at {}); `hvtrace run` makes it",
            path.display()
        );
    }
    println!("{}", path.display());
    Ok(0)
}
