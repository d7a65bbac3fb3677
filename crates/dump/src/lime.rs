//! Reader for LiME (`.lime`) dumps: a sequence of 32-byte range headers, each followed by the
//! bytes of that guest-physical range.

use crate::backing::{map_file, Backing};
use crate::error::{DumpError, Result};
use crate::physmap::{Extent, MapError, PhysMap};
use kvmaccess_core::{Error, Gpa, PhysRange, PhysicalMemory};
use std::path::Path;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `"LiME"` read as a little-endian u32.
pub const LIME_MAGIC: u32 = 0x4C69_4D45;
/// The only LiME header version.
pub const LIME_VERSION: u32 = 1;
/// Size of a LiME range header.
pub const LIME_HEADER_SIZE: usize = 32;

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct LimeHeader {
    magic: U32,
    version: U32,
    s_addr: U64,
    /// Inclusive end.
    e_addr: U64,
    reserved: [u8; 8],
}

const _: () = assert!(size_of::<LimeHeader>() == LIME_HEADER_SIZE);

/// Encodes a LiME range header for `start..=end_inclusive` (used by tests and by anyone who
/// wants to produce LiME files).
pub fn encode_lime_header(start: u64, end_inclusive: u64) -> [u8; LIME_HEADER_SIZE] {
    let hdr = LimeHeader {
        magic: U32::new(LIME_MAGIC),
        version: U32::new(LIME_VERSION),
        s_addr: U64::new(start),
        e_addr: U64::new(end_inclusive),
        reserved: [0; 8],
    };
    let mut out = [0u8; LIME_HEADER_SIZE];
    out.copy_from_slice(hdr.as_bytes());
    out
}

/// A LiME dump opened for reading. LiME records no registers.
#[derive(Debug)]
pub struct LimeDump {
    file: String,
    backing: Backing,
    map: PhysMap,
}

impl LimeDump {
    /// Maps and validates the LiME file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let backing = map_file(path)?;
        Self::with_backing(backing, path.display().to_string())
    }

    /// Parses a LiME dump held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::with_backing(Backing::Owned(bytes), "<memory>".to_owned())
    }

    pub(crate) fn with_backing(backing: Backing, file: String) -> Result<Self> {
        let map = parse_lime(backing.bytes(), &file)?;
        Ok(Self { file, backing, map })
    }

    /// The file's name as given when opening.
    pub fn file_name(&self) -> &str {
        &self.file
    }
}

fn parse_lime(data: &[u8], file: &str) -> Result<PhysMap> {
    let len = data.len() as u64;
    if data.is_empty() {
        return Err(DumpError::Empty {
            file: file.to_owned(),
        });
    }
    let mut extents = Vec::new();
    let mut pos = 0u64;
    let mut index = 0usize;
    // Each range consumes at least 33 bytes, so the loop and `extents` are bounded by the size.
    while pos < len {
        let rest = usize::try_from(pos)
            .ok()
            .and_then(|p| data.get(p..))
            .unwrap_or_default();
        let hdr_end = pos.saturating_add(LIME_HEADER_SIZE as u64);
        let Ok((hdr, _)) = LimeHeader::read_from_prefix(rest) else {
            return Err(DumpError::truncated(
                file,
                format!("LiME header of range {index}"),
                hdr_end,
                len,
            ));
        };
        let bad = |msg: String| DumpError::malformed(file, "LiME", pos, msg);
        if hdr.magic.get() != LIME_MAGIC {
            return Err(bad(format!(
                "range {index}: magic {:#010x}, expected {LIME_MAGIC:#010x} (\"LiME\")",
                hdr.magic.get()
            )));
        }
        if hdr.version.get() != LIME_VERSION {
            return Err(bad(format!(
                "range {index}: version {}, only {LIME_VERSION} is known",
                hdr.version.get()
            )));
        }
        let (start, end) = (hdr.s_addr.get(), hdr.e_addr.get());
        if end < start {
            return Err(bad(format!(
                "range {index}: end {end:#x} is below start {start:#x}"
            )));
        }
        // `e_addr` is inclusive, so a range covering all of 2^64 has no u64 length.
        let size = (end - start).checked_add(1).ok_or_else(|| {
            bad(format!(
                "range {index}: {start:#x}..={end:#x} is 2^64 bytes"
            ))
        })?;
        let data_end = hdr_end.checked_add(size).ok_or_else(|| {
            bad(format!(
                "range {index}: {size:#x} bytes after offset {hdr_end:#x} overflow"
            ))
        })?;
        if data_end > len {
            return Err(DumpError::truncated(
                file,
                format!("LiME range {index} (guest-physical {start:#x}..={end:#x})"),
                data_end,
                len,
            ));
        }
        extents.push((
            index,
            Extent {
                start,
                mem_len: size,
                file_off: hdr_end,
                file_len: size,
            },
        ));
        pos = data_end;
        index = index.saturating_add(1);
    }
    PhysMap::new(extents).map_err(|e| match e {
        MapError::Overlap { first, second, at } => DumpError::malformed(
            file,
            "LiME",
            0,
            format!("ranges {first} and {second} both claim guest-physical {at:#x}"),
        ),
    })
}

