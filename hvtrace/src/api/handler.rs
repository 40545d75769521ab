//! Answering control-socket requests against a running [`Session`]; shared
//! by `hvtrace boot` and `hvtrace run --api-sock`.

use std::collections::HashMap;

use guest_introspect::image::KernelInfo;
use guest_introspect::kernel::VcpuView;
use serde_json::{json, Value};
use vmm::session::Session;
use vmm::vstate::memory::GuestRam;

use super::Op;
use crate::introspect::{self, KernelSource};

/// State kept between requests.
pub struct Handler {
    default_source: KernelSource,
    /// Kernel information loaded so far, per source (loading a Debian
    /// kernel's takes a second; a VM's kernel does not change).
    infos: HashMap<KernelSource, KernelInfo>,
}

impl Handler {
    /// A handler whose `ps`/`inspect` use `default_source` unless a request
    /// names a kernel file.
    pub fn new(default_source: KernelSource) -> Self {
        Self {
            default_source,
            infos: HashMap::new(),
        }
    }

    /// Answers `op` (everything but `shutdown`, which the owner handles).
    pub fn handle(&mut self, session: &Session, op: Op) -> Result<Value, String> {
        match op {
            Op::Ping => {
                let vm = session.vm();
                let p = vm.placement();
                Ok(json!({
                    "kind": vm.kind().name(),
                    "vcpus": vm.vcpu_count(),
                    // Where the VMM loaded the kernel (its own KASLR choice):
                    // ground truth for what introspection detects.
                    "placement": {
                        "virt_offset": format!("{:#x}", p.virt_offset),
                        "phys_start": format!("{:#x}", p.phys_start),
                    },
                }))
            }
            Op::Snapshot { path } => session
                .snapshot(std::path::Path::new(&path), "hvtrace boot")
                .map(|bytes| json!({ "bytes": bytes }))
                .map_err(|e| e.to_string()),
            Op::Ps { kernel, system_map } => {
                let source = self.requested_source(kernel, system_map);
                self.live(session, &source, introspect::ps_json)
            }
            Op::Sites => {
                let source = self.default_source.clone();
                self.live(session, &source, introspect::sites_json)
            }
            Op::Inspect {
                pid,
                kernel,
                system_map,
            } => {
                let source = self.requested_source(kernel, system_map);
                self.live(session, &source, |mem, vcpus, info| {
                    introspect::inspect_json(mem, vcpus, info, pid)
                })
            }
            Op::Shutdown => Err("shutdown is handled by the VM owner".into()),
        }
    }

    fn requested_source(&self, kernel: Option<String>, system_map: Option<String>) -> KernelSource {
        match kernel {
            Some(k) => KernelSource::Files {
                kernel: k.into(),
                system_map: system_map.map(Into::into),
            },
            None => self.default_source.clone(),
        }
    }

    /// Runs `f` over the guest with every vCPU paused (and only for that
    /// long), loading the kernel information first if needed.
    fn live(
        &mut self,
        session: &Session,
        source: &KernelSource,
        f: impl FnOnce(&GuestRam, &[VcpuView], &KernelInfo) -> anyhow::Result<Value>,
    ) -> Result<Value, String> {
        let vm = session.vm();
        if let KernelSource::Files { kernel, system_map } = source {
            if !self.infos.contains_key(source) {
                let info = introspect::info_from_files(kernel, system_map.as_deref())
                    .map_err(|e| format!("{e:#}"))?;
                self.infos.insert(source.clone(), info);
            }
        }
        vm.pause_all().map_err(|e| e.to_string())?;
        let result = (|| -> anyhow::Result<Value> {
            let mut vcpus = Vec::new();
            for id in 0..vm.vcpu_count() {
                let sregs = vm.with_vcpu(id, |fd| fd.get_sregs())??;
                vcpus.push(introspect::vcpu_view(&sregs));
            }
            if !self.infos.contains_key(source) {
                let info = introspect::load_info(source, vm.ram(), &vcpus[0])?;
                self.infos.insert(source.clone(), info);
            }
            f(vm.ram(), &vcpus, &self.infos[source])
        })();
        let resumed = vm.resume_all();
        let value = result.map_err(|e| format!("{e:#}"))?;
        resumed.map_err(|e| e.to_string())?;
        Ok(value)
    }
}
