//! The instructions the VMM executes in place of the one under its `int3`.
//!
//! A trap is an `int3` (one VM exit) only where the VMM can do exactly what
//! the displaced instruction would have done, from the registers it already
//! holds; anywhere else it is a debug-register breakpoint, which costs a
//! second exit to single-step the instruction (see [`vmm::trap`]). The set
//! is small on purpose, each member emulated as the Intel SDM defines it:
//!
//! * NOPs and `endbr64` (the ftrace slot that starts every traceable
//!   function): RIP moves on.
//! * `call rel32` (an unpatched `__fentry__` call): the return address is
//!   pushed, RIP jumps.
//! * near `jmp` and `jcc` (SIGNAL_TAKEN's branches): the condition is
//!   evaluated from RFLAGS.
//! * `mov` between two 32- or 64-bit general registers (the minimal
//!   kernel's exit site: `mov %rdi,%rbp`); a 32-bit move zero-extends.
//! * `test` of a general register against an immediate or another register
//!   (Debian 6.1's and 6.12's exit site: `test $0x20,%bl`): CF and OF
//!   cleared, SF, ZF and PF from the result. AF is undefined after `test`
//!   (SDM); it is left as it was.

use iced_x86::{Code, ConditionCode, Instruction, Mnemonic, OpKind, Register};
use vmm::trap::GuestRegs;

/// How the VMM continues past an `int3` it planted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Displaced {
    /// A NOP or `endbr64` of `len` bytes: advance RIP.
    Skip {
        /// Instruction length.
        len: u8,
    },
    /// `call rel32` to `target`: push the return address, jump.
    Call {
        /// Instruction length (5).
        len: u8,
        /// Call target.
        target: u64,
    },
    /// A conditional near jump: to `target` if `cond` holds in RFLAGS,
    /// else to the next instruction.
    Jcc {
        /// Instruction length.
        len: u8,
        /// The condition.
        cond: Cond,
        /// Where it jumps when taken.
        target: u64,
    },
    /// An unconditional near jump to `target`.
    Jmp {
        /// Where it jumps.
        target: u64,
    },
    /// `mov dst, src` between general registers of the same width, 32 or
    /// 64 bits.
    MovReg {
        /// Instruction length.
        len: u8,
        /// Destination register.
        #[serde(serialize_with = "register_name")]
        dst: Register,
        /// Source register.
        #[serde(serialize_with = "register_name")]
        src: Register,
    },
    /// `test reg, imm`: the flags of `reg & imm`.
    TestImm {
        /// Instruction length.
        len: u8,
        /// The register tested (any width, AH-BH included).
        #[serde(serialize_with = "register_name")]
        reg: Register,
        /// The immediate, sign-extended to 64 bits as the CPU does.
        imm: u64,
    },
    /// `test a, b` of two general registers of one width.
    TestReg {
        /// Instruction length.
        len: u8,
        /// First operand.
        #[serde(serialize_with = "register_name")]
        a: Register,
        /// Second operand.
        #[serde(serialize_with = "register_name")]
        b: Register,
    },
}

/// Registers serialize as their assembler names (`rbp`, `bl`).
fn register_name<S: serde::Serializer>(reg: &Register, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{reg:?}").to_lowercase())
}

impl Displaced {
    /// Where the instruction at `va` sends a vCPU whose RFLAGS are
    /// `rflags` (for a call, where it jumps; the VMM also pushes).
    pub fn next_rip(self, va: u64, rflags: u64) -> u64 {
        match self {
            Displaced::Skip { len }
            | Displaced::MovReg { len, .. }
            | Displaced::TestImm { len, .. }
            | Displaced::TestReg { len, .. } => va + u64::from(len),
            Displaced::Call { target, .. } | Displaced::Jmp { target } => target,
            Displaced::Jcc { len, cond, target } => {
                if cond.holds(rflags) {
                    target
                } else {
                    va + u64::from(len)
                }
            }
        }
    }

    /// Executes the instruction at `va` on `regs`, RIP included, when it
    /// touches registers only. A `call` (which writes the stack) is left
    /// to the caller: returns `false` for it and changes nothing.
    pub fn execute_on_registers(self, va: u64, regs: &mut GuestRegs) -> bool {
        match self {
            Displaced::Call { .. } => return false,
            Displaced::Skip { .. } | Displaced::Jcc { .. } | Displaced::Jmp { .. } => {}
            Displaced::MovReg { dst, src, .. } => {
                let value = read(regs, src);
                write(regs, dst, value);
            }
            Displaced::TestImm { reg, imm, .. } => {
                regs.rflags = test_flags(regs.rflags, read(regs, reg) & imm, reg.size());
            }
            Displaced::TestReg { a, b, .. } => {
                regs.rflags = test_flags(regs.rflags, read(regs, a) & read(regs, b), a.size());
            }
        }
        regs.rip = self.next_rip(va, regs.rflags);
        true
    }
}

