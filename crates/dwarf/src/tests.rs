//! Hand-assembled DWARF: deduplication rules, limits and hostile input. The C compiler tests
//! (tests/c_compiler.rs) cover what real compilers emit.

use gimli::constants as dw;
use kvmaccess_btf::{Btf, Kind, TypeInfo};

use crate::{btf_from_elf, btf_from_sections, Error, Limits, Sections};

/// Attribute forms the assembler writes.
#[derive(Clone, Copy)]
enum Form {
    /// Inline string.
    Str,
    Data1,
    Data8,
    Sdata,
    /// A reference to DIE number n of the same unit (resolved at assembly).
    Ref4,
    Flag,
}

#[derive(Clone, Copy)]
enum Attr {
    Name(&'static str),
    Size(u8),
    Encoding(dw::DwAte),
    Type(usize),
    Location(u8),
    UpperBound(u64),
    Const(i64),
    Declaration,
    DataBitOffset(u8),
    BitSize(u8),
}

impl Attr {
    fn spec(self) -> (dw::DwAt, Form) {
        match self {
            Attr::Name(_) => (dw::DW_AT_name, Form::Str),
            Attr::Size(_) => (dw::DW_AT_byte_size, Form::Data1),
            Attr::Encoding(_) => (dw::DW_AT_encoding, Form::Data1),
            Attr::Type(_) => (dw::DW_AT_type, Form::Ref4),
            Attr::Location(_) => (dw::DW_AT_data_member_location, Form::Data1),
            Attr::UpperBound(_) => (dw::DW_AT_upper_bound, Form::Data8),
            Attr::Const(_) => (dw::DW_AT_const_value, Form::Sdata),
            Attr::Declaration => (dw::DW_AT_declaration, Form::Flag),
            Attr::DataBitOffset(_) => (dw::DW_AT_data_bit_offset, Form::Data1),
            Attr::BitSize(_) => (dw::DW_AT_bit_size, Form::Data1),
        }
    }
}

/// A DIE: tag, attributes, children.
struct Die {
    tag: dw::DwTag,
    attrs: Vec<Attr>,
    children: Vec<Die>,
}

fn die(tag: dw::DwTag, attrs: &[Attr], children: Vec<Die>) -> Die {
    Die {
        tag,
        attrs: attrs.to_vec(),
        children,
    }
}

fn uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = u8::try_from(v & 0x7f).unwrap();
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn sleb(out: &mut Vec<u8>, mut v: i64) {
    loop {
        let byte = u8::try_from(v & 0x7f).unwrap();
        v >>= 7;
        if (v == 0 && byte & 0x40 == 0) || (v == -1 && byte & 0x40 != 0) {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Assembles DWARF 4 units (one abbreviation per DIE, all in one table) whose root is a C
/// compile unit holding `dies`. `Attr::Type(n)` refers to the n-th DIE of its unit in
/// pre-order (0 is the first child of the unit DIE).
struct Assembler {
    abbrev: Vec<u8>,
    info: Vec<u8>,
    next_code: u64,
}

impl Assembler {
    fn new() -> Self {
        Assembler {
            abbrev: Vec::new(),
            info: Vec::new(),
            next_code: 1,
        }
    }

    fn abbreviation(&mut self, tag: dw::DwTag, children: bool, specs: &[(dw::DwAt, Form)]) -> u64 {
        let code = self.next_code;
        self.next_code += 1;
        uleb(&mut self.abbrev, code);
        uleb(&mut self.abbrev, u64::from(tag.0));
        self.abbrev.push(u8::from(children));
        for &(at, form) in specs {
            uleb(&mut self.abbrev, u64::from(at.0));
            let f = match form {
                Form::Str => dw::DW_FORM_string,
                Form::Data1 => dw::DW_FORM_data1,
                Form::Data8 => dw::DW_FORM_data8,
                Form::Sdata => dw::DW_FORM_sdata,
                Form::Ref4 => dw::DW_FORM_ref4,
                Form::Flag => dw::DW_FORM_flag_present,
            };
            uleb(&mut self.abbrev, u64::from(f.0));
        }
        self.abbrev.extend_from_slice(&[0, 0]);
        code
    }

    fn unit(&mut self, dies: &[Die]) {
        // References are fixed-size, so a first pass learns the DIE offsets and a second one
        // writes them.
        let mut offsets = Vec::new();
        self.encode(dies, &mut offsets, None);
        let body = self.encode(dies, &mut Vec::new(), Some(&offsets));
        let mut unit = Vec::new();
        unit.extend_from_slice(&4u16.to_le_bytes());
        unit.extend_from_slice(&0u32.to_le_bytes());
        unit.push(8);
        unit.extend_from_slice(&body);
        let len = u32::try_from(unit.len()).unwrap();
        self.info.extend_from_slice(&len.to_le_bytes());
        self.info.extend_from_slice(&unit);
    }

    /// The unit DIE and its subtree; `offsets` collects unit offsets of the children in
    /// pre-order; `targets` resolves references (None on the sizing pass).
    fn encode(
        &mut self,
        dies: &[Die],
        offsets: &mut Vec<usize>,
        targets: Option<&[usize]>,
    ) -> Vec<u8> {
        // Abbreviation codes are re-created on each pass: reset so both passes agree.
        self.abbrev.clear();
        self.next_code = 1;
        let mut out = Vec::new();
        let root = self.abbreviation(
            dw::DW_TAG_compile_unit,
            true,
            &[(dw::DW_AT_language, Form::Data1)],
        );
        uleb(&mut out, root);
        out.push(u8::try_from(dw::DW_LANG_C99.0).unwrap());
        for d in dies {
            self.encode_die(d, &mut out, offsets, targets);
        }
        out.push(0);
        out
    }

    fn encode_die(
        &mut self,
        d: &Die,
        out: &mut Vec<u8>,
        offsets: &mut Vec<usize>,
        targets: Option<&[usize]>,
    ) {
        // Unit offsets count the 11-byte DWARF 4 header.
        offsets.push(out.len() + 11);
        let specs: Vec<_> = d.attrs.iter().map(|a| a.spec()).collect();
        let code = self.abbreviation(d.tag, !d.children.is_empty(), &specs);
        uleb(out, code);
        for a in &d.attrs {
            match *a {
                Attr::Name(s) => {
                    out.extend_from_slice(s.as_bytes());
                    out.push(0);
                }
                Attr::Size(v) | Attr::Location(v) | Attr::DataBitOffset(v) | Attr::BitSize(v) => {
                    out.push(v)
                }
                Attr::Encoding(e) => out.push(e.0),
                Attr::Type(n) => {
                    let target = targets.map_or(0, |t| t.get(n).copied().unwrap_or(0xffff_fff0));
                    out.extend_from_slice(&u32::try_from(target).unwrap().to_le_bytes());
                }
                Attr::UpperBound(v) => out.extend_from_slice(&v.to_le_bytes()),
                Attr::Const(v) => sleb(out, v),
                Attr::Declaration => {}
            }
        }
        if !d.children.is_empty() {
            for c in &d.children {
                self.encode_die(c, out, offsets, targets);
            }
            out.push(0);
        }
    }
}

/// One unit's worth of DIEs, assembled.
fn assemble(units: &[Vec<Die>]) -> (Vec<u8>, Vec<u8>) {
    let mut info = Vec::new();
    let mut abbrevs = Vec::new();
    // Each unit has its own abbreviation table; units are concatenated with the right
    // debug_abbrev_offset patched in.
    for dies in units {
        let mut a = Assembler::new();
        a.unit(dies);
        let abbrev_offset = u32::try_from(abbrevs.len()).unwrap();
        let mut unit = a.info.clone();
        unit[6..10].copy_from_slice(&abbrev_offset.to_le_bytes());
        abbrevs.extend_from_slice(&a.abbrev);
        abbrevs.push(0);
        info.extend_from_slice(&unit);
    }
    (info, abbrevs)
}

fn convert(units: &[Vec<Die>], limits: &Limits) -> Result<Btf, Error> {
    let (info, abbrev) = assemble(units);
    let sections = Sections {
        debug_info: &info,
        debug_abbrev: &abbrev,
        ..Sections::default()
    };
    let conversion = btf_from_sections(&sections, limits)?;
    Ok(Btf::parse(&conversion.btf).expect("the converter always produces valid BTF"))
}

fn int() -> Die {
    die(
        dw::DW_TAG_base_type,
        &[
            Attr::Name("int"),
            Attr::Size(4),
            Attr::Encoding(dw::DW_ATE_signed),
        ],
        vec![],
    )
}

fn member(name: &'static str, ty: usize, at: u8) -> Die {
    die(
        dw::DW_TAG_member,
        &[Attr::Name(name), Attr::Type(ty), Attr::Location(at)],
        vec![],
    )
}

/// `struct list { struct list *next; int n; }` with its pieces at DIE indexes 0..=4:
/// 0 int, 1 struct list, 2 member next, 3 member n, 4 pointer.
fn list_unit() -> Vec<Die> {
    vec![
        int(),
        die(
            dw::DW_TAG_structure_type,
            &[Attr::Name("list"), Attr::Size(16)],
            vec![member("next", 4, 0), member("n", 0, 8)],
        ),
        die(
            dw::DW_TAG_pointer_type,
            &[Attr::Size(8), Attr::Type(1)],
            vec![],
        ),
    ]
}

#[test]
fn a_self_referencing_struct() {
    let btf = convert(&[list_unit()], &Limits::default()).unwrap();
    assert_eq!(btf.offset_of("list", "n").unwrap(), 8);
    let next = btf
        .locate(btf.find_struct("list").unwrap(), "next")
        .unwrap();
    assert_eq!(btf.type_name(next.type_id).unwrap(), "struct list *");
    assert_eq!(btf.size_of(btf.find_struct("list").unwrap()).unwrap(), 16);
}

#[test]
fn units_share_types_and_declarations_resolve_to_later_definitions() {
    // Unit 1 only declares `struct later` and points at it; unit 2 defines it. Both define
    // `struct list` and `int`.
    let unit1 = vec![
        int(),
        die(
            dw::DW_TAG_structure_type,
            &[Attr::Name("later"), Attr::Declaration],
            vec![],
        ),
        die(
            dw::DW_TAG_pointer_type,
            &[Attr::Size(8), Attr::Type(1)],
            vec![],
        ),
        die(
            dw::DW_TAG_structure_type,
            &[Attr::Name("holder"), Attr::Size(8)],
            vec![member("p", 2, 0)],
        ),
    ];
    let mut unit2 = list_unit();
    unit2.push(die(
        dw::DW_TAG_structure_type,
        &[Attr::Name("later"), Attr::Size(4)],
        vec![member("x", 0, 0)],
    ));
    let btf = convert(&[unit1, list_unit(), unit2], &Limits::default()).unwrap();
    assert_eq!(btf.find_all("int").count(), 1);
    assert_eq!(btf.find_all("list").count(), 1);
    assert_eq!(
        btf.find_all("later").count(),
        1,
        "declaration and definition are one type"
    );
    assert_eq!(btf.find(Kind::Fwd, "later"), None);
    let holder = btf.find_struct("holder").unwrap();
    let p = btf.locate(holder, "p").unwrap().type_id;
    assert_eq!(btf.type_name(p).unwrap(), "struct later *");
    assert!(btf.offset_of("holder", "p.x").is_err(), "p is a pointer");
    assert_eq!(btf.size_of(btf.find_struct("later").unwrap()).unwrap(), 4);
    // Only one `struct list *` too: pointers are interned by target.
    let pointers = btf
        .types()
        .filter(|t| t.kind() == Kind::Ptr)
        .filter(|t| btf.type_name(t.id).unwrap() == "struct list *")
        .count();
    assert_eq!(pointers, 1);
}

#[test]
fn the_first_definition_wins_and_undefined_declarations_stay_forward() {
    let first = vec![
        int(),
        die(
            dw::DW_TAG_structure_type,
            &[Attr::Name("s"), Attr::Size(8)],
            vec![member("a", 0, 0), member("b", 0, 4)],
        ),
        die(
            dw::DW_TAG_union_type,
            &[Attr::Name("never"), Attr::Declaration],
            vec![],
        ),
        die(
            dw::DW_TAG_pointer_type,
            &[Attr::Size(8), Attr::Type(4)],
            vec![],
        ),
        die(
            dw::DW_TAG_structure_type,
            &[Attr::Name("uses_never"), Attr::Size(8)],
            vec![member("u", 5, 0)],
        ),
    ];
    let second = vec![
        int(),
        die(
            dw::DW_TAG_structure_type,
            &[Attr::Name("s"), Attr::Size(4)],
            vec![member("other", 0, 0)],
        ),
    ];
    let btf = convert(&[first, second], &Limits::default()).unwrap();
    assert_eq!(btf.offset_of("s", "b").unwrap(), 4);
    assert!(btf.offset_of("s", "other").is_err());
    let never = btf.find(Kind::Fwd, "never").unwrap();
    assert!(matches!(
        btf.info(never).unwrap(),
        TypeInfo::Fwd { is_union: true }
    ));
}

#[test]
fn bitfields_and_arrays() {
    let unit = vec![
        int(),
        die(
            dw::DW_TAG_structure_type,
            &[Attr::Name("b"), Attr::Size(40)],
            vec![
                die(
                    dw::DW_TAG_member,
                    &[
                        Attr::Name("lo"),
                        Attr::Type(0),
                        Attr::DataBitOffset(3),
                        Attr::BitSize(5),
                    ],
                    vec![],
                ),
                member("arr", 4, 4),
            ],
        ),
        die(
            dw::DW_TAG_array_type,
            &[Attr::Type(0)],
            vec![
                die(dw::DW_TAG_subrange_type, &[Attr::UpperBound(1)], vec![]),
                die(dw::DW_TAG_subrange_type, &[Attr::UpperBound(3)], vec![]),
            ],
        ),
    ];
    let btf = convert(&[unit], &Limits::default()).unwrap();
    let b = btf.find_struct("b").unwrap();
    let lo = btf.locate(b, "lo").unwrap();
    assert_eq!((lo.bit_offset, lo.bitfield_size), (3, 5));
    assert_eq!(btf.offset_of("b", "arr[1][2]").unwrap(), 4 + 4 * 4 + 2 * 4);
    let arr = btf.locate(b, "arr").unwrap().type_id;
    assert_eq!(btf.type_name(arr).unwrap(), "int [2][4]");
}

#[test]
fn enumerators_keep_their_sign() {
    let unit = vec![die(
        dw::DW_TAG_enumeration_type,
        &[Attr::Name("e"), Attr::Size(4)],
        vec![
            die(
                dw::DW_TAG_enumerator,
                &[Attr::Name("NEG"), Attr::Const(-5)],
                vec![],
            ),
            die(
                dw::DW_TAG_enumerator,
                &[Attr::Name("POS"), Attr::Const(300)],
                vec![],
            ),
        ],
    )];
    let btf = convert(&[unit], &Limits::default()).unwrap();
    assert_eq!(btf.enum_value("e", "NEG").unwrap(), -5);
    assert_eq!(btf.enum_value("e", "POS").unwrap(), 300);
}

#[test]
fn cycles_depth_and_counts_are_errors() {
    // A pointer to itself: no named type breaks the cycle.
    let cyclic = vec![
        die(
            dw::DW_TAG_pointer_type,
            &[Attr::Size(8), Attr::Type(1)],
            vec![],
        ),
        die(
            dw::DW_TAG_typedef,
            &[Attr::Name("t"), Attr::Type(2)],
            vec![],
        ),
        die(
            dw::DW_TAG_pointer_type,
            &[Attr::Size(8), Attr::Type(2)],
            vec![],
        ),
    ];
    let e = convert(&[cyclic], &Limits::default()).unwrap_err();
    assert!(matches!(e, Error::BadDie { .. }), "{e}");
    assert!(e.to_string().contains("cycle"), "{e}");

    // A typedef of itself is a cycle a named type "breaks": converted, and the BTF parser's
    // own bounds deal with it.
    let self_typedef = vec![die(
        dw::DW_TAG_typedef,
        &[Attr::Name("loop"), Attr::Type(0)],
        vec![],
    )];
    let btf = convert(&[self_typedef], &Limits::default()).unwrap();
    let id = btf.find_typedef("loop").unwrap();
    assert!(btf.resolve(id).is_err());

    // 300 nested pointers under a typedef.
    let mut deep = vec![die(
        dw::DW_TAG_typedef,
        &[Attr::Name("deep"), Attr::Type(1)],
        vec![],
    )];
    for i in 0..300 {
        deep.push(die(
            dw::DW_TAG_pointer_type,
            &[Attr::Size(8), Attr::Type(i + 2)],
            vec![],
        ));
    }
    deep.push(int());
    let e = convert(&[deep], &Limits::default()).unwrap_err();
    assert!(matches!(e, Error::TooDeep { limit: 128, .. }), "{e}");

    let e = convert(
        &[list_unit()],
        &Limits {
            max_types: 2,
            ..Limits::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::TooManyTypes { limit: 2 }), "{e}");

    let e = convert(
        &[list_unit()],
        &Limits {
            max_dies_per_unit: 3,
            ..Limits::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::UnitTooLarge { .. }), "{e}");

    // A reference to something that is not a type DIE.
    let dangling = vec![die(
        dw::DW_TAG_typedef,
        &[Attr::Name("dangling"), Attr::Type(99)],
        vec![],
    )];
    let e = convert(&[dangling], &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("DW_AT_type refers to"), "{e}");

    // A member referred to as a type.
    let member_as_type = vec![
        int(),
        die(
            dw::DW_TAG_structure_type,
            &[Attr::Name("s"), Attr::Size(4)],
            vec![member("m", 0, 0)],
        ),
        die(
            dw::DW_TAG_typedef,
            &[Attr::Name("t"), Attr::Type(2)],
            vec![],
        ),
    ];
    let e = convert(&[member_as_type], &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("Member"), "{e}");
}

/// A tiny deterministic generator for the mutation tests.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn sample_units() -> Vec<Vec<Die>> {
    let mut second = list_unit();
    second.push(die(
        dw::DW_TAG_enumeration_type,
        &[Attr::Size(4)],
        vec![die(
            dw::DW_TAG_enumerator,
            &[Attr::Name("A"), Attr::Const(1)],
            vec![],
        )],
    ));
    vec![list_unit(), second]
}

/// Whatever a conversion of hostile bytes returns, a success must be valid BTF.
fn convert_hostile(info: &[u8], abbrev: &[u8]) {
    let sections = Sections {
        debug_info: info,
        debug_abbrev: abbrev,
        ..Sections::default()
    };
    if let Ok(c) = btf_from_sections(&sections, &Limits::default()) {
        Btf::parse(&c.btf).expect("a successful conversion is valid BTF");
    }
}

#[test]
fn truncated_sections_give_errors_not_panics() {
    let (info, abbrev) = assemble(&sample_units());
    assert!(btf_from_sections(
        &Sections {
            debug_info: &info,
            debug_abbrev: &abbrev,
            ..Sections::default()
        },
        &Limits::default()
    )
    .is_ok());
    for len in 0..info.len() {
        convert_hostile(&info[..len], &abbrev);
    }
    for len in 0..abbrev.len() {
        convert_hostile(&info, &abbrev[..len]);
    }
    // Nothing at all is no types.
    let empty = btf_from_sections(&Sections::default(), &Limits::default()).unwrap();
    assert_eq!(Btf::parse(&empty.btf).unwrap().type_count(), 0);
}

#[test]
fn mutated_sections_give_errors_not_panics() {
    let (info, abbrev) = assemble(&sample_units());
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let mut i = info.clone();
        let mut a = abbrev.clone();
        for _ in 0..1 + rng.next() % 4 {
            let r = rng.next();
            let target = if r & 1 == 0 { &mut i } else { &mut a };
            let len = u64::try_from(target.len()).unwrap();
            let pos = usize::try_from((r >> 8) % len).unwrap();
            target[pos] = u8::try_from((r >> 40) & 0xff).unwrap();
        }
        convert_hostile(&i, &a);
    }
}

/// An executable ELF (object's writer makes relocatable files; the type field is patched).
fn elf_with(sections: &[(&str, &[u8])], executable: bool) -> Vec<u8> {
    use object::write::Object;
    let mut obj = Object::new(
        object::BinaryFormat::Elf,
        object::Architecture::X86_64,
        object::Endianness::Little,
    );
    for &(name, data) in sections {
        let id = obj.add_section(
            Vec::new(),
            name.as_bytes().to_vec(),
            object::SectionKind::Debug,
        );
        obj.append_section_data(id, data, 1);
    }
    let mut bytes = obj.write().unwrap();
    if executable {
        bytes[16..18].copy_from_slice(&2u16.to_le_bytes());
    }
    bytes
}

#[test]
fn elf_files() {
    let (info, abbrev) = assemble(&[list_unit()]);
    let good = elf_with(&[(".debug_info", &info), (".debug_abbrev", &abbrev)], true);
    let c = btf_from_elf(&*good).unwrap();
    assert_eq!(c.stats.units, 1);
    assert_eq!(
        Btf::parse(&c.btf).unwrap().offset_of("list", "n").unwrap(),
        8
    );

    let relocatable = elf_with(&[(".debug_info", &info), (".debug_abbrev", &abbrev)], false);
    assert!(matches!(
        btf_from_elf(&*relocatable),
        Err(Error::Relocatable)
    ));

    let no_dwarf = elf_with(&[(".comment", b"x")], true);
    assert!(matches!(btf_from_elf(&*no_dwarf), Err(Error::NoDwarf)));

    assert!(matches!(
        btf_from_elf(&b"not an elf"[..]),
        Err(Error::Elf(_))
    ));

    let e = crate::btf_from_elf_with(
        &*good,
        &Limits {
            max_section_bytes: 4,
            ..Limits::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");

    // Every truncation of the file.
    for len in 0..good.len() {
        if let Ok(c) = btf_from_elf(&good[..len]) {
            Btf::parse(&c.btf).unwrap();
        }
    }
}
