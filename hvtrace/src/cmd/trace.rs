//! `hvtrace trace`: boot the guest (or restore its cached snapshot), trace
//! one command from its exec, strace-like, and exit with its status.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

use super::parse_string_limit;
use guest_introspect::image::KernelInfo;
use utrace::hv::{EngineSpec, Tracer};
use utrace::strace::select::{CallSet, SignalSet, StatusSet};
use utrace::strace::tamper::Tamper;
use utrace::strace::{Strace, StraceOptions, STRACE_EVENTS};
use vmm::session::Session;

use crate::cmd::run::{open_guest, GuestArgs};
use crate::introspect::{self, InfoPreload};
use crate::sink::SinkArgs;

/// Arguments of `hvtrace trace`.
#[derive(Args, Debug)]
pub struct TraceArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Boot afresh instead of restoring (and refreshing) the cached snapshot.
    #[arg(long)]
    pub no_cache: bool,
    /// Restore this snapshot instead of booting.
    #[arg(long, conflicts_with_all = ["no_cache"])]
    pub restore: Option<PathBuf>,
    /// Follow children and threads (`strace -f`); given twice (`-ff`)
    /// with `-o PREFIX`, each thread's trace goes to `PREFIX.TID`.
    #[arg(short = 'f', long = "follow", action = clap::ArgAction::Count)]
    pub follow: u8,
    /// Which calls to show, as strace's `-e trace=`: names, numbers,
    /// `%file`/`%process`/`%network`/`%signal`/`%desc`/`%memory`/..., `/REGEX`,
    /// `?` before an item that may match nothing, `!` in front to invert
    /// (or just `openat,read`); `signal=SET` the signals shown (`!SIGCHLD`,
    /// `none`); `status=SET` the call endings shown (`failed`, `!successful`,
    /// `unfinished`); `inject=SET:error=ERRNO|retval=N[:signal=SIG][:when=EXPR]` and
    /// `fault=SET[:error=ERRNO][:when=EXPR]` make the chosen invocations
    /// fail or return N without running, and/or send the thread SIG at
    /// their entry, as strace's do (`when=` is `first[..last][+[step]]`).
    #[arg(short = 'e', value_name = "EXPR")]
    pub expr: Vec<String>,
    /// Longest string shown (`strace -s`), at most 1048576.
    #[arg(short = 's', default_value_t = 32, value_parser = parse_string_limit)]
    pub string_limit: usize,
    /// Show the time spent in each call (`strace -T`).
    #[arg(short = 'T')]
    pub timing: bool,
    #[command(flatten)]
    pub lines: super::LineArgs,
    /// Count calls, errors and time per system call and print strace's
    /// table at the end instead of the trace (`strace -c`; the time is
    /// wall-clock, as strace's `-w`).
    #[arg(short = 'c', conflicts_with_all = ["summary_too", "json"])]
    pub count: bool,
    /// Like -c, with the trace printed too (`strace -C`).
    #[arg(short = 'C', conflicts_with = "json")]
    pub summary_too: bool,
    /// Order of the -c/-C table: time (default), calls, errors, name,
    /// nothing (`strace -S`).
    #[arg(short = 'S', value_name = "SORTBY", default_value = "time")]
    pub sort_by: utrace::strace::summary::SortBy,
    #[command(flatten)]
    pub stamps: super::StampArgs,
    /// One JSON object per event instead of strace lines.
    #[arg(long)]
    pub json: bool,
    /// Write the trace to FILE instead of stderr.
    #[arg(short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print the session's and the tracer's figures (traps, VM exits per
    /// trap, handler time per trap; with --sink the events published,
    /// resent, spilled and dropped) as one JSON line on stderr at the end.
    #[arg(long)]
    pub report: bool,
    #[command(flatten)]
    pub sink: SinkArgs,
    #[command(flatten)]
    pub steps: StepsArgs,
    /// The command to trace in the guest.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<String>,
}

