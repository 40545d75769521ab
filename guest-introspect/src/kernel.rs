//! A running kernel: guest memory plus the symbols and types of the kernel
//! in it, placed where KASLR put it.
//!
//! [`RunningKernel::attach`] finds the virtual KASLR offset from the vCPU
//! state alone (the page-fault gate of the IDT against the link-time
//! `asm_exc_page_fault`), then proves that the symbol source belongs to this
//! kernel by reading `linux_banner` where the shifted symbol says it is. A
//! System.map of another build fails that check and is refused.

use crate::btf::KernelTypes;
use crate::error::{IntrospectError, Result};
use crate::memory::{PhysMemory, VirtAddr};
use crate::paging::{read_virt, translate, AddressSpace, PagingLevels};
use crate::symbols::SymbolMap;

/// Start of the kernel's high mapping (`__START_KERNEL_map`); symbols at or
/// above it move with KASLR, per-cpu offsets below it do not.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// x86 page-fault vector.
const PAGE_FAULT_VECTOR: u64 = 14;
/// Longest string read for a banner.
const BANNER_MAX: usize = 512;
/// Most CPUs a guest may have (the VMM's limit is far below this).
const MAX_CPUS: u64 = 8192;

/// What the introspection needs of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuView {
    /// CR3 (page-table root; PCID and PTI user bits are ignored).
    pub cr3: u64,
    /// CR4 (for 5-level paging).
    pub cr4: u64,
    /// IDTR base.
    pub idt_base: u64,
    /// IDTR limit.
    pub idt_limit: u16,
}

impl VcpuView {
    /// The address spaces that may map the whole kernel, best first: the
    /// vCPU's CR3 as it is, then (page-table isolation) with bit 12 clear,
    /// which selects the kernel half of an 8 KiB PGD pair when the vCPU is
    /// on the user half. Without PTI a PGD is any 4 KiB page, so bit 12
    /// cannot simply be cleared.
    pub fn kernel_spaces(&self) -> Vec<AddressSpace> {
        let levels = PagingLevels::from_cr4(self.cr4);
        let base = self.cr3 & 0x000f_ffff_ffff_f000;
        let mut out = vec![AddressSpace { cr3: base, levels }];
        if base & 0x1000 != 0 {
            out.push(AddressSpace {
                cr3: base & !0x1000,
                levels,
            });
        }
        out
    }

    /// The first of [`VcpuView::kernel_spaces`].
    pub fn kernel_space(&self) -> AddressSpace {
        self.kernel_spaces()[0]
    }

    /// Runs `f` in each of [`VcpuView::kernel_spaces`] until one succeeds;
    /// otherwise returns the first space's error (the likelier one).
    pub fn in_kernel_space<T, E>(
        &self,
        mut f: impl FnMut(AddressSpace) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut first_error = None;
        for space in self.kernel_spaces() {
            match f(space) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.expect("kernel_spaces is never empty"))
    }
}

/// Where the kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPlacement {
    /// Runtime minus link-time virtual address of every kernel symbol.
    pub virt_offset: i64,
    /// Runtime virtual address of `_text`.
    pub text: u64,
    /// Guest-physical address of `_text`.
    pub text_phys: u64,
}

/// A kernel in guest memory, ready for reads by symbol and type.
pub struct RunningKernel<'a, M: PhysMemory + ?Sized> {
    mem: &'a M,
    space: AddressSpace,
    symbols: &'a SymbolMap,
    types: &'a KernelTypes,
    placement: KernelPlacement,
    banner: String,
}

/// Reads the handler address of `vector` from the IDT at `idt_base`.
pub fn idt_handler(
    mem: &(impl PhysMemory + ?Sized),
    space: AddressSpace,
    idt_base: u64,
    vector: u64,
) -> std::result::Result<u64, crate::paging::VirtReadError> {
    let mut gate = [0u8; 16];
    read_virt(
        mem,
        space,
        VirtAddr(idt_base.wrapping_add(vector * 16)),
        &mut gate,
    )?;
    Ok(u64::from(u16::from_le_bytes([gate[0], gate[1]]))
        | (u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16)
        | (u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32))
}

