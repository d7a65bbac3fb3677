//! Every vCPU's GDT against its own baseline (per-CPU GDTs differ in per-CPU bases only).

use kvmaccess_core::DescriptorTable;
use kvmaccess_x86::{decode_gdt, Descriptor, GdtEntry};
use serde::{Deserialize, Serialize};

use crate::baseline::Blobs;
use crate::engine::{Check, CheckBaseline, Context};
use crate::error::Result;
use crate::finding::{Finding, Severity, Target};
use crate::location::Location;

/// GDT check (`gdt`).
#[derive(Debug, Default)]
pub struct GdtCheck {
    parsed: super::Parsed<Vec<GdtState>>,
    clean: super::CleanTables,
}

/// One non-null GDT slot as captured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GdtSlot {
    pub index: u16,
    #[serde(with = "kvmaccess_core::hex")]
    pub raw: u64,
    #[serde(with = "kvmaccess_core::hex::option")]
    pub raw_high: Option<u64>,
    /// Human summary, for people reading the baseline.
    pub summary: String,
}

/// One vCPU's GDT as captured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GdtState {
    pub vcpu: usize,
    pub gdtr: Location,
    pub limit: u32,
    pub long_mode: bool,
    pub slots: Vec<GdtSlot>,
}

/// Accessed bit of code/data descriptors (the CPU sets it) and busy bit of TSS descriptors
/// (`ltr` sets it): neither is a change anyone made.
fn normalise(raw: u64) -> u64 {
    let system = raw & (1 << 44) == 0;
    let type_code = (raw >> 40) & 0xf;
    if !system {
        raw & !(1 << 40)
    } else if matches!(type_code, 0x9 | 0xb | 0x1 | 0x3) {
        raw & !(1 << 41)
    } else {
        raw
    }
}

fn dpl_of(d: &Descriptor) -> Option<u8> {
    match d {
        Descriptor::Code(c) => Some(c.fields.dpl),
        Descriptor::Data(c) => Some(c.fields.dpl),
        Descriptor::Ldt(s) => Some(s.fields.dpl),
        Descriptor::Tss(t) => Some(t.fields.dpl),
        Descriptor::CallGate(g) => Some(g.dpl),
        Descriptor::TaskGate(g) => Some(g.dpl),
        Descriptor::Reserved { dpl, .. } => Some(*dpl),
        Descriptor::Null | Descriptor::Truncated { .. } => None,
    }
}

pub(crate) fn summary(d: &Descriptor) -> String {
    match d {
        Descriptor::Null => "null".into(),
        Descriptor::Code(c) => format!(
            "code{} DPL{} base={:#x} limit={:#x}",
            if c.long { "64" } else { "32" },
            c.fields.dpl,
            c.fields.base,
            c.fields.limit_bytes
        ),
        Descriptor::Data(c) => format!(
            "data DPL{} base={:#x} limit={:#x}",
            c.fields.dpl, c.fields.base, c.fields.limit_bytes
        ),
        Descriptor::Ldt(s) => format!("ldt base={:#x} limit={:#x}", s.fields.base, s.fields.limit),
        Descriptor::Tss(t) => format!(
            "tss{} DPL{} base={:#x} limit={:#x}",
            t.width, t.fields.dpl, t.fields.base, t.fields.limit_bytes
        ),
        Descriptor::CallGate(g) => format!(
            "call gate DPL{} -> {:#06x}:{:#x}",
            g.dpl, g.selector, g.offset
        ),
        Descriptor::TaskGate(g) => format!("task gate DPL{} tss={:#06x}", g.dpl, g.tss_selector),
        Descriptor::Reserved { type_code, dpl, .. } => {
            format!("reserved type {type_code:#x} DPL{dpl}")
        }
        Descriptor::Truncated { type_code } => format!("truncated type {type_code:#x}"),
    }
}

/// Decode one captured slot back into a descriptor.
fn decode_slot(slot: &GdtSlot, long_mode: bool) -> Descriptor {
    let mut bytes = slot.raw.to_le_bytes().to_vec();
    if let Some(high) = slot.raw_high {
        bytes.extend_from_slice(&high.to_le_bytes());
    }
    decode_gdt(&bytes, long_mode)
        .first()
        .map_or(Descriptor::Null, |e| e.descriptor)
}

pub(crate) fn slots(entries: &[GdtEntry]) -> Vec<GdtSlot> {
    entries
        .iter()
        .filter(|e| !matches!(e.descriptor, Descriptor::Null))
        .map(|e| GdtSlot {
            index: e.index,
            raw: e.raw,
            raw_high: e.raw_high,
            summary: summary(&e.descriptor),
        })
        .collect()
}

