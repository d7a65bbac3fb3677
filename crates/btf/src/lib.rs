//! A parser for the Linux kernel's BTF (BPF Type Format) type information that treats its input
//! as hostile.
//!
//! kvmaccess reads the kernel's own BTF (`__start_BTF`..`__stop_BTF`) from guest memory to learn
//! struct layouts without a debug profile. A guest can put anything there, so [`Btf::parse`]
//! bounds-checks every offset, length, count, string offset and type reference, and every query
//! that follows references (typedef chains, array element sizes, anonymous members, C names) is
//! bounded in depth and work: malformed input gives an [`Error`], never a panic or a hang.
//!
//! ```
//! # #[cfg(feature = "encoder")] {
//! use kvmaccess_btf::{encode::BtfBuilder, Btf};
//!
//! let mut b = BtfBuilder::new();
//! let int = b.int("int", 4, true);
//! let list_head = kvmaccess_btf::TypeId(b.next_id().get() + 1); // defined after its pointer
//! let ptr = b.ptr(list_head);
//! b.struct_("list_head", 16, &[("next", ptr, 0, 0), ("prev", ptr, 64, 0)]);
//! b.struct_("task", 24, &[("pid", int, 0, 0), ("tasks", list_head, 64, 0)]);
//! let btf = Btf::parse(&b.build())?;
//!
//! assert_eq!(btf.offset_of("task", "tasks.prev")?, 16);
//! assert_eq!(btf.type_name(ptr)?, "struct list_head *");
//! # }
//! # Ok::<(), kvmaccess_btf::Error>(())
//! ```
//!
//! Format reference: the kernel's `include/uapi/linux/btf.h` and `Documentation/bpf/btf.rst`.

#![forbid(unsafe_code)]

mod cname;
#[cfg(any(test, feature = "encoder"))]
pub mod encode;
mod error;
mod parse;
mod types;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fmt;

pub use error::Error;
pub use types::{
    Enumerator, IntInfo, Kind, Location, Member, Param, TypeId, TypeInfo, TypeRef, VarSecinfo,
};

use parse::str_at;

/// Most types accepted in one blob. A 6.1 vmlinux has about 100,000; the format's own limit
/// (`BTF_MAX_TYPE`) is 1,048,575.
pub const MAX_TYPES: usize = 2_000_000;

/// Longest chain of references followed when resolving typedefs/qualifiers, computing sizes,
/// searching anonymous members or naming types. Real kernels need fewer than 10.
pub const MAX_DEPTH: usize = 64;

/// Most type records visited to produce one C type name.
pub const MAX_NAME_STEPS: usize = 4096;

/// Parsed BTF: the type table, the strings, and a name index. Owned; cheap to query.
pub struct Btf {
    strings: String,
    types: Vec<Entry>,
    members: Vec<RawMember>,
    enumerators: Vec<RawEnumerator>,
    params: Vec<RawParam>,
    secinfos: Vec<VarSecinfo>,
    by_name: Vec<u32>,
    pointer_size: u32,
}

struct Entry {
    name_off: u32,
    info: TypeInfo,
    /// Index of the first trailing entry in the table matching the kind.
    extra: u32,
}

struct RawMember {
    name_off: u32,
    type_id: TypeId,
    bit_offset: u32,
    bitfield_size: u8,
}

struct RawEnumerator {
    name_off: u32,
    value: i128,
}

struct RawParam {
    name_off: u32,
    type_id: TypeId,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.type_count())
            .field("members", &self.members.len())
            .field("strings_len", &self.strings.len())
            .field("pointer_size", &self.pointer_size)
            .finish_non_exhaustive()
    }
}

fn slice_at<T>(table: &[T], start: u32, len: u16) -> &[T] {
    let start = usize::try_from(start).unwrap_or(usize::MAX);
    table
        .get(start..start.saturating_add(usize::from(len)))
        .unwrap_or(&[])
}

impl Btf {
    fn entry(&self, id: TypeId) -> Option<&Entry> {
        self.types.get(id.index())
    }

    fn entry_checked(&self, id: TypeId) -> Result<&Entry, Error> {
        self.entry(id).ok_or(Error::NoSuchId {
            id,
            max: self.max_id(),
        })
    }

