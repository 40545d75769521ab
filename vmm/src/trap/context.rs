//! What a trap handler receives: the stopped vCPU's registers (read once,
//! written back only if the handler changed them), the special-register
//! facts introspection needs (read only if the handler asks), and guest
//! memory. No KVM type crosses this seam, so a tracer built on it needs
//! neither kvm-ioctls nor a VM to be tested: a test builds a
//! [`TrapContext`] over a [`GuestRam`] it filled.

use guest_introspect::kernel::VcpuView;
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::vstate::memory::GuestRam;

/// General-purpose registers, instruction pointer and flags of a vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // the x86-64 register names are their documentation
pub struct GuestRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// Builds a `$to` from `$from`, whose x86-64 registers have the same
/// field names (kvm_regs and GuestRegs): the one list of the 18 fields.
macro_rules! copy_regs {
    ($to:ident, $from:expr) => {{
        let r = $from;
        $to {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }};
}

impl From<&kvm_regs> for GuestRegs {
    fn from(r: &kvm_regs) -> Self {
        copy_regs!(GuestRegs, r)
    }
}

impl From<&GuestRegs> for kvm_regs {
    fn from(r: &GuestRegs) -> Self {
        copy_regs!(kvm_regs, r)
    }
}

/// The special-register facts a trap handler reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSregs {
    /// CR3, CR4 and the IDT, for introspection.
    pub view: VcpuView,
    /// GS base: in kernel mode, this CPU's per-CPU area.
    pub gs_base: u64,
    /// Code segment selector (its low two bits are the privilege level).
    pub cs: u16,
}

impl From<&kvm_sregs> for GuestSregs {
    fn from(s: &kvm_sregs) -> Self {
        Self {
            view: vcpu_view(s),
            gs_base: s.gs.base,
            cs: s.cs.selector,
        }
    }
}

/// What introspection needs of a vCPU, from KVM's special registers.
pub fn vcpu_view(sregs: &kvm_sregs) -> VcpuView {
    VcpuView {
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        idt_base: sregs.idt.base,
        idt_limit: sregs.idt.limit,
    }
}

/// Reads a stopped vCPU's special registers on demand (a `KVM_GET_SREGS`
/// in the VMM, anything in a test).
pub type SregsReader<'a> = dyn FnMut() -> Result<GuestSregs, String> + 'a;

/// A vCPU stopped at a trap, as its handler sees it.
///
/// The special registers are read only when the handler asks for them
/// ([`TrapContext::sregs`]): on PVM KVM each register ioctl loads the
/// vCPU anew (several MSR reads), and a handler that knows this CPU's
/// per-CPU base and finds the address space in guest memory needs none.
pub struct TrapContext<'a> {
    /// Which vCPU.
    pub vcpu_id: u8,
    /// Guest memory.
    pub ram: &'a GuestRam,
    regs: GuestRegs,
    changed: bool,
    sregs: Option<GuestSregs>,
    read_sregs: Option<&'a mut SregsReader<'a>>,
}

impl<'a> TrapContext<'a> {
    /// A context over registers already read, special ones included.
    pub fn new(vcpu_id: u8, regs: GuestRegs, sregs: GuestSregs, ram: &'a GuestRam) -> Self {
        Self {
            vcpu_id,
            ram,
            regs,
            changed: false,
            sregs: Some(sregs),
            read_sregs: None,
        }
    }

    /// A context whose special registers are read by `read` the first
    /// time a handler asks for them (at most once).
    pub fn with_lazy_sregs(
        vcpu_id: u8,
        regs: GuestRegs,
        ram: &'a GuestRam,
        read: &'a mut SregsReader<'a>,
    ) -> Self {
        Self {
            vcpu_id,
            ram,
            regs,
            changed: false,
            sregs: None,
            read_sregs: Some(read),
        }
    }

    /// The vCPU's special registers (read-only to handlers), read now if
    /// they were not yet.
    pub fn sregs(&mut self) -> Result<GuestSregs, String> {
        if let Some(s) = self.sregs {
            return Ok(s);
        }
        let read = self
            .read_sregs
            .as_mut()
            .ok_or_else(|| "no special registers for this trap".to_string())?;
        let s = read()?;
        self.sregs = Some(s);
        Ok(s)
    }

    /// Whether the special registers have been read for this trap.
    pub fn sregs_read(&self) -> bool {
        self.sregs.is_some()
    }

    /// The vCPU's registers.
    pub fn regs(&self) -> &GuestRegs {
        &self.regs
    }

    /// The vCPU's registers, to change: they are written back to the vCPU
    /// when the handler returns.
    pub fn regs_mut(&mut self) -> &mut GuestRegs {
        self.changed = true;
        &mut self.regs
    }

    /// The registers to write back, if the handler asked to change them.
    pub fn changed_regs(&self) -> Option<&GuestRegs> {
        self.changed.then_some(&self.regs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip_and_are_written_back_only_when_changed() {
        let k = kvm_regs {
            rax: 1,
            rdi: 2,
            r15: 3,
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x246,
            ..Default::default()
        };
        let g = GuestRegs::from(&k);
        assert_eq!(kvm_regs::from(&g), k);
        let ram = GuestRam::new(1 << 20).unwrap();
        let sregs = GuestSregs::from(&kvm_sregs::default());
        let mut ctx = TrapContext::new(0, g, sregs, &ram);
        let _ = ctx.regs().rip;
        assert!(ctx.changed_regs().is_none());
        ctx.regs_mut().rip += 1;
        assert_eq!(ctx.changed_regs().unwrap().rip, k.rip + 1);
    }

    #[test]
    fn special_registers_are_read_once_and_only_when_asked() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut reads = 0;
        let mut read = || {
            reads += 1;
            Ok(GuestSregs {
                gs_base: 0x1234,
                ..GuestSregs::from(&kvm_sregs::default())
            })
        };
        {
            let mut ctx = TrapContext::with_lazy_sregs(0, GuestRegs::default(), &ram, &mut read);
            assert!(!ctx.sregs_read());
            assert_eq!(ctx.sregs().unwrap().gs_base, 0x1234);
            assert_eq!(ctx.sregs().unwrap().gs_base, 0x1234);
            assert!(ctx.sregs_read());
        }
        assert_eq!(reads, 1);
        let mut failing = || Err("KVM_GET_SREGS: EIO".to_string());
        let mut ctx = TrapContext::with_lazy_sregs(0, GuestRegs::default(), &ram, &mut failing);
        assert!(ctx.sregs().unwrap_err().contains("EIO"));
    }
}
