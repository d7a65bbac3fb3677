//! Reader for ELF cores written by QEMU's `dump-guest-memory` (without paging) and
//! `virsh dump --memory-only --format elf`.
//!
//! Parsed by hand rather than with the `object` crate: a core needs only the file header, the
//! program headers and the notes, and hand parsing lets us accept what QEMU really writes
//! (ELF32 for guests stopped outside long mode, `PN_XNUM` program-header counts, `p_vaddr` of
//! zero) while reporting every inconsistency with its file offset.

use crate::backing::{map_file, Backing};
use crate::error::{DumpError, Result};
use crate::notes::{interpret_notes, split_notes, CoreNotes, EM_386, EM_X86_64};
use crate::physmap::{Extent, MapError, PhysMap};
use kvmaccess_core::{Error, Gpa, PhysRange, PhysicalMemory, Registers, VcpuState};
use std::path::Path;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub(crate) const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
pub(crate) const ET_CORE: u16 = 4;
pub(crate) const PT_LOAD: u32 = 1;
pub(crate) const PT_NOTE: u32 = 4;
/// `e_phnum` value meaning "the real count is in section header 0's `sh_info`".
pub(crate) const PN_XNUM: u16 = 0xffff;

/// Program headers we are willing to read: a guest has at most a few dozen RAM ranges, and this
/// keeps the up-front allocation small even for a forged header.
const MAX_PHDRS: usize = 1 << 20;
/// Total note bytes we are willing to parse (QEMU writes well under 1 KiB per vCPU).
const MAX_NOTE_BYTES: u64 = 64 << 20;

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub(crate) struct Ehdr64 {
    pub ident: [u8; 16],
    pub etype: U16,
    pub machine: U16,
    pub version: U32,
    pub entry: U64,
    pub phoff: U64,
    pub shoff: U64,
    pub flags: U32,
    pub ehsize: U16,
    pub phentsize: U16,
    pub phnum: U16,
    pub shentsize: U16,
    pub shnum: U16,
    pub shstrndx: U16,
}

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct Ehdr32 {
    ident: [u8; 16],
    etype: U16,
    machine: U16,
    version: U32,
    entry: U32,
    phoff: U32,
    shoff: U32,
    flags: U32,
    ehsize: U16,
    phentsize: U16,
    phnum: U16,
    shentsize: U16,
    shnum: U16,
    shstrndx: U16,
}

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub(crate) struct Phdr64 {
    pub ptype: U32,
    pub flags: U32,
    pub offset: U64,
    pub vaddr: U64,
    pub paddr: U64,
    pub filesz: U64,
    pub memsz: U64,
    pub align: U64,
}

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct Phdr32 {
    ptype: U32,
    offset: U32,
    vaddr: U32,
    paddr: U32,
    filesz: U32,
    memsz: U32,
    flags: U32,
    align: U32,
}

/// Byte offsets of `sh_info` inside a section header, for `PN_XNUM`.
const SH_INFO_OFF64: u64 = 44;
const SH_INFO_OFF32: u64 = 28;

/// Class-independent view of the fields we use.
struct Header {
    class: u8,
    machine: u16,
    phoff: u64,
    phentsize: u64,
    phnum: u64,
}

/// Class-independent view of a program header.
#[derive(Clone, Copy, Debug)]
struct Phdr {
    ptype: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

/// One `PT_LOAD` segment of a core, as the file describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    /// Index of the program header.
    pub index: usize,
    /// Guest-physical address (`p_paddr`).
    pub gpa: Gpa,
    /// Bytes of guest memory covered (`p_memsz`).
    pub mem_size: u64,
    /// Bytes stored in the file (`p_filesz`); the rest reads as zero.
    pub file_size: u64,
    /// File offset of the stored bytes.
    pub file_offset: u64,
}

/// The parsed, validated structure of a core; holds no reference into the file.
struct Layout {
    class: u8,
    machine: u16,
    map: PhysMap,
    segments: Vec<LoadSegment>,
    notes: CoreNotes,
}

