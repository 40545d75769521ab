//! The event sink: every event of a trace published to NATS JetStream
//! (`--sink nats://...`), for fleets of traced VMs (`docs/sink.md`).
//!
//! The strace engine hands each record to [`Feed`] on the vCPU thread,
//! which only stamps it and pushes it into a bounded channel (a full
//! channel drops the event and counts it: a vCPU never waits). One thread
//! takes records from the channel, drops the call entries text does not
//! need ([`elide`]), numbers and serializes the rest ([`message`]) and
//! queues them ([`queue`]: memory, then the [`spill`] file); another runs
//! the publisher ([`nats`]) on its own single-threaded tokio runtime.

pub mod config;
pub mod elide;
pub mod message;
pub mod nats;
pub mod queue;
pub mod reorder;
pub mod spill;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use anyhow::{Context, Result};
use clap::Args;
use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;
use utrace::strace::{Emitted, RecordObserver};

use config::SinkConfig;
use message::Origin;
use nats::Shared;
use queue::Queue;

/// Records waiting between the vCPUs and the sink's thread, at most.
const CHANNEL: usize = 65536;

/// `--sink` and `--vm-id`, shared by `trace` and `attach`.
#[derive(Args, Debug, Clone, Default)]
pub struct SinkArgs {
    /// Also publish every event to NATS JetStream:
    /// `nats://HOST[:PORT][/SUBJECT][?max_age=7d&max_bytes=1G&...]`
    /// (subjects SUBJECT.VM.KIND, default SUBJECT `hvtrace`; docs/sink.md).
    /// The server must be reachable at start.
    #[arg(long, value_name = "URL")]
    pub sink: Option<String>,
    /// This VM's id in the sink's subjects and message ids (letters,
    /// digits, `_`, `-`; unique per traced VM) [default: HOST-PID-TIME].
    #[arg(long, value_name = "ID", requires = "sink")]
    pub vm_id: Option<String>,
}

impl SinkArgs {
    /// The sink these arguments ask for, connected (None without `--sink`).
    pub fn start(&self) -> Result<Option<Sink>> {
        let Some(url) = &self.sink else {
            return Ok(None);
        };
        let cfg = SinkConfig::parse(url)?;
        let vm = match &self.vm_id {
            Some(id) => {
                config::check_token(id).context("--vm-id")?;
                id.clone()
            }
            None => config::default_vm_id(),
        };
        let sink = Sink::start(cfg, vm)?;
        eprintln!(
            "hvtrace: publishing events to {} as VM {} (subjects {}, stream {})",
            sink.cfg.url,
            sink.origin.vm,
            sink.cfg.filter(Some(&sink.origin.vm), None),
            sink.cfg.stream
        );
        Ok(Some(sink))
    }
}

/// What travels from the vCPUs to the sink's thread. Unboxed: a box
/// would cost an allocation per event on the vCPU thread, and every slot
/// of the channel holds an event anyway.
#[allow(clippy::large_enum_variant)]
enum In {
    Event(Emitted, SystemTime),
    Close,
}

/// The engine's side of a sink: never blocks.
pub struct Feed {
    tx: Sender<In>,
    /// Events the full channel refused since the sink's thread last looked.
    lost: AtomicU64,
}

impl Feed {
    /// Queues one event (stamped now), or counts it lost.
    pub fn push(&self, e: Emitted) {
        if self.tx.try_send(In::Event(e, SystemTime::now())).is_err() {
            self.lost.fetch_add(1, Relaxed);
        }
    }
}

impl RecordObserver for Feed {
    fn observe(&self, emitted: Emitted) {
        self.push(emitted);
    }
}

/// What a sink did, for `--report` and the end of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkReport {
    /// Messages the server acknowledged (each event once).
    pub published: u64,
    /// Of those, acknowledged as duplicates of a copy it already had.
    pub duplicates: u64,
    /// Messages sent again after the connection failed.
    pub resent: u64,
    /// Messages that went through the spill file.
    pub spilled: u64,
    /// Events dropped (queue and spill file full).
    pub dropped: u64,
    /// Events not delivered by the end, and the file keeping them.
    pub undelivered: Option<(PathBuf, u64)>,
}

