//! Kernel objects: processes, modules, the kernel log, system-call tables, profile export.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use kvmaccess_linux::{Kernel, KernelTypes, Module, ModuleOffsets, TaskOffsets};
use serde::Serialize;

use crate::linux::{kernel_types, open_kernel, ProfileArgs};
use crate::output::print_json;
use crate::target::{check_output_path, Access, Target};
use crate::{out, outln, TargetArgs};

/// The kernel, its types, and its modules with their symbols merged into the symbol table.
pub struct LinuxView<'t> {
    pub kernel: Kernel<'t>,
    pub types: KernelTypes,
    pub modules: Vec<Module>,
}

impl<'t> LinuxView<'t> {
    /// Discovers the kernel and its modules. A module list that cannot be read leaves the view
    /// usable with kernel symbols only; the reason goes to stderr.
    pub fn open(target: &'t Target, profile: &ProfileArgs) -> Result<Self> {
        let mut kernel = open_kernel(target, profile)?;
        let types = kernel_types(&kernel, profile)?;
        let modules = match ModuleOffsets::from_types(&types)
            .and_then(|off| kernel.modules(&off).map(|m| (off, m)))
        {
            Ok((off, modules)) => {
                let merged = kernel.merge_module_symbols(&off, &modules);
                for (name, error) in &merged.failed {
                    eprintln!("kvmaccess: note: symbols of module {name} unreadable: {error}");
                }
                modules
            }
            Err(e) => {
                eprintln!("kvmaccess: note: the module list is unreadable ({e}); module addresses stay unresolved");
                Vec::new()
            }
        };
        Ok(Self {
            kernel,
            types,
            modules,
        })
    }
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Every thread, not only thread-group leaders.
    #[arg(long, short = 'T')]
    threads: bool,
    /// Enumerate through the PID table (the kernel's PID allocator) instead of the task list;
    /// a process unlinked from the task list still shows here.
    #[arg(long, conflicts_with = "threads")]
    pid_table: bool,
    /// Also read each process's command line from its own memory.
    #[arg(long)]
    args: bool,
}

/// A task, and its command line when asked for.
#[derive(Serialize)]
struct PsEntry<'a> {
    #[serde(flatten)]
    task: &'a kvmaccess_linux::Task,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmdline: Option<String>,
}

/// Most bytes of a command line read per process.
const MAX_CMDLINE: usize = 4096;

pub fn ps(args: &TargetArgs, cmd: &PsArgs, json: bool) -> Result<()> {
    let target = Target::open(args, Access::ReadOnly)?;
    let kernel = open_kernel(&target, &args.profile)?;
    let types = kernel_types(&kernel, &args.profile)?;
    let off = TaskOffsets::from_types(&types)?;
    let tasks = if cmd.pid_table {
        kernel.tasks_from_pid_table(&off)?
    } else if cmd.threads {
        kernel.threads_from_list(&off)?
    } else {
        kernel.tasks_from_list(&off)?
    };
    let entries: Vec<PsEntry<'_>> = tasks
        .iter()
        .map(|task| PsEntry {
            task,
            cmdline: (cmd.args && task.mm.is_some()).then(|| {
                kernel
                    .task_cmdline(&off, task, MAX_CMDLINE)
                    .map(|raw| {
                        String::from_utf8_lossy(&raw)
                            .trim_end_matches('\0')
                            .replace('\0', " ")
                    })
                    .unwrap_or_else(|e| format!("<unreadable: {e}>"))
            }),
        })
        .collect();
    if json {
        return print_json(&entries);
    }
    let mut text = format!(
        "{:>7} {:>7} {:>7} {:>5} S {:<16} {:<12} {}\n",
        "PID",
        "TID",
        "PPID",
        "UID",
        "COMMAND",
        "PAGE TABLE",
        if cmd.args { "ARGS" } else { "" }
    );
    for entry in &entries {
        let t = entry.task;
        let comm = if t.is_kernel_thread() {
            format!("[{}]", t.comm)
        } else {
            t.comm.clone()
        };
        text.push_str(&format!(
            "{:>7} {:>7} {:>7} {:>5} {} {:<16} {:<12} {}\n",
            t.tgid,
            t.pid,
            t.ppid.map_or_else(|| "-".to_string(), |p| p.to_string()),
            t.uid.map_or_else(|| "-".to_string(), |u| u.to_string()),
            t.state.letter,
            comm,
            t.pgd_phys
                .map_or_else(|| "-".to_string(), |g| g.to_string()),
            entry.cmdline.as_deref().unwrap_or(""),
        ));
    }
    out!("{text}");
    Ok(())
}

