//! Tests that boot the real Debian guest kernel under QEMU (TCG) and check what kvmaccess reads
//! against what the guest itself reports.

mod common;

use common::{hex_bytes, BootedGuest};
use serde_json::Value;

const CR4_LA57: u64 = 1 << 12;

/// A JSON number, or an address printed as a "0x…" string.
fn num(value: &Value) -> u64 {
    match value {
        Value::Number(n) => n.as_u64().expect("unsigned"),
        Value::String(s) => {
            u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex string")
        }
        other => panic!("not a number: {other}"),
    }
}

/// Reads `linux_banner` through the kernel's page tables and compares it with the guest's own
/// /proc/version; checks the paging mode the registers report. `ram` is `boot --ram`: with a
/// memfd there is no RAM file, and every command must find it through QEMU's /proc/PID/fd.
fn banner_through_paging(extra_append: &str, expect_la57: bool, ram: &str) {
    let mut boot = vec!["--smp", "1", "--ram", ram];
    if !extra_append.is_empty() {
        boot.extend_from_slice(&["--append", extra_append]);
    }
    let guest = BootedGuest::boot(&boot);
    let state = guest_state(&guest);
    assert_eq!(state["ram_backend"], ram);
    assert_eq!(state["ram_path"].is_null(), ram == "memfd", "{state}");

    let regs = guest.run(&["--json", "regs"]).ok();
    assert!(
        !regs.stderr.contains("/mem"),
        "guest RAM must be mapped, not read through /proc/PID/mem: {}",
        regs.stderr
    );
    let regs = regs.json();
    let cr4 = num(&regs[0]["cr4"]);
    assert_eq!(cr4 & CR4_LA57 != 0, expect_la57, "CR4 {cr4:#x}");
    let mode = regs[0]["paging_mode"].as_str().expect("mode");
    assert_eq!(mode, if expect_la57 { "level5" } else { "level4" });

    let banner = guest.guest_symbol("linux_banner");
    let banner_hex = format!("{banner:#x}");
    let walk = guest.run(&["--json", "translate", &banner_hex]).ok().json();
    let levels: Vec<&str> = walk["trail"]
        .as_array()
        .expect("trail")
        .iter()
        .map(|s| s["level"].as_str().expect("level"))
        .collect();
    assert_eq!(
        levels.first().copied(),
        Some(if expect_la57 { "PML5" } else { "PML4" })
    );

    let text_walk = guest.run(&["translate", &banner_hex]).ok().stdout;
    assert!(
        text_walk.contains(if expect_la57 { "5-level" } else { "4-level" }),
        "{text_walk}"
    );

    let read = guest
        .run(&["--json", "read", &banner_hex, "128"])
        .ok()
        .json();
    let bytes = hex_bytes(&read);
    let text = String::from_utf8_lossy(&bytes);
    let text = text
        .split('\0')
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_string();
    let version = guest.console("cat /proc/version");
    assert!(text.starts_with("Linux version 6."), "{text:?}");
    assert!(
        version.trim_end().starts_with(&text) || text.starts_with(version.trim_end()),
        "banner read from memory {text:?} differs from the guest's /proc/version {version:?}"
    );
}

