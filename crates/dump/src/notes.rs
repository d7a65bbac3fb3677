//! ELF core notes that QEMU writes: `CORE`/`NT_PRSTATUS` (general registers, one per vCPU),
//! `QEMU` (the full CPU state: segments, descriptor tables, control registers) and `VMCOREINFO`.
//!
//! Layouts are those of QEMU's `target/i386/arch_dump.c` and the Linux x86 `elf_prstatus`; the
//! structs below are our own little-endian descriptions of them.

use crate::error::{DumpError, Result};
use kvmaccess_core::{DescriptorTable, Registers, Segment};
use std::collections::BTreeMap;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `n_type` of a `CORE` note holding an `elf_prstatus`.
pub const NT_PRSTATUS: u32 = 1;
/// Note name QEMU uses for its CPU-state notes (`n_type` 0).
pub const QEMU_NOTE_NAME: &str = "QEMU";
/// Note name of the Linux crash-dump information note (`n_type` 0).
pub const VMCOREINFO_NOTE_NAME: &str = "VMCOREINFO";
/// The only `QEMUCPUState` version QEMU has ever written; QEMU grows the struct without bumping
/// it and readers tell the extensions apart by the `size` field.
pub const QEMU_CPU_STATE_VERSION: u32 = 1;
/// Size of a version-1 `QEMUCPUState` without the optional tail.
pub const QEMU_CPU_STATE_BASE_SIZE: usize = 432;
/// Size of a `QEMUCPUState` that carries `kernel_gs_base` (QEMU 7.1 and later).
pub const QEMU_CPU_STATE_SIZE_WITH_KGS: usize = QEMU_CPU_STATE_BASE_SIZE + 8;
/// Size of the x86-64 `elf_prstatus` descriptor.
pub const PRSTATUS_X86_64_SIZE: usize = 336;
/// Size of the i386 `elf_prstatus` descriptor, which QEMU writes when the first vCPU is not in
/// long mode (e.g. a guest stopped in its firmware).
pub const PRSTATUS_I386_SIZE: usize = 144;

pub(crate) const EM_386: u16 = 3;
pub(crate) const EM_X86_64: u16 = 62;

/// Refuse absurd vCPU counts before allocating per-vCPU state (KVM's own limit is 4096).
const MAX_VCPUS: usize = 1 << 16;

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub(crate) struct Nhdr {
    pub namesz: U32,
    pub descsz: U32,
    pub ntype: U32,
}

#[derive(Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct QemuSegment {
    selector: U32,
    limit: U32,
    flags: U32,
    pad: U32,
    base: U64,
}

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct QemuCpuState {
    version: U32,
    size: U32,
    rax: U64,
    rbx: U64,
    rcx: U64,
    rdx: U64,
    rsi: U64,
    rdi: U64,
    rsp: U64,
    rbp: U64,
    r8: U64,
    r9: U64,
    r10: U64,
    r11: U64,
    r12: U64,
    r13: U64,
    r14: U64,
    r15: U64,
    rip: U64,
    rflags: U64,
    cs: QemuSegment,
    ds: QemuSegment,
    es: QemuSegment,
    fs: QemuSegment,
    gs: QemuSegment,
    ss: QemuSegment,
    ldt: QemuSegment,
    tr: QemuSegment,
    gdt: QemuSegment,
    idt: QemuSegment,
    cr: [U64; 5],
}

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct UserRegs64 {
    r15: U64,
    r14: U64,
    r13: U64,
    r12: U64,
    rbp: U64,
    rbx: U64,
    r11: U64,
    r10: U64,
    r9: U64,
    r8: U64,
    rax: U64,
    rcx: U64,
    rdx: U64,
    rsi: U64,
    rdi: U64,
    orig_rax: U64,
    rip: U64,
    cs: U64,
    eflags: U64,
    rsp: U64,
    ss: U64,
    fs_base: U64,
    gs_base: U64,
    ds: U64,
    es: U64,
    fs: U64,
    gs: U64,
}

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct PrStatus64 {
    pad1: [u8; 32],
    pid: U32,
    pad2: [u8; 76],
    regs: UserRegs64,
    pad3: [u8; 8],
}

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct UserRegs32 {
    ebx: U32,
    ecx: U32,
    edx: U32,
    esi: U32,
    edi: U32,
    ebp: U32,
    eax: U32,
    ds: U16,
    ds_hi: U16,
    es: U16,
    es_hi: U16,
    fs: U16,
    fs_hi: U16,
    gs: U16,
    gs_hi: U16,
    orig_eax: U32,
    eip: U32,
    cs: U16,
    cs_hi: U16,
    eflags: U32,
    esp: U32,
    ss: U16,
    ss_hi: U16,
}

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct PrStatus32 {
    pad1: [u8; 24],
    pid: U32,
    pad2: [u8; 44],
    regs: UserRegs32,
    pad3: [u8; 4],
}

