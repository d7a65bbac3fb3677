//! A minimal BTF encoder: builds well-formed (or, through [`BtfBuilder::raw`] and
//! [`BtfBuilder::build_with`], deliberately malformed) blobs. It does no validation; callers
//! that encode untrusted data (the DWARF converter) check ranges before calling it.

use std::collections::HashMap;

use crate::TypeId;

/// Field values of the header written by [`BtfBuilder::build_with`]; `None` keeps the value a
/// well-formed blob would have.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeaderOverride {
    /// `hdr_len`.
    pub hdr_len: Option<u32>,
    /// `type_off`.
    pub type_off: Option<u32>,
    /// `type_len`.
    pub type_len: Option<u32>,
    /// `str_off`.
    pub str_off: Option<u32>,
    /// `str_len`.
    pub str_len: Option<u32>,
}

/// Appends types and strings and produces a little-endian BTF blob.
#[derive(Debug, Clone)]
pub struct BtfBuilder {
    strings: Vec<u8>,
    /// Offsets of the names added so far: a whole kernel repeats member names like `next` or
    /// `list` hundreds of thousands of times.
    string_offsets: HashMap<String, u32>,
    types: Vec<u8>,
    next: u32,
}

impl Default for BtfBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BtfBuilder {
    /// An empty builder (string section holds just the empty name).
    pub fn new() -> Self {
        BtfBuilder {
            strings: vec![0],
            string_offsets: HashMap::new(),
            types: Vec::new(),
            next: 1,
        }
    }

    /// The id the next added type will get (for forward references and cycles).
    pub fn next_id(&self) -> TypeId {
        TypeId(self.next)
    }

    /// Adds a string (once: a repeated string gets its first offset) and returns its offset;
    /// "" is offset 0.
    pub fn string(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        if let Some(&off) = self.string_offsets.get(s) {
            return off;
        }
        let off = u32::try_from(self.strings.len()).unwrap_or(u32::MAX);
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        self.string_offsets.insert(s.to_owned(), off);
        off
    }

    /// Appends a raw record: `kind` and `vlen` go into the info word as given, `trailing` words
    /// follow the 12-byte header unchanged.
    pub fn raw(
        &mut self,
        name: &str,
        kind: u32,
        kind_flag: bool,
        vlen: u32,
        size_or_type: u32,
        trailing: &[u32],
    ) -> TypeId {
        let name_off = self.string(name);
        self.raw_off(name_off, kind, kind_flag, vlen, size_or_type, trailing)
    }

