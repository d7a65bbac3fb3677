//! `kvmaccess bench monitor`: what the integrity monitor costs — CPU per pass split by check,
//! the monitor's share of one core at 1 s and 10 s periods, the extra CPU QEMU spends answering
//! our QMP calls, and the guest's slowdown on a workload while it is watched.
//!
//! Ratios are measured side by side in one run (alternating rounds), because this machine's
//! speed drifts.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use kvmaccess_integrity::{capture_baseline, CheckSet, Context, ModuleTracker};
use kvmaccess_linux::Kernel;
use serde::Serialize;

use crate::linux::{kernel_types, open_kernel};
use crate::monitor::run_pass;
use crate::output::print_json;
use crate::target::{booted_guest, Access, Target};
use crate::{outln, TargetArgs};

#[derive(Debug, Subcommand)]
pub enum MonitorSub {
    /// The integrity monitor's overhead.
    Monitor(MonitorArgs),
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Passes measured per configuration.
    #[arg(long, default_value_t = 20)]
    passes: usize,
    /// Alternating rounds of the guest workload without and with watching (needs a guest
    /// started by `kvmaccess boot`, whose console runs the workload; 0 skips it).
    #[arg(long, default_value_t = 3)]
    workload_rounds: usize,
    /// Seconds a real `kvmaccess watch --interval 1s` runs per configuration while its CPU is
    /// measured from outside (needs a guest started by `kvmaccess boot`; 0 skips it).
    #[arg(long, default_value_t = 20)]
    watch_seconds: u64,
}

#[derive(Serialize)]
struct CheckCost {
    check: &'static str,
    median_cpu_us: f64,
    max_cpu_us: f64,
}

#[derive(Serialize)]
struct Config {
    name: &'static str,
    checks: Vec<&'static str>,
    text_budget: Option<u64>,
    /// CPU of our process per pass, registers fetch and module refresh included.
    median_pass_cpu_us: f64,
    share_at_1s_percent: f64,
    share_at_10s_percent: f64,
    per_check: Vec<CheckCost>,
}

#[derive(Serialize)]
struct MonitorReport {
    /// Our CPU for one fetch of every vCPU's registers over QMP (part of every pass).
    register_fetch_cpu_us: f64,
    /// Our CPU to set up a pass's context (address map) once registers are in.
    context_setup_cpu_us: f64,
    configs: Vec<Config>,
    qemu_extra_cpu_us_per_pass: Option<f64>,
    /// Real watch processes at a 1 s interval, measured from outside.
    watch_processes: Vec<WatchProcess>,
    guest_workload: Option<Workload>,
}

#[derive(Serialize)]
struct WatchProcess {
    name: &'static str,
    checks: String,
    seconds: f64,
    cpu_us: f64,
    share_percent: f64,
    /// What waking up every second costs on this host, measured in the same window.
    floors: Vec<Floor>,
}

/// A thread of this process that does only part of a watch's work once a second: the cost no
/// monitor at that period can go below on this host (a process woken from sleep pays the
/// scheduler and, in a VM, the hypervisor, whatever it then does).
#[derive(Serialize)]
struct Floor {
    name: &'static str,
    cpu_us_per_s: f64,
    share_percent: f64,
}

#[derive(Serialize)]
struct Workload {
    description: &'static str,
    unwatched_s: Vec<f64>,
    watched_s: Vec<f64>,
    slowdown_ratio: f64,
}

fn process_cpu() -> Duration {
    cpu_time::ProcessTime::try_now()
        .map(|t| t.as_duration())
        .unwrap_or_default()
}

