#![allow(clippy::unwrap_used)]

use crate::encode::{BtfBuilder, HeaderOverride};
use crate::{Btf, Error, Kind, TypeId, TypeInfo};

/// Ids of interesting types in [`rich`].
struct Ids {
    int: TypeId,
    char_: TypeId,
    ulong: TypeId,
    list_head: TypeId,
    list_ptr: TypeId,
    comm: TypeId,
    task: TypeId,
    sched_entity: TypeId,
    u64_td: TypeId,
    cycle_a: TypeId,
    const_char_ptr: TypeId,
    flags_struct: TypeId,
    fn_ptr: TypeId,
    matrix: TypeId,
}

/// A small kernel-like type graph exercising every kind.
fn rich() -> (Vec<u8>, Ids) {
    let mut b = BtfBuilder::new();
    let int = b.int("int", 4, true);
    let char_ = b.char();
    let ulong = b.int("long unsigned int", 8, false);
    let ulonglong = b.int("long long unsigned int", 8, false);
    let u64_inner = b.typedef("__u64", ulonglong);
    let u64_td = b.typedef("u64", u64_inner);
    let list_head = TypeId(b.next_id().0 + 1);
    let list_ptr = b.ptr(list_head);
    b.struct_(
        "list_head",
        16,
        &[("next", list_ptr, 0, 0), ("prev", list_ptr, 64, 0)],
    );
    let idx = b.int("unsigned int", 4, false);
    let comm = b.array(char_, idx, 16);
    let sched_entity = b.struct_(
        "sched_entity",
        24,
        &[
            ("load", ulong, 0, 0),
            ("exec_start", u64_td, 64, 0),
            ("vruntime", u64_td, 128, 0),
        ],
    );
    // struct { int a:3; int b:5; int :0; unsigned long c; } with kind_flag encoding.
    let flags_struct = b.struct_(
        "flagged",
        16,
        &[
            ("a", int, 0, 3),
            ("b", int, 3, 5),
            ("", int, 8, 0),
            ("c", ulong, 64, 0),
        ],
    );
    // Like mm_struct: an anonymous struct holding pgd, itself inside an anonymous union.
    let anon_inner = b.struct_("", 16, &[("mmap_base", ulong, 0, 0), ("pgd", ulong, 64, 0)]);
    let anon_union = b.union_("", 16, &[("", anon_inner, 0, 0), ("raw", ulong, 0, 0)]);
    let const_char = b.const_(char_);
    let const_char_ptr = b.ptr(const_char);
    let proto = b.func_proto(int, &[("p", list_ptr), ("n", int)]);
    let fn_ptr = b.ptr(proto);
    let volatile_long = b.volatile(ulong);
    let task_ptr = b.next_id();
    let task = b.struct_(
        "task_struct",
        160,
        &[
            ("state", volatile_long, 0, 0),
            ("tasks", list_head, 64, 0),
            ("", anon_union, 192, 0),
            ("se", sched_entity, 320, 0),
            ("comm", comm, 512, 0),
            ("pid", int, 640, 0),
            ("tgid", int, 672, 0),
            ("real_parent", list_ptr, 704, 0),
            ("fn", fn_ptr, 768, 0),
            ("name", const_char_ptr, 832, 0),
            ("flags", flags_struct, 896, 0),
        ],
    );
    assert_eq!(task_ptr, task);
    let self_ptr = b.ptr(task);
    b.typedef("task_ptr_t", self_ptr);
    // typedef cycle: cycle_a -> cycle_b -> cycle_a
    let cycle_a = b.next_id();
    let cycle_b = TypeId(cycle_a.0 + 1);
    b.typedef("cycle_a", cycle_b);
    b.typedef("cycle_b", cycle_a);
    b.enum_(
        "pid_type",
        4,
        true,
        &[("PIDTYPE_PID", 0), ("PIDTYPE_TGID", 1), ("NEG", -5)],
    );
    b.enum_("", 4, false, &[("ANON_CONST", 0xffff_fff0)]);
    b.enum64("big", 8, false, &[("HUGE", 0xffff_ffff_0000_0001)]);
    b.enum64("sbig", 8, true, &[("MINUS", u64::MAX)]);
    b.fwd("opaque", false);
    b.func("do_thing", proto, 1);
    let var = b.var("jiffies", ulong, 1);
    b.datasec(".data", 8, &[(var, 0, 8)]);
    b.float("double", 8);
    b.decl_tag("tag", task, 1);
    let tagged = b.type_tag("rcu", list_ptr);
    b.restrict(tagged);
    let row = b.array(int, idx, 3);
    let matrix = b.array(row, idx, 2);
    let ids = Ids {
        int,
        char_,
        ulong,
        list_head,
        list_ptr,
        comm,
        task,
        sched_entity,
        u64_td,
        cycle_a,
        const_char_ptr,
        flags_struct,
        fn_ptr,
        matrix,
    };
    (b.build(), ids)
}

