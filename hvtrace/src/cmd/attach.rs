//! `hvtrace attach`: trace processes of a running VM through its control
//! socket until they exit; Ctrl-C (or killing this client) detaches.
//!
//! Several `-p` (or `-p 12,34`, as strace takes them) open one control
//! connection per process, each its own attach request, read by a thread
//! of its own; one printer renders every connection's events in the
//! order they arrive. A process that cannot be attached to is reported
//! and the others are traced, as strace does; only when none can be is
//! it a failure.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;

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
    /// Process to trace (all its threads); repeat it, or list several
    /// separated by commas or blanks, to trace several processes.
    #[arg(short = 'p', long = "pid", required = true, value_parser = parse_pids, action = clap::ArgAction::Append)]
    pub pids: Vec<Vec<i32>>,
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

/// `-p`'s value: one process id or several separated by commas or blanks
/// (strace's `-p "12 34"`).
fn parse_pids(s: &str) -> Result<Vec<i32>, String> {
    let pids: Vec<i32> = s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<i32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("invalid process id: '{p}'")),
        })
        .collect::<Result<_, _>>()?;
    if pids.is_empty() {
        return Err(format!("invalid process id: '{s}'"));
    }
    Ok(pids)
}

impl AttachArgs {
    /// The processes asked for, each once, in the order given.
    fn processes(&self) -> Vec<i32> {
        let mut out: Vec<i32> = Vec::new();
        for &p in self.pids.iter().flatten() {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// Prints events as JSON lines, or as strace's text (the same renderer
/// `hvtrace trace` uses), and hands them to the sink if there is one.
struct Printer {
    /// The process attached to (step lines of its children are
    /// prefixed); None with several processes (every step line is).
    pid: Option<i32>,
    out: Box<dyn Write + Send>,
    text: Option<TextRenderer>,
    sink: Option<Sink>,
}

impl Printer {
    fn event(&mut self, e: &Value) -> Result<()> {
        if e["event"] == "step" {
            // An instruction (or block) line of the steps engine.
            match (&self.text, e["line"].as_str(), e["pid"].as_i64()) {
                (Some(_), Some(line), Some(pid)) if self.pid.map(i64::from) != Some(pid) => {
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

/// Attaches to every process asked for and prints events until they have
/// all exited; returns 0.
pub fn attach(args: AttachArgs) -> Result<i32> {
    let exprs = parse_exprs(&args.expr)?;
    if !exprs.tamper.is_empty() {
        bail!("-e inject=/fault= work with `hvtrace trace` only (not yet over the control socket)");
    }
    if args.steps.summary || args.steps.quiet_steps {
        bail!(
            "--summary works with `hvtrace trace --steps` only (not yet over the control socket)"
        );
    }
    let pids = args.processes();
    let request = |pid| Request {
        v: PROTOCOL_VERSION,
        id: Some(1),
        op: Op::Attach {
            pid,
            follow: args.follow,
            trace: exprs.only.as_ref().map(|s| vec![s.spec().to_string()]),
            signal: exprs.signals.as_ref().map(|s| s.spec().to_string()),
            decode_fds: args.lines.decode_fds,
            status: args.lines.status_spec(exprs.status.clone()),
            string_limit: Some(args.string_limit),
            entries: !args.json,
            steps: args
                .steps
                .steps
                .then(|| if args.steps.blocks { "block" } else { "single" }.to_string()),
            intel: args.steps.intel,
        },
    };
    let requests: Vec<(i32, Request)> = pids.iter().map(|&p| (p, request(p))).collect();
    let out = open_output(args.output.as_deref())?;
    let mut printer = Printer {
        pid: (pids.len() == 1).then(|| pids[0]),
        out,
        text: (!args.json).then(|| {
            TextRenderer::new(args.stamps.stamp()).with_quiet_exits(args.lines.quiet >= 2)
        }),
        sink: args.sink.start()?,
    };
    let result = follow(&args, requests, &mut printer);
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

/// What a connection's reader thread tells the printer.
enum News {
    /// The VM accepted the attach request: the threads now traced.
    Attached { pid: i32, tids: Vec<i32> },
    /// An event of the process (or its followed children).
    Event(Value),
    /// The connection ended: Ok once the process exited, else why it
    /// ended first (the request refused, the VM gone).
    Ended(Result<()>),
}

/// Sends the attach requests, one connection each, and prints the events
/// until every process attached to has exited.
fn follow(args: &AttachArgs, requests: Vec<(i32, Request)>, printer: &mut Printer) -> Result<i32> {
    let several = requests.len() > 1;
    let (tx, rx) = mpsc::channel();
    for (pid, req) in requests {
        let sock = UnixStream::connect(&args.api_sock)
            .with_context(|| format!("cannot connect to {}", args.api_sock.display()))?;
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("attach-{pid}"))
            .spawn(move || {
                let outcome = read_connection(sock, pid, &req, &tx);
                let _ = tx.send(News::Ended(outcome));
            })
            .context("cannot start a connection thread")?;
    }
    drop(tx);
    let (mut attached, mut failures) = (0usize, Vec::new());
    // Every reader ends with `Ended`; the channel closes after the last.
    for news in rx {
        match news {
            News::Attached { pid, tids } => {
                attached += 1;
                if let Some(text) = &mut printer.text {
                    // strace prefixes lines with `[pid N]` as soon as it
                    // traces more than one thread.
                    text.note_threads(tids.iter().copied());
                }
                if args.lines.quiet == 0 {
                    let tids: Vec<String> = tids.iter().map(i32::to_string).collect();
                    eprintln!(
                        "hvtrace: attached to process {pid} (threads {})",
                        tids.join(" ")
                    );
                }
            }
            News::Event(e) => printer.event(&e)?,
            News::Ended(Ok(())) => {}
            News::Ended(Err(e)) => {
                if several {
                    // The others go on: say so now, fail at the end only if
                    // nothing could be traced.
                    eprintln!("hvtrace: {e:#}");
                }
                failures.push(e);
            }
        }
    }
    match failures.into_iter().next() {
        Some(e) if !several || attached == 0 => Err(e),
        _ => Ok(0),
    }
}

/// Reads one attach connection to its end, handing the reply and the
/// events on; Ok once the process `pid` has exited.
fn read_connection(
    mut sock: UnixStream,
    pid: i32,
    req: &Request,
    tx: &mpsc::Sender<News>,
) -> Result<()> {
    writeln!(sock, "{}", serde_json::to_string(req)?)?;
    let mut attached = false;
    for line in BufReader::new(&sock).lines() {
        let line = line.context("reading the control socket")?;
        let mut v: Value = serde_json::from_str(&line)
            .with_context(|| format!("bad line from the VM: {line:?}"))?;
        if let Some(e) = v.get_mut("event").map(Value::take) {
            let leader_gone = e["pid"].as_i64() == Some(i64::from(pid))
                && matches!(e["event"].as_str(), Some("exit" | "killed"));
            // A printer that has gone (it failed writing) ends this reader.
            if tx.send(News::Event(e)).is_err() || leader_gone {
                return Ok(());
            }
            continue;
        }
        if v.get("ok").is_some() && !attached {
            if v["ok"] != Value::Bool(true) {
                bail!(
                    "cannot attach to {pid}: {}",
                    v["error"].as_str().unwrap_or("request failed")
                );
            }
            attached = true;
            let tids = v["tids"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_i64().and_then(|t| i32::try_from(t).ok()))
                        .collect()
                })
                .unwrap_or_default();
            let _ = tx.send(News::Attached { pid, tids });
        }
    }
    if attached {
        bail!("the VM closed the connection before process {pid} exited")
    }
    bail!("the VM closed the connection without answering")
}
