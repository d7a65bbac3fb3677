#![allow(clippy::unwrap_used)]

use kvmaccess_btf::encode::BtfBuilder;
use kvmaccess_btf::{Btf, TypeId};
use serde_json::Value;

use super::*;
use crate::Symbol;

const KASLR: u64 = 0x3100_0000;
const BANNER: &[u8] = b"Linux version 6.1.0-test (gcc) #1 SMP\n\0";

/// A small kernel: list_head (self-referencing through a later-defined pointer target),
/// task_struct with an anonymous union of anonymous structs, bitfields in both BTF encodings,
/// a function pointer, an enum, an anonymous enum, a forward declaration without definition,
/// a typedef'd and const member, a per-CPU variable in a data section.
fn kernel_btf() -> Btf {
    let mut b = BtfBuilder::new();
    let int = b.int("int", 4, true);
    let uint = b.int("unsigned int", 4, false);
    let ulong = b.int("long unsigned int", 8, false);
    let chr = b.char();
    let boolean = b.raw("_Bool", 1, false, 0, 1, &[4 << 24 | 8]);
    let list_head = TypeId(b.next_id().get() + 1);
    let list_ptr = b.ptr(list_head);
    let lh = b.struct_(
        "list_head",
        16,
        &[("next", list_ptr, 0, 0), ("prev", list_ptr, 64, 0)],
    );
    assert_eq!(lh, list_head);
    let pid_t = b.typedef("pid_t", int);
    let const_pid = b.const_(pid_t);
    let comm = b.array(chr, int, 16);
    let state = b.enum_(
        "task_state",
        4,
        true,
        &[("TASK_RUNNING", 0), ("TASK_DEAD", -1)],
    );
    let _anon_enum = b.enum_("", 4, false, &[("NR_THINGS", 7)]);
    let opaque = b.fwd("opaque_thing", false);
    let opaque_ptr = b.ptr(opaque);
    let proto = b.func_proto(int, &[("", list_ptr)]);
    let fn_ptr = b.ptr(proto);
    let void_ptr = b.ptr(TypeId::VOID);
    // Old-style bitfield: an int type narrower than its storage.
    let three_bits = b.raw("unsigned int", 1, false, 0, 4, &[3]);
    let anon_a = b.struct_("", 8, &[("a_lo", uint, 0, 0), ("a_hi", uint, 32, 0)]);
    let anon_b = b.struct_("", 8, &[("b_whole", ulong, 0, 0)]);
    let anon_union = b.union_("", 8, &[("", anon_a, 0, 0), ("", anon_b, 0, 0)]);
    let flags = b.struct_("flags_old", 4, &[("mode", three_bits, 3, 0)]);
    b.struct_(
        "task_struct",
        96,
        &[
            ("pid", const_pid, 0, 0),
            ("tgid", pid_t, 32, 0),
            ("tasks", list_head, 64, 0),
            ("", anon_union, 192, 0),
            ("in_execve", uint, 256, 1),
            ("in_iowait", uint, 257, 1),
            ("", uint, 258, 6),
            ("policy", state, 288, 0),
            ("comm", comm, 320, 0),
            ("callback", fn_ptr, 448, 0),
            ("secret", opaque_ptr, 512, 0),
            ("any", void_ptr, 576, 0),
            ("exiting", boolean, 640, 0),
            ("flags", flags, 672, 0),
        ],
    );
    let task = TypeId(b.next_id().get() - 1);
    let task_ptr = b.ptr(task);
    let current = b.var("current_task", task_ptr, 1);
    b.datasec(".data..percpu", 8, &[(current, 0, 8)]);
    b.enum64("big", 8, false, &[("HUGE", u64::MAX)]);
    Btf::parse(&b.build()).unwrap()
}

fn symbols() -> SymbolTable {
    let live = |a: u64| a + KASLR;
    let mut module_sym = Symbol::new("init_task", live(0xffff_ffff_c000_0000), 'd');
    module_sym.module = Some("evil".into());
    SymbolTable::new(vec![
        Symbol::new("_text", live(0xffff_ffff_8100_0000), 'T'),
        Symbol::new("linux_banner", live(0xffff_ffff_8211_ffe0), 'D'),
        Symbol::new("init_task", live(0xffff_ffff_82a1_aa40), 'D'),
        Symbol::new("init_top_pgt", live(0xffff_ffff_82a1_0000), 'D'),
        // A static of the same name as a later global: the global wins.
        Symbol::new("dup", live(0xffff_ffff_8100_1000), 't'),
        Symbol::new("dup", live(0xffff_ffff_8100_2000), 'T'),
        Symbol::new("__per_cpu_offset", live(0xffff_ffff_8300_0000), 'D'),
        Symbol::new("after_offsets", live(0xffff_ffff_8300_0040), 'D'),
        Symbol::new("current_task", 0x1fb80, 'A'),
        Symbol::new("sys_call_table", live(0xffff_ffff_8200_0360), 'D'),
        Symbol::new("vdso_mapping", live(0xffff_ffff_8200_0400), 'D'),
        module_sym,
    ])
}

