//! The watch follows the guest's life: a reboot (new KASLR slide, same baseline, no alarm), then
//! QEMU going away (reported, non-zero exit).

mod common;

use std::time::Duration;

use common::BootedGuest;

#[test]
fn watch_survives_a_reboot_and_reports_qemu_exit() {
    let guest = BootedGuest::boot(&["--smp", "1", "--allow-reboot"]);
    let base = guest.baseline("base.json");
    let slide_before = guest.run(&["--json", "info"]).ok().json()["kaslr_offset"].clone();
    let mut watch = guest.watch(&base, "life.log", &["--interval", "1s", "--no-info"]);
    watch.wait_for("a first pass", Duration::from_secs(60), |l| {
        l["event"] == "finding" || l["event"] == "watch-started"
    });

    // `reboot -f` does not return: send it without waiting for the prompt.
    let _ = guest.run(&["console", "--timeout", "3s", "--", "reboot -f"]);
    watch.wait_for("the reboot", Duration::from_secs(60), |l| {
        l["event"] == "guest-rebooted"
    });
    let (_, found) = watch.wait_for(
        "the kernel after the reboot",
        Duration::from_secs(180),
        |l| l["event"] == "kernel-found",
    );
    // A few passes on the new boot: same build, new slide, nothing to report.
    std::thread::sleep(Duration::from_secs(5));
    let slide_after = guest.run(&["--json", "info"]).ok().json()["kaslr_offset"].clone();
    assert_ne!(
        slide_before, slide_after,
        "KASLR should move across the reboot: {found}"
    );
    let alarms: Vec<_> = watch
        .lines()
        .into_iter()
        .filter(|l| {
            l["event"] == "finding"
                || l["event"] == "pass-failed"
                || l["event"] == "baseline-mismatch"
        })
        .collect();
    assert!(
        alarms.is_empty(),
        "after the reboot: {alarms:?}\n{}",
        watch.transcript()
    );

    guest.run(&["shutdown"]).ok();
    watch.wait_for("QEMU's exit", Duration::from_secs(30), |l| {
        l["event"] == "qemu-exited"
    });
    let status = watch.wait_status(Duration::from_secs(30));
    assert!(!status.success(), "the watch must fail when QEMU exits");
}
