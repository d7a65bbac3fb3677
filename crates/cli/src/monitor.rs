//! The integrity monitor: `baseline`, `check`, `watch`, and the write commands behind
//! `--on-finding restore` (`idt set`, `gdt set`, `syscalls set`).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use kvmaccess_core::{Gva, PhysicalMemoryWrite};
use kvmaccess_integrity::{
    apply_write, capture_baseline, listed_and_hidden_modules, module_spans, restore_plan,
    run_checks, Baseline, CheckSet, Context, Finding, ModuleSpan, ModuleTracker, Report, Restore,
    Severity, CHECKS,
};
use kvmaccess_linux::{Kernel, ModuleOffsets};
use kvmaccess_x86::AddressSpace;
use serde::Serialize;

use crate::linux::{kernel_types, open_kernel, ProfileArgs};
use crate::output::print_json;
use crate::parse::parse_duration;
use crate::target::{check_output_path, Access, Target};
use crate::{outln, TargetArgs};

/// Exit code of `check` when it found something that is not a legitimate state change.
const EXIT_FINDINGS: u8 = 1;

/// Which checks run.
#[derive(Debug, Clone, Args)]
pub struct CheckSelection {
    /// Only these checks (comma-separated ids; `kvmaccess check --list` names them).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "IDS",
        conflicts_with = "skip"
    )]
    checks: Vec<String>,
    /// Every default check but these.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    skip: Vec<String>,
}

impl CheckSelection {
    fn build(&self) -> Result<CheckSet> {
        Ok(if !self.checks.is_empty() {
            CheckSet::from_ids(&self.checks)?
        } else if !self.skip.is_empty() {
            CheckSet::without(&self.skip)?
        } else {
            CheckSet::default()
        })
    }
}

#[derive(Debug, Args)]
pub struct BaselineArgs {
    /// Where to write the baseline (JSON; kernel text copies go to FILE.bin beside it).
    #[arg(long, short, value_name = "FILE")]
    out: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    selection: CheckSelection,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The baseline taken from this guest (or another boot of the same kernel build).
    #[arg(long, value_name = "FILE", required_unless_present = "list")]
    baseline: Option<PathBuf>,
    /// List the checks and exit.
    #[arg(long)]
    list: bool,
    /// Leave out informational findings (the kernel's own legitimate changes).
    #[arg(long)]
    no_info: bool,
    #[command(flatten)]
    selection: CheckSelection,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The baseline taken from this guest (or another boot of the same kernel build).
    #[arg(long, value_name = "FILE")]
    baseline: PathBuf,
    /// Time between passes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// What to do when an alarm (a non-informational finding) appears; repeatable:
    /// `pause` (stop the guest), `dump=DIR` (ELF core for forensics), `restore` (write the
    /// baseline value back; needs --allow-write), `exec=CMD` (run CMD with the finding as JSON
    /// on stdin and in $KVMACCESS_FINDING). A guest panic is dumped by `dump=DIR` and runs
    /// `exec=CMD` with the `guest-panicked` line on stdin and in $KVMACCESS_PANIC;
    /// $KVMACCESS_EVENT says which of the two it is.
    #[arg(long = "on-finding", value_name = "ACTION", value_parser = parse_action)]
    on_finding: Vec<Action>,
    /// Allow `--on-finding restore` to write guest memory.
    #[arg(long)]
    allow_write: bool,
    /// Append every finding and event, one JSON line each, to this file (synced after each).
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Bytes of kernel text/rodata compared per pass (round-robin); 0 compares all every pass.
    #[arg(long, default_value = "2M", value_parser = crate::size_arg)]
    text_budget: u64,
    /// Stop after this many intervals (for scripts and tests). An interval in which the guest
    /// could not be checked (panicked, its kernel not found or still booting) counts too, so
    /// the watch ends whatever happens to the guest.
    #[arg(long, value_name = "N")]
    passes: Option<u64>,
    /// Leave out informational findings.
    #[arg(long)]
    no_info: bool,
    #[command(flatten)]
    selection: CheckSelection,
}

/// One reaction to an alarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Pause,
    Dump(PathBuf),
    Restore,
    Exec(String),
}

fn parse_action(text: &str) -> Result<Action, String> {
    match text.split_once('=') {
        None if text == "pause" => Ok(Action::Pause),
        None if text == "restore" => Ok(Action::Restore),
        Some(("dump", dir)) if !dir.is_empty() => Ok(Action::Dump(PathBuf::from(dir))),
        Some(("exec", cmd)) if !cmd.is_empty() => Ok(Action::Exec(cmd.to_string())),
        _ => Err(format!(
            "'{text}' is not an action: use pause, dump=DIR, restore or exec=CMD"
        )),
    }
}

/// Module ranges for owners and module-relative locations; an unreadable list leaves them out.
fn current_module_spans(
    kernel: &Kernel<'_>,
    types: Option<&kvmaccess_linux::KernelTypes>,
) -> Vec<ModuleSpan> {
    types
        .and_then(|t| ModuleOffsets::from_types(t).ok())
        .and_then(|off| listed_and_hidden_modules(kernel, &off).ok())
        .map(|(listed, hidden)| module_spans(&listed, &hidden))
        .unwrap_or_default()
}