impl PhysicalMemory for LimeDump {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        self.map.read(self.backing.bytes(), gpa, buf)
    }

    fn ranges(&self) -> &[PhysRange] {
        self.map.ranges()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lime(ranges: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (start, bytes) in ranges {
            out.extend_from_slice(&encode_lime_header(*start, start + bytes.len() as u64 - 1));
            out.extend_from_slice(bytes);
        }
        out
    }

    #[test]
    fn multiple_ranges_read_back() {
        let a: Vec<u8> = (0..64).collect();
        let b: Vec<u8> = (100..164).collect();
        let dump = LimeDump::from_bytes(lime(&[(0x10_0000, &b), (0x1000, &a)])).unwrap();
        assert_eq!(dump.ranges().len(), 2);
        assert_eq!(dump.ranges()[0].start, Gpa(0x1000));
        let mut buf = [0u8; 4];
        dump.read_phys(Gpa(0x1000 + 60), &mut buf).unwrap();
        assert_eq!(buf, [60, 61, 62, 63]);
        dump.read_phys(Gpa(0x10_0000), &mut buf).unwrap();
        assert_eq!(buf, [100, 101, 102, 103]);
        match dump.read_phys(Gpa(0x1000 + 62), &mut buf) {
            Err(Error::PhysUnmapped { gpa }) => assert_eq!(gpa, Gpa(0x1040)),
            other => panic!("{other:?}"),
        }
        assert_eq!(dump.ram_size(), 128);
    }

    #[test]
    fn adjacent_ranges_merge_and_reads_cross_them() {
        let dump = LimeDump::from_bytes(lime(&[(0, &[1, 2]), (2, &[3, 4])])).unwrap();
        assert_eq!(dump.ranges().len(), 1);
        let mut buf = [0u8; 4];
        dump.read_phys(Gpa(0), &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let full = lime(&[(0, &[7; 40]), (0x1000, &[9; 10])]);
        let first_range_end = LIME_HEADER_SIZE + 40;
        for cut in 1..full.len() {
            // A cut exactly between ranges leaves a valid, shorter dump: nothing can tell.
            if cut == first_range_end {
                assert_eq!(
                    LimeDump::from_bytes(full[..cut].to_vec())
                        .unwrap()
                        .ram_size(),
                    40
                );
                continue;
            }
            let err = LimeDump::from_bytes(full[..cut].to_vec()).unwrap_err();
            assert!(
                matches!(err, DumpError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
        let err = LimeDump::from_bytes(full[..80].to_vec()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("LiME range 1") || text.contains("range 1"),
            "{text}"
        );
        assert!(LimeDump::from_bytes(full).is_ok());
    }

    #[test]
    fn bad_magic_version_inverted_overlap_rejected() {
        let mut bad_magic = lime(&[(0, &[1; 8])]);
        bad_magic[0] ^= 1;
        assert!(LimeDump::from_bytes(bad_magic)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut bad_version = lime(&[(0, &[1; 8])]);
        bad_version[4] = 2;
        assert!(LimeDump::from_bytes(bad_version).is_err());
        let mut inverted = encode_lime_header(0x2000, 0x1000).to_vec();
        inverted.extend_from_slice(&[0; 16]);
        assert!(LimeDump::from_bytes(inverted)
            .unwrap_err()
            .to_string()
            .contains("below start"));
        let mut whole = encode_lime_header(0, u64::MAX).to_vec();
        whole.push(0);
        assert!(LimeDump::from_bytes(whole).is_err());
        let overlap = lime(&[(0, &[1; 16]), (8, &[2; 16])]);
        assert!(LimeDump::from_bytes(overlap)
            .unwrap_err()
            .to_string()
            .contains("both claim"));
        assert!(matches!(
            LimeDump::from_bytes(Vec::new()),
            Err(DumpError::Empty { .. })
        ));
    }
}