/// The instruction tracer's options (`trace` and `attach`).
#[derive(Args, Debug, Clone, Default)]
pub struct StepsArgs {
    /// Also print every user-mode instruction the traced threads run, one
    /// line each, in each thread's order: its address, <symbol+offset>
    /// from the program's own ELF (read from the guest image on the host)
    /// and its disassembly (AT&T like objdump). The threads single-step
    /// through the guest's own trap flag; system-call lines interleave.
    #[arg(long)]
    pub steps: bool,
    /// With --steps: one line per block instead, a block ending at a taken
    /// branch (its line shows the branch's target), a system call or a
    /// signal handler's entry. Block-stepping is emulated: the threads
    /// single-step and only taken branches are reported (the processor's
    /// DEBUGCTL.BTF is not available to guests here).
    #[arg(long, requires = "steps")]
    pub blocks: bool,
    /// With --steps: print the totals and a per-function histogram of
    /// instructions and blocks at the end.
    #[arg(long, requires = "steps")]
    pub summary: bool,
    /// With --steps: Intel syntax instead of AT&T.
    #[arg(long, requires = "steps")]
    pub intel: bool,
    /// With --summary: no instruction lines, only the summary.
    #[arg(long, requires = "summary")]
    pub quiet_steps: bool,
}

impl StepsArgs {
    /// The steps engine these options ask for (None without --steps),
    /// printing to `out` and naming functions from the files of the
    /// guest image `images`.
    pub fn engine(
        &self,
        out: utrace::steps::SharedOut,
        images: &[PathBuf],
    ) -> Option<Arc<utrace::steps::Steps>> {
        if !self.steps {
            return None;
        }
        let opts = utrace::steps::StepsOptions {
            blocks: self.blocks,
            summary: self.summary,
            syntax: if self.intel {
                utrace::steps::Syntax::Intel
            } else {
                utrace::steps::Syntax::Att
            },
            quiet: self.quiet_steps,
            json: false,
        };
        let symbols = Arc::new(crate::guestfiles::ImageSymbols::open(images));
        Some(Arc::new(utrace::steps::Steps::new(opts, out.0, symbols)))
    }
}

/// The guest image files of `guest` (its --initrd, or the default image).
pub fn image_files(guest: &GuestArgs) -> Vec<PathBuf> {
    image_files_of(&guest.initrd)
}

/// The guest image files: `initrd`, or the default image if empty.
pub fn image_files_of(initrd: &[PathBuf]) -> Vec<PathBuf> {
    if initrd.is_empty() {
        crate::artifacts::default_image().into_iter().collect()
    } else {
        initrd.to_vec()
    }
}

/// What the `-e` expressions ask for.
#[derive(Debug, Default)]
pub struct Exprs {
    /// `trace=`: the calls shown (None: all), still to be checked against
    /// the guest kernel's calls.
    pub only: Option<CallSet>,
    /// `signal=`: the signals shown (None: all).
    pub signals: Option<SignalSet>,
    /// `status=`: the call endings shown, as written (checked; None: all).
    pub status: Option<String>,
    /// `inject=` and `fault=`: calls to tamper with.
    pub tamper: Vec<Tamper>,
}

/// Parses `-e` expressions: `trace=SET` (or `t=SET`, or just `SET`; a
/// later one replaces an earlier one, as in strace), `signal=SET` (or
/// `signals=`, `s=`), `status=SET`, `inject=SET:error=E|retval=N[:when=W]` and
/// `fault=SET[:error=E][:when=W]`. The set syntax is strace's
/// (`utrace::strace::select`).
pub fn parse_exprs(exprs: &[String]) -> Result<Exprs> {
    let mut out = Exprs::default();
    for e in exprs {
        let set = match e.split_once('=') {
            Some(("trace" | "t", set)) => set,
            Some(("signal" | "signals" | "s", set)) => {
                out.signals = Some(SignalSet::parse(set).map_err(|m| anyhow!("-e {e}: {m}"))?);
                continue;
            }
            Some(("status", set)) => {
                StatusSet::parse(set).map_err(|m| anyhow!("-e {e}: {m}"))?;
                out.status = Some(set.to_string());
                continue;
            }
            Some((q @ ("inject" | "fault"), spec)) => {
                let t = Tamper::parse(spec, q == "fault").map_err(anyhow::Error::msg)?;
                out.tamper.push(t);
                continue;
            }
            Some((q, _)) => bail!(
                "unsupported -e qualifier `{q}` (trace=, signal=, status=, inject= and fault= are supported)"
            ),
            None => e.as_str(),
        };
        out.only = Some(CallSet::parse(set).map_err(|m| anyhow!("-e {e}: {m}"))?);
    }
    Ok(out)
}

