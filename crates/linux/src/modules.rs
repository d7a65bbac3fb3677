//! Loaded kernel modules and their symbols, read from kernel memory with offsets from BTF.
//!
//! Two views of the loaded modules exist: the `modules` list ([`Kernel::modules`]) and the
//! sysfs kobjects under `module_kset` ([`Kernel::modules_from_kset`]). A module that unlinks
//! itself from the list to hide from `lsmod` usually stays in the other, so both are here.
//!
//! Each module's own symbol table (`module->kallsyms`: ELF symbols, a string table and the
//! `nm` type letters) is decoded by [`Kernel::module_symbols`] and can be merged into the kernel
//! symbol table ([`Kernel::merge_module_symbols`]) so that addresses inside modules resolve to
//! `name+off [module]`, as `/proc/kallsyms` shows them.

use std::sync::Arc;

use kvmaccess_core::Gva;
use serde::Serialize;

use crate::tasks::{add, c_string, container, le_at, member_size, read_named, read_ptr, walk_list};
use crate::{Error, Kernel, KernelTypes, Result, Symbol};

/// Most modules on a list: the kernel has no fixed limit, but a few thousand is the most seen.
pub const MAX_MODULES: usize = 65_536;

/// Most symbols accepted in one module's symbol table.
pub const MAX_MODULE_SYMBOLS: u64 = 1_000_000;

/// Most bytes of one module's string table that are read.
pub const MAX_MODULE_STRTAB: u64 = 16 << 20;

/// Longest symbol name (`KSYM_NAME_LEN` of 6.1, with its NUL).
const KSYM_NAME_LEN: usize = 512;

/// Largest `struct module` read in one piece (6.1: 896 bytes).
const MAX_MODULE_STRUCT: u64 = 64 * 1024;

/// Symbols read per chunk of a module's `symtab`.
const SYMTAB_CHUNK: u64 = 4096;

/// Longest kobject name read (module names are at most 55 bytes; built-in "modules" in sysfs
/// are named after their parameter prefix).
const MAX_KOBJECT_NAME: usize = 256;

/// Kind of a module memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleRegionKind {
    /// Core code.
    Text,
    /// Core read-only data.
    Rodata,
    /// Data made read-only after init.
    RoAfterInit,
    /// Core writable data (includes the module's symbol tables).
    Data,
    /// Init code (freed once the module is live).
    InitText,
    /// Init read-only data.
    InitRodata,
    /// Init writable data.
    InitData,
    /// A region whose kind this kernel's layout did not tell.
    Other,
}

impl ModuleRegionKind {
    /// Whether the region holds code.
    pub fn is_text(self) -> bool {
        matches!(self, Self::Text | Self::InitText)
    }

    /// Short name (`text`, `rodata`, `init-text`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Rodata => "rodata",
            Self::RoAfterInit => "ro-after-init",
            Self::Data => "data",
            Self::InitText => "init-text",
            Self::InitRodata => "init-rodata",
            Self::InitData => "init-data",
            Self::Other => "other",
        }
    }

    /// The kind of a 6.4+ `enum mod_mem_type` enumerator.
    fn from_mem_type(name: &str) -> Self {
        match name {
            "MOD_TEXT" => Self::Text,
            "MOD_DATA" => Self::Data,
            "MOD_RODATA" => Self::Rodata,
            "MOD_RO_AFTER_INIT" => Self::RoAfterInit,
            "MOD_INIT_TEXT" => Self::InitText,
            "MOD_INIT_DATA" => Self::InitData,
            "MOD_INIT_RODATA" => Self::InitRodata,
            _ => Self::Other,
        }
    }
}

impl std::fmt::Display for ModuleRegionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One memory region of a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ModuleRegion {
    /// What it holds.
    pub kind: ModuleRegionKind,
    /// First address.
    #[serde(serialize_with = "kvmaccess_core::hex::serialize")]
    pub base: u64,
    /// Bytes.
    pub size: u64,
}

impl ModuleRegion {
    /// Whether `address` is inside (an end past 2^64 is clamped).
    pub fn contains(&self, address: u64) -> bool {
        address >= self.base && address - self.base < self.size
    }
}

/// How this kernel describes a module's memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ModuleLayoutOffsets {
    /// Before 6.4: `core_layout` and `init_layout`, each a `struct module_layout` whose
    /// `[base, base+size)` is text, then read-only data up to `ro_size`, then ro-after-init data
    /// up to `ro_after_init_size`, then writable data.
    Layouts {
        /// `module.core_layout`.
        core: u64,
        /// `module.init_layout`.
        init: u64,
        /// `module_layout.base`.
        base: u64,
        /// `module_layout.size`.
        size: u64,
        /// Bytes of `module_layout.size`.
        size_bytes: u64,
        /// `module_layout.text_size`.
        text_size: u64,
        /// `module_layout.ro_size`.
        ro_size: u64,
        /// `module_layout.ro_after_init_size` (4.8+).
        ro_after_init_size: Option<u64>,
    },
    /// 6.4+: `module.mem[]`, an array of `struct module_memory` indexed by `enum mod_mem_type`.
    Memory {
        /// `module.mem`.
        mem: u64,
        /// `sizeof(struct module_memory)`.
        stride: u64,
        /// `module_memory.base`.
        base: u64,
        /// `module_memory.size`.
        size: u64,
        /// Bytes of `module_memory.size`.
        size_bytes: u64,
        /// Kind of each element, by index.
        kinds: Vec<ModuleRegionKind>,
    },
}

