//! Initial vCPU register state for the 64-bit boot protocol.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::gdt::{kvm_segment_from_gdt, BOOT_CS, BOOT_DS, BOOT_GDT, BOOT_TSS};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START, PML4_START};

/// CR0: protected mode.
pub const X86_CR0_PE: u64 = 0x1;
/// CR0: extension type (387 present).
pub const X86_CR0_ET: u64 = 0x10;
/// CR0: paging.
pub const X86_CR0_PG: u64 = 0x8000_0000;
/// CR4: physical address extension.
pub const X86_CR4_PAE: u64 = 0x20;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 0x100;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 0x400;

/// General registers at kernel entry: RIP at the 64-bit entry point, RSI at
/// `boot_params`.
pub fn boot_regs(entry: u64, boot_params: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsi: boot_params,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Special registers at kernel entry: long mode, identity paging, boot GDT.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment_from_gdt(BOOT_GDT[(BOOT_CS >> 3) as usize], BOOT_CS);
    let data = kvm_segment_from_gdt(BOOT_GDT[(BOOT_DS >> 3) as usize], BOOT_DS);
    let tss = kvm_segment_from_gdt(BOOT_GDT[(BOOT_TSS >> 3) as usize], BOOT_TSS);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// FPU state at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sregs_enter_long_mode_with_boot_selectors() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(s.cs.l, 1);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr3, PML4_START);
    }
}