// The layouts are fixed by QEMU and Linux; a wrong field list must fail the build, not a dump.
const _: () = assert!(std::mem::size_of::<QemuCpuState>() == QEMU_CPU_STATE_BASE_SIZE);
const _: () = assert!(std::mem::size_of::<PrStatus64>() == PRSTATUS_X86_64_SIZE);
const _: () = assert!(std::mem::size_of::<PrStatus32>() == PRSTATUS_I386_SIZE);
const _: () = assert!(std::mem::size_of::<UserRegs64>() == 27 * 8);

/// Where a vCPU's registers in [`CoreNotes::vcpus`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegisterSource {
    /// A `QEMU` CPU-state note (and possibly a matching `NT_PRSTATUS`): every field is real.
    QemuNote,
    /// Only an `NT_PRSTATUS`: general registers, RIP, RFLAGS, segment selectors and the FS/GS
    /// bases are real; hidden segment state, GDTR, IDTR and control registers are zero.
    PrStatusOnly,
}

/// Everything the notes of an ELF core say about the guest.
#[derive(Clone, Debug, Default)]
pub struct CoreNotes {
    /// One entry per vCPU, in the order QEMU wrote them (vCPU index order); `vcpu` is the index.
    pub vcpus: Vec<Registers>,
    /// For each entry of `vcpus`, which notes it was built from.
    pub sources: Vec<RegisterSource>,
    /// The raw `VMCOREINFO` text, if the guest kernel published one (trailing NULs removed).
    pub vmcoreinfo: Option<String>,
    /// Oddities that did not stop parsing: mismatched counts, PRSTATUS and QEMU notes that
    /// disagree, unsupported note versions. Worth showing to a user.
    pub warnings: Vec<String>,
}

impl CoreNotes {
    /// `VMCOREINFO` parsed into its `KEY=VALUE` pairs (empty if there is none).
    pub fn vmcoreinfo_map(&self) -> BTreeMap<String, String> {
        self.vmcoreinfo
            .as_deref()
            .map(parse_vmcoreinfo)
            .unwrap_or_default()
    }
}

