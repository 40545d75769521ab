//! The KVM VM object: memory slots, in-kernel irqchip and PIT, vCPU fds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::vstate::memory::GuestRam;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open {path} ({source}); hvtrace needs KVM: check that the device exists and is readable and writable by this user")]
    OpenKvm {
        /// The device path.
        path: String,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// The KVM API version is not 12.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A vCPU's extended state is larger than `struct kvm_xsave`.
    #[error("KVM reports a vCPU XSAVE area of {0} bytes, more than the 4096 of KVM_GET_XSAVE/KVM_SET_XSAVE, which hvtrace uses")]
    XsaveTooLarge(i32),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
}

/// Maps a KVM error to [`VmError::Kvm`] with context.
pub fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The KVM device: /dev/kvm, or `$HVTRACE_KVM_DEVICE` (for tests of the
/// missing-device error).
pub fn kvm_device_path() -> String {
    std::env::var("HVTRACE_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string())
}

/// Opens the KVM device and checks the API version.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let path = kvm_device_path();
    let c_path = std::ffi::CString::new(path.clone()).map_err(|_| VmError::OpenKvm {
        path: path.clone(),
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|source| VmError::OpenKvm { path, source })?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    Ok(kvm)
}

/// Creates a VM with `ram` registered, an in-kernel irqchip (PIC, IOAPIC,
/// LAPICs) and PIT.
///
/// Refuses a KVM whose vCPUs' XSAVE area (`KVM_CAP_XSAVE2`: the features
/// this process may give a guest) exceeds the 4096 bytes of `struct
/// kvm_xsave`: then `KVM_GET_XSAVE` would cut it short and `KVM_SET_XSAVE`
/// would read past the struct. The host CPU's own largest area may be
/// larger (AMX tile data alone is 8 KiB), but KVM offers a guest the
/// dynamically enabled AMX state only after `ARCH_REQ_XCOMP_GUEST_PERM`,
/// which hvtrace never asks for. Every XSAVE transfer in the VMM relies
/// on this check.
pub fn create_vm(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    // 0: a KVM without XSAVE2, whose areas are at most 4096 bytes.
    let xsave = vm.check_extension_int(kvm_ioctls::Cap::Xsave2);
    if xsave > crate::arch::x86_64::xsave::KVM_XSAVE_SIZE as i32 {
        return Err(VmError::XsaveTooLarge(xsave));
    }
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    for (slot, (guest, host, len)) in ram.regions().into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: guest,
            memory_size: len as u64,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `host..host+len` is a live mapping owned by `ram`, which
        // the VM keeps alive (every holder of the VM also holds `ram`) for as
        // long as the VM fd exists.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Creates vCPU `id`.
pub fn create_vcpu(vm: &VmFd, id: u8) -> Result<VcpuFd, VmError> {
    vm.create_vcpu(u64::from(id))
        .map_err(kvm_err("KVM_CREATE_VCPU"))
}
