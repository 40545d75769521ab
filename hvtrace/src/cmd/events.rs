//! `hvtrace events`: read the events a fleet published to NATS JetStream
//! (`--sink`) back, as strace's text or as the messages' JSON.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{Context, Result};
use async_nats::jetstream::consumer::{push, DeliverPolicy};
use clap::Args;
use futures_util::StreamExt;
use serde_json::Value;
use utrace::strace::text::TextRenderer;
use utrace::strace::Emitted;

use crate::sink::config::{self, SinkConfig};
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
        // One kind's numbers have gaps: the other kinds'.
        check_seq: args.kind.is_none(),
        vms: HashMap::new(),
        out: std::io::stdout(),
    };
    if consumer.cached_info().num_pending == 0 && !args.follow {
        return Ok(());
    }
    let mut messages = consumer.messages().await.context("reading the stream")?;
    while let Some(m) = messages.next().await {
        let m = m.context("reading the stream")?;
        printer.message(&m.payload)?;
        let caught_up = m.info().is_ok_and(|i| i.pending == 0);
        if caught_up && !args.follow {
            break;
        }
    }
    printer.finish()
}

/// One VM's view of the stream.
#[derive(Default)]
struct VmView {
    text: TextRenderer,
    /// Its text after its last newline (tagged output prints whole lines).
    partial: String,
    last_seq: Option<u64>,
}

struct Printer {
    json: bool,
    /// Lines are tagged `[VM] ` (several VMs may be in the output).
    tagged: bool,
    /// Say when a VM's sequence numbers skip or repeat.
    check_seq: bool,
    vms: HashMap<String, VmView>,
    out: std::io::Stdout,
}

impl Printer {
    fn message(&mut self, body: &[u8]) -> Result<()> {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            eprintln!("hvtrace: skipping a message that is not JSON");
            return Ok(());
        };
        let (Some(vm), Some(seq)) = (v["vm"].as_str(), v["seq"].as_u64()) else {
            eprintln!("hvtrace: skipping a message without vm and seq: {v}");
            return Ok(());
        };
        let view = self.vms.entry(vm.to_string()).or_default();
        match view.last_seq.filter(|_| self.check_seq) {
            Some(last) if seq <= last => {
                eprintln!(
                    "hvtrace: VM {vm}: event {seq} again (resent after the duplicate window)"
                );
                if !self.json {
                    return Ok(());
                }
            }
            Some(last) if seq > last + 1 => {
                eprintln!(
                    "hvtrace: VM {vm}: events {} to {} are missing",
                    last + 1,
                    seq - 1
                )
            }
            _ => {}
        }
        view.last_seq = Some(view.last_seq.map_or(seq, |l| l.max(seq)));
        if self.json {
            self.out.write_all(body)?;
            self.out.write_all(b"\n")?;
            return Ok(self.out.flush()?);
        }
        let text = if v["kind"] == message::DROPPED {
            format!(
                "{}\n",
                message::dropped_line(v["count"].as_u64().unwrap_or(0))
            )
        } else {
            match Emitted::from_json(&v) {
                Some(e) => view.text.render(&e.record),
                None => {
                    eprintln!("hvtrace: VM {vm}: skipping malformed event {seq}");
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

    /// Prints what is left of unfinished lines.
    fn finish(&mut self) -> Result<()> {
        if self.tagged {
            for (vm, view) in &mut self.vms {
                if !view.partial.is_empty() {
                    writeln!(self.out, "[{vm}] {}", std::mem::take(&mut view.partial))?;
                }
            }
        }
        Ok(self.out.flush()?)
    }
}