fn build() -> Isf {
    let btf = kernel_btf();
    let table = symbols();
    // sys_call_table: three entries, then zero padding up to the next symbol.
    let table_at = 0xffff_ffff_8200_0360 + KASLR;
    let memory = |address: u64, buf: &mut [u8]| {
        buf.fill(0);
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            let at = address + 8 * i as u64;
            if (table_at..table_at + 24).contains(&at) {
                chunk.copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
            }
        }
        true
    };
    build_isf(
        &btf,
        &IsfInput {
            symbols: &table,
            kaslr_offset: KASLR,
            banner: Some(BANNER),
            release: "6.1.0-test",
            memory: Some(&memory),
            sources: None,
        },
    )
    .unwrap()
}

fn json(isf: &Isf) -> Value {
    serde_json::to_value(isf).unwrap()
}

/// Every name a type descriptor uses, checked against the JSON itself (not the Rust structs),
/// as Volatility will see it.
fn check_refs(doc: &Value, desc: &Value, at: &str, missing: &mut Vec<String>) {
    let name = desc.get("name").and_then(Value::as_str).unwrap_or("");
    match desc["kind"].as_str().unwrap() {
        "base" => {
            if doc["base_types"].get(name).is_none() {
                missing.push(format!("{at}: base {name}"));
            }
        }
        kind @ ("struct" | "union") => {
            if doc["user_types"][name]["kind"].as_str() != Some(kind) {
                missing.push(format!("{at}: {kind} {name}"));
            }
        }
        "enum" => {
            if doc["enums"].get(name).is_none() {
                missing.push(format!("{at}: enum {name}"));
            }
        }
        "pointer" | "array" => check_refs(doc, &desc["subtype"], at, missing),
        "bitfield" => {
            let inner = &desc["type"];
            assert!(
                matches!(inner["kind"].as_str(), Some("base" | "enum")),
                "{at}"
            );
            check_refs(doc, inner, at, missing);
        }
        "function" => {}
        other => missing.push(format!("{at}: unknown kind {other}")),
    }
}

#[test]
fn every_referenced_type_is_defined() {
    let isf = build();
    assert!(isf.undefined_references().is_empty());
    let doc = json(&isf);
    let mut missing = Vec::new();
    for (name, t) in doc["user_types"].as_object().unwrap() {
        for (field, f) in t["fields"].as_object().unwrap() {
            check_refs(&doc, &f["type"], &format!("{name}.{field}"), &mut missing);
        }
    }
    for (name, s) in doc["symbols"].as_object().unwrap() {
        if let Some(t) = s.get("type") {
            check_refs(&doc, t, name, &mut missing);
        }
    }
    for (name, e) in doc["enums"].as_object().unwrap() {
        if doc["base_types"].get(e["base"].as_str().unwrap()).is_none() {
            missing.push(format!("enum {name}"));
        }
    }
    assert!(missing.is_empty(), "{missing:?}");
    // The forward declaration without a definition is an empty struct.
    assert_eq!(doc["user_types"]["opaque_thing"]["size"], 0);
    assert_eq!(isf.stats.opaque_types, 1);
}

#[test]
fn sections_follow_the_schema_shapes() {
    let doc = json(&build());
    assert_eq!(doc["metadata"]["format"], "6.2.0");
    assert_eq!(doc["metadata"]["producer"]["name"], "kvmaccess");
    assert_eq!(doc["metadata"]["linux"]["symbols"][0]["kind"], "symtab");
    assert_eq!(
        doc["base_types"]["pointer"],
        serde_json::json!({"size": 8, "signed": false, "kind": "int", "endian": "little"})
    );
    assert_eq!(doc["base_types"]["void"]["kind"], "void");
    assert_eq!(doc["base_types"]["char"]["kind"], "char");
    assert_eq!(doc["base_types"]["_Bool"]["kind"], "bool");
    assert_eq!(doc["base_types"]["int"]["signed"], true);
    assert_eq!(doc["base_types"]["long unsigned int"]["size"], 8);
    // Typedefs and qualifiers are resolved.
    let task = &doc["user_types"]["task_struct"];
    assert_eq!(task["kind"], "struct");
    assert_eq!(task["size"], 96);
    assert_eq!(
        task["fields"]["pid"],
        serde_json::json!({"type": {"kind": "base", "name": "int"}, "offset": 0})
    );
    assert_eq!(task["fields"]["tasks"]["type"]["name"], "list_head");
    assert_eq!(task["fields"]["tasks"]["offset"], 8);
    assert_eq!(
        task["fields"]["comm"]["type"],
        serde_json::json!({"kind": "array", "count": 16, "subtype": {"kind": "base", "name": "char"}})
    );
    assert_eq!(
        task["fields"]["any"]["type"]["subtype"],
        serde_json::json!({"kind": "base", "name": "void"})
    );
    assert_eq!(
        doc["user_types"]["list_head"]["fields"]["prev"],
        serde_json::json!({"type": {"kind": "pointer", "subtype": {"kind": "struct", "name": "list_head"}}, "offset": 8})
    );
}

