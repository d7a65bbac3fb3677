//! Classification of changed kernel code: legitimate self-patching or an inline hook.
//!
//! The kernel rewrites its own text at run time in a few well-defined places, each recorded in a
//! table the kernel keeps:
//!
//! * jump labels / static keys (`__jump_table`): a site switches between a 2- or 5-byte NOP and
//!   a `jmp` to the entry's target;
//! * static calls (`.static_call_sites`, `__SCT__*` trampolines): a `call`/`jmp` switches
//!   target, or becomes a NOP / `ret`;
//! * ftrace (the `dyn_ftrace` records): a function's entry NOP becomes a `call` to
//!   `ftrace_caller`, `ftrace_regs_caller` or a trampoline an `ftrace_ops` owns; the calls
//!   inside those callers (`ftrace_call`, `ftrace_regs_call`, `ftrace_graph_call`) switch
//!   between stubs and tracers;
//! * kprobes: an `int3` over the first byte of an instruction (and `text_poke_bp` puts an
//!   `int3` at any of the sites above for a moment while it patches them).
//!
//! A changed range inside one of those sites, with bytes of the expected shape, is a state
//! change ([`Severity::Info`]). Anything else is reported with the decoded control transfer
//! (this module decodes only the handful of shapes hooks use, it is no disassembler).

use serde::Serialize;

use crate::finding::Severity;
use crate::location::{AddressMap, Owner};

/// The 5-byte NOP x86-64 kernels use for patch sites (`nopl 0x0(%rax,%rax,1)`).
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// The 2-byte NOP of short jump-label sites (`xchg %ax,%ax`).
pub const NOP2: [u8; 2] = [0x66, 0x90];
/// `int3`.
pub const INT3: u8 = 0xcc;

/// A decoded instruction of one of the shapes patches and hooks use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Insn {
    /// `e9 rel32`.
    JmpRel32 {
        /// Destination.
        target: u64,
    },
    /// `e8 rel32`.
    CallRel32 {
        /// Destination.
        target: u64,
    },
    /// `eb rel8`.
    JmpRel8 {
        /// Destination.
        target: u64,
    },
    /// `ff 25 disp32`: jump through a pointer at `slot`.
    JmpRipIndirect {
        /// Address of the pointer.
        slot: u64,
    },
    /// `48 b8 imm64; ff e0`: load an absolute address, jump to it.
    MovRaxJmpRax {
        /// Destination.
        target: u64,
    },
    /// `68 imm32; c3`: push a (sign-extended) address and return to it.
    PushRet {
        /// Destination.
        target: u64,
    },
    /// `cc`.
    Int3,
    /// `c3`.
    Ret,
    /// The 5-byte NOP.
    Nop5,
    /// The 2-byte NOP.
    Nop2,
}

impl Insn {
    /// Where control goes, when the instruction says so without reading memory.
    pub fn target(&self) -> Option<u64> {
        match *self {
            Insn::JmpRel32 { target }
            | Insn::CallRel32 { target }
            | Insn::JmpRel8 { target }
            | Insn::MovRaxJmpRax { target }
            | Insn::PushRet { target } => Some(target),
            _ => None,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Insn::JmpRel32 { .. } | Insn::CallRel32 { .. } | Insn::Nop5 => 5,
            Insn::JmpRel8 { .. } | Insn::Nop2 => 2,
            Insn::JmpRipIndirect { .. } => 6,
            Insn::MovRaxJmpRax { .. } => 12,
            Insn::PushRet { .. } => 6,
            Insn::Int3 | Insn::Ret => 1,
        }
    }

    /// Always false: every shape has at least one byte (for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether the instruction transfers control away (a hook shape).
    pub fn is_transfer(&self) -> bool {
        !matches!(self, Insn::Nop5 | Insn::Nop2 | Insn::Int3 | Insn::Ret)
    }
}

