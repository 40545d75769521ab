//! What PVM KVM cannot do for a non-PVM guest kernel, done by the VMM.
//!
//! * The syscall fix-up: a guest user-mode `syscall` lands on
//!   `entry_SYSCALL_64` still at CPL 3 and page-faults there. We trap the
//!   kernel's page-fault entry (an `int3` over its `cld`); when the faulting
//!   frame shows a CPL-3 fault at MSR_LSTAR, we finish the `syscall` by hand,
//!   otherwise we emulate the displaced `cld` and let the fault proceed.
//! * Instructions the KVM emulator lacks but that are no-ops for a guest in
//!   our state (`fwait` with no x87 exception pending).
//!
//! Found without symbols: the page-fault entry is IDT vector 14.

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{read_virt, translate, AddressSpace, PagingLevels};

use crate::vstate::memory::GuestRam;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const RFLAGS_DF: u64 = 1 << 10;
const RFLAGS_FIXED: u64 = 1 << 1;
const PAGE_FAULT_VECTOR: u64 = 14;

/// The #PF vector, as [`inject`] takes it.
pub(crate) const PAGE_FAULT: u32 = 14;
/// #PF error code bit: the page was present (a protection fault).
pub(crate) const PF_PRESENT: u32 = 1 << 0;
/// #PF error code bit: the access was a write.
pub(crate) const PF_WRITE: u32 = 1 << 1;
/// Injects exception `vector` (with `error_code`; CR2 = `cr2` for a #PF)
/// into the stopped vCPU, RIP left on the faulting instruction.
pub(crate) fn inject(
    vcpu: &VcpuFd,
    vector: u32,
    error_code: u32,
    cr2: Option<u64>,
) -> Result<(), kvm_ioctls::Error> {
    if let Some(cr2) = cr2 {
        let mut sregs = vcpu.get_sregs()?;
        sregs.cr2 = cr2;
        vcpu.set_sregs(&sregs)?;
    }
    let mut events = vcpu.get_vcpu_events()?;
    events.exception.injected = 1;
    events.exception.nr = vector as u8;
    events.exception.has_error_code = 1;
    events.exception.error_code = error_code;
    vcpu.set_vcpu_events(&events)
}

/// The address space a vCPU currently runs in.
pub fn address_space(sregs: &kvm_sregs) -> AddressSpace {
    AddressSpace {
        cr3: sregs.cr3,
        levels: PagingLevels::from_cr4(sregs.cr4),
    }
}

/// Where the page-fault entry's `cld` is, once the kernel's IDT is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFaultEntry {
    /// Guest-virtual address of the `cld`.
    pub va: u64,
    /// Guest-physical address of the `cld`.
    pub pa: u64,
}

/// Result of looking for the page-fault entry.
#[derive(Debug, PartialEq, Eq)]
pub enum EntrySearch {
    /// Found: plant here.
    Found(PageFaultEntry),
    /// The kernel has not installed its final IDT (or patched its entry) yet.
    NotYet,
    /// The entry does not look like Linux's `asm_exc_page_fault`.
    Unrecognised(String),
}

/// Looks up IDT vector 14 and checks that it starts like Linux's idtentry:
/// optional `endbr64`, the (NOP'd) `clac` slot, then `cld`.
pub fn find_page_fault_entry(ram: &GuestRam, sregs: &kvm_sregs) -> EntrySearch {
    if sregs.idt.limit < (PAGE_FAULT_VECTOR * 16 + 15) as u16 || sregs.cr0 & 0x8000_0000 == 0 {
        return EntrySearch::NotYet;
    }
    let space = address_space(sregs);
    let Ok(handler) =
        guest_introspect::kernel::idt_handler(ram, space, sregs.idt.base, PAGE_FAULT_VECTOR)
    else {
        return EntrySearch::NotYet;
    };
    let mut code = [0u8; 16];
    if read_virt(ram, space, VirtAddr(handler), &mut code).is_err() {
        return EntrySearch::NotYet;
    }
    let mut decoder = Decoder::with_ip(64, &code, handler, DecoderOptions::NONE);
    // endbr64 + up to three one-byte NOPs (the `clac` slot before the
    // kernel optimizes its NOPs, as 6.12 boots) + cld: at most 5 decodes.
    for _ in 0..8 {
        let insn = decoder.decode();
        match insn.mnemonic() {
            Mnemonic::Nop | Mnemonic::Endbr64 => continue,
            Mnemonic::Cld => {
                let va = insn.ip();
                return match translate(ram, space, VirtAddr(va)) {
                    Ok(pa) => EntrySearch::Found(PageFaultEntry { va, pa: pa.0 }),
                    Err(_) => EntrySearch::NotYet,
                };
            }
            // `clac` not yet patched away, or the early IDT's handlers.
            _ => return EntrySearch::NotYet,
        }
    }
    EntrySearch::Unrecognised(format!(
        "IDT vector 14 handler {handler:#x} starts {code:02x?}"
    ))
}

