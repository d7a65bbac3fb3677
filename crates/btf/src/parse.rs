//! Decoding of the raw blob into [`Btf`]. Everything is validated here (bounds, string offsets,
//! type references) so that queries can rely on the decoded tables being consistent.

use crate::{
    Btf, Entry, Error, IntInfo, Kind, RawEnumerator, RawMember, RawParam, TypeId, TypeInfo,
    VarSecinfo, MAX_TYPES,
};

const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const RECORD_LEN: usize = 12;

/// The fixed part of `struct btf_header`.
struct Header {
    hdr_len: u32,
    type_off: u32,
    type_len: u32,
    str_off: u32,
    str_len: u32,
}

fn le_u16(b: &[u8], off: usize) -> Option<u16> {
    let end = off.checked_add(2)?;
    Some(u16::from_le_bytes(b.get(off..end)?.try_into().ok()?))
}

fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    let end = off.checked_add(4)?;
    Some(u32::from_le_bytes(b.get(off..end)?.try_into().ok()?))
}

fn to_usize(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl Header {
    fn parse(blob: &[u8]) -> Result<Header, Error> {
        let short = || Error::TooShort {
            len: blob.len(),
            need: HEADER_LEN,
        };
        let magic = le_u16(blob, 0).ok_or_else(short)?;
        if magic == BTF_MAGIC.swap_bytes() {
            return Err(Error::BigEndian);
        }
        if magic != BTF_MAGIC {
            return Err(Error::BadMagic { found: magic });
        }
        let version = *blob.get(2).ok_or_else(short)?;
        if version != 1 {
            return Err(Error::UnsupportedVersion(version));
        }
        let flags = *blob.get(3).ok_or_else(short)?;
        if flags != 0 {
            return Err(Error::UnsupportedFlags(flags));
        }
        let word = |off| le_u32(blob, off).ok_or_else(short);
        let header = Header {
            hdr_len: word(4)?,
            type_off: word(8)?,
            type_len: word(12)?,
            str_off: word(16)?,
            str_len: word(20)?,
        };
        // A longer header is a newer format revision; its extra fields are not needed to read
        // types and strings, so they are skipped rather than rejected.
        if to_usize(header.hdr_len) < HEADER_LEN || to_usize(header.hdr_len) > blob.len() {
            return Err(Error::BadHeaderLen {
                hdr_len: header.hdr_len,
                blob_len: blob.len(),
            });
        }
        Ok(header)
    }

    fn section<'a>(
        &self,
        blob: &'a [u8],
        name: &'static str,
        off: u32,
        len: u32,
    ) -> Result<&'a [u8], Error> {
        let err = || Error::SectionOutOfBounds {
            section: name,
            off,
            len,
            hdr_len: self.hdr_len,
            blob_len: blob.len(),
        };
        let start = to_usize(self.hdr_len)
            .checked_add(to_usize(off))
            .ok_or_else(err)?;
        let end = start.checked_add(to_usize(len)).ok_or_else(err)?;
        blob.get(start..end).ok_or_else(err)
    }
}

/// Looks up a NUL-terminated string; `None` if the offset is out of bounds or not on a
/// character boundary.
pub(crate) fn str_at(strings: &str, off: u32) -> Option<&str> {
    let tail = strings.get(to_usize(off)..)?;
    let end = memchr::memchr(0, tail.as_bytes())?;
    tail.get(..end)
}

struct Decoder<'a> {
    strings: &'a str,
    section: &'a [u8],
    pos: usize,
    id: TypeId,
    kind: Kind,
}

