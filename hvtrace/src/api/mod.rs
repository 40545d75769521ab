//! The control socket of a running VM: JSON lines over a Unix socket.
//!
//! Protocol version 1. Each request is one JSON object on one line; each
//! gets exactly one reply line. Requests:
//!
//! * `{"v":1,"op":"ping"}` -> `{"v":1,"ok":true,"kind":"PVM KVM","vcpus":1,"placement":{"virt_offset":"0x..","phys_start":"0x.."}}`
//! * `{"v":1,"op":"snapshot","path":"/abs/file.snap"}` -> `{"v":1,"ok":true,"bytes":N}`
//! * `{"v":1,"op":"shutdown"}` -> `{"v":1,"ok":true}`, then the VM stops
//! * `{"v":1,"op":"ps"}` -> `{"v":1,"ok":true,"kernel":{..},"tasks":[{"pid":1,"tid":1,"ppid":0,"comm":"init","state":"S",..},..]}`;
//!   optional `"kernel"` and `"system_map"` paths choose the symbol/type source
//!   (default: the VM's own kernel file, or guest memory for a restored VM)
//! * `{"v":1,"op":"sites"}` -> `{"v":1,"ok":true,"kernel":{..},"sites":[{"event":"EXIT","symbol":"do_exit","addr":..,"runtime":"0x..",..}],"errors":[]}`
//! * `{"v":1,"op":"inspect","pid":N}` -> `{"v":1,"ok":true,"task":{..},"exe":"/bin/sleep","user_regs":{..},"syscall":{"nr":35,"args":[..]}}`
//!
//! * `{"v":1,"op":"attach","pid":N,"follow":false,"trace":["openat"],"string_limit":32}`
//!   -> `{"v":1,"ok":true,"tids":[N,..]}` (`trace` items, joined with
//!   commas, are a strace set: names, numbers, `%class`, `/regex`, `?`,
//!   a leading `!`; `"signal":"!SIGCHLD"` chooses the signals shown the
//!   same way; `"decode_fds":true` is strace's `-y`, `"status":"failed"` its `-e status=`); from then on the connection also
//!   carries the trace of process N (every thread; with `follow`, new
//!   children too), one event per line, possibly before the reply:
//!   `{"v":1,"event":{"pid":N,"syscall":"openat","line":"openat(AT_FDCWD, \"/x\", O_RDONLY) = 3","ret":3,..}}`,
//!   `{"v":1,"event":{"pid":N,"event":"exit","code":0}}` (or `"killed"`
//!   with `"signal"`). With `"entries":true` each call also gets a record
//!   at its entry, `{"pid":N,"syscall":"read","phase":"entry","line":"read(3, "}`,
//!   and its exit record a `"rest"` (the line after that start): enough to
//!   print strace's `<unfinished ...>`/`<... read resumed>` lines (the
//!   client's `utrace::strace::text::TextRenderer` does). Events are queued per connection (65536 lines); a
//!   client that stops reading loses events, never stalls the guest; it is
//!   told so once the events queued before them are written,
//!   `{"v":1,"event":{"event":"lost","count":N}}`, and `run --report`
//!   counts them (`events_lost`). When the client closes
//!   the connection (or is killed) its engines are detached and its
//!   threads run on untraced; when no engine is left the tracer's traps
//!   are removed and the kernel text is as it was. With `"steps":"single"`
//!   (or `"block"`, and `"intel":true` for Intel syntax) the process's
//!   threads also step, each instruction (or block) an event
//!   `{"pid":N,"event":"step","line":"401000 <_start>:\tmov (%rsp),%rcx"}`.
//! * `{"v":1,"op":"detach"}` -> `{"v":1,"ok":true,"engines":N}`: the same,
//!   keeping the connection.
//! * `{"v":1,"op":"stop","pid":N}` (or `"tid":N` for one thread) ->
//!   `{"v":1,"ok":true,"tids":[N,..],"stopped":[N,..],"pending":[..]}`:
//!   every thread of process N is held stopped (utrace's STOP from an engine
//!   of the VM's own) until `cont`, a SIGKILL inside the guest, or the VM's
//!   end; the reply comes once all are parked or after `wait_ms` (default
//!   2000): a thread blocked in a system call stops when the call returns
//!   (`pending`), or at once with `"interrupt":true` (the call restarts
//!   when it is released, as after INTERRUPT). With `"until_close":true`
//!   the stop is this connection's and ends when it closes (or the client
//!   is killed).
//! * `{"v":1,"op":"cont","pid":N}` (or `"tid":N`) -> `{"v":1,"ok":true,"released":[N,..]}`.
//!   With `"tid":N,"signal":S` the thread takes signal S as it goes on (as
//!   `signal` sends it: siginfo `SI_KERNEL`); the reply then waits for that.
//! * `{"v":1,"op":"debug","pid":N}` (or `"exec":["/bin/prog","arg"]`) ->
//!   `{"v":1,"ok":true,"tids":[..]}`: what a debugger needs (`hvtrace
//!   gdbserver`): every thread of process N (or of the next process to exec
//!   that argv, held before its first instruction) is held stopped at each
//!   signal it takes, the signal withheld until a `cont` with `signal`
//!   gives it back. Events: `{"debug":"exec"|"signal"|"thread"|"exit",..}`
//!   (see `api::debugger`). A `stop` of a thread takes over its hold. Ends
//!   with `detach` or the connection.
//! * `{"v":1,"op":"interrupt","pid":N}` (or `"tid":N`) ->
//!   `{"v":1,"ok":true,"tids":[..],"reported":[[TID,MS],..]}`: utrace's
//!   INTERRUPT from an engine of the VM's own: a thread asleep in an
//!   interruptible call wakes at once and reports (report_signal with no
//!   signal), MS milliseconds after the request; the call is then restarted
//!   as the kernel restarts a call interrupted with no signal to deliver.
//!   The reply waits for every report or `wait_ms` (default 2000).
//! * `{"v":1,"op":"signal","pid":N,"signal":S}` (or `"tid":N`) ->
//!   `{"v":1,"ok":true,"tids":[N],"reported":[[N,MS]]}`: signal S sent to
//!   the thread (a process's main thread) from outside: INTERRUPT, and at
//!   its report the thread itself calls the kernel's `send_sig(S, current,
//!   1)`; it takes the signal on its way back to user mode (siginfo
//!   `SI_KERNEL`, as a signal the kernel sends).
//! * `{"v":1,"op":"regs","tid":N,"set":{"ip":"0x401000"}}` ->
//!   `{"v":1,"ok":true,"regs":{"ax":"0x..",..},"fs_base":"0x..","gs_base":"0x..","fpu":{"fcw":..,"mxcsr":..,"xmm0":..},"fxsave":"hex"}`:
//!   a stopped thread's user registers and (read only) FPU/SSE registers
//!   (`fxsave`: the whole 512-byte FXSAVE image)
//!   (EBUSY if it is not stopped), after
//!   setting those in the optional `set` (ptrace's rules: no segment
//!   selectors, only user RFLAGS bits; `fs_base` and `gs_base` below the
//!   end of the user half, written with every vCPU paused).
//! * `{"v":1,"op":"mem","pid":N,"addr":"0x..","len":L}` -> `{"v":1,"ok":true,"data":"hex"}`;
//!   with `"write":"hex"` instead of `len`, writes as ptrace does (a private
//!   read-only page is copied for this process only). The process must have
//!   a thread held by `stop`, or it is stopped for the access and released.
//! * `{"v":1,"op":"step","tid":N,"count":1,"blocks":false}` ->
//!   `{"v":1,"ok":true,"steps":1,"ip":"0x..","ms":..,"regs":{..},..}`: a
//!   thread held by `stop` runs `count` user instructions (or blocks:
//!   emulated, to the next taken branch) and is held again; the reply is
//!   `regs`' with the steps made and where the thread is.
//! * `{"v":1,"op":"text_hash"}` -> `{"v":1,"ok":true,"sha256":"..","bytes":N,"traps":N}`:
//!   SHA-256 of the guest kernel's text (`_text`..`_etext`) as it is in
//!   guest memory, and how many of the tracer's traps are set.
//!
//! A request may carry an `"id"`, echoed in its reply. A malformed request
//! or an unknown op gets `{"v":1,"ok":false,"error":"..."}` and the
//! connection stays usable. The socket is created with mode 0600 and only
//! peers with the server's uid (or root) are served.

