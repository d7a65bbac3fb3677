//! Kernel objects (tasks, user memory, modules, module symbols, owners) read from the project's
//! real test guest (Debian 6.1 cloud kernel under QEMU/TCG), compared with the guest's own
//! `/proc`.
//!
//! The guest is `make guest`'s kernel and initramfs, found through `KVMACCESS_GUEST_DIR`
//! (default `<workspace>/.cache/guest`; see `kvmaccess-guestlab`). Missing files fail the tests: they are never skipped.
//! Tests boot one QEMU at a time (the machine may have two cores).

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use kvmaccess_core::{Gva, PhysicalMemory, VcpuState};
use kvmaccess_guestlab::{one_qemu_at_a_time, GuestSpec, TestGuest};
use kvmaccess_linux::{
    DiscoverOptions, Kernel, KernelSection, ModuleOffsets, ModuleRegionKind, Owner, TaskOffsets,
};
use kvmaccess_qemu::Console;
use kvmaccess_x86::PagingMode;

const CMD_TIMEOUT: Duration = Duration::from_secs(120);
const MARKER: &str = "KVMA_USER_MARKER_0123456789";

fn boot(no5lvl: bool) -> TestGuest {
    let spec = GuestSpec::default();
    if no5lvl {
        spec.append("no5lvl").boot()
    } else {
        spec.boot()
    }
}

/// Long-lived marker processes: their command names are set through /proc so that busybox
/// (which picks its applet from argv[0]) needs no renamed copy, and the marker is in the
/// arguments of a shell that stays alive (it still has an `echo` to run after `sleep`).
fn start_markers(console: &mut Console) {
    let cmd = format!(
        "sh -c 'echo -n kvma_marker_a > /proc/$$/comm; sleep 1000; echo {MARKER}' & \
         sh -c 'echo -n kvma_marker_b > /proc/$$/comm; sleep 1000; echo done' & sleep 1"
    );
    console.run(&cmd, CMD_TIMEOUT).unwrap();
}

/// (pid, ppid, comm) of every task the guest lists in /proc (threads under /proc/PID/task),
/// with shell builtins only so that listing creates no processes.
fn guest_tasks(console: &mut Console) -> BTreeMap<i32, (i32, String)> {
    let out = console
        .run(
            "for d in /proc/[0-9]*/task/[0-9]*; do read l < $d/stat && echo \"S $l\"; done",
            CMD_TIMEOUT,
        )
        .unwrap();
    let mut tasks = BTreeMap::new();
    for line in out.lines().filter_map(|l| l.trim().strip_prefix("S ")) {
        let (Some(open), Some(close)) = (line.find('('), line.rfind(')')) else {
            eprintln!("not a stat line: {line:?}");
            continue;
        };
        let pid: i32 = line[..open].trim().parse().unwrap();
        let comm = line[open + 1..close].to_string();
        let rest: Vec<&str> = line[close + 1..].split_whitespace().collect();
        let ppid: i32 = rest[1].parse().unwrap();
        tasks.insert(pid, (ppid, comm));
    }
    assert!(tasks.len() > 10, "{out}");
    tasks
}

/// Kernel worker threads come and go on their own between two listings.
fn transient(comm: &str) -> bool {
    comm.starts_with("kworker/")
}

/// `/proc` shows kernel threads by their full name (`kthread->full_name`) and workqueue workers
/// with their current workqueue appended (`kworker/0:1-events`); `comm` holds the first 15
/// bytes of the former and the part before `-` of the latter.
fn same_comm(ours: &str, theirs: &str) -> bool {
    ours == theirs
        || (theirs.starts_with(ours) && (ours.len() == 15 || theirs[ours.len()..].starts_with('-')))
}

