//! Tests against real QEMU (TCG) and the project's test guest.
//!
//! The guest is `make guest`'s kernel and initramfs, found through `KVMACCESS_GUEST_DIR`
//! (default `<workspace>/.cache/guest`). Missing files fail the tests: they are never skipped.
//! The machine may have two cores, so at most two QEMUs run at a time.

// Helpers shared by the tests panic on failure just like the tests themselves.
#![allow(clippy::unwrap_used)]

use kvmaccess_core::{Gpa, PhysicalMemory, PhysicalMemoryWrite, VcpuState, VmControl};
use kvmaccess_qemu::{
    Accel, AttachOptions, Error, Guest, GuestState, LaunchConfig, QemuVm, QmpClient, QmpEvent,
    RamBackend, RamMode, RamSource, RegisterSource,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

const READY: &str = "KVMACCESS-GUEST-READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Bounds the QEMUs alive at once across this binary's test threads.
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

static SLOTS: Slots = Slots {
    used: Mutex::new(0),
    freed: Condvar::new(),
};
const MAX_QEMUS: usize = 2;

struct Slot;

impl Slot {
    fn take() -> Slot {
        let mut used = SLOTS.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used >= MAX_QEMUS {
            used = SLOTS.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut used = SLOTS.used.lock().unwrap_or_else(|p| p.into_inner());
        *used -= 1;
        SLOTS.freed.notify_one();
    }
}

fn guest_dir() -> PathBuf {
    std::env::var_os("KVMACCESS_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/guest"))
}

fn guest_files() -> (PathBuf, PathBuf) {
    let dir = guest_dir();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.gz");
    assert!(
        kernel.is_file() && initrd.is_file(),
        "test guest missing: {} and {} must exist; run `make guest` (or set KVMACCESS_GUEST_DIR)",
        kernel.display(),
        initrd.display()
    );
    (kernel, initrd)
}

/// A launched guest plus its run directory and concurrency slot; QEMU dies first on drop.
struct TestGuest {
    guest: Guest,
    _dir: tempfile::TempDir,
    _slot: Slot,
}

impl std::ops::Deref for TestGuest {
    type Target = Guest;
    fn deref(&self) -> &Guest {
        &self.guest
    }
}

fn launch(mem_mib: u64, smp: u32, extra: &[&str], boot: bool) -> TestGuest {
    launch_with(mem_mib, smp, extra, boot, |_| {})
}

fn launch_with(
    mem_mib: u64,
    smp: u32,
    extra: &[&str],
    boot: bool,
    tweak: impl FnOnce(&mut LaunchConfig),
) -> TestGuest {
    let (kernel, initrd) = guest_files();
    let slot = Slot::take();
    let dir = tempfile::Builder::new()
        .prefix("kvq")
        .tempdir_in("/tmp")
        .unwrap();
    let mut cfg = LaunchConfig::new(kernel, dir.path());
    cfg.initrd = Some(initrd);
    cfg.append = "console=ttyS0 panic=-1 quiet".to_string();
    cfg.mem_bytes = mem_mib << 20;
    cfg.smp = smp;
    cfg.accel = Accel::Tcg;
    cfg.extra_args = extra.iter().map(|s| s.to_string()).collect();
    tweak(&mut cfg);
    let guest = cfg.launch().unwrap();
    if boot {
        let line = guest.wait_for_console(READY, BOOT_TIMEOUT).unwrap();
        assert!(line.contains(READY), "{line}");
    }
    TestGuest {
        guest,
        _dir: dir,
        _slot: slot,
    }
}

fn kallsyms_addr(console: &mut kvmaccess_qemu::Console, name: &str) -> u64 {
    let out = console
        .run(&format!("grep ' {name}$' /proc/kallsyms"), CMD_TIMEOUT)
        .unwrap();
    let line = out
        .lines()
        .find(|l| l.ends_with(&format!(" {name}")))
        .unwrap_or_else(|| panic!("{name} not in kallsyms output {out:?}"));
    u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap()
}

fn read_vec(vm: &QemuVm, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    vm.read_phys(Gpa(gpa), &mut v).unwrap();
    v
}

/// `phys_equals` agrees with the bytes read at `gpa`, and sees one byte changed anywhere in
/// them; a range running past the end of RAM is an error even when its first byte differs.
fn equals_agrees_with_read(vm: &QemuVm, gpa: u64, bytes: &[u8]) {
    assert!(vm.phys_equals(Gpa(gpa), bytes).unwrap(), "at {gpa:#x}");
    for flip in [0, bytes.len() / 2, bytes.len() - 1] {
        let mut other = bytes.to_vec();
        other[flip] ^= 0x5a;
        assert!(
            !vm.phys_equals(Gpa(gpa), &other).unwrap(),
            "a change at {gpa:#x}+{flip:#x} unseen"
        );
    }
    let end = vm.ranges().last().unwrap().end.0;
    match vm.phys_equals(Gpa(end - 8), &[0xa5; 16]) {
        Err(kvmaccess_core::Error::PhysUnmapped { gpa }) => assert_eq!(gpa, Gpa(end)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn boot_console_memory_and_state_file() {
    let g = launch(512, 1, &[], true);

    // State file: other commands find the guest through it.
    let st = GuestState::load(&g.state().run_dir).unwrap();
    assert_eq!(&st, g.state());
    assert!(st.is_alive());
    let ram_path = st
        .ram_path
        .clone()
        .expect("a file-backed guest names its RAM file");
    assert!(ram_path.starts_with("/dev/shm"), "{ram_path:?}");
    assert!(ram_path.exists());

    // Console: a command, its status, and output without the echoed command line.
    let mut con = g.console().unwrap();
    let (status, out) = con
        .run_with_status("echo hello; false", CMD_TIMEOUT)
        .unwrap();
    assert_eq!((status, out.trim()), (1, "hello"));

    let vm = g.attach().unwrap();
    assert_eq!(vm.pid(), Some(g.pid()));
    assert_eq!(
        vm.ram_source(),
        RamSource::SharedFile {
            path: ram_path.clone()
        }
    );
    assert!(vm.notice().is_none());
    assert_eq!(vm.ram_size(), 512 << 20);
    assert_eq!(vm.ranges().first().map(|r| r.start), Some(Gpa(0)));
    let banner_pa = banner_matches_proc_version(&vm, &mut con);

    // The same bytes through /proc/PID/mem, with the guest paused so nothing moves in between.
    vm.pause().unwrap();
    let probes: Vec<(u64, usize)> = vec![
        (0, 0x10_0000),
        (banner_pa & !0xfff, 0x20_0000),
        (0x1f00_0000, 0x10_0000),
        ((512 << 20) - 0x1000, 0x1000),
    ];
    let via_map: Vec<Vec<u8>> = probes.iter().map(|&(a, l)| read_vec(&vm, a, l)).collect();
    for (&(a, _), bytes) in probes.iter().zip(&via_map) {
        equals_agrees_with_read(&vm, a, bytes);
    }
    drop(vm); // QEMU serves one QMP client at a time.
    let pm = g
        .attach_with(AttachOptions {
            ram: RamMode::ProcMem,
            ..AttachOptions::default()
        })
        .unwrap();
    assert_eq!(pm.ram_source(), RamSource::ProcMem { pid: g.pid() });
    assert!(pm.notice().unwrap().contains("CAP_SYS_PTRACE"));
    for (&(a, l), mapped) in probes.iter().zip(&via_map) {
        assert!(read_vec(&pm, a, l) == *mapped, "bytes at {a:#x} differ");
        equals_agrees_with_read(&pm, a, mapped);
    }
    // Past the end of RAM: an error naming the first missing address, from both paths.
    let mut b = [0u8; 16];
    match pm.read_phys(Gpa((512 << 20) - 8), &mut b) {
        Err(kvmaccess_core::Error::PhysUnmapped { gpa }) => assert_eq!(gpa, Gpa(512 << 20)),
        other => panic!("{other:?}"),
    }
    pm.resume().unwrap();
    drop(pm);

    let vm = g.attach().unwrap();
    match vm.read_phys(Gpa(u64::MAX - 3), &mut b) {
        Err(kvmaccess_core::Error::PhysUnmapped { .. }) => {}
        other => panic!("{other:?}"),
    }
    // Read-only by default.
    match vm.write_phys(Gpa(0x1000), &[1]) {
        Err(e) => assert!(e.to_string().contains("--allow-write"), "{e}"),
        Ok(()) => panic!("write allowed on a read-only attachment"),
    }
    drop(vm);

    // The console still works after all that, and the guest is alive.
    assert_eq!(con.run("echo again", CMD_TIMEOUT).unwrap().trim(), "again");

    let mut g = g;
    g.guest.kill().unwrap();
    assert!(!g.guest.state().is_alive());
    assert!(
        !ram_path.exists(),
        "RAM file {} left behind",
        ram_path.display()
    );
}

/// Reads `linux_banner` at its physical address from VMCOREINFO (published by the guest's
/// qemu_fw_cfg to QEMU's vmcoreinfo device, read back through a dump's notes): va -
/// __START_KERNEL_map + phys_base. Its bytes must be exactly what the guest prints as
/// /proc/version. Returns the physical address.
fn banner_matches_proc_version(vm: &QemuVm, con: &mut kvmaccess_qemu::Console) -> u64 {
    let version = con.run("cat /proc/version", CMD_TIMEOUT).unwrap();
    let version = version.trim().to_string();
    assert!(version.starts_with("Linux version 6."), "{version:?}");
    let banner_va = kallsyms_addr(con, "linux_banner");
    let notes = vm.dump_notes().unwrap();
    let info = notes.vmcoreinfo_map();
    let phys_base: i64 = info
        .get("NUMBER(phys_base)")
        .unwrap_or_else(|| panic!("no phys_base in VMCOREINFO {:?}", notes.vmcoreinfo))
        .parse()
        .unwrap();
    let banner_pa = banner_va
        .wrapping_sub(0xffff_ffff_8000_0000)
        .wrapping_add_signed(phys_base);
    let banner = read_vec(vm, banner_pa, version.len());
    assert_eq!(String::from_utf8_lossy(&banner), version);
    banner_pa
}

/// `LaunchConfig` with memfd RAM: no RAM file anywhere, and an attach maps the memfd through
/// /proc/PID/fd, so the guest reads the same as a file-backed one.
#[test]
fn memfd_launched_guest_is_read_through_proc_fd() {
    let g = launch_with(256, 1, &[], true, |cfg| cfg.ram = RamBackend::Memfd);
    let st = GuestState::load(&g.state().run_dir).unwrap();
    assert_eq!(
        (st.ram_backend, st.ram_path.as_ref()),
        (RamBackend::Memfd, None)
    );
    let vm = g.attach().unwrap();
    match vm.ram_source() {
        RamSource::SharedFile { path } => {
            assert!(
                path.starts_with(format!("/proc/{}/fd", g.pid())),
                "{path:?}"
            )
        }
        other => panic!("memfd RAM must be mapped, not read through {other:?}"),
    }
    assert!(vm.notice().is_none(), "{:?}", vm.notice());
    assert_eq!(vm.ram_size(), 256 << 20);
    let mut con = g.console().unwrap();
    banner_matches_proc_version(&vm, &mut con);
}

#[test]
fn registers_from_hmp_and_dump_agree() {
    let g = launch(256, 2, &[], true);
    let vm = g
        .attach_with(AttachOptions {
            registers: RegisterSource::Hmp,
            ..AttachOptions::default()
        })
        .unwrap();
    assert_eq!(vm.vcpu_count(), 2);
    vm.pause().unwrap();
    let hmp = vm.registers_hmp().unwrap();
    let dump = vm.registers_dump().unwrap();
    let merged = vm.registers_merged().unwrap();
    assert_eq!(hmp.len(), 2);
    assert_eq!(dump.len(), 2);
    for (h, d) in hmp.iter().zip(&dump) {
        assert_eq!(h.vcpu, d.vcpu);
        assert_eq!(h.rip, d.rip, "RIP of vCPU {}", h.vcpu);
        assert_eq!(h.cr0, d.cr0, "CR0 of vCPU {}", h.vcpu);
        assert_eq!(h.cr3, d.cr3, "CR3 of vCPU {}", h.vcpu);
        assert_eq!(h.cr4, d.cr4, "CR4 of vCPU {}", h.vcpu);
        assert_eq!(h.gdtr, d.gdtr, "GDTR of vCPU {}", h.vcpu);
        assert_eq!(h.idtr, d.idtr, "IDTR of vCPU {}", h.vcpu);
        assert_eq!(
            (h.rax, h.rbx, h.rcx, h.rdx, h.rsi, h.rdi, h.rsp, h.rbp),
            (d.rax, d.rbx, d.rcx, d.rdx, d.rsi, d.rdi, d.rsp, d.rbp)
        );
        assert_eq!((h.r8, h.r15, h.rflags), (d.r8, d.r15, d.rflags));
        assert_eq!((h.cs, h.ss, h.tr, h.ldtr), (d.cs, d.ss, d.tr, d.ldtr));
        assert_eq!(h.gs.base, d.gs.base);
        // A 64-bit Linux kernel runs with paging and long mode.
        assert!(h.cr0 & 0x8000_0001 == 0x8000_0001);
        assert!(h.cs.long_mode());
        let efer = h.efer.expect("HMP reports EFER");
        assert!(efer & 0x500 == 0x500, "EFER.LME|LMA in {efer:#x}");
        assert_eq!(d.efer, None);
        assert!(d.kernel_gs_base.is_some());
    }
    for (m, h) in merged.iter().zip(&hmp) {
        assert_eq!(m.efer, h.efer);
        assert_eq!(m.cr3, h.cr3);
    }
    // Through the trait.
    assert_eq!(vm.registers(1).unwrap().cr3, hmp[1].cr3);
    match vm.registers(2) {
        Err(kvmaccess_core::Error::NoSuchVcpu { index: 2, count: 2 }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(vm.all_registers().unwrap(), hmp);

    // Timings, for the record (paused guest, all vCPUs per call).
    let time = |f: &dyn Fn()| {
        let mut v: Vec<Duration> = (0..20)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        v.sort();
        v[v.len() / 2]
    };
    let th = time(&|| drop(vm.registers_hmp().unwrap()));
    let td = time(&|| drop(vm.registers_dump().unwrap()));
    eprintln!("register read, median of 20: HMP {th:?}, dump notes {td:?}");
    vm.resume().unwrap();
}

#[test]
fn pause_resume_events_and_generation() {
    // Without -no-reboot, so that system_reset resets instead of ending QEMU.
    let g = launch_with(256, 1, &["-S"], false, |c| c.no_reboot = false);
    let vm = g.attach().unwrap();
    let qmp = vm.qmp();
    assert!(!vm.is_running().unwrap());
    assert_eq!(vm.status().unwrap(), "prelaunch");
    let g0 = vm.generation();

    vm.resume().unwrap();
    let ev = qmp
        .wait_for_event("RESUME", Duration::from_secs(10))
        .unwrap();
    assert_eq!(ev.name, "RESUME");
    assert!(ev.timestamp_us.is_some());
    assert!(vm.is_running().unwrap());
    assert!(vm.generation() > g0);

    vm.pause().unwrap();
    assert!(qmp
        .wait_for_event("STOP", Duration::from_secs(10))
        .is_some());
    assert!(!vm.is_running().unwrap());
    let g1 = vm.generation();

    // Events raised by a command arrive while its reply is awaited; none is lost and the
    // connection stays usable. A system_reset raises RESET, which also bumps the generation.
    qmp.execute("system_reset", Value::Null).unwrap();
    let ev = qmp.wait_for_event("RESET", Duration::from_secs(10));
    assert_eq!(ev.map(|e| e.name).as_deref(), Some("RESET"));
    assert!(vm.generation() > g1);
    // QEMU 7.2 reports a reset of a stopped guest as `prelaunch`; either way it stays stopped.
    assert!(matches!(
        vm.status().unwrap().as_str(),
        "paused" | "prelaunch"
    ));
    assert!(!vm.is_running().unwrap());

    // HMP errors come back as text; QMP errors as class + description.
    match qmp.execute("no-such-command", Value::Null) {
        Err(Error::CommandFailed { class, desc, .. }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("{other:?}"),
    }
    let many: Vec<String> = (0..20).map(|_| qmp.hmp("info status").unwrap()).collect();
    assert!(many.iter().all(|s| s.contains("paused")));
}

#[test]
fn qemu_exit_closes_the_connection() {
    let g = launch(128, 1, &["-S"], false);
    let vm = g.attach().unwrap();
    let qmp = vm.qmp();
    match qmp.execute("quit", Value::Null) {
        Ok(_) | Err(Error::Closed) => {}
        Err(e) => panic!("{e}"),
    }
    let ev = qmp
        .wait_for_event(QmpEvent::CONNECTION_CLOSED, Duration::from_secs(20))
        .expect("a closed-connection event");
    assert!(ev.is_connection_closed());
    assert!(qmp.is_closed());
    let err = vm.status().unwrap_err();
    assert!(matches!(err, Error::Closed));
    assert!(err.to_string().contains("QEMU closed the QMP connection"));
    let err: kvmaccess_core::Error = vm.pause().unwrap_err();
    assert!(
        err.to_string().contains("QEMU closed the QMP connection"),
        "{err}"
    );
    // Earlier events (SHUTDOWN) were kept.
    let names: Vec<String> = qmp.events().into_iter().map(|e| e.name).collect();
    assert!(names.iter().any(|n| n == "SHUTDOWN"), "{names:?}");
}

#[test]
fn four_gib_guest_has_ram_above_the_pci_hole_and_writes_work() {
    // RAM is a sparse tmpfs file: a 4 GiB guest that never runs costs next to nothing.
    let g = launch(4096, 1, &["-S"], false);
    let vm = g.attach().unwrap();
    let layout = vm.ram_layout().to_vec();
    let ranges = vm.ranges().to_vec();
    // At reset, 768 KiB..1 MiB shows the option ROM and BIOS, not RAM.
    assert_eq!(vm.ram_size(), (4 << 30) - 0x40000);
    let high = ranges
        .iter()
        .find(|r| r.start == Gpa(0x1_0000_0000))
        .unwrap_or_else(|| panic!("no range at 4 GiB in {layout:?}"));
    let low_end = ranges
        .iter()
        .filter(|r| r.start.get() < 0x1_0000_0000)
        .map(|r| r.end.get())
        .max()
        .unwrap();
    assert!(
        low_end == 0x8000_0000 || low_end == 0xc000_0000,
        "{layout:?}"
    );
    assert_eq!(high.len(), (4u64 << 30) - low_end);
    // The high range continues the RAM block where the low one stopped.
    let hl = layout.iter().find(|r| r.start == 0x1_0000_0000).unwrap();
    assert_eq!(hl.offset, low_end);
    // The PCI hole is not RAM.
    let mut b = [0u8; 8];
    assert!(vm.read_phys(Gpa(0xe000_0000), &mut b).is_err());
    vm.read_phys(Gpa(0x1_0000_0000), &mut b).unwrap();
    assert_eq!(b, [0; 8]);
    // A read crossing the end of the low range into the hole fails at the hole.
    let mut b2 = [0u8; 16];
    match vm.read_phys(Gpa(low_end - 8), &mut b2) {
        Err(kvmaccess_core::Error::PhysUnmapped { gpa }) => assert_eq!(gpa, Gpa(low_end)),
        other => panic!("{other:?}"),
    }
    drop(vm);

    // Writes, only when enabled: through the shared file, checked through /proc/PID/mem and
    // vice versa.
    let w = g
        .attach_with(AttachOptions {
            allow_write: true,
            ..AttachOptions::default()
        })
        .unwrap();
    assert!(w.writes_allowed());
    let at = 0x1_2345_6000u64;
    w.write_phys(Gpa(at), b"kvmaccess was here").unwrap();
    // Nothing is written when any byte is outside RAM.
    assert!(w.write_phys(Gpa(low_end - 2), &[0xaa; 4]).is_err());
    assert_eq!(read_vec(&w, low_end - 2, 2), [0, 0]);
    drop(w);
    let pw = g
        .attach_with(AttachOptions {
            allow_write: true,
            ram: RamMode::ProcMem,
            ..AttachOptions::default()
        })
        .unwrap();
    assert_eq!(read_vec(&pw, at, 18), b"kvmaccess was here");
    pw.write_phys(Gpa(at + 0x1000), b"and here").unwrap();
    drop(pw);
    let r = g.attach().unwrap();
    assert_eq!(read_vec(&r, at + 0x1000, 8), b"and here");
}

#[test]
fn detached_guest_keeps_running_and_shuts_down_cleanly() {
    let g = launch(128, 1, &["-S"], false);
    let TestGuest { guest, _dir, _slot } = g;
    let state = guest.detach();
    assert!(state.is_alive());
    let again = GuestState::load(&state.run_dir).unwrap();
    assert_eq!(again, state);
    // A second boot into the same directory is refused while the first runs.
    let (kernel, _) = guest_files();
    let err = LaunchConfig::new(kernel, &state.run_dir)
        .launch()
        .unwrap_err();
    assert!(err.to_string().contains("still running"), "{err}");
    state.shutdown(Duration::from_secs(20)).unwrap();
    assert!(!state.is_alive());
    assert!(!state.ram_path.as_ref().is_some_and(|p| p.exists()));
    assert!(GuestState::load(&state.run_dir).is_err());
}

/// A QEMU started by hand (not by our launcher), killed on drop.
struct RawQemu {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
    _slot: Slot,
}

impl Drop for RawQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw_qemu(memory_args: &[&str]) -> RawQemu {
    let slot = Slot::take();
    let dir = tempfile::Builder::new()
        .prefix("kvr")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = dir.path().join("q.sock");
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-nodefaults", "-nographic", "-S", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args(memory_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 must be installed");
    let q = RawQemu {
        child,
        sock,
        _dir: dir,
        _slot: slot,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !q.sock.exists() {
        assert!(
            Instant::now() < deadline,
            "QEMU did not create its QMP socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    q
}

#[test]
fn memfd_ram_is_found_through_proc_fd() {
    let q = raw_qemu(&[
        "-m",
        "128M",
        "-object",
        "memory-backend-memfd,id=mem0,size=128M,share=on",
        "-machine",
        "memory-backend=mem0",
    ]);
    let vm = QemuVm::attach(&q.sock).unwrap();
    match vm.ram_source() {
        RamSource::SharedFile { path } => {
            assert!(
                path.starts_with(format!("/proc/{}/fd", q.child.id())),
                "{path:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(vm.ram_size(), (128 << 20) - 0x40000);
    let mapped = read_vec(&vm, 0, 0xc_0000);
    drop(vm);
    let pm = QemuVm::attach_with(
        &q.sock,
        AttachOptions {
            ram: RamMode::ProcMem,
            ..AttachOptions::default()
        },
    )
    .unwrap();
    assert!(read_vec(&pm, 0, 0xc_0000) == mapped);
}

#[test]
fn private_ram_falls_back_to_proc_mem_with_a_notice() {
    let q = raw_qemu(&["-m", "64M"]);
    let vm = QemuVm::attach(&q.sock).unwrap();
    assert_eq!(vm.ram_source(), RamSource::ProcMem { pid: q.child.id() });
    let notice = vm.notice().expect("a fallback notice");
    assert!(
        notice.contains("/proc/") && notice.contains("CAP_SYS_PTRACE"),
        "{notice}"
    );
    assert!(notice.contains("pc.ram"), "{notice}");
    // At reset, 768 KiB..1 MiB shows the option ROM and BIOS, not RAM.
    assert_eq!(vm.ram_size(), (64 << 20) - 0x40000);
    drop(vm);
    let err = QemuVm::attach_with(
        &q.sock,
        AttachOptions {
            ram: RamMode::SharedOnly,
            ..AttachOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::NoSharedRam { .. }), "{err}");
}

#[test]
fn missing_socket_is_reported_with_its_path() {
    let err = QmpClient::connect("/nonexistent/kvmaccess/qmp.sock").unwrap_err();
    assert!(matches!(err, Error::SocketMissing { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/kvmaccess/qmp.sock") && msg.contains("does not exist"),
        "{msg}"
    );
    let err = QemuVm::attach("/nonexistent/kvmaccess/qmp.sock").unwrap_err();
    assert!(matches!(err, Error::SocketMissing { .. }));
}

#[test]
fn non_qmp_socket_is_reported() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    // A server that says something else.
    let chatty = dir.path().join("chatty.sock");
    let listener = std::os::unix::net::UnixListener::bind(&chatty).unwrap();
    let t = std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    let err = QmpClient::connect(&chatty).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::NotQmp { .. }), "{msg}");
    assert!(
        msg.contains("chatty.sock is not a QMP socket (got:"),
        "{msg}"
    );
    assert!(msg.contains("SSH-2.0"), "{msg}");
    t.join().unwrap();

    // A server that says nothing at all.
    let silent = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let t = std::thread::spawn(move || {
        let (_s, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
    });
    let err = QmpClient::connect_with_timeout(&silent, Duration::from_millis(300)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("is not a QMP socket (got: nothing within"),
        "{msg}"
    );
    t.join().unwrap();

    // A path that exists but where nobody listens.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let err = QmpClient::connect(&stale).unwrap_err();
    assert!(matches!(err, Error::SocketConnect { .. }), "{err}");
    assert!(err.to_string().contains("stale.sock"));
}
