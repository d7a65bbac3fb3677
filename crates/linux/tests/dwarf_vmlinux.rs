//! Kernel types from DWARF, checked against the kernel's own BTF: the Debian debug vmlinux of
//! the test guest's kernel with its .BTF section removed (so kvmaccess must convert its DWARF),
//! and that .BTF section as the reference (pahole made it from the same DWARF).
//!
//! Both files come from `make vmlinux-dbg` (scripts/vmlinux-dbg.sh), found through
//! `KVMACCESS_VMLINUX_DBG_DIR` (default `<workspace>/.cache/vmlinux-dbg`) and the guest's
//! kernel version in `KVMACCESS_GUEST_DIR`. Missing files fail the test: it is never skipped.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kvmaccess_btf::{Btf, Kind, TypeId};
use kvmaccess_linux::{
    build_isf, IsfInput, KernelTypes, ModuleOffsets, PrintkLayout, SymbolTable, TaskOffsets,
    Vmlinux,
};

fn workspace_cache(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache")
        .join(sub)
}

/// The DWARF-only vmlinux and the reference .BTF.
fn inputs() -> (PathBuf, PathBuf) {
    let guest = std::env::var_os("KVMACCESS_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_cache("guest"));
    let dir = std::env::var_os("KVMACCESS_VMLINUX_DBG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_cache("vmlinux-dbg"));
    let version = std::fs::read_to_string(guest.join("kernel-version")).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run `make guest vmlinux-dbg` (or set KVMACCESS_GUEST_DIR)",
            guest.join("kernel-version").display()
        )
    });
    let vmlinux = dir.join(format!("vmlinux-{}", version.trim()));
    let btf = dir.join(format!("vmlinux-{}.btf", version.trim()));
    assert!(
        vmlinux.is_file() && btf.is_file(),
        "the DWARF-only debug vmlinux {} and its .BTF {} must exist: run `make vmlinux-dbg` (or \
         set KVMACCESS_VMLINUX_DBG_DIR)",
        vmlinux.display(),
        btf.display()
    );
    (vmlinux, btf)
}

/// CPU time of the calling thread (user + system), from /proc: the machine may be busy, and
/// wall time alone would say more about the neighbours than about the conversion.
fn thread_cpu() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // Clock ticks are 1/100 s on Linux.
    std::time::Duration::from_millis(f.iter().sum::<u64>() * 10)
}

/// A struct or union as the comparison sees it: size, and per member its name, bit offset,
/// bitfield width and the size of its type (`None` where BTF gives none, e.g. a function).
type Shape = (u64, Vec<(String, u64, u8, Option<u64>)>);

fn shape(btf: &Btf, id: TypeId) -> Shape {
    let members = btf
        .members(id)
        .unwrap()
        .map(|m| {
            (
                m.name.to_string(),
                u64::from(m.bit_offset),
                m.bitfield_size,
                btf.size_of(m.type_id).ok(),
            )
        })
        .collect();
    (btf.size_of(id).unwrap(), members)
}

/// Every type of `kind` named `name` (a few names have several definitions in one kernel,
/// local to different files).
fn variants(btf: &Btf, kind: Kind, name: &str) -> Vec<TypeId> {
    btf.find_all(name)
        .filter(|&id| btf.kind(id).ok() == Some(kind))
        .collect()
}

/// What differs between two shapes, member by member.
fn describe(reference: &Shape, ours: &Shape) -> String {
    let mut out = String::new();
    if reference.0 != ours.0 {
        let _ = write!(out, "size {} vs {}; ", reference.0, ours.0);
    }
    if reference.1.len() != ours.1.len() {
        let _ = write!(out, "{} members vs {}; ", reference.1.len(), ours.1.len());
    }
    for (r, o) in reference.1.iter().zip(&ours.1) {
        if r != o {
            let _ = write!(
                out,
                "member {} at bit {} ({} bits, type size {:?}) vs {} at bit {} ({} bits, type \
                 size {:?}); ",
                r.0, r.1, r.2, r.3, o.0, o.1, o.2, o.3
            );
        }
    }
    out
}

