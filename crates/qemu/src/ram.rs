//! Guest RAM access: a read-only mapping of QEMU's shared RAM file, or `/proc/PID/mem`.

use crate::error::{Error, Result};
use kvmaccess_core::{Gpa, PhysRange};
use memmap2::{MmapOptions, MmapRaw};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

/// How a span of guest-physical memory is reached.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// Through `files[index]`, at this offset in the file for the span's first byte.
    File { index: usize, offset: u64 },
    /// Through `/proc/PID/mem` at this host virtual address for the span's first byte.
    ProcMem { hva: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    via: Via,
}

/// A RAM file of QEMU's, mapped into our address space.
#[derive(Debug)]
pub(crate) struct MappedFile {
    path: PathBuf,
    file: File,
    ro: MmapRaw,
    /// Created on the first write, so that a read-only attachment never holds a writable mapping.
    rw: OnceLock<MmapRaw>,
    writable: bool,
}

impl MappedFile {
    /// Map `file` (opened read-write only when `writable`) whole and read-only.
    pub(crate) fn open(path: PathBuf, file: File, writable: bool) -> Result<Self> {
        let ro = MmapOptions::new()
            .map_raw_read_only(&file)
            .map_err(|e| Error::io(format!("mapping guest RAM file {}", path.display()), e))?;
        Ok(Self {
            path,
            file,
            ro,
            rw: OnceLock::new(),
            writable,
        })
    }

    fn len(&self) -> u64 {
        u64::try_from(self.ro.len()).unwrap_or(u64::MAX)
    }

    /// The data extents of the file within `start..end`, by SEEK_DATA/SEEK_HOLE. A file system
    /// that cannot answer gets the whole range back (a safe over-approximation).
    fn data_extents(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let seek = |from: u64, whence: libc::c_int| -> Option<u64> {
            let from = libc::off_t::try_from(from).ok()?;
            // SAFETY: lseek only reads the descriptor's state; `fd` belongs to `self.file`,
            // which is open for as long as `self` lives. It moves the file offset, which
            // nothing else uses: every read and write of this file is positional (pread/pwrite
            // or the mapping).
            let at = unsafe { libc::lseek(fd, from, whence) };
            u64::try_from(at).ok()
        };
        let mut extents = Vec::new();
        let mut at = start;
        // Each round either ends or moves `at` forward by at least one byte past a hole, so the
        // number of rounds is bounded by the number of extents, itself bounded by the file
        // system; the explicit cap keeps a pathological file from costing unbounded syscalls.
        for _ in 0..1_000_000 {
            if at >= end {
                return extents;
            }
            let Some(data) = seek(at, libc::SEEK_DATA) else {
                // ENXIO: no data after `at`. Any other error: we cannot tell, so say "data".
                let no_more = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
                if !no_more {
                    extents.push((at, end));
                }
                return extents;
            };
            if data >= end {
                return extents;
            }
            let hole = seek(data, libc::SEEK_HOLE).unwrap_or(end).min(end);
            if hole <= data {
                extents.push((data, end));
                return extents;
            }
            extents.push((data, hole));
            at = hole;
        }
        extents.push((at, end));
        extents
    }

    fn rw(&self) -> Result<&MmapRaw> {
        if !self.writable {
            return Err(Error::WriteNotAllowed);
        }
        if let Some(m) = self.rw.get() {
            return Ok(m);
        }
        let m = MmapOptions::new().map_raw(&self.file).map_err(|e| {
            Error::io(
                format!("mapping guest RAM file {} writable", self.path.display()),
                e,
            )
        })?;
        // Another thread may have won the race; its mapping is equivalent, ours is dropped.
        Ok(self.rw.get_or_init(|| m))
    }
}

/// Where guest RAM comes from, for messages and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamSource {
    /// A shared RAM file mapped into this process; reads are memory copies.
    SharedFile {
        /// The file: the backend's `mem-path`, or `/proc/PID/fd/N` for a memfd.
        path: PathBuf,
    },
    /// The QEMU process's memory through `/proc/PID/mem`.
    ProcMem {
        /// QEMU's PID.
        pid: u32,
    },
}

