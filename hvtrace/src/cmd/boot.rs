//! `hvtrace boot`: a long-running VM with a control socket; the guest
//! console goes to stdout.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use vmm::session::{Outputs, Session};

use crate::api::server::ApiServer;
use crate::api::Op;
use crate::cmd::run::GuestArgs;

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
}

/// Boots and serves the socket until a shutdown request or the guest ends.
pub fn boot(args: BootArgs) -> Result<i32> {
    let server = ApiServer::bind(&args.api_sock)?;
    let outputs = Outputs {
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
        console_echo: Some(Box::new(std::io::stdout())),
    };
    let stall = args.guest.stall();
    let mut session = match &args.restore {
        Some(p) => Session::restore(p, None, outputs, stall)?,
        None => Session::boot(&args.guest.config()?, outputs, stall)?,
    };
    loop {
        session.check_running()?;
        let Ok(req) = server.requests.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        let answer = match req.op {
            Op::Ping => {
                Ok(json!({"kind": session.vm().kind().name(), "vcpus": session.vm().vcpu_count()}))
            }
            Op::Snapshot { path } => session
                .snapshot(std::path::Path::new(&path), "hvtrace boot")
                .map(|bytes| json!({ "bytes": bytes }))
                .map_err(|e| e.to_string()),
            Op::Shutdown => {
                let _ = req.reply.send(Ok(json!({})));
                session.shutdown();
                return Ok(0);
            }
        };
        let _ = req.reply.send(answer);
    }
}