/// The 64-bit register of `regs` that `reg` (any width) is part of, if it
/// is one of the sixteen general registers.
pub(crate) fn gpr_mut(regs: &mut GuestRegs, reg: Register) -> Option<&mut u64> {
    use Register as R;
    Some(match reg.full_register() {
        R::RAX => &mut regs.rax,
        R::RBX => &mut regs.rbx,
        R::RCX => &mut regs.rcx,
        R::RDX => &mut regs.rdx,
        R::RSI => &mut regs.rsi,
        R::RDI => &mut regs.rdi,
        R::RSP => &mut regs.rsp,
        R::RBP => &mut regs.rbp,
        R::R8 => &mut regs.r8,
        R::R9 => &mut regs.r9,
        R::R10 => &mut regs.r10,
        R::R11 => &mut regs.r11,
        R::R12 => &mut regs.r12,
        R::R13 => &mut regs.r13,
        R::R14 => &mut regs.r14,
        R::R15 => &mut regs.r15,
        _ => return None,
    })
}

/// The value of the register `reg` is part of, in `regs`.
pub(crate) fn gpr(regs: &GuestRegs, reg: Register) -> Option<u64> {
    let mut copy = *regs;
    gpr_mut(&mut copy, reg).map(|r| *r)
}

/// Whether `reg` is a general register [`gpr_mut`] knows, at any width.
fn general(reg: Register) -> bool {
    reg.is_gpr()
}

/// Whether `reg` is AH, CH, DH or BH (bits 8-15 of its register).
fn high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

/// The value of `reg` (its width's bits, zero-extended).
fn read(regs: &GuestRegs, reg: Register) -> u64 {
    // `displaced` admits general registers only, which `gpr` knows.
    let whole = gpr(regs, reg).unwrap_or(0);
    let shifted = if high_byte(reg) { whole >> 8 } else { whole };
    shifted & width_mask(reg.size())
}

/// Writes `value` to a 32- or 64-bit `reg` as `mov` does: a 32-bit
/// destination zero-extends into the whole register.
fn write(regs: &mut GuestRegs, reg: Register, value: u64) {
    if let Some(slot) = gpr_mut(regs, reg) {
        *slot = value & width_mask(reg.size());
    }
}

/// All ones in the low `bytes` bytes.
fn width_mask(bytes: usize) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    }
}

/// RFLAGS after a `test` whose AND is `result` at `bytes` width.
fn test_flags(rflags: u64, result: u64, bytes: usize) -> u64 {
    const CF: u64 = 1;
    const PF: u64 = 1 << 2;
    const ZF: u64 = 1 << 6;
    const SF: u64 = 1 << 7;
    const OF: u64 = 1 << 11;
    let result = result & width_mask(bytes);
    let mut flags = rflags & !(CF | PF | ZF | SF | OF);
    if result == 0 {
        flags |= ZF;
    }
    if result >> (bytes * 8 - 1) & 1 == 1 {
        flags |= SF;
    }
    // PF: an even number of set bits in the result's low byte.
    if (result as u8).count_ones().is_multiple_of(2) {
        flags |= PF;
    }
    flags
}

/// The condition of a `jcc` (its `cc` field), evaluated as the CPU does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs)] // the x86 condition names are their documentation
pub enum Cond {
    O,
    No,
    B,
    Ae,
    E,
    Ne,
    Be,
    A,
    S,
    Ns,
    P,
    Np,
    L,
    Ge,
    Le,
    G,
}

impl Cond {
    /// The condition of iced's `cc`, if it is one of the sixteen.
    fn of(cc: ConditionCode) -> Option<Cond> {
        Some(match cc {
            ConditionCode::o => Cond::O,
            ConditionCode::no => Cond::No,
            ConditionCode::b => Cond::B,
            ConditionCode::ae => Cond::Ae,
            ConditionCode::e => Cond::E,
            ConditionCode::ne => Cond::Ne,
            ConditionCode::be => Cond::Be,
            ConditionCode::a => Cond::A,
            ConditionCode::s => Cond::S,
            ConditionCode::ns => Cond::Ns,
            ConditionCode::p => Cond::P,
            ConditionCode::np => Cond::Np,
            ConditionCode::l => Cond::L,
            ConditionCode::ge => Cond::Ge,
            ConditionCode::le => Cond::Le,
            ConditionCode::g => Cond::G,
            ConditionCode::None => return None,
        })
    }