impl SinkReport {
    /// Its fields for the `hvtrace-report` JSON line.
    pub fn add_to(&self, r: &mut Value) {
        r["sink_published"] = self.published.into();
        r["sink_duplicates"] = self.duplicates.into();
        r["sink_resent"] = self.resent.into();
        r["sink_spilled"] = self.spilled.into();
        r["sink_dropped"] = self.dropped.into();
        r["sink_undelivered"] = self.undelivered.as_ref().map_or(0, |u| u.1).into();
    }
}

/// A running sink.
pub struct Sink {
    cfg: SinkConfig,
    origin: Origin,
    feed: Arc<Feed>,
    shared: Arc<Shared>,
    intake: Option<JoinHandle<()>>,
    publisher: Option<JoinHandle<()>>,
}

impl Sink {
    /// Connects (an unreachable server, or one without JetStream, is an
    /// error here), creates the stream if needed and starts the sink's
    /// threads.
    pub fn start(cfg: SinkConfig, vm: String) -> Result<Sink> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the sink's runtime")?;
        let conn = rt.block_on(async {
            let conn = nats::connect(&cfg).await?;
            nats::ensure_stream(&conn, &cfg).await?;
            anyhow::Ok(conn)
        })?;
        let spill = cfg
            .spill_dir
            .clone()
            .unwrap_or_else(|| crate::snapcache::cache_root().join("spill"))
            .join(format!("{vm}.{}.spill", std::process::id()));
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::new(cfg.queue, cfg.spill_max, spill)),
            wake: tokio::sync::Notify::new(),
            counters: nats::Counters::default(),
        });
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL);
        let feed = Arc::new(Feed {
            tx,
            lost: AtomicU64::new(0),
        });
        let origin = Origin {
            vm: vm.clone(),
            host: config::host_name(),
        };
        let intake = {
            let (feed, shared, origin, cfg) =
                (feed.clone(), shared.clone(), origin.clone(), cfg.clone());
            std::thread::Builder::new()
                .name("sink-intake".into())
                .spawn(move || {
                    yield_cpu();
                    intake(rx, &feed, &origin, &cfg, &shared)
                })?
        };
        let publisher = {
            let (shared, cfg) = (shared.clone(), cfg.clone());
            std::thread::Builder::new()
                .name("sink-publish".into())
                .spawn(move || {
                    yield_cpu();
                    rt.block_on(nats::publish_all(conn, cfg, vm, shared))
                })?
        };
        Ok(Sink {
            cfg,
            origin,
            feed,
            shared,
            intake: Some(intake),
            publisher: Some(publisher),
        })
    }

    /// The engine's side, to give to `Strace::with_observer`.
    pub fn observer(&self) -> Arc<dyn RecordObserver> {
        self.feed.clone()
    }

    /// The feed itself (for records that come from the control socket).
    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    /// Publishes what is still queued (waiting up to `?linger=` for a
    /// server that is away), stops the sink and reports; events still
    /// undelivered are kept in a file, and said so on stderr.
    pub fn finish(mut self) -> SinkReport {
        let _ = self.feed.tx.send(In::Close);
        if let Some(t) = self.intake.take() {
            let _ = t.join();
        }
        if let Some(t) = self.publisher.take() {
            let _ = t.join();
        }
        let c = &self.shared.counters;
        let mut q = self.shared.queue();
        let undelivered = match q.persist() {
            Ok(left) => left,
            Err(e) => {
                eprintln!(
                    "hvtrace: sink: cannot keep {} undelivered events: {e}",
                    q.len()
                );
                None
            }
        };
        if let Some((path, n)) = &undelivered {
            eprintln!(
                "hvtrace: {n} events were not delivered to {} within {} s: kept in {} \
                 (`hvtrace sink-replay --sink URL {}` publishes them)",
                self.cfg.url,
                self.cfg.linger.as_secs(),
                path.display(),
                path.display()
            );
        }
        SinkReport {
            published: c.published.load(Relaxed),
            duplicates: c.duplicates.load(Relaxed),
            resent: c.resent.load(Relaxed),
            spilled: q.spilled,
            dropped: c.dropped.load(Relaxed),
            undelivered,
        }
    }
}

