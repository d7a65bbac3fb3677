use std::collections::{BTreeMap, BTreeSet};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use kvmaccess_core::{Gpa, PhysRange, PhysicalMemory, PhysicalMemoryWrite, PAGE_SIZE};

use crate::Error;

/// `PAGE_SIZE` as a buffer length (4096 fits every usize).
pub(crate) const FRAME_BYTES: usize = 4096;

type Frame = Box<[u8; FRAME_BYTES]>;

/// Sparse guest-physical memory for tests.
///
/// RAM is a set of ranges; inside them, frames nobody wrote read as zeros and cost nothing, so a
/// test can declare many GiB of RAM to place 1 GiB pages without allocating it. Reads and writes
/// that touch a hole fail like a real backend would, and [`MockMemory::fail_reads_at`] makes
/// chosen bytes fail to read even inside RAM.
///
/// Writes go through `&self` (the [`PhysicalMemoryWrite`] contract), so the frames sit behind a
/// lock; a poisoned lock is recovered rather than propagated because test memory has no invariant
/// a panicking writer could break.
#[derive(Debug)]
pub struct MockMemory {
    ranges: Vec<PhysRange>,
    frames: RwLock<BTreeMap<u64, Frame>>,
    faults: RwLock<BTreeSet<u64>>,
}

impl MockMemory {
    /// RAM covering `0..size`.
    pub fn new(size: u64) -> Self {
        Self::with_ranges(&[PhysRange {
            start: Gpa(0),
            end: Gpa(size),
        }])
    }

    /// RAM covering exactly `ranges` (sorted and merged here, empty ranges dropped); everything
    /// else is a hole.
    pub fn with_ranges(ranges: &[PhysRange]) -> Self {
        let mut sorted: Vec<PhysRange> = ranges.iter().copied().filter(|r| !r.is_empty()).collect();
        sorted.sort_by_key(|r| r.start);
        let mut merged: Vec<PhysRange> = Vec::with_capacity(sorted.len());
        for range in sorted {
            match merged.last_mut() {
                Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
                _ => merged.push(range),
            }
        }
        Self {
            ranges: merged,
            frames: RwLock::new(BTreeMap::new()),
            faults: RwLock::new(BTreeSet::new()),
        }
    }

    /// RAM covering `base..base + bytes.len()`, filled with `bytes`. Handy for feeding arbitrary
    /// bytes to a page walker.
    pub fn from_bytes(base: Gpa, bytes: &[u8]) -> Result<Self, Error> {
        let len = u64::try_from(bytes.len()).map_err(|_| Error::AddressOverflow {
            gpa: base,
            len: u64::MAX,
        })?;
        let range = PhysRange::from_start_len(base, len)
            .ok_or(Error::AddressOverflow { gpa: base, len })?;
        let mem = Self::with_ranges(&[range]);
        mem.write_bytes(base, bytes)?;
        Ok(mem)
    }

    /// Make every read that touches the byte at `gpa` fail, as a flaky backend or an MMIO hole
    /// inside a RAM range would.
    pub fn fail_reads_at(&self, gpa: Gpa) {
        write_lock(&self.faults).insert(gpa.0);
    }

    /// Undo [`MockMemory::fail_reads_at`] for every address.
    pub fn clear_faults(&self) {
        write_lock(&self.faults).clear();
    }

    /// Write `data` at `gpa`; fails without writing if any byte is outside RAM.
    pub fn write_bytes(&self, gpa: Gpa, data: &[u8]) -> Result<(), Error> {
        self.check_ram(gpa, data.len())?;
        let mut frames = write_lock(&self.frames);
        for_each_frame_piece(gpa.0, data.len(), |frame, offset, buf_offset, len| {
            let frame_bytes = frames
                .entry(frame)
                .or_insert_with(|| Box::new([0; FRAME_BYTES]));
            // Pieces never cross a frame and never run past `data`, so both slices exist.
            if let (Some(dst), Some(src)) = (
                frame_bytes.get_mut(offset..offset + len),
                data.get(buf_offset..buf_offset + len),
            ) {
                dst.copy_from_slice(src);
            }
        });
        Ok(())
    }

