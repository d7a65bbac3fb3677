//! Callbacks the kernel runs on function entry: registered ftrace ops and kprobes.
//!
//! A rootkit no longer needs to write kernel text to hook a function: `register_ftrace_function`
//! with `FTRACE_OPS_FL_IPMODIFY` lets a callback rewrite the saved instruction pointer, and a
//! kprobe's handler runs before the probed instruction. The text check sees only the kernel's
//! own ftrace call or int3 (legitimate state changes); this check looks at who the callbacks
//! belong to.
//!
//! * `ftrace_ops_list`: a singly linked list of `struct ftrace_ops` through `next`, ending at
//!   `&ftrace_list_end`. For each ops the callback (`func`, and `saved_func`, the original the
//!   kernel keeps while it substitutes a PID filter), its flags (bit values from the kernel's own
//!   `FTRACE_OPS_FL_*` enumerators in BTF) and the functions of its filter hash
//!   (`func_hash->filter_hash`; an empty hash means every traceable function).
//! * `kprobe_table`: 64 hash buckets of `struct kprobe` through `hlist`. Aggregated probes
//!   (several on one address) are walked through their `list`; a kretprobe's own handlers are
//!   read from the `struct kretprobe` around its kprobe.
//!
//! Grading: a callback in kernel text is the kernel's own tracing (function tracer, graph
//! tracer, kprobe events, BPF, livepatch's handler) and is not reported. A callback in a module
//! is **high**: modules may trace, but one that redirects functions is what a rootkit looks like.
//! If the baseline already had the same callback (same module, same offset), it is reported as
//! **medium** "present since the baseline" instead: a baseline cannot vouch for it (it may have
//! been taken on an infected guest), but an operator who accepted it should not get a high alarm
//! every pass. A callback in memory no module owns is **critical** whatever the baseline says.
//!
//! Bounds: at most [`MAX_OPS`] ops, [`MAX_KPROBES`] kprobes, [`MAX_HASH_ENTRIES`] filter
//! entries per ops; hash buckets at most 2^16; cycles are errors.

use std::collections::HashSet;

use kvmaccess_core::Gva;
use kvmaccess_linux::{walk_hlist, walk_list, KernelTypes};
use serde::{Deserialize, Serialize};

use crate::baseline::Blobs;
use crate::engine::{Check, CheckBaseline, Context};
use crate::error::{Error, Result};
use crate::finding::{Finding, Severity};
use crate::location::{Location, Owner};

pub(crate) const DESCRIPTION: &str = "registered ftrace ops and kprobes whose callbacks live in a \
     module or in unowned memory, with the functions they hook";

/// Most ftrace ops walked.
pub const MAX_OPS: usize = 4096;
/// Most kprobes walked (all buckets and aggregates together).
pub const MAX_KPROBES: usize = 65_536;
/// Most filter-hash entries read per ops (and named in a finding).
pub const MAX_HASH_ENTRIES: usize = 1000;
/// Largest `ftrace_hash.size_bits` accepted (the kernel's maximum is 12).
const MAX_HASH_BITS: u64 = 16;
/// `KPROBE_TABLE_SIZE` (1 << `KPROBE_HASH_BITS`, 6 since 2.6): a `#define`, not in BTF.
const KPROBE_TABLE_SIZE: u64 = 64;
/// Bytes before the `__fentry__` call of a function (`endbr64` is 4).
const FENTRY_SLACK: u64 = 8;
/// Function names spelled out in a finding's entry; the rest are counted.
const NAMES_IN_ENTRY: usize = 8;

/// The `FTRACE_OPS_FL_*` flags looked up in BTF (the enumerator is `FTRACE_OPS_FL_<name>`).
const FLAG_NAMES: &[&str] = &[
    "ENABLED",
    "DYNAMIC",
    "SAVE_REGS",
    "SAVE_REGS_IF_SUPPORTED",
    "RECURSION",
    "STUB",
    "INITIALIZED",
    "DELETED",
    "ADDING",
    "REMOVING",
    "MODIFYING",
    "ALLOC_TRAMP",
    "IPMODIFY",
    "PID",
    "RCU",
    "TRACE_ARRAY",
    "PERMANENT",
    "DIRECT",
];

