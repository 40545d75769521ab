//! `hvtrace run`: boot a guest (or restore its cached snapshot), run one
//! command, exit with its status.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use vmm::builder::{Kaslr, VmConfig};
use vmm::kvm_kind::KvmKind;
use vmm::session::{Outputs, Session};

use crate::api::handler::Handler;
use crate::api::server::ApiServer;
use crate::api::Op;
use crate::introspect::KernelSource;
use crate::sink::SinkArgs;
use crate::{artifacts, progress, snapcache};

/// Default kernel command line; the VMM adds what the KVM kind needs.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 printk.time=1 tsc=reliable lpj=2000000";

/// How to define a guest (shared by `run` and `boot`).
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Kernel: `minimal` (default), `debian-6.1`, `debian-6.12`, or a path to a vmlinux/bzImage.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Initrd (cpio, optionally gzip); repeat to concatenate. Default: hvtrace's guest image.
    #[arg(long)]
    pub initrd: Vec<PathBuf>,
    /// Extra kernel command-line words.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Do not randomize the kernel's placement.
    #[arg(long)]
    pub no_kaslr: bool,
    /// Show the guest kernel console on stderr.
    #[arg(short, long)]
    pub verbose: bool,
    /// Seconds without guest output before the guest is reported as stalled
    /// [default: 2400 on PVM KVM, where kernel code is emulated; 120 on hardware KVM].
    #[arg(long)]
    pub stall_timeout: Option<u64>,
    /// Seconds without guest output before hvtrace prints, once, what every
    /// vCPU and task of the guest is doing (0: never)
    /// [default: 180 on PVM KVM; 20 on hardware KVM].
    #[arg(long)]
    pub stall_report: Option<u64>,
}

impl GuestArgs {
    /// The VM configuration these arguments describe (building the default
    /// kernel and image on first use).
    pub fn config(&self) -> Result<VmConfig> {
        let kernel = artifacts::kernel(self.kernel.as_deref())?;
        let initrds = if self.initrd.is_empty() {
            vec![artifacts::default_image()?]
        } else {
            self.initrd.clone()
        };
        Ok(VmConfig {
            kernel,
            initrds,
            cmdline: self.cmdline_words(),
            memory_mib: self.memory,
            cpus: self.cpus,
            kaslr: if self.no_kaslr {
                Kaslr::Off
            } else {
                Kaslr::Auto
            },
        })
    }