    /// Write a little-endian `u64` at `gpa`.
    pub fn write_u64(&self, gpa: Gpa, value: u64) -> Result<(), Error> {
        self.write_bytes(gpa, &value.to_le_bytes())
    }

    /// Write a little-endian `u32` at `gpa`.
    pub fn write_u32(&self, gpa: Gpa, value: u32) -> Result<(), Error> {
        self.write_bytes(gpa, &value.to_le_bytes())
    }

    /// Fill `buf` from `gpa`, ignoring injected faults (for test assertions).
    pub fn peek(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        self.check_ram(gpa, buf.len())?;
        let frames = read_lock(&self.frames);
        for_each_frame_piece(gpa.0, buf.len(), |frame, offset, buf_offset, len| {
            if let Some(dst) = buf.get_mut(buf_offset..buf_offset + len) {
                match frames.get(&frame).and_then(|f| f.get(offset..offset + len)) {
                    Some(src) => dst.copy_from_slice(src),
                    None => dst.fill(0),
                }
            }
        });
        Ok(())
    }

    /// Number of frames that hold written data (the memory actually allocated).
    pub fn allocated_frames(&self) -> usize {
        read_lock(&self.frames).len()
    }

    fn check_ram(&self, gpa: Gpa, len: usize) -> Result<(), Error> {
        let len64 =
            u64::try_from(len).map_err(|_| Error::AddressOverflow { gpa, len: u64::MAX })?;
        if gpa.checked_add(len64).is_none() {
            return Err(Error::AddressOverflow { gpa, len: len64 });
        }
        if len == 0 || self.ranges.iter().any(|r| r.contains_span(gpa, len64)) {
            return Ok(());
        }
        Err(Error::Core(kvmaccess_core::Error::PhysUnmapped {
            gpa: self.first_unbacked(gpa, len64),
        }))
    }

    /// The first address of `gpa..gpa+len` that no range covers, for the error message.
    fn first_unbacked(&self, gpa: Gpa, len: u64) -> Gpa {
        let mut cursor = gpa.0;
        let end = gpa.0.saturating_add(len);
        // Ranges are sorted and merged, so one forward pass finds the gap.
        for range in &self.ranges {
            if range.start.0 <= cursor && cursor < range.end.0 {
                cursor = range.end.0;
            }
        }
        Gpa(cursor.min(end))
    }
}

impl PhysicalMemory for MockMemory {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), kvmaccess_core::Error> {
        if !buf.is_empty() {
            let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
            let last = gpa.0.saturating_add(len - 1);
            if let Some(&bad) = read_lock(&self.faults).range(gpa.0..=last).next() {
                return Err(kvmaccess_core::Error::Backend {
                    backend: "mock",
                    message: format!("injected read fault at {:#x}", bad),
                });
            }
        }
        self.peek(gpa, buf).map_err(Error::into_core)
    }

    fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }
}

impl PhysicalMemoryWrite for MockMemory {
    fn write_phys(&self, gpa: Gpa, data: &[u8]) -> Result<(), kvmaccess_core::Error> {
        self.write_bytes(gpa, data).map_err(Error::into_core)
    }
}

/// Split `start..start+len` at 4 KiB boundaries and call `visit(frame, offset_in_frame,
/// offset_in_buffer, piece_len)` for each piece. The caller has checked that the span does not
/// wrap.
fn for_each_frame_piece(start: u64, len: usize, mut visit: impl FnMut(u64, usize, usize, usize)) {
    let mut done = 0usize;
    while done < len {
        let Some(addr) = u64::try_from(done).ok().and_then(|d| start.checked_add(d)) else {
            return;
        };
        // `addr % PAGE_SIZE` is below 4096, so it fits any usize.
        let offset = usize::try_from(addr % PAGE_SIZE).unwrap_or(0);
        let piece = (len - done).min(FRAME_BYTES - offset);
        visit(addr / PAGE_SIZE, offset, done, piece);
        done += piece;
    }
}

