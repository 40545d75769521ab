//! Snapshots: save a running VM to a file and restore it into a fresh
//! process. [`format`] is the file layout, [`state`] the KVM state.

pub mod format;
pub mod state;

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::builder::{create_configured_vcpu, create_devices, BuildError, Sinks};
use crate::machine::{Machine, MachineError, RunningVm};
use crate::trap::{TrapOwner, TrapTable};
use crate::vstate::memory::GuestRam;
use crate::vstate::vm::{create_vm, open_kvm};

use format::{read_snapshot, write_snapshot, FormatError};
use state::{capture_vcpu, capture_vm, restore_vcpu, restore_vm, MachineState};

/// Errors saving or restoring.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File format problem.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: String,
        /// Cause.
        source: FormatError,
    },
    /// The snapshot belongs to a different guest or host.
    #[error("{path}: snapshot does not match: {what}")]
    Mismatch {
        /// The file.
        path: String,
        /// What differs.
        what: String,
    },
    /// A KVM call failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Driving the VM failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Building the restored VM failed.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Saves `vm` to `path` (atomically: a temporary file renamed into place).
/// The vCPUs are paused for the duration and resumed afterwards; the file
/// holds the guest's own bytes, never the VMM's breakpoints.
pub fn save(vm: &RunningVm, path: &Path, label: &str) -> Result<u64, SnapshotError> {
    vm.pause_all()?;
    let result = save_paused(vm, path, label);
    vm.resume_all()?;
    result
}

fn save_paused(vm: &RunningVm, path: &Path, label: &str) -> Result<u64, SnapshotError> {
    let fmt_err = |source| SnapshotError::Format {
        path: path.display().to_string(),
        source,
    };
    let indices: Vec<u32> = open_kvm()
        .map_err(BuildError::from)?
        .get_msr_index_list()
        .map_err(|e| SnapshotError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?
        .as_slice()
        .to_vec();
    let mut vcpus = Vec::new();
    for id in 0..vm.vcpu_count() {
        let idx = indices.clone();
        let s = vm
            .with_vcpu(id, move |fd| capture_vcpu(fd, &idx))?
            .map_err(|e| SnapshotError::Kvm("vCPU state", e))?;
        vcpus.push(s);
    }
    let (irqchips, pit, clock) =
        capture_vm(vm.vm_fd()).map_err(|e| SnapshotError::Kvm("VM state", e))?;
    let uarts = vm
        .bus()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .uarts
        .iter()
        .map(|u| u.state())
        .collect();
    let removed = vm.traps().remove_all(vm.ram());
    let pvm_trap = removed
        .iter()
        .find(|t| matches!(t.owner, TrapOwner::PvmPageFaultEntry))
        .map(|t| (t.va, t.pa));
    let state = MachineState {
        label: label.to_string(),
        kind: vm.kind(),
        memory_size: vm.ram().size(),
        placement: vm.placement(),
        cmdline: vm.cmdline().to_string(),
        vcpus,
        irqchips,
        pit,
        clock,
        uarts,
        pvm_trap,
    };
    let encoded = bincode::serialize(&state).expect("state serializes");
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> Result<u64, FormatError> {
        let regions = vm.ram().regions();
        let slices: Vec<&[u8]> = regions
            .iter()
            // SAFETY: each region is a live mapping owned by the VM's RAM;
            // all vCPUs are paused, so nothing writes it while we read.
            .map(|(_, host, len)| unsafe { std::slice::from_raw_parts(*host as *const u8, *len) })
            .collect();
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        write_snapshot(&mut f, &encoded, &slices)?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(std::fs::metadata(path)?.len())
    };
    let written = write();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    // Put our breakpoints back before the guest runs again.
    let _ = vm.traps().replant(vm.ram(), removed);
    written.map_err(fmt_err)
}

/// A snapshot read for inspection only: its state and memory, no KVM.
pub struct OfflineSnapshot {
    /// Machine state (vCPU registers, label, placement, ...).
    pub state: MachineState,
    /// Guest RAM as saved (the VMM's breakpoints are never in it).
    pub ram: GuestRam,
}

/// Reads a snapshot file without creating a VM (for `hvtrace ps` and
/// `inspect` on a saved guest). Works on any host, KVM or not.
pub fn load_offline(path: &Path) -> Result<OfflineSnapshot, SnapshotError> {
    let p = path.display().to_string();
    let fmt_err = |source| SnapshotError::Format {
        path: p.clone(),
        source,
    };
    let mut f = std::io::BufReader::new(
        std::fs::File::open(path).map_err(|e| fmt_err(FormatError::Io(e)))?,
    );
    let file = read_snapshot(&mut f).map_err(fmt_err)?;
    let state: MachineState = bincode::deserialize(&file.state)
        .map_err(|e| fmt_err(FormatError::State(e.to_string())))?;
    check_plausible(&state).map_err(fmt_err)?;
    let ram = GuestRam::new(state.memory_size).map_err(BuildError::from)?;
    fill_ram(&ram, &file).map_err(fmt_err)?;
    Ok(OfflineSnapshot { state, ram })
}

/// Writes `snapshot` (possibly edited) back to a file, for tools and tests
/// that prepare guests offline (e.g. a deliberately corrupted task list).
pub fn save_offline(snapshot: &OfflineSnapshot, path: &Path) -> Result<(), SnapshotError> {
    let fmt_err = |source| SnapshotError::Format {
        path: path.display().to_string(),
        source,
    };
    let encoded = bincode::serialize(&snapshot.state).expect("state serializes");
    let regions = snapshot.ram.regions();
    let slices: Vec<&[u8]> = regions
        .iter()
        // SAFETY: the mappings belong to `snapshot.ram`, which no vCPU uses
        // and which outlives `slices`; we only read.
        .map(|(_, host, len)| unsafe { std::slice::from_raw_parts(*host as *const u8, *len) })
        .collect();
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).map_err(|e| fmt_err(FormatError::Io(e)))?,
    );
    write_snapshot(&mut f, &encoded, &slices).map_err(fmt_err)?;
    std::io::Write::flush(&mut f).map_err(|e| fmt_err(FormatError::Io(e)))
}

