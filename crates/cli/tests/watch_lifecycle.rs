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
    // No text budget: every pass compares all text and rodata, so the first pass after the
    // reboot covers the data the new boot set up (see below).
    let mut watch = guest.watch(
        &base,
        "life.log",
        &["--interval", "1s", "--text-budget", "0"],
    );
    watch.wait_for("a first pass", Duration::from_secs(60), |l| {
        l["event"] == "finding" || l["event"] == "watch-started"
    });

    // `reboot -f` does not return: send it without waiting for the prompt.
    let _ = guest.run(&["console", "--timeout", "3s", "--", "reboot -f"]);
    // Same build, new slide, and boot-time data of its own: reported as what they are rather
    // than as alarms.
    let found = watch.follow_reboot();
    let slide_after = guest.run(&["--json", "info"]).ok().json()["kaslr_offset"].clone();
    assert_ne!(
        slide_before, slide_after,
        "KASLR should move across the reboot: {found}"
    );
    let alarms = watch.problems();
    assert!(
        alarms.is_empty(),
        "after the reboot: {alarms:?}\n{}",
        watch.transcript()
    );

    guest.run(&["shutdown"]).ok();
    watch.expect_qemu_exit();
}
