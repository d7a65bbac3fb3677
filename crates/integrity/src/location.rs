//! KASLR-relative addresses and owners of addresses.
//!
//! A baseline must survive a reboot of the same kernel build, whose image KASLR moves by a
//! multiple of 2 MiB and whose modules load elsewhere. So addresses are stored as where they
//! are *in* something: the offset from `_text` for the kernel image, the offset from a module's
//! base for module memory, and raw only for memory that does not move with either (the
//! cpu_entry_area, or memory nobody owns).

use std::fmt;

use kvmaccess_linux::{Kernel, SymbolTable};
use serde::{Deserialize, Serialize};

/// Largest distance from a symbol at which `symbol+offset` still names an address; past it the
/// address is described numerically (the last kallsyms symbol would otherwise claim everything
/// above it).
const MAX_SYMBOL_DISTANCE: u64 = 1 << 20;

/// A kernel address, stored relative to what contains it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Location {
    /// The null pointer.
    Null,
    /// Inside the kernel image (`_text`..`_end`).
    Kernel {
        /// Nearest symbol at or below, informational (names repeat; the image offset decides).
        symbol: Option<String>,
        /// Offset from that symbol.
        #[serde(with = "kvmaccess_core::hex")]
        symbol_offset: u64,
        /// Offset from `_text`: the same in every boot of one build.
        #[serde(with = "kvmaccess_core::hex")]
        image_offset: u64,
    },
    /// Inside a module's memory.
    Module {
        /// Module name.
        module: String,
        /// Offset from the module's base.
        #[serde(with = "kvmaccess_core::hex")]
        module_offset: u64,
        /// Nearest symbol, informational.
        symbol: Option<String>,
    },
    /// Anywhere else: stored as is (fixed areas such as the cpu_entry_area, or unowned memory).
    Absolute {
        /// The address.
        #[serde(with = "kvmaccess_core::hex")]
        address: u64,
    },
}

impl Location {
    /// Whether two locations denote the same place (symbol names are not compared: aliases and
    /// duplicate static names make them ambiguous; the offsets are exact).
    pub fn same_place(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::Null, Location::Null) => true,
            (
                Location::Kernel {
                    image_offset: a, ..
                },
                Location::Kernel {
                    image_offset: b, ..
                },
            ) => a == b,
            (
                Location::Module {
                    module: m1,
                    module_offset: o1,
                    ..
                },
                Location::Module {
                    module: m2,
                    module_offset: o2,
                    ..
                },
            ) => m1 == m2 && o1 == o2,
            (Location::Absolute { address: a }, Location::Absolute { address: b }) => a == b,
            _ => false,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Null => f.write_str("NULL"),
            Location::Kernel {
                symbol: Some(symbol),
                symbol_offset: 0,
                ..
            } => f.write_str(symbol),
            Location::Kernel {
                symbol: Some(symbol),
                symbol_offset,
                ..
            } => write!(f, "{symbol}+{symbol_offset:#x}"),
            Location::Kernel {
                symbol: None,
                image_offset,
                ..
            } => write!(f, "_text+{image_offset:#x}"),
            Location::Module {
                module,
                symbol: Some(symbol),
                ..
            } => write!(f, "{symbol} [{module}]"),
            Location::Module {
                module,
                module_offset,
                symbol: None,
            } => write!(f, "{module}+{module_offset:#x}"),
            Location::Absolute { address } => write!(f, "{address:#x}"),
        }
    }
}

/// One module's memory, for owners and module-relative locations.
///
/// Fill from the module list (`kvmaccess_linux::modules`: one span per module region, `text`
/// for its code regions) with [`Context::with_modules`](crate::Context::with_modules).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSpan {
    /// Module name.
    pub name: String,
    /// First address.
    #[serde(with = "kvmaccess_core::hex")]
    pub start: u64,
    /// First address past the span.
    #[serde(with = "kvmaccess_core::hex")]
    pub end: u64,
    /// Whether the span holds code.
    pub text: bool,
    /// The module's base (the address module-relative offsets count from): its core
    /// region's start.
    #[serde(with = "kvmaccess_core::hex")]
    pub base: u64,
    /// The module unlinked itself from the module list; only another view (sysfs) shows it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
}

impl ModuleSpan {
    /// One span per memory region of each module on the module list
    /// (`Kernel::modules`), module-relative offsets counting from the module's base.
    pub fn from_modules(modules: &[kvmaccess_linux::Module]) -> Vec<ModuleSpan> {
        modules
            .iter()
            .flat_map(|m| {
                m.regions.iter().map(|r| ModuleSpan {
                    name: m.name.clone(),
                    start: r.base,
                    end: r.base.saturating_add(r.size),
                    text: r.kind.is_text(),
                    base: m.base,
                    hidden: false,
                })
            })
            .collect()
    }
}

