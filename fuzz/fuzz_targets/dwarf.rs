//! Feeds arbitrary bytes to the DWARF-to-BTF converter, three ways (chosen by the first byte):
//! as a whole ELF file; as raw .debug_abbrev/.debug_str/.debug_info sections; and as the DIEs
//! of one DWARF 4 unit read with a fixed, realistic abbreviation table, so that mutations land
//! on DIE contents (references, sizes, bitfields, nesting) instead of breaking the encoding.
//! Nothing may panic or hang, and whatever converts must be valid BTF.

#![no_main]

use kvmaccess_btf::Btf;
use kvmaccess_dwarf::{btf_from_elf_with, btf_from_sections, Limits, Sections};
use libfuzzer_sys::fuzz_target;

/// Abbreviation codes 1..=20 (forms: 0x08 string, 0x0b data1, 0x13 ref4, 0x0d sdata,
/// 0x19 flag_present, 0x0a block1).
const ABBREV: &[u8] = &[
    1, 0x11, 1, 0x13, 0x0b, 0, 0, // compile_unit: language
    2, 0x24, 0, 0x03, 0x08, 0x0b, 0x0b, 0x3e, 0x0b, 0, 0, // base_type: name size encoding
    3, 0x13, 1, 0x03, 0x08, 0x0b, 0x0b, 0x01, 0x13, 0, 0, // struct: name size sibling
    4, 0x0d, 0, 0x03, 0x08, 0x49, 0x13, 0x38, 0x0b, 0, 0, // member: name type location
    5, 0x0d, 0, 0x03, 0x08, 0x49, 0x13, 0x6b, 0x0b, 0x0d, 0x0b, 0,
    0, // member: bit offset/size
    6, 0x0f, 0, 0x0b, 0x0b, 0x49, 0x13, 0, 0, // pointer: size type
    7, 0x16, 0, 0x03, 0x08, 0x49, 0x13, 0, 0, // typedef: name type
    8, 0x01, 1, 0x49, 0x13, 0, 0, // array: type
    9, 0x21, 0, 0x2f, 0x0b, 0, 0, // subrange: upper_bound
    10, 0x04, 1, 0x03, 0x08, 0x0b, 0x0b, 0x49, 0x13, 0, 0, // enum: name size type
    11, 0x28, 0, 0x03, 0x08, 0x1c, 0x0d, 0, 0, // enumerator: name value
    12, 0x15, 1, 0x49, 0x13, 0, 0, // subroutine: return type
    13, 0x05, 0, 0x49, 0x13, 0, 0, // formal_parameter: type
    14, 0x18, 0, 0, 0, // unspecified_parameters
    15, 0x17, 1, 0x03, 0x08, 0x0b, 0x0b, 0, 0, // union: name size
    16, 0x13, 0, 0x03, 0x08, 0x3c, 0x19, 0, 0, // struct declaration
    17, 0x26, 0, 0x49, 0x13, 0, 0, // const: type
    18, 0x2e, 1, 0x03, 0x08, 0x01, 0x13, 0, 0, // subprogram: name sibling
    19, 0x0d, 0, 0x03, 0x08, 0x49, 0x13, 0x0b, 0x0b, 0x0d, 0x0b, 0x0c, 0x0b, 0x38, 0x0a, 0,
    0, // member, DWARF 2 bitfield: name type byte_size bit_size bit_offset location-block
    20, 0x35, 0, 0x49, 0x13, 0, 0, // volatile: type
    0,
];

fn check(result: Result<kvmaccess_dwarf::Conversion, kvmaccess_dwarf::Error>) {
    let Ok(conversion) = result else { return };
    let btf = Btf::parse(&conversion.btf).expect("converted DWARF must be valid BTF");
    for t in btf.types() {
        let _ = btf.size_of(t.id);
        let _ = btf.type_name(t.id);
        if let Ok(members) = btf.members(t.id) {
            for m in members {
                if !m.name.is_empty() {
                    let _ = btf.locate(t.id, m.name);
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Small limits keep each run fast; the logic is the same at any size.
    let limits = Limits {
        max_types: 10_000,
        max_dies_per_unit: 10_000,
        max_section_bytes: 1 << 20,
        ..Limits::default()
    };
    match mode % 3 {
        0 => check(btf_from_elf_with(rest, &limits)),
        1 => {
            if rest.len() < 4 {
                return;
            }
            let (lens, rest) = rest.split_at(4);
            let abbrev_len = usize::from(u16::from_le_bytes([lens[0], lens[1]])).min(rest.len());
            let (abbrev, rest) = rest.split_at(abbrev_len);
            let str_len = usize::from(u16::from_le_bytes([lens[2], lens[3]])).min(rest.len());
            let (strings, info) = rest.split_at(str_len);
            check(btf_from_sections(
                &Sections {
                    debug_info: info,
                    debug_abbrev: abbrev,
                    debug_str: strings,
                    big_endian: mode & 0x80 != 0,
                    ..Sections::default()
                },
                &limits,
            ));
        }
        _ => {
            // One DWARF 4 unit: length, version 4, abbrev offset 0, address size 8, then
            // the fuzzer's DIEs.
            let Ok(len) = u32::try_from(rest.len() + 7) else {
                return;
            };
            let mut info = Vec::with_capacity(rest.len() + 11);
            info.extend_from_slice(&len.to_le_bytes());
            info.extend_from_slice(&4u16.to_le_bytes());
            info.extend_from_slice(&0u32.to_le_bytes());
            info.push(8);
            info.extend_from_slice(rest);
            check(btf_from_sections(
                &Sections {
                    debug_info: &info,
                    debug_abbrev: ABBREV,
                    ..Sections::default()
                },
                &limits,
            ));
        }
    }
});