#[test]
fn function_pointers_point_to_functions() {
    let doc = json(&build());
    assert_eq!(
        doc["user_types"]["task_struct"]["fields"]["callback"]["type"],
        serde_json::json!({"kind": "pointer", "subtype": {"kind": "function"}})
    );
}

#[test]
fn bitfields_in_both_btf_encodings() {
    let doc = json(&build());
    let fields = &doc["user_types"]["task_struct"]["fields"];
    // kind_flag encoding: bit 256 and 257 of the struct = bits 0 and 1 of the u32 at byte 32.
    assert_eq!(
        fields["in_execve"],
        serde_json::json!({"type": {"kind": "bitfield", "bit_position": 0, "bit_length": 1,
            "type": {"kind": "base", "name": "unsigned int"}}, "offset": 32})
    );
    assert_eq!(fields["in_iowait"]["type"]["bit_position"], 1);
    assert_eq!(fields["in_iowait"]["offset"], 32);
    // The unnamed 6-bit padding is not a field.
    assert!(fields
        .as_object()
        .unwrap()
        .keys()
        .all(|k| !k.starts_with("unnamed_field_20")));
    // Old encoding: a 3-bit int type at bit 3.
    let mode = &doc["user_types"]["flags_old"]["fields"]["mode"];
    assert_eq!(mode["offset"], 0);
    assert_eq!(mode["type"]["kind"], "bitfield");
    assert_eq!(mode["type"]["bit_position"], 3);
    assert_eq!(mode["type"]["bit_length"], 3);
}