#[test]
fn dwarf_types_match_the_kernel_btf() {
    let (path, btf_path) = inputs();

    let started = Instant::now();
    let vmlinux = Vmlinux::open(&path).unwrap();
    let opened = started.elapsed();
    assert!(vmlinux.btf.is_none(), "{} still has a .BTF", path.display());
    assert!(vmlinux.has_dwarf);
    assert!(
        vmlinux.system_map.symbols.len() > 50_000,
        "the symbol table is still read"
    );
    assert!(vmlinux.types_origin().contains("DWARF"));
    let (started, cpu) = (Instant::now(), thread_cpu());
    let ours = vmlinux.types().unwrap();
    let (converted, cpu) = (started.elapsed(), thread_cpu().saturating_sub(cpu));
    assert!(ours.origin.contains("DWARF"), "{}", ours.origin);
    println!(
        "opening {}: {opened:.2?}; DWARF to {} BTF types ({} KiB): {converted:.2?} wall, \
         {cpu:.2?} CPU (debug build, converter at opt-level 3)",
        path.display(),
        ours.btf.type_count(),
        ours.bytes >> 10
    );
    // Generous: a regression to quadratic work, not a slow machine, should trip it.
    assert!(converted.as_secs() < 120, "conversion took {converted:?}");

    let reference = KernelTypes::from_btf_bytes(
        &std::fs::read(&btf_path).unwrap(),
        &btf_path.display().to_string(),
    )
    .unwrap();
    let (rb, ob) = (&reference.btf, &ours.btf);

    // Every named struct and union: same size, same members at the same offsets with the same
    // bitfield widths and type sizes, as one of the reference's definitions of that name.
    let mut compared = 0;
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for t in rb.types() {
        if !matches!(t.kind(), Kind::Struct | Kind::Union) || t.name.is_empty() {
            continue;
        }
        let Some(id) = ob.find(t.kind(), t.name) else {
            missing.push(format!("{} {}", t.kind(), t.name));
            continue;
        };
        compared += 1;
        let got = shape(ob, id);
        let candidates = variants(rb, t.kind(), t.name);
        if candidates.iter().any(|&v| shape(rb, v) == got) {
            continue;
        }
        wrong.push(format!(
            "{} {}: {}",
            t.kind(),
            t.name,
            describe(&shape(rb, t.id), &got)
        ));
    }
    let total = compared + missing.len();
    println!(
        "{compared} of {total} named structs and unions compared, {} missing from the DWARF \
         result: {missing:?}",
        missing.len()
    );
    assert!(
        wrong.is_empty(),
        "{} of {compared} structs/unions differ from the kernel's BTF:\n  {}",
        wrong.len(),
        wrong.join("\n  ")
    );
    // Types declared inside functions are not converted (nothing at file scope can refer to
    // them); they are a handful.
    assert!(
        missing.len() * 100 <= total,
        "{} of {total} named structs/unions missing: {missing:?}",
        missing.len()
    );

    // Enums: the same enumerators with the same values.
    let mut enum_wrong = Vec::new();
    let mut enum_missing = Vec::new();
    let mut enums = 0;
    for t in rb.types() {
        if !matches!(t.kind(), Kind::Enum | Kind::Enum64) || t.name.is_empty() {
            continue;
        }
        enums += 1;
        let Some(id) = ob.find_enum(t.name) else {
            enum_missing.push(t.name.to_string());
            continue;
        };
        let values = |btf: &Btf, id| -> (u64, Vec<(String, i128)>) {
            let v = btf
                .enumerators(id)
                .unwrap()
                .map(|e| (e.name.to_string(), e.value))
                .collect();
            (btf.size_of(id).unwrap(), v)
        };
        let got = values(ob, id);
        let same = rb
            .find_all(t.name)
            .filter(|&v| matches!(rb.kind(v), Ok(Kind::Enum | Kind::Enum64)))
            .any(|v| values(rb, v) == got);
        if !same {
            enum_wrong.push(format!(
                "enum {}: {:?} vs {:?}",
                t.name,
                values(rb, t.id),
                got
            ));
        }
    }
    println!(
        "{enums} named enums, {} missing: {enum_missing:?}",
        enum_missing.len()
    );
    assert!(
        enum_wrong.is_empty(),
        "enums differ:\n  {}",
        enum_wrong.join("\n  ")
    );
    assert!(enum_missing.len() * 100 <= enums);

    // Typedefs: all there, naming types of the same size.
    let mut typedefs = 0;
    let mut typedef_wrong = Vec::new();
    for t in rb.types() {
        if t.kind() != Kind::Typedef {
            continue;
        }
        typedefs += 1;
        match ob.find_typedef(t.name) {
            None => typedef_wrong.push(format!("typedef {} missing", t.name)),
            Some(id) => {
                let (r, o) = (rb.size_of(t.id).ok(), ob.size_of(id).ok());
                if r != o {
                    typedef_wrong.push(format!("typedef {}: size {r:?} vs {o:?}", t.name));
                }
            }
        }
    }
    assert!(
        typedef_wrong.is_empty(),
        "{} of {typedefs} typedefs differ:\n  {}",
        typedef_wrong.len(),
        typedef_wrong.join("\n  ")
    );

    // What the product derives from types, identical either way.
    assert_eq!(
        TaskOffsets::from_types(&ours).unwrap(),
        TaskOffsets::from_types(&reference).unwrap()
    );
    assert_eq!(
        ModuleOffsets::from_types(&ours).unwrap(),
        ModuleOffsets::from_types(&reference).unwrap()
    );
    assert_eq!(
        PrintkLayout::from_btf(ob).unwrap(),
        PrintkLayout::from_btf(rb).unwrap()
    );
    for (ty, path) in [
        ("syscall_metadata", "name"),
        ("syscall_metadata", "syscall_nr"),
        ("ftrace_ops", "func"),
        ("ftrace_ops", "flags"),
        ("mm_struct", "pgd"),
        ("task_struct", "se.exec_start"),
        ("task_struct", "pid_links[1].next"),
        ("module", "mem"),
    ] {
        let (r, o) = (reference.offset_of(ty, path), ours.offset_of(ty, path));
        assert_eq!(r.is_ok(), o.is_ok(), "{ty}.{path}: {r:?} vs {o:?}");
        if let (Ok(r), Ok(o)) = (r, o) {
            assert_eq!(r, o, "{ty}.{path}");
        }
    }
    for name in [
        "task_struct",
        "module",
        "mm_struct",
        "list_head",
        "printk_ringbuffer",
    ] {
        assert_eq!(
            ours.size_of(name).unwrap(),
            reference.size_of(name).unwrap(),
            "sizeof {name}"
        );
    }
    assert_eq!(ob.enum_value("pid_type", "PIDTYPE_PID").unwrap(), 0);
    assert_eq!(ob.pointer_size(), 8);

    // The ISF export: the same structs with the same field offsets.
    let symbols = SymbolTable::new(Vec::new());
    let input = IsfInput {
        symbols: &symbols,
        kaslr_offset: 0,
        banner: None,
        release: "test",
        memory: None,
        sources: None,
    };
    let (isf_ref, isf_ours) = (
        build_isf(rb, &input).unwrap(),
        build_isf(ob, &input).unwrap(),
    );
    let offsets = |t: &kvmaccess_linux::isf::UserType| -> BTreeMap<String, u64> {
        t.fields
            .iter()
            .map(|(n, f)| (n.clone(), f.offset))
            .collect()
    };
    let mut isf_wrong = Vec::new();
    for name in [
        "task_struct",
        "module",
        "mm_struct",
        "list_head",
        "pid",
        "cred",
        "file",
    ] {
        let (r, o) = (&isf_ref.user_types[name], &isf_ours.user_types[name]);
        if r.size != o.size || offsets(r) != offsets(o) {
            isf_wrong.push(name);
        }
    }
    assert!(isf_wrong.is_empty(), "ISF user types differ: {isf_wrong:?}");
    println!(
        "ISF from DWARF: {} user types, {} enums, {} base types (from BTF: {}, {}, {})",
        isf_ours.user_types.len(),
        isf_ours.enums.len(),
        isf_ours.base_types.len(),
        isf_ref.user_types.len(),
        isf_ref.enums.len(),
        isf_ref.base_types.len()
    );
}