/// Refuses tampering with a call the guest kernel does not have.
fn check_tampered_calls(
    tamper: &[Tamper],
    syscalls: &utrace::syscalls::SyscallTable,
) -> Result<()> {
    for t in tamper {
        let mut names: Vec<&String> = t.calls.iter().collect();
        names.sort();
        if let Some(n) = names.into_iter().find(|n| syscalls.number(n).is_none()) {
            bail!("-e inject/fault: the guest kernel has no system call `{n}`");
        }
    }
    Ok(())
}

/// `-ff -o PREFIX`: each thread's trace in `PREFIX.TID`, as strace names
/// them (created afresh; a file that cannot be created is reported, and
/// that thread's lines are dropped, the others go on).
fn thread_files(prefix: PathBuf) -> utrace::strace::ThreadOutputs {
    Box::new(move |tid| {
        let mut name = prefix.clone().into_os_string();
        name.push(format!(".{tid}"));
        let file = std::fs::File::create(&name)?;
        Ok(Box::new(file) as Box<dyn Write + Send>)
    })
}

/// Where the trace goes.
pub fn open_output(path: Option<&std::path::Path>) -> Result<Box<dyn Write + Send>> {
    Ok(match path {
        Some(p) => Box::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => Box::new(std::io::stderr()),
    })
}

/// The traced guest's kernel information: from the kernel file hvtrace
/// booted (loading since `preload` started), or (for a snapshot of unknown
/// origin) from guest memory.
fn kernel_info(
    session: &Session,
    guest: &GuestArgs,
    preload: Option<InfoPreload>,
    from_memory: bool,
) -> Result<KernelInfo> {
    if let Some(loading) = preload {
        return loading.wait();
    }
    if !from_memory {
        return introspect::info_from_files(&guest.config()?.kernel, None);
    }
    let vm = session.vm();
    vm.pause_all()?;
    let info = (|| -> Result<KernelInfo> {
        let view = vm.vcpu_sregs(0)?.view;
        introspect::load_info(&introspect::KernelSource::Memory, vm.ram(), &view)
    })();
    vm.resume_all()?;
    info
}

