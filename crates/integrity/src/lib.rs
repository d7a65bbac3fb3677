//! The kvmaccess kernel integrity monitor: take a baseline of the security-relevant kernel state
//! of a guest (GDT, IDT, control registers, system-call tables, kernel text and read-only data),
//! then re-check it every period and explain every difference.
//!
//! The design follows the 2011 KvmAccess integrity monitor (a baseline of GDT, IDT, syscall table
//! and CR0.WP re-checked periodically) and goes past it where a modern kernel needs it:
//!
//! * **A baseline survives a reboot of the same build.** Addresses are stored KASLR-relative
//!   ([`Location`]: `symbol+offset` and the offset from `_text`, or module-relative), and a check
//!   against a different build refuses with both build ids ([`Error::BuildMismatch`]).
//! * **No false positives from the kernel's own patching.** Jump labels, static calls, ftrace
//!   call sites and kprobes rewrite kernel text at run time. Every changed range is classified
//!   ([`patch`]); legitimate state changes become [`Severity::Info`] findings, anything else is an
//!   inline hook reported with its bytes, its decoded target and the target's [`Owner`].
//! * **Cheap enough to run every second.** The text check compares guest memory with the
//!   baseline copy at memory speed and only classifies the few pages that differ.
//!
//! A pass: build a [`Context`] (registers of all vCPUs fetched once), then [`capture_baseline`]
//! or [`run_checks`] with a [`CheckSet`]. Findings that can be undone from outside have a
//! [`restore_plan`].

#![forbid(unsafe_code)]

mod baseline;
mod checks;
mod engine;
mod error;
mod finding;
mod location;
mod module_tracker;
pub mod patch;
mod restore;
mod time;

pub use baseline::{Baseline, BlobRecord, Blobs, BASELINE_FORMAT, BASELINE_VERSION, SIDECAR_MAGIC};
pub use checks::{
    CrCheck, FtraceCheck, FtraceOffsets, GdtCheck, IdtCheck, KprobeOffsets, ModulesCheck,
    SyscallCheck, TasksCheck, TextCheck, CEA_RO_IDT, CPU_ENTRY_AREA_BASE,
};
pub use engine::{
    capture_baseline, run_checks, Check, CheckBaseline, CheckInfo, CheckRun, CheckSet, Context,
    Report, CHECKS,
};
pub use error::{Error, Result};
pub use finding::{Finding, Severity, Target};
pub use location::{AddressMap, Location, ModuleSpan, Owner};
pub use module_tracker::{listed_and_hidden_modules, module_spans, ModuleTracker};
pub use restore::{apply_write, restore_plan, Restore, Write};
pub use time::rfc3339;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod views_tests;
