//! The gdb stub's connection to the VM: one control-socket connection on
//! which requests get replies in order, while the `debug` op's events
//! arrive between them. A reader thread splits the two.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde_json::Value;

use crate::api::{Op, Request, PROTOCOL_VERSION};

/// Longest wait for one reply (a `stop` or `step` waits seconds in the VM
/// at most; a VM that answers nothing for this long is gone).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A control-socket connection carrying a debugger's requests and events.
pub struct Remote {
    writer: UnixStream,
    replies: Receiver<Value>,
    /// The `debug` op's events (the `event` object of each event line).
    pub events: Receiver<Value>,
    next_id: u64,
}

impl Remote {
    /// Connects to the control socket at `socket`.
    pub fn connect(socket: &Path) -> Result<Self> {
        let writer = UnixStream::connect(socket)
            .with_context(|| format!("cannot connect to {}", socket.display()))?;
        let reader = writer.try_clone()?;
        let (reply_tx, replies) = crossbeam_channel::unbounded();
        let (event_tx, events) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("gdb-remote".into())
            .spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        log::warn!("gdbserver: unreadable line from the VM: {line:?}");
                        continue;
                    };
                    let sent = match v.get("event") {
                        Some(e) => event_tx.send(e.clone()).is_ok(),
                        None => reply_tx.send(v).is_ok(),
                    };
                    if !sent {
                        break;
                    }
                }
            })?;
        Ok(Self {
            writer,
            replies,
            events,
            next_id: 1,
        })
    }

    /// Sends `op` and returns its reply (an error if `ok` is false).
    pub fn call(&mut self, op: Op) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            v: PROTOCOL_VERSION,
            id: Some(id),
            op,
        };
        writeln!(self.writer, "{}", serde_json::to_string(&req)?)
            .context("the VM's control socket is closed")?;
        let reply = match self.replies.recv_timeout(REPLY_TIMEOUT) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => bail!("the VM did not answer within 60 s"),
            Err(RecvTimeoutError::Disconnected) => bail!("the VM's control socket closed"),
        };
        if reply["ok"] != Value::Bool(true) {
            return Err(anyhow!(
                "{}",
                reply["error"].as_str().unwrap_or("request failed")
            ));
        }
        Ok(reply)
    }
}