/// Exercises every query on every type, as the fuzz target does.
fn walk(btf: &Btf) {
    for t in btf.types() {
        let _ = btf.size_of(t.id);
        let _ = btf.resolve(t.id);
        let _ = btf.type_name(t.id);
        let _ = btf.kind(t.id);
        if let Ok(members) = btf.members(t.id) {
            for m in members {
                let _ = btf.size_of(m.type_id);
                let _ = btf.type_name(m.type_id);
                if !m.name.is_empty() {
                    let _ = btf.locate(t.id, m.name);
                }
            }
            let _ = btf.locate(t.id, "pgd");
            let _ = btf.locate(t.id, "a.b[1].c");
        }
        if let Ok(values) = btf.enumerators(t.id) {
            values.for_each(drop);
        }
        if let Ok(params) = btf.params(t.id) {
            params.for_each(drop);
        }
        let _ = btf.datasec_vars(t.id);
        if !t.name.is_empty() {
            let _ = btf.find_composite(t.name);
            let _ = btf.offset_of(t.name, "tasks");
        }
    }
    let _ = btf.enumerator_value("PIDTYPE_PID");
}

#[test]
fn parses_every_kind() {
    let (blob, ids) = rich();
    let btf = Btf::parse(&blob).unwrap();
    assert_eq!(btf.pointer_size(), 8);
    let kinds: Vec<Kind> = btf.types().map(|t| t.kind()).collect();
    for k in [
        Kind::Int,
        Kind::Ptr,
        Kind::Array,
        Kind::Struct,
        Kind::Union,
        Kind::Enum,
        Kind::Fwd,
        Kind::Typedef,
        Kind::Volatile,
        Kind::Const,
        Kind::Restrict,
        Kind::Func,
        Kind::FuncProto,
        Kind::Var,
        Kind::Datasec,
        Kind::Float,
        Kind::DeclTag,
        Kind::TypeTag,
        Kind::Enum64,
    ] {
        assert!(kinds.contains(&k), "{k} missing");
    }
    assert_eq!(btf.kind(TypeId::VOID).unwrap(), Kind::Void);
    assert_eq!(btf.find_struct("task_struct"), Some(ids.task));
    assert_eq!(btf.find_struct("list_head"), Some(ids.list_head));
    assert_eq!(btf.find_struct("nope"), None);
    assert_eq!(btf.find_union("task_struct"), None);
    assert!(btf.find_typedef("u64").is_some());
    assert!(btf.find_enum("big").is_some());
    assert!(btf.find(Kind::Fwd, "opaque").is_some());
    assert_eq!(btf.name(ids.task).unwrap(), "task_struct");
    assert!(matches!(
        btf.kind(TypeId(100_000)),
        Err(Error::NoSuchId {
            id: TypeId(100_000),
            ..
        })
    ));
    walk(&btf);
}

