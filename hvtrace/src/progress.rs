//! What hvtrace is doing while a user waits: building the default kernel
//! or image, installing packages, booting a guest (minutes on PVM KVM).
//!
//! On a terminal, one status line redrawn in place, as cargo does: the
//! elapsed time, the phase, and the guest console's last line; it is
//! cleared before the command's own output. Not on a terminal, a plain
//! line per phase, each with its time since hvtrace started (`[hvtrace]
//! +12.3s booting the guest kernel`). `-q` silences both. The build
//! scripts' own `[hvtrace] ...` lines are phases; the output of apt and
//! make goes to a log file, named when the script fails.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Not at all (`-q`, and commands that do not wait on a guest).
    Off,
    /// One timestamped line per phase (stderr is not a terminal, or the
    /// guest console is shown with `-v`).
    Lines,
    /// A status line redrawn in place (stderr is a terminal).
    Status,
}

impl Mode {
    /// The mode for this process's stderr: `quiet` silences; `verbose`
    /// (the console is echoed to stderr) keeps to whole lines.
    pub fn for_stderr(quiet: bool, verbose: bool) -> Mode {
        if quiet {
            Mode::Off
        } else if verbose || !std::io::stderr().is_terminal() {
            Mode::Lines
        } else {
            Mode::Status
        }
    }
}

/// The process's progress reporter.
pub struct Progress {
    mode: Mode,
    start: Instant,
    state: Mutex<State>,
    stop: AtomicBool,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct State {
    /// What hvtrace is doing now.
    phase: String,
    /// The guest console's last non-empty line.
    console: String,
    /// A status line is on screen.
    drawn: bool,
    /// Finished: nothing more is shown.
    done: bool,
}

static CURRENT: OnceLock<Arc<Progress>> = OnceLock::new();

/// Starts showing progress in `mode` (once per process; later calls
/// return the first reporter).
pub fn start(mode: Mode) -> Arc<Progress> {
    CURRENT
        .get_or_init(|| {
            let p = Arc::new(Progress {
                mode,
                start: Instant::now(),
                state: Mutex::new(State::default()),
                stop: AtomicBool::new(false),
                ticker: Mutex::new(None),
            });
            if mode == Mode::Status {
                let ticking = Arc::clone(&p);
                let handle = std::thread::Builder::new()
                    .name("progress".into())
                    .spawn(move || {
                        while !ticking.stop.load(Ordering::Relaxed) {
                            ticking.redraw();
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    })
                    .ok();
                *p.ticker.lock().unwrap_or_else(|e| e.into_inner()) = handle;
            }
            p
        })
        .clone()
}

/// The reporter, if a command started one.
pub fn current() -> Option<Arc<Progress>> {
    CURRENT.get().cloned()
}

/// Says that hvtrace is now doing `what`, if a reporter is running.
pub fn phase(what: &str) {
    if let Some(p) = current() {
        p.set_phase(what);
    }
}

/// Ends progress (before the command's own output), if a reporter runs.
pub fn finish() {
    if let Some(p) = current() {
        p.end();
    }
}

/// `1m05s`, `12.3s`.
fn elapsed(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{s:.1}s")
    }
}

/// The phase a guest console line shows the boot has reached, if any.
fn console_phase(line: &str) -> Option<&'static str> {
    if line.contains("Linux version") {
        Some("booting the guest kernel")
    } else if line.contains("Trying to unpack rootfs") || line.contains("Unpacking initramfs") {
        Some("unpacking the guest's initramfs")
    } else if line.contains("Run /init as init process") {
        Some("running the guest's /init")
    } else {
        None
    }
}

/// The terminal's width in columns (80 when it cannot be told).
fn columns() -> usize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` into `ws`, which
    // lives on this stack frame for the whole call; fd 2 is only read.
    let ok = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        usize::from(ws.ws_col)
    } else {
        80
    }
}

impl Progress {
    /// Says that hvtrace is now doing `what`.
    pub fn set_phase(&self, what: &str) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.done || st.phase == what {
            return;
        }
        st.phase = what.to_string();
        match self.mode {
            Mode::Off => {}
            Mode::Lines => {
                eprintln!("[hvtrace] +{} {what}", elapsed(self.start.elapsed()));
            }
            Mode::Status => self.draw(&mut st),
        }
    }

    /// A line of the guest's console: the status line shows it, and the
    /// boot phases it marks become phases.
    pub fn console_line(&self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        if let Some(p) = console_phase(line) {
            self.set_phase(p);
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.console = line.to_string();
    }

    /// Redraws the status line (the elapsed time moves on).
    fn redraw(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.done && !st.phase.is_empty() {
            self.draw(&mut st);
        }
    }

    fn draw(&self, st: &mut State) {
        if self.mode != Mode::Status {
            return;
        }
        let mut line = format!("[hvtrace] {} {}", elapsed(self.start.elapsed()), st.phase);
        if !st.console.is_empty() {
            line.push_str(" | ");
            line.push_str(&st.console);
        }
        // One row: a wrapped status line could not be redrawn in place.
        let width = columns().saturating_sub(1);
        let line: String = line
            .chars()
            .filter(|c| !c.is_control())
            .take(width)
            .collect();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{line}");
        let _ = err.flush();
        st.drawn = true;
    }

    /// Clears the status line and stops; a phase line after this is not
    /// shown.
    pub fn end(&self) {
        self.stop.store(true, Ordering::Relaxed);
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.drawn {
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[K");
                let _ = err.flush();
                st.drawn = false;
            }
            st.done = true;
        }
        if let Some(t) = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }

    /// Prints a line that stays (above the status line, if one is drawn).
    pub fn note(&self, what: &str) {
        if self.mode == Mode::Off {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut err = std::io::stderr().lock();
        if st.drawn {
            let _ = write!(err, "\r\x1b[K");
            st.drawn = false;
        }
        let _ = writeln!(err, "[hvtrace] +{} {what}", elapsed(self.start.elapsed()));
    }

    /// A writer for the guest console's bytes (`Outputs::console_echo`):
    /// each line goes to [`Progress::console_line`].
    pub fn console_sink(self: &Arc<Self>) -> Box<dyn Write + Send> {
        Box::new(ConsoleLines {
            progress: Arc::clone(self),
            partial: Vec::new(),
        })
    }
}

/// Splits console bytes into lines for [`Progress::console_line`].
struct ConsoleLines {
    progress: Arc<Progress>,
    partial: Vec<u8>,
}

impl Write for ConsoleLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' || b == b'\r' {
                if !self.partial.is_empty() {
                    let line = String::from_utf8_lossy(&self.partial).into_owned();
                    self.progress.console_line(&line);
                    self.partial.clear();
                }
            } else if self.partial.len() < 4096 {
                self.partial.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_phases_come_from_the_console() {
        assert_eq!(
            console_phase("[    0.000000] Linux version 6.1.0 (gcc ...)"),
            Some("booting the guest kernel")
        );
        assert_eq!(
            console_phase("[    1.2] Trying to unpack rootfs image as initramfs..."),
            Some("unpacking the guest's initramfs")
        );
        assert_eq!(
            console_phase("[    2.76] Run /init as init process"),
            Some("running the guest's /init")
        );
        assert_eq!(console_phase("[    2.8] random: crng init done"), None);
        assert_eq!(elapsed(Duration::from_millis(12_345)), "12.3s");
        assert_eq!(elapsed(Duration::from_secs(65)), "1m05s");
    }
}