/// Where the module fields live in this kernel, resolved once from BTF by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModuleOffsets {
    /// `sizeof(struct module)`.
    pub module_size: u64,
    /// `list_head.next`.
    pub list_next: u64,
    /// `module.list`.
    pub list: u64,
    /// `module.name`.
    pub name: u64,
    /// Bytes of `module.name` (MODULE_NAME_LEN).
    pub name_len: u64,
    /// `module.state`.
    pub state: u64,
    /// Bytes of `module.state`.
    pub state_size: u64,
    /// Enumerators of `enum module_state`.
    pub state_names: Vec<(i64, String)>,
    /// Memory layout.
    pub layout: ModuleLayoutOffsets,
    /// `module.taints`.
    pub taints: Option<u64>,
    /// `module.refcnt` (`atomic_t`, CONFIG_MODULE_UNLOAD).
    pub refcnt: Option<u64>,
    /// `module.kallsyms` (`struct mod_kallsyms *`).
    pub kallsyms: Option<u64>,
    /// `mod_kallsyms.symtab`.
    pub ks_symtab: u64,
    /// `mod_kallsyms.num_symtab`.
    pub ks_num_symtab: u64,
    /// `mod_kallsyms.strtab`.
    pub ks_strtab: u64,
    /// `mod_kallsyms.typetab` (5.2+).
    pub ks_typetab: Option<u64>,
    /// `sizeof(Elf64_Sym)`.
    pub sym_size: u64,
    /// `Elf64_Sym.st_name`.
    pub st_name: u64,
    /// `Elf64_Sym.st_value`.
    pub st_value: u64,
    /// `module.mkobj` (`struct module_kobject`).
    pub mkobj: u64,
    /// `module_kobject.kobj`.
    pub mk_kobj: u64,
    /// `module_kobject.mod`.
    pub mk_mod: u64,
    /// `kset.list`.
    pub kset_list: u64,
    /// `kobject.entry`.
    pub kobj_entry: u64,
    /// `kobject.name`.
    pub kobj_name: u64,
    /// The module address tree, when the kernel keeps one (CONFIG_MODULES_TREE_LOOKUP).
    pub tree: Option<ModTreeOffsets>,
}

/// Where the module address tree (`mod_tree`) keeps its nodes. The kernel looks an address
/// up in it to find its module (exception tables, stack traces, kallsyms), so a module that
/// unlinked itself from the list and from sysfs usually stays in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModTreeOffsets {
    /// The first of the latch tree's two copies (`mod_tree_root.root.tree[0]`, an `rb_root`)
    /// from the start of `mod_tree`.
    pub root: u64,
    /// `rb_node.rb_left`.
    pub rb_left: u64,
    /// `rb_node.rb_right`.
    pub rb_right: u64,
    /// `mod_tree_node.mod`.
    pub node_mod: u64,
    /// The `rb_node` of copy 0 in a `mod_tree_node` (`mod_tree_node.node.node[0]`).
    pub node_rb: u64,
}

impl ModTreeOffsets {
    fn from_types(types: &KernelTypes) -> Result<Self> {
        Ok(Self {
            root: types.offset_of("mod_tree_root", "root.tree")?
                + types.offset_of("rb_root", "rb_node")?,
            rb_left: types.offset_of("rb_node", "rb_left")?,
            rb_right: types.offset_of("rb_node", "rb_right")?,
            node_mod: types.offset_of("mod_tree_node", "mod")?,
            node_rb: types.offset_of("mod_tree_node", "node.node")?,
        })
    }
}

