//! Kept DIEs to BTF types, deduplicated across units.
//!
//! A kernel has about 3,000 units and each repeats the types of the headers it includes, so
//! types are shared as they are converted:
//! - a named struct, union, enum or typedef owns one id per (kind, name) for the whole run. The
//!   first unit that defines it fills it in; later definitions are not even looked at (their
//!   members are never converted), and a declaration anywhere resolves to that id, which stays a
//!   forward declaration only if no unit defines it.
//! - types without an identity of their own (base types, pointers, qualifiers, arrays,
//!   prototypes, anonymous enums) are interned by their content, which refers to already
//!   shared ids.
//! - anonymous structs and unions are converted with the named type that contains them, so
//!   once as well.
//!
//! Named types are only reserved while their members wait on a work list, so recursion only
//! follows chains of unnamed types (`const struct x *[4]`) and is bounded by
//! [`Limits::max_depth`].

use std::collections::HashMap;

use gimli::constants as dw;
use kvmaccess_btf::encode::BtfBuilder;
use kvmaccess_btf::TypeId;

use crate::scan::{Node, Tag, TypeRef, UnitTypes, Value};
use crate::{Error, Limits};

type Id = u32;

/// Largest `vlen` (members, enumerators, parameters) a BTF record holds.
const MAX_VLEN: usize = 0xffff;

/// Member bit offsets of a struct with bitfields are 24 bits wide in BTF.
const MAX_BITFIELD_STRUCT_OFFSET: u64 = (1 << 24) - 1;

/// Total bytes of names accepted; BTF string offsets are 32-bit.
const MAX_STRING_BYTES: usize = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SlotKind {
    Struct,
    Union,
    Enum,
    Typedef,
}

/// The kinds that only refer to another type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum RefKind {
    Ptr,
    Const,
    Volatile,
    Restrict,
}

#[derive(Debug)]
struct Member {
    name: u32,
    ty: Id,
    bit_offset: u32,
    bitfield: u8,
}

#[derive(Debug)]
enum Out {
    Int {
        name: u32,
        size: u32,
        bits: u8,
        signed: bool,
        is_char: bool,
        is_bool: bool,
    },
    Float {
        name: u32,
        size: u32,
    },
    Ref(RefKind, Id),
    Typedef {
        name: u32,
        target: Id,
    },
    Array {
        element: Id,
        count: u32,
    },
    Composite {
        union: bool,
        name: u32,
        size: u32,
        members: Vec<Member>,
    },
    Enum {
        name: u32,
        size: u32,
        values: Vec<(u32, i128)>,
    },
    Proto {
        ret: Id,
        params: Vec<Id>,
    },
    /// A named type seen only as a declaration so far.
    Pending {
        kind: SlotKind,
        name: u32,
    },
    /// A base type BTF cannot express (complex, decimal, odd sizes): an empty struct of its
    /// size, so that sizes and offsets around it stay right.
    Opaque {
        name: u32,
        size: u32,
    },
}

#[derive(Debug, PartialEq, Eq, Hash)]
enum Key {
    Int {
        name: u32,
        size: u32,
        bits: u8,
        encoding: u8,
    },
    Float {
        name: u32,
        size: u32,
    },
    Ref(RefKind, Id),
    Array {
        element: Id,
        count: u32,
    },
    Proto {
        ret: Id,
        params: Box<[Id]>,
    },
    AnonEnum {
        size: u32,
        values: Box<[(u32, i128)]>,
    },
    Opaque {
        name: u32,
        size: u32,
    },
}

#[derive(Debug, Clone, Copy)]
enum Memo {
    Todo,
    InProgress,
    Done(Id),
}

/// Per-unit conversion state.
struct UnitState {
    memo: Vec<Memo>,
    /// Structs and unions whose members are still to be converted: (node, id).
    work: Vec<(usize, Id)>,
}