/// Where the ftrace fields live in this kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FtraceOffsets {
    /// `ftrace_ops.func`.
    pub ops_func: u64,
    /// `ftrace_ops.next`.
    pub ops_next: u64,
    /// `ftrace_ops.flags`.
    pub ops_flags: u64,
    /// `ftrace_ops.saved_func`.
    pub ops_saved_func: Option<u64>,
    /// `ftrace_ops.func_hash` (CONFIG_DYNAMIC_FTRACE).
    pub ops_func_hash: Option<u64>,
    /// `ftrace_ops_hash.filter_hash`.
    pub hash_filter: u64,
    /// `ftrace_hash.size_bits`.
    pub hash_size_bits: u64,
    /// `ftrace_hash.buckets`.
    pub hash_buckets: u64,
    /// `ftrace_hash.count`.
    pub hash_count: u64,
    /// `ftrace_func_entry.hlist`.
    pub entry_hlist: u64,
    /// `ftrace_func_entry.ip`.
    pub entry_ip: u64,
    /// `hlist_node.next`.
    pub hlist_next: u64,
    /// `(name without FTRACE_OPS_FL_, mask)` of every flag this kernel has.
    pub flags: Vec<(String, u64)>,
    /// kprobes, when the kernel has them.
    pub kprobes: Option<KprobeOffsets>,
}

/// Where the kprobe fields live in this kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KprobeOffsets {
    /// `kprobe.hlist`.
    pub hlist: u64,
    /// `kprobe.list` (the probes of an aggregate).
    pub list: u64,
    /// `list_head.next`.
    pub list_next: u64,
    /// `kprobe.addr`.
    pub addr: u64,
    /// `kprobe.pre_handler`.
    pub pre_handler: u64,
    /// `kprobe.post_handler`.
    pub post_handler: u64,
    /// `kretprobe.kp`.
    pub kretprobe_kp: Option<u64>,
    /// `kretprobe.handler`.
    pub kretprobe_handler: Option<u64>,
    /// `kretprobe.entry_handler`.
    pub kretprobe_entry_handler: Option<u64>,
}

impl FtraceOffsets {
    /// Resolve the offsets and flag values from the kernel's BTF.
    pub fn from_types(types: &KernelTypes) -> Result<Self> {
        let o = |t: &str, p: &str| types.offset_of(t, p);
        let flags = FLAG_NAMES
            .iter()
            .filter_map(|name| {
                let v = types
                    .btf
                    .enumerator_value(&format!("FTRACE_OPS_FL_{name}"))?;
                let v = u64::try_from(v).ok().filter(|v| v.count_ones() == 1)?;
                Some(((*name).to_string(), v))
            })
            .collect();
        let kprobes = (|| -> Result<KprobeOffsets> {
            Ok(KprobeOffsets {
                hlist: o("kprobe", "hlist")?,
                list: o("kprobe", "list")?,
                list_next: o("list_head", "next")?,
                addr: o("kprobe", "addr")?,
                pre_handler: o("kprobe", "pre_handler")?,
                post_handler: o("kprobe", "post_handler")?,
                kretprobe_kp: o("kretprobe", "kp").ok(),
                kretprobe_handler: o("kretprobe", "handler").ok(),
                kretprobe_entry_handler: o("kretprobe", "entry_handler").ok(),
            })
        })()
        .ok();
        Ok(Self {
            ops_func: o("ftrace_ops", "func")?,
            ops_next: o("ftrace_ops", "next")?,
            ops_flags: o("ftrace_ops", "flags")?,
            ops_saved_func: o("ftrace_ops", "saved_func").ok(),
            ops_func_hash: o("ftrace_ops", "func_hash").ok(),
            hash_filter: o("ftrace_ops_hash", "filter_hash")?,
            hash_size_bits: o("ftrace_hash", "size_bits")?,
            hash_buckets: o("ftrace_hash", "buckets")?,
            hash_count: o("ftrace_hash", "count")?,
            entry_hlist: o("ftrace_func_entry", "hlist")?,
            entry_ip: o("ftrace_func_entry", "ip")?,
            hlist_next: o("hlist_node", "next")?,
            flags,
            kprobes,
        })
    }

    fn flag(&self, name: &str) -> Option<u64> {
        self.flags.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }

    fn flag_words(&self, flags: u64) -> String {
        let mut words: Vec<String> = Vec::new();
        let mut rest = flags;
        for (name, mask) in &self.flags {
            if flags & mask != 0 {
                words.push(name.clone());
                rest &= !mask;
            }
        }
        if rest != 0 || words.is_empty() {
            words.push(format!("{rest:#x}"));
        }
        words.join("|")
    }
}