fn context<'k, 'm>(
    kernel: &'k Kernel<'m>,
    target: &Target,
    types: Option<&'k kvmaccess_linux::KernelTypes>,
) -> Result<Context<'k, 'm>> {
    let ctx = Context::from_backend(kernel, target.vcpus())?
        .with_modules(current_module_spans(kernel, types));
    Ok(match types {
        Some(types) => ctx.with_types(types),
        None => ctx,
    })
}

/// One monitor pass: fresh translations, all vCPUs' registers, every check; re-run with a fresh
/// module list when it raised alarms with a stale or unsettled one.
pub fn run_pass(
    kernel: &mut Kernel<'_>,
    target: &Target,
    types: Option<&kvmaccess_linux::KernelTypes>,
    baseline: &Baseline,
    checks: &CheckSet,
    modules: &mut ModuleTracker,
) -> Result<Report> {
    kernel.invalidate();
    let fresh = modules.refresh_if_due(kernel, types);
    let report = run_checks(
        &pass_context(kernel, target, types, modules)?,
        baseline,
        checks,
    )?;
    // A module caught while it was being loaded has its code in the list but not yet its
    // symbols: an alarm pointing into it is explained again once its symbols are readable.
    if (fresh && modules.settled()) || report.alarms().next().is_none() {
        return Ok(report);
    }
    modules.refresh(kernel, types);
    Ok(run_checks(
        &pass_context(kernel, target, types, modules)?,
        baseline,
        checks,
    )?)
}

/// A pass's context: all vCPUs' registers, the tracked module ranges, and the kernel types
/// loaded once for the session (so no check reads the BTF from the guest again).
fn pass_context<'k, 'm>(
    kernel: &'k Kernel<'m>,
    target: &Target,
    types: Option<&'k kvmaccess_linux::KernelTypes>,
    modules: &ModuleTracker,
) -> Result<Context<'k, 'm>> {
    let ctx = Context::from_backend(kernel, target.vcpus())?.with_modules(modules.spans().to_vec());
    Ok(match types {
        Some(types) => ctx.with_types(types),
        None => ctx,
    })
}

