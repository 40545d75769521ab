//! Where a trap reads: the address space the trapped thread runs in and
//! its CPU's per-CPU area, found without asking KVM for the special
//! registers when guest memory already says it.
//!
//! A tracer trap stops a thread in the kernel's C code, where GS base is
//! its CPU's per-CPU area (fixed for the CPU once it is up) and CR3 holds
//! the page tables of the thread's `mm` (`current->mm->pgd`; the kernel
//! switches both together). So after one `KVM_GET_SREGS` per vCPU, the
//! space follows from two reads of guest memory (`current`, `mm->pgd`)
//! and a page walk, where the ioctl costs a `vcpu_load` (several MSR
//! reads on PVM KVM; ~20 % of a traced call's host time, perf).
//!
//! The derivation is not trusted blindly: each vCPU's first [`CHECKS`]
//! traps of a user thread read the registers too and compare. One
//! disagreement turns the derivation off for the tracer's lifetime (with a
//! warning), so a kernel that does not keep CR3 and `mm` together costs
//! speed, never a wrong read. A thread without an `mm` (a kernel thread,
//! or an exiting one after `exit_mm`) gets the kernel's own page tables:
//! the kernel's mappings are the same in every space, and no handler
//! reads user memory of a thread that has none.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use guest_introspect::paging::AddressSpace;
use vmm::trap::TrapContext;

/// Agreeing traps a vCPU needs before its space is derived from memory.
pub const CHECKS: u32 = 16;

/// What a trap's handler reads through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrapFrame {
    /// The trapped thread's address space (kernel and its user half).
    pub space: AddressSpace,
    /// Its CPU's GS base: the per-CPU area.
    pub gs_base: u64,
}

/// What guest memory says of a trapped thread, given its CPU's GS base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Derived {
    /// The space of the thread's `mm`.
    Mm(AddressSpace),
    /// The thread has no `mm`: the kernel's own page tables serve.
    NoMm(AddressSpace),
}

/// Per-vCPU facts learned from the special registers, and whether the
/// derivation has been caught disagreeing.
#[derive(Debug, Default)]
pub struct TrapSpaces {
    cpus: Mutex<HashMap<u8, Learned>>,
    disagreed: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct Learned {
    gs_base: u64,
    agreed: u32,
}

impl TrapSpaces {
    /// The frame of the trap in `ctx`: derived by `derive` (from this
    /// vCPU's GS base and the space's paging levels) once the vCPU has
    /// agreed [`CHECKS`] times, else read from the special registers and,
    /// while learning, compared with `derive`'s answer.
    pub fn frame<E>(
        &self,
        ctx: &mut TrapContext<'_>,
        derive: impl Fn(u64) -> Result<Derived, E>,
    ) -> Result<TrapFrame, String> {
        let learned = self.learned(ctx.vcpu_id);
        if let Some(l) = learned.filter(|l| l.agreed >= CHECKS) {
            if !self.disagreed.load(Ordering::Relaxed) {
                if let Ok(d) = derive(l.gs_base) {
                    let space = match d {
                        Derived::Mm(s) | Derived::NoMm(s) => s,
                    };
                    return Ok(TrapFrame {
                        space,
                        gs_base: l.gs_base,
                    });
                }
            }
        }
        let s = ctx.sregs()?;
        let real = TrapFrame {
            space: s.view.kernel_space(),
            gs_base: s.gs_base,
        };
        let in_kernel = s.cs & 3 == 0;
        if in_kernel && !self.disagreed.load(Ordering::Relaxed) {
            self.check(ctx.vcpu_id, real, derive(real.gs_base).ok());
        }
        Ok(real)
    }

    /// Whether the derivation has disagreed with the registers (and is off).
    pub fn disagreed(&self) -> bool {
        self.disagreed.load(Ordering::Relaxed)
    }

    fn learned(&self, vcpu: u8) -> Option<Learned> {
        let cpus = self.cpus.lock().unwrap_or_else(|e| e.into_inner());
        cpus.get(&vcpu).copied()
    }

