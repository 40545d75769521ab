//! Helpers for hvtrace's integration tests: run the `hvtrace` binary, find
//! the guest kernels and image, and boot the same kernel and image under
//! QEMU (TCG) as an independent oracle.
//!
//! Tests that need /dev/kvm call [`require_kvm`], which fails the test with
//! a loud message when KVM is missing: they never pass by skipping.

pub mod strace_log;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace root")
}

/// The hvtrace binary under test (`$HVTRACE_BIN`, else target/release or
/// target/debug; build it first: scripts/test.sh does).
pub fn hvtrace_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HVTRACE_BIN") {
        return PathBuf::from(p);
    }
    for profile in ["release", "debug"] {
        let p = root().join("target").join(profile).join("hvtrace");
        if p.exists() {
            return p;
        }
    }
    panic!("hvtrace binary not found: run `cargo build --release -p hvtrace` (scripts/test.sh does) or set HVTRACE_BIN");
}

/// Fails the test unless /dev/kvm can be opened read-write.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "\n\n*** THIS TEST NEEDS /dev/kvm AND CANNOT RUN: {e} ***\n\
             *** hvtrace's guest tests boot real kernels; they do not skip. ***\n\n"
        );
    }
}

/// A guest loop's iteration count for this machine's KVM: `pvm_count`,
/// tuned to PVM KVM (where a guest system call costs ~0.4 ms of emulated
/// kernel code), or 250 times it on hardware KVM, where the same call takes
/// microseconds and a PVM-sized loop would end before a test could attach
/// to it.
pub fn loop_count(pvm_count: u32) -> u32 {
    match vmm::kvm_kind::KvmKind::detect() {
        vmm::kvm_kind::KvmKind::Pvm => pvm_count,
        _ => pvm_count.saturating_mul(250),
    }
}

/// Runs hvtrace with `args`, capturing stdout and stderr, within
/// [`command_limit`]: a command that hangs fails its test (see
/// [`output_within`]) instead of holding the whole run until CI's limit.
pub fn hvtrace(args: &[&str]) -> Output {
    let mut cmd = Command::new(hvtrace_bin());
    cmd.args(args);
    output_within(&mut cmd, command_limit(), &format!("hvtrace {args:?}"))
}

/// How long one hvtrace command of a test may take: `$HVTRACE_TEST_TIMEOUT`
/// seconds, else 15 minutes. The longest a test's command takes is a cold
/// boot of the minimal kernel beside another (~3 minutes on PVM KVM); in
/// the hardware-KVM lane the guests are booted before any test.
pub fn command_limit() -> Duration {
    let secs = std::env::var("HVTRACE_TEST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15 * 60);
    Duration::from_secs(secs)
}

/// `cmd.output()` (stdin null) that gives up after `limit`: the command's
/// threads are shown with gdb (where each waits: a vCPU in the guest or a
/// lock in the VMM), it is killed, and the test fails with `what`, that
/// and the end of what the command wrote so far.
pub fn output_within(cmd: &mut Command, limit: Duration, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    // Each pipe is read on a thread into a buffer the hang report can look
    // at without waiting for the pipe's end (a grandchild may hold it).
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let buffer = seen.clone();
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            if let Some(mut pipe) = pipe {
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    buffer.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            }
        });
        (seen, thread)
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the command") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let Some(status) = status else {
        let threads = Command::new("gdb")
            .args([
                "-p",
                &child.id().to_string(),
                "-batch",
                "-ex",
                "thread apply all bt",
            ])
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("(gdb: {e})"));
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(200));
        let tail = |seen: &std::sync::Mutex<Vec<u8>>| {
            let data = seen.lock().unwrap();
            let text = String::from_utf8_lossy(&data);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        panic!(
            "{what} HUNG: still running after {} s; killed.\n\
             --- its threads (gdb) ---\n{threads}\n\
             --- the end of its stdout ---\n{}\n--- the end of its stderr ---\n{}",
            limit.as_secs(),
            tail(&out.0),
            tail(&err.0)
        );
    };
    let collect = |(seen, thread): (
        std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        std::thread::JoinHandle<()>,
    )| {
        let _ = thread.join();
        std::mem::take(&mut *seen.lock().unwrap())
    };
    Output {
        status,
        stdout: collect(out),
        stderr: collect(err),
    }
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs one of the project's build scripts and returns the path it prints.
pub fn script_path(script: &str, args: &[&str]) -> PathBuf {
    let out = Command::new("bash")
        .arg(root().join(script))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run build script");
    assert!(out.status.success(), "{script} failed");
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("a path")
            .trim(),
    )
}