#[derive(Debug, Args)]
pub struct LsmodArgs {
    /// Show the sysfs (kobject) view of modules instead of the module list; a module that
    /// unlinked itself from the list still shows here.
    #[arg(long, conflicts_with = "tree")]
    kset: bool,
    /// Show the modules in the kernel's module address tree (`mod_tree`) instead of the module
    /// list; a module that unlinked itself from the list and from sysfs still shows here.
    #[arg(long)]
    tree: bool,
}

pub fn lsmod(args: &TargetArgs, cmd: &LsmodArgs, json: bool) -> Result<()> {
    let target = Target::open(args, Access::ReadOnly)?;
    let kernel = open_kernel(&target, &args.profile)?;
    let types = kernel_types(&kernel, &args.profile)?;
    let off = ModuleOffsets::from_types(&types)?;
    if cmd.kset {
        let kobjects = kernel.modules_from_kset(&off)?;
        if json {
            return print_json(&kobjects);
        }
        let mut text = format!("{:<24} {:>18} {}\n", "NAME", "KOBJECT", "MODULE");
        for k in &kobjects {
            text.push_str(&format!(
                "{:<24} {:#018x} {}\n",
                k.name,
                k.kobject,
                k.module
                    .map_or_else(|| "built-in".to_string(), |m| format!("{m:#x}"))
            ));
        }
        out!("{text}");
        return Ok(());
    }
    let modules = if cmd.tree {
        kernel
            .modules_from_tree(&off)?
            .into_iter()
            .map(|address| kernel.module_at(&off, address))
            .collect::<kvmaccess_linux::Result<Vec<_>>>()?
    } else {
        kernel.modules(&off)?
    };
    if json {
        return print_json(&modules);
    }
    let mut text = format!(
        "{:<24} {:>8} {:>4} {:<10} {:>18} {}\n",
        "MODULE", "SIZE", "USED", "STATE", "BASE", "TAINTS"
    );
    for m in &modules {
        text.push_str(&format!(
            "{:<24} {:>8} {:>4} {:<10} {:#018x} {}\n",
            m.name,
            m.size,
            m.refcount
                .map_or_else(|| "-".to_string(), |r| r.to_string()),
            m.proc_state(),
            m.base,
            m.taint_letters()
        ));
    }
    out!("{text}");
    Ok(())
}

#[derive(Debug, Args)]
pub struct DmesgArgs {}

