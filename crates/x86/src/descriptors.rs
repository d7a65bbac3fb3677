//! GDT and IDT decoding.
//!
//! The decoders take the raw table bytes and never fail: every bit pattern decodes to something
//! (reserved types included), so a tampered table shows up as what it is instead of an error.

use std::fmt;

use kvmaccess_core::{DescriptorTable, Gva, PhysicalMemory};
use serde::Serialize;

use crate::cache::AddressSpace;
use crate::Error;

/// Most GDT slots a 16-bit GDTR limit can cover.
pub const GDT_MAX_ENTRIES: usize = 8192;
/// Number of interrupt vectors.
pub const IDT_MAX_GATES: usize = 256;

/// Bits `shift..shift+width` of `value`.
const fn field(value: u64, shift: u32, width: u32) -> u64 {
    (value >> shift) & ((1 << width) - 1)
}

#[allow(clippy::cast_possible_truncation)] // Masked to 8 bits first.
const fn field_u8(value: u64, shift: u32, width: u32) -> u8 {
    field(value, shift, width) as u8
}

#[allow(clippy::cast_possible_truncation)] // Masked to 16 bits.
const fn field_u16(value: u64, shift: u32) -> u16 {
    field(value, shift, 16) as u16
}

const fn bit(value: u64, n: u32) -> bool {
    value & (1 << n) != 0
}

/// Operand size of a gate or TSS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum GateWidth {
    /// 80286-style.
    #[serde(rename = "16")]
    Bits16,
    /// 32-bit.
    #[serde(rename = "32")]
    Bits32,
    /// 64-bit (long mode; 16-byte descriptor).
    #[serde(rename = "64")]
    Bits64,
}

impl fmt::Display for GateWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GateWidth::Bits16 => "16",
            GateWidth::Bits32 => "32",
            GateWidth::Bits64 => "64",
        })
    }
}

/// Base, limit and attribute bits every segment descriptor has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SegmentFields {
    /// Base address (64-bit for long-mode system descriptors).
    #[serde(with = "kvmaccess_core::hex")]
    pub base: u64,
    /// The 20-bit limit field as stored.
    pub limit: u32,
    /// Last valid offset: the limit scaled by the granularity bit.
    pub limit_bytes: u32,
    /// G: limit counts 4 KiB units.
    pub granularity: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// P.
    pub present: bool,
    /// AVL, free for the OS.
    pub available: bool,
}

impl SegmentFields {
    fn from_low(low: u64) -> Self {
        let limit = u32::from(field_u16(low, 0)) | (u32::from(field_u8(low, 48, 4)) << 16);
        let granularity = bit(low, 55);
        Self {
            base: field(low, 16, 24) | (field(low, 56, 8) << 24),
            limit,
            limit_bytes: if granularity {
                (limit << 12) | 0xfff
            } else {
                limit
            },
            granularity,
            dpl: field_u8(low, 45, 2),
            present: bit(low, 47),
            available: bit(low, 52),
        }
    }
}

/// A code segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CodeSegment {
    /// Base, limit, DPL, P, G, AVL.
    #[serde(flatten)]
    pub fields: SegmentFields,
    /// L: 64-bit code.
    pub long: bool,
    /// D: 32-bit default operand size.
    pub default_32: bool,
    /// C: callable from less privileged code without a gate.
    pub conforming: bool,
    /// R: readable as well as executable.
    pub readable: bool,
    /// A.
    pub accessed: bool,
}

/// A data segment (stack segments included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DataSegment {
    /// Base, limit, DPL, P, G, AVL.
    #[serde(flatten)]
    pub fields: SegmentFields,
    /// B: 32-bit stack pointer / upper bound 4 GiB for expand-down segments.
    pub big: bool,
    /// E: expand-down.
    pub expand_down: bool,
    /// W.
    pub writable: bool,
    /// A.
    pub accessed: bool,
}

/// An LDT descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SystemSegment {
    /// Base, limit, DPL, P, G, AVL.
    #[serde(flatten)]
    pub fields: SegmentFields,
}

/// A TSS descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TssDescriptor {
    /// Base, limit, DPL, P, G, AVL.
    #[serde(flatten)]
    pub fields: SegmentFields,
    /// 16-, 32- or 64-bit TSS.
    pub width: GateWidth,
    /// Busy (loaded in TR of some CPU) rather than available.
    pub busy: bool,
}

