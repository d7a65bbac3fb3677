//! The C compiler as the oracle: a C file full of awkward types is compiled with `-g` in several
//! DWARF flavours, run to print its own `sizeof`, `offsetof`, bitfield positions and enumerator
//! values, and the converted BTF must give the same numbers.
//!
//! Needs `cc` (the Makefile installs gcc); a missing compiler fails the test.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use kvmaccess_btf::{Btf, Kind, TypeInfo};

/// The types, in a header both units include: the second unit's copies must be recognised
/// as known (and skipped) and not duplicated.
const HEADER: &str = r#"
#include <stddef.h>
#include <stdio.h>
#include <string.h>

struct late_def; /* defined only in other.c */

struct list { struct list *next, *prev; };
enum small { S_NEG = -1, S_128 = 128, S_300 = 300 };
enum big { B_HIGH = 0x100000000ULL, B_NEG = -2 };
enum uns { U_MAX = 0xffffffffu };
enum { ANON_A = 7, ANON_B = 200 };
typedef unsigned int u32;
typedef void (*callback_t)(struct list *, int, ...);
struct fwd_only;

struct bits {
    unsigned int a:3;
    unsigned int b:5;
    int c:7;
    unsigned long long d:40;
    unsigned char e;
    unsigned short f:9;
    _Bool g:1;
    u32 h:17;
    long long i:33;
};

struct outer {
    int x;
    union {
        long l;
        struct { short s1; short s2; };
        char bytes[8];
    };
    struct { int inner_a; int inner_b; } named_anon;
    int matrix[3][5];
    char name[16];
    unsigned char big_bound[256];
    const volatile unsigned long *cvp;
    int *restrict rp;
    callback_t cb;
    int (*fn)(const char *, ...);
    struct fwd_only *opaque;
    struct late_def *late;
    enum small e;
    enum big eb;
    struct bits bits;
    struct list node;
    double d;
    float f;
    long double ld;
    _Atomic int atom;
    void *vp;
    u32 u;
    unsigned char tail[];
};

struct packed_s { char c; int i; long long ll; } __attribute__((packed));
union u { int i; struct bits b; double d; };
struct zero_len { int n; long items[0]; };
typedef struct { int a; char b; } anon_typedef_t;
/* In C the inner struct has file scope, whatever the nesting. */
struct nest_outer { struct nest_inner { int x; long y; } inner; int z; };
struct nest_user { struct nest_inner *p; struct nest_outer o; };
struct uses_typedef { anon_typedef_t t; anon_typedef_t arr[2]; struct outer *back; };

"#;

/// The unit with `main`, which prints the compiler's view of the types.
const MAIN: &str = r#"
#include "types.h"

struct outer g_outer;
struct packed_s g_packed;
union u g_u;
struct zero_len g_zero;
struct uses_typedef g_uses;
struct nest_user g_nest;
enum uns g_uns;
int g_anon = ANON_B;

/* Prints the bit position and width of a bitfield: set it to all ones in a zeroed struct and
   look for the ones (x86 is little-endian: bit n is bit n%8 of byte n/8). */