/// The nice value of the sink's threads: they take the CPU time the
/// vCPUs leave (the queue absorbs a busy spell), never the vCPUs'.
const NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority to [`NICE`].
fn yield_cpu() {
    // SAFETY: setpriority(2) with who 0 changes only the calling thread's
    // nice value on Linux; no memory is involved.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
    if r != 0 {
        log::info!("sink: cannot lower the sink thread's priority");
    }
}

/// How often the sink's thread looks at the channel when it was empty.
const POLL: std::time::Duration = std::time::Duration::from_millis(2);

/// Records the sink's thread takes from the channel at once (one lock of
/// the queue and one wake-up of the publisher per batch).
const BATCH: usize = 1024;

/// The sink's thread: records in, messages queued.
fn intake(rx: Receiver<In>, feed: &Feed, origin: &Origin, cfg: &SinkConfig, shared: &Shared) {
    let mut elider = elide::Elider::default();
    let mut drops = 0u64;
    let take_lost = |drops: &mut u64| {
        let lost = feed.lost.swap(0, Relaxed);
        shared.counters.dropped.fetch_add(lost, Relaxed);
        *drops += lost;
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut closed = false;
    while !closed {
        // Polled, not waited on: a receiver blocked in the channel would
        // make every vCPU's push a wake-up system call.
        batch.extend(rx.try_iter().take(BATCH));
        if batch.is_empty() {
            std::thread::sleep(POLL);
            continue;
        }
        take_lost(&mut drops);
        let mut q = shared.queue();
        for msg in batch.drain(..) {
            match msg {
                In::Event(e, time) => {
                    for (e, time) in elider.push(e, time) {
                        enqueue(origin, cfg, shared, &mut q, &mut drops, &e, time);
                    }
                }
                In::Close => closed = true,
            }
        }
        drop(q);
        shared.wake.notify_one();
    }
    take_lost(&mut drops);
    let mut q = shared.queue();
    if let Some((e, time)) = elider.flush() {
        enqueue(origin, cfg, shared, &mut q, &mut drops, &e, time);
    }
    if drops > 0 {
        // The last report goes in whatever the limit.
        q.offer(true, |seq| drop_report(origin, cfg, seq, drops));
    }
    q.close();
    drop(q);
    shared.wake.notify_one();
}

/// Queues event `e` (after a report of the drops before it, if any).
fn enqueue(
    origin: &Origin,
    cfg: &SinkConfig,
    shared: &Shared,
    q: &mut Queue,
    drops: &mut u64,
    e: &Emitted,
    time: SystemTime,
) {
    if *drops > 0 {
        let n = *drops;
        if q.offer(false, |seq| drop_report(origin, cfg, seq, n)) {
            *drops = 0;
        }
    }
    let kind = message::kind(&e.record);
    let queued = q.offer(false, |seq| {
        let body = message::event(origin, seq, time, e);
        (cfg.subject(&origin.vm, kind), body.to_string().into_bytes())
    });
    if !queued {
        *drops += 1;
        shared.counters.dropped.fetch_add(1, Relaxed);
    }
}

fn drop_report(origin: &Origin, cfg: &SinkConfig, seq: u64, n: u64) -> (String, Vec<u8>) {
    let body = message::dropped(origin, seq, SystemTime::now(), n);
    (
        cfg.subject(&origin.vm, message::DROPPED),
        body.to_string().into_bytes(),
    )
}
