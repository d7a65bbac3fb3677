//! The kernel log: the lockless printk ring buffer of Linux 5.10 and later, read from guest
//! memory.
//!
//! The ring is three arrays: descriptors (a state word and the logical position of the text),
//! record metadata (`struct printk_info`) and a byte ring of text blocks, each starting with the
//! descriptor id. Every layout detail comes from the kernel's BTF ([`PrintkLayout::from_btf`]);
//! the encoding rules (state in the top two bits of the state word, data-less positions, blocks
//! that wrap to the start of the byte ring) are the kernel's ABI and are checked record by
//! record, because the guest controls every byte and keeps writing while we read.

use std::fmt;

use kvmaccess_btf::{Btf, TypeId};
use kvmaccess_core::Gva;
use serde::Serialize;

use crate::kallsyms::KernelRead;
use crate::{Error, Kernel, KernelTypes, Result};

/// Largest byte ring accepted (`size_bits`); the kernel's own maximum log buffer is far smaller.
pub const MAX_DATA_BITS: u32 = 28;
/// Most descriptors accepted (`count_bits`): one per 32 bytes of the largest byte ring, the
/// kernel's own ratio.
pub const MAX_DESC_BITS: u32 = 23;
/// Largest struct read per record; real ones are a few dozen bytes.
const MAX_STRUCT_BYTES: u64 = 4096;
/// Skipped records kept with their reason (the rest are only counted).
const MAX_SKIPPED_KEPT: usize = 64;

/// Where an integer field sits inside a struct, in bits: covers bitfields (`level:3`) and
/// ordinary members alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// Offset from the start of the struct, in bits.
    pub bit_offset: u64,
    /// Width in bits, 1..=64.
    pub bits: u32,
}

impl Field {
    /// A byte-aligned field of `bytes` bytes at byte `offset`.
    pub const fn bytes(offset: u64, bytes: u32) -> Self {
        Self {
            bit_offset: offset * 8,
            bits: bytes * 8,
        }
    }

    /// The byte just past the field.
    fn end(&self) -> Option<u64> {
        self.bit_offset
            .checked_add(u64::from(self.bits))?
            .checked_add(7)
            .map(|b| b / 8)
    }

    /// The field's value in a little-endian copy of the struct; `None` when it does not fit.
    fn get(&self, raw: &[u8]) -> Option<u64> {
        if !(1..=64).contains(&self.bits) {
            return None;
        }
        let start = usize::try_from(self.bit_offset / 8).ok()?;
        let end = usize::try_from(self.end()?).ok()?;
        let bytes = raw.get(start..end)?;
        let mut wide = [0u8; 16];
        wide.get_mut(..bytes.len())?.copy_from_slice(bytes);
        let shift = u32::try_from(self.bit_offset % 8).ok()?;
        let value = u128::from_le_bytes(wide) >> shift;
        let mask = if self.bits == 64 {
            u128::from(u64::MAX)
        } else {
            (1u128 << self.bits) - 1
        };
        u64::try_from(value & mask).ok()
    }
}

/// The values of `enum desc_state` (the top two bits of a descriptor's state word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescStates {
    /// A writer holds the record.
    pub reserved: u64,
    /// Written, but the writer may still append (a continuation line).
    pub committed: u64,
    /// Complete.
    pub finalized: u64,
    /// Free: its text may already be overwritten.
    pub reusable: u64,
}

impl DescStates {
    /// The values of every kernel since the lockless ring (5.10); used when BTF lacks the enum.
    pub const KERNEL: Self = Self {
        reserved: 0,
        committed: 1,
        finalized: 2,
        reusable: 3,
    };
}

/// Layout of the printk ring buffer structures, resolved once from BTF.
///
/// Ring fields are relative to the start of `struct printk_ringbuffer`; descriptor and info
/// fields to the start of their own structs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrintkLayout {
    /// `sizeof(struct printk_ringbuffer)`.
    pub ring_size: u64,
    /// `desc_ring.count_bits`.
    pub count_bits: Field,
    /// `desc_ring.descs` (pointer).
    pub descs: Field,
    /// `desc_ring.infos` (pointer).
    pub infos: Field,
    /// `desc_ring.head_id`.
    pub head_id: Field,
    /// `desc_ring.tail_id`.
    pub tail_id: Field,
    /// `text_data_ring.size_bits`.
    pub size_bits: Field,
    /// `text_data_ring.data` (pointer).
    pub data: Field,
    /// `sizeof(struct prb_desc)`.
    pub desc_size: u64,
    /// `prb_desc.state_var`; its width is the width of ids and of the id word of text blocks.
    pub state_var: Field,
    /// `prb_desc.text_blk_lpos.begin`.
    pub text_begin: Field,
    /// `prb_desc.text_blk_lpos.next`.
    pub text_next: Field,
    /// `sizeof(struct printk_info)`.
    pub info_size: u64,
    /// `printk_info.seq`.
    pub seq: Field,
    /// `printk_info.ts_nsec`.
    pub ts_nsec: Field,
    /// `printk_info.text_len`.
    pub text_len: Field,
    /// `printk_info.facility`.
    pub facility: Field,
    /// `printk_info.flags`.
    pub flags: Field,
    /// `printk_info.level`.
    pub level: Field,
    /// `printk_info.caller_id`.
    pub caller_id: Field,
    /// `enum desc_state`.
    pub states: DescStates,
}

