//! Bad input from users gets one clear error line and exit code 2, never a panic, and never
//! touches what the user owns.

mod common;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::kvmaccess;
use kvmaccess_core::{Gpa, Gva, Registers, Segment};
use kvmaccess_testkit::{MapFlags, MockMemory, PageSize, PageTableBuilder, TableFormat};

/// Writes a small ELF core: 4 MiB of RAM, 4-level page tables mapping one kernel page with a
/// marker, and one vCPU whose CR3 points at them.
fn small_core(path: &Path) -> u64 {
    let mem = MockMemory::new(4 << 20);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4).expect("tables");
    let gva = 0xffff_ffff_8100_0000u64;
    tables
        .map(
            Gva(gva),
            Gpa(0x20_0000),
            PageSize::Size4K,
            MapFlags::KERNEL_RO,
        )
        .expect("map");
    mem.write_bytes(Gpa(0x20_0000), b"kvmaccess test page")
        .expect("write");
    let registers = Registers {
        cr0: 0x8005_0033,
        cr3: tables.cr3(),
        cr4: 0x20,
        cs: Segment {
            selector: 0x10,
            flags: 0x20_9b00,
            ..Segment::default()
        },
        rip: gva,
        ..Registers::default()
    };
    kvmaccess_dump::write_elf_core_to_path(path, false, &mem, &[registers], None, &mut |_, _| {})
        .expect("write core");
    gva
}

fn temp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kve")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

#[test]
fn a_dump_with_registers_reads_and_translates_offline() {
    let dir = temp();
    let core = dir.path().join("small.core");
    let gva = small_core(&core);
    let core = core.to_str().expect("utf-8");
    let out = kvmaccess(
        dir.path(),
        &["--dump", core, "read", &format!("{gva:#x}"), "19"],
    )
    .ok();
    assert!(
        out.stdout.contains("|kvmaccess test p|") && out.stdout.contains("|age|"),
        "{}",
        out.stdout
    );
}

#[test]
fn missing_socket_names_the_path() {
    let dir = temp();
    let sock = dir.path().join("nothing.sock");
    kvmaccess(
        dir.path(),
        &["--qmp", sock.to_str().expect("utf-8"), "regs"],
    )
    .user_error(sock.to_str().expect("utf-8"));
}