impl ModuleOffsets {
    /// Resolve every offset from the kernel's BTF, detecting the memory layout this kernel uses.
    pub fn from_types(types: &KernelTypes) -> Result<Self> {
        let m = |path: &str| types.offset_of("module", path);
        let btf = &types.btf;
        let state_names = btf
            .find_enum("module_state")
            .and_then(|id| btf.enumerators(id).ok())
            .map(|e| {
                e.filter_map(|v| Some((i64::try_from(v.value).ok()?, v.name.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let layout = if let Ok(core) = m("core_layout") {
            let l = |path: &str| types.offset_of("module_layout", path);
            ModuleLayoutOffsets::Layouts {
                core,
                init: m("init_layout")?,
                base: l("base")?,
                size: l("size")?,
                size_bytes: member_size(types, "module_layout", "size")?,
                text_size: l("text_size")?,
                ro_size: l("ro_size")?,
                ro_after_init_size: l("ro_after_init_size").ok(),
            }
        } else {
            let mem = m("mem")?;
            let kinds = btf
                .find_enum("mod_mem_type")
                .and_then(|id| btf.enumerators(id).ok())
                .map(|e| {
                    let mut kinds = Vec::new();
                    for v in e {
                        let Ok(i) = usize::try_from(v.value) else {
                            continue;
                        };
                        if i < 64 {
                            if kinds.len() <= i {
                                kinds.resize(i + 1, ModuleRegionKind::Other);
                            }
                            if let Some(k) = kinds.get_mut(i) {
                                *k = ModuleRegionKind::from_mem_type(v.name);
                            }
                        }
                    }
                    kinds
                })
                .unwrap_or_default();
            let count = crate::tasks::array_len(types, "module", "mem")?;
            let mut kinds = kinds;
            kinds.resize(
                usize::try_from(count).unwrap_or(0).min(64),
                ModuleRegionKind::Other,
            );
            ModuleLayoutOffsets::Memory {
                mem,
                stride: types.size_of("module_memory")?,
                base: types.offset_of("module_memory", "base")?,
                size: types.offset_of("module_memory", "size")?,
                size_bytes: member_size(types, "module_memory", "size")?,
                kinds,
            }
        };
        let sym_type = if btf.find_composite("elf64_sym").is_some() {
            "elf64_sym"
        } else {
            "Elf64_Sym"
        };
        Ok(Self {
            module_size: types.size_of("module")?,
            list_next: types.offset_of("list_head", "next")?,
            list: m("list")?,
            name: m("name")?,
            name_len: member_size(types, "module", "name")?,
            state: m("state")?,
            state_size: member_size(types, "module", "state")?,
            state_names,
            layout,
            taints: m("taints").ok(),
            refcnt: m("refcnt").ok(),
            kallsyms: m("kallsyms").ok(),
            ks_symtab: types.offset_of("mod_kallsyms", "symtab")?,
            ks_num_symtab: types.offset_of("mod_kallsyms", "num_symtab")?,
            ks_strtab: types.offset_of("mod_kallsyms", "strtab")?,
            ks_typetab: types.offset_of("mod_kallsyms", "typetab").ok(),
            sym_size: types.size_of(sym_type)?,
            st_name: types.offset_of(sym_type, "st_name")?,
            st_value: types.offset_of(sym_type, "st_value")?,
            mkobj: m("mkobj")?,
            mk_kobj: types.offset_of("module_kobject", "kobj")?,
            mk_mod: types.offset_of("module_kobject", "mod")?,
            kset_list: types.offset_of("kset", "list")?,
            kobj_entry: types.offset_of("kobject", "entry")?,
            kobj_name: types.offset_of("kobject", "name")?,
            tree: ModTreeOffsets::from_types(types).ok(),
        })
    }
}

/// Taint flags of 6.1 (`TAINT_*` in `include/linux/panic.h`, letters from `kernel/panic.c`),
/// by bit number: (letter, whether `/proc/modules` shows it for a module).
pub const TAINT_FLAGS: [(char, bool); 19] = [
    ('P', true),  // 0 PROPRIETARY_MODULE
    ('F', true),  // 1 FORCED_MODULE
    ('S', false), // 2 CPU_OUT_OF_SPEC
    ('R', false), // 3 FORCED_RMMOD
    ('M', false), // 4 MACHINE_CHECK
    ('B', false), // 5 BAD_PAGE
    ('U', false), // 6 USER
    ('D', false), // 7 DIE
    ('A', false), // 8 OVERRIDDEN_ACPI_TABLE
    ('W', false), // 9 WARN
    ('C', true),  // 10 CRAP (staging)
    ('I', false), // 11 FIRMWARE_WORKAROUND
    ('O', true),  // 12 OOT_MODULE
    ('E', true),  // 13 UNSIGNED_MODULE
    ('L', false), // 14 SOFTLOCKUP
    ('K', true),  // 15 LIVEPATCH
    ('X', true),  // 16 AUX
    ('T', true),  // 17 RANDSTRUCT
    ('N', true),  // 18 TEST
];

/// The letters `/proc/modules` prints for a module's taint mask, in bit order (`OE` for an
/// unsigned out-of-tree module). Bits beyond the known table are ignored.
pub fn module_taint_letters(taints: u64) -> String {
    TAINT_FLAGS
        .iter()
        .enumerate()
        .filter(|(bit, (_, module))| *module && taints & (1u64 << bit) != 0)
        .map(|(_, (c, _))| *c)
        .collect()
}

/// One loaded module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Module {
    /// Address of its `struct module`.
    #[serde(serialize_with = "kvmaccess_core::hex::serialize")]
    pub address: u64,
    /// Name.
    pub name: String,
    /// Raw `module.state`.
    pub state: i64,
    /// Enumerator name of the state (`MODULE_STATE_LIVE`), from BTF.
    pub state_name: String,
    /// Memory regions (empty ones left out).
    pub regions: Vec<ModuleRegion>,
    /// Total bytes of all layouts: what `/proc/modules` prints as the size.
    pub size: u64,
    /// Base of the core (text) allocation: the address `/proc/modules` prints.
    #[serde(serialize_with = "kvmaccess_core::hex::serialize")]
    pub base: u64,
    /// Taint mask (`TAINT_*` bits; see [`TAINT_FLAGS`]).
    pub taints: u64,
    /// Users of the module as `/proc/modules` counts them (`refcnt` minus its base of 1).
    pub refcount: Option<i64>,
    /// `module.kallsyms`.
    #[serde(serialize_with = "kvmaccess_core::hex::option::serialize")]
    pub kallsyms: Option<u64>,
}

impl Module {
    /// Taint letters as `/proc/modules` shows them (without the parentheses).
    pub fn taint_letters(&self) -> String {
        module_taint_letters(self.taints)
    }

    /// The state as `/proc/modules` names it: `Live`, `Loading`, `Unloading`; `Unformed` for a
    /// module still being set up (which `/proc/modules` leaves out).
    pub fn proc_state(&self) -> &str {
        match self.state_name.as_str() {
            "MODULE_STATE_LIVE" => "Live",
            "MODULE_STATE_COMING" => "Loading",
            "MODULE_STATE_GOING" => "Unloading",
            "MODULE_STATE_UNFORMED" => "Unformed",
            other => other,
        }
    }

    /// Whether the module is still being set up (its symbols are not yet valid).
    pub fn is_unformed(&self) -> bool {
        self.state_name == "MODULE_STATE_UNFORMED"
    }

    /// The region holding `address`.
    pub fn region_of(&self, address: u64) -> Option<&ModuleRegion> {
        self.regions.iter().find(|r| r.contains(address))
    }
}

/// One kobject on `module_kset`: a loaded module, or a built-in one that has parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModuleKobject {
    /// Address of the kobject (`module_kobject.kobj`).
    #[serde(serialize_with = "kvmaccess_core::hex::serialize")]
    pub kobject: u64,
    /// The kobject's name (the module name).
    pub name: String,
    /// `module_kobject.mod`: the `struct module` of a loadable module, `None` for built-in ones.
    #[serde(serialize_with = "kvmaccess_core::hex::option::serialize")]
    pub module: Option<u64>,
}

/// A kobject on `module_kset`, before its name is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KsetEntry {
    /// Address of the kobject (`module_kobject.kobj`).
    pub kobject: u64,
    /// `module_kobject.mod`: the `struct module` of a loadable module, `None` for built-in ones.
    pub module: Option<u64>,
}

/// The result of merging module symbols into the kernel's table.
#[derive(Debug, Default)]
pub struct ModuleSymbolsMerged {
    /// Symbols added.
    pub merged: usize,
    /// Modules whose symbols could not be read, and why.
    pub failed: Vec<(String, Error)>,
}

/// Split a pre-6.4 `module_layout` into its regions.
fn split_layout(
    init: bool,
    base: u64,
    size: u64,
    text: u64,
    ro: u64,
    ro_after_init: u64,
) -> Vec<ModuleRegion> {
    let kinds = if init {
        [
            ModuleRegionKind::InitText,
            ModuleRegionKind::InitRodata,
            ModuleRegionKind::InitRodata,
            ModuleRegionKind::InitData,
        ]
    } else {
        [
            ModuleRegionKind::Text,
            ModuleRegionKind::Rodata,
            ModuleRegionKind::RoAfterInit,
            ModuleRegionKind::Data,
        ]
    };
    let bounds = [0, text, ro, ro_after_init, size];
    if base == 0 || size == 0 {
        return Vec::new();
    }
    if !bounds.windows(2).all(|w| w[0] <= w[1]) {
        // Sizes out of order: a corrupt layout. Keep the extent, not the split.
        return vec![ModuleRegion {
            kind: ModuleRegionKind::Other,
            base,
            size,
        }];
    }
    kinds
        .iter()
        .zip(bounds.windows(2))
        .filter(|(_, w)| w[1] > w[0])
        .filter_map(|(&kind, w)| {
            Some(ModuleRegion {
                kind,
                base: base.checked_add(w[0])?,
                size: w[1] - w[0],
            })
        })
        .collect()
}

impl Kernel<'_> {
    /// Read the `struct module` at `address`.
    pub fn module_at(&self, off: &ModuleOffsets, address: u64) -> Result<Module> {
        let len = off.module_size.min(MAX_MODULE_STRUCT);
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        read_named(self, address, &mut buf, || {
            format!("struct module at {address:#x}")
        })?;
        let u = |o: u64, size: u64| le_at(&buf, o, size);
        let name = (|| {
            let from = usize::try_from(off.name).ok()?;
            buf.get(from..from.checked_add(usize::try_from(off.name_len).ok()?)?)
        })()
        .map(c_string)
        .unwrap_or_default();
        let state_raw = u(off.state, off.state_size).unwrap_or(u64::MAX);
        // Enums are 4 bytes: sign-extend so a hostile -1 prints as -1.
        let state = i64::from(i32::from_le_bytes(
            u32::try_from(state_raw & 0xffff_ffff)
                .unwrap_or(0)
                .to_le_bytes(),
        ));
        let state_name = off
            .state_names
            .iter()
            .find(|(v, _)| *v == state)
            .map_or_else(|| format!("unknown({state})"), |(_, n)| n.clone());
        let mut regions = Vec::new();
        let mut size = 0u64;
        let mut base = 0u64;
        match &off.layout {
            ModuleLayoutOffsets::Layouts {
                core,
                init,
                base: b,
                size: s,
                size_bytes,
                text_size,
                ro_size,
                ro_after_init_size,
            } => {
                for (is_init, layout) in [(false, *core), (true, *init)] {
                    let at = |field: u64, bytes: u64| {
                        layout.checked_add(field).and_then(|o| u(o, bytes))
                    };
                    let lbase = at(*b, 8).unwrap_or(0);
                    let lsize = at(*s, *size_bytes).unwrap_or(0);
                    let text = at(*text_size, 4).unwrap_or(0);
                    let ro = at(*ro_size, 4).unwrap_or(0);
                    let roai = ro_after_init_size.and_then(|o| at(o, 4)).unwrap_or(ro);
                    size = size.saturating_add(lsize);
                    if !is_init {
                        base = lbase;
                    }
                    regions.extend(split_layout(is_init, lbase, lsize, text, ro, roai));
                }
            }
            ModuleLayoutOffsets::Memory {
                mem,
                stride,
                base: b,
                size: s,
                size_bytes,
                kinds,
            } => {
                for (i, &kind) in kinds.iter().enumerate() {
                    let Some(elem) = u64::try_from(i)
                        .ok()
                        .and_then(|i| i.checked_mul(*stride))
                        .and_then(|o| o.checked_add(*mem))
                    else {
                        continue;
                    };
                    let at =
                        |field: u64, bytes: u64| elem.checked_add(field).and_then(|o| u(o, bytes));
                    let rbase = at(*b, 8).unwrap_or(0);
                    let rsize = at(*s, *size_bytes).unwrap_or(0);
                    size = size.saturating_add(rsize);
                    if kind == ModuleRegionKind::Text {
                        base = rbase;
                    }
                    if rbase != 0 && rsize != 0 {
                        regions.push(ModuleRegion {
                            kind,
                            base: rbase,
                            size: rsize,
                        });
                    }
                }
            }
        }
        let refcount = off
            .refcnt
            .and_then(|o| u(o, 4))
            .and_then(|v| u32::try_from(v).ok())
            .map(|v| i64::from(i32::from_le_bytes(v.to_le_bytes())) - 1);
        Ok(Module {
            address,
            name,
            state,
            state_name,
            regions,
            size,
            base,
            taints: off.taints.and_then(|o| u(o, 8)).unwrap_or(0),
            refcount,
            kallsyms: off.kallsyms.and_then(|o| u(o, 8)).filter(|&p| p != 0),
        })
    }

    /// Modules on the `modules` list, in list order (most recently loaded first).
    pub fn modules(&self, off: &ModuleOffsets) -> Result<Vec<Module>> {
        let head = self.symbol("modules")?;
        let nodes = walk_list("modules", head, MAX_MODULES, |n| {
            read_ptr(self, add(n, off.list_next, "list_head")?, || {
                format!("modules list entry {n:#x}")
            })
        })?;
        nodes
            .into_iter()
            .map(|n| self.module_at(off, container(n, off.list, "module.list")?))
            .collect()
    }

    /// Kobjects on `module_kset` (sysfs `/sys/module`): every loadable module plus built-in
    /// modules with parameters (whose `module` is `None`).
    pub fn modules_from_kset(&self, off: &ModuleOffsets) -> Result<Vec<ModuleKobject>> {
        self.module_kset_entries(off)?
            .into_iter()
            .map(|e| {
                Ok(ModuleKobject {
                    kobject: e.kobject,
                    name: self.kobject_name(off, e.kobject)?,
                    module: e.module,
                })
            })
            .collect()
    }

    /// [`Kernel::modules_from_kset`] without the names. The kset holds a kobject for every
    /// built-in module with parameters too (a hundred or more), and a monitor comparing views
    /// every pass needs the names only of the few that the module list lacks.
    pub fn module_kset_entries(&self, off: &ModuleOffsets) -> Result<Vec<KsetEntry>> {
        let kset = read_ptr(self, self.symbol("module_kset")?, || "module_kset".into())?;
        if kset == 0 {
            return Ok(Vec::new());
        }
        let head = add(kset, off.kset_list, "kset.list")?;
        let nodes = walk_list("module_kset->list", head, MAX_MODULES, |n| {
            read_ptr(self, add(n, off.list_next, "list_head")?, || {
                format!("module_kset list entry {n:#x}")
            })
        })?;
        nodes
            .into_iter()
            .map(|node| {
                let kobject = container(node, off.kobj_entry, "kobject.entry")?;
                let mk = container(kobject, off.mk_kobj, "module_kobject.kobj")?;
                let module = read_ptr(self, add(mk, off.mk_mod, "module_kobject.mod")?, || {
                    format!("module_kobject at {mk:#x}")
                })?;
                Ok(KsetEntry {
                    kobject,
                    module: (module != 0).then_some(module),
                })
            })
            .collect()
    }

    /// The name of a kobject on `module_kset` (empty when it has none).
    pub fn kobject_name(&self, off: &ModuleOffsets, kobject: u64) -> Result<String> {
        let name_ptr = read_ptr(self, add(kobject, off.kobj_name, "kobject.name")?, || {
            format!("kobject at {kobject:#x}")
        })?;
        if name_ptr == 0 {
            return Ok(String::new());
        }
        read_c_string(self, name_ptr, MAX_KOBJECT_NAME)
    }

    /// The `struct module`s in the module address tree (`mod_tree`), deduplicated (a module
    /// has a node per memory region it registered), in address order. Empty when the kernel
    /// keeps no tree (no offsets for it, or no `mod_tree` symbol).
    ///
    /// The tree is guest memory like any other: a walk that meets a node twice (a cycle, or
    /// two parents) fails with [`Error::ListCycle`], and one with more nodes than
    /// [`MAX_MODULES`] modules could register fails with [`Error::ListTooLong`].
    pub fn modules_from_tree(&self, off: &ModuleOffsets) -> Result<Vec<u64>> {
        /// Regions a module registers in the tree (6.4+: one per `mod_mem_type`).
        const NODES_PER_MODULE: usize = 8;
        let Some(t) = &off.tree else {
            return Ok(Vec::new());
        };
        let Ok(tree) = self.symbol("mod_tree") else {
            return Ok(Vec::new());
        };
        let root = add(tree, t.root, "mod_tree root")?;
        let first = read_ptr(self, root, || "mod_tree root".into())?;
        let limit = MAX_MODULES.saturating_mul(NODES_PER_MODULE);
        let mut seen = std::collections::HashSet::new();
        let mut modules = Vec::new();
        let mut listed = std::collections::HashSet::new();
        // In-order walk with an explicit stack: the tree's depth is the guest's to choose.
        let mut stack: Vec<u64> = Vec::new();
        let mut at = first;
        loop {
            while at != 0 {
                if !seen.insert(at) {
                    return Err(Error::ListCycle {
                        list: "mod_tree".into(),
                        head: root,
                        at,
                        walked: seen.len(),
                    });
                }
                if seen.len() > limit {
                    return Err(Error::ListTooLong {
                        list: "mod_tree".into(),
                        head: root,
                        limit,
                    });
                }
                stack.push(at);
                at = read_ptr(self, add(at, t.rb_left, "rb_node.rb_left")?, || {
                    format!("mod_tree node {at:#x}")
                })?;
            }
            let Some(node) = stack.pop() else {
                break;
            };
            let mtn = container(node, t.node_rb, "mod_tree_node.node")?;
            let module = read_ptr(self, add(mtn, t.node_mod, "mod_tree_node.mod")?, || {
                format!("mod_tree node {node:#x}")
            })?;
            if module != 0 && listed.insert(module) {
                modules.push(module);
            }
            at = read_ptr(self, add(node, t.rb_right, "rb_node.rb_right")?, || {
                format!("mod_tree node {node:#x}")
            })?;
        }
        Ok(modules)
    }

    /// The symbols of one module, as `/proc/kallsyms` lists them: entries with an empty name
    /// are left out, names are cut at `KSYM_NAME_LEN`, types come from the module's `typetab`.
    pub fn module_symbols(&self, off: &ModuleOffsets, module: &Module) -> Result<Vec<Symbol>> {
        let fail = |reason: String| Error::ModuleSymbols {
            module: module.name.clone(),
            reason,
        };
        let Some(ks) = module.kallsyms else {
            return Ok(Vec::new());
        };
        let field = |o: u64| -> Result<u64> {
            read_ptr(self, add(ks, o, "mod_kallsyms")?, || {
                format!("mod_kallsyms of {} at {ks:#x}", module.name)
            })
        };
        let symtab = field(off.ks_symtab)?;
        let num = field(off.ks_num_symtab)? & 0xffff_ffff;
        let strtab = field(off.ks_strtab)?;
        let typetab = off.ks_typetab.map(field).transpose()?.filter(|&p| p != 0);
        if num > MAX_MODULE_SYMBOLS {
            return Err(fail(format!(
                "num_symtab {num} exceeds the limit of {MAX_MODULE_SYMBOLS}"
            )));
        }
        if num == 0 {
            return Ok(Vec::new());
        }
        if symtab == 0 || strtab == 0 {
            return Err(fail(format!(
                "{num} symbols but symtab {symtab:#x}, strtab {strtab:#x}"
            )));
        }
        let sym_len = usize::try_from(off.sym_size)
            .ok()
            .filter(|&n| (16..=256).contains(&n))
            .ok_or_else(|| fail(format!("Elf64_Sym of {} bytes", off.sym_size)))?;
        // (st_name, st_value) of every symbol, read in chunks so that a bad count fails at the
        // first unreadable page rather than after a large allocation.
        let mut raw_syms: Vec<(u64, u64)> = Vec::new();
        let mut chunk = Vec::new();
        let mut first = 0u64;
        while first < num {
            let count = (num - first).min(SYMTAB_CHUNK);
            let bytes = count.saturating_mul(off.sym_size);
            chunk.resize(usize::try_from(bytes).unwrap_or(0), 0);
            let at = first
                .checked_mul(off.sym_size)
                .and_then(|o| symtab.checked_add(o))
                .ok_or_else(|| fail("symtab address overflows".into()))?;
            read_named(self, at, &mut chunk, || {
                format!("symtab of {} ({count} symbols from {first})", module.name)
            })?;
            for sym in chunk.chunks_exact(sym_len) {
                let name = le_at(sym, off.st_name, 4).unwrap_or(u64::MAX);
                let value = le_at(sym, off.st_value, 8).unwrap_or(0);
                raw_syms.push((name, value));
            }
            first += count;
        }
        let max_name = raw_syms.iter().map(|&(n, _)| n).max().unwrap_or(0);
        if max_name >= MAX_MODULE_STRTAB {
            return Err(fail(format!(
                "a name offset {max_name:#x} is beyond the {MAX_MODULE_STRTAB}-byte string table limit"
            )));
        }
        let want = usize::try_from(max_name)
            .unwrap_or(usize::MAX)
            .saturating_add(KSYM_NAME_LEN);
        let strings = read_tolerant(self, strtab, want);
        let types = match typetab {
            Some(t) => {
                let mut raw = vec![0u8; usize::try_from(num).unwrap_or(0)];
                read_named(self, t, &mut raw, || format!("typetab of {}", module.name))?;
                Some(raw)
            }
            None => None,
        };
        let owner: Arc<str> = Arc::from(module.name.as_str());
        let mut out = Vec::with_capacity(raw_syms.len());
        for (i, &(name_off, value)) in raw_syms.iter().enumerate() {
            let start = usize::try_from(name_off).unwrap_or(usize::MAX);
            let Some(rest) = strings.get(start..) else {
                return Err(fail(format!(
                    "symbol {i}: name offset {name_off:#x} is outside the {} readable bytes of strtab {strtab:#x}",
                    strings.len()
                )));
            };
            let window = rest.get(..KSYM_NAME_LEN.min(rest.len())).unwrap_or(rest);
            let Some(len) = memchr::memchr(0, window) else {
                if rest.len() < KSYM_NAME_LEN {
                    return Err(fail(format!(
                        "symbol {i}: name at strtab+{name_off:#x} runs past the readable string table"
                    )));
                }
                // The kernel copies at most KSYM_NAME_LEN - 1 bytes.
                out.push(Symbol {
                    name: String::from_utf8_lossy(
                        window.get(..KSYM_NAME_LEN - 1).unwrap_or(window),
                    )
                    .into_owned(),
                    address: value,
                    kind: kind_of(types.as_deref(), i),
                    module: Some(owner.clone()),
                });
                continue;
            };
            if len == 0 {
                continue;
            }
            out.push(Symbol {
                name: String::from_utf8_lossy(window.get(..len).unwrap_or_default()).into_owned(),
                address: value,
                kind: kind_of(types.as_deref(), i),
                module: Some(owner.clone()),
            });
        }
        Ok(out)
    }

    /// Add the symbols of `modules` (unformed ones skipped) to the kernel's symbol table, so
    /// that [`SymbolTable::addr2sym`](crate::SymbolTable::addr2sym) resolves module addresses.
    /// A module whose table cannot be read is reported and skipped.
    pub fn merge_module_symbols(
        &mut self,
        off: &ModuleOffsets,
        modules: &[Module],
    ) -> ModuleSymbolsMerged {
        let mut report = ModuleSymbolsMerged::default();
        let mut all = Vec::new();
        for module in modules.iter().filter(|m| !m.is_unformed()) {
            match self.module_symbols(off, module) {
                Ok(symbols) => all.extend(symbols),
                Err(e) => report.failed.push((module.name.clone(), e)),
            }
        }
        report.merged = all.len();
        self.symbols_mut().merge(all);
        report
    }
}

fn kind_of(types: Option<&[u8]>, i: usize) -> char {
    types
        .and_then(|t| t.get(i))
        .filter(|b| b.is_ascii_graphic())
        .map_or('?', |&b| char::from(b))
}

/// Read up to `want` bytes at `gva`, stopping at the first unreadable page.
fn read_tolerant(kernel: &Kernel<'_>, gva: u64, want: usize) -> Vec<u8> {
    const PAGE: u64 = 4096;
    let mut out = Vec::new();
    let mut at = gva;
    while out.len() < want {
        let to_page_end = PAGE - (at % PAGE);
        let n = usize::try_from(to_page_end)
            .unwrap_or(usize::MAX)
            .min(want - out.len());
        let mut piece = vec![0u8; n];
        if kernel.read(Gva(at), &mut piece).is_err() {
            break;
        }
        out.extend_from_slice(&piece);
        let Some(next) = at.checked_add(to_page_end) else {
            break;
        };
        at = next;
    }
    out
}

/// A NUL-terminated string of at most `limit` bytes at `gva` (lossy UTF-8); one that is not
/// terminated within the limit is cut there.
pub(crate) fn read_c_string(kernel: &Kernel<'_>, gva: u64, limit: usize) -> Result<String> {
    let bytes = read_tolerant(kernel, gva, limit);
    if bytes.is_empty() {
        let mut probe = [0u8; 1];
        read_named(kernel, gva, &mut probe, || "string".to_string())?;
    }
    Ok(c_string(&bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;
    use crate::owners::{KernelSection, Owner, CPU_ENTRY_AREA};
    use crate::tasks::fake::{Fake, DIRECT, MAPPED};

    fn offsets() -> ModuleOffsets {
        ModuleOffsets {
            module_size: 0x240,
            list_next: 0,
            list: 8,
            name: 24,
            name_len: 56,
            state: 0,
            state_size: 4,
            state_names: [
                "MODULE_STATE_LIVE",
                "MODULE_STATE_COMING",
                "MODULE_STATE_GOING",
                "MODULE_STATE_UNFORMED",
            ]
            .iter()
            .zip(0..)
            .map(|(n, v)| (v, n.to_string()))
            .collect(),
            layout: ModuleLayoutOffsets::Layouts {
                core: 0x80,
                init: 0xa0,
                base: 0,
                size: 8,
                size_bytes: 4,
                text_size: 12,
                ro_size: 16,
                ro_after_init_size: Some(20),
            },
            taints: Some(0xc0),
            refcnt: Some(0xc8),
            kallsyms: Some(0xd0),
            ks_symtab: 0,
            ks_num_symtab: 8,
            ks_strtab: 16,
            ks_typetab: Some(24),
            sym_size: 24,
            st_name: 0,
            st_value: 8,
            mkobj: 0xe0,
            mk_kobj: 0,
            mk_mod: 0x40,
            kset_list: 0,
            kobj_entry: 8,
            kobj_name: 0,
            tree: Some(ModTreeOffsets {
                root: 8,
                rb_left: 16,
                rb_right: 8,
                node_mod: 0,
                node_rb: 8,
            }),
        }
    }

    /// A `mod_tree_node` for `module` with children `left` and `right` (node addresses or 0);
    /// returns the address of its `rb_node`.
    fn tree_node(fake: &Fake, module: u64, left: u64, right: u64) -> u64 {
        let t = offsets().tree.unwrap();
        let node = fake.alloc(40);
        fake.u64(node + t.node_mod, module);
        let rb = node + t.node_rb;
        fake.u64(rb + t.rb_left, left);
        fake.u64(rb + t.rb_right, right);
        rb
    }

    #[test]
    fn module_tree_is_walked_in_order_once_per_module_and_bounded() {
        let fake = Fake::new();
        let o = offsets();
        let t = o.tree.clone().unwrap();
        let (alpha, beta, gamma) = (0x1000u64, 0x2000, 0x3000);
        // alpha's core and init regions, beta, gamma: beta at the root.
        let alpha_core = tree_node(&fake, alpha, 0, 0);
        let alpha_init = tree_node(&fake, alpha, alpha_core, 0);
        let gamma_core = tree_node(&fake, gamma, 0, 0);
        let root = tree_node(&fake, beta, alpha_init, gamma_core);
        let mod_tree = fake.alloc(64);
        fake.u64(mod_tree + t.root, root);
        let kernel = fake.kernel(vec![Symbol::new("mod_tree", mod_tree, 'd')]);
        assert_eq!(kernel.modules_from_tree(&o).unwrap(), [alpha, beta, gamma]);

        // A kernel without the tree: no third view, not an error.
        let no_tree = ModuleOffsets {
            tree: None,
            ..o.clone()
        };
        assert!(kernel.modules_from_tree(&no_tree).unwrap().is_empty());

        // A right child pointing back at the root: a cycle, reported.
        fake.u64(gamma_core + t.rb_right, root);
        let err = kernel.modules_from_tree(&o).unwrap_err();
        assert!(
            matches!(err, Error::ListCycle { at, .. } if at == root),
            "{err}"
        );

        // An empty tree.
        fake.u64(mod_tree + t.root, 0);
        assert!(kernel.modules_from_tree(&o).unwrap().is_empty());
    }

    /// Module area addresses: the top 4 MiB of the fake's direct map.
    const ALPHA: u64 = DIRECT + MAPPED - (4 << 20);
    const BETA: u64 = ALPHA + (1 << 20);

    struct World<'f> {
        fake: &'f Fake,
        off: ModuleOffsets,
        head: u64,
        kset: u64,
        kset_ptr: u64,
    }

    impl<'f> World<'f> {
        fn new(fake: &'f Fake) -> Self {
            let head = fake.alloc(16);
            fake.u64(head, head);
            let kset = fake.alloc(96);
            fake.u64(kset, kset);
            let kset_ptr = fake.alloc(8);
            fake.u64(kset_ptr, kset);
            Self {
                fake,
                off: offsets(),
                head,
                kset,
                kset_ptr,
            }
        }

        /// Append `node` (a list_head address) to the ring at `head`.
        fn append(&self, head: u64, node: u64) {
            let mut last = head;
            loop {
                let mut raw = [0u8; 8];
                self.fake.mem.peek(self.fake.phys(last), &mut raw).unwrap();
                let next = u64::from_le_bytes(raw);
                if next == head {
                    break;
                }
                last = next;
            }
            self.fake.u64(last, node);
            self.fake.u64(node, head);
        }

        fn string(&self, s: &str) -> u64 {
            let at = self.fake.alloc(s.len() as u64 + 1);
            self.fake.bytes(at, s.as_bytes());
            at
        }

        /// A module with a core layout at `base` and the given symbols (name, offset, type).
        fn module(&self, name: &str, base: u64, taints: u64, syms: &[(&str, u64, u8)]) -> u64 {
            let (f, o) = (self.fake, &self.off);
            let m = f.alloc(o.module_size);
            f.bytes(m + o.name, name.as_bytes());
            f.u32(m + 0x80 + 8, 0x5000);
            f.u32(m + 0x80 + 12, 0x1000);
            f.u32(m + 0x80 + 16, 0x2000);
            f.u32(m + 0x80 + 20, 0x3000);
            f.u64(m + 0x80, base);
            f.u64(m + o.taints.unwrap(), taints);
            f.u32(m + o.refcnt.unwrap(), 3);
            // Symbols: index 0 is the ELF null symbol.
            let mut strtab = vec![0u8];
            let mut symtab = vec![0u8; 24];
            let mut types = vec![0u8];
            for &(n, off, t) in syms {
                let mut sym = [0u8; 24];
                sym[..4].copy_from_slice(&(strtab.len() as u32).to_le_bytes());
                sym[8..16].copy_from_slice(&(base + off).to_le_bytes());
                symtab.extend_from_slice(&sym);
                strtab.extend_from_slice(n.as_bytes());
                strtab.push(0);
                types.push(t);
            }
            let ks = f.alloc(32);
            let (st, sr, ty) = (
                f.alloc(symtab.len() as u64),
                f.alloc(strtab.len() as u64),
                f.alloc(types.len() as u64),
            );
            f.bytes(st, &symtab);
            f.bytes(sr, &strtab);
            f.bytes(ty, &types);
            f.u64(ks, st);
            f.u64(ks + 8, syms.len() as u64 + 1);
            f.u64(ks + 16, sr);
            f.u64(ks + 24, ty);
            f.u64(m + o.kallsyms.unwrap(), ks);
            self.append(self.head, m + o.list);
            // Its kobject on the kset.
            let mk = m + o.mkobj;
            f.u64(mk + o.kobj_name, self.string(name));
            f.u64(mk + o.mk_mod, m);
            self.append(self.kset + o.kset_list, mk + o.kobj_entry);
            m
        }

        fn builtin_kobject(&self, name: &str) {
            let mk = self.fake.alloc(0x60);
            self.fake.u64(mk, self.string(name));
            self.append(self.kset, mk + self.off.kobj_entry);
        }

        fn kernel(&self) -> Kernel<'f> {
            let k = |name: &str, at: u64, kind: char| Symbol::new(name, at, kind);
            let text = 0xffff_ffff_8100_0000u64;
            self.fake.kernel(vec![
                k("modules", self.head, 'd'),
                k("module_kset", self.kset_ptr, 'D'),
                k("_text", text, 'T'),
                k("_stext", text + 0x1000, 'T'),
                k("kfunc", text + 0x2000, 't'),
                k("__entry_text_start", text + 0x8000, 'T'),
                k("asm_exc_page_fault", text + 0x8100, 'T'),
                k("__entry_text_end", text + 0x9000, 'T'),
                k("_etext", text + 0x10000, 'T'),
                k("_sdata", text + 0x20000, 'D'),
                k("kdata", text + 0x20100, 'd'),
                k("_edata", text + 0x30000, 'D'),
                k("_end", text + 0x40000, 'B'),
            ])
        }
    }

    #[test]
    fn module_list_kset_symbols_and_owners() {
        let fake = Fake::new();
        let w = World::new(&fake);
        let o = w.off.clone();
        let alpha = w.module(
            "alpha",
            ALPHA,
            (1 << 12) | (1 << 13) | (1 << 9),
            &[("alpha_fn", 0x10, b't'), ("alpha_data", 0x3008, b'd')],
        );
        w.builtin_kobject("printk");
        let beta = w.module("beta", BETA, 0, &[("beta_fn", 0, b'T')]);
        let mut kernel = w.kernel();

        let modules = kernel.modules(&o).unwrap();
        let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["alpha", "beta"]);
        let a = &modules[0];
        assert_eq!((a.address, a.base, a.size), (alpha, ALPHA, 0x5000));
        assert_eq!(a.taint_letters(), "OE");
        assert_eq!((a.proc_state(), a.refcount), ("Live", Some(2)));
        let kinds: Vec<(ModuleRegionKind, u64, u64)> = a
            .regions
            .iter()
            .map(|r| (r.kind, r.base - ALPHA, r.size))
            .collect();
        assert_eq!(
            kinds,
            [
                (ModuleRegionKind::Text, 0, 0x1000),
                (ModuleRegionKind::Rodata, 0x1000, 0x1000),
                (ModuleRegionKind::RoAfterInit, 0x2000, 0x1000),
                (ModuleRegionKind::Data, 0x3000, 0x2000),
            ]
        );

        let kset = kernel.modules_from_kset(&o).unwrap();
        let view: Vec<(&str, Option<u64>)> =
            kset.iter().map(|k| (k.name.as_str(), k.module)).collect();
        assert_eq!(
            view,
            [
                ("alpha", Some(alpha)),
                ("printk", None),
                ("beta", Some(beta))
            ]
        );

        let syms = kernel.module_symbols(&o, a).unwrap();
        let got: Vec<(&str, u64, char)> = syms
            .iter()
            .map(|s| (s.name.as_str(), s.address - ALPHA, s.kind))
            .collect();
        assert_eq!(got, [("alpha_fn", 0x10, 't'), ("alpha_data", 0x3008, 'd')]);
        let merged = kernel.merge_module_symbols(&o, &modules);
        assert_eq!((merged.merged, merged.failed.len()), (3, 0));
        assert_eq!(
            kernel.symbols().describe(ALPHA + 0x14).as_deref(),
            Some("alpha_fn+0x4 [alpha]")
        );

        let owners = kernel.owners(&modules);
        let text = 0xffff_ffff_8100_0000u64;
        assert_eq!(
            owners.owner(text + 0x2002),
            Owner::Kernel {
                section: KernelSection::Text,
                symbol: Some(("kfunc".into(), 2))
            }
        );
        assert!(matches!(
            owners.owner(text + 0x8100),
            Owner::Kernel {
                section: KernelSection::EntryText,
                ..
            }
        ));
        assert!(matches!(
            owners.owner(text + 0x20100),
            Owner::Kernel {
                section: KernelSection::Data,
                ..
            }
        ));
        assert!(matches!(
            owners.owner(text + 0x100),
            Owner::Kernel {
                section: KernelSection::Image,
                ..
            }
        ));
        assert!(matches!(
            owners.owner(CPU_ENTRY_AREA.0 + 0x1000),
            Owner::Kernel {
                section: KernelSection::CpuEntryArea,
                symbol: None
            }
        ));
        let owner = owners.owner(ALPHA + 0x14);
        assert_eq!(
            owner,
            Owner::Module {
                name: "alpha".into(),
                region: ModuleRegionKind::Text,
                symbol: Some(("alpha_fn".into(), 4))
            }
        );
        assert!(owner.is_known_text());
        assert_eq!(owner.to_string(), "module alpha text alpha_fn+0x4");
        assert!(matches!(
            owners.owner(ALPHA + 0x3010),
            Owner::Module {
                region: ModuleRegionKind::Data,
                ..
            }
        ));
        // Between modules and below everything: nobody's.
        assert_eq!(owners.owner(ALPHA + 0x6000), Owner::Unowned);
        assert_eq!(owners.owner(0x1000), Owner::Unowned);
    }

