//! The inspection commands: registers, descriptor tables, translation, reads, writes, control,
//! dumps.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use kvmaccess_core::{Gpa, Gva, PhysicalMemory, Registers};
use kvmaccess_x86::{
    read_gdt, read_idt, AddressSpace, ControlRegisters, Cr3, ModeEvidence, PagingMode,
};
use serde::Serialize;

use crate::hexdump::hexdump;
use crate::output::print_json;
use crate::parse::parse_u64;
use crate::target::{check_output_path, Access, Target};
use crate::{out, outln};
use crate::{size_arg, TargetArgs};

/// Largest read printed or written in one command; a typo like `read X 0xffffffff` should not
/// try to allocate 4 GiB.
const MAX_READ: u64 = 1 << 30;
/// Copy granularity for reads that go to a file.
const READ_CHUNK: usize = 1 << 20;

#[derive(Debug, Args)]
pub struct RegsArgs {
    /// Which vCPU.
    #[arg(long, default_value_t = 0, conflicts_with = "all")]
    vcpu: usize,
    /// Every vCPU.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct IdtArgs {
    #[command(subcommand)]
    pub set: Option<crate::setters::IdtSub>,
    /// Whose IDTR to use.
    #[arg(long, default_value_t = 0)]
    vcpu: usize,
    /// Don't resolve handlers to kernel symbols (no Linux profile needed).
    #[arg(long)]
    raw: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GdtArgs {
    #[command(subcommand)]
    pub set: Option<crate::setters::GdtSub>,
    /// Whose descriptor-table register to use.
    #[arg(long, default_value_t = 0)]
    vcpu: usize,
}

#[derive(Debug, Args)]
pub struct TableArgs {
    /// Whose descriptor-table register to use.
    #[arg(long, default_value_t = 0)]
    vcpu: usize,
}

/// A paging mode named on the command line, for targets without registers.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PagingArg {
    /// 32-bit paging without PAE.
    Bits32,
    /// PAE.
    Pae,
    /// IA-32e 4-level.
    Level4,
    /// IA-32e 5-level (LA57).
    Level5,
}

impl From<PagingArg> for PagingMode {
    fn from(arg: PagingArg) -> Self {
        match arg {
            PagingArg::Bits32 => PagingMode::Bits32,
            PagingArg::Pae => PagingMode::Pae,
            PagingArg::Level4 => PagingMode::Level4,
            PagingArg::Level5 => PagingMode::Level5,
        }
    }
}

/// Which page tables translate a virtual address.
#[derive(Debug, Args)]
pub struct SpaceArgs {
    /// Use this vCPU's CR3 and paging mode.
    #[arg(long, default_value_t = 0)]
    vcpu: usize,
    /// Walk the tables at this CR3 instead of the vCPU's (e.g. a process's page-table root).
    #[arg(long, value_name = "CR3", value_parser = parse_u64)]
    cr3: Option<u64>,
    /// Paging mode, for dumps that record no registers (LiME, raw); needs --cr3.
    #[arg(long, value_enum, requires = "cr3")]
    paging: Option<PagingArg>,
}

#[derive(Debug, Args)]
pub struct TranslateArgs {
    /// Guest-virtual address (hex).
    #[arg(value_parser = parse_u64, value_name = "GVA")]
    gva: u64,
    #[command(flatten)]
    space: SpaceArgs,
}

