//! Test helpers for kvmaccess crates: [`MockMemory`], a sparse guest-physical memory with holes
//! and fault injection, and [`PageTableBuilder`], which lays out x86 page tables in it for every
//! paging format.
//!
//! This crate deliberately knows the page-table format on its own (see [`bits`]) instead of
//! borrowing constants from `kvmaccess-x86`: tests of the walker would prove nothing if the
//! tables were built from the walker's own understanding of the format.

#![forbid(unsafe_code)]

mod memory;
mod tables;

use kvmaccess_core::{Gpa, Gva};

pub use memory::MockMemory;
pub use tables::{bits, MapFlags, PageSize, PageTableBuilder, TableFormat, TableLevel};

/// Errors of the test helpers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A span that would wrap past 2^64.
    #[error("span at {gpa} of {len:#x} bytes wraps past the end of the address space")]
    AddressOverflow {
        /// First address.
        gpa: Gpa,
        /// Length in bytes.
        len: u64,
    },
    /// The frame allocator of a [`PageTableBuilder`] ran out of its area.
    #[error("page-table frame area {start}..{end} is exhausted")]
    OutOfFrames {
        /// First address of the area.
        start: Gpa,
        /// First address past the area.
        end: Gpa,
    },
    /// An address that a mapping needs aligned is not.
    #[error("{what} {value:#x} is not aligned to {align:#x}")]
    Misaligned {
        /// Which address.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The required alignment.
        align: u64,
    },
    /// The table format has no page of this size (1 GiB pages in PAE, 4 MiB pages in long mode...).
    #[error("{format:?} paging has no {size:?} pages")]
    UnsupportedPageSize {
        /// Format of the tables.
        format: TableFormat,
        /// Requested size.
        size: PageSize,
    },
    /// An address the format cannot express (a physical address above 4 GiB in a 32-bit PTE, a
    /// virtual address above 4 GiB in 32-bit modes).
    #[error("{what} {value:#x} does not fit {format:?} paging")]
    AddressTooWide {
        /// Which address.
        what: &'static str,
        /// Its value.
        value: u64,
        /// Format of the tables.
        format: TableFormat,
    },
    /// Mapping through an entry that already maps a large page.
    #[error("{gva}: the {level:?} entry at {entry} already maps a large page")]
    LargePageInTheWay {
        /// Address being mapped.
        gva: Gva,
        /// Level of the large-page entry.
        level: TableLevel,
        /// Address of that entry.
        entry: Gpa,
    },
    /// A memory access failed.
    #[error(transparent)]
    Core(#[from] kvmaccess_core::Error),
}

impl Error {
    /// Convert to the backend error type, keeping `PhysUnmapped` as it is.
    pub fn into_core(self) -> kvmaccess_core::Error {
        match self {
            Error::Core(inner) => inner,
            Error::AddressOverflow { gpa, .. } => kvmaccess_core::Error::PhysUnmapped { gpa },
            other => kvmaccess_core::Error::Backend {
                backend: "mock",
                message: other.to_string(),
            },
        }
    }
}