    #[test]
    fn hostile_module_data_is_rejected() {
        let fake = Fake::new();
        let w = World::new(&fake);
        let o = w.off.clone();
        let alpha = w.module("alpha", ALPHA, 0, &[("alpha_fn", 0x10, b't')]);
        let kernel = w.kernel();
        let module = || kernel.modules(&o).unwrap().remove(0);
        let ks = module().kallsyms.unwrap();

        fake.u64(ks + 8, 2_000_000);
        let err = kernel.module_symbols(&o, &module()).unwrap_err();
        assert!(matches!(err, Error::ModuleSymbols { .. }), "{err}");
        assert!(err.to_string().contains("2000000"), "{err}");

        // A count larger than the mapped symtab: a read error, not a huge allocation.
        fake.u64(ks + 8, 900_000);
        let err = kernel.module_symbols(&o, &module()).unwrap_err();
        assert!(matches!(err, Error::Virt { .. }), "{err}");

        // Name offsets past the limit, and past the readable end of the string table.
        fake.u64(ks + 8, 2);
        let symtab = {
            let mut raw = [0u8; 8];
            fake.mem.peek(fake.phys(ks), &mut raw).unwrap();
            u64::from_le_bytes(raw)
        };
        fake.u32(symtab + 24, 0x7fff_ffff);
        let err = kernel.module_symbols(&o, &module()).unwrap_err();
        assert!(matches!(err, Error::ModuleSymbols { .. }), "{err}");
        let end_strtab = DIRECT + MAPPED - 8;
        fake.bytes(end_strtab, b"abc\0efgh");
        fake.u64(ks + 16, end_strtab);
        fake.u32(symtab + 24, 4);
        let err = kernel.module_symbols(&o, &module()).unwrap_err();
        assert!(err.to_string().contains("runs past"), "{err}");
        fake.u32(symtab + 24, 100);
        let err = kernel.module_symbols(&o, &module()).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");

        // A module list that loops.
        fake.u64(alpha + o.list, alpha + o.list);
        let err = kernel.modules(&o).unwrap_err();
        assert!(matches!(err, Error::ListCycle { .. }), "{err}");
    }

