use thiserror::Error;

/// Why DWARF could not be converted. Offsets are `.debug_info` offsets, as `readelf
/// --debug-dump=info` prints them.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The file is not an ELF object `object` can read.
    #[error("not a readable ELF file: {0}")]
    Elf(#[source] object::Error),

    /// A relocatable object (`.o`, `.ko`): its DWARF is meaningless until relocations are
    /// applied, which this converter does not do.
    #[error(
        "it is a relocatable object (.o/.ko) whose DWARF needs relocations applied first; \
         link it, or use a vmlinux"
    )]
    Relocatable,

    /// No `.debug_info` section.
    #[error("no DWARF type information (no .debug_info section)")]
    NoDwarf,

    /// A DWARF section could not be read or decompressed, or is too large.
    #[error("section {name}: {reason}")]
    Section {
        /// Section name.
        name: &'static str,
        /// What went wrong.
        reason: String,
    },

    /// gimli rejected the encoding of a unit (truncated data, unknown form, bad abbreviation).
    #[error("malformed DWARF in the unit at {unit:#x}: {source}")]
    Dwarf {
        /// Offset of the unit header.
        unit: u64,
        /// gimli's description.
        #[source]
        source: gimli::Error,
    },

    /// A DIE is well-encoded but makes no sense as a type (a reference to a non-type, a size
    /// that BTF cannot hold, a reference cycle that no struct breaks).
    #[error("DIE at {die:#x}: {reason}")]
    BadDie {
        /// Offset of the DIE.
        die: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// A DWARF feature this converter does not handle (references into other units or type
    /// units, supplementary files).
    #[error("DIE at {die:#x}: {what} is not supported")]
    Unsupported {
        /// Offset of the DIE.
        die: u64,
        /// The feature.
        what: &'static str,
    },

    /// More output types than [`Limits::max_types`](crate::Limits::max_types).
    #[error("more than {limit} types")]
    TooManyTypes {
        /// The limit.
        limit: usize,
    },

    /// More bytes of distinct names than BTF's 32-bit string offsets should carry.
    #[error("more than {limit} bytes of type and member names")]
    TooManyNames {
        /// The limit in bytes.
        limit: usize,
    },

    /// A chain of type references (pointer to const to typedef to ...) longer than
    /// [`Limits::max_depth`](crate::Limits::max_depth).
    #[error("DIE at {die:#x}: type references nested deeper than {limit}")]
    TooDeep {
        /// Offset of the DIE where the limit was hit.
        die: u64,
        /// The limit.
        limit: usize,
    },

    /// A unit with more type DIEs (or deeper DIE nesting) than the limits allow.
    #[error("unit at {unit:#x}: {what} exceeds the limit of {limit}")]
    UnitTooLarge {
        /// Offset of the unit header.
        unit: u64,
        /// What was counted.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
}
