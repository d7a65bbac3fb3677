//! System-call tables and the code of the system-call path.
//!
//! Since Linux 6.9 (and stable backports: Debian's 6.1.0-2x and later have it) x86-64
//! dispatches through the `x64_sys_call` switch, not through `sys_call_table`: the table is then
//! read only by tracing, and an inline hook in the dispatcher is the real threat. Both are
//! checked: a rewritten table entry is still a rootkit's act.
//!
//! The tables are located here from symbols (table start to the next symbol). When
//! `kvmaccess_linux::syscalls` (`Kernel::syscall_tables`, `SyscallResolver`) is available in
//! the tree this crate builds against, its table reader can replace `read_plan`; the comparison
//! stays the same.

use std::sync::Mutex;

use kvmaccess_core::Gva;
use serde::{Deserialize, Serialize};

use super::text::{compare_region, report, RegionCache, RegionState};
use crate::baseline::Blobs;
use crate::engine::{Check, CheckBaseline, Context};
use crate::error::{Error, Result};
use crate::finding::{Finding, Severity, Target};
use crate::location::Location;

/// Most entries read from one table (x86-64 has ~460).
const MAX_SYSCALLS: u64 = 1024;
/// Largest dispatcher function compared.
const MAX_CODE: u64 = 64 << 10;
/// (ABI, table symbol).
const TABLES: &[(&str, &str)] = &[
    ("x64", "sys_call_table"),
    ("ia32", "ia32_sys_call_table"),
    ("x32", "x32_sys_call_table"),
];
/// The code a system call runs through, when the kernel has it.
const DISPATCHERS: &[&str] = &[
    "entry_SYSCALL_64",
    "do_syscall_64",
    "x64_sys_call",
    "ia32_sys_call",
    "x32_sys_call",
];
const WRAPPER_PREFIXES: &[&str] = &[
    "__x64_sys_",
    "__ia32_compat_sys_",
    "__ia32_sys_",
    "__x32_compat_sys_",
    "compat_sys_",
    "sys_",
];

/// System-call check (`syscalls`).
#[derive(Debug, Default)]
pub struct SyscallCheck {
    cache: Mutex<RegionCache>,
    parsed: super::Parsed<SyscallState>,
    clean: Mutex<Option<CleanTables>>,
}

