//! Who owns a kernel address: a section of the kernel image, a loaded module, or nobody.
//!
//! This answers the question every integrity finding asks about a code pointer (an IDT
//! handler, a system-call table entry, a jump target): code in the kernel image or in a module
//! on the module list is accounted for; code anywhere else is not.

use serde::Serialize;

use crate::modules::{Module, ModuleRegionKind};
use crate::{Kernel, SymbolTable};

/// The x86-64 `cpu_entry_area` (per-CPU IDT, GDT, TSS and entry stacks), the same in 4- and
/// 5-level paging (`Documentation/x86/x86_64/mm.rst`). Not a symbol, so a fixed fact here.
pub const CPU_ENTRY_AREA: (u64, u64) = (0xffff_fe00_0000_0000, 0xffff_fe80_0000_0000);

/// A part of the kernel image, bounded by linker symbols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelSection {
    /// Entry code (`__entry_text_start`..`__entry_text_end`): syscall and exception entry.
    EntryText,
    /// Kernel code (`_stext`..`_etext`).
    Text,
    /// Init code (`_sinittext`..`_einittext`), freed after boot.
    InitText,
    /// Read-only data (`__start_rodata`..`__end_rodata`).
    Rodata,
    /// Data (`_sdata`..`_edata`).
    Data,
    /// Zero-initialised data (`__bss_start`..`__bss_stop`).
    Bss,
    /// Elsewhere in the image (`_text`..`_end`): init data, per-CPU template, ...
    Image,
    /// The `cpu_entry_area` (see [`CPU_ENTRY_AREA`]).
    CpuEntryArea,
}

impl KernelSection {
    /// Whether the section holds code.
    pub fn is_text(self) -> bool {
        matches!(self, Self::EntryText | Self::Text | Self::InitText)
    }

    /// Short name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EntryText => "entry-text",
            Self::Text => "text",
            Self::InitText => "init-text",
            Self::Rodata => "rodata",
            Self::Data => "data",
            Self::Bss => "bss",
            Self::Image => "image",
            Self::CpuEntryArea => "cpu-entry-area",
        }
    }
}

/// The owner of an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Owner {
    /// The kernel image (or the cpu_entry_area).
    Kernel {
        /// Which part.
        section: KernelSection,
        /// The nearest kernel symbol at or below the address, and the offset from it.
        symbol: Option<(String, u64)>,
    },
    /// A module on the module list.
    Module {
        /// Its name.
        name: String,
        /// Which of its regions.
        region: ModuleRegionKind,
        /// The nearest symbol of that module at or below the address, and the offset.
        symbol: Option<(String, u64)>,
    },
    /// Neither the kernel image nor a listed module.
    Unowned,
}

impl Owner {
    /// Whether the address is in code of the kernel or of a listed module.
    pub fn is_known_text(&self) -> bool {
        match self {
            Self::Kernel { section, .. } => section.is_text(),
            Self::Module { region, .. } => region.is_text(),
            Self::Unowned => false,
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sym = |s: &Option<(String, u64)>| match s {
            Some((name, 0)) => format!(" {name}"),
            Some((name, off)) => format!(" {name}+{off:#x}"),
            None => String::new(),
        };
        match self {
            Self::Kernel { section, symbol } => {
                write!(f, "kernel {}{}", section.as_str(), sym(symbol))
            }
            Self::Module {
                name,
                region,
                symbol,
            } => write!(f, "module {name} {}{}", region.as_str(), sym(symbol)),
            Self::Unowned => f.write_str("unowned"),
        }
    }
}

/// Address ranges of the kernel image and of modules, for [`Owners::owner`].
#[derive(Clone, Debug)]
pub struct Owners<'s> {
    symbols: &'s SymbolTable,
    /// Checked in order: narrower sections first.
    kernel: Vec<(u64, u64, KernelSection)>,
    /// (start, end, module name, region kind).
    modules: Vec<(u64, u64, String, ModuleRegionKind)>,
}

/// Linker-symbol pairs bounding each section, in the order they are checked.
const SECTIONS: [(&str, &str, KernelSection); 7] = [
    (
        "__entry_text_start",
        "__entry_text_end",
        KernelSection::EntryText,
    ),
    ("_stext", "_etext", KernelSection::Text),
    ("_sinittext", "_einittext", KernelSection::InitText),
    ("__start_rodata", "__end_rodata", KernelSection::Rodata),
    ("_sdata", "_edata", KernelSection::Data),
    ("__bss_start", "__bss_stop", KernelSection::Bss),
    ("_text", "_end", KernelSection::Image),
];

impl<'s> Owners<'s> {
    /// Ranges from the kernel's linker symbols in `symbols` and from `modules`' regions.
    /// Sections whose bounding symbols are missing or reversed are left out.
    pub fn new(symbols: &'s SymbolTable, modules: &[Module]) -> Self {
        let kernel_symbol = |name: &str| {
            symbols
                .lookup_all(name)
                .find(|s| s.module.is_none())
                .map(|s| s.address)
        };
        let mut kernel: Vec<(u64, u64, KernelSection)> = SECTIONS
            .iter()
            .filter_map(|&(start, end, section)| {
                let (s, e) = (kernel_symbol(start)?, kernel_symbol(end)?);
                (s < e).then_some((s, e, section))
            })
            .collect();
        kernel.push((
            CPU_ENTRY_AREA.0,
            CPU_ENTRY_AREA.1,
            KernelSection::CpuEntryArea,
        ));
        let modules = modules
            .iter()
            .filter(|m| !m.is_unformed())
            .flat_map(|m| {
                m.regions.iter().filter_map(move |r| {
                    let end = r.base.checked_add(r.size)?;
                    Some((r.base, end, m.name.clone(), r.kind))
                })
            })
            .collect();
        Self {
            symbols,
            kernel,
            modules,
        }
    }

    /// Who owns `address`.
    pub fn owner(&self, address: u64) -> Owner {
        if let Some(&(_, _, section)) = self
            .kernel
            .iter()
            .find(|(s, e, _)| (*s..*e).contains(&address))
        {
            let symbol = if section == KernelSection::CpuEntryArea {
                None
            } else {
                self.nearest(address, None)
            };
            return Owner::Kernel { section, symbol };
        }
        if let Some((_, _, name, region)) = self
            .modules
            .iter()
            .find(|(s, e, _, _)| (*s..*e).contains(&address))
        {
            return Owner::Module {
                name: name.clone(),
                region: *region,
                symbol: self.nearest(address, Some(name)),
            };
        }
        Owner::Unowned
    }

    /// The nearest symbol at or below `address` when it belongs to the same owner.
    fn nearest(&self, address: u64, module: Option<&str>) -> Option<(String, u64)> {
        let (symbol, offset) = self.symbols.addr2sym(address)?;
        (symbol.module.as_deref() == module).then(|| (symbol.name.clone(), offset))
    }
}

impl Kernel<'_> {
    /// Owner lookup over this kernel's symbols (merge module symbols first to get module
    /// symbol names) and the given modules.
    pub fn owners(&self, modules: &[Module]) -> Owners<'_> {
        Owners::new(self.symbols(), modules)
    }
}
