//! One pass over a unit's DIEs that keeps only what describes types, in a flat table.
//!
//! Functions, variables, lexical blocks and everything under them are skipped: in C a type
//! declared at file scope cannot refer to one declared inside a function, so nothing reachable
//! from the file-scope types is lost, and most of a kernel unit's DIEs are never decoded.

use gimli::{
    constants as dw, AttributeValue, DebugAbbrev, DebugInfoOffset, DebugLineStr, DebugStr,
    DebugStrOffsets, DebugStrOffsetsBase, DwarfFileType, EndianSlice, RunTimeEndian, UnitHeader,
};

use crate::{Error, Limits};

pub(crate) type Reader<'d> = EndianSlice<'d, RunTimeEndian>;

/// The DWARF sections a conversion reads, as gimli views.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dwarf<'d> {
    pub abbrev: DebugAbbrev<Reader<'d>>,
    pub str: DebugStr<Reader<'d>>,
    pub line_str: DebugLineStr<Reader<'d>>,
    pub str_offsets: DebugStrOffsets<Reader<'d>>,
}

/// The DIE tags kept, folded to what BTF can express.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    Base,
    Pointer,
    Const,
    Volatile,
    Restrict,
    /// A qualifier BTF has no kind for (`_Atomic`, D's `immutable`): the type itself.
    Transparent,
    Typedef,
    Struct,
    Union,
    Enum,
    Array,
    Subroutine,
    /// `DW_TAG_unspecified_type`: assembler units use it for "no type".
    Void,
    Member,
    Enumerator,
    Subrange,
    Param,
    Variadic,
}

impl Tag {
    fn from_dwarf(tag: gimli::DwTag) -> Option<Tag> {
        Some(match tag {
            dw::DW_TAG_base_type => Tag::Base,
            dw::DW_TAG_pointer_type
            | dw::DW_TAG_reference_type
            | dw::DW_TAG_rvalue_reference_type
            | dw::DW_TAG_ptr_to_member_type => Tag::Pointer,
            dw::DW_TAG_const_type => Tag::Const,
            dw::DW_TAG_volatile_type => Tag::Volatile,
            dw::DW_TAG_restrict_type => Tag::Restrict,
            dw::DW_TAG_atomic_type | dw::DW_TAG_immutable_type | dw::DW_TAG_packed_type => {
                Tag::Transparent
            }
            dw::DW_TAG_typedef => Tag::Typedef,
            dw::DW_TAG_structure_type | dw::DW_TAG_class_type => Tag::Struct,
            dw::DW_TAG_union_type => Tag::Union,
            dw::DW_TAG_enumeration_type => Tag::Enum,
            dw::DW_TAG_array_type => Tag::Array,
            dw::DW_TAG_subroutine_type => Tag::Subroutine,
            dw::DW_TAG_unspecified_type => Tag::Void,
            dw::DW_TAG_member => Tag::Member,
            dw::DW_TAG_enumerator => Tag::Enumerator,
            dw::DW_TAG_subrange_type => Tag::Subrange,
            dw::DW_TAG_formal_parameter => Tag::Param,
            dw::DW_TAG_unspecified_parameters => Tag::Variadic,
            _ => return None,
        })
    }

    /// A tag that describes a type (as opposed to a part of one).
    pub fn is_type(self) -> bool {
        !matches!(
            self,
            Tag::Member | Tag::Enumerator | Tag::Subrange | Tag::Param | Tag::Variadic
        )
    }

    /// Whether a DIE tagged `child` under one tagged `self` is kept.
    fn keeps_child(self, child: Tag) -> bool {
        match self {
            // Nested types are C++; kept so that members referring to them resolve.
            Tag::Struct | Tag::Union => child == Tag::Member || child.is_type(),
            Tag::Enum => child == Tag::Enumerator,
            Tag::Array => child == Tag::Subrange,
            Tag::Subroutine => matches!(child, Tag::Param | Tag::Variadic),
            _ => false,
        }
    }
}

/// Where `DW_AT_type` points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TypeRef {
    /// No `DW_AT_type`: `void`.
    None,
    /// A DIE of the same unit, by unit offset.
    Die(usize),
    /// A form this converter does not follow.
    Unsupported(&'static str),
}

