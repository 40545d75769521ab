//! `hvtrace sites`: which kernel function observes each utrace event in a
//! kernel, and why (ranked candidates resolved against its symbols).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::Value;

use crate::{artifacts, introspect};

/// Arguments of `hvtrace sites`.
#[derive(Args, Debug)]
pub struct SitesArgs {
    /// Kernel: `minimal` (default), `debian-6.1`, `debian-6.12`, or a path to a vmlinux/bzImage.
    #[arg(long)]
    pub kernel: Option<String>,
    /// System.map (takes precedence over the kernel's own symbols).
    #[arg(long)]
    pub system_map: Option<PathBuf>,
    /// Resolve against a running VM's kernel (see `hvtrace boot`), adding
    /// each site's runtime (KASLR-shifted) address.
    #[arg(long, conflicts_with_all = ["kernel", "system_map"])]
    pub api_sock: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Resolves and prints every event's site; fails if an event has none.
pub fn sites(args: SitesArgs) -> Result<i32> {
    if let Some(sock) = &args.api_sock {
        let reply = crate::api::client::call(sock, crate::api::Op::Sites)?;
        let errors: Vec<String> = reply["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e.as_str().unwrap_or("?").to_string())
            .collect();
        if args.json {
            introspect::emit(&format!("{}\n", serde_json::to_string_pretty(&reply)?));
        } else {
            let mut out = format!(
                "{:<14} {:<36} {:>18}  {:>18}\n",
                "EVENT", "SITE", "LINK ADDRESS", "RUNTIME ADDRESS"
            );
            for s in reply["sites"].as_array().into_iter().flatten() {
                out += &format!(
                    "{:<14} {:<36} {:>#18x}  {:>18}\n",
                    s["event"].as_str().unwrap_or("?"),
                    s["symbol"].as_str().unwrap_or("?"),
                    s["addr"].as_u64().unwrap_or(0),
                    s["runtime"].as_str().unwrap_or("?")
                );
            }
            out += &format!(
                "\n{:<14} {:<44} {:>18}  {:<14} {}\n",
                "TRAP", "AT", "ADDRESS", "KIND", "DISPLACED INSTRUCTION"
            );
            for t in reply["traps"].as_array().into_iter().flatten() {
                let kind = match &t["kind"] {
                    Value::String(s) => s.clone(),
                    Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
                    _ => "?".into(),
                };
                out += &format!(
                    "{:<14} {:<44} {:>#18x}  {:<14} {}\n",
                    t["event_name"].as_str().unwrap_or("?"),
                    format!(
                        "{}+{:#x}",
                        t["symbol"].as_str().unwrap_or("?"),
                        t["offset"].as_u64().unwrap_or(0)
                    ),
                    t["va"].as_u64().unwrap_or(0),
                    kind,
                    t["instruction"].as_str().unwrap_or("?")
                );
            }
            introspect::emit(&out);
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        return Ok(0);
    }
    let kernel = artifacts::kernel(args.kernel.as_deref())?;
    let info = introspect::info_from_files(&kernel, args.system_map.as_deref())?;
    let resolved = utrace::sites::resolve_all(&info.symbols);
    let mut errors = Vec::new();
    let mut ok = Vec::new();
    for r in resolved {
        match r {
            Ok(site) => ok.push(site),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if args.json {
        let v = serde_json::json!({
            "kernel": kernel.display().to_string(),
            "symbols": info.symbol_source.describe(),
            "sites": ok,
            "errors": errors,
        });
        introspect::emit(&format!("{}\n", serde_json::to_string_pretty(&v)?));
    } else {
        let mut out = format!(
            "{:<14} {:<36} {:>18}  why (symbols: {})\n",
            "EVENT",
            "SITE",
            "LINK ADDRESS",
            info.symbol_source.describe()
        );
        for s in &ok {
            let fallback = if s.missing.is_empty() {
                String::new()
            } else {
                format!(" [not a function here: {}]", s.missing.join(", "))
            };
            out += &format!(
                "{:<14} {:<36} {:>#18x}  {}{}\n",
                s.event, s.symbol, s.addr, s.why, fallback
            );
        }
        introspect::emit(&out);
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(0)
}
