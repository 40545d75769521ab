//! utrace served from the hypervisor: traps on the running guest kernel's
//! tracehook sites, the traced-thread table, steering through task state,
//! and the dispatch of events to engines.
//!
//! * [`layout`]: the offsets and flag bits the trap handlers use, from BTF.
//! * [`placement`]: each event's trap address and kind (int3 or debug
//!   register).
//! * [`tracer`]: installing the traps, tracing threads, handling each trap.
//! * [`context`]: the traced thread as engine callbacks see it.
//! * [`signals`]: siginfo of deliveries and of signals that kill by their
//!   default action.

pub mod context;
pub mod layout;
pub mod placement;
pub mod signals;
pub mod tracer;

pub use tracer::{EngineSpec, Tracer, TracerError, TRACED_EVENTS};