fn compare(what: &str, ours: &BTreeMap<i32, (i32, String)>, theirs: &BTreeMap<i32, (i32, String)>) {
    let mut problems = Vec::new();
    for (pid, entry) in ours {
        match theirs.get(pid) {
            Some(t) if t.0 == entry.0 && same_comm(&entry.1, &t.1) => {}
            Some(t) => problems.push(format!("pid {pid}: ours {entry:?}, guest {t:?}")),
            None if transient(&entry.1) => {}
            None => problems.push(format!("pid {pid} {entry:?} only in ours")),
        }
    }
    for (pid, entry) in theirs {
        if !ours.contains_key(pid) && !transient(&entry.1) {
            problems.push(format!("pid {pid} {entry:?} only in the guest"));
        }
    }
    assert!(problems.is_empty(), "{what}: {problems:#?}");
}

fn discover(vm: &kvmaccess_qemu::QemuVm) -> Kernel<'_> {
    Kernel::discover(
        vm as &dyn PhysicalMemory,
        Some(vm as &dyn VcpuState),
        &DiscoverOptions::default(),
    )
    .unwrap()
}

fn check_tasks_and_user_memory(no5lvl: bool) {
    let _one = one_qemu_at_a_time();
    let mut guest = boot(no5lvl);
    let vm = guest.attach().unwrap();
    let kernel = discover(&vm);
    assert_eq!(
        kernel.layout().mode,
        if no5lvl {
            PagingMode::Level4
        } else {
            PagingMode::Level5
        }
    );
    let started = Instant::now();
    let types = kernel.load_types().unwrap();
    let off = TaskOffsets::from_types(&types).unwrap();
    eprintln!("BTF + task offsets: {:?}", started.elapsed());

    let mut console = guest.console().unwrap();
    start_markers(&mut console);
    let theirs = guest_tasks(&mut console);

    vm.stop().unwrap();
    kernel.invalidate();
    let started = Instant::now();
    let leaders = kernel.tasks_from_list(&off).unwrap();
    let list_time = started.elapsed();
    let started = Instant::now();
    let threads = kernel.threads_from_list(&off).unwrap();
    let threads_time = started.elapsed();
    let started = Instant::now();
    let table = kernel.tasks_from_pid_table(&off).unwrap();
    let table_time = started.elapsed();
    eprintln!(
        "{} tasks from the list in {list_time:?}, {} threads in {threads_time:?}, {} from the \
         PID table in {table_time:?}",
        leaders.len(),
        threads.len(),
        table.len()
    );
    let as_map = |tasks: &[kvmaccess_linux::Task]| -> BTreeMap<i32, (i32, String)> {
        tasks
            .iter()
            .map(|t| (t.pid, (t.ppid.unwrap_or(-1), t.comm.clone())))
            .collect()
    };
    compare("task list + threads vs /proc", &as_map(&threads), &theirs);
    compare("PID table vs /proc", &as_map(&table), &theirs);
    // The two views hold exactly the same tasks at the same addresses.
    let addrs = |tasks: &[kvmaccess_linux::Task]| -> BTreeSet<(i32, u64)> {
        tasks.iter().map(|t| (t.pid, t.address)).collect()
    };
    assert_eq!(addrs(&threads), addrs(&table));
    assert!(leaders.iter().all(|t| t.is_group_leader()));

    // Kernel threads have no mm; user processes have a translated pgd; init runs as root.
    let kthreadd = leaders.iter().find(|t| t.pid == 2).unwrap();
    assert!(
        kthreadd.is_kernel_thread() && kthreadd.mm.is_none(),
        "{kthreadd:?}"
    );
    let init = leaders.iter().find(|t| t.pid == 1).unwrap();
    assert!(
        !init.is_kernel_thread() && init.pgd_phys.is_some(),
        "{init:?}"
    );
    assert_eq!(init.uid, Some(0));
    let a = leaders.iter().find(|t| t.comm == "kvma_marker_a").unwrap();
    let b = leaders.iter().find(|t| t.comm == "kvma_marker_b").unwrap();
    assert_eq!(a.state.letter, 'S', "{a:?}");
    assert_ne!(a.pgd_phys, b.pgd_phys);

    // User memory through the process's own page tables.
    let cmdline = kernel.task_cmdline(&off, a, 4096).unwrap();
    let text = String::from_utf8_lossy(&cmdline);
    assert!(text.contains(MARKER), "{text:?}");
    let cmd_b = kernel.task_cmdline(&off, b, 4096).unwrap();
    assert!(!String::from_utf8_lossy(&cmd_b).contains(MARKER));
    let at = text.find(MARKER).unwrap() as u64;
    let arg_start = {
        let mm = a.mm.unwrap();
        kernel
            .read_u64(Gva(mm + types.offset_of("mm_struct", "arg_start").unwrap()))
            .unwrap()
    };
    let mut buf = vec![0u8; MARKER.len()];
    kernel
        .read_user(&off, a.pid, Gva(arg_start + at), &mut buf)
        .unwrap();
    assert_eq!(buf, MARKER.as_bytes());
    let space = kernel.process_space(kthreadd);
    assert!(space.is_err());
    vm.cont().unwrap();

    drop(console);
    drop(kernel);
    drop(vm);
    guest.kill().unwrap();
}

