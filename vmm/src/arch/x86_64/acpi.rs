//! The ACPI tables that tell an ACPI kernel how many CPUs there are, where
//! the interrupt controllers live, and how to power the machine off.
//!
//! Debian's kernels (and most distribution kernels) are built without an
//! MP-table parser (`CONFIG_X86_MPPARSE` unset), so without ACPI they see
//! one CPU whatever `--cpus` says, and `poweroff` only halts them. The
//! tables here are the least an x86 Linux needs: RSDP -> XSDT -> FADT
//! (hardware-reduced ACPI: no PM timer, no SCI, no GPE blocks; the sleep
//! registers of [`crate::devices::acpi_pm`]) -> DSDT (the four UARTs and
//! the `_S5_` sleep type power-off uses), and the MADT (one local APIC per
//! vCPU and the I/O APIC, GSI *i* on pin *i* as in [`super::mptable`]).
//!
//! The UARTs must be in the DSDT: on a hardware-reduced machine Linux
//! assumes no legacy PIC (`null_legacy_pic`) and so no ISA IRQs, and the
//! 8250 driver's built-in ports at 0x3f8.. would ask for IRQs 4 and 3 that
//! nothing routes (measured: Debian 6.1's init waited forever on ttyS1).
//! Described as `PNP0501` devices with their interrupt as a GSI, they are
//! claimed by the 8250 PNP driver, which routes the GSI through the I/O
//! APIC, edge-triggered and active high as an ISA line is.
//! Kernels without ACPI (the minimal kernel) ignore them and use the MP
//! table, which stays.
//!
//! The tables are built as bytes with rust-vmm's `acpi_tables` (pure,
//! testable); the caller writes them at [`super::layout::ACPI_START`],
//! where Linux's scan of 0xe0000-0xfffff finds the RSDP.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};

use super::layout::{ACPI_END, APIC_START, IOAPIC_START};
use crate::devices::acpi_pm::{S5_SLEEP_TYPE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use crate::devices::bus::{COM_IRQS, COM_PORTS};

/// OEM id in every table header.
const OEM_ID: [u8; 6] = *b"HVTRCE";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// FADT `IAPC_BOOT_ARCH`: no VGA, no MSI (there is no PCI bus), no CMOS RTC.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 5);

/// Errors building the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// At least one CPU is required.
    #[error("a guest needs at least one CPU")]
    NoCpus,
    /// The tables do not fit below 1 MiB.
    #[error("ACPI tables for {0} CPUs do not fit below 1 MiB")]
    TooManyCpus(u8),
}

/// Returns the tables for a guest with `num_cpus` vCPUs, laid out from
/// guest-physical `base` (the RSDP first, every table 8-byte aligned).
pub fn build_acpi_tables(base: u64, num_cpus: u8) -> Result<Vec<u8>, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    let mut out = Layout::new(base);
    // The RSDP is written last, once the XSDT's address is known; reserve
    // its room first so that it sits at `base`, where the scan looks.
    out.reserve(Rsdp::len());

    let dsdt = out.place(&dsdt());
    let fadt = out.place(&fadt(dsdt));
    let madt = out.place(&madt(num_cpus));
    let mut xsdt = XSDT::new(OEM_ID, *b"HVXSDT  ", OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = out.place(&xsdt);
    out.write_at(base, &Rsdp::new(OEM_ID, xsdt));
    if base + out.bytes.len() as u64 > ACPI_END {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }
    Ok(out.bytes)
}

/// The DSDT: the UARTs COM1..COM4 (`\_SB_.COMn`: `PNP0501` at their
/// legacy ports, each with its shared, edge-triggered, active-high GSI),
/// and `Name (_S5_, Package () { 5 })`, the sleep type value that the sleep
/// control register takes for power-off.
fn dsdt() -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"HVDSDT  ", OEM_REVISION);
    let uarts: Vec<Vec<u8>> = COM_PORTS
        .iter()
        .zip(COM_IRQS)
        .enumerate()
        .map(|(i, (&port, irq))| {
            let uid = i as u8 + 1;
            let io = aml::IO::new(port, port, 1, 8);
            let interrupt = aml::Interrupt::new(true, true, false, true, irq);
            let resources = aml::ResourceTemplate::new(vec![&io, &interrupt]);
            let mut bytes = Vec::new();
            aml::Device::new(
                format!("COM{uid}").as_str().into(),
                vec![
                    &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                    &aml::Name::new("_UID".into(), &uid),
                    &aml::Name::new("_CRS".into(), &resources),
                ],
            )
            .to_aml_bytes(&mut bytes);
            bytes
        })
        .collect();
    dsdt.append_slice(&aml::Scope::raw("\\_SB_".into(), uarts.concat()));
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut dsdt);
    dsdt.write_u32(4, dsdt.len() as u32);
    dsdt.update_checksum();
    dsdt
}

/// The FADT: hardware-reduced ACPI with the sleep registers, the DSDT's
/// address, and the hypervisor's name.
fn fadt(dsdt: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"HVFACP  ", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.sleep_control_reg = io_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"HVTRACE\0").into();
    fadt.finalize()
}

