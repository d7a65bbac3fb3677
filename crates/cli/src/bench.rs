//! `kvmaccess bench`: the cost of each access primitive on a real target, printed next to the
//! 2011 KvmAccess paper's figures.
//!
//! Fast operations are timed in batches (one clock read per batch, divided by the batch size),
//! because a clock read costs about as much as the operation being measured. Median and p99 are
//! over batches; for slow operations a batch is one call.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use kvmaccess_core::{Gpa, Gva, PhysicalMemory, Registers};
use kvmaccess_x86::{read_gdt, read_idt, AddressSpace, PagingMode};
use serde::Serialize;

use crate::linux::ProfileArgs;
use crate::outln;
use crate::output::print_json;
use crate::target::{Access, Target};
use crate::TargetArgs;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub monitor: Option<crate::bench_monitor::MonitorSub>,
    /// How long to spend on each row (the number of runs adapts to it).
    #[arg(long, default_value = "1s", value_parser = crate::parse::parse_duration)]
    time_per_row: Duration,
    /// Bytes of guest RAM read for the bulk physical row.
    #[arg(long, default_value = "256M", value_parser = crate::size_arg)]
    bulk_bytes: u64,
}

/// One row of the table.
#[derive(Debug, Serialize)]
struct Row {
    operation: &'static str,
    median_us: f64,
    p99_us: f64,
    runs: usize,
    /// Throughput, for bulk rows.
    gb_per_s: Option<f64>,
    /// The paper's CPU-time figure, in microseconds.
    paper_us: Option<f64>,
    /// Our target for this row, in words.
    target: &'static str,
    note: String,
}

