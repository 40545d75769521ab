//! The snapshot reader (vmm's `persist`): what `hvtrace ps`/`inspect` on a
//! user's snapshot file reaches. The input is the file. The target runs
//! [`read_snapshot`] on it as it is (magic, version, checksum), then fixes
//! the trailing CRC-32 so that mutants get past the checksum, writes that
//! to a temporary file and runs [`load_offline`] on it (header, bincode
//! machine state, plausibility checks, guest RAM of the size the state
//! says, the memory section's page bitmaps and pages).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use vmm::builder::KernelPlacement;
use vmm::devices::serial::UartState;
use vmm::devices::uart16550::Registers;
use vmm::kvm_kind::KvmKind;
use vmm::persist::format::read_snapshot;
use vmm::persist::state::{MachineState, VcpuState};
use vmm::persist::{load_offline, save_offline, OfflineSnapshot};
use vmm::vstate::memory::GuestRam;

/// Guest RAM of the seed snapshot: the smallest hvtrace accepts (32 MiB).
pub const SEED_RAM: u64 = 32 << 20;

/// Reads `data` as a snapshot file; only a panic or a hang is a failure.
pub fn read(data: &[u8]) {
    let _ = read_snapshot(&mut &data[..]);
    let file = TempFile::new("snap");
    if std::fs::write(&file.0, with_crc(data)).is_ok() {
        if let Ok(s) = load_offline(&file.0) {
            let _ = s.ram.size();
        }
    }
}

/// `data` with its last 4 bytes replaced by the CRC-32 of the rest (as the
/// writer ends a file), or unchanged if it is shorter than that.
pub fn with_crc(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    if let Some(body) = v.len().checked_sub(4) {
        let mut crc = flate2::Crc::new();
        crc.update(&v[..body]);
        v[body..].copy_from_slice(&crc.sum().to_le_bytes());
    }
    v
}

/// A temporary file removed on drop, unique per process and call.
struct TempFile(PathBuf);

impl TempFile {
    fn new(what: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("hvtrace-fuzz-{what}-{}-{n}.tmp", std::process::id());
        Self(std::env::temp_dir().join(name))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A machine state as hvtrace saves it: one vCPU in long mode with MSRs,
/// XCRs and an XSAVE area, three irqchips, the PIT and clock, four UARTs
/// (one with bytes in its FIFO), a PVM trap.
pub fn seed_state() -> MachineState {
    let mut regs = kvm_regs {
        rip: 0xffff_ffff_8100_0000,
        rsp: 0xffff_c900_0000_3f00,
        rflags: 0x246,
        ..Default::default()
    };
    regs.rax = 0x3c;
    let mut sregs = kvm_sregs {
        cr0: 0x8005_0033,
        cr3: 0x1_0000,
        cr4: 0x3606f0,
        efer: 0xd01,
        ..Default::default()
    };
    sregs.cs.l = 1;
    sregs.cs.selector = 0x10;
    let vcpu = VcpuState {
        regs,
        sregs,
        fpu: kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        },
        msrs: vec![
            (0xc000_0080, 0xd01),
            (0x174, 0x10),
            (0xc000_0082, 0xffff_ffff_8160_0000),
        ],
        lapic: kvm_lapic_state::default(),
        events: kvm_vcpu_events::default(),
        mp_state: kvm_mp_state::default(),
        debugregs: kvm_debugregs::default(),
        xcrs: Some(kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        }),
        xsave: Some((0..1024).map(|i| i * 7).collect()),
    };
    let uart = |fifo: &[u8]| UartState {
        registers: Registers::default(),
        fifo: fifo.to_vec(),
        pending_input: b"ls\n".to_vec(),
    };
    MachineState {
        label: "hvtrace-fuzz seed".into(),
        kind: KvmKind::Hardware,
        memory_size: SEED_RAM,
        placement: KernelPlacement {
            phys_start: 0x100_0000,
            virt_offset: 0x20_0000,
            phys_offset: 0,
            entry: 0x100_0000,
        },
        cmdline: "console=ttyS0 quiet".into(),
        vcpus: vec![vcpu],
        irqchips: vec![kvm_irqchip::default(); 3],
        pit: kvm_pit_state2::default(),
        clock: kvm_clock_data::default(),
        uarts: vec![uart(b"ok"), uart(b""), uart(b""), uart(b"")],
        pvm_trap: Some((0xffff_ffff_8160_0000, 0x260_0000)),
    }
}

/// A snapshot file written by vmm's own writer ([`save_offline`]): the
/// seed state and 32 MiB of RAM with a few non-zero pages (so the memory
/// section has both stored and skipped pages).
pub fn seed_file() -> Vec<u8> {
    let ram = GuestRam::new(SEED_RAM).expect("allocate seed RAM");
    for (i, addr) in [0x1000u64, 0x10_0000, 0x100_0000, SEED_RAM - 0x1000]
        .into_iter()
        .enumerate()
    {
        ram.write(addr, &[i as u8 + 1; 100])
            .expect("seed RAM write");
    }
    let snap = OfflineSnapshot {
        state: seed_state(),
        ram,
    };
    let file = TempFile::new("seed");
    save_offline(&snap, &file.0).expect("write seed snapshot");
    std::fs::read(&file.0).expect("read seed snapshot")
}