pub fn baseline(args: &TargetArgs, cmd: &BaselineArgs, json: bool) -> Result<ExitCode> {
    check_output_path(&cmd.out, cmd.force)?;
    let checks = cmd.selection.build()?;
    let target = Target::open(args, Access::ReadOnly)?;
    let mut kernel = open_kernel(&target, &args.profile)?;
    let types = kernel_types(&kernel, &args.profile).ok();
    let mut modules = ModuleTracker::new(&kernel);
    modules.refresh(&mut kernel, types.as_ref());
    let started = Instant::now();
    // A consistent snapshot: the guest must not change tables while they are copied.
    let paused = pause_if_running(&target)?;
    let result = pass_context(&kernel, &target, types.as_ref(), &modules)
        .and_then(|ctx| capture_baseline(&ctx, &checks).map_err(anyhow::Error::from));
    if paused {
        target.control()?.resume()?;
    }
    let baseline = result?;
    baseline.save(&cmd.out)?;
    if json {
        print_json(&serde_json::json!({
            "path": cmd.out,
            "release": kernel.release(),
            "build_id": kernel.build_id(),
            "checks": checks.ids(),
        }))?;
    } else {
        outln!(
            "baseline of {} (build {}) with checks {} written to {} in {:.0} ms",
            kernel.release(),
            kernel.build_id().unwrap_or("unknown"),
            checks.ids().join(", "),
            cmd.out.display(),
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn pause_if_running(target: &Target) -> Result<bool> {
    match target {
        Target::Live(_) => {
            let control = target.control()?;
            let running = control.is_running()?;
            if running {
                control.pause()?;
            }
            Ok(running)
        }
        Target::Dump(_) => Ok(false),
    }
}

pub fn check(args: &TargetArgs, cmd: &CheckArgs, json: bool) -> Result<ExitCode> {
    if cmd.list {
        if json {
            print_json(
                &CHECKS
                    .iter()
                    .map(|c| serde_json::json!({"id": c.id, "description": c.description, "default": c.default}))
                    .collect::<Vec<_>>(),
            )?;
        } else {
            for c in CHECKS {
                outln!(
                    "{:<10} {}{}",
                    c.id,
                    c.description,
                    if c.default { "" } else { " (off by default)" }
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(path) = &cmd.baseline else {
        bail!("give --baseline FILE");
    };
    let baseline = load_baseline(path)?;
    let checks = cmd.selection.build()?;
    let target = Target::open(args, Access::ReadOnly)?;
    let mut kernel = open_kernel(&target, &args.profile)?;
    let types = kernel_types(&kernel, &args.profile).ok();
    let mut modules = ModuleTracker::new(&kernel);
    modules.refresh(&mut kernel, types.as_ref());
    let ctx = pass_context(&kernel, &target, types.as_ref(), &modules)?;
    let first = run_checks(&ctx, &baseline, &checks)?;
    drop(ctx);
    let report = confirm_alarms(
        &target,
        &kernel,
        types.as_ref(),
        &modules,
        &baseline,
        &checks,
        first,
    )?;
    let shown: Vec<&Finding> = report
        .findings
        .iter()
        .filter(|f| !(cmd.no_info && f.is_info()))
        .collect();
    if json {
        #[derive(Serialize)]
        struct CheckJson<'a> {
            time: &'a str,
            findings: Vec<&'a Finding>,
            checks: &'a [kvmaccess_integrity::CheckRun],
            alarms: usize,
        }
        print_json(&CheckJson {
            time: &report.time,
            findings: shown,
            checks: &report.checks,
            alarms: report.alarms().count(),
        })?;
    } else {
        for finding in &shown {
            outln!("{finding}");
        }
        for (id, error) in report.errors() {
            eprintln!("kvmaccess: check {id} could not finish: {error}");
        }
        let alarms = report.alarms().count();
        outln!(
            "{} finding(s): {alarms} alarm(s), {} informational; {} check(s) in {:.2} ms CPU",
            report.findings.len(),
            report.findings.len() - alarms,
            report.checks.len(),
            report.cpu.as_secs_f64() * 1e3
        );
    }
    if report.errors().next().is_some() && report.alarms().next().is_none() {
        bail!("some checks could not run; the guest is not known to be clean");
    }
    Ok(if report.alarms().next().is_some() {
        ExitCode::from(EXIT_FINDINGS)
    } else {
        ExitCode::SUCCESS
    })
}

/// Whether vCPU 0 runs on this kernel's page tables: its CR3 maps the kernel image through the
/// same top-level entry as the kernel's own root (the last entry, which maps
/// `__START_KERNEL_map` in 4- and 5-level paging alike).
fn kernel_runs_on_cpu(kernel: &Kernel<'_>, target: &Target) -> Result<bool> {
    let registers = target.registers(0)?;
    let mode = kvmaccess_x86::PagingMode::from_registers(&registers);
    if mode != kernel.layout().mode {
        return Ok(false);
    }
    let Some(cpu_root) = mode.root_table(registers.cr3) else {
        return Ok(false);
    };
    let last_entry = |root: kvmaccess_core::Gpa| {
        root.checked_add(511 * 8)
            .and_then(|at| kernel.memory().read_u64(at).ok())
    };
    let Some(own) = last_entry(kernel.layout().root).filter(|&e| e != 0) else {
        return Ok(false);
    };
    // With page-table isolation a CPU in user mode runs on the user half of the kernel's
    // 8 KiB top-level table (bit 12 of CR3 set), whose kernel entries are trimmed copies.
    let kernel_half = kvmaccess_core::Gpa(cpu_root.0 & !PTI_USER_PGD_BIT);
    Ok(last_entry(cpu_root) == Some(own) || last_entry(kernel_half) == Some(own))
}

/// The bit of CR3 that selects the user half of a page-table-isolated top-level table.
const PTI_USER_PGD_BIT: u64 = 1 << 12;

/// How long a one-shot `check` waits before re-reading a live guest that raised alarms.
const CONFIRM_DELAY: Duration = Duration::from_secs(2);

/// A running kernel passes through states that look like tampering for a moment (a tracer being
/// switched off leaves call sites pointing at a trampoline it already unregistered, for
/// seconds under emulation). A one-shot check of a live guest therefore re-reads once and keeps
/// only the alarms both passes saw; a real hook stays. A watch gets the same effect from its
/// memory of recent passes.
fn confirm_alarms(
    target: &Target,
    kernel: &Kernel<'_>,
    types: Option<&kvmaccess_linux::KernelTypes>,
    modules: &ModuleTracker,
    baseline: &Baseline,
    checks: &CheckSet,
    first: Report,
) -> Result<Report> {
    if matches!(target, Target::Dump(_)) || first.alarms().next().is_none() {
        return Ok(first);
    }
    let seen: std::collections::BTreeSet<String> = first.alarms().map(finding_key).collect();
    std::thread::sleep(CONFIRM_DELAY);
    kernel.invalidate();
    let ctx = pass_context(kernel, target, types, modules)?;
    let mut second = run_checks(&ctx, baseline, checks)?;
    second
        .findings
        .retain(|f| f.is_info() || seen.contains(&finding_key(f)));
    Ok(second)
}

fn load_baseline(path: &Path) -> Result<Baseline> {
    Baseline::load(path).with_context(|| format!("loading the baseline {}", path.display()))
}

/// Appends JSON lines to stdout and, durably, to the log file.
struct EventSink {
    log: Option<std::fs::File>,
    status_line: bool,
}

impl EventSink {
    fn emit<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let line = serde_json::to_string(record).context("encoding an event")?;
        if self.status_line {
            eprint!("\r\x1b[2K");
        }
        crate::output::write_stdout(format_args!("{line}\n"));
        if let Some(log) = &mut self.log {
            writeln!(log, "{line}").context("appending to the log")?;
            log.sync_data().context("syncing the log")?;
        }
        Ok(())
    }

    fn status(&self, text: &str) {
        if self.status_line {
            eprint!("\r\x1b[2K{text}");
            let _ = std::io::stderr().flush();
        }
    }
}

#[derive(Serialize)]
struct EventLine<'a> {
    event: &'a str,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

fn event(name: &str, detail: Option<String>) -> EventLine<'_> {
    EventLine {
        event: name,
        time: kvmaccess_integrity::rfc3339(SystemTime::now()),
        detail,
    }
}

#[derive(Serialize)]
struct FindingLine<'a> {
    event: &'static str,
    #[serde(flatten)]
    finding: &'a Finding,
}

/// The identity of a finding across passes: the same object in the same state is reported once.
fn finding_key(f: &Finding) -> String {
    format!(
        "{}|{}|{}|{:?}|{}",
        f.check, f.object, f.entry, f.vcpu, f.actual
    )
}

pub fn watch(args: &TargetArgs, cmd: &WatchArgs) -> Result<ExitCode> {
    if cmd.on_finding.contains(&Action::Restore) && !cmd.allow_write {
        bail!("--on-finding restore writes guest memory: add --allow-write to confirm");
    }
    if args.dump.is_some() {
        bail!("watch needs a live guest (--qmp or a booted guest); use `check` on a dump");
    }
    for action in &cmd.on_finding {
        if let Action::Dump(dir) = action {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the dump directory {}", dir.display()))?;
        }
    }
    let baseline = load_baseline(&cmd.baseline)?;
    // The watch reports a pass's CPU, not each check's.
    let mut checks = cmd.selection.build()?.without_per_check_cpu();
    if cmd.text_budget > 0 {
        checks = checks.with_text_budget(cmd.text_budget);
    }
    let access = if cmd.allow_write {
        Access::ReadWrite
    } else {
        Access::ReadOnly
    };
    let target = Target::open_monitor(args, access)?;
    let Target::Live(vm) = &target else {
        bail!("watch needs a live guest");
    };
    let log = match &cmd.log {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the log {}", path.display()))?,
        ),
        None => None,
    };
    let mut sink = EventSink {
        log,
        status_line: std::io::stderr().is_terminal(),
    };
    sink.emit(&event(
        "watch-started",
        Some(format!("baseline {}", cmd.baseline.display())),
    ))?;

    // The kernel is found in the loop, by the same rules as after a reset: a guest that is
    // still booting is waited for rather than checked half-initialised.
    let mut guest = Watched {
        types: None,
        modules: None,
        kernel: None,
        active: BTreeMap::new(),
        paused: false,
        panicked: false,
    };
    // A guest that panicked before the watch started stays so until it is reset, and QEMU
    // sends no event for it again.
    let status = vm
        .qmp()
        .execute("query-status", serde_json::Value::Null)
        .context("asking QEMU for the guest's state")?;
    if status["status"] == "guest-panicked" {
        sink.emit(&event(
            "guest-panicked",
            Some("the guest had panicked before the watch started".into()),
        ))?;
        guest.panicked = true;
    }
    let mut intervals = Intervals::default();
    let mut waiting_reported = false;
    loop {
        if intervals.finished(cmd.passes) {
            sink.emit(&event("watch-finished", Some(intervals.summary())))?;
            return Ok(ExitCode::SUCCESS);
        }
        // Events first: they change what a pass means (a reboot means a new kernel layout). A
        // panicked guest has nothing to check, so the watch sleeps on QMP until something
        // happens to it rather than polling.
        let wait = if guest.panicked {
            cmd.interval
        } else {
            Duration::ZERO
        };
        // QEMU's exit arrives as the last event (a closed connection is queued like one, and
        // the queue drops its oldest when full), so this also ends the watch when QEMU is gone.
        guest.handle_events(&target, &args.profile, cmd, &mut sink, wait)?;
        if guest.panicked {
            sink.status("guest panicked: no checks until it is reset");
            intervals.skipped += 1;
            continue;
        }
        if guest.kernel.is_none() {
            // A booting kernel publishes VMCOREINFO, its symbols and its read-only data one after
            // the other; retry each interval until all are there.
            match find_new_kernel(&target, &args.profile) {
                Ok((k, types)) => {
                    waiting_reported = false;
                    if let Err(e) = baseline.check_compatible(&k) {
                        sink.emit(&event("baseline-mismatch", Some(e.to_string())))?;
                        bail!("the guest now runs another kernel build: {e}");
                    }
                    guest.types = types;
                    sink.emit(&event(
                        "kernel-found",
                        Some(format!(
                            "{} KASLR {:#x}",
                            k.release(),
                            k.layout().kaslr_offset
                        )),
                    ))?;
                    guest.modules = Some(ModuleTracker::new(&k));
                    guest.kernel = Some(k);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    if !waiting_reported {
                        sink.emit(&event("waiting-for-kernel", Some(why.clone())))?;
                        waiting_reported = true;
                    }
                    sink.status(&format!("waiting for the guest's kernel: {why}"));
                    intervals.skipped += 1;
                    let deadline = Instant::now().checked_add(cmd.interval);
                    guest.wait_until(&target, &args.profile, cmd, &mut sink, deadline)?;
                    continue;
                }
            }
        }
        let Some(k) = guest.kernel.as_mut() else {
            continue;
        };
        let tracker = guest.modules.get_or_insert_with(|| ModuleTracker::new(k));
        let pass_started = Instant::now();
        let report = match run_pass(
            k,
            &target,
            guest.types.as_ref(),
            &baseline,
            &checks,
            tracker,
        ) {
            Ok(report) => report,
            Err(e) => {
                sink.emit(&event("pass-failed", Some(format!("{e:#}"))))?;
                intervals.skipped += 1;
                let deadline = pass_started.checked_add(cmd.interval);
                guest.wait_until(&target, &args.profile, cmd, &mut sink, deadline)?;
                continue;
            }
        };
        // A panic or reset during the pass: its findings describe a dying or departed kernel.
        if guest.handle_events(&target, &args.profile, cmd, &mut sink, Duration::ZERO)? {
            continue;
        }
        let Some(k) = guest.kernel.as_ref() else {
            continue;
        };
        intervals.passes += 1;
        intervals.cpu += report.cpu;
        handle_report(
            &target,
            k,
            &baseline,
            guest.types.as_ref(),
            cmd,
            &report,
            &mut guest.active,
            &mut sink,
        )?;
        sink.status(&format!(
            "watching: pass {}, {} active finding(s), {} alarm(s), last pass {:.2} ms CPU{}",
            intervals.passes,
            guest.active.len(),
            guest.active.values().filter(|f| !f.is_info()).count(),
            report.cpu.as_secs_f64() * 1e3,
            if guest.paused { ", guest paused" } else { "" }
        ));
        if intervals.finished(cmd.passes) {
            continue;
        }
        let deadline = pass_started.checked_add(cmd.interval);
        guest.wait_until(&target, &args.profile, cmd, &mut sink, deadline)?;
    }
}

/// What the watch did with its intervals, for `--passes` and the `watch-finished` line.
#[derive(Default)]
struct Intervals {
    passes: u64,
    /// Intervals without a pass: the guest panicked, its kernel not found yet, a pass failed.
    skipped: u64,
    cpu: Duration,
}

impl Intervals {
    fn finished(&self, limit: Option<u64>) -> bool {
        limit.is_some_and(|n| self.passes.saturating_add(self.skipped) >= n)
    }

    fn summary(&self) -> String {
        let mut text = format!("{} passes", self.passes);
        if let Some(per_pass) = self
            .cpu
            .checked_div(u32::try_from(self.passes).unwrap_or(0))
        {
            text += &format!(
                ", {:.3} ms CPU per pass on average",
                per_pass.as_secs_f64() * 1e3
            );
        }
        if self.skipped > 0 {
            text += &format!(
                ", {} interval(s) without a pass (guest panicked, kernel not found or pass failed)",
                self.skipped
            );
        }
        text
    }
}

/// The kernel the CPU runs on now.
///
/// Guest RAM survives a reset: the old kernel's VMCOREINFO and page tables are still there and
/// would validate. Only a kernel whose page tables the CPU runs on now is the new one, and only
/// once it has published its own VMCOREINFO.
fn current_kernel<'t>(target: &'t Target, profile: &ProfileArgs) -> Result<Kernel<'t>> {
    let kernel = open_kernel(target, profile)?;
    if !kernel_runs_on_cpu(&kernel, target)? {
        bail!("the CPU does not run on this kernel's page tables yet");
    }
    Ok(kernel)
}

