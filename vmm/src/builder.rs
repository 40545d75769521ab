//! Assembles a VM from a [`VmConfig`], in order: memory, kernel and initrd,
//! boot structures, KVM VM, vCPUs, devices. The result is a [`Machine`]
//! ready to start.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_guest_debug, Msrs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_SW_BP, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::bootparams::{build_boot_params, e820_map, BootParamsConfig};
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::{acpi, cpuid, gdt, mptable, msr, paging, regs};
use crate::devices::bus::{PlatformEvent, PortIoBus, COM_IRQS};
use crate::devices::serial::{Sink, Uart};
use crate::initrd::{prepare_initrd, InitrdError};
use crate::kvm_kind::KvmKind;
use crate::loader::{load_kernel_image, LoaderError};
use crate::machine::Machine;
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vm::{create_vcpu, create_vm, kvm_err, open_kvm, VmError};

/// Revision of the virtual machine the builder assembles (memory layout,
/// tables, devices, boot registers). Bump it whenever a change would make a
/// guest booted by an older build differ from one booted now: the run
/// snapshot cache keys on it, so no stale snapshot is served.
pub const MACHINE_REVISION: u32 = 6;

/// Largest kernel image (decompressed) the VMM accepts.
pub const MAX_KERNEL_SIZE: usize = 512 << 20;
/// Largest initrd (decompressed) the VMM accepts.
pub const MAX_INITRD_SIZE: usize = 1 << 30;
/// Smallest guest memory the VMM accepts.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Most vCPUs the MP table holds.
pub const MAX_CPUS: u8 = 32;

/// Whether and how to randomize the kernel's placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kaslr {
    /// Randomize if the image carries relocations and the command line does
    /// not say `nokaslr`.
    Auto,
    /// Never randomize.
    Off,
    /// Randomize with a fixed seed (reproducible placement).
    Seed(u64),
}

/// Everything that defines a guest.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Initrds, concatenated in order.
    pub initrds: Vec<PathBuf>,
    /// Kernel command line (the VMM appends what the KVM kind needs).
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Kernel placement randomization.
    pub kaslr: Kaslr,
}

/// Where the guest's serial output goes.
pub struct Sinks {
    /// ttyS0, the kernel console.
    pub console: Sink,
    /// ttyS1, the control channel (lines are parsed by the VMM).
    pub control: Sink,
    /// ttyS2, the command's stdout.
    pub stdout: Sink,
    /// ttyS3, the command's stderr.
    pub stderr: Sink,
}

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// KVM could not be used.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel image is unusable.
    #[error("{path} is not a bootable x86-64 Linux kernel: {source}")]
    Kernel {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: LoaderError,
    },
    /// The initrd is unusable.
    #[error("{path}: {source}")]
    Initrd {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: InitrdError,
    },
    /// Not enough guest memory for kernel, initrd and a working system.
    #[error("{memory_mib} MiB of guest memory is too little: {what}")]
    TooLittleMemory {
        /// Configured RAM.
        memory_mib: u64,
        /// What did not fit.
        what: String,
    },
    /// Bad vCPU count.
    #[error("--cpus must be between 1 and {MAX_CPUS}, not {0}")]
    Cpus(u8),
    /// Command line too long.
    #[error("kernel command line is {0} bytes; the limit is {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong(usize),
    /// Guest memory error.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// MP table error.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// The ACPI tables could not be built.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A saved device state is invalid.
    #[error("saved device state is invalid: {0}")]
    DeviceState(String),
    /// Host error creating an event fd.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Where the kernel ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelPlacement {
    /// Physical address of the first loaded byte.
    pub phys_start: u64,
    /// Virtual KASLR offset applied by the VMM (0 if none).
    pub virt_offset: u64,
    /// Physical offset from the link address.
    pub phys_offset: u64,
    /// 64-bit entry point (physical).
    pub entry: u64,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|source| BuildError::Read {
        path: path.clone(),
        source,
    })
}