    fn str(&self, off: u32) -> &str {
        // Offsets were validated by the parser; "" is only a fallback for the impossible case.
        str_at(&self.strings, off).unwrap_or("")
    }

    fn raw_members(&self, e: &Entry) -> &[RawMember] {
        slice_at(&self.members, e.extra, e.info.vlen())
    }

    fn raw_params(&self, e: &Entry) -> &[RawParam] {
        slice_at(&self.params, e.extra, e.info.vlen())
    }

    fn raw_secinfos(&self, e: &Entry) -> &[VarSecinfo] {
        slice_at(&self.secinfos, e.extra, e.info.vlen())
    }

    fn raw_enumerators(&self, e: &Entry) -> &[RawEnumerator] {
        slice_at(&self.enumerators, e.extra, e.info.vlen())
    }

    /// All ids whose name is `name`, in id order.
    fn lookup<'a>(&'a self, name: &'a str) -> impl Iterator<Item = TypeId> + 'a {
        let name_of = |id: u32| self.entry(TypeId(id)).map_or("", |e| self.str(e.name_off));
        let start = self.by_name.partition_point(|&id| name_of(id) < name);
        self.by_name
            .get(start..)
            .unwrap_or(&[])
            .iter()
            .take_while(move |&&id| name_of(id) == name)
            .map(|&id| TypeId(id))
    }

    /// The name index: ids of named types sorted by (name, id). Give it back to
    /// [`Btf::parse_with_name_index`] to skip the sort when parsing the same blob again.
    pub fn name_index(&self) -> &[u32] {
        &self.by_name
    }

    /// Number of types, not counting `void` (id 0). Valid ids are `0..=type_count()`.
    pub fn type_count(&self) -> usize {
        self.types.len().saturating_sub(1)
    }

    fn max_id(&self) -> u32 {
        u32::try_from(self.type_count()).unwrap_or(u32::MAX)
    }

    /// Size of a pointer in bytes, taken from the size of `long` (8 if BTF has no `long`).
    pub fn pointer_size(&self) -> u32 {
        self.pointer_size
    }

    /// Every type (ids 1..=[`type_count`](Self::type_count)) with its name and decoded record.
    pub fn types(&self) -> impl ExactSizeIterator<Item = TypeRef<'_>> + '_ {
        self.types.iter().enumerate().skip(1).map(|(i, e)| TypeRef {
            id: TypeId(u32::try_from(i).unwrap_or(u32::MAX)),
            name: self.str(e.name_off),
            info: e.info,
        })
    }