/// Guest-physical memory of a live QEMU guest.
#[derive(Debug)]
pub(crate) struct GuestRam {
    ranges: Vec<PhysRange>,
    spans: Vec<Span>,
    files: Vec<MappedFile>,
    proc_mem: Option<(u32, File)>,
}

/// One RAM range and how to reach it, as the attach logic found it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SpanSource {
    File { index: usize, offset: u64 },
    ProcMem { hva: u64 },
}

impl GuestRam {
    /// Build from (start, end, source) triples sorted by address. Every file span must lie
    /// inside its file: touching a mapped page past the end of a file raises SIGBUS.
    pub(crate) fn new(
        spans: Vec<(u64, u64, SpanSource)>,
        files: Vec<MappedFile>,
        proc_mem: Option<(u32, File)>,
    ) -> Result<Self> {
        let mut out = Vec::with_capacity(spans.len());
        for (start, end, src) in spans {
            let len = end.checked_sub(start).ok_or_else(|| {
                Error::protocol("RAM layout", format!("inverted range {start:#x}-{end:#x}"))
            })?;
            let via = match src {
                SpanSource::File { index, offset } => {
                    let f = files.get(index).ok_or_else(|| {
                        Error::protocol("RAM layout", "span names a missing file")
                    })?;
                    let fits = offset.checked_add(len).is_some_and(|e| e <= f.len());
                    if !fits {
                        return Err(Error::protocol(
                            "RAM layout",
                            format!(
                                "guest RAM {start:#x}-{end:#x} needs {} bytes at offset {offset:#x} \
                                 of {}, which has only {} bytes",
                                len,
                                f.path.display(),
                                f.len()
                            ),
                        ));
                    }
                    // The copy loop adds span offsets to the mapping's base pointer as usize.
                    usize::try_from(offset.saturating_add(len)).map_err(|_| {
                        Error::protocol("RAM layout", "RAM file larger than the address space")
                    })?;
                    Via::File { index, offset }
                }
                SpanSource::ProcMem { hva } => {
                    if hva.checked_add(len).is_none() {
                        return Err(Error::protocol("RAM layout", "host address overflow"));
                    }
                    if proc_mem.is_none() {
                        return Err(Error::protocol(
                            "RAM layout",
                            "span needs /proc/PID/mem, which is not open",
                        ));
                    }
                    Via::ProcMem { hva }
                }
            };
            if let Some(prev) = out.last() {
                let prev: &Span = prev;
                if prev.end > start {
                    return Err(Error::protocol(
                        "RAM layout",
                        format!("overlapping RAM ranges at {start:#x}"),
                    ));
                }
            }
            out.push(Span { start, end, via });
        }
        let ranges = out
            .iter()
            .map(|s| PhysRange {
                start: Gpa(s.start),
                end: Gpa(s.end),
            })
            .collect();
        Ok(Self {
            ranges,
            spans: out,
            files,
            proc_mem,
        })
    }