pub fn dmesg(args: &TargetArgs, _cmd: &DmesgArgs, json: bool) -> Result<()> {
    let target = Target::open(args, Access::ReadOnly)?;
    let kernel = open_kernel(&target, &args.profile)?;
    let types = kernel_types(&kernel, &args.profile)?;
    let log = kernel.log_buffer(&types)?;
    if json {
        return print_json(&log);
    }
    for note in &log.notes {
        eprintln!("kvmaccess: note: {note}");
    }
    if log.skipped_count > 0 {
        eprintln!(
            "kvmaccess: note: {} record(s) skipped (overwritten while reading, or malformed)",
            log.skipped_count
        );
    }
    out!("{}", log.dmesg_text());
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum AbiArg {
    X64,
    Ia32,
    X32,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SyscallsArgs {
    #[command(subcommand)]
    pub set: Option<crate::setters::SyscallsSub>,
    /// Only this table [default: all the kernel has].
    #[arg(long, value_enum)]
    abi: Option<AbiArg>,
    /// Only entries that do not point where the kernel's own wrapper is.
    #[arg(long)]
    unexpected: bool,
}

pub fn syscalls(args: &TargetArgs, cmd: &SyscallsArgs, json: bool) -> Result<()> {
    if let Some(crate::setters::SyscallsSub::Set(set)) = &cmd.set {
        return crate::setters::syscalls_set(args, set, json);
    }
    let target = Target::open(args, Access::ReadOnly)?;
    let view = LinuxView::open(&target, &args.profile)?;
    let tables = view.kernel.syscall_tables(Some(&view.types))?;
    // The module list gives owners with the module region and symbol, for the text view.
    let owners = view.kernel.owners(&view.modules);
    let selected: Vec<&kvmaccess_linux::SyscallTable> = tables
        .tables()
        .filter(|t| match cmd.abi {
            None => true,
            Some(AbiArg::X64) => t.symbol == "sys_call_table",
            Some(AbiArg::Ia32) => t.symbol == "ia32_sys_call_table",
            Some(AbiArg::X32) => t.symbol == "x32_sys_call_table",
        })
        .collect();
    if cmd.abi.is_some() && selected.is_empty() {
        bail!(
            "this kernel has no such system-call table ({})",
            tables.notes.join("; ")
        );
    }
    if json {
        #[derive(Serialize)]
        struct Filtered<'a> {
            tables: Vec<FilteredTable<'a>>,
            notes: &'a [String],
        }
        #[derive(Serialize)]
        struct FilteredTable<'a> {
            symbol: &'a str,
            #[serde(with = "kvmaccess_core::hex")]
            address: u64,
            count_source: &'a str,
            entries: Vec<&'a kvmaccess_linux::SyscallEntry>,
        }
        return print_json(&Filtered {
            tables: selected
                .iter()
                .map(|t| FilteredTable {
                    symbol: t.symbol,
                    address: t.address,
                    count_source: &t.count_source,
                    entries: t
                        .entries
                        .iter()
                        .filter(|e| !cmd.unexpected || !e.expected)
                        .collect(),
                })
                .collect(),
            notes: &tables.notes,
        });
    }
    let mut text = String::new();
    for table in &selected {
        let unexpected = table.unexpected().count();
        text.push_str(&format!(
            "{} at {:#x}: {} entries ({}), {} unexpected\n",
            table.symbol,
            table.address,
            table.entries.len(),
            table.count_source,
            unexpected
        ));
        text.push_str(&format!(
            "{:>4} {:<24} {:>18} {:<40} {}\n",
            "NR", "NAME", "ADDRESS", "TARGET", "CHECK"
        ));
        for e in table
            .entries
            .iter()
            .filter(|e| !cmd.unexpected || !e.expected)
        {
            text.push_str(&format!(
                "{:>4} {:<24} {:#018x} {:<40} {}\n",
                e.number,
                e.name.as_deref().unwrap_or("?"),
                e.address,
                e.target.as_deref().unwrap_or("(no symbol)"),
                if e.expected {
                    "ok".to_string()
                } else {
                    format!("UNEXPECTED: owned by {}", owners.owner(e.address))
                }
            ));
        }
        text.push('\n');
    }
    for note in &tables.notes {
        text.push_str(&format!("note: {note}\n"));
    }
    out!("{text}");
    Ok(())
}

#[derive(Debug, Args)]
pub struct ProfileCmd {
    #[command(subcommand)]
    command: ProfileSub,
}

