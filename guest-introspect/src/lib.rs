//! `guest-introspect`: a read-only view of a Linux guest kernel.
//!
//! It reads guest memory through the small [`memory::PhysMemory`] trait, so
//! the same code works on a live VM and on a snapshot file, and it knows
//! nothing of KVM.
//!
//! * [`paging`]: page-table walks (4/5-level, 2 MiB and 1 GiB pages).
//! * [`symbols`], [`kallsyms`], [`elf`], [`image`]: kernel symbols from a
//!   System.map, an ELF symbol table or kallsyms recovered from an image or
//!   from guest memory, with one precedence rule ([`image::KernelInfo`]).
//! * [`btf`]: struct layouts from BTF, resolved by name at run time.
//! * [`kernel`]: a running kernel located in guest memory (KASLR offset,
//!   banner check, per-CPU data).
//! * [`tasks`]: every process and thread, decoded from `task_struct`s.
//! * [`pt_regs`]: a task's saved user registers, one typed layout;
//!   [`task_layout`]: every task field read, resolved once.

pub mod btf;
pub mod elf;
pub mod error;
pub mod image;
pub mod kallsyms;
pub mod kernel;
pub mod le;
pub mod memory;
pub mod paging;
pub mod pt_regs;
pub mod stacks;
pub mod symbols;
pub mod task_layout;
pub mod tasks;