/// ftrace and kprobe check (`ftrace`).
#[derive(Debug, Default)]
pub struct FtraceCheck {
    offsets: super::Derived<FtraceOffsets>,
    /// For naming hidden modules that own otherwise unowned callbacks.
    module_offsets: super::Derived<kvmaccess_linux::ModuleOffsets>,
    parsed: super::Parsed<FtraceState>,
}

impl FtraceCheck {
    /// A check using these offsets instead of deriving them from the kernel's BTF.
    pub fn with_offsets(offsets: FtraceOffsets) -> Self {
        Self {
            offsets: super::Derived::fixed(offsets),
            ..Self::default()
        }
    }

    /// Also use these module offsets, instead of deriving them from the kernel's BTF, to look
    /// for hidden modules that own otherwise unowned callbacks.
    pub fn with_module_offsets(self, offsets: kvmaccess_linux::ModuleOffsets) -> Self {
        Self {
            module_offsets: super::Derived::fixed(offsets),
            ..self
        }
    }
}

/// A callback outside kernel text as captured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HookState {
    /// `ftrace` or `kprobe`.
    pub kind: String,
    pub callback: Location,
    /// What it hooks (functions of the filter, or the probed address), at most a few.
    pub targets: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FtraceState {
    pub hooks: Vec<HookState>,
}

/// One callback found outside kernel text.
#[derive(Clone, Debug)]
pub(crate) struct Hook {
    pub kind: &'static str,
    /// The `ftrace_ops` or `kprobe`.
    pub object: u64,
    pub callback: u64,
    pub owner: Owner,
    /// Names of the hooked functions (an empty list with `all` set: every function).
    pub targets: Vec<String>,
    pub all: bool,
    /// Hooked functions in total (the filter's count; may exceed `targets`).
    pub total: u64,
    pub flags: String,
    pub ipmodify: bool,
}

fn read_u64(ctx: &Context<'_, '_>, at: u64, what: &str) -> Result<u64> {
    ctx.kernel
        .read_u64(Gva(at))
        .map_err(|e| Error::Implausible(format!("{what} at {at:#x}: {e}")))
}

fn at(base: u64, off: u64, what: &str) -> Result<u64> {
    base.checked_add(off)
        .ok_or_else(|| Error::Implausible(format!("{what}: {base:#x} + {off:#x} overflows")))
}

/// The function an ftrace site or probe address is in. ftrace records point at the `__fentry__`
/// call, which follows an `endbr64` on kernels built with IBT: a few bytes into the function are
/// still "the function".
fn name_of(ctx: &Context<'_, '_>, ip: u64) -> String {
    match ctx.map.symbols().addr2sym(ip) {
        Some((sym, off)) if off <= FENTRY_SLACK => sym.name.clone(),
        _ => ctx.map.describe(ip).unwrap_or_else(|| format!("{ip:#x}")),
    }
}

/// Whether an owner is the kernel's own code: its callbacks are not reported.
fn kernel_code(owner: &Owner) -> bool {
    owner.is_kernel_text()
}

/// The functions of an ops' filter hash: `(names, total, all)`.
fn filter_functions(
    ctx: &Context<'_, '_>,
    off: &FtraceOffsets,
    ops: u64,
) -> Result<(Vec<String>, u64, bool)> {
    let Some(func_hash) = off.ops_func_hash else {
        return Ok((Vec::new(), 0, true));
    };
    let ops_hash = read_u64(
        ctx,
        at(ops, func_hash, "ftrace_ops.func_hash")?,
        "func_hash",
    )?;
    if ops_hash == 0 {
        return Ok((Vec::new(), 0, true));
    }
    let hash = read_u64(
        ctx,
        at(ops_hash, off.hash_filter, "filter_hash")?,
        "filter_hash",
    )?;
    if hash == 0 {
        return Ok((Vec::new(), 0, true));
    }
    let count = read_u64(ctx, at(hash, off.hash_count, "count")?, "ftrace_hash.count")?;
    if count == 0 {
        // The empty filter: the ops sees every traceable function.
        return Ok((Vec::new(), 0, true));
    }
    let bits = read_u64(
        ctx,
        at(hash, off.hash_size_bits, "size_bits")?,
        "ftrace_hash.size_bits",
    )?;
    if bits > MAX_HASH_BITS {
        return Err(Error::Implausible(format!(
            "ftrace hash at {hash:#x} of ops {ops:#x} claims 2^{bits} buckets"
        )));
    }
    let buckets = read_u64(
        ctx,
        at(hash, off.hash_buckets, "buckets")?,
        "ftrace_hash.buckets",
    )?;
    let mut heads = vec![0u8; 8usize << bits];
    ctx.kernel.read(Gva(buckets), &mut heads)?;
    let mut names = Vec::new();
    let mut seen = HashSet::new();
    'buckets: for head in heads.chunks_exact(8) {
        let mut node = u64::from_le_bytes(head.try_into().unwrap_or([0; 8]));
        while node != 0 {
            if names.len() >= MAX_HASH_ENTRIES {
                break 'buckets;
            }
            if !seen.insert(node) {
                return Err(Error::Implausible(format!(
                    "ftrace hash at {hash:#x} of ops {ops:#x} loops at {node:#x}"
                )));
            }
            let entry = node.checked_sub(off.entry_hlist).ok_or_else(|| {
                Error::Implausible(format!("ftrace hash node {node:#x} below its entry"))
            })?;
            let ip = read_u64(ctx, at(entry, off.entry_ip, "ip")?, "ftrace_func_entry.ip")?;
            names.push(name_of(ctx, ip));
            node = read_u64(ctx, at(node, off.hlist_next, "next")?, "hlist_node.next")?;
        }
    }
    let total = count.max(u64::try_from(names.len()).unwrap_or(u64::MAX));
    Ok((names, total, false))
}

