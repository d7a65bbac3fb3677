use kvmaccess_core::{Gpa, Gva};

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while building a kernel profile.
///
/// All of it comes from guest memory, which the guest controls: messages name the value that was
/// rejected so that a user can tell a corrupt (or hostile) guest from a bug.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading guest-physical memory failed.
    #[error("reading {what} at guest-physical {gpa}: {source}")]
    Phys {
        /// What was being read.
        what: String,
        /// Where.
        gpa: Gpa,
        /// The backend's error.
        #[source]
        source: kvmaccess_core::Error,
    },
    /// Reading kernel virtual memory failed (translation or the read itself).
    #[error("reading {what} at kernel virtual {gva}: {source}")]
    Virt {
        /// What was being read.
        what: String,
        /// Where.
        gva: Gva,
        /// The walker's error.
        #[source]
        source: kvmaccess_x86::Error,
    },
    /// VMCOREINFO text longer than any kernel writes.
    #[error("VMCOREINFO text of {len} bytes exceeds the {limit}-byte limit")]
    VmcoreinfoTooLarge {
        /// Length of the text.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// VMCOREINFO text without a usable `OSRELEASE=` line.
    #[error("VMCOREINFO text has no valid OSRELEASE line (first bytes: {start:?})")]
    VmcoreinfoNoRelease {
        /// The first bytes of the text, for the message.
        start: String,
    },
    /// A key the caller needs is absent from VMCOREINFO.
    #[error("VMCOREINFO has no {key}")]
    VmcoreinfoMissing {
        /// The key, as it appears in the text (`SYMBOL(_stext)`, `KERNELOFFSET`...).
        key: String,
    },
    /// No VMCOREINFO copy in guest memory survived validation.
    #[error(
        "no usable VMCOREINFO in {scanned_bytes:#x} bytes of guest memory ({candidates} candidates{})",
        rejected_summary(rejected)
    )]
    VmcoreinfoNotFound {
        /// Bytes of guest-physical memory examined.
        scanned_bytes: u64,
        /// Copies of the text that were found.
        candidates: usize,
        /// Why each rejected copy was rejected.
        rejected: Vec<String>,
    },
    /// The kernel's BTF could not be used.
    #[error("kernel types: {0}")]
    NoBtf(String),
    /// A BTF lookup failed (a type or member this kernel does not have, or malformed BTF).
    #[error("kernel types: {what}: {source}")]
    Btf {
        /// What was looked up.
        what: String,
        /// The parser's error.
        #[source]
        source: kvmaccess_btf::Error,
    },
    /// A vmlinux file given by the user cannot be used.
    #[error("vmlinux {path}: {reason}")]
    Vmlinux {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The DWARF of a vmlinux given by the user could not be converted to types.
    #[error("vmlinux {path}: converting its DWARF types: {source}")]
    Dwarf {
        /// The file.
        path: std::path::PathBuf,
        /// The converter's error.
        #[source]
        source: kvmaccess_dwarf::Error,
    },
    /// The kernel's BTF has no type of this name.
    #[error("kernel types: no struct, union or typedef named {0}")]
    BtfMissingType(String),
    /// Neither VMCOREINFO nor vCPU registers were available: nothing to build a profile from.
    #[error("cannot locate the kernel: {0}")]
    NoProfileSource(String),
    /// The guest is not something this crate handles (a page size or paging mode it does not
    /// know).
    #[error("unsupported guest: {0}")]
    Unsupported(String),
    /// VMCOREINFO lacks the kallsyms addresses (kernels before 6.0) and no other symbol source
    /// was given.
    #[error(
        "VMCOREINFO has no {missing} (kernel older than 6.0?): kallsyms cannot be located \
         without them; pass a System.map (--system-map)"
    )]
    KallsymsNotExported {
        /// The first missing symbol.
        missing: String,
    },
    /// A kallsyms count beyond what any kernel has.
    #[error("kallsyms_num_syms {value} exceeds the limit of {limit}")]
    KallsymsTooMany {
        /// The count read from the guest.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A `kallsyms_token_index` entry that points outside `kallsyms_token_table`.
    #[error(
        "kallsyms_token_index[{token}] = {offset} is outside the {table_len}-byte token table"
    )]
    KallsymsTokenIndex {
        /// The token number.
        token: usize,
        /// Its offset.
        offset: usize,
        /// Bytes of token table available.
        table_len: usize,
    },
    /// A token that has no terminating NUL inside the token table.
    #[error(
        "kallsyms token {token} at offset {offset} is not NUL-terminated within {limit} bytes"
    )]
    KallsymsTokenUnterminated {
        /// The token number.
        token: usize,
        /// Its offset in the table.
        offset: usize,
        /// How far the search went.
        limit: usize,
    },
    /// A compressed name that runs past the readable end of `kallsyms_names`.
    #[error(
        "kallsyms name {index} at offset {offset} needs {needed} bytes, past the {available} bytes \
         of kallsyms_names that can be read"
    )]
    KallsymsNameOverrun {
        /// Symbol number.
        index: usize,
        /// Offset of the name in `kallsyms_names`.
        offset: usize,
        /// Bytes the name claims.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// A name that expands past the kernel's own limit.
    #[error("kallsyms name {index} expands to more than {limit} bytes")]
    KallsymsNameTooLong {
        /// Symbol number.
        index: usize,
        /// The limit (KSYM_NAME_LEN).
        limit: usize,
    },
    /// A symbol with an empty name (a zero length byte, or tokens that expand to nothing).
    #[error("kallsyms name {index} at offset {offset} is empty")]
    KallsymsEmptyName {
        /// Symbol number.
        index: usize,
        /// Offset in `kallsyms_names`.
        offset: usize,
    },
    /// The decoded table disagrees with VMCOREINFO: the wrong address rule, or a forged table.
    #[error("decoded kallsyms disagree with VMCOREINFO: {0}")]
    KallsymsMismatch(String),
    /// A line of a System.map that is not `address type name`.
    #[error("System.map line {line}: {reason}: {text:?}")]
    SystemMap {
        /// Line number, from 1.
        line: usize,
        /// Why the line was rejected.
        reason: &'static str,
        /// The line (truncated).
        text: String,
    },
    /// A System.map without the anchor symbol needed to compute the KASLR slide.
    #[error("cannot compute the KASLR slide for System.map: {0}")]
    SystemMapSlide(String),
    /// Reading or writing the profile cache failed.
    #[error("profile cache {path}: {reason}")]
    Cache {
        /// The cache file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The printk ring buffer cannot be read as a whole (individual bad records are skipped
    /// and reported, not errors).
    #[error("kernel log: {0}")]
    LogBuffer(String),
    /// A system-call table cannot be located or read.
    #[error("system-call table: {0}")]
    SyscallTable(String),
    /// A kernel list that revisits an entry without coming back to its head: corrupt memory,
    /// a torn read of a running guest, or a hostile guest.
    #[error("{list}: entry {at:#x} is visited twice after {walked} entries, without returning to the head {head:#x}")]
    ListCycle {
        /// Which list (`init_task.tasks`, `modules`, ...).
        list: String,
        /// The list head.
        head: u64,
        /// An entry on the cycle.
        at: u64,
        /// Entries walked when the cycle was noticed.
        walked: usize,
    },
    /// A kernel list longer than any real kernel's.
    #[error("{list}: more than {limit} entries after head {head:#x}")]
    ListTooLong {
        /// Which list.
        list: String,
        /// The list head.
        head: u64,
        /// The bound.
        limit: usize,
    },
    /// A kernel list with a link no kernel writes (NULL inside a circular list).
    #[error("{list}: entry {walked} at {at:#x} links to {next:#x}: {reason}")]
    ListBroken {
        /// Which list.
        list: String,
        /// The entry holding the bad link (the head when `walked` is 0).
        at: u64,
        /// The bad link.
        next: u64,
        /// Entries walked before it.
        walked: usize,
        /// Why the link is bad.
        reason: &'static str,
    },
    /// A radix tree / XArray whose nodes contradict each other.
    #[error("{what}: {reason}")]
    TreeCorrupt {
        /// Which tree.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// No task with this PID on the task list.
    #[error("no task with PID {pid}")]
    NoSuchTask {
        /// The PID.
        pid: i32,
    },
    /// A task without user memory (a kernel thread, or an exiting task).
    #[error("PID {pid} ({comm}) has no user address space: {reason}")]
    NoUserMemory {
        /// The PID.
        pid: i32,
        /// Its command name.
        comm: String,
        /// Why.
        reason: String,
    },
    /// Reading a process's user memory failed.
    #[error("reading {len} bytes of PID {pid} user memory at {gva}: {source}")]
    User {
        /// The PID.
        pid: i32,
        /// Where.
        gva: Gva,
        /// How much.
        len: usize,
        /// The walker's error.
        #[source]
        source: kvmaccess_x86::Error,
    },
    /// A module's symbol table that cannot be decoded.
    #[error("symbols of module {module}: {reason}")]
    ModuleSymbols {
        /// The module.
        module: String,
        /// What is wrong.
        reason: String,
    },
    /// A Volatility symbol table (ISF) could not be built consistently.
    #[error("ISF export: {0}")]
    Isf(String),
    /// Writing an exported profile failed.
    #[error("writing the exported profile to {path}: {reason}")]
    Export {
        /// The destination.
        path: String,
        /// What failed.
        reason: String,
    },
}

fn rejected_summary(rejected: &[String]) -> String {
    if rejected.is_empty() {
        String::new()
    } else {
        format!("; rejected: {}", rejected.join("; "))
    }
}

/// Shorten guest-controlled text before it goes into a message.
pub(crate) fn excerpt(bytes: &[u8], limit: usize) -> String {
    let cut = bytes.get(..limit).unwrap_or(bytes);
    String::from_utf8_lossy(cut).into_owned()
}