#[test]
fn sizes_and_resolution() {
    let (blob, ids) = rich();
    let btf = Btf::parse(&blob).unwrap();
    assert_eq!(btf.size_of(ids.list_head).unwrap(), 16);
    assert_eq!(btf.size_of(ids.list_ptr).unwrap(), 8);
    assert_eq!(btf.size_of(ids.comm).unwrap(), 16);
    assert_eq!(btf.size_of(ids.u64_td).unwrap(), 8);
    assert_eq!(btf.size_of(ids.matrix).unwrap(), 24);
    assert_eq!(btf.size_of(ids.task).unwrap(), 160);
    assert!(matches!(
        btf.size_of(TypeId::VOID),
        Err(Error::NoSize { .. })
    ));
    let opaque = btf.find(Kind::Fwd, "opaque").unwrap();
    assert!(matches!(
        btf.size_of(opaque),
        Err(Error::NoSize {
            kind: Kind::Fwd,
            ..
        })
    ));
    let ull = btf.resolve(ids.u64_td).unwrap();
    assert_eq!(btf.name(ull).unwrap(), "long long unsigned int");
    let TypeInfo::Int(int) = btf.info(ull).unwrap() else {
        panic!("not an int")
    };
    assert!(!int.signed);
    assert_eq!((int.size, int.bits), (8, 64));
    let TypeInfo::Int(c) = btf.info(ids.char_).unwrap() else {
        panic!("not an int")
    };
    assert!(c.is_char && c.signed);
    assert_eq!(btf.resolve(ids.int).unwrap(), ids.int);
}

#[test]
fn typedef_cycle_is_bounded() {
    let (blob, ids) = rich();
    let btf = Btf::parse(&blob).unwrap();
    assert!(matches!(
        btf.resolve(ids.cycle_a),
        Err(Error::TooDeep { .. })
    ));
    assert!(matches!(
        btf.size_of(ids.cycle_a),
        Err(Error::TooDeep { .. })
    ));
    // A name needs only the typedef's own name, so the cycle is not followed.
    assert_eq!(btf.type_name(ids.cycle_a).unwrap(), "cycle_a");
    assert!(matches!(
        btf.members(ids.cycle_a),
        Err(Error::TooDeep { .. })
    ));

    let mut b = BtfBuilder::new();
    let own = b.next_id();
    b.typedef("self", own);
    let c = b.next_id();
    b.const_(TypeId(c.0 + 1));
    b.volatile(c);
    let p = b.next_id();
    b.ptr(p);
    let btf = Btf::parse(&b.build()).unwrap();
    assert!(matches!(btf.resolve(own), Err(Error::TooDeep { .. })));
    assert!(matches!(btf.size_of(c), Err(Error::TooDeep { .. })));
    assert!(matches!(btf.type_name(c), Err(Error::TooDeep { .. })));
    assert!(matches!(btf.type_name(p), Err(Error::TooDeep { .. })));
    // A self-pointer has a size: a pointer's size does not depend on its target.
    assert_eq!(btf.size_of(p).unwrap(), 8);
    walk(&btf);
}

#[test]
fn members_and_bitfields() {
    let (blob, ids) = rich();
    let btf = Btf::parse(&blob).unwrap();
    let m: Vec<_> = btf.members(ids.flags_struct).unwrap().collect();
    assert_eq!(m.len(), 4);
    assert_eq!(
        (m[0].name, m[0].bit_offset, m[0].bitfield_size),
        ("a", 0, 3)
    );
    assert_eq!(
        (m[1].name, m[1].bit_offset, m[1].bitfield_size),
        ("b", 3, 5)
    );
    assert_eq!((m[2].name, m[2].bitfield_size), ("", 0));
    assert_eq!(
        (m[3].name, m[3].bit_offset, m[3].bitfield_size),
        ("c", 64, 0)
    );
    let loc = btf.locate(ids.task, "flags.b").unwrap();
    assert_eq!((loc.bit_offset, loc.bitfield_size), (896 + 3, 5));
    assert!(matches!(
        btf.offset_of("task_struct", "flags.b"),
        Err(Error::NotByteAligned {
            bit_offset: 899,
            bitfield_size: 5,
            ..
        })
    ));
    assert_eq!(btf.offset_of("task_struct", "flags.c").unwrap(), 112 + 8);
    let task: Vec<_> = btf.members(ids.task).unwrap().map(|m| m.name).collect();
    assert_eq!(task[..3], ["state", "tasks", ""]);
    assert!(matches!(
        btf.members(ids.int),
        Err(Error::NotComposite { .. })
    ));
}

