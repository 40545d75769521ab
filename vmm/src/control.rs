//! The host end of the guest image's control protocol (images/README.md):
//! line-based, on the guest's ttyS1.
//!
//! Guest to host: `HVTRACE-BOOTED <uptime>`, `HVTRACE-READY`,
//! `HVTRACE-EXIT <status>`, `HVTRACE-ERROR <text>`, `HVTRACE-POWEROFF`.
//! Host to guest: `SH <one-line shell script>`, `RUN <base64 of a shell
//! script>` (what images before `SH` understand) and `POWEROFF`.
//!
//! `SH` is what the host sends: init runs it in a subshell of its own, so
//! a command costs one fork and the command's exec, where `RUN` costs a
//! `base64` and an `sh` exec besides (each about a second of emulated
//! kernel on PVM). An init that predates `SH` answers it as an unknown
//! request, and the session sends the command again as `RUN`.

use base64::Engine as _;

/// A line the guest's init wrote on the control channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// Init started; guest uptime in seconds as the guest printed it.
    Booted(String),
    /// Init waits for a request.
    Ready,
    /// The requested command ended with this status.
    Exit(i32),
    /// Init reports a problem.
    Error(String),
    /// Init is powering the guest off.
    PowerOff,
    /// Anything else (kept for diagnostics).
    Other(String),
}

impl ControlMessage {
    /// Parses one line (without the newline).
    pub fn parse(line: &str) -> Self {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("HVTRACE-BOOTED") {
            return Self::Booted(rest.trim().to_string());
        }
        if line == "HVTRACE-READY" {
            return Self::Ready;
        }
        if line == "HVTRACE-POWEROFF" {
            return Self::PowerOff;
        }
        if let Some(rest) = line.strip_prefix("HVTRACE-EXIT ") {
            if let Ok(code) = rest.trim().parse() {
                return Self::Exit(code);
            }
        }
        if let Some(rest) = line.strip_prefix("HVTRACE-ERROR") {
            return Self::Error(rest.trim().to_string());
        }
        Self::Other(line.to_string())
    }
}

/// Quotes one argument for a POSIX shell.
pub fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Quotes one argument for busybox ash on a single line: as
/// [`shell_quote`], unless it holds a control character, which `$'...'`
/// then spells as an octal escape (the request is one line).
pub fn shell_quote_one_line(arg: &str) -> String {
    if !arg.chars().any(char::is_control) {
        return shell_quote(arg);
    }
    let mut out = String::from("$'");
    for c in arg.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c if c.is_control() && (c as u32) < 0x100 => {
                out.push_str(&format!("\\{:03o}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// How the command is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// As a command of the shell init runs it in.
    Plain,
    /// `exec`ed by that shell, so it runs in that very process and its
    /// execve has exactly the argv (what `hvtrace trace` waits for).
    Exec,
}

/// The `SH` request line that makes init run `argv` (exactly these words,
/// no further shell interpretation on the host side).
pub fn sh_request(argv: &[String], start: Start) -> String {
    let words: Vec<String> = argv.iter().map(|a| shell_quote_one_line(a)).collect();
    format!("SH {}{}\n", prefix(start), words.join(" "))
}

/// The same command as a `RUN <base64>` request, for an init that predates
/// `SH`.
pub fn run_request(argv: &[String], start: Start) -> String {
    let script: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    let script = format!("{}{}\n", prefix(start), script.join(" "));
    format!(
        "RUN {}\n",
        base64::engine::general_purpose::STANDARD.encode(script)
    )
}

fn prefix(start: Start) -> &'static str {
    match start {
        Start::Plain => "",
        Start::Exec => "exec ",
    }
}

/// The request line that makes init power the guest off.
pub const POWEROFF_REQUEST: &str = "POWEROFF\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_protocol_lines() {
        assert_eq!(
            ControlMessage::parse("HVTRACE-READY"),
            ControlMessage::Ready
        );
        assert_eq!(
            ControlMessage::parse("HVTRACE-EXIT 3"),
            ControlMessage::Exit(3)
        );
        assert_eq!(
            ControlMessage::parse("HVTRACE-BOOTED 12.5"),
            ControlMessage::Booted("12.5".into())
        );
        assert_eq!(
            ControlMessage::parse("HVTRACE-ERROR bad base64"),
            ControlMessage::Error("bad base64".into())
        );
        assert_eq!(
            ControlMessage::parse("HVTRACE-EXIT x"),
            ControlMessage::Other("HVTRACE-EXIT x".into())
        );
    }

    #[test]
    fn run_request_round_trips_through_sh() {
        // Quotes, $, spaces and a newline must reach the program unchanged.
        let argv: Vec<String> = ["printf", "%s|", "it's", "$((6*7))", "a b\nc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let line = run_request(&argv, Start::Plain);
        let b64 = line.strip_prefix("RUN ").unwrap().trim_end();
        let script = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(String::from_utf8(script).unwrap())
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "it's|$((6*7))|a b\nc|"
        );
    }

    #[test]
    fn sh_request_is_one_line_and_round_trips_through_busybox_ash() {
        let argv: Vec<String> = [
            "printf",
            "%s|",
            "it's",
            "$((6*7))",
            "a b\nc",
            "tab\there",
            "back\\slash'q",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let line = sh_request(&argv, Start::Plain);
        let body = line.strip_prefix("SH ").unwrap();
        assert_eq!(body.find('\n'), Some(body.len() - 1), "one line: {line:?}");
        // The guest's shell: busybox ash, as init runs it.
        let out = std::process::Command::new("busybox")
            .args(["sh", "-c", "eval \"$1\"", "sh", body.trim_end()])
            .output()
            .expect("busybox (installed by the project's scripts)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "it's|$((6*7))|a b\nc|tab\there|back\\slash'q|",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(sh_request(&argv, Start::Exec).starts_with("SH exec 'printf' "));
    }
}
