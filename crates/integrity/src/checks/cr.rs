//! Control-register protections of every vCPU.

use serde::{Deserialize, Serialize};

use crate::baseline::Blobs;
use crate::engine::{Check, CheckBaseline, Context};
use crate::error::Result;
use crate::finding::{Finding, Severity, Target};

/// Control-register check (`cr`): CR0.WP, CR4.SMEP/SMAP/UMIP, EFER.NXE and the paging bits.
#[derive(Debug, Default)]
pub struct CrCheck {
    parsed: super::Parsed<Vec<CrState>>,
}

/// Captured control registers of one vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CrState {
    pub vcpu: usize,
    #[serde(with = "kvmaccess_core::hex")]
    pub cr0: u64,
    #[serde(with = "kvmaccess_core::hex")]
    pub cr4: u64,
    #[serde(with = "kvmaccess_core::hex::option")]
    pub efer: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reg {
    Cr0,
    Cr4,
    Efer,
}

/// A watched bit: name, register, bit, severity when cleared, why it matters.
struct Bit {
    name: &'static str,
    reg: Reg,
    bit: u32,
    cleared: Severity,
    why: &'static str,
}

const BITS: &[Bit] = &[
    Bit {
        name: "CR0.WP",
        reg: Reg::Cr0,
        bit: 16,
        cleared: Severity::Critical,
        why: "with write protection off the kernel can write its read-only pages (text, rodata, \
              the syscall table): the classic first step of a kernel rootkit",
    },
    Bit {
        name: "CR0.PG",
        reg: Reg::Cr0,
        bit: 31,
        cleared: Severity::High,
        why: "paging was switched off",
    },
    Bit {
        name: "CR4.SMEP",
        reg: Reg::Cr4,
        bit: 20,
        cleared: Severity::High,
        why: "without SMEP the kernel may execute user-space pages, which exploits rely on",
    },
    Bit {
        name: "CR4.SMAP",
        reg: Reg::Cr4,
        bit: 21,
        cleared: Severity::High,
        why: "without SMAP the kernel may read and write user-space pages unchecked",
    },
    Bit {
        name: "CR4.UMIP",
        reg: Reg::Cr4,
        bit: 11,
        cleared: Severity::High,
        why: "without UMIP user space can read GDT/IDT/TSS addresses with SGDT/SIDT/STR",
    },
    Bit {
        name: "CR4.PAE",
        reg: Reg::Cr4,
        bit: 5,
        cleared: Severity::High,
        why: "the paging mode of a running 64-bit kernel cannot legitimately change",
    },
    Bit {
        name: "CR4.LA57",
        reg: Reg::Cr4,
        bit: 12,
        cleared: Severity::High,
        why: "the paging mode of a running 64-bit kernel cannot legitimately change",
    },
    Bit {
        name: "CR4.CET",
        reg: Reg::Cr4,
        bit: 23,
        cleared: Severity::High,
        why: "control-flow enforcement was switched off",
    },
    Bit {
        name: "EFER.NXE",
        reg: Reg::Efer,
        bit: 11,
        cleared: Severity::High,
        why: "without NXE no page is non-executable: data and stacks become executable",
    },
    Bit {
        name: "EFER.LMA",
        reg: Reg::Efer,
        bit: 10,
        cleared: Severity::High,
        why: "the CPU left long mode",
    },
];

/// Bits the kernel flips on its own all the time (TLB flushes toggle PGE, context switches
/// toggle PCE and TSD per task; TS is the lazy-FPU bit): never reported.
const CR0_VOLATILE: u64 = 1 << 3;
const CR4_VOLATILE: u64 = (1 << 7) | (1 << 8) | (1 << 2);

fn value(state: &CrState, reg: Reg) -> Option<u64> {
    match reg {
        Reg::Cr0 => Some(state.cr0),
        Reg::Cr4 => Some(state.cr4),
        Reg::Efer => state.efer,
    }
}

fn on_off(set: bool) -> String {
    if set { "set" } else { "clear" }.to_string()
}