/// Traces the command; returns its exit status.
pub fn trace(args: TraceArgs) -> Result<i32> {
    let Exprs {
        only,
        signals,
        status,
        tamper,
    } = parse_exprs(&args.expr)?;
    let status = args
        .lines
        .status_spec(status)
        .map(|spec| StatusSet::parse(&spec))
        .transpose()
        .map_err(|m| anyhow!("-e status: {m}"))?;
    // Written by a thread of its own: a slow reader must not stall the guest.
    // With -ff, -o names the threads' files; what is not one thread's
    // (the steps engine's lines, -C's table) goes to stderr.
    let split = args.follow >= 2 && args.output.is_some() && !args.count;
    let shared = if split { None } else { args.output.as_deref() };
    let (queued, writer) =
        crate::output::queued(open_output(shared)?).context("starting the trace writer")?;
    let out = utrace::steps::SharedOut::new(Box::new(queued));
    let summary = (args.count || args.summary_too)
        .then(|| Arc::new(utrace::strace::summary::Summary::default()));
    // -c: the table only (the engine's own lines go nowhere).
    let engine_out: Box<dyn Write + Send> = if args.count {
        Box::new(std::io::sink())
    } else {
        Box::new(out.clone())
    };
    // Before booting: an unreachable sink is an error, with nothing traced.
    let sink = args.sink.start()?;
    // strace's -q silences its messages; hvtrace's progress goes with them.
    args.guest.start_progress(args.lines.quiet > 0);
    // The kernel's symbols and types load while the guest is restored.
    let preload = match args.restore {
        Some(_) => None,
        None => InfoPreload::start(&introspect::KernelSource::Files {
            kernel: args.guest.config()?.kernel,
            system_map: None,
        }),
    };
    let (mut session, _) = open_guest(&args.guest, args.no_cache, args.restore.as_deref(), None)?;
    let info = Arc::new(kernel_info(
        &session,
        &args.guest,
        preload,
        args.restore.is_some(),
    )?);
    let tracer = Tracer::install(session.vm(), info).context("installing the tracer")?;
    check_tampered_calls(&tamper, &tracer.syscalls())?;
    let only = only
        .map(|set| set.resolve(&tracer.syscalls()))
        .transpose()
        .map_err(|m| anyhow!("-e trace: {m}"))?;
    let mut engine = Strace::new(
        StraceOptions {
            string_limit: Some(args.string_limit),
            only,
            signals,
            status,
            json: args.json,
            timing: args.timing,
            decode_fds: args.lines.decode_fds,
            quiet_exits: args.lines.quiet >= 2,
            entries: false,
            tamper,
            stamp: args.stamps.stamp(),
            follow: args.follow > 0,
        },
        tracer.syscalls(),
        engine_out,
    );
    if let (true, Some(prefix)) = (split, &args.output) {
        engine = engine.with_thread_outputs(thread_files(prefix.clone()));
    }
    if let Some(sink) = &sink {
        engine = engine.with_observer(sink.observer());
    }
    if let Some(summary) = &summary {
        engine = engine.with_observer(summary.clone());
    }
    let engine = Arc::new(engine);
    let mut specs = vec![EngineSpec {
        ops: engine,
        events: STRACE_EVENTS,
        follow: args.follow > 0,
        data: None,
    }];
    let steps = args.steps.engine(out.clone(), &image_files(&args.guest));
    if let Some(steps) = &steps {
        tracer
            .ensure_step_site(session.vm())
            .context("setting the step trap")?;
        // Attached after strace: at a system-call entry it runs first, so
        // the `syscall` instruction's line comes before the call's.
        specs.push(EngineSpec {
            ops: steps.clone(),
            events: utrace::steps::STEPS_EVENTS,
            follow: args.follow > 0,
            data: None,
        });
    }
    tracer
        .trace_next_exec_with(session.vm(), args.command.clone(), specs)
        .context("arming the tracer")?;
    session.start_exec(&args.command)?;
    let code = loop {
        if let Some(code) = session.poll_exit(Duration::from_millis(50))? {
            break code;
        }
    };
    use std::sync::atomic::Ordering::Relaxed;
    let stats = tracer.stats();
    let (seen, errors) = (stats.traps.load(Relaxed), stats.errors.load(Relaxed));
    let handler_ns = stats.handler_ns.load(Relaxed);
    let untraced = stats.untraced.load(Relaxed);
    tracer.remove(session.vm()).context("removing the tracer")?;
    if let Some(steps) = &steps {
        let text = steps.finish();
        let mut o = out.clone();
        let _ = o.write_all(text.as_bytes());
        let _ = o.flush();
    }
    if let Some(summary) = &summary {
        let mut o = out.clone();
        let _ = o.write_all(summary.render(args.sort_by).as_bytes());
        let _ = o.flush();
    }
    writer.finish();
    let sunk = sink.map(|s| s.finish());
    log::info!("tracer: {seen} traps, {errors} handler errors");
    if errors > 0 {
        eprintln!("hvtrace: warning: {errors} trap(s) could not be decoded (run with RUST_LOG=warn for details)");
    }
    if args.report {
        let mut r = session.report();
        let per_trap = |n: f64| (seen > 0).then(|| n / seen as f64);
        r["tracer_traps"] = seen.into();
        r["tracer_traps_untraced"] = untraced.into();
        r["tracer_handler_errors"] = errors.into();
        r["vm_exits_per_trap"] = per_trap(r["tracer_trap_exits"].as_f64().unwrap_or(0.0)).into();
        r["sregs_reads_per_trap"] =
            per_trap(r["tracer_sregs_reads"].as_f64().unwrap_or(0.0)).into();
        r["handler_us_per_trap"] = per_trap(handler_ns as f64 / 1e3).into();
        if let Some(s) = &sunk {
            s.add_to(&mut r);
        }
        eprintln!("hvtrace-report {r}");
    }
    session.shutdown();
    Ok(code)
}
