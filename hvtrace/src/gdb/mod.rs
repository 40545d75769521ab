//! `hvtrace gdbserver`: a GDB remote stub for one process inside the
//! guest, served from the host. gdb talks the Remote Serial Protocol to
//! this stub (the `gdbstub` crate); the stub talks to the VM over its
//! control socket (`debug`, `stop`, `regs`, `mem`, `step`, `cont`). Nothing
//! runs in the guest and the program is not ptraced: the guest's own
//! debuggers and tracers still work on it.
//!
//! Two ways in, as with gdbserver:
//! * `hvtrace gdbserver --api-sock S -p PID --listen ADDR`: attach to a
//!   running process of a VM served by `hvtrace boot` or `run --api-sock`;
//! * `hvtrace gdbserver --listen ADDR [guest options] -- CMD`: boot (or
//!   restore) a guest, run CMD held before its first instruction, and
//!   serve it; the guest ends when CMD does, and hvtrace exits with CMD's
//!   status.
//!
//! One gdb connection is served; when it ends (`detach`, gdb killed or
//! gone) every breakpoint is taken out of the process and it runs on.

mod arch;
mod conn;
mod hostio;
mod remote;
mod signals;
mod target;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{self, BlockingEventLoop};
use gdbstub::stub::{DisconnectReason, GdbStub, MultiThreadStopReason};
use gdbstub::target::Target;

use crate::api::handler::Handler;
use crate::api::server::ApiServer;
use crate::api::Op;
use crate::cmd::run::{open_guest, GuestArgs};
use crate::guestfiles::GuestFiles;
use crate::introspect::KernelSource;
use conn::SharedConn;
use remote::Remote;
use target::{Inferior, StopReason};

/// Arguments of `hvtrace gdbserver`.
#[derive(Args, Debug)]
pub struct GdbserverArgs {
    /// Control socket of a running VM (`hvtrace boot` or `run --api-sock`); with -p.
    #[arg(long, requires = "pid", conflicts_with = "command")]
    pub api_sock: Option<PathBuf>,
    /// The process to debug (every thread); with --api-sock.
    #[arg(short = 'p', long, requires = "api_sock")]
    pub pid: Option<i32>,
    /// Where gdb connects: HOST:PORT (TCP) or the path of a Unix socket.
    #[arg(long, default_value = "127.0.0.1:1234")]
    pub listen: String,
    /// Guest image files whose programs gdb may read (`vFile:`), with -p
    /// [default: hvtrace's guest image].
    #[arg(long)]
    pub image: Vec<PathBuf>,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Boot afresh instead of restoring the cached snapshot.
    #[arg(long)]
    pub no_cache: bool,
    /// Restore this snapshot instead of booting.
    #[arg(long)]
    pub restore: Option<PathBuf>,
    /// The command to run in the guest and debug from its first instruction.
    #[arg(trailing_var_arg = true)]
    pub command: Vec<String>,
}

/// Runs `hvtrace gdbserver`; its exit status.
pub fn gdbserver(args: GdbserverArgs) -> Result<i32> {
    match (&args.api_sock, args.pid, args.command.is_empty()) {
        (Some(sock), Some(pid), true) => attach(sock, pid, &args),
        (None, None, false) => run_command(&args),
        _ => bail!("give --api-sock S -p PID (a running process) or -- CMD (a command to start)"),
    }
}

/// Where gdb's connection comes from.
enum Listener {
    Tcp(std::net::TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `spec`: `HOST:PORT`, or a path (containing `/`) for a Unix
    /// socket; an existing path is refused unless it is a stale socket.
    fn bind(spec: &str) -> Result<Self> {
        if spec.contains('/') {
            let path = PathBuf::from(spec);
            ApiServer::check_path(&path)?;
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            Ok(Listener::Unix(l, path))
        } else {
            let l = std::net::TcpListener::bind(spec).with_context(|| {
                format!("cannot listen on {spec} (want HOST:PORT or a socket path)")
            })?;
            Ok(Listener::Tcp(l))
        }
    }

    /// Refuses a `spec` that cannot be bound, before minutes of booting.
    fn check(spec: &str) -> Result<()> {
        if spec.contains('/') {
            ApiServer::check_path(Path::new(spec)).map(|_| ())
        } else {
            use std::net::ToSocketAddrs;
            spec.to_socket_addrs()
                .with_context(|| format!("--listen {spec}: want HOST:PORT or a socket path"))?;
            Ok(())
        }
    }

    fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }

