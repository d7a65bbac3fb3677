//! The system-call tables (x86-64, and the ia32 and x32 compatibility tables when the kernel has
//! them) and the code of the system-call dispatcher.
//!
//! Each entry is resolved to the symbol it points at and judged: a clean entry points exactly at
//! the start of a system-call wrapper of its ABI (`__x64_sys_*`, `__ia32_sys_*`,
//! `__ia32_compat_sys_*`, `__x32_compat_sys_*`, or the not-implemented stub) in kernel text.
//!
//! A hooked entry still gets its real name when the kernel keeps `syscalls_metadata`
//! (CONFIG_FTRACE_SYSCALLS): ftrace fills that array at boot, number by number, from the table
//! as it was then, so it is an independent record of which number is which call.
//!
//! Since Linux 6.9 (and stable backports such as Debian's 6.1.0-2x and later), x86-64 dispatches
//! through the `x64_sys_call` switch, not through the table: the table is then only read by
//! tracing, and an integrity check must also compare the dispatcher's code, which
//! [`Kernel::dispatcher_code`] returns.

use std::collections::HashMap;
use std::sync::Arc;

use kvmaccess_core::Gva;
use serde::{Serialize, Serializer};

use crate::{Error, Kernel, KernelTypes, Result};

/// Most entries accepted in one table (x86-64 has ~460; the kernel's own limit is far lower).
pub const MAX_SYSCALLS: u64 = 1024;
/// Largest dispatcher function copied by [`Kernel::dispatcher_code`].
pub const MAX_CODE_BYTES: u64 = 64 << 10;
/// Longest system-call name read from `syscall_metadata.name`.
const MAX_NAME: usize = 64;
/// A table entry is a `sys_call_ptr_t`: a function pointer, 8 bytes on x86-64.
const ENTRY_BYTES: u64 = 8;
/// Functions whose code is returned by [`Kernel::dispatcher_code`], when the kernel has them.
pub const DISPATCHERS: &[&str] = &[
    "entry_SYSCALL_64",
    "do_syscall_64",
    "x64_sys_call",
    "ia32_sys_call",
    "x32_sys_call",
];

/// The three x86 system-call ABIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Abi {
    /// Native 64-bit (`syscall`).
    X64,
    /// 32-bit compatibility (`int 0x80`, `sysenter`).
    Ia32,
    /// x32 (64-bit registers, 32-bit pointers).
    X32,
}

impl Abi {
    fn index(self) -> usize {
        match self {
            Abi::X64 => 0,
            Abi::Ia32 => 1,
            Abi::X32 => 2,
        }
    }

    /// The kernel symbol of the table.
    pub fn table_symbol(self) -> &'static str {
        match self {
            Abi::X64 => "sys_call_table",
            Abi::Ia32 => "ia32_sys_call_table",
            Abi::X32 => "x32_sys_call_table",
        }
    }

    /// Wrapper prefixes whose functions belong in this ABI's table, most specific first. The
    /// bare `sys_`/`compat_sys_` forms are the entries of kernels before 4.17's pt_regs
    /// wrappers.
    fn prefixes(self) -> &'static [&'static str] {
        match self {
            Abi::X64 => &["__x64_sys_", "sys_"],
            Abi::Ia32 => &["__ia32_compat_sys_", "__ia32_sys_", "compat_sys_", "sys_"],
            Abi::X32 => &["__x32_compat_sys_", "__x64_sys_", "compat_sys_", "sys_"],
        }
    }
}

/// Where an entry's name came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NameSource {
    /// `syscalls_metadata[nr]`, recorded at boot: right even when the entry is hooked.
    Metadata,
    /// The wrapper symbol the entry points at.
    Symbol,
    /// Neither: the entry points somewhere unexpected and there is no metadata.
    Unknown,
}

/// What owns the code an entry points at. Coarser than [`crate::Owner`] on purpose: a table is
/// decoded every monitor pass, and this needs only the symbol the entry resolves to and the
/// bounds of kernel text, not the section and module-region ranges an [`crate::Owners`] map
/// is built from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "name")]
pub enum EntryOwner {
    /// The kernel image's text (`_stext`..`_etext`).
    KernelText,
    /// A module, by the symbol table's module name.
    Module(String),
    /// Neither: memory no known code owns.
    Unowned,
}

fn ser_opt_arc<S: Serializer>(v: &Option<Arc<str>>, s: S) -> std::result::Result<S::Ok, S::Error> {
    v.as_deref().serialize(s)
}

