//! The host end of the guest image's control protocol (images/README.md):
//! line-based, on the guest's ttyS1.
//!
//! Guest to host: `HVTRACE-BOOTED <uptime>`, `HVTRACE-READY`,
//! `HVTRACE-EXIT <status>`, `HVTRACE-ERROR <text>`, `HVTRACE-POWEROFF`.
//! Host to guest: `RUN <base64 of a shell script>` and `POWEROFF`.

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

/// The request line that makes init run `argv` (exactly these words, no
/// further shell interpretation on the host side).
pub fn run_request(argv: &[String]) -> String {
    script_request(argv, "")
}

/// Like [`run_request`], but the shell that init starts for the command
/// `exec`s it, so the command runs in that very process and its execve
/// has exactly `argv` (what `hvtrace trace` waits for).
pub fn exec_request(argv: &[String]) -> String {
    script_request(argv, "exec ")
}

fn script_request(argv: &[String], prefix: &str) -> String {
    let script: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    let script = format!("{prefix}{}\n", script.join(" "));
    format!(
        "RUN {}\n",
        base64::engine::general_purpose::STANDARD.encode(script)
    )
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
        let line = run_request(&argv);
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
}