/// Times `op`, `batch` calls per sample, until `budget` is spent (at least 5 samples).
fn measure(budget: Duration, batch: usize, mut op: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let batch = batch.max(1);
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < 5 || (start.elapsed() < budget && samples.len() < 100_000) {
        let t0 = Instant::now();
        for _ in 0..batch {
            op()?;
        }
        let per_op = t0.elapsed().as_secs_f64() * 1e6 / batch as f64;
        samples.push(per_op);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// Nearest-rank percentile, `permille` in 0..=1000.
fn percentile(sorted: &[f64], permille: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let last = sorted.len() - 1;
    let rank = (last * permille.min(1000) + 500) / 1000;
    sorted[rank.min(last)]
}

fn row(
    operation: &'static str,
    samples: &[f64],
    paper_us: Option<f64>,
    target: &'static str,
    note: impl Into<String>,
) -> Row {
    Row {
        operation,
        median_us: percentile(samples, 500),
        p99_us: percentile(samples, 990),
        runs: samples.len(),
        gb_per_s: None,
        paper_us,
        target,
        note: note.into(),
    }
}

/// A page-aligned kernel address range of `len` bytes that is mapped, found from the page-fault
/// handler (kernel text is mapped contiguously around it).
fn mapped_kernel_range(
    space: &mut AddressSpace<'_, dyn PhysicalMemory + '_>,
    registers: &Registers,
    len: usize,
) -> Result<u64> {
    let gates = read_idt(space, registers.idtr, true).context("reading the IDT")?;
    let handler = gates
        .get(14)
        .map(|g| g.offset)
        .context("the IDT has no gate 14")?;
    let page = handler & !0xfff;
    let mut probe = vec![0u8; len];
    for candidate in [
        page,
        page.saturating_sub(len as u64),
        page.saturating_sub(2 * len as u64),
    ] {
        if space.read(Gva(candidate), &mut probe).is_ok() {
            return Ok(candidate);
        }
    }
    bail!("found no {len}-byte mapped range around the page-fault handler {handler:#x}")
}

pub fn bench(args: &TargetArgs, cmd: &BenchArgs, json: bool) -> Result<()> {
    if let Some(crate::bench_monitor::MonitorSub::Monitor(monitor)) = &cmd.monitor {
        return crate::bench_monitor::bench_monitor(args, monitor, json);
    }
    let target = Target::open(args, Access::ReadOnly)?;
    let budget = cmd.time_per_row;
    let memory = target.memory();
    let registers = target.registers(0)?;
    if !PagingMode::from_registers(&registers).is_long_mode() {
        bail!("the benchmark needs a 64-bit guest in long mode (vCPU 0 is not)");
    }
    let mut rows = Vec::new();

    let mut space = AddressSpace::from_registers(memory, &registers);
    let idt_base = registers.idtr.base;
    let mut word = [0u8; 4];

    let cold = measure(budget, 100, || {
        space.cache_mut().invalidate_all();
        space.read(Gva(idt_base), &mut word)?;
        black_box(&word);
        Ok(())
    })?;
    rows.push(row(
        "4-byte virtual read, cold translation",
        &cold,
        Some(6.4),
        "-",
        "full page walk every time",
    ));

    space.read(Gva(idt_base), &mut word)?;
    let warm = measure(budget, 10_000, || {
        space.read(Gva(idt_base), &mut word)?;
        black_box(&word);
        Ok(())
    })?;
    rows.push(row(
        "4-byte virtual read, warm translation",
        &warm,
        Some(6.4),
        "<= 0.1 us on shared RAM",
        "translation cache hit",
    ));

    let mut page = vec![0u8; 4096];
    let page_base = idt_base & !0xfff;
    let four_k = measure(budget, 1000, || {
        space.read(Gva(page_base), &mut page)?;
        black_box(&page);
        Ok(())
    })?;
    rows.push(row("4 KiB virtual read", &four_k, None, "-", "warm"));

    let mib = 1usize << 20;
    match mapped_kernel_range(&mut space, &registers, mib) {
        Ok(start) => {
            let mut big = vec![0u8; mib];
            let one_mib = measure(budget, 1, || {
                space.read(Gva(start), &mut big)?;
                black_box(&big);
                Ok(())
            })?;
            let mut r = row(
                "1 MiB virtual read",
                &one_mib,
                None,
                "-",
                "kernel text, warm",
            );
            r.gb_per_s = Some(mib as f64 / (r.median_us * 1e-6) / 1e9);
            rows.push(r);
        }
        Err(e) => eprintln!("kvmaccess: skipping the 1 MiB row: {e}"),
    }

    rows.push(bulk_row(memory, cmd.bulk_bytes, budget)?);

    let vcpus = target.vcpus();
    let regs = measure(budget, 1, || {
        black_box(vcpus.all_registers()?);
        Ok(())
    })?;
    rows.push(row(
        "register read, all vCPUs",
        &regs,
        Some(7.0),
        "as fast as QMP allows",
        format!(
            "{} vCPU(s), {}",
            vcpus.vcpu_count(),
            match &target {
                Target::Live(_) if args.regs_from_dump => "QMP dump-guest-memory notes",
                Target::Live(_) => "QMP human-monitor-command `info registers -a`",
                Target::Dump(_) => "from the dump's notes",
            }
        ),
    ));
    if let Target::Live(vm) = &target {
        let alt = measure(budget, 1, || {
            if args.regs_from_dump {
                black_box(vm.registers_hmp()?);
            } else {
                black_box(vm.registers_dump()?);
            }
            Ok(())
        })?;
        rows.push(row(
            "register read, all vCPUs (other QMP path)",
            &alt,
            Some(7.0),
            "cross-check",
            if args.regs_from_dump {
                "HMP `info registers -a`"
            } else {
                "one-page dump-guest-memory notes"
            },
        ));
    }

    let gdt = measure(budget, 100, || {
        black_box(read_gdt(&mut space, registers.gdtr, true)?);
        Ok(())
    })?;
    rows.push(row(
        "GDT read + decode",
        &gdt,
        Some(7.8),
        "-",
        format!(
            "{} bytes, GDTR already known",
            u64::from(registers.gdtr.limit) + 1
        ),
    ));
    let idt = measure(budget, 100, || {
        black_box(read_idt(&mut space, registers.idtr, true)?);
        Ok(())
    })?;
    rows.push(row(
        "IDT read + decode (256 gates)",
        &idt,
        Some(7.4),
        "-",
        "IDTR already known",
    ));

    match linux_rows(&target, args, budget) {
        Ok(mut linux) => rows.append(&mut linux),
        Err(e) => eprintln!("kvmaccess: skipping the Linux rows: {e:#}"),
    }

    if json {
        return print_json(&rows);
    }
    outln!("kvmaccess bench on {}", target.describe());
    outln!(
        "{:<44} {:>11} {:>11} {:>9} {:>10}  {:<24} note",
        "operation",
        "median us",
        "p99 us",
        "GB/s",
        "paper us",
        "target"
    );
    for r in &rows {
        outln!(
            "{:<44} {:>11.4} {:>11.4} {:>9} {:>10}  {:<24} {}",
            r.operation,
            r.median_us,
            r.p99_us,
            r.gb_per_s
                .map_or_else(|| "-".to_string(), |g| format!("{g:.2}")),
            r.paper_us
                .map_or_else(|| "-".to_string(), |p| format!("{p:.1}")),
            r.target,
            r.note
        );
    }
    outln!("paper: Xeon 2.66 GHz, KVM module inside the host kernel, CPU time only (2011).");
    Ok(())
}

/// The Linux layer: profile discovery from nothing, the syscall table, the task list.
fn linux_rows(target: &Target, args: &TargetArgs, budget: Duration) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let uncached = ProfileArgs {
        no_profile_cache: true,
        profile_cache: None,
        ..args.profile.clone()
    };
    // A private cache, so that the row measures hits whatever the user's cache holds; one
    // discovery fills it first.
    let cache_dir = std::env::temp_dir().join(format!("kvmaccess-bench-{}", std::process::id()));
    let cached = ProfileArgs {
        no_profile_cache: false,
        profile_cache: Some(cache_dir.clone()),
        ..args.profile.clone()
    };
    let result = profile_rows(target, &uncached, &cached, budget, &mut rows);
    let _ = std::fs::remove_dir_all(&cache_dir);
    result?;
    let kernel = crate::linux::open_kernel(target, &uncached)?;
    let types = crate::linux::kernel_types(&kernel, &uncached)?;
    let resolver = kvmaccess_linux::SyscallResolver::new(&kernel, Some(&types))?;
    let tables = resolver.read(&kernel)?;
    let syscalls = measure(budget, 100, || {
        black_box(resolver.read(&kernel)?);
        Ok(())
    })?;
    rows.push(row(
        "syscall table read + decode (x64)",
        &syscalls,
        Some(10.1),
        "<= 20 us on shared RAM",
        format!(
            "{} entries resolved to symbols and checked",
            tables.x64.entries.len()
        ),
    ));
    let offsets = kvmaccess_linux::TaskOffsets::from_types(&types)?;
    let count = kernel.tasks_from_list(&offsets)?.len();
    let ps = measure(budget, 10, || {
        black_box(kernel.tasks_from_list(&offsets)?);
        Ok(())
    })?;
    rows.push(row(
        "ps (task list walk)",
        &ps,
        None,
        "< 10 ms for 1,000 tasks",
        format!("{count} tasks"),
    ));
    Ok(rows)
}

/// Discovery and type loading, from guest memory alone and from a warm profile cache, side by
/// side.
fn profile_rows(
    target: &Target,
    uncached: &ProfileArgs,
    cached: &ProfileArgs,
    budget: Duration,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let discovery = measure(budget, 1, || {
        black_box(crate::linux::open_kernel(target, uncached)?);
        Ok(())
    })?;
    rows.push(row(
        "profile discovery (attach to ready)",
        &discovery,
        None,
        "< 1 s",
        "VMCOREINFO scan, KASLR, kallsyms decode and index",
    ));
    let warm = crate::linux::open_kernel(target, cached)?;
    crate::linux::kernel_types(&warm, cached)?;
    let cache_used = warm.build_id().is_some();
    let discovery = measure(budget, 1, || {
        black_box(crate::linux::open_kernel(target, cached)?);
        Ok(())
    })?;
    rows.push(row(
        "profile discovery, cached",
        &discovery,
        None,
        "< 10 ms",
        if cache_used {
            "remembered VMCOREINFO, cached kallsyms names and indexes, guest bytes hash-checked"
                .to_string()
        } else {
            "no build id: nothing cached".to_string()
        },
    ));
    let kernel = crate::linux::open_kernel(target, uncached)?;
    let types = measure(budget, 1, || {
        black_box(crate::linux::kernel_types(&kernel, uncached)?);
        Ok(())
    })?;
    rows.push(row(
        "kernel types (BTF read + parse)",
        &types,
        None,
        "",
        "the whole blob from guest memory",
    ));
    let types = measure(budget, 1, || {
        black_box(crate::linux::kernel_types(&warm, cached)?);
        Ok(())
    })?;
    rows.push(row(
        "kernel types, cached",
        &types,
        None,
        "",
        "blob read and hash-checked, cached name index",
    ));
    Ok(())
}

/// Reads `bytes` of guest RAM from the start of the largest RAM range in 1 MiB chunks.
fn bulk_row(memory: &dyn PhysicalMemory, bytes: u64, budget: Duration) -> Result<Row> {
    let range = memory
        .ranges()
        .iter()
        .max_by_key(|r| r.len())
        .copied()
        .context("the target has no RAM ranges")?;
    let total = bytes.min(range.len());
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk];
    let samples = measure(budget, 1, || {
        let mut offset = 0u64;
        while offset < total {
            let n = usize::try_from((total - offset).min(chunk as u64)).unwrap_or(chunk);
            memory.read_phys(Gpa(range.start.0 + offset), &mut buf[..n])?;
            black_box(&buf);
            offset += n as u64;
        }
        Ok(())
    })?;
    let mut r = row(
        "bulk physical read",
        &samples,
        None,
        ">= 10 GB/s",
        format!("{} MiB in 1 MiB chunks", total >> 20),
    );
    r.gb_per_s = Some(total as f64 / (r.median_us * 1e-6) / 1e9);
    Ok(r)
}
