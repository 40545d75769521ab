//! `guest-introspect`: a read-only view of a Linux guest kernel.
//!
//! It reads guest memory through the small [`memory::PhysMemory`] trait, so
//! the same code works on a live VM and on a snapshot file, and it knows
//! nothing of KVM. Today it provides the page-table walk
//! ([`paging::translate`]) the VMM and the tracer share, and System.map
//! symbols ([`symbols::SymbolMap`]); kallsyms, BTF types
//! and task helpers build on top of it.

pub mod kallsyms;
pub mod memory;
pub mod paging;
pub mod symbols;