fn btf_err(what: impl Into<String>) -> impl FnOnce(kvmaccess_btf::Error) -> Error {
    let what = what.into();
    move |source| Error::Btf { what, source }
}

fn field(btf: &Btf, id: TypeId, type_name: &str, path: &str) -> Result<Field> {
    let what = || format!("{type_name}.{path}");
    let loc = btf.locate(id, path).map_err(btf_err(what()))?;
    let bits = if loc.bitfield_size != 0 {
        u32::from(loc.bitfield_size)
    } else {
        let bytes = btf.size_of(loc.type_id).map_err(btf_err(what()))?;
        u32::try_from(bytes)
            .ok()
            .and_then(|b| b.checked_mul(8))
            .unwrap_or(0)
    };
    if !(1..=64).contains(&bits) {
        return Err(Error::LogBuffer(format!(
            "{} is {bits} bits wide, not an integer of at most 64 bits",
            what()
        )));
    }
    Ok(Field {
        bit_offset: loc.bit_offset,
        bits,
    })
}

fn struct_id(btf: &Btf, name: &str) -> Result<(TypeId, u64)> {
    let id = btf
        .find_struct(name)
        .ok_or_else(|| Error::BtfMissingType(name.to_string()))?;
    let size = btf
        .size_of(id)
        .map_err(btf_err(format!("size of {name}")))?;
    if size == 0 || size > MAX_STRUCT_BYTES {
        return Err(Error::LogBuffer(format!(
            "struct {name} claims {size} bytes (at most {MAX_STRUCT_BYTES})"
        )));
    }
    Ok((id, size))
}

impl PrintkLayout {
    /// Resolve every offset by name. Fails on kernels older than 5.10 (no
    /// `struct printk_ringbuffer`) and on BTF whose fields do not fit their structs.
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        let (rb, ring_size) = struct_id(btf, "printk_ringbuffer")?;
        let (desc, desc_size) = struct_id(btf, "prb_desc")?;
        let (info, info_size) = struct_id(btf, "printk_info")?;
        let r = |path| field(btf, rb, "printk_ringbuffer", path);
        let d = |path| field(btf, desc, "prb_desc", path);
        let i = |path| field(btf, info, "printk_info", path);
        let state = |name: &str, default: u64| {
            btf.enum_value("desc_state", name)
                .ok()
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(default)
        };
        let k = DescStates::KERNEL;
        let layout = Self {
            ring_size,
            count_bits: r("desc_ring.count_bits")?,
            descs: r("desc_ring.descs")?,
            infos: r("desc_ring.infos")?,
            head_id: r("desc_ring.head_id")?,
            tail_id: r("desc_ring.tail_id")?,
            size_bits: r("text_data_ring.size_bits")?,
            data: r("text_data_ring.data")?,
            desc_size,
            state_var: d("state_var")?,
            text_begin: d("text_blk_lpos.begin")?,
            text_next: d("text_blk_lpos.next")?,
            info_size,
            seq: i("seq")?,
            ts_nsec: i("ts_nsec")?,
            text_len: i("text_len")?,
            facility: i("facility")?,
            flags: i("flags")?,
            level: i("level")?,
            caller_id: i("caller_id")?,
            states: DescStates {
                reserved: state("desc_reserved", k.reserved),
                committed: state("desc_committed", k.committed),
                finalized: state("desc_finalized", k.finalized),
                reusable: state("desc_reusable", k.reusable),
            },
        };
        layout.check()?;
        Ok(layout)
    }

    /// Every field must lie inside its struct, and the state word must be a whole number of
    /// bytes wide enough for two state bits and an id.
    pub fn check(&self) -> Result<()> {
        let inside = |f: &Field, size: u64, name: &str| {
            if f.end().is_some_and(|e| e <= size) && (1..=64).contains(&f.bits) {
                Ok(())
            } else {
                Err(Error::LogBuffer(format!(
                    "field {name} ({f:?}) does not fit its {size}-byte struct"
                )))
            }
        };
        for (f, name) in [
            (&self.count_bits, "count_bits"),
            (&self.descs, "descs"),
            (&self.infos, "infos"),
            (&self.head_id, "head_id"),
            (&self.tail_id, "tail_id"),
            (&self.size_bits, "size_bits"),
            (&self.data, "data"),
        ] {
            inside(f, self.ring_size.min(MAX_STRUCT_BYTES), name)?;
        }
        for (f, name) in [
            (&self.state_var, "state_var"),
            (&self.text_begin, "text_begin"),
            (&self.text_next, "text_next"),
        ] {
            inside(f, self.desc_size.min(MAX_STRUCT_BYTES), name)?;
        }
        for (f, name) in [
            (&self.seq, "seq"),
            (&self.ts_nsec, "ts_nsec"),
            (&self.text_len, "text_len"),
            (&self.facility, "facility"),
            (&self.flags, "flags"),
            (&self.level, "level"),
            (&self.caller_id, "caller_id"),
        ] {
            inside(f, self.info_size.min(MAX_STRUCT_BYTES), name)?;
        }
        if self.state_var.bits % 8 != 0
            || self.state_var.bits < 16
            || self.state_var.bit_offset % 8 != 0
        {
            return Err(Error::LogBuffer(format!(
                "prb_desc.state_var ({:?}) is not a whole unsigned long",
                self.state_var
            )));
        }
        Ok(())
    }

    fn long_bytes(&self) -> u64 {
        u64::from(self.state_var.bits / 8)
    }

    fn id_mask(&self) -> u64 {
        // The state lives in the top two bits of the state word; the rest is the id.
        (1u64 << (self.state_var.bits - 2)) - 1
    }
}