/// Who owns an address, as a finding reports it. Unlike [`kvmaccess_linux::Owner`], it knows
/// the modules a rootkit hid from the list (found through the other views, and marked so), and
/// it carries the `symbol+offset` text that findings print.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Owner {
    /// Kernel code (`_stext`..`_etext`).
    KernelText {
        /// `symbol+offset`.
        symbol: Option<String>,
    },
    /// The kernel image outside its code (data, rodata, bss).
    KernelImage {
        /// `symbol+offset`.
        symbol: Option<String>,
    },
    /// A module.
    Module {
        /// Module name.
        name: String,
        /// Whether the address is in the module's code.
        text: bool,
        /// `symbol+offset`, when the module's symbols are known.
        symbol: Option<String>,
        /// The module unlinked itself from the module list.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        hidden: bool,
    },
    /// The fixed per-CPU entry area (GDT, IDT and TSS aliases, entry stacks).
    CpuEntryArea,
    /// Nothing the monitor knows: not the kernel image, not a listed module.
    Unowned,
}

impl Owner {
    /// Whether the address is code of the kernel or of a known module.
    pub fn is_known_text(&self) -> bool {
        matches!(
            self,
            Owner::KernelText { .. } | Owner::Module { text: true, .. }
        )
    }

    /// Whether the address is kernel-image code.
    pub fn is_kernel_text(&self) -> bool {
        matches!(self, Owner::KernelText { .. })
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sym = |s: &Option<String>| s.as_ref().map(|s| format!(" ({s})")).unwrap_or_default();
        match self {
            Owner::KernelText { symbol } => write!(f, "kernel text{}", sym(symbol)),
            Owner::KernelImage { symbol } => write!(f, "kernel image data{}", sym(symbol)),
            Owner::Module {
                name,
                text,
                symbol,
                hidden,
            } => write!(
                f,
                "module {name}{} {}{}",
                if *hidden {
                    " (hidden from the module list)"
                } else {
                    ""
                },
                if *text { "text" } else { "data" },
                sym(symbol)
            ),
            Owner::CpuEntryArea => f.write_str("cpu_entry_area"),
            Owner::Unowned => f.write_str("unowned memory"),
        }
    }
}

/// Where the kernel image and modules are in this boot: the key to [`Location`]s and
/// [`Owner`]s.
#[derive(Clone, Debug)]
pub struct AddressMap<'s> {
    /// `_text` in this boot.
    pub text_base: u64,
    /// `_end`: first address past the image.
    pub image_end: u64,
    /// `_stext`.
    pub stext: u64,
    /// `_etext`.
    pub etext: u64,
    /// Module memory, sorted by start.
    pub modules: Vec<ModuleSpan>,
    symbols: &'s SymbolTable,
}

/// Start of the cpu_entry_area on x86-64 (4- and 5-level paging alike).
const CEA_START: u64 = crate::checks::CPU_ENTRY_AREA_BASE;
/// The cpu_entry_area spans one PGD/P4D slot of 512 GiB.
const CEA_END: u64 = CEA_START + (1 << 39);

impl<'s> AddressMap<'s> {
    /// The map of a discovered kernel (modules empty until [`AddressMap::set_modules`]).
    pub fn from_kernel(kernel: &'s Kernel<'_>) -> crate::Result<Self> {
        // Through the kernel's memo: a monitor builds a map every pass.
        Self::from_lookup(kernel.symbols(), |name| kernel.symbol(name).ok())
    }

    /// The map from a symbol table alone (`_text`, `_end`, `_stext`, `_etext` must be there).
    pub fn from_symbols(symbols: &'s SymbolTable) -> crate::Result<Self> {
        Self::from_lookup(symbols, |name| symbols.address_of(name))
    }

    fn from_lookup(
        symbols: &'s SymbolTable,
        address_of: impl Fn(&str) -> Option<u64>,
    ) -> crate::Result<Self> {
        let need = |name: &str| {
            address_of(name).ok_or_else(|| {
                crate::Error::Implausible(format!("the kernel symbol table has no {name}"))
            })
        };
        let text_base = need("_text")?;
        let image_end = need("_end")?;
        let stext = need("_stext")?;
        let etext = need("_etext")?;
        if !(text_base <= stext && stext < etext && etext <= image_end) {
            return Err(crate::Error::Implausible(format!(
                "kernel image bounds out of order: _text {text_base:#x}, _stext {stext:#x}, \
                 _etext {etext:#x}, _end {image_end:#x}"
            )));
        }
        Ok(Self {
            text_base,
            image_end,
            stext,
            etext,
            modules: Vec::new(),
            symbols,
        })
    }

