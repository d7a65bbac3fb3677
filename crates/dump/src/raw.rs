//! Reader for raw images: the file is guest-physical memory from a base address on, with no
//! header at all.

use crate::backing::{map_file, Backing};
use crate::error::{DumpError, Result};
use crate::physmap::{Extent, PhysMap};
use kvmaccess_core::{Error, Gpa, PhysRange, PhysicalMemory};
use std::path::Path;

/// A raw memory image opened for reading. Raw images record no registers.
#[derive(Debug)]
pub struct RawDump {
    file: String,
    backing: Backing,
    base: Gpa,
    map: PhysMap,
}

impl RawDump {
    /// Maps the file at `path`, whose first byte is guest-physical address `base`.
    pub fn open(path: impl AsRef<Path>, base: u64) -> Result<Self> {
        let path = path.as_ref();
        let backing = map_file(path)?;
        Self::with_backing(backing, path.display().to_string(), base)
    }

    /// Wraps bytes held in memory, whose first byte is guest-physical address `base`.
    pub fn from_bytes(bytes: Vec<u8>, base: u64) -> Result<Self> {
        Self::with_backing(Backing::Owned(bytes), "<memory>".to_owned(), base)
    }

    pub(crate) fn with_backing(backing: Backing, file: String, base: u64) -> Result<Self> {
        let len = backing.bytes().len() as u64;
        if len == 0 {
            return Err(DumpError::Empty { file });
        }
        if base.checked_add(len).is_none() {
            return Err(DumpError::malformed(
                &file,
                "raw",
                0,
                format!("base {base:#x} plus the file's {len:#x} bytes runs past 2^64"),
            ));
        }
        let extent = Extent {
            start: base,
            mem_len: len,
            file_off: 0,
            file_len: len,
        };
        // A single extent cannot overlap anything.
        let map = PhysMap::new(vec![(0, extent)]).unwrap_or_default();
        Ok(Self {
            file,
            backing,
            base: Gpa(base),
            map,
        })
    }

    /// The guest-physical address of the file's first byte.
    pub fn base(&self) -> Gpa {
        self.base
    }

    /// The file's name as given when opening.
    pub fn file_name(&self) -> &str {
        &self.file
    }
}

impl PhysicalMemory for RawDump {
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

    #[test]
    fn raw_with_base() {
        let dump = RawDump::from_bytes((0..=255u8).collect(), 0x10_0000).unwrap();
        assert_eq!(
            dump.ranges(),
            &[PhysRange {
                start: Gpa(0x10_0000),
                end: Gpa(0x10_0100)
            }]
        );
        assert_eq!(dump.read_u32(Gpa(0x10_0004)).unwrap(), 0x0706_0504);
        match dump.read_phys(Gpa(0xf_ffff), &mut [0u8; 2]) {
            Err(Error::PhysUnmapped { gpa }) => assert_eq!(gpa, Gpa(0xf_ffff)),
            other => panic!("{other:?}"),
        }
        match dump.read_phys(Gpa(0x10_00fe), &mut [0u8; 4]) {
            Err(Error::PhysUnmapped { gpa }) => assert_eq!(gpa, Gpa(0x10_0100)),
            other => panic!("{other:?}"),
        }
        assert!(RawDump::from_bytes(vec![1; 16], u64::MAX - 4).is_err());
        assert!(RawDump::from_bytes(Vec::new(), 0).is_err());
    }
}