#[derive(Debug, Args)]
pub struct ReadArgs {
    /// Guest-virtual address (hex), or with --phys a guest-physical one.
    #[arg(value_parser = parse_u64, value_name = "ADDR")]
    address: u64,
    /// Number of bytes (e.g. 64, 0x1000, 4K, 1M).
    #[arg(value_parser = size_arg, value_name = "LEN")]
    len: u64,
    /// ADDR is guest-physical.
    #[arg(long, conflicts_with = "pid")]
    phys: bool,
    /// ADDR is a user address of this process (read through its own page tables).
    #[arg(long, value_name = "PID")]
    pid: Option<i32>,
    /// Write the raw bytes to FILE instead of printing a hexdump.
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    space: SpaceArgs,
}

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Guest-virtual address (hex), or with --phys a guest-physical one.
    #[arg(value_parser = parse_u64, value_name = "ADDR")]
    address: u64,
    /// The bytes, as hex digits (spaces allowed): e.g. "90 90" or 4889e5.
    #[arg(
        long,
        value_name = "HEX",
        conflicts_with = "from_file",
        required_unless_present = "from_file"
    )]
    hex: Option<String>,
    /// Take the bytes from this file.
    #[arg(long, value_name = "FILE")]
    from_file: Option<PathBuf>,
    /// ADDR is guest-physical.
    #[arg(long)]
    phys: bool,
    /// Required: confirms that guest memory is to be changed.
    #[arg(long)]
    allow_write: bool,
    #[command(flatten)]
    space: SpaceArgs,
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Where to write the ELF core.
    #[arg(long, short, value_name = "FILE")]
    out: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    /// Don't pause the guest while dumping (faster for the guest, but memory and registers may
    /// then be inconsistent).
    #[arg(long)]
    no_pause: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Registers of one vCPU with what a reader wants decoded.
#[derive(Serialize)]
struct RegsReport {
    #[serde(flatten)]
    registers: Registers,
    paging_mode: PagingMode,
    paging_mode_evidence: ModeEvidence,
    cr3_decoded: Cr3,
    control: ControlRegisters,
    /// The EFER bits the other registers prove when EFER itself was not recorded.
    efer_inferred: Option<EferInferred>,
    protections: Vec<kvmaccess_x86::SecurityFeature>,
}

/// EFER bits implied by a snapshot without EFER (QEMU's dump notes have none).
#[derive(Debug, PartialEq, Eq, Serialize)]
struct EferInferred {
    lma: bool,
    lme: bool,
    /// Nothing else in a snapshot shows whether no-execute is enabled.
    nxe: Option<bool>,
    reason: &'static str,
}

const LONG_MODE_PROOF: &str =
    "CS.L=1 with CR0.PG and CR4.PAE: IA-32e mode is active, so LMA is set, and LMA implies LME";

/// LMA and LME when CS is a 64-bit code segment under PAE paging: the L bit only takes effect
/// in IA-32e mode. The weaker hint of descriptor tables above 4 GiB proves nothing about EFER.
fn infer_efer(registers: &Registers, evidence: ModeEvidence) -> Option<EferInferred> {
    (registers.efer.is_none() && evidence == ModeEvidence::CsLongBit).then_some(EferInferred {
        lma: true,
        lme: true,
        nxe: None,
        reason: LONG_MODE_PROOF,
    })
}

fn regs_report(registers: Registers) -> RegsReport {
    let detection = PagingMode::detect(&registers);
    let control = ControlRegisters::from_registers(&registers);
    RegsReport {
        paging_mode: detection.mode,
        paging_mode_evidence: detection.evidence,
        efer_inferred: infer_efer(&registers, detection.evidence),
        cr3_decoded: Cr3::from_registers(&registers),
        protections: control.security_features().to_vec(),
        control,
        registers,
    }
}

pub fn regs(args: &TargetArgs, cmd: &RegsArgs, json: bool) -> Result<()> {
    let target = Target::open(args, Access::ReadOnly)?;
    let all = if cmd.all {
        target.vcpus().all_registers()?
    } else {
        vec![target.registers(cmd.vcpu)?]
    };
    let reports: Vec<RegsReport> = all.into_iter().map(regs_report).collect();
    if json {
        return print_json(&reports);
    }
    let mut out = String::new();
    for report in &reports {
        out.push_str(&format_regs(report));
    }
    out!("{out}");
    Ok(())
}