#define BITFIELD(type, member) do { \
    type v; memset(&v, 0, sizeof v); v.member = ~0ULL; \
    unsigned char *p = (unsigned char *)&v; int first = -1, last = -1; \
    for (int i = 0; i < (int)(8 * sizeof v); i++) \
        if (p[i / 8] >> (i % 8) & 1) { if (first < 0) first = i; last = i; } \
    printf("bits %s %s %d %d\n", #type, #member, first, last - first + 1); } while (0)
#define OFF(type, member) printf("off %s %s %zu\n", #type, #member, offsetof(type, member))
#define SIZE(type) printf("size %s %zu\n", #type, sizeof(type))
#define ENUM(name) printf("enum %s %lld\n", #name, (long long)(name))

int main(void) {
    SIZE(struct outer); SIZE(struct bits); SIZE(struct packed_s); SIZE(union u);
    SIZE(struct zero_len); SIZE(anon_typedef_t); SIZE(struct uses_typedef); SIZE(struct list);
    OFF(struct outer, x); OFF(struct outer, l); OFF(struct outer, s1); OFF(struct outer, s2);
    OFF(struct outer, bytes[5]); OFF(struct outer, named_anon.inner_b);
    OFF(struct outer, matrix[2][3]); OFF(struct outer, matrix[1]); OFF(struct outer, name[15]);
    OFF(struct outer, big_bound[255]);
    OFF(struct outer, cvp); OFF(struct outer, rp); OFF(struct outer, cb); OFF(struct outer, fn);
    OFF(struct outer, opaque); OFF(struct outer, e); OFF(struct outer, eb);
    OFF(struct outer, bits); OFF(struct outer, bits.e); OFF(struct outer, node.prev);
    OFF(struct outer, d); OFF(struct outer, f); OFF(struct outer, ld); OFF(struct outer, atom);
    OFF(struct outer, vp); OFF(struct outer, u); OFF(struct outer, tail);
    OFF(struct outer, tail[3]);
    OFF(struct packed_s, i); OFF(struct packed_s, ll);
    OFF(struct zero_len, items); OFF(struct zero_len, items[2]);
    OFF(struct uses_typedef, arr[1].b); OFF(struct uses_typedef, back);
    OFF(anon_typedef_t, b);
    SIZE(struct nest_inner); SIZE(struct nest_user);
    OFF(struct nest_outer, inner.y); OFF(struct nest_outer, z); OFF(struct nest_user, o.z);
    BITFIELD(struct bits, a); BITFIELD(struct bits, b); BITFIELD(struct bits, c);
    BITFIELD(struct bits, d); BITFIELD(struct bits, f); BITFIELD(struct bits, g);
    BITFIELD(struct bits, h); BITFIELD(struct bits, i);
    ENUM(S_NEG); ENUM(S_128); ENUM(S_300); ENUM(B_HIGH); ENUM(B_NEG); ENUM(U_MAX);
    ENUM(ANON_A); ENUM(ANON_B);
    return 0;
}
"#;

/// What the compiled program says about its own types.
#[derive(Debug, Default)]
struct Truth {
    sizes: BTreeMap<String, u64>,
    offsets: Vec<(String, String, u64)>,
    bitfields: Vec<(String, String, u64, u64)>,
    enums: BTreeMap<String, i128>,
}

/// A second unit: the same header, and the one definition of `struct late_def`.
const OTHER: &str = r#"
#include "types.h"
struct late_def { int q[3]; };
struct late_def g_late;
struct outer g_other_outer;
"#;

fn compile_and_run(dir: &Path, flags: &[&str]) -> (Vec<u8>, Truth) {
    std::fs::write(dir.join("types.h"), HEADER).unwrap();
    let src = dir.join("types.c");
    std::fs::write(&src, MAIN).unwrap();
    let other = dir.join("other.c");
    std::fs::write(&other, OTHER).unwrap();
    let exe = dir.join(format!("types{}", flags.join("").replace(['-', '='], "_")));
    let out = Command::new("cc")
        .args(flags)
        .args(["-O0", "-fno-eliminate-unused-debug-types", "-o"])
        .arg(&exe)
        .arg(&src)
        .arg(&other)
        .output()
        .expect("running cc (the Makefile installs gcc)");
    assert!(
        out.status.success(),
        "cc {flags:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    let mut truth = Truth::default();
    for line in String::from_utf8(run.stdout).unwrap().lines() {
        let words: Vec<&str> = line.split(' ').collect();
        // `KIND TYPE... VALUES`: C type names have spaces ("struct outer"), so the number of
        // trailing values per kind says where the type ends.
        let values = match words[0] {
            "size" | "enum" => 1,
            "off" => 2,
            "bits" => 3,
            other => panic!("unexpected line {other:?}"),
        };
        let (ty, v) = words[1..].split_at(words.len() - 1 - values);
        let ty = ty.join(" ");
        let num = |i: usize| -> u64 { v[i].parse().unwrap() };
        match words[0] {
            "size" => {
                truth.sizes.insert(ty, num(0));
            }
            "off" => truth.offsets.push((ty, v[0].to_string(), num(1))),
            "bits" => truth.bitfields.push((ty, v[0].to_string(), num(1), num(2))),
            _ => {
                truth.enums.insert(ty, v[0].parse().unwrap());
            }
        }
    }
    assert!(truth.offsets.len() > 30, "{truth:?}");
    (std::fs::read(&exe).unwrap(), truth)
}

/// `struct outer` -> the BTF id of the struct; `anon_typedef_t` -> the typedef.
fn lookup(btf: &Btf, c_type: &str) -> kvmaccess_btf::TypeId {
    let found = if let Some(name) = c_type.strip_prefix("struct ") {
        btf.find_struct(name)
    } else if let Some(name) = c_type.strip_prefix("union ") {
        btf.find_union(name)
    } else {
        btf.find_typedef(c_type)
    };
    found.unwrap_or_else(|| panic!("{c_type} missing"))
}

fn check(flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (elf, truth) = compile_and_run(dir.path(), flags);
    let conversion = kvmaccess_dwarf::btf_from_elf(&*elf)
        .unwrap_or_else(|e| panic!("converting the DWARF of cc {flags:?}: {e}"));
    let btf = Btf::parse(&conversion.btf).unwrap();
    let mut wrong = Vec::new();

    for (c_type, &size) in &truth.sizes {
        let got = btf.size_of(lookup(&btf, c_type)).unwrap();
        if got != size {
            wrong.push(format!("sizeof({c_type}) = {size}, BTF says {got}"));
        }
    }
    for (c_type, path, offset) in &truth.offsets {
        let loc = btf.locate(lookup(&btf, c_type), path).unwrap();
        if loc.bit_offset != offset * 8 || loc.bitfield_size != 0 {
            wrong.push(format!(
                "offsetof({c_type}, {path}) = {offset}, BTF says bit {} (bitfield {})",
                loc.bit_offset, loc.bitfield_size
            ));
        }
    }
    for (c_type, member, bit, width) in &truth.bitfields {
        let loc = btf.locate(lookup(&btf, c_type), member).unwrap();
        if (loc.bit_offset, u64::from(loc.bitfield_size)) != (*bit, *width) {
            wrong.push(format!(
                "{c_type}.{member} at bit {bit}, {width} wide; BTF says bit {}, {} wide",
                loc.bit_offset, loc.bitfield_size
            ));
        }
    }
    for (name, &value) in &truth.enums {
        match btf.enumerator_value(name) {
            Some(v) if v == value => {}
            other => wrong.push(format!("{name} = {value}, BTF says {other:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "cc {flags:?}: the BTF disagrees with the compiler:\n  {}",
        wrong.join("\n  ")
    );

    // Kinds and shapes the numbers above do not show.
    let big = btf.find_enum("big").unwrap();
    assert!(matches!(
        btf.info(big).unwrap(),
        TypeInfo::Enum64 {
            size: 8,
            signed: true,
            ..
        }
    ));
    let small = btf.find_enum("small").unwrap();
    assert!(matches!(
        btf.info(small).unwrap(),
        TypeInfo::Enum { signed: true, .. }
    ));
    let uns = btf.find_enum("uns").unwrap();
    assert!(matches!(
        btf.info(uns).unwrap(),
        TypeInfo::Enum { signed: false, .. }
    ));
    let fwd = btf
        .find(Kind::Fwd, "fwd_only")
        .expect("struct fwd_only as a Fwd");
    assert!(matches!(
        btf.info(fwd).unwrap(),
        TypeInfo::Fwd { is_union: false }
    ));
    let outer = btf.find_struct("outer").unwrap();
    let member_type = |name: &str| {
        let loc = btf.locate(outer, name).unwrap();
        btf.type_name(loc.type_id).unwrap()
    };
    assert_eq!(member_type("matrix"), "int [3][5]");
    assert_eq!(member_type("name"), "char [16]");
    assert_eq!(member_type("big_bound"), "unsigned char [256]");
    assert_eq!(member_type("tail"), "unsigned char [0]");
    assert_eq!(member_type("opaque"), "struct fwd_only *");
    // Declared in the first unit, defined in the second: one complete type.
    assert_eq!(member_type("late"), "struct late_def *");
    assert_eq!(btf.find(Kind::Fwd, "late_def"), None);
    assert_eq!(btf.size_of(lookup(&btf, "struct late_def")).unwrap(), 12);
    assert_eq!(member_type("cb"), "callback_t");
    assert_eq!(member_type("u"), "u32");
    assert_eq!(member_type("atom"), "int");
    let cb = btf
        .resolve(btf.locate(outer, "cb").unwrap().type_id)
        .unwrap();
    assert_eq!(
        btf.type_name(cb).unwrap(),
        "void (*)(struct list *, int, ...)"
    );
    let fn_ptr = btf.locate(outer, "fn").unwrap().type_id;
    assert_eq!(btf.type_name(fn_ptr).unwrap(), "int (*)(const char *, ...)");
    let cvp = btf.locate(outer, "cvp").unwrap().type_id;
    let cvp_name = btf.type_name(cvp).unwrap();
    assert!(
        cvp_name.contains("const") && cvp_name.contains("volatile"),
        "{cvp_name}"
    );
    // DW_TAG_restrict_type is DWARF 3: strict DWARF 2 has a plain pointer.
    let rp = btf.locate(outer, "rp").unwrap().type_id;
    let strict2 = flags.contains(&"-gstrict-dwarf");
    assert_eq!(
        btf.kind(rp).unwrap(),
        if strict2 { Kind::Ptr } else { Kind::Restrict }
    );
    assert_eq!(
        btf.type_name(lookup(&btf, "anon_typedef_t")).unwrap(),
        "anon_typedef_t"
    );
    assert_eq!(btf.pointer_size(), 8);

    // Deduplication across the two units: one `struct list`, one `int`.
    assert!(conversion.stats.units >= 2, "{:?}", conversion.stats);
    assert_eq!(btf.find_all("list").count(), 1);
    assert_eq!(btf.find_all("outer").count(), 1);
    assert_eq!(btf.find_all("int").count(), 1);
}

#[test]
fn dwarf5_matches_the_compiler() {
    check(&["-gdwarf-5"]);
}

#[test]
fn dwarf4_matches_the_compiler() {
    check(&["-gdwarf-4"]);
}

/// DWARF 2 bitfields count from the storage unit's most significant bit, and member offsets are
/// location expressions.
#[test]
fn strict_dwarf2_matches_the_compiler() {
    check(&["-gdwarf-2", "-gstrict-dwarf"]);
}

/// SHF_COMPRESSED debug sections.
#[test]
fn compressed_sections_match_the_compiler() {
    check(&["-gdwarf-5", "-gz=zlib"]);
    check(&["-gdwarf-4", "-gz=zlib"]);
}