    fn accept(&self) -> Result<Box<dyn ConnectionExt<Error = std::io::Error>>> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Listener::Unix(l, _) => Box::new(l.accept()?.0),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `-p PID`: the process of a running VM.
fn attach(sock: &Path, pid: i32, args: &GdbserverArgs) -> Result<i32> {
    let mut remote = Remote::connect(sock)?;
    remote
        .call(Op::Debug {
            pid: Some(pid),
            exec: None,
        })
        .with_context(|| format!("cannot debug process {pid}"))?;
    let images = crate::cmd::trace::image_files_of(&args.image);
    let mut inferior = Inferior::new(remote, pid, GuestFiles::open(&images));
    inferior.hold_all(true)?;
    inferior.learn_exe();
    let listener = Listener::bind(&args.listen)?;
    eprintln!("Attached; pid = {pid}");
    serve(&mut inferior, &listener).map(|end| end.status().unwrap_or(0))
}

/// How a session ended.
enum End {
    /// The process ended with this wait status.
    Exited(i32),
    /// gdb detached or went away; the process runs on.
    Detached,
    /// gdb killed the process.
    Killed,
}

impl End {
    /// hvtrace's exit status for it when the process's own is not known
    /// otherwise (`-p`).
    fn status(&self) -> Option<i32> {
        match self {
            End::Exited(w) if w & 0x7f == 0 => Some((w >> 8) & 0xff),
            End::Exited(w) => Some(128 + (w & 0x7f)),
            End::Killed => Some(128 + 9),
            End::Detached => None,
        }
    }
}

/// Serves one gdb connection from `listener` on `inferior`, held stopped.
fn serve(inferior: &mut Inferior, listener: &Listener) -> Result<End> {
    eprintln!("Listening on {}", listener.describe());
    let conn = SharedConn::new(listener.accept().context("waiting for gdb")?);
    eprintln!("Remote debugging from host {}", listener.describe());
    let result = loop {
        let stub = GdbStub::new(conn.clone());
        match stub.run_blocking::<EventLoop>(inferior) {
            // A packet gdbstub could not take: answered with an error, and
            // a new session goes on with the same connection and process.
            Err(e) if !e.is_connection_error() && !e.is_target_error() => {
                log::warn!("gdbserver: bad packet ({e}); answered E16");
                if let Err(e) = conn.reply_error() {
                    break Err(format!("gdb went away ({e})"));
                }
            }
            Err(e) if e.is_connection_error() => break Err(format!("gdb went away ({e})")),
            Err(e) => break Err(e.to_string()),
            Ok(reason) => break Ok(reason),
        }
    };
    let end = match result {
        Ok(DisconnectReason::TargetExited(code)) => End::Exited(i32::from(code) << 8),
        Ok(DisconnectReason::TargetTerminated(sig)) => {
            End::Exited(signals::from_gdb(sig).unwrap_or(9))
        }
        Ok(DisconnectReason::Disconnect) => End::Detached,
        Ok(DisconnectReason::Kill) => {
            inferior.remove_all_breakpoints();
            inferior.kill().context("killing the process")?;
            return Ok(End::Killed);
        }
        Err(e) => {
            eprintln!("hvtrace gdbserver: {e}; detaching");
            End::Detached
        }
    };
    if matches!(end, End::Detached) && !inferior.exited {
        // As gdbserver's detach: the program's bytes back, then it runs.
        inferior.remove_all_breakpoints();
        inferior.release_all().context("releasing the process")?;
        eprintln!("Detached from process {}", inferior.pid);
    }
    Ok(end)
}

/// gdbstub's blocking loop: while the process runs, waits for its next
/// stop or for gdb's Ctrl-C.
enum EventLoop {}

impl BlockingEventLoop for EventLoop {
    type Target = Inferior;
    type Connection = SharedConn;
    type StopReason = StopReason;

