//! The watch follows the guest's life: started while the guest is still booting (it waits for the
//! kernel to finish), a reboot (new KASLR slide, same baseline, no alarm), then QEMU going away
//! (reported, non-zero exit).

mod common;

use std::time::Duration;

use common::BootedGuest;

#[test]
fn watch_survives_a_reboot_and_reports_qemu_exit() {
    let guest = BootedGuest::boot(&["--smp", "1", "--allow-reboot"]);
    let base = guest.baseline("base.json");
    // The watch starts while the guest is in its firmware again: it must wait until the new
    // kernel has finished booting, and not check a half-initialised one.
    guest.qmp("system_reset");
    // No text budget: every pass compares all text and rodata, so the first pass over a new
    // boot covers the data that boot set up (see below).
    let mut watch = guest.watch(
        &base,
        "life.log",
        &["--interval", "1s", "--text-budget", "0"],
    );
    let (waiting, why) = watch.wait_for("the wait for the kernel", Duration::from_secs(60), |l| {
        l["event"] == "waiting-for-kernel"
    });
    assert!(why["detail"].is_string(), "{why}");
    watch.follow_new_kernel(waiting);
    let alarms = watch.problems();
    assert!(
        alarms.is_empty(),
        "watching from the reset on: {alarms:?}\n{}",
        watch.transcript()
    );
    let slide_before = guest.run(&["--json", "info"]).ok().json()["kaslr_offset"].clone();

    // Same build, new slide, and boot-time data of its own: reported as what they are rather
    // than as alarms. KASLR picks one of ~500 slides, so two boots can share one by chance: a
    // second reboot then gives the watch its new slide to follow.
    let mut found = serde_json::Value::Null;
    let mut slide_after = slide_before.clone();
    for _ in 0..2 {
        let before_reboot = watch.lines().len();
        // `reboot -f` does not return: send it without waiting for the prompt.
        let _ = guest.run(&["console", "--timeout", "3s", "--", "reboot -f"]);
        found = watch.follow_reboot(before_reboot);
        slide_after = guest.run(&["--json", "info"]).ok().json()["kaslr_offset"].clone();
        if slide_after != slide_before {
            break;
        }
    }
    assert_ne!(
        slide_before,
        slide_after,
        "KASLR should move across two reboots: {found}\n{}",
        watch.transcript()
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
