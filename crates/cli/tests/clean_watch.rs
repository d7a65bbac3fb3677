//! No false positives: a clean guest doing legitimate work (processes forking, a module loaded
//! and unloaded, the ftrace function tracer switched on and off, a static key toggled through
//! sysctl) is watched with every default check, and nothing but informational findings appears.

mod common;

use std::time::{Duration, Instant};

use common::BootedGuest;
use serde_json::Value;

const KO: &str = "/lib/modules/kvma_attack.ko";
const TRACING: &str = "/sys/kernel/tracing";

/// One round of legitimate work, step by step (each a console command).
fn workload_steps() -> Vec<String> {
    vec![
        // Forks and execs: external commands, subshells, `sh -c` chains, short-lived children.
        "for i in $(seq 100); do /bin/true; done; for i in $(seq 50); do (:); done; echo forks"
            .to_string(),
        "for i in $(seq 20); do sh -c 'sh -c \"echo $$ > /dev/null\"'; done; \
         sleep 1 & sleep 1 & wait; echo chains"
            .to_string(),
        // A module without any attack: loaded, used a little, unloaded.
        format!("insmod {KO} && cat /sys/module/kvma_attack/parameters/state >/dev/null && rmmod kvma_attack && echo module"),
        // The function tracer on and off: ftrace patches every traceable function's entry.
        format!("echo function > {TRACING}/current_tracer && sleep 1 && echo nop > {TRACING}/current_tracer && echo ftrace"),
        // A static key through sysctl: jump labels patched in scheduler code.
        "echo 1 > /proc/sys/kernel/sched_schedstats && sleep 1 && echo 0 > /proc/sys/kernel/sched_schedstats && echo schedstats"
            .to_string(),
    ]
}

fn run_step(guest: &BootedGuest, step: &str) {
    // Switching the function tracer patches ~35,000 sites with all vCPUs stopped; under TCG on
    // two busy cores that can take minutes, which is slow, not wrong.
    let out = guest.console_within(step, "600s");
    let want = step.rsplit("echo ").next().unwrap_or_default().trim();
    assert!(
        out.trim_end().ends_with(want),
        "workload step failed: {step}\n{out}"
    );
}

#[test]
fn legitimate_work_raises_no_alarm() {
    // One vCPU: every ftrace switch stops all vCPUs, and each emulated vCPU is a host thread
    // competing with the watch for this machine's two cores.
    let guest = BootedGuest::boot(&["--smp", "1"]);
    // The features the workload uses exist in this guest.
    assert_eq!(
        guest
            .console(&format!(
                "grep -c function {TRACING}/available_tracers; cat /proc/sys/kernel/sched_schedstats"
            ))
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["1", "0"]
    );
    let base = guest.baseline("base.json");

    // Three minutes of watching with every default check, alarms only, while the workload
    // loops: several rounds of every step, and every byte of text compared ~15 times.
    const PASSES: u64 = 180;
    let mut watch = guest.watch(
        &base,
        "clean.log",
        &[
            "--interval",
            "1s",
            "--no-info",
            "--passes",
            &PASSES.to_string(),
        ],
    );
    let started = Instant::now();
    // The watch holds its own QMP socket: one-off commands still work beside it.
    let regs = guest.run(&["--json", "regs"]).ok().json();
    assert!(regs[0]["cr0"].is_string(), "{regs}");
    let mut rounds = 0;
    'work: loop {
        for step in workload_steps() {
            if watch.lines().iter().any(|l| l["event"] == "watch-finished") {
                break 'work;
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "the watch did not finish\n{}",
                watch.transcript()
            );
            run_step(&guest, &step);
        }
        rounds += 1;
    }
    watch.wait_exit(Duration::from_secs(60));
    assert!(
        rounds >= 2,
        "only {rounds} workload rounds ran during the watch"
    );
    let lines = watch.lines();
    let finished = lines
        .iter()
        .find(|l| l["event"] == "watch-finished")
        .expect("watch-finished");
    assert!(
        finished["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{PASSES} passes")),
        "{finished}"
    );
    let alarms: Vec<&Value> = lines.iter().filter(|l| l["event"] == "finding").collect();
    assert!(
        alarms.is_empty(),
        "{} alarm(s) on a clean guest:\n{}",
        alarms.len(),
        watch.transcript()
    );
    let failures: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "check-failed" || l["event"] == "pass-failed")
        .collect();
    assert!(
        failures.is_empty(),
        "checks that could not run leave the guest unwatched:\n{}",
        watch.transcript()
    );
    eprintln!(
        "clean watch: {PASSES} passes, {rounds} workload rounds, {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // The same changes are visible as information: watched without --no-info (and comparing
    // all of the kernel text each pass), each shows up as an info finding and is cleared when
    // undone.
    let mut watch = guest.watch(
        &base,
        "info.log",
        &["--interval", "1s", "--text-budget", "0"],
    );
    let expect_info = |watch: &mut common::Watch, what: &str, pred: &dyn Fn(&Value) -> bool| {
        watch.wait_for(what, Duration::from_secs(60), |l| {
            l["event"] == "finding" && pred(l)
        });
    };
    guest.console("echo 1 > /proc/sys/kernel/sched_schedstats");
    expect_info(&mut watch, "the static key's jump labels", &|l| {
        l["check"] == "text" && l["class"] == "jump-label"
    });
    // Here the tracer is limited to a few functions: with every function traced, a debug build
    // reclassifying ~35,000 sites each pass starves a 2-core machine running an emulated guest
    // (the first part already switches the full tracer on and off under the watch).
    guest.console(&format!(
        "echo 'vfs_read vfs_write do_sys_openat2' > {TRACING}/set_ftrace_filter; \
         echo function > {TRACING}/current_tracer"
    ));
    expect_info(&mut watch, "the function tracer's call sites", &|l| {
        l["check"] == "text" && l["class"] == "ftrace"
    });
    guest.console(&format!("insmod {KO}"));
    expect_info(&mut watch, "the module load", &|l| {
        l["check"] == "modules" && l["entry"] == "kvma_attack"
    });
    guest.console(&format!(
        "echo nop > {TRACING}/current_tracer; echo > {TRACING}/set_ftrace_filter; \
         echo 0 > /proc/sys/kernel/sched_schedstats; rmmod kvma_attack"
    ));
    for check in ["text", "modules"] {
        let prefix = format!("{check} ");
        watch.wait_for(
            &format!("the {check} findings cleared"),
            Duration::from_secs(60),
            |l| {
                l["event"] == "finding-cleared"
                    && l["detail"].as_str().unwrap_or("").starts_with(&prefix)
            },
        );
    }
    let lines = watch.stop();
    let findings: Vec<&Value> = lines.iter().filter(|l| l["event"] == "finding").collect();
    for f in &findings {
        assert_eq!(f["severity"], "info", "alarm on a legitimate change: {f}");
    }
    let mut classes: Vec<String> = findings
        .iter()
        .map(|f| {
            format!(
                "{}/{}",
                f["check"].as_str().unwrap_or(""),
                f["class"].as_str().unwrap_or("")
            )
        })
        .collect();
    classes.sort();
    classes.dedup();
    eprintln!("informational findings: {classes:?}");
}
