//! The project's real test guest, for integration tests of every crate: the Debian cloud kernel
//! and busybox initramfs that `make guest` builds into `.cache/guest` (or `KVMACCESS_GUEST_DIR`),
//! booted under QEMU with TCG so that the tests run on any host.
//!
//! Missing guest files fail the calling test with a message naming them and the command that
//! builds them: a real-guest test is never skipped. Failures panic, as in the tests themselves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use kvmaccess_qemu::{Accel, Guest, LaunchConfig};

/// What the guest's init prints on the console once its shell is ready.
pub const READY: &str = "KVMACCESS-GUEST-READY";
/// Booting under emulation on a busy two-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// The directory holding the test guest: `KVMACCESS_GUEST_DIR`, else the workspace's
/// `.cache/guest`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("KVMACCESS_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/guest"))
}

/// A file of the test guest (`vmlinuz`, `initramfs.cpio.gz`, `kvma_attack.ko`, `config`, ...);
/// fails the test when it is missing.
pub fn guest_file(name: &str) -> PathBuf {
    let path = guest_dir().join(name);
    assert!(
        path.is_file(),
        "test guest missing: {} must exist; run `make guest` (or set KVMACCESS_GUEST_DIR)",
        path.display()
    );
    path
}

/// Serialises the guests of one test binary: each emulated vCPU is a host thread, and two
/// guests booting at once on a two-core machine starve each other into timeouts.
pub fn one_qemu_at_a_time() -> MutexGuard<'static, ()> {
    static ONE_QEMU: Mutex<()> = Mutex::new(());
    ONE_QEMU.lock().unwrap_or_else(|p| p.into_inner())
}

/// How to boot the test guest: one vCPU, 512 MiB, a quiet serial console by default.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    smp: u32,
    mem_bytes: u64,
    append: String,
}

impl Default for GuestSpec {
    fn default() -> Self {
        Self {
            smp: 1,
            mem_bytes: 512 << 20,
            // `quiet` keeps kernel messages off the console the tests talk through; `panic=-1`
            // turns a guest panic into a reboot the test sees instead of a hang.
            append: "console=ttyS0 panic=-1 quiet".to_string(),
        }
    }
}

impl GuestSpec {
    /// Number of vCPUs.
    pub fn smp(mut self, vcpus: u32) -> Self {
        self.smp = vcpus;
        self
    }

    /// Guest RAM in MiB.
    pub fn mem_mib(mut self, mib: u64) -> Self {
        self.mem_bytes = mib << 20;
        self
    }

    /// Adds kernel command-line words (e.g. `no5lvl` for 4-level paging).
    pub fn append(mut self, words: &str) -> Self {
        self.append.push(' ');
        self.append.push_str(words);
        self
    }

    /// The launch configuration, for tests that change more before launching.
    pub fn config(&self, run_dir: &Path) -> LaunchConfig {
        let mut cfg = LaunchConfig::new(guest_file("vmlinuz"), run_dir);
        cfg.initrd = Some(guest_file("initramfs.cpio.gz"));
        cfg.accel = Accel::Tcg;
        cfg.cpu = "max".to_string();
        cfg.smp = self.smp;
        cfg.mem_bytes = self.mem_bytes;
        cfg.append = self.append.clone();
        cfg
    }

    /// Boots the guest and waits until its shell is ready.
    pub fn boot(&self) -> TestGuest {
        self.boot_with(|_| {})
    }

    /// Like [`GuestSpec::boot`], with a last change to the launch configuration.
    pub fn boot_with(&self, tweak: impl FnOnce(&mut LaunchConfig)) -> TestGuest {
        // Short path: QEMU's unix sockets live in the run directory.
        let run = tempfile::Builder::new()
            .prefix("kvt")
            .tempdir_in("/tmp")
            .unwrap();
        let mut cfg = self.config(run.path());
        tweak(&mut cfg);
        let guest = cfg.launch().unwrap();
        let ready_line = guest.wait_for_console(READY, BOOT_TIMEOUT).unwrap();
        assert!(ready_line.contains(READY), "{ready_line}");
        TestGuest {
            guest,
            ready_line,
            _run: run,
        }
    }
}

/// A booted test guest. QEMU is stopped when it is dropped, before its run directory goes.
#[derive(Debug)]
pub struct TestGuest {
    guest: Guest,
    ready_line: String,
    _run: tempfile::TempDir,
}

impl TestGuest {
    /// The console line that announced the guest ready (it names the kernel release).
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    /// A scratch directory that lives as long as the guest (QEMU's sockets are in it too).
    pub fn run_dir(&self) -> &Path {
        self._run.path()
    }
}

impl Deref for TestGuest {
    type Target = Guest;

    fn deref(&self) -> &Guest {
        &self.guest
    }
}

impl DerefMut for TestGuest {
    fn deref_mut(&mut self) -> &mut Guest {
        &mut self.guest
    }
}
