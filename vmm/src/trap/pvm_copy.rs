//! The guest kernel's user copies on PVM KVM, performed by the VMM.
//!
//! PVM KVM emulates the ring-0 code of a non-PVM kernel, and a `rep`
//! string instruction one iteration per emulator pass: on a processor with
//! ERMS and FSRM every `copy_to_user`/`copy_from_user` of Linux up to 6.1
//! is the one `rep movsb` of `copy_user_enhanced_fast_string`, about a
//! microsecond per byte. A program's output crosses two of them (into the
//! pipe, out of it), so it moved at ~0.6 MB/s.
//!
//! The VMM plants an `int3` on that `rep movsb` (found by its exact bytes,
//! once, in the kernel's executable mappings) and performs the copy as the
//! processor would, a page at a time: source and destination translated
//! through the thread's page tables, the accessed bits of every entry used
//! set and the dirty bit of each written page (copy-on-write and
//! `MADV_FREE` depend on them), a destination that is not writable or a
//! page that is not present raising `#PF` with CR2 at the first byte not
//! copied and RSI/RDI/RCX left where the copy stopped. That is the state
//! the kernel's exception table entry for the instruction expects: a fault
//! the kernel fixes (a page not yet faulted in) returns to the `rep movsb`,
//! and the VMM goes on from there; a bad user address takes the kernel's
//! own fix-up path. At most [`MAX_PER_EXIT`] bytes are copied per exit (the
//! instruction is then re-entered, so interrupts are taken in between, as
//! between the iterations of a real `rep movsb`). Anything the VMM does not
//! model (a page outside guest RAM, the direction flag set) removes the
//! trap for good, and the guest runs the instruction itself as before.

use guest_introspect::paging::{
    AddressSpace, PagingLevels, ADDR_MASK, PAGE_SIZE_BIT, PRESENT, WRITABLE,
};
use kvm_bindings::kvm_regs;

use super::pvm::{PF_PRESENT, PF_WRITE};
use crate::vstate::memory::GuestRam;

/// `movl %edx,%ecx; rep movsb; xorl %eax,%eax`: the count move, the copy
/// and the success return of `copy_user_enhanced_fast_string` (memcpy's
/// `rep movsb` is followed by `ret`, not by this `xor`).
pub const COPY_USER_BYTES: [u8; 6] = [0x89, 0xd1, 0xf3, 0xa4, 0x31, 0xc0];
/// Offset of the `rep movsb` in [`COPY_USER_BYTES`].
pub const REP_MOVSB_AT: u64 = 2;
/// Length of `rep movsb`.
const REP_MOVSB_LEN: u64 = 2;
/// Bytes copied per exit at most.
pub const MAX_PER_EXIT: u64 = 1 << 20;

const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const NO_EXECUTE: u64 = 1 << 63;
const RFLAGS_DF: u64 = 1 << 10;

/// A page access that faults: CR2 and the #PF error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting linear address.
    pub address: u64,
    /// Supervisor access: `PF_PRESENT` and `PF_WRITE` only.
    pub error_code: u32,
}

/// What became of one exit at the `rep movsb`. The registers passed in are
/// updated in every case to the bytes copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Every byte copied; RIP is past the instruction.
    Done,
    /// [`MAX_PER_EXIT`] bytes copied; RIP stays on the instruction.
    More,
    /// The next byte faults: inject `#PF`; RIP stays on the instruction.
    Fault(PageFault),
    /// Something the VMM does not model: take the trap out and let the
    /// guest run the instruction; RIP stays on it.
    Unsupported(&'static str),
}

