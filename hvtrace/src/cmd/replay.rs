//! `hvtrace sink-replay`: publish what a sink could not deliver before its
//! trace ended (the spill file it kept, `docs/sink.md`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::sink::config::SinkConfig;
use crate::sink::nats;

/// Arguments of `hvtrace sink-replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The sink to publish to (the trace's `--sink` URL).
    #[arg(long, value_name = "URL")]
    pub sink: String,
    /// The spill file hvtrace named when it kept undelivered events.
    pub file: PathBuf,
}

/// Publishes the file's events and removes it; returns 0.
pub fn replay(args: ReplayArgs) -> Result<i32> {
    let cfg = SinkConfig::parse(&args.sink)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (acked, duplicates) = rt.block_on(async {
        let conn = nats::connect(&cfg).await?;
        nats::ensure_stream(&conn, &cfg).await?;
        nats::publish_file(&conn, &args.file).await
    })?;
    std::fs::remove_file(&args.file)
        .with_context(|| format!("published, but cannot remove {}", args.file.display()))?;
    eprintln!(
        "hvtrace: {acked} events published to {} ({duplicates} of them were there already); {} removed",
        cfg.url,
        args.file.display()
    );
    Ok(0)
}