/// A constant attribute as encoded: `DW_FORM_dataN` does not say whether it is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Value {
    Unsigned(u64),
    Signed(i64),
    Data {
        raw: u64,
        bytes: u8,
    },
    /// Present but not a constant (an expression, a reference, a block).
    NotConstant,
}

impl Value {
    fn from_attr(value: AttributeValue<Reader<'_>>) -> Value {
        match value {
            AttributeValue::Data1(v) => Value::Data {
                raw: u64::from(v),
                bytes: 1,
            },
            AttributeValue::Data2(v) => Value::Data {
                raw: u64::from(v),
                bytes: 2,
            },
            AttributeValue::Data4(v) => Value::Data {
                raw: u64::from(v),
                bytes: 4,
            },
            AttributeValue::Data8(v) => Value::Data { raw: v, bytes: 8 },
            AttributeValue::Udata(v) => Value::Unsigned(v),
            AttributeValue::Sdata(v) => Value::Signed(v),
            _ => Value::NotConstant,
        }
    }

    /// The value read as unsigned (`None` for a negative or non-constant value).
    pub fn unsigned(self) -> Option<u64> {
        match self {
            Value::Unsigned(v) | Value::Data { raw: v, .. } => Some(v),
            Value::Signed(v) => u64::try_from(v).ok(),
            Value::NotConstant => None,
        }
    }

    /// The value as a number. `DW_FORM_dataN` carries no sign: it is sign-extended only for a
    /// signed type of `signed_bytes` bytes whose full width it spans (two's complement).
    /// Narrower forms hold small non-negative values: GCC emits the smallest `dataN` that holds
    /// a non-negative value (an `int` enumerator of 128 is `DW_FORM_data1 0x80`) and
    /// `DW_FORM_sdata` for negative ones.
    pub fn widen(self, signed_bytes: Option<u32>) -> Option<i128> {
        match self {
            Value::Unsigned(v) => Some(i128::from(v)),
            Value::Signed(v) => Some(i128::from(v)),
            Value::Data { raw, bytes } => {
                let bits = u32::from(bytes) * 8;
                match signed_bytes {
                    Some(width) if u32::from(bytes) >= width && bits < 128 => {
                        let shift = 128 - bits;
                        Some((i128::from(raw) << shift) >> shift)
                    }
                    _ => Some(i128::from(raw)),
                }
            }
            Value::NotConstant => None,
        }
    }
}

/// Where a `DW_AT_name` string is. Resolved only when the converter needs the name: most kept
/// DIEs are members of types an earlier unit already defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Name<'d> {
    None,
    Inline(&'d [u8]),
    Str(usize),
    LineStr(usize),
    Strx(usize),
}

impl Name<'_> {
    /// No name (or an empty one).
    pub fn is_empty(&self) -> bool {
        matches!(self, Name::None | Name::Inline([]))
    }
}

/// One kept DIE. Children follow their parent in the table; `end` is the index after the last
/// descendant, so `i + 1 .. end` is the subtree.
#[derive(Debug, Clone)]
pub(crate) struct Node<'d> {
    /// Unit offset of the DIE.
    pub offset: usize,
    pub end: u32,
    pub tag: Tag,
    pub declaration: bool,
    /// `DW_AT_encoding` (`DW_ATE_*`), 0 when absent.
    pub encoding: u8,
    /// `DW_AT_name`.
    pub name: Name<'d>,
    pub ty: TypeRef,
    pub byte_size: Option<Value>,
    pub bit_size: Option<Value>,
    pub data_bit_offset: Option<Value>,
    /// DWARF 2/3 bitfields: bits from the most significant bit of the storage unit.
    pub bit_offset: Option<Value>,
    pub member_location: Option<Value>,
    pub upper_bound: Option<Value>,
    pub count: Option<Value>,
    pub const_value: Option<Value>,
}

impl<'d> Node<'d> {
    fn new(offset: usize, tag: Tag, index: u32) -> Self {
        Node {
            offset,
            end: index.saturating_add(1),
            tag,
            declaration: false,
            encoding: 0,
            name: Name::None,
            ty: TypeRef::None,
            byte_size: None,
            bit_size: None,
            data_bit_offset: None,
            bit_offset: None,
            member_location: None,
            upper_bound: None,
            count: None,
            const_value: None,
        }
    }
}