fn format_regs(report: &RegsReport) -> String {
    let r = &report.registers;
    let evidence = match report.paging_mode_evidence {
        ModeEvidence::ControlRegisters => "from CR0/CR4",
        ModeEvidence::Efer => "from EFER.LMA",
        ModeEvidence::CsLongBit => "EFER not recorded; long mode from the CS.L bit",
        ModeEvidence::TableAbove4G => "EFER not recorded; long mode from GDTR/IDTR above 4 GiB",
        ModeEvidence::Assumed => "EFER not recorded; PAE assumed",
    };
    let mut s = format!(
        "vCPU {}: {} paging ({evidence}), RIP {:#x}\n",
        r.vcpu, report.paging_mode, r.rip
    );
    let gprs = [
        ("RAX", r.rax),
        ("RBX", r.rbx),
        ("RCX", r.rcx),
        ("RDX", r.rdx),
        ("RSI", r.rsi),
        ("RDI", r.rdi),
        ("RBP", r.rbp),
        ("RSP", r.rsp),
        ("R8", r.r8),
        ("R9", r.r9),
        ("R10", r.r10),
        ("R11", r.r11),
        ("R12", r.r12),
        ("R13", r.r13),
        ("R14", r.r14),
        ("R15", r.r15),
        ("RIP", r.rip),
        ("RFLAGS", r.rflags),
    ];
    for row in gprs.chunks(4) {
        let line: Vec<String> = row
            .iter()
            .map(|(name, value)| format!("{name:>6}={value:016x}"))
            .collect();
        s.push_str(&line.join(" "));
        s.push('\n');
    }
    for (name, seg) in [
        ("CS", r.cs),
        ("SS", r.ss),
        ("DS", r.ds),
        ("ES", r.es),
        ("FS", r.fs),
        ("GS", r.gs),
        ("LDTR", r.ldtr),
        ("TR", r.tr),
    ] {
        s.push_str(&format!(
            "{name:>6} sel={:04x} base={:016x} limit={:08x} flags={:06x} DPL{}{}\n",
            seg.selector,
            seg.base,
            seg.limit,
            seg.flags,
            seg.dpl(),
            if seg.long_mode() { " 64-bit" } else { "" }
        ));
    }
    s.push_str(&format!(
        "  GDTR base={:016x} limit={:04x}\n  IDTR base={:016x} limit={:04x}\n",
        r.gdtr.base, r.gdtr.limit, r.idtr.base, r.idtr.limit
    ));
    let cr3 = &report.cr3_decoded;
    s.push_str(&format!(
        "CR2  {:#018x}\nCR3  {:#018x} root={}{}\n",
        r.cr2,
        r.cr3,
        cr3.root
            .map_or_else(|| "none".to_string(), |g| g.to_string()),
        cr3.pcid.map(|p| format!(" PCID={p}")).unwrap_or_default()
    ));
    s.push_str(&control_text(report));
    if let Some(kgs) = r.kernel_gs_base {
        s.push_str(&format!("KERNEL_GS_BASE {kgs:#018x}\n"));
    }
    s.push('\n');
    s
}

/// CR0, CR4 and EFER as kvmaccess-x86 prints them, except that an unrecorded EFER whose long-mode
/// bits are proven says so rather than "EFER unknown".
fn control_text(report: &RegsReport) -> String {
    let text = report.control.to_string();
    let lines: Vec<String> = text
        .lines()
        .map(|line| match &report.efer_inferred {
            Some(inferred) if line == "EFER unknown" => format!(
                "EFER not recorded; inferred LME LMA ({}); NXE and the other bits unknown",
                inferred.reason
            ),
            _ => line.to_string(),
        })
        .collect();
    lines.join("\n") + "\n"
}

/// The address space a command walks: the vCPU's, or the one named by --cr3 (and --paging).
fn address_space<'t>(
    target: &'t Target,
    space: &SpaceArgs,
) -> Result<AddressSpace<'t, dyn PhysicalMemory + 't>> {
    let mem = target.memory();
    if let (Some(cr3), Some(mode)) = (space.cr3, space.paging) {
        return Ok(AddressSpace::new(mem, mode.into(), cr3));
    }
    let registers = target.registers(space.vcpu).with_context(|| {
        "virtual addresses need page tables: give --cr3 and --paging for a dump without registers"
    })?;
    let mut address_space = AddressSpace::from_registers(mem, &registers);
    if let Some(cr3) = space.cr3 {
        address_space.set_cr3(cr3);
    }
    Ok(address_space)
}