/// The built-in kernels: `--kernel` name, and the file QEMU boots.
pub fn kernel_for_qemu(name: &str) -> PathBuf {
    match name {
        "minimal" => script_path("kernel-config/build.sh", &[]).join("bzImage"),
        "debian-6.1" => script_path("kernel-config/debian.sh", &["6.1"]),
        "debian-6.12" => script_path("kernel-config/debian.sh", &["6.12"]),
        other => panic!("unknown kernel {other}"),
    }
}

/// The default guest image.
pub fn default_image() -> PathBuf {
    script_path("images/build.sh", &[])
}

/// What a guest command produced.
#[derive(Debug)]
pub struct GuestRun {
    /// The command's stdout.
    pub stdout: String,
    /// Its exit status.
    pub status: i32,
}

/// Boots `kernel` with `initrd` under QEMU, speaks the guest image's
/// control protocol over a socket on ttyS1, runs `argv`, and returns what
/// ttyS2 received. Independent of hvtrace's VMM. QEMU's accelerator is
/// `$HVTRACE_QEMU_ACCEL`, else TCG: the hardware-KVM lane, itself inside
/// QEMU's TCG, sets `kvm` there (TCG inside TCG would take most of an hour
/// per boot; QEMU's own device model and boot path stay the oracle).
pub fn qemu_run(
    kernel: &Path,
    initrd: &Path,
    cpus: u8,
    argv: &[&str],
    timeout: Duration,
) -> GuestRun {
    let dir = std::env::temp_dir().join(format!(
        "hvtrace-qemu-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("ctl.sock");
    let accel = std::env::var("HVTRACE_QEMU_ACCEL").unwrap_or_else(|_| "tcg".into());
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            &accel,
            "-m",
            "256",
            "-smp",
            &cpus.to_string(),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 printk.time=1"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=ctl,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["-serial", "chardev:ctl"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("stdout").display()))
        .arg("-serial")
        .arg(format!("file:{}", dir.join("stderr").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 is installed by scripts/setup.sh");
    let deadline = Instant::now() + timeout;
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU never opened its control socket"
        );
        if let Ok(Some(status)) = child.try_wait() {
            panic!("QEMU exited early ({status})");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut sent = false;
    let status = loop {
        assert!(
            Instant::now() < deadline,
            "QEMU guest timed out; console:\n{}",
            std::fs::read_to_string(dir.join("console.log")).unwrap_or_default()
        );
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => panic!("QEMU closed the control channel"),
            Ok(_) => {}
            Err(_) => continue,
        }
        let line = line.trim();
        if line == "HVTRACE-READY" && !sent {
            let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
            // The older RUN request: QEMU's runs keep it tested (hvtrace
            // itself sends SH, and RUN only to an init that predates SH).
            writer
                .write_all(vmm::control::run_request(&argv, vmm::control::Start::Plain).as_bytes())
                .unwrap();
            sent = true;
        } else if let Some(code) = line.strip_prefix("HVTRACE-EXIT ") {
            break code.parse().expect("numeric status");
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let stdout = std::fs::read_to_string(dir.join("stdout")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    GuestRun { stdout, status }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One request line on a fresh connection to a VM's control socket; the
/// reply (event lines before it are skipped).
pub fn api_call(sock: &Path, line: &str) -> std::io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(sock)?;
    writeln!(s, "{line}")?;
    for l in BufReader::new(&s).lines() {
        let v: serde_json::Value = serde_json::from_str(&l?).unwrap_or(serde_json::Value::Null);
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
    Ok(serde_json::Value::Null)
}

/// A VM that `hvtrace run --api-sock` serves: asked to shut down over its
/// socket when dropped, and killed if it has not ended 30 s later.
pub struct ApiVm {
    /// The control socket.
    pub sock: PathBuf,
    child: Option<std::process::Child>,
}

impl ApiVm {
    /// Takes charge of `child`, which serves `sock`.
    pub fn new(child: std::process::Child, sock: PathBuf) -> Self {
        Self {
            sock,
            child: Some(child),
        }
    }

    /// The hvtrace process, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut std::process::Child {
        self.child.as_mut().expect("the VM's process")
    }

    /// The hvtrace process, to wait for it: no shutdown on drop then.
    pub fn take_child(&mut self) -> std::process::Child {
        self.child.take().expect("the VM's process")
    }
}

impl Drop for ApiVm {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = api_call(&self.sock, r#"{"v":1,"op":"shutdown"}"#);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A unique temporary path.
pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "hvtrace-test-{}-{}-{name}",
        std::process::id(),
        rand_suffix()
    ))
}

/// A default guest restored in this process from its cached snapshot, for
/// tests that drive `utrace::hv::Tracer` directly; what the guest command
/// prints to stdout is collected.
pub struct InProcessGuest {
    /// The VM session.
    pub session: vmm::session::Session,
    /// The minimal kernel's symbols and types.
    pub info: std::sync::Arc<guest_introspect::image::KernelInfo>,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

/// Collects bytes written from the VM's threads.
struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl InProcessGuest {
    /// Boots the default guest once (cached by `hvtrace run`) and restores
    /// its snapshot here.
    pub fn restore_default() -> Self {
        Self::restore("minimal")
    }

    /// [`InProcessGuest::restore_default`] with guest kernel `kernel`
    /// (`minimal`, `debian-6.1`, `debian-6.12`); symbols and types come
    /// from the kernel image, as `hvtrace trace` finds them.
    pub fn restore(kernel: &str) -> Self {
        require_kvm();
        let out = hvtrace(&["run", "--kernel", kernel, "--", "true"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = hvtrace(&["cached-snapshot", "--kernel", kernel]);
        assert!(out.status.success(), "{}", stderr(&out));
        let snap = PathBuf::from(stdout(&out).trim());
        let kernel = std::fs::read(kernel_for_qemu(kernel)).expect("the kernel image");
        let elf = vmm::loader::kernel_elf(&kernel, vmm::loader::DEFAULT_MAX_OUTPUT)
            .expect("the kernel's ELF");
        let info = std::sync::Arc::new(
            guest_introspect::image::KernelInfo::from_files(&elf, None).expect("kernel info"),
        );
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let outputs = vmm::session::Outputs {
            stdout: Box::new(SharedBuf(buf.clone())),
            stderr: Box::new(std::io::sink()),
            console_echo: None,
        };
        let session =
            vmm::session::Session::restore(&snap, None, outputs, Duration::from_secs(600))
                .expect("restore the default guest");
        Self {
            session,
            info,
            stdout: buf,
        }
    }

    /// Waits for the command started with `session.start_exec` to end; its
    /// exit status.
    pub fn wait_exit(&mut self) -> i32 {
        loop {
            if let Some(c) = self
                .session
                .poll_exit(Duration::from_millis(50))
                .expect("the VM runs")
            {
                return c;
            }
        }
    }

    /// Runs `argv` through the control channel and returns its exit
    /// status; fails the test, saying it was `what` and showing the
    /// console's tail, if no status comes within `limit`.
    pub fn run_with_limit(&mut self, argv: &[String], limit: Duration, what: &str) -> i32 {
        self.session.start(argv).expect("send the request");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(code) = self
                .session
                .poll_exit(Duration::from_millis(100))
                .expect("the VM runs")
            {
                return code;
            }
            assert!(
                Instant::now() < deadline,
                "{what} got no answer in {limit:?}\nconsole tail:\n{}",
                self.session.console().tail(20)
            );
        }
    }

    /// What the guest command printed so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command past its limit fails the caller, saying what it wrote
    /// before it hung; one within it returns its output.
    #[test]
    fn a_hanging_command_fails_with_what_it_wrote() {
        let quick = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(30),
            "quick",
        );
        assert_eq!(quick.status.code(), Some(3));
        assert_eq!(
            (stdout(&quick), stderr(&quick)),
            ("out\n".into(), "err\n".into())
        );
        let started = Instant::now();
        let hung = std::panic::catch_unwind(|| {
            output_within(
                Command::new("sh").args(["-c", "echo before the hang; exec sleep 60"]),
                Duration::from_millis(500),
                "the sleeper",
            )
        });
        let message = *hung
            .expect_err("a command past its limit fails")
            .downcast::<String>()
            .expect("a message");
        assert!(message.contains("the sleeper HUNG"), "{message}");
        assert!(message.contains("before the hang"), "{message}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "killed, not waited for"
        );
    }
}