/// Splits `VMCOREINFO` text into `KEY=VALUE` pairs. Lines without `=` are skipped; when a key
/// repeats, the last value wins (as the kernel's own readers do when they scan for a key from the
/// end).
pub fn parse_vmcoreinfo(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim_end().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// Decodes a `QEMU` CPU-state note descriptor (QEMU's `QEMUCPUState`) into [`Registers`].
///
/// `vcpu` is left 0: the note does not say which vCPU it belongs to, only its position does.
/// `kernel_gs_base` is filled when the note's `size` says it is present; `efer` is always `None`
/// because QEMU does not record it.
pub fn parse_qemu_cpu_state(desc: &[u8]) -> Result<Registers> {
    const NOTE: &str = "QEMU CPU state";
    let (state, _) = QemuCpuState::read_from_prefix(desc).map_err(|_| {
        DumpError::bad_note(
            NOTE,
            format!(
                "descriptor is {} bytes, shorter than the {QEMU_CPU_STATE_BASE_SIZE} of \
                 version {QEMU_CPU_STATE_VERSION}",
                desc.len()
            ),
        )
    })?;
    let version = state.version.get();
    if version != QEMU_CPU_STATE_VERSION {
        return Err(DumpError::bad_note(
            NOTE,
            format!("unsupported version {version} (only {QEMU_CPU_STATE_VERSION} is known)"),
        ));
    }
    let size = state.size.get();
    let size_usize = usize::try_from(size).unwrap_or(usize::MAX);
    if size_usize < QEMU_CPU_STATE_BASE_SIZE || size_usize > desc.len() {
        return Err(DumpError::bad_note(
            NOTE,
            format!(
                "size field {size} is outside {QEMU_CPU_STATE_BASE_SIZE}..={} (the descriptor's \
                 length)",
                desc.len()
            ),
        ));
    }
    let kernel_gs_base = if size_usize >= QEMU_CPU_STATE_SIZE_WITH_KGS {
        desc.get(QEMU_CPU_STATE_BASE_SIZE..QEMU_CPU_STATE_SIZE_WITH_KGS)
            .and_then(|b| U64::read_from_bytes(b).ok())
            .map(U64::get)
    } else {
        None
    };
    let seg = |name: &'static str, s: &QemuSegment| -> Result<Segment> {
        let selector = u16::try_from(s.selector.get()).map_err(|_| {
            DumpError::bad_note(
                NOTE,
                format!(
                    "{name} selector {:#x} does not fit 16 bits",
                    s.selector.get()
                ),
            )
        })?;
        Ok(Segment {
            selector,
            base: s.base.get(),
            limit: s.limit.get(),
            flags: s.flags.get(),
        })
    };
    let table = |s: &QemuSegment| DescriptorTable {
        base: s.base.get(),
        limit: s.limit.get(),
    };
    Ok(Registers {
        vcpu: 0,
        rax: state.rax.get(),
        rbx: state.rbx.get(),
        rcx: state.rcx.get(),
        rdx: state.rdx.get(),
        rsi: state.rsi.get(),
        rdi: state.rdi.get(),
        rbp: state.rbp.get(),
        rsp: state.rsp.get(),
        r8: state.r8.get(),
        r9: state.r9.get(),
        r10: state.r10.get(),
        r11: state.r11.get(),
        r12: state.r12.get(),
        r13: state.r13.get(),
        r14: state.r14.get(),
        r15: state.r15.get(),
        rip: state.rip.get(),
        rflags: state.rflags.get(),
        cs: seg("CS", &state.cs)?,
        ds: seg("DS", &state.ds)?,
        es: seg("ES", &state.es)?,
        fs: seg("FS", &state.fs)?,
        gs: seg("GS", &state.gs)?,
        ss: seg("SS", &state.ss)?,
        ldtr: seg("LDTR", &state.ldt)?,
        tr: seg("TR", &state.tr)?,
        gdtr: table(&state.gdt),
        idtr: table(&state.idt),
        cr0: state.cr[0].get(),
        cr2: state.cr[2].get(),
        cr3: state.cr[3].get(),
        cr4: state.cr[4].get(),
        efer: None,
        kernel_gs_base,
    })
}

/// Encodes `regs` as a `QEMU` CPU-state note descriptor, version 1, the way QEMU lays it out.
/// `kernel_gs_base` is appended (and `size` says so) only when it is known, so a reader never
/// mistakes a missing value for zero.
pub fn encode_qemu_cpu_state(regs: &Registers) -> Vec<u8> {
    let seg = |s: &Segment| QemuSegment {
        selector: U32::new(u32::from(s.selector)),
        limit: U32::new(s.limit),
        flags: U32::new(s.flags),
        pad: U32::ZERO,
        base: U64::new(s.base),
    };
    let table = |t: &DescriptorTable| QemuSegment {
        limit: U32::new(t.limit),
        base: U64::new(t.base),
        ..QemuSegment::default()
    };
    let size = if regs.kernel_gs_base.is_some() {
        QEMU_CPU_STATE_SIZE_WITH_KGS
    } else {
        QEMU_CPU_STATE_BASE_SIZE
    };
    let state = QemuCpuState {
        version: U32::new(QEMU_CPU_STATE_VERSION),
        // Both sizes are small constants.
        size: U32::new(u32::try_from(size).unwrap_or(u32::MAX)),
        rax: U64::new(regs.rax),
        rbx: U64::new(regs.rbx),
        rcx: U64::new(regs.rcx),
        rdx: U64::new(regs.rdx),
        rsi: U64::new(regs.rsi),
        rdi: U64::new(regs.rdi),
        rsp: U64::new(regs.rsp),
        rbp: U64::new(regs.rbp),
        r8: U64::new(regs.r8),
        r9: U64::new(regs.r9),
        r10: U64::new(regs.r10),
        r11: U64::new(regs.r11),
        r12: U64::new(regs.r12),
        r13: U64::new(regs.r13),
        r14: U64::new(regs.r14),
        r15: U64::new(regs.r15),
        rip: U64::new(regs.rip),
        rflags: U64::new(regs.rflags),
        cs: seg(&regs.cs),
        ds: seg(&regs.ds),
        es: seg(&regs.es),
        fs: seg(&regs.fs),
        gs: seg(&regs.gs),
        ss: seg(&regs.ss),
        ldt: seg(&regs.ldtr),
        tr: seg(&regs.tr),
        gdt: table(&regs.gdtr),
        idt: table(&regs.idtr),
        cr: [
            U64::new(regs.cr0),
            U64::ZERO,
            U64::new(regs.cr2),
            U64::new(regs.cr3),
            U64::new(regs.cr4),
        ],
    };
    let mut out = state.as_bytes().to_vec();
    if let Some(kgs) = regs.kernel_gs_base {
        out.extend_from_slice(&kgs.to_le_bytes());
    }
    out
}