impl Decoder<'_> {
    /// Reads the next word; callers have checked the record length up front, so failure here
    /// means an internal inconsistency and is still reported instead of panicking.
    fn word(&mut self) -> Result<u32, Error> {
        let v = le_u32(self.section, self.pos).ok_or(Error::Truncated {
            id: self.id,
            offset: self.pos,
            need: 4,
            available: self.section.len().saturating_sub(self.pos),
        })?;
        self.pos += 4;
        Ok(v)
    }

    /// Reads a string offset and checks that it names a string.
    fn name_word(&mut self) -> Result<u32, Error> {
        let off = self.word()?;
        match str_at(self.strings, off) {
            Some(_) => Ok(off),
            None => Err(Error::BadStringOffset {
                id: self.id,
                offset: off,
                str_len: self.strings.len(),
            }),
        }
    }

    fn invalid(&self, reason: String) -> Error {
        Error::InvalidType {
            id: self.id,
            kind: self.kind,
            reason,
        }
    }
}

fn extra_index(len: usize) -> Result<u32, Error> {
    // Cannot fail for a blob that fits in memory (8+ bytes per entry), but stays checked.
    u32::try_from(len).map_err(|_| Error::TooManyTypes { limit: MAX_TYPES })
}

impl Btf {
    /// Parses and validates a raw BTF blob (the `.BTF` ELF section, `/sys/kernel/btf/vmlinux`,
    /// or the bytes between `__start_BTF` and `__stop_BTF` in kernel memory).
    ///
    /// All data is copied; the result does not borrow `blob`. Every string offset and type
    /// reference is checked here, so later queries on a successfully parsed [`Btf`] only fail
    /// for semantic reasons (cycles, missing names, ...).
    pub fn parse(blob: &[u8]) -> Result<Btf, Error> {
        Self::parse_with_name_index(blob, &[]).map(|(btf, _)| btf)
    }

    /// [`Btf::parse`], with the name index of an earlier parse of the same blob
    /// ([`Btf::name_index`], from a cache). The hint is checked in one linear pass and used only
    /// when it is exactly the index the parser would build; otherwise the index is built as
    /// usual. Sorting ~100k names is most of the cost of parsing a kernel's BTF.
    ///
    /// Returns the parsed BTF and whether the hint was used.
    pub fn parse_with_name_index(blob: &[u8], hint: &[u32]) -> Result<(Btf, bool), Error> {
        let header = Header::parse(blob)?;
        let types_sec = header.section(blob, "type", header.type_off, header.type_len)?;
        let strs_sec = header.section(blob, "string", header.str_off, header.str_len)?;
        let (t0, t1) = (
            u64::from(header.type_off),
            u64::from(header.type_off) + u64::from(header.type_len),
        );
        let (s0, s1) = (
            u64::from(header.str_off),
            u64::from(header.str_off) + u64::from(header.str_len),
        );
        if header.type_len != 0 && header.str_len != 0 && t0 < s1 && s0 < t1 {
            return Err(Error::SectionsOverlap {
                type_off: header.type_off,
                type_len: header.type_len,
                str_off: header.str_off,
                str_len: header.str_len,
            });
        }
        if header.type_len % 4 != 0 {
            return Err(Error::TypeSectionMisaligned(header.type_len));
        }
        let strings = decode_strings(strs_sec)?;
        let mut btf = Btf {
            strings: String::new(),
            types: Vec::with_capacity(types_sec.len() / RECORD_LEN + 1),
            members: Vec::new(),
            enumerators: Vec::new(),
            params: Vec::new(),
            secinfos: Vec::new(),
            by_name: Vec::new(),
            pointer_size: 8,
        };
        btf.types.push(Entry {
            name_off: 0,
            info: TypeInfo::Void,
            extra: 0,
        });
        let mut pos = 0;
        while pos < types_sec.len() {
            if btf.types.len() > MAX_TYPES {
                return Err(Error::TooManyTypes { limit: MAX_TYPES });
            }
            let id = TypeId(
                u32::try_from(btf.types.len())
                    .map_err(|_| Error::TooManyTypes { limit: MAX_TYPES })?,
            );
            pos = btf.decode_one(strings, types_sec, pos, id)?;
        }
        btf.check_references()?;
        let hinted = !hint.is_empty() && name_index_matches(&btf.types, strings, hint);
        btf.by_name = if hinted {
            hint.to_vec()
        } else {
            name_index(&btf.types, strings)
        };
        btf.strings = strings.to_owned();
        btf.pointer_size = btf.guess_pointer_size();
        Ok((btf, hinted))
    }