fn read_header(data: &[u8], file: &str) -> Result<Header> {
    let len = data.len() as u64;
    let ident = data
        .get(..16)
        .ok_or_else(|| DumpError::truncated(file, "ELF identification", 16, len))?;
    if ident.get(..4) != Some(ELF_MAGIC.as_slice()) {
        return Err(DumpError::malformed(file, "ELF", 0, "no ELF magic"));
    }
    let class = ident.get(4).copied().unwrap_or_default();
    let data_enc = ident.get(5).copied().unwrap_or_default();
    if data_enc != ELFDATA2LSB {
        return Err(DumpError::malformed(
            file,
            "ELF",
            5,
            format!("data encoding {data_enc} is not little-endian (1); not an x86 core"),
        ));
    }
    let (etype, machine, phoff, phentsize, phnum, shoff, shentsize, want_phent) = match class {
        ELFCLASS64 => {
            let (h, _) = Ehdr64::read_from_prefix(data).map_err(|_| {
                DumpError::truncated(file, "ELF64 header", size_of::<Ehdr64>() as u64, len)
            })?;
            (
                h.etype.get(),
                h.machine.get(),
                h.phoff.get(),
                h.phentsize.get(),
                h.phnum.get(),
                h.shoff.get(),
                h.shentsize.get(),
                size_of::<Phdr64>(),
            )
        }
        ELFCLASS32 => {
            let (h, _) = Ehdr32::read_from_prefix(data).map_err(|_| {
                DumpError::truncated(file, "ELF32 header", size_of::<Ehdr32>() as u64, len)
            })?;
            (
                h.etype.get(),
                h.machine.get(),
                u64::from(h.phoff.get()),
                h.phentsize.get(),
                h.phnum.get(),
                u64::from(h.shoff.get()),
                h.shentsize.get(),
                size_of::<Phdr32>(),
            )
        }
        other => {
            return Err(DumpError::malformed(
                file,
                "ELF",
                4,
                format!("class {other} is neither ELF32 (1) nor ELF64 (2)"),
            ))
        }
    };
    if etype != ET_CORE {
        return Err(DumpError::malformed(
            file,
            "ELF",
            16,
            format!("e_type {etype} is not ET_CORE (4): this ELF file is not a memory dump"),
        ));
    }
    if machine != EM_X86_64 && machine != EM_386 {
        return Err(DumpError::malformed(
            file,
            "ELF",
            18,
            format!("e_machine {machine} is neither x86-64 (62) nor i386 (3)"),
        ));
    }
    let mut phnum = u64::from(phnum);
    if phnum == u64::from(PN_XNUM) {
        phnum = xnum_phnum(data, file, class, shoff, shentsize)?;
    }
    if phnum > 0 && usize::from(phentsize) != want_phent {
        return Err(DumpError::malformed(
            file,
            "ELF",
            if class == ELFCLASS64 { 54 } else { 42 },
            format!("e_phentsize {phentsize}, expected {want_phent}"),
        ));
    }
    if phnum > MAX_PHDRS as u64 {
        return Err(DumpError::malformed(
            file,
            "ELF",
            if class == ELFCLASS64 { 56 } else { 44 },
            format!("{phnum} program headers; at most {MAX_PHDRS} are accepted"),
        ));
    }
    Ok(Header {
        class,
        machine,
        phoff,
        phentsize: u64::from(phentsize),
        phnum,
    })
}

/// The real program-header count of a file with more than 65534 of them.
fn xnum_phnum(data: &[u8], file: &str, class: u8, shoff: u64, shentsize: u16) -> Result<u64> {
    let (info_off, min_shent) = if class == ELFCLASS64 {
        (SH_INFO_OFF64, 64)
    } else {
        (SH_INFO_OFF32, 40)
    };
    if shoff == 0 || shentsize < min_shent {
        return Err(DumpError::malformed(
            file,
            "ELF",
            if class == ELFCLASS64 { 40 } else { 32 },
            format!(
                "e_phnum is PN_XNUM but there is no usable section header 0 (e_shoff {shoff:#x}, \
                 e_shentsize {shentsize})"
            ),
        ));
    }
    let at = shoff.checked_add(info_off);
    let end = at.and_then(|a| a.checked_add(4));
    let raw = at
        .zip(end)
        .and_then(|(a, e)| Some(usize::try_from(a).ok()?..usize::try_from(e).ok()?))
        .and_then(|r| data.get(r))
        .ok_or_else(|| {
            DumpError::truncated(
                file,
                "section header 0 (holding the program header count)",
                end.unwrap_or(u64::MAX),
                data.len() as u64,
            )
        })?;
    Ok(U32::read_from_bytes(raw)
        .map(U32::get)
        .unwrap_or_default()
        .into())
}