#[test]
fn offsets_and_paths() {
    let (blob, ids) = rich();
    let btf = Btf::parse(&blob).unwrap();
    assert_eq!(btf.member_offset("task_struct", "tasks").unwrap(), 8);
    assert_eq!(btf.member_offset("task_struct", "comm").unwrap(), 64);
    assert_eq!(btf.member_offset("task_struct", "pid").unwrap(), 80);
    assert_eq!(btf.member_offset("task_struct", "tgid").unwrap(), 84);
    // Inside an anonymous struct inside an anonymous union at byte 24.
    assert_eq!(btf.member_offset("task_struct", "pgd").unwrap(), 32);
    assert_eq!(btf.member_offset("task_struct", "mmap_base").unwrap(), 24);
    assert_eq!(btf.member_offset("task_struct", "raw").unwrap(), 24);
    assert_eq!(btf.offset_of("task_struct", "se.exec_start").unwrap(), 48);
    assert_eq!(btf.offset_of("task_struct", "tasks.prev").unwrap(), 16);
    assert_eq!(btf.offset_of("task_struct", "comm[3]").unwrap(), 67);
    // A typedef of a pointer is not a struct: no implicit dereference.
    assert!(matches!(
        btf.offset_of("task_ptr_t", "tasks"),
        Err(Error::NotComposite {
            kind: Kind::Ptr,
            ..
        })
    ));
    let loc = btf.locate(ids.task, "se").unwrap();
    assert_eq!(loc.type_id, ids.sched_entity);
    assert_eq!(loc.byte_offset(), Some(40));

    let mut b = BtfBuilder::new();
    let int = b.int("int", 4, true);
    let idx = b.int("unsigned int", 4, false);
    let row = b.array(int, idx, 3);
    let matrix = b.array(row, idx, 2);
    b.struct_("m", 28, &[("x", int, 0, 0), ("grid", matrix, 32, 0)]);
    let btf2 = Btf::parse(&b.build()).unwrap();
    assert_eq!(btf2.offset_of("m", "grid[1][2]").unwrap(), 4 + 12 + 8);
    assert!(matches!(
        btf2.offset_of("m", "grid[2]"),
        Err(Error::BadIndex { index: 2, .. })
    ));
    assert!(matches!(
        btf2.offset_of("m", "x[0]"),
        Err(Error::BadIndex { .. })
    ));
    assert!(matches!(
        btf2.offset_of("m", "grid[x]"),
        Err(Error::InvalidPath { .. })
    ));
    assert!(matches!(
        btf2.offset_of("m", "grid[1"),
        Err(Error::InvalidPath { .. })
    ));
    assert!(matches!(
        btf2.offset_of("m", "grid[1]z"),
        Err(Error::InvalidPath { .. })
    ));
    assert!(matches!(
        btf2.offset_of("m", ""),
        Err(Error::InvalidPath { .. })
    ));
    assert!(matches!(
        btf2.offset_of("m", "x..y"),
        Err(Error::InvalidPath { .. })
    ));
    assert!(matches!(
        btf2.offset_of("m", "x.y"),
        Err(Error::NotComposite { .. })
    ));
    assert!(matches!(
        btf2.member_offset("m", "grid[1]"),
        Err(Error::InvalidPath { .. })
    ));

    let err = btf.offset_of("task_struct", "nope").unwrap_err();
    assert!(matches!(err, Error::MemberNotFound { .. }));
    assert!(err.to_string().contains("struct task_struct"), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
    assert!(matches!(
        btf.offset_of("no_such_struct", "x"),
        Err(Error::TypeNotFound { .. })
    ));
}

#[test]
fn enums() {
    let (blob, _) = rich();
    let btf = Btf::parse(&blob).unwrap();
    assert_eq!(btf.enum_value("pid_type", "PIDTYPE_PID").unwrap(), 0);
    assert_eq!(btf.enum_value("pid_type", "PIDTYPE_TGID").unwrap(), 1);
    assert_eq!(btf.enum_value("pid_type", "NEG").unwrap(), -5);
    assert_eq!(
        btf.enum_value("big", "HUGE").unwrap(),
        0xffff_ffff_0000_0001
    );
    assert_eq!(btf.enum_value("sbig", "MINUS").unwrap(), -1);
    assert_eq!(btf.enumerator_value("ANON_CONST"), Some(0xffff_fff0));
    assert_eq!(btf.enumerator_value("MISSING"), None);
    assert!(matches!(
        btf.enum_value("pid_type", "PIDTYPE_MAX"),
        Err(Error::EnumeratorNotFound { .. })
    ));
    assert!(matches!(
        btf.enum_value("nope", "X"),
        Err(Error::TypeNotFound { .. })
    ));
    let id = btf.find_enum("pid_type").unwrap();
    assert_eq!(btf.enumerators(id).unwrap().len(), 3);
    assert!(matches!(
        btf.info(id).unwrap(),
        TypeInfo::Enum {
            size: 4,
            vlen: 3,
            signed: true
        }
    ));
}

#[test]
fn c_names() {
    let (blob, ids) = rich();
    let btf = Btf::parse(&blob).unwrap();
    let name = |id| btf.type_name(id).unwrap();
    assert_eq!(name(ids.list_ptr), "struct list_head *");
    assert_eq!(name(ids.comm), "char [16]");
    assert_eq!(name(ids.const_char_ptr), "const char *");
    assert_eq!(name(ids.fn_ptr), "int (*)(struct list_head *, int)");
    assert_eq!(name(ids.matrix), "int [2][3]");
    assert_eq!(name(ids.ulong), "long unsigned int");
    assert_eq!(name(TypeId::VOID), "void");
    let anon = btf.members(ids.task).unwrap().nth(2).unwrap().type_id;
    assert_eq!(name(anon), "union {...}");
    let func = btf.find(Kind::Func, "do_thing").unwrap();
    assert_eq!(name(func), "int do_thing(struct list_head *, int)");
    let restrict = btf.types().find(|t| t.kind() == Kind::Restrict).unwrap().id;
    assert_eq!(name(restrict), "struct list_head *restrict");

    let mut b = BtfBuilder::new();
    let char_ = b.char();
    let idx = b.int("unsigned int", 4, false);
    let arr = b.array(char_, idx, 16);
    let parr = b.ptr(arr);
    let pp = b.ptr(char_);
    let cpp = b.const_(pp);
    let ppc = b.ptr(cpp);
    let void_fn = b.func_proto(TypeId::VOID, &[]);
    let variadic = b.func_proto(idx, &[("fmt", pp), ("", TypeId::VOID)]);
    let pv = b.ptr(variadic);
    let btf = Btf::parse(&b.build()).unwrap();
    let name = |id| btf.type_name(id).unwrap();
    assert_eq!(name(parr), "char (*)[16]");
    assert_eq!(name(cpp), "char *const");
    assert_eq!(name(ppc), "char *const *");
    assert_eq!(name(void_fn), "void (void)");
    assert_eq!(name(pv), "unsigned int (*)(char *, ...)");
}

#[test]
fn name_explosion_is_bounded() {
    // Each prototype takes 200 pointers to the next one: naming the first would need 200^n steps.
    let mut b = BtfBuilder::new();
    let first = b.next_id();
    for level in 0..10u32 {
        let next_ptr = TypeId(first.0 + 2 * level + 3);
        let params: Vec<(&str, TypeId)> = (0..200).map(|_| ("", next_ptr)).collect();
        b.func_proto(TypeId::VOID, &params);
        b.ptr(TypeId(first.0 + 2 * level));
    }
    let int = b.int("int", 4, true);
    b.func_proto(int, &[]);
    let btf = Btf::parse(&b.build()).unwrap();
    assert!(matches!(
        btf.type_name(first),
        Err(Error::TooComplex { .. })
    ));
}

#[test]
fn anonymous_member_graphs_are_bounded() {
    // Anonymous members that contain themselves, and a 60-level DAG where every level holds
    // two anonymous members of the next: without a visited set a miss would cost 2^60 steps.
    let mut b = BtfBuilder::new();
    let me = b.next_id();
    b.struct_("selfish", 8, &[("", me, 0, 0), ("", me, 0, 0)]);
    let int = b.int("int", 4, true);
    let base = b.next_id();
    for level in 0..60u32 {
        let next = TypeId(base.0 + level + 1);
        b.struct_(
            &format!("l{level}"),
            8,
            &[("", next, 0, 0), ("", next, 0, 0)],
        );
    }
    b.struct_("l60", 8, &[("x", int, 32, 0)]);
    let btf = Btf::parse(&b.build()).unwrap();
    assert!(matches!(
        btf.offset_of("selfish", "missing"),
        Err(Error::MemberNotFound { .. })
    ));
    assert!(matches!(
        btf.offset_of("l0", "missing"),
        Err(Error::MemberNotFound { .. })
    ));
    assert_eq!(btf.offset_of("l0", "x").unwrap(), 4);

    // Deeper than MAX_DEPTH anonymous nesting is refused, not recursed into.
    let mut b = BtfBuilder::new();
    let int = b.int("int", 4, true);
    let base = b.next_id();
    for level in 0..100u32 {
        b.struct_(
            &format!("d{level}"),
            8,
            &[("", TypeId(base.0 + level + 1), 0, 0)],
        );
    }
    b.struct_("d100", 8, &[("x", int, 0, 0)]);
    let btf = Btf::parse(&b.build()).unwrap();
    assert!(matches!(
        btf.offset_of("d0", "x"),
        Err(Error::TooDeep { .. })
    ));
    assert_eq!(btf.offset_of("d50", "x").unwrap(), 0);
}

#[test]
fn array_size_overflow() {
    let mut b = BtfBuilder::new();
    let int = b.int("int", 4, true);
    let a = b.array(int, int, u32::MAX);
    let aa = b.array(a, int, u32::MAX);
    let aaa = b.array(aa, int, u32::MAX);
    let btf = Btf::parse(&b.build()).unwrap();
    assert_eq!(btf.size_of(a).unwrap(), 4 * u64::from(u32::MAX));
    assert!(matches!(btf.size_of(aaa), Err(Error::Overflow { .. })));
}

#[test]
fn header_errors() {
    let (blob, _) = rich();
    let mut bad = blob.clone();
    bad[0] = 0;
    assert!(matches!(Btf::parse(&bad), Err(Error::BadMagic { .. })));
    let mut be = blob.clone();
    be.swap(0, 1);
    assert!(matches!(Btf::parse(&be), Err(Error::BigEndian)));
    let mut v = blob.clone();
    v[2] = 2;
    assert!(matches!(Btf::parse(&v), Err(Error::UnsupportedVersion(2))));
    let mut f = blob.clone();
    f[3] = 1;
    assert!(matches!(Btf::parse(&f), Err(Error::UnsupportedFlags(1))));
    assert!(matches!(Btf::parse(&[]), Err(Error::TooShort { .. })));

    let b = BtfBuilder::new();
    let huge = |o| Btf::parse(&b.build_with(o));
    assert!(matches!(
        huge(HeaderOverride {
            type_len: Some(0xffff_fff0),
            ..Default::default()
        }),
        Err(Error::SectionOutOfBounds {
            section: "type",
            ..
        })
    ));
    assert!(matches!(
        huge(HeaderOverride {
            str_off: Some(u32::MAX),
            ..Default::default()
        }),
        Err(Error::SectionOutOfBounds {
            section: "string",
            ..
        })
    ));
    assert!(matches!(
        huge(HeaderOverride {
            hdr_len: Some(u32::MAX),
            ..Default::default()
        }),
        Err(Error::BadHeaderLen { .. })
    ));
    assert!(matches!(
        huge(HeaderOverride {
            hdr_len: Some(8),
            ..Default::default()
        }),
        Err(Error::BadHeaderLen { .. })
    ));
    assert!(matches!(
        huge(HeaderOverride {
            str_len: Some(0),
            ..Default::default()
        }),
        Err(Error::BadStringSection(_))
    ));
    // A blob with no types is valid.
    let empty = Btf::parse(&b.build()).unwrap();
    assert_eq!(empty.type_count(), 0);
}

#[test]
fn overlapping_and_misaligned_sections() {
    let mut b = BtfBuilder::new();
    b.int("int", 4, true);
    let blob = b.build_with(HeaderOverride {
        str_off: Some(4),
        str_len: Some(1),
        ..Default::default()
    });
    assert!(matches!(
        Btf::parse(&blob),
        Err(Error::SectionsOverlap { .. })
    ));
    let blob = b.build_with(HeaderOverride {
        type_len: Some(15),
        ..Default::default()
    });
    assert!(matches!(
        Btf::parse(&blob),
        Err(Error::TypeSectionMisaligned(15))
    ));
}

#[test]
fn truncated_at_every_byte() {
    let (blob, _) = rich();
    for cut in 0..blob.len() {
        assert!(Btf::parse(&blob[..cut]).is_err(), "cut at {cut} parsed");
    }
    // Shrink the type section in the header instead, so the cut lands inside records.
    let type_len = u32::from_le_bytes(blob[12..16].try_into().unwrap());
    let mut errors = 0;
    for cut in (0..type_len).step_by(4) {
        let mut short = blob.clone();
        short[12..16].copy_from_slice(&cut.to_le_bytes());
        match Btf::parse(&short) {
            Ok(btf) => walk(&btf),
            Err(_) => errors += 1,
        }
    }
    assert!(errors > 0);
}

#[test]
fn vlen_too_large() {
    let mut b = BtfBuilder::new();
    let int = b.int("int", 4, true);
    b.raw("s", 4, false, 0xffff, 8, &[0, int.0, 0]);
    match Btf::parse(&b.build()) {
        Err(Error::Truncated { id, need, .. }) => {
            assert_eq!(id, TypeId(2));
            assert_eq!(need, 12 + 0xffff * 12);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_string_offsets() {
    let mut b = BtfBuilder::new();
    b.raw_off(10_000, 1, false, 0, 4, &[32]);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::BadStringOffset {
            offset: 10_000,
            id: TypeId(1),
            ..
        })
    ));
    // A member name out of bounds.
    let mut b = BtfBuilder::new();
    let int = b.int("int", 4, true);
    b.raw("s", 4, false, 1, 4, &[0xdead, int.0, 0]);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::BadStringOffset {
            offset: 0xdead,
            id: TypeId(2),
            ..
        })
    ));
    // An offset into the middle of a multi-byte character.
    let mut b = BtfBuilder::new();
    let off = b.string("é");
    b.raw_off(off + 1, 1, false, 0, 4, &[32]);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::BadStringOffset { .. })
    ));
    // Strings that are not UTF-8, or not NUL-terminated at the end.
    let mut b = BtfBuilder::new();
    b.int("in\u{7f}", 4, true);
    let mut blob = b.build();
    let n = blob.len();
    blob[n - 2] = 0xff;
    assert!(matches!(Btf::parse(&blob), Err(Error::BadStringSection(_))));
    blob[n - 1] = b'x';
    assert!(matches!(Btf::parse(&blob), Err(Error::BadStringSection(_))));
}

