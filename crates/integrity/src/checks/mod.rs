//! The checks.

pub(crate) mod cr;
pub(crate) mod ftrace;
pub(crate) mod gdt;
pub(crate) mod idt;
pub(crate) mod modules;
pub(crate) mod syscalls;
pub(crate) mod tasks;
pub(crate) mod text;

pub use cr::CrCheck;
pub use ftrace::{FtraceCheck, FtraceOffsets, KprobeOffsets};
pub use gdt::GdtCheck;
pub use idt::IdtCheck;
pub use modules::ModulesCheck;
pub use syscalls::SyscallCheck;
pub use tasks::TasksCheck;
pub use text::TextCheck;

use std::sync::{Arc, Mutex};

use kvmaccess_core::Registers;
use serde::de::DeserializeOwned;

use crate::engine::CheckBaseline;
use crate::error::{Error, Result};

/// Start of the cpu_entry_area on x86-64 (`CPU_ENTRY_AREA_BASE`, the same with 4- and 5-level
/// paging): fixed, not moved by KASLR.
pub const CPU_ENTRY_AREA_BASE: u64 = 0xffff_fe00_0000_0000;
/// The read-only alias of `idt_table` the IDTR holds on x86-64 (`CPU_ENTRY_AREA_RO_IDT`).
pub const CEA_RO_IDT: u64 = CPU_ENTRY_AREA_BASE;

/// Whether a vCPU runs in long mode (EFER.LMA, or the CS L bit when EFER is unknown).
pub(crate) fn long_mode(regs: &Registers) -> bool {
    regs.efer
        .map_or(regs.cs.long_mode(), |efer| efer & (1 << 10) != 0)
}

/// Decode a check's captured state.
pub(crate) fn state<T: DeserializeOwned>(id: &str, value: &serde_json::Value) -> Result<T> {
    T::deserialize(value).map_err(|e| Error::json(format!("the baseline state of check {id}"), e))
}

/// A check's baseline state, decoded once per baseline: decoding hundreds of locations from
/// JSON every pass would cost more than comparing them.
#[derive(Debug)]
pub(crate) struct Parsed<T>(Mutex<Option<(usize, String, Arc<T>)>>);

impl<T> Default for Parsed<T> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<T: DeserializeOwned> Parsed<T> {
    pub(crate) fn get(&self, id: &str, b: &CheckBaseline<'_>) -> Result<Arc<T>> {
        // The baseline's address and creation time identify it while it is alive.
        let key = std::ptr::from_ref(b.baseline) as usize;
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, created, parsed)) = slot.as_ref() {
            if *k == key && *created == b.baseline.created {
                return Ok(parsed.clone());
            }
        }
        let parsed = Arc::new(state::<T>(id, b.state)?);
        *slot = Some((key, b.baseline.created.clone(), parsed.clone()));
        Ok(parsed)
    }
}

/// Offsets a check derives from the kernel's BTF, derived on first use and kept for later
/// passes (a monitor keeps its checks for its lifetime). Keyed by the kernel's identity so a
/// check set reused on another build derives them again; offsets given by the caller
/// ([`Derived::fixed`]) hold for any kernel.
#[derive(Debug)]
pub(crate) struct Derived<T>(Mutex<Option<(Option<String>, Arc<T>)>>);

impl<T> Default for Derived<T> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<T> Derived<T> {
    pub(crate) fn fixed(value: T) -> Self {
        Self(Mutex::new(Some((None, Arc::new(value)))))
    }

    pub(crate) fn get(
        &self,
        ctx: &crate::engine::Context<'_, '_>,
        derive: impl FnOnce(&kvmaccess_linux::KernelTypes) -> Result<T>,
    ) -> Result<Arc<T>> {
        let key = format!(
            "{} {}",
            ctx.kernel.release(),
            ctx.kernel.build_id().unwrap_or("")
        );
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, value)) = slot.as_ref() {
            if k.is_none() || k.as_deref() == Some(key.as_str()) {
                return Ok(value.clone());
            }
        }
        let value = Arc::new(derive(ctx.types()?)?);
        *slot = Some((Some(key), value.clone()));
        Ok(value)
    }
}

/// Encode a check's state.
pub(crate) fn to_value<T: serde::Serialize>(id: &str, state: &T) -> Result<serde_json::Value> {
    serde_json::to_value(state).map_err(|e| Error::json(format!("state of check {id}"), e))
}

/// Lowercase hex of bytes, space separated.
pub(crate) fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A descriptor table as read in one pass, and what it was checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeenTable {
    baseline: String,
    vcpu: usize,
    table: kvmaccess_core::DescriptorTable,
    pub bytes: Vec<u8>,
}

impl SeenTable {
    pub fn new(
        baseline: &crate::engine::CheckBaseline<'_>,
        vcpu: usize,
        table: kvmaccess_core::DescriptorTable,
        bytes: Vec<u8>,
    ) -> Self {
        Self {
            baseline: baseline_identity(baseline),
            vcpu,
            table,
            bytes,
        }
    }
}

/// Which baseline a remembered clean verdict was reached against: its kernel build and when it
/// was taken.
pub(crate) fn baseline_identity(baseline: &crate::engine::CheckBaseline<'_>) -> String {
    format!(
        "{}@{}",
        baseline.baseline.build_id.as_deref().unwrap_or(""),
        baseline.baseline.created
    )
}

/// Per vCPU, the descriptor table of the last pass that found it clean. The same bytes under the
/// same GDTR/IDTR and baseline give the same (empty) result, so a watch compares a few KiB
/// instead of decoding and diffing every descriptor each second; any change of a byte, of the
/// register or of the baseline takes the full path again.
#[derive(Debug, Default)]
pub(crate) struct CleanTables(std::sync::Mutex<std::collections::HashMap<usize, SeenTable>>);

impl CleanTables {
    pub fn unchanged(&self, seen: &SeenTable) -> bool {
        self.0
            .lock()
            .map(|clean| clean.get(&seen.vcpu) == Some(seen))
            .unwrap_or(false)
    }

    pub fn record(&self, seen: SeenTable, clean: bool) {
        if let Ok(mut tables) = self.0.lock() {
            if clean {
                tables.insert(seen.vcpu, seen);
            } else {
                tables.remove(&seen.vcpu);
            }
        }
    }
}
