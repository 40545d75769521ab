//! `utrace`: the engine model of the utrace seed mail, served from the
//! hypervisor (engines, event masks, callbacks, resume actions).
//!
//! * [`action::ResumeAction`]: STOP < REPORT < INTERRUPT < SINGLESTEP <
//!   BLOCKSTEP < RESUME < DETACH (the seed's order); the smallest prevails.
//! * [`event`]: event bits and the events reported, with their details.
//! * [`engine`]: the callbacks an engine implements ([`engine::EngineOps`]),
//!   attach flags and the errno-style errors; [`context::ThreadContext`]:
//!   the thread each callback reports about.
//! * [`thread::ThreadUtrace`]: one thread's engines and the dispatch rules
//!   (order, report_quiesce first, prevailing action, STOP persistence,
//!   death before reap).
//! * [`sites`]: the places the tracer traps ([`sites::Site`]), each with
//!   ranked candidate kernel functions resolved
//!   against the running kernel's symbols (`hvtrace sites`).
//!
//! * [`hv`]: the model served from the hypervisor: traps on the sites
//!   through `vmm::trap`, traced threads steered through their
//!   `syscall_work`, events dispatched to engines.
//! * [`syscalls`]: system-call names from the running kernel and
//!   strace-style rendering; [`strace`]: the engine `hvtrace trace` uses.
//! * [`step`]: what a SINGLESTEP/BLOCKSTEP report carries; [`steps`]: the
//!   instruction tracer `hvtrace trace --steps` uses.

pub mod action;
pub mod context;
pub mod engine;
pub mod event;
pub mod hv;
pub mod sites;
pub mod step;
pub mod steps;
pub mod strace;
pub mod syscalls;
pub mod thread;

pub use action::ResumeAction;
pub use engine::{AttachFlags, Engine, EngineOps, UtraceError};
pub use event::{Event, EventMask, Tid};
pub use thread::ThreadUtrace;
