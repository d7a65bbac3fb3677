//! Decoding the kernel's own symbol table (kallsyms) from guest memory.
//!
//! The format, as `scripts/kallsyms` writes it and `kernel/kallsyms.c` reads it:
//!
//! * `kallsyms_num_syms`: a 32-bit count.
//! * `kallsyms_names`: per symbol, a length and that many token numbers. Since 6.1 a length byte
//!   with the top bit set is followed by a second byte and the length is
//!   `(b0 & 0x7f) | (b1 << 7)`; before that the length was always one byte (and below 0x80).
//! * `kallsyms_token_table`: 256 NUL-terminated strings; `kallsyms_token_index`: 256 u16
//!   offsets into it. A name is the concatenation of its tokens; its first character is the
//!   `nm` type letter.
//! * Addresses, either `kallsyms_addresses` (one absolute word per symbol) or, with
//!   `CONFIG_KALLSYMS_BASE_RELATIVE`, `kallsyms_offsets` (s32 per symbol) plus
//!   `kallsyms_relative_base`. With `CONFIG_KALLSYMS_ABSOLUTE_PERCPU` (x86-64 SMP up to 6.14)
//!   a non-negative offset is an absolute value (per-CPU symbols) and a negative one means
//!   `relative_base - 1 - offset`; without it every offset is an unsigned distance from
//!   `relative_base`.
//!
//! Every array is read with one bulk virtual read: per-entry reads would cost a page walk each.

use kvmaccess_core::{Gva, PhysicalMemory};
use kvmaccess_x86::AddressSpace;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::symbols::Symbol;
use crate::vmcoreinfo::Vmcoreinfo;

/// Most symbols accepted (a 6.1 distribution kernel has ~100k; allyesconfig ~500k).
pub const MAX_SYMBOLS: u64 = 2_000_000;

/// Longest expanded name including the type letter (KSYM_NAME_LEN is 512 since 6.1).
pub const MAX_NAME: usize = 512;

/// Most bytes of `kallsyms_names` read (real kernels: 1-2 MiB).
pub const MAX_NAMES_BYTES: usize = 64 << 20;

/// Longest token accepted (real tokens are a few bytes).
const MAX_TOKEN: usize = 256;

/// Bytes of token table read when its end cannot be inferred from the layout.
const MAX_TOKEN_TABLE: usize = 64 * 1024;

/// Kernel virtual memory as the decoder needs it. Implemented for [`AddressSpace`] and for
/// [`FlatMemory`] (a byte slice at a fixed address: tests, fuzzing, vmlinux sections).
pub trait KernelRead {
    /// Fill `buf` from kernel virtual address `gva`.
    fn read_kernel(&mut self, gva: Gva, buf: &mut [u8]) -> Result<()>;
}

impl<M: PhysicalMemory + ?Sized> KernelRead for AddressSpace<'_, M> {
    fn read_kernel(&mut self, gva: Gva, buf: &mut [u8]) -> Result<()> {
        self.read(gva, buf).map_err(|source| Error::Virt {
            what: format!("{} bytes", buf.len()),
            gva,
            source,
        })
    }
}

/// A byte slice that appears at a fixed virtual address; everything else is unmapped.
#[derive(Clone, Copy, Debug)]
pub struct FlatMemory<'a> {
    /// Address of the first byte.
    pub base: u64,
    /// The bytes.
    pub bytes: &'a [u8],
}

impl KernelRead for FlatMemory<'_> {
    fn read_kernel(&mut self, gva: Gva, buf: &mut [u8]) -> Result<()> {
        let unmapped = || Error::Virt {
            what: format!("{} bytes", buf.len()),
            gva,
            source: kvmaccess_x86::Error::RangeWraps {
                gva,
                len: buf.len() as u64,
            },
        };
        let start = gva
            .0
            .checked_sub(self.base)
            .and_then(|off| usize::try_from(off).ok())
            .ok_or_else(unmapped)?;
        let end = start.checked_add(buf.len()).ok_or_else(unmapped)?;
        let src = self.bytes.get(start..end).ok_or_else(unmapped)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Where the address of each symbol comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddressTable {
    /// `kallsyms_offsets` (s32 each) and `kallsyms_relative_base`.
    Relative {
        /// Address of `kallsyms_offsets`.
        offsets: u64,
        /// Address of `kallsyms_relative_base` (a pointer-sized variable).
        relative_base: u64,
    },
    /// `kallsyms_addresses` (one u64 each).
    Absolute {
        /// Address of `kallsyms_addresses`.
        addresses: u64,
    },
}

/// Addresses of the kallsyms arrays in kernel virtual memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KallsymsLocation {
    /// `kallsyms_num_syms`.
    pub num_syms: u64,
    /// `kallsyms_names`.
    pub names: u64,
    /// `kallsyms_token_table`.
    pub token_table: u64,
    /// `kallsyms_token_index`.
    pub token_index: u64,
    /// The address arrays.
    pub addresses: AddressTable,
}