    /// Like [`raw`](Self::raw) with an explicit (possibly invalid) name offset.
    pub fn raw_off(
        &mut self,
        name_off: u32,
        kind: u32,
        kind_flag: bool,
        vlen: u32,
        size_or_type: u32,
        trailing: &[u32],
    ) -> TypeId {
        let info = (u32::from(kind_flag) << 31) | ((kind & 0x1f) << 24) | (vlen & 0xffff);
        for w in [name_off, info, size_or_type].iter().chain(trailing) {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        let id = TypeId(self.next);
        self.next += 1;
        id
    }

    /// `BTF_KIND_INT` of `size` bytes using all its bits.
    pub fn int(&mut self, name: &str, size: u32, signed: bool) -> TypeId {
        let enc = u32::from(signed) << 24 | size.saturating_mul(8).min(255);
        self.raw(name, 1, false, 0, size, &[enc])
    }

    /// `BTF_KIND_INT` of `size` bytes and `bits` value bits with explicit encoding flags
    /// (`BTF_INT_SIGNED`, `BTF_INT_CHAR`, `BTF_INT_BOOL`).
    pub fn int_encoded(
        &mut self,
        name: &str,
        size: u32,
        bits: u8,
        signed: bool,
        is_char: bool,
        is_bool: bool,
    ) -> TypeId {
        let encoding = u32::from(signed) | u32::from(is_char) << 1 | u32::from(is_bool) << 2;
        self.raw(name, 1, false, 0, size, &[encoding << 24 | u32::from(bits)])
    }

    /// `char` (signed, `BTF_INT_CHAR`).
    pub fn char(&mut self) -> TypeId {
        self.raw("char", 1, false, 0, 1, &[3 << 24 | 8])
    }

    /// Pointer to `target`.
    pub fn ptr(&mut self, target: TypeId) -> TypeId {
        self.raw("", 2, false, 0, target.0, &[])
    }

    /// Array of `count` `element`s indexed by `index_type`.
    pub fn array(&mut self, element: TypeId, index_type: TypeId, count: u32) -> TypeId {
        self.raw("", 3, false, 0, 0, &[element.0, index_type.0, count])
    }

    fn composite(
        &mut self,
        kind: u32,
        name: &str,
        size: u32,
        members: &[(&str, TypeId, u32, u8)],
    ) -> TypeId {
        let kflag = members.iter().any(|m| m.3 != 0);
        let mut words = Vec::new();
        for &(mname, ty, bit_offset, bitfield) in members {
            words.push(self.string(mname));
            words.push(ty.0);
            words.push(if kflag {
                u32::from(bitfield) << 24 | bit_offset
            } else {
                bit_offset
            });
        }
        let vlen = u32::try_from(members.len()).unwrap_or(u32::MAX);
        self.raw(name, kind, kflag, vlen, size, &words)
    }

    /// Struct with members `(name, type, bit_offset, bitfield_size)`; uses the kind_flag
    /// encoding when any bitfield size is nonzero.
    pub fn struct_(
        &mut self,
        name: &str,
        size: u32,
        members: &[(&str, TypeId, u32, u8)],
    ) -> TypeId {
        self.composite(4, name, size, members)
    }

    /// Union; see [`struct_`](Self::struct_).
    pub fn union_(&mut self, name: &str, size: u32, members: &[(&str, TypeId, u32, u8)]) -> TypeId {
        self.composite(5, name, size, members)
    }

    /// 32-bit enum; `signed` sets kind_flag.
    pub fn enum_(&mut self, name: &str, size: u32, signed: bool, values: &[(&str, i64)]) -> TypeId {
        let mut words = Vec::new();
        for &(vname, v) in values {
            words.push(self.string(vname));
            words.push(u32::try_from(v & 0xffff_ffff).unwrap_or(0));
        }
        let vlen = u32::try_from(values.len()).unwrap_or(u32::MAX);
        self.raw(name, 6, signed, vlen, size, &words)
    }

    /// 64-bit enum with raw 64-bit values; `signed` sets kind_flag.
    pub fn enum64(
        &mut self,
        name: &str,
        size: u32,
        signed: bool,
        values: &[(&str, u64)],
    ) -> TypeId {
        let mut words = Vec::new();
        for &(vname, v) in values {
            words.push(self.string(vname));
            words.push(u32::try_from(v & 0xffff_ffff).unwrap_or(0));
            words.push(u32::try_from(v >> 32).unwrap_or(0));
        }
        let vlen = u32::try_from(values.len()).unwrap_or(u32::MAX);
        self.raw(name, 19, signed, vlen, size, &words)
    }

    /// Forward declaration.
    pub fn fwd(&mut self, name: &str, is_union: bool) -> TypeId {
        self.raw(name, 7, is_union, 0, 0, &[])
    }

    /// Typedef.
    pub fn typedef(&mut self, name: &str, target: TypeId) -> TypeId {
        self.raw(name, 8, false, 0, target.0, &[])
    }

    /// `volatile`.
    pub fn volatile(&mut self, target: TypeId) -> TypeId {
        self.raw("", 9, false, 0, target.0, &[])
    }

    /// `const`.
    pub fn const_(&mut self, target: TypeId) -> TypeId {
        self.raw("", 10, false, 0, target.0, &[])
    }

    /// `restrict`.
    pub fn restrict(&mut self, target: TypeId) -> TypeId {
        self.raw("", 11, false, 0, target.0, &[])
    }

    /// Function with a prototype.
    pub fn func(&mut self, name: &str, proto: TypeId, linkage: u32) -> TypeId {
        self.raw(name, 12, false, linkage, proto.0, &[])
    }

    /// Function prototype with `(name, type)` parameters.
    pub fn func_proto(&mut self, ret: TypeId, params: &[(&str, TypeId)]) -> TypeId {
        let mut words = Vec::new();
        for &(pname, ty) in params {
            words.push(self.string(pname));
            words.push(ty.0);
        }
        let vlen = u32::try_from(params.len()).unwrap_or(u32::MAX);
        self.raw("", 13, false, vlen, ret.0, &words)
    }

    /// Variable.
    pub fn var(&mut self, name: &str, ty: TypeId, linkage: u32) -> TypeId {
        self.raw(name, 14, false, 0, ty.0, &[linkage])
    }

    /// Data section with `(var, offset, size)` entries.
    pub fn datasec(&mut self, name: &str, size: u32, vars: &[(TypeId, u32, u32)]) -> TypeId {
        let words: Vec<u32> = vars.iter().flat_map(|&(t, o, s)| [t.0, o, s]).collect();
        let vlen = u32::try_from(vars.len()).unwrap_or(u32::MAX);
        self.raw(name, 15, false, vlen, size, &words)
    }

    /// Floating point.
    pub fn float(&mut self, name: &str, size: u32) -> TypeId {
        self.raw(name, 16, false, 0, size, &[])
    }

    /// Declaration tag.
    pub fn decl_tag(&mut self, name: &str, target: TypeId, component_idx: i32) -> TypeId {
        self.raw(
            name,
            17,
            false,
            0,
            target.0,
            &[u32::from_le_bytes(component_idx.to_le_bytes())],
        )
    }

    /// Type tag.
    pub fn type_tag(&mut self, name: &str, target: TypeId) -> TypeId {
        self.raw(name, 18, false, 0, target.0, &[])
    }

    /// The blob: 24-byte header, type section, string section.
    pub fn build(&self) -> Vec<u8> {
        self.build_with(HeaderOverride::default())
    }

    /// The blob with some header fields replaced.
    pub fn build_with(&self, o: HeaderOverride) -> Vec<u8> {
        let type_len = u32::try_from(self.types.len()).unwrap_or(u32::MAX);
        let str_len = u32::try_from(self.strings.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(24 + self.types.len() + self.strings.len());
        out.extend_from_slice(&0xeb9f_u16.to_le_bytes());
        out.push(1);
        out.push(0);
        for w in [
            o.hdr_len.unwrap_or(24),
            o.type_off.unwrap_or(0),
            o.type_len.unwrap_or(type_len),
            o.str_off.unwrap_or(type_len),
            o.str_len.unwrap_or(str_len),
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}