    fn decode_one(
        &mut self,
        strings: &str,
        section: &[u8],
        pos: usize,
        id: TypeId,
    ) -> Result<usize, Error> {
        let available = section.len().saturating_sub(pos);
        let truncated = |need| Error::Truncated {
            id,
            offset: pos,
            need,
            available,
        };
        if available < RECORD_LEN {
            return Err(truncated(RECORD_LEN));
        }
        let info_word = le_u32(section, pos + 4).ok_or_else(|| truncated(RECORD_LEN))?;
        let raw_kind = (info_word >> 24) & 0x1f;
        let kind = Kind::from_raw(raw_kind).ok_or(Error::UnknownKind {
            id,
            offset: pos,
            kind: raw_kind,
        })?;
        let vlen16 = u16::try_from(info_word & 0xffff).unwrap_or(u16::MAX);
        let vlen = usize::from(vlen16);
        let kflag = info_word >> 31 == 1;
        let trailing = match kind {
            Kind::Int | Kind::Var | Kind::DeclTag => 4,
            Kind::Array => 12,
            Kind::Struct | Kind::Union | Kind::Enum64 | Kind::Datasec => vlen * 12,
            Kind::Enum | Kind::FuncProto => vlen * 8,
            _ => 0,
        };
        let need = RECORD_LEN + trailing;
        if available < need {
            return Err(truncated(need));
        }

        let mut d = Decoder {
            strings,
            section,
            pos,
            id,
            kind,
        };
        let name_off = d.name_word()?;
        d.word()?;
        let size_type = d.word()?;
        let target = TypeId(size_type);
        let mut extra = 0;
        let info = match kind {
            Kind::Void => {
                return Err(Error::UnknownKind {
                    id,
                    offset: pos,
                    kind: 0,
                })
            }
            Kind::Int => {
                let enc = d.word()?;
                let encoding = (enc >> 24) & 0x0f;
                let bit_offset = u8::try_from((enc >> 16) & 0xff).unwrap_or(u8::MAX);
                let bits = u8::try_from(enc & 0xff).unwrap_or(u8::MAX);
                if !matches!(size_type, 1 | 2 | 4 | 8 | 16) {
                    return Err(d.invalid(format!("int size {size_type} is not 1, 2, 4, 8 or 16")));
                }
                if u64::from(bits) + u64::from(bit_offset) > u64::from(size_type) * 8 {
                    return Err(d.invalid(format!(
                        "int of {size_type} bytes with {bits} bits at bit offset {bit_offset}"
                    )));
                }
                TypeInfo::Int(IntInfo {
                    size: size_type,
                    signed: encoding & 1 != 0,
                    is_char: encoding & 2 != 0,
                    is_bool: encoding & 4 != 0,
                    bit_offset,
                    bits,
                })
            }
            Kind::Ptr => TypeInfo::Ptr { target },
            Kind::Array => TypeInfo::Array {
                element: TypeId(d.word()?),
                index_type: TypeId(d.word()?),
                count: d.word()?,
            },
            Kind::Struct | Kind::Union => {
                extra = extra_index(self.members.len())?;
                for _ in 0..vlen {
                    let name_off = d.name_word()?;
                    let type_id = TypeId(d.word()?);
                    let offset = d.word()?;
                    let (bit_offset, bitfield_size) = if kflag {
                        (
                            offset & 0x00ff_ffff,
                            u8::try_from(offset >> 24).unwrap_or(u8::MAX),
                        )
                    } else {
                        (offset, 0)
                    };
                    self.members.push(RawMember {
                        name_off,
                        type_id,
                        bit_offset,
                        bitfield_size,
                    });
                }
                if kind == Kind::Struct {
                    TypeInfo::Struct {
                        size: size_type,
                        vlen: vlen16,
                        bitfield_encoding: kflag,
                    }
                } else {
                    TypeInfo::Union {
                        size: size_type,
                        vlen: vlen16,
                        bitfield_encoding: kflag,
                    }
                }
            }
            Kind::Enum | Kind::Enum64 => {
                if !matches!(size_type, 1 | 2 | 4 | 8) {
                    return Err(d.invalid(format!("enum size {size_type} is not 1, 2, 4 or 8")));
                }
                extra = extra_index(self.enumerators.len())?;
                for _ in 0..vlen {
                    let name_off = d.name_word()?;
                    let lo = d.word()?;
                    let value = if kind == Kind::Enum {
                        if kflag {
                            i128::from(i32::from_le_bytes(lo.to_le_bytes()))
                        } else {
                            i128::from(lo)
                        }
                    } else {
                        let raw = u64::from(d.word()?) << 32 | u64::from(lo);
                        if kflag {
                            i128::from(i64::from_le_bytes(raw.to_le_bytes()))
                        } else {
                            i128::from(raw)
                        }
                    };
                    self.enumerators.push(RawEnumerator { name_off, value });
                }
                if kind == Kind::Enum {
                    TypeInfo::Enum {
                        size: size_type,
                        vlen: vlen16,
                        signed: kflag,
                    }
                } else {
                    TypeInfo::Enum64 {
                        size: size_type,
                        vlen: vlen16,
                        signed: kflag,
                    }
                }
            }
            Kind::Fwd => TypeInfo::Fwd { is_union: kflag },
            Kind::Typedef => TypeInfo::Typedef { target },
            Kind::Volatile => TypeInfo::Volatile { target },
            Kind::Const => TypeInfo::Const { target },
            Kind::Restrict => TypeInfo::Restrict { target },
            Kind::TypeTag => TypeInfo::TypeTag { target },
            Kind::Func => TypeInfo::Func {
                proto: target,
                linkage: vlen16,
            },
            Kind::FuncProto => {
                extra = extra_index(self.params.len())?;
                for _ in 0..vlen {
                    let name_off = d.name_word()?;
                    let type_id = TypeId(d.word()?);
                    self.params.push(RawParam { name_off, type_id });
                }
                TypeInfo::FuncProto {
                    ret: target,
                    vlen: vlen16,
                }
            }
            Kind::Var => TypeInfo::Var {
                target,
                linkage: d.word()?,
            },
            Kind::Datasec => {
                extra = extra_index(self.secinfos.len())?;
                for _ in 0..vlen {
                    self.secinfos.push(VarSecinfo {
                        type_id: TypeId(d.word()?),
                        offset: d.word()?,
                        size: d.word()?,
                    });
                }
                TypeInfo::Datasec {
                    size: size_type,
                    vlen: vlen16,
                }
            }
            Kind::Float => {
                if !matches!(size_type, 2 | 4 | 8 | 12 | 16) {
                    return Err(
                        d.invalid(format!("float size {size_type} is not 2, 4, 8, 12 or 16"))
                    );
                }
                TypeInfo::Float { size: size_type }
            }
            Kind::DeclTag => {
                let raw = d.word()?;
                let component_idx = i32::from_le_bytes(raw.to_le_bytes());
                if component_idx < -1 {
                    return Err(d.invalid(format!("decl_tag component_idx {component_idx}")));
                }
                TypeInfo::DeclTag {
                    target,
                    component_idx,
                }
            }
        };
        self.types.push(Entry {
            name_off,
            info,
            extra,
        });
        Ok(d.pos)
    }