#[test]
fn a_socket_that_is_not_qmp_is_named_as_such() {
    let dir = temp();
    let sock = dir.path().join("chatty.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let server = std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.write_all(b"220 smtp.example ESMTP ready\r\n");
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    kvmaccess(
        dir.path(),
        &["--qmp", sock.to_str().expect("utf-8"), "regs"],
    )
    .user_error("not a QMP socket");
    server.join().expect("server thread");
}

#[test]
fn a_missing_dump_names_the_path() {
    let dir = temp();
    kvmaccess(dir.path(), &["--dump", "/nonexistent/guest.core", "regs"])
        .user_error("/nonexistent/guest.core");
}

#[test]
fn a_truncated_dump_says_so() {
    let dir = temp();
    let core = dir.path().join("cut.core");
    small_core(&core);
    let full = std::fs::read(&core).expect("read");
    std::fs::write(&core, &full[..full.len() - 4096]).expect("truncate");
    kvmaccess(
        dir.path(),
        &["--dump", core.to_str().expect("utf-8"), "regs"],
    )
    .user_error("truncated");
}

#[test]
fn an_unmapped_address_names_the_level_that_failed() {
    let dir = temp();
    let core = dir.path().join("small.core");
    small_core(&core);
    let core = core.to_str().expect("utf-8");
    // Same PML4 slot as the mapped page, but a PDPT entry that was never filled.
    let run = kvmaccess(
        dir.path(),
        &["--dump", core, "translate", "0xffffffff00000000"],
    );
    run.user_error("PDPT entry");
    assert!(run.stderr.contains("not present"), "{}", run.stderr);
    // A different PML4 slot fails one level higher.
    kvmaccess(dir.path(), &["--dump", core, "read", "0x1000", "4"]).user_error("PML4 entry");
    // A non-canonical address is refused before any table is read.
    kvmaccess(
        dir.path(),
        &["--dump", core, "translate", "0x0000900000000000"],
    )
    .user_error("canonical");
}

#[test]
fn a_raw_file_needs_its_base() {
    let dir = temp();
    let raw = dir.path().join("memory.bin");
    std::fs::write(&raw, vec![0u8; 8192]).expect("write");
    let raw = raw.to_str().expect("utf-8");
    kvmaccess(dir.path(), &["--dump", raw, "read", "--phys", "0", "16"]).user_error("--raw-base");
    let ok = kvmaccess(
        dir.path(),
        &[
            "--dump",
            raw,
            "--raw-base",
            "0x1000",
            "read",
            "--phys",
            "0x1000",
            "16",
        ],
    )
    .ok();
    assert!(
        ok.stdout.starts_with("0000000000001000  00 00"),
        "{}",
        ok.stdout
    );
    kvmaccess(
        dir.path(),
        &[
            "--dump",
            raw,
            "--raw-base",
            "0x1000",
            "read",
            "--phys",
            "0",
            "16",
        ],
    )
    .user_error("0x0");
    // A raw dump has no registers: virtual reads need --cr3 and --paging.
    kvmaccess(
        dir.path(),
        &[
            "--dump",
            raw,
            "--raw-base",
            "0",
            "read",
            "0xffffffff81000000",
            "4",
        ],
    )
    .user_error("--cr3");
}

#[test]
fn dumps_cannot_be_paused_or_written() {
    let dir = temp();
    let core = dir.path().join("small.core");
    let gva = small_core(&core);
    let core = core.to_str().expect("utf-8");
    kvmaccess(dir.path(), &["--dump", core, "pause"]).user_error("only a live guest");
    kvmaccess(
        dir.path(),
        &[
            "--dump",
            core,
            "write",
            &format!("{gva:#x}"),
            "--hex",
            "90",
            "--allow-write",
        ],
    )
    .user_error("is a dump");
    let before = std::fs::read(core).expect("read");
    kvmaccess(
        dir.path(),
        &["--dump", core, "write", &format!("{gva:#x}"), "--hex", "90"],
    )
    .user_error("--allow-write");
    assert_eq!(
        std::fs::read(core).expect("read"),
        before,
        "the dump must not change"
    );
}

#[test]
fn existing_files_are_not_replaced_without_force() {
    let dir = temp();
    let core = dir.path().join("small.core");
    let gva = small_core(&core);
    let core = core.to_str().expect("utf-8");
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, b"user data").expect("write");
    let precious_str = precious.to_str().expect("utf-8");
    kvmaccess(
        dir.path(),
        &[
            "--dump",
            core,
            "read",
            &format!("{gva:#x}"),
            "16",
            "--out",
            precious_str,
        ],
    )
    .user_error("already exists");
    kvmaccess(dir.path(), &["--dump", core, "dump", "-o", precious_str])
        .user_error("already exists");
    assert_eq!(std::fs::read(&precious).expect("read"), b"user data");
    kvmaccess(
        dir.path(),
        &[
            "--dump",
            core,
            "read",
            &format!("{gva:#x}"),
            "16",
            "--out",
            precious_str,
            "--force",
        ],
    )
    .ok();
    assert_eq!(std::fs::read(&precious).expect("read"), b"kvmaccess test p");
}

#[test]
fn no_target_explains_the_three_choices() {
    let dir = temp();
    kvmaccess(dir.path(), &["regs"]).user_error("--qmp SOCKET or --dump FILE");
    kvmaccess(dir.path(), &["--guest", "other", "gdt"]).user_error("kvmaccess boot");
}

