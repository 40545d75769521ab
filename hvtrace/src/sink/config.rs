//! The sink's URL, `nats://HOST[:PORT][/SUBJECT][?KEY=VALUE&...]`, and
//! the ids that go into subjects: parsed and checked before anything is
//! traced, so a typo is a clear error and never a half-traced run.

use std::time::Duration;

use anyhow::{bail, Context, Result};

/// NATS's default client port.
pub const DEFAULT_PORT: u16 = 4222;
/// The subject prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "hvtrace";

/// Where and how events are published.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    /// The URL as given (for messages).
    pub url: String,
    /// `HOST:PORT`, as the client connects to it.
    pub server: String,
    /// Subject prefix: events go to `PREFIX.VM.KIND`.
    pub prefix: String,
    /// JetStream stream holding `PREFIX.>` (`?stream=`; default: the
    /// prefix upper-cased, dots as underscores: `HVTRACE`).
    pub stream: String,
    /// `?max_age=`: how long the stream keeps an event (None: forever).
    pub max_age: Option<Duration>,
    /// `?max_bytes=`: the stream's size limit, oldest events discarded
    /// first (None: no limit).
    pub max_bytes: Option<u64>,
    /// `?dup_window=`: how long JetStream remembers message ids to drop
    /// resends (default 2 minutes, JetStream's own).
    pub dup_window: Duration,
    /// `?queue=`: events held in memory before spilling to disk.
    pub queue: usize,
    /// `?spill_max=`: the spill file's limit; past it events are dropped
    /// (and the drop published as an event).
    pub spill_max: u64,
    /// `?spill_dir=`: where spill files go (default: the cache's `spill/`).
    pub spill_dir: Option<std::path::PathBuf>,
    /// `?linger=`: how long the end of a trace waits for undelivered
    /// events to reach the server before keeping them in a file.
    pub linger: Duration,
    /// Which of the retention settings the URL set (an existing stream
    /// is updated to them; unset ones are left as they are).
    pub retention_given: bool,
}

impl SinkConfig {
    /// Parses and checks `url`.
    pub fn parse(url: &str) -> Result<SinkConfig> {
        let usage = "expected nats://HOST[:PORT][/SUBJECT][?KEY=VALUE&...]";
        let Some(rest) = url.strip_prefix("nats://") else {
            bail!("sink `{url}` is not a nats:// URL ({usage})");
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, subject) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = split_host_port(authority)
            .with_context(|| format!("sink `{url}`: bad host or port ({usage})"))?;
        let prefix = if subject.is_empty() {
            DEFAULT_PREFIX.to_string()
        } else {
            check_subject(subject).with_context(|| format!("sink `{url}`"))?;
            subject.to_string()
        };
        let mut c = SinkConfig {
            url: url.to_string(),
            server: if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            },
            stream: prefix.to_ascii_uppercase().replace('.', "_"),
            prefix,
            max_age: None,
            max_bytes: None,
            dup_window: Duration::from_secs(120),
            queue: 8192,
            spill_max: 1 << 30,
            spill_dir: None,
            linger: Duration::from_secs(30),
            retention_given: false,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("sink `{url}`: `{pair}` is not KEY=VALUE"))?;
            let bad = |what: &str| format!("sink `{url}`: {k}=`{v}` is not {what}");
            match k {
                "stream" => {
                    check_token(v).with_context(|| bad("a stream name"))?;
                    c.stream = v.to_string();
                }
                "max_age" => {
                    c.max_age = Some(parse_duration(v).with_context(|| bad("a duration"))?);
                    c.retention_given = true;
                }
                "max_bytes" => {
                    c.max_bytes = Some(parse_size(v).with_context(|| bad("a size"))?);
                    c.retention_given = true;
                }
                "dup_window" => {
                    c.dup_window = parse_duration(v).with_context(|| bad("a duration"))?;
                    c.retention_given = true;
                }
                "queue" => {
                    c.queue = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .with_context(|| bad("a positive count"))?
                }
                "spill_max" => c.spill_max = parse_size(v).with_context(|| bad("a size"))?,
                "linger" => c.linger = parse_duration(v).with_context(|| bad("a duration"))?,
                "spill_dir" if v.starts_with('/') => c.spill_dir = Some(v.into()),
                "spill_dir" => bail!("{}", bad("an absolute path")),
                _ => bail!(
                    "sink `{url}`: unknown parameter `{k}` (known: stream, max_age, max_bytes, \
                     dup_window, queue, spill_max, spill_dir, linger)"
                ),
            }
        }
        Ok(c)
    }

    /// The subject of VM `vm`'s events of kind `kind`.
    pub fn subject(&self, vm: &str, kind: &str) -> String {
        format!("{}.{vm}.{kind}", self.prefix)
    }

    /// The subjects a consumer reads: one VM's (`PREFIX.VM.>`) or all
    /// (`PREFIX.>`), of one kind (`PREFIX.VM.KIND`, `PREFIX.*.KIND`) or all.
    pub fn filter(&self, vm: Option<&str>, kind: Option<&str>) -> String {
        match (vm, kind) {
            (Some(vm), Some(kind)) => format!("{}.{vm}.{kind}", self.prefix),
            (Some(vm), None) => format!("{}.{vm}.>", self.prefix),
            (None, Some(kind)) => format!("{}.*.{kind}", self.prefix),
            (None, None) => format!("{}.>", self.prefix),
        }
    }
}