impl KallsymsLocation {
    /// The locations VMCOREINFO exports on kernels >= 6.0.
    pub fn from_vmcoreinfo(info: &Vmcoreinfo) -> Result<Self> {
        let get = |name: &str| {
            info.symbol(name).map_err(|_| Error::KallsymsNotExported {
                missing: format!("SYMBOL({name})"),
            })
        };
        let addresses = match (
            info.symbols.get("kallsyms_offsets"),
            info.symbols.get("kallsyms_relative_base"),
            info.symbols.get("kallsyms_addresses"),
        ) {
            (Some(&offsets), Some(&relative_base), _) => AddressTable::Relative {
                offsets,
                relative_base,
            },
            (_, _, Some(&addresses)) => AddressTable::Absolute { addresses },
            _ => AddressTable::Relative {
                offsets: get("kallsyms_offsets")?,
                relative_base: get("kallsyms_relative_base")?,
            },
        };
        Ok(Self {
            num_syms: get("kallsyms_num_syms")?,
            names: get("kallsyms_names")?,
            token_table: get("kallsyms_token_table")?,
            token_index: get("kallsyms_token_index")?,
            addresses,
        })
    }
}

/// How `kallsyms_offsets` turn into addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OffsetRule {
    /// Decide from the data: a kernel built with absolute per-CPU symbols stores every
    /// non-per-CPU symbol as a negative offset, a plain base-relative one never does (its
    /// offsets are distances above the lowest address, far below 2 GiB).
    #[default]
    Auto,
    /// `CONFIG_KALLSYMS_ABSOLUTE_PERCPU`: non-negative = absolute, negative =
    /// `relative_base - 1 - offset`.
    AbsolutePercpu,
    /// `relative_base + (u32)offset`.
    Relative,
}

/// Options of [`decode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Offset interpretation.
    pub rule: OffsetRule,
}

/// The result of [`decode`].
#[derive(Clone, Debug)]
pub struct Decoded {
    /// Symbols in kallsyms order (sorted by address, per-CPU symbols first).
    pub symbols: Vec<Symbol>,
    /// The offset rule applied (`Auto` only for absolute address tables, where none applies).
    pub rule: OffsetRule,
    /// Bytes read from the guest.
    pub bytes_read: usize,
    /// The bytes the names were decoded from.
    pub source: NamesSource,
}

/// Identity of the bytes that the names (and type letters) were decoded from: the count, the
/// token index and table, and the stretch of `kallsyms_names` that was read. The address arrays
/// are left out on purpose: they move with KASLR, the names do not, so a decoding cached under
/// this identity stays valid across reboots while addresses are always computed afresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamesSource {
    /// BLAKE3 of those bytes (see [`NamesSource::DOMAIN`]).
    pub digest: [u8; 32],
    /// `kallsyms_num_syms`.
    pub count: u32,
    /// Bytes of `kallsyms_token_table` read.
    pub token_table_len: u32,
    /// Bytes of `kallsyms_names` read.
    pub names_len: u32,
}

impl NamesSource {
    /// Prefix of the hashed bytes. It names the decoder's version: a change to how names are
    /// decoded must change it, so names cached by an older decoder no longer match.
    pub const DOMAIN: &'static [u8] = b"kvmaccess kallsyms names v1\0";

    fn compute(num_raw: [u8; 4], index_raw: &[u8], table: &[u8], names: &[u8]) -> Self {
        // Both lengths are bounded far below 4 GiB (MAX_TOKEN_TABLE, MAX_NAMES_BYTES).
        let len32 = |bytes: &[u8]| u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let mut hasher = blake3::Hasher::new();
        hasher.update(Self::DOMAIN);
        hasher.update(&num_raw);
        hasher.update(index_raw);
        // Lengths are hashed too, so that bytes cannot move from one array to the next.
        hasher.update(&len32(table).to_le_bytes());
        hasher.update(table);
        hasher.update(&len32(names).to_le_bytes());
        hasher.update(names);
        Self {
            digest: *hasher.finalize().as_bytes(),
            count: u32::from_le_bytes(num_raw),
            token_table_len: len32(table),
            names_len: len32(names),
        }
    }
}