impl std::fmt::Display for Insn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Insn::JmpRel32 { target } | Insn::JmpRel8 { target } => write!(f, "jmp {target:#x}"),
            Insn::CallRel32 { target } => write!(f, "call {target:#x}"),
            Insn::JmpRipIndirect { slot } => write!(f, "jmp *{slot:#x}"),
            Insn::MovRaxJmpRax { target } => write!(f, "mov rax, {target:#x}; jmp rax"),
            Insn::PushRet { target } => write!(f, "push {target:#x}; ret"),
            Insn::Int3 => f.write_str("int3"),
            Insn::Ret => f.write_str("ret"),
            Insn::Nop5 => f.write_str("nop5"),
            Insn::Nop2 => f.write_str("nop2"),
        }
    }
}

fn rel32(bytes: &[u8], at: usize) -> Option<i64> {
    let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(i64::from(i32::from_le_bytes(raw)))
}

fn add_signed(base: u64, delta: i64) -> u64 {
    base.wrapping_add_signed(delta)
}

/// Decode the instruction at the start of `bytes`, which sits at address `at`.
pub fn decode(bytes: &[u8], at: u64) -> Option<Insn> {
    let first = *bytes.first()?;
    match first {
        0xe9 => Some(Insn::JmpRel32 {
            target: add_signed(at.wrapping_add(5), rel32(bytes, 1)?),
        }),
        0xe8 => Some(Insn::CallRel32 {
            target: add_signed(at.wrapping_add(5), rel32(bytes, 1)?),
        }),
        0xeb => {
            let d = i64::from(i8::from_le_bytes([*bytes.get(1)?]));
            Some(Insn::JmpRel8 {
                target: add_signed(at.wrapping_add(2), d),
            })
        }
        0xff if bytes.get(1) == Some(&0x25) => Some(Insn::JmpRipIndirect {
            slot: add_signed(at.wrapping_add(6), rel32(bytes, 2)?),
        }),
        0x48 if bytes.get(1) == Some(&0xb8) && bytes.get(10..12) == Some(&[0xff, 0xe0]) => {
            let raw: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
            Some(Insn::MovRaxJmpRax {
                target: u64::from_le_bytes(raw),
            })
        }
        0x68 if bytes.get(5) == Some(&0xc3) => Some(Insn::PushRet {
            target: u64::from_le_bytes(rel32(bytes, 1)?.to_le_bytes()),
        }),
        0xcc => Some(Insn::Int3),
        0xc3 => Some(Insn::Ret),
        _ if bytes.starts_with(&NOP5) => Some(Insn::Nop5),
        _ if bytes.starts_with(&NOP2) => Some(Insn::Nop2),
        _ => None,
    }
}

/// The run-time patch sites of a kernel, from its own tables. Addresses are of this boot.
#[derive(Clone, Debug, Default)]
pub struct Sites {
    /// Jump-label sites: (code address, jump target), sorted by code address.
    pub jump_labels: Vec<(u64, u64)>,
    /// Static-call sites (addresses of the patched call instructions), sorted.
    pub static_calls: Vec<u64>,
    /// Static-call trampolines (`__SCT__*` symbols), sorted.
    pub static_call_trampolines: Vec<u64>,
    /// ftrace call sites (`dyn_ftrace.ip`), sorted; empty when unknown.
    pub ftrace_records: Vec<u64>,
    /// Whether `ftrace_records` came from the kernel (else ftrace sites are recognised by
    /// their shape only: a NOP/call at a function's entry).
    pub ftrace_records_known: bool,
    /// Functions a traced site may call: `ftrace_caller`, `ftrace_regs_caller`, ...
    pub ftrace_callers: Vec<u64>,
    /// Trampolines registered `ftrace_ops` own: (start, length).
    pub ftrace_trampolines: Vec<(u64, u64)>,
    /// Patched calls inside the ftrace callers (`ftrace_call`, `ftrace_regs_call`,
    /// `ftrace_graph_call`), sorted.
    pub ftrace_op_sites: Vec<u64>,
    /// Whether any kprobe is registered.
    pub kprobes_registered: bool,
    /// KASLR slide now minus the slide when the baseline bytes were captured (wrapping); zero
    /// when the same.
    pub slide_delta: u64,
}