fn read_phdrs(data: &[u8], file: &str, h: &Header) -> Result<Vec<Phdr>> {
    let len = data.len() as u64;
    let table_len = h.phnum.checked_mul(h.phentsize);
    let table_end = table_len.and_then(|l| h.phoff.checked_add(l));
    let table = table_end
        .and_then(|end| Some(usize::try_from(h.phoff).ok()?..usize::try_from(end).ok()?))
        .and_then(|r| data.get(r));
    let Some(table) = table else {
        return Err(match table_end {
            Some(end) => DumpError::truncated(
                file,
                format!(
                    "program header table ({} entries at {:#x})",
                    h.phnum, h.phoff
                ),
                end,
                len,
            ),
            None => DumpError::malformed(
                file,
                "ELF",
                h.phoff,
                format!("program header table offset {:#x} overflows", h.phoff),
            ),
        });
    };
    let entry = usize::try_from(h.phentsize).unwrap_or(usize::MAX).max(1);
    let mut phdrs = Vec::with_capacity(usize::try_from(h.phnum).unwrap_or(0));
    for raw in table.chunks_exact(entry) {
        let phdr = if h.class == ELFCLASS64 {
            Phdr64::read_from_bytes(raw).ok().map(|p| Phdr {
                ptype: p.ptype.get(),
                offset: p.offset.get(),
                paddr: p.paddr.get(),
                filesz: p.filesz.get(),
                memsz: p.memsz.get(),
                align: p.align.get(),
            })
        } else {
            Phdr32::read_from_bytes(raw).ok().map(|p| Phdr {
                ptype: p.ptype.get(),
                offset: p.offset.get().into(),
                paddr: p.paddr.get().into(),
                filesz: p.filesz.get().into(),
                memsz: p.memsz.get().into(),
                align: p.align.get().into(),
            })
        };
        // `entry` equals the struct size (checked in read_header), so this always succeeds.
        if let Some(phdr) = phdr {
            phdrs.push(phdr);
        }
    }
    Ok(phdrs)
}

/// Where program header `index` starts, for messages.
fn phdr_offset(h: &Header, index: usize) -> u64 {
    (index as u64)
        .checked_mul(h.phentsize)
        .and_then(|o| o.checked_add(h.phoff))
        .unwrap_or(h.phoff)
}

fn parse_layout(data: &[u8], file: &str) -> Result<Layout> {
    let len = data.len() as u64;
    let header = read_header(data, file)?;
    let phdrs = read_phdrs(data, file, &header)?;

    let mut extents = Vec::new();
    let mut segments = Vec::new();
    let mut raw_notes = Vec::new();
    let mut note_bytes = 0u64;
    for (index, ph) in phdrs.iter().enumerate() {
        match ph.ptype {
            PT_LOAD => {
                if ph.filesz > ph.memsz {
                    return Err(DumpError::malformed(
                        file,
                        "ELF",
                        phdr_offset(&header, index),
                        format!(
                            "PT_LOAD segment {index}: p_filesz {:#x} exceeds p_memsz {:#x}",
                            ph.filesz, ph.memsz
                        ),
                    ));
                }
                if ph.memsz == 0 {
                    continue;
                }
                let Some(gpa_end) = ph.paddr.checked_add(ph.memsz) else {
                    return Err(DumpError::malformed(
                        file,
                        "ELF",
                        phdr_offset(&header, index),
                        format!(
                            "PT_LOAD segment {index}: guest-physical {:#x} + {:#x} wraps past \
                             2^64",
                            ph.paddr, ph.memsz
                        ),
                    ));
                };
                let what = || {
                    format!(
                        "PT_LOAD segment {index} (guest-physical {:#x}..{gpa_end:#x})",
                        ph.paddr
                    )
                };
                match ph.offset.checked_add(ph.filesz) {
                    Some(end) if end <= len => {}
                    Some(end) => return Err(DumpError::truncated(file, what(), end, len)),
                    None => {
                        return Err(DumpError::malformed(
                            file,
                            "ELF",
                            phdr_offset(&header, index),
                            format!("{}: file offset {:#x} overflows", what(), ph.offset),
                        ))
                    }
                }
                extents.push((
                    index,
                    Extent {
                        start: ph.paddr,
                        mem_len: ph.memsz,
                        file_off: ph.offset,
                        file_len: ph.filesz,
                    },
                ));
                segments.push(LoadSegment {
                    index,
                    gpa: Gpa(ph.paddr),
                    mem_size: ph.memsz,
                    file_size: ph.filesz,
                    file_offset: ph.offset,
                });
            }
            PT_NOTE => {
                let what = || format!("PT_NOTE segment {index}");
                let end = ph.offset.checked_add(ph.filesz).ok_or_else(|| {
                    DumpError::malformed(
                        file,
                        "ELF",
                        phdr_offset(&header, index),
                        format!("{}: file offset {:#x} overflows", what(), ph.offset),
                    )
                })?;
                if end > len {
                    return Err(DumpError::truncated(file, what(), end, len));
                }
                note_bytes = note_bytes.saturating_add(ph.filesz);
                if note_bytes > MAX_NOTE_BYTES {
                    return Err(DumpError::malformed(
                        file,
                        "ELF",
                        phdr_offset(&header, index),
                        format!("more than {MAX_NOTE_BYTES} bytes of notes"),
                    ));
                }
                let seg = usize::try_from(ph.offset)
                    .ok()
                    .zip(usize::try_from(end).ok())
                    .and_then(|(s, e)| data.get(s..e))
                    .unwrap_or_default();
                // ELF64 cores normally align notes to 4 (QEMU, Linux); honour an explicit 8.
                let align = if ph.align == 8 { 8 } else { 4 };
                raw_notes.extend(split_notes(seg, ph.offset, align, file)?);
            }
            _ => {}
        }
    }
    let map = PhysMap::new(extents).map_err(|e| match e {
        MapError::Overlap { first, second, at } => DumpError::malformed(
            file,
            "ELF",
            phdr_offset(&header, second),
            format!(
                "PT_LOAD segments {first} and {second} both claim guest-physical {at:#x} (a dump \
                 taken with paging=true? take it again without paging)"
            ),
        ),
    })?;
    let notes = interpret_notes(&raw_notes, header.machine, file)?;
    Ok(Layout {
        class: header.class,
        machine: header.machine,
        map,
        segments,
        notes,
    })
}