/// Who logged a record: a task (`T<pid>`) or a CPU outside task context (`C<cpu>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A task, by PID.
    Task(u32),
    /// A CPU in interrupt context.
    Cpu(u32),
}

impl Caller {
    /// The kernel's encoding: bit 31 marks a CPU number.
    pub fn from_id(id: u32) -> Self {
        if id & 0x8000_0000 != 0 {
            Caller::Cpu(id & 0x7fff_ffff)
        } else {
            Caller::Task(id)
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Task(pid) => write!(f, "T{pid}"),
            Caller::Cpu(cpu) => write!(f, "C{cpu}"),
        }
    }
}

impl Serialize for Caller {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One kernel log record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogRecord {
    /// Sequence number (gap-free in an intact log).
    pub seq: u64,
    /// Nanoseconds since boot (local clock of the logging CPU).
    pub ts_nsec: u64,
    /// `seconds.micros`, as `dmesg` prints it.
    pub timestamp: String,
    /// Syslog level, 0 (emerg) to 7 (debug).
    pub level: u8,
    /// Syslog facility (0 kernel, 1 user, ...).
    pub facility: u8,
    /// The record's internal flags (`LOG_NEWLINE`, `LOG_CONT`).
    pub flags: u8,
    /// Who logged it.
    pub caller: Caller,
    /// The text (invalid UTF-8 replaced), without a trailing newline.
    pub text: String,
    /// False for the newest record while its writer may still extend it.
    pub finalized: bool,
}

impl LogRecord {
    /// The record as `dmesg` prints it: `[    1.234567] text`, one line per line of text.
    pub fn dmesg_lines(&self) -> impl Iterator<Item = String> + '_ {
        self.text
            .split('\n')
            .map(move |line| format!("[{:>12}] {line}", self.timestamp))
    }
}

fn timestamp(ts_nsec: u64) -> String {
    format!(
        "{}.{:06}",
        ts_nsec / 1_000_000_000,
        (ts_nsec % 1_000_000_000) / 1000
    )
}

/// A record that could not be read, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkippedRecord {
    /// Descriptor id.
    pub id: u64,
    /// Why.
    pub reason: String,
}

/// The whole log as read, with what had to be left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogBuffer {
    /// Readable records, oldest first.
    pub records: Vec<LogRecord>,
    /// Descriptors examined.
    pub examined: u64,
    /// Descriptors left out (not yet written, freed, overwritten while reading, malformed).
    pub skipped_count: u64,
    /// The first few of them, with reasons.
    pub skipped: Vec<SkippedRecord>,
    /// Problems with the ring as a whole.
    pub notes: Vec<String>,
}

impl LogBuffer {
    fn skip(&mut self, id: u64, reason: impl Into<String>) {
        self.skipped_count = self.skipped_count.saturating_add(1);
        if self.skipped.len() < MAX_SKIPPED_KEPT {
            self.skipped.push(SkippedRecord {
                id,
                reason: reason.into(),
            });
        }
    }

