//! One JetStream message per event: its JSON body, its subject and its
//! message id (`Nats-Msg-Id`, which JetStream uses to drop resends).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use utrace::strace::record::Record;
use utrace::strace::Emitted;

/// What every message of one sink says about where it comes from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The VM's id (a subject token).
    pub vm: String,
    /// The host hvtrace runs on.
    pub host: String,
}

/// The kind of an event: the last token of its subject and the `kind`
/// field of its message.
pub fn kind(record: &Record) -> &'static str {
    match record {
        Record::Entry { .. } => "entry",
        Record::Call(_) => "syscall",
        Record::Signal { .. } => "signal",
        Record::Exited { .. } => "exit",
        Record::Killed { .. } => "killed",
    }
}

/// The kind of a message reporting dropped events.
pub const DROPPED: &str = "dropped";

/// The message id of event `seq` of VM `vm`.
pub fn msg_id(vm: &str, seq: u64) -> String {
    format!("{vm}:{seq}")
}

/// The body of event number `seq`: the engine's JSON record (`pid` is the
/// thread id, as strace's), with `vm`, `host`, `seq`, `time`, `kind` and
/// `tid`.
pub fn event(origin: &Origin, seq: u64, time: SystemTime, e: &Emitted) -> Value {
    let mut v = e.to_json();
    v["tid"] = e.record.pid().into();
    stamp(&mut v, origin, seq, time, kind(&e.record));
    v
}

/// The body of the message that reports `count` events dropped (the
/// sink's queue and spill file were full).
pub fn dropped(origin: &Origin, seq: u64, time: SystemTime, count: u64) -> Value {
    let mut v = json!({ "count": count });
    stamp(&mut v, origin, seq, time, DROPPED);
    v
}

/// The line `hvtrace events` prints for a message reporting drops.
pub fn dropped_line(count: u64) -> String {
    format!("+++ hvtrace: {count} events dropped (the sink's queue and spill file were full) +++")
}

fn stamp(v: &mut Value, origin: &Origin, seq: u64, time: SystemTime, kind: &str) {
    v["vm"] = origin.vm.as_str().into();
    v["host"] = origin.host.as_str().into();
    v["seq"] = seq.into();
    v["time"] = rfc3339(time).into();
    v["kind"] = kind.into();
}

/// `2025-01-31T12:34:56.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Howard Hinnant's days-to-civil.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_utc_rfc3339() {
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123456Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn an_event_message_has_what_a_consumer_needs() {
        let origin = Origin {
            vm: "vm-1".into(),
            host: "h".into(),
        };
        let e = Emitted {
            record: Record::Exited { pid: 9, code: 3 },
            tgid: 8,
            args: None,
        };
        let v = event(&origin, 42, UNIX_EPOCH, &e);
        for (k, want) in [
            ("vm", json!("vm-1")),
            ("host", json!("h")),
            ("seq", json!(42)),
            ("kind", json!("exit")),
            ("tid", json!(9)),
            ("pid", json!(9)),
            ("tgid", json!(8)),
            ("code", json!(3)),
            ("time", json!("1970-01-01T00:00:00.000000Z")),
        ] {
            assert_eq!(v[k], want, "{k} in {v}");
        }
        assert_eq!(Emitted::from_json(&v), Some(e));
        assert_eq!(msg_id("vm-1", 42), "vm-1:42");
        let d = dropped(&origin, 43, UNIX_EPOCH, 7);
        assert_eq!(
            (d["kind"].as_str(), d["count"].as_u64()),
            (Some("dropped"), Some(7))
        );
    }
}