/// Counts reported with the result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Units read.
    pub units: usize,
    /// DIEs read (including the skipped ones).
    pub dies: u64,
    /// Types in the BTF produced.
    pub types: usize,
    /// Of those, structs and unions no unit defines (BTF forward declarations).
    pub forward_declarations: usize,
}

/// Accumulates the types of all units.
#[derive(Debug)]
pub(crate) struct Converter<'l> {
    limits: &'l Limits,
    big_endian: bool,
    names: HashMap<Box<[u8]>, u32>,
    strings: Vec<String>,
    string_bytes: usize,
    types: Vec<Out>,
    slots: HashMap<(SlotKind, u32), Id>,
    interned: HashMap<Key, Id>,
    array_index: Option<Id>,
    pub stats: Stats,
}

fn bad(unit: &UnitTypes<'_>, index: usize, reason: impl Into<String>) -> Error {
    Error::BadDie {
        die: unit.die_offset(index),
        reason: reason.into(),
    }
}

fn node<'a, 'd>(unit: &'a UnitTypes<'d>, index: usize) -> Result<&'a Node<'d>, Error> {
    unit.nodes.get(index).ok_or_else(|| Error::BadDie {
        die: unit.unit_offset,
        reason: format!("internal: node {index} out of range"),
    })
}

/// A size attribute that must fit BTF's 32 bits; absent is 0.
fn size32(unit: &UnitTypes<'_>, index: usize, value: Option<Value>) -> Result<u32, Error> {
    match value {
        None => Ok(0),
        Some(v) => v
            .unsigned()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| bad(unit, index, format!("byte size {v:?} does not fit BTF"))),
    }
}

impl<'l> Converter<'l> {
    pub fn new(limits: &'l Limits, big_endian: bool) -> Self {
        Converter {
            limits,
            big_endian,
            names: HashMap::new(),
            strings: vec![String::new()],
            string_bytes: 0,
            types: Vec::new(),
            slots: HashMap::new(),
            interned: HashMap::new(),
            array_index: None,
            stats: Stats::default(),
        }
    }

    /// Converts the file-scope types of one unit.
    pub fn add_unit(&mut self, unit: &UnitTypes<'_>) -> Result<(), Error> {
        self.stats.units = self.stats.units.saturating_add(1);
        self.stats.dies = self.stats.dies.saturating_add(unit.dies);
        let mut state = UnitState {
            memo: vec![Memo::Todo; unit.nodes.len()],
            work: Vec::new(),
        };
        for index in unit.top_level() {
            let n = node(unit, index)?;
            // Only types a user could name, or that carry named constants; pointers, arrays
            // and the like are converted when something named refers to them.
            let root = match n.tag {
                Tag::Struct | Tag::Union => !n.name.is_empty() && !n.declaration,
                Tag::Enum => !n.declaration,
                Tag::Typedef => !n.name.is_empty(),
                Tag::Base => true,
                _ => false,
            };
            if root {
                self.node_id(unit, &mut state, index, 0)?;
                while let Some((index, id)) = state.work.pop() {
                    self.fill_composite(unit, &mut state, index, id)?;
                }
            }
        }
        Ok(())
    }

    /// Whether a named struct, union or enum already has its definition.
    pub fn is_defined(&self, tag: Tag, name: &[u8]) -> bool {
        let kind = match tag {
            Tag::Struct => SlotKind::Struct,
            Tag::Union => SlotKind::Union,
            Tag::Enum => SlotKind::Enum,
            _ => return false,
        };
        self.names
            .get(name)
            .and_then(|&name| self.slots.get(&(kind, name)))
            .is_some_and(|&id| !self.is_pending(id))
    }

    fn push(&mut self, out: Out) -> Result<Id, Error> {
        if self.types.len() >= self.limits.max_types {
            return Err(Error::TooManyTypes {
                limit: self.limits.max_types,
            });
        }
        self.types.push(out);
        u32::try_from(self.types.len()).map_err(|_| Error::TooManyTypes {
            limit: self.limits.max_types,
        })
    }