/// Decodes an x86-64 `NT_PRSTATUS` descriptor. Returns `pr_pid` (QEMU writes vCPU index + 1) and
/// the registers it carries; fields it lacks stay zero / `None`.
pub fn parse_prstatus_x86_64(desc: &[u8]) -> Result<(u32, Registers)> {
    let (st, _) = PrStatus64::read_from_prefix(desc).map_err(|_| {
        DumpError::bad_note(
            "NT_PRSTATUS",
            format!(
                "x86-64 descriptor is {} bytes, expected {PRSTATUS_X86_64_SIZE}",
                desc.len()
            ),
        )
    })?;
    let r = &st.regs;
    let sel = |name: &'static str, v: U64| {
        u16::try_from(v.get()).map_err(|_| {
            DumpError::bad_note(
                "NT_PRSTATUS",
                format!("{name} selector {:#x} does not fit 16 bits", v.get()),
            )
        })
    };
    let regs = Registers {
        rax: r.rax.get(),
        rbx: r.rbx.get(),
        rcx: r.rcx.get(),
        rdx: r.rdx.get(),
        rsi: r.rsi.get(),
        rdi: r.rdi.get(),
        rbp: r.rbp.get(),
        rsp: r.rsp.get(),
        r8: r.r8.get(),
        r9: r.r9.get(),
        r10: r.r10.get(),
        r11: r.r11.get(),
        r12: r.r12.get(),
        r13: r.r13.get(),
        r14: r.r14.get(),
        r15: r.r15.get(),
        rip: r.rip.get(),
        rflags: r.eflags.get(),
        cs: Segment {
            selector: sel("CS", r.cs)?,
            ..Segment::default()
        },
        ss: Segment {
            selector: sel("SS", r.ss)?,
            ..Segment::default()
        },
        ds: Segment {
            selector: sel("DS", r.ds)?,
            ..Segment::default()
        },
        es: Segment {
            selector: sel("ES", r.es)?,
            ..Segment::default()
        },
        fs: Segment {
            selector: sel("FS", r.fs)?,
            base: r.fs_base.get(),
            ..Segment::default()
        },
        gs: Segment {
            selector: sel("GS", r.gs)?,
            base: r.gs_base.get(),
            ..Segment::default()
        },
        ..Registers::default()
    };
    Ok((st.pid.get(), regs))
}

/// Decodes an i386 `NT_PRSTATUS` descriptor (32-bit registers, zero-extended).
pub fn parse_prstatus_i386(desc: &[u8]) -> Result<(u32, Registers)> {
    let (st, _) = PrStatus32::read_from_prefix(desc).map_err(|_| {
        DumpError::bad_note(
            "NT_PRSTATUS",
            format!(
                "i386 descriptor is {} bytes, expected {PRSTATUS_I386_SIZE}",
                desc.len()
            ),
        )
    })?;
    let r = &st.regs;
    let sel = |v: U16| Segment {
        selector: v.get(),
        ..Segment::default()
    };
    let regs = Registers {
        rax: r.eax.get().into(),
        rbx: r.ebx.get().into(),
        rcx: r.ecx.get().into(),
        rdx: r.edx.get().into(),
        rsi: r.esi.get().into(),
        rdi: r.edi.get().into(),
        rbp: r.ebp.get().into(),
        rsp: r.esp.get().into(),
        rip: r.eip.get().into(),
        rflags: r.eflags.get().into(),
        cs: sel(r.cs),
        ss: sel(r.ss),
        ds: sel(r.ds),
        es: sel(r.es),
        fs: sel(r.fs),
        gs: sel(r.gs),
        ..Registers::default()
    };
    Ok((st.pid.get(), regs))
}

