//! ELF core writer producing the same layout as QEMU's `dump-guest-memory` without paging, so
//! that crash, drgn, volatility and our own reader accept it.

use crate::elf::{Ehdr64, Phdr64, ELF_MAGIC, ET_CORE, PN_XNUM, PT_LOAD, PT_NOTE};
use crate::error::{DumpError, Result};
use crate::notes::{
    encode_prstatus_x86_64, encode_qemu_cpu_state, push_note, EM_X86_64, NT_PRSTATUS,
    QEMU_NOTE_NAME, VMCOREINFO_NOTE_NAME,
};
use kvmaccess_core::{Gpa, PhysRange, PhysicalMemory, Registers};
use std::io::{BufWriter, Write};
use std::path::Path;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

/// Guest memory is copied through a buffer of this size: big enough that per-call overhead of a
/// live backend vanishes, small enough to report progress several times a second.
const CHUNK: usize = 1 << 20;
/// Memory segments start on page boundaries so the file can be mapped page by page.
const SEGMENT_ALIGN: u64 = 4096;
/// Zero bytes used to pad up to the next segment (never more than one alignment unit).
const PAD: [u8; 4096] = [0; 4096];

fn align_up(value: u64, align: u64) -> Option<u64> {
    value.checked_add(align - 1).map(|v| v / align * align)
}

/// Builds every byte that precedes the first memory segment, and returns it with the file offset
/// of each segment.
fn build_headers(
    ranges: &[PhysRange],
    vcpus: &[Registers],
    vmcoreinfo: Option<&str>,
) -> Result<(Vec<u8>, Vec<u64>)> {
    let mut prev_end = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        if r.end.0 < r.start.0 || (i > 0 && r.start.0 < prev_end) {
            return Err(DumpError::Unrepresentable(format!(
                "memory ranges are not sorted and disjoint at range {i} ({:#x}..{:#x})",
                r.start.0, r.end.0
            )));
        }
        prev_end = r.end.0;
    }
    let loads: Vec<&PhysRange> = ranges.iter().filter(|r| !r.is_empty()).collect();
    let phnum = loads.len().saturating_add(1);
    let phnum16 = u16::try_from(phnum)
        .ok()
        .filter(|&n| n < PN_XNUM)
        .ok_or_else(|| {
            DumpError::Unrepresentable(format!(
                "{} memory ranges; at most {} fit without extended numbering",
                loads.len(),
                PN_XNUM - 2
            ))
        })?;

    let mut notes = Vec::new();
    for (i, regs) in vcpus.iter().enumerate() {
        let pid = i
            .checked_add(1)
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| DumpError::Unrepresentable(format!("{} vCPUs", vcpus.len())))?;
        push_note(
            &mut notes,
            "CORE",
            NT_PRSTATUS,
            &encode_prstatus_x86_64(regs, pid),
        )?;
    }
    // QEMU writes all PRSTATUS notes first, then all QEMU notes; readers pair them by position.
    for regs in vcpus {
        push_note(&mut notes, QEMU_NOTE_NAME, 0, &encode_qemu_cpu_state(regs))?;
    }
    if let Some(text) = vmcoreinfo {
        push_note(&mut notes, VMCOREINFO_NOTE_NAME, 0, text.as_bytes())?;
    }

    let ehsize = size_of::<Ehdr64>() as u64;
    let phentsize = size_of::<Phdr64>() as u64;
    let note_off = (phnum as u64)
        .checked_mul(phentsize)
        .and_then(|t| t.checked_add(ehsize));
    let notes_len = notes.len() as u64;
    let mut cursor = note_off
        .and_then(|o| o.checked_add(notes_len))
        .and_then(|end| align_up(end, SEGMENT_ALIGN))
        .ok_or_else(|| DumpError::Unrepresentable("headers overflow".into()))?;
    let note_off = note_off.unwrap_or_default();
    let mut offsets = Vec::with_capacity(loads.len());
    for r in &loads {
        offsets.push(cursor);
        cursor = cursor
            .checked_add(r.len())
            .and_then(|end| align_up(end, SEGMENT_ALIGN))
            .ok_or_else(|| DumpError::Unrepresentable("file would exceed 2^64 bytes".into()))?;
    }

    let mut ident = [0u8; 16];
    ident[..4].copy_from_slice(ELF_MAGIC);
    ident[4] = 2; // ELFCLASS64
    ident[5] = 1; // ELFDATA2LSB
    ident[6] = 1; // EV_CURRENT
    let ehdr = Ehdr64 {
        ident,
        etype: U16::new(ET_CORE),
        machine: U16::new(EM_X86_64),
        version: U32::new(1),
        entry: U64::ZERO,
        phoff: U64::new(ehsize),
        shoff: U64::ZERO,
        flags: U32::ZERO,
        ehsize: U16::new(64),
        phentsize: U16::new(56),
        phnum: U16::new(phnum16),
        shentsize: U16::ZERO,
        shnum: U16::ZERO,
        shstrndx: U16::ZERO,
    };
    let mut out = Vec::with_capacity(usize::try_from(note_off).unwrap_or(0) + notes.len());
    out.extend_from_slice(ehdr.as_bytes());
    let note_phdr = Phdr64 {
        ptype: U32::new(PT_NOTE),
        flags: U32::ZERO,
        offset: U64::new(note_off),
        vaddr: U64::ZERO,
        paddr: U64::ZERO,
        filesz: U64::new(notes_len),
        memsz: U64::new(notes_len),
        align: U64::ZERO,
    };
    out.extend_from_slice(note_phdr.as_bytes());
    for (r, off) in loads.iter().zip(&offsets) {
        // QEMU (since 4.0) sets p_vaddr to p_paddr when it has no virtual address, so that gdb
        // does not stack every segment at virtual address 0.
        let phdr = Phdr64 {
            ptype: U32::new(PT_LOAD),
            flags: U32::ZERO,
            offset: U64::new(*off),
            vaddr: U64::new(r.start.0),
            paddr: U64::new(r.start.0),
            filesz: U64::new(r.len()),
            memsz: U64::new(r.len()),
            align: U64::ZERO,
        };
        out.extend_from_slice(phdr.as_bytes());
    }
    out.extend_from_slice(&notes);
    Ok((out, offsets))
}

