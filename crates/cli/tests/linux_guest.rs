//! The zero-configuration Linux layer through the CLI, on a real guest and on an ELF core of it:
//! every answer is checked against the guest's own view, and the dump must answer like the live
//! guest.

mod common;

use std::collections::BTreeSet;

use common::{hex_bytes, BootedGuest};
use serde_json::Value;

fn num(value: &Value) -> u64 {
    match value {
        Value::Number(n) => n.as_u64().expect("unsigned"),
        Value::String(s) => u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex"),
        other => panic!("not a number: {other}"),
    }
}

/// (pid, ppid, comm) of the guest's processes as its own `ps` shows them.
fn guest_ps(guest: &BootedGuest) -> BTreeSet<(i64, i64, String)> {
    guest
        .console("ps -o pid,ppid,comm")
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.to_string(),
            ))
        })
        .collect()
}

fn our_ps(guest: &BootedGuest, extra: &[&str]) -> BTreeSet<(i64, i64, String)> {
    let mut args = extra.to_vec();
    args.extend_from_slice(&["--json", "ps"]);
    guest
        .run(&args)
        .ok()
        .json()
        .as_array()
        .expect("array")
        .iter()
        .map(|t| {
            (
                t["tgid"].as_i64().expect("tgid"),
                t["ppid"].as_i64().unwrap_or(0),
                t["comm"].as_str().expect("comm").to_string(),
            )
        })
        .collect()
}