/// What a changed byte range is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// `jump-label`, `static-call`, `ftrace`, `kprobe`, `kaslr-relocation`, `inline-hook`,
    /// `code-change`.
    pub class: &'static str,
    /// How bad.
    pub severity: Severity,
    /// First address of the site (or of the changed range).
    pub site: u64,
    /// Bytes the site spans.
    pub len: usize,
    /// The new instruction, when decoded.
    pub insn: Option<Insn>,
    /// In words: `nop5 -> jmp 0x… (target)`.
    pub detail: String,
}

/// Old and new bytes of a window of kernel memory around a change.
#[derive(Clone, Copy, Debug)]
pub struct Window<'a> {
    /// Address of the first byte.
    pub gva: u64,
    /// Baseline bytes.
    pub old: &'a [u8],
    /// Bytes now.
    pub new: &'a [u8],
}

impl Window<'_> {
    fn slice<'s>(&self, bytes: &'s [u8], gva: u64, len: usize) -> Option<&'s [u8]> {
        let start = usize::try_from(gva.checked_sub(self.gva)?).ok()?;
        bytes.get(start..start.checked_add(len)?)
    }
    fn old_at(&self, gva: u64, len: usize) -> Option<&[u8]> {
        self.slice(self.old, gva, len)
    }
    fn new_at(&self, gva: u64, len: usize) -> Option<&[u8]> {
        self.slice(self.new, gva, len)
    }
}

/// The sorted-list entry at or below `addr`, if `addr..end` fits within `span` bytes of it.
fn covering(sorted: &[u64], start: u64, end: u64, span: u64) -> Option<u64> {
    let idx = sorted.partition_point(|&s| s <= start);
    let site = *sorted.get(idx.checked_sub(1)?)?;
    (end <= site.saturating_add(span)).then_some(site)
}

fn describe_insn(map: &AddressMap<'_>, insn: Option<Insn>) -> String {
    match insn {
        Some(i) => match i.target() {
            Some(t) => format!("{i} ({})", map.describe(t).unwrap_or_else(|| "?".into())),
            None => i.to_string(),
        },
        None => "unrecognised bytes".to_string(),
    }
}

fn change(map: &AddressMap<'_>, old: Option<Insn>, new: Option<Insn>) -> String {
    format!("{} -> {}", describe_insn(map, old), describe_insn(map, new))
}

/// Cut a changed range at every patch site that starts inside it: adjacent sites (runs of
/// 2-byte jump labels are common) change together and form one contiguous range.
pub fn split_at_sites(sites: &Sites, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut cuts: Vec<u64> = Vec::new();
    let inside = |a: u64| a > start && a < end;
    let from = |sorted: &[u64]| -> Vec<u64> {
        let i = sorted.partition_point(|&s| s <= start);
        sorted[i..]
            .iter()
            .copied()
            .take_while(|&s| s < end)
            .collect()
    };
    let j = sites.jump_labels.partition_point(|&(s, _)| s <= start);
    cuts.extend(
        sites.jump_labels[j..]
            .iter()
            .map(|&(s, _)| s)
            .take_while(|&s| s < end),
    );
    cuts.extend(from(&sites.static_calls));
    cuts.extend(from(&sites.ftrace_records));
    cuts.retain(|&c| inside(c));
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut a = start;
    for c in cuts {
        out.push((a, c));
        a = c;
    }
    out.push((a, end));
    out
}