fn long_mode(registers: &Registers) -> bool {
    PagingMode::from_registers(registers).is_long_mode()
}

pub fn gdt(args: &TargetArgs, cmd: &GdtArgs, json: bool) -> Result<()> {
    if let Some(crate::setters::GdtSub::Set(set)) = &cmd.set {
        return crate::setters::gdt_set(args, set, json);
    }
    let target = Target::open(args, Access::ReadOnly)?;
    let registers = target.registers(cmd.vcpu)?;
    let mut space = AddressSpace::from_registers(target.memory(), &registers);
    let entries = read_gdt(&mut space, registers.gdtr, long_mode(&registers))
        .with_context(|| format!("reading the GDT of vCPU {}", cmd.vcpu))?;
    if json {
        return print_json(&entries);
    }
    outln!(
        "GDT of vCPU {}: base {:#x}, limit {:#x}, {} slots",
        cmd.vcpu,
        registers.gdtr.base,
        registers.gdtr.limit,
        entries.len()
    );
    for entry in &entries {
        outln!("{entry}");
    }
    Ok(())
}

pub fn idt(args: &TargetArgs, cmd: &IdtArgs, json: bool) -> Result<()> {
    if let Some(crate::setters::IdtSub::Set(set)) = &cmd.set {
        return crate::setters::idt_set(args, set, json);
    }
    let target = Target::open(args, Access::ReadOnly)?;
    let registers = target.registers(cmd.vcpu)?;
    let mut space = AddressSpace::from_registers(target.memory(), &registers);
    let gates = read_idt(&mut space, registers.idtr, long_mode(&registers))
        .with_context(|| format!("reading the IDT of vCPU {}", cmd.vcpu))?;
    // Handler symbols and owners need the Linux layer; without it the gates still print.
    let view = if cmd.raw {
        None
    } else {
        match crate::objects::LinuxView::open(&target, &args.profile) {
            Ok(view) => Some(view),
            Err(e) => {
                eprintln!("kvmaccess: note: handlers stay unresolved: {e:#}");
                None
            }
        }
    };
    let idtr_check = view
        .as_ref()
        .map(|v| crate::objects::idtr_verdict(v, registers.idtr.base));
    let annotated: Vec<AnnotatedGate<'_>> = gates
        .iter()
        .map(|gate| {
            let (handler, owner) = match (&view, gate.present) {
                (Some(v), true) => {
                    let (symbol, owner) = crate::objects::describe_address(v, gate.offset);
                    (symbol, Some(owner))
                }
                _ => (None, None),
            };
            AnnotatedGate {
                gate,
                handler,
                owner,
            }
        })
        .collect();
    if json {
        #[derive(Serialize)]
        struct IdtJson<'a> {
            vcpu: usize,
            idtr: kvmaccess_core::DescriptorTable,
            idtr_check: Option<String>,
            gates: Vec<AnnotatedGate<'a>>,
        }
        return print_json(&IdtJson {
            vcpu: cmd.vcpu,
            idtr: registers.idtr,
            idtr_check,
            gates: annotated,
        });
    }
    let mut text = format!(
        "IDT of vCPU {}: base {:#x}, limit {:#x}, {} gates\n",
        cmd.vcpu,
        registers.idtr.base,
        registers.idtr.limit,
        gates.len()
    );
    if let Some(check) = &idtr_check {
        text.push_str(&format!("{check}\n"));
    }
    for a in &annotated {
        text.push_str(&a.gate.to_string());
        if let Some(handler) = &a.handler {
            text.push_str(&format!("  {handler}"));
        }
        if let Some(owner) = &a.owner {
            text.push_str(&format!("  [{owner}]"));
        }
        text.push('\n');
    }
    out!("{text}");
    Ok(())
}

/// An IDT gate with the symbol and owner of its handler.
#[derive(Serialize)]
struct AnnotatedGate<'a> {
    #[serde(flatten)]
    gate: &'a kvmaccess_x86::IdtGate,
    handler: Option<String>,
    owner: Option<String>,
}