    /// One type with its name and decoded record.
    pub fn get(&self, id: TypeId) -> Result<TypeRef<'_>, Error> {
        let e = self.entry_checked(id)?;
        Ok(TypeRef {
            id,
            name: self.str(e.name_off),
            info: e.info,
        })
    }

    /// The decoded record of a type.
    pub fn info(&self, id: TypeId) -> Result<TypeInfo, Error> {
        Ok(self.entry_checked(id)?.info)
    }

    /// The kind of a type.
    pub fn kind(&self, id: TypeId) -> Result<Kind, Error> {
        Ok(self.entry_checked(id)?.info.kind())
    }

    /// The name of a type as stored (empty for anonymous types; no `struct ` prefix).
    pub fn name(&self, id: TypeId) -> Result<&str, Error> {
        Ok(self.str(self.entry_checked(id)?.name_off))
    }

    /// All types named `name`, of any kind, in id order.
    pub fn find_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = TypeId> + 'a {
        self.lookup(name)
    }

    /// The first type of kind `kind` named `name`.
    pub fn find(&self, kind: Kind, name: &str) -> Option<TypeId> {
        self.lookup(name)
            .find(|&id| self.entry(id).is_some_and(|e| e.info.kind() == kind))
    }

    /// `struct name` (not a forward declaration).
    pub fn find_struct(&self, name: &str) -> Option<TypeId> {
        self.find(Kind::Struct, name)
    }

    /// `union name`.
    pub fn find_union(&self, name: &str) -> Option<TypeId> {
        self.find(Kind::Union, name)
    }

    /// `typedef ... name`.
    pub fn find_typedef(&self, name: &str) -> Option<TypeId> {
        self.find(Kind::Typedef, name)
    }

    /// `enum name`, with 32- or 64-bit values.
    pub fn find_enum(&self, name: &str) -> Option<TypeId> {
        self.lookup(name).find(|&id| {
            self.entry(id)
                .is_some_and(|e| matches!(e.info.kind(), Kind::Enum | Kind::Enum64))
        })
    }

    /// A struct, union or typedef named `name` (in that order of preference), as used by
    /// [`offset_of`](Self::offset_of).
    pub fn find_composite(&self, name: &str) -> Option<TypeId> {
        self.find_struct(name)
            .or_else(|| self.find_union(name))
            .or_else(|| self.find_typedef(name))
    }

    /// Strips typedefs, `const`, `volatile`, `restrict` and type tags.
    pub fn resolve(&self, id: TypeId) -> Result<TypeId, Error> {
        let mut cur = id;
        for _ in 0..=MAX_DEPTH {
            match self.entry_checked(cur)?.info {
                TypeInfo::Typedef { target }
                | TypeInfo::Const { target }
                | TypeInfo::Volatile { target }
                | TypeInfo::Restrict { target }
                | TypeInfo::TypeTag { target } => cur = target,
                _ => return Ok(cur),
            }
        }
        Err(Error::TooDeep {
            id,
            limit: MAX_DEPTH,
        })
    }

    /// Size in bytes of a value of this type.
    pub fn size_of(&self, id: TypeId) -> Result<u64, Error> {
        let mut cur = id;
        let mut multiplier: u64 = 1;
        for _ in 0..=MAX_DEPTH {
            let e = self.entry_checked(cur)?;
            let size = match e.info {
                TypeInfo::Int(IntInfo { size, .. })
                | TypeInfo::Struct { size, .. }
                | TypeInfo::Union { size, .. }
                | TypeInfo::Enum { size, .. }
                | TypeInfo::Enum64 { size, .. }
                | TypeInfo::Datasec { size, .. }
                | TypeInfo::Float { size } => u64::from(size),
                TypeInfo::Ptr { .. } => u64::from(self.pointer_size),
                TypeInfo::Array { element, count, .. } => {
                    multiplier = multiplier
                        .checked_mul(u64::from(count))
                        .ok_or(Error::Overflow { id })?;
                    cur = element;
                    continue;
                }
                TypeInfo::Typedef { target }
                | TypeInfo::Const { target }
                | TypeInfo::Volatile { target }
                | TypeInfo::Restrict { target }
                | TypeInfo::TypeTag { target }
                | TypeInfo::Var { target, .. } => {
                    cur = target;
                    continue;
                }
                TypeInfo::Void
                | TypeInfo::Fwd { .. }
                | TypeInfo::Func { .. }
                | TypeInfo::FuncProto { .. }
                | TypeInfo::DeclTag { .. } => {
                    return Err(Error::NoSize {
                        id: cur,
                        kind: e.info.kind(),
                    })
                }
            };
            return size.checked_mul(multiplier).ok_or(Error::Overflow { id });
        }
        Err(Error::TooDeep {
            id,
            limit: MAX_DEPTH,
        })
    }

    /// The members of a struct or union (typedefs and qualifiers are stripped first).
    pub fn members(
        &self,
        id: TypeId,
    ) -> Result<impl ExactSizeIterator<Item = Member<'_>> + '_, Error> {
        let rid = self.resolve(id)?;
        let e = self.entry_checked(rid)?;
        if !matches!(e.info, TypeInfo::Struct { .. } | TypeInfo::Union { .. }) {
            return Err(Error::NotComposite {
                id: rid,
                kind: e.info.kind(),
            });
        }
        Ok(self.raw_members(e).iter().map(|m| Member {
            name: self.str(m.name_off),
            type_id: m.type_id,
            bit_offset: m.bit_offset,
            bitfield_size: m.bitfield_size,
        }))
    }

    /// The enumerators of an enum or enum64 (typedefs and qualifiers are stripped first).
    pub fn enumerators(
        &self,
        id: TypeId,
    ) -> Result<impl ExactSizeIterator<Item = Enumerator<'_>> + '_, Error> {
        let rid = self.resolve(id)?;
        let e = self.entry_checked(rid)?;
        if !matches!(e.info, TypeInfo::Enum { .. } | TypeInfo::Enum64 { .. }) {
            return Err(Error::NotEnum {
                id: rid,
                kind: e.info.kind(),
            });
        }
        Ok(self.raw_enumerators(e).iter().map(|v| Enumerator {
            name: self.str(v.name_off),
            value: v.value,
        }))
    }

    /// The parameters of a function prototype (empty for any other kind).
    pub fn params(
        &self,
        id: TypeId,
    ) -> Result<impl ExactSizeIterator<Item = Param<'_>> + '_, Error> {
        let e = self.entry_checked(id)?;
        Ok(self.raw_params(e).iter().map(|p| Param {
            name: self.str(p.name_off),
            type_id: p.type_id,
        }))
    }

    /// The variables of a data section (empty for any other kind).
    pub fn datasec_vars(&self, id: TypeId) -> Result<&[VarSecinfo], Error> {
        Ok(self.raw_secinfos(self.entry_checked(id)?))
    }

    /// Value of enumerator `name` of `enum enum_name`.
    pub fn enum_value(&self, enum_name: &str, name: &str) -> Result<i128, Error> {
        let id = self
            .find_enum(enum_name)
            .ok_or_else(|| Error::TypeNotFound {
                what: "enum",
                name: enum_name.to_owned(),
            })?;
        self.enumerators(id)?
            .find(|v| v.name == name)
            .map(|v| v.value)
            .ok_or_else(|| Error::EnumeratorNotFound {
                enum_name: enum_name.to_owned(),
                name: name.to_owned(),
            })
    }

    /// Value of enumerator `name` in any enum, named or anonymous (the kernel declares many
    /// constants in anonymous enums). Linear in the number of enumerators.
    pub fn enumerator_value(&self, name: &str) -> Option<i128> {
        self.types
            .iter()
            .filter(|e| matches!(e.info, TypeInfo::Enum { .. } | TypeInfo::Enum64 { .. }))
            .flat_map(|e| self.raw_enumerators(e))
            .find(|v| self.str(v.name_off) == name)
            .map(|v| v.value)
    }

    /// Byte offset of `path` inside the struct, union or typedef named `type_name`.
    ///
    /// `path` is a dot-separated list of member names, each optionally followed by array
    /// indexes: `"tasks"`, `"se.exec_start"`, `"pid_links[1].next"`. Members of anonymous
    /// structs and unions are found as in C, without naming the anonymous level.
    pub fn offset_of(&self, type_name: &str, path: &str) -> Result<u64, Error> {
        let id = self
            .find_composite(type_name)
            .ok_or_else(|| Error::TypeNotFound {
                what: "struct, union or typedef",
                name: type_name.to_owned(),
            })?;
        let loc = self.locate(id, path)?;
        loc.byte_offset().ok_or_else(|| Error::NotByteAligned {
            path: format!("{type_name}.{path}"),
            bit_offset: loc.bit_offset,
            bitfield_size: loc.bitfield_size,
        })
    }

    /// Byte offset of a direct member (or a member of an anonymous struct/union inside it).
    /// Same as [`offset_of`](Self::offset_of) with a one-element path.
    pub fn member_offset(&self, type_name: &str, member: &str) -> Result<u64, Error> {
        if member.contains(['.', '[']) {
            return Err(Error::InvalidPath {
                path: member.to_owned(),
                reason: "a member name, not a path, was expected",
            });
        }
        self.offset_of(type_name, member)
    }

    /// Follows a member path (see [`offset_of`](Self::offset_of)) from type `id` and returns the
    /// bit offset, type and bitfield width of the member reached.
    pub fn locate(&self, id: TypeId, path: &str) -> Result<Location, Error> {
        let invalid = |reason| Error::InvalidPath {
            path: path.to_owned(),
            reason,
        };
        let mut loc = Location {
            bit_offset: 0,
            type_id: id,
            bitfield_size: 0,
        };
        if path.is_empty() {
            return Err(invalid("empty path"));
        }
        for component in path.split('.') {
            let (name, mut indexes) = match component.find('[') {
                Some(i) => (
                    component.get(..i).unwrap_or(""),
                    component.get(i..).unwrap_or(""),
                ),
                None => (component, ""),
            };
            if name.is_empty() {
                return Err(invalid("empty member name"));
            }
            let composite = self.resolve(loc.type_id)?;
            let mut visited = HashSet::new();
            let found = self
                .find_member(composite, name, &mut visited, 0)?
                .ok_or_else(|| Error::MemberNotFound {
                    id: composite,
                    type_name: self
                        .type_name(composite)
                        .unwrap_or_else(|_| composite.to_string()),
                    member: name.to_owned(),
                })?;
            loc = Location {
                bit_offset: loc
                    .bit_offset
                    .checked_add(found.bit_offset)
                    .ok_or(Error::Overflow { id })?,
                type_id: found.type_id,
                bitfield_size: found.bitfield_size,
            };
            while !indexes.is_empty() {
                let rest = indexes
                    .strip_prefix('[')
                    .ok_or_else(|| invalid("junk after ']'"))?;
                let close = rest.find(']').ok_or_else(|| invalid("missing ']'"))?;
                let digits = rest.get(..close).unwrap_or("");
                let index: u64 = digits
                    .parse()
                    .map_err(|_| invalid("index is not a number"))?;
                indexes = rest.get(close + 1..).unwrap_or("");
                let array = self.resolve(loc.type_id)?;
                let bad = |reason: String| Error::BadIndex {
                    path: path.to_owned(),
                    index,
                    reason,
                };
                let TypeInfo::Array { element, count, .. } = self.info(array)? else {
                    return Err(bad(format!("type {array} is not an array")));
                };
                // Flexible arrays (count 0) are indexable: the kernel allocates them past the end.
                if count != 0 && index >= u64::from(count) {
                    return Err(bad(format!("array {array} has {count} elements")));
                }
                let step = self
                    .size_of(element)?
                    .checked_mul(index)
                    .and_then(|b| b.checked_mul(8))
                    .ok_or(Error::Overflow { id })?;
                loc.bit_offset = loc
                    .bit_offset
                    .checked_add(step)
                    .ok_or(Error::Overflow { id })?;
                loc.type_id = element;
            }
        }
        Ok(loc)
    }

    /// Depth-first search for `name` among the members of `id`, descending into unnamed
    /// struct/union members. `visited` makes the work linear in the size of the type graph even
    /// when hostile BTF shares or loops anonymous members.
    fn find_member(
        &self,
        id: TypeId,
        name: &str,
        visited: &mut HashSet<TypeId>,
        depth: usize,
    ) -> Result<Option<Location>, Error> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep {
                id,
                limit: MAX_DEPTH,
            });
        }
        visited.insert(id);
        for m in self.members(id)? {
            if m.name == name {
                return Ok(Some(Location {
                    bit_offset: u64::from(m.bit_offset),
                    type_id: m.type_id,
                    bitfield_size: m.bitfield_size,
                }));
            }
            if !m.name.is_empty() {
                continue;
            }
            let inner = self.resolve(m.type_id)?;
            let is_composite = matches!(
                self.entry_checked(inner)?.info,
                TypeInfo::Struct { .. } | TypeInfo::Union { .. }
            );
            if !is_composite || visited.contains(&inner) {
                continue;
            }
            if let Some(mut loc) = self.find_member(inner, name, visited, depth + 1)? {
                loc.bit_offset = loc
                    .bit_offset
                    .checked_add(u64::from(m.bit_offset))
                    .ok_or(Error::Overflow { id })?;
                return Ok(Some(loc));
            }
        }
        Ok(None)
    }

    /// A C-like name for a type: `int`, `struct list_head *`, `char [16]`,
    /// `const char *`, `void (*)(struct callback_head *)`, `struct {...}` for anonymous types.
    pub fn type_name(&self, id: TypeId) -> Result<String, Error> {
        cname::type_name(self, id)
    }
}
