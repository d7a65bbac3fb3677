//! Undoing a finding from outside: what to write where, and the write itself.

use kvmaccess_core::{Gva, PhysicalMemoryWrite};
use kvmaccess_linux::KernelLayout;
use kvmaccess_x86::AddressSpace;
use serde::Serialize;

use crate::baseline::Baseline;
use crate::checks::{self};
use crate::engine::Context;
use crate::error::{Error, Result};
use crate::finding::{Finding, Target};

/// One write into kernel memory that puts the baseline state back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Write {
    /// Kernel virtual address (this boot).
    #[serde(with = "kvmaccess_core::hex")]
    pub gva: u64,
    /// The bytes to write.
    pub bytes: Vec<u8>,
    /// What the write restores, in words.
    pub description: String,
}

/// Whether and how a finding can be undone from outside the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Restore {
    /// Write these bytes.
    Write(Write),
    /// It cannot be restored through memory; why.
    Impossible {
        /// The reason, for the user.
        reason: String,
    },
}

fn impossible(reason: impl Into<String>) -> Result<Restore> {
    Ok(Restore::Impossible {
        reason: reason.into(),
    })
}

/// The write that restores what `finding` is about, using the baseline state translated to this
/// boot's KASLR layout. Registers, summaries and state changes have no such write: the answer
/// says why.
pub fn restore_plan(
    ctx: &Context<'_, '_>,
    finding: &Finding,
    baseline: &Baseline,
) -> Result<Restore> {
    let state = |id: &str| {
        baseline
            .checks
            .get(id)
            .ok_or_else(|| Error::NotInBaseline(id.to_string()))
    };
    match &finding.target {
        Target::SyscallEntry { table, number } => {
            let st: checks::syscalls::SyscallState = checks::state("syscalls", state("syscalls")?)?;
            let Some(t) = st.tables.iter().find(|t| &t.symbol == table) else {
                return impossible(format!("the baseline has no table {table}"));
            };
            let index = usize::try_from(*number).unwrap_or(usize::MAX);
            let Some(loc) = t.entries.get(index) else {
                return impossible(format!("{table} had no entry {number} at baseline"));
            };
            let Some(address) = ctx.map.decode(loc) else {
                return impossible(format!("{loc} does not exist in this boot"));
            };
            let gva = ctx
                .kernel
                .symbol(table)?
                .checked_add(u64::from(*number) * 8)
                .ok_or_else(|| Error::Implausible(format!("{table} entry {number}")))?;
            Ok(Restore::Write(Write {
                gva,
                bytes: address.to_le_bytes().to_vec(),
                description: format!("{table}[{number}] = {address:#x} ({loc})"),
            }))
        }
        Target::IdtGate { vcpu, vector } => {
            let st: Vec<checks::idt::IdtState> = checks::state("idt", state("idt")?)?;
            let Some(base) = st.iter().find(|s| s.vcpu == *vcpu) else {
                return impossible(format!("the baseline has no IDT of vCPU {vcpu}"));
            };
            let Some(regs) = ctx.vcpus.iter().find(|r| r.vcpu == *vcpu) else {
                return impossible(format!("vCPU {vcpu} is not in this pass"));
            };
            if !ctx.map.encode(regs.idtr.base).same_place(&base.idtr) {
                return impossible(
                    "the IDTR itself points elsewhere than at baseline; gates of the attacker's \
                     table are not the kernel's, and IDTR is a register no memory write reaches",
                );
            }
            let Some(gate) = base.gates.iter().find(|g| g.vector == *vector) else {
                return impossible(format!("the baseline has no gate {vector:#04x}"));
            };
            let Some(handler) = ctx.map.decode(&gate.handler) else {
                return impossible(format!("{} does not exist in this boot", gate.handler));
            };
            let bytes = encode_gate64(
                handler,
                gate.selector,
                gate.ist,
                gate.type_code,
                gate.dpl,
                gate.present,
            );
            let gva = regs
                .idtr
                .base
                .checked_add(u64::from(*vector) * 16)
                .ok_or_else(|| Error::Implausible("IDTR base".into()))?;
            Ok(Restore::Write(Write {
                gva,
                bytes: bytes.to_vec(),
                description: format!("IDT gate {vector:#04x} -> {} ({handler:#x})", gate.handler),
            }))
        }
        Target::GdtDescriptor { vcpu, index } => {
            let st: Vec<checks::gdt::GdtState> = checks::state("gdt", state("gdt")?)?;
            let Some(base) = st.iter().find(|s| s.vcpu == *vcpu) else {
                return impossible(format!("the baseline has no GDT of vCPU {vcpu}"));
            };
            let Some(regs) = ctx.vcpus.iter().find(|r| r.vcpu == *vcpu) else {
                return impossible(format!("vCPU {vcpu} is not in this pass"));
            };
            if !ctx.map.encode(regs.gdtr.base).same_place(&base.gdtr) {
                return impossible("the GDTR itself points elsewhere than at baseline");
            }
            let slot = base.slots.iter().find(|s| s.index == *index);
            let mut bytes = slot.map_or(0, |s| s.raw).to_le_bytes().to_vec();
            match slot.and_then(|s| s.raw_high) {
                Some(high) => bytes.extend_from_slice(&high.to_le_bytes()),
                None => {
                    // A 16-byte descriptor planted over an empty or 8-byte slot also took the
                    // next slot: put that one back too.
                    let now_long = finding.actual.starts_with("call gate")
                        || finding.actual.starts_with("tss")
                        || finding.actual.starts_with("ldt");
                    if now_long && checks::long_mode(regs) {
                        let next = base.slots.iter().find(|s| s.index == index.wrapping_add(1));
                        bytes.extend_from_slice(&next.map_or(0, |s| s.raw).to_le_bytes());
                    }
                }
            }
            let gva = regs
                .gdtr
                .base
                .checked_add(u64::from(*index) * 8)
                .ok_or_else(|| Error::Implausible("GDTR base".into()))?;
            Ok(Restore::Write(Write {
                gva,
                bytes,
                description: format!(
                    "GDT selector {:#06x} of vCPU {vcpu} = {}",
                    index.wrapping_mul(8),
                    slot.map_or("null", |s| s.summary.as_str())
                ),
            }))
        }
        Target::Bytes {
            region,
            region_offset,
            len,
            ..
        } => {
            if ctx.kernel.layout().kaslr_offset != baseline.kaslr_offset {
                return impossible(
                    "the baseline was taken with another KASLR slide: its copy of these bytes \
                     holds other absolute addresses; take a baseline in this boot first",
                );
            }
            let (blob, start) = if finding.check == "syscalls" {
                let st: checks::syscalls::SyscallState =
                    checks::state("syscalls", state("syscalls")?)?;
                let r = st.dispatchers.iter().find(|d| &d.name == region);
                (format!("syscalls/{region}"), r.map(|r| r.start.clone()))
            } else {
                let st: checks::text::TextState = checks::state("text", state("text")?)?;
                let r = st.regions.iter().find(|d| &d.name == region);
                (format!("text/{region}"), r.map(|r| r.start.clone()))
            };
            let Some(start) = start.and_then(|s| ctx.map.decode(&s)) else {
                return impossible(format!("the baseline has no region {region}"));
            };
            let old = baseline.blob(&blob)?;
            let a = usize::try_from(*region_offset).unwrap_or(usize::MAX);
            let b = a.saturating_add(usize::try_from(*len).unwrap_or(0));
            let Some(bytes) = old.get(a..b) else {
                return impossible(format!(
                    "{region}+{region_offset:#x} is outside the baseline"
                ));
            };
            let gva = start
                .checked_add(*region_offset)
                .ok_or_else(|| Error::Implausible("region offset".into()))?;
            Ok(Restore::Write(Write {
                gva,
                bytes: bytes.to_vec(),
                description: format!(
                    "{len} baseline bytes of {region} at {}",
                    ctx.map.describe(gva).unwrap_or_else(|| format!("{gva:#x}"))
                ),
            }))
        }
        Target::ControlBit { bit, .. } => impossible(format!(
            "{bit} is a bit of a vCPU register, not of memory: no memory write restores it and \
             QEMU's QMP has no register write; the guest must set it again (or be rebooted)"
        )),
        Target::TableRegister { register, .. } => impossible(format!(
            "{register} is a vCPU register: only the guest (lgdt/lidt) can load it again"
        )),
        Target::None => impossible(
            "this finding summarises state changes the kernel made itself; nothing to restore",
        ),
    }
}

