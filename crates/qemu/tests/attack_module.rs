//! The test-only `kvma_attack` kernel module (guest/attack) in a real guest under QEMU (TCG).
//!
//! `make guest` builds the module against the guest kernel's headers and puts it, with its
//! guest-side self-test (`guest/attack/selftest.sh`, installed as `/usr/bin/kvma-selftest`), into
//! the initramfs. These tests run every self-test case on one booted guest, then all attacks at
//! once on a single vCPU, and check the log lines the detection tests rely on against the
//! guest's own `/proc/kallsyms`. Missing guest files fail the tests: they are never skipped.

// Test helpers panic on failure just like the tests themselves.
#![allow(clippy::unwrap_used)]

use kvmaccess_qemu::{Accel, Console, Guest, LaunchConfig};
use std::path::{Path, PathBuf};
use std::time::Duration;

const READY: &str = "KVMACCESS-GUEST-READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
const CASE_TIMEOUT: Duration = Duration::from_secs(240);

fn guest_dir() -> PathBuf {
    std::env::var_os("KVMACCESS_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/guest"))
}

/// A booted guest; QEMU is killed when it is dropped, before the run directory goes.
struct Booted {
    guest: Guest,
    console: Console,
    _dir: tempfile::TempDir,
}

fn boot(smp: u32) -> Booted {
    let dir = guest_dir();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.gz");
    let ko = dir.join("kvma_attack.ko");
    assert!(
        kernel.is_file() && initrd.is_file() && ko.is_file(),
        "test guest missing: {}, {} and {} must exist; run `make guest` (or set KVMACCESS_GUEST_DIR)",
        kernel.display(),
        initrd.display(),
        ko.display()
    );
    let run = tempfile::Builder::new()
        .prefix("kva")
        .tempdir_in("/tmp")
        .unwrap();
    let mut cfg = LaunchConfig::new(kernel, run.path());
    cfg.initrd = Some(initrd);
    cfg.append = "console=ttyS0 panic=-1 quiet".to_string();
    cfg.mem_bytes = 512 << 20;
    cfg.smp = smp;
    cfg.accel = Accel::Tcg;
    cfg.cpu = "max".to_string();
    let guest = cfg.launch().unwrap();
    let line = guest.wait_for_console(READY, BOOT_TIMEOUT).unwrap();
    assert!(line.contains(READY), "{line}");
    let mut console = guest.console().unwrap();
    let (status, out) = console
        .run_with_status(
            "test -f /lib/modules/kvma_attack.ko && test -x /usr/bin/kvma-selftest",
            CMD_TIMEOUT,
        )
        .unwrap();
    assert_eq!(
        status, 0,
        "the guest's initramfs has no kvma_attack.ko or kvma-selftest: run `make guest` ({out})"
    );
    Booted {
        guest,
        console,
        _dir: run,
    }
}

impl Booted {
    /// Run one self-test case; returns its output (which includes the module's log lines).
    fn case(&mut self, name: &str) -> String {
        let (status, out) = self
            .console
            .run_with_status(&format!("kvma-selftest {name}"), CASE_TIMEOUT)
            .unwrap_or_else(|e| panic!("self-test {name}: {e}"));
        assert!(
            status == 0 && out.contains(&format!("KVMA-SELFTEST {name} PASS")),
            "self-test {name} failed (status {status}):\n{out}"
        );
        // The shell on the serial console still answers.
        let alive = self.console.run("echo alive", CMD_TIMEOUT).unwrap();
        assert_eq!(alive.trim(), "alive", "after {name}");
        out
    }

    fn kallsyms(&mut self, name: &str) -> u64 {
        let out = self
            .console
            .run(&format!("grep ' {name}$' /proc/kallsyms"), CMD_TIMEOUT)
            .unwrap();
        let line = out
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("{name} not in /proc/kallsyms: {out:?}"));
        hex(line.split_whitespace().next().unwrap())
    }

    /// Kernel warnings, oopses and BUGs logged since boot.
    fn kernel_trouble(&mut self) -> String {
        self.console
            .run(
                "dmesg | grep -E 'WARNING:|BUG:|Oops|general protection|Call Trace' || true",
                CMD_TIMEOUT,
            )
            .unwrap()
    }
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("not hex: {s:?}: {e}"))
}

/// The last `kvma_attack: <attack> done: ...` line in `out`.
fn done_line<'a>(out: &'a str, attack: &str) -> &'a str {
    let tag = format!("kvma_attack: {attack} done: ");
    out.lines()
        .rev()
        .find(|l| l.contains(&tag))
        .unwrap_or_else(|| panic!("no {tag:?} line in:\n{out}"))
}

/// The value of `key=` in a log line (up to the next space).
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let pat = format!(" {key}=");
    let start = line
        .find(&pat)
        .map(|p| p + pat.len())
        .or_else(|| line.find(&format!(": {key}=")).map(|p| p + key.len() + 3))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    line[start..].split(' ').next().unwrap()
}

const CR0_WP: u64 = 1 << 16;
const CR4_SMEP: u64 = 1 << 20;

/// The per-CPU `cpuN <reg> 0xOLD->0xNEW` changes in a wp/smep log line.
fn transitions(line: &str, reg: &str) -> Vec<(u64, u64)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(3)
        .filter(|w| w[0].starts_with("cpu") && w[1] == reg)
        .map(|w| {
            let (a, b) = w[2]
                .trim_end_matches(';')
                .split_once("->")
                .unwrap_or_else(|| panic!("bad change {:?} in {line:?}", w[2]));
            (hex(a), hex(b))
        })
        .collect()
}

