//! Every vCPU's IDT: all 256 gates, and where the IDTR points.

use kvmaccess_core::DescriptorTable;
use kvmaccess_x86::IdtGate;
use serde::{Deserialize, Serialize};

use crate::baseline::Blobs;
use crate::engine::{Check, CheckBaseline, Context};
use crate::error::Result;
use crate::finding::{Finding, Severity, Target};
use crate::location::Location;

/// IDT check (`idt`).
#[derive(Debug, Default)]
pub struct IdtCheck {
    parsed: super::Parsed<Vec<IdtState>>,
    clean: super::CleanTables,
}

/// One gate as captured, its handler KASLR-relative.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GateState {
    pub vector: u8,
    pub handler: Location,
    pub selector: u16,
    pub type_code: u8,
    pub dpl: u8,
    pub ist: u8,
    pub present: bool,
}

/// One vCPU's IDT as captured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IdtState {
    pub vcpu: usize,
    pub idtr: Location,
    pub limit: u32,
    pub long_mode: bool,
    /// Whether the IDTR held the kernel's own table (`idt_table` or its cpu_entry_area alias).
    pub kernel_table: bool,
    pub gates: Vec<GateState>,
}

pub(crate) fn gate_state(ctx: &Context<'_, '_>, gate: &IdtGate) -> GateState {
    GateState {
        vector: gate.vector,
        handler: ctx.map.encode(gate.offset),
        selector: gate.selector,
        type_code: gate.type_code,
        dpl: gate.dpl,
        ist: gate.ist,
        present: gate.present,
    }
}

fn is_kernel_table(ctx: &Context<'_, '_>, base: u64) -> bool {
    base == super::CEA_RO_IDT || ctx.kernel.symbol("idt_table").ok() == Some(base)
}

fn gate_words(g: &GateState) -> String {
    format!(
        "{} sel={:#06x} type={:#x} DPL{} IST{}{}",
        g.handler,
        g.selector,
        g.type_code,
        g.dpl,
        g.ist,
        if g.present { "" } else { " not-present" }
    )
}