/// The syscall MSRs, read once per vCPU (Linux sets them once per CPU).
#[derive(Debug, Clone, Copy)]
pub struct SyscallMsrs {
    /// MSR_STAR: selector bases.
    pub star: u64,
    /// MSR_LSTAR: 64-bit syscall entry.
    pub lstar: u64,
    /// MSR_SYSCALL_MASK: RFLAGS bits cleared on entry.
    pub sfmask: u64,
}

impl SyscallMsrs {
    /// Reads the three MSRs from the vCPU.
    pub fn read(vcpu: &VcpuFd) -> Option<Self> {
        let mut msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: MSR_STAR,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_LSTAR,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_SYSCALL_MASK,
                ..Default::default()
            },
        ])
        .ok()?;
        if vcpu.get_msrs(&mut msrs).ok()? != 3 {
            return None;
        }
        let e = msrs.as_slice();
        Some(Self {
            star: e[0].data,
            lstar: e[1].data,
            sfmask: e[2].data,
        })
    }
}

/// What the page-fault trap found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFaultOutcome {
    /// A user `syscall` that failed at the entry; completed by hand.
    SyscallCompleted,
    /// An ordinary page fault; `cld` emulated, fault handling proceeds.
    GenuineFault,
}

/// Errors of the page-fault trap.
#[derive(Debug, thiserror::Error)]
pub enum FixupError {
    /// A register ioctl failed.
    #[error("vCPU register access failed: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    /// The exception frame could not be read.
    #[error("cannot read the page-fault frame at {rsp:#x}: {reason}")]
    Frame {
        /// Kernel stack pointer.
        rsp: u64,
        /// Why.
        reason: String,
    },
    /// MSR read failed.
    #[error("cannot read the syscall MSRs")]
    Msrs,
}