/// utime + stime of a process in clock ticks, from /proc.
fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn bench_monitor(args: &TargetArgs, cmd: &MonitorArgs, json: bool) -> Result<()> {
    if cmd.passes == 0 {
        bail!("--passes must be at least 1");
    }
    let target = Target::open(args, Access::ReadOnly)?;
    let Target::Live(vm) = &target else {
        bail!("bench monitor needs a live guest");
    };
    let mut kernel = open_kernel(&target, &args.profile)?;
    let types = kernel_types(&kernel, &args.profile).ok();

    let mut fetch = Vec::new();
    let mut setup = Vec::new();
    for _ in 0..cmd.passes {
        let before = process_cpu();
        let registers = target.vcpus().all_registers()?;
        let between = process_cpu();
        drop(Context::new(&kernel, registers)?);
        let after = process_cpu();
        fetch.push((between - before).as_secs_f64() * 1e6);
        setup.push((after - between).as_secs_f64() * 1e6);
    }

    let paper: &[&str] = &["gdt", "idt", "syscalls", "cr"];
    let mut configs = Vec::new();
    for (name, set, budget) in [
        (
            "paper's objects (GDT, IDT, syscall table, CRs)",
            CheckSet::from_ids(paper)?,
            None,
        ),
        (
            "all checks, text compared 2 MiB per pass",
            CheckSet::default(),
            Some(2u64 << 20),
        ),
        ("all checks, all text every pass", CheckSet::default(), None),
    ] {
        let checks = match budget {
            Some(b) => set.with_text_budget(b),
            None => set,
        };
        let mut modules = ModuleTracker::new(&kernel);
        let ctx = Context::from_backend(&kernel, target.vcpus())?;
        let baseline = capture_baseline(&ctx, &checks)?;
        drop(ctx);
        // One warm-up pass: the first fills caches the steady state has.
        run_pass(
            &mut kernel,
            &target,
            types.as_ref(),
            &baseline,
            &checks,
            &mut modules,
        )?;
        let mut pass_cpu = Vec::new();
        let mut per_check: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
        for _ in 0..cmd.passes {
            let before = process_cpu();
            let report = run_pass(
                &mut kernel,
                &target,
                types.as_ref(),
                &baseline,
                &checks,
                &mut modules,
            )?;
            pass_cpu.push((process_cpu() - before).as_secs_f64() * 1e6);
            for run in &report.checks {
                if let Some(cpu) = run.cpu {
                    per_check
                        .entry(run.id)
                        .or_default()
                        .push(cpu.as_secs_f64() * 1e6);
                }
            }
        }
        let median_pass = median(&mut pass_cpu);
        configs.push(Config {
            name,
            checks: checks.ids(),
            text_budget: budget,
            median_pass_cpu_us: median_pass,
            share_at_1s_percent: median_pass / 1e6 * 100.0,
            share_at_10s_percent: median_pass / 10e6 * 100.0,
            per_check: per_check
                .into_iter()
                .map(|(check, mut v)| CheckCost {
                    check,
                    max_cpu_us: v.iter().copied().fold(0.0, f64::max),
                    median_cpu_us: median(&mut v),
                })
                .collect(),
        });
    }

    // QEMU's side: CPU of the QEMU process over a window of back-to-back passes minus an idle
    // window of the same length, per pass. Noisy under TCG (QEMU also runs the guest), so the
    // windows alternate and the median of the differences is kept.
    let qemu_extra = vm.pid().map(|pid| -> Result<f64> {
        let checks = CheckSet::from_ids(paper)?;
        let ctx = Context::from_backend(&kernel, target.vcpus())?;
        let baseline = capture_baseline(&ctx, &checks)?;
        drop(ctx);
        let mut modules = ModuleTracker::new(&kernel);
        let tick_us = 1e6 / 100.0;
        let mut diffs = Vec::new();
        for _ in 0..3 {
            let window = Duration::from_millis(1000);
            let idle_start = proc_cpu_ticks(pid).context("reading QEMU's CPU time")?;
            std::thread::sleep(window);
            let idle = proc_cpu_ticks(pid).context("reading QEMU's CPU time")? - idle_start;
            let busy_start = proc_cpu_ticks(pid).context("reading QEMU's CPU time")?;
            let started = Instant::now();
            let mut passes = 0u32;
            while started.elapsed() < window {
                run_pass(
                    &mut kernel,
                    &target,
                    types.as_ref(),
                    &baseline,
                    &checks,
                    &mut modules,
                )?;
                passes += 1;
            }
            let busy = proc_cpu_ticks(pid).context("reading QEMU's CPU time")? - busy_start;
            diffs.push((busy as f64 - idle as f64) * tick_us / f64::from(passes.max(1)));
        }
        Ok(median(&mut diffs))
    });
    let qemu_extra = match qemu_extra {
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            eprintln!("kvmaccess: note: QEMU CPU not measured: {e:#}");
            None
        }
        None => None,
    };

    let mut watch_processes = Vec::new();
    if cmd.watch_seconds > 0 {
        let window = Duration::from_secs(cmd.watch_seconds);
        for (name, ids) in [
            ("paper's objects", paper.join(",")),
            (
                "all checks, text 2 MiB per pass",
                CheckSet::default().ids().join(","),
            ),
        ] {
            match watch_process(args, &kernel, &target, name, &ids, window) {
                Ok(w) => watch_processes.push(w),
                Err(e) => {
                    eprintln!("kvmaccess: note: watch process not measured: {e:#}");
                    break;
                }
            }
        }
    }

    let guest_workload = if cmd.workload_rounds > 0 {
        match workload(
            args,
            &mut kernel,
            &target,
            types.as_ref(),
            cmd.workload_rounds,
        ) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("kvmaccess: note: guest slowdown not measured: {e:#}");
                None
            }
        }
    } else {
        None
    };

    let report = MonitorReport {
        register_fetch_cpu_us: median(&mut fetch),
        context_setup_cpu_us: median(&mut setup),
        configs,
        qemu_extra_cpu_us_per_pass: qemu_extra,
        watch_processes,
        guest_workload,
    };
    if json {
        return print_json(&report);
    }
    outln!(
        "kvmaccess bench monitor on {} ({} passes each)",
        target.describe(),
        cmd.passes
    );
    for c in &report.configs {
        outln!(
            "\n{}: {:.1} us CPU per pass -> {:.4}% of a core at 1 s, {:.5}% at 10 s",
            c.name,
            c.median_pass_cpu_us,
            c.share_at_1s_percent,
            c.share_at_10s_percent
        );
        for k in &c.per_check {
            outln!(
                "  {:<10} median {:>9.1} us  max {:>9.1} us",
                k.check,
                k.median_cpu_us,
                k.max_cpu_us
            );
        }
    }
    outln!(
        "\nper pass besides the checks: register fetch {:.1} us CPU, context setup {:.1} us CPU",
        report.register_fetch_cpu_us,
        report.context_setup_cpu_us
    );
    outln!("paper (2011): 0.37% at 1 s, 0.02% at 10 s for GDT, IDT, syscall table and CR0.WP");
    outln!("targets: paper's objects <= 0.01% at 1 s; everything incl. text <= 0.1% at 1 s");
    match report.qemu_extra_cpu_us_per_pass {
        Some(us) => outln!("QEMU's extra CPU per pass (QMP register fetch): {us:.0} us"),
        None => outln!("QEMU's extra CPU: not measured"),
    }
    for w in &report.watch_processes {
        outln!(
            "a real `watch --interval 1s` ({}), measured from outside over {:.0} s: {:.0} us CPU per second -> {:.4}% of a core",
            w.name,
            w.seconds,
            w.cpu_us / w.seconds,
            w.share_percent
        );
        for f in &w.floors {
            outln!(
                "  beside it, {}: {:.0} us per second -> {:.4}%",
                f.name,
                f.cpu_us_per_s,
                f.share_percent
            );
        }
    }
    if let Some(w) = &report.guest_workload {
        outln!(
            "guest workload ({}): unwatched {:?} s, watched at 1 s {:?} s, slowdown x{:.3}",
            w.description,
            w.unwatched_s,
            w.watched_s,
            w.slowdown_ratio
        );
    }
    Ok(())
}