/// The kernel the guest runs after a reset, and its types, once it has booted: it publishes
/// VMCOREINFO in the middle of its init calls, while it still writes the data it then makes
/// read-only, and early enough that its symbols may not be readable yet (discovery then
/// returns a kernel without them, which no check could use).
fn find_new_kernel<'t>(
    target: &'t Target,
    profile: &ProfileArgs,
) -> Result<(Kernel<'t>, Option<kvmaccess_linux::KernelTypes>)> {
    let kernel = current_kernel(target, profile)?;
    kvmaccess_integrity::AddressMap::from_kernel(&kernel)
        .context("the new kernel's symbols are not readable yet")?;
    let types = kernel_types(&kernel, profile).ok();
    if let Some(types) = &types {
        if !finished_booting(&kernel, types)? {
            bail!("the kernel is still booting");
        }
    }
    Ok((kernel, types))
}

/// Whether the kernel's `system_state` has reached `SYSTEM_RUNNING`, which it sets after it has
/// freed its init memory and write-protected its read-only-after-init data.
fn finished_booting(kernel: &Kernel<'_>, types: &kvmaccess_linux::KernelTypes) -> Result<bool> {
    // The enumerators' values changed across releases (SYSTEM_FREEING_INITMEM came in 5.x),
    // so they are taken from the kernel's own BTF.
    let running = types
        .btf
        .enum_value("system_states", "SYSTEM_RUNNING")
        .context("enum system_states in the kernel's BTF")?;
    let at = kernel.symbol("system_state")?;
    let mut raw = [0u8; 4];
    kernel.read(Gva(at), &mut raw)?;
    Ok(i128::from(u32::from_le_bytes(raw)) >= running)
}

