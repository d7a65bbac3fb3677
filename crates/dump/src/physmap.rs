//! Translation of guest-physical addresses to file offsets, shared by every dump format.

use kvmaccess_core::{Error, Gpa, PhysRange};

/// A run of guest-physical memory recorded in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    /// First guest-physical address.
    pub start: u64,
    /// Bytes of guest memory the extent covers (never zero).
    pub mem_len: u64,
    /// Offset of the first byte in the file.
    pub file_off: u64,
    /// Bytes present in the file (at most `mem_len`); the rest of the extent reads as zero,
    /// which is how ELF says "memory that was all zeros, not stored".
    pub file_len: u64,
}

impl Extent {
    /// One past the last guest-physical address; construction guarantees it does not wrap.
    fn end(&self) -> u64 {
        self.start.saturating_add(self.mem_len)
    }
}

/// Sorted, non-overlapping extents, plus the merged RAM ranges the trait reports.
#[derive(Debug, Default)]
pub(crate) struct PhysMap {
    extents: Vec<Extent>,
    ranges: Vec<PhysRange>,
}

/// Why a set of extents cannot form a map; the caller turns this into a format-specific error.
#[derive(Debug)]
pub(crate) enum MapError {
    /// Extents `first` and `second` (indices in the caller's order) share guest-physical
    /// addresses starting at `at`.
    Overlap {
        first: usize,
        second: usize,
        at: u64,
    },
}

impl PhysMap {
    /// Builds a map from extents in any order. Each item carries the caller's index so that an
    /// overlap error can name the records involved. Callers must already have checked that every
    /// extent is non-empty, does not wrap, has `file_len <= mem_len`, and lies inside the file.
    pub(crate) fn new(mut extents: Vec<(usize, Extent)>) -> Result<Self, MapError> {
        // Ties broken by caller index so that error messages are deterministic.
        extents.sort_by_key(|(idx, e)| (e.start, *idx));
        for pair in extents.windows(2) {
            if let [(ia, a), (ib, b)] = pair {
                if b.start < a.end() {
                    return Err(MapError::Overlap {
                        first: *ia,
                        second: *ib,
                        at: b.start,
                    });
                }
            }
        }
        let extents: Vec<Extent> = extents.into_iter().map(|(_, e)| e).collect();
        let mut ranges: Vec<PhysRange> = Vec::with_capacity(extents.len());
        for e in &extents {
            match ranges.last_mut() {
                Some(last) if last.end.0 == e.start => last.end = Gpa(e.end()),
                _ => ranges.push(PhysRange {
                    start: Gpa(e.start),
                    end: Gpa(e.end()),
                }),
            }
        }
        Ok(Self { extents, ranges })
    }

    pub(crate) fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }

    /// Copies `gpa..gpa + buf.len()` out of `data` (the whole file), crossing extent boundaries
    /// where extents are contiguous. A hole yields `PhysUnmapped` with the first missing address.
    pub(crate) fn read(&self, data: &[u8], gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        let mut cur = gpa.0;
        let mut out = buf;
        while !out.is_empty() {
            // The last extent starting at or below `cur` is the only one that can contain it.
            let idx = self.extents.partition_point(|e| e.start <= cur);
            let extent = idx
                .checked_sub(1)
                .and_then(|i| self.extents.get(i))
                .filter(|e| cur < e.end())
                .ok_or(Error::PhysUnmapped { gpa: Gpa(cur) })?;
            let within = cur - extent.start;
            let avail = extent.end() - cur;
            let take = usize::try_from(avail).map_or(out.len(), |a| a.min(out.len()));
            let (dst, rest) = out.split_at_mut(take);
            copy_extent(data, extent, within, dst)?;
            out = rest;
            // `take` bytes fit inside the extent, whose end does not wrap.
            cur = cur.saturating_add(take as u64);
        }
        Ok(())
    }
}

/// Fills `dst` from `extent` starting `within` bytes into it: file bytes first, zeros past
/// `file_len`.
fn copy_extent(data: &[u8], extent: &Extent, within: u64, dst: &mut [u8]) -> Result<(), Error> {
    let in_file = extent.file_len.saturating_sub(within);
    let from_file = usize::try_from(in_file).map_or(dst.len(), |n| n.min(dst.len()));
    let (file_part, zero_part) = dst.split_at_mut(from_file);
    if !file_part.is_empty() {
        let src = extent
            .file_off
            .checked_add(within)
            .and_then(|off| usize::try_from(off).ok())
            .and_then(|off| Some(off..off.checked_add(file_part.len())?))
            .and_then(|range| data.get(range))
            .ok_or_else(|| Error::Backend {
                backend: "dump",
                message: format!(
                    "file offset {:#x}+{:#x} lies outside the dump (was the file truncated \
                     after it was opened?)",
                    extent.file_off, within
                ),
            })?;
        file_part.copy_from_slice(src);
    }
    zero_part.fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, mem_len: u64, file_off: u64, file_len: u64) -> Extent {
        Extent {
            start,
            mem_len,
            file_off,
            file_len,
        }
    }

    #[test]
    fn reads_across_contiguous_extents_and_stops_at_holes() {
        let data: Vec<u8> = (0..=255u8).collect();
        let map = PhysMap::new(vec![
            (0, ext(0x1000, 16, 0, 16)),
            (1, ext(0x1010, 16, 100, 8)),
            (2, ext(0x2000, 4, 200, 4)),
        ])
        .unwrap();
        assert_eq!(
            map.ranges(),
            &[
                PhysRange {
                    start: Gpa(0x1000),
                    end: Gpa(0x1020)
                },
                PhysRange {
                    start: Gpa(0x2000),
                    end: Gpa(0x2004)
                }
            ]
        );
        let mut buf = [0xffu8; 20];
        map.read(&data, Gpa(0x100c), &mut buf).unwrap();
        assert_eq!(&buf[..4], &[12, 13, 14, 15]);
        assert_eq!(&buf[4..12], &[100, 101, 102, 103, 104, 105, 106, 107]);
        assert_eq!(&buf[12..20], &[0; 8]);
        let mut buf = [0u8; 24];
        match map.read(&data, Gpa(0x1010), &mut buf) {
            Err(Error::PhysUnmapped { gpa }) => assert_eq!(gpa, Gpa(0x1020)),
            other => panic!("{other:?}"),
        }
        match map.read(&data, Gpa(0xfff), &mut [0u8; 2]) {
            Err(Error::PhysUnmapped { gpa }) => assert_eq!(gpa, Gpa(0xfff)),
            other => panic!("{other:?}"),
        }
        map.read(&data, Gpa(u64::MAX), &mut []).unwrap();
        assert!(map.read(&data, Gpa(u64::MAX), &mut [0u8; 4]).is_err());
    }

    #[test]
    fn overlap_is_rejected_naming_both() {
        let err = PhysMap::new(vec![
            (0, ext(0x1000, 0x100, 0, 0)),
            (1, ext(0x10ff, 1, 0, 0)),
        ])
        .unwrap_err();
        let MapError::Overlap { first, second, at } = err;
        assert_eq!((first, second, at), (0, 1, 0x10ff));
    }
}
