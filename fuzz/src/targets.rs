//! The fuzz targets. Each takes arbitrary bytes, runs a decoder over them
//! and ignores its `Result`: only a panic or a hang is a failure. The
//! guest-introspect targets are here; those of vmm and utrace are in the
//! submodules.

pub mod loader;
pub mod snapshot;
pub mod syscalls;

use guest_introspect::btf::KernelTypes;
use guest_introspect::kallsyms::find_kallsyms;
use guest_introspect::kernel::{KernelPlacement, RunningKernel};
use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{read_virt, translate, AddressSpace, PagingLevels};
use guest_introspect::symbols::{Symbol, SymbolMap};
use guest_introspect::tasks::{TaskReader, WalkLimits};

/// Structs and members the task walker uses, queried on every BTF mutant.
const QUERIES: [(&str, &str); 8] = [
    ("task_struct", "pid"),
    ("task_struct", "thread_info.flags"),
    ("task_struct", "__state"),
    ("task_struct", "comm"),
    ("cred", "uid"),
    ("list_head", "next"),
    ("pt_regs", "orig_ax"),
    ("qstr", "name"),
];

/// kallsyms decoder over bytes loaded at `vaddr`.
pub fn kallsyms(vaddr: u64) -> impl Fn(&[u8]) {
    move |data| {
        let _ = find_kallsyms(data, vaddr);
    }
}

/// BTF reader: parse, then every query the task walker makes, plus a full
/// member listing.
pub fn btf(data: &[u8]) {
    if let Ok(t) = KernelTypes::from_btf_bytes(data) {
        for (s, m) in QUERIES {
            let _ = t.member(s, m);
            let _ = t.struct_size(s);
        }
        let _ = t.members("task_struct");
        let _ = t.member_any("task_struct", &["__state", "state"]);
    }
}

/// Page-table walker: the input is guest-physical memory; CR3, the paging
/// mode and the addresses translated come from its first bytes.
pub fn paging(data: &[u8]) {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        for (k, x) in b.iter_mut().enumerate() {
            *x = data.get(i * 8 + k).copied().unwrap_or(0);
        }
        u64::from_le_bytes(b)
    };
    let levels = if word(0) & 1 == 0 {
        PagingLevels::Four
    } else {
        PagingLevels::Five
    };
    let space = AddressSpace {
        cr3: word(0) & 0xf_f000,
        levels,
    };
    for i in 1..9 {
        let va = VirtAddr(word(i));
        let _ = translate(data, space, va);
        let mut buf = [0u8; 9000]; // crosses at least two page boundaries
        let _ = read_virt(data, space, va, &mut buf);
    }
}

/// A synthetic guest for the task walker: page tables, a handful of
/// well-formed task_structs laid out with the real kernel's BTF offsets,
/// and the symbols the walker needs. The fuzz input is this guest's RAM.
pub struct TaskGuest {
    types: KernelTypes,
    symbols: SymbolMap,
    /// RAM of a well-formed guest (the seed).
    pub seed: Vec<u8>,
}

/// Kernel text/data mapping used by the synthetic guest.
const KBASE: u64 = 0xffff_ffff_8100_0000;
/// Synthetic RAM size.
const RAM: usize = 1 << 20;

