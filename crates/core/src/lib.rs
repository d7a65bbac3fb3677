//! Types every kvmaccess crate shares: guest address newtypes, the register snapshot of one vCPU,
//! and the capability traits a backend implements.
//!
//! Capabilities are separate traits so that a memory dump implements only what a dump can do
//! (read memory, report the registers it recorded) and the compiler tells a tool that needs
//! `VmControl` that a dump will not do.

#![forbid(unsafe_code)]

mod addr;
mod epoch;
mod error;
pub mod hex;
mod regs;

pub use addr::{Gfn, Gpa, Gva, PhysRange, PAGE_SIZE};
pub use epoch::InvalidationEpoch;
pub use error::Error;
pub use regs::{DescriptorTable, Registers, Segment};

/// Guest-physical memory that can be read.
///
/// Implementations must never panic on any address or length: a read that touches a hole or runs
/// past the end of guest RAM returns [`Error::PhysUnmapped`] naming the first missing address.
pub trait PhysicalMemory: Send + Sync {
    /// Fill `buf` with the bytes at `gpa..gpa + buf.len()`.
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error>;

    /// The guest-physical ranges that hold RAM, sorted and non-overlapping.
    fn ranges(&self) -> &[PhysRange];

    /// Read a little-endian `u64`; page-table walkers call this in their inner loop.
    fn read_u64(&self, gpa: Gpa) -> Result<u64, Error> {
        let mut raw = [0u8; 8];
        self.read_phys(gpa, &mut raw)?;
        Ok(u64::from_le_bytes(raw))
    }

    /// Read a little-endian `u32`.
    fn read_u32(&self, gpa: Gpa) -> Result<u32, Error> {
        let mut raw = [0u8; 4];
        self.read_phys(gpa, &mut raw)?;
        Ok(u32::from_le_bytes(raw))
    }

    /// The parts of `within` that may hold data; the rest of `within` reads as zeros.
    ///
    /// Readers that sweep all of guest memory (signature scans, dumps) use this to skip RAM the
    /// guest never touched: reading it through a shared mapping of QEMU's RAM file would make the
    /// host allocate it, inflating every guest we look at to its full size. Backends that cannot
    /// tell return `within` whole.
    fn data_ranges(&self, within: PhysRange) -> Vec<PhysRange> {
        vec![within]
    }

    /// Whether the bytes at `gpa..gpa + expected.len()` equal `expected`. A range that is not
    /// all RAM is an error, as for [`Self::read_phys`], wherever the first difference lies.
    ///
    /// The text check compares megabytes of guest memory with its baseline copy on every pass,
    /// and nearly all of it is equal: backends that map guest RAM compare it where it lies
    /// instead of copying it out first. This default copies a page at a time.
    fn phys_equals(&self, gpa: Gpa, expected: &[u8]) -> Result<bool, Error> {
        let mut page = [0u8; 4096];
        let mut at = gpa.0;
        let mut equal = true;
        for want in expected.chunks(page.len()) {
            let now = page.get_mut(..want.len()).unwrap_or_default();
            self.read_phys(Gpa(at), now)?;
            equal &= now == want;
            // Past the last chunk the address is not used, so an overflow there is no error
            // (and before it, the read of the chunk that wraps has already failed).
            at = at.wrapping_add(want.len() as u64);
        }
        Ok(equal)
    }

    /// Total bytes of guest RAM.
    fn ram_size(&self) -> u64 {
        self.ranges().iter().map(PhysRange::len).sum()
    }

    /// The counter this backend bumps when the guest runs again after a pause (or is reset), for
    /// translation caches to follow. `None` for memory that never changes (a dump) or whose
    /// changes the backend cannot see; callers of a running guest invalidate by themselves.
    fn invalidation_epoch(&self) -> Option<InvalidationEpoch> {
        None
    }
}

/// Guest-physical memory that can also be written. Only live backends implement it, and only
/// when the user asked for writes.
pub trait PhysicalMemoryWrite: PhysicalMemory {
    /// Write `data` at `gpa`. Fails without writing anything if any byte is outside guest RAM.
    fn write_phys(&self, gpa: Gpa, data: &[u8]) -> Result<(), Error>;
}

/// Register state of the guest's vCPUs.
pub trait VcpuState: Send + Sync {
    /// Number of vCPUs.
    fn vcpu_count(&self) -> usize;

    /// Registers of one vCPU.
    fn registers(&self, vcpu: usize) -> Result<Registers, Error>;

    /// Registers of every vCPU. Backends where one round trip fetches all of them override this.
    fn all_registers(&self) -> Result<Vec<Registers>, Error> {
        (0..self.vcpu_count()).map(|v| self.registers(v)).collect()
    }
}

/// Run state of a live guest.
pub trait VmControl: Send + Sync {
    /// Stop all vCPUs; memory and registers stay consistent until [`VmControl::resume`].
    fn pause(&self) -> Result<(), Error>;
    /// Let the vCPUs run again.
    fn resume(&self) -> Result<(), Error>;
    /// Whether the vCPUs are running now.
    fn is_running(&self) -> Result<bool, Error>;
}