/// A call gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CallGate {
    /// 16-, 32- or 64-bit gate.
    pub width: GateWidth,
    /// Target code segment.
    pub selector: u16,
    /// Target offset.
    #[serde(with = "kvmaccess_core::hex")]
    pub offset: u64,
    /// Stack parameters copied on a privilege change (not in 64-bit gates).
    pub param_count: u8,
    /// Descriptor privilege level: the least privileged caller allowed.
    pub dpl: u8,
    /// P.
    pub present: bool,
}

/// A task gate (legacy mode only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TaskGate {
    /// Selector of the TSS to switch to.
    pub tss_selector: u16,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// P.
    pub present: bool,
}

/// What a GDT slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Descriptor {
    /// All zeros: the mandatory null descriptor, or an unused slot.
    Null,
    /// Code segment.
    Code(CodeSegment),
    /// Data segment.
    Data(DataSegment),
    /// Local descriptor table.
    Ldt(SystemSegment),
    /// Task-state segment.
    Tss(TssDescriptor),
    /// Call gate.
    CallGate(CallGate),
    /// Task gate.
    TaskGate(TaskGate),
    /// A system type with no meaning in this mode (interrupt gates in a GDT, 16-bit system types
    /// in long mode, the reserved codes).
    Reserved {
        /// The 4-bit type field.
        type_code: u8,
        /// Descriptor privilege level.
        dpl: u8,
        /// P.
        present: bool,
    },
    /// A 16-byte long-mode descriptor whose second half lies past the table limit.
    Truncated {
        /// The 4-bit type field.
        type_code: u8,
    },
}

/// One decoded GDT slot (two slots for a 16-byte descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GdtEntry {
    /// Slot number (selector / 8).
    pub index: u16,
    /// Selector with RPL 0 and TI 0 that loads this descriptor.
    pub selector: u16,
    /// The slot as stored.
    #[serde(with = "kvmaccess_core::hex")]
    pub raw: u64,
    /// The second slot of a 16-byte descriptor.
    #[serde(with = "kvmaccess_core::hex::option")]
    pub raw_high: Option<u64>,
    /// The decoded descriptor.
    pub descriptor: Descriptor,
}

/// Decode a GDT (the bytes GDTR base..base+limit+1 covers) slot by slot. In long mode
/// (`long_mode`, i.e. EFER.LMA, which holds in compatibility mode too) LDT, TSS and call-gate
/// descriptors take two slots, and the slot after them is not decoded on its own. At most
/// [`GDT_MAX_ENTRIES`] slots are read; a trailing partial slot is ignored.
pub fn decode_gdt(bytes: &[u8], long_mode: bool) -> Vec<GdtEntry> {
    let slot_count = (bytes.len() / 8).min(GDT_MAX_ENTRIES);
    let slot = |index: usize| -> Option<u64> {
        let start = index.checked_mul(8)?;
        let raw: [u8; 8] = bytes.get(start..start.checked_add(8)?)?.try_into().ok()?;
        Some(u64::from_le_bytes(raw))
    };
    let mut entries = Vec::with_capacity(slot_count);
    let mut index = 0;
    while index < slot_count {
        let Some(low) = slot(index) else { break };
        let type_code = field_u8(low, 40, 4);
        let two_slots =
            long_mode && low != 0 && !bit(low, 44) && matches!(type_code, 0x2 | 0x9 | 0xb | 0xc);
        let (raw_high, descriptor) = if two_slots {
            match slot(index + 1).filter(|_| index + 1 < slot_count) {
                Some(high) => (Some(high), decode_long_system(low, high)),
                None => (None, Descriptor::Truncated { type_code }),
            }
        } else {
            (None, decode_legacy_slot(low, long_mode))
        };
        // `index` stays below GDT_MAX_ENTRIES (8192), so it fits u16 and index * 8 does too.
        let index16 = u16::try_from(index).unwrap_or(u16::MAX);
        entries.push(GdtEntry {
            index: index16,
            selector: index16.wrapping_mul(8),
            raw: low,
            raw_high,
            descriptor,
        });
        index += if raw_high.is_some() { 2 } else { 1 };
    }
    entries
}