    fn slot_mut(&mut self, id: Id) -> Option<&mut Out> {
        self.types
            .get_mut(usize::try_from(id).ok()?.checked_sub(1)?)
    }

    fn is_pending(&self, id: Id) -> bool {
        let index = usize::try_from(id)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .unwrap_or(usize::MAX);
        matches!(self.types.get(index), Some(Out::Pending { .. }))
    }

    fn intern(&mut self, key: Key, make: impl FnOnce() -> Out) -> Result<Id, Error> {
        if let Some(&id) = self.interned.get(&key) {
            return Ok(id);
        }
        let id = self.push(make())?;
        self.interned.insert(key, id);
        Ok(id)
    }

    fn name(&mut self, bytes: &[u8]) -> Result<u32, Error> {
        if bytes.is_empty() {
            return Ok(0);
        }
        if let Some(&id) = self.names.get(bytes) {
            return Ok(id);
        }
        self.string_bytes = self.string_bytes.saturating_add(bytes.len() + 1);
        let too_many = Error::TooManyNames {
            limit: MAX_STRING_BYTES,
        };
        if self.string_bytes > MAX_STRING_BYTES {
            return Err(too_many);
        }
        let id = u32::try_from(self.strings.len()).map_err(|_| too_many)?;
        // BTF names are UTF-8; C identifiers always are.
        self.strings
            .push(String::from_utf8_lossy(bytes).into_owned());
        self.names.insert(bytes.into(), id);
        Ok(id)
    }

    /// The id of the type `r` refers to, from node `from`.
    fn ref_id(
        &mut self,
        unit: &UnitTypes<'_>,
        state: &mut UnitState,
        from: usize,
        r: TypeRef,
        depth: usize,
    ) -> Result<Id, Error> {
        match r {
            TypeRef::None => Ok(0),
            TypeRef::Unsupported(what) => Err(Error::Unsupported {
                die: unit.die_offset(from),
                what,
            }),
            TypeRef::Die(offset) => match unit.find(offset) {
                Some(target) => self.node_id(unit, state, target, depth.saturating_add(1)),
                None => Err(bad(
                    unit,
                    from,
                    format!(
                        "DW_AT_type refers to {:#x}, which is not a file-scope type of its unit",
                        unit.unit_offset
                            .saturating_add(u64::try_from(offset).unwrap_or(u64::MAX))
                    ),
                )),
            },
        }
    }

