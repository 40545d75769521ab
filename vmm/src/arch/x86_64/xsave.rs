//! The XSAVE area in its standard (non-compacted) form, and what `XSAVE`
//! and `XRSTOR` do to it (Intel SDM vol. 1, ch. 13).
//!
//! PVM KVM's instruction emulator, which runs a non-PVM guest kernel's
//! ring-0 code, has no `xsave`/`xrstor`. Without them a guest kernel must
//! boot with `noxsave` and then saves only the x87/SSE state of its tasks,
//! while user mode (which runs natively and sees the host's CPUID and XCR0)
//! uses AVX: the upper halves of the YMM registers then leak from one task
//! to the next at every context switch (measured: glibc's AVX `memcpy` of a
//! static program's TLS image, interrupted by its page fault, wrote the
//! other task's YMM bits). So the guest kernel keeps XSAVE and the VMM
//! performs these two instructions for it: the vCPU's extended state comes
//! from `KVM_GET_XSAVE`, which uses this same standard form, and goes back
//! with `KVM_SET_XSAVE`. Only the pure data movement lives here; the vCPU
//! glue is in `trap/pvm.rs`.

/// Size of the legacy (FXSAVE) region.
pub const LEGACY_SIZE: usize = 512;
/// Size of the legacy region plus the XSAVE header.
pub const BASE_SIZE: usize = LEGACY_SIZE + 64;
/// Largest area `KVM_GET_XSAVE`/`KVM_SET_XSAVE` move (`struct kvm_xsave`).
pub const KVM_XSAVE_SIZE: usize = 4096;

/// State-component bit of the x87 registers.
pub const X87: u64 = 1 << 0;
/// State-component bit of the SSE registers (and MXCSR).
pub const SSE: u64 = 1 << 1;
/// State-component bit of the upper halves of the YMM registers.
pub const YMM: u64 = 1 << 2;

const XSTATE_BV: usize = LEGACY_SIZE;
const MXCSR: usize = 24;
const MXCSR_MASK: usize = 28;
/// x87 state: FCW..FDP, then ST0-ST7 (MXCSR and its mask lie between).
const X87_RANGES: [(usize, usize); 2] = [(0, 24), (32, 160)];
const SSE_RANGE: (usize, usize) = (160, 416);
/// MXCSR_MASK to assume when the saved one is 0 (SDM 11.6.6).
const DEFAULT_MXCSR_MASK: u32 = 0xffbf;
/// FCW after FNINIT / in the x87 initial configuration.
const X87_INIT_FCW: u16 = 0x037f;

/// Where each state component from 2 up lives in the standard form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// (offset, size) of component i (0, 0 when the CPU does not have it).
    components: [(usize, usize); 64],
    /// The largest area the CPU may need, for every component it supports.
    max_size: usize,
}

/// An instruction that must fault instead of completing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XsaveFault {
    /// #GP(0): a malformed header, reserved MXCSR bits, a component the
    /// XCR0 does not enable.
    GeneralProtection,
}

impl Layout {
    /// The host CPU's layout. A guest on PVM KVM runs on the host's CPUID
    /// (`docs/kvm-kinds.md`), so its kernel lays its areas out the same way;
    /// on hardware KVM the guest's CPUID leaf 0xD is the host's as well.
    pub fn host() -> Self {
        let mut components = [(0usize, 0usize); 64];
        // SAFETY: CPUID exists on every x86-64 processor and has no side
        // effect beyond its four output registers.
        #[allow(unused_unsafe)]
        let leaf0 = unsafe { core::arch::x86_64::__cpuid_count(0xd, 0) };
        // SAFETY: as above.
        #[allow(unused_unsafe)]
        let leaf1 = unsafe { core::arch::x86_64::__cpuid_count(0xd, 1) };
        let supported = u64::from(leaf0.eax)
            | (u64::from(leaf0.edx) << 32)
            | u64::from(leaf1.ecx)
            | (u64::from(leaf1.edx) << 32);
        for (i, c) in components.iter_mut().enumerate().skip(2) {
            if supported & (1 << i) != 0 {
                // SAFETY: as above.
                #[allow(unused_unsafe)]
                let sub = unsafe { core::arch::x86_64::__cpuid_count(0xd, i as u32) };
                // ECX bit 0: a supervisor component, never in the standard form.
                if sub.ecx & 1 == 0 {
                    *c = (sub.ebx as usize, sub.eax as usize);
                }
            }
        }
        Self {
            components,
            max_size: (leaf0.ecx as usize).max(BASE_SIZE),
        }
    }

    /// A layout with the given (component, offset, size) entries (tests,
    /// or a CPU described elsewhere).
    pub fn from_components(entries: &[(usize, usize, usize)]) -> Self {
        let mut components = [(0usize, 0usize); 64];
        for &(i, offset, size) in entries {
            components[i] = (offset, size);
        }
        let max_size = components
            .iter()
            .map(|(o, s)| o + s)
            .max()
            .unwrap_or(0)
            .max(BASE_SIZE);
        Self {
            components,
            max_size,
        }
    }

