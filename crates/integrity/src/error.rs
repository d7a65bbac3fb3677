use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while capturing a baseline, checking against it or restoring.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Linux layer failed (symbols, kernel reads, BTF).
    #[error(transparent)]
    Linux(#[from] kvmaccess_linux::Error),
    /// A page walk or descriptor-table read failed.
    #[error(transparent)]
    X86(#[from] kvmaccess_x86::Error),
    /// A backend failed (registers, physical memory).
    #[error(transparent)]
    Backend(#[from] kvmaccess_core::Error),
    /// The baseline was taken on another kernel build: its addresses and bytes mean nothing here.
    #[error(
        "the baseline was taken on kernel {baseline_release} (BUILD-ID {baseline_build_id}), \
         but the guest runs {guest_release} (BUILD-ID {guest_build_id}); take a new baseline"
    )]
    BuildMismatch {
        /// Release recorded in the baseline.
        baseline_release: String,
        /// Build id recorded in the baseline (`unknown` when none was).
        baseline_build_id: String,
        /// Release of the running guest.
        guest_release: String,
        /// Build id of the running guest (`unknown` when VMCOREINFO has none).
        guest_build_id: String,
    },
    /// The baseline file is not one this version reads.
    #[error("{path}: {reason}")]
    BadBaseline {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the values involved.
        reason: String,
    },
    /// The sidecar file of large captures is missing, short or does not match its hashes.
    #[error("baseline sidecar {path}: {reason}")]
    Sidecar {
        /// The sidecar file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A blob the baseline's JSON names is not in the sidecar.
    #[error("the baseline has no captured blob {0:?} (was it saved without its .bin sidecar?)")]
    MissingBlob(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// JSON (de)serialisation failed.
    #[error("{context}: {source}")]
    Json {
        /// What was being (de)serialised.
        context: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// A check id no check has.
    #[error("unknown check {id:?}; known checks: {known}")]
    UnknownCheck {
        /// The id given.
        id: String,
        /// The ids there are, comma separated.
        known: String,
    },
    /// The baseline holds no state for a check that is enabled now.
    #[error(
        "the baseline has no state for check {0:?} (it was captured with that check disabled)"
    )]
    NotInBaseline(String),
    /// The guest holds something no sane kernel holds (a table too large, an inverted range).
    #[error("implausible guest state: {0}")]
    Implausible(String),
    /// A check needs struct offsets from the kernel's BTF and there is none.
    #[error(
        "kernel type information (BTF) is unavailable: {0}; give the monitor a vmlinux with BTF"
    )]
    NoTypes(String),
    /// A register snapshot list without any vCPU.
    #[error("no vCPU registers: a pass needs the registers of at least one vCPU")]
    NoVcpus,
    /// A write read back different bytes.
    #[error("write to {gva:#x} did not stick: wrote {wrote}, read back {read}")]
    WriteNotVerified {
        /// Where.
        gva: u64,
        /// The bytes written, hex.
        wrote: String,
        /// The bytes read back, hex.
        read: String,
    },
}

impl Error {
    pub(crate) fn json(context: impl Into<String>, source: serde_json::Error) -> Self {
        Self::Json {
            context: context.into(),
            source,
        }
    }
}