/// The tables as the last pass that found every entry in place read them, and what that
/// verdict rested on besides their bytes. The same entries under the same baseline, KASLR slide
/// and module ranges give the same verdict, so a watch compares a few KiB instead of resolving
/// every baseline entry through the symbol table each second.
#[derive(Debug, PartialEq, Eq)]
struct CleanTables {
    baseline: String,
    kaslr_offset: u64,
    modules: Vec<crate::location::ModuleSpan>,
    entries: Vec<Vec<u64>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TableState {
    pub abi: String,
    pub symbol: String,
    pub entries: Vec<Location>,
    /// System-call name per number, from the symbol each entry pointed at when captured.
    pub names: Vec<Option<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SyscallState {
    pub tables: Vec<TableState>,
    pub dispatchers: Vec<RegionState>,
    pub notes: Vec<String>,
}

/// The first kernel-image symbol above `address`.
pub(crate) fn next_symbol(ctx: &Context<'_, '_>, address: u64) -> Option<u64> {
    ctx.map
        .symbols()
        .iter()
        .filter(|s| s.module.is_none() && !s.is_absolute() && s.address > address)
        .map(|s| s.address)
        .min()
}

/// The system-call name a wrapper symbol stands for.
pub(crate) fn syscall_name(symbol: &str) -> Option<String> {
    if symbol.ends_with("sys_ni_syscall") {
        return Some("ni_syscall".into());
    }
    WRAPPER_PREFIXES
        .iter()
        .find_map(|p| symbol.strip_prefix(p))
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// Read a table's entries: `count` pointers at `address`.
pub(crate) fn read_entries(ctx: &Context<'_, '_>, address: u64, count: u64) -> Result<Vec<u64>> {
    let count = usize::try_from(count.min(MAX_SYSCALLS)).unwrap_or(0);
    let mut raw = vec![0u8; count * 8];
    ctx.kernel.read(Gva(address), &mut raw)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

impl Check for SyscallCheck {
    fn id(&self) -> &'static str {
        "syscalls"
    }

    fn description(&self) -> &'static str {
        "system-call tables entry by entry, and the dispatcher code (entry_SYSCALL_64, \
         do_syscall_64, x64_sys_call)"
    }

    fn capture(&self, ctx: &Context<'_, '_>, blobs: &mut Blobs) -> Result<serde_json::Value> {
        let mut state = SyscallState {
            tables: Vec::new(),
            dispatchers: Vec::new(),
            notes: Vec::new(),
        };
        for &(abi, symbol) in TABLES {
            let Ok(address) = ctx.kernel.symbol(symbol) else {
                if abi == "x64" {
                    return Err(Error::Implausible(
                        "the kernel has no sys_call_table".into(),
                    ));
                }
                state.notes.push(format!("{symbol}: not in this kernel"));
                continue;
            };
            let count = next_symbol(ctx, address)
                .map(|n| (n - address) / 8)
                .filter(|&c| (1..=MAX_SYSCALLS).contains(&c))
                .ok_or_else(|| {
                    Error::Implausible(format!("cannot size {symbol} at {address:#x}"))
                })?;
            let entries = read_entries(ctx, address, count)?;
            // Wrappers share their address with aliases (`__do_sys_getpid`); the name comes
            // from the wrapper symbol among them.
            let wanted: std::collections::HashSet<u64> = entries.iter().copied().collect();
            let mut wrappers: std::collections::HashMap<u64, String> =
                std::collections::HashMap::new();
            for sym in ctx.map.symbols().iter() {
                if sym.module.is_none() && wanted.contains(&sym.address) {
                    if let Some(n) = syscall_name(&sym.name) {
                        let better = sym.name.starts_with("__x64_sys_")
                            || !wrappers.contains_key(&sym.address);
                        if better {
                            wrappers.insert(sym.address, n);
                        }
                    }
                }
            }
            state.tables.push(TableState {
                abi: abi.to_string(),
                symbol: symbol.to_string(),
                names: entries.iter().map(|e| wrappers.get(e).cloned()).collect(),
                entries: entries.iter().map(|&e| ctx.map.encode(e)).collect(),
            });
        }
        for &name in DISPATCHERS {
            let Ok(address) = ctx.kernel.symbol(name) else {
                continue;
            };
            let Some(next) = next_symbol(ctx, address) else {
                continue;
            };
            let len = (next - address).min(MAX_CODE);
            let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
            ctx.kernel.read(Gva(address), &mut bytes)?;
            let blob = format!("syscalls/{name}");
            blobs.put(blob.clone(), &bytes);
            state.dispatchers.push(RegionState {
                name: name.to_string(),
                start: ctx.map.encode(address),
                len,
                blob,
                code: true,
            });
        }
        super::to_value("syscalls", &state)
    }

    fn verify(&self, ctx: &Context<'_, '_>, baseline: CheckBaseline<'_>) -> Result<Vec<Finding>> {
        let state = self.parsed.get("syscalls", &baseline)?;
        let dispatch_by_switch = ctx.kernel.symbol("x64_sys_call").is_ok();
        let mut out = Vec::new();
        let mut seen = CleanTables {
            baseline: super::baseline_identity(&baseline),
            kaslr_offset: ctx.kernel.layout().kaslr_offset,
            modules: ctx.map.modules.clone(),
            entries: Vec::with_capacity(state.tables.len()),
        };
        for table in &state.tables {
            let address = ctx.kernel.symbol(&table.symbol)?;
            let count = u64::try_from(table.entries.len()).unwrap_or(0);
            seen.entries.push(read_entries(ctx, address, count)?);
        }
        let mut clean = self.clean.lock().unwrap_or_else(|p| p.into_inner());
        let tables_unchanged = clean.as_ref() == Some(&seen);
        for (table, now) in state.tables.iter().zip(&seen.entries) {
            if tables_unchanged {
                break;
            }
            for (number, (&value, was)) in now.iter().zip(&table.entries).enumerate() {
                if ctx.map.decode(was) == Some(value) {
                    continue;
                }
                let loc = ctx.map.encode(value);
                if loc.same_place(was) {
                    continue;
                }
                let number32 = u32::try_from(number).unwrap_or(u32::MAX);
                let name = table
                    .names
                    .get(number)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| "?".into());
                let owner = ctx.map.owner(value);
                let severity = if owner.is_kernel_text() {
                    Severity::High
                } else {
                    Severity::Critical
                };
                let mut f = ctx.finding(
                    "syscalls",
                    severity,
                    "table-hook",
                    table.symbol.clone(),
                    format!("syscall {number} ({name})"),
                );
                f.expected = was.to_string();
                f.actual = match loc {
                    Location::Absolute { .. } => loc.to_string(),
                    _ => format!("{value:#x} ({loc})"),
                };
                f.owner = Some(owner.to_string());
                f.explanation = format!(
                    "{} entry {number} ({name}) now points to {loc} in {owner} instead of {was}{}",
                    table.abi,
                    if dispatch_by_switch && table.abi == "x64" {
                        "; this kernel dispatches x86-64 calls through x64_sys_call, so the \
                         entry is read by tracing only, but rewriting it is a rootkit's act"
                    } else {
                        ""
                    }
                );
                f.target = Target::SyscallEntry {
                    table: table.symbol.clone(),
                    number: number32,
                };
                out.push(f);
            }
        }
        *clean = out.is_empty().then_some(seen);
        drop(clean);
        let delta = ctx
            .kernel
            .layout()
            .kaslr_offset
            .wrapping_sub(baseline.baseline.kaslr_offset);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for region in &state.dispatchers {
            let old = baseline.baseline.blob(&region.blob)?;
            let start = ctx.map.decode(&region.start).ok_or_else(|| {
                Error::Implausible(format!("{}: {} not found", region.name, region.start))
            })?;
            let changes =
                compare_region(ctx, &mut cache, &region.name, start, old, true, delta, None)?;
            out.extend(report(ctx, "syscalls", &region.name, start, &changes));
        }
        Ok(out)
    }
}
