//! The register set the stub describes to gdb: amd64 GNU/Linux, as
//! gdbserver's on an x86-64 Linux host (general registers, x87, SSE,
//! `orig_rax`, `fs_base`, `gs_base`), and its conversion from the control
//! socket's `regs` reply.
//!
//! `gdbstub_arch`'s `X86_64_SSE` has the core and SSE registers but not
//! the Linux ones; gdb needs `fs_base` for thread-local variables, and
//! `orig_rax` to restart an interrupted system call after an inferior
//! call, so the target description here names all of them (the layout of
//! gdb's `features/i386/64bit-{core,sse,linux,segments}.xml`).

use gdbstub::arch::{Arch, Registers};
use gdbstub_arch::x86::reg::{X86_64CoreRegs, F80};
use serde_json::Value;

/// amd64 GNU/Linux, with the Linux and segment-base registers.
pub enum Amd64Linux {}

impl Arch for Amd64Linux {
    type Usize = u64;
    type Registers = Amd64LinuxRegs;
    type RegId = gdbstub_arch::x86::reg::id::X86_64CoreRegId;
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// Every register of [`Amd64Linux`], in the target description's order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Amd64LinuxRegs {
    /// General, x87 and SSE registers (gdb's registers 0-56).
    pub core: X86_64CoreRegs,
    /// `orig_rax` (57).
    pub orig_rax: u64,
    /// `fs_base` (58).
    pub fs_base: u64,
    /// `gs_base` (59).
    pub gs_base: u64,
}

/// Bytes of `X86_64CoreRegs` in a `g` packet.
const CORE_BYTES: usize = 0x218;

