//! Guest RAM for fuzz targets: the input's bytes at physical address 0.

use kvmaccess_core::{Gpa, PhysRange, PhysicalMemory};

pub struct FuzzMemory {
    bytes: Vec<u8>,
    ranges: [PhysRange; 1],
}

impl FuzzMemory {
    pub fn new(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.to_vec(),
            ranges: [PhysRange {
                start: Gpa(0),
                end: Gpa(u64::try_from(bytes.len()).unwrap_or(0)),
            }],
        }
    }
}

impl PhysicalMemory for FuzzMemory {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), kvmaccess_core::Error> {
        let unmapped = kvmaccess_core::Error::PhysUnmapped { gpa };
        let start = usize::try_from(gpa.0).map_err(|_| unmapped)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.bytes.get(start..end))
            .ok_or(kvmaccess_core::Error::PhysUnmapped { gpa })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }
}