/// The arrays every name is expanded from, read once.
struct NameTables {
    num_raw: [u8; 4],
    count: usize,
    index_raw: [u8; 512],
    token_offsets: [usize; 256],
    table: Vec<u8>,
}

fn read_name_tables<R: KernelRead + ?Sized>(
    mem: &mut R,
    location: &KallsymsLocation,
    bytes_read: &mut usize,
) -> Result<NameTables> {
    let mut num_raw = [0u8; 4];
    read(mem, location.num_syms, &mut num_raw, "kallsyms_num_syms")?;
    let num = u64::from(u32::from_le_bytes(num_raw));
    if num == 0 || num > MAX_SYMBOLS {
        return Err(Error::KallsymsTooMany {
            value: num,
            limit: MAX_SYMBOLS,
        });
    }
    let count = usize::try_from(num).map_err(|_| Error::KallsymsTooMany {
        value: num,
        limit: MAX_SYMBOLS,
    })?;

    let mut index_raw = [0u8; 512];
    read(
        mem,
        location.token_index,
        &mut index_raw,
        "kallsyms_token_index",
    )?;
    *bytes_read += index_raw.len();
    let mut token_offsets = [0usize; 256];
    for (slot, pair) in token_offsets.iter_mut().zip(index_raw.chunks_exact(2)) {
        *slot = usize::from(u16::from_le_bytes([pair[0], pair[1]]));
    }
    let table_len = token_table_len(location, &token_offsets);
    let mut table = vec![0u8; table_len];
    read(
        mem,
        location.token_table,
        &mut table,
        "kallsyms_token_table",
    )?;
    *bytes_read += table.len();
    Ok(NameTables {
        num_raw,
        count,
        index_raw,
        token_offsets,
        table,
    })
}

/// Decode every symbol.
pub fn decode<R: KernelRead + ?Sized>(
    mem: &mut R,
    location: &KallsymsLocation,
    options: DecodeOptions,
) -> Result<Decoded> {
    let mut bytes_read = 0usize;
    let tables = read_name_tables(mem, location, &mut bytes_read)?;
    let count = tables.count;
    let tokens = split_tokens(&tables.table, &tables.token_offsets)?;

    let addresses = read_addresses(mem, location, count, options.rule, &mut bytes_read)?;

    let mut names = Window::new(location.names, names_hint(location, count));
    let mut symbols = Vec::with_capacity(count);
    let mut expanded: Vec<u8> = Vec::with_capacity(MAX_NAME + MAX_TOKEN);
    let mut offset = 0usize;
    for (index, &address) in addresses.values.iter().enumerate() {
        let start = offset;
        let first = names.byte(mem, offset, index, start)?;
        offset += 1;
        let mut len = usize::from(first);
        if first & 0x80 != 0 {
            let second = names.byte(mem, offset, index, start)?;
            offset += 1;
            len = (len & 0x7f) | (usize::from(second) << 7);
        }
        if len == 0 {
            return Err(Error::KallsymsEmptyName {
                index,
                offset: start,
            });
        }
        let compressed = names.slice(mem, offset, len, index, start)?;
        offset += len;
        expanded.clear();
        for &token in compressed {
            let piece = tokens.get(usize::from(token)).copied().unwrap_or_default();
            if expanded.len() + piece.len() > MAX_NAME + 1 {
                return Err(Error::KallsymsNameTooLong {
                    index,
                    limit: MAX_NAME,
                });
            }
            expanded.extend_from_slice(piece);
        }
        let (Some(&kind), Some(name)) = (expanded.first(), expanded.get(1..)) else {
            return Err(Error::KallsymsEmptyName {
                index,
                offset: start,
            });
        };
        if name.is_empty() {
            return Err(Error::KallsymsEmptyName {
                index,
                offset: start,
            });
        }
        let name = match std::str::from_utf8(name) {
            Ok(text) => text.to_owned(),
            Err(_) => String::from_utf8_lossy(name).into_owned(),
        };
        let kind = if kind.is_ascii_graphic() {
            char::from(kind)
        } else {
            '?'
        };
        symbols.push(Symbol::new(name, address, kind));
    }
    bytes_read += names.len();
    // Hashed from the very buffers decoded above, never from a second read: a guest that
    // changes its tables meanwhile must not get names cached under bytes they did not come from.
    let source = NamesSource::compute(
        tables.num_raw,
        &tables.index_raw,
        &tables.table,
        &names.bytes,
    );
    Ok(Decoded {
        symbols,
        rule: addresses.rule,
        bytes_read,
        source,
    })
}