    /// Counts one more agreement of `vcpu`, or turns the derivation off.
    fn check(&self, vcpu: u8, real: TrapFrame, derived: Option<Derived>) {
        let Some(Derived::Mm(space)) = derived else {
            // No user space to compare (or memory unreadable): no verdict.
            return;
        };
        if space != real.space {
            if !self.disagreed.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "tracer: vCPU {vcpu}: CR3 {:#x} but the thread's mm->pgd is at {:#x}; \
                     reading the special registers at every trap from now on",
                    real.space.cr3,
                    space.cr3
                );
            }
            return;
        }
        let mut cpus = self.cpus.lock().unwrap_or_else(|e| e.into_inner());
        let l = cpus.entry(vcpu).or_insert(Learned {
            gs_base: real.gs_base,
            agreed: 0,
        });
        if l.gs_base != real.gs_base {
            // The per-CPU area moved (it never should once the CPU is up):
            // learn again.
            *l = Learned {
                gs_base: real.gs_base,
                agreed: 0,
            };
        }
        l.agreed = l.agreed.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_introspect::kernel::VcpuView;
    use guest_introspect::paging::PagingLevels;
    use vmm::trap::{GuestRegs, GuestSregs};
    use vmm::vstate::memory::GuestRam;

    fn space(cr3: u64) -> AddressSpace {
        AddressSpace {
            cr3,
            levels: PagingLevels::Four,
        }
    }

    fn sregs(cr3: u64, gs_base: u64) -> GuestSregs {
        GuestSregs {
            view: VcpuView {
                cr3,
                cr4: 0,
                idt_base: 0,
                idt_limit: 0,
            },
            gs_base,
            cs: 0x10,
        }
    }

    /// Runs one trap on vCPU 0 whose registers say (cr3, gs): returns the
    /// frame and whether the registers were read.
    fn trap(
        spaces: &TrapSpaces,
        cr3: u64,
        gs: u64,
        derive: impl Fn(u64) -> Result<Derived, ()>,
    ) -> (TrapFrame, bool) {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut read = || Ok(sregs(cr3, gs));
        let mut ctx = TrapContext::with_lazy_sregs(0, GuestRegs::default(), &ram, &mut read);
        let frame = spaces.frame(&mut ctx, derive).unwrap();
        (frame, ctx.sregs_read())
    }

    #[test]
    fn registers_are_read_until_memory_agreed_then_not() {
        let s = TrapSpaces::default();
        let derive = |gs: u64| {
            assert_eq!(gs, 0x8000);
            Ok(Derived::Mm(space(0x5000)))
        };
        for _ in 0..CHECKS {
            let (frame, read) = trap(&s, 0x5000, 0x8000, derive);
            assert!(read);
            assert_eq!(frame.space, space(0x5000));
        }
        let (frame, read) = trap(&s, 0x5000, 0x8000, derive);
        assert!(
            !read,
            "after {CHECKS} agreements the registers are not read"
        );
        assert_eq!(
            frame,
            TrapFrame {
                space: space(0x5000),
                gs_base: 0x8000
            }
        );
    }

    #[test]
    fn one_disagreement_turns_the_derivation_off() {
        let s = TrapSpaces::default();
        for _ in 0..CHECKS - 1 {
            trap(&s, 0x5000, 0x8000, |_| Ok(Derived::Mm(space(0x5000))));
        }
        // CR3 and mm->pgd differ: the registers win, now and later.
        let (frame, _) = trap(&s, 0x6000, 0x8000, |_| Ok(Derived::Mm(space(0x5000))));
        assert_eq!(frame.space, space(0x6000));
        assert!(s.disagreed());
        for _ in 0..2 * CHECKS {
            let (frame, read) = trap(&s, 0x7000, 0x8000, |_| Ok(Derived::Mm(space(0x5000))));
            assert!(read);
            assert_eq!(frame.space, space(0x7000));
        }
    }

    #[test]
    fn threads_without_mm_and_unreadable_memory_give_no_verdict() {
        let s = TrapSpaces::default();
        for _ in 0..3 * CHECKS {
            let (_, read) = trap(&s, 0x5000, 0x8000, |_| Ok(Derived::NoMm(space(0x1000))));
            assert!(read);
            let (_, read) = trap(&s, 0x5000, 0x8000, |_| Err(()));
            assert!(read);
        }
        assert!(!s.disagreed());
        // Learned from user threads, a kernel thread then gets the
        // kernel's tables without a register read.
        for _ in 0..CHECKS {
            trap(&s, 0x5000, 0x8000, |_| Ok(Derived::Mm(space(0x5000))));
        }
        let (frame, read) = trap(&s, 0x5000, 0x8000, |_| Ok(Derived::NoMm(space(0x1000))));
        assert!(!read);
        assert_eq!(frame.space, space(0x1000));
        // Memory unreadable: the registers are read instead.
        let (frame, read) = trap(&s, 0x5000, 0x8000, |_| Err(()));
        assert!(read);
        assert_eq!(frame.space, space(0x5000));
    }
}
