use std::fmt;

/// A BTF type id. Id 0 is `void`; real types are numbered from 1 in section order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TypeId(pub u32);

impl TypeId {
    /// The `void` type (also "no type": the return type of a `void` function, the target of
    /// `void *`).
    pub const VOID: TypeId = TypeId(0);

    /// The raw id.
    pub fn get(self) -> u32 {
        self.0
    }

    pub(crate) fn index(self) -> usize {
        // u32 always fits in usize on the 32- and 64-bit targets this crate builds for.
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for TypeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The BTF kind of a type (`BTF_KIND_*` in the kernel's `include/uapi/linux/btf.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// Type id 0 (`BTF_KIND_UNKN` never appears as a record).
    Void,
    /// Integer, char or bool.
    Int,
    /// Pointer.
    Ptr,
    /// Array.
    Array,
    /// Struct.
    Struct,
    /// Union.
    Union,
    /// Enum with 32-bit values.
    Enum,
    /// Forward declaration of a struct or union.
    Fwd,
    /// Typedef.
    Typedef,
    /// `volatile` qualifier.
    Volatile,
    /// `const` qualifier.
    Const,
    /// `restrict` qualifier.
    Restrict,
    /// Function (name + prototype).
    Func,
    /// Function prototype.
    FuncProto,
    /// Global or static variable.
    Var,
    /// Data section (lists variables).
    Datasec,
    /// Floating point.
    Float,
    /// Declaration tag (`__attribute__((btf_decl_tag))`).
    DeclTag,
    /// Type tag (`__attribute__((btf_type_tag))`, e.g. `__user`, `__rcu`).
    TypeTag,
    /// Enum with 64-bit values.
    Enum64,
}

impl Kind {
    pub(crate) fn from_raw(kind: u32) -> Option<Kind> {
        Some(match kind {
            1 => Kind::Int,
            2 => Kind::Ptr,
            3 => Kind::Array,
            4 => Kind::Struct,
            5 => Kind::Union,
            6 => Kind::Enum,
            7 => Kind::Fwd,
            8 => Kind::Typedef,
            9 => Kind::Volatile,
            10 => Kind::Const,
            11 => Kind::Restrict,
            12 => Kind::Func,
            13 => Kind::FuncProto,
            14 => Kind::Var,
            15 => Kind::Datasec,
            16 => Kind::Float,
            17 => Kind::DeclTag,
            18 => Kind::TypeTag,
            19 => Kind::Enum64,
            _ => return None,
        })
    }

    /// Lower-case name as used in messages (`"struct"`, `"func_proto"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Void => "void",
            Kind::Int => "int",
            Kind::Ptr => "ptr",
            Kind::Array => "array",
            Kind::Struct => "struct",
            Kind::Union => "union",
            Kind::Enum => "enum",
            Kind::Fwd => "fwd",
            Kind::Typedef => "typedef",
            Kind::Volatile => "volatile",
            Kind::Const => "const",
            Kind::Restrict => "restrict",
            Kind::Func => "func",
            Kind::FuncProto => "func_proto",
            Kind::Var => "var",
            Kind::Datasec => "datasec",
            Kind::Float => "float",
            Kind::DeclTag => "decl_tag",
            Kind::TypeTag => "type_tag",
            Kind::Enum64 => "enum64",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Integer encoding (`BTF_KIND_INT` trailing word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntInfo {
    /// Size in bytes.
    pub size: u32,
    /// `BTF_INT_SIGNED`.
    pub signed: bool,
    /// `BTF_INT_CHAR`.
    pub is_char: bool,
    /// `BTF_INT_BOOL`.
    pub is_bool: bool,
    /// Bit offset of the value inside the storage (0 from every current compiler).
    pub bit_offset: u8,
    /// Number of value bits (e.g. 4 for a 4-bit bitfield described through the int type).
    pub bits: u8,
}

/// A decoded type: its kind plus the fields an exporter needs to walk it. Variable-length data
/// (members, enumerators, parameters, section variables) is reached through
/// [`Btf::members`](crate::Btf::members), [`Btf::enumerators`](crate::Btf::enumerators),
/// [`Btf::params`](crate::Btf::params) and [`Btf::datasec_vars`](crate::Btf::datasec_vars).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TypeInfo {
    /// Id 0.
    Void,
    /// Integer.
    Int(IntInfo),
    /// Pointer to `target`.
    Ptr {
        /// Pointee.
        target: TypeId,
    },
    /// Array of `count` elements.
    Array {
        /// Element type.
        element: TypeId,
        /// Index type (an int; informative only).
        index_type: TypeId,
        /// Number of elements (0 for flexible arrays).
        count: u32,
    },
    /// Struct of `size` bytes with `vlen` members.
    Struct {
        /// Size in bytes.
        size: u32,
        /// Number of members.
        vlen: u16,
        /// `kind_flag`: member offsets carry bitfield sizes.
        bitfield_encoding: bool,
    },
    /// Union of `size` bytes with `vlen` members.
    Union {
        /// Size in bytes.
        size: u32,
        /// Number of members.
        vlen: u16,
        /// `kind_flag`: member offsets carry bitfield sizes.
        bitfield_encoding: bool,
    },
    /// Enum with 32-bit values.
    Enum {
        /// Size in bytes.
        size: u32,
        /// Number of enumerators.
        vlen: u16,
        /// `kind_flag`: values are signed.
        signed: bool,
    },
    /// Forward declaration.
    Fwd {
        /// `kind_flag`: a union rather than a struct.
        is_union: bool,
    },
    /// Typedef of `target`.
    Typedef {
        /// Aliased type.
        target: TypeId,
    },
    /// `volatile target`.
    Volatile {
        /// Qualified type.
        target: TypeId,
    },
    /// `const target`.
    Const {
        /// Qualified type.
        target: TypeId,
    },
    /// `restrict target`.
    Restrict {
        /// Qualified type.
        target: TypeId,
    },
    /// A function.
    Func {
        /// Its [`TypeInfo::FuncProto`].
        proto: TypeId,
        /// Linkage (0 static, 1 global, 2 extern).
        linkage: u16,
    },
    /// A function prototype with `vlen` parameters.
    FuncProto {
        /// Return type ([`TypeId::VOID`] for `void`).
        ret: TypeId,
        /// Number of parameters (a last unnamed `void` parameter means `...`).
        vlen: u16,
    },
    /// A variable.
    Var {
        /// Its type.
        target: TypeId,
        /// Linkage (0 static, 1 global allocated, 2 extern).
        linkage: u32,
    },
    /// A data section with `vlen` variables.
    Datasec {
        /// Size in bytes.
        size: u32,
        /// Number of variables.
        vlen: u16,
    },
    /// Floating point.
    Float {
        /// Size in bytes.
        size: u32,
    },
    /// Declaration tag on `target` (the type itself or one of its members/parameters).
    DeclTag {
        /// Tagged type.
        target: TypeId,
        /// -1 for the type itself, else the member or parameter index.
        component_idx: i32,
    },
    /// Type tag on `target`.
    TypeTag {
        /// Tagged type.
        target: TypeId,
    },
    /// Enum with 64-bit values.
    Enum64 {
        /// Size in bytes.
        size: u32,
        /// Number of enumerators.
        vlen: u16,
        /// `kind_flag`: values are signed.
        signed: bool,
    },
}

impl TypeInfo {
    /// The kind of this type.
    pub fn kind(&self) -> Kind {
        match self {
            TypeInfo::Void => Kind::Void,
            TypeInfo::Int(_) => Kind::Int,
            TypeInfo::Ptr { .. } => Kind::Ptr,
            TypeInfo::Array { .. } => Kind::Array,
            TypeInfo::Struct { .. } => Kind::Struct,
            TypeInfo::Union { .. } => Kind::Union,
            TypeInfo::Enum { .. } => Kind::Enum,
            TypeInfo::Fwd { .. } => Kind::Fwd,
            TypeInfo::Typedef { .. } => Kind::Typedef,
            TypeInfo::Volatile { .. } => Kind::Volatile,
            TypeInfo::Const { .. } => Kind::Const,
            TypeInfo::Restrict { .. } => Kind::Restrict,
            TypeInfo::Func { .. } => Kind::Func,
            TypeInfo::FuncProto { .. } => Kind::FuncProto,
            TypeInfo::Var { .. } => Kind::Var,
            TypeInfo::Datasec { .. } => Kind::Datasec,
            TypeInfo::Float { .. } => Kind::Float,
            TypeInfo::DeclTag { .. } => Kind::DeclTag,
            TypeInfo::TypeTag { .. } => Kind::TypeTag,
            TypeInfo::Enum64 { .. } => Kind::Enum64,
        }
    }

    /// The single type this one refers to, if it has exactly one (pointer, array element,
    /// typedef, qualifier, tag, variable, function prototype of a function, return type).
    pub fn referenced(&self) -> Option<TypeId> {
        match *self {
            TypeInfo::Ptr { target }
            | TypeInfo::Typedef { target }
            | TypeInfo::Volatile { target }
            | TypeInfo::Const { target }
            | TypeInfo::Restrict { target }
            | TypeInfo::TypeTag { target }
            | TypeInfo::Var { target, .. }
            | TypeInfo::DeclTag { target, .. } => Some(target),
            TypeInfo::Array { element, .. } => Some(element),
            TypeInfo::Func { proto, .. } => Some(proto),
            TypeInfo::FuncProto { ret, .. } => Some(ret),
            _ => None,
        }
    }

    /// Number of trailing variable-length entries (members, enumerators, parameters, variables).
    pub fn vlen(&self) -> u16 {
        match *self {
            TypeInfo::Struct { vlen, .. }
            | TypeInfo::Union { vlen, .. }
            | TypeInfo::Enum { vlen, .. }
            | TypeInfo::Enum64 { vlen, .. }
            | TypeInfo::FuncProto { vlen, .. }
            | TypeInfo::Datasec { vlen, .. } => vlen,
            _ => 0,
        }
    }
}

/// One type as listed by [`Btf::types`](crate::Btf::types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeRef<'a> {
    /// Its id.
    pub id: TypeId,
    /// Its name (empty for anonymous types).
    pub name: &'a str,
    /// Its decoded record.
    pub info: TypeInfo,
}

impl TypeRef<'_> {
    /// The kind of the type.
    pub fn kind(&self) -> Kind {
        self.info.kind()
    }
}

/// A struct or union member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    /// Name (empty for anonymous struct/union members and unnamed bitfield padding).
    pub name: &'a str,
    /// Type of the member.
    pub type_id: TypeId,
    /// Offset in bits from the start of the containing struct/union.
    pub bit_offset: u32,
    /// Bitfield width in bits, 0 if the member is not a bitfield (or the struct does not use
    /// the `kind_flag` encoding; then the int type's [`IntInfo::bits`] tells).
    pub bitfield_size: u8,
}

