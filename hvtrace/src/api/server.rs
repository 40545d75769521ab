//! Serving the control socket: one thread accepts and reads connections and
//! hands each request to the VM's owner over a channel.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use serde_json::{json, Value};

use super::{parse_request, Op, PROTOCOL_VERSION};

/// A request waiting for the VM owner's answer.
pub struct Pending {
    /// The operation.
    pub op: Op,
    /// Where the answer goes: Ok(extra fields) or Err(message).
    pub reply: Sender<Result<Value, String>>,
    /// The connection it came from.
    pub conn: Conn,
}

/// One client connection, as the VM owner sees it.
#[derive(Clone)]
pub struct Conn {
    /// Unique per server process.
    pub id: u64,
    /// Lines to send the client besides replies (trace events). Bounded:
    /// a client that stops reading loses events, never stalls the guest.
    pub events: Sender<String>,
    /// Events dropped because `events` was full, not yet told to the
    /// client: its writer thread sends `{"event":"lost","count":N}` as soon
    /// as it has written what was queued before them.
    pub lost: Arc<AtomicU64>,
}

/// Event lines a connection may have queued before more are dropped.
const EVENT_QUEUE: usize = 65536;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Writes whole lines to a shared stream.
fn write_line(out: &Mutex<UnixStream>, line: &str) -> std::io::Result<()> {
    let mut s = out.lock().unwrap_or_else(|e| e.into_inner());
    s.write_all(format!("{line}\n").as_bytes())
}

/// A listening control socket; removed when dropped.
pub struct ApiServer {
    path: PathBuf,
    /// Requests from clients.
    pub requests: Receiver<Pending>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn peer_allowed(stream: &UnixStream) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a properly
    // sized and aligned ucred, for a socket fd we own.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    rc == 0 && (cred.uid == me || cred.uid == 0)
}

fn serve(stream: UnixStream, tx: Sender<Pending>) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let out = Arc::new(Mutex::new(stream));
    let (etx, erx) = bounded::<String>(EVENT_QUEUE);
    let lost = Arc::new(AtomicU64::new(0));
    let conn = Conn {
        id: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
        events: etx,
        lost: lost.clone(),
    };
    let event_out = out.clone();
    let _ = std::thread::Builder::new()
        .name("api-events".into())
        .spawn(move || {
            for line in erx {
                if write_line(&event_out, &line).is_err() {
                    return;
                }
                let n = lost.swap(0, Ordering::Relaxed);
                if n > 0 {
                    let notice = json!({
                        "v": PROTOCOL_VERSION,
                        "event": {"event": "lost", "count": n},
                    });
                    if write_line(&event_out, &notice.to_string()).is_err() {
                        return;
                    }
                }
            }
        });
    serve_requests(read_half, &out, &tx, &conn);
    // Closed or killed client: its engines go.
    let (rtx, _rrx) = bounded(1);
    let _ = tx.send(Pending {
        op: Op::Disconnected,
        reply: rtx,
        conn,
    });
}

fn serve_requests(
    read_half: UnixStream,
    out: &Mutex<UnixStream>,
    tx: &Sender<Pending>,
    conn: &Conn,
) {
    for line in BufReader::new(read_half).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match parse_request(&line) {
            Err(e) => json!({"v": PROTOCOL_VERSION, "ok": false, "error": e}),
            Ok(req) => {
                let (rtx, rrx) = bounded(1);
                let answer = if tx
                    .send(Pending {
                        op: req.op,
                        reply: rtx,
                        conn: conn.clone(),
                    })
                    .is_err()
                {
                    Err("the VM is shutting down".to_string())
                } else {
                    rrx.recv()
                        .unwrap_or_else(|_| Err("the VM is shutting down".to_string()))
                };
                let mut v = match answer {
                    Ok(Value::Object(extra)) => {
                        let mut m = serde_json::Map::new();
                        m.insert("ok".into(), Value::Bool(true));
                        m.extend(extra);
                        Value::Object(m)
                    }
                    Ok(_) => json!({"ok": true}),
                    Err(e) => json!({"ok": false, "error": e}),
                };
                v["v"] = json!(PROTOCOL_VERSION);
                if let Some(id) = req.id {
                    v["id"] = json!(id);
                }
                v
            }
        };
        if write_line(out, &reply.to_string()).is_err() {
            return;
        }
    }
}

impl ApiServer {
    /// Checks that `path` can become the control socket: absent, or a
    /// stale socket (one no VM answers on). A regular file, directory or
    /// symbolic link there is refused, so a mistyped `--api-sock` never
    /// deletes a user's file. Returns whether a stale socket is there.
    pub fn check_path(path: &Path) -> Result<bool> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => anyhow::bail!(
                "{} exists and is not a socket; refusing to replace it (choose another --api-sock path)",
                path.display()
            ),
            Ok(_) => {
                if UnixStream::connect(path).is_ok() {
                    anyhow::bail!("{} is in use by another running VM", path.display());
                }
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot look at {}", path.display())),
        }
    }

    /// Binds `path` (mode 0600) and starts accepting connections, after
    /// [`ApiServer::check_path`]; only a stale socket is removed first.
    pub fn bind(path: &Path) -> Result<Self> {
        if Self::check_path(path)? {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new().name("api-accept".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                if !peer_allowed(&stream) {
                    let mut s = stream;
                    let _ = writeln!(s, "{}", json!({"v": PROTOCOL_VERSION, "ok": false, "error": "permission denied"}));
                    continue;
                }
                let tx = tx.clone();
                let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || serve(stream, tx));
            }
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            requests: rx,
        })
    }
}