/// Encodes an x86-64 `NT_PRSTATUS` descriptor with `pr_pid = pid`. `orig_rax` is written as 0,
/// as QEMU does.
pub fn encode_prstatus_x86_64(regs: &Registers, pid: u32) -> Vec<u8> {
    let st = PrStatus64 {
        pad1: [0; 32],
        pid: U32::new(pid),
        pad2: [0; 76],
        regs: UserRegs64 {
            r15: U64::new(regs.r15),
            r14: U64::new(regs.r14),
            r13: U64::new(regs.r13),
            r12: U64::new(regs.r12),
            rbp: U64::new(regs.rbp),
            rbx: U64::new(regs.rbx),
            r11: U64::new(regs.r11),
            r10: U64::new(regs.r10),
            r9: U64::new(regs.r9),
            r8: U64::new(regs.r8),
            rax: U64::new(regs.rax),
            rcx: U64::new(regs.rcx),
            rdx: U64::new(regs.rdx),
            rsi: U64::new(regs.rsi),
            rdi: U64::new(regs.rdi),
            orig_rax: U64::ZERO,
            rip: U64::new(regs.rip),
            cs: U64::new(regs.cs.selector.into()),
            eflags: U64::new(regs.rflags),
            rsp: U64::new(regs.rsp),
            ss: U64::new(regs.ss.selector.into()),
            fs_base: U64::new(regs.fs.base),
            gs_base: U64::new(regs.gs.base),
            ds: U64::new(regs.ds.selector.into()),
            es: U64::new(regs.es.selector.into()),
            fs: U64::new(regs.fs.selector.into()),
            gs: U64::new(regs.gs.selector.into()),
        },
        pad3: [0; 8],
    };
    st.as_bytes().to_vec()
}

/// One note as found in a note segment.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawNote<'a> {
    /// Name without its terminating NUL(s).
    pub name: &'a [u8],
    pub ntype: u32,
    pub desc: &'a [u8],
    /// File offset of the note header, for error messages.
    pub offset: u64,
}

fn align_up(value: usize, align: usize) -> Option<usize> {
    let mask = align.checked_sub(1)?;
    value.checked_add(mask).map(|v| v & !mask)
}

/// Splits a note segment into notes. `seg_off` is the segment's file offset (for messages) and
/// `align` 4 or 8. Every length is checked against the segment; a note that runs past it is an
/// error rather than silently dropped, because it means the file is damaged.
pub(crate) fn split_notes<'a>(
    seg: &'a [u8],
    seg_off: u64,
    align: usize,
    file: &str,
) -> Result<Vec<RawNote<'a>>> {
    const HDR: usize = std::mem::size_of::<Nhdr>();
    let mut notes = Vec::new();
    let mut pos = 0usize;
    let at = |pos: usize| seg_off.saturating_add(pos as u64);
    let bad = |pos: usize, msg: String| DumpError::malformed(file, "ELF note", at(pos), msg);
    while pos < seg.len() {
        let rest = seg.get(pos..).unwrap_or_default();
        let Ok((hdr, _)) = Nhdr::read_from_prefix(rest) else {
            // Some writers pad the segment with a few zero bytes; anything else is damage.
            if rest.iter().all(|&b| b == 0) {
                break;
            }
            return Err(bad(
                pos,
                format!("{} stray bytes at the end of the note segment", rest.len()),
            ));
        };
        let namesz = usize::try_from(hdr.namesz.get()).unwrap_or(usize::MAX);
        let descsz = usize::try_from(hdr.descsz.get()).unwrap_or(usize::MAX);
        let name_start = pos.checked_add(HDR);
        let name_end = name_start.and_then(|s| s.checked_add(namesz));
        let desc_start = name_end.and_then(|e| align_up(e, align));
        let desc_end = desc_start.and_then(|s| s.checked_add(descsz));
        let (Some(name_start), Some(name_end), Some(desc_start), Some(desc_end)) =
            (name_start, name_end, desc_start, desc_end)
        else {
            return Err(bad(
                pos,
                format!("note sizes overflow (namesz {namesz:#x}, descsz {descsz:#x})"),
            ));
        };
        let (Some(name), Some(desc)) =
            (seg.get(name_start..name_end), seg.get(desc_start..desc_end))
        else {
            return Err(bad(
                pos,
                format!(
                    "note (namesz {namesz:#x}, descsz {descsz:#x}) runs past the end of its \
                     {:#x}-byte segment",
                    seg.len()
                ),
            ));
        };
        let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        notes.push(RawNote {
            name: name.get(..name_len).unwrap_or_default(),
            ntype: hdr.ntype.get(),
            desc,
            offset: at(pos),
        });
        // The last note's padding may be missing; treat "ends within padding" as the end.
        pos = match align_up(desc_end, align) {
            Some(next) => next,
            None => break,
        };
    }
    Ok(notes)
}