/// What the watch knows about the guest between passes.
struct Watched<'t> {
    /// `None` from a reset until the new kernel is found.
    kernel: Option<Kernel<'t>>,
    types: Option<kvmaccess_linux::KernelTypes>,
    modules: Option<ModuleTracker>,
    /// Findings reported and not yet cleared, by [`finding_key`].
    active: BTreeMap<String, Finding>,
    paused: bool,
    /// Set by a panic, cleared by a reset: panic() never returns, so until the guest is reset
    /// its kernel is half-dead (other CPUs stopped, or a crash kernel running in its place) and
    /// a comparison with the baseline could only produce false alarms.
    panicked: bool,
}

impl<'t> Watched<'t> {
    /// Spends the rest of an interval waiting on QMP rather than asleep, so that a pause, a
    /// panic, a reset or QEMU's exit is reported when it happens, not at the next pass (which,
    /// at a long interval, could be minutes later). Returns at `deadline` (never, for an
    /// interval too long to add to the clock), or early when the guest panicked or was reset.
    fn wait_until(
        &mut self,
        target: &'t Target,
        profile: &ProfileArgs,
        cmd: &WatchArgs,
        sink: &mut EventSink,
        deadline: Option<Instant>,
    ) -> Result<()> {
        loop {
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() || self.handle_events(target, profile, cmd, sink, left)? {
                return Ok(());
            }
        }
    }

