//! `hvtrace`: boot Linux guests on KVM and trace them from outside.

mod api;
mod artifacts;
mod cmd;
mod gdb;
mod guestfiles;
mod introspect;
mod output;
mod progress;
mod sink;
mod snapcache;
mod stacks;

use clap::{Parser, Subcommand};

/// Command-line interface.
#[derive(Parser)]
#[command(
    name = "hvtrace",
    version,
    about = "Boot Linux guests on KVM and trace them from the hypervisor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (or restore its cached snapshot), run one command in it, exit with its status.
    Run(cmd::run::RunArgs),
    /// Boot a long-running VM with a control socket; the guest console goes to stdout.
    Boot(cmd::boot::BootArgs),
    /// Save a running VM (see `boot`) to a snapshot file.
    Snapshot(cmd::snapshot::SnapshotArgs),
    /// Print the path of the snapshot `run` cached for a guest definition.
    CachedSnapshot(cmd::cached::CachedArgs),
    /// List a guest's processes and threads, read from outside (like `ps -eLo pid,tid,ppid,stat,comm`).
    Ps(cmd::ps::PsArgs),
    /// Show one guest task in detail: state, parent, creds, flags, user registers, executable.
    Inspect(cmd::ps::InspectArgs),
    /// What every vCPU is doing and its kernel stack; with -a every task's kernel stack (like sysrq-t).
    Stacks(cmd::ps::StacksArgs),
    /// Print a kernel's symbols (System.map format) from the best source available.
    Symbols(cmd::symbols::SymbolsArgs),
    /// Print struct layouts from a kernel's BTF.
    Types(cmd::symbols::TypesArgs),
    /// Show which kernel function observes each utrace event in a kernel, and why.
    Sites(cmd::sites::SitesArgs),
    /// Boot the guest and trace one command from its exec, strace-like (trace on stderr).
    Trace(cmd::trace::TraceArgs),
    /// Trace a process of a running VM until it exits; Ctrl-C detaches.
    Attach(cmd::attach::AttachArgs),
    /// Print the events a fleet published to NATS JetStream (`--sink`) as strace's text or JSON.
    Events(cmd::events::EventsArgs),
    /// Publish the events a sink kept in a spill file when its server was away at the end of a trace.
    SinkReplay(cmd::replay::ReplayArgs),
    /// Hold a guest process (or one thread) stopped until `cont`; the rest of the guest runs on.
    Stop(cmd::control::StopArgs),
    /// Let threads held by `stop` run again.
    Cont(cmd::control::ContArgs),
    /// Wake threads from interruptible sleeps (utrace's INTERRUPT); their calls restart.
    Interrupt(cmd::control::ContArgs),
    /// Send a guest process (its main thread) or thread a signal from outside.
    Signal(cmd::control::SignalArgs),
    /// Print (and set) a stopped thread's user registers.
    Regs(cmd::control::RegsArgs),
    /// Dump (or write, copy-on-write as ptrace does) a guest process's memory.
    Mem(cmd::control::MemArgs),
    /// Step a stopped thread one user instruction (or block, or N) and keep it stopped.
    Step(cmd::control::StepArgs),
    /// Serve one guest process to gdb (the GDB remote protocol), from outside the guest.
    Gdbserver(gdb::GdbserverArgs),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // A usage error is hvtrace's failure like any other: 125, as `env` and
    // `timeout` do, never clap's 2, which a caller could not tell from the
    // guest command's own status 2. `--help` and `--version` exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { HVTRACE_FAILED } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Run(a) => cmd::run::run(a),
        Command::Boot(a) => cmd::boot::boot(a),
        Command::Snapshot(a) => cmd::snapshot::snapshot(a),
        Command::CachedSnapshot(a) => cmd::cached::cached(a),
        Command::Ps(a) => cmd::ps::ps(a),
        Command::Inspect(a) => cmd::ps::inspect(a),
        Command::Stacks(a) => cmd::ps::stacks(a),
        Command::Symbols(a) => cmd::symbols::symbols(a),
        Command::Types(a) => cmd::symbols::types(a),
        Command::Sites(a) => cmd::sites::sites(a),
        Command::Trace(a) => cmd::trace::trace(a),
        Command::Attach(a) => cmd::attach::attach(a),
        Command::Events(a) => cmd::events::events(a),
        Command::SinkReplay(a) => cmd::replay::replay(a),
        Command::Stop(a) => cmd::control::stop(a),
        Command::Cont(a) => cmd::control::cont(a),
        Command::Interrupt(a) => cmd::control::interrupt(a),
        Command::Signal(a) => cmd::control::signal(a),
        Command::Regs(a) => cmd::control::regs(a),
        Command::Step(a) => cmd::control::step(a),
        Command::Gdbserver(a) => gdb::gdbserver(a),
        Command::Mem(a) => cmd::control::mem(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            progress::finish();
            eprintln!("hvtrace: {e:#}");
            std::process::exit(failure_status(&e));
        }
    }
}

/// Exit status when hvtrace itself failed.
const HVTRACE_FAILED: i32 = 125;
/// Exit status when the guest kernel crashed (panic, oops, BUG, lockup,
/// hung task, RCU stall): distinct from hvtrace's own failures and from
/// the guest command's statuses.
const GUEST_KERNEL_CRASHED: i32 = 123;

fn failure_status(e: &anyhow::Error) -> i32 {
    use vmm::session::SessionError;
    let crashed = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<SessionError>(),
            Some(SessionError::Crashed { .. } | SessionError::Panic(_))
        )
    });
    if crashed {
        GUEST_KERNEL_CRASHED
    } else {
        HVTRACE_FAILED
    }
}
