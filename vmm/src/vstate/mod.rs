//! Live VM state: guest memory, the KVM VM, vCPU threads.

pub mod memory;
pub mod vcpu;
pub mod vm;
