//! `xsave`/`xrstor` of a guest kernel on PVM KVM, performed by the VMM.
//!
//! PVM's instruction emulator lacks both (an emulation failure), yet the
//! guest kernel must save its tasks' whole extended state: user mode runs
//! natively with AVX, and a kernel without XSAVE lets the YMM upper halves
//! leak between tasks (`arch::x86_64::xsave` tells the story). The guest
//! kernel boots with `xsaveopt`, `xsavec` and `xsaves` hidden, so the only
//! forms it executes are the standard `xsave64`/`xrstor64` (its `xsetbv`
//! the emulator does itself). Each is done as the processor would: the
//! operand must be 64-byte aligned (#GP), every byte of it mapped (#PF,
//! with CR2, for the guest's own fault handling: signal frames on user
//! stacks are written this way), and writable for `xsave` (copy-on-write
//! pages fault, as with CR0.WP).

use std::sync::OnceLock;

use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};
use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;

use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{translate_access, TranslateError};

use super::pvm::{
    address_space, effective_address, inject, Stopped, PAGE_FAULT, PF_PRESENT, PF_WRITE,
};
use crate::arch::x86_64::xsave::{self, Layout, XsaveFault, KVM_XSAVE_SIZE};
use crate::vstate::memory::GuestRam;

const GENERAL_PROTECTION: u32 = 13;

/// What became of an instruction the emulator could not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XsaveOutcome {
    /// Not an `xsave`/`xrstor`.
    NotXsave,
    /// Performed; RIP is past it.
    Done,
    /// It faulted as the processor would have; the exception is injected.
    Faulted,
}

fn layout() -> &'static Layout {
    static LAYOUT: OnceLock<Layout> = OnceLock::new();
    LAYOUT.get_or_init(Layout::host)
}

/// One page's share of the operand: (guest-physical address, length).
type Piece = (u64, usize);

/// Maps `[va, va + len)` page by page, or says which fault the access
/// takes first.
fn map_operand(
    ram: &GuestRam,
    at: &Stopped,
    va: u64,
    len: usize,
    write: bool,
) -> Result<Vec<Piece>, (u32, u64)> {
    let space = address_space(&at.sregs);
    let mut pieces = Vec::new();
    let mut done = 0usize;
    while done < len {
        let cur = va.wrapping_add(done as u64);
        let n = ((0x1000 - (cur & 0xfff)) as usize).min(len - done);
        match translate_access(ram, space, VirtAddr(cur)) {
            Ok((_, access)) if write && !access.writable => {
                return Err((PF_PRESENT | PF_WRITE, cur));
            }
            Ok((pa, _)) => pieces.push((pa.0, n)),
            Err(TranslateError::NotPresent { .. }) => {
                return Err((if write { PF_WRITE } else { 0 }, cur));
            }
            // A page table outside RAM: the processor would take a machine
            // check or read garbage; a #PF is the closest honest answer.
            Err(_) => return Err((if write { PF_WRITE } else { 0 }, cur)),
        }
        done += n;
    }
    Ok(pieces)
}

/// The guest's XCR0.
fn xcr0(vcpu: &VcpuFd) -> Result<u64, String> {
    let xcrs = vcpu.get_xcrs().map_err(|e| format!("KVM_GET_XCRS: {e}"))?;
    Ok(xcrs.xcrs[..xcrs.nr_xcrs.min(16) as usize]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(1, |x| x.value))
}

fn region_bytes(x: &kvm_xsave) -> Vec<u8> {
    x.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Performs the `xsave64`/`xrstor64` at the stopped vCPU's RIP (`bytes`).
pub fn emulate(
    vcpu: &VcpuFd,
    ram: &GuestRam,
    bytes: &[u8],
    at: &Stopped,
) -> Result<XsaveOutcome, String> {
    let rip = at.regs.rip;
    let insn = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE).decode();
    let save = match insn.mnemonic() {
        Mnemonic::Xsave64 => true,
        Mnemonic::Xrstor64 => false,
        // The 32-bit forms store x87 pointers differently; Linux does not
        // use them in 64-bit mode.
        _ => return Ok(XsaveOutcome::NotXsave),
    };
    if insn.op0_kind() != OpKind::Memory {
        return Ok(XsaveOutcome::NotXsave);
    }
    let layout = layout();
    let fault = |vector: u32, code: u32, cr2: Option<u64>| {
        inject(vcpu, vector, code, cr2)
            .map(|()| XsaveOutcome::Faulted)
            .map_err(|e| format!("cannot inject exception {vector}: {e}"))
    };
    let ea = effective_address(&insn, &at.regs, &at.sregs)
        .ok_or_else(|| "an operand with unexpected registers".to_string())?;
    if ea % 64 != 0 {
        return fault(GENERAL_PROTECTION, 0, None);
    }
    let xcr0 = xcr0(vcpu)?;
    let rfbm = xcr0 & ((at.regs.rdx << 32) | (at.regs.rax & 0xffff_ffff));
    let len = layout.size(rfbm);
    // The host CPU's largest area may exceed KVM_GET_XSAVE's (AMX), but
    // what the guest enabled in XCR0 is what KVM offers it, checked at
    // `create_vm` to fit.
    let enabled = layout.size(xcr0);
    if enabled > KVM_XSAVE_SIZE {
        return Err(format!(
            "the guest's XSAVE area ({enabled} bytes for XCR0 {xcr0:#x}) does not fit KVM_GET_XSAVE's {KVM_XSAVE_SIZE}"
        ));
    }
    let pieces = match map_operand(ram, at, ea, len, save) {
        Ok(p) => p,
        Err((code, cr2)) => return fault(PAGE_FAULT, code, Some(cr2)),
    };
    let mut area = vec![0u8; len];
    let mut off = 0;
    for &(pa, n) in &pieces {
        ram.read(pa, &mut area[off..off + n])
            .map_err(|e| e.to_string())?;
        off += n;
    }
    let mut kvm = vcpu
        .get_xsave()
        .map_err(|e| format!("KVM_GET_XSAVE: {e}"))?;
    let mut state = region_bytes(&kvm);
    if save {
        xsave::save(&state, rfbm, layout, &mut area);
        let mut off = 0;
        for &(pa, n) in &pieces {
            ram.write(pa, &area[off..off + n])
                .map_err(|e| e.to_string())?;
            off += n;
        }
    } else {
        match xsave::restore(&mut state, xcr0, rfbm, layout, &area) {
            Ok(()) => {}
            Err(XsaveFault::GeneralProtection) => return fault(GENERAL_PROTECTION, 0, None),
        }
        for (w, b) in kvm.region.iter_mut().zip(state.chunks_exact(4)) {
            *w = u32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        // SAFETY: KVM_SET_XSAVE reads the guest's uabi XSAVE size from
        // `kvm`, which `create_vm` checked (KVM_CAP_XSAVE2) to be at most
        // the 4096 bytes of `struct kvm_xsave`.
        unsafe { vcpu.set_xsave(&kvm) }.map_err(|e| format!("KVM_SET_XSAVE: {e}"))?;
    }
    let mut regs = at.regs;
    regs.rip = rip + insn.len() as u64;
    vcpu.set_regs(&regs).map_err(|e| e.to_string())?;
    Ok(XsaveOutcome::Done)
}
