//! `hvtrace attach`: trace a process of a running VM through its control
//! socket until it exits; Ctrl-C (or killing this client) detaches.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::parse_string_limit;
use serde_json::Value;
use utrace::strace::text::TextRenderer;
use utrace::strace::Emitted;

use crate::api::{Op, Request, PROTOCOL_VERSION};
use crate::cmd::trace::{open_output, parse_exprs, StepsArgs};
use crate::sink::{Sink, SinkArgs};

/// Arguments of `hvtrace attach`.
#[derive(Args, Debug)]
pub struct AttachArgs {
    /// Control socket of the VM (`hvtrace boot` or `hvtrace run --api-sock`).
    #[arg(long)]
    pub api_sock: PathBuf,
    /// Process to trace (all its threads).
    #[arg(short = 'p', long = "pid")]
    pub pid: i32,
    /// Follow new children and threads (`strace -f`).
    #[arg(short = 'f', long = "follow")]
    pub follow: bool,
    /// Which calls to show, as strace's `-e trace=`: names, numbers,
    /// `%file`/`%process`/`%network`/..., `/REGEX`, `?` before an item that
    /// may match nothing, `!` in front to invert (or just `openat,read`);
    /// `signal=SET` chooses the signals shown (`!SIGCHLD`, `none`),
    /// `status=SET` the call endings (`failed`, `!successful`).
    #[arg(short = 'e', value_name = "EXPR")]
    pub expr: Vec<String>,
    #[command(flatten)]
    pub lines: super::LineArgs,
    /// Longest string shown (`strace -s`), at most 1048576.
    #[arg(short = 's', default_value_t = 32, value_parser = parse_string_limit)]
    pub string_limit: usize,
    #[command(flatten)]
    pub stamps: super::StampArgs,
    /// One JSON object per event instead of strace lines.
    #[arg(long)]
    pub json: bool,
    /// Write the trace to FILE instead of stderr.
    #[arg(short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// With --sink: print the events published, resent, spilled and
    /// dropped as one JSON line on stderr at the end.
    #[arg(long, requires = "sink")]
    pub report: bool,
    #[command(flatten)]
    pub sink: SinkArgs,
    #[command(flatten)]
    pub steps: StepsArgs,
}

/// Prints events as JSON lines, or as strace's text (the same renderer
/// `hvtrace trace` uses), and hands them to the sink if there is one.
struct Printer {
    /// The process attached to.
    pid: i32,
    out: Box<dyn Write + Send>,
    text: Option<TextRenderer>,
    sink: Option<Sink>,
}

impl Printer {
    fn event(&mut self, e: &Value) -> Result<()> {
        if e["event"] == "step" {
            // An instruction (or block) line of the steps engine.
            match (&self.text, e["line"].as_str(), e["pid"].as_i64()) {
                (Some(_), Some(line), Some(pid)) if pid != i64::from(self.pid) => {
                    writeln!(self.out, "[pid {pid}] {line}")?
                }
                (Some(_), Some(line), _) => writeln!(self.out, "{line}")?,
                _ => writeln!(self.out, "{e}")?,
            }
            self.out.flush()?;
            return Ok(());
        }
        if e["event"] == "lost" && self.text.is_some() {
            // The VM's queue for this client overflowed (it read too slowly).
            let n = e["count"].as_u64().unwrap_or(0);
            writeln!(self.out, "+++ {n} events lost +++")?;
            self.out.flush()?;
            return Ok(());
        }
        let malformed = || format!("malformed event from the VM: {e}");
        let emitted = match (&self.text, &self.sink) {
            (None, None) => None,
            _ => Some(Emitted::from_json(e).with_context(malformed)?),
        };
        match (&mut self.text, &emitted) {
            (Some(r), Some(em)) => write!(self.out, "{}", r.render(&em.record))?,
            _ => writeln!(self.out, "{e}")?,
        }
        self.out.flush()?;
        if let (Some(sink), Some(em)) = (&self.sink, emitted) {
            sink.feed().push(em);
        }
        Ok(())
    }
}

/// Attaches and prints events until the process exits; returns 0.
pub fn attach(args: AttachArgs) -> Result<i32> {
    let exprs = parse_exprs(&args.expr)?;
    if !exprs.tamper.is_empty() {
        bail!("-e inject=/fault= work with `hvtrace trace` only (not yet over the control socket)");
    }
    let only = exprs.only.map(|s| s.spec().to_string());
    let signals = exprs.signals.map(|s| s.spec().to_string());
    let status = args.lines.status_spec(exprs.status);
    let out = open_output(args.output.as_deref())?;
    if args.steps.summary || args.steps.quiet_steps {
        bail!(
            "--summary works with `hvtrace trace --steps` only (not yet over the control socket)"
        );
    }
    let mut printer = Printer {
        pid: args.pid,
        out,
        text: (!args.json).then(|| {
            TextRenderer::new(args.stamps.stamp()).with_quiet_exits(args.lines.quiet >= 2)
        }),
        sink: args.sink.start()?,
    };
    let result = follow(&args, only, signals, status, &mut printer);
    if let Some(sink) = printer.sink.take() {
        let report = sink.finish();
        if args.report {
            let mut r = serde_json::json!({});
            report.add_to(&mut r);
            eprintln!("hvtrace-report {r}");
        }
    }
    result
}

/// Sends the attach request and prints the events until the process exits.
fn follow(
    args: &AttachArgs,
    only: Option<String>,
    signals: Option<String>,
    status: Option<String>,
    printer: &mut Printer,
) -> Result<i32> {
    let mut sock = UnixStream::connect(&args.api_sock)
        .with_context(|| format!("cannot connect to {}", args.api_sock.display()))?;
    let req = Request {
        v: PROTOCOL_VERSION,
        id: Some(1),
        op: Op::Attach {
            pid: args.pid,
            follow: args.follow,
            trace: only.map(|s| vec![s]),
            signal: signals,
            decode_fds: args.lines.decode_fds,
            status,
            string_limit: Some(args.string_limit),
            entries: !args.json,
            steps: args
                .steps
                .steps
                .then(|| if args.steps.blocks { "block" } else { "single" }.to_string()),
            intel: args.steps.intel,
        },
    };
    writeln!(sock, "{}", serde_json::to_string(&req)?)?;
    let mut attached = false;
    for line in BufReader::new(&sock).lines() {
        let line = line.context("reading the control socket")?;
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("bad line from the VM: {line:?}"))?;
        if let Some(e) = v.get("event") {
            printer.event(e)?;
            let leader_gone = e["pid"].as_i64() == Some(i64::from(args.pid))
                && matches!(e["event"].as_str(), Some("exit" | "killed"));
            if leader_gone {
                return Ok(0);
            }
            continue;
        }
        if v.get("ok").is_some() && !attached {
            if v["ok"] != Value::Bool(true) {
                bail!(
                    "cannot attach to {}: {}",
                    args.pid,
                    v["error"].as_str().unwrap_or("request failed")
                );
            }
            attached = true;
            let tids: Vec<String> = v["tids"]
                .as_array()
                .map(|a| a.iter().map(|t| t.to_string()).collect())
                .unwrap_or_default();
            if args.lines.quiet == 0 {
                eprintln!(
                    "hvtrace: attached to process {} (threads {})",
                    args.pid,
                    tids.join(" ")
                );
            }
        }
    }
    if attached {
        bail!(
            "the VM closed the connection before process {} exited",
            args.pid
        )
    }
    bail!("the VM closed the connection without answering")
}
