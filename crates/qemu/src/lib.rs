//! The live QEMU backend of kvmaccess.
//!
//! * [`QmpClient`]: a synchronous QMP client (greeting check, commands, HMP, events routed to a
//!   queue by whichever caller reads the socket, QEMU's PID from the socket).
//! * [`LaunchConfig`] / [`Guest`]: start `qemu-system-x86_64` with guest RAM in a shared file
//!   or memfd, QMP and a serial console on unix sockets, and a state file other commands can
//!   find.
//! * [`Console`]: drive the guest's serial console (wait for a marker, run a shell command).
//! * [`QemuVm`]: attach to any QEMU by its QMP socket; implements the kvmaccess-core traits
//!   [`PhysicalMemory`](kvmaccess_core::PhysicalMemory),
//!   [`PhysicalMemoryWrite`](kvmaccess_core::PhysicalMemoryWrite) (only when enabled),
//!   [`VcpuState`](kvmaccess_core::VcpuState) and [`VmControl`](kvmaccess_core::VmControl).
//!
//! Guest RAM is read through a read-only mapping of QEMU's shared RAM file (a bounds check and
//! a memory copy per read), or, when QEMU's RAM is not shared, through `/proc/PID/mem` at the
//! host address QEMU reports for each RAM range.
//!
//! Registers come from HMP `info registers -a` by default. The alternative, decoding the CPU
//! notes of a one-page `dump-guest-memory` with `kvmaccess-dump`, lacks EFER, makes QEMU stop
//! and resume a running guest (bumping [`QemuVm::generation`]) and was slower: on QEMU 7.2 / TCG,
//! 2 vCPUs, all registers per call, medians of 100 on a busy 2-core host: HMP 0.77-1.2 ms, dump
//! 1.2-1.9 ms, against 0.28 ms for a bare QMP round trip (`query-status`). It is kept as
//! [`RegisterSource::Dump`] (it has KERNEL_GS_BASE) and as a cross-check in the tests.
//!
//! QEMU serves one client per QMP socket: while a [`QemuVm`] or [`QmpClient`] is connected,
//! another attach to the same socket fails with "not a QMP socket (got: nothing ...)".

mod console;
mod error;
mod launch;
pub mod mtree;
mod qmp;
mod ram;
pub mod regs;
mod vm;

pub use console::Console;
pub use error::{Error, Result};
pub use launch::{kvm_probe, Accel, Guest, GuestState, LaunchConfig, RamBackend};
pub use qmp::{
    QmpClient, QmpEvent, DEFAULT_COMMAND_TIMEOUT, DEFAULT_GREETING_TIMEOUT, EVENT_QUEUE_LIMIT,
};
pub use ram::RamSource;
pub use vm::{AttachOptions, QemuVm, RamMode, RegisterSource};
