//! Capturing and restoring machine state through KVM: vCPUs (registers,
//! FPU, MSRs, LAPIC, events), in-kernel irqchip, PIT, clock, and devices.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::builder::KernelPlacement;
use crate::devices::serial::UartState;
use crate::kvm_kind::KvmKind;

/// One vCPU's architectural state.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state (kvm-bindings has no serde for it; kept as raw bytes).
    #[serde(with = "fpu_bytes")]
    pub fpu: kvm_fpu,
    /// Every MSR KVM lists that could be read: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Running, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Extended control registers, where supported.
    pub xcrs: Option<kvm_xcrs>,
    /// The whole XSAVE area (`KVM_GET_XSAVE`, 1,024 words): the x87/SSE
    /// state of `fpu` plus the AVX upper halves and every other extended
    /// component user mode may hold.
    pub xsave: Option<Vec<u32>>,
}

/// The whole machine except memory.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    /// Free-form label (e.g. the snapshot cache key), checked on restore.
    pub label: String,
    /// KVM kind the state was captured on.
    pub kind: KvmKind,
    /// Guest RAM size in bytes.
    pub memory_size: u64,
    /// Kernel placement.
    pub placement: KernelPlacement,
    /// Kernel command line.
    pub cmdline: String,
    /// Per vCPU.
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// PIT channels.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// ttyS0..ttyS3.
    pub uarts: Vec<UartState>,
    /// Where the PVM syscall fix-up trap goes (va, pa); memory is saved
    /// with the original byte.
    pub pvm_trap: Option<(u64, u64)>,
}

/// Reads one vCPU's state. `msr_indices` is KVM's MSR index list; MSRs that
/// cannot be read on this host are skipped.
pub fn capture_vcpu(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, kvm_ioctls::Error> {
    let mut msrs = Vec::new();
    for chunk in msr_indices.chunks(64) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut m = Msrs::from_entries(&entries).expect("64 entries fit");
        let n = fd.get_msrs(&mut m)?;
        if n == chunk.len() {
            msrs.extend(m.as_slice().iter().map(|e| (e.index, e.data)));
        } else {
            // Some MSR in this chunk is not readable: go one by one.
            for &index in chunk {
                let mut one = Msrs::from_entries(&[kvm_msr_entry {
                    index,
                    ..Default::default()
                }])
                .expect("1 entry");
                if fd.get_msrs(&mut one).unwrap_or(0) == 1 {
                    msrs.push((index, one.as_slice()[0].data));
                }
            }
        }
    }
    Ok(VcpuState {
        regs: fd.get_regs()?,
        sregs: fd.get_sregs()?,
        fpu: fd.get_fpu()?,
        msrs,
        lapic: fd.get_lapic()?,
        events: fd.get_vcpu_events()?,
        mp_state: fd.get_mp_state()?,
        debugregs: fd.get_debug_regs()?,
        xcrs: fd.get_xcrs().ok(),
        xsave: fd.get_xsave().ok().map(|x| x.region.to_vec()),
    })
}

/// Writes a vCPU's state back (CPUID must already be set).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), (&'static str, kvm_ioctls::Error)> {
    fd.set_mp_state(s.mp_state)
        .map_err(|e| ("KVM_SET_MP_STATE", e))?;
    fd.set_regs(&s.regs).map_err(|e| ("KVM_SET_REGS", e))?;
    fd.set_sregs(&s.sregs).map_err(|e| ("KVM_SET_SREGS", e))?;
    fd.set_fpu(&s.fpu).map_err(|e| ("KVM_SET_FPU", e))?;
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(|e| ("KVM_SET_XCRS", e))?;
    }
    if let Some(words) = &s.xsave {
        let mut x = kvm_bindings::kvm_xsave::default();
        for (dst, src) in x.region.iter_mut().zip(words) {
            *dst = *src;
        }
        // SAFETY: KVM reads the guest's uabi XSAVE size from `x`, which
        // `create_vm` checked (KVM_CAP_XSAVE2) to be at most the 4096 bytes
        // of `struct kvm_xsave`.
        unsafe { fd.set_xsave(&x) }.map_err(|e| ("KVM_SET_XSAVE", e))?;
    }
    fd.set_debug_regs(&s.debugregs)
        .map_err(|e| ("KVM_SET_DEBUGREGS", e))?;
    fd.set_lapic(&s.lapic).map_err(|e| ("KVM_SET_LAPIC", e))?;
    for chunk in s.msrs.chunks(64) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let m = Msrs::from_entries(&entries).expect("64 entries fit");
        fd.set_msrs(&m).map_err(|e| ("KVM_SET_MSRS", e))?;
    }
    fd.set_vcpu_events(&s.events)
        .map_err(|e| ("KVM_SET_VCPU_EVENTS", e))?;
    Ok(())
}

/// Reads the in-kernel irqchip, PIT and clock.
pub fn capture_vm(
    vm: &VmFd,
) -> Result<(Vec<kvm_irqchip>, kvm_pit_state2, kvm_clock_data), kvm_ioctls::Error> {
    let mut chips = Vec::new();
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)?;
        chips.push(c);
    }
    Ok((chips, vm.get_pit2()?, vm.get_clock()?))
}

/// Writes the in-kernel irqchip, PIT and clock back.
pub fn restore_vm(
    vm: &VmFd,
    chips: &[kvm_irqchip],
    pit: &kvm_pit_state2,
    clock: &kvm_clock_data,
) -> Result<(), (&'static str, kvm_ioctls::Error)> {
    vm.set_pit2(pit).map_err(|e| ("KVM_SET_PIT2", e))?;
    let mut clock = *clock;
    // Only the clock value is restored; KVM rejects flags it did not report.
    clock.flags = 0;
    vm.set_clock(&clock).map_err(|e| ("KVM_SET_CLOCK", e))?;
    for c in chips {
        vm.set_irqchip(c).map_err(|e| ("KVM_SET_IRQCHIP", e))?;
    }
    Ok(())
}

/// `kvm_fpu` as its raw bytes (a plain-old-data C struct).
mod fpu_bytes {
    use kvm_bindings::kvm_fpu;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(fpu: &kvm_fpu, s: S) -> Result<S::Ok, S::Error> {
        // SAFETY: kvm_fpu is a repr(C) struct of integers and byte arrays
        // with no padding-dependent invariants; viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (fpu as *const kvm_fpu).cast::<u8>(),
                std::mem::size_of::<kvm_fpu>(),
            )
        };
        bytes.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<kvm_fpu, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        if bytes.len() != std::mem::size_of::<kvm_fpu>() {
            return Err(serde::de::Error::custom("kvm_fpu has the wrong size"));
        }
        let mut fpu = kvm_fpu::default();
        // SAFETY: the sizes match and every bit pattern is a valid kvm_fpu
        // (it holds only integers and byte arrays).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut fpu as *mut kvm_fpu).cast::<u8>(),
                bytes.len(),
            )
        };
        Ok(fpu)
    }
}