/// Writes an ELF64 x86-64 core of `mem` and `vcpus` to `out`, laid out as QEMU's
/// `dump-guest-memory` (paging=false) does: one `PT_NOTE` holding, per vCPU, a `CORE`
/// `NT_PRSTATUS` (`pr_pid` = index + 1) and a version-1 `QEMU` CPU-state note, then `VMCOREINFO`
/// if given; then one page-aligned `PT_LOAD` per RAM range with `p_paddr = p_vaddr` = its
/// guest-physical address.
///
/// Memory is copied in 1 MiB chunks; `progress(done, total)` is called with byte counts before
/// the first chunk and after each one. Returns the number of bytes written. A read failure aborts
/// the dump (the output is then incomplete: use [`write_elf_core_to_path`] to never leave a
/// partial file behind).
pub fn write_elf_core<W: Write + ?Sized>(
    out: &mut W,
    mem: &dyn PhysicalMemory,
    vcpus: &[Registers],
    vmcoreinfo: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    write_core_inner(out, "<stream>", mem, vcpus, vmcoreinfo, progress)
}

fn write_core_inner<W: Write + ?Sized>(
    out: &mut W,
    target: &str,
    mem: &dyn PhysicalMemory,
    vcpus: &[Registers],
    vmcoreinfo: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let ranges: Vec<PhysRange> = mem.ranges().to_vec();
    let (headers, offsets) = build_headers(&ranges, vcpus, vmcoreinfo)?;
    let io_err = |context: String| {
        let target = target.to_owned();
        move |source| DumpError::Write {
            target,
            context,
            source,
        }
    };
    out.write_all(&headers)
        .map_err(io_err("ELF headers and notes".into()))?;
    let mut written = headers.len() as u64;

    let total = ranges
        .iter()
        .map(PhysRange::len)
        .fold(0u64, u64::saturating_add);
    let mut done = 0u64;
    progress(done, total);
    let mut buf = vec![0u8; CHUNK];
    let loads = ranges.iter().filter(|r| !r.is_empty());
    for (range, &offset) in loads.zip(&offsets) {
        let pad = offset.saturating_sub(written);
        let pad_len = usize::try_from(pad).unwrap_or(usize::MAX).min(PAD.len());
        out.write_all(PAD.get(..pad_len).unwrap_or_default())
            .map_err(io_err(format!(
                "padding before segment at {:#x}",
                range.start.0
            )))?;
        written = written.saturating_add(pad_len as u64);

        // RAM the guest never touched is written as zeros without reading it: a read through a
        // shared mapping would make the host allocate it.
        let data = mem.data_ranges(*range);
        let mut gpa = range.start.0;
        while gpa < range.end.0 {
            let mut n = usize::try_from(range.end.0 - gpa).map_or(CHUNK, |left| left.min(CHUNK));
            let next_data = data.iter().find(|d| d.end.0 > gpa);
            let in_hole = match next_data {
                Some(d) if d.start.0 <= gpa => {
                    n = usize::try_from(d.end.0 - gpa).map_or(n, |left| left.min(n));
                    false
                }
                Some(d) => {
                    n = usize::try_from(d.start.0 - gpa).map_or(n, |left| left.min(n));
                    true
                }
                None => true,
            };
            let chunk = buf.get_mut(..n).unwrap_or_default();
            if in_hole {
                chunk.fill(0);
            } else {
                mem.read_phys(Gpa(gpa), chunk).map_err(DumpError::Source)?;
            }
            out.write_all(chunk)
                .map_err(io_err(format!("guest memory at {gpa:#x}")))?;
            gpa = gpa.saturating_add(n as u64);
            written = written.saturating_add(n as u64);
            done = done.saturating_add(n as u64);
            progress(done, total);
        }
    }
    out.flush().map_err(io_err("flush".into()))?;
    Ok(written)
}