/// Compare a vCPU's decoded GDT now with its baseline.
pub(crate) fn diff_gdt(
    ctx: &Context<'_, '_>,
    base: &GdtState,
    vcpu: usize,
    gdtr: DescriptorTable,
    now: &[GdtEntry],
) -> Vec<Finding> {
    let mut out = Vec::new();
    let now_gdtr = ctx.map.encode(gdtr.base);
    if !now_gdtr.same_place(&base.gdtr) || gdtr.limit != base.limit {
        let moved = !now_gdtr.same_place(&base.gdtr);
        let mut f = ctx.finding(
            "gdt",
            if moved {
                Severity::High
            } else {
                Severity::Medium
            },
            "table-moved",
            "GDTR",
            format!("vCPU {vcpu}"),
        );
        f.vcpu = Some(vcpu);
        f.expected = format!("base {} limit {:#x}", base.gdtr, base.limit);
        f.actual = format!("base {now_gdtr} limit {:#x}", gdtr.limit);
        f.owner = Some(ctx.map.owner(gdtr.base).to_string());
        f.explanation = if moved {
            "the vCPU's GDT register points to a different table than at baseline: every \
             segment and TSS now comes from it"
                .into()
        } else {
            "the GDT limit changed: descriptors were added to or cut from the table".into()
        };
        f.target = Target::TableRegister {
            vcpu,
            register: "GDTR".into(),
        };
        out.push(f);
    }
    let now_slots = slots(now);
    let mut indexes: Vec<u16> = base
        .slots
        .iter()
        .map(|s| s.index)
        .chain(now_slots.iter().map(|s| s.index))
        .collect();
    indexes.sort_unstable();
    indexes.dedup();
    for index in indexes {
        let was = base.slots.iter().find(|s| s.index == index);
        let is = now_slots.iter().find(|s| s.index == index);
        let key = |s: Option<&GdtSlot>| s.map(|s| (normalise(s.raw), s.raw_high));
        if key(was) == key(is) {
            continue;
        }
        let was_d = was.map_or(Descriptor::Null, |s| decode_slot(s, base.long_mode));
        let is_d = is.map_or(Descriptor::Null, |s| decode_slot(s, base.long_mode));
        let new_gate =
            matches!(is_d, Descriptor::CallGate(_)) && !matches!(was_d, Descriptor::CallGate(_));
        let is_dpl = dpl_of(&is_d);
        let (severity, class, explanation) = if new_gate && is_dpl == Some(3) {
            (
                Severity::Critical,
                "call-gate",
                "a call gate user space may use appeared: a far call through it enters the \
                 kernel at an address of the attacker's choosing",
            )
        } else if new_gate {
            (
                Severity::High,
                "call-gate",
                "a call gate appeared in the GDT; Linux never installs one",
            )
        } else if was.is_none() && is_dpl == Some(3) {
            (
                Severity::High,
                "new-descriptor",
                "a new descriptor user space may load appeared in the GDT",
            )
        } else if was.is_none() {
            (
                Severity::Medium,
                "new-descriptor",
                "a new descriptor appeared in a slot that was empty",
            )
        } else if is.is_none() {
            (
                Severity::Medium,
                "descriptor-removed",
                "a descriptor was cleared; segments loaded from it will fault",
            )
        } else if dpl_of(&was_d) != is_dpl {
            (
                Severity::High,
                "dpl-change",
                "the descriptor's privilege level changed",
            )
        } else if matches!(is_d, Descriptor::Tss(_)) {
            (
                Severity::High,
                "descriptor-change",
                "the TSS descriptor changed: interrupt stacks and the I/O bitmap come from it",
            )
        } else {
            (
                Severity::High,
                "descriptor-change",
                "the descriptor's base, limit or type changed",
            )
        };
        let mut f = ctx.finding(
            "gdt",
            severity,
            class,
            "GDT",
            format!("selector {:#06x} (vCPU {vcpu})", index.wrapping_mul(8)),
        );
        f.vcpu = Some(vcpu);
        f.expected = was.map_or("null".into(), |s| s.summary.clone());
        f.actual = is.map_or("null".into(), |s| s.summary.clone());
        if let Descriptor::CallGate(g) = is_d {
            f.owner = Some(ctx.map.owner(g.offset).to_string());
        }
        f.explanation = explanation.into();
        f.target = Target::GdtDescriptor { vcpu, index };
        out.push(f);
    }
    out
}

impl Check for GdtCheck {
    fn id(&self) -> &'static str {
        "gdt"
    }

    fn description(&self) -> &'static str {
        "every vCPU's GDT: descriptors, DPLs, call gates, GDTR base and limit"
    }

    fn capture(&self, ctx: &Context<'_, '_>, _blobs: &mut Blobs) -> Result<serde_json::Value> {
        let mut space = ctx.kernel.space();
        let mut states = Vec::new();
        for regs in &ctx.vcpus {
            let long_mode = super::long_mode(regs);
            let entries = kvmaccess_x86::read_gdt(&mut space, regs.gdtr, long_mode)?;
            states.push(GdtState {
                vcpu: regs.vcpu,
                gdtr: ctx.map.encode(regs.gdtr.base),
                limit: regs.gdtr.limit,
                long_mode,
                slots: slots(&entries),
            });
        }
        super::to_value("gdt", &states)
    }

    fn verify(&self, ctx: &Context<'_, '_>, baseline: CheckBaseline<'_>) -> Result<Vec<Finding>> {
        let states = self.parsed.get("gdt", &baseline)?;
        let mut out = Vec::new();
        for regs in &ctx.vcpus {
            let long_mode = super::long_mode(regs);
            let len = usize::try_from(regs.gdtr.limit)
                .map_or(0, |l| l.saturating_add(1))
                .min(kvmaccess_x86::GDT_MAX_ENTRIES * 8);
            let mut bytes = vec![0u8; len];
            // Through the kernel's shared translations, which the monitor renews each pass.
            ctx.kernel
                .read(kvmaccess_core::Gva(regs.gdtr.base), &mut bytes)?;
            let seen = super::SeenTable::new(&baseline, regs.vcpu, regs.gdtr, bytes);
            if self.clean.unchanged(&seen) {
                continue;
            }
            let entries = kvmaccess_x86::decode_gdt(&seen.bytes, long_mode);
            let base = states
                .iter()
                .find(|s| s.vcpu == regs.vcpu)
                .or_else(|| states.first());
            if let Some(base) = base {
                let found = diff_gdt(ctx, base, regs.vcpu, regs.gdtr, &entries);
                self.clean.record(seen, found.is_empty());
                out.extend(found);
            }
        }
        Ok(out)
    }
}
