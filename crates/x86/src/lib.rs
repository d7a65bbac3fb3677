//! x86 architecture knowledge for kvmaccess: typed control registers and the paging mode they
//! select, a page walker for every paging mode, a translation cache with an [`AddressSpace`]
//! API on top, and GDT/IDT decoding.
//!
//! Everything read from the guest (page tables, descriptor tables) is treated as hostile input:
//! decoding never panics, never loops on guest-controlled data, and reports failures with the
//! values that caused them.
//!
//! ```
//! use kvmaccess_core::{Gpa, Gva};
//! use kvmaccess_testkit::{MapFlags, MockMemory, PageSize, PageTableBuilder, TableFormat};
//! use kvmaccess_x86::{AddressSpace, PagingMode};
//!
//! let mem = MockMemory::new(64 << 20);
//! let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4)?;
//! tables.map(Gva(0xffff_8880_0000_0000), Gpa(0x80_0000), PageSize::Size2M, MapFlags::KERNEL_RW)?;
//! mem.write_u64(Gpa(0x80_0010), 42)?;
//!
//! // With a live guest or a dump: `AddressSpace::from_registers(&backend, &registers)`.
//! let mut space = AddressSpace::new(&mem, PagingMode::Level4, tables.cr3());
//! assert_eq!(space.read_u64(Gva(0xffff_8880_0000_0010))?, 42);
//! println!("{}", space.translate(Gva(0xffff_8880_0000_0010))?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod cache;
mod control;
mod descriptors;
mod walk;

use kvmaccess_core::{Gpa, Gva};

pub use cache::{AddressSpace, CacheStats, TranslationCache};
pub use control::{
    ControlRegisters, Cr0, Cr3, Cr4, Efer, ModeDetection, ModeEvidence, PagingMode, SecurityFeature,
};
pub use descriptors::{
    decode_gdt, decode_idt, read_gdt, read_idt, CallGate, CodeSegment, DataSegment, Descriptor,
    GateKind, GateWidth, GdtEntry, IdtGate, SegmentFields, SystemSegment, TaskGate, TssDescriptor,
    GDT_MAX_ENTRIES, IDT_MAX_GATES,
};
pub use kvmaccess_core::InvalidationEpoch;
pub use walk::{
    read_virt, translate, translate_range, translate_with, write_virt, Level, Mapping, PageSize,
    Translation, VirtChunk, VirtChunks, WalkOptions, WalkStep, WalkTrail,
};

/// Errors of the x86 crate: page walks, virtual reads and writes, descriptor-table reads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An entry on the walk has its present bit clear.
    #[error("{gva}: {level} entry at {entry_addr} is not present (value {value:#x})")]
    NotPresent {
        /// The address being translated.
        gva: Gva,
        /// Level of the entry.
        level: Level,
        /// Guest-physical address of the entry.
        entry_addr: Gpa,
        /// The entry.
        value: u64,
    },
    /// An entry has bits set that must be zero at its level (the CPU would raise #PF with
    /// RSVD=1).
    #[error(
        "{gva}: {level} entry at {entry_addr} has reserved bits {reserved:#x} set \
         (value {value:#x}, MAXPHYADDR {phys_addr_bits})"
    )]
    ReservedBits {
        /// The address being translated.
        gva: Gva,
        /// Level of the entry.
        level: Level,
        /// Guest-physical address of the entry.
        entry_addr: Gpa,
        /// The entry.
        value: u64,
        /// The offending bits.
        reserved: u64,
        /// The physical-address width the check assumed.
        phys_addr_bits: u8,
    },
    /// A long-mode address whose upper bits are not copies of the top implemented bit (bit 47
    /// for 4-level paging, bit 56 for 5-level).
    #[error("{gva} is not canonical for {mode} paging")]
    NonCanonical {
        /// The address.
        gva: Gva,
        /// The paging mode.
        mode: PagingMode,
    },
    /// An address above 4 GiB in a mode with 32-bit linear addresses.
    #[error("{gva} is beyond 4 GiB, out of reach of {mode} addressing")]
    Beyond4G {
        /// The address.
        gva: Gva,
        /// The paging mode.
        mode: PagingMode,
    },
    /// Reading a page-table entry failed.
    #[error("{gva}: reading the {level} entry at {entry_addr}: {source}")]
    TableRead {
        /// The address being translated.
        gva: Gva,
        /// Level of the entry.
        level: Level,
        /// Guest-physical address of the entry.
        entry_addr: Gpa,
        /// The backend's error.
        #[source]
        source: kvmaccess_core::Error,
    },
    /// A table so close to 2^64 that an entry address overflows (only a corrupt CR3 can do
    /// that).
    #[error("{gva}: the {level} table at {table} runs past the end of the physical address space")]
    TableAddressOverflow {
        /// The address being translated.
        gva: Gva,
        /// Level of the table.
        level: Level,
        /// Guest-physical address of the table.
        table: Gpa,
    },
    /// Reading the data of a translated range failed.
    #[error("reading guest-physical {gpa} (of the virtual range at {gva}): {source}")]
    PhysRead {
        /// Start of the virtual range.
        gva: Gva,
        /// The physical address whose read failed.
        gpa: Gpa,
        /// The backend's error.
        #[source]
        source: kvmaccess_core::Error,
    },
    /// Writing the data of a translated range failed.
    #[error("writing guest-physical {gpa} (of the virtual range at {gva}): {source}")]
    PhysWrite {
        /// Start of the virtual range.
        gva: Gva,
        /// The physical address whose write failed.
        gpa: Gpa,
        /// The backend's error.
        #[source]
        source: kvmaccess_core::Error,
    },
    /// A virtual range whose end would wrap past 2^64.
    #[error("virtual range at {gva} of {len:#x} bytes wraps past the end of the address space")]
    RangeWraps {
        /// Start of the range.
        gva: Gva,
        /// Its length.
        len: u64,
    },
    /// Reading a GDT or IDT failed.
    #[error("reading the {table} at {base:#x} ({len} bytes): {source}")]
    DescriptorTable {
        /// `GDT` or `IDT`.
        table: &'static str,
        /// Linear base address from GDTR/IDTR.
        base: u64,
        /// Bytes that were to be read.
        len: usize,
        /// What failed.
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// The guest-virtual address the failure concerns, when there is one.
    pub fn gva(&self) -> Option<Gva> {
        match self {
            Error::NotPresent { gva, .. }
            | Error::ReservedBits { gva, .. }
            | Error::NonCanonical { gva, .. }
            | Error::Beyond4G { gva, .. }
            | Error::TableRead { gva, .. }
            | Error::TableAddressOverflow { gva, .. }
            | Error::PhysRead { gva, .. }
            | Error::PhysWrite { gva, .. }
            | Error::RangeWraps { gva, .. } => Some(*gva),
            Error::DescriptorTable { source, .. } => source.gva(),
        }
    }
}

impl From<Error> for kvmaccess_core::Error {
    /// Physical-access failures become the backend's own error; translation failures become
    /// [`kvmaccess_core::Error::VirtUnmapped`] with this error's message as the reason.
    fn from(error: Error) -> Self {
        match error {
            Error::PhysRead { source, .. } | Error::PhysWrite { source, .. } => source,
            other => match other.gva() {
                Some(gva) => kvmaccess_core::Error::VirtUnmapped {
                    gva,
                    reason: other.to_string(),
                },
                None => kvmaccess_core::Error::Backend {
                    backend: "x86",
                    message: other.to_string(),
                },
            },
        }
    }
}
