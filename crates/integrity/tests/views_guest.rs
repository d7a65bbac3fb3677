//! The view-comparison checks (`modules`, `tasks`, `ftrace`) against the project's real test
//! guest (Debian 6.1 cloud kernel, QEMU TCG, one vCPU) and its test-only rootkit module
//! `kvma_attack`: quiet on a clean guest (also with the function tracer on), then each attack
//! from inside the guest is found and named: a module hidden from the module list (and from
//! sysfs, so that only the module address tree holds it), a process
//! hidden from the task list, an ftrace ops redirecting `__x64_sys_getpid`.
//!
//! The guest is `make guest`'s kernel and initramfs (with `/lib/modules/kvma_attack.ko`), found
//! through `KVMACCESS_GUEST_DIR` (default `<workspace>/.cache/guest`). Missing files fail the
//! test: it is never skipped.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kvmaccess_core::{PhysicalMemory, VcpuState};
use kvmaccess_guestlab::GuestSpec;
use kvmaccess_integrity::{
    capture_baseline, run_checks, Baseline, CheckSet, Context, Finding, ModuleSpan, Report,
    Severity,
};
use kvmaccess_linux::{DiscoverOptions, Kernel, KernelTypes, ModuleOffsets};
use kvmaccess_qemu::{Console, QemuVm};

const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// Switching the function tracer under emulation is slow, not wrong.
const TRACER_TIMEOUT: Duration = Duration::from_secs(600);
const KO: &str = "/lib/modules/kvma_attack.ko";

struct Monitor<'k, 'm> {
    kernel: &'k Kernel<'m>,
    types: &'k KernelTypes,
    vm: &'k QemuVm,
    checks: CheckSet,
}

impl<'k, 'm> Monitor<'k, 'm> {
    fn ctx(&self) -> Context<'k, 'm> {
        // The guest ran since the last pass: page tables may have changed (modules came and
        // went).
        self.kernel.invalidate();
        let off = ModuleOffsets::from_types(self.types).unwrap();
        let spans = ModuleSpan::from_modules(&self.kernel.modules(&off).unwrap());
        Context::from_backend(self.kernel, self.vm as &dyn VcpuState)
            .unwrap()
            .with_modules(spans)
            .with_types(self.types)
    }

    fn pass(&self, baseline: &Baseline) -> Report {
        let report = run_checks(&self.ctx(), baseline, &self.checks).unwrap();
        let errors: Vec<_> = report.errors().collect();
        assert!(errors.is_empty(), "checks failed: {errors:?}");
        for f in &report.findings {
            eprintln!("  {f}");
        }
        for c in &report.checks {
            eprintln!("  check {:<8} wall {:>10.1?}", c.id, c.wall);
        }
        report
    }
}

fn alarms(r: &Report) -> Vec<&Finding> {
    r.alarms().collect()
}

fn assert_quiet(r: &Report, what: &str) {
    let a = alarms(r);
    assert!(a.is_empty(), "{what}: {a:#?}");
}

fn sh(console: &mut Console, cmd: &str) -> String {
    let timeout = if cmd.contains("current_tracer") {
        TRACER_TIMEOUT
    } else {
        CMD_TIMEOUT
    };
    let (status, out) = console.run_with_status(cmd, timeout).unwrap();
    assert_eq!(status, 0, "`{cmd}` failed: {out}");
    out
}

