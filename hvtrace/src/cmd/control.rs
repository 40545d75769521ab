//! `hvtrace stop`, `hvtrace cont` and `hvtrace interrupt`: utrace's STOP,
//! its release, and INTERRUPT, applied to a process (every thread) or one
//! thread of a running VM through its control socket. A stop lasts after
//! `stop` returns, until `cont`, a SIGKILL inside the guest, or the VM's
//! end.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::Value;

use crate::api::{client, Op};

/// Which threads a control command applies to.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct Who {
    /// Every thread of this process.
    #[arg(short = 'p', long = "pid")]
    pub pid: Option<i32>,
    /// This thread only.
    #[arg(short = 't', long = "tid")]
    pub tid: Option<i32>,
}

/// Arguments of `hvtrace stop`.
#[derive(Args, Debug)]
pub struct StopArgs {
    /// Control socket of the VM (`hvtrace boot` or `hvtrace run --api-sock`).
    #[arg(long)]
    pub api_sock: PathBuf,
    #[command(flatten)]
    pub who: Who,
    /// Longest wait, in milliseconds, for the threads to be stopped (a
    /// thread blocked in a system call stops when the call returns).
    #[arg(long, default_value_t = 2000)]
    pub wait_ms: u64,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hvtrace cont` and `hvtrace interrupt`.
#[derive(Args, Debug)]
pub struct ContArgs {
    /// Control socket of the VM.
    #[arg(long)]
    pub api_sock: PathBuf,
    #[command(flatten)]
    pub who: Who,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

fn ids(v: &Value) -> String {
    let list: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| t.to_string())
        .collect();
    list.join(" ")
}

/// Holds the threads stopped; exit status 0 once all are stopped, 1 if
/// some are still in a system call when the wait ends (they stop when it
/// returns).
pub fn stop(args: StopArgs) -> Result<i32> {
    let reply = client::call(
        &args.api_sock,
        Op::Stop {
            pid: args.who.pid,
            tid: args.who.tid,
            wait_ms: Some(args.wait_ms),
            until_close: false,
        },
    )?;
    if args.json {
        println!("{reply}");
    } else {
        println!("stopped: {}", ids(&reply["stopped"]));
        if reply["pending"].as_array().is_some_and(|p| !p.is_empty()) {
            println!(
                "pending: {} (in a system call: stops when it returns to user mode)",
                ids(&reply["pending"])
            );
        }
    }
    let all = reply["pending"].as_array().is_none_or(|p| p.is_empty());
    Ok(if all { 0 } else { 1 })
}

/// Releases the stops `hvtrace stop` set.
pub fn cont(args: ContArgs) -> Result<i32> {
    let reply = client::call(
        &args.api_sock,
        Op::Cont {
            pid: args.who.pid,
            tid: args.who.tid,
        },
    )?;
    if args.json {
        println!("{reply}");
    } else {
        println!("continued: {}", ids(&reply["released"]));
    }
    Ok(0)
}

/// INTERRUPT: wakes the threads from interruptible sleeps and waits for
/// each to report; exit status 1 if some did not report in time.
pub fn interrupt(args: ContArgs) -> Result<i32> {
    let reply = client::call(
        &args.api_sock,
        Op::Interrupt {
            pid: args.who.pid,
            tid: args.who.tid,
            wait_ms: None,
        },
    )?;
    if args.json {
        println!("{reply}");
    } else {
        for r in reply["reported"].as_array().into_iter().flatten() {
            println!(
                "thread {} reported after {:.1} ms",
                r[0],
                r[1].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    let n = |k: &str| reply[k].as_array().map_or(0, Vec::len);
    Ok(if n("reported") == n("tids") { 0 } else { 1 })
}