/// Refuses states no hvtrace writes (counts and sizes out of range).
fn check_plausible(state: &MachineState) -> Result<(), FormatError> {
    if state.vcpus.is_empty()
        || state.vcpus.len() > crate::builder::MAX_CPUS as usize
        || state.uarts.len() != 4
    {
        return Err(FormatError::State(
            "vCPU or device count out of range".into(),
        ));
    }
    if state.memory_size < (crate::builder::MIN_MEMORY_MIB << 20) || state.memory_size > (1 << 40) {
        return Err(FormatError::State(format!(
            "implausible memory size {}",
            state.memory_size
        )));
    }
    Ok(())
}

/// Copies the snapshot's pages into fresh RAM.
fn fill_ram(ram: &GuestRam, file: &format::SnapshotFile) -> Result<(), FormatError> {
    let regions = ram.regions();
    let mut slices: Vec<&mut [u8]> = regions
        .iter()
        // SAFETY: fresh, exclusively owned mappings; no vCPU exists yet, and
        // `slices` is dropped before `ram` can be shared.
        .map(|(_, host, len)| unsafe { std::slice::from_raw_parts_mut(*host, *len) })
        .collect();
    file.fill_memory(&mut slices)
}

/// A restored machine, not yet running.
pub struct Restored {
    /// The machine; start it with [`Machine::start_with`] and `traps`.
    pub machine: Machine,
    /// Traps re-planted in the restored memory (the PVM fix-up).
    pub traps: Arc<TrapTable>,
    /// The saved label.
    pub label: String,
}

/// Restores a snapshot into a new VM. With `expected_label`, a snapshot
/// saved under another label is refused.
pub fn restore(
    path: &Path,
    sinks: Sinks,
    expected_label: Option<&str>,
) -> Result<Restored, SnapshotError> {
    let p = path.display().to_string();
    let fmt_err = |source| SnapshotError::Format {
        path: p.clone(),
        source,
    };
    let mut f = std::io::BufReader::new(
        std::fs::File::open(path).map_err(|e| fmt_err(FormatError::Io(e)))?,
    );
    let file = read_snapshot(&mut f).map_err(fmt_err)?;
    let state: MachineState = bincode::deserialize(&file.state)
        .map_err(|e| fmt_err(FormatError::State(e.to_string())))?;
    let mismatch = |what: String| SnapshotError::Mismatch {
        path: p.clone(),
        what,
    };
    if let Some(want) = expected_label {
        if state.label != want {
            return Err(mismatch(format!(
                "saved for {:?}, wanted {:?}",
                state.label, want
            )));
        }
    }
    let kind = crate::kvm_kind::KvmKind::detect();
    if state.kind != kind {
        return Err(mismatch(format!(
            "saved on {}, this host has {}",
            state.kind.name(),
            kind.name()
        )));
    }
    check_plausible(&state).map_err(fmt_err)?;
    let kvm = open_kvm().map_err(BuildError::from)?;
    let ram = GuestRam::new(state.memory_size).map_err(BuildError::from)?;
    fill_ram(&ram, &file).map_err(fmt_err)?;
    drop(file);
    let vm = create_vm(&kvm, &ram).map_err(BuildError::from)?;
    restore_vm(&vm, &state.irqchips, &state.pit, &state.clock)
        .map_err(|(w, e)| SnapshotError::Kvm(w, e))?;
    let count = state.vcpus.len() as u8;
    let mut vcpus = Vec::new();
    for (id, s) in state.vcpus.iter().enumerate() {
        let fd =
            create_configured_vcpu(&kvm, &vm, kind, id as u8, count).map_err(BuildError::from)?;
        restore_vcpu(&fd, s).map_err(|(w, e)| SnapshotError::Kvm(w, e))?;
        vcpus.push(fd);
    }
    let (bus, platform_rx) = create_devices(&vm, sinks, Some(&state.uarts))?;
    let traps = Arc::new(TrapTable::default());
    if let Some((va, pa)) = state.pvm_trap {
        traps
            .plant(&ram, va, pa, TrapOwner::PvmPageFaultEntry)
            .map_err(|e| fmt_err(FormatError::State(format!("PVM trap address: {e}"))))?;
    }
    let machine = Machine::new(
        kvm,
        vm,
        ram,
        kind,
        vcpus,
        Arc::new(Mutex::new(bus)),
        platform_rx,
        state.placement,
        state.cmdline,
    );
    Ok(Restored {
        machine,
        traps,
        label: state.label,
    })
}