#[test]
fn hidden_modules_processes_and_ftrace_hooks_are_found() {
    // One vCPU: switching the function tracer patches ~35,000 call sites and waits for every
    // vCPU after each batch; emulated vCPUs competing for two host cores made that take minutes.
    let mut guest = GuestSpec::default().smp(1).boot();
    let vm = guest.attach().unwrap();
    let mut console = guest.console().unwrap();
    sh(&mut console, &format!("test -f {KO}"));
    let kernel = Kernel::discover(
        &vm as &dyn PhysicalMemory,
        Some(&vm as &dyn VcpuState),
        &DiscoverOptions::default(),
    )
    .unwrap();
    let types = kernel.load_types().unwrap();
    // The walks start from these; a missing one would silently check nothing.
    for sym in [
        "ftrace_ops_list",
        "ftrace_list_end",
        "kprobe_table",
        "aggr_pre_handler",
        "pre_handler_kretprobe",
    ] {
        assert!(
            kernel.symbol(sym).is_ok(),
            "{sym} not in the guest's kallsyms"
        );
    }
    let m = Monitor {
        kernel: &kernel,
        types: &types,
        vm: &vm,
        checks: CheckSet::from_ids(&["modules", "tasks", "ftrace"]).unwrap(),
    };
    let baseline = capture_baseline(&m.ctx(), &m.checks).unwrap();
    eprintln!(
        "baseline: {} modules, tasks {}",
        baseline.checks["modules"]["modules"]
            .as_array()
            .unwrap()
            .len(),
        baseline.checks["tasks"]
    );

    // Clean, then with the kernel's own function tracer on and off.
    assert!(m.pass(&baseline).findings.is_empty());
    sh(
        &mut console,
        "echo function > /sys/kernel/tracing/current_tracer",
    );
    assert!(m.pass(&baseline).findings.is_empty());
    sh(
        &mut console,
        "echo nop > /sys/kernel/tracing/current_tracer",
    );
    assert!(m.pass(&baseline).findings.is_empty());
    // A kprobe event: the kernel's own handler on kprobe_table.
    sh(
        &mut console,
        "echo 'p:kvv_probe __x64_sys_getppid' > /sys/kernel/tracing/kprobe_events && \
         echo 1 > /sys/kernel/tracing/events/kprobes/kvv_probe/enable",
    );
    assert!(m.pass(&baseline).findings.is_empty());
    sh(
        &mut console,
        "echo 0 > /sys/kernel/tracing/events/kprobes/kvv_probe/enable && \
         echo > /sys/kernel/tracing/kprobe_events",
    );

    // ftrace: the module's ops redirects getpid.
    sh(&mut console, &format!("insmod {KO} attack=ftrace"));
    let r = m.pass(&baseline);
    let a = alarms(&r);
    assert_eq!(a.len(), 1, "{a:#?}");
    let f = a[0];
    assert_eq!(
        (f.check, f.class, f.severity),
        ("ftrace", "ftrace-hook", Severity::High)
    );
    assert!(
        f.entry == "__x64_sys_getpid" || f.entry == "__do_sys_getpid",
        "{f}"
    );
    assert!(
        f.explanation.starts_with("module kvma_attack hooks") && f.explanation.contains("IPMODIFY"),
        "{f}"
    );
    assert!(
        f.owner
            .as_deref()
            .unwrap()
            .starts_with("module kvma_attack"),
        "{f}"
    );
    let loaded: Vec<&Finding> = r
        .findings
        .iter()
        .filter(|f| f.class == "module-loaded")
        .collect();
    assert_eq!(loaded.len(), 1, "{loaded:#?}");
    assert_eq!(loaded[0].entry, "kvma_attack");
    assert!(loaded[0].actual.contains("O"), "{}", loaded[0]);
    sh(&mut console, "rmmod kvma_attack");
    assert!(m.pass(&baseline).findings.is_empty());

    // hide: unlinked from the module list, still in /sys/module.
    sh(&mut console, &format!("insmod {KO} attack=hide"));
    let r = m.pass(&baseline);
    let a = alarms(&r);
    assert_eq!(a.len(), 1, "{a:#?}");
    let f = a[0];
    assert_eq!(
        (f.check, f.class, f.severity, f.entry.as_str()),
        (
            "modules",
            "hidden-module",
            Severity::Critical,
            "kvma_attack"
        )
    );
    assert!(
        f.explanation
            .starts_with("module kvma_attack is hidden from the module list"),
        "{f}"
    );
    sh(
        &mut console,
        "echo 1 > /sys/module/kvma_attack/parameters/unhide && rmmod kvma_attack",
    );
    assert!(m.pass(&baseline).findings.is_empty());

    // An ftrace hook from a module hidden from the list, then from module_kset too (only the
    // module address tree holds it): its callback is in a module the address map does not
    // know, and is named anyway.
    for (hide, seen_in) in [
        ("hide", "only in /sys/module (module_kset)"),
        (
            "hidesysfs",
            "only in the module address tree (mod_tree), not in /sys/module",
        ),
    ] {
        sh(&mut console, &format!("insmod {KO} attack={hide},ftrace"));
        let r = m.pass(&baseline);
        let mut a: Vec<(&str, &str, Severity)> = alarms(&r)
            .iter()
            .map(|f| (f.check, f.class, f.severity))
            .collect();
        a.sort();
        assert_eq!(
            a,
            [
                ("ftrace", "ftrace-hook", Severity::Critical),
                ("modules", "hidden-module", Severity::Critical)
            ],
            "{hide}: {r:#?}"
        );
        let f = r.findings.iter().find(|f| f.check == "modules").unwrap();
        assert!(
            f.entry == "kvma_attack" && f.actual.starts_with(seen_in),
            "{hide}: {f}"
        );
        let f = r.findings.iter().find(|f| f.check == "ftrace").unwrap();
        assert!(
            f.explanation
                .starts_with("module kvma_attack, hidden from the module list, hooks"),
            "{hide}: {f}"
        );
        sh(
            &mut console,
            "echo 1 > /sys/module/kvma_attack/parameters/unhide && rmmod kvma_attack",
        );
        assert!(m.pass(&baseline).findings.is_empty());
    }

    // hideproc: a sleeping process unlinked from the task list.
    let out = sh(
        &mut console,
        "sh -c 'sleep 100000 >/dev/null 2>&1 & echo $!'",
    );
    let pid: i32 = out
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no pid in {out:?}"));
    assert_quiet(&m.pass(&baseline), "sleep started");
    sh(&mut console, &format!("insmod {KO} hideproc={pid}"));
    let r = m.pass(&baseline);
    let a = alarms(&r);
    assert_eq!(a.len(), 1, "{a:#?}");
    let f = a[0];
    assert_eq!(
        (f.check, f.class, f.severity),
        ("tasks", "hidden-process", Severity::Critical)
    );
    assert_eq!(f.entry, format!("process {pid} (sleep)"));
    assert!(
        f.explanation.starts_with(&format!(
            "process {pid} (sleep) is hidden from the task list (still in the PID table)"
        )),
        "{f}"
    );
    // A second pass of the same set confirms from the first (no re-read needed) and agrees.
    let again = m.pass(&baseline);
    assert_eq!(alarms(&again).len(), 1);
    sh(&mut console, "rmmod kvma_attack");
    sh(&mut console, &format!("kill {pid}"));
    assert!(m.pass(&baseline).findings.is_empty());

    drop(console);
    drop(kernel);
    drop(vm);
    guest.kill().unwrap();
}