/// Classify the changed bytes `start..end` (absolute addresses inside `window`).
pub fn classify(
    sites: &Sites,
    map: &AddressMap<'_>,
    window: &Window<'_>,
    start: u64,
    end: u64,
) -> Verdict {
    let site_verdict = |class: &'static str, site: u64, len: usize, ok: &dyn Fn(Insn) -> bool| {
        let new = window.new_at(site, len).and_then(|b| decode(b, site));
        let old = window.old_at(site, len).and_then(|b| decode(b, site));
        let fine = new.is_some_and(ok);
        let severity = if fine {
            Severity::Info
        } else {
            match new.and_then(|i| i.target()).map(|t| map.owner(t)) {
                Some(o) if o.is_kernel_text() => Severity::High,
                Some(_) => Severity::Critical,
                None => Severity::High,
            }
        };
        // A 2-byte jump-label site is followed by other code (often another site): claim
        // only the bytes the instructions occupy.
        let span = new
            .map(|i| i.len())
            .into_iter()
            .chain(old.map(|i| i.len()))
            .max()
            .unwrap_or(len)
            .min(len);
        Verdict {
            class: if fine { class } else { "inline-hook" },
            severity,
            site,
            len: span,
            insn: new,
            detail: if fine {
                change(map, old, new)
            } else {
                format!(
                    "{class} site holds unexpected code: {}",
                    change(map, old, new)
                )
            },
        }
    };

    if let Some(site) = covering_pair(&sites.jump_labels, start, end, 5) {
        let (code, target) = site;
        return site_verdict("jump-label", code, 5, &|i| match i {
            Insn::Nop5 | Insn::Nop2 | Insn::Int3 => true,
            Insn::JmpRel32 { target: t } | Insn::JmpRel8 { target: t } => t == target,
            _ => false,
        });
    }
    let owned_text = |t: u64| map.owner(t).is_known_text();
    if let Some(site) = covering(&sites.static_calls, start, end, 5) {
        return site_verdict("static-call", site, 5, &|i| match i {
            Insn::Nop5 | Insn::Int3 | Insn::Ret => true,
            Insn::CallRel32 { target } | Insn::JmpRel32 { target } => owned_text(target),
            _ => false,
        });
    }
    if let Some(site) = covering(&sites.static_call_trampolines, start, end, 8) {
        return site_verdict("static-call", site, 5, &|i| match i {
            Insn::Ret | Insn::Int3 | Insn::Nop5 => true,
            Insn::JmpRel32 { target } => owned_text(target),
            _ => false,
        });
    }
    let ftrace_target = |t: u64| {
        sites.ftrace_callers.contains(&t)
            || sites
                .ftrace_trampolines
                .iter()
                .any(|&(s, l)| t >= s && t < s.saturating_add(l))
    };
    if let Some(site) = covering(&sites.ftrace_records, start, end, 5) {
        return site_verdict("ftrace", site, 5, &|i| match i {
            Insn::Nop5 | Insn::Int3 => true,
            Insn::CallRel32 { target } => ftrace_target(target),
            _ => false,
        });
    }
    if !sites.ftrace_records_known {
        if let Some(site) = ftrace_entry_by_shape(map, window, start, end) {
            return site_verdict("ftrace", site, 5, &|i| match i {
                Insn::Nop5 | Insn::Int3 => true,
                Insn::CallRel32 { target } => ftrace_target(target),
                _ => false,
            });
        }
    }
    if let Some(site) = covering(&sites.ftrace_op_sites, start, end, 5) {
        return site_verdict("ftrace", site, 5, &|i| match i {
            Insn::Int3 => true,
            Insn::CallRel32 { target } | Insn::JmpRel32 { target } => owned_text(target),
            _ => false,
        });
    }
    // Before the int3 test: a relocated address can gain a 0xcc byte (8c -> cc under a slide
    // of 0x400000), and an int3 written there would not leave the value moved by the slide.
    if sites.slide_delta != 0 && relocated(window, start, end, sites.slide_delta) {
        return Verdict {
            class: "kaslr-relocation",
            severity: Severity::Info,
            site: start,
            len: usize::try_from(end.saturating_sub(start)).unwrap_or(usize::MAX),
            insn: None,
            detail: "absolute address relocated by the new KASLR slide".to_string(),
        };
    }
    if end == start.saturating_add(1) && window.new_at(start, 1) == Some(&[INT3]) {
        let old = window.old_at(start, 1).and_then(|b| b.first().copied());
        return Verdict {
            class: "kprobe",
            severity: if sites.kprobes_registered {
                Severity::Info
            } else {
                Severity::High
            },
            site: start,
            len: 1,
            insn: Some(Insn::Int3),
            detail: if sites.kprobes_registered {
                format!("{:02x} -> int3 (a kprobe is registered)", old.unwrap_or(0))
            } else {
                format!(
                    "{:02x} -> int3, but no kprobe is registered (a breakpoint or a trap-based \
                     hook)",
                    old.unwrap_or(0)
                )
            },
        };
    }
    unexplained(map, window, start, end)
}