#[test]
fn every_attack_in_turn_on_a_two_vcpu_guest() {
    let mut g = boot(2);

    g.case("clean");

    let out = g.case("syscall");
    let line = done_line(&out, "syscall");
    let sct = g.kallsyms("sys_call_table");
    assert_eq!(hex(field(line, "sys_call_table")), sct, "{line}");
    assert_eq!(field(line, "nr"), "110", "{line}");
    assert_eq!(hex(field(line, "entry")), sct + 110 * 8, "{line}");
    assert_eq!(
        hex(field(line, "old")),
        g.kallsyms("__x64_sys_getppid"),
        "{line}"
    );
    assert!(line.contains("(kvma_sct_getppid+0x0/"), "{line}");
    assert!(out.contains("kvma_attack: syscall undone"), "{out}");

    let out = g.case("inline");
    let line = done_line(&out, "inline");
    assert_eq!(field(line, "function"), "__x64_sys_getppid", "{line}");
    assert_eq!(
        hex(field(line, "addr")),
        g.kallsyms("__x64_sys_getppid"),
        "{line}"
    );
    assert_eq!(field(line, "old_bytes"), "0f1f440000", "{line}");
    assert!(field(line, "new_bytes").starts_with("e9"), "{line}");
    assert!(line.contains("(kvma_inline_getppid+0x0/"), "{line}");

    let out = g.case("idt");
    let line = done_line(&out, "idt");
    assert_eq!(field(line, "vector"), "0xf5", "{line}");
    let idt = g.kallsyms("idt_table");
    assert_eq!(hex(field(line, "idt_table")), idt, "{line}");
    assert_eq!(hex(field(line, "gate")), idt + 0xf5 * 16, "{line}");
    assert_eq!(field(line, "new"), field(line, "live"), "{line}");
    assert!(line.contains("(spurious_entries_start+"), "{line}");
    assert!(line.contains("(kvma_idt_stub+0x0/"), "{line}");

    let out = g.case("gdt");
    let line = done_line(&out, "gdt");
    assert_eq!(field(line, "slot"), "10", "{line}");
    assert_eq!(field(line, "selector"), "0x50", "{line}");
    assert_eq!(field(line, "type"), "call-gate64", "{line}");
    assert_eq!(field(line, "dpl"), "3", "{line}");
    assert_eq!(field(line, "cpus"), "0-1", "{line}");
    // Byte 5 of the descriptor: present, DPL 3, type 0xc (64-bit call gate).
    assert_eq!(&field(line, "desc")[10..12], "ec", "{line}");
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("kvma_attack: gdt cpu"))
            .count(),
        2,
        "{out}"
    );

    let out = g.case("wp");
    let line = done_line(&out, "wp");
    let changes = transitions(line, "cr0");
    assert_eq!(changes.len(), 2, "{line}");
    for (before, after) in changes {
        assert_eq!(
            (before & CR0_WP, after),
            (CR0_WP, before & !CR0_WP),
            "{line}"
        );
    }

    let out = g.case("smep");
    let line = done_line(&out, "smep");
    let changes = transitions(line, "cr4");
    assert_eq!(changes.len(), 2, "{line}");
    for (before, after) in changes {
        assert_eq!(
            (before & CR4_SMEP, after),
            (CR4_SMEP, before & !CR4_SMEP),
            "{line}"
        );
    }
    assert_eq!(
        hex(field(line, "cr4_pinned_bits")),
        g.kallsyms("cr4_pinned_bits"),
        "{line}"
    );

    let out = g.case("ftrace");
    let line = done_line(&out, "ftrace");
    assert_eq!(field(line, "function"), "__x64_sys_getpid", "{line}");
    assert_eq!(
        hex(field(line, "addr")),
        g.kallsyms("__x64_sys_getpid"),
        "{line}"
    );
    // The function's ftrace site calls the ops' trampoline while the hook is active.
    assert!(field(line, "bytes").starts_with("e8"), "{line}");
    assert!(line.contains("(kvma_ftrace_getpid+0x0/"), "{line}");

    let out = g.case("hide");
    let line = done_line(&out, "hide");
    assert_eq!(field(line, "name"), "kvma_attack", "{line}");
    assert_eq!(hex(field(line, "modules")), g.kallsyms("modules"), "{line}");

    let out = g.case("hideproc");
    let line = done_line(&out, "hideproc");
    assert!(field(line, "pid").parse::<u32>().is_ok(), "{line}");
    assert_eq!(
        hex(field(line, "init_task")),
        g.kallsyms("init_task"),
        "{line}"
    );

    let out = g.case("hideexit");
    assert!(out.contains("had exited, nothing to relink"), "{out}");

    let out = g.case("all");
    for a in [
        "syscall", "inline", "idt", "gdt", "wp", "smep", "ftrace", "hideproc", "hide",
    ] {
        done_line(&out, a);
        assert!(
            out.contains(&format!("kvma_attack: {a} undone")),
            "{a} not undone:\n{out}"
        );
    }

    let trouble = g.kernel_trouble();
    assert!(trouble.trim().is_empty(), "kernel complained:\n{trouble}");
    drop(g.guest);
}

#[test]
fn all_attacks_at_once_on_one_vcpu() {
    let mut g = boot(1);
    let out = g.case("all");
    assert_eq!(field(done_line(&out, "gdt"), "cpus"), "0", "{out}");
    let out = g.case("hideproc");
    done_line(&out, "hideproc");
    let trouble = g.kernel_trouble();
    assert!(trouble.trim().is_empty(), "kernel complained:\n{trouble}");
}