/// Turns a byte buffer holding a C string into a Rust string (lossy, up to
/// the first NUL).
pub fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl<'a, M: PhysMemory + ?Sized> RunningKernel<'a, M> {
    /// Locates the kernel described by `symbols`/`types` in `mem`, using
    /// `vcpu`'s state, and checks that the symbols belong to it. With
    /// `expected_banner` (the banner found in the kernel image the symbols
    /// came from), the running kernel's banner must equal it.
    pub fn attach(
        mem: &'a M,
        vcpu: &VcpuView,
        symbols: &'a SymbolMap,
        types: &'a KernelTypes,
        expected_banner: Option<&str>,
    ) -> Result<Self> {
        vcpu.in_kernel_space(|space| {
            Self::attach_in(mem, vcpu, space, symbols, types, expected_banner)
        })
    }

    fn attach_in(
        mem: &'a M,
        vcpu: &VcpuView,
        space: AddressSpace,
        symbols: &'a SymbolMap,
        types: &'a KernelTypes,
        expected_banner: Option<&str>,
    ) -> Result<Self> {
        if u64::from(vcpu.idt_limit) < PAGE_FAULT_VECTOR * 16 + 15 {
            return Err(IntrospectError::Kaslr(
                "the vCPU has no IDT yet (the kernel has not started)".into(),
            ));
        }
        let handler = idt_handler(mem, space, vcpu.idt_base, PAGE_FAULT_VECTOR).map_err(|e| {
            IntrospectError::Kaslr(format!("cannot read the IDT at {:#x}: {e}", vcpu.idt_base))
        })?;
        let link = symbols
            .lookup("asm_exc_page_fault")
            .or_else(|| symbols.lookup("page_fault"))
            .ok_or_else(|| IntrospectError::MissingSymbol("asm_exc_page_fault".into()))?;
        let virt_offset = handler.wrapping_sub(link) as i64;
        if virt_offset & 0xfff != 0 {
            return Err(IntrospectError::Mismatch(format!(
                "the page-fault gate points to {handler:#x}, not a page-aligned shift of asm_exc_page_fault ({link:#x})"
            )));
        }
        let text_link = symbols
            .lookup("_text")
            .or_else(|| symbols.lookup("startup_64"))
            .ok_or_else(|| IntrospectError::MissingSymbol("_text".into()))?;
        let text = text_link.wrapping_add(virt_offset as u64);
        let text_phys = translate(mem, space, VirtAddr(text))
            .map_err(|e| {
                IntrospectError::Mismatch(format!("_text at {text:#x} is not mapped: {e}"))
            })?
            .0;
        let mut k = RunningKernel {
            mem,
            space,
            symbols,
            types,
            placement: KernelPlacement {
                virt_offset,
                text,
                text_phys,
            },
            banner: String::new(),
        };
        let banner_va = k.symbol("linux_banner")?;
        let mut buf = vec![0u8; BANNER_MAX];
        k.read(banner_va, &mut buf, "linux_banner")
            .map_err(|e| IntrospectError::Mismatch(e.to_string()))?;
        let banner = c_string(&buf);
        if !banner.starts_with("Linux version ") {
            return Err(IntrospectError::Mismatch(format!(
                "linux_banner at {banner_va:#x} reads {:?}, not \"Linux version ...\"",
                banner.chars().take(40).collect::<String>()
            )));
        }
        if let Some(want) = expected_banner {
            if want.trim_end() != banner.trim_end() {
                return Err(IntrospectError::Mismatch(format!(
                    "the running kernel is {:?}, the symbols are for {:?}",
                    banner.trim_end(),
                    want.trim_end()
                )));
            }
        }
        k.banner = banner;
        Ok(k)
    }

    /// A kernel whose placement the caller already knows (no IDT lookup and
    /// no banner check): for fuzzing and for tools that located it another
    /// way. Reads are exactly as checked as after [`RunningKernel::attach`].
    pub fn assume(
        mem: &'a M,
        space: AddressSpace,
        symbols: &'a SymbolMap,
        types: &'a KernelTypes,
        placement: KernelPlacement,
    ) -> Self {
        RunningKernel {
            mem,
            space,
            symbols,
            types,
            placement,
            banner: String::new(),
        }
    }

    /// Where the kernel runs.
    pub fn placement(&self) -> KernelPlacement {
        self.placement
    }

    /// The running kernel's `linux_banner`.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// The kernel address space used for reads.
    pub fn space(&self) -> AddressSpace {
        self.space
    }

    /// The memory source.
    pub fn memory(&self) -> &'a M {
        self.mem
    }

    /// The kernel's types.
    pub fn types(&self) -> &'a KernelTypes {
        self.types
    }

    /// The symbol table (link-time addresses).
    pub fn symbols(&self) -> &'a SymbolMap {
        self.symbols
    }

    /// Runtime address of a link-time address.
    pub fn runtime(&self, link: u64) -> u64 {
        if link >= START_KERNEL_MAP {
            link.wrapping_add(self.placement.virt_offset as u64)
        } else {
            link
        }
    }

    /// Runtime address of symbol `name` (per-cpu symbols stay offsets).
    pub fn symbol(&self, name: &str) -> Result<u64> {
        self.symbols
            .lookup(name)
            .map(|a| self.runtime(a))
            .ok_or_else(|| IntrospectError::MissingSymbol(name.into()))
    }

    /// Fills `buf` from kernel virtual address `va`; `what` names the read
    /// in the error.
    pub fn read(&self, va: u64, buf: &mut [u8], what: &str) -> Result<()> {
        read_virt(self.mem, self.space, VirtAddr(va), buf).map_err(|source| IntrospectError::Read {
            what: what.to_string(),
            va,
            source,
        })
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, va: u64, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(va, &mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian u32.
    pub fn read_u32(&self, va: u64, what: &str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(va, &mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads an unsigned integer of `size` (1, 2, 4 or 8) bytes.
    pub fn read_uint(&self, va: u64, size: u64, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        let n = size.clamp(1, 8) as usize;
        self.read(va, &mut b[..n], what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a NUL-terminated string of at most `max` bytes (stopping at a
    /// page that is not mapped after the first byte).
    pub fn read_cstr(&self, va: u64, max: usize, what: &str) -> Result<String> {
        let mut out = Vec::new();
        let mut cur = va;
        while out.len() < max {
            let in_page = (0x1000 - (cur & 0xfff)) as usize;
            let n = in_page.min(max - out.len());
            let mut chunk = vec![0u8; n];
            if let Err(e) = self.read(cur, &mut chunk, what) {
                if out.is_empty() {
                    return Err(e);
                }
                break;
            }
            if let Some(z) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..z]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&chunk);
            cur = cur.wrapping_add(n as u64);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Reads member `path` of the `struct_name` at `base` as an unsigned
    /// integer of the member's size.
    pub fn field(&self, base: u64, struct_name: &str, path: &str) -> Result<u64> {
        let m = self.types.member(struct_name, path)?;
        let raw = self.read_uint(
            base.wrapping_add(m.offset),
            m.size.min(8),
            &format!("{struct_name}.{path}"),
        )?;
        if m.bit_size == 0 {
            return Ok(raw);
        }
        let shift = m.bit_offset - m.offset * 8;
        Ok((raw >> shift) & ((1u64 << m.bit_size) - 1))
    }

    /// Per-CPU base offsets (`__per_cpu_offset[0..nr_cpu_ids]`).
    pub fn percpu_offsets(&self) -> Result<Vec<u64>> {
        let n = u64::from(self.read_u32(self.symbol("nr_cpu_ids")?, "nr_cpu_ids")?);
        if n == 0 || n > MAX_CPUS {
            return Err(IntrospectError::Corrupt(format!("nr_cpu_ids is {n}")));
        }
        let base = self.symbol("__per_cpu_offset")?;
        (0..n)
            .map(|i| self.read_u64(base + 8 * i, "__per_cpu_offset[]"))
            .collect()
    }

    /// Address of per-CPU variable `name` (+`member_offset`) on each CPU.
    fn percpu_addrs(&self, name: &str, member_offset: u64) -> Result<Vec<u64>> {
        let var = self.symbol(name)?;
        Ok(self
            .percpu_offsets()?
            .into_iter()
            .map(|o| o.wrapping_add(var).wrapping_add(member_offset))
            .collect())
    }

    /// The task running on each CPU (`current_task`, or `pcpu_hot.current_task`
    /// on 6.2 and later), indexed by CPU number.
    pub fn current_tasks(&self) -> Result<Vec<u64>> {
        let addrs = if self.symbols.lookup("pcpu_hot").is_some() {
            let off = self.types.member("pcpu_hot", "current_task")?.offset;
            self.percpu_addrs("pcpu_hot", off)?
        } else {
            self.percpu_addrs("current_task", 0)?
        };
        addrs
            .into_iter()
            .map(|a| self.read_u64(a, "current task of a CPU"))
            .collect()
    }
}
