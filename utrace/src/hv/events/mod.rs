//! One module per event family: what each trap reads in the guest and
//! what it reports. Each adds its handlers to
//! [`crate::hv::dispatch::Dispatcher`], which calls them by site.
//!
//! * [`syscall`]: system-call entry and exit of steered threads.
//! * [`exec`]: a successful exec, and the start of tracing an awaited one.
//! * [`clone`]: a new task, and followers attaching to it.
//! * [`exit`]: a thread's exit, death and reaping.
//! * [`signal`]: a signal delivered to a handler, or dequeued and killing.
//! * [`quiesce`]: REPORT's report_quiesce on the way back to user mode.
//! * [`step`]: SINGLESTEP and BLOCKSTEP, through the guest's own `#DB`.

pub mod clone;
pub mod exec;
pub mod exit;
pub mod quiesce;
pub mod signal;
pub mod step;
pub mod syscall;