/// Names decoded earlier (from the profile cache), in kallsyms order, with the identity of the
/// bytes they came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedNames {
    /// The source the names were decoded from.
    pub source: NamesSource,
    /// The symbols with their names and type letters; their addresses are not used (they are
    /// computed from the live guest).
    pub symbols: Vec<Symbol>,
}

/// [`decode`] with the names taken from an earlier decoding, when the guest's name arrays are
/// byte for byte the ones it was made from: the same arrays are read and hashed, which costs
/// far less than expanding every name, and the addresses are computed from the live address
/// arrays as always. `Ok(Err(cached))` gives the names back when the bytes differ.
pub fn decode_cached<R: KernelRead + ?Sized>(
    mem: &mut R,
    location: &KallsymsLocation,
    options: DecodeOptions,
    cached: CachedNames,
) -> Result<std::result::Result<Decoded, CachedNames>> {
    let mut bytes_read = 0usize;
    let tables = read_name_tables(mem, location, &mut bytes_read)?;
    let expected = cached.source;
    let table_len = usize::try_from(expected.token_table_len).unwrap_or(usize::MAX);
    let names_len = usize::try_from(expected.names_len).unwrap_or(usize::MAX);
    if u32::from_le_bytes(tables.num_raw) != expected.count
        || tables.table.len() != table_len
        || cached.symbols.len() != tables.count
        || names_len > MAX_NAMES_BYTES
    {
        return Ok(Err(cached));
    }
    let mut names = vec![0u8; names_len];
    read(mem, location.names, &mut names, "kallsyms_names")?;
    bytes_read += names.len();
    let live = NamesSource::compute(tables.num_raw, &tables.index_raw, &tables.table, &names);
    if live != expected {
        return Ok(Err(cached));
    }
    let addresses = read_addresses(mem, location, tables.count, options.rule, &mut bytes_read)?;
    let mut symbols = cached.symbols;
    for (symbol, address) in symbols.iter_mut().zip(addresses.values) {
        symbol.address = address;
        symbol.module = None;
    }
    Ok(Ok(Decoded {
        symbols,
        rule: addresses.rule,
        bytes_read,
        source: expected,
    }))
}

fn read<R: KernelRead + ?Sized>(mem: &mut R, at: u64, buf: &mut [u8], what: &str) -> Result<()> {
    mem.read_kernel(Gva(at), buf).map_err(|e| match e {
        Error::Virt { gva, source, .. } => Error::Virt {
            what: format!("{what} ({} bytes)", buf.len()),
            gva,
            source,
        },
        other => other,
    })
}

/// The token table ends where the token index begins in every kernel layout since 2.6; trust
/// that when it is plausible, otherwise read just past the furthest token.
fn token_table_len(location: &KallsymsLocation, offsets: &[usize; 256]) -> usize {
    let furthest = offsets.iter().copied().max().unwrap_or(0);
    let fallback = furthest.saturating_add(MAX_TOKEN).min(MAX_TOKEN_TABLE);
    match location.token_index.checked_sub(location.token_table) {
        Some(gap) if gap > 0 && gap <= MAX_TOKEN_TABLE as u64 => {
            usize::try_from(gap).unwrap_or(fallback)
        }
        _ => fallback,
    }
}

fn split_tokens<'t>(table: &'t [u8], offsets: &[usize; 256]) -> Result<Vec<&'t [u8]>> {
    offsets
        .iter()
        .enumerate()
        .map(|(token, &offset)| {
            let rest = table.get(offset..).ok_or(Error::KallsymsTokenIndex {
                token,
                offset,
                table_len: table.len(),
            })?;
            let window = rest.get(..MAX_TOKEN.min(rest.len())).unwrap_or(rest);
            let end = memchr::memchr(0, window).ok_or(Error::KallsymsTokenUnterminated {
                token,
                offset,
                limit: window.len(),
            })?;
            Ok(window.get(..end).unwrap_or_default())
        })
        .collect()
}

struct Addresses {
    values: Vec<u64>,
    rule: OffsetRule,
}

