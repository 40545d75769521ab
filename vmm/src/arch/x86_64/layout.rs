//! Every guest-physical address the VMM uses, in one place.

/// Start of the guest's real-mode interrupt vector table page (left zeroed).
pub const ZERO_PAGE_START: u64 = 0x0;
/// The boot GDT the vCPU starts with (64-bit boot protocol selectors).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty boot IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// The `boot_params` ("zero page") handed to the kernel in RSI.
pub const BOOT_PARAMS_START: u64 = 0x7000;
/// Identity page tables for the boot: PML4, one PDPT, four page directories.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages) covering 0..4 GiB.
pub const PDE_START: u64 = 0xb000;
/// Number of GiB the boot identity map covers.
pub const IDENTITY_MAP_GIB: u64 = 4;
/// The kernel command line, NUL terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the VMM accepts (the kernel's own limit is 2048 on x86).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Where the MP floating pointer and configuration table live (top of the 640 KiB).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional low memory.
pub const EBDA_END: u64 = 0xa0000;
/// The output window (`devices::output_window`): guest RAM in the legacy
/// hole that e820 leaves out, so the kernel never allocates it.
pub const OUTPUT_WINDOW_START: u64 = 0xd_0000;
/// Size of the output window.
pub const OUTPUT_WINDOW_SIZE: u64 = 0x1_0000;
/// The ACPI tables (`acpi`), RSDP first: in the BIOS area that Linux scans
/// for the RSDP (0xe0000-0xfffff), guest RAM that e820 leaves out.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the ACPI tables' area.
pub const ACPI_END: u64 = 0x10_0000;
/// Start of high memory (above the legacy VGA/BIOS hole).
pub const HIMEM_START: u64 = 0x100000;
/// Physical address the kernel is linked to run at (LOAD_PHYSICAL_ADDR).
pub const KERNEL_DEFAULT_PHYS: u64 = 0x100_0000;
/// Start of the 32-bit MMIO hole (LAPIC, IOAPIC); guest RAM stops below it.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole; RAM beyond the hole continues here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The output window's doorbell page (no memory slot: every access exits).
pub const OUTPUT_DOORBELL_START: u64 = 0xfeb0_0000;
/// The I/O APIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) for the in-kernel real-mode emulation.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Highest address an initrd may end at (protocol default `initrd_addr_max`).
pub const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