/// Parses only the notes of an ELF core held in memory: the registers of every vCPU and
/// `VMCOREINFO`. The whole file must be given (notes are found through the program headers),
/// and its memory segments are validated too.
///
/// This is how the live QEMU backend reads registers: it asks QEMU for a tiny
/// `dump-guest-memory` and hands the result here.
pub fn parse_core_notes(bytes: &[u8]) -> Result<CoreNotes> {
    parse_layout(bytes, "<memory>").map(|l| l.notes)
}

/// An ELF core dump opened for reading.
///
/// Guest-physical addresses come from `p_paddr`; `p_vaddr` is ignored (QEMU writes 0 or a copy
/// of `p_paddr` without paging). Segments whose guest-physical ranges overlap, as in dumps taken
/// with `paging=true`, are rejected.
#[derive(Debug)]
pub struct ElfCore {
    file: String,
    backing: Backing,
    class: u8,
    machine: u16,
    map: PhysMap,
    segments: Vec<LoadSegment>,
    notes: CoreNotes,
}

impl ElfCore {
    /// Maps and validates the core at `path`. Every segment must lie inside the file: a
    /// truncated dump fails here, naming the segment and how many bytes are missing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let backing = map_file(path)?;
        Self::with_backing(backing, path.display().to_string())
    }

    /// Parses a core held in memory (tests, fuzzing, small dumps fetched over a socket).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::with_backing(Backing::Owned(bytes), "<memory>".to_owned())
    }

    pub(crate) fn with_backing(backing: Backing, file: String) -> Result<Self> {
        let layout = parse_layout(backing.bytes(), &file)?;
        Ok(Self {
            file,
            backing,
            class: layout.class,
            machine: layout.machine,
            map: layout.map,
            segments: layout.segments,
            notes: layout.notes,
        })
    }

    /// The file's name as given when opening (`<memory>` for [`ElfCore::from_bytes`]).
    pub fn file_name(&self) -> &str {
        &self.file
    }

    /// Everything the notes say: registers, `VMCOREINFO`, warnings.
    pub fn notes(&self) -> &CoreNotes {
        &self.notes
    }

    /// Registers of every vCPU recorded in the core.
    pub fn vcpus(&self) -> &[Registers] {
        &self.notes.vcpus
    }

    /// The `VMCOREINFO` text, if the guest published one.
    pub fn vmcoreinfo(&self) -> Option<&str> {
        self.notes.vmcoreinfo.as_deref()
    }

    /// The `PT_LOAD` segments in program-header order (empty ones omitted).
    pub fn segments(&self) -> &[LoadSegment] {
        &self.segments
    }

    /// `true` for ELF64 files, `false` for ELF32 (QEMU writes ELF32 when the guest was not in
    /// long mode and has no RAM above 4 GiB).
    pub fn is_elf64(&self) -> bool {
        self.class == ELFCLASS64
    }

    /// `e_machine`: 62 for x86-64, 3 for i386.
    pub fn machine(&self) -> u16 {
        self.machine
    }
}

impl PhysicalMemory for ElfCore {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        self.map.read(self.backing.bytes(), gpa, buf)
    }

    fn ranges(&self) -> &[PhysRange] {
        self.map.ranges()
    }
}

impl VcpuState for ElfCore {
    fn vcpu_count(&self) -> usize {
        self.notes.vcpus.len()
    }

    fn registers(&self, vcpu: usize) -> Result<Registers, Error> {
        self.notes
            .vcpus
            .get(vcpu)
            .cloned()
            .ok_or(Error::NoSuchVcpu {
                index: vcpu,
                count: self.notes.vcpus.len(),
            })
    }

    fn all_registers(&self) -> Result<Vec<Registers>, Error> {
        Ok(self.notes.vcpus.clone())
    }
}