/// The kept DIEs of one unit.
#[derive(Debug)]
pub(crate) struct UnitTypes<'d> {
    dwarf: Dwarf<'d>,
    format: gimli::Format,
    str_offsets_base: DebugStrOffsetsBase<usize>,
    /// `.debug_info` offset of the unit header.
    pub unit_offset: u64,
    pub nodes: Vec<Node<'d>>,
    /// DIEs read, kept or not.
    pub dies: u64,
}

impl<'d> UnitTypes<'d> {
    pub fn new(dwarf: Dwarf<'d>) -> Self {
        UnitTypes {
            dwarf,
            format: gimli::Format::Dwarf32,
            str_offsets_base: DebugStrOffsetsBase(0),
            unit_offset: 0,
            nodes: Vec::new(),
            dies: 0,
        }
    }

    /// The bytes of a name.
    pub fn name(&self, name: Name<'d>) -> Result<&'d [u8], Error> {
        let d = &self.dwarf;
        let found = match name {
            Name::None => return Ok(&[]),
            Name::Inline(s) => return Ok(s),
            Name::Str(o) => d.str.get_str(gimli::DebugStrOffset(o)),
            Name::LineStr(o) => d.line_str.get_str(gimli::DebugLineStrOffset(o)),
            Name::Strx(i) => d
                .str_offsets
                .get_str_offset(
                    self.format,
                    self.str_offsets_base,
                    gimli::DebugStrOffsetsIndex(i),
                )
                .and_then(|o| d.str.get_str(o)),
        };
        found.map(|s| s.slice()).map_err(|source| Error::Dwarf {
            unit: self.unit_offset,
            source,
        })
    }

    /// Index of the kept DIE at `offset` (nodes are in offset order).
    pub fn find(&self, offset: usize) -> Option<usize> {
        self.nodes.binary_search_by_key(&offset, |n| n.offset).ok()
    }

    /// `.debug_info` offset of a node, for messages.
    pub fn die_offset(&self, index: usize) -> u64 {
        let unit_relative = self.nodes.get(index).map_or(0, |n| n.offset);
        self.unit_offset
            .saturating_add(u64::try_from(unit_relative).unwrap_or(u64::MAX))
    }

    /// Indexes of the direct children of node `index`.
    pub fn children(&self, index: usize) -> Children<'_, 'd> {
        let end = self
            .nodes
            .get(index)
            .map_or(0, |n| usize::try_from(n.end).unwrap_or(usize::MAX));
        Children {
            nodes: &self.nodes,
            next: index.saturating_add(1),
            end: end.min(self.nodes.len()),
        }
    }

    /// Indexes of the nodes directly under the unit DIE.
    pub fn top_level(&self) -> Children<'_, 'd> {
        Children {
            nodes: &self.nodes,
            next: 0,
            end: self.nodes.len(),
        }
    }
}

/// Iterator over sibling nodes, jumping over subtrees.
#[derive(Debug)]
pub(crate) struct Children<'a, 'd> {
    nodes: &'a [Node<'d>],
    next: usize,
    end: usize,
}

impl Iterator for Children<'_, '_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.next >= self.end {
            return None;
        }
        let current = self.next;
        let skip_to = self
            .nodes
            .get(current)
            .map_or(usize::MAX, |n| usize::try_from(n.end).unwrap_or(usize::MAX));
        // `end` always lies past the node itself; the max() keeps hostile-looking tables from
        // looping even if that were broken.
        self.next = skip_to.max(current.saturating_add(1));
        Some(current)
    }
}

#[derive(Clone, Copy)]
enum Scope {
    /// Directly under the unit DIE.
    Unit,
    /// Under kept node `index` with tag `tag`.
    Kept(u32, Tag),
    /// Under a DIE whose subtree is ignored.
    Skipped,
}