fn read_lock<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_ram_reads_zero_and_holes_fail() {
        let mem = MockMemory::with_ranges(&[
            PhysRange {
                start: Gpa(0),
                end: Gpa(0x2000),
            },
            PhysRange {
                start: Gpa(0x3000),
                end: Gpa(0x4000),
            },
        ]);
        assert_eq!(mem.read_u64(Gpa(0x1ff8)).unwrap(), 0);
        let err = mem.read_u64(Gpa(0x1ffc)).unwrap_err();
        assert!(
            matches!(err, kvmaccess_core::Error::PhysUnmapped { gpa } if gpa == Gpa(0x2000)),
            "{err}"
        );
        assert!(mem.read_u32(Gpa(0x2800)).is_err());
        assert!(mem.write_u64(Gpa(0x3ffc), 1).is_err());
        assert_eq!(mem.allocated_frames(), 0);
    }

    /// The trait's default comparison (a copy per page): a change in any page is seen, and a
    /// range running into a hole is an error even when an earlier byte already differs.
    #[test]
    fn default_phys_equals_sees_every_page_and_fails_on_holes() {
        let mem = MockMemory::with_ranges(&[PhysRange {
            start: Gpa(0),
            end: Gpa(0x4000),
        }]);
        let data: Vec<u8> = (0..=255u8).cycle().take(0x2800).collect();
        mem.write_bytes(Gpa(0x800), &data).unwrap();
        assert!(mem.phys_equals(Gpa(0x800), &data).unwrap());
        for flip in [0, 0x7ff, 0x800, 0x1fff, data.len() - 1] {
            let mut other = data.clone();
            other[flip] ^= 0x5a;
            assert!(!mem.phys_equals(Gpa(0x800), &other).unwrap(), "{flip:#x}");
        }
        let mut running_off = vec![0xffu8; 0x1000];
        running_off[0] = 0;
        let err = mem.phys_equals(Gpa(0x3800), &running_off).unwrap_err();
        assert!(
            matches!(err, kvmaccess_core::Error::PhysUnmapped { gpa } if gpa == Gpa(0x4000)),
            "{err}"
        );
    }

    #[test]
    fn writes_cross_frames() {
        let mem = MockMemory::new(0x10000);
        let data: Vec<u8> = (0..=255u8).cycle().take(0x1800).collect();
        mem.write_bytes(Gpa(0xf00), &data).unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read_phys(Gpa(0xf00), &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(mem.allocated_frames(), 3);
    }

    #[test]
    fn injected_faults_hit_only_overlapping_reads() {
        let mem = MockMemory::new(0x10000);
        mem.fail_reads_at(Gpa(0x1004));
        assert!(mem.read_u32(Gpa(0x1000)).is_ok());
        assert!(mem.read_u32(Gpa(0x1001)).is_err());
        assert!(mem.read_u64(Gpa(0x1004)).is_err());
        assert!(mem.read_u32(Gpa(0x1005)).is_ok());
        mem.clear_faults();
        assert!(mem.read_u64(Gpa(0x1004)).is_ok());
    }

    #[test]
    fn ranges_merge_and_bytes_load() {
        let mem = MockMemory::with_ranges(&[
            PhysRange {
                start: Gpa(0x1000),
                end: Gpa(0x3000),
            },
            PhysRange {
                start: Gpa(0),
                end: Gpa(0x1000),
            },
        ]);
        assert_eq!(mem.ranges().len(), 1);
        assert_eq!(mem.ram_size(), 0x3000);
        let mem = MockMemory::from_bytes(Gpa(0x100), &[1, 2, 3, 4]).unwrap();
        assert_eq!(mem.read_u32(Gpa(0x100)).unwrap(), 0x0403_0201);
        assert!(mem.read_u32(Gpa(0x101)).is_err());
        assert!(MockMemory::from_bytes(Gpa(u64::MAX), &[1, 2]).is_err());
    }
}