/// Ops on `ftrace_ops_list` whose callback is not kernel text.
pub(crate) fn ftrace_hooks(ctx: &Context<'_, '_>, off: &FtraceOffsets) -> Result<Vec<Hook>> {
    let (Ok(list), Ok(end)) = (
        ctx.kernel.symbol("ftrace_ops_list"),
        ctx.kernel.symbol("ftrace_list_end"),
    ) else {
        // A kernel without function tracing has no ops to hook with.
        return Ok(Vec::new());
    };
    let stop = |p: u64| if p == end { 0 } else { p };
    let first = stop(read_u64(ctx, list, "ftrace_ops_list")?);
    let ops_list = walk_hlist("ftrace_ops_list", first, MAX_OPS, |ops| {
        Ok(stop(
            ctx.kernel.read_u64(Gva(ops.saturating_add(off.ops_next)))?,
        ))
    })?;
    let mut hooks = Vec::new();
    for ops in ops_list {
        let func = read_u64(ctx, at(ops, off.ops_func, "func")?, "ftrace_ops.func")?;
        let saved = match off.ops_saved_func {
            Some(o) => read_u64(ctx, at(ops, o, "saved_func")?, "ftrace_ops.saved_func")?,
            None => 0,
        };
        let flags = read_u64(ctx, at(ops, off.ops_flags, "flags")?, "ftrace_ops.flags")?;
        // The worse of the two callbacks decides (the kernel swaps in a PID filter as `func`
        // and keeps the original in `saved_func`).
        let Some((callback, owner)) = [func, saved]
            .into_iter()
            .filter(|&c| c != 0)
            .map(|c| (c, ctx.map.owner(c)))
            .filter(|(_, o)| !kernel_code(o))
            .max_by_key(|(_, o)| u8::from(!matches!(o, Owner::Module { .. })))
        else {
            continue;
        };
        let (targets, total, all) = filter_functions(ctx, off, ops)?;
        hooks.push(Hook {
            kind: "ftrace",
            object: ops,
            callback,
            owner,
            targets,
            all,
            total,
            flags: off.flag_words(flags),
            ipmodify: off.flag("IPMODIFY").is_some_and(|m| flags & m != 0),
        });
    }
    Ok(hooks)
}