/// Builds [`CoreNotes`] from the notes of a core whose `e_machine` is `machine`.
pub(crate) fn interpret_notes(
    notes: &[RawNote<'_>],
    machine: u16,
    file: &str,
) -> Result<CoreNotes> {
    let mut prstatus: Vec<(u32, Registers)> = Vec::new();
    let mut qemu: Vec<Option<Registers>> = Vec::new();
    let mut out = CoreNotes::default();
    let note_err = |note: &RawNote<'_>, e: DumpError| {
        DumpError::malformed(file, "ELF note", note.offset, e.to_string())
    };
    for note in notes {
        match (note.name, note.ntype) {
            (b"CORE", NT_PRSTATUS) => {
                let parsed = if machine == EM_386 {
                    parse_prstatus_i386(note.desc)
                } else {
                    parse_prstatus_x86_64(note.desc)
                };
                prstatus.push(parsed.map_err(|e| note_err(note, e))?);
            }
            (b"QEMU", 0) => match parse_qemu_cpu_state(note.desc) {
                Ok(regs) => qemu.push(Some(regs)),
                // A future QEMU may bump the version; the PRSTATUS notes still give the GPRs.
                Err(e) => {
                    out.warnings.push(format!(
                        "ignoring QEMU note at offset {:#x}: {e}",
                        note.offset
                    ));
                    qemu.push(None);
                }
            },
            (b"VMCOREINFO", _) => {
                let text = String::from_utf8_lossy(note.desc);
                let text = text.trim_end_matches('\0').to_owned();
                if out.vmcoreinfo.replace(text).is_some() {
                    out.warnings.push(format!(
                        "more than one VMCOREINFO note; using the one at offset {:#x}",
                        note.offset
                    ));
                }
            }
            _ => {}
        }
        if prstatus.len() > MAX_VCPUS || qemu.len() > MAX_VCPUS {
            return Err(DumpError::malformed(
                file,
                "ELF note",
                note.offset,
                format!("more than {MAX_VCPUS} vCPU notes"),
            ));
        }
    }

    // QEMU writes every vCPU's PRSTATUS, then every vCPU's QEMU note, both in vCPU order, so
    // position pairs them; the QEMU note carries no vCPU number of its own.
    if !prstatus.is_empty() && !qemu.is_empty() && prstatus.len() != qemu.len() {
        out.warnings.push(format!(
            "{} NT_PRSTATUS notes but {} QEMU notes; pairing them by position",
            prstatus.len(),
            qemu.len()
        ));
    }
    let count = prstatus.len().max(qemu.len());
    for index in 0..count {
        let pr = prstatus.get(index);
        let full = qemu.get(index).and_then(Option::as_ref);
        if let Some((pid, _)) = pr {
            if usize::try_from(*pid).ok() != index.checked_add(1) {
                out.warnings.push(format!(
                    "NT_PRSTATUS #{index} has pr_pid {pid}, expected {} (vCPU index + 1)",
                    index.saturating_add(1)
                ));
            }
        }
        let (mut regs, source) = match (full, pr) {
            (Some(full), Some((_, pr))) => {
                let diff = gpr_differences(full, pr, machine == EM_386);
                if !diff.is_empty() {
                    out.warnings.push(format!(
                        "vCPU {index}: NT_PRSTATUS and QEMU note disagree on {}; using the QEMU \
                         note",
                        diff.join(", ")
                    ));
                }
                (full.clone(), RegisterSource::QemuNote)
            }
            (Some(full), None) => (full.clone(), RegisterSource::QemuNote),
            (None, Some((_, pr))) => (pr.clone(), RegisterSource::PrStatusOnly),
            (None, None) => {
                // Only reachable when a QEMU note was unusable and there is no PRSTATUS for it.
                out.warnings.push(format!(
                    "vCPU {index}: no usable register note; registers are zero"
                ));
                (Registers::default(), RegisterSource::PrStatusOnly)
            }
        };
        regs.vcpu = index;
        out.vcpus.push(regs);
        out.sources.push(source);
    }
    Ok(out)
}