#[test]
fn anonymous_members_are_named_and_flattenable() {
    let doc = json(&build());
    let fields = doc["user_types"]["task_struct"]["fields"]
        .as_object()
        .unwrap();
    let anon: Vec<_> = fields
        .iter()
        .filter(|(_, f)| f["anonymous"] == true)
        .collect();
    assert_eq!(anon.len(), 1, "{fields:?}");
    let (name, field) = anon[0];
    assert_eq!(name, "unnamed_field_18");
    assert_eq!(field["offset"], 24);
    assert_eq!(field["type"]["kind"], "union");
    // The union holds two anonymous structs at the same offset: both kept, distinct names.
    let union_name = field["type"]["name"].as_str().unwrap();
    assert!(union_name.starts_with("unnamed_union_"));
    let inner = doc["user_types"][union_name]["fields"].as_object().unwrap();
    assert_eq!(inner.len(), 2, "{inner:?}");
    let members: Vec<&str> = inner
        .values()
        .map(|f| f["type"]["name"].as_str().unwrap())
        .collect();
    let mut seen: Vec<&str> = members
        .iter()
        .flat_map(|n| {
            doc["user_types"][*n]["fields"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, ["a_hi", "a_lo", "b_whole"]);
}

#[test]
fn enums_with_bases_and_generated_names() {
    let doc = json(&build());
    assert_eq!(
        doc["enums"]["task_state"],
        serde_json::json!({"size": 4, "base": "int",
            "constants": {"TASK_RUNNING": 0, "TASK_DEAD": -1}})
    );
    assert_eq!(
        doc["user_types"]["task_struct"]["fields"]["policy"]["type"],
        serde_json::json!({"kind": "enum", "name": "task_state"})
    );
    let anonymous: Vec<_> = doc["enums"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(n, _)| n.starts_with("unnamed_enum_"))
        .collect();
    assert_eq!(anonymous.len(), 1);
    assert_eq!(anonymous[0].1["constants"]["NR_THINGS"], 7);
    assert_eq!(anonymous[0].1["base"], "unsigned int");
    assert_eq!(doc["enums"]["big"]["constants"]["HUGE"], u64::MAX);
    assert_eq!(doc["enums"]["big"]["base"], "long unsigned int");
}

#[test]
fn symbol_addresses_are_unrelocated() {
    let isf = build();
    let doc = json(&isf);
    let sym = |n: &str| doc["symbols"][n]["address"].as_u64().unwrap();
    assert_eq!(sym("_text"), 0xffff_ffff_8100_0000);
    assert_eq!(sym("init_task"), 0xffff_ffff_82a1_aa40);
    assert_eq!(sym("init_top_pgt"), 0xffff_ffff_82a1_0000);
    // Per-CPU offsets are absolute: not moved by KASLR.
    assert_eq!(sym("current_task"), 0x1fb80);
    // The global wins over a static of the same name.
    assert_eq!(sym("dup"), 0xffff_ffff_8100_2000);
    // Module symbols are not the kernel's.
    assert_eq!(isf.stats.symbols, 10);
}

#[test]
fn symbol_types_banner_and_well_known_globals() {
    let isf = build();
    let doc = json(&isf);
    let banner = &doc["symbols"]["linux_banner"];
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(banner["constant_data"].as_str().unwrap())
            .unwrap(),
        BANNER
    );
    assert_eq!(banner["type"]["count"], BANNER.len());
    assert!(isf.stats.banner);
    assert_eq!(
        doc["symbols"]["init_task"]["type"],
        serde_json::json!({"kind": "struct", "name": "task_struct"})
    );
    // From the BTF data section.
    assert_eq!(
        doc["symbols"]["current_task"]["type"],
        serde_json::json!({"kind": "pointer", "subtype": {"kind": "struct", "name": "task_struct"}})
    );
    // Length from the distance to the next symbol: 0x40 bytes of 8-byte entries.
    assert_eq!(doc["symbols"]["__per_cpu_offset"]["type"]["count"], 8);
    // Inferred from the gap (0xa0 bytes = 20 pointers), then the zero tail trimmed.
    assert_eq!(
        doc["symbols"]["sys_call_table"]["type"],
        serde_json::json!({"kind": "array", "count": 3,
            "subtype": {"kind": "pointer", "subtype": {"kind": "function"}}})
    );
    // No type where BTF lacks it (no gate_struct here) or nothing is declared.
    assert!(doc["symbols"]["_text"].get("type").is_none());
}

#[test]
fn file_name_is_safe() {
    assert_eq!(
        Isf::file_name("6.1.0-56-cloud-amd64"),
        "kvmaccess-6.1.0-56-cloud-amd64.json"
    );
    assert_eq!(Isf::file_name("../x y"), "kvmaccess-.._x_y.json");
}

#[test]
fn hostile_btf_gives_a_complete_document() {
    let mut b = BtfBuilder::new();
    // A pointer that points to itself, a struct and a union named like generated names, a
    // forward `union` of a defined struct.
    let me = b.next_id();
    b.ptr(me);
    let int = b.int("int", 4, true);
    let s = b.struct_("unnamed_struct_4", 4, &[("x", int, 0, 0)]);
    let anon = b.struct_("", 4, &[("y", int, 0, 0)]);
    let fwd = b.fwd("unnamed_struct_4", true);
    let fptr = b.ptr(fwd);
    b.struct_(
        "holder",
        24,
        &[
            ("loop", me, 0, 0),
            ("s", s, 64, 0),
            ("a", anon, 96, 0),
            ("f", fptr, 128, 0),
        ],
    );
    let btf = Btf::parse(&b.build()).unwrap();
    let table = SymbolTable::default();
    let isf = build_isf(
        &btf,
        &IsfInput {
            symbols: &table,
            kaslr_offset: 0,
            banner: None,
            release: "x",
            memory: None,
            sources: Some("symbols: a System.map; types: DWARF of vmlinux-x"),
        },
    )
    .unwrap();
    // The metadata says where a profile not read from guest memory came from.
    assert_eq!(
        json(&isf)["metadata"]["linux"]["symbols"][0]["name"],
        "Linux x: symbols: a System.map; types: DWARF of vmlinux-x"
    );
    assert!(isf.undefined_references().is_empty());
    assert!(isf.stats.cut_chains > 0);
    assert_eq!(isf.stats.renamed_duplicates, 1);
    assert!(!isf.stats.banner);
    let doc = json(&isf);
    let holder = &doc["user_types"]["holder"]["fields"];
    assert_ne!(holder["s"]["type"]["name"], holder["a"]["type"]["name"]);
    assert_eq!(holder["f"]["type"]["subtype"]["kind"], "struct");
}

#[test]
fn writes_json_that_parses_back() {
    let isf = build();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(Isf::file_name("6.1.0-test"));
    isf.write_to_path(&path).unwrap();
    let back: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(back, json(&isf));
    let err = isf
        .write_to_path(dir.path().join("missing/dir/x.json"))
        .unwrap_err();
    assert!(err.to_string().contains("missing/dir"), "{err}");
}