    /// The largest standard-form area of this CPU.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// Bytes from the start of the area that an `XSAVE`/`XRSTOR` with
    /// requested-feature bitmap `rfbm` touches.
    pub fn size(&self, rfbm: u64) -> usize {
        self.present(rfbm)
            .map(|(_, o, s)| o + s)
            .max()
            .unwrap_or(0)
            .max(BASE_SIZE)
    }

    /// The components from 2 up in `rfbm` that this CPU has: (i, offset, size).
    fn present(&self, rfbm: u64) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (2..64)
            .filter(move |i| rfbm & (1 << i) != 0)
            .map(|i| (i, self.components[i].0, self.components[i].1))
            .filter(|(_, _, s)| *s > 0)
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn copy(dst: &mut [u8], src: &[u8], (start, end): (usize, usize)) {
    dst[start..end].copy_from_slice(&src[start..end]);
}

/// `XSAVE` (standard form): stores the components in `rfbm` from `state`
/// (the vCPU's state as `KVM_GET_XSAVE` gives it) into `area`, the guest's
/// bytes at the operand (at least `layout.size(rfbm)` long). Like the
/// processor, it writes XSTATE_BV's bits for `rfbm` and leaves the rest of
/// the header, the reserved legacy bytes and every other component alone.
pub fn save(state: &[u8], rfbm: u64, layout: &Layout, area: &mut [u8]) {
    if rfbm & X87 != 0 {
        for r in X87_RANGES {
            copy(area, state, r);
        }
    }
    if rfbm & (SSE | YMM) != 0 {
        copy(area, state, (MXCSR, MXCSR_MASK + 4));
    }
    if rfbm & SSE != 0 {
        copy(area, state, SSE_RANGE);
    }
    for (_, offset, size) in layout.present(rfbm) {
        copy(area, state, (offset, offset + size));
    }
    let in_use = u64_at(state, XSTATE_BV);
    let bv = (u64_at(area, XSTATE_BV) & !rfbm) | (in_use & rfbm);
    area[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
}

/// `XRSTOR` (standard form): loads the components in `rfbm` from `area`
/// into `state` (then written back with `KVM_SET_XSAVE`): a component whose
/// XSTATE_BV bit is set comes from memory, one whose bit is clear gets its
/// initial value. `xcr0` is the guest's XCR0. Faults as the processor
/// does, before changing anything.
pub fn restore(
    state: &mut [u8],
    xcr0: u64,
    rfbm: u64,
    layout: &Layout,
    area: &[u8],
) -> Result<(), XsaveFault> {
    let bv = u64_at(area, XSTATE_BV);
    // Standard form: XCOMP_BV (and the 8 bytes after it) must be 0, and
    // XSTATE_BV may name only components the XCR0 enables.
    if bv & !xcr0 != 0 || area[XSTATE_BV + 8..XSTATE_BV + 24].iter().any(|b| *b != 0) {
        return Err(XsaveFault::GeneralProtection);
    }
    if rfbm & (SSE | YMM) != 0 {
        let mask = match u32_at(state, MXCSR_MASK) {
            0 => DEFAULT_MXCSR_MASK,
            m => m,
        };
        if u32_at(area, MXCSR) & !mask != 0 {
            return Err(XsaveFault::GeneralProtection);
        }
        copy(state, area, (MXCSR, MXCSR + 4));
    }
    // x87 and SSE are always written out in full (initial values spelled
    // out), with their bits set: the same registers, and `KVM_SET_XSAVE`
    // then takes the legacy region and MXCSR.
    let mut state_bv = u64_at(state, XSTATE_BV);
    if rfbm & X87 != 0 {
        if bv & X87 != 0 {
            for r in X87_RANGES {
                copy(state, area, r);
            }
        } else {
            for (start, end) in X87_RANGES {
                state[start..end].fill(0);
            }
            state[0..2].copy_from_slice(&X87_INIT_FCW.to_le_bytes());
        }
        state_bv |= X87;
    }
    if rfbm & SSE != 0 {
        if bv & SSE != 0 {
            copy(state, area, SSE_RANGE);
        } else {
            state[SSE_RANGE.0..SSE_RANGE.1].fill(0);
        }
        state_bv |= SSE;
    }
    for (i, offset, size) in layout.present(rfbm) {
        if bv & (1 << i) != 0 {
            copy(state, area, (offset, offset + size));
            state_bv |= 1 << i;
        } else {
            state[offset..offset + size].fill(0);
            state_bv &= !(1 << i);
        }
    }
    state[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&state_bv.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An AVX-only CPU: YMM at 576, 256 bytes (every x86 CPU with AVX).
    fn avx() -> Layout {
        Layout::from_components(&[(2, 576, 256)])
    }

    fn area_with(fill: u8, bv: u64) -> Vec<u8> {
        let mut a = vec![fill; 1024];
        a[XSTATE_BV..XSTATE_BV + 64].fill(0);
        a[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
        a[MXCSR..MXCSR + 4].copy_from_slice(&0x1f80u32.to_le_bytes());
        a[MXCSR_MASK..MXCSR_MASK + 4].copy_from_slice(&0xffffu32.to_le_bytes());
        a
    }

    #[test]
    fn sizes_follow_the_requested_components() {
        let l = avx();
        assert_eq!(l.size(X87 | SSE), 576);
        assert_eq!(l.size(X87 | SSE | YMM), 832);
        assert_eq!(l.size(u64::MAX), 832);
        assert_eq!(l.max_size(), 832);
    }

    #[test]
    fn save_writes_only_the_requested_components_and_their_bits() {
        let l = avx();
        let state = area_with(0xaa, X87 | SSE | YMM);
        let mut area = area_with(0x55, 1 << 9);
        save(&state, X87 | SSE, &l, &mut area);
        assert!(area[..24].iter().all(|b| *b == 0xaa));
        assert!(area[160..416].iter().all(|b| *b == 0xaa));
        // Reserved legacy bytes and the YMM component are not touched.
        assert!(area[416..512].iter().all(|b| *b == 0x55));
        assert!(area[576..832].iter().all(|b| *b == 0x55));
        // XSTATE_BV: the requested bits from the state, the others kept.
        assert_eq!(u64_at(&area, XSTATE_BV), X87 | SSE | (1 << 9));
        save(&state, X87 | SSE | YMM, &l, &mut area);
        assert!(area[576..832].iter().all(|b| *b == 0xaa));
        assert_eq!(u64_at(&area, XSTATE_BV), X87 | SSE | YMM | (1 << 9));
    }

    #[test]
    fn a_save_then_restore_round_trips_every_register() {
        let l = avx();
        let mut state = area_with(0, X87 | SSE | YMM);
        for (i, b) in state[576..832].iter_mut().enumerate() {
            *b = i as u8; // the YMM upper halves the guest's kernel lost
        }
        state[160..416].fill(0x11);
        let mut area = area_with(0, 0);
        save(&state, 0x7, &l, &mut area);
        let mut other = area_with(0x77, X87 | SSE | YMM);
        restore(&mut other, 0x7, 0x7, &l, &area).unwrap();
        assert_eq!(other[576..832], state[576..832]);
        assert_eq!(other[160..416], state[160..416]);
        assert_eq!(u32_at(&other, MXCSR), 0x1f80);
    }

    #[test]
    fn restore_initialises_components_whose_bit_is_clear() {
        let l = avx();
        let mut state = area_with(0x99, X87 | SSE | YMM);
        let area = area_with(0x44, 0);
        restore(&mut state, 0x7, 0x7, &l, &area).unwrap();
        assert_eq!(&state[0..2], &X87_INIT_FCW.to_le_bytes());
        assert!(state[2..24].iter().all(|b| *b == 0));
        assert!(state[160..416].iter().all(|b| *b == 0));
        assert!(state[576..832].iter().all(|b| *b == 0));
        assert_eq!(u64_at(&state, XSTATE_BV), X87 | SSE);
        // MXCSR comes from memory whatever XSTATE_BV says.
        assert_eq!(u32_at(&state, MXCSR), 0x1f80);
    }

    #[test]
    fn restore_leaves_unrequested_components_alone() {
        let l = avx();
        let mut state = area_with(0x99, X87 | SSE | YMM);
        let area = area_with(0x44, X87 | SSE | YMM);
        restore(&mut state, 0x7, X87 | SSE, &l, &area).unwrap();
        assert!(state[160..416].iter().all(|b| *b == 0x44));
        assert!(state[576..832].iter().all(|b| *b == 0x99));
        assert_eq!(u64_at(&state, XSTATE_BV), X87 | SSE | YMM);
    }

    #[test]
    fn malformed_headers_and_mxcsr_fault_without_changing_anything() {
        let l = avx();
        let state0 = area_with(0x99, X87 | SSE | YMM);
        // (byte, value): a component the XCR0 does not enable; the
        // compacted form's bit, or anything else in XCOMP_BV and the 8
        // bytes after it; a reserved MXCSR bit.
        let cases = [
            (XSTATE_BV, 0x0f),
            (XSTATE_BV + 15, 0x80),
            (XSTATE_BV + 20, 1),
            (MXCSR + 2, 1),
        ];
        for (i, (at, value)) in cases.into_iter().enumerate() {
            let mut area = area_with(0x44, X87 | SSE | YMM);
            area[at] = value;
            let mut state = state0.clone();
            assert_eq!(
                restore(&mut state, 0x7, 0x7, &l, &area),
                Err(XsaveFault::GeneralProtection),
                "case {i}"
            );
            assert_eq!(state, state0, "case {i}");
        }
        // Bytes 24..63 of the header are not checked in the standard form.
        let mut area = area_with(0x44, X87 | SSE | YMM);
        area[XSTATE_BV + 40] = 1;
        let mut state = state0.clone();
        assert!(restore(&mut state, 0x7, 0x7, &l, &area).is_ok());
    }

    #[test]
    fn the_host_layout_has_avx_where_the_sdm_puts_it() {
        let l = Layout::host();
        if std::arch::is_x86_feature_detected!("avx") {
            assert_eq!(l.components[2], (576, 256));
        }
        assert!(l.max_size() >= BASE_SIZE);
    }
}
