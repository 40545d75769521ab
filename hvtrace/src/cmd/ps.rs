//! `hvtrace ps` and `hvtrace inspect`: the guest's tasks, read from outside,
//! from a running VM (through its control socket) or a snapshot file.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::Value;

use crate::api::{client, Op};
use crate::artifacts;
use crate::introspect::{self, KernelSource};

/// Which guest to look at, and how to understand its kernel.
#[derive(Args, Debug)]
pub struct TargetArgs {
    /// Control socket of a running VM (see `hvtrace boot`).
    #[arg(long, conflicts_with = "snapshot")]
    pub api_sock: Option<PathBuf>,
    /// A snapshot file (see `hvtrace snapshot`).
    #[arg(long)]
    pub snapshot: Option<PathBuf>,
    /// Kernel file for symbols and types (`minimal`, `debian-6.1`,
    /// `debian-6.12` or a path) [default: the VM's own kernel for
    /// --api-sock; recovered from guest memory for --snapshot].
    #[arg(long)]
    pub kernel: Option<String>,
    /// System.map (takes precedence over the kernel's own symbols).
    #[arg(long, requires = "kernel")]
    pub system_map: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl TargetArgs {
    fn source(&self) -> Result<Option<KernelSource>> {
        let Some(k) = &self.kernel else {
            return Ok(None);
        };
        Ok(Some(KernelSource::Files {
            kernel: std::path::absolute(artifacts::kernel(Some(k))?)?,
            system_map: self
                .system_map
                .as_ref()
                .map(std::path::absolute)
                .transpose()?,
        }))
    }

    /// Sends `op` to the VM or answers it from the snapshot.
    fn ask(&self, tid: Option<i32>) -> Result<Value> {
        let source = self.source()?;
        match (&self.api_sock, &self.snapshot) {
            (Some(sock), None) => {
                let (kernel, system_map) = match &source {
                    Some(KernelSource::Files { kernel, system_map }) => (
                        Some(kernel.display().to_string()),
                        system_map.as_ref().map(|p| p.display().to_string()),
                    ),
                    _ => (None, None),
                };
                let op = match tid {
                    None => Op::Ps { kernel, system_map },
                    Some(pid) => Op::Inspect {
                        pid,
                        kernel,
                        system_map,
                    },
                };
                client::call(sock, op)
            }
            (None, Some(snap)) => {
                let s = vmm::persist::load_offline(snap)?;
                let vcpus: Vec<_> = s
                    .state
                    .vcpus
                    .iter()
                    .map(|v| introspect::vcpu_view(&v.sregs))
                    .collect();
                let source = source.unwrap_or(KernelSource::Memory);
                let info = introspect::load_info(&source, &s.ram, &vcpus[0])?;
                match tid {
                    None => introspect::ps_json(&s.ram, &vcpus, &info),
                    Some(t) => introspect::inspect_json(&s.ram, &vcpus, &info, t),
                }
            }
            _ => bail!("name the guest: --api-sock SOCKET or --snapshot FILE"),
        }
    }
}

/// Arguments of `hvtrace ps`.
#[derive(Args, Debug)]
pub struct PsArgs {
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Lists every process and thread of the guest.
pub fn ps(args: PsArgs) -> Result<i32> {
    let reply = args.target.ask(None)?;
    if args.target.json {
        introspect::emit(&format!("{}\n", serde_json::to_string_pretty(&reply)?));
    } else {
        introspect::emit(&introspect::format_ps(&reply));
    }
    Ok(0)
}

/// Arguments of `hvtrace inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Thread id (pid of a process's main thread) to inspect.
    #[arg(long, short)]
    pub pid: i32,
}

/// Shows one task in detail.
pub fn inspect(args: InspectArgs) -> Result<i32> {
    let reply = args.target.ask(Some(args.pid))?;
    if args.target.json {
        introspect::emit(&format!("{}\n", serde_json::to_string_pretty(&reply)?));
    } else {
        introspect::emit(&introspect::format_inspect(&reply));
    }
    Ok(0)
}

/// Arguments of `hvtrace stacks`.
#[derive(Args, Debug)]
pub struct StacksArgs {
    /// Control socket of a running VM (see `hvtrace boot`).
    #[arg(long)]
    pub api_sock: PathBuf,
    /// Every task's kernel stack, not only the vCPUs'.
    #[arg(long, short)]
    pub all: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Shows what each vCPU runs and the kernel stacks, like the guest's own
/// `echo t > /proc/sysrq-trigger`.
pub fn stacks(args: StacksArgs) -> Result<i32> {
    let reply = client::call(&args.api_sock, Op::Stacks { all: args.all })?;
    if args.json {
        introspect::emit(&format!("{}\n", serde_json::to_string_pretty(&reply)?));
    } else {
        introspect::emit(&crate::stacks::format_stacks(&reply));
    }
    Ok(0)
}
