//! `hvtrace snapshot`: ask a running VM to save itself.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::api::{client, Op};

/// Arguments of `hvtrace snapshot`.
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// Control socket of the VM.
    #[arg(long)]
    pub api_sock: PathBuf,
    /// Snapshot file to write.
    #[arg(short, long)]
    pub output: PathBuf,
}

/// Sends the request and reports the size written.
pub fn snapshot(args: SnapshotArgs) -> Result<i32> {
    let out = std::path::absolute(&args.output)?;
    let reply = client::call(
        &args.api_sock,
        Op::Snapshot {
            path: out.display().to_string(),
        },
    )?;
    eprintln!(
        "hvtrace: wrote {} ({} bytes)",
        out.display(),
        reply["bytes"]
    );
    Ok(0)
}