    pub(crate) fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }

    pub(crate) fn source(&self) -> RamSource {
        match (self.files.first(), &self.proc_mem) {
            (Some(f), _) => RamSource::SharedFile {
                path: f.path.clone(),
            },
            (None, Some((pid, _))) => RamSource::ProcMem { pid: *pid },
            (None, None) => RamSource::ProcMem { pid: 0 },
        }
    }

    /// The parts of `within` that QEMU's RAM file has data for (SEEK_DATA/SEEK_HOLE); spans
    /// read through /proc/PID/mem are returned whole.
    pub(crate) fn data_ranges(&self, within: PhysRange) -> Vec<PhysRange> {
        let mut out: Vec<PhysRange> = Vec::new();
        for span in &self.spans {
            let start = span.start.max(within.start.0);
            let end = span.end.min(within.end.0);
            if start >= end {
                continue;
            }
            let pieces = match span.via {
                Via::File { index, offset } => match self.files.get(index) {
                    Some(file) => {
                        // `start >= span.start`, so the offsets below cannot underflow.
                        let file_start = offset.saturating_add(start - span.start);
                        let file_end = offset.saturating_add(end - span.start);
                        file.data_extents(file_start, file_end)
                            .into_iter()
                            .map(|(a, b)| (a - offset + span.start, b - offset + span.start))
                            .collect()
                    }
                    None => vec![(start, end)],
                },
                Via::ProcMem { .. } => vec![(start, end)],
            };
            for (a, b) in pieces {
                match out.last_mut() {
                    Some(last) if last.end.0 == a => last.end = Gpa(b),
                    _ => out.push(PhysRange {
                        start: Gpa(a),
                        end: Gpa(b),
                    }),
                }
            }
        }
        out
    }

    #[inline]
    fn span_at(&self, addr: u64) -> Option<&Span> {
        // A handful of spans at most (below/above the PCI hole, NUMA nodes): a scan beats a
        // binary search here.
        self.spans.iter().find(|s| addr >= s.start && addr < s.end)
    }

    /// The stretches of `gpa..gpa + len`, one per span it crosses, in order; an address
    /// without RAM ends the walk with an error naming it.
    #[inline]
    fn pieces(
        &self,
        gpa: Gpa,
        len: usize,
    ) -> impl Iterator<Item = Result<Piece<'_>, kvmaccess_core::Error>> + '_ {
        let mut addr = gpa.0;
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let unmapped = |addr| kvmaccess_core::Error::PhysUnmapped { gpa: Gpa(addr) };
            let Some(span) = self.span_at(addr) else {
                done = len;
                return Some(Err(unmapped(addr)));
            };
            let want = len - done;
            // `addr < span.end`, so the subtraction cannot underflow.
            let n = usize::try_from(span.end - addr).map_or(want, |avail| avail.min(want));
            let rel = addr - span.start;
            let backing = match span.via {
                Via::File { index, offset } => self.files.get(index).and_then(|file| {
                    // `new` checked offset + span length <= mapping length and that it fits usize.
                    let at = usize::try_from(offset + rel).ok()?;
                    Some(Backing::Mapped { file, at })
                }),
                Via::ProcMem { hva } => self.proc_mem.as_ref().map(|(pid, mem)| Backing::ProcMem {
                    pid: *pid,
                    mem,
                    pos: hva + rel,
                }),
            };
            let Some(backing) = backing else {
                done = len;
                return Some(Err(unmapped(addr)));
            };
            let piece = Piece {
                addr,
                range: done..done + n,
                backing,
            };
            done += n;
            addr += n as u64;
            Some(Ok(piece))
        })
    }

    /// Copy guest memory at `gpa` into `buf`, crossing span boundaries where RAM continues.
    #[inline]
    pub(crate) fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), kvmaccess_core::Error> {
        for piece in self.pieces(gpa, buf.len()) {
            let piece = piece?;
            let dst = &mut buf[piece.range.clone()];
            match piece.backing {
                Backing::Mapped { file, at } => {
                    // SAFETY: `at + dst.len() <= offset + span length <= mapping length`
                    // (checked in `new`; a piece never runs past its span), so the source lies
                    // inside the live mapping that `self.files` keeps alive, and `dst` is a
                    // distinct buffer of exactly that length. The guest (QEMU) may write these
                    // bytes concurrently: we never form a Rust reference to the mapping, only
                    // copy out of it through a raw pointer, so the compiler cannot assume the
                    // bytes are immutable or cache them across calls. A concurrent write can
                    // tear a value, exactly as it could for a CPU reading guest memory without
                    // pausing the guest; callers pause the guest when they need consistency.
                    // Every bit pattern is a valid `u8`, and the file cannot shrink under us
                    // while QEMU holds it as guest RAM.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            file.ro.as_ptr().add(at),
                            dst.as_mut_ptr(),
                            dst.len(),
                        );
                    }
                }
                Backing::ProcMem { pid, mem, pos } => {
                    mem.read_exact_at(dst, pos)
                        .map_err(|e| proc_mem_error(pid, e, piece.addr))?;
                }
            }
        }
        Ok(())
    }

    /// Fails, naming the first missing address, unless all of `gpa..gpa + len` is RAM.
    fn check_backed(&self, gpa: Gpa, len: usize) -> Result<(), kvmaccess_core::Error> {
        self.pieces(gpa, len).try_for_each(|piece| piece.map(drop))
    }

    /// Whether guest memory at `gpa` holds `expected`, compared where it is mapped (no copy);
    /// RAM read through `/proc/PID/mem` is copied a page at a time.
    pub(crate) fn equals(&self, gpa: Gpa, expected: &[u8]) -> Result<bool, kvmaccess_core::Error> {
        // A range running into a hole is an error, as for a read, even when a difference
        // before the hole would settle the answer.
        self.check_backed(gpa, expected.len())?;
        for piece in self.pieces(gpa, expected.len()) {
            let piece = piece?;
            let expected_here = &expected[piece.range.clone()];
            let equal = match piece.backing {
                Backing::Mapped { file, at } => {
                    // SAFETY: the bounds are those of `read` (the piece lies inside the live
                    // mapping `self.files` keeps alive) and `expected_here` is a buffer of the
                    // piece's length. The guest may write the mapped bytes concurrently; as in
                    // `read`, no Rust reference to the mapping is formed: memcmp reads it through
                    // a raw pointer, and a concurrent write can only make the answer describe
                    // one moment or the next, which callers that find a difference re-read
                    // anyway.
                    let order = unsafe {
                        libc::memcmp(
                            file.ro.as_ptr().add(at).cast::<libc::c_void>(),
                            expected_here.as_ptr().cast::<libc::c_void>(),
                            expected_here.len(),
                        )
                    };
                    order == 0
                }
                Backing::ProcMem { pid, mem, pos } => {
                    let mut page = [0u8; 4096];
                    let mut from = pos;
                    let mut equal = true;
                    for want in expected_here.chunks(page.len()) {
                        let now = &mut page[..want.len()];
                        mem.read_exact_at(now, from)
                            .map_err(|e| proc_mem_error(pid, e, piece.addr))?;
                        if now != want {
                            equal = false;
                            break;
                        }
                        from += want.len() as u64;
                    }
                    equal
                }
            };
            if !equal {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Write `data` at `gpa`; checks the whole range first so nothing is written on failure.
    pub(crate) fn write(&self, gpa: Gpa, data: &[u8]) -> Result<(), kvmaccess_core::Error> {
        self.check_backed(gpa, data.len())?;
        for piece in self.pieces(gpa, data.len()) {
            let piece = piece?;
            let src = &data[piece.range.clone()];
            match piece.backing {
                Backing::Mapped { file, at } => {
                    let map = file.rw().map_err(kvmaccess_core::Error::from)?;
                    if at.checked_add(src.len()).map_or(true, |e| e > map.len()) {
                        return Err(kvmaccess_core::Error::PhysUnmapped {
                            gpa: Gpa(piece.addr),
                        });
                    }
                    // SAFETY: `at + src.len() <= map.len()` was just checked, so the destination
                    // lies in the live writable mapping owned by `file`, and `src` is our own
                    // buffer that cannot overlap the mapping's pages. The guest may access the
                    // same bytes concurrently, as with any write into a running guest's memory;
                    // no Rust reference to the mapping exists, so no aliasing rule is broken.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            map.as_mut_ptr().add(at),
                            src.len(),
                        );
                    }
                }
                Backing::ProcMem { pid, mem, pos } => {
                    mem.write_all_at(src, pos)
                        .map_err(|e| proc_mem_error(pid, e, piece.addr))?;
                }
            }
        }
        Ok(())
    }
}

/// One stretch of a request that lies in a single span.
struct Piece<'a> {
    /// Guest-physical address of its first byte.
    addr: u64,
    /// Where it lies in the caller's buffer.
    range: std::ops::Range<usize>,
    backing: Backing<'a>,
}

/// How a piece's bytes are reached.
enum Backing<'a> {
    /// At byte `at` of a mapped RAM file.
    Mapped { file: &'a MappedFile, at: usize },
    /// Through QEMU's `/proc/PID/mem` at host address `pos`.
    ProcMem { pid: u32, mem: &'a File, pos: u64 },
}

fn proc_mem_error(pid: u32, e: std::io::Error, gpa: u64) -> kvmaccess_core::Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        Error::ProcMemDenied { pid, source: e }.into()
    } else {
        kvmaccess_core::Error::Io {
            context: format!("reading guest-physical {gpa:#x} through /proc/{pid}/mem"),
            source: e,
        }
    }
}