    fn node_id(
        &mut self,
        unit: &UnitTypes<'_>,
        state: &mut UnitState,
        index: usize,
        depth: usize,
    ) -> Result<Id, Error> {
        match state.memo.get(index) {
            Some(Memo::Done(id)) => return Ok(*id),
            Some(Memo::InProgress) => {
                return Err(bad(
                    unit,
                    index,
                    "type reference cycle that no struct, union or typedef breaks",
                ))
            }
            Some(Memo::Todo) => {}
            None => return Err(bad(unit, index, "internal: no memo slot")),
        }
        if depth > self.limits.max_depth {
            return Err(Error::TooDeep {
                die: unit.die_offset(index),
                limit: self.limits.max_depth,
            });
        }
        let n = node(unit, index)?;
        if let Some(m) = state.memo.get_mut(index) {
            *m = Memo::InProgress;
        }
        let id = match n.tag {
            Tag::Void => 0,
            Tag::Base => self.base(unit, index, n)?,
            Tag::Pointer | Tag::Const | Tag::Volatile | Tag::Restrict => {
                let kind = match n.tag {
                    Tag::Pointer => RefKind::Ptr,
                    Tag::Const => RefKind::Const,
                    Tag::Volatile => RefKind::Volatile,
                    _ => RefKind::Restrict,
                };
                let t = self.ref_id(unit, state, index, n.ty, depth)?;
                self.intern(Key::Ref(kind, t), || Out::Ref(kind, t))?
            }
            Tag::Transparent => self.ref_id(unit, state, index, n.ty, depth)?,
            Tag::Typedef if n.name.is_empty() => self.ref_id(unit, state, index, n.ty, depth)?,
            Tag::Typedef => {
                let name = self.name(unit.name(n.name)?)?;
                match self.slots.get(&(SlotKind::Typedef, name)) {
                    Some(&id) => id,
                    None => {
                        let id = self.push(Out::Typedef { name, target: 0 })?;
                        self.slots.insert((SlotKind::Typedef, name), id);
                        // Reserved before the target is converted, so that a target referring
                        // back to the typedef finds it.
                        if let Some(m) = state.memo.get_mut(index) {
                            *m = Memo::Done(id);
                        }
                        let target = self.ref_id(unit, state, index, n.ty, depth)?;
                        if let Some(Out::Typedef { target: t, .. }) = self.slot_mut(id) {
                            *t = target;
                        }
                        id
                    }
                }
            }
            Tag::Struct | Tag::Union => self.composite(unit, state, index, n)?,
            Tag::Enum => self.enumeration(unit, index, n)?,
            Tag::Array => self.array(unit, state, index, n, depth)?,
            Tag::Subroutine => self.prototype(unit, state, index, n, depth)?,
            Tag::Member | Tag::Enumerator | Tag::Subrange | Tag::Param | Tag::Variadic => {
                return Err(bad(
                    unit,
                    index,
                    format!("a {:?} DIE is referred to as a type", n.tag),
                ))
            }
        };
        if let Some(m) = state.memo.get_mut(index) {
            *m = Memo::Done(id);
        }
        Ok(id)
    }

    fn base(&mut self, unit: &UnitTypes<'_>, index: usize, n: &Node<'_>) -> Result<Id, Error> {
        let name = self.name(unit.name(n.name)?)?;
        let size = size32(unit, index, n.byte_size)?;
        let encoding = n.encoding;
        let integral = [
            dw::DW_ATE_address,
            dw::DW_ATE_boolean,
            dw::DW_ATE_signed,
            dw::DW_ATE_signed_char,
            dw::DW_ATE_unsigned,
            dw::DW_ATE_unsigned_char,
            dw::DW_ATE_UTF,
        ]
        .iter()
        .any(|e| e.0 == encoding);
        if encoding == dw::DW_ATE_float.0 && matches!(size, 2 | 4 | 8 | 12 | 16) {
            return self.intern(Key::Float { name, size }, || Out::Float { name, size });
        }
        if !integral || !matches!(size, 1 | 2 | 4 | 8 | 16) {
            return self.intern(Key::Opaque { name, size }, || Out::Opaque { name, size });
        }
        let full = u8::try_from(size * 8).unwrap_or(u8::MAX);
        let bits = n
            .bit_size
            .and_then(Value::unsigned)
            .and_then(|b| u8::try_from(b).ok())
            .filter(|&b| b > 0 && b <= full)
            .unwrap_or(full);
        self.int(name, size, bits, encoding)
    }

    /// An integer of `size` bytes (1, 2, 4, 8 or 16) with DWARF encoding `encoding`.
    fn int(&mut self, name: u32, size: u32, bits: u8, encoding: u8) -> Result<Id, Error> {
        let signed = signed_encoding(encoding);
        let is_char =
            encoding == dw::DW_ATE_signed_char.0 || encoding == dw::DW_ATE_unsigned_char.0;
        let is_bool = encoding == dw::DW_ATE_boolean.0;
        let key = Key::Int {
            name,
            size,
            bits,
            encoding,
        };
        self.intern(key, || Out::Int {
            name,
            size,
            bits,
            signed,
            is_char,
            is_bool,
        })
    }