    /// All records formatted as `dmesg` prints them.
    pub fn dmesg_text(&self) -> String {
        let mut out = String::new();
        for record in &self.records {
            for line in record.dmesg_lines() {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }
}

fn read_at<R: KernelRead + ?Sized>(mem: &mut R, at: u64, buf: &mut [u8], what: &str) -> Result<()> {
    mem.read_kernel(Gva(at), buf).map_err(|e| match e {
        Error::Virt { gva, source, .. } => Error::Virt {
            what: format!("{what} ({} bytes)", buf.len()),
            gva,
            source,
        },
        other => other,
    })
}

fn buffer(size: u64) -> Result<Vec<u8>> {
    let len = Some(size)
        .filter(|&s| s <= MAX_STRUCT_BYTES)
        .and_then(|s| usize::try_from(s).ok())
        .ok_or_else(|| Error::LogBuffer(format!("struct of {size} bytes is too large")))?;
    Ok(vec![0u8; len])
}

/// Where one record's text block lies in the byte ring.
enum Block {
    /// A data-less record with empty text.
    Empty,
    /// Offset of the block (its id word) in the byte ring, and its usable size after the id.
    At { offset: u64, size: u64 },
}

/// The kernel's rules for a block's logical positions: data-less markers in bit 0, a regular
/// block inside one wrap, or a wrapping block whose bytes start at offset 0 of the ring.
fn locate_block(begin: u64, next: u64, size_bits: u32, long_bytes: u64) -> Result<Block, String> {
    const NO_LPOS: u64 = 0x3;
    let size = 1u64 << size_bits;
    if begin & 1 == 1 && next & 1 == 1 {
        return if begin == NO_LPOS && next == NO_LPOS {
            Ok(Block::Empty)
        } else {
            Err(format!(
                "no text (data-less positions {begin:#x}/{next:#x})"
            ))
        };
    }
    let wraps = |lpos: u64| lpos >> size_bits;
    let (offset, span) = if wraps(begin) == wraps(next) && begin < next {
        (begin & (size - 1), next - begin)
    } else if wraps(begin.wrapping_add(size)) == wraps(next) {
        (0, next & (size - 1))
    } else {
        return Err(format!(
            "illegal block positions begin {begin:#x} next {next:#x} (ring of {size:#x} bytes)"
        ));
    };
    if begin % long_bytes != 0 || next % long_bytes != 0 {
        return Err(format!(
            "unaligned block positions begin {begin:#x} next {next:#x}"
        ));
    }
    if span < long_bytes {
        return Err(format!("block of {span} bytes has no room for its id"));
    }
    Ok(Block::At {
        offset,
        size: span - long_bytes,
    })
}

/// Read every record of the ring buffer whose `struct printk_ringbuffer` is at `ring`.
///
/// Work is bounded by the descriptor count (at most 2^[`MAX_DESC_BITS`]), and the total text
/// by the size of the byte ring, whatever the guest wrote.
pub fn read_log<R: KernelRead + ?Sized>(
    mem: &mut R,
    ring: u64,
    layout: &PrintkLayout,
) -> Result<LogBuffer> {
    layout.check()?;
    let mut header = buffer(layout.ring_size)?;
    read_at(mem, ring, &mut header, "struct printk_ringbuffer")?;
    let get = |f: &Field, what: &str| {
        f.get(&header)
            .ok_or_else(|| Error::LogBuffer(format!("{what} is outside the ring header")))
    };
    let count_bits = get(&layout.count_bits, "count_bits")?;
    let size_bits = get(&layout.size_bits, "size_bits")?;
    let descs = get(&layout.descs, "descs")?;
    let infos = get(&layout.infos, "infos")?;
    let data = get(&layout.data, "data")?;
    let id_mask = layout.id_mask();
    let head = get(&layout.head_id, "head_id")? & id_mask;
    let tail = get(&layout.tail_id, "tail_id")? & id_mask;
    let count_bits = u32::try_from(count_bits)
        .ok()
        .filter(|&b| b <= MAX_DESC_BITS)
        .ok_or_else(|| {
            Error::LogBuffer(format!(
                "desc_ring.count_bits {count_bits} exceeds {MAX_DESC_BITS}"
            ))
        })?;
    let size_bits = u32::try_from(size_bits)
        .ok()
        .filter(|&b| (4..=MAX_DATA_BITS).contains(&b))
        .ok_or_else(|| {
            Error::LogBuffer(format!(
                "text_data_ring.size_bits {size_bits} is outside 4..={MAX_DATA_BITS}"
            ))
        })?;
    let count = 1u64 << count_bits;
    let data_size = 1u64 << size_bits;
    let long_bytes = layout.long_bytes();

    let mut out = LogBuffer::default();
    let span = head.wrapping_sub(tail) & id_mask;
    let first = if span >= count {
        out.notes.push(format!(
            "tail id {tail:#x} is {span} descriptors behind head id {head:#x}, more than the \
             ring's {count}: reading only the newest {count}"
        ));
        head.wrapping_sub(count - 1) & id_mask
    } else {
        tail
    };
    let todo = head.wrapping_sub(first) & id_mask;

    let mut desc = buffer(layout.desc_size)?;
    let mut info = buffer(layout.info_size)?;
    let mut text_total = 0u64;
    let state_shift = layout.state_var.bits - 2;
    let states = layout.states;
    // `todo < count`, so this visits each descriptor slot at most once.
    for step in 0..=todo {
        let id = first.wrapping_add(step) & id_mask;
        out.examined += 1;
        let index = id & (count - 1);
        let desc_at = index
            .checked_mul(layout.desc_size)
            .and_then(|o| descs.checked_add(o))
            .ok_or_else(|| Error::LogBuffer(format!("descriptor {id:#x} address overflows")))?;
        read_at(mem, desc_at, &mut desc, "printk descriptor")?;
        let state_word = |raw: &[u8]| layout.state_var.get(raw).unwrap_or(0);
        let sv = state_word(&desc);
        if sv & id_mask != id {
            out.skip(
                id,
                format!(
                    "descriptor reused: holds id {:#x} (overwritten by a newer record)",
                    sv & id_mask
                ),
            );
            continue;
        }
        let state = sv >> state_shift;
        let finalized = if state == states.finalized {
            true
        } else if state == states.committed {
            false
        } else if state == states.reserved {
            out.skip(id, "being written (reserved)");
            continue;
        } else if state == states.reusable {
            out.skip(id, "freed (reusable): its text may be gone");
            continue;
        } else {
            out.skip(id, format!("unknown descriptor state {state}"));
            continue;
        };
        let begin = layout.text_begin.get(&desc).unwrap_or(1);
        let next = layout.text_next.get(&desc).unwrap_or(1);
        let info_at = index
            .checked_mul(layout.info_size)
            .and_then(|o| infos.checked_add(o))
            .ok_or_else(|| Error::LogBuffer(format!("printk_info {id:#x} address overflows")))?;
        read_at(mem, info_at, &mut info, "printk_info")?;
        let value = |f: &Field| f.get(&info).unwrap_or(0);
        let text_len = value(&layout.text_len);
        let text = match locate_block(begin, next, size_bits, long_bytes) {
            Err(reason) => {
                out.skip(id, reason);
                continue;
            }
            Ok(Block::Empty) => Vec::new(),
            Ok(Block::At { offset, size }) => {
                if text_len > size {
                    out.skip(
                        id,
                        format!("text_len {text_len} exceeds its {size}-byte block"),
                    );
                    continue;
                }
                let end = offset
                    .checked_add(long_bytes)
                    .and_then(|e| e.checked_add(text_len));
                if !end.is_some_and(|e| e <= data_size) {
                    out.skip(id, "text runs past the end of the byte ring");
                    continue;
                }
                text_total = text_total.saturating_add(text_len);
                if text_total > data_size {
                    out.notes.push(format!(
                        "records claim more text than the {data_size}-byte ring holds: stopped at \
                         id {id:#x}"
                    ));
                    break;
                }
                let len = usize::try_from(long_bytes + text_len)
                    .map_err(|_| Error::LogBuffer(format!("text of {text_len} bytes")))?;
                let mut block = vec![0u8; len];
                let at = data
                    .checked_add(offset)
                    .ok_or_else(|| Error::LogBuffer(format!("text of {id:#x} overflows")))?;
                read_at(mem, at, &mut block, "printk text")?;
                let (id_word, text) = block.split_at(usize::try_from(long_bytes).unwrap_or(0));
                let mut wide = [0u8; 8];
                if let Some(dst) = wide.get_mut(..id_word.len()) {
                    dst.copy_from_slice(id_word);
                }
                let block_id = u64::from_le_bytes(wide);
                if block_id & id_mask != id {
                    out.skip(
                        id,
                        format!("text block holds id {block_id:#x}: overwritten"),
                    );
                    continue;
                }
                text.to_vec()
            }
        };
        // The writer may have recycled the descriptor while we copied: check it again, as the
        // kernel's own readers do.
        read_at(mem, desc_at, &mut desc, "printk descriptor")?;
        if state_word(&desc) & id_mask != id {
            out.skip(id, "overwritten while being read");
            continue;
        }
        let ts_nsec = value(&layout.ts_nsec);
        let narrow = |v: u64| u8::try_from(v).unwrap_or(u8::MAX);
        out.records.push(LogRecord {
            seq: value(&layout.seq),
            ts_nsec,
            timestamp: timestamp(ts_nsec),
            level: narrow(value(&layout.level)),
            facility: narrow(value(&layout.facility)),
            flags: narrow(value(&layout.flags)),
            caller: Caller::from_id(u32::try_from(value(&layout.caller_id)).unwrap_or(u32::MAX)),
            text: String::from_utf8_lossy(&text).into_owned(),
            finalized,
        });
    }
    Ok(out)
}

impl Kernel<'_> {
    /// Address of the live `struct printk_ringbuffer`: the value of `prb` (it moves from the
    /// static ring to a larger one when `log_buf_len=` is given), or `printk_rb_static`.
    pub fn printk_ring(&self) -> Result<u64> {
        match self.symbol("prb") {
            Ok(prb) => self.read_u64(Gva(prb)),
            Err(_) => self.symbol("printk_rb_static").map_err(|_| {
                Error::LogBuffer(
                    "neither prb nor printk_rb_static is a kernel symbol (kernel older than \
                     5.10?)"
                        .to_string(),
                )
            }),
        }
    }

    /// The kernel log with what could not be read.
    pub fn log_buffer(&self, types: &KernelTypes) -> Result<LogBuffer> {
        let layout = PrintkLayout::from_btf(&types.btf)?;
        let ring = self.printk_ring()?;
        read_log(&mut self.space(), ring, &layout)
    }

    /// The kernel log's readable records, oldest first.
    pub fn dmesg(&self, types: &KernelTypes) -> Result<Vec<LogRecord>> {
        Ok(self.log_buffer(types)?.records)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;
    use crate::kallsyms::FlatMemory;
    use kvmaccess_btf::encode::BtfBuilder;

    const BASE: u64 = 0xffff_ffff_8200_0000;
    const DESCS: u64 = 0x1000;
    const ID_MASK: u64 = (1 << 62) - 1;

    /// The kernel's 64-bit layout, described in BTF the way pahole writes it.
    fn kernel_btf() -> Btf {
        let mut b = BtfBuilder::new();
        let u8_ = b.int("u8", 1, false);
        let u16_ = b.int("u16", 2, false);
        let u32_ = b.int("unsigned int", 4, false);
        let u64_ = b.int("u64", 8, false);
        let long = b.int("long", 8, true);
        let char_ = b.char();
        let counter = b.struct_("", 8, &[("counter", long, 0, 0)]);
        let atomic = b.typedef("atomic_long_t", counter);
        let desc = b.next_id();
        let desc_ptr = b.ptr(kvmaccess_btf::TypeId(desc.get() + 2));
        let info_ptr = b.ptr(kvmaccess_btf::TypeId(desc.get() + 4));
        let lpos = b.struct_(
            "prb_data_blk_lpos",
            16,
            &[("begin", u64_, 0, 0), ("next", u64_, 64, 0)],
        );
        b.struct_(
            "prb_desc",
            24,
            &[("state_var", atomic, 0, 0), ("text_blk_lpos", lpos, 64, 0)],
        );
        let dev = b.array(char_, u32_, 64);
        b.struct_(
            "printk_info",
            88,
            &[
                ("seq", u64_, 0, 0),
                ("ts_nsec", u64_, 64, 0),
                ("text_len", u16_, 128, 0),
                ("facility", u8_, 144, 0),
                ("flags", u8_, 152, 5),
                ("level", u8_, 157, 3),
                ("caller_id", u32_, 160, 0),
                ("dev_info", dev, 192, 0),
            ],
        );
        let char_ptr = b.ptr(char_);
        let desc_ring = b.struct_(
            "prb_desc_ring",
            48,
            &[
                ("count_bits", u32_, 0, 0),
                ("descs", desc_ptr, 64, 0),
                ("infos", info_ptr, 128, 0),
                ("head_id", atomic, 192, 0),
                ("tail_id", atomic, 256, 0),
                ("last_finalized_id", atomic, 320, 0),
            ],
        );
        let data_ring = b.struct_(
            "prb_data_ring",
            32,
            &[
                ("size_bits", u32_, 0, 0),
                ("data", char_ptr, 64, 0),
                ("head_lpos", atomic, 128, 0),
                ("tail_lpos", atomic, 192, 0),
            ],
        );
        b.struct_(
            "printk_ringbuffer",
            88,
            &[
                ("desc_ring", desc_ring, 0, 0),
                ("text_data_ring", data_ring, 384, 0),
                ("fail", atomic, 640, 0),
            ],
        );
        b.enum_(
            "desc_state",
            4,
            true,
            &[
                ("desc_miss", -1),
                ("desc_reserved", 0),
                ("desc_committed", 1),
                ("desc_finalized", 2),
                ("desc_reusable", 3),
            ],
        );
        Btf::parse(&b.build()).unwrap()
    }

    fn layout() -> PrintkLayout {
        PrintkLayout::from_btf(&kernel_btf()).unwrap()
    }

    /// A writer that follows the kernel's allocation rules, so that blocks wrap and old records
    /// are recycled as in a real ring.
    struct Ring {
        count_bits: u32,
        size_bits: u32,
        image: Vec<u8>,
        head_id: u64,
        tail_id: u64,
        head_lpos: u64,
        seq: u64,
        /// Live records: (id, begin, next, text).
        live: Vec<(u64, u64, u64, String)>,
        wrapped_blocks: usize,
    }

    impl Ring {
        fn new(count_bits: u32, size_bits: u32) -> Self {
            let count = 1u64 << count_bits;
            let data = 1u64 << size_bits;
            let len = DESCS + count * 24 + count * 88 + data;
            let head = (0u64.wrapping_sub(count + 1)) & ID_MASK;
            let mut ring = Self {
                count_bits,
                size_bits,
                image: vec![0; len as usize],
                head_id: head,
                tail_id: head,
                head_lpos: 0u64.wrapping_sub(data),
                seq: 0,
                live: Vec::new(),
                wrapped_blocks: 0,
            };
            // The kernel's bootstrap descriptor: reusable, no data.
            let idx = head & (count - 1);
            ring.put_desc(idx, (3 << 62) | head, 1, 1);
            ring.sync_header();
            ring
        }
        fn count(&self) -> u64 {
            1 << self.count_bits
        }
        fn data_size(&self) -> u64 {
            1 << self.size_bits
        }
        fn infos(&self) -> u64 {
            DESCS + self.count() * 24
        }
        fn data(&self) -> u64 {
            self.infos() + self.count() * 88
        }
        fn put(&mut self, off: u64, bytes: &[u8]) {
            self.image[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
        }
        fn put_u64(&mut self, off: u64, v: u64) {
            self.put(off, &v.to_le_bytes());
        }
        fn put_desc(&mut self, idx: u64, sv: u64, begin: u64, next: u64) {
            let at = DESCS + idx * 24;
            self.put_u64(at, sv);
            self.put_u64(at + 8, begin);
            self.put_u64(at + 16, next);
        }
        fn desc_at(&self, id: u64) -> u64 {
            DESCS + (id & (self.count() - 1)) * 24
        }
        fn info_at(&self, id: u64) -> u64 {
            self.infos() + (id & (self.count() - 1)) * 88
        }
        fn sync_header(&mut self) {
            self.put(0, &self.count_bits.to_le_bytes());
            self.put_u64(8, BASE + DESCS);
            self.put_u64(16, BASE + self.infos());
            self.put_u64(24, self.head_id);
            self.put_u64(32, self.tail_id);
            self.put(48, &self.size_bits.to_le_bytes());
            self.put_u64(56, BASE + self.data());
            self.put_u64(64, self.head_lpos);
        }
        fn recycle_oldest(&mut self) {
            let (id, ..) = self.live.remove(0);
            let at = self.desc_at(id);
            self.put_u64(at, (3 << 62) | id);
            self.tail_id = (id + 1) & ID_MASK;
        }
        fn push(&mut self, text: &str, level: u8, caller: u32) -> u64 {
            let id = (self.head_id + 1) & ID_MASK;
            // The slot must be free: the oldest record gives way.
            if self.live.len() as u64 == self.count() - 1 {
                self.recycle_oldest();
            }
            let size = (8 + text.len() as u64).div_ceil(8) * 8;
            let data = self.data_size();
            let begin = self.head_lpos;
            let mut next = begin.wrapping_add(size);
            let mut block = begin & (data - 1);
            if begin >> self.size_bits != next >> self.size_bits {
                // Wrapping block: its id at the old position, the block itself at offset 0.
                let d = self.data() + block;
                self.put_u64(d, id);
                next = (next.wrapping_add(data - 1) & !(data - 1)).wrapping_add(size);
                block = 0;
                self.wrapped_blocks += 1;
            }
            while let Some(&(_, b, ..)) = self.live.first() {
                if next.wrapping_sub(b) > data {
                    self.recycle_oldest();
                } else {
                    break;
                }
            }
            let d = self.data() + block;
            self.put_u64(d, id);
            self.put(d + 8, text.as_bytes());
            let at = self.desc_at(id);
            self.put_desc(id & (self.count() - 1), (2 << 62) | id, begin, next);
            let _ = at;
            let info = self.info_at(id);
            self.put_u64(info, self.seq);
            self.put_u64(info + 8, 1_234_567_891 + self.seq * 1000);
            self.put(info + 16, &(text.len() as u16).to_le_bytes());
            self.put(info + 18, &[0]);
            self.put(info + 19, &[(level << 5) | 2]);
            self.put(info + 20, &caller.to_le_bytes());
            self.seq += 1;
            self.head_id = id;
            self.head_lpos = next;
            self.live.push((id, begin, next, text.to_string()));
            self.sync_header();
            id
        }
        fn read(&self) -> Result<LogBuffer> {
            let mut mem = FlatMemory {
                base: BASE,
                bytes: &self.image,
            };
            read_log(&mut mem, BASE, &layout())
        }
        fn texts(&self) -> Vec<String> {
            self.live.iter().map(|l| l.3.clone()).collect()
        }
    }

    #[test]
    fn layout_from_btf_has_bitfields_and_states() {
        let l = layout();
        assert_eq!(
            l.level,
            Field {
                bit_offset: 157,
                bits: 3
            }
        );
        assert_eq!(
            l.flags,
            Field {
                bit_offset: 152,
                bits: 5
            }
        );
        assert_eq!(l.text_len, Field::bytes(16, 2));
        assert_eq!(l.data, Field::bytes(56, 8));
        assert_eq!(l.state_var, Field::bytes(0, 8));
        assert_eq!(l.text_next, Field::bytes(16, 8));
        assert_eq!(l.states, DescStates::KERNEL);
        assert_eq!((l.ring_size, l.desc_size, l.info_size), (88, 24, 88));
        let raw = [0b1100_0010u8];
        assert_eq!(
            Field {
                bit_offset: 5,
                bits: 3
            }
            .get(&raw),
            Some(6)
        );
        assert_eq!(
            Field {
                bit_offset: 0,
                bits: 5
            }
            .get(&raw),
            Some(2)
        );
        assert_eq!(
            Field {
                bit_offset: 4,
                bits: 8
            }
            .get(&raw),
            None
        );
    }

    #[test]
    fn reads_records_like_dmesg() {
        let mut ring = Ring::new(4, 10);
        ring.push("Linux version 6.1", 5, 0);
        ring.push("line one\nline two", 6, 0x8000_0001);
        ring.push("", 7, 42);
        let log = ring.read().unwrap();
        assert!(log.notes.is_empty(), "{:?}", log.notes);
        // The bootstrap descriptor is reusable and skipped.
        assert_eq!(log.skipped_count, 1);
        assert_eq!(log.records.len(), 3);
        let r = &log.records[1];
        assert_eq!((r.seq, r.level, r.facility, r.flags), (1, 6, 0, 2));
        assert_eq!(r.caller.to_string(), "C1");
        assert_eq!(log.records[2].caller.to_string(), "T42");
        assert_eq!(r.timestamp, "1.234568");
        assert!(r.finalized);
        assert_eq!(
            log.dmesg_text(),
            "[    1.234567] Linux version 6.1\n[    1.234568] line one\n\
             [    1.234568] line two\n[    1.234569] \n"
        );
        let json = serde_json::to_value(&log.records[0]).unwrap();
        assert_eq!(json["caller"], "T0");
    }

    #[test]
    fn records_that_wrap_around_the_byte_ring() {
        let mut ring = Ring::new(4, 8);
        for i in 0..200 {
            let text = format!("record {i} {}", "x".repeat(i % 37));
            ring.push(&text, (i % 8) as u8, i as u32);
        }
        assert!(ring.wrapped_blocks > 5, "{}", ring.wrapped_blocks);
        let log = ring.read().unwrap();
        let texts: Vec<String> = log.records.iter().map(|r| r.text.clone()).collect();
        assert_eq!(texts, ring.texts());
        assert!(log.examined <= ring.count());
        let seqs: Vec<u64> = log.records.iter().map(|r| r.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    }

    #[test]
    fn overwritten_and_bad_state_descriptors_are_skipped() {
        let mut ring = Ring::new(4, 10);
        let ids: Vec<u64> = (0..6).map(|i| ring.push(&format!("r{i}"), 6, 1)).collect();
        // A reused descriptor: holds a newer id than the one the walk expects.
        let at = ring.desc_at(ids[1]);
        ring.put_u64(at, (2 << 62) | (ids[1] + 16));
        // Being written, freed, committed (kept, not finalized).
        let at = ring.desc_at(ids[2]);
        ring.put_u64(at, ids[2]);
        let at = ring.desc_at(ids[3]);
        ring.put_u64(at, (3 << 62) | ids[3]);
        let at = ring.desc_at(ids[4]);
        ring.put_u64(at, (1 << 62) | ids[4]);
        let log = ring.read().unwrap();
        let texts: Vec<&str> = log.records.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, ["r0", "r4", "r5"]);
        assert!(!log.records[1].finalized);
        let reasons: Vec<&str> = log.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert!(reasons.iter().any(|r| r.contains("reused")), "{reasons:?}");
        assert!(
            reasons.iter().any(|r| r.contains("reserved")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("reusable")),
            "{reasons:?}"
        );
    }

    #[test]
    fn text_len_beyond_its_block_or_the_ring_is_skipped() {
        let mut ring = Ring::new(4, 10);
        let a = ring.push("short", 6, 1);
        let b = ring.push("other", 6, 1);
        let c = ring.push("third", 6, 1);
        let info = ring.info_at(a);
        ring.put(info + 16, &u16::MAX.to_le_bytes());
        let info = ring.info_at(b);
        ring.put(info + 16, &9u16.to_le_bytes());
        // Positions no writer produces: unaligned, and two wraps apart.
        let at = ring.desc_at(c);
        ring.put_u64(at + 8, 0x13);
        let log = ring.read().unwrap();
        assert!(log.records.is_empty(), "{:?}", log.records);
        let reasons: Vec<&str> = log.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert!(
            reasons.iter().filter(|r| r.contains("exceeds")).count() == 2,
            "{reasons:?}"
        );
        ring.put_u64(at + 8, 0x10);
        ring.put_u64(at + 16, 0x10 + 3 * 1024);
        let log = ring.read().unwrap();
        assert!(
            log.skipped.iter().any(|s| s.reason.contains("illegal")),
            "{:?}",
            log.skipped
        );
    }

    #[test]
    fn a_block_holding_another_id_is_skipped() {
        let mut ring = Ring::new(4, 10);
        let a = ring.push("victim", 6, 1);
        let (_, begin, ..) = ring.live[0];
        let d = ring.data() + (begin & 1023);
        ring.put_u64(d, a + 99);
        let log = ring.read().unwrap();
        assert!(log.records.is_empty());
        assert!(log.skipped.iter().any(|s| s.reason.contains("overwritten")));
    }

    #[test]
    fn hostile_headers_are_bounded() {
        let mut ring = Ring::new(4, 10);
        for i in 0..5 {
            ring.push(&format!("r{i}"), 6, 1);
        }
        // Huge head/tail distance: only one ring's worth is examined.
        let head = ring.head_id;
        ring.put_u64(32, head.wrapping_sub(1 << 40) & ID_MASK);
        let log = ring.read().unwrap();
        assert_eq!(log.examined, ring.count());
        assert_eq!(log.records.len(), 5);
        assert!(log.notes[0].contains("behind"), "{:?}", log.notes);
        // The tail one ahead of the head: the largest possible span, still one ring.
        ring.put_u64(32, (head + 1) & ID_MASK);
        let log = ring.read().unwrap();
        assert_eq!(log.examined, ring.count());
        // Absurd sizes are refused outright.
        ring.put(0, &63u32.to_le_bytes());
        assert!(matches!(ring.read(), Err(Error::LogBuffer(_))));
        ring.put(0, &4u32.to_le_bytes());
        ring.put(48, &60u32.to_le_bytes());
        assert!(matches!(ring.read(), Err(Error::LogBuffer(_))));
        ring.put(48, &10u32.to_le_bytes());
        // Arrays pointing nowhere: an error naming the read, not a panic.
        ring.put_u64(8, 0x10);
        assert!(matches!(ring.read(), Err(Error::Virt { .. })));
    }

    #[test]
    fn random_corruption_never_panics() {
        let mut ring = Ring::new(4, 8);
        for i in 0..60 {
            ring.push(&format!("record {i} {}", "y".repeat(i % 23)), 6, 1);
        }
        let clean = ring.image.clone();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            ring.image.copy_from_slice(&clean);
            for _ in 0..8 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state as usize) % ring.image.len();
                ring.image[at] = (state >> 32) as u8;
            }
            if let Ok(log) = ring.read() {
                assert!(log.examined <= ring.count());
                let total: usize = log.records.iter().map(|r| r.text.len()).sum();
                assert!(total <= 3 * ring.data_size() as usize);
            }
        }
    }

    #[test]
    fn layout_rejects_fields_outside_their_structs() {
        let mut l = layout();
        l.caller_id = Field::bytes(200, 4);
        assert!(matches!(l.check(), Err(Error::LogBuffer(_))));
        let mut l = layout();
        l.state_var = Field {
            bit_offset: 0,
            bits: 5,
        };
        assert!(matches!(l.check(), Err(Error::LogBuffer(_))));
    }
}
