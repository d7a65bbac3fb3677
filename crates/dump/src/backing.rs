//! The bytes of a dump: a read-only memory map of the file, or a buffer the caller handed us.

use crate::error::{DumpError, Result};
use std::fmt;
use std::fs::File;
use std::path::Path;

/// Where a dump's bytes live.
pub(crate) enum Backing {
    /// A read-only shared mapping of the whole file.
    Mapped(memmap2::Mmap),
    /// Bytes already in memory (fuzzing, tests, tiny dumps fetched from QEMU).
    Owned(Vec<u8>),
}

impl Backing {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(map) => map,
            Backing::Owned(bytes) => bytes,
        }
    }
}

impl fmt::Debug for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backing::Mapped(map) => write!(f, "Mapped({} bytes)", map.len()),
            Backing::Owned(bytes) => write!(f, "Owned({} bytes)", bytes.len()),
        }
    }
}

/// Maps `path` read-only. Fails with a message naming the path if it is missing, unreadable, not a
/// regular file, or empty (an empty file cannot be mapped, and is never a dump).
pub(crate) fn map_file(path: &Path) -> Result<Backing> {
    let file = File::open(path).map_err(|e| DumpError::open(path, "open", e))?;
    let meta = file
        .metadata()
        .map_err(|e| DumpError::open(path, "stat", e))?;
    if !meta.is_file() {
        return Err(DumpError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() == 0 {
        return Err(DumpError::Empty {
            file: path.display().to_string(),
        });
    }
    // SAFETY: `Mmap::map` is unsafe because the mapped bytes can change or vanish if another
    // process writes to or truncates the file while we hold the map. We accept that rather than
    // copying: dumps are routinely many GiB, and copying them (or issuing a pread per 8-byte
    // page-table read) would make the tool unusable. The consequences are bounded:
    // * All metadata we rely on for bounds (ELF headers, program headers, notes, LiME headers) is
    //   parsed once at open time into owned structures; every later access re-checks its range
    //   against the map's length with `get`, so rewritten header bytes can never make us index
    //   out of bounds.
    // * Guest memory is only ever copied out of the map into caller buffers; we never keep a
    //   reference into it whose contents must stay stable, so a concurrent writer can only make
    //   us return the bytes it wrote.
    // * Truncating the file under us would raise SIGBUS on the next access to a vanished page.
    //   That is the documented, accepted risk of reading a dump that something else is still
    //   rewriting; dumps are finished files and the tool never writes them.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DumpError::open(path, "map", e))?;
    Ok(Backing::Mapped(map))
}
