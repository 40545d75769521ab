//! `vmm`: a minimal KVM virtual machine monitor for tracing Linux guests.
//!
//! The crate is laid out the way a reader looks for things:
//!
//! * [`builder`]: the recipe that assembles a VM (memory, kernel and
//!   initrd, boot structures, vCPUs, devices) from a [`builder::VmConfig`].
//! * [`machine`]: the running VM: vCPU threads, pause/resume, register and
//!   memory access. This is the API the tracer uses.
//! * [`vstate`]: guest memory, the KVM VM and the vCPU run loop (where every
//!   exit is dispatched).
//! * [`trap`]: breakpoints in guest kernel text and the one place that tells
//!   the VMM's and tracer's traps from the guest's own; the PVM fix-ups.
//! * [`arch`]: x86-64 facts (layout, GDT, paging, MP table, boot params).
//! * [`loader`]: kernel images (ELF vmlinux, bzImage in every compression),
//!   relocations and KASLR; [`initrd`]: initrd checks.
//! * [`devices`]: 16550 UARTs and the i8042 reset line.
//! * [`control`]: the host end of the guest image's control protocol.
//! * [`persist`] saves and restores snapshots.
//! * [`kvm_kind`]: hardware vs PVM KVM.

pub mod arch;
pub mod builder;
pub mod control;
pub mod crash;
pub mod devices;
pub mod initrd;
pub mod kvm_kind;
pub mod loader;
pub mod machine;
pub mod persist;
pub mod session;
pub mod trap;
pub mod vstate;