    #[allow(clippy::type_complexity)]
    fn wait_for_stop_reason(
        target: &mut Inferior,
        conn: &mut Self::Connection,
    ) -> Result<
        run_blocking::Event<StopReason>,
        run_blocking::WaitForStopReasonError<
            <Inferior as Target>::Error,
            <Self::Connection as Connection>::Error,
        >,
    > {
        use run_blocking::{Event, WaitForStopReasonError as E};
        loop {
            if let Some(r) = target.stop_now.take() {
                return Ok(Event::TargetStopped(r));
            }
            if conn.peek().map_err(E::Connection)?.is_some() {
                let byte = conn.read().map_err(E::Connection)?;
                return Ok(Event::IncomingData(byte));
            }
            match target.remote.events.recv_timeout(Duration::from_millis(10)) {
                Ok(ev) => {
                    if let Some(r) = target
                        .on_event(ev)
                        .map_err(|e| E::Target(format!("{e:#}")))?
                    {
                        return Ok(Event::TargetStopped(r));
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(E::Target("the VM's control socket closed".into()));
                }
            }
        }
    }

    fn on_interrupt(target: &mut Inferior) -> Result<Option<StopReason>, String> {
        target.hold_all(true).map_err(|e| format!("{e:#}"))?;
        Ok(Some(MultiThreadStopReason::SignalWithThread {
            tid: target::gdb_tid(target.pid),
            signal: gdbstub::common::Signal::SIGINT,
        }))
    }
}

/// `-- CMD`: a guest of our own, CMD held before its first instruction.
fn run_command(args: &GdbserverArgs) -> Result<i32> {
    Listener::check(&args.listen)?;
    let listen = args.listen.clone();
    let (mut session, _) = open_guest(&args.guest, args.no_cache, args.restore.as_deref(), None)?;
    let source = match &args.restore {
        Some(_) => KernelSource::Memory,
        None => KernelSource::Files {
            kernel: std::path::absolute(args.guest.config()?.kernel)?,
            system_map: None,
        },
    };
    let dir = std::env::temp_dir().join(format!("hvtrace-gdb-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("api.sock");
    let server = ApiServer::bind(&sock)?;
    let mut handler = Handler::new(source);
    let argv = args.command.clone();
    let images = crate::cmd::trace::image_files(&args.guest);
    let (armed_tx, armed_rx) = crossbeam_channel::bounded::<()>(1);
    let stub_sock = sock.clone();
    let stub_argv = argv.clone();
    let stub =
        std::thread::Builder::new()
            .name("gdbserver".into())
            .spawn(move || -> Result<End> {
                let mut remote = Remote::connect(&stub_sock)?;
                remote.call(Op::Debug {
                    pid: None,
                    exec: Some(stub_argv.clone()),
                })?;
                let _ = armed_tx.send(());
                let exec = loop {
                    let ev = remote
                        .events
                        .recv_timeout(Duration::from_secs(600))
                        .context("the command never started")?;
                    if ev["debug"] == "exec" {
                        break ev;
                    }
                };
                let pid = exec["pid"].as_i64().context("exec event without pid")? as i32;
                let mut inferior = Inferior::new(remote, pid, GuestFiles::open(&images));
                inferior.hold_all(false)?;
                inferior.learn_exe();
                eprintln!("Process {} created; pid = {pid}", stub_argv.join(" "));
                // Bound only now: gdb connecting earlier would time out.
                let listener = Listener::bind(&listen)?;
                serve(&mut inferior, &listener)
            })?;
    let mut started = false;
    let mut code = None;
    // Until the stub is done and (if it started) the command has ended: a
    // detached command runs to its end.
    while !(stub.is_finished() && (code.is_some() || !started)) {
        if started && code.is_none() {
            code = session.poll_exit_now()?;
        }
        // Each request answered as it comes: every gdb step is several.
        let first = server.requests.recv_timeout(Duration::from_millis(5)).ok();
        for req in first
            .into_iter()
            .chain(std::iter::from_fn(|| server.requests.try_recv().ok()))
        {
            let answer = match req.op {
                Op::Shutdown => Err("shutdown is not served here".to_string()),
                op => handler.handle(&session, op, &req.conn),
            };
            let _ = req.reply.send(answer);
        }
        if !started && armed_rx.try_recv().is_ok() {
            session.start_exec(&argv)?;
            started = true;
        }
    }
    let end = stub
        .join()
        .map_err(|_| anyhow::anyhow!("the gdb stub panicked"))?;
    let code = code.unwrap_or(125);
    handler.finish(&session);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    session.shutdown();
    end?;
    Ok(code)
}
