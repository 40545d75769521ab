//! A client of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{Op, Request, PROTOCOL_VERSION};

/// Sends one request and returns the reply object (an error if `ok` is false).
pub fn call(socket: &Path, op: Op) -> Result<Value> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let req = Request {
        v: PROTOCOL_VERSION,
        id: Some(1),
        op,
    };
    writeln!(s, "{}", serde_json::to_string(&req)?)?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).with_context(|| format!("bad reply {line:?}"))?;
    if v["ok"] != Value::Bool(true) {
        bail!("{}", v["error"].as_str().unwrap_or("request failed"));
    }
    Ok(v)
}
