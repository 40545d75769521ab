//! x86-64 machine facts, one per file: memory layout, GDT, boot page
//! tables, boot registers, MSRs, CPUID, `boot_params`/e820, the MP table,
//! the ACPI tables, and the XSAVE area.

pub mod acpi;
pub mod bootparams;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
pub mod xsave;