    /// Reports and applies the queued QMP events, first waiting up to `wait` for one; says
    /// whether the guest panicked or was reset. QEMU's exit ends the watch with an error.
    fn handle_events(
        &mut self,
        target: &'t Target,
        profile: &ProfileArgs,
        cmd: &WatchArgs,
        sink: &mut EventSink,
        wait: Duration,
    ) -> Result<bool> {
        let Target::Live(vm) = target else {
            return Ok(false);
        };
        let mut changed = false;
        let mut next = if wait.is_zero() {
            vm.qmp().try_recv_event()
        } else {
            vm.qmp().wait_event(wait)
        };
        while let Some(ev) = next {
            match ev.name.as_str() {
                "STOP" => {
                    self.paused = true;
                    sink.emit(&event("guest-paused", None))?;
                }
                "RESUME" => {
                    self.paused = false;
                    sink.emit(&event("guest-resumed", None))?;
                }
                "RESET" => {
                    sink.emit(&event(
                        "guest-rebooted",
                        Some("re-discovering the kernel".into()),
                    ))?;
                    self.kernel = None;
                    self.types = None;
                    self.modules = None;
                    self.active.clear();
                    self.panicked = false;
                    changed = true;
                }
                // GUEST_CRASHLOADED: the kernel panicked with a kdump kernel loaded, which now
                // runs in its place; for the watch that is a panic all the same.
                "GUEST_PANICKED" | "GUEST_CRASHLOADED" => {
                    self.on_panic(target, profile, cmd, sink, &ev)?;
                    self.panicked = true;
                    changed = true;
                }
                "SHUTDOWN" => {
                    sink.emit(&event("guest-shutdown", Some(ev.data.to_string())))?;
                }
                name if ev.is_connection_closed() || name == "KVMACCESS_CONNECTION_CLOSED" => {
                    sink.emit(&event("qemu-exited", None))?;
                    bail!("QEMU exited; the watch ends");
                }
                _ => {}
            }
            next = vm.qmp().try_recv_event();
        }
        Ok(changed)
    }

    /// Reports a panic with what the panicked kernel logged, and dumps the guest if asked. A
    /// dump that fails is reported without ending the watch: the guest's life goes on.
    fn on_panic(
        &self,
        target: &'t Target,
        profile: &ProfileArgs,
        cmd: &WatchArgs,
        sink: &mut EventSink,
        ev: &kvmaccess_qemu::QmpEvent,
    ) -> Result<()> {
        // After a reset the old kernel's log is still in RAM, so only a kernel the CPU runs on
        // is asked for the panic message.
        let fresh;
        let (kernel, types) = match &self.kernel {
            Some(k) => (Some(k), self.types.as_ref()),
            None => {
                // Not find_new_kernel: a kernel that panics while booting never finished.
                fresh = current_kernel(target, profile).ok().map(|k| {
                    let types = kernel_types(&k, profile).ok();
                    (k, types)
                });
                match &fresh {
                    Some((k, types)) => (Some(k), types.as_ref()),
                    None => (None, None),
                }
            }
        };
        let log = panic_log(kernel, types);
        let line = PanicLine::new(&ev.name, &ev.data, log);
        sink.emit(&line)?;
        // Pausing is QEMU's own panic action and there is nothing to restore; the core comes
        // first so that a command run on the panic can find it.
        for action in &cmd.on_finding {
            if let Action::Dump(dir) = action {
                match dump_to(target, dir, "panic") {
                    Ok(path) => sink.emit(&event("dumped", Some(path.display().to_string())))?,
                    Err(e) => sink.emit(&event("dump-failed", Some(format!("{e:#}"))))?,
                }
            }
        }
        for action in &cmd.on_finding {
            if let Action::Exec(command) = action {
                let json = serde_json::to_string(&line).context("encoding the panic")?;
                // A command that cannot be started is reported; the watch goes on.
                if let Err(e) = run_exec(command, line.event, "KVMACCESS_PANIC", &json, sink) {
                    sink.emit(&event("exec-failed", Some(format!("{e:#}"))))?;
                }
            }
        }
        Ok(())
    }
}

/// How many of the kernel log's last lines a `guest-panicked` line carries at least.
const PANIC_LOG_LINES: usize = 40;
/// Lines kept before the panic message: what led to it (an oops, a BUG, a hung task).
const PANIC_LOG_CONTEXT: usize = 20;
/// Most lines a `guest-panicked` line carries.
const PANIC_LOG_MAX: usize = 200;

/// Where the kernel log shown with a panic starts: the last lines, reaching back to the panic
/// message and some lines before it (the stack dump after the message is as long as the call
/// chain was, so a fixed count of last lines can miss the message), within a bound.
fn panic_log_start(lines: &[String]) -> usize {
    let last_lines = lines.len().saturating_sub(PANIC_LOG_LINES);
    let start = lines
        .iter()
        .rposition(|l| l.contains("Kernel panic - "))
        .map_or(last_lines, |at| {
            last_lines.min(at.saturating_sub(PANIC_LOG_CONTEXT))
        });
    start.max(lines.len().saturating_sub(PANIC_LOG_MAX))
}