    fn composite(
        &mut self,
        unit: &UnitTypes<'_>,
        state: &mut UnitState,
        index: usize,
        n: &Node<'_>,
    ) -> Result<Id, Error> {
        let union = n.tag == Tag::Union;
        if n.name.is_empty() {
            let id = self.push(Out::Composite {
                union,
                name: 0,
                size: 0,
                members: Vec::new(),
            })?;
            if !n.declaration {
                state.work.push((index, id));
            }
            return Ok(id);
        }
        let kind = if union {
            SlotKind::Union
        } else {
            SlotKind::Struct
        };
        let name = self.name(unit.name(n.name)?)?;
        let id = match self.slots.get(&(kind, name)) {
            Some(&id) => id,
            None => {
                let id = self.push(Out::Pending { kind, name })?;
                self.slots.insert((kind, name), id);
                id
            }
        };
        if !n.declaration && self.is_pending(id) {
            if let Some(slot) = self.slot_mut(id) {
                *slot = Out::Composite {
                    union,
                    name,
                    size: 0,
                    members: Vec::new(),
                };
            }
            state.work.push((index, id));
        }
        Ok(id)
    }

    fn fill_composite(
        &mut self,
        unit: &UnitTypes<'_>,
        state: &mut UnitState,
        index: usize,
        id: Id,
    ) -> Result<(), Error> {
        let n = node(unit, index)?;
        let size = size32(unit, index, n.byte_size)?;
        let mut members = Vec::new();
        let mut has_bitfields = false;
        let mut max_offset = 0u64;
        for child in unit.children(index) {
            let m = node(unit, child)?;
            if m.tag != Tag::Member {
                continue;
            }
            if members.len() >= MAX_VLEN {
                return Err(bad(unit, index, format!("more than {MAX_VLEN} members")));
            }
            let ty = self.ref_id(unit, state, child, m.ty, 0)?;
            let (bit_offset, bitfield) = self.member_position(unit, child, m)?;
            has_bitfields |= bitfield != 0;
            max_offset = max_offset.max(u64::from(bit_offset));
            members.push(Member {
                name: self.name(unit.name(m.name)?)?,
                ty,
                bit_offset,
                bitfield,
            });
        }
        if has_bitfields && max_offset > MAX_BITFIELD_STRUCT_OFFSET {
            return Err(bad(
                unit,
                index,
                format!(
                    "a struct with bitfields and a member at bit {max_offset}: BTF holds 24-bit \
                     offsets there"
                ),
            ));
        }
        if let Some(Out::Composite {
            size: s,
            members: m,
            ..
        }) = self.slot_mut(id)
        {
            *s = size;
            *m = members;
        }
        Ok(())
    }

    /// Bit offset from the start of the struct and bitfield width of member `m`.
    fn member_position(
        &self,
        unit: &UnitTypes<'_>,
        index: usize,
        m: &Node<'_>,
    ) -> Result<(u32, u8), Error> {
        let not_constant = || bad(unit, index, "member position is not a constant");
        let bitfield = match m.bit_size {
            None => 0,
            Some(v) => v
                .unsigned()
                .and_then(|b| u8::try_from(b).ok())
                .ok_or_else(|| bad(unit, index, format!("bitfield of {v:?} bits")))?,
        };
        let bits: i128 = if let Some(v) = m.data_bit_offset {
            i128::from(v.unsigned().ok_or_else(not_constant)?)
        } else {
            let base = match m.member_location {
                None => 0,
                Some(v) => i128::from(v.unsigned().ok_or_else(not_constant)?) * 8,
            };
            match m.bit_offset {
                // DWARF 2/3 bitfields count from the most significant bit of a storage unit
                // of DW_AT_byte_size bytes (the member type's size when absent).
                Some(v) if bitfield != 0 => {
                    let from_msb = v.widen(None).ok_or_else(not_constant)?;
                    if self.big_endian {
                        base + from_msb
                    } else {
                        let storage = match m.byte_size {
                            Some(s) => s.unsigned().ok_or_else(not_constant)?,
                            None => self.storage_size(unit, index, m.ty)?,
                        };
                        base + i128::from(storage) * 8 - from_msb - i128::from(bitfield)
                    }
                }
                _ => base,
            }
        };
        let bit_offset = u32::try_from(bits).map_err(|_| {
            bad(
                unit,
                index,
                format!("member at bit offset {bits}, outside what BTF holds"),
            )
        })?;
        Ok((bit_offset, bitfield))
    }