#[test]
fn bad_numbers_and_huge_reads_are_refused_cleanly() {
    let dir = temp();
    let core = dir.path().join("small.core");
    small_core(&core);
    let core = core.to_str().expect("utf-8");
    kvmaccess(dir.path(), &["--dump", core, "read", "--phys", "0", "8G"])
        .user_error("kvmaccess dump");
    let bad = kvmaccess(dir.path(), &["--dump", core, "read", "0xzz", "4"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("0xzz"), "{}", bad.stderr);
    assert!(!bad.stderr.contains("panicked"), "{}", bad.stderr);
}

/// A QEMU whose RAM is private: kvmaccess says it reads /proc/PID/mem and what that needs, and
/// the read still works (the tests run as root).
#[test]
fn qemu_without_shared_ram_falls_back_to_proc_mem_with_a_notice() {
    let dir = temp();
    let sock = dir.path().join("qmp.sock");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _qemu = Kill(
        Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "64",
                "-nodefaults",
                "-nographic",
                "-S",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 must be installed (make deps)"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = kvmaccess(
        dir.path(),
        &[
            "--qmp",
            sock.to_str().expect("utf-8"),
            "read",
            "--phys",
            "0x1000",
            "16",
        ],
    )
    .ok();
    assert!(run.stderr.contains("/proc/"), "{}", run.stderr);
    assert!(run.stderr.contains("root or ptrace"), "{}", run.stderr);
    assert!(run.stdout.starts_with("0000000000001000"), "{}", run.stdout);
}

/// A LiME file built by hand from the format (not with kvmaccess-dump's encoder, so a mistake
/// shared by encoder and reader cannot hide): per range, a 32-byte header (magic "EMiL" =
/// 0x4C694D45 little-endian, version 1, start, inclusive end, 8 reserved bytes), then the bytes.
fn lime_file(ranges: &[(u64, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(start, bytes) in ranges {
        let end = start + bytes.len() as u64 - 1;
        out.extend_from_slice(&0x4C69_4D45u32.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&end.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(bytes);
    }
    out
}

/// `read --phys --json` of a dump: the bytes.
fn read_phys(dir: &Path, dump: &str, address: &str, len: &str) -> Vec<u8> {
    let run = kvmaccess(
        dir,
        &["--dump", dump, "--json", "read", "--phys", address, len],
    );
    common::hex_bytes(&run.ok().json())
}

#[test]
fn lime_ranges_read_through_the_cli_and_the_gap_is_an_error() {
    let dir = temp();
    let low: Vec<u8> = (0..0x1000u32).map(|i| (i % 251) as u8).collect();
    let high: Vec<u8> = (0..0x2000u32).map(|i| (i % 241) as u8 ^ 0xa5).collect();
    let path = dir.path().join("guest.lime");
    std::fs::write(&path, lime_file(&[(0x1000, &low), (0x10_0000, &high)])).expect("write");
    let lime = path.to_str().expect("utf-8");

    assert_eq!(read_phys(dir.path(), lime, "0x1000", "16"), low[..16]);
    assert_eq!(read_phys(dir.path(), lime, "0x1ff0", "16"), low[0xff0..]);
    assert_eq!(
        read_phys(dir.path(), lime, "0x100ff8", "16"),
        high[0xff8..0x1008]
    );
    let text = kvmaccess(
        dir.path(),
        &["--dump", lime, "read", "--phys", "0x101ff0", "16"],
    )
    .ok();
    let hex: Vec<String> = high[0x1ff0..].iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        text.stdout
            .starts_with(&format!("0000000000101ff0  {}", hex[..8].join(" "))),
        "{}",
        text.stdout
    );

    // Inside the gap, and running off the end of the first range into it: the first address
    // the dump does not hold is named.
    kvmaccess(
        dir.path(),
        &["--dump", lime, "read", "--phys", "0x8000", "16"],
    )
    .user_error("0x8000");
    kvmaccess(
        dir.path(),
        &["--dump", lime, "read", "--phys", "0x1ff8", "16"],
    )
    .user_error("0x2000");
}

#[test]
fn a_truncated_lime_file_says_so() {
    let dir = temp();
    let data = [0x42u8; 0x1000];
    let whole = lime_file(&[(0, &data), (0x10_0000, &data)]);
    let path = dir.path().join("cut.lime");
    let lime = path.to_str().expect("utf-8");
    // Cut inside the second range's bytes, then inside its header.
    for cut in [whole.len() - 100, 32 + 0x1000 + 20] {
        std::fs::write(&path, &whole[..cut]).expect("write");
        kvmaccess(dir.path(), &["--dump", lime, "read", "--phys", "0", "16"])
            .user_error("truncated");
    }
}