/// A deterministic xorshift for placement (seeded from the clock in Auto).
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Builds a machine: loads the kernel and initrd into fresh guest memory and
/// creates the KVM VM, vCPUs and devices. Nothing runs yet.
pub fn build(config: &VmConfig, sinks: Sinks) -> Result<Machine, BuildError> {
    if config.cpus == 0 || config.cpus > MAX_CPUS {
        return Err(BuildError::Cpus(config.cpus));
    }
    if config.memory_mib < MIN_MEMORY_MIB {
        return Err(BuildError::TooLittleMemory {
            memory_mib: config.memory_mib,
            what: format!("the minimum is {MIN_MEMORY_MIB} MiB"),
        });
    }
    let kvm = open_kvm()?;
    let kind = KvmKind::detect();
    let kernel_bytes = read(&config.kernel)?;
    let image =
        load_kernel_image(&kernel_bytes, MAX_KERNEL_SIZE).map_err(|source| BuildError::Kernel {
            path: config.kernel.clone(),
            source,
        })?;
    drop(kernel_bytes);

    let mut initrd = Vec::new();
    for path in &config.initrds {
        let bytes =
            prepare_initrd(read(path)?, MAX_INITRD_SIZE).map_err(|source| BuildError::Initrd {
                path: path.clone(),
                source,
            })?;
        initrd.extend_from_slice(&bytes);
        while initrd.len() % 4 != 0 {
            initrd.push(0);
        }
    }

    let mem_size = config.memory_mib << 20;
    let low_end = mem_size.min(MMIO_HOLE_START);
    let mut cmdline = config.cmdline.trim().to_string();
    let (before, after) = (kind.guest_cmdline_defaults(), kind.guest_cmdline());
    cmdline = format!("{before} {cmdline} {after}").trim().to_string();
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BuildError::CmdlineTooLong(cmdline.len()));
    }

    // Kernel placement: link address, or a random 2 MiB-aligned physical
    // slot and virtual offset when KASLR applies (what the bzImage
    // decompressor would have done).
    let link_phys = image.phys_start;
    let mut loaded = image.image;
    let image_len = loaded.len() as u64;
    let initrd_len = (initrd.len() as u64 + 0xfff) & !0xfff;
    let initrd_top = low_end.min(INITRD_ADDR_MAX + 1) & !0xfff;
    let needed = KERNEL_DEFAULT_PHYS + image_len + initrd_len + (16 << 20);
    if needed > low_end {
        return Err(BuildError::TooLittleMemory {
            memory_mib: config.memory_mib,
            what: format!(
                "kernel ({} MiB) and initrd ({} MiB) need at least {} MiB",
                image_len >> 20,
                initrd_len >> 20,
                (needed >> 20) + 1
            ),
        });
    }
    let wants_kaslr = match config.kaslr {
        Kaslr::Off => false,
        _ => image.relocs.is_some() && !cmdline.split_whitespace().any(|w| w == "nokaslr"),
    };
    let mut placement = KernelPlacement {
        phys_start: link_phys,
        virt_offset: 0,
        phys_offset: 0,
        entry: image.elf.entry,
    };
    if wants_kaslr {
        let mut seed = match config.kaslr {
            Kaslr::Seed(s) => s | 1,
            _ => {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            }
        };
        const ALIGN: u64 = 2 << 20;
        const KERNEL_IMAGE_SIZE: u64 = 1 << 30;
        // Slot 0 (the link address) is left out: a randomized kernel that
        // sits where an unrandomized one would is indistinguishable from
        // KASLR being off, to users and to introspection tests alike.
        let virt_slots = (KERNEL_IMAGE_SIZE - link_phys - image_len) / ALIGN;
        let virt_offset = match virt_slots {
            0 | 1 => 0,
            n => (1 + next_random(&mut seed) % (n - 1)) * ALIGN,
        };
        let phys_room = initrd_top
            .saturating_sub(initrd_len)
            .saturating_sub(link_phys + image_len + (16 << 20));
        let phys_offset = (next_random(&mut seed) % (phys_room / ALIGN).max(1)) * ALIGN;
        let relocs = image.relocs.as_ref().expect("checked above");
        crate::loader::apply_kaslr(&mut loaded, link_phys, relocs, virt_offset as i64).map_err(
            |e| BuildError::Kernel {
                path: config.kernel.clone(),
                source: LoaderError::from(e),
            },
        )?;
        placement = KernelPlacement {
            phys_start: link_phys + phys_offset,
            virt_offset,
            phys_offset,
            entry: image.elf.entry + phys_offset,
        };
    }

    let ram = GuestRam::new(mem_size)?;
    ram.write(placement.phys_start, &loaded)?;
    drop(loaded);
    let initrd_region = if initrd.is_empty() {
        None
    } else {
        let addr = initrd_top - initrd_len;
        ram.write(addr, &initrd)?;
        Some((addr, initrd.len() as u64))
    };
    drop(initrd);

    let mut cmdline_bytes = cmdline.clone().into_bytes();
    cmdline_bytes.push(0);
    ram.write(CMDLINE_START, &cmdline_bytes)?;
    let gdt_bytes: Vec<u8> = gdt::BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(BOOT_GDT_START, &gdt_bytes)?;
    ram.write(BOOT_IDT_START, &0u64.to_le_bytes())?;
    for (addr, bytes) in paging::identity_map_tables() {
        ram.write(addr, &bytes)?;
    }
    let header = image.setup_header.as_ref().map(|h| h.raw.as_slice());
    let zero_page = build_boot_params(&BootParamsConfig {
        setup_header: header,
        cmdline_addr: CMDLINE_START,
        initrd: initrd_region,
        kaslr: wants_kaslr,
        e820: e820_map(mem_size),
    });
    ram.write(BOOT_PARAMS_START, &zero_page)?;
    ram.write(
        MPTABLE_START,
        &mptable::build_mptable(MPTABLE_START, config.cpus)?,
    )?;
    ram.write(
        ACPI_START,
        &acpi::build_acpi_tables(ACPI_START, config.cpus)?,
    )?;

    let vm = create_vm(&kvm, &ram)?;
    let vcpus = (0..config.cpus)
        .map(|id| setup_vcpu(&kvm, &vm, kind, id, config.cpus, placement.entry))
        .collect::<Result<Vec<_>, _>>()?;

    let (bus, platform_rx) = create_devices(&vm, sinks, None)?;

    Ok(Machine::new(
        kvm,
        vm,
        ram,
        kind,
        vcpus,
        Arc::new(Mutex::new(bus)),
        platform_rx,
        placement,
        cmdline,
    ))
}