    /// Every id a type points at must exist; checked after decoding because references may
    /// point forward.
    fn check_references(&self) -> Result<(), Error> {
        let max = u32::try_from(self.types.len().saturating_sub(1)).unwrap_or(u32::MAX);
        let check = |id: TypeId, target: TypeId| {
            if target.0 > max {
                Err(Error::DanglingReference {
                    id,
                    target: target.0,
                    max,
                })
            } else {
                Ok(())
            }
        };
        for (i, entry) in self.types.iter().enumerate() {
            let id = TypeId(u32::try_from(i).unwrap_or(u32::MAX));
            if let TypeInfo::Array { index_type, .. } = entry.info {
                check(id, index_type)?;
            }
            if let Some(target) = entry.info.referenced() {
                check(id, target)?;
            }
            match entry.info {
                TypeInfo::Struct { .. } | TypeInfo::Union { .. } => {
                    for m in self.raw_members(entry) {
                        check(id, m.type_id)?;
                    }
                }
                TypeInfo::FuncProto { .. } => {
                    for p in self.raw_params(entry) {
                        check(id, p.type_id)?;
                    }
                }
                TypeInfo::Datasec { .. } => {
                    for v in self.raw_secinfos(entry) {
                        check(id, v.type_id)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// BTF does not record the pointer size; the kernel's `long` has the same size on every
    /// architecture Linux supports, so it is used when present.
    fn guess_pointer_size(&self) -> u32 {
        ["long unsigned int", "long int"]
            .iter()
            .find_map(|name| {
                self.lookup(name).find_map(|id| match self.entry(id)?.info {
                    TypeInfo::Int(int) if int.size == 4 || int.size == 8 => Some(int.size),
                    _ => None,
                })
            })
            .unwrap_or(8)
    }
}

fn decode_strings(sec: &[u8]) -> Result<&str, Error> {
    // The kernel requires both NULs: offset 0 must be the empty name, and a final NUL ends
    // every string inside the section.
    match (sec.first(), sec.last()) {
        (None, _) => return Err(Error::BadStringSection("empty".into())),
        (Some(&first), _) if first != 0 => {
            return Err(Error::BadStringSection(format!(
                "first byte is {first:#04x}, not NUL"
            )))
        }
        (_, Some(&last)) if last != 0 => {
            return Err(Error::BadStringSection(format!(
                "last byte (offset {:#x}) is {last:#04x}, not NUL",
                sec.len().saturating_sub(1)
            )))
        }
        _ => {}
    }
    std::str::from_utf8(sec)
        .map_err(|e| Error::BadStringSection(format!("not UTF-8 at offset {:#x}", e.valid_up_to())))
}

/// Ids of all named types, sorted by (name, id), for binary search.
/// The name of a type when it has one (the index holds exactly these).
fn indexed_name<'s>(types: &[Entry], strings: &'s str, id: u32) -> Option<&'s str> {
    let entry = types.get(usize::try_from(id).ok()?)?;
    if entry.name_off == 0 {
        return None;
    }
    str_at(strings, entry.name_off).filter(|name| !name.is_empty())
}

/// Whether `hint` is what [`name_index`] returns: strictly increasing (name, id) keys of named
/// types make the ids distinct, and as many of them as there are named types are all of them.
fn name_index_matches(types: &[Entry], strings: &str, hint: &[u32]) -> bool {
    let named = (0..types.len())
        .filter_map(|i| u32::try_from(i).ok())
        .filter(|&id| indexed_name(types, strings, id).is_some())
        .count();
    if hint.len() != named {
        return false;
    }
    let mut previous: Option<(&str, u32)> = None;
    for &id in hint {
        let Some(name) = indexed_name(types, strings, id) else {
            return false;
        };
        if previous.is_some_and(|p| p >= (name, id)) {
            return false;
        }
        previous = Some((name, id));
    }
    true
}

fn name_index(types: &[Entry], strings: &str) -> Vec<u32> {
    let mut named: Vec<(&str, u32)> = types
        .iter()
        .enumerate()
        .filter(|(_, e)| e.name_off != 0)
        .filter_map(|(i, e)| Some((str_at(strings, e.name_off)?, u32::try_from(i).ok()?)))
        .filter(|(name, _)| !name.is_empty())
        .collect();
    named.sort_unstable();
    named.into_iter().map(|(_, id)| id).collect()
}