fn split_host_port(authority: &str) -> Result<(&str, u16)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').context("unclosed `[`")?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        bail!("no host");
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || "@/?#".contains(c))
    {
        bail!("`{host}` is not a host name");
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .with_context(|| format!("`{p}` is not a port"))?,
    };
    Ok((host, port))
}

/// A subject prefix: dot-separated tokens of letters, digits, `_` and `-`
/// (NATS forbids empty tokens, spaces and the wildcards `*` and `>`; the
/// rest is kept to what a stream name and a shell take without quoting).
pub fn check_subject(subject: &str) -> Result<()> {
    for token in subject.split('.') {
        check_token(token).with_context(|| format!("subject `{subject}`"))?;
    }
    Ok(())
}

/// One subject token (a VM id, a stream name): 1 to 64 letters, digits,
/// `_` or `-`.
pub fn check_token(token: &str) -> Result<()> {
    if token.is_empty() {
        bail!("empty name (two dots, or a dot at an end)");
    }
    if token.len() > 64 {
        bail!("`{token}` is longer than 64 characters");
    }
    if let Some(c) = token
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        bail!("`{token}` has the character {c:?} (only letters, digits, `_` and `-` are allowed)");
    }
    Ok(())
}

/// `90`, `90s`, `15m`, `2h`, `7d` (plain numbers are seconds).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let (n, unit) = split_number(s)?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("unknown unit `{unit}` (s, m, h, d)"),
    };
    Ok(Duration::from_secs(
        n.checked_mul(secs).context("too long")?,
    ))
}

/// `4096`, `64K`, `512M`, `2G` (binary units; plain numbers are bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let (n, unit) = split_number(s)?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => bail!("unknown unit `{unit}` (K, M, G, T)"),
    };
    n.checked_mul(1 << shift).context("too large")
}

fn split_number(s: &str) -> Result<(u64, &str)> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n = s[..digits].parse().context("no number")?;
    Ok((n, &s[digits..]))
}

/// A default VM id: this host's name, hvtrace's pid and the start time in
/// milliseconds (base 36), unique per sink so two sinks never share
/// message ids.
pub fn default_vm_id() -> String {
    let host: String = host_name()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(32)
        .collect();
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    format!("{host}-{}-{}", std::process::id(), base36(ms))
}

fn base36(mut n: u64) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// This host's name (the kernel's).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_url_is_parsed() {
        let c = SinkConfig::parse(
            "nats://127.0.0.1:4333/fleet.eu?max_age=7d&max_bytes=1G&dup_window=5m&queue=10&spill_max=64M&linger=3s&stream=FLEET&spill_dir=/var/tmp/s",
        )
        .unwrap();
        assert_eq!(c.server, "127.0.0.1:4333");
        assert_eq!(c.prefix, "fleet.eu");
        assert_eq!(c.stream, "FLEET");
        assert_eq!(c.max_age, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(c.max_bytes, Some(1 << 30));
        assert_eq!(c.dup_window, Duration::from_secs(300));
        assert_eq!((c.queue, c.spill_max), (10, 64 << 20));
        assert_eq!(c.linger, Duration::from_secs(3));
        assert_eq!(c.spill_dir, Some("/var/tmp/s".into()));
        assert!(c.retention_given);
        assert_eq!(c.subject("vm-1", "syscall"), "fleet.eu.vm-1.syscall");
        assert_eq!(c.filter(Some("vm-1"), None), "fleet.eu.vm-1.>");
        assert_eq!(c.filter(None, Some("exit")), "fleet.eu.*.exit");
    }

    #[test]
    fn defaults_fill_what_the_url_leaves_out() {
        let c = SinkConfig::parse("nats://localhost").unwrap();
        assert_eq!(c.server, "localhost:4222");
        assert_eq!(
            (c.prefix.as_str(), c.stream.as_str()),
            ("hvtrace", "HVTRACE")
        );
        assert_eq!((c.max_age, c.max_bytes), (None, None));
        assert!(!c.retention_given);
        let c = SinkConfig::parse("nats://[::1]:5000/a.b").unwrap();
        assert_eq!(
            (c.server.as_str(), c.stream.as_str()),
            ("[::1]:5000", "A_B")
        );
    }

    #[test]
    fn bad_urls_are_refused_with_the_reason() {
        for (url, why) in [
            ("http://localhost:4222", "not a nats:// URL"),
            ("localhost:4222", "not a nats:// URL"),
            ("nats://", "bad host or port"),
            ("nats://:4222", "bad host or port"),
            ("nats://host:99999", "bad host or port"),
            ("nats://host:x", "bad host or port"),
            ("nats://host/a..b", "empty name"),
            ("nats://host/a.*", "'*'"),
            ("nats://host/a.>", "'>'"),
            ("nats://host/a b", "' '"),
            ("nats://host/a.", "empty name"),
            (
                "nats://host?max_age=soon",
                "max_age=`soon` is not a duration",
            ),
            ("nats://host?max_bytes=1Q", "is not a size"),
            ("nats://host?queue=0", "is not a positive count"),
            (
                "nats://host?retention=work",
                "unknown parameter `retention`",
            ),
            ("nats://host?stream=a.b", "is not a stream name"),
            ("nats://host?oops", "is not KEY=VALUE"),
            ("nats://host?spill_dir=rel", "is not an absolute path"),
        ] {
            let e = format!("{:#}", SinkConfig::parse(url).unwrap_err());
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[test]
    fn default_ids_are_valid_tokens() {
        let id = default_vm_id();
        check_token(&id).unwrap();
        assert!(id.contains(&std::process::id().to_string()), "{id}");
    }
}
