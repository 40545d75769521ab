//! `hvtrace events`: read the events a fleet published to NATS JetStream
//! (`--sink`) back, as strace's text or as the messages' JSON.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::consumer::{push, DeliverPolicy};
use clap::Args;
use futures_util::StreamExt;
use serde_json::Value;
use utrace::strace::text::TextRenderer;
use utrace::strace::Emitted;

use crate::sink::config::{self, SinkConfig};
use crate::sink::reorder::{Out, Reorder};
use crate::sink::{message, nats};

/// Arguments of `hvtrace events`.
#[derive(Args, Debug)]
pub struct EventsArgs {
    /// The sink the events were published to (the same URL as `--sink`;
    /// only its server, subject and `stream=` matter here).
    #[arg(long, value_name = "URL")]
    pub sink: String,
    /// Only this VM's events (its `--vm-id`).
    #[arg(long, value_name = "ID")]
    pub vm: Option<String>,
    /// Only events of this kind: syscall, signal, exit, killed, entry (a
    /// call's start, published when another event interrupted it) or
    /// dropped.
    #[arg(long, value_name = "KIND")]
    pub kind: Option<String>,
    /// Keep printing new events as they come (until Ctrl-C).
    #[arg(long)]
    pub follow: bool,
    /// Print each message's JSON, one per line, instead of strace's text.
    #[arg(long)]
    pub json: bool,
}