    #[test]
    fn memory_array_layout_of_newer_kernels() {
        let fake = Fake::new();
        let w = World::new(&fake);
        let mut o = w.off.clone();
        o.layout = ModuleLayoutOffsets::Memory {
            mem: 0x140,
            stride: 0x20,
            base: 0,
            size: 8,
            size_bytes: 4,
            kinds: [
                "MOD_TEXT",
                "MOD_DATA",
                "MOD_RODATA",
                "MOD_RO_AFTER_INIT",
                "MOD_INIT_TEXT",
                "MOD_INIT_DATA",
                "MOD_INIT_RODATA",
            ]
            .iter()
            .map(|n| ModuleRegionKind::from_mem_type(n))
            .collect(),
        };
        let m = fake.alloc(o.module_size);
        fake.bytes(m + o.name, b"gamma");
        fake.u32(m + o.state, 1);
        for (i, (base, size)) in [(ALPHA, 0x2000u32), (ALPHA + 0x4000, 0x1000)]
            .iter()
            .enumerate()
        {
            let e = m + 0x140 + i as u64 * 0x20;
            fake.u64(e, *base);
            fake.u32(e + 8, *size);
        }
        w.append(w.head, m + o.list);
        let kernel = w.kernel();
        let modules = kernel.modules(&o).unwrap();
        let g = &modules[0];
        assert_eq!((g.name.as_str(), g.proc_state()), ("gamma", "Loading"));
        assert_eq!((g.base, g.size), (ALPHA, 0x3000));
        assert_eq!(
            g.region_of(ALPHA + 0x4010).map(|r| r.kind),
            Some(ModuleRegionKind::Data)
        );
        assert!(kernel.module_symbols(&o, g).unwrap().is_empty());
    }
}