/// Names of the registers both notes record that differ. An i386 PRSTATUS holds only the low
/// halves of the legacy registers and no FS/GS bases, so only those are compared for it.
fn gpr_differences(full: &Registers, pr: &Registers, i386: bool) -> Vec<&'static str> {
    let mask = if i386 { u64::from(u32::MAX) } else { u64::MAX };
    let legacy: [(&'static str, u64, u64); 10] = [
        ("rax", full.rax, pr.rax),
        ("rbx", full.rbx, pr.rbx),
        ("rcx", full.rcx, pr.rcx),
        ("rdx", full.rdx, pr.rdx),
        ("rsi", full.rsi, pr.rsi),
        ("rdi", full.rdi, pr.rdi),
        ("rbp", full.rbp, pr.rbp),
        ("rsp", full.rsp, pr.rsp),
        ("rip", full.rip, pr.rip),
        ("rflags", full.rflags, pr.rflags),
    ];
    let selectors: [(&'static str, u16, u16); 6] = [
        ("cs", full.cs.selector, pr.cs.selector),
        ("ss", full.ss.selector, pr.ss.selector),
        ("ds", full.ds.selector, pr.ds.selector),
        ("es", full.es.selector, pr.es.selector),
        ("fs", full.fs.selector, pr.fs.selector),
        ("gs", full.gs.selector, pr.gs.selector),
    ];
    let long_only: [(&'static str, u64, u64); 10] = [
        ("r8", full.r8, pr.r8),
        ("r9", full.r9, pr.r9),
        ("r10", full.r10, pr.r10),
        ("r11", full.r11, pr.r11),
        ("r12", full.r12, pr.r12),
        ("r13", full.r13, pr.r13),
        ("r14", full.r14, pr.r14),
        ("r15", full.r15, pr.r15),
        ("fs_base", full.fs.base, pr.fs.base),
        ("gs_base", full.gs.base, pr.gs.base),
    ];
    let mut names: Vec<&'static str> = legacy
        .iter()
        .filter(|(_, a, b)| a & mask != b & mask)
        .map(|(n, _, _)| *n)
        .collect();
    names.extend(
        selectors
            .iter()
            .filter(|(_, a, b)| a != b)
            .map(|(n, _, _)| *n),
    );
    if !i386 {
        names.extend(
            long_only
                .iter()
                .filter(|(_, a, b)| a != b)
                .map(|(n, _, _)| *n),
        );
    }
    names
}

/// Appends one note (header, NUL-terminated name, descriptor, 4-byte padding) to `out`.
pub(crate) fn push_note(out: &mut Vec<u8>, name: &str, ntype: u32, desc: &[u8]) -> Result<()> {
    let too_big = || DumpError::Unrepresentable(format!("{name} note of {} bytes", desc.len()));
    let namesz = name.len().checked_add(1).ok_or_else(too_big)?;
    let hdr = Nhdr {
        namesz: U32::new(u32::try_from(namesz).map_err(|_| too_big())?),
        descsz: U32::new(u32::try_from(desc.len()).map_err(|_| too_big())?),
        ntype: U32::new(ntype),
    };
    out.extend_from_slice(hdr.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad_to(out, 4);
    out.extend_from_slice(desc);
    pad_to(out, 4);
    Ok(())
}

fn pad_to(out: &mut Vec<u8>, align: usize) {
    while out.len() % align != 0 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::sample_regs;

    #[test]
    fn qemu_state_round_trips_with_and_without_kernel_gs_base() {
        let regs = sample_regs(0);
        let desc = encode_qemu_cpu_state(&regs);
        assert_eq!(desc.len(), QEMU_CPU_STATE_SIZE_WITH_KGS);
        assert_eq!(&desc[4..8], &440u32.to_le_bytes());
        assert_eq!(parse_qemu_cpu_state(&desc).unwrap(), regs);

        let mut old = regs.clone();
        old.kernel_gs_base = None;
        let desc = encode_qemu_cpu_state(&old);
        assert_eq!(desc.len(), QEMU_CPU_STATE_BASE_SIZE);
        assert_eq!(parse_qemu_cpu_state(&desc).unwrap(), old);
    }

    #[test]
    fn qemu_state_layout_matches_qemu_offsets() {
        let regs = sample_regs(3);
        let desc = encode_qemu_cpu_state(&regs);
        let u64_at = |off: usize| u64::from_le_bytes(desc[off..off + 8].try_into().unwrap());
        assert_eq!(u64_at(8), regs.rax);
        assert_eq!(u64_at(8 + 6 * 8), regs.rsp);
        assert_eq!(u64_at(8 + 16 * 8), regs.rip);
        // cs at 152: selector, limit, flags, pad, base.
        assert_eq!(&desc[152..156], &0x10u32.to_le_bytes());
        assert_eq!(&desc[160..164], &0x00a0_9b00u32.to_le_bytes());
        // gdt is the 9th segment (index 8): 152 + 8 * 24 = 344; limit at +4, base at +16.
        assert_eq!(&desc[348..352], &0x7fu32.to_le_bytes());
        assert_eq!(u64_at(360), regs.gdtr.base);
        // cr[] starts at 152 + 240 = 392; cr3 is the 4th.
        assert_eq!(u64_at(392 + 3 * 8), regs.cr3);
        assert_eq!(u64_at(432), regs.kernel_gs_base.unwrap());
    }

    #[test]
    fn qemu_state_rejects_bad_version_size_and_short_input() {
        let regs = sample_regs(0);
        let good = encode_qemu_cpu_state(&regs);
        assert!(parse_qemu_cpu_state(&good[..100]).is_err());
        let mut v2 = good.clone();
        v2[0] = 2;
        assert!(parse_qemu_cpu_state(&v2).is_err());
        let mut big = good.clone();
        big[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(parse_qemu_cpu_state(&big).is_err());
        let mut small = good;
        small[4..8].copy_from_slice(&8u32.to_le_bytes());
        assert!(parse_qemu_cpu_state(&small).is_err());
    }

    #[test]
    fn prstatus_round_trips_and_puts_regs_at_112() {
        let regs = sample_regs(1);
        let desc = encode_prstatus_x86_64(&regs, 2);
        assert_eq!(desc.len(), PRSTATUS_X86_64_SIZE);
        assert_eq!(&desc[32..36], &2u32.to_le_bytes());
        assert_eq!(&desc[112..120], &regs.r15.to_le_bytes());
        assert_eq!(&desc[112 + 16 * 8..112 + 17 * 8], &regs.rip.to_le_bytes());
        let (pid, back) = parse_prstatus_x86_64(&desc).unwrap();
        assert_eq!(pid, 2);
        assert_eq!(back.rip, regs.rip);
        assert_eq!(back.gs.base, regs.gs.base);
        assert!(gpr_differences(&regs, &back, false).is_empty());
        assert_eq!(back.cr3, 0);
    }

    #[test]
    fn i386_prstatus_is_decoded() {
        let mut desc = vec![0u8; PRSTATUS_I386_SIZE];
        desc[24..28].copy_from_slice(&1u32.to_le_bytes());
        desc[72 + 24..72 + 28].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // eax
        desc[72 + 48..72 + 52].copy_from_slice(&0xfff0u32.to_le_bytes()); // eip
        desc[72 + 52..72 + 54].copy_from_slice(&0xf000u16.to_le_bytes()); // cs
        let (pid, regs) = parse_prstatus_i386(&desc).unwrap();
        assert_eq!(
            (pid, regs.rax, regs.rip, regs.cs.selector),
            (1, 0xdead_beef, 0xfff0, 0xf000)
        );
    }

    #[test]
    fn note_splitting_checks_bounds() {
        let mut seg = Vec::new();
        push_note(&mut seg, "CORE", 1, &[1, 2, 3]).unwrap();
        push_note(&mut seg, "VMCOREINFO", 0, b"OSRELEASE=6.1\n").unwrap();
        let notes = split_notes(&seg, 0x100, 4, "t").unwrap();
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[0].name, b"CORE");
        assert_eq!(notes[0].desc, &[1, 2, 3]);
        assert_eq!(notes[1].offset, 0x100 + 24);
        for cut in 1..seg.len() {
            // Cutting inside the zero padding after the last descriptor is harmless.
            let _ = split_notes(&seg[..cut], 0, 4, "t");
        }
        assert!(split_notes(&seg[..seg.len() - 8], 0, 4, "t").is_err());
        let mut huge = seg.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(split_notes(&huge, 0, 4, "t").is_err());
    }

    #[test]
    fn vmcoreinfo_map_parses_lines() {
        let map = parse_vmcoreinfo(
            "OSRELEASE=6.1.0\nPAGESIZE=4096\nbogus\nSYMBOL(swapper_pg_dir)=ffffffff82a0a000\n",
        );
        assert_eq!(map.get("PAGESIZE").map(String::as_str), Some("4096"));
        assert_eq!(
            map.get("SYMBOL(swapper_pg_dir)").map(String::as_str),
            Some("ffffffff82a0a000")
        );
        assert_eq!(map.len(), 3);
    }
}
