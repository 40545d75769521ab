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
    /// Stop threads asleep in interruptible calls (read, nanosleep, poll,
    /// wait4, ...) at once; their calls restart when they continue, and the
    /// program sees no EINTR.
    #[arg(long)]
    pub interrupt: bool,
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
            interrupt: args.interrupt,
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
            signal: None,
        },
    )?;
    if args.json {
        println!("{reply}");
    } else {
        println!("continued: {}", ids(&reply["released"]));
    }
    Ok(0)
}

/// Arguments of `hvtrace signal`.
#[derive(Args, Debug)]
pub struct SignalArgs {
    /// Control socket of the VM.
    #[arg(long)]
    pub api_sock: PathBuf,
    #[command(flatten)]
    pub who: Who,
    /// The signal: a name (`USR1`, `SIGUSR1`) or a number.
    #[arg(short = 's', long = "signal", value_parser = parse_signal)]
    pub signal: i32,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A signal given by name (with or without `SIG`) or number.
fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{n} is not a signal number (1-64)"))
        };
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    (1..=64)
        .find(|&n| utrace::syscalls::format::signal_name(n) == format!("SIG{name}"))
        .ok_or_else(|| format!("`{s}` is not a signal name (USR1, TERM, ...) or number"))
}

/// Sends a guest thread (a process's main thread) a signal from outside;
/// exit status 1 if it did not take it within two seconds.
pub fn signal(args: SignalArgs) -> Result<i32> {
    let reply = client::call(
        &args.api_sock,
        Op::Signal {
            pid: args.who.pid,
            tid: args.who.tid,
            signal: args.signal,
        },
    )?;
    if args.json {
        println!("{reply}");
        return Ok(0);
    }
    let sent: Vec<&Value> = reply["reported"].as_array().into_iter().flatten().collect();
    for r in &sent {
        println!(
            "{} sent to thread {} after {:.1} ms",
            utrace::syscalls::format::signal_name(args.signal),
            r[0],
            r[1].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(if sent.is_empty() { 1 } else { 0 })
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

/// Arguments of `hvtrace regs`.
#[derive(Args, Debug)]
pub struct RegsArgs {
    /// Control socket of the VM.
    #[arg(long)]
    pub api_sock: PathBuf,
    /// The thread (stopped by `hvtrace stop`).
    #[arg(short = 't', long = "tid")]
    pub tid: i32,
    /// Set a register first: NAME=VALUE (`ip=0x401000`, `ax=-1`,
    /// `fs_base=0x4c6380`); names as printed, plus `fs_base` and `gs_base`.
    /// Repeatable; all are checked before any is set. The FPU/SSE
    /// registers are read only.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Prints (and sets) a stopped thread's user registers.
pub fn regs(args: RegsArgs) -> Result<i32> {
    let mut set = std::collections::BTreeMap::new();
    for s in &args.set {
        let Some((name, value)) = s.split_once('=') else {
            anyhow::bail!("--set {s}: want NAME=VALUE");
        };
        set.insert(
            name.trim().to_string(),
            Value::String(value.trim().to_string()),
        );
    }
    let reply = client::call(
        &args.api_sock,
        Op::Regs {
            tid: args.tid,
            set: (!set.is_empty()).then_some(set),
        },
    )?;
    if args.json {
        println!("{reply}");
        return Ok(0);
    }
    if let Some(regs) = reply["regs"].as_object() {
        for (name, v) in regs {
            println!("{name:<8} {}", v.as_str().unwrap_or("?"));
        }
    }
    for base in ["fs_base", "gs_base"] {
        if let Some(v) = reply[base].as_str() {
            println!("{base:<8} {v}");
        }
    }
    if let Some(fpu) = reply["fpu"].as_object() {
        let mut names: Vec<&String> = fpu.keys().collect();
        // fcw fsw mxcsr, then xmm0..xmm15 in order.
        names.sort_by_key(|n| {
            (
                n.starts_with("xmm"),
                n.trim_start_matches("xmm").parse::<u32>().unwrap_or(0),
            )
        });
        for name in names {
            println!("{name:<8} {}", fpu[name].as_str().unwrap_or("?"));
        }
    }
    Ok(0)
}

/// Arguments of `hvtrace step`.
#[derive(Args, Debug)]
pub struct StepArgs {
    /// Control socket of the VM.
    #[arg(long)]
    pub api_sock: PathBuf,
    /// The thread (stopped by `hvtrace stop`).
    #[arg(short = 't', long = "tid")]
    pub tid: i32,
    /// Steps to make.
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    pub count: u64,
    /// Step blocks (to the next taken branch; emulated) instead of
    /// single instructions.
    #[arg(long)]
    pub blocks: bool,
    /// Print the reply (registers included) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Steps a stopped thread and leaves it stopped.
pub fn step(args: StepArgs) -> Result<i32> {
    let reply = client::call(
        &args.api_sock,
        Op::Step {
            tid: args.tid,
            count: Some(args.count),
            blocks: args.blocks,
        },
    )?;
    if args.json {
        println!("{reply}");
    } else {
        println!(
            "thread {} stepped {} {} in {:.1} ms, now at {}",
            args.tid,
            reply["steps"],
            if args.blocks {
                "block(s)"
            } else {
                "instruction(s)"
            },
            reply["ms"].as_f64().unwrap_or(f64::NAN),
            reply["ip"].as_str().unwrap_or("?")
        );
    }
    Ok(0)
}

/// Arguments of `hvtrace mem`.
#[derive(Args, Debug)]
pub struct MemArgs {
    /// Control socket of the VM.
    #[arg(long)]
    pub api_sock: PathBuf,
    /// The process.
    #[arg(short = 'p', long = "pid")]
    pub pid: i32,
    /// User address (hex with 0x, or decimal).
    pub addr: String,
    /// Bytes to read (not with --write).
    pub len: Option<usize>,
    /// Write these bytes (hex) instead of reading.
    #[arg(long, value_name = "HEXBYTES", conflicts_with = "len")]
    pub write: Option<String>,
    /// Print the bytes read raw, not as a hex dump.
    #[arg(long)]
    pub raw: bool,
}

/// Dumps (or writes) a guest process's memory.
pub fn mem(args: MemArgs) -> Result<i32> {
    if args.len.is_none() && args.write.is_none() {
        anyhow::bail!("give LEN to read, or --write HEXBYTES");
    }
    let reply = client::call(
        &args.api_sock,
        Op::Mem {
            pid: args.pid,
            addr: Value::String(args.addr.clone()),
            len: args.len,
            write: args.write.clone(),
        },
    )?;
    let hex = reply["data"].as_str().unwrap_or("");
    let bytes = crate::api::handler::parse_hex(hex).map_err(anyhow::Error::msg)?;
    let addr = u64::from_str_radix(
        reply["addr"]
            .as_str()
            .unwrap_or("0x0")
            .trim_start_matches("0x"),
        16,
    )?;
    if args.write.is_some() {
        println!("wrote {} bytes at {addr:#x}", bytes.len());
    } else if args.raw {
        use std::io::Write;
        std::io::stdout().write_all(&bytes)?;
    } else {
        print!("{}", hexdump(addr, &bytes));
    }
    Ok(0)
}

/// `xxd`-style lines: address, 16 bytes in hex, the printable ones.
fn hexdump(addr: u64, bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = line
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out += &format!(
            "{:016x}  {:<47}  {text}\n",
            addr + 16 * i as u64,
            hex.join(" ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn hexdump_shows_address_bytes_and_text() {
        let d = super::hexdump(0x1000, b"hello, world\n\x00\x01\x02xyz");
        assert_eq!(
            d,
            "0000000000001000  68 65 6c 6c 6f 2c 20 77 6f 72 6c 64 0a 00 01 02  hello, world....\n\
             0000000000001010  78 79 7a                                         xyz\n"
        );
    }
}