/// An enumerator of an enum or enum64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enumerator<'a> {
    /// Name.
    pub name: &'a str,
    /// Value, sign- or zero-extended according to the enum's signedness (exact for every
    /// enum64 value, signed or not). BTF from before the signedness flag (pahole < 1.24) marks
    /// every enum unsigned, so a negative 32-bit enumerator of such a kernel reads as its
    /// two's-complement `u32` value.
    pub value: i128,
}

/// A function prototype parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param<'a> {
    /// Name (empty in prototypes of function pointers).
    pub name: &'a str,
    /// Type; [`TypeId::VOID`] on an unnamed last parameter means `...`.
    pub type_id: TypeId,
}

/// A variable in a data section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VarSecinfo {
    /// The [`TypeInfo::Var`] (or [`TypeInfo::Func`] for extern functions).
    pub type_id: TypeId,
    /// Offset in the section.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
}

/// Where a member path leads: see [`Btf::locate`](crate::Btf::locate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Bit offset from the start of the outer type.
    pub bit_offset: u64,
    /// Type of the member reached.
    pub type_id: TypeId,
    /// Bitfield width, 0 if not a bitfield.
    pub bitfield_size: u8,
}

impl Location {
    /// Byte offset, if the member is byte-aligned and not a bitfield.
    pub fn byte_offset(&self) -> Option<u64> {
        (self.bit_offset % 8 == 0 && self.bitfield_size == 0).then_some(self.bit_offset / 8)
    }
}
