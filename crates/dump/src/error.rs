use std::path::{Path, PathBuf};

/// Everything that can go wrong while opening, reading or writing a dump.
///
/// Every variant names the file (or `<memory>` for dumps parsed from a buffer) and, where the
/// problem is in the file's contents, the byte offset and the offending value, so that a user can
/// look at the file with a hex editor and see what we saw.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DumpError {
    /// The file could not be opened, inspected or mapped.
    #[error("cannot {action} {path}: {source}")]
    Open {
        /// The dump's path.
        path: PathBuf,
        /// What was being attempted (`open`, `map`, `stat`).
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The path names something other than a regular file.
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file has no bytes at all.
    #[error("{file} is empty (0 bytes): not a memory dump")]
    Empty {
        /// The dump's name.
        file: String,
    },
    /// Neither ELF nor LiME, and the caller did not ask for a raw dump.
    #[error(
        "{file} is neither an ELF core nor a LiME dump (first bytes {magic}){hint}; if it is a \
         raw image of guest-physical memory, say where it starts with --raw-base ADDRESS \
         (usually 0)"
    )]
    UnknownFormat {
        /// The dump's name.
        file: String,
        /// Hex of the first bytes, to help recognise what the file really is.
        magic: String,
        /// What the file looks like instead, when we recognise it (starts with `"; "`), else
        /// empty.
        hint: String,
    },
    /// A raw base was given for a file whose header says it is a structured dump.
    #[error(
        "{file} is a {format} dump, which records its own addresses; --raw-base applies only \
         to raw memory images"
    )]
    RawBaseOnStructuredDump {
        /// The dump's name.
        file: String,
        /// The detected format.
        format: crate::DumpFormat,
    },
    /// The file ends before something its headers promise.
    #[error(
        "{file} is truncated: {what} needs bytes up to offset {needed_end:#x} but the file has \
         only {file_len:#x} bytes ({missing} bytes missing)"
    )]
    Truncated {
        /// The dump's name.
        file: String,
        /// Which structure is cut short (e.g. `PT_LOAD segment 3 (guest-physical 0x100000..)`).
        what: String,
        /// Offset one past the last byte that structure needs.
        needed_end: u64,
        /// The file's actual length.
        file_len: u64,
        /// `needed_end - file_len`.
        missing: u64,
    },
    /// The contents break a rule of the format.
    #[error("{file}: malformed {format} at offset {offset:#x}: {message}")]
    Malformed {
        /// The dump's name.
        file: String,
        /// `ELF`, `ELF note`, `LiME`, `raw`...
        format: &'static str,
        /// Where in the file the problem is.
        offset: u64,
        /// What is wrong, with the value found.
        message: String,
    },
    /// A register note that cannot be decoded (also returned by the public note parsers, where
    /// there is no file offset to report).
    #[error("bad {note} note: {message}")]
    BadNote {
        /// Which note (`QEMU CPU state`, `NT_PRSTATUS`).
        note: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The writer refuses to replace an existing file.
    #[error("{path} already exists; refusing to overwrite it (ask for overwrite explicitly)")]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },
    /// Something the writer was given cannot be represented in an ELF core.
    #[error("cannot write core: {0}")]
    Unrepresentable(String),
    /// Writing the output failed.
    #[error("writing {target}: {context}: {source}")]
    Write {
        /// The destination (path, or `<stream>`).
        target: String,
        /// What was being written.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the guest memory being dumped failed.
    #[error("reading guest memory to dump: {0}")]
    Source(#[source] kvmaccess_core::Error),
}

impl DumpError {
    pub(crate) fn open(path: &Path, action: &'static str, source: std::io::Error) -> Self {
        Self::Open {
            path: path.to_path_buf(),
            action,
            source,
        }
    }

    pub(crate) fn malformed(
        file: &str,
        format: &'static str,
        offset: u64,
        message: impl Into<String>,
    ) -> Self {
        Self::Malformed {
            file: file.to_owned(),
            format,
            offset,
            message: message.into(),
        }
    }

    pub(crate) fn truncated(
        file: &str,
        what: impl Into<String>,
        needed_end: u64,
        len: u64,
    ) -> Self {
        Self::Truncated {
            file: file.to_owned(),
            what: what.into(),
            needed_end,
            file_len: len,
            missing: needed_end.saturating_sub(len),
        }
    }

    pub(crate) fn bad_note(note: &'static str, message: impl Into<String>) -> Self {
        Self::BadNote {
            note,
            message: message.into(),
        }
    }
}

impl From<DumpError> for kvmaccess_core::Error {
    fn from(err: DumpError) -> Self {
        match err {
            DumpError::Source(inner) => inner,
            DumpError::Open {
                path,
                action,
                source,
            } => kvmaccess_core::Error::Io {
                context: format!("cannot {action} {}", path.display()),
                source,
            },
            DumpError::Write {
                target,
                context,
                source,
            } => kvmaccess_core::Error::Io {
                context: format!("writing {target}: {context}"),
                source,
            },
            other => kvmaccess_core::Error::Backend {
                backend: "dump",
                message: other.to_string(),
            },
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = DumpError> = std::result::Result<T, E>;