/// The CPU a real `kvmaccess watch --interval 1s` process spends over `window` once it is
/// checking: passes with caches gone cold in between, event handling, module-list refreshes and
/// sleeps included, unlike the back-to-back passes above. It runs on the booted guest's second
/// QMP socket, beside this process's connection.
fn watch_process(
    args: &TargetArgs,
    kernel: &Kernel<'_>,
    target: &Target,
    name: &'static str,
    checks: &str,
    window: Duration,
) -> Result<WatchProcess> {
    use std::io::BufRead as _;

    booted_guest(args).context("a watch process needs a guest started by `boot`")?;
    let Target::Live(vm) = target else {
        bail!("a watch process needs a live guest");
    };
    let qmp = vm.qmp();
    let dir = tempfile::tempdir().context("a directory for the baseline")?;
    let baseline_path = dir.path().join("baseline.json");
    let set = CheckSet::from_ids(&checks.split(',').collect::<Vec<_>>())?;
    let ctx = Context::from_backend(kernel, target.vcpus())?;
    capture_baseline(&ctx, &set)?.save(&baseline_path)?;
    drop(ctx);
    let exe = std::env::current_exe().context("finding the kvmaccess executable")?;
    let mut command = std::process::Command::new(exe);
    if let Some(guest) = &args.guest {
        command.arg("--guest").arg(guest);
    }
    if let Some(root) = &args.run_root {
        command.arg("--run-root").arg(root);
    }
    let mut child = command
        .arg("watch")
        .arg("--baseline")
        .arg(&baseline_path)
        .args(["--interval", "1s", "--no-info", "--checks", checks])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting kvmaccess watch")?;
    let measured = (|| -> Result<WatchProcess> {
        let stdout = child.stdout.take().context("the watch's output")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        loop {
            let line = lines
                .next()
                .context("the watch ended before it found the kernel")??;
            if line.contains("\"event\":\"finding\"") {
                bail!("the watch raised a finding on a clean guest: {line}");
            }
            if line.contains("\"event\":\"kernel-found\"") {
                break;
            }
        }
        // Startup (profile discovery, types) is over; let the first passes go by.
        std::thread::sleep(Duration::from_secs(2));
        let pid = child.id();
        let (cpu, seconds, floors) = std::thread::scope(|scope| -> Result<_> {
            let idle = scope.spawn(|| floor("a thread that only sleeps 1 s", window, || Ok(())));
            let fetch = scope.spawn(|| {
                floor(
                    "a thread that also fetches the registers over QMP (unparsed)",
                    window,
                    || {
                        qmp.hmp("info registers -a")?;
                        Ok(())
                    },
                )
            });
            let before = on_cpu(pid)?;
            let started = Instant::now();
            std::thread::sleep(window);
            let cpu = on_cpu(pid)? - before;
            let seconds = started.elapsed().as_secs_f64();
            let mut floors = Vec::new();
            for thread in [idle, fetch] {
                match thread.join() {
                    Ok(Ok(f)) => floors.push(f),
                    Ok(Err(e)) => eprintln!("kvmaccess: note: a floor was not measured: {e:#}"),
                    Err(_) => bail!("a floor-measuring thread panicked"),
                }
            }
            Ok((cpu, seconds, floors))
        })?;
        let cpu_us = cpu.as_secs_f64() * 1e6;
        Ok(WatchProcess {
            name,
            checks: checks.to_string(),
            seconds,
            cpu_us,
            share_percent: cpu_us / (seconds * 1e6) * 100.0,
            floors,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    measured
}

/// Runs `work` once a second for `window` on this thread, and measures the thread's CPU from
/// its own schedstat (not the process's: the bench's other threads must not count).
fn floor(
    name: &'static str,
    window: Duration,
    mut work: impl FnMut() -> Result<()>,
) -> Result<Floor> {
    const PERIOD: Duration = Duration::from_secs(1);
    let before = thread_on_cpu()?;
    let started = Instant::now();
    while started.elapsed() + PERIOD <= window {
        let round = Instant::now();
        work()?;
        std::thread::sleep(PERIOD.saturating_sub(round.elapsed()));
    }
    let cpu = thread_on_cpu()? - before;
    let cpu_us_per_s = cpu.as_secs_f64() * 1e6 / started.elapsed().as_secs_f64();
    Ok(Floor {
        name,
        cpu_us_per_s,
        share_percent: cpu_us_per_s / 1e4,
    })
}

fn thread_on_cpu() -> Result<Duration> {
    schedstat_on_cpu("/proc/thread-self/schedstat")
}

/// Time the main thread of process `pid` has spent on a CPU (schedstat: nanoseconds). A watch
/// runs on that one thread; QEMU, with a thread per vCPU, is measured by [`proc_cpu_ticks`].
fn on_cpu(pid: u32) -> Result<Duration> {
    schedstat_on_cpu(&format!("/proc/{pid}/schedstat"))
}

/// The first schedstat field: nanoseconds on a CPU.
fn schedstat_on_cpu(path: &str) -> Result<Duration> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .with_context(|| format!("{path} is not a schedstat line: {text:?}"))?;
    Ok(Duration::from_nanos(ns))
}

/// Runs a CPU/memory workload on the booted guest's console, alternating rounds without and with
/// a monitor thread doing a full pass every second.
fn workload(
    args: &TargetArgs,
    kernel: &mut Kernel<'_>,
    target: &Target,
    types: Option<&kvmaccess_linux::KernelTypes>,
    rounds: usize,
) -> Result<Workload> {
    const DESCRIPTION: &str = "busybox: 32 MiB through md5sum, plus a 20,000-step shell loop";
    const SCRIPT: &str = "dd if=/dev/zero bs=1M count=32 2>/dev/null | md5sum >/dev/null; \
                          i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done";
    let state = booted_guest(args).context("the workload runs on a guest started by `boot`")?;
    let mut console = state.console()?;
    let checks = CheckSet::default().with_text_budget(2 << 20);
    let ctx = Context::from_backend(kernel, target.vcpus())?;
    let baseline = capture_baseline(&ctx, &checks)?;
    drop(ctx);
    let timeout = Duration::from_secs(300);
    let run_once = |console: &mut kvmaccess_qemu::Console| -> Result<f64> {
        let started = Instant::now();
        console.run(SCRIPT, timeout)?;
        Ok(started.elapsed().as_secs_f64())
    };
    run_once(&mut console)?;
    let (mut unwatched, mut watched) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        unwatched.push(run_once(&mut console)?);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let result = std::thread::scope(|scope| -> Result<f64> {
            let (kernel, stop, baseline, checks) = (&mut *kernel, &stop, &baseline, &checks);
            let monitor = scope.spawn(move || -> Result<()> {
                let mut modules = ModuleTracker::new(kernel);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    run_pass(kernel, target, types, baseline, checks, &mut modules)?;
                    std::thread::sleep(Duration::from_secs(1));
                }
                Ok(())
            });
            let elapsed = run_once(&mut console);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            monitor
                .join()
                .map_err(|_| anyhow::anyhow!("the monitor thread panicked"))??;
            elapsed
        })?;
        watched.push(result);
    }
    let ratio = median(&mut watched.clone()) / median(&mut unwatched.clone());
    Ok(Workload {
        description: DESCRIPTION,
        unwatched_s: unwatched,
        watched_s: watched,
        slowdown_ratio: ratio,
    })
}
