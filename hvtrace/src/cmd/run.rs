//! `hvtrace run`: boot a guest, run one command, exit with its status.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use vmm::builder::{Kaslr, VmConfig};
use vmm::session::{Outputs, Session};

use crate::artifacts;

/// Default kernel command line; the VMM adds what the KVM kind needs.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 printk.time=1 tsc=reliable lpj=2000000";

/// Arguments of `hvtrace run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Kernel: `minimal` (default), `debian-6.1`, `debian-6.12`, or a path to a vmlinux/bzImage.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Initrd (cpio, optionally gzip); default: hvtrace's guest image.
    #[arg(long)]
    pub initrd: Vec<std::path::PathBuf>,
    /// Extra kernel command-line words.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Do not randomize the kernel's placement.
    #[arg(long)]
    pub no_kaslr: bool,
    /// Show the guest kernel console on stderr.
    #[arg(short, long)]
    pub verbose: bool,
    /// Seconds without guest output before the boot is reported as stalled.
    #[arg(long, default_value_t = 600)]
    pub stall_timeout: u64,
    /// The command to run in the guest.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<String>,
}

/// Runs the command; returns the guest command's exit status.
pub fn run(args: RunArgs) -> Result<i32> {
    let kernel = artifacts::kernel(args.kernel.as_deref())?;
    let initrds = if args.initrd.is_empty() { vec![artifacts::default_image()?] } else { args.initrd.clone() };
    let config = VmConfig {
        kernel,
        initrds,
        cmdline: format!("{DEFAULT_CMDLINE} {}", args.cmdline),
        memory_mib: args.memory,
        cpus: args.cpus,
        kaslr: if args.no_kaslr { Kaslr::Off } else { Kaslr::Auto },
    };
    let outputs = Outputs {
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
        console_echo: if args.verbose { Some(Box::new(std::io::stderr())) } else { None },
    };
    let mut session = Session::boot(&config, outputs, Duration::from_secs(args.stall_timeout))?;
    let code = session.run(&args.command)?;
    session.shutdown();
    Ok(code)
}
