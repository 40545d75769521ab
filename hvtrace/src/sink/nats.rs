//! The NATS side: connecting, creating the stream, and the publisher that
//! drains the queue into JetStream, in order, with a window of messages
//! awaiting their acknowledgment; whatever was not acknowledged when the
//! connection failed is sent again once it is back (JetStream drops the
//! copies it already has by their message id).

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use async_nats::connection::State;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use futures_util::FutureExt;
use tokio::sync::Notify;

use super::config::SinkConfig;
use super::message::msg_id;
use super::queue::{Msg, Queue};

/// How long a request (connecting, a stream lookup, a publish's
/// acknowledgment) may take before the server counts as gone.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages published and not yet acknowledged, at most.
const WINDOW: usize = 1024;
/// How long the publisher lets new messages gather after a wake-up, so
/// they go out (and their acknowledgments come back) in batches rather
/// than one system call and one wake-up each.
const GATHER: Duration = Duration::from_millis(2);

/// A connection to the server and its JetStream context.
pub struct Connection {
    /// The client (it reconnects by itself).
    pub client: async_nats::Client,
    /// JetStream on it.
    pub js: jetstream::Context,
}

/// Connects to the sink's server (failing at once if it cannot be
/// reached; later losses are reconnected by the client).
pub async fn connect(cfg: &SinkConfig) -> Result<Connection> {
    let client = async_nats::ConnectOptions::new()
        .name("hvtrace")
        .connection_timeout(REQUEST_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT))
        .reconnect_delay_callback(|n| Duration::from_millis(100 * n.min(10) as u64))
        .ignore_discovered_servers()
        .connect(cfg.server.as_str())
        .await
        .with_context(|| format!("cannot reach the event sink {}", cfg.url))?;
    let js = jetstream::context::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .ack_timeout(REQUEST_TIMEOUT)
        .max_ack_inflight(1 << 20)
        .build(client.clone());
    Ok(Connection { client, js })
}

/// The stream's configuration as the URL asks for it.
fn stream_config(cfg: &SinkConfig) -> stream::Config {
    stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.prefix)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age: cfg.max_age.unwrap_or(Duration::ZERO),
        max_bytes: cfg.max_bytes.map_or(-1, |b| b.min(i64::MAX as u64) as i64),
        duplicate_window: cfg.dup_window,
        description: Some("hvtrace events (docs/sink.md)".into()),
        ..Default::default()
    }
}

/// Creates the stream if it does not exist; updates an existing one's
/// retention to what the URL sets, if it sets any; checks that it holds
/// the sink's subjects.
pub async fn ensure_stream(conn: &Connection, cfg: &SinkConfig) -> Result<()> {
    let want = stream_config(cfg);
    let hint = "is JetStream enabled on it (nats-server -js)?";
    let stream = conn
        .js
        .get_or_create_stream(want.clone())
        .await
        .with_context(|| {
            format!(
                "cannot create or find stream {} on {} ({hint})",
                cfg.stream, cfg.url
            )
        })?;
    let have = &stream.cached_info().config;
    if !have.subjects.iter().any(|s| *s == want.subjects[0]) {
        bail!(
            "stream {} on {} holds subjects {:?}, not {}: name another with ?stream=",
            cfg.stream,
            cfg.url,
            have.subjects,
            want.subjects[0]
        );
    }
    let differs = have.max_age != want.max_age
        || have.max_bytes != want.max_bytes
        || have.duplicate_window != want.duplicate_window;
    if cfg.retention_given && differs {
        let mut update = have.clone();
        update.max_age = want.max_age;
        update.max_bytes = want.max_bytes;
        update.duplicate_window = want.duplicate_window;
        conn.js
            .update_stream(update)
            .await
            .with_context(|| format!("cannot set the retention of stream {}", cfg.stream))?;
    }
    Ok(())
}

/// Counts kept by a sink (read by `--report`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Events (and drop reports) the server acknowledged.
    pub published: AtomicU64,
    /// Of those, acknowledged as duplicates (a resend it already had).
    pub duplicates: AtomicU64,
    /// Messages sent again after a failure.
    pub resent: AtomicU64,
    /// Events dropped (queue and spill file full).
    pub dropped: AtomicU64,
    /// Times the connection was found gone.
    pub outages: AtomicU64,
}

/// What the publisher shares with the rest of the sink.
pub struct Shared {
    /// Messages waiting.
    pub queue: Mutex<Queue>,
    /// Rung when a message is queued or the queue is closed.
    pub wake: Notify,
    /// The counts.
    pub counters: Counters,
}