/// Prints the stream's events; returns 0.
pub fn events(args: EventsArgs) -> Result<i32> {
    let cfg = SinkConfig::parse(&args.sink)?;
    if let Some(vm) = &args.vm {
        config::check_token(vm).context("--vm")?;
    }
    if let Some(kind) = &args.kind {
        let kinds = [
            "syscall",
            "signal",
            "exit",
            "killed",
            "entry",
            message::DROPPED,
        ];
        if !kinds.contains(&kind.as_str()) {
            anyhow::bail!("--kind: `{kind}` is none of {}", kinds.join(", "));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(read(&cfg, &args))?;
    Ok(0)
}

async fn read(cfg: &SinkConfig, args: &EventsArgs) -> Result<()> {
    let conn = nats::connect(cfg).await?;
    let stream = conn.js.get_stream(&cfg.stream).await.with_context(|| {
        format!(
            "no stream {} on {}: nothing was published there with this subject",
            cfg.stream, cfg.url
        )
    })?;
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: conn.client.new_inbox(),
            filter_subject: cfg.filter(args.vm.as_deref(), args.kind.as_deref()),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .context("creating a consumer")?;
    let mut printer = Printer {
        json: args.json,
        tagged: args.vm.is_none(),
        // One kind's numbers have gaps (the other kinds'): shown as stored.
        in_order: args.kind.is_none(),
        vms: HashMap::new(),
        out: std::io::stdout(),
    };
    if consumer.cached_info().num_pending == 0 && !args.follow {
        return Ok(());
    }
    let mut messages = consumer.messages().await.context("reading the stream")?;
    let mut last_expiry = Instant::now();
    loop {
        let next = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
        let Ok(next) = next else {
            // Quiet for a while: stop waiting for what is missing.
            printer.expire(GAP_WAIT)?;
            continue;
        };
        let Some(m) = next else {
            break;
        };
        let m = m.context("reading the stream")?;
        printer.message(&m.payload)?;
        let caught_up = m.info().is_ok_and(|i| i.pending == 0);
        if caught_up && !args.follow {
            break;
        }
        if last_expiry.elapsed() > Duration::from_millis(250) {
            printer.expire(GAP_WAIT)?;
            last_expiry = Instant::now();
        }
    }
    printer.finish()
}

/// How long a consumer following a stream waits for a message missing
/// from a VM's sequence before declaring it lost.
const GAP_WAIT: Duration = Duration::from_secs(5);
/// Messages of one VM held while one before them is missing, at most.
const HOLD_MAX: usize = 65536;

/// One VM's view of the stream.
struct VmView {
    text: TextRenderer,
    /// Its text after its last newline (tagged output prints whole lines).
    partial: String,
    /// Its messages, put back in sequence order.
    order: Reorder<Value>,
}

impl Default for VmView {
    fn default() -> Self {
        Self {
            text: TextRenderer::default(),
            partial: String::new(),
            order: Reorder::new(HOLD_MAX),
        }
    }
}

struct Printer {
    json: bool,
    /// Lines are tagged `[VM] ` (several VMs may be in the output).
    tagged: bool,
    /// Each VM's messages are printed in sequence order.
    in_order: bool,
    vms: HashMap<String, VmView>,
    out: std::io::Stdout,
}

impl Printer {
    fn message(&mut self, body: &[u8]) -> Result<()> {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            eprintln!("hvtrace: skipping a message that is not JSON");
            return Ok(());
        };
        let (Some(vm), Some(seq)) = (v["vm"].as_str().map(str::to_string), v["seq"].as_u64())
        else {
            eprintln!("hvtrace: skipping a message without vm and seq: {v}");
            return Ok(());
        };
        if !self.in_order {
            return self.print(&vm, v);
        }
        let view = self.vms.entry(vm.clone()).or_default();
        let out = view.order.push(seq, v, Instant::now());
        self.emit(&vm, out)
    }

    /// Gives up on messages missing for `wait`.
    fn expire(&mut self, wait: Duration) -> Result<()> {
        let now = Instant::now();
        let outs: Vec<(String, Vec<Out<Value>>)> = self
            .vms
            .iter_mut()
            .map(|(vm, view)| (vm.clone(), view.order.expire(wait, now)))
            .collect();
        for (vm, out) in outs {
            self.emit(&vm, out)?;
        }
        Ok(())
    }

    fn emit(&mut self, vm: &str, out: Vec<Out<Value>>) -> Result<()> {
        for o in out {
            match o {
                Out::Item(_, v) => self.print(vm, v)?,
                Out::Gap(a, b) => eprintln!("hvtrace: VM {vm}: events {a} to {b} are missing"),
                Out::Again(seq) => {
                    eprintln!(
                        "hvtrace: VM {vm}: event {seq} again (resent after the duplicate window)"
                    )
                }
            }
        }
        Ok(())
    }

    fn print(&mut self, vm: &str, v: Value) -> Result<()> {
        if self.json {
            writeln!(self.out, "{v}")?;
            return Ok(self.out.flush()?);
        }
        let view = self.vms.entry(vm.to_string()).or_default();
        let text = if v["kind"] == message::DROPPED {
            format!(
                "{}\n",
                message::dropped_line(v["count"].as_u64().unwrap_or(0))
            )
        } else {
            match Emitted::from_json(&v) {
                Some(e) => view.text.render(&e.record),
                None => {
                    eprintln!("hvtrace: VM {vm}: skipping malformed event {}", v["seq"]);
                    return Ok(());
                }
            }
        };
        if !self.tagged {
            self.out.write_all(text.as_bytes())?;
            return Ok(self.out.flush()?);
        }
        view.partial.push_str(&text);
        while let Some(nl) = view.partial.find('\n') {
            let line: String = view.partial.drain(..=nl).collect();
            write!(self.out, "[{vm}] {line}")?;
        }
        Ok(self.out.flush()?)
    }

    /// Prints what is still held, and what is left of unfinished lines.
    fn finish(&mut self) -> Result<()> {
        let mut vms: Vec<String> = self.vms.keys().cloned().collect();
        vms.sort();
        for vm in &vms {
            let out = self
                .vms
                .get_mut(vm)
                .map(|v| v.order.drain())
                .unwrap_or_default();
            self.emit(vm, out)?;
        }
        if self.tagged {
            for vm in &vms {
                let Some(view) = self.vms.get_mut(vm) else {
                    continue;
                };
                if !view.partial.is_empty() {
                    writeln!(self.out, "[{vm}] {}", std::mem::take(&mut view.partial))?;
                }
            }
        }
        Ok(self.out.flush()?)
    }
}