fn linux_layer(extra_append: &str) {
    let mut boot = vec!["--smp", "2"];
    if !extra_append.is_empty() {
        boot.extend_from_slice(&["--append", extra_append]);
    }
    let guest = BootedGuest::boot(&boot);

    // info: release and KASLR offset as the guest sees them.
    let info = guest.run(&["--json", "info"]).ok().json();
    assert_eq!(
        info["release"].as_str(),
        Some(guest.console("uname -r").trim())
    );
    let text = guest.guest_symbol("_text");
    assert_eq!(num(&info["kaslr_offset"]), text - 0xffff_ffff_8100_0000);
    assert!(info["btf_types"].as_u64().unwrap_or(0) > 10_000, "{info}");
    assert!(
        info["types_origin"]
            .as_str()
            .is_some_and(|o| o.starts_with("the kernel BTF at 0x")),
        "{info}"
    );

    // A marker process whose argv we read through its own page tables, and a kernel log line.
    let marker = "KVMA_USER_MARKER_5f3a9c";
    let pid: i64 = guest
        .console(&format!("sh -c 'sleep 1000; true' {marker} & echo $!"))
        .trim()
        .parse()
        .expect("pid");
    guest.console("echo '<6>kvma-cli-dmesg-line-77' > /dev/kmsg");
    let stat = guest.console(&format!("cut -d' ' -f48,49 /proc/{pid}/stat"));
    let arg_start: u64 = stat
        .split_whitespace()
        .next()
        .expect("arg_start")
        .parse()
        .expect("number");
    let argv = hex_bytes(
        &guest
            .run(&[
                "--json",
                "read",
                "--pid",
                &pid.to_string(),
                &format!("{arg_start:#x}"),
                "64",
            ])
            .ok()
            .json(),
    );
    assert!(
        String::from_utf8_lossy(&argv).contains(marker),
        "argv of {pid} read through its page tables: {:?}",
        String::from_utf8_lossy(&argv)
    );
    // A PID that does not exist is a clear error.
    guest
        .run(&["read", "--pid", "999999", "0x400000", "4"])
        .user_error("999999");

    // ps matches the guest's own ps (minus the processes the console command itself started,
    // and kworkers that come and go). busybox ps shows a kworker's workqueue after its name,
    // so names compare as prefixes.
    let theirs = guest_ps(&guest);
    let ours = our_ps(&guest, &[]);
    let ignorable = |p: &(i64, i64, String)| {
        p.2 == "ps" || (p.2 == "sh" && p.0 > pid) || p.2.starts_with("kworker/")
    };
    type ByPid = std::collections::BTreeMap<i64, (i64, String)>;
    let by_pid = |set: &BTreeSet<(i64, i64, String)>| -> ByPid {
        set.iter()
            .filter(|p| !ignorable(p))
            .map(|p| (p.0, (p.1, p.2.clone())))
            .collect()
    };
    let (their_map, our_map) = (by_pid(&theirs), by_pid(&ours));
    assert_eq!(
        their_map.keys().collect::<Vec<_>>(),
        our_map.keys().collect::<Vec<_>>(),
        "the same processes"
    );
    for (p, (ppid, comm)) in &our_map {
        let (their_ppid, their_comm) = &their_map[p];
        assert_eq!(ppid, their_ppid, "ppid of {p}");
        assert!(
            their_comm.starts_with(comm.as_str()) || comm.starts_with(their_comm.as_str()),
            "comm of {p}: ours {comm:?}, theirs {their_comm:?}"
        );
    }
    assert!(
        ours.iter().any(|p| p.0 == pid && p.2 == "sh"),
        "the marker process"
    );
    assert_eq!(our_ps(&guest, &[]), {
        let mut via_pid_table = BTreeSet::new();
        for t in guest
            .run(&["--json", "ps", "--pid-table"])
            .ok()
            .json()
            .as_array()
            .expect("array")
        {
            via_pid_table.insert((
                t["tgid"].as_i64().expect("tgid"),
                t["ppid"].as_i64().unwrap_or(0),
                t["comm"].as_str().expect("comm").to_string(),
            ));
        }
        via_pid_table
    });

    // lsmod matches /proc/modules; module symbols match /proc/kallsyms.
    let proc_modules = guest.console("cat /proc/modules");
    let lsmod = guest.run(&["--json", "lsmod"]).ok().json();
    let ours: BTreeSet<(String, u64, u64)> = lsmod
        .as_array()
        .expect("array")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().expect("name").to_string(),
                m["size"].as_u64().expect("size"),
                num(&m["base"]),
            )
        })
        .collect();
    let theirs: BTreeSet<(String, u64, u64)> = proc_modules
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.to_string(),
                f.get(1)?.parse().ok()?,
                u64::from_str_radix(f.get(5)?.trim_start_matches("0x"), 16).ok()?,
            ))
        })
        .collect();
    assert_eq!(ours, theirs);
    // The module address tree holds the same modules, in address order.
    let tree = guest.run(&["--json", "lsmod", "--tree"]).ok().json();
    let bases: Vec<u64> = tree
        .as_array()
        .expect("array")
        .iter()
        .map(|m| num(&m["base"]))
        .collect();
    assert!(bases.windows(2).all(|w| w[0] < w[1]), "{tree}");
    let names = |set: &BTreeSet<(String, u64, u64)>| {
        set.iter().map(|(n, ..)| n.clone()).collect::<BTreeSet<_>>()
    };
    let in_tree: BTreeSet<String> = tree
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(in_tree, names(&theirs));
    let module_syms = guest.console("grep '\\[qemu_fw_cfg\\]' /proc/kallsyms | sort");
    let ours = guest
        .run(&["symbols", "--module", "qemu_fw_cfg"])
        .ok()
        .stdout;
    let norm = |text: &str| -> BTreeSet<String> {
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert!(!norm(&module_syms).is_empty());
    assert_eq!(norm(&ours), norm(&module_syms));

    // dmesg has the line, at level 6.
    let log = guest.run(&["--json", "dmesg"]).ok().json();
    let line = log["records"]
        .as_array()
        .expect("records")
        .iter()
        .find(|r| r["text"] == "kvma-cli-dmesg-line-77")
        .expect("our /dev/kmsg line in the kernel log");
    assert_eq!(line["level"], 6);

    // Syscalls: all entries point at the kernel's own wrappers, at the guest's addresses.
    let syscalls = guest.run(&["--json", "syscalls"]).ok().json();
    let x64 = &syscalls["tables"][0];
    assert_eq!(x64["symbol"], "sys_call_table");
    let entries = x64["entries"].as_array().expect("entries");
    assert!(entries.len() > 400);
    assert!(
        entries.iter().all(|e| e["expected"] == true),
        "clean guest: every entry expected"
    );
    for (nr, name) in [
        (0, "read"),
        (1, "write"),
        (59, "execve"),
        (60, "exit"),
        (231, "exit_group"),
    ] {
        assert_eq!(entries[nr]["name"], name);
        assert_eq!(
            num(&entries[nr]["address"]),
            guest.guest_symbol(&format!("__x64_sys_{name}"))
        );
    }

    // IDT handlers resolve to kernel symbols, gate 14 to asm_exc_page_fault.
    let idt = guest.run(&["--json", "idt"]).ok().json();
    assert_eq!(idt["gates"][14]["handler"], "asm_exc_page_fault");
    assert_eq!(idt["gates"][14]["owner"], "kernel entry-text");
    assert!(idt["idtr_check"]
        .as_str()
        .expect("check")
        .contains("alias of idt_table"));

    // The same answers from an ELF core of the paused guest.
    guest.run(&["pause"]).ok();
    let live_ps = guest.run(&["--json", "ps"]).ok().stdout;
    let live_lsmod = guest.run(&["--json", "lsmod"]).ok().stdout;
    let live_syscalls = guest.run(&["--json", "syscalls"]).ok().stdout;
    let live_symbols = guest.run(&["symbols"]).ok().stdout;
    let live_dmesg = guest.run(&["dmesg"]).ok().stdout;
    let core = guest.run_root.path().join("linux.core");
    let core = core.to_str().expect("utf-8");
    guest.run(&["dump", "-o", core, "--quiet"]).ok();
    guest.run(&["resume"]).ok();
    assert_eq!(
        guest.run(&["--dump", core, "--json", "ps"]).ok().stdout,
        live_ps
    );
    assert_eq!(
        guest.run(&["--dump", core, "--json", "lsmod"]).ok().stdout,
        live_lsmod
    );
    assert_eq!(
        guest
            .run(&["--dump", core, "--json", "syscalls"])
            .ok()
            .stdout,
        live_syscalls
    );
    assert_eq!(
        guest.run(&["--dump", core, "symbols"]).ok().stdout,
        live_symbols
    );
    assert_eq!(
        guest.run(&["--dump", core, "dmesg"]).ok().stdout,
        live_dmesg
    );
    let core_info = guest.run(&["--dump", core, "--json", "info"]).ok().json();
    assert_eq!(core_info["kaslr_offset"], info["kaslr_offset"]);
    assert_eq!(core_info["build_id"], info["build_id"]);
}

#[test]
fn linux_layer_five_level() {
    linux_layer("");
}

#[test]
fn linux_layer_four_level() {
    linux_layer("no5lvl");
}