fn ser_hex_bytes<S: Serializer>(v: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    let mut out = String::with_capacity(v.len() * 2);
    for b in v {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    s.serialize_str(&out)
}

/// One table entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SyscallEntry {
    /// System-call number.
    pub number: u32,
    /// Its name (`read`, `execve`), without prefix; `None` when unknown.
    #[serde(serialize_with = "ser_opt_arc")]
    pub name: Option<Arc<str>>,
    /// Where the name came from.
    pub name_source: NameSource,
    /// The function pointer in the table.
    #[serde(with = "kvmaccess_core::hex")]
    pub address: u64,
    /// `symbol+0xoff` at that address, when any symbol precedes it.
    #[serde(serialize_with = "ser_opt_arc")]
    pub target: Option<Arc<str>>,
    /// What owns the target.
    pub owner: EntryOwner,
    /// Points at the not-implemented stub (an unused number).
    pub unused: bool,
    /// Points exactly at the start of a wrapper of this ABI in kernel text, and (with metadata)
    /// at the wrapper of this number's own call.
    pub expected: bool,
}

/// One system-call table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SyscallTable {
    /// Its ABI.
    pub abi: Abi,
    /// Its kernel symbol.
    pub symbol: &'static str,
    /// Its address.
    #[serde(with = "kvmaccess_core::hex")]
    pub address: u64,
    /// How the number of entries was determined.
    pub count_source: String,
    /// The entries, by number.
    pub entries: Vec<SyscallEntry>,
}

impl SyscallTable {
    /// Entries that are not [`SyscallEntry::expected`].
    pub fn unexpected(&self) -> impl Iterator<Item = &SyscallEntry> + '_ {
        self.entries.iter().filter(|e| !e.expected)
    }

    /// The entry of a system call by name.
    pub fn by_name(&self, name: &str) -> Option<&SyscallEntry> {
        self.entries
            .iter()
            .find(|e| e.name.as_deref() == Some(name))
    }
}

/// All system-call tables of the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SyscallTables {
    /// The native table (every x86-64 kernel has it).
    pub x64: SyscallTable,
    /// The ia32 table, when this kernel has one.
    pub ia32: Option<SyscallTable>,
    /// The x32 table, when this kernel has one.
    pub x32: Option<SyscallTable>,
    /// Absent tables, name sources, counts: what a reader should know.
    pub notes: Vec<String>,
}

impl SyscallTables {
    /// The tables that exist, x64 first.
    pub fn tables(&self) -> impl Iterator<Item = &SyscallTable> + '_ {
        std::iter::once(&self.x64)
            .chain(self.ia32.as_ref())
            .chain(self.x32.as_ref())
    }
}

/// A function's code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CodeBlock {
    /// The symbol.
    pub name: &'static str,
    /// Its address.
    #[serde(with = "kvmaccess_core::hex")]
    pub address: u64,
    /// True when the distance to the next symbol exceeded [`MAX_CODE_BYTES`] and the copy was
    /// cut there.
    pub truncated: bool,
    /// The bytes, from the symbol to the next kernel symbol.
    #[serde(serialize_with = "ser_hex_bytes")]
    pub bytes: Vec<u8>,
}

/// A wrapper function that table entries may point at.
#[derive(Debug)]
struct Wrapper {
    /// Every wrapper alias at the address.
    names: Vec<Arc<str>>,
    /// What the wrapper means in each ABI's table ([`Abi::index`]), worked out once so that
    /// reading a table allocates nothing per entry.
    by_abi: [Option<WrapperRole>; 3],
}

/// A wrapper as an entry of one ABI's table.
#[derive(Debug)]
struct WrapperRole {
    /// The first alias that is a wrapper of the ABI.
    symbol: Arc<str>,
    /// The system-call names its aliases stand for (usually one).
    calls: Vec<Arc<str>>,
    /// The not-implemented stub.
    unused: bool,
}

/// A hasher for kernel addresses: keys are distinct 64-bit values chosen by the kernel's
/// linker, not by an attacker who could aim at collisions in a table of a few hundred entries,
/// and SipHash would cost more than the rest of an entry's work.
#[derive(Default)]
struct AddressHasher(u64);

impl std::hash::Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type AddressMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<AddressHasher>>;

/// A table found in the kernel.
#[derive(Debug)]
struct TablePlan {
    abi: Abi,
    address: u64,
    count: u64,
    count_source: String,
    /// Canonical names by number, from `syscalls_metadata`.
    canonical: Vec<Option<Arc<str>>>,
}

