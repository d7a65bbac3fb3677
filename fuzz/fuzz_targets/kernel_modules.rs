//! Arbitrary bytes as the memory of a kernel (paging off: addresses are physical) whose module
//! list, module kset and module address tree heads sit at fixed addresses, with structure
//! offsets taken from the input's first bytes: the three views and the module symbol tables
//! they lead to must be read or refused without a panic, a hang or an allocation the input
//! does not pay for.

#![no_main]

#[path = "common/memory.rs"]
mod memory;

use kvmaccess_core::Gpa;
use kvmaccess_linux::modules::ModuleLayoutOffsets;
use kvmaccess_linux::{
    Kernel, KernelLayout, KernelProfile, ModTreeOffsets, ModuleOffsets, Provenance, Symbol,
    SymbolTable,
};
use kvmaccess_x86::PagingMode;
use libfuzzer_sys::fuzz_target;
use memory::FuzzMemory;

/// Bytes of the input that choose offsets: one byte, in units of 8, per offset.
const HEADER: usize = 28;

/// Offsets of each structure, chosen by the input, inside objects of at most 2 KiB.
fn offsets(h: &[u8; HEADER]) -> ModuleOffsets {
    let at = |i: usize| u64::from(h[i]) * 8;
    ModuleOffsets {
        module_size: 0x800,
        list_next: 0,
        list: at(0),
        name: at(1),
        name_len: 56,
        state: at(2),
        state_size: 4,
        state_names: vec![(0, "MODULE_STATE_LIVE".into())],
        layout: ModuleLayoutOffsets::Layouts {
            core: at(3),
            init: at(4),
            base: at(23),
            size: at(24),
            size_bytes: 4,
            text_size: at(25),
            ro_size: at(26),
            ro_after_init_size: Some(at(27)),
        },
        taints: Some(at(5)),
        refcnt: Some(at(6)),
        kallsyms: Some(at(7)),
        ks_symtab: at(16),
        ks_num_symtab: at(17),
        ks_strtab: at(18),
        ks_typetab: Some(at(19)),
        // The reader accepts 16 to 256 bytes: sizes inside and outside are both tried.
        sym_size: at(20),
        st_name: at(21),
        st_value: at(22),
        mkobj: at(8),
        mk_kobj: 0,
        mk_mod: at(9),
        kset_list: 0,
        kobj_entry: at(10),
        kobj_name: 0,
        tree: Some(ModTreeOffsets {
            root: at(11),
            rb_left: at(12),
            rb_right: at(13),
            node_mod: at(14),
            node_rb: at(15),
        }),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((header, _)) = data.split_first_chunk::<HEADER>() else {
        return;
    };
    let memory = FuzzMemory::new(data);
    let profile = KernelProfile {
        release: "6.1.0-fuzz".into(),
        build_id: None,
        layout: KernelLayout {
            mode: PagingMode::Disabled,
            root: Gpa(0),
            kaslr_offset: 0,
            phys_base: 0,
            page_offset_base: None,
        },
        vmcoreinfo: None,
        banner: None,
        symbols: SymbolTable::new(vec![
            Symbol::new("modules", 0x10, 'd'),
            Symbol::new("module_kset", 0x20, 'd'),
            Symbol::new("mod_tree", 0x30, 'd'),
        ]),
        provenance: Provenance::supplied("the fuzzer"),
    };
    let kernel = Kernel::from_profile(&memory, profile);
    let off = offsets(header);
    if let Ok(modules) = kernel.modules(&off) {
        for module in modules.iter().take(8) {
            let _ = kernel.module_symbols(&off, module);
        }
    }
    let _ = kernel.modules_from_kset(&off);
    if let Ok(tree) = kernel.modules_from_tree(&off) {
        for &address in tree.iter().take(8) {
            let _ = kernel.module_at(&off, address);
        }
    }
});