pub mod client;
pub mod debugger;
pub mod handler;
pub mod server;

/// Events dropped in this process because a client's queue was full
/// (`run --report`'s `events_lost`).
pub static EVENTS_LOST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Trace a running process on this connection.
    Attach {
        /// Process id.
        pid: i32,
        /// Follow new children and threads.
        #[serde(default)]
        follow: bool,
        /// Only these system calls (default: all): the items joined with
        /// commas are one strace set (`["%file","read"]`, `["!/^get"]`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<Vec<String>>,
        /// Only these signals' `signal` events, a strace set
        /// (`"!SIGCHLD"`, `"none"`; default: all).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
        /// File descriptors shown with their files' paths (`strace -y`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        decode_fds: bool,
        /// Only calls that ended so, a strace status set (`"failed"`,
        /// `"!successful"`; default: all).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<String>,
        /// Longest string shown.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        string_limit: Option<usize>,
        /// Also send a record at each call's entry, and the rest of the
        /// line in each exit record, to render strace's text with
        /// `<unfinished ...>` (what `hvtrace attach` does without `--json`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        entries: bool,
        /// Also step the threads: `single` (one `step` event per user
        /// instruction) or `block` (one per block).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        steps: Option<String>,
        /// With `steps`: Intel syntax instead of AT&T.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        intel: bool,
    },
    /// Detach this connection's engines.
    Detach,
    /// Hold a process's threads (or one thread) stopped.
    Stop {
        /// Process id (every thread).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
        /// One thread.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tid: Option<i32>,
        /// Longest wait for the threads to stop, in milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_ms: Option<u64>,
        /// The stop ends when this connection closes.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        until_close: bool,
        /// Wake threads asleep in interruptible calls to stop them at once
        /// (their calls restart when released).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        interrupt: bool,
    },
    /// utrace's INTERRUPT of a process's threads (or one thread), waiting
    /// for each to report.
    Interrupt {
        /// Process id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
        /// One thread.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tid: Option<i32>,
        /// Longest wait for the reports, in milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_ms: Option<u64>,
    },
    /// Sends a thread a signal from outside: INTERRUPT, then the thread
    /// is sent `signal` at its report, and takes it next.
    Signal {
        /// Process id: its main thread is sent the signal.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
        /// This thread.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tid: Option<i32>,
        /// Signal number (1-64).
        signal: i32,
    },
    /// A stopped thread's user registers, after setting `set` (names as
    /// in `user_regs`: `ip`, `sp`, `ax`, ...; values as numbers or
    /// `0x` strings).
    Regs {
        /// Thread id.
        tid: i32,
        /// Registers to set first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set: Option<std::collections::BTreeMap<String, Value>>,
    },
    /// Step a thread held by `stop` for `count` user instructions (or
    /// blocks, with `blocks`), and hold it again; replies with where it
    /// is (`ip`), the steps made and its registers.
    Step {
        /// Thread id.
        tid: i32,
        /// Steps (default 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
        /// Block steps instead of single steps.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        blocks: bool,
    },
    /// Read (`len`) or write (`write`, hex) a process's memory.
    Mem {
        /// Process id.
        pid: i32,
        /// User address (a number or a `0x` string).
        addr: Value,
        /// Bytes to read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        len: Option<usize>,
        /// Bytes to write, as hex.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        write: Option<String>,
    },
    /// Release the stops `stop` set on a process's threads (or one thread).
    Cont {
        /// Process id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
        /// One thread.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tid: Option<i32>,
        /// With `tid`: the thread takes this signal as it goes on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
    /// Debug a process on this connection: its threads stop at every
    /// signal (and at the armed exec), each stop an event.
    Debug {
        /// The running process.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
        /// Or the next process to exec this argv, held at its first
        /// instruction.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exec: Option<Vec<String>>,
    },
    /// Hash of the guest kernel text.
    TextHash,
    /// The connection closed (sent by the server itself, never parsed).
    #[serde(skip)]
    Disconnected,
    /// Liveness and facts.
    Ping,
    /// Save the VM to a file.
    Snapshot {
        /// Destination path (on the server's filesystem).
        path: String,
    },
    /// Stop the VM.
    Shutdown,
    /// List every task (vCPUs paused for the duration of the walk).
    Ps {
        /// Kernel file for symbols and types, instead of the default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kernel: Option<String>,
        /// System.map to use with `kernel`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        system_map: Option<String>,
    },
    /// Each utrace event's site in the running kernel, at its runtime
    /// (KASLR-shifted) address.
    Sites,
    /// Every vCPU's state and kernel stack and, with `all`, every task's
    /// kernel stack (vCPUs paused for the duration of the walk).
    Stacks {
        /// Every task too, not only what runs on the vCPUs.
        #[serde(default)]
        all: bool,
    },
    /// Details of one task.
    Inspect {
        /// Thread id.
        pid: i32,
        /// Kernel file for symbols and types, instead of the default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kernel: Option<String>,
        /// System.map to use with `kernel`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        system_map: Option<String>,
    },
}

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version.
    pub v: u32,
    /// Optional request id, echoed back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The operation.
    #[serde(flatten)]
    pub op: Op,
}

/// Parses a request line, checking the version.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let req: Request = serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))?;
    if req.v != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} not supported (server speaks {PROTOCOL_VERSION})",
            req.v
        ));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_rejects_bad_ones() {
        assert_eq!(
            parse_request(r#"{"v":1,"op":"ping"}"#).unwrap().op,
            Op::Ping
        );
        let r = parse_request(r#"{"v":1,"id":7,"op":"snapshot","path":"/tmp/x"}"#).unwrap();
        assert_eq!(
            (r.id, r.op),
            (
                Some(7),
                Op::Snapshot {
                    path: "/tmp/x".into()
                }
            )
        );
        assert!(parse_request("not json").unwrap_err().contains("malformed"));
        assert!(parse_request(r#"{"v":1,"op":"fly"}"#).is_err());
        assert!(parse_request(r#"{"v":2,"op":"ping"}"#)
            .unwrap_err()
            .contains("version"));
        assert!(parse_request(r#"{"v":1,"op":"snapshot"}"#).is_err());
    }
}