/// Writes a core to `path` via a temporary file in the same directory, renamed into place only
/// once complete and synced, so a failed or interrupted dump never leaves a partial file under
/// the user's name. Refuses to replace an existing file unless `overwrite` is set. The file is
/// created readable by its owner only, since it holds all of the guest's secrets.
pub fn write_elf_core_to_path(
    path: impl AsRef<Path>,
    overwrite: bool,
    mem: &dyn PhysicalMemory,
    vcpus: &[Registers],
    vmcoreinfo: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let path = path.as_ref();
    let target = path.display().to_string();
    // Checked up front so that a user does not wait for a many-GiB dump only to be refused;
    // the no-clobber rename at the end closes the race with anyone creating it meanwhile.
    if !overwrite && path.symlink_metadata().is_ok() {
        return Err(DumpError::DestinationExists {
            path: path.to_path_buf(),
        });
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let prefix = format!(
        ".{}.",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "core".into())
    );
    let io = |context: &str| {
        let target = target.clone();
        let context = context.to_owned();
        move |source| DumpError::Write {
            target,
            context,
            source,
        }
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(io("creating a temporary file beside it"))?;
    let written = {
        let mut buffered = BufWriter::with_capacity(CHUNK, tmp.as_file_mut());
        write_core_inner(&mut buffered, &target, mem, vcpus, vmcoreinfo, progress)?
    };
    tmp.as_file()
        .sync_all()
        .map_err(io("syncing the temporary file"))?;
    let persisted = if overwrite {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    persisted.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            DumpError::DestinationExists {
                path: path.to_path_buf(),
            }
        } else {
            DumpError::Write {
                target: target.clone(),
                context: "renaming the finished dump into place".into(),
                source: e.error,
            }
        }
    })?;
    Ok(written)
}