    /// The kernel command line: hvtrace's defaults, the named kernel's own
    /// defaults on PVM KVM, then the user's words (the kernel takes the last
    /// value of a repeated option, so the user's win).
    fn cmdline_words(&self) -> String {
        let named = self
            .kernel
            .as_deref()
            .and_then(artifacts::NamedKernel::from_name)
            .filter(|_| KvmKind::detect() == KvmKind::Pvm)
            .map_or("", |k| k.pvm_cmdline());
        [DEFAULT_CMDLINE, named, self.cmdline.trim()]
            .iter()
            .filter(|w| !w.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The stall timeout: as given, or the default for this host's KVM kind.
    pub fn stall(&self) -> Duration {
        self.stall_timeout
            .map(Duration::from_secs)
            .unwrap_or_else(|| vmm::session::default_stall_timeout(KvmKind::detect()))
    }

    /// When to describe a quiet guest: as given, or the default for this
    /// host's KVM kind; None when turned off.
    pub fn stall_report(&self) -> Option<Duration> {
        match self.stall_report {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(s)),
            None => Some(vmm::session::default_stall_report_after(KvmKind::detect())),
        }
    }

    /// Outputs wired to the host's stdout and stderr; the console goes to
    /// stderr with `-v`, else to the progress display (its last line and
    /// boot phases), if one runs.
    pub fn outputs(&self) -> Outputs {
        Outputs {
            stdout: Box::new(std::io::stdout()),
            stderr: Box::new(std::io::stderr()),
            console_echo: if self.verbose {
                Some(Box::new(std::io::stderr()))
            } else {
                progress::current().map(|p| p.console_sink())
            },
        }
    }

    /// Starts the progress display for a command that waits on this
    /// guest: silenced by `quiet`, whole lines with `-v`.
    pub fn start_progress(&self, quiet: bool) {
        progress::start(progress::Mode::for_stderr(quiet, self.verbose));
    }
}

/// Arguments of `hvtrace run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Boot afresh instead of restoring (and refreshing) the cached snapshot.
    #[arg(long)]
    pub no_cache: bool,
    /// Restore this snapshot instead of booting.
    #[arg(long, conflicts_with_all = ["no_cache"])]
    pub restore: Option<PathBuf>,
    /// Debugging aid: print every vCPU's RIP every N seconds on stderr.
    #[arg(long, hide = true)]
    pub sample_rip: Option<u64>,
    /// Print timing and memory figures (with --sink, the events published,
    /// resent, spilled and dropped) as one JSON line on stderr at the end.
    #[arg(long)]
    pub report: bool,
    /// No progress (status line or phase lines) while the guest is prepared.
    #[arg(short, long)]
    pub quiet: bool,
    /// Serve a control socket (as `hvtrace boot` does) while the command
    /// runs, so `hvtrace ps`/`inspect`/`snapshot` can look at the guest.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// With --api-sock: the events of every process traced through the
    /// socket (`hvtrace attach`) are also published here, as this VM's.
    #[command(flatten)]
    pub sink: SinkArgs,
    /// The command to run in the guest.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<String>,
}

/// Opens the guest a command runs in: `restore` if given, else the cached
/// snapshot of `guest` (unless `no_cache`), else a fresh boot that caches
/// one. Returns the session and whether it was restored. The progress
/// display, if one runs, ends here: what follows is the command's.
pub fn open_guest(
    guest: &GuestArgs,
    no_cache: bool,
    restore: Option<&std::path::Path>,
    sample_rip: Option<u64>,
) -> Result<(Session, bool)> {
    let opened = open_guest_session(guest, no_cache, restore, sample_rip);
    progress::finish();
    let (mut session, restored) = opened?;
    if let Some(after) = guest.stall_report() {
        let kernel = match restore {
            Some(_) => None,
            None => Some(std::path::absolute(guest.config()?.kernel)?),
        };
        session.report_stalls_after(after, crate::stacks::stall_describer(kernel));
    }
    Ok((session, restored))
}

fn open_guest_session(
    guest: &GuestArgs,
    no_cache: bool,
    restore: Option<&std::path::Path>,
    sample_rip: Option<u64>,
) -> Result<(Session, bool)> {
    let stall = guest.stall();
    if let Some(snap) = restore {
        progress::phase("restoring the snapshot");
        return Ok((Session::restore(snap, None, guest.outputs(), stall)?, true));
    }
    let config = guest.config()?;
    let key = snapcache::key(&config, KvmKind::detect())?;
    let cached = snapcache::path(&key);
    if !no_cache && cached.exists() {
        progress::phase("restoring the cached snapshot");
        match Session::restore(&cached, Some(&key), guest.outputs(), stall) {
            Ok(s) => return Ok((s, true)),
            Err(e) => {
                eprintln!("hvtrace: cached snapshot unusable ({e}); booting afresh");
                let _ = std::fs::remove_file(&cached);
            }
        }
    }
    let started = Instant::now();
    let session = boot_and_cache(guest, sample_rip, &config, &key, &cached, stall)?;
    if let Some(p) = progress::current() {
        // The status line ends here; the note stays above what follows.
        p.end();
        p.note(&format!(
            "guest booted in {:.1}s; its snapshot makes the next run start in seconds",
            started.elapsed().as_secs_f64()
        ));
    }
    Ok((session, false))
}

