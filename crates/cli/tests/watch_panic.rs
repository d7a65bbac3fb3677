//! The watch survives a guest panic: `boot` gives the guest a pvpanic device and makes QEMU pause
//! a panicked guest, the watch reports the panic with the kernel's own message, writes a core of
//! the panicked kernel, raises no alarm about the half-dead kernel and idles while it stays
//! paused, runs `--on-finding exec=CMD` with the panic, then follows the reset into a new boot, and
//! ends non-zero when QEMU exits. A second watch started on the panicked guest says so and still
//! ends after its `--passes` intervals.
//!
//! A test binary of its own: its TCG guest would otherwise share the two cores with the reboot
//! test's.

mod common;

use std::time::Duration;

use common::BootedGuest;

const PANIC_TEXT: &str = "Kernel panic - not syncing: sysrq triggered crash";

#[test]
fn watch_reports_a_panic_dumps_the_panicked_kernel_and_follows_the_reset() {
    // --allow-reboot: with -no-reboot QEMU turns `system_reset` into a shutdown. The guest still
    // boots with panic=-1, so this also shows the pvpanic notifier pausing it before the reboot.
    let guest = BootedGuest::boot(&["--smp", "1", "--allow-reboot"]);
    let bound = guest.console("ls /sys/bus/platform/drivers/pvpanic-mmio/");
    assert!(
        bound.contains("QEMU0001"),
        "the guest's pvpanic-mmio driver is not bound to QEMU's device: {bound:?}"
    );
    let base = guest.baseline("base.json");
    let dumps = guest.path("dumps");
    let dump_action = format!("dump={}", dumps.display());
    let exec_out = guest.path("exec.out");
    let exec_action = format!(
        "exec=cat > {0}.tmp && echo \"$KVMACCESS_EVENT\" >> {0}.tmp && mv {0}.tmp {0}",
        exec_out.display()
    );
    // Every pass compares all of the kernel's text and rodata (no budget), so the first pass
    // after the reset is known to have covered the new boot's read-only-after-init data.
    let mut watch = guest.watch(
        &base,
        "panic.log",
        &[
            "--interval",
            "1s",
            "--text-budget",
            "0",
            "--on-finding",
            &dump_action,
            "--on-finding",
            &exec_action,
        ],
    );
    // Some passes over the healthy kernel first.
    std::thread::sleep(Duration::from_secs(5));

    // Writes to /proc/sysrq-trigger ignore the kernel.sysrq mask; the command never returns.
    let _ = guest.run(&[
        "console",
        "--timeout",
        "3s",
        "--",
        "echo c > /proc/sysrq-trigger",
    ]);
    let (_, panic) = watch.wait_for("the panic", Duration::from_secs(60), |l| {
        l["event"] == "guest-panicked"
    });
    assert_eq!(panic["action"], "pause", "{panic}");
    assert_eq!(panic["panic_message"], PANIC_TEXT, "{panic}");
    let log = panic["kernel_log"].as_array().expect("kernel_log lines");
    assert!(
        log.iter()
            .any(|l| l.as_str().is_some_and(|l| l.ends_with(PANIC_TEXT))),
        "{panic}"
    );
    let (_, dumped) = watch.wait_for("the core", Duration::from_secs(120), |l| {
        l["event"] == "dumped"
    });
    assert_eq!(guest.qmp("query-status")["status"], "guest-panicked");
    // The command ran on the panic, after the core was written, with the panic line.
    watch.wait_for(
        "the command run on the panic",
        Duration::from_secs(60),
        |l| l["event"] == "exec",
    );
    let ran = std::fs::read_to_string(&exec_out).expect("the command's output");
    let mut ran = ran.lines();
    let told: serde_json::Value =
        serde_json::from_str(ran.next().expect("a JSON line")).expect("the panic as JSON");
    assert_eq!(told["event"], "guest-panicked", "{told}");
    assert_eq!(told["panic_message"], PANIC_TEXT, "{told}");
    assert_eq!(ran.next(), Some("guest-panicked"), "$KVMACCESS_EVENT");

    // The core is the panicked kernel: an ELF core whose vCPU stopped in the kernel, and whose
    // kernel log ends with the panic.
    let core = dumped["detail"].as_str().expect("core path").to_string();
    assert!(core.starts_with(dumps.to_str().expect("utf-8")), "{core}");
    let dump = kvmaccess_dump::open_dump(&core, None).expect("the core opens");
    assert_eq!(dump.format(), kvmaccess_dump::DumpFormat::ElfCore);
    let vcpus = dump.recorded_registers().expect("registers in the core");
    assert_eq!(vcpus.len(), 1);
    assert!(
        vcpus[0].rip >= 0xffff_8000_0000_0000,
        "the panicked vCPU should be in the kernel: rip {:#x}",
        vcpus[0].rip
    );
    drop(dump);
    let dmesg = guest.run(&["--dump", &core, "dmesg"]).ok().stdout;
    assert!(
        dmesg.contains(PANIC_TEXT),
        "the core's kernel log lacks the panic; it ends with:\n{}",
        dmesg.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    std::fs::remove_file(&core).expect("removing the core");

    // While the guest stays panicked the watch neither checks nor spins.
    let lines_before = watch.lines().len();
    let cpu_before = watch.cpu_time();
    std::thread::sleep(Duration::from_secs(5));
    let cpu = watch.cpu_time() - cpu_before;
    assert!(
        cpu < Duration::from_millis(250),
        "the watch used {cpu:?} of CPU in 5 s beside a panicked guest"
    );
    assert_eq!(
        watch.lines().len(),
        lines_before,
        "nothing happened, nothing to report\n{}",
        watch.transcript()
    );

    // Another watch, started on the panicked guest through the one-off QMP socket, learns of
    // the panic from QEMU's state (no event comes again), checks nothing, and still ends after
    // its intervals.
    let state = kvmaccess_qemu::GuestState::load(guest.run_root.path().join("default"))
        .expect("the booted guest's state file");
    let late = guest
        .run(&[
            "watch",
            "--qmp",
            state.qmp_socket.to_str().expect("utf-8"),
            "--baseline",
            base.to_str().expect("utf-8"),
            "--interval",
            "1s",
            "--passes",
            "3",
        ])
        .ok();
    let late: Vec<serde_json::Value> = late
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert!(
        late.iter().any(|l| l["event"] == "guest-panicked"),
        "{late:#?}"
    );
    assert!(!late.iter().any(|l| l["event"] == "finding"), "{late:#?}");
    let finished = late
        .iter()
        .find(|l| l["event"] == "watch-finished")
        .expect("watch-finished");
    assert_eq!(
        finished["detail"],
        "0 passes, 3 interval(s) without a pass (guest panicked, kernel not found or pass failed)",
        "{finished}"
    );

    // A reset leaves a panicked guest stopped (QEMU's `prelaunch`) until it is continued.
    let before_reset = watch.lines().len();
    guest.qmp("system_reset");
    guest.qmp("cont");
    // The new boot differs from the baseline's in its KASLR slide and in the data it set up
    // while booting: both are reported as such, not as alarms.
    watch.follow_reboot(before_reset);
    let bad = watch.problems();
    assert!(bad.is_empty(), "{bad:?}\n{}", watch.transcript());
    assert_eq!(
        watch
            .lines()
            .iter()
            .filter(|l| l["event"] == "guest-panicked")
            .count(),
        1,
        "{}",
        watch.transcript()
    );

    guest.run(&["shutdown"]).ok();
    watch.expect_qemu_exit();
}
