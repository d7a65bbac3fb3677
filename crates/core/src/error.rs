use crate::{Gpa, Gva};

/// Errors a backend reports through the capability traits.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The guest-physical address is not backed by RAM (a hole, MMIO, or past the end).
    #[error("guest-physical address {gpa} is not backed by guest RAM")]
    PhysUnmapped {
        /// First address of the read that has no backing.
        gpa: Gpa,
    },
    /// A guest-virtual address could not be translated.
    #[error("guest-virtual address {gva} is not mapped: {reason}")]
    VirtUnmapped {
        /// The address.
        gva: Gva,
        /// Which level of the walk failed, in words.
        reason: String,
    },
    /// A vCPU index past the last vCPU.
    #[error("vCPU {index} does not exist (the guest has {count})")]
    NoSuchVcpu {
        /// Requested index.
        index: usize,
        /// Number of vCPUs.
        count: usize,
    },
    /// The backend cannot do this at all (e.g. a raw dump has no registers).
    #[error("{0}")]
    Unsupported(String),
    /// A failure inside a backend, described by it.
    #[error("{backend}: {message}")]
    Backend {
        /// Which backend failed (`qemu`, `dump`, ...).
        backend: &'static str,
        /// What failed, with the values involved.
        message: String,
    },
    /// An operating-system error while talking to the backend.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
