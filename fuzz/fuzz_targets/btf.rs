//! Feeds arbitrary bytes to the BTF parser, then runs every query on every type: nothing may
//! panic, hang or recurse without bound, whatever a guest puts between __start_BTF and __stop_BTF.

#![no_main]

use kvmaccess_btf::{Btf, TypeId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else {
        return;
    };
    let max = u32::try_from(btf.type_count()).unwrap_or(u32::MAX);
    for t in btf.types() {
        let _ = btf.size_of(t.id);
        let _ = btf.resolve(t.id);
        let _ = btf.type_name(t.id);
        if let Ok(members) = btf.members(t.id) {
            for m in members {
                let _ = btf.size_of(m.type_id);
                if !m.name.is_empty() {
                    let _ = btf.locate(t.id, m.name);
                    let _ = btf.locate(t.id, &format!("{}[1].x", m.name));
                }
            }
        }
        if let Ok(values) = btf.enumerators(t.id) {
            values.for_each(drop);
        }
        if let Ok(params) = btf.params(t.id) {
            params.for_each(drop);
        }
        let _ = btf.datasec_vars(t.id);
        if !t.name.is_empty() {
            let _ = btf.offset_of(t.name, "tasks");
            let _ = btf.offset_of(t.name, "se.exec_start");
            let _ = btf.enum_value(t.name, "PIDTYPE_PID");
        }
    }
    for name in ["task_struct", "mm_struct", "module", "list_head"] {
        let _ = btf.find_struct(name);
    }
    let _ = btf.offset_of("mm_struct", "pgd");
    let _ = btf.enumerator_value("PIDTYPE_PID");
    // Ids past the end must be refused, not indexed.
    assert!(btf.kind(TypeId(max.saturating_add(1))).is_err() || max == u32::MAX);
});