/// Handles the trap on the page-fault entry's `cld` (vCPU stopped there).
pub fn handle_page_fault_entry(
    vcpu: &VcpuFd,
    ram: &GuestRam,
    msrs: &mut Option<SyscallMsrs>,
    at: &Stopped,
) -> Result<PageFaultOutcome, FixupError> {
    let (mut regs, sregs) = (at.regs, at.sregs);
    let mut frame = [0u8; 48];
    read_virt(ram, address_space(&sregs), VirtAddr(regs.rsp), &mut frame).map_err(|e| {
        FixupError::Frame {
            rsp: regs.rsp,
            reason: e.to_string(),
        }
    })?;
    let word = |i: usize| u64::from_le_bytes(frame[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let (fault_rip, fault_cs, fault_rflags, fault_rsp) = (word(1), word(2), word(3), word(4));
    if fault_cs & 3 == 3 {
        if msrs.is_none() {
            *msrs = Some(SyscallMsrs::read(vcpu).ok_or(FixupError::Msrs)?);
        }
        let m = msrs.expect("just set");
        if fault_rip == m.lstar {
            complete_syscall(vcpu, &mut regs, sregs, m, fault_rflags, fault_rsp)?;
            return Ok(PageFaultOutcome::SyscallCompleted);
        }
    }
    regs.rflags &= !RFLAGS_DF;
    regs.rip += 1;
    vcpu.set_regs(&regs)?;
    Ok(PageFaultOutcome::GenuineFault)
}

/// Finishes a `syscall` whose privilege switch failed: RCX and R11 already
/// hold the user RIP and RFLAGS; load the kernel selectors from MSR_STAR,
/// drop the page-fault frame and enter at LSTAR with masked flags.
fn complete_syscall(
    vcpu: &VcpuFd,
    regs: &mut kvm_regs,
    mut sregs: kvm_sregs,
    m: SyscallMsrs,
    user_rflags: u64,
    user_rsp: u64,
) -> Result<(), FixupError> {
    let kernel_cs = ((m.star >> 32) & 0xfffc) as u16;
    sregs.cs = kernel_segment(kernel_cs, 0xb, true);
    sregs.ss = kernel_segment(kernel_cs + 8, 0x3, false);
    regs.rip = m.lstar;
    regs.rsp = user_rsp;
    regs.rflags = (user_rflags & !m.sfmask) | RFLAGS_FIXED;
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(regs)?;
    Ok(())
}

fn kernel_segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The registers of a vCPU stopped at an exit, read once and handed to
/// every step that looks at that exit.
#[derive(Debug, Clone, Copy)]
pub struct Stopped {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
}

/// Longest x86 instruction.
const MAX_INSN_LEN: u64 = 15;

/// Reads up to 15 instruction bytes at the stopped vCPU's RIP: one page
/// walk, or two when the bytes cross into a mapped next page.
pub fn instruction_bytes(ram: &GuestRam, at: &Stopped) -> Vec<u8> {
    let space = address_space(&at.sregs);
    let rip = at.regs.rip;
    let mut bytes = vec![0u8; MAX_INSN_LEN as usize];
    if read_virt(ram, space, VirtAddr(rip), &mut bytes).is_ok() {
        return bytes;
    }
    // The next page is not mapped: the instruction ends on this one.
    let in_page = (0x1000 - (rip & 0xfff)).min(MAX_INSN_LEN) as usize;
    bytes.truncate(in_page);
    match read_virt(ram, space, VirtAddr(rip), &mut bytes) {
        Ok(()) => bytes,
        Err(_) => Vec::new(),
    }
}

/// Length of an instruction the VMM may skip as a no-op on PVM, if `bytes`
/// starts with one: `fwait` (no unmasked x87 exception can be pending in a
/// kernel that dropped its FPU state).
pub fn skippable_instruction(bytes: &[u8]) -> Option<u64> {
    match bytes.first() {
        Some(0x9b) => Some(1),
        _ => None,
    }
}

/// An instruction the KVM emulator lacks that the VMM performs itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MxcsrAccess {
    /// `ldmxcsr m32`: load MXCSR from memory.
    Load,
    /// `stmxcsr m32`: store MXCSR to memory.
    Store,
}

/// The effective address of `insn`'s memory operand (flat segments as in
/// a 64-bit kernel, FS/GS bases honoured), or None for an operand built
/// from registers other than the 16 general ones.
pub(crate) fn effective_address(
    insn: &iced_x86::Instruction,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Option<u64> {
    use iced_x86::Register;
    let reg = |r: Register| -> Option<u64> {
        Some(match r {
            Register::None => 0,
            Register::RAX => regs.rax,
            Register::RBX => regs.rbx,
            Register::RCX => regs.rcx,
            Register::RDX => regs.rdx,
            Register::RSI => regs.rsi,
            Register::RDI => regs.rdi,
            Register::RSP => regs.rsp,
            Register::RBP => regs.rbp,
            Register::R8 => regs.r8,
            Register::R9 => regs.r9,
            Register::R10 => regs.r10,
            Register::R11 => regs.r11,
            Register::R12 => regs.r12,
            Register::R13 => regs.r13,
            Register::R14 => regs.r14,
            Register::R15 => regs.r15,
            _ => return None,
        })
    };
    // RIP-relative operands: iced already folded RIP into the displacement.
    let base = if insn.memory_base() == Register::RIP {
        0
    } else {
        reg(insn.memory_base())?
    };
    let index = reg(insn.memory_index())?.wrapping_mul(u64::from(insn.memory_index_scale()));
    let seg = match insn.memory_segment() {
        Register::FS => sregs.fs.base,
        Register::GS => sregs.gs.base,
        _ => 0,
    };
    Some(
        seg.wrapping_add(base)
            .wrapping_add(index)
            .wrapping_add(insn.memory_displacement64()),
    )
}

/// Decodes `bytes` at `rip`: an `ldmxcsr`/`stmxcsr` with its effective
/// address and length. Distribution kernels use them in `kernel_fpu_begin`.
pub fn decode_mxcsr_access(
    rip: u64,
    bytes: &[u8],
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Option<(MxcsrAccess, u64, u64)> {
    use iced_x86::OpKind;
    let mut decoder = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    let access = match insn.mnemonic() {
        Mnemonic::Ldmxcsr => MxcsrAccess::Load,
        Mnemonic::Stmxcsr => MxcsrAccess::Store,
        _ => return None,
    };
    if insn.op0_kind() != OpKind::Memory {
        return None;
    }
    let ea = effective_address(&insn, regs, sregs)?;
    Some((access, ea, insn.len() as u64))
}

/// Performs an `ldmxcsr`/`stmxcsr` the KVM emulator could not, on the
/// stopped vCPU: moves the 32-bit value between guest memory and the vCPU's
/// MXCSR and steps past the instruction. Returns false if `bytes` is not one.
pub fn emulate_mxcsr_access(
    vcpu: &VcpuFd,
    ram: &GuestRam,
    bytes: &[u8],
    at: &Stopped,
) -> Result<bool, String> {
    let (mut regs, sregs) = (at.regs, at.sregs);
    let rip = regs.rip;
    let Some((access, ea, len)) = decode_mxcsr_access(rip, bytes, &regs, &sregs) else {
        return Ok(false);
    };
    let space = address_space(&sregs);
    let mut fpu = vcpu.get_fpu().map_err(|e| e.to_string())?;
    match access {
        MxcsrAccess::Load => {
            let mut v = [0u8; 4];
            read_virt(ram, space, VirtAddr(ea), &mut v)
                .map_err(|e| format!("ldmxcsr operand: {e}"))?;
            let value = u32::from_le_bytes(v);
            // Bits above the MXCSR mask make ldmxcsr raise #GP; no kernel
            // loads such a value, so refuse rather than guess.
            if value & 0xffff_0000 != 0 {
                return Err(format!("ldmxcsr of reserved bits {value:#x}"));
            }
            fpu.mxcsr = value;
            vcpu.set_fpu(&fpu).map_err(|e| e.to_string())?;
        }
        MxcsrAccess::Store => {
            // A 4-byte aligned operand never crosses a page; check anyway.
            if ea & 0xfff > 0xffc {
                return Err(format!("stmxcsr operand {ea:#x} crosses a page"));
            }
            let pa =
                translate(ram, space, VirtAddr(ea)).map_err(|e| format!("stmxcsr operand: {e}"))?;
            ram.write(pa.0, &fpu.mxcsr.to_le_bytes())
                .map_err(|e| e.to_string())?;
        }
    }
    regs.rip = rip + len;
    vcpu.set_regs(&regs).map_err(|e| e.to_string())?;
    Ok(true)
}

/// A human description of an instruction, for error reports.
pub fn describe_instruction(rip: u64, bytes: &[u8]) -> String {
    use iced_x86::{Formatter, IntelFormatter};
    let mut decoder = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    let mut text = String::new();
    IntelFormatter::new().format(&insn, &mut text);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest with identity-mapped low memory, an IDT whose vector 14
    /// points at `handler`, and `code` there.
    fn guest_with_pf_handler(code: &[u8]) -> (GuestRam, kvm_sregs) {
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.write(0x1000, &(0x2000u64 | 3).to_le_bytes()).unwrap(); // PML4[0]
        ram.write(0x2000, &(0x3000u64 | 3).to_le_bytes()).unwrap(); // PDPT[0]
        ram.write(0x3000, &(0x83u64).to_le_bytes()).unwrap(); // PD[0]: 2 MiB at 0
        let handler: u64 = 0x2_0000;
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        ram.write(0x1_0000 + 14 * 16, &gate).unwrap();
        ram.write(handler, code).unwrap();
        let mut sregs = kvm_sregs {
            cr0: 0x8000_0001,
            cr3: 0x1000,
            ..Default::default()
        };
        sregs.idt.base = 0x1_0000;
        sregs.idt.limit = 0xfff;
        (ram, sregs)
    }

    #[test]
    fn finds_cld_after_endbr_and_the_clac_slot() {
        // 6.1 after NOP optimization, and 6.12 before it (three 0x90).
        for code in [
            &[0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x00, 0xfc, 0xe8][..],
            &[0xf3, 0x0f, 0x1e, 0xfa, 0x90, 0x90, 0x90, 0xfc, 0xe8],
        ] {
            let (ram, sregs) = guest_with_pf_handler(code);
            assert_eq!(
                find_page_fault_entry(&ram, &sregs),
                EntrySearch::Found(PageFaultEntry {
                    va: 0x2_0007,
                    pa: 0x2_0007
                })
            );
        }
    }

    #[test]
    fn waits_while_clac_is_live_or_paging_is_off() {
        let (ram, sregs) = guest_with_pf_handler(&[0x0f, 0x01, 0xca, 0xfc]);
        assert_eq!(find_page_fault_entry(&ram, &sregs), EntrySearch::NotYet);
        let (ram, mut sregs) = guest_with_pf_handler(&[0xfc]);
        sregs.cr0 = 1;
        assert_eq!(find_page_fault_entry(&ram, &sregs), EntrySearch::NotYet);
        let (ram, mut sregs) = guest_with_pf_handler(&[0xfc]);
        sregs.idt.base = 0x7fff_ffff_0000; // unmapped IDT
        assert_eq!(find_page_fault_entry(&ram, &sregs), EntrySearch::NotYet);
    }

    #[test]
    fn fwait_is_skippable_other_instructions_are_not() {
        assert_eq!(skippable_instruction(&[0x9b, 0x90]), Some(1));
        assert_eq!(skippable_instruction(&[0x0f, 0xc7, 0x0f]), None);
        assert_eq!(skippable_instruction(&[]), None);
    }

    #[test]
    fn decodes_mxcsr_accesses_with_their_operand() {
        let regs = kvm_regs {
            rsp: 0xffff_c900_0001_3e00,
            rbx: 0x1000,
            ..Default::default()
        };
        let sregs = kvm_sregs::default();
        // ldmxcsr [rsp+4], as Debian's kernel_fpu_begin_mask has it.
        let bytes = [0x0f, 0xae, 0x54, 0x24, 0x04, 0x83, 0xe3];
        assert_eq!(
            decode_mxcsr_access(0xffff_ffff_8100_0000, &bytes, &regs, &sregs),
            Some((MxcsrAccess::Load, 0xffff_c900_0001_3e04, 5))
        );
        // stmxcsr [rbx+0x10]
        assert_eq!(
            decode_mxcsr_access(0, &[0x0f, 0xae, 0x5b, 0x10], &regs, &sregs),
            Some((MxcsrAccess::Store, 0x1010, 4))
        );
        assert_eq!(decode_mxcsr_access(0, &[0x9b], &regs, &sregs), None);
    }

    #[test]
    fn describes_instructions() {
        assert_eq!(
            describe_instruction(0, &[0xf3, 0x0f, 0xb8, 0xc0]),
            "popcnt eax,eax"
        );
    }

    #[test]
    fn kernel_code_segment_is_64bit_ring0() {
        let s = kernel_segment(0x10, 0xb, true);
        assert_eq!((s.l, s.db, s.dpl, s.selector), (1, 0, 0, 0x10));
        let d = kernel_segment(0x18, 0x3, false);
        assert_eq!((d.l, d.db, d.dpl), (0, 1, 0));
    }
}