    /// Replace the module spans (sorted here).
    pub fn set_modules(&mut self, mut modules: Vec<ModuleSpan>) {
        modules.sort_by_key(|m| m.start);
        self.modules = modules;
    }

    /// The symbol table this map describes addresses with.
    pub fn symbols(&self) -> &'s SymbolTable {
        self.symbols
    }

    /// The nearest symbol at or below `address` that lies in the same module (or in the
    /// kernel, outside every module): a symbol of the module loaded just below would name code it
    /// does not own, e.g. for a module whose own symbols are not in the table.
    fn nearest_symbol(&self, address: u64) -> Option<(&kvmaccess_linux::Symbol, u64)> {
        let (symbol, offset) = self.symbols.addr2sym(address)?;
        let region = |a: u64| self.module_at(a).map(|m| m.start);
        (offset < MAX_SYMBOL_DISTANCE && region(symbol.address) == region(address))
            .then_some((symbol, offset))
    }

    /// `symbol+0xoff` for an address near a symbol.
    pub fn describe(&self, address: u64) -> Option<String> {
        let (symbol, offset) = self.nearest_symbol(address)?;
        Some({
            if offset == 0 {
                symbol.name.clone()
            } else {
                format!("{}+{offset:#x}", symbol.name)
            }
        })
    }

    fn symbol_and_offset(&self, address: u64) -> Option<(String, u64)> {
        let (symbol, offset) = self.nearest_symbol(address)?;
        Some((symbol.name.clone(), offset))
    }

    /// The module span holding an address.
    pub fn module_at(&self, address: u64) -> Option<&ModuleSpan> {
        self.modules
            .iter()
            .find(|m| m.start <= address && address < m.end)
    }

    /// Whether an address is kernel-image code.
    pub fn in_kernel_text(&self, address: u64) -> bool {
        self.stext <= address && address < self.etext
    }

    /// Whether an address is inside the kernel image.
    pub fn in_image(&self, address: u64) -> bool {
        self.text_base <= address && address < self.image_end
    }

    /// Who owns an address.
    pub fn owner(&self, address: u64) -> Owner {
        if self.in_kernel_text(address) {
            return Owner::KernelText {
                symbol: self.describe(address),
            };
        }
        if self.in_image(address) {
            return Owner::KernelImage {
                symbol: self.describe(address),
            };
        }
        if let Some(module) = self.module_at(address) {
            let symbol = self
                .symbols
                .addr2sym(address)
                .filter(|(s, off)| {
                    s.module.as_deref() == Some(module.name.as_str()) && *off < MAX_SYMBOL_DISTANCE
                })
                .map(|(s, off)| format!("{}+{off:#x}", s.name));
            return Owner::Module {
                name: module.name.clone(),
                text: module.text,
                symbol,
                hidden: module.hidden,
            };
        }
        if (CEA_START..CEA_END).contains(&address) {
            return Owner::CpuEntryArea;
        }
        Owner::Unowned
    }

    /// The KASLR-independent form of an address.
    pub fn encode(&self, address: u64) -> Location {
        if address == 0 {
            return Location::Null;
        }
        if self.in_image(address) {
            let (symbol, symbol_offset) = match self.symbol_and_offset(address) {
                Some((name, off)) => (Some(name), off),
                None => (None, 0),
            };
            return Location::Kernel {
                symbol,
                symbol_offset,
                image_offset: address - self.text_base,
            };
        }
        if let Some(module) = self.module_at(address) {
            if let Some(module_offset) = address.checked_sub(module.base) {
                return Location::Module {
                    module: module.name.clone(),
                    module_offset,
                    symbol: self.describe(address),
                };
            }
        }
        Location::Absolute { address }
    }

    /// The address a location denotes in this boot; `None` for a module that is not loaded.
    pub fn decode(&self, location: &Location) -> Option<u64> {
        match location {
            Location::Null => Some(0),
            Location::Kernel { image_offset, .. } => self.text_base.checked_add(*image_offset),
            Location::Module {
                module,
                module_offset,
                ..
            } => self
                .modules
                .iter()
                .find(|m| &m.name == module)
                .and_then(|m| m.base.checked_add(*module_offset)),
            Location::Absolute { address } => Some(*address),
        }
    }
}
