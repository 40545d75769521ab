//! The Intel MultiProcessor Specification 1.4 table that tells the guest how
//! many CPUs there are and how ISA interrupts reach the I/O APIC.
//!
//! The table is built as bytes (pure, testable); the caller writes it at
//! [`super::layout::MPTABLE_START`]. ISA IRQ *i* is wired to I/O APIC pin *i*,
//! which matches KVM's default in-kernel IRQ routing.

use super::layout::{APIC_START, IOAPIC_START};

/// Errors building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// The table does not fit in the space below the EBDA end.
    #[error("MP table for {0} CPUs does not fit below 640 KiB")]
    TooManyCpus(u8),
    /// At least one CPU is required.
    #[error("a guest needs at least one CPU")]
    NoCpus,
}

/// Largest CPU count the table supports (one byte of APIC id, I/O APIC id after CPUs).
pub const MAX_CPUS: u8 = 254;

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const LEGACY_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Returns the MP floating pointer followed by the configuration table, for
/// a table placed at guest-physical `base`.
pub fn build_mptable(base: u64, num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 {
        return Err(MpTableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..LEGACY_IRQS {
        entries.extend_from_slice(&[3, MP_IRQ_INT, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every local APIC.
    entries.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"HVTRACE ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&((base + 16) as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(MPC_SPEC_REV);
    out.push(0); // checksum, patched below
    out.extend_from_slice(&[0; 5]);
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&table);
    if base + out.len() as u64 > super::layout::EBDA_END {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::MPTABLE_START;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_are_valid_and_cpus_listed() {
        let t = build_mptable(MPTABLE_START, 2).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        let cfg = &t[(ptr - MPTABLE_START) as usize..];
        assert_eq!(&cfg[..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(sum(cfg), 0);
        let cpus: Vec<_> = cfg[44..]
            .chunks(20)
            .take(2)
            .map(|e| (e[0], e[1], e[3]))
            .collect();
        assert_eq!(cpus, vec![(0, 0, 3), (0, 1, 1)]);
    }

    #[test]
    fn entry_count_matches_entries() {
        let t = build_mptable(MPTABLE_START, 4).unwrap();
        let cfg = &t[16..];
        let count = u16::from_le_bytes([cfg[34], cfg[35]]) as usize;
        // 4 cpus + bus + ioapic + 16 irqs + 2 lints
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        assert_eq!(cfg.len(), 44 + 4 * 20 + (1 + 1 + 16 + 2) * 8);
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert_eq!(build_mptable(MPTABLE_START, 0), Err(MpTableError::NoCpus));
        assert!(build_mptable(MPTABLE_START, 255).is_err());
        // 254 CPUs need 5 KiB; that does not fit in the 1 KiB below 640 KiB.
        assert!(build_mptable(MPTABLE_START, 200).is_err());
    }
}