/// What the panicked kernel logged: its panic message and last lines, or why they are missing.
struct PanicLog {
    message: Option<String>,
    lines: Vec<String>,
    unreadable: Option<String>,
}

fn panic_log(
    kernel: Option<&Kernel<'_>>,
    types: Option<&kvmaccess_linux::KernelTypes>,
) -> PanicLog {
    let records = match (kernel, types) {
        (Some(kernel), Some(types)) => {
            kernel.invalidate();
            kernel.dmesg(types).map_err(|e| e.to_string())
        }
        (None, _) => Err("no kernel found in the guest".to_string()),
        (Some(_), None) => Err("the kernel's types (BTF) are unknown".to_string()),
    };
    match records {
        Ok(records) => {
            let message = records
                .iter()
                .rev()
                .find_map(|r| r.text.lines().find(|l| l.starts_with("Kernel panic - ")))
                .map(str::to_string);
            let mut lines: Vec<String> = records
                .iter()
                .rev()
                .flat_map(|r| r.dmesg_lines().collect::<Vec<_>>().into_iter().rev())
                .take(PANIC_LOG_MAX)
                .collect();
            lines.reverse();
            lines.drain(..panic_log_start(&lines));
            PanicLog {
                message,
                lines,
                unreadable: None,
            }
        }
        Err(why) => PanicLog {
            message: None,
            lines: Vec::new(),
            unreadable: Some(why),
        },
    }
}

/// The `guest-panicked` (or `guest-crash-loaded`) line.
#[derive(Serialize)]
struct PanicLine {
    event: &'static str,
    time: String,
    /// What QEMU did: `pause` (memory kept for a dump), `poweroff`, or `run`.
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<String>,
    /// Crash details the guest handed QEMU (Hyper-V crash MSRs, s390), as QEMU sent them.
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<serde_json::Value>,
    /// The kernel's `Kernel panic - not syncing: ...` line.
    #[serde(skip_serializing_if = "Option::is_none")]
    panic_message: Option<String>,
    /// The last lines of the kernel log, as `dmesg` prints them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    kernel_log: Vec<String>,
    /// Why the kernel log could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl PanicLine {
    fn new(qemu_event: &str, data: &serde_json::Value, log: PanicLog) -> Self {
        Self {
            event: if qemu_event == "GUEST_CRASHLOADED" {
                "guest-crash-loaded"
            } else {
                "guest-panicked"
            },
            time: kvmaccess_integrity::rfc3339(SystemTime::now()),
            action: data["action"].as_str().map(str::to_string),
            info: data.get("info").cloned(),
            panic_message: log.message,
            kernel_log: log.lines,
            detail: log
                .unreadable
                .map(|why| format!("kernel log unreadable: {why}")),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn handle_report(
    target: &Target,
    kernel: &Kernel<'_>,
    baseline: &Baseline,
    types: Option<&kvmaccess_linux::KernelTypes>,
    cmd: &WatchArgs,
    report: &Report,
    active: &mut BTreeMap<String, Finding>,
    sink: &mut EventSink,
) -> Result<()> {
    for (id, error) in report.errors() {
        sink.emit(&event("check-failed", Some(format!("{id}: {error}"))))?;
    }
    let now: BTreeMap<String, &Finding> = report
        .findings
        .iter()
        .map(|f| (finding_key(f), f))
        .collect();
    // With a text budget a pass compares only a slice of the kernel: a text finding outside
    // this pass's slice is missing from the report although the bytes are still changed. It is
    // cleared only when the bytes are back to the baseline.
    let mut unseen_but_present = std::collections::BTreeSet::new();
    if cmd.text_budget > 0 {
        let mut ctx = None;
        for (key, old) in active.iter() {
            if now.contains_key(key)
                || old.check != "text"
                || !matches!(old.target, kvmaccess_integrity::Target::Bytes { .. })
            {
                continue;
            }
            if ctx.is_none() {
                ctx = Some(context(kernel, target, types)?);
            }
            if let Some(ctx) = &ctx {
                if bytes_still_changed(ctx, kernel, baseline, old) {
                    unseen_but_present.insert(key.clone());
                }
            }
        }
    }
    active.retain(|key, old| {
        let keep = now.contains_key(key) || unseen_but_present.contains(key);
        let shown = !cmd.no_info || !old.is_info();
        if !keep && shown {
            let _ = sink.emit(&event(
                "finding-cleared",
                Some(format!("{} {} {}", old.check, old.object, old.entry)),
            ));
        }
        keep
    });
    for (key, finding) in now {
        if active.contains_key(&key) {
            continue;
        }
        active.insert(key, finding.clone());
        if cmd.no_info && finding.is_info() {
            continue;
        }
        sink.emit(&FindingLine {
            event: "finding",
            finding,
        })?;
        if finding.severity >= Severity::Low {
            react(target, kernel, baseline, types, cmd, finding, sink)?;
        }
    }
    Ok(())
}

/// Whether the bytes a text finding is about still differ from the baseline copy.
fn bytes_still_changed(
    ctx: &Context<'_, '_>,
    kernel: &Kernel<'_>,
    baseline: &Baseline,
    finding: &Finding,
) -> bool {
    let Ok(Restore::Write(write)) = restore_plan(ctx, finding, baseline) else {
        return false;
    };
    let mut now = vec![0u8; write.bytes.len()];
    kernel.read(Gva(write.gva), &mut now).is_ok() && now != write.bytes
}

fn react(
    target: &Target,
    kernel: &Kernel<'_>,
    baseline: &Baseline,
    types: Option<&kvmaccess_linux::KernelTypes>,
    cmd: &WatchArgs,
    finding: &Finding,
    sink: &mut EventSink,
) -> Result<()> {
    for action in &cmd.on_finding {
        match action {
            Action::Pause => {
                target.control()?.pause()?;
                sink.emit(&event(
                    "guest-paused-by-watch",
                    Some(finding.object.clone()),
                ))?;
            }
            Action::Dump(dir) => {
                let path = dump_to(target, dir, finding.check)?;
                sink.emit(&event("dumped", Some(path.display().to_string())))?;
            }
            Action::Restore => {
                let ctx = context(kernel, target, types)?;
                match restore_plan(&ctx, finding, baseline)? {
                    Restore::Write(write) => {
                        apply_write(target.writer()?, kernel.layout(), &write)?;
                        sink.emit(&event("restored", Some(write.description.clone())))?;
                    }
                    Restore::Impossible { reason } => {
                        // Named, because one finding per vCPU can each get this answer.
                        let detail = format!("{} {}: {reason}", finding.object, finding.entry);
                        sink.emit(&event("restore-impossible", Some(detail)))?;
                    }
                }
            }
            Action::Exec(command) => {
                let json = serde_json::to_string(finding).context("encoding the finding")?;
                run_exec(command, "finding", "KVMACCESS_FINDING", &json, sink)?;
            }
        }
    }
    Ok(())
}

/// Runs `--on-finding exec=CMD` with one event's JSON line on its stdin and in `variable`.
fn run_exec(
    command: &str,
    kind: &str,
    variable: &str,
    json: &str,
    sink: &mut EventSink,
) -> Result<()> {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("KVMACCESS_EVENT", kind)
        .env(variable, json)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = writeln!(stdin, "{json}");
            }
            child.wait()
        })
        .with_context(|| format!("running `{command}`"))?;
    sink.emit(&event(
        "exec",
        Some(format!("`{command}` exited with {status}")),
    ))
}