/// An 8-byte descriptor: a code/data segment in any mode, or a legacy-mode system descriptor.
fn decode_legacy_slot(low: u64, long_mode: bool) -> Descriptor {
    if low == 0 {
        return Descriptor::Null;
    }
    let type_code = field_u8(low, 40, 4);
    let fields = SegmentFields::from_low(low);
    if bit(low, 44) {
        return if type_code & 0x8 != 0 {
            Descriptor::Code(CodeSegment {
                fields,
                long: bit(low, 53),
                default_32: bit(low, 54),
                conforming: type_code & 0x4 != 0,
                readable: type_code & 0x2 != 0,
                accessed: type_code & 0x1 != 0,
            })
        } else {
            Descriptor::Data(DataSegment {
                fields,
                big: bit(low, 54),
                expand_down: type_code & 0x4 != 0,
                writable: type_code & 0x2 != 0,
                accessed: type_code & 0x1 != 0,
            })
        };
    }
    let reserved = Descriptor::Reserved {
        type_code,
        dpl: fields.dpl,
        present: fields.present,
    };
    if long_mode {
        // The long-mode system types that fit in 8 bytes: none.
        return reserved;
    }
    let tss = |width, busy| {
        Descriptor::Tss(TssDescriptor {
            fields,
            width,
            busy,
        })
    };
    let call_gate = |width| {
        Descriptor::CallGate(CallGate {
            width,
            selector: field_u16(low, 16),
            offset: field(low, 0, 16) | (field(low, 48, 16) << 16),
            param_count: field_u8(low, 32, 5),
            dpl: fields.dpl,
            present: fields.present,
        })
    };
    match type_code {
        0x1 => tss(GateWidth::Bits16, false),
        0x2 => Descriptor::Ldt(SystemSegment { fields }),
        0x3 => tss(GateWidth::Bits16, true),
        0x4 => call_gate(GateWidth::Bits16),
        0x5 => Descriptor::TaskGate(TaskGate {
            tss_selector: field_u16(low, 16),
            dpl: fields.dpl,
            present: fields.present,
        }),
        0x9 => tss(GateWidth::Bits32, false),
        0xb => tss(GateWidth::Bits32, true),
        0xc => call_gate(GateWidth::Bits32),
        _ => reserved,
    }
}

/// A 16-byte long-mode system descriptor: LDT, TSS or call gate (the only types the caller
/// sends here).
fn decode_long_system(low: u64, high: u64) -> Descriptor {
    let mut fields = SegmentFields::from_low(low);
    fields.base |= field(high, 0, 32) << 32;
    let tss = |busy| {
        Descriptor::Tss(TssDescriptor {
            fields,
            width: GateWidth::Bits64,
            busy,
        })
    };
    match field_u8(low, 40, 4) {
        0x2 => Descriptor::Ldt(SystemSegment { fields }),
        0x9 => tss(false),
        0xb => tss(true),
        0xc => Descriptor::CallGate(CallGate {
            width: GateWidth::Bits64,
            selector: field_u16(low, 16),
            offset: gate_offset(low, high),
            param_count: 0,
            dpl: fields.dpl,
            present: fields.present,
        }),
        type_code => Descriptor::Reserved {
            type_code,
            dpl: fields.dpl,
            present: fields.present,
        },
    }
}

/// The 64-bit target offset of a long-mode gate: bits 15:0 and 31:16 in the low half, 63:32 in
/// the high half.
fn gate_offset(low: u64, high: u64) -> u64 {
    field(low, 0, 16) | (field(low, 48, 16) << 16) | (field(high, 0, 32) << 32)
}

/// What an IDT gate does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateKind {
    /// Interrupt gate: IF is cleared on entry.
    Interrupt,
    /// Trap gate: IF is left alone.
    Trap,
    /// Task gate (legacy mode): switches to a TSS.
    Task,
    /// Any other type code (see `type_code`).
    Reserved,
}

/// One decoded IDT gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct IdtGate {
    /// Interrupt vector.
    pub vector: u8,
    /// Interrupt, trap, task or reserved.
    pub kind: GateKind,
    /// The 4-bit type field.
    pub type_code: u8,
    /// Operand size (`None` for task and reserved gates).
    pub width: Option<GateWidth>,
    /// Target code segment (the TSS selector for task gates).
    pub selector: u16,
    /// Handler offset (0 for task gates).
    #[serde(with = "kvmaccess_core::hex")]
    pub offset: u64,
    /// Interrupt-stack-table slot, 1-7; 0 means no stack switch (64-bit gates only).
    pub ist: u8,
    /// Descriptor privilege level: `int n` from a ring above it faults.
    pub dpl: u8,
    /// P.
    pub present: bool,
    /// The low 8 bytes as stored.
    #[serde(with = "kvmaccess_core::hex")]
    pub raw: u64,
    /// The high 8 bytes of a 64-bit gate.
    #[serde(with = "kvmaccess_core::hex::option")]
    pub raw_high: Option<u64>,
}