impl TaskGuest {
    /// Builds the synthetic guest from the real kernel's BTF (`btf`): init
    /// plus `processes` processes of up to three threads each.
    pub fn new(btf: &[u8], processes: usize) -> Self {
        let types = KernelTypes::from_btf_bytes(btf).expect("real BTF parses");
        let mut ram = vec![0u8; RAM];
        let put = |ram: &mut Vec<u8>, pa: u64, v: u64| {
            ram[pa as usize..pa as usize + 8].copy_from_slice(&v.to_le_bytes());
        };
        // PML4 at 0; kernel: PML4[511] -> PDPT 0x1000, [510] -> PD 0x2000,
        // PD[8] = 2 MiB page at 0 (VA KBASE). Direct map: PML4[273] ->
        // PDPT 0x3000, [0] = 1 GiB page at 0.
        put(&mut ram, 511 * 8, 0x1000 | 3);
        put(&mut ram, 0x1000 + 510 * 8, 0x2000 | 3);
        put(&mut ram, 0x2000 + 8 * 8, 0x83);
        put(&mut ram, 273 * 8, 0x3000 | 3);
        put(&mut ram, 0x3000, 0x83);
        let off = |s: &str, m: &str| types.member(s, m).map(|m| m.offset).unwrap_or(0);
        let size = types.struct_size("task_struct").unwrap_or(0x2000);
        let stride = size.next_multiple_of(64);
        let task_pa = |i: u64| 0x10000 + i * stride;
        let va = |pa: u64| KBASE + pa;
        let sig_pa = |i: u64| 0xe0000 + i * 0x400;
        let cred_pa = 0x6000u64;
        let tasks = off("task_struct", "tasks");
        let node = off("task_struct", "thread_node");
        let head = off("signal_struct", "thread_head");
        let ring = off("task_struct", "thread_group");
        // (task index, process leader index)
        let mut all: Vec<(u64, u64)> = vec![(0, 0)];
        let mut next = 1;
        for p in 0..processes as u64 {
            let leader = next;
            for _ in 0..=(p % 3) {
                all.push((next, leader));
                next += 1;
            }
        }
        if task_pa(next) + stride > sig_pa(0) {
            panic!("too many synthetic tasks for {RAM} bytes of RAM");
        }
        let leaders: Vec<u64> = all.iter().filter(|(t, l)| t == l).map(|x| x.0).collect();
        for (n, &(t, l)) in all.iter().enumerate() {
            let base = task_pa(t);
            let w32 = |ram: &mut Vec<u8>, o: u64, v: u32| {
                ram[(base + o) as usize..(base + o) as usize + 4].copy_from_slice(&v.to_le_bytes());
            };
            w32(&mut ram, off("task_struct", "pid"), t as u32);
            w32(&mut ram, off("task_struct", "tgid"), l as u32);
            w32(&mut ram, off("task_struct", "__state"), 1);
            put(
                &mut ram,
                base + off("task_struct", "real_parent"),
                va(task_pa(0)),
            );
            put(
                &mut ram,
                base + off("task_struct", "group_leader"),
                va(task_pa(l)),
            );
            put(
                &mut ram,
                base + off("task_struct", "real_cred"),
                va(cred_pa),
            );
            put(&mut ram, base + off("task_struct", "signal"), va(sig_pa(l)));
            let comm = format!("task-{n}");
            let c = (base + off("task_struct", "comm")) as usize;
            ram[c..c + comm.len()].copy_from_slice(comm.as_bytes());
        }
        // The process ring through init_task.
        for (i, &t) in leaders.iter().enumerate() {
            let nx = leaders[(i + 1) % leaders.len()];
            put(&mut ram, task_pa(t) + tasks, va(task_pa(nx) + tasks));
        }
        // Thread lists: signal->thread_head ring and the thread_group ring.
        for &l in &leaders {
            let members: Vec<u64> = all.iter().filter(|x| x.1 == l).map(|x| x.0).collect();
            let h = va(sig_pa(l) + head);
            let nodes: Vec<u64> = members.iter().map(|&t| va(task_pa(t) + node)).collect();
            put(&mut ram, sig_pa(l) + head, nodes[0]);
            for (i, &t) in members.iter().enumerate() {
                let nx = nodes.get(i + 1).copied().unwrap_or(h);
                put(&mut ram, task_pa(t) + node, nx);
                let rg = va(task_pa(members[(i + 1) % members.len()]) + ring);
                put(&mut ram, task_pa(t) + ring, rg);
            }
        }
        // Per-CPU: one CPU whose current task is init_task.
        put(&mut ram, 0x4000, 1); // nr_cpu_ids
        put(&mut ram, 0x4008, KBASE); // __per_cpu_offset[0]
        put(&mut ram, 0x5000, va(task_pa(0))); // current_task (offset 0x5000)
        let sym = |addr, name: &str| Symbol {
            addr,
            kind: 'D',
            name: name.to_string(),
        };
        let symbols = SymbolMap::from_symbols(vec![
            sym(va(task_pa(0)), "init_task"),
            sym(va(0x4000), "nr_cpu_ids"),
            sym(va(0x4008), "__per_cpu_offset"),
            sym(0x5000, "current_task"),
        ]);
        Self {
            types,
            symbols,
            seed: ram,
        }
    }

    /// Runs the whole walker over `ram`: every task, its user registers
    /// and executable path.
    pub fn walk(&self, ram: &[u8]) {
        let space = AddressSpace {
            cr3: 0,
            levels: PagingLevels::Four,
        };
        let placement = KernelPlacement {
            virt_offset: 0,
            text: KBASE,
            text_phys: 0,
        };
        let k = RunningKernel::assume(ram, space, &self.symbols, &self.types, placement);
        let Ok(reader) = TaskReader::new(&k) else {
            return;
        };
        let limits = WalkLimits { max_tasks: 4096 };
        if let Ok(tasks) = reader.all_tasks(limits) {
            for t in &tasks {
                let _ = reader.user_regs(t);
                let _ = reader.exe_path(t);
            }
        }
    }

    /// How many tasks the walker finds in `ram` (for checking the seed).
    pub fn count(&self, ram: &[u8]) -> Result<usize, String> {
        let space = AddressSpace {
            cr3: 0,
            levels: PagingLevels::Four,
        };
        let placement = KernelPlacement {
            virt_offset: 0,
            text: KBASE,
            text_phys: 0,
        };
        let k = RunningKernel::assume(ram, space, &self.symbols, &self.types, placement);
        let reader = TaskReader::new(&k).map_err(|e| e.to_string())?;
        reader
            .all_tasks(WalkLimits::default())
            .map(|t| t.len())
            .map_err(|e| e.to_string())
    }
}