pub fn translate(args: &TargetArgs, cmd: &TranslateArgs, json: bool) -> Result<()> {
    let target = Target::open(args, Access::ReadOnly)?;
    let mut space = address_space(&target, &cmd.space)?;
    let mode = space.mode();
    let cr3 = space.cr3();
    let translation = space.translate(Gva(cmd.gva))?;
    if json {
        return print_json(&translation);
    }
    outln!("{} via {mode} paging, CR3 {cr3:#x}", Gva(cmd.gva));
    for step in translation.trail.as_slice() {
        outln!(
            "  {:<5} entry at {:<12} = {:#018x}",
            step.level.to_string(),
            step.entry_addr.to_string(),
            step.value
        );
    }
    let m = &translation.mapping;
    outln!(
        "  -> {} ({} page at {}, {}{}{})",
        translation.gpa,
        m.page_size,
        m.page_base,
        if m.writable { "writable" } else { "read-only" },
        if m.user { ", user" } else { ", supervisor" },
        if m.nx { ", no-execute" } else { ", executable" },
    );
    Ok(())
}

pub fn read(args: &TargetArgs, cmd: &ReadArgs, json: bool) -> Result<()> {
    if cmd.len > MAX_READ {
        bail!(
            "{} bytes is more than one read may take ({MAX_READ}); use `kvmaccess dump` for whole-memory copies",
            cmd.len
        );
    }
    if let Some(out) = &cmd.out {
        check_output_path(out, cmd.force)?;
    }
    let target = Target::open(args, Access::ReadOnly)?;
    let len = usize::try_from(cmd.len).context("length does not fit in memory")?;
    let mut reader = match cmd.pid {
        Some(pid) => Reader {
            memory: target.memory(),
            space: Some(crate::objects::process_reader(&target, &args.profile, pid)?),
        },
        None => Reader::new(&target, cmd.phys, &cmd.space)?,
    };

    if let Some(out) = &cmd.out {
        let mut file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut buf = vec![0u8; len.min(READ_CHUNK)];
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(READ_CHUNK);
            let chunk = &mut buf[..n];
            let address = cmd
                .address
                .checked_add(done as u64)
                .context("address wraps")?;
            if let Err(e) = reader.read(address, chunk) {
                drop(file);
                let _ = std::fs::remove_file(out);
                return Err(e);
            }
            file.write_all(chunk)
                .with_context(|| format!("writing {}", out.display()))?;
            done += n;
        }
        if !json {
            eprintln!("wrote {len} bytes to {}", out.display());
        }
        return Ok(());
    }

    let mut bytes = vec![0u8; len];
    reader.read(cmd.address, &mut bytes)?;
    if json {
        #[derive(Serialize)]
        struct ReadJson {
            #[serde(with = "kvmaccess_core::hex")]
            address: u64,
            physical: bool,
            hex: String,
        }
        return print_json(&ReadJson {
            address: cmd.address,
            physical: cmd.phys,
            hex: bytes.iter().map(|b| format!("{b:02x}")).collect(),
        });
    }
    out!("{}", hexdump(cmd.address, &bytes));
    Ok(())
}

/// Reads by physical or virtual address, keeping one address space (and its cache) across calls.
struct Reader<'t> {
    memory: &'t dyn PhysicalMemory,
    space: Option<AddressSpace<'t, dyn PhysicalMemory + 't>>,
}

impl<'t> Reader<'t> {
    fn new(target: &'t Target, physical: bool, space: &SpaceArgs) -> Result<Self> {
        Ok(Self {
            memory: target.memory(),
            space: if physical {
                None
            } else {
                Some(address_space(target, space)?)
            },
        })
    }

    fn read(&mut self, address: u64, buf: &mut [u8]) -> Result<()> {
        match &mut self.space {
            Some(space) => space.read(Gva(address), buf)?,
            None => self.memory.read_phys(Gpa(address), buf)?,
        }
        Ok(())
    }
}