/// Writes an ELF core of the (paused) guest into `dir`.
fn dump_to(target: &Target, dir: &Path, why: &str) -> Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let path = dir.join(format!("kvmaccess-{why}-{stamp}.core"));
    let paused = pause_if_running(target)?;
    let vcpus = target.vcpus().all_registers();
    let result = vcpus.map_err(anyhow::Error::from).and_then(|vcpus| {
        kvmaccess_dump::write_elf_core_to_path(
            &path,
            false,
            target.memory(),
            &vcpus,
            target.vmcoreinfo().as_deref(),
            &mut |_, _| {},
        )
        .map_err(anyhow::Error::from)
    });
    if paused {
        target.control()?.resume()?;
    }
    result?;
    Ok(path)
}

/// `idt set`, `gdt set`, `syscalls set`: one verified write through the kernel's page tables.
pub fn write_kernel_bytes(
    target: &Target,
    layout: &kvmaccess_linux::KernelLayout,
    gva: u64,
    bytes: &[u8],
    what: &str,
    json: bool,
) -> Result<()> {
    let writer: &dyn PhysicalMemoryWrite = target.writer()?;
    let mut space = AddressSpace::new(writer, layout.mode, layout.root.0);
    let mut before = vec![0u8; bytes.len()];
    space.read(Gva(gva), &mut before)?;
    apply_write(
        writer,
        layout,
        &kvmaccess_integrity::Write {
            gva,
            bytes: bytes.to_vec(),
            description: what.to_string(),
        },
    )?;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    if json {
        return print_json(&serde_json::json!({
            "what": what,
            "address": format!("{gva:#x}"),
            "before": hex(&before),
            "after": hex(bytes),
            "verified": true,
        }));
    }
    outln!(
        "{what}: wrote {} bytes at {gva:#x} (was {}, now {}), verified by reading back",
        bytes.len(),
        hex(&before),
        hex(bytes)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{panic_log_start, PANIC_LOG_CONTEXT, PANIC_LOG_LINES, PANIC_LOG_MAX};

    fn log(len: usize, panic_at: Option<usize>) -> Vec<String> {
        (0..len)
            .map(|i| {
                if Some(i) == panic_at {
                    "Kernel panic - not syncing: sysrq triggered crash".to_string()
                } else {
                    format!("line {i}")
                }
            })
            .collect()
    }

    #[test]
    fn the_panic_message_stays_in_the_window_whatever_follows_it() {
        // A long stack dump after the message: the window reaches back to it, with context.
        let lines = log(150, Some(80));
        assert_eq!(panic_log_start(&lines), 80 - PANIC_LOG_CONTEXT);
        // A short one: the last lines already hold the message and its context.
        let lines = log(150, Some(140));
        assert_eq!(panic_log_start(&lines), 150 - PANIC_LOG_LINES);
        // No message (another kind of crash): the last lines.
        assert_eq!(panic_log_start(&log(150, None)), 150 - PANIC_LOG_LINES);
        assert_eq!(panic_log_start(&log(10, None)), 0);
        // Never more than the bound.
        let lines = log(1000, Some(5));
        assert_eq!(panic_log_start(&lines), 1000 - PANIC_LOG_MAX);
    }
}