#[test]
fn dangling_type_ids() {
    let mut b = BtfBuilder::new();
    b.ptr(TypeId(999));
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::DanglingReference {
            id: TypeId(1),
            target: 999,
            max: 1
        })
    ));
    let mut b = BtfBuilder::new();
    let int = b.int("int", 4, true);
    b.struct_("s", 4, &[("a", int, 0, 0), ("b", TypeId(7), 0, 0)]);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::DanglingReference { target: 7, .. })
    ));
    let mut b = BtfBuilder::new();
    let int = b.int("int", 4, true);
    b.array(int, TypeId(50), 1);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::DanglingReference { target: 50, .. })
    ));
    let mut b = BtfBuilder::new();
    b.func_proto(TypeId::VOID, &[("x", TypeId(3))]);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::DanglingReference { target: 3, .. })
    ));
}

#[test]
fn unknown_kind_and_invalid_fields() {
    let mut b = BtfBuilder::new();
    b.raw("x", 20, false, 0, 0, &[]);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::UnknownKind { kind: 20, .. })
    ));
    let mut b = BtfBuilder::new();
    b.raw("x", 0, false, 0, 0, &[]);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::UnknownKind { kind: 0, .. })
    ));
    let mut b = BtfBuilder::new();
    b.raw("int", 1, false, 0, 3, &[24]);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::InvalidType {
            kind: Kind::Int,
            ..
        })
    ));
    let mut b = BtfBuilder::new();
    b.raw("int", 1, false, 0, 4, &[33]);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::InvalidType {
            kind: Kind::Int,
            ..
        })
    ));
    let mut b = BtfBuilder::new();
    b.enum_("e", 3, false, &[]);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(Error::InvalidType {
            kind: Kind::Enum,
            ..
        })
    ));
}