/// Performs the `rep movsb` whose registers are `regs` in `space`.
pub fn perform(ram: &GuestRam, space: AddressSpace, regs: &mut kvm_regs) -> CopyOutcome {
    if regs.rflags & RFLAGS_DF != 0 {
        return CopyOutcome::Unsupported("rep movsb with the direction flag set");
    }
    let mut budget = MAX_PER_EXIT;
    let mut page = [0u8; 4096];
    while regs.rcx != 0 {
        if budget == 0 {
            return CopyOutcome::More;
        }
        let n = regs
            .rcx
            .min(0x1000 - (regs.rsi & 0xfff))
            .min(0x1000 - (regs.rdi & 0xfff))
            .min(budget);
        let src = match walk_settled(ram, space, regs.rsi, false) {
            Ok(pa) => pa,
            Err(Walk::Fault(f)) => return CopyOutcome::Fault(f),
            Err(_) => return CopyOutcome::Unsupported("a page outside guest RAM"),
        };
        let dst = match walk_settled(ram, space, regs.rdi, true) {
            Ok(pa) => pa,
            Err(Walk::Fault(f)) => return CopyOutcome::Fault(f),
            Err(_) => return CopyOutcome::Unsupported("a page outside guest RAM"),
        };
        let buf = &mut page[..n as usize];
        if ram.read(src, buf).is_err() || ram.write(dst, buf).is_err() {
            return CopyOutcome::Unsupported("a page outside guest RAM");
        }
        regs.rsi = regs.rsi.wrapping_add(n);
        regs.rdi = regs.rdi.wrapping_add(n);
        regs.rcx -= n;
        budget -= n;
    }
    regs.rip = regs.rip.wrapping_add(REP_MOVSB_LEN);
    CopyOutcome::Done
}

enum Walk {
    Fault(PageFault),
    OutsideRam,
    /// An entry changed under the walk (another vCPU): walk again.
    Raced,
}

/// Walks again while another vCPU changes an entry under the walk, a few
/// times; then the guest gets the fault and sorts it out itself.
fn walk_settled(ram: &GuestRam, space: AddressSpace, va: u64, write: bool) -> Result<u64, Walk> {
    for _ in 0..4 {
        match walk(ram, space, va, write) {
            Err(Walk::Raced) => continue,
            other => return other,
        }
    }
    Err(Walk::Fault(PageFault {
        address: va,
        error_code: if write { PF_WRITE } else { 0 },
    }))
}