fn read_addresses<R: KernelRead + ?Sized>(
    mem: &mut R,
    location: &KallsymsLocation,
    count: usize,
    rule: OffsetRule,
    bytes_read: &mut usize,
) -> Result<Addresses> {
    match location.addresses {
        AddressTable::Absolute { addresses } => {
            let mut raw = vec![0u8; count * 8];
            read(mem, addresses, &mut raw, "kallsyms_addresses")?;
            *bytes_read += raw.len();
            let values = raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            Ok(Addresses {
                values,
                rule: OffsetRule::Auto,
            })
        }
        AddressTable::Relative {
            offsets,
            relative_base,
        } => {
            let mut base_raw = [0u8; 8];
            read(mem, relative_base, &mut base_raw, "kallsyms_relative_base")?;
            let base = u64::from_le_bytes(base_raw);
            let mut raw = vec![0u8; count * 4];
            read(mem, offsets, &mut raw, "kallsyms_offsets")?;
            *bytes_read += raw.len() + base_raw.len();
            let offsets: Vec<i32> = raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let rule = match rule {
                OffsetRule::Auto if offsets.iter().any(|&o| o < 0) => OffsetRule::AbsolutePercpu,
                OffsetRule::Auto => OffsetRule::Relative,
                chosen => chosen,
            };
            let values = offsets
                .iter()
                .map(|&offset| apply_offset(rule, base, offset))
                .collect();
            Ok(Addresses { values, rule })
        }
    }
}

/// One address from one offset. Wrapping arithmetic is what the kernel does, and a hostile
/// base must not panic the decoder.
pub fn apply_offset(rule: OffsetRule, base: u64, offset: i32) -> u64 {
    match rule {
        OffsetRule::AbsolutePercpu if offset >= 0 => u64::from(offset.unsigned_abs()),
        OffsetRule::AbsolutePercpu => {
            // base - 1 - offset, with offset negative: base - 1 + |offset|.
            base.wrapping_sub(1)
                .wrapping_add(u64::from(offset.unsigned_abs()))
        }
        OffsetRule::Relative | OffsetRule::Auto => {
            base.wrapping_add(u64::from(u32::from_le_bytes(offset.to_le_bytes())))
        }
    }
}

/// Expected size of `kallsyms_names`: the arrays that follow it (markers, then the token table)
/// bound it in every layout; otherwise guess from the count and grow as needed.
fn names_hint(location: &KallsymsLocation, count: usize) -> usize {
    match location.token_table.checked_sub(location.names) {
        Some(gap) if gap > 0 && gap <= MAX_NAMES_BYTES as u64 => {
            usize::try_from(gap).unwrap_or(MAX_NAMES_BYTES)
        }
        _ => count.saturating_mul(16).clamp(4096, MAX_NAMES_BYTES),
    }
}

/// `kallsyms_names`, read in as few bulk reads as possible and grown on demand up to
/// [`MAX_NAMES_BYTES`].
struct Window {
    base: u64,
    bytes: Vec<u8>,
    first_read: usize,
}