#[derive(Debug, Subcommand)]
enum ProfileSub {
    /// Write the derived profile: kvmaccess JSON, or a Volatility 3 ISF (symbols + BTF types)
    /// for a kernel that has no debug package.
    Export(ExportArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ProfileFormat {
    /// kvmaccess's own JSON: release, KASLR, symbols, the struct layouts it uses, provenance.
    Json,
    /// Volatility 3 Intermediate Symbol Format; put it under `<dir>/linux/` and pass `-s <dir>`.
    Isf,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Output file.
    #[arg(long, short, value_name = "FILE")]
    out: PathBuf,
    /// Format.
    #[arg(long, value_enum, default_value_t = ProfileFormat::Json)]
    format: ProfileFormat,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
}

pub fn profile(args: &TargetArgs, cmd: &ProfileCmd, json: bool) -> Result<()> {
    let ProfileSub::Export(export) = &cmd.command;
    check_output_path(&export.out, export.force)?;
    let target = Target::open(args, Access::ReadOnly)?;
    let view = LinuxView::open(&target, &args.profile)?;
    let what = match export.format {
        ProfileFormat::Json => {
            let profile = view.kernel.export_profile(
                Some(&view.types),
                &kvmaccess_linux::ProfileOptions::default(),
            )?;
            profile.write_to_path(&export.out)?;
            format!("kvmaccess profile ({} symbols)", profile.symbols.len())
        }
        ProfileFormat::Isf => {
            let isf = view.kernel.export_isf(&view.types)?;
            isf.write_to_path(&export.out)?;
            format!(
                "Volatility 3 ISF; Volatility looks for it as <dir>/linux/{}",
                kvmaccess_linux::Isf::file_name(view.kernel.release())
            )
        }
    };
    if json {
        return print_json(
            &serde_json::json!({ "path": export.out, "format": format!("{:?}", export.format).to_lowercase() }),
        );
    }
    outln!("wrote {}: {what}", export.out.display());
    Ok(())
}

/// The kernel symbol and owner of a handler address, for `idt`.
pub fn describe_address(view: &LinuxView<'_>, address: u64) -> (Option<String>, String) {
    let owners = view.kernel.owners(&view.modules);
    (
        view.kernel.symbols().describe(address),
        owner_summary(&owners.owner(address)),
    )
}

/// Who owns an address, without the symbol (printed beside it already).
pub fn owner_summary(owner: &kvmaccess_linux::Owner) -> String {
    match owner {
        kvmaccess_linux::Owner::Kernel { section, .. } => format!("kernel {}", section.as_str()),
        kvmaccess_linux::Owner::Module { name, region, .. } => {
            format!("module {name} {}", region.as_str())
        }
        kvmaccess_linux::Owner::Unowned => "UNOWNED memory".to_string(),
    }
}

/// Checks the IDTR base against the kernel's `idt_table` and its read-only alias in the
/// cpu_entry_area; returns a sentence for the user.
pub fn idtr_verdict(view: &LinuxView<'_>, idtr_base: u64) -> String {
    const CPU_ENTRY_AREA_IDT: u64 = 0xffff_fe00_0000_0000;
    match view.kernel.symbol("idt_table") {
        Ok(table) if table == idtr_base => format!("IDTR base is idt_table ({table:#x})"),
        Ok(table) if idtr_base == CPU_ENTRY_AREA_IDT => format!(
            "IDTR base is the read-only cpu_entry_area alias of idt_table ({table:#x})"
        ),
        Ok(table) => format!(
            "IDTR base {idtr_base:#x} is neither idt_table ({table:#x}) nor its cpu_entry_area alias: the IDT was replaced"
        ),
        Err(e) => format!("cannot check the IDTR base: {e}"),
    }
}

/// Reads a process's user memory: the address space of its `mm->pgd`.
pub fn process_reader<'t>(
    target: &'t Target,
    profile: &ProfileArgs,
    pid: i32,
) -> Result<kvmaccess_x86::AddressSpace<'t, dyn kvmaccess_core::PhysicalMemory + 't>> {
    let kernel = open_kernel(target, profile)?;
    let types = kernel_types(&kernel, profile)?;
    let off = TaskOffsets::from_types(&types)?;
    let task = kernel
        .task_by_pid(&off, pid)
        .with_context(|| format!("finding process {pid}"))?;
    Ok(kernel.process_space(&task)?)
}
