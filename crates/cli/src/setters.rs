//! The paper's write API on the command line: one IDT gate, one GDT descriptor, one system-call
//! table entry, each written through the kernel's page tables and verified by reading back.

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use kvmaccess_core::Gva;
use kvmaccess_x86::AddressSpace;

use crate::linux::open_kernel;
use crate::monitor::write_kernel_bytes;
use crate::parse::parse_u64;
use crate::target::{Access, Target};
use crate::TargetArgs;

#[derive(Debug, Subcommand)]
pub enum IdtSub {
    /// Point one IDT gate at another handler (needs --allow-write).
    Set(IdtSetArgs),
}

#[derive(Debug, Args)]
pub struct IdtSetArgs {
    /// Vector, 0-255.
    #[arg(value_parser = parse_u64)]
    vector: u64,
    /// New handler: an address, or a kernel symbol name (e.g. asm_exc_page_fault).
    #[arg(long, value_name = "ADDR|SYMBOL")]
    handler: String,
    /// Whose IDTR names the table (Linux shares one IDT between all vCPUs).
    #[arg(long, default_value_t = 0)]
    vcpu: usize,
    /// Required: confirms that the guest's IDT is to be changed.
    #[arg(long)]
    allow_write: bool,
}

#[derive(Debug, Subcommand)]
pub enum GdtSub {
    /// Replace one GDT descriptor with raw bytes (needs --allow-write).
    Set(GdtSetArgs),
}

#[derive(Debug, Args)]
pub struct GdtSetArgs {
    /// Slot index (selector / 8).
    #[arg(value_parser = parse_u64)]
    index: u64,
    /// The descriptor: 8 bytes, or 16 for a long-mode system descriptor (TSS, LDT, call gate),
    /// as hex digits in memory order.
    #[arg(long, value_name = "HEX")]
    hex: String,
    /// Whose GDT (every CPU has its own).
    #[arg(long, default_value_t = 0)]
    vcpu: usize,
    /// Required: confirms that the guest's GDT is to be changed.
    #[arg(long)]
    allow_write: bool,
}

#[derive(Debug, Subcommand)]
pub enum SyscallsSub {
    /// Point one x64 system-call table entry elsewhere (needs --allow-write).
    Set(SyscallSetArgs),
}

#[derive(Debug, Args)]
pub struct SyscallSetArgs {
    /// System-call number.
    #[arg(value_parser = parse_u64)]
    number: u64,
    /// New target: an address, or a kernel symbol name (e.g. __x64_sys_getpid).
    #[arg(long, value_name = "ADDR|SYMBOL")]
    target: String,
    /// Required: confirms that the guest's system-call table is to be changed.
    #[arg(long)]
    allow_write: bool,
}

fn require_consent(allow: bool, what: &str) -> Result<()> {
    if !allow {
        bail!("this changes the guest's {what}: add --allow-write to confirm");
    }
    Ok(())
}

/// An address given as a number or a kernel symbol.
fn resolve(kernel: &kvmaccess_linux::Kernel<'_>, text: &str) -> Result<u64> {
    if let Ok(address) = parse_u64(text) {
        return Ok(address);
    }
    kernel
        .symbol(text)
        .with_context(|| format!("{text:?} is neither an address nor a kernel symbol"))
}

pub fn idt_set(args: &TargetArgs, cmd: &IdtSetArgs, json: bool) -> Result<()> {
    require_consent(cmd.allow_write, "IDT")?;
    let vector = u8::try_from(cmd.vector)
        .map_err(|_| anyhow::anyhow!("vector {} is not 0-255", cmd.vector))?;
    let target = Target::open(args, Access::ReadWrite)?;
    let kernel = open_kernel(&target, &args.profile)?;
    let handler = resolve(&kernel, &cmd.handler)?;
    let registers = target.registers(cmd.vcpu)?;
    let offset = u32::from(vector) * 16;
    if offset + 15 > registers.idtr.limit {
        bail!(
            "vector {vector:#x} is beyond the IDT limit {:#x}",
            registers.idtr.limit
        );
    }
    let gate_address = registers.idtr.base + u64::from(offset);
    let mut space = AddressSpace::from_registers(target.memory(), &registers);
    let mut gate = [0u8; 16];
    space.read(Gva(gate_address), &mut gate)?;
    // The 64-bit handler offset is split over bytes 0-1, 6-7 and 8-11 of the gate.
    let h = handler.to_le_bytes();
    gate[0..2].copy_from_slice(&h[0..2]);
    gate[6..8].copy_from_slice(&h[2..4]);
    gate[8..12].copy_from_slice(&h[4..8]);
    write_kernel_bytes(
        &target,
        kernel.layout(),
        gate_address,
        &gate,
        &format!("IDT vector {vector:#04x} -> {handler:#x}"),
        json,
    )
}

pub fn gdt_set(args: &TargetArgs, cmd: &GdtSetArgs, json: bool) -> Result<()> {
    require_consent(cmd.allow_write, "GDT")?;
    let bytes = crate::inspect::parse_hex_bytes(&cmd.hex)?;
    if bytes.len() != 8 && bytes.len() != 16 {
        bail!("a descriptor is 8 or 16 bytes, not {}", bytes.len());
    }
    let target = Target::open(args, Access::ReadWrite)?;
    let kernel = open_kernel(&target, &args.profile)?;
    let registers = target.registers(cmd.vcpu)?;
    let start = cmd.index.checked_mul(8).context("index too large")?;
    let end = start + bytes.len() as u64 - 1;
    if end > u64::from(registers.gdtr.limit) {
        bail!(
            "slot {} ({} bytes) is beyond the GDT limit {:#x}",
            cmd.index,
            bytes.len(),
            registers.gdtr.limit
        );
    }
    write_kernel_bytes(
        &target,
        kernel.layout(),
        registers.gdtr.base + start,
        &bytes,
        &format!("GDT slot {} of vCPU {}", cmd.index, cmd.vcpu),
        json,
    )
}

pub fn syscalls_set(args: &TargetArgs, cmd: &SyscallSetArgs, json: bool) -> Result<()> {
    require_consent(cmd.allow_write, "system-call table")?;
    let target = Target::open(args, Access::ReadWrite)?;
    let kernel = open_kernel(&target, &args.profile)?;
    let new_target = resolve(&kernel, &cmd.target)?;
    let types = crate::linux::kernel_types(&kernel, &args.profile).ok();
    let tables = kernel.syscall_tables(types.as_ref())?;
    let count = tables.x64.entries.len() as u64;
    if cmd.number >= count {
        bail!(
            "sys_call_table has {count} entries; {} is past the end",
            cmd.number
        );
    }
    write_kernel_bytes(
        &target,
        kernel.layout(),
        tables.x64.address + cmd.number * 8,
        &new_target.to_le_bytes(),
        &format!("sys_call_table[{}] -> {new_target:#x}", cmd.number),
        json,
    )
}