/// The state file `boot` wrote for the guest.
fn guest_state(guest: &BootedGuest) -> Value {
    let path = guest.run_root.path().join("default/guest.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("state")).expect("json")
}

#[test]
fn banner_is_read_through_five_level_paging() {
    banner_through_paging("", true, "file");
}

#[test]
fn banner_is_read_through_four_level_paging_from_memfd_ram() {
    banner_through_paging("no5lvl", false, "memfd");
}

/// Registers equal between the live guest and an ELF core taken at the same paused moment; the
/// GDT and IDT decode as Linux sets them up; the core gives the same bytes as the live guest.
#[test]
fn live_registers_tables_and_dump_agree() {
    let guest = BootedGuest::boot(&["--smp", "2"]);
    let page_fault = guest.guest_symbol("asm_exc_page_fault");
    let banner = guest.guest_symbol("linux_banner");
    let banner_hex = format!("{banner:#x}");

    guest.run(&["pause"]).ok();
    let live = guest.run(&["--json", "regs", "--all"]).ok().json();
    let live_via_notes = guest
        .run(&["--json", "--regs-from-dump", "regs", "--all"])
        .ok()
        .json();
    let core = guest.run_root.path().join("guest.core");
    let core_str = core.to_str().expect("utf-8 path");
    guest.run(&["dump", "-o", core_str, "--quiet"]).ok();
    let from_core = guest
        .run(&["--dump", core_str, "--json", "regs", "--all"])
        .ok()
        .json();
    // A second core whose register notes come from QEMU's own dump notes: unlike HMP they hold
    // KERNEL_GS_BASE, so that register is compared between two sources that both have it.
    let notes_core = guest.run_root.path().join("notes.core");
    let notes_core_str = notes_core.to_str().expect("utf-8 path");
    guest
        .run(&["--regs-from-dump", "dump", "-o", notes_core_str, "--quiet"])
        .ok();
    let from_notes_core = guest
        .run(&["--dump", notes_core_str, "--json", "regs", "--all"])
        .ok()
        .json();

    let sources = [
        ("HMP", &live),
        ("ELF core", &from_core),
        ("dump notes over QMP", &live_via_notes),
        ("ELF core of dump-note registers", &from_notes_core),
    ];
    assert_eq!(live.as_array().expect("array").len(), 2, "two vCPUs");
    for (source, other) in &sources[1..] {
        assert_registers_agree(&live, other, source);
    }
    let kgs_compared: usize = sources
        .iter()
        .enumerate()
        .flat_map(|(i, a)| sources[i + 1..].iter().map(move |b| (a, b)))
        .map(|((na, a), (nb, b))| kernel_gs_base_agrees(a, b, &format!("{na} vs {nb}")))
        .sum();
    assert!(
        kgs_compared >= 2,
        "KERNEL_GS_BASE compared only {kgs_compared} times"
    );
    let live = live.as_array().expect("array");

    // The live registers include EFER (from HMP); the core has none, and proves only LMA and
    // LME (from CS.L), which must agree with the live EFER.
    let efer = num(&live[0]["efer"]);
    assert_eq!(efer & 0x500, 0x500, "EFER {efer:#x}: LME and LMA");
    assert!(from_core[0]["efer"].is_null());
    let inferred = &from_core[0]["efer_inferred"];
    assert_eq!(
        (&inferred["lma"], &inferred["lme"]),
        (&true.into(), &true.into())
    );
    assert!(inferred["nxe"].is_null(), "{inferred}");
    assert!(live[0]["efer_inferred"].is_null());
    let core_text = guest.run(&["--dump", core_str, "regs"]).ok().stdout;
    assert!(
        core_text.contains("EFER not recorded; inferred LME LMA")
            && !core_text.contains("EFER unknown"),
        "{core_text}"
    );

    for source in [
        &["--json", "gdt"][..],
        &["--dump", core_str, "--json", "gdt"][..],
    ] {
        let gdt = guest.run(source).ok().json();
        let kernel_cs = gdt
            .as_array()
            .expect("array")
            .iter()
            .find(|e| num(&e["selector"]) == 0x10)
            .expect("a descriptor at selector 0x10 (__KERNEL_CS)");
        assert_eq!(kernel_cs["descriptor"]["kind"], "code");
        assert_eq!(kernel_cs["descriptor"]["dpl"], 0);
        assert_eq!(kernel_cs["descriptor"]["long"], true);
        assert_eq!(kernel_cs["descriptor"]["present"], true);
    }

    for vcpu in ["0", "1"] {
        let idt = guest.run(&["--json", "idt", "--vcpu", vcpu]).ok().json();
        let gates = idt["gates"].as_array().expect("gates");
        assert_eq!(gates.len(), 256);
        assert_eq!(
            num(&gates[14]["offset"]),
            page_fault,
            "vCPU {vcpu}: gate 14 must point at asm_exc_page_fault"
        );
        assert_eq!(gates[14]["kind"], "interrupt");
    }

    let live_bytes = hex_bytes(
        &guest
            .run(&["--json", "read", &banner_hex, "4096"])
            .ok()
            .json(),
    );
    let core_bytes = hex_bytes(
        &guest
            .run(&["--dump", core_str, "--json", "read", &banner_hex, "4096"])
            .ok()
            .json(),
    );
    assert_eq!(
        live_bytes, core_bytes,
        "virtual read from the core differs from the live read"
    );
    let phys = num(&guest.run(&["--json", "translate", &banner_hex]).ok().json()["gpa"]);
    let phys_hex = format!("{phys:#x}");
    let live_phys = hex_bytes(
        &guest
            .run(&["--json", "read", "--phys", &phys_hex, "64"])
            .ok()
            .json(),
    );
    assert_eq!(&live_phys[..], &live_bytes[..64]);

    // A raw copy written with --out is the same bytes.
    let out = guest.run_root.path().join("banner.bin");
    guest
        .run(&[
            "read",
            &banner_hex,
            "4096",
            "--out",
            out.to_str().expect("utf-8"),
        ])
        .ok();
    assert_eq!(std::fs::read(&out).expect("read back"), live_bytes);

    guest.run(&["resume"]).ok();
    let status = guest.run(&["--json", "resume"]).ok().json();
    assert_eq!(status["running"], true);
}

/// Every register `regs --json` prints for both `a` and `b` (lists of vCPUs) is equal: the
/// general registers, RIP, RFLAGS, CR0-4, GDTR/IDTR and all of each segment register's cached
/// state.
fn assert_registers_agree(a: &Value, b: &Value, source: &str) {
    let (a, b) = (a.as_array().expect("array"), b.as_array().expect("array"));
    assert_eq!(a.len(), b.len(), "{source}: vCPU count");
    for (a, b) in a.iter().zip(b) {
        let vcpu = &a["vcpu"];
        for field in [
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15", "rip", "rflags", "cr0", "cr2", "cr3", "cr4",
        ] {
            assert_eq!(
                num(&a[field]),
                num(&b[field]),
                "{source}: vCPU {vcpu} {field}"
            );
        }
        for (register, parts) in [
            ("gdtr", &["base", "limit"][..]),
            ("idtr", &["base", "limit"]),
            ("cs", &["selector", "base", "limit", "flags"]),
            ("ss", &["selector", "base", "limit", "flags"]),
            ("ds", &["selector", "base", "limit", "flags"]),
            ("es", &["selector", "base", "limit", "flags"]),
            ("fs", &["selector", "base", "limit", "flags"]),
            ("gs", &["selector", "base", "limit", "flags"]),
            ("ldtr", &["selector", "base", "limit", "flags"]),
            ("tr", &["selector", "base", "limit", "flags"]),
        ] {
            for part in parts {
                assert_eq!(
                    num(&a[register][part]),
                    num(&b[register][part]),
                    "{source}: vCPU {vcpu} {register}.{part}"
                );
            }
        }
    }
}

/// KERNEL_GS_BASE is equal on every vCPU where both lists have it; returns how many vCPUs that
/// was (HMP does not print it).
fn kernel_gs_base_agrees(a: &Value, b: &Value, sources: &str) -> usize {
    let pairs = a
        .as_array()
        .expect("array")
        .iter()
        .zip(b.as_array().expect("array"));
    let known =
        pairs.filter(|(a, b)| !a["kernel_gs_base"].is_null() && !b["kernel_gs_base"].is_null());
    known
        .map(|(a, b)| {
            assert_eq!(
                num(&a["kernel_gs_base"]),
                num(&b["kernel_gs_base"]),
                "{sources}: vCPU {} KERNEL_GS_BASE",
                a["vcpu"]
            );
        })
        .count()
}

/// A write lands in guest memory and the guest sees it; without --allow-write nothing changes.
#[test]
fn write_needs_consent_and_the_guest_sees_it() {
    let guest = BootedGuest::boot(&["--smp", "1"]);
    assert_eq!(guest.console("hostname").trim(), "kvmaccess-guest");
    // The initial UTS namespace holds the host name the guest's `hostname` prints.
    let uts = guest.guest_symbol("init_uts_ns");
    let bytes = hex_bytes(
        &guest
            .run(&["--json", "read", &format!("{uts:#x}"), "1024"])
            .ok()
            .json(),
    );
    let offset = bytes
        .windows(15)
        .position(|w| w == b"kvmaccess-guest")
        .expect("nodename inside init_uts_ns");
    let nodename = format!("{:#x}", uts + offset as u64);
    let new_name: String = b"kvmaccess-wrote"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    guest
        .run(&["write", &nodename, "--hex", &new_name])
        .user_error("--allow-write");
    assert_eq!(guest.console("hostname").trim(), "kvmaccess-guest");

    let written = guest
        .run(&[
            "--json",
            "write",
            &nodename,
            "--hex",
            &new_name,
            "--allow-write",
        ])
        .ok()
        .json();
    assert_eq!(written["verified"], true);
    assert_eq!(written["written"], 15);
    assert_eq!(guest.console("hostname").trim(), "kvmaccess-wrote");
}

/// Looking at a guest must not make the host allocate the RAM the guest never touched: the
/// VMCOREINFO scan and a full dump skip holes of QEMU's RAM file.
#[test]
fn scanning_and_dumping_do_not_inflate_guest_ram() {
    use std::os::unix::fs::MetadataExt;
    let guest = BootedGuest::boot(&["--smp", "1", "--mem", "1G"]);
    let state = guest_state(&guest);
    let ram = std::path::PathBuf::from(state["ram_path"].as_str().expect("ram_path"));
    let allocated = || std::fs::metadata(&ram).expect("ram file").blocks() * 512;
    let before = allocated();
    guest.run(&["info"]).ok();
    let core = guest.run_root.path().join("sparse.core");
    guest
        .run(&["dump", "-o", core.to_str().expect("utf-8"), "--quiet"])
        .ok();
    let after = allocated();
    assert!(
        after < before + (64 << 20) && after < (1 << 30) / 2,
        "guest RAM file grew from {before} to {after} bytes allocated"
    );
}