#[test]
fn many_types_are_counted() {
    let mut b = BtfBuilder::new();
    for i in 0..10_000 {
        b.int(&format!("i{i}"), 4, false);
    }
    let btf = Btf::parse(&b.build()).unwrap();
    assert_eq!(btf.type_count(), 10_000);
    assert_eq!(btf.types().len(), 10_000);
    assert_eq!(btf.find(Kind::Int, "i9999"), Some(TypeId(10_000)));
    assert_eq!(btf.find(Kind::Int, "i0"), Some(TypeId(1)));
}

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }
}

#[test]
fn random_mutations_never_panic() {
    let (blob, _) = rich();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut parsed = 0;
    for _ in 0..20_000 {
        let mut m = blob.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(m.len());
            // Mix bit flips with "interesting" values that hit limits and ids.
            m[i] = match rng.below(4) {
                0 => m[i] ^ (1 << rng.below(8)),
                1 => 0xff,
                2 => 0,
                _ => u8::try_from(rng.below(256)).unwrap(),
            };
        }
        if let Ok(btf) = Btf::parse(&m) {
            parsed += 1;
            walk(&btf);
        }
    }
    // Mutations in names and offsets mostly keep the blob valid: the walk was really exercised.
    assert!(parsed > 1000, "only {parsed} mutants parsed");
}