    /// Byte size of the type behind `r`, through typedefs and qualifiers (for old-style
    /// bitfields, whose storage unit is that of the member's integer type).
    fn storage_size(&self, unit: &UnitTypes<'_>, from: usize, r: TypeRef) -> Result<u64, Error> {
        let mut current = r;
        for _ in 0..=self.limits.max_depth {
            let TypeRef::Die(offset) = current else { break };
            let Some(target) = unit.find(offset) else {
                break;
            };
            let n = node(unit, target)?;
            if let Some(size) = n.byte_size.and_then(Value::unsigned) {
                return Ok(size);
            }
            current = n.ty;
        }
        Err(bad(
            unit,
            from,
            "bitfield with DW_AT_bit_offset whose storage size is unknown",
        ))
    }

    fn enumeration(
        &mut self,
        unit: &UnitTypes<'_>,
        index: usize,
        n: &Node<'_>,
    ) -> Result<Id, Error> {
        let name = self.name(unit.name(n.name)?)?;
        if name != 0 {
            if let Some(&id) = self.slots.get(&(SlotKind::Enum, name)) {
                if n.declaration || !self.is_pending(id) {
                    return Ok(id);
                }
            } else if n.declaration {
                let id = self.push(Out::Pending {
                    kind: SlotKind::Enum,
                    name,
                })?;
                self.slots.insert((SlotKind::Enum, name), id);
                return Ok(id);
            }
        }
        let size = size32(unit, index, n.byte_size)?;
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(bad(unit, index, format!("enum of {size} bytes")));
        }
        // The underlying type (DWARF 3+) says how to read DW_FORM_dataN values.
        let signed = self.underlying_signed(unit, n.ty);
        let mut values = Vec::new();
        for child in unit.children(index) {
            let e = node(unit, child)?;
            if e.tag != Tag::Enumerator {
                continue;
            }
            if values.len() >= MAX_VLEN {
                return Err(bad(
                    unit,
                    index,
                    format!("more than {MAX_VLEN} enumerators"),
                ));
            }
            let value = e
                .const_value
                .and_then(|v| v.widen(signed.then_some(size)))
                .ok_or_else(|| bad(unit, child, "enumerator without a constant value"))?;
            values.push((self.name(unit.name(e.name)?)?, value));
        }
        if name == 0 {
            let key = Key::AnonEnum {
                size,
                values: values.clone().into_boxed_slice(),
            };
            return self.intern(key, || Out::Enum {
                name: 0,
                size,
                values,
            });
        }
        let out = Out::Enum { name, size, values };
        match self.slots.get(&(SlotKind::Enum, name)) {
            Some(&id) => {
                if let Some(slot) = self.slot_mut(id) {
                    *slot = out;
                }
                Ok(id)
            }
            None => {
                let id = self.push(out)?;
                self.slots.insert((SlotKind::Enum, name), id);
                Ok(id)
            }
        }
    }

    fn underlying_signed(&self, unit: &UnitTypes<'_>, r: TypeRef) -> bool {
        let mut current = r;
        for _ in 0..=self.limits.max_depth {
            let TypeRef::Die(offset) = current else { break };
            let Some(n) = unit.find(offset).and_then(|i| unit.nodes.get(i)) else {
                break;
            };
            if n.tag == Tag::Base {
                return signed_encoding(n.encoding);
            }
            current = n.ty;
        }
        false
    }

    fn array(
        &mut self,
        unit: &UnitTypes<'_>,
        state: &mut UnitState,
        index: usize,
        n: &Node<'_>,
        depth: usize,
    ) -> Result<Id, Error> {
        let element = self.ref_id(unit, state, index, n.ty, depth)?;
        let mut counts = Vec::new();
        for child in unit.children(index) {
            let s = node(unit, child)?;
            if s.tag == Tag::Subrange {
                counts.push(subrange_count(unit, child, s)?);
            }
        }
        if counts.is_empty() {
            counts.push(0);
        }
        if self.array_index.is_none() {
            // BTF arrays name an index type; DWARF's (sizetype) is not needed for layout.
            let name = self.name(b"__ARRAY_SIZE_TYPE__")?;
            let id = self.int(name, 4, 32, dw::DW_ATE_unsigned.0)?;
            self.array_index = Some(id);
        }
        // `int a[2][3]` is one DIE with two subranges; in BTF an array of 2 arrays of 3.
        let mut current = element;
        for &count in counts.iter().rev() {
            let e = current;
            current = self.intern(Key::Array { element: e, count }, || Out::Array {
                element: e,
                count,
            })?;
        }
        Ok(current)
    }

    fn prototype(
        &mut self,
        unit: &UnitTypes<'_>,
        state: &mut UnitState,
        index: usize,
        n: &Node<'_>,
        depth: usize,
    ) -> Result<Id, Error> {
        let ret = self.ref_id(unit, state, index, n.ty, depth)?;
        let mut params = Vec::new();
        for child in unit.children(index) {
            let p = node(unit, child)?;
            let id = match p.tag {
                Tag::Param => self.ref_id(unit, state, child, p.ty, depth)?,
                // BTF marks varargs with a last parameter of type void.
                Tag::Variadic => 0,
                _ => continue,
            };
            if params.len() >= MAX_VLEN {
                return Err(bad(unit, index, format!("more than {MAX_VLEN} parameters")));
            }
            params.push(id);
        }
        let key = Key::Proto {
            ret,
            params: params.clone().into_boxed_slice(),
        };
        self.intern(key, || Out::Proto { ret, params })
    }

    /// Encodes everything as BTF.
    pub fn finish(mut self) -> Result<(Vec<u8>, Stats), Error> {
        let mut b = BtfBuilder::new();
        let strings = std::mem::take(&mut self.strings);
        let s = |id: u32| -> &str {
            strings
                .get(usize::try_from(id).unwrap_or(usize::MAX))
                .map_or("", String::as_str)
        };
        let index_type = TypeId(self.array_index.unwrap_or(0));
        let mut forward = 0;
        for t in &self.types {
            match t {
                Out::Int {
                    name,
                    size,
                    bits,
                    signed,
                    is_char,
                    is_bool,
                } => b.int_encoded(s(*name), *size, *bits, *signed, *is_char, *is_bool),
                Out::Float { name, size } => b.float(s(*name), *size),
                Out::Ref(kind, t) => match kind {
                    RefKind::Ptr => b.ptr(TypeId(*t)),
                    RefKind::Const => b.const_(TypeId(*t)),
                    RefKind::Volatile => b.volatile(TypeId(*t)),
                    RefKind::Restrict => b.restrict(TypeId(*t)),
                },
                Out::Typedef { name, target } => b.typedef(s(*name), TypeId(*target)),
                Out::Array { element, count } => b.array(TypeId(*element), index_type, *count),
                Out::Composite {
                    union,
                    name,
                    size,
                    members,
                } => {
                    let list: Vec<(&str, TypeId, u32, u8)> = members
                        .iter()
                        .map(|m| (s(m.name), TypeId(m.ty), m.bit_offset, m.bitfield))
                        .collect();
                    if *union {
                        b.union_(s(*name), *size, &list)
                    } else {
                        b.struct_(s(*name), *size, &list)
                    }
                }
                Out::Enum { name, size, values } => {
                    let list: Vec<(&str, i128)> = values.iter().map(|&(n, v)| (s(n), v)).collect();
                    encode_enum(&mut b, s(*name), *size, &list)
                }
                Out::Proto { ret, params } => {
                    let list: Vec<(&str, TypeId)> =
                        params.iter().map(|&p| ("", TypeId(p))).collect();
                    b.func_proto(TypeId(*ret), &list)
                }
                Out::Pending { kind, name } => match kind {
                    SlotKind::Struct | SlotKind::Union => {
                        forward += 1;
                        b.fwd(s(*name), *kind == SlotKind::Union)
                    }
                    // BTF's forward enum: no values, the usual size.
                    SlotKind::Enum => b.enum_(s(*name), 4, false, &[]),
                    SlotKind::Typedef => b.typedef(s(*name), TypeId(0)),
                },
                Out::Opaque { name, size } => b.struct_(s(*name), *size, &[]),
            };
        }
        self.stats.types = self.types.len();
        self.stats.forward_declarations = forward;
        Ok((b.build(), self.stats))
    }
}