/// Kprobes whose handlers are not kernel text.
pub(crate) fn kprobe_hooks(ctx: &Context<'_, '_>, off: &KprobeOffsets) -> Result<Vec<Hook>> {
    let Ok(table) = ctx.kernel.symbol("kprobe_table") else {
        return Ok(Vec::new());
    };
    let aggr = ctx.kernel.symbol("aggr_pre_handler").ok();
    let kret = ctx.kernel.symbol("pre_handler_kretprobe").ok();
    let mut heads = vec![0u8; usize::try_from(KPROBE_TABLE_SIZE * 8).unwrap_or(512)];
    ctx.kernel.read(Gva(table), &mut heads)?;
    let mut probes = Vec::new();
    for head in heads.chunks_exact(8) {
        let first = u64::from_le_bytes(head.try_into().unwrap_or([0; 8]));
        let budget = MAX_KPROBES.saturating_sub(probes.len());
        let nodes = walk_hlist("kprobe_table bucket", first, budget, |n| {
            ctx.kernel.read_u64(Gva(n.saturating_add(off.hlist)))
        })?;
        for node in nodes {
            let p = node.checked_sub(off.hlist).ok_or_else(|| {
                Error::Implausible(format!("kprobe hlist node {node:#x} below its kprobe"))
            })?;
            probes.push(p);
        }
    }
    let mut hooks = Vec::new();
    let mut walked = 0usize;
    let mut queue: Vec<u64> = probes;
    while let Some(p) = queue.pop() {
        walked = walked.saturating_add(1);
        if walked > MAX_KPROBES {
            return Err(Error::Implausible(format!(
                "more than {MAX_KPROBES} kprobes (with aggregates)"
            )));
        }
        let pre = read_u64(ctx, at(p, off.pre_handler, "pre")?, "kprobe.pre_handler")?;
        let post = read_u64(ctx, at(p, off.post_handler, "post")?, "kprobe.post_handler")?;
        let addr = read_u64(ctx, at(p, off.addr, "addr")?, "kprobe.addr")?;
        if pre != 0 && aggr == Some(pre) {
            // An aggregate: the real probes hang on its list.
            let head = at(p, off.list, "kprobe.list")?;
            let members = walk_list("aggregated kprobes", head, MAX_KPROBES, |n| {
                ctx.kernel.read_u64(Gva(n.saturating_add(off.list_next)))
            })?;
            for m in members {
                queue.push(m.checked_sub(off.list).ok_or_else(|| {
                    Error::Implausible(format!("kprobe list node {m:#x} below its kprobe"))
                })?);
            }
            continue;
        }
        let mut handlers = vec![pre, post];
        if pre != 0 && kret == Some(pre) {
            if let (Some(kp), Some(h)) = (off.kretprobe_kp, off.kretprobe_handler) {
                if let Some(rp) = p.checked_sub(kp) {
                    handlers.push(read_u64(ctx, at(rp, h, "handler")?, "kretprobe.handler")?);
                    if let Some(e) = off.kretprobe_entry_handler {
                        handlers.push(read_u64(
                            ctx,
                            at(rp, e, "entry_handler")?,
                            "kretprobe.entry_handler",
                        )?);
                    }
                }
            }
        }
        let Some((callback, owner)) = handlers
            .into_iter()
            .filter(|&c| c != 0)
            .map(|c| (c, ctx.map.owner(c)))
            .filter(|(_, o)| !kernel_code(o))
            .max_by_key(|(_, o)| u8::from(!matches!(o, Owner::Module { .. })))
        else {
            continue;
        };
        hooks.push(Hook {
            kind: "kprobe",
            object: p,
            callback,
            owner,
            targets: vec![name_of(ctx, addr)],
            all: false,
            total: 1,
            flags: String::new(),
            ipmodify: false,
        });
    }
    hooks.sort_by_key(|h| h.object);
    Ok(hooks)
}

fn all_hooks(ctx: &Context<'_, '_>, off: &FtraceOffsets) -> Result<Vec<Hook>> {
    let mut hooks = ftrace_hooks(ctx, off)?;
    if let Some(k) = &off.kprobes {
        hooks.extend(kprobe_hooks(ctx, k)?);
    }
    Ok(hooks)
}

fn state_of(ctx: &Context<'_, '_>, h: &Hook) -> HookState {
    HookState {
        kind: h.kind.to_string(),
        callback: ctx.map.encode(h.callback),
        targets: h.targets.iter().take(NAMES_IN_ENTRY).cloned().collect(),
    }
}

fn targets_text(h: &Hook, limit: usize) -> String {
    if h.all {
        return "every traceable function".into();
    }
    let mut text = h
        .targets
        .iter()
        .take(limit)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let shown = u64::try_from(h.targets.len().min(limit)).unwrap_or(u64::MAX);
    if h.total > shown {
        text.push_str(&format!(" and {} more", h.total - shown));
    }
    text
}