/// Decode an IDT (the bytes IDTR base..base+limit+1 covers): 16-byte gates in long mode, 8-byte
/// gates otherwise, at most [`IDT_MAX_GATES`]. A trailing partial gate is ignored.
pub fn decode_idt(bytes: &[u8], long_mode: bool) -> Vec<IdtGate> {
    let gate_size = if long_mode { 16 } else { 8 };
    bytes
        .chunks_exact(gate_size)
        .take(IDT_MAX_GATES)
        .zip(0..=u8::MAX)
        .map(|(raw, vector)| {
            let qword = |offset: usize| {
                raw.get(offset..offset + 8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_le_bytes)
            };
            let low = qword(0);
            if long_mode {
                decode_gate64(vector, low, qword(8))
            } else {
                decode_gate32(vector, low)
            }
        })
        .collect()
}

fn decode_gate64(vector: u8, low: u64, high: u64) -> IdtGate {
    let type_code = field_u8(low, 40, 4);
    let kind = match type_code {
        0xe => GateKind::Interrupt,
        0xf => GateKind::Trap,
        _ => GateKind::Reserved,
    };
    IdtGate {
        vector,
        kind,
        type_code,
        width: (kind != GateKind::Reserved).then_some(GateWidth::Bits64),
        selector: field_u16(low, 16),
        offset: gate_offset(low, high),
        ist: field_u8(low, 32, 3),
        dpl: field_u8(low, 45, 2),
        present: bit(low, 47),
        raw: low,
        raw_high: Some(high),
    }
}

fn decode_gate32(vector: u8, low: u64) -> IdtGate {
    let type_code = field_u8(low, 40, 4);
    let (kind, width) = match type_code {
        0x5 => (GateKind::Task, None),
        0x6 => (GateKind::Interrupt, Some(GateWidth::Bits16)),
        0x7 => (GateKind::Trap, Some(GateWidth::Bits16)),
        0xe => (GateKind::Interrupt, Some(GateWidth::Bits32)),
        0xf => (GateKind::Trap, Some(GateWidth::Bits32)),
        _ => (GateKind::Reserved, None),
    };
    IdtGate {
        vector,
        kind,
        type_code,
        width,
        selector: field_u16(low, 16),
        offset: if kind == GateKind::Task {
            0
        } else {
            field(low, 0, 16) | (field(low, 48, 16) << 16)
        },
        ist: 0,
        dpl: field_u8(low, 45, 2),
        present: bit(low, 47),
        raw: low,
        raw_high: None,
    }
}

/// Read and decode the GDT that `gdtr` describes, through the address space's virtual
/// addresses. The limit is capped at 0xffff, the most a GDTR holds.
pub fn read_gdt<M: PhysicalMemory + ?Sized>(
    space: &mut AddressSpace<'_, M>,
    gdtr: DescriptorTable,
    long_mode: bool,
) -> Result<Vec<GdtEntry>, Error> {
    let len = table_len(gdtr.limit, GDT_MAX_ENTRIES * 8);
    let bytes = read_table(space, "GDT", gdtr.base, len)?;
    Ok(decode_gdt(&bytes, long_mode))
}

/// Read and decode the IDT that `idtr` describes, through the address space's virtual
/// addresses. Bytes past the 256th gate are not read, whatever the limit says.
pub fn read_idt<M: PhysicalMemory + ?Sized>(
    space: &mut AddressSpace<'_, M>,
    idtr: DescriptorTable,
    long_mode: bool,
) -> Result<Vec<IdtGate>, Error> {
    let gate_size = if long_mode { 16 } else { 8 };
    let len = table_len(idtr.limit, IDT_MAX_GATES * gate_size);
    let bytes = read_table(space, "IDT", idtr.base, len)?;
    Ok(decode_idt(&bytes, long_mode))
}