pub fn parse_hex_bytes(text: &str) -> Result<Vec<u8>> {
    let digits: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':' && *c != ',')
        .collect();
    let digits = digits.strip_prefix("0x").unwrap_or(&digits);
    if digits.is_empty() || digits.len() % 2 != 0 || !digits.is_ascii() {
        bail!("--hex needs an even number of hex digits, got {:?}", text);
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16)
                .with_context(|| format!("--hex: {:?} is not a hex byte", &digits[i..i + 2]))
        })
        .collect()
}

pub fn write(args: &TargetArgs, cmd: &WriteArgs, json: bool) -> Result<()> {
    if !cmd.allow_write {
        bail!("writing guest memory changes the running guest: add --allow-write to confirm");
    }
    let data = match (&cmd.hex, &cmd.from_file) {
        (Some(hex), _) => parse_hex_bytes(hex)?,
        (None, Some(path)) => {
            let meta =
                std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
            if meta.len() > MAX_READ {
                bail!(
                    "{} is larger than one write may take ({MAX_READ} bytes)",
                    path.display()
                );
            }
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, None) => bail!("give the bytes with --hex or --from-file"),
    };
    let target = Target::open(args, Access::ReadWrite)?;
    let writer = target.writer()?;
    let mut readback = vec![0u8; data.len()];
    if cmd.phys {
        writer.write_phys(Gpa(cmd.address), &data)?;
        writer.read_phys(Gpa(cmd.address), &mut readback)?;
    } else {
        let registers = target.registers(cmd.space.vcpu)?;
        let mut space = AddressSpace::from_registers(writer, &registers);
        if let Some(cr3) = cmd.space.cr3 {
            space.set_cr3(cr3);
        }
        space.write(Gva(cmd.address), &data)?;
        space.read(Gva(cmd.address), &mut readback)?;
    }
    if readback != data {
        bail!(
            "wrote {} bytes at {:#x} but reading back gives different bytes (the guest changed them, or the write did not land)",
            data.len(),
            cmd.address
        );
    }
    if json {
        #[derive(Serialize)]
        struct WriteJson {
            #[serde(with = "kvmaccess_core::hex")]
            address: u64,
            physical: bool,
            written: usize,
            verified: bool,
        }
        return print_json(&WriteJson {
            address: cmd.address,
            physical: cmd.phys,
            written: data.len(),
            verified: true,
        });
    }
    outln!(
        "wrote {} bytes at {:#x} ({}), verified by reading back",
        data.len(),
        cmd.address,
        if cmd.phys { "physical" } else { "virtual" }
    );
    Ok(())
}

pub fn pause(args: &TargetArgs, pause: bool, json: bool) -> Result<()> {
    let target = Target::open(args, Access::ReadOnly)?;
    let control = target.control()?;
    if pause {
        control.pause()?;
    } else {
        control.resume()?;
    }
    let running = control.is_running()?;
    if json {
        return print_json(&serde_json::json!({ "running": running }));
    }
    outln!("guest is {}", if running { "running" } else { "paused" });
    Ok(())
}

pub fn dump(args: &TargetArgs, cmd: &DumpArgs, json: bool) -> Result<()> {
    check_output_path(&cmd.out, cmd.force)?;
    let target = Target::open(args, Access::ReadOnly)?;
    // A running guest changes memory while it is copied; pause it for a consistent image and
    // leave it as we found it.
    let resume_after = match (&target, cmd.no_pause) {
        (Target::Live(_), false) => {
            let control = target.control()?;
            let was_running = control.is_running()?;
            if was_running {
                control.pause()?;
            }
            was_running
        }
        _ => false,
    };
    let result = write_dump(&target, cmd, json);
    if resume_after {
        target.control()?.resume()?;
    }
    let (bytes, vcpus) = result?;
    if json {
        return print_json(&serde_json::json!({
            "path": cmd.out,
            "bytes": bytes,
            "vcpus": vcpus,
        }));
    }
    outln!(
        "wrote {} ({} MiB of guest memory, {vcpus} vCPU register notes)",
        cmd.out.display(),
        bytes >> 20
    );
    Ok(())
}