/// Everything needed to read the tables, worked out once per kernel: table locations and sizes,
/// the wrapper functions by address, the canonical names. [`SyscallResolver::read`] then costs
/// one bulk read per table and a hash lookup per entry.
#[derive(Debug)]
pub struct SyscallResolver {
    tables: Vec<TablePlan>,
    wrappers: AddressMap<Wrapper>,
    text: Option<(u64, u64)>,
    notes: Vec<String>,
}

/// The address of the first kernel-image symbol above `address`: the end of the object there.
fn next_symbol(kernel: &Kernel<'_>, address: u64) -> Option<u64> {
    kernel
        .symbols()
        .iter()
        .filter(|s| s.module.is_none() && !s.is_absolute() && s.address > address)
        .map(|s| s.address)
        .min()
}

/// The end of function `name`: the next kernel symbol that is not one of its own global labels
/// (`entry_SYSCALL_64_after_hwframe` and `entry_SYSCALL_64_safe_stack` lie inside
/// `entry_SYSCALL_64`).
fn code_end(kernel: &Kernel<'_>, name: &str, address: u64) -> Option<u64> {
    let label = format!("{name}_");
    kernel
        .symbols()
        .iter()
        .filter(|s| {
            s.module.is_none()
                && !s.is_absolute()
                && s.address > address
                && !s.name.starts_with(&label)
        })
        .map(|s| s.address)
        .min()
}

/// The system-call name a wrapper symbol stands for under `abi`, if it is one of its wrappers.
fn wrapper_name(abi: Abi, symbol: &str) -> Option<&str> {
    abi.prefixes()
        .iter()
        .find_map(|p| symbol.strip_prefix(p))
        .filter(|n| !n.is_empty())
}

fn is_wrapper_symbol(name: &str) -> bool {
    [Abi::X64, Abi::Ia32, Abi::X32]
        .iter()
        .any(|&abi| wrapper_name(abi, name).is_some())
}