/// Reads the DIEs of one unit into `out` (cleared first).
///
/// `known(tag, name)` says whether a named struct, union or enum is already defined. In a C
/// unit the definition of a known one is then not read at all (most of a kernel unit is the
/// definitions of header types an earlier unit had): in C, nothing outside a struct refers to
/// the DIEs inside it. C++ nests named types inside classes, so other languages read
/// everything.
pub(crate) fn scan_unit<'d>(
    header: &UnitHeader<Reader<'d>>,
    limits: &Limits,
    out: &mut UnitTypes<'d>,
    known: &dyn Fn(Tag, &[u8]) -> bool,
) -> Result<(), Error> {
    let unit_offset = match header.offset() {
        gimli::UnitSectionOffset::DebugInfoOffset(DebugInfoOffset(o)) => o,
        gimli::UnitSectionOffset::DebugTypesOffset(t) => t.0,
    };
    out.unit_offset = u64::try_from(unit_offset).unwrap_or(u64::MAX);
    out.nodes.clear();
    out.dies = 0;
    out.format = header.format();
    let unit = out.unit_offset;
    let gimli_err = |source| Error::Dwarf { unit, source };

    let abbreviations = header.abbreviations(&out.dwarf.abbrev).map_err(gimli_err)?;
    let mut raw = header
        .entries_raw(&abbreviations, None)
        .map_err(gimli_err)?;
    out.str_offsets_base =
        DebugStrOffsetsBase::default_for_encoding_and_file(header.encoding(), DwarfFileType::Main);
    let mut stack: Vec<Scope> = Vec::new();
    let mut seen_root = false;
    // Whether type definitions can be skipped by name (see `known` above).
    let mut c_unit = false;

    while !raw.is_empty() {
        let offset = raw.next_offset().0;
        let Some(abbrev) = raw.read_abbreviation().map_err(gimli_err)? else {
            // A null entry closes the innermost open DIE; trailing padding after the unit DIE
            // closes nothing.
            match stack.pop() {
                Some(Scope::Kept(index, _)) => close(&mut out.nodes, index),
                Some(_) => {}
                None if seen_root => break,
                None => {}
            }
            continue;
        };
        out.dies = out.dies.saturating_add(1);
        let Some(&scope) = stack.last() else {
            if seen_root {
                // Anything after the unit DIE's subtree is not part of the tree.
                break;
            }
            seen_root = true;
            for spec in abbrev.attributes() {
                let attr = raw.read_attribute(*spec).map_err(gimli_err)?;
                match attr.value() {
                    AttributeValue::DebugStrOffsetsBase(base) => out.str_offsets_base = base,
                    AttributeValue::Language(lang) => c_unit = is_c(lang),
                    _ => {}
                }
            }
            if abbrev.has_children() {
                stack.push(Scope::Unit);
            } else {
                break;
            }
            continue;
        };
        let tag = Tag::from_dwarf(abbrev.tag());
        let kept = match (scope, tag) {
            (Scope::Unit, Some(tag)) if tag.is_type() => Some(tag),
            (Scope::Kept(_, parent), Some(tag)) if parent.keeps_child(tag) => Some(tag),
            _ => None,
        };
        let Some(tag) = kept else {
            if !abbrev.has_children() {
                raw.skip_attributes(abbrev.attributes())
                    .map_err(gimli_err)?;
                continue;
            }
            // Functions hold most of a unit's DIEs; DW_AT_sibling jumps over them. Only a
            // forward jump is taken, so hostile siblings cannot make the scan loop.
            let mut sibling = None;
            for spec in abbrev.attributes() {
                let attr = raw.read_attribute(*spec).map_err(gimli_err)?;
                if let (dw::DW_AT_sibling, AttributeValue::UnitRef(o)) = (attr.name(), attr.value())
                {
                    sibling = Some(o);
                }
            }
            let jump = sibling
                .filter(|o| o.0 > raw.next_offset().0)
                .and_then(|o| header.entries_raw(&abbreviations, Some(o)).ok());
            match jump {
                Some(after) => raw = after,
                None => push(&mut stack, Scope::Skipped, unit, limits)?,
            }
            continue;
        };
        if out.nodes.len() >= limits.max_dies_per_unit {
            return Err(Error::UnitTooLarge {
                unit,
                what: "the number of type DIEs",
                limit: limits.max_dies_per_unit,
            });
        }
        let index = u32::try_from(out.nodes.len()).map_err(|_| Error::UnitTooLarge {
            unit,
            what: "the number of type DIEs",
            limit: limits.max_dies_per_unit,
        })?;
        let mut node = Node::new(offset, tag, index);
        let mut sibling = None;
        for spec in abbrev.attributes() {
            let attr = raw.read_attribute(*spec).map_err(gimli_err)?;
            if let (dw::DW_AT_sibling, AttributeValue::UnitRef(o)) = (attr.name(), attr.value()) {
                sibling = Some(o);
            }
            read_attribute(header, &mut node, attr).map_err(|e| match e {
                AttrError::Gimli(source) => Error::Dwarf { unit, source },
                AttrError::Unsupported(what) => Error::Unsupported {
                    die: unit.saturating_add(u64::try_from(offset).unwrap_or(u64::MAX)),
                    what,
                },
            })?;
        }
        if c_unit
            && abbrev.has_children()
            && !node.declaration
            && matches!(scope, Scope::Unit)
            && matches!(tag, Tag::Struct | Tag::Union | Tag::Enum)
            && !node.name.is_empty()
        {
            let jump = sibling
                .filter(|o| o.0 > raw.next_offset().0)
                .and_then(|o| header.entries_raw(&abbreviations, Some(o)).ok());
            if let Some(after) = jump {
                if known(tag, out.name(node.name)?) {
                    // An earlier unit defined it, and the converter keeps the first
                    // definition: this one is kept as a mere declaration of the name.
                    node.declaration = true;
                    out.nodes.push(node);
                    raw = after;
                    continue;
                }
            }
        }
        out.nodes.push(node);
        if abbrev.has_children() {
            push(&mut stack, Scope::Kept(index, tag), unit, limits)?;
        }
    }
    // A unit cut short leaves DIEs open; their subtrees end where the data did.
    while let Some(scope) = stack.pop() {
        if let Scope::Kept(index, _) = scope {
            close(&mut out.nodes, index);
        }
    }
    Ok(())
}