/// `limit + 1` bytes, capped at `max`.
fn table_len(limit: u32, max: usize) -> usize {
    usize::try_from(limit)
        .ok()
        .and_then(|limit| limit.checked_add(1))
        .map_or(max, |len| len.min(max))
}

fn read_table<M: PhysicalMemory + ?Sized>(
    space: &mut AddressSpace<'_, M>,
    table: &'static str,
    base: u64,
    len: usize,
) -> Result<Vec<u8>, Error> {
    space
        .read_vec(Gva(base), len)
        .map_err(|source| Error::DescriptorTable {
            table,
            base,
            len,
            source: Box::new(source),
        })
}

/// Hex without the `0x` for zero, which reads better in a table of bases.
struct Hex(u64);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            f.write_str("0")
        } else {
            write!(f, "{:#x}", self.0)
        }
    }
}

fn present_mark(present: bool) -> &'static str {
    if present {
        "P"
    } else {
        "NP"
    }
}

impl fmt::Display for SegmentFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DPL{} {} base={} limit={:#x}",
            self.dpl,
            present_mark(self.present),
            Hex(self.base),
            self.limit
        )?;
        if self.granularity {
            f.write_str(" G")?;
        }
        if self.available {
            f.write_str(" AVL")?;
        }
        Ok(())
    }
}

impl fmt::Display for GdtEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#04x} ", self.selector)?;
        let flags = |f: &mut fmt::Formatter<'_>, list: &[(bool, &str)]| -> fmt::Result {
            for (on, name) in list {
                if *on {
                    write!(f, " {name}")?;
                }
            }
            Ok(())
        };
        match &self.descriptor {
            Descriptor::Null => f.write_str("null"),
            Descriptor::Code(code) => {
                let bits = if code.long {
                    "64"
                } else if code.default_32 {
                    "32"
                } else {
                    "16"
                };
                write!(f, "code{bits} {}", code.fields)?;
                flags(
                    f,
                    &[
                        (code.long, "L"),
                        (code.default_32, "D"),
                        (code.readable, "R"),
                        (code.conforming, "C"),
                        (code.accessed, "A"),
                    ],
                )
            }
            Descriptor::Data(data) => {
                write!(f, "data {}", data.fields)?;
                flags(
                    f,
                    &[
                        (data.big, "B"),
                        (data.writable, "W"),
                        (data.expand_down, "E"),
                        (data.accessed, "A"),
                    ],
                )
            }
            Descriptor::Ldt(ldt) => write!(f, "ldt {}", ldt.fields),
            Descriptor::Tss(tss) => write!(
                f,
                "tss{} {} {}",
                tss.width,
                if tss.busy { "busy" } else { "available" },
                tss.fields
            ),
            Descriptor::CallGate(gate) => write!(
                f,
                "callgate{} DPL{} {} target={:#x}:{:#x} params={}",
                gate.width,
                gate.dpl,
                present_mark(gate.present),
                gate.selector,
                gate.offset,
                gate.param_count
            ),
            Descriptor::TaskGate(gate) => write!(
                f,
                "taskgate DPL{} {} tss={:#x}",
                gate.dpl,
                present_mark(gate.present),
                gate.tss_selector
            ),
            Descriptor::Reserved {
                type_code,
                dpl,
                present,
            } => write!(
                f,
                "reserved system type {type_code:#x} DPL{dpl} {} raw={:#018x}",
                present_mark(*present),
                self.raw
            ),
            Descriptor::Truncated { type_code } => write!(
                f,
                "truncated 16-byte descriptor (type {type_code:#x}) raw={:#018x}",
                self.raw
            ),
        }
    }
}

impl fmt::Display for IdtGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#04x} ", self.vector)?;
        let width = self.width.map_or(String::new(), |w| w.to_string());
        match self.kind {
            GateKind::Interrupt => write!(f, "int{width}")?,
            GateKind::Trap => write!(f, "trap{width}")?,
            GateKind::Task => write!(f, "task")?,
            GateKind::Reserved => write!(f, "reserved type {:#x}", self.type_code)?,
        }
        write!(f, " DPL{} {}", self.dpl, present_mark(self.present))?;
        match self.kind {
            GateKind::Task => write!(f, " tss={:#x}", self.selector)?,
            _ => write!(f, " {:#x}:{:#x}", self.selector, self.offset)?,
        }
        if self.ist != 0 {
            write!(f, " IST{}", self.ist)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