fn finding(ctx: &Context<'_, '_>, h: &Hook, baselined: bool) -> Finding {
    // A module that hid itself is no more trusted than unowned memory.
    let (listed, hidden) = match &h.owner {
        Owner::Module {
            name,
            hidden: false,
            ..
        } => (Some(name.clone()), None),
        Owner::Module {
            name, hidden: true, ..
        } => (None, Some(name.clone())),
        _ => (None, None),
    };
    let severity = match (&listed, baselined) {
        (None, _) => Severity::Critical,
        (Some(_), true) => Severity::Medium,
        (Some(_), false) => Severity::High,
    };
    let callback = ctx.map.encode(h.callback);
    let who = match (&listed, &hidden) {
        (Some(m), _) => format!("module {m}"),
        (None, Some(m)) => format!("module {m}, hidden from the module list,"),
        (None, None) => "code in unowned memory (no listed module)".to_string(),
    };
    let since = if baselined {
        " (present since the baseline)"
    } else {
        ""
    };
    let (class, object, how) = match h.kind {
        "kprobe" => (
            "kprobe-hook",
            "kprobe",
            format!("with a kprobe (handler {callback})"),
        ),
        _ => (
            "ftrace-hook",
            "ftrace ops",
            format!(
                "through ftrace (callback {callback}, {}{})",
                h.flags,
                if h.ipmodify {
                    ": may redirect the hooked functions"
                } else {
                    ""
                }
            ),
        ),
    };
    let mut f = ctx.finding(
        "ftrace",
        severity,
        class,
        object,
        targets_text(h, NAMES_IN_ENTRY),
    );
    f.expected = "callbacks in kernel text only".into();
    f.actual = format!(
        "{} at {:#x}: callback {:#x} ({callback}) hooks {}",
        object,
        h.object,
        h.callback,
        targets_text(h, MAX_HASH_ENTRIES)
    );
    f.owner = Some(h.owner.to_string());
    f.explanation = format!(
        "{who} hooks {} {how}{since}",
        targets_text(h, NAMES_IN_ENTRY)
    );
    f
}

impl FtraceCheck {
    /// Unowned callbacks may sit in a module that unlinked itself from the module list, which
    /// the caller's address map leaves out unless the caller found it (a watch does): look for
    /// it among the modules only sysfs or the module address tree still know, and name it as
    /// the map would. Best effort: without module offsets the callback stays "unowned", which
    /// is graded the same.
    fn name_hidden_owners(&self, ctx: &Context<'_, '_>, hooks: &mut [Hook]) {
        let Ok(moff) = self
            .module_offsets
            .get(ctx, |t| Ok(kvmaccess_linux::ModuleOffsets::from_types(t)?))
        else {
            return;
        };
        let Ok((_, hidden)) = super::modules::views(ctx.kernel, &moff) else {
            return;
        };
        let hidden: Vec<kvmaccess_linux::Module> =
            hidden.into_iter().filter_map(|x| x.module).collect();
        if hidden.is_empty() {
            return;
        }
        let mut map = ctx.map.clone();
        let mut spans = std::mem::take(&mut map.modules);
        spans.extend(crate::module_spans(&[], &hidden));
        map.set_modules(spans);
        for h in hooks.iter_mut().filter(|h| h.owner == Owner::Unowned) {
            h.owner = map.owner(h.callback);
        }
    }
}

impl Check for FtraceCheck {
    fn id(&self) -> &'static str {
        "ftrace"
    }

    fn description(&self) -> &'static str {
        DESCRIPTION
    }

    fn capture(&self, ctx: &Context<'_, '_>, _blobs: &mut Blobs) -> Result<serde_json::Value> {
        let off = self.offsets.get(ctx, FtraceOffsets::from_types)?;
        let state = FtraceState {
            hooks: all_hooks(ctx, &off)?
                .iter()
                .map(|h| state_of(ctx, h))
                .collect(),
        };
        super::to_value("ftrace", &state)
    }

    fn verify(&self, ctx: &Context<'_, '_>, baseline: CheckBaseline<'_>) -> Result<Vec<Finding>> {
        let state = self.parsed.get("ftrace", &baseline)?;
        let off = self.offsets.get(ctx, FtraceOffsets::from_types)?;
        let mut hooks = all_hooks(ctx, &off)?;
        if hooks.iter().any(|h| h.owner == Owner::Unowned) {
            self.name_hidden_owners(ctx, &mut hooks);
        }
        Ok(hooks
            .iter()
            .map(|h| {
                let loc = ctx.map.encode(h.callback);
                let baselined = matches!(loc, Location::Module { .. })
                    && state
                        .hooks
                        .iter()
                        .any(|b| b.kind == h.kind && b.callback.same_place(&loc));
                finding(ctx, h, baselined)
            })
            .collect())
    }
}