/// Runs the command; returns the guest command's exit status.
pub fn run(args: RunArgs) -> Result<i32> {
    // Before minutes of booting, not after.
    if let Some(sock) = &args.api_sock {
        ApiServer::check_path(sock)?;
    }
    if args.sink.sink.is_some() && args.api_sock.is_none() {
        anyhow::bail!("--sink on `hvtrace run` publishes what is traced through its control socket: give --api-sock too (or use `hvtrace trace --sink`)");
    }
    let sink = args.sink.start()?;
    args.guest.start_progress(args.quiet);
    let (mut session, restored) = open_guest(
        &args.guest,
        args.no_cache,
        args.restore.as_deref(),
        args.sample_rip,
    )?;
    let code = match &args.api_sock {
        None => session.run(&args.command)?,
        Some(sock) => {
            let source = match &args.restore {
                Some(_) => KernelSource::Memory,
                None => KernelSource::Files {
                    kernel: std::path::absolute(args.guest.config()?.kernel)?,
                    system_map: None,
                },
            };
            let observer = sink.as_ref().map(|s| s.observer());
            match serve_while_running(&mut session, sock, source, observer, &args.command)? {
                Some(code) => code,
                None => SHUTDOWN_STATUS,
            }
        }
    };
    let sunk = sink.map(|s| s.finish());
    if args.report {
        let mut r = session.report();
        r["restored"] = serde_json::Value::Bool(restored);
        if args.api_sock.is_some() {
            r["events_lost"] = crate::api::EVENTS_LOST
                .load(std::sync::atomic::Ordering::Relaxed)
                .into();
        }
        if let Some(s) = &sunk {
            s.add_to(&mut r);
        }
        eprintln!("hvtrace-report {r}");
    }
    session.shutdown();
    Ok(code)
}

/// Exit status of `run` when a socket client shut the VM down before the
/// command finished (as if the command had been killed by SIGTERM).
const SHUTDOWN_STATUS: i32 = 128 + 15;

/// Runs `argv` while answering socket requests; None if a client asked for
/// a shutdown first.
fn serve_while_running(
    session: &mut Session,
    sock: &std::path::Path,
    source: KernelSource,
    observer: Option<std::sync::Arc<dyn utrace::strace::RecordObserver>>,
    argv: &[String],
) -> Result<Option<i32>> {
    let server = ApiServer::bind(sock)?;
    let mut handler = Handler::new(source);
    if let Some(o) = observer {
        handler.observe_with(o);
    }
    session.start(argv)?;
    loop {
        if let Some(code) = session.poll_exit_now()? {
            handler.finish(session);
            return Ok(Some(code));
        }
        // Requests are answered as they come (a debugger's every step is
        // one), the guest's exit noticed within a few milliseconds.
        let first = server.requests.recv_timeout(Duration::from_millis(5)).ok();
        for req in first
            .into_iter()
            .chain(std::iter::from_fn(|| server.requests.try_recv().ok()))
        {
            if req.op == Op::Shutdown {
                let _ = req.reply.send(Ok(serde_json::json!({})));
                handler.finish(session);
                return Ok(None);
            }
            let answer = handler.handle(session, req.op, &req.conn);
            let _ = req.reply.send(answer);
        }
    }
}

fn boot_and_cache(
    guest: &GuestArgs,
    sample_rip: Option<u64>,
    config: &VmConfig,
    key: &str,
    cached: &std::path::Path,
    stall: Duration,
) -> Result<Session> {
    progress::phase("starting the guest (cold boot: minutes on PVM KVM, once)");
    let mut session = Session::boot(config, guest.outputs(), stall)?;
    if let Some(secs) = sample_rip {
        session.sample_rip_every(Duration::from_secs(secs));
    }
    session.wait_ready()?;
    progress::phase("saving a snapshot of the booted guest");
    if let Some(dir) = cached.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Err(e) = session.snapshot(cached, key) {
        eprintln!("hvtrace: warning: cannot cache the booted guest: {e}");
    }
    Ok(session)
}