/// Compare one vCPU's control registers with its baseline, then with the absolute policy.
pub(crate) fn diff_cr(ctx: &Context<'_, '_>, base: &CrState, now: &CrState) -> Vec<Finding> {
    let mut out = Vec::new();
    let vcpu = now.vcpu;
    let mk = |severity, class, name: &str| {
        let mut f = ctx.finding("cr", severity, class, name, format!("vCPU {vcpu}"));
        f.vcpu = Some(vcpu);
        f.target = Target::ControlBit {
            vcpu,
            bit: name.to_string(),
        };
        f
    };
    let mut watched = [0u64; 3];
    for bit in BITS {
        let slot = bit.reg as usize;
        watched[slot] |= 1 << bit.bit;
        let (Some(was), Some(is)) = (value(base, bit.reg), value(now, bit.reg)) else {
            continue;
        };
        let (was, is) = (was >> bit.bit & 1 == 1, is >> bit.bit & 1 == 1);
        if was == is {
            if bit.name == "CR0.WP" && !is {
                let mut f = mk(Severity::Critical, "policy", bit.name);
                f.expected = "set (policy)".into();
                f.actual = on_off(is);
                f.explanation = format!(
                    "CR0.WP is clear, as it already was in the baseline; {}",
                    bit.why
                );
                out.push(f);
            }
            continue;
        }
        let (severity, explanation) = if was {
            (
                bit.cleared,
                format!("{} was cleared: {}", bit.name, bit.why),
            )
        } else {
            (
                Severity::Info,
                format!(
                    "{} was set since the baseline (a protection turned on)",
                    bit.name
                ),
            )
        };
        let mut f = mk(
            severity,
            if was {
                "protection-off"
            } else {
                "state-change"
            },
            bit.name,
        );
        f.expected = on_off(was);
        f.actual = on_off(is);
        f.explanation = explanation;
        out.push(f);
    }
    for (reg, name, volatile) in [
        (Reg::Cr0, "CR0", CR0_VOLATILE),
        (Reg::Cr4, "CR4", CR4_VOLATILE),
        (Reg::Efer, "EFER", 0),
    ] {
        let (Some(was), Some(is)) = (value(base, reg), value(now, reg)) else {
            continue;
        };
        let other = (was ^ is) & !volatile & !watched[reg as usize];
        if other != 0 {
            let mut f = mk(Severity::Info, "state-change", name);
            f.expected = format!("{was:#x}");
            f.actual = format!("{is:#x}");
            f.explanation = format!(
                "{name} bits {other:#x} changed; none of them is a protection this check watches"
            );
            out.push(f);
        }
    }
    out
}

impl Check for CrCheck {
    fn id(&self) -> &'static str {
        "cr"
    }

    fn description(&self) -> &'static str {
        "CR0.WP, CR4.SMEP/SMAP/UMIP, EFER.NXE and the paging mode of every vCPU"
    }

    fn capture(&self, ctx: &Context<'_, '_>, _blobs: &mut Blobs) -> Result<serde_json::Value> {
        let states: Vec<CrState> = ctx.vcpus.iter().map(snapshot).collect();
        super::to_value("cr", &states)
    }

    fn verify(&self, ctx: &Context<'_, '_>, baseline: CheckBaseline<'_>) -> Result<Vec<Finding>> {
        let states = self.parsed.get("cr", &baseline)?;
        let mut out = Vec::new();
        for regs in &ctx.vcpus {
            let now = snapshot(regs);
            match states.iter().find(|s| s.vcpu == now.vcpu) {
                Some(base) => out.extend(diff_cr(ctx, base, &now)),
                None => {
                    // A vCPU the baseline never saw (hot-plugged): hold it to vCPU 0's state.
                    let mut f = ctx.finding(
                        "cr",
                        Severity::Low,
                        "state-change",
                        "vCPU",
                        format!("vCPU {}", now.vcpu),
                    );
                    f.vcpu = Some(now.vcpu);
                    f.expected = "absent".into();
                    f.actual = "present".into();
                    f.explanation = "a vCPU appeared that the baseline does not have; it is \
                                     compared with the baseline's first vCPU"
                        .into();
                    out.push(f);
                    if let Some(first) = states.first() {
                        let mut first = first.clone();
                        first.vcpu = now.vcpu;
                        out.extend(diff_cr(ctx, &first, &now));
                    }
                }
            }
        }
        Ok(out)
    }
}

pub(crate) fn snapshot(regs: &kvmaccess_core::Registers) -> CrState {
    CrState {
        vcpu: regs.vcpu,
        cr0: regs.cr0,
        cr4: regs.cr4,
        efer: regs.efer,
    }
}