/// A one-byte register at I/O port `port`.
fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// The MADT: local APIC `i` (APIC id `i`) for each vCPU, then the I/O APIC
/// (id after the CPUs', GSIs from 0, as in the MP table).
fn madt(num_cpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        *b"HVAPIC  ",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(num_cpus, IOAPIC_START as u32, 0));
    madt
}

/// Tables laid out one after another from a base address.
struct Layout {
    base: u64,
    bytes: Vec<u8>,
}

impl Layout {
    fn new(base: u64) -> Self {
        Self {
            base,
            bytes: Vec::new(),
        }
    }

    /// Leaves `len` zero bytes (8-aligned) for a later [`Self::write_at`].
    fn reserve(&mut self, len: usize) {
        self.bytes
            .resize((self.bytes.len() + len).next_multiple_of(8), 0);
    }

    /// Appends `table` and returns its guest-physical address.
    fn place(&mut self, table: &dyn Aml) -> u64 {
        let at = self.base + self.bytes.len() as u64;
        table.to_aml_bytes(&mut self.bytes);
        self.reserve(0);
        at
    }

    /// Writes `table` over reserved bytes at guest-physical `at`.
    fn write_at(&mut self, at: u64, table: &dyn Aml) {
        let mut bytes = Vec::new();
        table.to_aml_bytes(&mut bytes);
        let start = (at - self.base) as usize;
        self.bytes[start..start + bytes.len()].copy_from_slice(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ACPI_START;

    /// Follows a pointer of the tables as Linux does: the table at `addr`,
    /// checked for its signature, length and checksum.
    fn table<'a>(tables: &'a [u8], addr: u64, signature: &[u8; 4]) -> &'a [u8] {
        let start = (addr - ACPI_START) as usize;
        assert_eq!(&tables[start..start + 4], signature);
        let len = u32::from_le_bytes(tables[start + 4..start + 8].try_into().unwrap()) as usize;
        let t = &tables[start..start + len];
        assert_eq!(
            t.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "{signature:?} checksum"
        );
        t
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn the_rsdp_leads_to_every_table_with_valid_checksums() {
        let tables = build_acpi_tables(ACPI_START, 2).unwrap();
        // RSDP (ACPI 2.0): signature, both checksums, revision 2.
        assert_eq!(&tables[..8], b"RSD PTR ");
        assert_eq!(tables[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(tables[..36].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(tables[15], 2);
        let xsdt = table(&tables, u64_at(&tables, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16, "two entries: FADT and MADT");
        let fadt = table(&tables, u64_at(xsdt, 36), b"FACP");
        let madt = table(&tables, u64_at(xsdt, 44), b"APIC");
        // FADT: hardware-reduced, X_DSDT set, sleep registers at our ports.
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let dsdt = table(&tables, u64_at(fadt, 140), b"DSDT");
        assert_eq!(fadt[244], 1, "sleep control in I/O space");
        assert_eq!(u64_at(fadt, 248), u64::from(SLEEP_CONTROL_PORT));
        assert_eq!(u64_at(fadt, 260), u64::from(SLEEP_STATUS_PORT));
        // DSDT: a scope \_SB_ of four PNP0501 devices, each with its I/O
        // port descriptor and extended interrupt descriptor; then NameOp
        // "_S5_" PackageOp ... BytePrefix 5.
        let body = &dsdt[36..];
        assert_eq!(body[0], 0x10, "ScopeOp");
        let pnp0501 = [0x0c, 0x41, 0xd0, 0x05, 0x01]; // DWordPrefix, EISA id
        assert_eq!(body.windows(5).filter(|w| *w == pnp0501).count(), 4);
        for (port, irq) in COM_PORTS.iter().zip(COM_IRQS) {
            let p = port.to_le_bytes();
            let io = [0x47, 1, p[0], p[1], p[0], p[1], 1, 8];
            assert!(
                body.windows(8).any(|w| w == io),
                "IO descriptor of {port:#x}"
            );
            let int = [0x89, 6, 0, 0b1011, 1, irq as u8, 0, 0, 0];
            assert!(body.windows(9).any(|w| w == int), "interrupt of {port:#x}");
        }
        let s5 = body
            .windows(5)
            .position(|w| w == b"\x08_S5_")
            .expect("_S5_");
        assert_eq!(body[s5 + 5], 0x12);
        assert!(body.ends_with(&[0x0a, S5_SLEEP_TYPE]), "{body:x?}");
        // MADT: local APIC address, two enabled local APICs, one I/O APIC.
        assert_eq!(
            u32::from_le_bytes(madt[36..40].try_into().unwrap()),
            APIC_START as u32
        );
        let entries = &madt[44..];
        assert_eq!(entries, {
            let mut e = vec![0, 8, 0, 0, 1, 0, 0, 0, 0, 8, 1, 1, 1, 0, 0, 0];
            e.extend_from_slice(&[1, 12, 2, 0]);
            e.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
            e.extend_from_slice(&0u32.to_le_bytes());
            e
        });
    }

    #[test]
    fn every_cpu_count_fits_and_none_is_an_error() {
        assert_eq!(build_acpi_tables(ACPI_START, 0), Err(AcpiError::NoCpus));
        for cpus in [1, 2, 64, 254] {
            let t = build_acpi_tables(ACPI_START, cpus).unwrap();
            assert!(ACPI_START + t.len() as u64 <= ACPI_END);
        }
    }
}