/// Creates the UARTs (wired to their IRQs through irqfds) and the i8042,
/// from saved UART states when restoring.
pub(crate) fn create_devices(
    vm: &VmFd,
    sinks: Sinks,
    states: Option<&[crate::devices::serial::UartState]>,
) -> Result<(PortIoBus, mpsc::Receiver<PlatformEvent>), BuildError> {
    let (platform_tx, platform_rx) = mpsc::channel();
    let sinks_by_port: Vec<Sink> = vec![sinks.console, sinks.control, sinks.stdout, sinks.stderr];
    let mut uarts = Vec::new();
    for (i, sink) in sinks_by_port.into_iter().enumerate() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&evt, COM_IRQS[i])
            .map_err(kvm_err("KVM_IRQFD"))?;
        let uart = match states.and_then(|s| s.get(i)) {
            Some(state) => Uart::from_state(state, evt, sink).map_err(BuildError::DeviceState)?,
            None => Uart::new(evt, sink),
        };
        uarts.push(uart);
    }
    Ok((PortIoBus::new(uarts, platform_tx), platform_rx))
}

/// Creates vCPU `id` of `count` with its CPUID and, on hardware KVM, with
/// software breakpoints routed to the VMM.
pub(crate) fn create_configured_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    kind: KvmKind,
    id: u8,
    count: u8,
) -> Result<VcpuFd, VmError> {
    let vcpu = create_vcpu(vm, id)?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid::vcpu_cpuid(
        supported,
        id,
        count,
        kind.hidden_kvm_features(),
    ))
    .map_err(kvm_err("KVM_SET_CPUID2"))?;
    if kind == KvmKind::Hardware {
        let dbg = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP,
            ..Default::default()
        };
        vcpu.set_guest_debug(&dbg)
            .map_err(kvm_err("KVM_SET_GUEST_DEBUG"))?;
    }
    Ok(vcpu)
}

/// Creates and initialises one vCPU; only the boot processor gets entry
/// registers, the others wait for INIT/SIPI from the guest.
fn setup_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    kind: KvmKind,
    id: u8,
    count: u8,
    entry: u64,
) -> Result<VcpuFd, VmError> {
    let vcpu = create_configured_vcpu(kvm, vm, kind, id, count)?;
    let msrs = Msrs::from_entries(&msr::boot_msrs()).expect("boot MSR list fits");
    vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    set_lvt(&mut lapic, 0x350, 0x700); // LINT0: ExtINT
    set_lvt(&mut lapic, 0x360, 0x400); // LINT1: NMI
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    if id == 0 {
        vcpu.set_regs(&regs::boot_regs(entry, BOOT_PARAMS_START))
            .map_err(kvm_err("KVM_SET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&regs::boot_sregs(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_fpu(&regs::boot_fpu())
            .map_err(kvm_err("KVM_SET_FPU"))?;
    }
    Ok(vcpu)
}

/// Sets the delivery mode of a local APIC LVT register (bits 8..10).
fn set_lvt(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, mode: u32) {
    let raw: Vec<u8> = lapic.regs[offset..offset + 4]
        .iter()
        .map(|b| *b as u8)
        .collect();
    let v = u32::from_le_bytes(raw.try_into().expect("4 bytes"));
    let v = (v & !0x700) | mode;
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}
