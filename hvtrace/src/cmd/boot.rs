//! `hvtrace boot`: a long-running VM with a control socket; the guest
//! console goes to stdout.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use vmm::session::{Outputs, Session};

use crate::api::handler::Handler;
use crate::api::server::ApiServer;
use crate::api::Op;
use crate::cmd::run::GuestArgs;
use crate::introspect::KernelSource;
use crate::sink::SinkArgs;

/// Arguments of `hvtrace boot`.
#[derive(Args, Debug)]
pub struct BootArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Control socket path.
    #[arg(long)]
    pub api_sock: PathBuf,
    /// Start from this snapshot instead of booting.
    #[arg(long)]
    pub restore: Option<PathBuf>,
    /// The events of every process traced through the socket (`hvtrace
    /// attach`) are also published here, as this VM's.
    #[command(flatten)]
    pub sink: SinkArgs,
}

/// Boots and serves the socket until a shutdown request or the guest ends.
pub fn boot(args: BootArgs) -> Result<i32> {
    let server = ApiServer::bind(&args.api_sock)?;
    let sink = args.sink.start()?;
    let outputs = Outputs {
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
        console_echo: Some(Box::new(std::io::stdout())),
    };
    let stall = args.guest.stall();
    // Symbols and types for ps/inspect: the booted kernel file, or for a
    // restored VM (whose kernel file we do not know) its own memory.
    let (mut session, default_source) = match &args.restore {
        Some(p) => (
            Session::restore(p, None, outputs, stall)?,
            KernelSource::Memory,
        ),
        None => {
            let config = args.guest.config()?;
            let source = KernelSource::Files {
                kernel: std::path::absolute(&config.kernel)?,
                system_map: None,
            };
            (Session::boot(&config, outputs, stall)?, source)
        }
    };
    let mut handler = Handler::new(default_source);
    if let Some(s) = &sink {
        handler.observe_with(s.observer());
    }
    loop {
        if let Err(e) = session.check_running() {
            // The guest ended: what was traced is still delivered.
            if let Some(s) = sink {
                s.finish();
            }
            return Err(e.into());
        }
        let Ok(req) = server.requests.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        if req.op == Op::Shutdown {
            let _ = req.reply.send(Ok(serde_json::json!({})));
            handler.finish(&session);
            session.shutdown();
            if let Some(s) = sink {
                s.finish();
            }
            return Ok(0);
        }
        let answer = handler.handle(&session, req.op, &req.conn);
        let _ = req.reply.send(answer);
    }
}
