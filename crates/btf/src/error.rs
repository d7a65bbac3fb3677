use crate::{Kind, TypeId};

/// Everything that can go wrong while parsing BTF or answering a query about it.
///
/// Messages name the offsets, ids and values involved so that a report about a hostile or
/// corrupted blob can be acted on without a debugger.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The blob cannot even hold the fixed part of the header.
    #[error("BTF blob is {len} bytes, shorter than the {need}-byte header")]
    TooShort {
        /// Length of the blob.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The first two bytes are not the BTF magic.
    #[error("bad BTF magic {found:#06x} (expected 0xeb9f)")]
    BadMagic {
        /// The value read, little-endian.
        found: u16,
    },
    /// The magic is byte-swapped: BTF of a big-endian target.
    #[error("BTF is big-endian (magic 0x9feb); only little-endian BTF is supported")]
    BigEndian,
    /// Only version 1 exists.
    #[error("unsupported BTF version {0} (expected 1)")]
    UnsupportedVersion(u8),
    /// No header flag is defined; a set flag means a format this parser does not know.
    #[error("unsupported BTF header flags {0:#04x}")]
    UnsupportedFlags(u8),
    /// `hdr_len` is smaller than the fixed header or runs past the blob.
    #[error("BTF hdr_len {hdr_len} is invalid for a {blob_len}-byte blob (minimum 24)")]
    BadHeaderLen {
        /// The header's `hdr_len`.
        hdr_len: u32,
        /// Length of the blob.
        blob_len: usize,
    },
    /// A section (`"type"` or `"string"`) does not fit in the blob.
    #[error(
        "BTF {section} section (offset {off:#x}, length {len:#x} after the {hdr_len}-byte header) \
         exceeds the {blob_len}-byte blob"
    )]
    SectionOutOfBounds {
        /// Which section.
        section: &'static str,
        /// Its offset relative to the end of the header.
        off: u32,
        /// Its length.
        len: u32,
        /// The header length the offset is relative to.
        hdr_len: u32,
        /// Length of the blob.
        blob_len: usize,
    },
    /// The type and string sections overlap.
    #[error(
        "BTF type section {type_off:#x}+{type_len:#x} overlaps string section {str_off:#x}+{str_len:#x}"
    )]
    SectionsOverlap {
        /// Type section offset.
        type_off: u32,
        /// Type section length.
        type_len: u32,
        /// String section offset.
        str_off: u32,
        /// String section length.
        str_len: u32,
    },
    /// Type records are made of 32-bit words.
    #[error("BTF type section length {0:#x} is not a multiple of 4")]
    TypeSectionMisaligned(u32),
    /// The string section breaks a format rule (empty, not NUL-delimited, not UTF-8).
    #[error("bad BTF string section: {0}")]
    BadStringSection(String),
    /// A name offset points outside the string section or into the middle of a character.
    #[error(
        "string offset {offset:#x} used by type {id} is outside the {str_len}-byte string section"
    )]
    BadStringOffset {
        /// The type whose record (or member, enumerator, parameter) holds the offset.
        id: TypeId,
        /// The offset.
        offset: u32,
        /// Length of the string section.
        str_len: usize,
    },
    /// A type record is cut off by the end of the type section.
    #[error(
        "type {id} at type-section offset {offset:#x} needs {need} bytes, only {available} remain"
    )]
    Truncated {
        /// The type being decoded.
        id: TypeId,
        /// Its offset in the type section.
        offset: usize,
        /// Bytes its record needs (including vlen-sized trailing data).
        need: usize,
        /// Bytes left in the type section.
        available: usize,
    },
    /// The kind field holds a value this parser does not know, so the record length is unknown.
    #[error("type {id} at type-section offset {offset:#x} has unknown kind {kind}")]
    UnknownKind {
        /// The type being decoded.
        id: TypeId,
        /// Its offset in the type section.
        offset: usize,
        /// The kind value.
        kind: u32,
    },
    /// More types than [`MAX_TYPES`](crate::MAX_TYPES).
    #[error("BTF has more than {limit} types")]
    TooManyTypes {
        /// The limit.
        limit: usize,
    },
    /// A type refers to a type id that does not exist.
    #[error("type {id} refers to type {target}, but the highest type id is {max}")]
    DanglingReference {
        /// The referring type.
        id: TypeId,
        /// The id it refers to.
        target: u32,
        /// The highest valid id.
        max: u32,
    },
    /// A record field holds a value the format forbids.
    #[error("type {id} ({kind}): {reason}")]
    InvalidType {
        /// The type.
        id: TypeId,
        /// Its kind.
        kind: Kind,
        /// What is wrong, with the value.
        reason: String,
    },
    /// A caller asked about a type id that does not exist.
    #[error("no type with id {id} (highest id is {max})")]
    NoSuchId {
        /// The id asked for.
        id: TypeId,
        /// The highest valid id.
        max: u32,
    },
    /// Following references from a type went deeper than [`MAX_DEPTH`](crate::MAX_DEPTH): a cycle
    /// or an absurd chain.
    #[error("type {id}: reference chain deeper than {limit} (cycle?)")]
    TooDeep {
        /// The type where the walk started.
        id: TypeId,
        /// The limit.
        limit: usize,
    },
    /// Describing a type needed more steps than allowed (e.g. exponentially branching
    /// function prototypes).
    #[error("type {id}: description needs more than {limit} steps")]
    TooComplex {
        /// The type.
        id: TypeId,
        /// The step limit.
        limit: usize,
    },
    /// The type has no size (void, function, forward declaration, ...).
    #[error("type {id} ({kind}) has no size")]
    NoSize {
        /// The type.
        id: TypeId,
        /// Its kind.
        kind: Kind,
    },
    /// A size or offset does not fit in 64 bits.
    #[error("type {id}: size or offset overflows 64 bits")]
    Overflow {
        /// The type.
        id: TypeId,
    },
    /// A struct or union was expected.
    #[error("type {id} ({kind}) is not a struct or union")]
    NotComposite {
        /// The type (after stripping typedefs and qualifiers).
        id: TypeId,
        /// Its kind.
        kind: Kind,
    },
    /// An enum was expected.
    #[error("type {id} ({kind}) is not an enum")]
    NotEnum {
        /// The type.
        id: TypeId,
        /// Its kind.
        kind: Kind,
    },
    /// No type of the wanted kind has that name.
    #[error("no {what} named {name:?}")]
    TypeNotFound {
        /// What was looked for ("struct", "struct or union", "enum", ...).
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A struct or union (including its anonymous members) has no member of that name.
    #[error("type {id} ({type_name}) has no member {member:?}")]
    MemberNotFound {
        /// The struct or union searched.
        id: TypeId,
        /// Its C name.
        type_name: String,
        /// The member name.
        member: String,
    },
    /// An enum has no enumerator of that name.
    #[error("enum {enum_name:?} has no enumerator {name:?}")]
    EnumeratorNotFound {
        /// The enum.
        enum_name: String,
        /// The enumerator asked for.
        name: String,
    },
    /// A member path is malformed.
    #[error("invalid member path {path:?}: {reason}")]
    InvalidPath {
        /// The path.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An index was applied to a non-array or is past the array's end.
    #[error("index [{index}] in path {path:?}: {reason}")]
    BadIndex {
        /// The path.
        path: String,
        /// The index.
        index: u64,
        /// What is wrong.
        reason: String,
    },
    /// A byte offset was asked for a member that is a bitfield or not byte-aligned.
    #[error("member {path:?} is at bit offset {bit_offset} (bitfield size {bitfield_size}): no byte offset")]
    NotByteAligned {
        /// The path.
        path: String,
        /// Bit offset from the start of the outer type.
        bit_offset: u64,
        /// Bitfield size, 0 if not a bitfield.
        bitfield_size: u8,
    },
}