/// Compare one vCPU's IDT now with its baseline.
pub(crate) fn diff_idt(
    ctx: &Context<'_, '_>,
    base: &IdtState,
    vcpu: usize,
    idtr: DescriptorTable,
    gates: &[IdtGate],
) -> Vec<Finding> {
    let mut out = Vec::new();
    let now_idtr = ctx.map.encode(idtr.base);
    let target_reg = Target::TableRegister {
        vcpu,
        register: "IDTR".into(),
    };
    if !now_idtr.same_place(&base.idtr) || idtr.limit != base.limit {
        let moved = !now_idtr.same_place(&base.idtr);
        let mut f = ctx.finding(
            "idt",
            if moved {
                Severity::Critical
            } else {
                Severity::High
            },
            "table-moved",
            "IDTR",
            format!("vCPU {vcpu}"),
        );
        f.vcpu = Some(vcpu);
        f.expected = format!("base {} limit {:#x}", base.idtr, base.limit);
        f.actual = format!("base {now_idtr} limit {:#x}", idtr.limit);
        f.owner = Some(ctx.map.owner(idtr.base).to_string());
        f.explanation = if moved {
            "the vCPU's interrupt table register points to another table: every interrupt and \
             exception now goes where that table says"
                .into()
        } else {
            "the IDT limit changed".into()
        };
        f.target = target_reg.clone();
        out.push(f);
    }
    if !is_kernel_table(ctx, idtr.base) {
        let mut f = ctx.finding(
            "idt",
            Severity::High,
            "policy",
            "IDTR",
            format!("vCPU {vcpu}"),
        );
        f.vcpu = Some(vcpu);
        f.expected = format!("idt_table or its read-only alias {:#x}", super::CEA_RO_IDT);
        f.actual = format!("{:#x} ({now_idtr})", idtr.base);
        f.explanation = "the IDTR holds neither the kernel's idt_table nor its cpu_entry_area \
                         alias, where Linux always loads it"
            .into();
        f.target = target_reg;
        out.push(f);
    }
    for gate in gates {
        let Some(was) = base.gates.iter().find(|g| g.vector == gate.vector) else {
            continue;
        };
        // Fast path (every pass, 256 gates per vCPU): the baseline handler decoded for this
        // boot compared as a number; locations and strings only for a gate that differs.
        if ctx.map.decode(&was.handler) == Some(gate.offset)
            && was.selector == gate.selector
            && was.type_code == gate.type_code
            && was.dpl == gate.dpl
            && was.ist == gate.ist
            && was.present == gate.present
        {
            continue;
        }
        let now = gate_state(ctx, gate);
        let entry = format!("vector {:#04x}", gate.vector);
        let mk = |severity, class: &'static str, explanation: String| {
            let mut f = ctx.finding("idt", severity, class, "IDT", entry.clone());
            f.vcpu = Some(vcpu);
            f.expected = gate_words(was);
            f.actual = gate_words(&now);
            f.explanation = explanation;
            f.target = Target::IdtGate {
                vcpu,
                vector: gate.vector,
            };
            f
        };
        if !now.handler.same_place(&was.handler) {
            let owner = ctx.map.owner(gate.offset);
            let severity = if owner.is_kernel_text() {
                Severity::High
            } else {
                Severity::Critical
            };
            let mut f = mk(
                severity,
                "handler-moved",
                format!(
                    "the handler of vector {:#04x} moved from {} to {} in {owner}: the CPU \
                     runs that code on every such interrupt or exception",
                    gate.vector, was.handler, now.handler
                ),
            );
            f.expected = was.handler.to_string();
            f.actual = match now.handler {
                Location::Absolute { .. } => now.handler.to_string(),
                _ => format!("{:#x} ({})", gate.offset, now.handler),
            };
            f.owner = Some(owner.to_string());
            out.push(f);
        }
        if now.dpl != was.dpl {
            let severity = if now.dpl == 3 {
                Severity::Critical
            } else {
                Severity::High
            };
            out.push(mk(
                severity,
                "dpl-change",
                format!(
                    "the gate's DPL changed from {} to {}{}",
                    was.dpl,
                    now.dpl,
                    if now.dpl == 3 {
                        ": user space can now raise this vector with `int`"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if now.ist != was.ist || now.selector != was.selector || now.type_code != was.type_code {
            out.push(mk(
                Severity::High,
                "gate-change",
                "the gate's type, code selector or interrupt stack changed".into(),
            ));
        }
        if now.present != was.present {
            out.push(mk(
                Severity::High,
                "gate-change",
                format!(
                    "the gate is now {}",
                    if now.present {
                        "present"
                    } else {
                        "not present"
                    }
                ),
            ));
        }
    }
    out
}

/// Findings that several vCPUs share (one table, many IDTRs) are reported once, naming them.
pub(crate) fn merge_vcpus(findings: Vec<Finding>) -> Vec<Finding> {
    let mut out: Vec<(Finding, Vec<usize>)> = Vec::new();
    for f in findings {
        let same = out.iter_mut().find(|(g, _)| {
            g.object == f.object
                && g.entry == f.entry
                && g.class == f.class
                && g.expected == f.expected
                && g.actual == f.actual
                && g.object == "IDT"
        });
        match same {
            Some((_, vcpus)) => vcpus.extend(f.vcpu),
            None => {
                let vcpus = f.vcpu.into_iter().collect();
                out.push((f, vcpus));
            }
        }
    }
    out.into_iter()
        .map(|(mut f, vcpus)| {
            if vcpus.len() > 1 {
                let list: Vec<String> = vcpus.iter().map(ToString::to_string).collect();
                f.explanation = format!("{} (vCPUs {})", f.explanation, list.join(", "));
            }
            f
        })
        .collect()
}

impl Check for IdtCheck {
    fn id(&self) -> &'static str {
        "idt"
    }

    fn description(&self) -> &'static str {
        "every vCPU's IDT: all 256 gates (handler, type, DPL, IST, selector), IDTR"
    }

    fn capture(&self, ctx: &Context<'_, '_>, _blobs: &mut Blobs) -> Result<serde_json::Value> {
        let mut space = ctx.kernel.space();
        let mut states = Vec::new();
        for regs in &ctx.vcpus {
            let long_mode = super::long_mode(regs);
            let gates = kvmaccess_x86::read_idt(&mut space, regs.idtr, long_mode)?;
            states.push(IdtState {
                vcpu: regs.vcpu,
                idtr: ctx.map.encode(regs.idtr.base),
                limit: regs.idtr.limit,
                long_mode,
                kernel_table: is_kernel_table(ctx, regs.idtr.base),
                gates: gates.iter().map(|g| gate_state(ctx, g)).collect(),
            });
        }
        super::to_value("idt", &states)
    }

    fn verify(&self, ctx: &Context<'_, '_>, baseline: CheckBaseline<'_>) -> Result<Vec<Finding>> {
        let states = self.parsed.get("idt", &baseline)?;
        let mut out = Vec::new();
        for regs in &ctx.vcpus {
            let long_mode = super::long_mode(regs);
            let gate_size = if long_mode { 16 } else { 8 };
            let len = usize::try_from(regs.idtr.limit)
                .map_or(0, |l| l.saturating_add(1))
                .min(kvmaccess_x86::IDT_MAX_GATES * gate_size);
            let mut bytes = vec![0u8; len];
            // Through the kernel's shared translations, which the monitor renews each pass.
            ctx.kernel
                .read(kvmaccess_core::Gva(regs.idtr.base), &mut bytes)?;
            let seen = super::SeenTable::new(&baseline, regs.vcpu, regs.idtr, bytes);
            if self.clean.unchanged(&seen) {
                continue;
            }
            let gates = kvmaccess_x86::decode_idt(&seen.bytes, long_mode);
            let base = states
                .iter()
                .find(|s| s.vcpu == regs.vcpu)
                .or_else(|| states.first());
            if let Some(base) = base {
                let found = diff_idt(ctx, base, regs.vcpu, regs.idtr, &gates);
                self.clean.record(seen, found.is_empty());
                out.extend(found);
            }
        }
        Ok(merge_vcpus(out))
    }
}
