//! The loaded modules as a long-running monitor sees them between passes.

use kvmaccess_linux::{Kernel, KernelTypes, Module, ModuleOffsets, SymbolTable};

use crate::error::Result;
use crate::location::ModuleSpan;

/// The module list, and the modules that unlinked themselves from it but that sysfs or the
/// module address tree still shows (those whose `struct module` could be read). Best effort
/// beyond the list: when another view cannot be read, no hidden module is given.
pub fn listed_and_hidden_modules(
    kernel: &Kernel<'_>,
    off: &ModuleOffsets,
) -> Result<(Vec<Module>, Vec<Module>)> {
    match crate::checks::modules::views(kernel, off) {
        Ok((listed, hidden)) => Ok((
            listed,
            hidden.into_iter().filter_map(|h| h.module).collect(),
        )),
        Err(_) => Ok((kernel.modules(off)?, Vec::new())),
    }
}

/// Address ranges of the listed modules and of the hidden ones, marked hidden: a hook into a
/// hidden module's code is then attributed to it instead of to "unowned memory".
pub fn module_spans(listed: &[Module], hidden: &[Module]) -> Vec<ModuleSpan> {
    let mut spans = ModuleSpan::from_modules(listed);
    spans.extend(
        ModuleSpan::from_modules(hidden)
            .into_iter()
            .map(|span| ModuleSpan {
                hidden: true,
                ..span
            }),
    );
    spans
}

/// The loaded modules as a long-running monitor sees them: their address ranges (owners and
/// module-relative locations) and their symbols merged into the kernel's symbol table, so that
/// findings name the module function a hook points to (`kvma_sct_getppid+0x0`), not only the
/// module.
///
/// The list is re-read every few passes, and at once when a pass raises an alarm with a list
/// that is stale or not settled (so a freshly loaded module's hooks are attributed to it):
/// reading it every second would cost more than the paper's four checks together. Symbols are
/// re-merged only when the set of loaded modules changed, from a copy of the kernel's own table
/// kept aside.
#[derive(Debug)]
pub struct ModuleTracker {
    kernel_only: SymbolTable,
    /// The modules whose symbols are merged: only a settled merge is remembered.
    loaded: Option<Vec<(String, u64, i64)>>,
    spans: Vec<ModuleSpan>,
    age: u32,
    /// Found in the kernel's types on the first refresh: they do not change while it runs.
    offsets: Option<ModuleOffsets>,
    settled: bool,
}

impl ModuleTracker {
    /// Passes between two reads of the module list when nothing asks for one sooner.
    pub const REFRESH_PASSES: u32 = 10;

    /// A tracker that has not read the list yet (the first [`Self::refresh_if_due`] does).
    pub fn new(kernel: &Kernel<'_>) -> Self {
        Self {
            kernel_only: kernel.symbols().clone(),
            loaded: None,
            spans: Vec::new(),
            age: u32::MAX,
            offsets: None,
            settled: false,
        }
    }

    /// A tracker using these offsets instead of deriving them from the kernel's types.
    pub fn with_offsets(kernel: &Kernel<'_>, offsets: ModuleOffsets) -> Self {
        Self {
            offsets: Some(offsets),
            ..Self::new(kernel)
        }
    }

    /// The address ranges of the modules at the last refresh, hidden ones included.
    pub fn spans(&self) -> &[ModuleSpan] {
        &self.spans
    }

    /// Whether every module's symbols were merged at the last refresh: none was still being
    /// loaded (unformed: its code is there but not yet its symbols) and none failed to read.
    /// A list that is not settled is not trusted as fresh: an alarm raised with it deserves
    /// another read, once the module has finished loading.
    pub fn settled(&self) -> bool {
        self.settled
    }

    /// Re-reads the module list now and merges the modules' symbols into `kernel`'s table if the
    /// list changed (or the last merge was not settled). An unreadable list leaves the previous
    /// spans and symbols alone.
    pub fn refresh(&mut self, kernel: &mut Kernel<'_>, types: Option<&KernelTypes>) {
        self.age = 0;
        self.settled = false;
        if self.offsets.is_none() {
            self.offsets = types.and_then(|t| ModuleOffsets::from_types(t).ok());
        }
        let Some(off) = self.offsets.clone() else {
            return;
        };
        let Ok((listed, hidden)) = listed_and_hidden_modules(kernel, &off) else {
            return;
        };
        self.spans = module_spans(&listed, &hidden);
        // A hidden module's symbols are merged too: a hook into it is named by its function.
        let modules = [listed, hidden].concat();
        let loaded: Vec<(String, u64, i64)> = modules
            .iter()
            .map(|m| (m.name.clone(), m.address, m.state))
            .collect();
        if self.loaded.as_ref() == Some(&loaded) {
            self.settled = true;
            return;
        }
        *kernel.symbols_mut() = self.kernel_only.clone();
        let merged = kernel.merge_module_symbols(&off, &modules);
        self.settled = merged.failed.is_empty() && !modules.iter().any(Module::is_unformed);
        self.loaded = self.settled.then_some(loaded);
    }

    /// Refreshes when the list is due; says whether it did.
    pub fn refresh_if_due(&mut self, kernel: &mut Kernel<'_>, types: Option<&KernelTypes>) -> bool {
        let due = self.age >= Self::REFRESH_PASSES;
        if due {
            self.refresh(kernel, types);
        }
        self.age = self.age.saturating_add(1);
        due
    }
}