/// C, by any of its standard revisions.
fn is_c(lang: gimli::DwLang) -> bool {
    matches!(
        lang,
        dw::DW_LANG_C89 | dw::DW_LANG_C | dw::DW_LANG_C99 | dw::DW_LANG_C11 | dw::DW_LANG_C17
    )
}

fn push(stack: &mut Vec<Scope>, scope: Scope, unit: u64, limits: &Limits) -> Result<(), Error> {
    if stack.len() >= limits.max_die_nesting {
        return Err(Error::UnitTooLarge {
            unit,
            what: "DIE nesting",
            limit: limits.max_die_nesting,
        });
    }
    stack.push(scope);
    Ok(())
}

fn close(nodes: &mut [Node<'_>], index: u32) {
    let end = u32::try_from(nodes.len()).unwrap_or(u32::MAX);
    if let Some(node) = nodes.get_mut(usize::try_from(index).unwrap_or(usize::MAX)) {
        node.end = end;
    }
}

enum AttrError {
    Gimli(gimli::Error),
    Unsupported(&'static str),
}

impl From<gimli::Error> for AttrError {
    fn from(e: gimli::Error) -> Self {
        AttrError::Gimli(e)
    }
}

fn read_attribute<'d>(
    header: &UnitHeader<Reader<'d>>,
    node: &mut Node<'d>,
    attr: gimli::Attribute<Reader<'d>>,
) -> Result<(), AttrError> {
    match attr.name() {
        dw::DW_AT_name => {
            node.name = match attr.value() {
                AttributeValue::String(s) => Name::Inline(s.slice()),
                AttributeValue::DebugStrRef(o) => Name::Str(o.0),
                AttributeValue::DebugLineStrRef(o) => Name::LineStr(o.0),
                AttributeValue::DebugStrOffsetsIndex(i) => Name::Strx(i.0),
                AttributeValue::DebugStrRefSup(_) => {
                    return Err(AttrError::Unsupported(
                        "a name in a supplementary object file (dwz)",
                    ))
                }
                _ => Name::None,
            };
        }
        dw::DW_AT_type => {
            node.ty = match attr.value() {
                AttributeValue::UnitRef(o) => TypeRef::Die(o.0),
                AttributeValue::DebugInfoRef(o) => match o.to_unit_offset(header) {
                    Some(u) => TypeRef::Die(u.0),
                    None => TypeRef::Unsupported("a type reference into another unit"),
                },
                AttributeValue::DebugTypesRef(_) => {
                    TypeRef::Unsupported("a type reference by signature (type units)")
                }
                AttributeValue::DebugInfoRefSup(_) => {
                    TypeRef::Unsupported("a type reference into a supplementary object file")
                }
                _ => TypeRef::Unsupported("a DW_AT_type of an unexpected form"),
            };
        }
        dw::DW_AT_byte_size => node.byte_size = Some(Value::from_attr(attr.raw_value())),
        dw::DW_AT_bit_size => node.bit_size = Some(Value::from_attr(attr.raw_value())),
        dw::DW_AT_data_bit_offset => {
            node.data_bit_offset = Some(Value::from_attr(attr.raw_value()))
        }
        dw::DW_AT_bit_offset => node.bit_offset = Some(Value::from_attr(attr.raw_value())),
        dw::DW_AT_data_member_location => {
            node.member_location = Some(match attr.raw_value() {
                AttributeValue::Exprloc(e) => simple_offset(e.0.slice()),
                AttributeValue::Block(b) => simple_offset(b.slice()),
                v => Value::from_attr(v),
            });
        }
        dw::DW_AT_upper_bound => node.upper_bound = Some(Value::from_attr(attr.raw_value())),
        dw::DW_AT_count => node.count = Some(Value::from_attr(attr.raw_value())),
        dw::DW_AT_const_value => node.const_value = Some(Value::from_attr(attr.raw_value())),
        dw::DW_AT_encoding => {
            if let AttributeValue::Encoding(e) = attr.value() {
                node.encoding = e.0;
            }
        }
        dw::DW_AT_declaration => {
            if let AttributeValue::Flag(f) = attr.value() {
                node.declaration = f;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The member offset of a DWARF 2 style location expression: `DW_OP_plus_uconst N` or
/// `DW_OP_constu N` alone. Anything else (a computed offset, as virtual bases need) is not a
/// constant.
fn simple_offset(expr: &[u8]) -> Value {
    let Some((&op, rest)) = expr.split_first() else {
        return Value::NotConstant;
    };
    if op != dw::DW_OP_plus_uconst.0 && op != dw::DW_OP_constu.0 {
        return Value::NotConstant;
    }
    let mut value: u64 = 0;
    for (i, &byte) in rest.iter().enumerate() {
        let shift = u32::try_from(i).unwrap_or(u32::MAX).saturating_mul(7);
        if shift >= 64 {
            return Value::NotConstant;
        }
        let bits = u64::from(byte & 0x7f);
        if shift > 0 && bits.leading_zeros() < shift {
            return Value::NotConstant;
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            // The whole expression must be this one operation.
            return if i + 1 == rest.len() {
                Value::Unsigned(value)
            } else {
                Value::NotConstant
            };
        }
    }
    Value::NotConstant
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_expressions() {
        assert_eq!(simple_offset(&[0x23, 0x10]), Value::Unsigned(16));
        assert_eq!(simple_offset(&[0x10, 0x80, 0x01]), Value::Unsigned(128));
        assert_eq!(simple_offset(&[0x23]), Value::NotConstant);
        assert_eq!(simple_offset(&[0x23, 0x10, 0x06]), Value::NotConstant);
        assert_eq!(simple_offset(&[0x06]), Value::NotConstant);
        assert_eq!(simple_offset(&[]), Value::NotConstant);
        assert_eq!(
            simple_offset(&[0x23, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Value::NotConstant
        );
        assert_eq!(
            simple_offset(&[0x23, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Value::Unsigned(u64::MAX)
        );
    }

    #[test]
    fn data_forms_widen_by_signedness() {
        let v = Value::Data {
            raw: 0xff,
            bytes: 1,
        };
        assert_eq!(v.widen(Some(1)), Some(-1));
        // A 1-byte form of a 4-byte signed type is a small positive value.
        assert_eq!(v.widen(Some(4)), Some(255));
        assert_eq!(v.widen(None), Some(255));
        let v = Value::Data {
            raw: u64::MAX,
            bytes: 8,
        };
        assert_eq!(v.widen(Some(8)), Some(-1));
        assert_eq!(v.widen(None), Some(i128::from(u64::MAX)));
        assert_eq!(Value::Signed(-5).widen(None), Some(-5));
        assert_eq!(Value::Signed(-5).unsigned(), None);
        assert_eq!(Value::NotConstant.widen(Some(4)), None);
    }
}