impl SyscallResolver {
    /// Locate the tables and index the wrapper functions. Without `types` (no BTF), names come
    /// from the symbols entries point at. Fails only when the x86-64 table is missing.
    pub fn new(kernel: &Kernel<'_>, types: Option<&KernelTypes>) -> Result<Self> {
        let mut notes = Vec::new();
        let text = match (kernel.symbol("_stext"), kernel.symbol("_etext")) {
            (Ok(start), Ok(end)) if start < end => Some((start, end)),
            _ => {
                notes.push("no _stext/_etext: owners are taken from symbols only".to_string());
                None
            }
        };
        let in_text = |a: u64| text.map_or(true, |(s, e)| (s..e).contains(&a));

        // Weak ('W') wrappers are the stubs COND_SYSCALL leaves for calls configured out.
        let mut wrappers: AddressMap<Wrapper> = AddressMap::default();
        for s in kernel.symbols() {
            if s.module.is_some()
                || !matches!(s.kind, 'T' | 't' | 'W' | 'w')
                || !in_text(s.address)
                || !is_wrapper_symbol(&s.name)
            {
                continue;
            }
            let name: Arc<str> = Arc::from(s.name.as_str());
            wrappers
                .entry(s.address)
                .and_modify(|w| w.names.push(name.clone()))
                .or_insert_with(|| Wrapper {
                    names: vec![name],
                    by_abi: [None, None, None],
                });
        }

        for wrapper in wrappers.values_mut() {
            for abi in [Abi::X64, Abi::Ia32, Abi::X32] {
                let mut role: Option<WrapperRole> = None;
                for name in &wrapper.names {
                    let Some(call) = wrapper_name(abi, name) else {
                        continue;
                    };
                    let role = role.get_or_insert_with(|| WrapperRole {
                        symbol: name.clone(),
                        calls: Vec::new(),
                        unused: call == "ni_syscall",
                    });
                    role.calls.push(Arc::from(call));
                }
                wrapper.by_abi[abi.index()] = role;
            }
        }

        let mut tables = Vec::new();
        for abi in [Abi::X64, Abi::Ia32, Abi::X32] {
            let symbol = abi.table_symbol();
            let Ok(address) = kernel.symbol(symbol) else {
                if abi == Abi::X64 {
                    return Err(Error::SyscallTable(
                        "the kernel has no sys_call_table symbol".to_string(),
                    ));
                }
                notes.push(format!("{symbol}: absent in this kernel"));
                continue;
            };
            let (count, count_source) = match table_count(kernel, address, symbol) {
                Ok(found) => found,
                Err(e) if abi != Abi::X64 => {
                    notes.push(format!("{symbol} at {address:#x}: {e}"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            tables.push(TablePlan {
                abi,
                address,
                count,
                count_source,
                canonical: Vec::new(),
            });
        }

        if let Some(x64) = tables.iter_mut().find(|t| t.abi == Abi::X64) {
            match types.map(|t| canonical_names(kernel, t, x64.count)) {
                Some(Ok((names, found))) => {
                    notes.push(format!(
                        "x64 names from syscalls_metadata ({found} of {} numbers), recorded at \
                         boot",
                        x64.count
                    ));
                    x64.canonical = names;
                }
                Some(Err(e)) => notes.push(format!(
                    "x64 names from the symbols entries point at (syscalls_metadata: {e})"
                )),
                None => notes.push(
                    "x64 names from the symbols entries point at (no BTF for syscalls_metadata)"
                        .to_string(),
                ),
            }
        }
        Ok(Self {
            tables,
            wrappers,
            text,
            notes,
        })
    }

    /// Read and judge every table: one bulk read each.
    pub fn read(&self, kernel: &Kernel<'_>) -> Result<SyscallTables> {
        let mut x64 = None;
        let mut ia32 = None;
        let mut x32 = None;
        let mut notes = self.notes.clone();
        for plan in &self.tables {
            let table = match self.read_table(kernel, plan) {
                Ok(table) => table,
                Err(e) if plan.abi != Abi::X64 => {
                    notes.push(format!("{}: {e}", plan.abi.table_symbol()));
                    continue;
                }
                Err(e) => return Err(e),
            };
            match plan.abi {
                Abi::X64 => x64 = Some(table),
                Abi::Ia32 => ia32 = Some(table),
                Abi::X32 => x32 = Some(table),
            }
        }
        let x64 = x64.ok_or_else(|| Error::SyscallTable("no x86-64 table".to_string()))?;
        Ok(SyscallTables {
            x64,
            ia32,
            x32,
            notes,
        })
    }

    fn read_table(&self, kernel: &Kernel<'_>, plan: &TablePlan) -> Result<SyscallTable> {
        let bytes = plan
            .count
            .checked_mul(ENTRY_BYTES)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| Error::SyscallTable(format!("{} entries", plan.count)))?;
        let mut raw = vec![0u8; bytes];
        kernel.read(Gva(plan.address), &mut raw)?;
        let mut entries = Vec::with_capacity(raw.len() / 8);
        for (number, chunk) in (0u32..).zip(raw.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let address = u64::from_le_bytes(word);
            let canonical = usize::try_from(number)
                .ok()
                .and_then(|n| plan.canonical.get(n))
                .and_then(Option::clone);
            entries.push(self.judge(kernel, plan.abi, number, address, canonical));
        }
        Ok(SyscallTable {
            abi: plan.abi,
            symbol: plan.abi.table_symbol(),
            address: plan.address,
            count_source: plan.count_source.clone(),
            entries,
        })
    }

    fn judge(
        &self,
        kernel: &Kernel<'_>,
        abi: Abi,
        number: u32,
        address: u64,
        canonical: Option<Arc<str>>,
    ) -> SyscallEntry {
        let role = self
            .wrappers
            .get(&address)
            .and_then(|w| w.by_abi[abi.index()].as_ref());
        if let Some(role) = role {
            let unused = role.unused;
            let matches = match &canonical {
                None => true,
                Some(c) => !unused && role.calls.iter().any(|n| **n == **c),
            };
            let (name, name_source) = match canonical {
                Some(c) => (Some(c), NameSource::Metadata),
                None if unused => (None, NameSource::Symbol),
                None => (role.calls.first().cloned(), NameSource::Symbol),
            };
            return SyscallEntry {
                number,
                name,
                name_source,
                address,
                target: Some(role.symbol.clone()),
                owner: EntryOwner::KernelText,
                unused,
                expected: matches,
            };
        }
        // Anything else, including a wrapper of another ABI: resolved the slow way.
        let symbol = kernel.symbols().addr2sym(address);
        let target = kernel.symbols().describe(address).map(Arc::from);
        let in_text = self.text.is_some_and(|(s, e)| (s..e).contains(&address));
        let owner = match symbol {
            _ if in_text => EntryOwner::KernelText,
            Some((s, _)) if s.module.is_some() => {
                EntryOwner::Module(s.module.as_deref().unwrap_or_default().to_string())
            }
            _ => EntryOwner::Unowned,
        };
        let name_source = if canonical.is_some() {
            NameSource::Metadata
        } else {
            NameSource::Unknown
        };
        SyscallEntry {
            number,
            name: canonical,
            name_source,
            address,
            target,
            owner,
            unused: false,
            expected: false,
        }
    }

    /// Notes gathered while locating the tables.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }
}

/// The number of entries: the distance to the next kernel symbol (the table is an array with no
/// size of its own in kallsyms or BTF), without trailing zero words (alignment padding).
fn table_count(kernel: &Kernel<'_>, address: u64, symbol: &str) -> Result<(u64, String)> {
    let next = next_symbol(kernel, address).ok_or_else(|| {
        Error::SyscallTable(format!("no kernel symbol follows {symbol} {address:#x}"))
    })?;
    let gap = next - address;
    let mut count = gap / ENTRY_BYTES;
    let mut source = format!("{gap:#x} bytes to the next symbol at {next:#x}");
    if count > MAX_SYSCALLS {
        source.push_str(&format!(", capped at {MAX_SYSCALLS} entries"));
        count = MAX_SYSCALLS;
    }
    if count == 0 {
        return Err(Error::SyscallTable(format!(
            "{symbol} {address:#x} is followed by a symbol at {next:#x}: no room for an entry"
        )));
    }
    let bytes = usize::try_from(count * ENTRY_BYTES)
        .map_err(|_| Error::SyscallTable(format!("{count} entries")))?;
    let mut raw = vec![0u8; bytes];
    kernel.read(Gva(address), &mut raw)?;
    let padding = raw
        .chunks_exact(8)
        .rev()
        .take_while(|w| w.iter().all(|&b| b == 0))
        .count();
    let padding = u64::try_from(padding).unwrap_or(0);
    if padding > 0 && padding < count {
        count -= padding;
        source.push_str(&format!(
            ", less {padding} trailing zero word(s) of padding"
        ));
    }
    Ok((count, source))
}

/// `syscalls_metadata[0..count]`: each non-NULL pointer leads to a `struct syscall_metadata`
/// whose `name` is `sys_<call>` and whose `syscall_nr` must equal the index.
fn canonical_names(
    kernel: &Kernel<'_>,
    types: &KernelTypes,
    count: u64,
) -> Result<(Vec<Option<Arc<str>>>, usize)> {
    let name_off = types.offset_of("syscall_metadata", "name")?;
    let nr_off = types.offset_of("syscall_metadata", "syscall_nr")?;
    let variable = kernel.symbol("syscalls_metadata").map_err(|_| {
        Error::SyscallTable("no syscalls_metadata symbol (CONFIG_FTRACE_SYSCALLS off)".to_string())
    })?;
    let array = kernel.read_u64(Gva(variable))?;
    if array == 0 {
        return Err(Error::SyscallTable(
            "syscalls_metadata is NULL (syscall tracing not initialised)".to_string(),
        ));
    }
    let bytes = count
        .checked_mul(ENTRY_BYTES)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| Error::SyscallTable(format!("{count} metadata entries")))?;
    let mut raw = vec![0u8; bytes];
    kernel.read(Gva(array), &mut raw)?;
    let mut names = Vec::with_capacity(raw.len() / 8);
    let mut found = 0usize;
    for (index, chunk) in (0u64..).zip(raw.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let meta = u64::from_le_bytes(word);
        let name = if meta == 0 {
            None
        } else {
            metadata_name(kernel, meta, name_off, nr_off, index)
        };
        found += usize::from(name.is_some());
        names.push(name);
    }
    Ok((names, found))
}

/// One metadata record's name, if it is well-formed and describes `index`.
fn metadata_name(
    kernel: &Kernel<'_>,
    meta: u64,
    name_off: u64,
    nr_off: u64,
    index: u64,
) -> Option<Arc<str>> {
    let name_ptr = kernel.read_u64(Gva(meta.checked_add(name_off)?)).ok()?;
    let mut nr = [0u8; 4];
    kernel.read(Gva(meta.checked_add(nr_off)?), &mut nr).ok()?;
    if u64::from(u32::from_le_bytes(nr)) != index {
        return None;
    }
    let text = read_c_string(kernel, name_ptr, MAX_NAME)?;
    let call = text.strip_prefix("sys_").unwrap_or(&text);
    (!call.is_empty()).then(|| Arc::from(call))
}

/// A NUL-terminated ASCII name of at most `limit` bytes; reads stop at the page end first so a
/// short name at the end of a mapping still reads.
fn read_c_string(kernel: &Kernel<'_>, at: u64, limit: usize) -> Option<String> {
    let to_page_end = usize::try_from(0x1000 - (at & 0xfff)).ok()?;
    let mut buf = vec![0u8; limit.min(to_page_end)];
    kernel.read(Gva(at), &mut buf).ok()?;
    if buf.len() < limit && !buf.contains(&0) {
        let mut more = vec![0u8; limit - buf.len()];
        kernel
            .read(
                Gva(at.checked_add(u64::try_from(buf.len()).ok()?)?),
                &mut more,
            )
            .ok()?;
        buf.extend_from_slice(&more);
    }
    let end = buf.iter().position(|&b| b == 0)?;
    let name = buf.get(..end)?;
    name.iter()
        .all(|b| b.is_ascii_graphic())
        .then(|| String::from_utf8_lossy(name).into_owned())
}

impl Kernel<'_> {
    /// Every system-call table, judged entry by entry. Pass the kernel's types for canonical
    /// names from `syscalls_metadata`; without them names come from the entries' targets. To
    /// read repeatedly (a monitor), build a [`SyscallResolver`] once and call its `read`.
    pub fn syscall_tables(&self, types: Option<&KernelTypes>) -> Result<SyscallTables> {
        SyscallResolver::new(self, types)?.read(self)
    }

    /// The code of the system-call path ([`DISPATCHERS`] that exist in this kernel), each from
    /// its symbol to the next kernel symbol that is not one of its own labels, at most
    /// [`MAX_CODE_BYTES`]. Functions this kernel lacks are left out.
    pub fn dispatcher_code(&self) -> Result<Vec<CodeBlock>> {
        let mut out = Vec::new();
        for &name in DISPATCHERS {
            let Ok(address) = self.symbol(name) else {
                continue;
            };
            let Some(next) = code_end(self, name, address) else {
                continue;
            };
            let size = next - address;
            let truncated = size > MAX_CODE_BYTES;
            let len = usize::try_from(size.min(MAX_CODE_BYTES))
                .map_err(|_| Error::SyscallTable(format!("{name}: {size} bytes")))?;
            let mut bytes = vec![0u8; len];
            self.read(Gva(address), &mut bytes)?;
            out.push(CodeBlock {
                name,
                address,
                truncated,
                bytes,
            });
        }
        if out.is_empty() {
            return Err(Error::SyscallTable(format!(
                "none of {} is a kernel symbol",
                DISPATCHERS.join(", ")
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;
    use crate::{
        KernelLayout, KernelProfile, LayoutSource, Provenance, Symbol, SymbolSource, SymbolTable,
        VmcoreinfoSource,
    };
    use kvmaccess_btf::encode::BtfBuilder;
    use kvmaccess_core::Gpa;
    use kvmaccess_testkit::{MapFlags, MockMemory, PageSize, PageTableBuilder, TableFormat};

    const TEXT: u64 = 0xffff_ffff_8100_0000;
    const TEXT_PHYS: u64 = 0x0100_0000;
    const READ: u64 = TEXT + 0x1000;
    const WRITE: u64 = TEXT + 0x1100;
    const NI: u64 = TEXT + 0x1200;
    const IA32_READ: u64 = TEXT + 0x1300;
    const ENTRY: u64 = TEXT + 0x2000;
    const DO_SYSCALL: u64 = TEXT + 0x2100;
    const ETEXT: u64 = TEXT + 0x10_0000;
    const TABLE: u64 = TEXT + 0x20_0000;
    const META: u64 = TEXT + 0x30_0000;
    const MODULE_FN: u64 = 0xffff_ffff_c000_0040;

    fn symbols() -> Vec<Symbol> {
        let mut v = vec![
            Symbol::new("_stext", TEXT, 'T'),
            Symbol::new("__x64_sys_read", READ, 'T'),
            Symbol::new("__x64_sys_write", WRITE, 'T'),
            Symbol::new("__x64_sys_ni_syscall", NI, 'T'),
            Symbol::new("sys_ni_syscall", NI, 'T'),
            Symbol::new("__ia32_sys_read", IA32_READ, 'T'),
            Symbol::new("entry_SYSCALL_64", ENTRY, 'T'),
            Symbol::new("entry_SYSCALL_64_after_hwframe", ENTRY + 0x20, 'T'),
            Symbol::new("do_syscall_64", DO_SYSCALL, 'T'),
            Symbol::new("_etext", ETEXT, 'T'),
            Symbol::new("sys_call_table", TABLE, 'R'),
            Symbol::new("after_the_table", TABLE + 8 * 8, 'r'),
            Symbol::new("syscalls_metadata", META, 'd'),
            Symbol::new("after_metadata", META + 0x1000, 'd'),
        ];
        v.push(Symbol {
            module: Some(Arc::from("evil")),
            ..Symbol::new("evil_read", MODULE_FN - 0x40, 't')
        });
        v
    }

    fn kernel(mem: &MockMemory) -> Kernel<'_> {
        let mut tables = PageTableBuilder::with_table_area(
            mem,
            TableFormat::Level4,
            Gpa(0x10_0000),
            Gpa(0x20_0000),
        )
        .unwrap();
        for i in 0..4 {
            tables
                .map(
                    Gva(TEXT + i * 0x20_0000),
                    Gpa(TEXT_PHYS + i * 0x20_0000),
                    PageSize::Size2M,
                    MapFlags::KERNEL_RW,
                )
                .unwrap();
        }
        let profile = KernelProfile {
            release: "6.1.0-test".into(),
            build_id: None,
            layout: KernelLayout {
                mode: kvmaccess_x86::PagingMode::Level4,
                root: tables.root(),
                kaslr_offset: 0,
                phys_base: 0,
                page_offset_base: None,
            },
            vmcoreinfo: None,
            banner: None,
            symbols: SymbolTable::new(symbols()),
            provenance: Provenance {
                vmcoreinfo: VmcoreinfoSource::Provided,
                layout: LayoutSource::Vmcoreinfo,
                symbols: SymbolSource::Absent("test".into()),
                checks: Vec::new(),
                missing: Vec::new(),
                steps: Vec::new(),
            },
        };
        Kernel::from_profile(mem, profile)
    }

    fn phys(va: u64) -> Gpa {
        Gpa(va - TEXT + TEXT_PHYS)
    }

    fn write_table(mem: &MockMemory, entries: &[u64]) {
        for (i, &e) in entries.iter().enumerate() {
            mem.write_u64(phys(TABLE + 8 * i as u64), e).unwrap();
        }
    }

    fn types() -> KernelTypes {
        let mut b = BtfBuilder::new();
        let char_ = b.char();
        let int = b.int("int", 4, true);
        let name_ptr = b.ptr(char_);
        b.struct_(
            "syscall_metadata",
            24,
            &[
                ("name", name_ptr, 0, 0),
                ("syscall_nr", int, 64, 0),
                ("nb_args", int, 96, 0),
            ],
        );
        KernelTypes {
            btf: kvmaccess_btf::Btf::parse(&b.build()).unwrap(),
            origin: "a test".to_string(),
            bytes: 0,
            elapsed: std::time::Duration::ZERO,
        }
    }

    /// `syscalls_metadata` for numbers 0 (read) and 1 (write); the rest NULL.
    fn write_metadata(mem: &MockMemory) {
        let array = META + 0x100;
        mem.write_u64(phys(META), array).unwrap();
        for (nr, name) in [(0u64, "sys_read"), (1, "sys_write")] {
            let record = META + 0x200 + nr * 0x40;
            let text = META + 0x400 + nr * 0x40;
            mem.write_u64(phys(array + 8 * nr), record).unwrap();
            mem.write_u64(phys(record), text).unwrap();
            mem.write_u32(phys(record + 8), nr as u32).unwrap();
            mem.write_bytes(phys(text), format!("{name}\0").as_bytes())
                .unwrap();
        }
    }

    #[test]
    fn clean_and_hostile_entries() {
        let mem = MockMemory::new(64 << 20);
        let k = kernel(&mem);
        // 0 clean, 1 off the start of write, 2 unused, 3 nowhere, 4 a module, 5 wrong ABI,
        // then two words of padding before the next symbol.
        write_table(
            &mem,
            &[
                READ,
                WRITE + 0x10,
                NI,
                0xdead_0000_0000,
                MODULE_FN,
                IA32_READ,
            ],
        );
        let tables = k.syscall_tables(None).unwrap();
        assert!(tables.ia32.is_none() && tables.x32.is_none());
        assert!(tables
            .notes
            .iter()
            .any(|n| n.contains("ia32_sys_call_table: absent")));
        let x64 = &tables.x64;
        assert_eq!(x64.entries.len(), 6, "{}", x64.count_source);
        assert!(x64.count_source.contains("padding"), "{}", x64.count_source);
        let e = &x64.entries;
        assert!(e[0].expected && e[0].name.as_deref() == Some("read"));
        assert_eq!(e[0].target.as_deref(), Some("__x64_sys_read"));
        assert_eq!(e[0].name_source, NameSource::Symbol);
        assert!(!e[1].expected);
        assert_eq!(e[1].target.as_deref(), Some("__x64_sys_write+0x10"));
        assert_eq!(e[1].owner, EntryOwner::KernelText);
        assert!(e[2].expected && e[2].unused && e[2].name.is_none());
        assert!(!e[3].expected);
        assert_eq!(e[3].owner, EntryOwner::Unowned);
        assert_eq!(e[3].name_source, NameSource::Unknown);
        assert!(!e[4].expected);
        assert_eq!(e[4].owner, EntryOwner::Module("evil".into()));
        assert_eq!(e[4].target.as_deref(), Some("evil_read+0x40 [evil]"));
        assert!(!e[5].expected);
        assert_eq!(x64.unexpected().count(), 4);
        let json = serde_json::to_value(&tables).unwrap();
        assert_eq!(json["x64"]["entries"][0]["address"], format!("{READ:#x}"));
        assert_eq!(json["x64"]["entries"][4]["owner"]["name"], "evil");
    }

    #[test]
    fn metadata_names_a_hooked_entry() {
        let mem = MockMemory::new(64 << 20);
        let k = kernel(&mem);
        write_metadata(&mem);
        // read hooked to write's wrapper; write clean; 2 unused.
        write_table(&mem, &[WRITE, WRITE, NI, NI, NI, NI, NI, NI]);
        let tables = k.syscall_tables(Some(&types())).unwrap();
        let e = &tables.x64.entries;
        assert_eq!(e.len(), 8);
        assert_eq!(e[0].name.as_deref(), Some("read"));
        assert_eq!(e[0].name_source, NameSource::Metadata);
        assert!(!e[0].expected, "write's wrapper in read's slot");
        assert!(e[1].expected);
        assert!(e[2].expected && e[2].unused);
        assert!(tables
            .notes
            .iter()
            .any(|n| n.contains("syscalls_metadata (2 of 8")));
        // A disabled call (metadata says write, the table says not implemented).
        write_table(&mem, &[READ, NI]);
        let e = k.syscall_tables(Some(&types())).unwrap().x64.entries;
        assert!(e[0].expected && !e[1].expected);
        // Metadata whose number disagrees with its slot is ignored.
        mem.write_u32(phys(META + 0x200 + 8), 7).unwrap();
        let e = k.syscall_tables(Some(&types())).unwrap().x64.entries;
        assert_eq!(e[0].name_source, NameSource::Symbol);
    }

    #[test]
    fn missing_table_and_unreadable_table() {
        let mem = MockMemory::new(64 << 20);
        let mut k = kernel(&mem);
        // Table pointing into unmapped memory.
        let table = k.symbols().address_of("sys_call_table").unwrap();
        assert_eq!(table, TABLE);
        k.symbols_mut().merge([
            Symbol::new("ia32_sys_call_table", 0xffff_ffff_9000_0000, 'R'),
            Symbol::new("after_ia32", 0xffff_ffff_9000_1000, 'R'),
        ]);
        // An unreadable compatibility table is a note; the x64 table still reads.
        let tables = k.syscall_tables(None).unwrap();
        assert!(tables.ia32.is_none());
        assert!(
            tables
                .notes
                .iter()
                .any(|n| n.starts_with("ia32_sys_call_table at")),
            "{:?}",
            tables.notes
        );
        assert!(tables.x64.entries.iter().all(|e| !e.expected));
        k.symbols_mut()
            .merge([Symbol::new("x32_sys_call_table", TABLE, 'R')]);
        let tables = k.syscall_tables(None).unwrap();
        assert_eq!(tables.x32.unwrap().entries.len(), 8);
        let empty = Kernel::from_profile(&mem, {
            let mut p = kernel(&mem).into_profile();
            p.symbols = SymbolTable::new(vec![Symbol::new("_stext", TEXT, 'T')]);
            p
        });
        assert!(matches!(
            empty.syscall_tables(None),
            Err(Error::SyscallTable(_))
        ));
    }

    #[test]
    fn dispatcher_code_is_copied_up_to_the_next_symbol() {
        let mem = MockMemory::new(64 << 20);
        let k = kernel(&mem);
        mem.write_bytes(phys(ENTRY), &[0x0f, 0x01, 0xf8]).unwrap();
        let code = k.dispatcher_code().unwrap();
        let names: Vec<&str> = code.iter().map(|c| c.name).collect();
        assert_eq!(names, ["entry_SYSCALL_64", "do_syscall_64"]);
        assert_eq!(code[0].bytes.len(), 0x100);
        assert_eq!(&code[0].bytes[..3], &[0x0f, 0x01, 0xf8]);
        // do_syscall_64 runs to _etext: far more than the cap.
        assert!(code[1].truncated);
        assert_eq!(code[1].bytes.len() as u64, MAX_CODE_BYTES);
        let json = serde_json::to_value(&code[0]).unwrap();
        assert!(json["bytes"].as_str().unwrap().starts_with("0f01f8"));
    }
}