#[test]
fn host_kernel_btf_if_present() {
    let Ok(blob) = std::fs::read("/sys/kernel/btf/vmlinux") else {
        eprintln!("no /sys/kernel/btf/vmlinux on this host; nothing to check");
        return;
    };
    let t = std::time::Instant::now();
    let btf = Btf::parse(&blob).unwrap();
    eprintln!(
        "host BTF: {} types parsed in {:?}",
        btf.type_count(),
        t.elapsed()
    );
    let task = btf.find_struct("task_struct").unwrap();
    let size = btf.size_of(task).unwrap();
    for member in ["tasks", "comm", "pid", "tgid", "real_parent", "mm"] {
        let off = btf.member_offset("task_struct", member).unwrap();
        assert!(off > 0 && off < size, "{member} at {off}");
    }
    assert!(btf.offset_of("mm_struct", "pgd").is_ok());
    assert_eq!(
        btf.size_of(btf.find_struct("list_head").unwrap()).unwrap(),
        16
    );
    for t in btf.types() {
        let _ = btf.size_of(t.id);
        let _ = btf.type_name(t.id);
    }
}

#[test]
fn name_index_hint_is_used_only_when_exact() {
    let mut b = BtfBuilder::new();
    let int = b.int("int", 4, true);
    b.struct_("b_struct", 4, &[("x", int, 0, 0)]);
    b.struct_("a_struct", 4, &[("y", int, 0, 0)]);
    b.typedef("a_struct", int);
    let blob = b.build();
    let plain = Btf::parse(&blob).unwrap();
    let index = plain.name_index().to_vec();
    assert_eq!(index.len(), 4);
    let (hinted, used) = Btf::parse_with_name_index(&blob, &index).unwrap();
    assert!(used);
    assert_eq!(hinted.name_index(), plain.name_index());
    assert_eq!(
        hinted.find_struct("a_struct"),
        plain.find_struct("a_struct")
    );

    let mut swapped = index.clone();
    swapped.swap(0, 1);
    let mut repeated = index.clone();
    repeated[1] = repeated[0];
    let mut out_of_range = index.clone();
    out_of_range[3] = 1000;
    let mut unnamed = index.clone();
    unnamed[0] = 0; // void has no name
    let bad = [
        swapped,
        repeated,
        out_of_range,
        unnamed,
        index[1..].to_vec(),
        [index.as_slice(), &[2]].concat(),
    ];
    for hint in bad {
        let (parsed, used) = Btf::parse_with_name_index(&blob, &hint).unwrap();
        assert!(!used, "{hint:?}");
        assert_eq!(parsed.name_index(), plain.name_index());
    }
}

#[test]
fn host_kernel_btf_name_index_round_trips() {
    let Ok(blob) = std::fs::read("/sys/kernel/btf/vmlinux") else {
        return;
    };
    let t = std::time::Instant::now();
    let plain = Btf::parse(&blob).unwrap();
    let sorted = t.elapsed();
    let t = std::time::Instant::now();
    let (hinted, used) = Btf::parse_with_name_index(&blob, plain.name_index()).unwrap();
    eprintln!(
        "host BTF: parse {sorted:?}, with the name index as a hint {:?}",
        t.elapsed()
    );
    assert!(used);
    assert_eq!(hinted.name_index(), plain.name_index());
}
