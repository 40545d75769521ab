//! `utrace`: the engine model of the utrace seed mail, served from the
//! hypervisor (engines, event masks, callbacks, resume actions).
//!
//! Not implemented yet: this crate only fixes the name and place in the
//! layering (`hvtrace` -> `utrace` -> `vmm`, `guest-introspect`). The
//! tracing issue fills it in on top of `vmm::trap` (breakpoints) and
//! `vmm::machine` (pause/resume, register access).
