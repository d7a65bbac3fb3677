//! A watch reports what happens to the guest when it happens, not at its next pass: with a
//! ten-minute interval, a pause, a resume, a reset and QEMU's exit each reach the log within
//! seconds, also while the watch waits for a rebooted guest's new kernel.
//!
//! A test binary of its own: its TCG guest would otherwise share the two cores with another
//! test's.

mod common;

use std::time::{Duration, Instant};

use common::BootedGuest;

/// Far longer than the test: any event seen within [`PROMPT`] was not waiting for a pass.
const INTERVAL: &str = "10m";
const PROMPT: Duration = Duration::from_secs(20);

#[test]
fn guest_events_are_reported_between_passes() {
    let guest = BootedGuest::boot(&["--smp", "1", "--allow-reboot"]);
    let base = guest.baseline("base.json");
    let mut watch = guest.watch(&base, "events.log", &["--interval", INTERVAL]);
    watch.wait_for("the kernel", Duration::from_secs(60), |l| {
        l["event"] == "kernel-found"
    });
    // The first pass runs right after the kernel is found; the watch then waits out its
    // interval.
    std::thread::sleep(Duration::from_secs(3));

    let asked = Instant::now();
    guest.qmp("stop");
    watch.wait_for("the pause, long before the next pass", PROMPT, |l| {
        l["event"] == "guest-paused"
    });
    guest.qmp("cont");
    watch.wait_for("the resume, long before the next pass", PROMPT, |l| {
        l["event"] == "guest-resumed"
    });
    assert!(
        asked.elapsed() < 2 * PROMPT,
        "events took {:?}\n{}",
        asked.elapsed(),
        watch.transcript()
    );
    let alarms = watch.problems();
    assert!(alarms.is_empty(), "{alarms:?}\n{}", watch.transcript());

    // After a reset the old kernel is gone, and the watch looks for the new one once per
    // interval; meanwhile it still reports what happens to the guest when it happens. The
    // guest is paused first so that the new kernel cannot be found before the watch waits.
    let (paused_at, _) = watch.wait_for("the pause", PROMPT, |l| l["event"] == "guest-paused");
    guest.qmp("stop");
    guest.qmp("system_reset");
    let (reset_at, _) = watch.wait_for_from(paused_at + 1, "the reset", PROMPT, |l| {
        l["event"] == "guest-rebooted"
    });
    let (waiting_at, _) = watch.wait_for_from(reset_at, "the wait for a kernel", PROMPT, |l| {
        l["event"] == "waiting-for-kernel"
    });
    guest.qmp("cont");
    watch.wait_for_from(
        waiting_at,
        "the resume while waiting for the kernel",
        PROMPT,
        |l| l["event"] == "guest-resumed",
    );
    guest.qmp("quit");
    watch.expect_qemu_exit();
}