impl Window {
    fn new(base: u64, first_read: usize) -> Self {
        Self {
            base,
            bytes: Vec::new(),
            first_read,
        }
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Make `..end` available.
    fn ensure<R: KernelRead + ?Sized>(
        &mut self,
        mem: &mut R,
        end: usize,
        index: usize,
        start: usize,
    ) -> Result<()> {
        if end <= self.bytes.len() {
            return Ok(());
        }
        let overrun = |available: usize| Error::KallsymsNameOverrun {
            index,
            offset: start,
            needed: end - start,
            available,
        };
        if end > MAX_NAMES_BYTES {
            return Err(overrun(self.bytes.len()));
        }
        let target = if self.bytes.is_empty() {
            self.first_read.max(end)
        } else {
            end.max(self.bytes.len().saturating_mul(2))
        }
        .min(MAX_NAMES_BYTES);
        let old = self.bytes.len();
        self.bytes.resize(target, 0);
        let at = self
            .base
            .checked_add(old as u64)
            .ok_or_else(|| overrun(old))?;
        let fresh = self.bytes.get_mut(old..).unwrap_or_default();
        if read(mem, at, fresh, "kallsyms_names").is_ok() {
            return Ok(());
        }
        // A big read may run into an unmapped page past the array: fall back to exactly
        // what this name needs, so the error (if any) names the real culprit.
        self.bytes.truncate(end);
        let fresh = self.bytes.get_mut(old..).unwrap_or_default();
        if let Err(error) = read(mem, at, fresh, "kallsyms_names") {
            self.bytes.truncate(old);
            return match error {
                Error::Virt { .. } => Err(overrun(old)),
                other => Err(other),
            };
        }
        Ok(())
    }

    fn byte<R: KernelRead + ?Sized>(
        &mut self,
        mem: &mut R,
        at: usize,
        index: usize,
        start: usize,
    ) -> Result<u8> {
        self.ensure(mem, at + 1, index, start)?;
        self.bytes
            .get(at)
            .copied()
            .ok_or(Error::KallsymsNameOverrun {
                index,
                offset: start,
                needed: at + 1 - start,
                available: self.bytes.len(),
            })
    }

    fn slice<R: KernelRead + ?Sized>(
        &mut self,
        mem: &mut R,
        at: usize,
        len: usize,
        index: usize,
        start: usize,
    ) -> Result<&[u8]> {
        self.ensure(mem, at + len, index, start)?;
        let available = self.bytes.len();
        self.bytes
            .get(at..at + len)
            .ok_or(Error::KallsymsNameOverrun {
                index,
                offset: start,
                needed: at + len - start,
                available,
            })
    }
}

/// A kallsyms encoder for tests: builds the arrays the kernel's build would, in a simplified
/// form (each name's bytes are tokens of their own except a few multi-byte tokens).
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod testing {
    use super::*;

    /// Encoded arrays and their addresses inside one flat blob.
    #[derive(Debug, Clone)]
    pub struct Blob {
        /// The bytes, to be placed at `base`.
        pub bytes: Vec<u8>,
        /// Where the blob goes.
        pub base: u64,
        /// Array addresses inside it.
        pub location: KallsymsLocation,
    }

    /// Encode `(type letter, name, address)` triples with the absolute-per-CPU rule.
    ///
    /// Tokens: 0x01 = "_t" and 0x02 = "ext_" expand to several bytes; every other byte value
    /// stands for itself (a single-character token), as in real tables for bytes the compressor
    /// did not pair up.
    pub fn encode(base: u64, relative_base: u64, symbols: &[(char, &str, u64)]) -> Blob {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        tokens[1] = b"_t".to_vec();
        tokens[2] = b"ext_".to_vec();
        let mut names = Vec::new();
        for (kind, name, _) in symbols {
            let mut plain = vec![*kind as u8];
            plain.extend_from_slice(name.as_bytes());
            let mut compressed = Vec::new();
            let mut i = 0;
            while i < plain.len() {
                if plain[i..].starts_with(b"ext_") {
                    compressed.push(2);
                    i += 4;
                } else if plain[i..].starts_with(b"_t") {
                    compressed.push(1);
                    i += 2;
                } else {
                    compressed.push(plain[i]);
                    i += 1;
                }
            }
            let len = compressed.len();
            if len < 0x80 {
                names.push(len as u8);
            } else {
                names.push((len & 0x7f) as u8 | 0x80);
                names.push((len >> 7) as u8);
            }
            names.extend_from_slice(&compressed);
        }
        let mut offsets = Vec::new();
        for (_, _, address) in symbols {
            let offset: i32 = if *address < 0x8000_0000 {
                *address as i32
            } else {
                // address = base - 1 - offset
                let distance = address - relative_base;
                -1 - (distance as i32)
            };
            offsets.extend_from_slice(&offset.to_le_bytes());
        }
        let mut table = Vec::new();
        let mut index = Vec::new();
        for token in &tokens {
            index.extend_from_slice(&(table.len() as u16).to_le_bytes());
            table.extend_from_slice(token);
            table.push(0);
        }
        // Layout as the kernel's: offsets, relative_base, num_syms, names, token table, index.
        let mut bytes = Vec::new();
        let at = |bytes: &Vec<u8>| base + bytes.len() as u64;
        let offsets_at = at(&bytes);
        bytes.extend_from_slice(&offsets);
        while bytes.len() % 8 != 0 {
            bytes.push(0);
        }
        let relative_base_at = at(&bytes);
        bytes.extend_from_slice(&relative_base.to_le_bytes());
        let num_at = at(&bytes);
        bytes.extend_from_slice(&(symbols.len() as u32).to_le_bytes());
        let names_at = at(&bytes);
        bytes.extend_from_slice(&names);
        let table_at = at(&bytes);
        bytes.extend_from_slice(&table);
        let index_at = at(&bytes);
        bytes.extend_from_slice(&index);
        Blob {
            bytes,
            base,
            location: KallsymsLocation {
                num_syms: num_at,
                names: names_at,
                token_table: table_at,
                token_index: index_at,
                addresses: AddressTable::Relative {
                    offsets: offsets_at,
                    relative_base: relative_base_at,
                },
            },
        }
    }
}