/// A 16-byte long-mode interrupt/trap gate.
pub(crate) fn encode_gate64(
    offset: u64,
    selector: u16,
    ist: u8,
    type_code: u8,
    dpl: u8,
    present: bool,
) -> [u8; 16] {
    let low = (offset & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(ist & 7) << 32)
        | (u64::from(type_code & 0xf) << 40)
        | (u64::from(dpl & 3) << 45)
        | (u64::from(present) << 47)
        | (((offset >> 16) & 0xffff) << 48);
    let high = offset >> 32;
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&low.to_le_bytes());
    out[8..].copy_from_slice(&high.to_le_bytes());
    out
}

/// Perform a write through the kernel's page tables (page permissions do not apply to
/// physical writes, which is what patching read-only tables needs) and verify it by reading
/// back.
pub fn apply_write<M: PhysicalMemoryWrite + ?Sized>(
    mem: &M,
    layout: &KernelLayout,
    write: &Write,
) -> Result<()> {
    let mut space = AddressSpace::new(mem, layout.mode, layout.root.0);
    space.write(Gva(write.gva), &write.bytes)?;
    let mut back = vec![0u8; write.bytes.len()];
    space.read(Gva(write.gva), &mut back)?;
    if back != write.bytes {
        return Err(Error::WriteNotVerified {
            gva: write.gva,
            wrote: checks::hex_bytes(&write.bytes),
            read: checks::hex_bytes(&back),
        });
    }
    Ok(())
}