fn signed_encoding(encoding: u8) -> bool {
    encoding == dw::DW_ATE_signed.0 || encoding == dw::DW_ATE_signed_char.0
}

/// `DW_AT_count`, or `DW_AT_upper_bound` + 1; 0 for flexible, zero-length and variable-length
/// arrays.
fn subrange_count(unit: &UnitTypes<'_>, index: usize, s: &Node<'_>) -> Result<u32, Error> {
    let too_big = |what: String| bad(unit, index, format!("array of {what} elements"));
    if let Some(count) = s.count {
        return match count {
            Value::NotConstant => Ok(0),
            v => {
                let c = v.unsigned().ok_or_else(|| too_big(format!("{v:?}")))?;
                u32::try_from(c).map_err(|_| too_big(c.to_string()))
            }
        };
    }
    let upper = match s.upper_bound {
        None | Some(Value::NotConstant) => return Ok(0),
        // Bounds are read as unsigned (the index type is), but a 4- or 8-byte all-ones bound
        // is -1: a zero-length array. A 1- or 2-byte one is a real bound (`char buf[256]`).
        Some(Value::Data { raw, bytes }) => {
            if (bytes == 4 && raw == u64::from(u32::MAX)) || (bytes == 8 && raw == u64::MAX) {
                return Ok(0);
            }
            raw
        }
        Some(Value::Unsigned(u)) if u == u64::MAX => return Ok(0),
        Some(Value::Unsigned(u)) => u,
        Some(Value::Signed(v)) => match u64::try_from(v) {
            Ok(u) => u,
            Err(_) => return Ok(0),
        },
    };
    let count = upper
        .checked_add(1)
        .ok_or_else(|| too_big(format!("{upper} + 1")))?;
    u32::try_from(count).map_err(|_| too_big(count.to_string()))
}

/// A 32-bit `BTF_KIND_ENUM` when the size and values allow, else `BTF_KIND_ENUM64`.
fn encode_enum(b: &mut BtfBuilder, name: &str, size: u32, values: &[(&str, i128)]) -> TypeId {
    let signed = values.iter().any(|&(_, v)| v < 0);
    let fits32 = values.iter().all(|&(_, v)| {
        if signed {
            i32::try_from(v).is_ok()
        } else {
            u32::try_from(v).is_ok()
        }
    });
    if size <= 4 && fits32 {
        let list: Vec<(&str, i64)> = values
            .iter()
            .map(|&(n, v)| (n, i64::try_from(v).unwrap_or(0)))
            .collect();
        b.enum_(name, size, signed, &list)
    } else {
        // Values come from 64-bit DWARF constants, so one of the two conversions fits.
        let list: Vec<(&str, u64)> = values
            .iter()
            .map(|&(n, v)| {
                let bits = match i64::try_from(v) {
                    Ok(s) if s < 0 => u64::from_le_bytes(s.to_le_bytes()),
                    _ => u64::try_from(v).unwrap_or(0),
                };
                (n, bits)
            })
            .collect();
        b.enum64(name, size, signed, &list)
    }
}