#[test]
fn tasks_and_user_memory_5_level() {
    check_tasks_and_user_memory(false);
}

#[test]
fn tasks_and_user_memory_4_level() {
    check_tasks_and_user_memory(true);
}

#[test]
fn modules_symbols_owners_and_ps_timing_5_level() {
    let _one = one_qemu_at_a_time();
    let mut guest = boot(false);
    let vm = guest.attach().unwrap();
    let mut kernel = discover(&vm);
    let types = kernel.load_types().unwrap();
    let moff = ModuleOffsets::from_types(&types).unwrap();
    let toff = TaskOffsets::from_types(&types).unwrap();
    let mut console = guest.console().unwrap();

    // The guest's view.
    let proc_modules = console.run("cat /proc/modules", CMD_TIMEOUT).unwrap();
    let proc_syms = console
        .run("grep '\\[qemu_fw_cfg\\]' /proc/kallsyms", CMD_TIMEOUT)
        .unwrap();

    let started = Instant::now();
    let modules = kernel.modules(&moff).unwrap();
    eprintln!("{} modules in {:?}", modules.len(), started.elapsed());
    let mut theirs = Vec::new();
    for line in proc_modules.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        theirs.push((
            f[0].to_string(),
            f[1].parse::<u64>().unwrap(),
            f[4].to_string(),
            u64::from_str_radix(f[5].trim_start_matches("0x"), 16).unwrap(),
        ));
    }
    let ours: Vec<(String, u64, String, u64)> = modules
        .iter()
        .map(|m| (m.name.clone(), m.size, m.proc_state().to_string(), m.base))
        .collect();
    assert_eq!(ours, theirs, "/proc/modules:\n{proc_modules}");
    assert!(ours.iter().any(|m| m.0 == "qemu_fw_cfg"));
    let fw = modules.iter().find(|m| m.name == "qemu_fw_cfg").unwrap();
    eprintln!("{fw:?}");
    assert_eq!(fw.state_name, "MODULE_STATE_LIVE");
    assert!(fw.regions.iter().any(|r| r.kind == ModuleRegionKind::Text));

    // The sysfs view agrees on every loadable module.
    let kset = kernel.modules_from_kset(&moff).unwrap();
    let loadable: BTreeMap<String, u64> = kset
        .iter()
        .filter_map(|k| Some((k.name.clone(), k.module?)))
        .collect();
    let listed: BTreeMap<String, u64> = modules
        .iter()
        .map(|m| (m.name.clone(), m.address))
        .collect();
    assert_eq!(loadable, listed);
    assert!(
        kset.len() > loadable.len(),
        "built-in modules with parameters are there too"
    );

    // Module symbols equal /proc/kallsyms' [qemu_fw_cfg] lines (as multisets).
    let syms = kernel.module_symbols(&moff, fw).unwrap();
    let mut count: HashMap<(u64, char, String), i64> = HashMap::new();
    for line in proc_syms.lines().filter(|l| l.contains("[qemu_fw_cfg]")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let key = (
            u64::from_str_radix(f[0], 16).unwrap(),
            f[1].chars().next().unwrap(),
            f[2].to_string(),
        );
        *count.entry(key).or_default() += 1;
    }
    let guest_count: i64 = count.values().sum();
    for s in &syms {
        *count
            .entry((s.address, s.kind, s.name.clone()))
            .or_default() -= 1;
    }
    let differing: Vec<_> = count.iter().filter(|(_, &n)| n != 0).take(10).collect();
    assert!(differing.is_empty(), "{differing:?}");
    assert!(guest_count > 20, "{guest_count}");
    eprintln!("all {guest_count} qemu_fw_cfg symbols match /proc/kallsyms");

    let merged = kernel.merge_module_symbols(&moff, &modules);
    assert!(merged.failed.is_empty(), "{:?}", merged.failed);
    let expected: usize = modules
        .iter()
        .map(|m| kernel.module_symbols(&moff, m).unwrap().len())
        .sum();
    assert_eq!(merged.merged, expected);

    // Owners.
    let text_sym = syms
        .iter()
        .find(|s| s.kind == 't' && fw.region_of(s.address).is_some_and(|r| r.kind.is_text()))
        .unwrap();
    let owners = kernel.owners(&modules);
    let owner = owners.owner(text_sym.address + 1);
    eprintln!("{:#x}: {owner}", text_sym.address + 1);
    match &owner {
        Owner::Module {
            name,
            region,
            symbol,
        } => {
            assert_eq!(name, "qemu_fw_cfg");
            assert_eq!(*region, ModuleRegionKind::Text);
            let (sname, soff) = symbol.clone().unwrap();
            assert_eq!(soff, 1);
            assert_eq!(
                kernel.symbols().lookup(&sname).map(|s| s.address),
                Some(text_sym.address)
            );
        }
        other => panic!("{other:?}"),
    }
    let pf = kernel.symbol("asm_exc_page_fault").unwrap();
    let owner = owners.owner(pf);
    eprintln!("asm_exc_page_fault {pf:#x}: {owner}");
    assert!(owner.is_known_text(), "{owner:?}");
    assert!(matches!(
        owner,
        Owner::Kernel {
            section: KernelSection::EntryText | KernelSection::Text,
            ..
        }
    ));
    let data = kernel.symbol("init_task").unwrap();
    assert!(matches!(
        owners.owner(data),
        Owner::Kernel {
            section: KernelSection::Data,
            ..
        }
    ));
    assert_eq!(owners.owner(0x1000), Owner::Unowned);
    assert_eq!(
        kernel.symbols().describe(text_sym.address).unwrap(),
        format!("{} [qemu_fw_cfg]", text_sym.name)
    );

    // ps over many tasks: start 1000 sleepers, then time the walks.
    console
        .run(
            "i=0; while [ $i -lt 1000 ]; do sleep 1000 & i=$((i+1)); done; sleep 2",
            Duration::from_secs(600),
        )
        .unwrap();
    vm.stop().unwrap();
    kernel.invalidate();
    let mut best = (Duration::MAX, Duration::MAX);
    let mut n = (0, 0);
    for _ in 0..5 {
        let started = Instant::now();
        let list = kernel.tasks_from_list(&toff).unwrap();
        let t_list = started.elapsed();
        let started = Instant::now();
        let table = kernel.tasks_from_pid_table(&toff).unwrap();
        let t_table = started.elapsed();
        best = (best.0.min(t_list), best.1.min(t_table));
        n = (list.len(), table.len());
    }
    eprintln!(
        "ps: {} tasks from the list in {:?}, {} from the PID table in {:?} (best of 5, {} build)",
        n.0,
        best.0,
        n.1,
        best.1,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    assert!(n.0 > 1000 && n.1 >= n.0);
    vm.cont().unwrap();

    drop(console);
    drop(kernel);
    drop(vm);
    guest.kill().unwrap();
}