fn covering_pair(sorted: &[(u64, u64)], start: u64, end: u64, span: u64) -> Option<(u64, u64)> {
    let idx = sorted.partition_point(|&(s, _)| s <= start);
    let site = *sorted.get(idx.checked_sub(1)?)?;
    (end <= site.0.saturating_add(span)).then_some(site)
}

/// Without the kernel's ftrace records: a 5-byte site at a function's entry (or right after
/// its `endbr64`) whose baseline bytes were the ftrace NOP.
fn ftrace_entry_by_shape(
    map: &AddressMap<'_>,
    window: &Window<'_>,
    start: u64,
    end: u64,
) -> Option<u64> {
    const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
    let (symbol, offset) = map.symbols().addr2sym(start)?;
    let entry = symbol.address;
    let site = match offset {
        0..=4 if window.old_at(entry, 4) == Some(&ENDBR64) => entry + 4,
        0..=4 => entry,
        _ => return None,
    };
    (start >= site && end <= site + 5 && window.old_at(site, 5) == Some(&NOP5)).then_some(site)
}

/// Whether every changed byte of `start..end` lies in a 4- or 8-byte value that moved by the
/// slide (either sign: x86-64 KASLR also applies inverse relocations).
fn relocated(window: &Window<'_>, start: u64, end: u64, delta: u64) -> bool {
    let mut pos = start;
    'outer: while pos < end {
        for size in [8usize, 4] {
            for back in 0..size {
                let Some(w) = pos.checked_sub(back as u64) else {
                    continue;
                };
                let (Some(old), Some(new)) = (window.old_at(w, size), window.new_at(w, size))
                else {
                    continue;
                };
                let ok = if size == 8 {
                    let o = u64::from_le_bytes(old.try_into().unwrap_or([0; 8]));
                    let n = u64::from_le_bytes(new.try_into().unwrap_or([0; 8]));
                    n.wrapping_sub(o) == delta || o.wrapping_sub(n) == delta
                } else {
                    let o = u32::from_le_bytes(old.try_into().unwrap_or([0; 4]));
                    let n = u32::from_le_bytes(new.try_into().unwrap_or([0; 4]));
                    let d = (delta & 0xffff_ffff) as u32;
                    o != n && (n.wrapping_sub(o) == d || o.wrapping_sub(n) == d)
                };
                if ok {
                    pos = w + size as u64;
                    continue 'outer;
                }
            }
        }
        return false;
    }
    true
}

/// A change no kernel mechanism explains: decode a control transfer at or just before it.
fn unexplained(map: &AddressMap<'_>, window: &Window<'_>, start: u64, end: u64) -> Verdict {
    let len = usize::try_from(end.saturating_sub(start)).unwrap_or(usize::MAX);
    for back in 0..=4u64 {
        let Some(at) = start.checked_sub(back) else {
            break;
        };
        let Some(bytes) = window.new_at(at, 12.min(window.new.len())).or_else(|| {
            let avail =
                usize::try_from((window.gva + window.new.len() as u64).checked_sub(at)?).ok()?;
            window.new_at(at, avail)
        }) else {
            continue;
        };
        let Some(insn) = decode(bytes, at) else {
            continue;
        };
        if !insn.is_transfer() || at + insn.len() as u64 <= start {
            continue;
        }
        let owner = insn.target().map(|t| map.owner(t));
        let severity = match &owner {
            Some(o) if o.is_kernel_text() => Severity::High,
            _ => Severity::Critical,
        };
        let old = window.old_at(at, insn.len()).and_then(|b| decode(b, at));
        return Verdict {
            class: "inline-hook",
            severity,
            site: at,
            len: insn.len().max(len),
            insn: Some(insn),
            detail: format!(
                "{} (target owner: {})",
                change(map, old, Some(insn)),
                owner.map_or_else(|| "unknown".to_string(), |o| o.to_string())
            ),
        };
    }
    Verdict {
        class: "code-change",
        severity: Severity::High,
        site: start,
        len,
        insn: None,
        detail: "bytes changed outside every run-time patch site".to_string(),
    }
}

/// The owner of a verdict's decoded target, if it has one.
pub fn target_owner(map: &AddressMap<'_>, verdict: &Verdict) -> Option<Owner> {
    verdict.insn.and_then(|i| i.target()).map(|t| map.owner(t))
}