impl Registers for Amd64LinuxRegs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.core.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        for v in [self.orig_rax, self.fs_base, self.gs_base] {
            for b in v.to_le_bytes() {
                write_byte(Some(b));
            }
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.core.gdb_deserialize(bytes)?;
        let rest = bytes.get(CORE_BYTES..).unwrap_or(&[]);
        let word = |i: usize| -> Option<u64> {
            rest.get(8 * i..8 * i + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        // A shorter `G` (gdb sends what it has) keeps the others.
        if let Some(v) = word(0) {
            self.orig_rax = v;
        }
        if let Some(v) = word(1) {
            self.fs_base = v;
        }
        if let Some(v) = word(2) {
            self.gs_base = v;
        }
        Ok(())
    }
}

/// The general registers by gdb's order (`regs[0..16]`), as the control
/// socket names them.
pub const GPR_NAMES: [&str; 16] = [
    "ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

/// A number from a `regs` reply field ("0x..." text).
fn hex_field(v: &Value) -> Option<u64> {
    let s = v.as_str()?;
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// The registers of a `regs` reply; None if a general register is
/// missing. Without an FXSAVE image the x87/SSE registers read as zero.
pub fn from_reply(reply: &Value) -> Option<Amd64LinuxRegs> {
    let r = &reply["regs"];
    let mut out = Amd64LinuxRegs::default();
    for (slot, name) in out.core.regs.iter_mut().zip(GPR_NAMES) {
        *slot = hex_field(&r[name])?;
    }
    out.core.rip = hex_field(&r["ip"])?;
    out.core.eflags = hex_field(&r["flags"])? as u32;
    out.core.segments.cs = hex_field(&r["cs"]).unwrap_or(0) as u32;
    out.core.segments.ss = hex_field(&r["ss"]).unwrap_or(0) as u32;
    out.orig_rax = hex_field(&r["orig_ax"]).unwrap_or(u64::MAX);
    out.fs_base = hex_field(&reply["fs_base"]).unwrap_or(0);
    out.gs_base = hex_field(&reply["gs_base"]).unwrap_or(0);
    if let Some(area) = reply["fxsave"]
        .as_str()
        .and_then(|h| crate::api::handler::parse_hex(h).ok())
    {
        supply_fxsave(&mut out.core, &area);
    }
    Some(out)
}

/// Fills the x87 and SSE registers from a 64-bit FXSAVE image, as gdb's
/// own `amd64_supply_fxsave` reads one (the abridged tag byte widened to
/// the full tag word from each register's contents).
fn supply_fxsave(core: &mut X86_64CoreRegs, area: &[u8]) {
    if area.len() < 512 {
        return;
    }
    let u16_at = |o: usize| u16::from_le_bytes([area[o], area[o + 1]]) as u32;
    let u32_at = |o: usize| u32::from_le_bytes(area[o..o + 4].try_into().expect("4 bytes"));
    let fsw = u16_at(2);
    core.fpu.fctrl = u16_at(0);
    core.fpu.fstat = fsw;
    core.fpu.fop = u16_at(6) & 0x7ff;
    core.fpu.fioff = u32_at(8);
    core.fpu.fiseg = u32_at(12);
    core.fpu.fooff = u32_at(16);
    core.fpu.foseg = u32_at(20);
    core.mxcsr = u32_at(24);
    for (i, st) in core.st.iter_mut().enumerate() {
        let mut v: F80 = [0; 10];
        v.copy_from_slice(&area[32 + 16 * i..42 + 16 * i]);
        *st = v;
    }
    // The tag word is by physical register; st(i) is physical (top + i).
    let top = (fsw >> 11) & 7;
    let abridged = area[4];
    let mut ftag = 0u32;
    for phys in 0..8u32 {
        let tag = if abridged & (1 << phys) == 0 {
            3 // empty
        } else {
            let st = ((phys + 8 - top) % 8) as usize;
            let raw = &area[32 + 16 * st..42 + 16 * st];
            let mantissa = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
            let exponent = u16::from_le_bytes([raw[8], raw[9]]) & 0x7fff;
            match exponent {
                0x7fff => 2,
                0 if mantissa == 0 => 1,
                0 => 2,
                _ if mantissa >> 63 == 0 => 2,
                _ => 0,
            }
        };
        ftag |= tag << (2 * phys);
    }
    core.fpu.ftag = ftag;
    for (i, x) in core.xmm.iter_mut().enumerate() {
        *x = u128::from_le_bytes(
            area[160 + 16 * i..176 + 16 * i]
                .try_into()
                .expect("16 bytes"),
        );
    }
}

/// The target description: gdb's amd64 GNU/Linux register set.
const TARGET_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
<architecture>i386:x86-64</architecture>
<osabi>GNU/Linux</osabi>
<feature name="org.gnu.gdb.i386.core">
<flags id="i386_eflags" size="4">
<field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
<field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
<field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
<field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
<field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
<field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
<field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
<field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
<field name="ID" start="21" end="21"/>
</flags>
<reg name="rax" bitsize="64" type="int64"/>
<reg name="rbx" bitsize="64" type="int64"/>
<reg name="rcx" bitsize="64" type="int64"/>
<reg name="rdx" bitsize="64" type="int64"/>
<reg name="rsi" bitsize="64" type="int64"/>
<reg name="rdi" bitsize="64" type="int64"/>
<reg name="rbp" bitsize="64" type="data_ptr"/>
<reg name="rsp" bitsize="64" type="data_ptr"/>
<reg name="r8" bitsize="64" type="int64"/>
<reg name="r9" bitsize="64" type="int64"/>
<reg name="r10" bitsize="64" type="int64"/>
<reg name="r11" bitsize="64" type="int64"/>
<reg name="r12" bitsize="64" type="int64"/>
<reg name="r13" bitsize="64" type="int64"/>
<reg name="r14" bitsize="64" type="int64"/>
<reg name="r15" bitsize="64" type="int64"/>
<reg name="rip" bitsize="64" type="code_ptr"/>
<reg name="eflags" bitsize="32" type="i386_eflags"/>
<reg name="cs" bitsize="32" type="int32"/>
<reg name="ss" bitsize="32" type="int32"/>
<reg name="ds" bitsize="32" type="int32"/>
<reg name="es" bitsize="32" type="int32"/>
<reg name="fs" bitsize="32" type="int32"/>
<reg name="gs" bitsize="32" type="int32"/>
<reg name="st0" bitsize="80" type="i387_ext"/>
<reg name="st1" bitsize="80" type="i387_ext"/>
<reg name="st2" bitsize="80" type="i387_ext"/>
<reg name="st3" bitsize="80" type="i387_ext"/>
<reg name="st4" bitsize="80" type="i387_ext"/>
<reg name="st5" bitsize="80" type="i387_ext"/>
<reg name="st6" bitsize="80" type="i387_ext"/>
<reg name="st7" bitsize="80" type="i387_ext"/>
<reg name="fctrl" bitsize="32" type="int" group="float"/>
<reg name="fstat" bitsize="32" type="int" group="float"/>
<reg name="ftag" bitsize="32" type="int" group="float"/>
<reg name="fiseg" bitsize="32" type="int" group="float"/>
<reg name="fioff" bitsize="32" type="int" group="float"/>
<reg name="foseg" bitsize="32" type="int" group="float"/>
<reg name="fooff" bitsize="32" type="int" group="float"/>
<reg name="fop" bitsize="32" type="int" group="float"/>
</feature>
<feature name="org.gnu.gdb.i386.sse">
<vector id="v4f" type="ieee_single" count="4"/>
<vector id="v2d" type="ieee_double" count="2"/>
<vector id="v16i8" type="int8" count="16"/>
<vector id="v8i16" type="int16" count="8"/>
<vector id="v4i32" type="int32" count="4"/>
<vector id="v2i64" type="int64" count="2"/>
<union id="vec128">
<field name="v4_float" type="v4f"/>
<field name="v2_double" type="v2d"/>
<field name="v16_int8" type="v16i8"/>
<field name="v8_int16" type="v8i16"/>
<field name="v4_int32" type="v4i32"/>
<field name="v2_int64" type="v2i64"/>
<field name="uint128" type="uint128"/>
</union>
<flags id="i386_mxcsr" size="4">
<field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
<field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
<field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
<field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
<field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
<field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
<field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
</flags>
<reg name="xmm0" bitsize="128" type="vec128"/>
<reg name="xmm1" bitsize="128" type="vec128"/>
<reg name="xmm2" bitsize="128" type="vec128"/>
<reg name="xmm3" bitsize="128" type="vec128"/>
<reg name="xmm4" bitsize="128" type="vec128"/>
<reg name="xmm5" bitsize="128" type="vec128"/>
<reg name="xmm6" bitsize="128" type="vec128"/>
<reg name="xmm7" bitsize="128" type="vec128"/>
<reg name="xmm8" bitsize="128" type="vec128"/>
<reg name="xmm9" bitsize="128" type="vec128"/>
<reg name="xmm10" bitsize="128" type="vec128"/>
<reg name="xmm11" bitsize="128" type="vec128"/>
<reg name="xmm12" bitsize="128" type="vec128"/>
<reg name="xmm13" bitsize="128" type="vec128"/>
<reg name="xmm14" bitsize="128" type="vec128"/>
<reg name="xmm15" bitsize="128" type="vec128"/>
<reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>
</feature>
<feature name="org.gnu.gdb.i386.linux">
<reg name="orig_rax" bitsize="64" type="int" regnum="57"/>
</feature>
<feature name="org.gnu.gdb.i386.segments">
<reg name="fs_base" bitsize="64" type="int"/>
<reg name="gs_base" bitsize="64" type="int"/>
</feature>
</target>
"#;