fn write_dump(target: &Target, cmd: &DumpArgs, json: bool) -> Result<(u64, usize)> {
    let vcpus = if target.vcpus().vcpu_count() > 0 {
        target.vcpus().all_registers()?
    } else {
        Vec::new()
    };
    let vmcoreinfo = target.vmcoreinfo();
    let bar = if cmd.quiet || json {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} dumping [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    };
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let bytes = kvmaccess_dump::write_elf_core_to_path(
        &cmd.out,
        cmd.force,
        target.memory(),
        &vcpus,
        vmcoreinfo.as_deref(),
        &mut progress,
    )?;
    bar.finish_and_clear();
    Ok((bytes, vcpus.len()))
}

#[cfg(test)]
mod tests {
    use super::{format_regs, parse_hex_bytes, regs_report, LONG_MODE_PROOF};
    use kvmaccess_core::Registers;

    const CR0_PE_PG: u64 = 1 | 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const SEG_L: u32 = 1 << 21;
    const EFER_LME_LMA_NXE: u64 = 1 << 8 | 1 << 10 | 1 << 11;

    /// A vCPU in the kernel of a 64-bit guest, as QEMU's dump notes record it: no EFER.
    fn long_mode_without_efer() -> Registers {
        let mut r = Registers {
            cr0: CR0_PE_PG,
            cr4: CR4_PAE,
            ..Registers::default()
        };
        r.cs.flags = SEG_L | 0x9b00;
        r
    }

    #[test]
    fn cs_long_bit_under_pae_paging_proves_lma_and_lme() {
        let report = regs_report(long_mode_without_efer());
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["efer"].is_null(), "{json}");
        let inferred = &json["efer_inferred"];
        assert_eq!(inferred["lma"], true);
        assert_eq!(inferred["lme"], true);
        assert!(inferred["nxe"].is_null(), "{inferred}");
        assert_eq!(inferred["reason"], LONG_MODE_PROOF);
        let text = format_regs(&report);
        assert!(!text.contains("EFER unknown"), "{text}");
        assert!(
            text.contains("EFER not recorded; inferred LME LMA (CS.L=1"),
            "{text}"
        );
        assert!(text.contains("EFER.NXE=unknown"), "{text}");
    }

    #[test]
    fn efer_is_not_inferred_without_proof_or_need() {
        let compat_mode = {
            let mut r = long_mode_without_efer();
            r.cs.flags &= !SEG_L;
            r.gdtr.base = 0xffff_fe00_0000_1000;
            r
        };
        let no_pae = Registers {
            cr4: 0,
            ..long_mode_without_efer()
        };
        let no_paging = Registers {
            cr0: 1,
            ..long_mode_without_efer()
        };
        for (what, r) in [
            ("tables above 4 GiB", compat_mode),
            ("32-bit paging", no_pae),
            ("paging off", no_paging),
        ] {
            let report = regs_report(r);
            assert!(report.efer_inferred.is_none(), "{what}");
            assert!(format_regs(&report).contains("EFER unknown"), "{what}");
        }
        let recorded = Registers {
            efer: Some(EFER_LME_LMA_NXE),
            ..long_mode_without_efer()
        };
        let report = regs_report(recorded);
        assert!(report.efer_inferred.is_none());
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["efer_inferred"].is_null(), "{json}");
        assert!(format_regs(&report).contains("EFER 0x0000000000000d00 [LME LMA NXE]"));
    }

    #[test]
    fn hex_bytes_in_common_spellings() {
        assert_eq!(parse_hex_bytes("90 90").unwrap(), vec![0x90, 0x90]);
        assert_eq!(parse_hex_bytes("0x4889e5").unwrap(), vec![0x48, 0x89, 0xe5]);
        assert_eq!(
            parse_hex_bytes("de:ad,be ef").unwrap(),
            vec![0xde, 0xad, 0xbe, 0xef]
        );
        assert!(parse_hex_bytes("abc").is_err());
        assert!(parse_hex_bytes("zz").is_err());
        assert!(parse_hex_bytes("").is_err());
    }
}
