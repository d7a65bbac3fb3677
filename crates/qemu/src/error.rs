use std::path::PathBuf;

/// Everything that can go wrong while talking to, launching or reading a QEMU guest.
///
/// Messages are written for the person at the terminal: they name the socket, the PID or the
/// command involved and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The QMP socket path does not exist.
    #[error("QMP socket {} does not exist (is QEMU running with -qmp unix:{},server=on?)", path.display(), path.display())]
    SocketMissing {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The socket exists but connecting failed (nobody listening, permissions, ...).
    #[error("cannot connect to QMP socket {}: {source} (is QEMU still running?)", path.display())]
    SocketConnect {
        /// The path that was tried.
        path: PathBuf,
        /// Why the connection failed.
        #[source]
        source: std::io::Error,
    },
    /// Something answered on the socket, but not with a QMP greeting.
    #[error("{} is not a QMP socket (got: {got})", path.display())]
    NotQmp {
        /// The socket path.
        path: PathBuf,
        /// What arrived instead, shortened.
        got: String,
    },
    /// QEMU answered a command with a QMP `error` object.
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    CommandFailed {
        /// The QMP command (for `human-monitor-command`, the HMP command line).
        command: String,
        /// QMP error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The QMP connection ended: QEMU exited or closed the socket.
    #[error("QEMU closed the QMP connection (QEMU exited?)")]
    Closed,
    /// QEMU did not answer in time.
    #[error("QEMU did not answer `{command}` within {secs} s")]
    Timeout {
        /// The command that is still pending.
        command: String,
        /// How long we waited.
        secs: u64,
    },
    /// QEMU's output did not have the shape this crate expects.
    #[error("unexpected output from QEMU ({what}): {detail}")]
    Protocol {
        /// Which reply or text was being parsed.
        what: &'static str,
        /// The offending value, shortened.
        detail: String,
    },
    /// Guest RAM is not in a file we can map; reads go through `/proc/PID/mem` instead.
    #[error(
        "guest RAM is not in a shared file we can map ({reason}); kvmaccess will read it through \
         /proc/{pid}/mem instead, which is slower and needs root or ptrace rights (CAP_SYS_PTRACE). \
         Start QEMU with -object memory-backend-file,share=on,... or memory-backend-memfd,share=on \
         and -machine memory-backend=<id> for fast reads"
    )]
    NoSharedRam {
        /// QEMU's PID.
        pid: u32,
        /// Why the shared mapping was not possible.
        reason: String,
    },
    /// Reading or writing QEMU's address space was refused.
    #[error(
        "cannot access /proc/{pid}/mem of QEMU: {source}: reading another process's memory needs \
         root or ptrace rights (CAP_SYS_PTRACE)"
    )]
    ProcMemDenied {
        /// QEMU's PID.
        pid: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A write was attempted on a read-only attachment.
    #[error(
        "writing guest memory is disabled; attach with writes enabled (--allow-write) to change it"
    )]
    WriteNotAllowed,
    /// Starting QEMU failed.
    #[error("cannot start QEMU: {0}")]
    Launch(String),
    /// The serial console did not behave.
    #[error("serial console: {0}")]
    Console(String),
    /// An operating-system error with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn protocol(what: &'static str, detail: impl AsRef<str>) -> Self {
        Error::Protocol {
            what,
            detail: shorten(detail.as_ref(), 300),
        }
    }
}

/// Cut long text for error messages without splitting a UTF-8 character.
pub(crate) fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

impl From<Error> for kvmaccess_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { context, source } => kvmaccess_core::Error::Io { context, source },
            Error::WriteNotAllowed => kvmaccess_core::Error::Unsupported(e.to_string()),
            other => kvmaccess_core::Error::Backend {
                backend: "qemu",
                message: other.to_string(),
            },
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