    /// Whether the condition holds in `rflags` (Intel SDM, Jcc).
    pub fn holds(self, rflags: u64) -> bool {
        let flag = |bit: u32| rflags >> bit & 1 == 1;
        let (cf, pf, zf, sf, of) = (flag(0), flag(2), flag(6), flag(7), flag(11));
        match self {
            Cond::O => of,
            Cond::No => !of,
            Cond::B => cf,
            Cond::Ae => !cf,
            Cond::E => zf,
            Cond::Ne => !zf,
            Cond::Be => cf || zf,
            Cond::A => !cf && !zf,
            Cond::S => sf,
            Cond::Ns => !sf,
            Cond::P => pf,
            Cond::Np => !pf,
            Cond::L => sf != of,
            Cond::Ge => sf == of,
            Cond::Le => zf || sf != of,
            Cond::G => !zf && sf == of,
        }
    }
}

/// What the VMM can do in place of `insn`, if anything.
pub fn displaced(insn: &Instruction) -> Option<Displaced> {
    let len = insn.len() as u8;
    let registers = |n: u32| (0..n).all(|i| insn.op_kind(i) == OpKind::Register);
    match insn.mnemonic() {
        Mnemonic::Nop | Mnemonic::Endbr64 => Some(Displaced::Skip { len }),
        Mnemonic::Call if insn.code() == Code::Call_rel32_64 => Some(Displaced::Call {
            len,
            target: insn.near_branch_target(),
        }),
        Mnemonic::Jmp if matches!(insn.code(), Code::Jmp_rel8_64 | Code::Jmp_rel32_64) => {
            Some(Displaced::Jmp {
                target: insn.near_branch_target(),
            })
        }
        _ if insn.is_jcc_short_or_near() => Some(Displaced::Jcc {
            len,
            cond: Cond::of(insn.condition_code())?,
            target: insn.near_branch_target(),
        }),
        Mnemonic::Mov if insn.op_count() == 2 && registers(2) => {
            let (dst, src) = (insn.op0_register(), insn.op1_register());
            let plain = |r: Register| general(r) && matches!(r.size(), 4 | 8);
            (plain(dst) && plain(src) && dst.size() == src.size()).then_some(Displaced::MovReg {
                len,
                dst,
                src,
            })
        }
        Mnemonic::Test if insn.op_count() == 2 && registers(1) => {
            let reg = insn.op0_register();
            if !general(reg) {
                return None;
            }
            match insn.op1_kind() {
                OpKind::Register => {
                    let b = insn.op1_register();
                    (general(b) && b.size() == reg.size()).then_some(Displaced::TestReg {
                        len,
                        a: reg,
                        b,
                    })
                }
                OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate32to64 => Some(Displaced::TestImm {
                    len,
                    reg,
                    imm: insn.immediate(1),
                }),
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    const CF: u64 = 1;
    const PF: u64 = 1 << 2;
    const AF: u64 = 1 << 4;
    const ZF: u64 = 1 << 6;
    const SF: u64 = 1 << 7;
    const OF: u64 = 1 << 11;
    /// RFLAGS' reserved bit 1 and IF, which `test` leaves alone.
    const FIXED: u64 = 0x202;

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    fn run(bytes: &[u8], regs: &mut GuestRegs) {
        let insn = decode(bytes);
        let d = displaced(&insn).unwrap_or_else(|| panic!("{insn} is not executed by the VMM"));
        assert!(d.execute_on_registers(0x1000, regs), "{insn}");
        assert_eq!(regs.rip, 0x1000 + bytes.len() as u64, "{insn}: RIP");
    }

    #[test]
    fn nops_endbr_and_calls_are_executed_by_the_vmm_memory_operands_are_not() {
        // nopl 0x0(%rax,%rax,1): the patched ftrace slot.
        assert_eq!(
            displaced(&decode(&[0x0f, 0x1f, 0x44, 0x00, 0x00])),
            Some(Displaced::Skip { len: 5 })
        );
        assert_eq!(
            displaced(&decode(&[0xf3, 0x0f, 0x1e, 0xfa])),
            Some(Displaced::Skip { len: 4 })
        );
        // call -0x55f85 (an unpatched __fentry__ call)
        assert_eq!(
            displaced(&decode(&[0xe8, 0x7b, 0x2a, 0xfa, 0xff])),
            Some(Displaced::Call {
                len: 5,
                target: 0x1005u64.wrapping_add(0xfffa_2a7b_u32 as i32 as i64 as u64)
            })
        );
        assert_eq!(displaced(&decode(&[0x41, 0x54])), None, "push %r12");
        assert_eq!(
            displaced(&decode(&[0x48, 0x8b, 0x58, 0x08])),
            None,
            "mov 0x8(%rax),%rbx reads memory"
        );
        assert_eq!(
            displaced(&decode(&[0xf6, 0x43, 0x08, 0x20])),
            None,
            "testb $0x20,0x8(%rbx) reads memory"
        );
        assert_eq!(
            displaced(&decode(&[0x88, 0xd8])),
            None,
            "mov %bl,%al: 8-bit moves keep the upper bits, not emulated"
        );
    }

    /// The minimal kernel's exit site, `mov %rdi,%rbp`, and the other
    /// shapes of a register move.
    #[test]
    fn register_moves_copy_and_zero_extend() {
        let mut regs = GuestRegs {
            rdi: 0xffff_8880_0123_4567,
            rbp: 1,
            rflags: FIXED | CF,
            ..Default::default()
        };
        run(&[0x48, 0x89, 0xfd], &mut regs); // mov %rdi,%rbp
        assert_eq!(regs.rbp, 0xffff_8880_0123_4567);
        assert_eq!(regs.rflags, FIXED | CF, "mov leaves the flags");
        regs.r12 = u64::MAX;
        run(&[0x44, 0x89, 0xe0], &mut regs); // mov %r12d,%eax
        assert_eq!(regs.rax, 0xffff_ffff, "a 32-bit move zero-extends");
        regs.rsp = 0xffff_c900_0001_3f58;
        run(&[0x48, 0x89, 0xe5], &mut regs); // mov %rsp,%rbp
        assert_eq!(regs.rbp, 0xffff_c900_0001_3f58);
        run(&[0x4c, 0x8b, 0xfd], &mut regs); // mov %rbp,%r15 (the 8b form)
        assert_eq!(regs.r15, regs.rbp);
    }

    /// Debian's exit site, `test $0x20,%bl` and `test $0x20,%bpl`, and the
    /// flags of each width, checked against the SDM's definition.
    #[test]
    fn tests_set_the_flags_the_cpu_sets() {
        let mut regs = GuestRegs {
            rbx: 0x1_0000_0076,
            rflags: FIXED | CF | OF | AF,
            ..Default::default()
        };
        run(&[0xf6, 0xc3, 0x20], &mut regs); // test $0x20,%bl
                                             // 0x76 & 0x20 = 0x20: one bit set (odd parity), not zero, not negative.
        assert_eq!(regs.rflags, FIXED | AF, "CF, OF cleared; AF as it was");
        regs.rbx = 0x56;
        run(&[0xf6, 0xc3, 0x20], &mut regs);
        assert_eq!(
            regs.rflags,
            FIXED | AF | ZF | PF,
            "zero: ZF and PF (no bits, even)"
        );
        regs.rbp = 0x80;
        run(&[0x40, 0xf6, 0xc5, 0x80], &mut regs); // test $0x80,%bpl
        assert_eq!(regs.rflags, FIXED | AF | SF, "bit 7 of a byte is its sign");
        regs.rax = 0x0300;
        run(&[0xf6, 0xc4, 0x03], &mut regs); // test $0x3,%ah
        assert_eq!(
            regs.rflags,
            FIXED | AF | PF,
            "AH is bits 8-15: 0x03, two bits"
        );
        regs.rcx = 0x8000_0000_0000_0000;
        run(&[0x48, 0xf7, 0xc1, 0xff, 0xff, 0xff, 0xff], &mut regs); // test $-1,%rcx
        assert_eq!(
            regs.rflags,
            FIXED | AF | SF | PF,
            "imm32 sign-extends to 64 bits"
        );
        regs.rax = 0x8000_0001;
        regs.rdx = 0xffff_ffff;
        run(&[0x85, 0xd0], &mut regs); // test %edx,%eax
        assert_eq!(
            regs.rflags,
            FIXED | AF | SF,
            "32-bit sign; low byte 0x01 is odd"
        );
        regs.r15 = 0;
        run(&[0x45, 0x85, 0xff], &mut regs); // test %r15d,%r15d
        assert_eq!(regs.rflags, FIXED | AF | ZF | PF);
        assert_eq!(regs.rbx, 0x56, "test writes no register");
    }

    /// Conditional jumps run by the VMM go where the CPU would.
    #[test]
    fn jcc_conditions_follow_the_flags() {
        let je = displaced(&decode(&[0x74, 0x10])).unwrap();
        assert_eq!(je.next_rip(0x1000, ZF), 0x1012);
        assert_eq!(je.next_rip(0x1000, 0), 0x1002);
        let jne = displaced(&decode(&[0x0f, 0x85, 0x00, 0x01, 0x00, 0x00])).unwrap();
        assert_eq!(jne.next_rip(0x1000, 0), 0x1106);
        assert_eq!(jne.next_rip(0x1000, ZF), 0x1006);
        assert!(Cond::L.holds(SF) && !Cond::L.holds(SF | OF));
        assert!(Cond::Be.holds(CF) && Cond::A.holds(0) && !Cond::A.holds(ZF));
        assert!(Cond::G.holds(SF | OF) && !Cond::G.holds(SF));
        let jmp = displaced(&decode(&[0xeb, 0xfe])).unwrap();
        assert_eq!(jmp.next_rip(0x1000, 0), 0x1000);
    }
}
