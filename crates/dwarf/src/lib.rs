//! Kernel types from DWARF: converts the type information in an ELF's DWARF sections (a debug
//! vmlinux) into a BTF blob, so that everything kvmaccess derives from BTF (member offsets,
//! sizes, profile export) also works for kernels built without `CONFIG_DEBUG_INFO_BTF`.
//!
//! ```no_run
//! let file = std::fs::read("vmlinux")?;
//! let conversion = kvmaccess_dwarf::btf_from_elf(&*file)?;
//! let btf = kvmaccess_btf::Btf::parse(&conversion.btf)?;
//! println!("task_struct.pid at {}", btf.offset_of("task_struct", "pid")?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What is converted: base types, pointers, `const`/`volatile`/`restrict`, typedefs, structs and
//! unions (members at constant offsets, bitfields in both the `DW_AT_data_bit_offset` form and
//! the DWARF 2/3 `DW_AT_bit_offset` form, anonymous members), arrays (multi-dimensional,
//! flexible), enums (signed, unsigned, 64-bit as `ENUM64`), function prototypes, and declarations
//! (as forward declarations). Functions and variables are not: only types. Types are
//! deduplicated across units; see the `convert` module for how.
//!
//! The file is hostile input. Every count is bounded ([`Limits`]), arithmetic is checked, and
//! recursion only follows chains of unnamed types up to [`Limits::max_depth`]: malformed DWARF
//! gives an [`Error`], never a panic.
//!
//! Units are converted one at a time, so besides the sections themselves memory holds one
//! unit's type DIEs and the output, not a DIE tree of the whole file.
//!
//! Not handled: relocatable objects (`.o`, `.ko`), references between units (`DW_FORM_ref_addr`
//! across units, as LTO builds emit), type units and supplementary (dwz) files; they give
//! [`Error::Unsupported`] or [`Error::Relocatable`] rather than wrong types.

#![forbid(unsafe_code)]

mod convert;
mod error;
mod scan;

#[cfg(test)]
mod tests;

use std::borrow::Cow;

use gimli::{EndianSlice, RunTimeEndian};
use object::{Object, ObjectKind, ObjectSection, ReadRef};

pub use convert::Stats;
pub use error::Error;

/// Bounds on the work and memory one conversion may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most BTF types produced (a 6.1 kernel needs about 100,000).
    pub max_types: usize,
    /// Longest chain of unnamed type references followed (pointer to const to array of ...).
    pub max_depth: usize,
    /// Most type-describing DIEs kept from one unit (the largest kernel unit has about
    /// 100,000).
    pub max_dies_per_unit: usize,
    /// Deepest DIE nesting inside a unit.
    pub max_die_nesting: usize,
    /// Largest (uncompressed) DWARF section read.
    pub max_section_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_types: kvmaccess_btf::MAX_TYPES,
            max_depth: 128,
            max_dies_per_unit: 8_000_000,
            max_die_nesting: 1024,
            max_section_bytes: 4 << 30,
        }
    }
}

/// The raw DWARF sections a conversion reads. Missing sections are empty slices.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sections<'d> {
    /// `.debug_info`.
    pub debug_info: &'d [u8],
    /// `.debug_abbrev`.
    pub debug_abbrev: &'d [u8],
    /// `.debug_str`.
    pub debug_str: &'d [u8],
    /// `.debug_line_str` (DWARF 5 names may live there).
    pub debug_line_str: &'d [u8],
    /// `.debug_str_offsets` (DWARF 5 `DW_FORM_strx`).
    pub debug_str_offsets: &'d [u8],
    /// Byte order of the sections.
    pub big_endian: bool,
}

/// The result of a conversion.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// A little-endian BTF blob, as `kvmaccess_btf::Btf::parse` reads.
    pub btf: Vec<u8>,
    /// What was read and produced.
    pub stats: Stats,
}

/// Converts the DWARF of an ELF file (bytes in memory, or an `object::read::ReadCache` over a
/// file, which reads only the DWARF sections) with the default [`Limits`].
pub fn btf_from_elf<'d, R: ReadRef<'d>>(data: R) -> Result<Conversion, Error> {
    btf_from_elf_with(data, &Limits::default())
}

/// [`btf_from_elf`] with explicit limits.
pub fn btf_from_elf_with<'d, R: ReadRef<'d>>(
    data: R,
    limits: &Limits,
) -> Result<Conversion, Error> {
    let elf = object::File::parse(data).map_err(Error::Elf)?;
    if elf.kind() == ObjectKind::Relocatable {
        return Err(Error::Relocatable);
    }
    let load = |name: &'static str| -> Result<Cow<'d, [u8]>, Error> {
        let Some(section) = elf.section_by_name(name) else {
            return Ok(Cow::Borrowed(&[]));
        };
        let failed = |reason: String| Error::Section { name, reason };
        let range = section
            .compressed_file_range()
            .map_err(|e| failed(e.to_string()))?;
        if range.uncompressed_size > limits.max_section_bytes {
            return Err(failed(format!(
                "{} bytes, more than the {}-byte limit",
                range.uncompressed_size, limits.max_section_bytes
            )));
        }
        section
            .uncompressed_data()
            .map_err(|e| failed(e.to_string()))
    };
    if elf.section_by_name(".debug_info").is_none() {
        return Err(Error::NoDwarf);
    }
    let debug_info = load(".debug_info")?;
    let debug_abbrev = load(".debug_abbrev")?;
    let debug_str = load(".debug_str")?;
    let debug_line_str = load(".debug_line_str")?;
    let debug_str_offsets = load(".debug_str_offsets")?;
    btf_from_sections(
        &Sections {
            debug_info: &debug_info,
            debug_abbrev: &debug_abbrev,
            debug_str: &debug_str,
            debug_line_str: &debug_line_str,
            debug_str_offsets: &debug_str_offsets,
            big_endian: !elf.is_little_endian(),
        },
        limits,
    )
}

/// Converts DWARF given as raw sections.
pub fn btf_from_sections(sections: &Sections<'_>, limits: &Limits) -> Result<Conversion, Error> {
    let endian = if sections.big_endian {
        RunTimeEndian::Big
    } else {
        RunTimeEndian::Little
    };
    let reader = |data| EndianSlice::new(data, endian);
    let dwarf = scan::Dwarf {
        abbrev: gimli::DebugAbbrev::from(reader(sections.debug_abbrev)),
        str: gimli::DebugStr::from(reader(sections.debug_str)),
        line_str: gimli::DebugLineStr::from(reader(sections.debug_line_str)),
        str_offsets: gimli::DebugStrOffsets::from(reader(sections.debug_str_offsets)),
    };
    let info = gimli::DebugInfo::from(reader(sections.debug_info));
    let mut converter = convert::Converter::new(limits, sections.big_endian);
    let mut unit = scan::UnitTypes::new(dwarf);
    let mut headers = info.units();
    // Where the next header starts, for an error about a header that cannot be read.
    let mut next_unit = 0u64;
    loop {
        let header = match headers.next() {
            Ok(Some(header)) => header,
            Ok(None) => break,
            Err(source) => {
                return Err(Error::Dwarf {
                    unit: next_unit,
                    source,
                })
            }
        };
        scan::scan_unit(&header, limits, &mut unit, &|tag, name| {
            converter.is_defined(tag, name)
        })?;
        next_unit = unit
            .unit_offset
            .saturating_add(u64::try_from(header.length_including_self()).unwrap_or(u64::MAX));
        converter.add_unit(&unit)?;
    }
    let (btf, stats) = converter.finish()?;
    Ok(Conversion { btf, stats })
}