/// Translates `va` for a supervisor data access as the processor does:
/// a not-present entry or (for a write) a read-only one faults (CR0.WP is
/// always set by Linux); on success the accessed bit of every entry used is
/// set, and the dirty bit of the final one for a write, each by a
/// compare-and-exchange against the value the walk read (as the processor
/// does: a bit never lands on an entry another vCPU has just cleared).
fn walk(ram: &GuestRam, space: AddressSpace, va: u64, write: bool) -> Result<u64, Walk> {
    let fault = |present: bool| {
        Walk::Fault(PageFault {
            address: va,
            error_code: if present { PF_PRESENT } else { 0 } | if write { PF_WRITE } else { 0 },
        })
    };
    let top: u32 = match space.levels {
        PagingLevels::Four => 4,
        PagingLevels::Five => 5,
    };
    let canonical_bits = 12 + 9 * top;
    let sign = (va as i64) >> (canonical_bits - 1);
    if sign != 0 && sign != -1 {
        return Err(fault(false));
    }
    let mut table = space.cr3 & ADDR_MASK;
    let mut used = [(0u64, 0u64); 5];
    let mut writable = true;
    for (depth, level) in (1..=top).rev().enumerate() {
        let shift = 12 + 9 * (level - 1);
        let at = table + ((va >> shift) & 0x1ff) * 8;
        let entry = read_u64(ram, at).ok_or(Walk::OutsideRam)?;
        if entry & PRESENT == 0 {
            return Err(fault(false));
        }
        writable &= entry & WRITABLE != 0;
        used[depth] = (at, entry);
        let large = (level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0;
        if large || level == 1 {
            if write && !writable {
                return Err(fault(true));
            }
            let leaf_bits = if write { ACCESSED | DIRTY } else { ACCESSED };
            for (i, &(a, e)) in used[..=depth].iter().enumerate() {
                let bits = if i == depth { leaf_bits } else { ACCESSED };
                if e & bits == bits {
                    continue;
                }
                match ram.compare_exchange_u64(a, e, e | bits) {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return Err(Walk::Raced),
                    Err(_) => return Err(Walk::OutsideRam),
                }
            }
            let page_mask = (1u64 << shift) - 1;
            return Ok((entry & ADDR_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    unreachable!("the level-1 entry always returns")
}

fn read_u64(ram: &GuestRam, pa: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    ram.read(pa, &mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

/// Most sites planted: Linux 6.1 has three (below); more matches than
/// this means the bytes are not what they seem, and nothing is planted.
pub const MAX_SITES: usize = 8;

/// Finds the `rep movsb`s the kernel copies user memory with: every place
/// in the kernel image's executable mappings (`__START_KERNEL_map` up,
/// 1 GiB) holding [`COPY_USER_BYTES`]. In Linux 6.1 those are
/// `copy_user_enhanced_fast_string`, the tail of `copy_user_generic_string`
/// and `copy_mc_enhanced_fast_string`: each a `rep movsb` whose count was
/// just moved from EDX and whose fault is handled by the kernel's exception
/// table at the instruction, so one emulation serves all. Six bytes this
/// particular inside another instruction are not expected; init code is
/// not searched when the caller waits for user space (it is freed and
/// non-executable by then). Returns their (virtual, physical) addresses.
pub fn find_copy_sites(ram: &GuestRam, space: AddressSpace) -> Result<Vec<(u64, u64)>, String> {
    const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
    const KERNEL_MAP_END: u64 = 0xffff_ffff_c000_0000;
    let mut found = Vec::new();
    let keep = COPY_USER_BYTES.len() - 1;
    // The previous page's last bytes, for a match across a page boundary.
    let mut tail: Vec<u8> = Vec::new();
    let mut page = vec![0u8; 4096];
    let mut va = KERNEL_MAP;
    while va < KERNEL_MAP_END {
        let Some(pa) = executable_page(ram, space, va) else {
            tail.clear();
            va += 0x1000;
            continue;
        };
        if ram.read(pa, &mut page).is_err() {
            tail.clear();
            va += 0x1000;
            continue;
        }
        let window_va = va - tail.len() as u64;
        let mut window = std::mem::take(&mut tail);
        window.extend_from_slice(&page);
        for (i, w) in window.windows(COPY_USER_BYTES.len()).enumerate() {
            if w == COPY_USER_BYTES {
                found.push(window_va + i as u64 + REP_MOVSB_AT);
            }
        }
        if found.len() > MAX_SITES {
            return Err(format!(
                "more than {MAX_SITES} `movl %edx,%ecx; rep movsb; xorl %eax,%eax` in kernel text"
            ));
        }
        tail = window[window.len() - keep..].to_vec();
        va += 0x1000;
    }
    if found.is_empty() {
        return Err("no `movl %edx,%ecx; rep movsb; xorl %eax,%eax` in kernel text".into());
    }
    found
        .into_iter()
        .map(|site| {
            let pa = executable_page(ram, space, site & !0xfff)
                .ok_or_else(|| format!("the page of {site:#x} went away"))?;
            Ok((site, pa + (site & 0xfff)))
        })
        .collect()
}

/// The physical address of the 4 KiB page at `va`, if it is present and
/// executable. Reads only: the search sets no accessed bits.
fn executable_page(ram: &GuestRam, space: AddressSpace, va: u64) -> Option<u64> {
    let top: u32 = match space.levels {
        PagingLevels::Four => 4,
        PagingLevels::Five => 5,
    };
    let mut table = space.cr3 & ADDR_MASK;
    for level in (1..=top).rev() {
        let shift = 12 + 9 * (level - 1);
        let entry = read_u64(ram, table + ((va >> shift) & 0x1ff) * 8)?;
        if entry & PRESENT == 0 || entry & NO_EXECUTE != 0 {
            return None;
        }
        let large = (level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0;
        if large || level == 1 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (va & page_mask & !0xfff));
        }
        table = entry & ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;
    /// User pages: 0x400000.. mapped through PT.
    const USER: u64 = 0x40_0000;

    fn put(ram: &GuestRam, pa: u64, v: u64) {
        ram.write(pa, &v.to_le_bytes()).unwrap();
    }

    fn word(ram: &GuestRam, pa: u64) -> u64 {
        read_u64(ram, pa).unwrap()
    }

    /// Four user pages at USER -> physical 0x10000, 0x11000, (absent),
    /// 0x13000 (read-only).
    fn guest() -> (GuestRam, AddressSpace) {
        let ram = GuestRam::new(4 << 20).unwrap();
        put(&ram, PML4, PDPT | 7);
        put(&ram, PDPT, PD | 7);
        put(&ram, PD + 8 * 2, PT | 7);
        put(&ram, PT, 0x10000 | 7);
        put(&ram, PT + 8, 0x11000 | 7);
        put(&ram, PT + 24, 0x13000 | 5);
        let space = AddressSpace {
            cr3: PML4,
            levels: PagingLevels::Four,
        };
        (ram, space)
    }

    fn regs(src: u64, dst: u64, n: u64) -> kvm_regs {
        kvm_regs {
            rsi: src,
            rdi: dst,
            rcx: n,
            rip: 0xffff_ffff_8100_0002,
            rflags: 0x2,
            ..Default::default()
        }
    }

    #[test]
    fn copies_across_pages_and_sets_accessed_and_dirty_bits() {
        let (ram, space) = guest();
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        ram.write(0x20000, &data).unwrap();
        // Source in "kernel" memory: identity-map 0x20000.. through PT too.
        put(&ram, PT + 8 * 0x20, 0x20000 | 3);
        put(&ram, PT + 8 * 0x21, 0x21000 | 3);
        let mut r = regs(USER + 0x20000, USER + 0x800, 5000);
        assert_eq!(perform(&ram, space, &mut r), CopyOutcome::Done);
        let mut out = vec![0u8; 5000];
        ram.read(0x10800, &mut out[..0x800]).unwrap();
        ram.read(0x11000, &mut out[0x800..]).unwrap();
        assert_eq!(out, data);
        assert_eq!(
            (r.rcx, r.rsi, r.rdi),
            (0, USER + 0x20000 + 5000, USER + 0x800 + 5000)
        );
        assert_eq!(r.rip, 0xffff_ffff_8100_0004, "past the rep movsb");
        assert_eq!(word(&ram, PT) & (ACCESSED | DIRTY), ACCESSED | DIRTY);
        assert_eq!(word(&ram, PT + 8) & (ACCESSED | DIRTY), ACCESSED | DIRTY);
        assert_eq!(
            word(&ram, PT + 8 * 0x20) & (ACCESSED | DIRTY),
            ACCESSED,
            "read: no D"
        );
        for table_entry in [PML4, PDPT, PD + 16] {
            assert_ne!(word(&ram, table_entry) & ACCESSED, 0);
        }
    }

    #[test]
    fn a_missing_page_faults_at_the_first_byte_not_copied() {
        let (ram, space) = guest();
        // 0x1800 bytes from page 1 (offset 0x800) run into absent page 2.
        let mut r = regs(USER + 0x800, USER + 0x1800, 0x1000);
        ram.write(0x10800, &[0xab; 0x800]).unwrap();
        ram.write(0x11000, &[0xcd; 0x800]).unwrap();
        let out = perform(&ram, space, &mut r);
        assert_eq!(
            out,
            CopyOutcome::Fault(PageFault {
                address: USER + 0x2000,
                error_code: PF_WRITE
            })
        );
        assert_eq!(r.rcx, 0x800, "half copied");
        assert_eq!(r.rdi, USER + 0x2000);
        assert_eq!(r.rip, 0xffff_ffff_8100_0002, "RIP stays on the instruction");
    }

    #[test]
    fn a_read_only_destination_is_a_protection_fault_and_a_read_is_not() {
        let (ram, space) = guest();
        let mut r = regs(USER + 0x3000, USER, 16);
        assert_eq!(perform(&ram, space, &mut r), CopyOutcome::Done);
        let mut r = regs(USER, USER + 0x3000, 16);
        assert_eq!(
            perform(&ram, space, &mut r),
            CopyOutcome::Fault(PageFault {
                address: USER + 0x3000,
                error_code: PF_PRESENT | PF_WRITE
            })
        );
        assert_eq!(word(&ram, PT + 24) & DIRTY, 0, "no dirty bit on a fault");
    }

    #[test]
    fn long_copies_stop_after_the_budget_and_odd_cases_are_declined() {
        let (ram, space) = guest();
        // A 2 MiB identity-mapped large page for the long copy.
        put(&ram, PD + 8, 0x20_0000 | 0x83);
        let mut r = regs(0x20_0000, 0x20_0000 + (1 << 20) - 0x1000, 0);
        r.rsi = 0x20_0000;
        r.rdi = 0x20_0000;
        r.rcx = MAX_PER_EXIT + 10;
        assert_eq!(perform(&ram, space, &mut r), CopyOutcome::More);
        assert_eq!(r.rcx, 10);
        let mut r = regs(USER, USER + 8, 4);
        r.rflags |= RFLAGS_DF;
        assert!(matches!(
            perform(&ram, space, &mut r),
            CopyOutcome::Unsupported(_)
        ));
        assert_eq!(r.rcx, 4);
        // A page table entry pointing outside guest RAM.
        put(&ram, PT + 32, 0x7000_0000 | 7);
        let mut r = regs(USER, USER + 0x4000, 4);
        assert!(matches!(
            perform(&ram, space, &mut r),
            CopyOutcome::Unsupported(_)
        ));
        let mut r = regs(0x8000_0000_0000, USER, 4);
        assert!(matches!(
            perform(&ram, space, &mut r),
            CopyOutcome::Fault(_)
        ));
    }

    #[test]
    fn the_copy_sites_are_found_in_executable_kernel_mappings_only() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let space = AddressSpace {
            cr3: PML4,
            levels: PagingLevels::Four,
        };
        // __START_KERNEL_map -> physical 0x200000 (one 2 MiB page, executable).
        put(&ram, PML4 + 8 * 511, PDPT | 3);
        put(&ram, PDPT + 8 * 510, PD | 3);
        put(&ram, PD, 0x20_0000 | 0x83);
        assert!(find_copy_sites(&ram, space).unwrap_err().contains("no "));
        // memcpy's `rep movsb; ret` does not count; the copy routine does,
        // even across a page boundary.
        ram.write(0x20_0100, &[0x48, 0x89, 0xd1, 0xf3, 0xa4, 0xc3])
            .unwrap();
        ram.write(0x20_0ffd, &COPY_USER_BYTES).unwrap();
        assert_eq!(
            find_copy_sites(&ram, space).unwrap(),
            [(0xffff_ffff_8000_0fff, 0x20_0fff)]
        );
        // In a non-executable mapping it is not code.
        put(&ram, PD + 8, 0x40_0000 | 0x83 | NO_EXECUTE);
        ram.write(0x40_0010, &COPY_USER_BYTES).unwrap();
        assert_eq!(find_copy_sites(&ram, space).unwrap().len(), 1);
        put(&ram, PD + 8, 0x40_0000 | 0x83);
        assert_eq!(
            find_copy_sites(&ram, space).unwrap()[1],
            (0xffff_ffff_8020_0012, 0x40_0012)
        );
        // Bytes all over the text are not copy routines: nothing planted.
        for i in 0..MAX_SITES as u64 {
            ram.write(0x40_1000 + 64 * i, &COPY_USER_BYTES).unwrap();
        }
        assert!(find_copy_sites(&ram, space)
            .unwrap_err()
            .contains("more than"));
    }
}