impl Shared {
    /// The queue, locked.
    pub fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type AckFuture = Pin<
    Box<
        dyn std::future::Future<
                Output = Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
            > + Send,
    >,
>;

/// Publishes the queue until it is closed and empty, or, once closed,
/// until `cfg.linger` has passed (what is left stays in the queue).
pub async fn publish_all(conn: Connection, cfg: SinkConfig, vm: String, shared: Arc<Shared>) {
    let mut inflight: VecDeque<(Msg, AckFuture)> = VecDeque::new();
    let c = &shared.counters;
    loop {
        let (closed, empty) = {
            let q = shared.queue();
            (q.closed, q.is_empty())
        };
        if closed && empty && inflight.is_empty() {
            return;
        }
        if past_linger(&shared, &cfg) {
            requeue(&shared, &mut inflight, None, false);
            return;
        }
        // Fill the window.
        let mut failed = None;
        while inflight.len() < WINDOW && failed.is_none() {
            // Nothing goes into a client that lost its connection: it
            // would send it after reconnecting, ahead of the resends.
            if conn.client.connection_state() != State::Connected {
                break;
            }
            let Some(m) = shared.queue().pop() else {
                break;
            };
            let publish = PublishMessage::build()
                .payload(m.body.clone().into())
                .message_id(msg_id(&vm, m.seq));
            match conn.js.send_publish(m.subject.clone(), publish).await {
                Ok(ack) => inflight.push_back((m, ack.into_future())),
                Err(e) => {
                    log::info!("sink: publish failed: {e}");
                    failed = Some(m);
                }
            }
        }
        if let Some(m) = failed {
            requeue(&shared, &mut inflight, Some(m), true);
            recover(&conn, &cfg, &shared).await;
            continue;
        }
        let room = inflight.len() < WINDOW;
        let Some((_, ack)) = inflight.front_mut() else {
            tokio::select! {
                _ = shared.wake.notified() => tokio::time::sleep(GATHER).await,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        };
        tokio::select! {
            r = ack => {
                let mut r = Some(r);
                // Take every acknowledgment already there.
                while let Some(result) = r.take() {
                    match result {
                        Ok(ack) => {
                            inflight.pop_front();
                            c.published.fetch_add(1, Relaxed);
                            if ack.duplicate {
                                c.duplicates.fetch_add(1, Relaxed);
                            }
                            r = inflight.front_mut().and_then(|(_, f)| f.now_or_never());
                        }
                        Err(e) => {
                            log::info!("sink: no acknowledgment: {e}");
                            requeue(&shared, &mut inflight, None, true);
                            recover(&conn, &cfg, &shared).await;
                        }
                    }
                }
            }
            _ = shared.wake.notified(), if room => tokio::time::sleep(GATHER).await,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                if conn.client.connection_state() != State::Connected {
                    requeue(&shared, &mut inflight, None, true);
                    recover(&conn, &cfg, &shared).await;
                }
            }
        }
    }
}

/// Puts every message awaiting its acknowledgment (then `failed`) back
/// at the queue's front, counting them as resent if `resend`.
fn requeue(
    shared: &Shared,
    inflight: &mut VecDeque<(Msg, AckFuture)>,
    failed: Option<Msg>,
    resend: bool,
) {
    let msgs: Vec<Msg> = inflight.drain(..).map(|(m, _)| m).chain(failed).collect();
    if resend {
        let c = &shared.counters;
        c.resent.fetch_add(msgs.len() as u64, Relaxed);
        c.outages.fetch_add(1, Relaxed);
    }
    shared.queue().requeue(msgs.into_iter());
}

/// Whether the queue was closed longer than `linger` ago.
fn past_linger(shared: &Shared, cfg: &SinkConfig) -> bool {
    shared
        .queue()
        .closed_at
        .is_some_and(|t| t.elapsed() >= cfg.linger)
}

/// Waits for the client to be connected again and the stream to answer
/// (a server restarted with an empty store gets the stream created
/// again), or until the queue has been closed for `linger`.
async fn recover(conn: &Connection, cfg: &SinkConfig, shared: &Shared) {
    loop {
        if past_linger(shared, cfg) {
            return;
        }
        if conn.client.connection_state() == State::Connected {
            match ensure_stream(conn, cfg).await {
                Ok(()) => return,
                Err(e) => log::info!("sink: {e:#}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes the messages of a spill file a sink left, in order, with
/// their message ids (so what the server already has is dropped again);
/// returns how many were acknowledged and how many of those as
/// duplicates.
pub async fn publish_file(conn: &Connection, path: &std::path::Path) -> Result<(u64, u64)> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut inflight: VecDeque<(u64, AckFuture)> = VecDeque::new();
    let (mut acked, mut duplicates) = (0, 0);
    let mut settle = |r: Result<jetstream::publish::PublishAck, _>, seq: u64| -> Result<()> {
        let ack = r.with_context(|| format!("message {seq} was not acknowledged"))?;
        acked += 1;
        duplicates += u64::from(ack.duplicate);
        Ok(())
    };
    for (n, line) in text.split_inclusive(|&b| b == b'\n').enumerate() {
        let m = super::spill::parse_line(line).with_context(|| {
            format!(
                "{}: line {} is not a spilled message",
                path.display(),
                n + 1
            )
        })?;
        let vm = serde_json::from_slice::<serde_json::Value>(&m.body)
            .ok()
            .and_then(|v| v["vm"].as_str().map(str::to_string))
            .with_context(|| format!("{}: line {} has no vm", path.display(), n + 1))?;
        let publish = PublishMessage::build()
            .payload(m.body.into())
            .message_id(msg_id(&vm, m.seq));
        let ack = conn
            .js
            .send_publish(m.subject, publish)
            .await
            .with_context(|| format!("publishing message {}", m.seq))?;
        inflight.push_back((m.seq, ack.into_future()));
        if inflight.len() >= WINDOW {
            let (seq, f) = inflight.pop_front().expect("a full window");
            settle(f.await, seq)?;
        }
    }
    for (seq, f) in inflight {
        settle(f.await, seq)?;
    }
    Ok((acked, duplicates))
}
