//! Every detection claim of the integrity monitor, against real attacks: the test-only rootkit
//! module `kvma_attack` tampers with the kernel of a real guest (TCG, 2 vCPUs) while
//! `kvmaccess watch` runs, and the right finding, with the right attribution, must be logged
//! within two watch intervals of the attack completing. The reactions (`restore`, `pause`,
//! `dump=DIR`, `exec=CMD`) are checked on the attacks they apply to.

mod common;

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use common::{now_ms, rfc3339_ms, BootedGuest, Watch};
use serde_json::Value;

/// One guest at a time: the machine has two cores.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn one_guest() -> std::sync::MutexGuard<'static, ()> {
    ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner())
}

/// The watch interval of every test here, in milliseconds (`--interval 1s`).
const INTERVAL_MS: i64 = 1000;
/// How long to wait for a line that should come within two intervals; a miss fails on the
/// timing assertion with the late line's time rather than on this timeout.
const WAIT: Duration = Duration::from_secs(30);

const KO: &str = "/lib/modules/kvma_attack.ko";

fn num(value: &Value) -> u64 {
    match value {
        Value::Number(n) => n.as_u64().expect("unsigned"),
        Value::String(s) => u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex"),
        other => panic!("not a number: {other}"),
    }
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

fn is_finding(line: &Value) -> bool {
    line["event"] == "finding"
}

/// Runs the attack command in the guest and waits for the watch's finding that `pred` accepts;
/// it must be new (not logged before the attack) and come from a pass that started within two
/// intervals of the attack command returning.
fn attack_and_expect(
    guest: &BootedGuest,
    watch: &mut Watch,
    command: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> (usize, Value) {
    let logged_before = watch.lines().len();
    assert!(
        !watch.lines().iter().any(|l| is_finding(l) && pred(l)),
        "{what} logged before the attack\n{}",
        watch.transcript()
    );
    guest.console(command);
    let done = now_ms();
    let (index, finding) = watch.wait_for(what, WAIT, |l| is_finding(l) && pred(l));
    assert!(index >= logged_before, "{what} logged before the attack");
    eprintln!("{what}: {finding}");
    let at = rfc3339_ms(text(&finding["time"]));
    assert!(
        at <= done + 2 * INTERVAL_MS,
        "{what} came from a pass {} ms after the attack completed (interval {INTERVAL_MS} ms)\n{}",
        at - done,
        watch.transcript()
    );
    (index, finding)
}

/// Asserts that every finding the watch logged is one of the expected ones: attribution must
/// be unambiguous, nothing else may alarm.
fn only_findings(watch: &Watch, what: &str, expected: impl Fn(&Value) -> bool) {
    for line in watch.lines().iter().filter(|l| is_finding(l)) {
        assert!(
            expected(line),
            "unexpected finding during the {what} attack: {line}\n{}",
            watch.transcript()
        );
    }
}

/// `check` against the baseline: no alarm (exit 0, no non-informational finding).
fn assert_clean(guest: &BootedGuest, baseline: &Path, extra: &[&str], when: &str) {
    let mut args = vec!["--no-info"];
    args.extend_from_slice(extra);
    let (code, findings) = guest.check_findings(baseline, &args);
    assert!(
        code == 0 && findings.is_empty(),
        "{when}: check should be clean, got exit {code}: {findings:#?}"
    );
}

fn assert_guest_works(guest: &BootedGuest) {
    assert_eq!(guest.console("echo ok").trim(), "ok");
    // getppid (ash's $PPID) agrees with the parent the kernel shows in /proc.
    let out = guest.console("sh -c 'echo $PPID $(cut -d\" \" -f4 /proc/$$/stat)'");
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert!(
        fields.len() == 2 && fields[0] == fields[1],
        "getppid disagrees with /proc: {out:?}"
    );
}

fn assert_severity(finding: &Value, allowed: &[&str]) {
    assert!(
        allowed.contains(&text(&finding["severity"])),
        "severity should be one of {allowed:?}: {finding}"
    );
}

/// `jiffies_64` twice, 600 ms apart: whether the guest's clock advanced.
fn guest_clock_advances(guest: &BootedGuest, jiffies: u64) -> bool {
    let read = || {
        let value = guest
            .run(&["--json", "read", &format!("{jiffies:#x}"), "8"])
            .ok()
            .json();
        let bytes = common::hex_bytes(&value);
        u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
    };
    let first = read();
    std::thread::sleep(Duration::from_millis(600));
    read() != first
}

/// sys_call_table, IDT and GDT hooks, each found, attributed, restored by the watch and checked
/// clean before the next; `exec=CMD` on the syscall hook, `dump=DIR` and `pause` on the IDT hook.
#[test]
fn table_hooks_are_found_attributed_and_restored() {
    let _one = one_guest();
    let guest = BootedGuest::boot(&["--smp", "2"]);
    let base = guest.baseline("base.json");
    assert_clean(&guest, &base, &[], "freshly booted guest");

    // --- sys_call_table[110] (getppid) -> kvma_sct_getppid; restore and exec ---------------
    let exec_out = guest.path("exec.jsonl");
    let exec = format!("exec=cat >> {}", exec_out.display());
    let mut watch = guest.watch(
        &base,
        "syscall.log",
        &[
            "--interval",
            "1s",
            "--no-info",
            "--on-finding",
            &exec,
            "--on-finding",
            "restore",
            "--allow-write",
        ],
    );
    let (at, finding) = attack_and_expect(
        &guest,
        &mut watch,
        &format!("insmod {KO} attack=syscall"),
        "the sys_call_table finding",
        |l| l["check"] == "syscalls",
    );
    let hook = guest.guest_module_symbol("kvma_attack", "kvma_sct_getppid");
    assert_eq!(finding["object"], "sys_call_table", "{finding}");
    assert!(
        text(&finding["entry"]).contains("110") && text(&finding["entry"]).contains("getppid"),
        "{finding}"
    );
    assert_severity(&finding, &["high", "critical"]);
    let owner = text(&finding["owner"]);
    assert!(
        owner.contains("module kvma_attack") && owner.contains("kvma_sct_getppid"),
        "owner should name the module and its function: {finding}"
    );
    assert!(
        text(&finding["actual"]).contains(&format!("{hook:#x}")),
        "actual should hold the hook's address {hook:#x}: {finding}"
    );
    assert_eq!(finding["target"]["number"], 110, "{finding}");
    let (restored, line) = watch.wait_for("the sys_call_table restore", WAIT, |l| {
        l["event"] == "restored" && text(&l["detail"]).contains("sys_call_table[110]")
    });
    assert!(restored > at, "restored before the finding: {line}");
    watch.wait_for("the exec of the finding", WAIT, |l| l["event"] == "exec");
    let executed: Vec<Value> = std::fs::read_to_string(&exec_out)
        .expect("exec=CMD wrote the finding")
        .lines()
        .map(|l| serde_json::from_str(l).expect("the finding as JSON on stdin"))
        .collect();
    let mut logged = finding.clone();
    logged.as_object_mut().expect("object").remove("event");
    assert!(
        executed.contains(&logged),
        "exec=CMD should get the finding on stdin: {executed:#?}\nvs {logged}"
    );
    let lines = watch.stop();
    // The text check may see the same pointer in rodata; nothing else may alarm.
    only_findings(&watch, "syscall", |l| {
        (l["check"] == "syscalls" && l["entry"] == finding["entry"])
            || (l["check"] == "text" && text(&l["entry"]).starts_with("sys_call_table+"))
    });
    assert!(
        !lines.iter().any(|l| l["event"] == "restore-impossible"),
        "{lines:#?}"
    );
    // Restored by the watch, not by the module (still loaded): the next check is clean.
    assert!(
        guest
            .console("grep -c '^kvma_attack ' /proc/modules")
            .trim()
            == "1"
    );
    assert_clean(
        &guest,
        &base,
        &[],
        "after the watch restored sys_call_table",
    );
    assert_guest_works(&guest);
    guest.console("rmmod kvma_attack");
    assert_clean(&guest, &base, &[], "after rmmod (syscall)");

    // --- idt_table[0xf5] -> kvma_idt_stub; dump, pause, restore ----------------------------
    let jiffies = guest.guest_symbol("jiffies_64");
    assert!(
        guest_clock_advances(&guest, jiffies),
        "the guest's clock stands"
    );
    let dumps = guest.path("dumps");
    let dump = format!("dump={}", dumps.display());
    let mut watch = guest.watch(
        &base,
        "idt.log",
        &[
            "--interval",
            "1s",
            "--no-info",
            "--on-finding",
            &dump,
            "--on-finding",
            "pause",
            "--on-finding",
            "restore",
            "--allow-write",
        ],
    );
    let (at, finding) = attack_and_expect(
        &guest,
        &mut watch,
        &format!("insmod {KO} attack=idt"),
        "the IDT finding",
        |l| l["check"] == "idt",
    );
    let (dumped, dump_line) = watch.wait_for("the dump", WAIT, |l| l["event"] == "dumped");
    let (paused, _) = watch.wait_for("the pause", WAIT, |l| l["event"] == "guest-paused-by-watch");
    let (restored, _) = watch.wait_for("the IDT restore", WAIT, |l| {
        l["event"] == "restored" && text(&l["detail"]).contains("0xf5")
    });
    assert!(at < dumped && dumped < paused && paused < restored);
    // QEMU reports the stop to the watch, and the guest's clock stands still.
    watch.wait_for("QEMU's STOP event", WAIT, |l| l["event"] == "guest-paused");
    // QEMU serves one QMP client at a time: the watch ends before other commands run.
    watch.stop();
    assert!(
        !guest_clock_advances(&guest, jiffies),
        "the guest runs after --on-finding pause"
    );
    assert_eq!(finding["entry"], "vector 0xf5", "{finding}");
    assert_eq!(finding["class"], "handler-moved", "{finding}");
    assert_severity(&finding, &["critical"]);
    let owner = text(&finding["owner"]);
    assert!(
        owner.contains("module kvma_attack") && owner.contains("kvma_idt_stub"),
        "{finding}"
    );
    let expected_handler = text(&finding["expected"]).to_string();
    only_findings(&watch, "idt", |l| {
        l["check"] == "idt" && l["entry"] == "vector 0xf5"
    });
    // The core was taken before the restore: it shows the hooked gate.
    let core = text(&dump_line["detail"]).to_string();
    assert!(
        core.starts_with(dumps.to_str().expect("utf-8")) && Path::new(&core).is_file(),
        "{dump_line}"
    );
    let from_core = guest.run(&["--dump", &core, "--json", "idt"]).ok().json();
    let core_gate = from_core["gates"][0xf5].clone();
    assert!(
        text(&core_gate["owner"]).contains("kvma_attack"),
        "core: {core_gate}"
    );
    // The live gate is back (the guest is still paused), then the guest runs on.
    let live = guest.run(&["--json", "idt"]).ok().json();
    assert_eq!(live["gates"][0xf5]["handler"], expected_handler.as_str());
    assert_clean(&guest, &base, &[], "after the watch restored the IDT");
    assert_eq!(
        guest.run(&["--json", "resume"]).ok().json()["running"],
        true
    );
    assert!(
        guest_clock_advances(&guest, jiffies),
        "the guest did not resume"
    );
    // The hooked handler, in the finding and in the core, is the module's stub.
    let stub = guest.guest_module_symbol("kvma_attack", "kvma_idt_stub");
    assert!(
        text(&finding["actual"]).contains(&format!("{stub:#x}")),
        "{finding}"
    );
    assert_eq!(num(&core_gate["offset"]), stub, "core: {core_gate}");
    assert_guest_works(&guest);
    guest.console("rmmod kvma_attack");
    assert_clean(&guest, &base, &[], "after rmmod (idt)");

    // --- GDT slots 10-11 (selector 0x50): a DPL-3 call gate on every vCPU; restore ----------
    let mut watch = guest.watch(
        &base,
        "gdt.log",
        &[
            "--interval",
            "1s",
            "--no-info",
            "--on-finding",
            "restore",
            "--allow-write",
        ],
    );
    attack_and_expect(
        &guest,
        &mut watch,
        &format!("insmod {KO} attack=gdt"),
        "the GDT finding",
        |l| l["check"] == "gdt",
    );
    let gate = guest.guest_module_symbol("kvma_attack", "kvma_gate_stub");
    for vcpu in [0u64, 1] {
        let (_, finding) = watch.wait_for(&format!("the call gate of vCPU {vcpu}"), WAIT, |l| {
            is_finding(l) && l["check"] == "gdt" && l["vcpu"] == vcpu
        });
        assert!(text(&finding["entry"]).contains("0x0050"), "{finding}");
        assert_eq!(finding["class"], "call-gate", "{finding}");
        assert_severity(&finding, &["critical"]);
        assert!(
            text(&finding["actual"]).contains("call gate DPL3")
                && text(&finding["actual"]).contains(&format!("{gate:#x}")),
            "{finding}"
        );
        let owner = text(&finding["owner"]);
        assert!(
            owner.contains("module kvma_attack") && owner.contains("kvma_gate_stub"),
            "{finding}"
        );
        assert_eq!(finding["target"]["index"], 10, "{finding}");
        watch.wait_for(&format!("the GDT restore of vCPU {vcpu}"), WAIT, |l| {
            l["event"] == "restored"
                && text(&l["detail"]).contains("0x0050")
                && text(&l["detail"]).contains(&format!("vCPU {vcpu}"))
        });
    }
    watch.stop();
    only_findings(&watch, "gdt", |l| {
        l["check"] == "gdt" && text(&l["entry"]).contains("0x0050")
    });
    assert_clean(&guest, &base, &[], "after the watch restored the GDTs");
    for vcpu in ["0", "1"] {
        let gdt = guest.run(&["--json", "gdt", "--vcpu", vcpu]).ok().json();
        let slot = gdt
            .as_array()
            .expect("array")
            .iter()
            .find(|e| num(&e["selector"]) == 0x50)
            .cloned()
            .unwrap_or(Value::Null);
        assert!(
            slot.is_null() || slot["descriptor"]["kind"] == "null",
            "vCPU {vcpu}: selector 0x50 should be empty again: {slot}"
        );
    }
    assert_guest_works(&guest);
    guest.console("rmmod kvma_attack");
    assert_clean(&guest, &base, &[], "after rmmod (gdt)");
}

/// CR0.WP and CR4.SMEP cleared on every vCPU: found per vCPU, and `restore` says it cannot
/// write a control register.
#[test]
fn protections_switched_off_are_found_and_not_restorable() {
    let _one = one_guest();
    let guest = BootedGuest::boot(&["--smp", "2"]);
    let base = guest.baseline("base.json");
    assert_clean(&guest, &base, &[], "freshly booted guest");
    let mut watch = guest.watch(
        &base,
        "cr.log",
        &[
            "--interval",
            "1s",
            "--no-info",
            "--on-finding",
            "restore",
            "--allow-write",
        ],
    );

    for (attack, bit, severity) in [("wp", "CR0.WP", "critical"), ("smep", "CR4.SMEP", "high")] {
        attack_and_expect(
            &guest,
            &mut watch,
            &format!("insmod {KO} attack={attack}"),
            &format!("the {bit} finding"),
            |l| l["check"] == "cr" && l["object"] == bit,
        );
        for vcpu in [0u64, 1] {
            let (_, finding) = watch.wait_for(&format!("{bit} of vCPU {vcpu}"), WAIT, |l| {
                is_finding(l) && l["object"] == bit && l["vcpu"] == vcpu
            });
            assert_eq!(finding["actual"], "clear", "{finding}");
            assert_eq!(finding["expected"], "set", "{finding}");
            assert_eq!(finding["severity"], severity, "{finding}");
            assert_eq!(finding["target"]["bit"], bit, "{finding}");
        }
        let impossible =
            |l: &Value| l["event"] == "restore-impossible" && text(&l["detail"]).contains(bit);
        // One answer per vCPU's finding, each naming its vCPU, and never a write.
        for vcpu in 0..2 {
            let named = format!("{bit} vCPU {vcpu}: ");
            watch.wait_for(&format!("restore-impossible for {named}"), WAIT, |l| {
                impossible(l) && text(&l["detail"]).starts_with(&named)
            });
        }
        let lines = watch.lines();
        assert!(
            !lines.iter().any(|l| l["event"] == "restored"),
            "{lines:#?}"
        );
        // The bit first, by a shell builtin: forking with CR0.WP clear corrupts the pages a
        // fork shares copy-on-write.
        guest.console(&format!(
            "echo {attack} > /sys/module/kvma_attack/parameters/undo; rmmod kvma_attack"
        ));
        for vcpu in 0..2 {
            let detail = format!("cr {bit} vCPU {vcpu}");
            watch.wait_for(&format!("{bit} cleared on vCPU {vcpu}"), WAIT, |l| {
                l["event"] == "finding-cleared" && l["detail"] == detail.as_str()
            });
        }
    }
    watch.stop();
    // Each attack alarms on its own bit; the SMEP attack also rewrites cr4_pinned_bits in
    // rodata, which the text check reports (and the watch restores) when its slice gets there.
    only_findings(&watch, "wp/smep", |l| {
        (l["check"] == "cr" && (l["object"] == "CR0.WP" || l["object"] == "CR4.SMEP"))
            || (l["check"] == "text" && text(&l["entry"]).starts_with("cr4_pinned_bits"))
    });
    let lines = watch.lines();
    let first_smep = lines
        .iter()
        .position(|l| is_finding(l) && l["object"] == "CR4.SMEP")
        .expect("SMEP finding");
    assert!(
        !lines[..first_smep]
            .iter()
            .any(|l| is_finding(l) && l["object"] == "CR4.SMEP"),
        "SMEP reported during the WP attack"
    );
    assert!(
        !lines[first_smep..]
            .iter()
            .any(|l| is_finding(l) && l["object"] == "CR0.WP"),
        "WP reported during the SMEP attack: {lines:#?}"
    );
    assert_clean(&guest, &base, &[], "after rmmod (wp, smep)");
    assert_guest_works(&guest);
}

/// A `jmp rel32` over the entry of __x64_sys_getppid: an inline hook into the module, found by
/// the text check; with a text budget the watch keeps it active while the round-robin compares
/// other parts of the kernel (no false "cleared").
#[test]
fn inline_hook_is_found_and_attributed() {
    let _one = one_guest();
    let guest = BootedGuest::boot(&["--smp", "2"]);
    let base = guest.baseline("base.json");
    assert_clean(&guest, &base, &[], "freshly booted guest");
    let getppid = guest.guest_symbol("__x64_sys_getppid");

    // --text-budget 0: every pass compares all of the kernel text.
    let mut watch = guest.watch(
        &base,
        "inline.log",
        &["--interval", "1s", "--no-info", "--text-budget", "0"],
    );
    let (_, finding) = attack_and_expect(
        &guest,
        &mut watch,
        &format!("insmod {KO} attack=inline"),
        "the inline hook",
        |l| l["class"] == "inline-hook",
    );
    let hook = guest.guest_module_symbol("kvma_attack", "kvma_inline_getppid");
    assert_eq!(finding["check"], "text", "{finding}");
    assert_severity(&finding, &["critical"]);
    assert!(
        ["__x64_sys_getppid", "__do_sys_getppid"].contains(&text(&finding["entry"])),
        "{finding}"
    );
    assert_eq!(num(&finding["target"]["gva"]), getppid, "{finding}");
    assert!(
        text(&finding["actual"]).starts_with("e9 ")
            && text(&finding["actual"]).contains(&format!("jmp {hook:#x}")),
        "{finding}"
    );
    let owner = text(&finding["owner"]);
    assert!(
        owner.contains("module kvma_attack") && owner.contains("kvma_inline_getppid"),
        "{finding}"
    );
    watch.stop();
    only_findings(&watch, "inline", |l| l["entry"] == finding["entry"]);

    // A budgeted watch compares 8 MiB per pass: the whole text and rodata (about 22 MiB) every
    // 3 passes. Over 7 passes the hook is reported once and never "cleared" while it is there.
    let mut watch = guest.watch(
        &base,
        "inline-budget.log",
        &[
            "--interval",
            "1s",
            "--no-info",
            "--text-budget",
            "8M",
            "--passes",
            "7",
        ],
    );
    watch.wait_exit(Duration::from_secs(120));
    let lines = watch.lines();
    let hooks = lines
        .iter()
        .filter(|l| is_finding(l) && l["class"] == "inline-hook")
        .count();
    assert_eq!(hooks, 1, "{}", watch.transcript());
    assert!(
        !lines.iter().any(|l| l["event"] == "finding-cleared"),
        "a hook still in place was reported cleared\n{}",
        watch.transcript()
    );
    assert_guest_works(&guest);
    guest.console("rmmod kvma_attack");
    assert_clean(&guest, &base, &[], "after rmmod (inline)");
}

/// An ftrace_ops with IPMODIFY from the module on __x64_sys_getpid: the ftrace check names the
/// module and the hooked function; the text check sees only a legitimate ftrace site (info).
#[test]
fn ftrace_hook_is_found_and_its_call_site_is_not_an_inline_hook() {
    let _one = one_guest();
    let guest = BootedGuest::boot(&["--smp", "2"]);
    let list = guest.run(&["--json", "check", "--list"]).ok().json();
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .any(|c| c["id"] == "ftrace" && c["default"] == true),
        "no default ftrace check: {list}"
    );
    let base = guest.baseline("base.json");
    assert_clean(&guest, &base, &[], "freshly booted guest");
    let mut watch = guest.watch(&base, "ftrace.log", &["--interval", "1s", "--no-info"]);
    let (_, finding) = attack_and_expect(
        &guest,
        &mut watch,
        &format!("insmod {KO} attack=ftrace"),
        "the ftrace finding",
        |l| l["check"] == "ftrace",
    );
    assert_severity(&finding, &["high", "critical"]);
    assert!(
        text(&finding["entry"]).contains("sys_getpid"),
        "the hooked function: {finding}"
    );
    let owner = text(&finding["owner"]);
    assert!(owner.contains("module kvma_attack"), "{finding}");
    assert!(
        text(&finding["actual"]).contains("kvma_ftrace_cb") || owner.contains("kvma_ftrace_cb"),
        "the callback: {finding}"
    );
    watch.stop();
    only_findings(&watch, "ftrace", |l| l["check"] == "ftrace");

    // A full check: the e8 call at __x64_sys_getpid is an ftrace site, informational only.
    let (code, findings) = guest.check_findings(&base, &[]);
    assert_eq!(code, 1, "the ftrace hook is an alarm: {findings:#?}");
    for f in findings.iter().filter(|f| f["check"] == "text") {
        assert_eq!(f["severity"], "info", "text alarm on an ftrace site: {f}");
    }
    assert!(
        findings.iter().any(|f| f["check"] == "text"
            && f["class"] == "ftrace"
            && text(&f["actual"]).contains("sys_getpid")),
        "the ftrace call site should be classified ftrace: {findings:#?}"
    );
    assert!(
        !findings.iter().any(|f| f["class"] == "inline-hook"),
        "{findings:#?}"
    );
    assert_guest_works(&guest);
    guest.console("rmmod kvma_attack");
    assert_clean(&guest, &base, &[], "after rmmod (ftrace)");
}

/// The module unlinked from the module list, then a process unlinked from the task list.
#[test]
fn hidden_module_and_hidden_process_are_found() {
    let _one = one_guest();
    let guest = BootedGuest::boot(&["--smp", "2"]);
    let base = guest.baseline("base.json");
    assert_clean(&guest, &base, &[], "freshly booted guest");
    let mut watch = guest.watch(&base, "hide.log", &["--interval", "1s", "--no-info"]);

    let (_, finding) = attack_and_expect(
        &guest,
        &mut watch,
        &format!("insmod {KO} attack=hide"),
        "the hidden module",
        |l| l["check"] == "modules",
    );
    assert_eq!(
        guest
            .console("grep -c '^kvma_attack ' /proc/modules || true")
            .trim(),
        "0",
        "the attack did not hide the module"
    );
    assert_eq!(finding["entry"], "kvma_attack", "{finding}");
    assert_eq!(finding["class"], "hidden-module", "{finding}");
    assert_severity(&finding, &["critical"]);
    guest.console("echo 1 > /sys/module/kvma_attack/parameters/unhide && rmmod kvma_attack");
    watch.wait_for("the hidden module cleared", WAIT, |l| {
        l["event"] == "finding-cleared" && text(&l["detail"]).starts_with("modules ")
    });
    // QEMU serves one QMP client at a time: the watch ends before `check` runs.
    watch.stop();
    only_findings(&watch, "hide", |l| {
        l["check"] == "modules" && l["entry"] == "kvma_attack"
    });
    assert_clean(&guest, &base, &[], "after rmmod (hide)");

    let pid: u32 = guest
        .console("sleep 1000 >/dev/null 2>&1 & echo $!")
        .trim()
        .parse()
        .expect("pid");
    let mut watch = guest.watch(&base, "hideproc.log", &["--interval", "1s", "--no-info"]);
    let (_, finding) = attack_and_expect(
        &guest,
        &mut watch,
        &format!("insmod {KO} hideproc={pid}"),
        "the hidden process",
        |l| l["check"] == "tasks",
    );
    assert!(
        text(&finding["entry"]).contains(&format!("process {pid} ")),
        "{finding}"
    );
    assert_eq!(finding["class"], "hidden-process", "{finding}");
    assert_severity(&finding, &["critical"]);
    guest.console("rmmod kvma_attack");
    watch.wait_for("the hidden process cleared", WAIT, |l| {
        l["event"] == "finding-cleared" && text(&l["detail"]).starts_with("tasks ")
    });
    watch.stop();
    only_findings(&watch, "hideproc", |l| {
        l["check"] == "tasks" && text(&l["entry"]).contains(&format!("process {pid} "))
    });
    guest.console(&format!("kill {pid}"));
    assert_clean(&guest, &base, &[], "after rmmod (hideproc)");

    // A hook into a module that then hid itself from the list, then from module_kset too
    // (only the module address tree still holds it): the module is found, and the hook is
    // attributed to it by function, as hidden.
    for (hide, seen_in) in [
        ("hide", "only in /sys/module (module_kset)"),
        ("hidesysfs", "only in the module address tree (mod_tree)"),
    ] {
        let mut watch = guest.watch(
            &base,
            &format!("{hide}-hook.log"),
            &["--interval", "1s", "--no-info"],
        );
        let (_, finding) = attack_and_expect(
            &guest,
            &mut watch,
            &format!("insmod {KO} attack=syscall,{hide}"),
            "the hidden module",
            |l| l["check"] == "modules",
        );
        assert!(
            finding["entry"] == "kvma_attack" && text(&finding["actual"]).starts_with(seen_in),
            "{finding}"
        );
        assert_severity(&finding, &["critical"]);
        let (_, hook) = watch.wait_for("the hook into it", WAIT, |l| l["check"] == "syscalls");
        let owner = text(&hook["owner"]);
        assert!(
            owner.starts_with("module kvma_attack (hidden from the module list) text")
                && owner.contains("kvma_sct_getppid"),
            "{hook}"
        );
        guest.console("echo 1 > /sys/module/kvma_attack/parameters/unhide && rmmod kvma_attack");
        watch.wait_for("the hook cleared", WAIT, |l| {
            l["event"] == "finding-cleared" && text(&l["detail"]).starts_with("syscalls ")
        });
        watch.stop();
        assert_clean(&guest, &base, &[], &format!("after rmmod ({hide}, hook)"));
    }
    assert_guest_works(&guest);
}
