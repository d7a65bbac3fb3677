//! Volatility 3 as an independent oracle for the exported ISF: a real guest (Debian 6.1 cloud
//! kernel, 4-level paging, KASLR on) is dumped to an ELF core, kvmaccess derives the profile
//! from the dump alone and exports it as ISF, and Volatility 3 (from PyPI, `make volatility`)
//! loads that ISF and runs `linux.pslist` on the same dump. Its task list must equal both
//! kvmaccess's own (`tasks_from_list`) and the guest's /proc, marker process included.
//!
//! 4-level only: Volatility 3 does not support 5-level paging (it prints empty tables).
//! Guest files come from `KVMACCESS_GUEST_DIR` (default `<workspace>/.cache/guest`), Volatility
//! from `<workspace>/.cache/volatility`; missing either fails the test, never skips it.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kvmaccess_core::{PhysicalMemory, VcpuState};
use kvmaccess_guestlab::GuestSpec;
use kvmaccess_linux::{DiscoverOptions, Isf, Kernel, TaskOffsets};
use kvmaccess_x86::PagingMode;
use serde_json::Value;

const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
const MARKER: &str = "kvma_vol_marker";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vol_binary() -> PathBuf {
    let vol = workspace().join(".cache/volatility/bin/vol");
    assert!(
        vol.is_file(),
        "Volatility 3 missing at {}: run `make volatility`",
        vol.display()
    );
    vol
}

/// One process as `(pid, ppid, comm)`.
type Proc = (i64, i64, String);

/// `/proc/<pid>/stat` lines: `pid (comm) state ppid ...`; comm may hold spaces and parentheses,
/// so it ends at the last `)`.
fn parse_stat(text: &str) -> BTreeSet<Proc> {
    text.lines()
        .filter_map(|line| {
            let open = line.find(" (")?;
            let close = line.rfind(") ")?;
            let pid = line.get(..open)?.trim().parse().ok()?;
            let comm = line.get(open + 2..close)?.to_string();
            let mut rest = line.get(close + 2..)?.split_whitespace();
            let _state = rest.next()?;
            let ppid = rest.next()?.parse().ok()?;
            Some((pid, ppid, comm))
        })
        .collect()
}

/// Rows of `vol -r json linux.pslist` (a tree: children nest under `__children`).
fn parse_pslist(json: &Value, out: &mut BTreeSet<Proc>) {
    for row in json.as_array().into_iter().flatten() {
        let pid = row["PID"].as_i64().unwrap();
        let ppid = row["PPID"].as_i64().unwrap_or(-1);
        let comm = row["COMM"].as_str().unwrap_or_default().to_string();
        out.insert((pid, ppid, comm));
        parse_pslist(&row["__children"], out);
    }
}

struct VolRun {
    elapsed: Duration,
    procs: BTreeSet<Proc>,
    stderr: String,
}

fn run_pslist(vol: &Path, core: &Path, symbols: &Path, cache: &Path) -> VolRun {
    let (elapsed, json, stderr) = run_plugin(vol, core, symbols, cache, "linux.pslist");
    let mut procs = BTreeSet::new();
    parse_pslist(&json, &mut procs);
    VolRun {
        elapsed,
        procs,
        stderr,
    }
}

fn run_plugin(
    vol: &Path,
    core: &Path,
    symbols: &Path,
    cache: &Path,
    plugin: &str,
) -> (Duration, Value, String) {
    let started = Instant::now();
    let out = Command::new(vol)
        .arg("-q")
        .arg("--offline")
        .arg("--cache-path")
        .arg(cache)
        .arg("-s")
        .arg(symbols)
        .arg("-f")
        .arg(core)
        .args(["-r", "json", plugin])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "vol {plugin} failed ({}):\nstdout: {}\nstderr: {stderr}",
        out.status,
        stdout.chars().take(4000).collect::<String>()
    );
    let json: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "vol printed no JSON ({e}):\nstdout: {}\nstderr: {stderr}",
            stdout.chars().take(4000).collect::<String>()
        )
    });
    (elapsed, json, stderr)
}

#[test]
fn volatility_reads_the_exported_isf_and_lists_the_same_tasks() {
    let vol = vol_binary();
    let mut guest = GuestSpec::default().append("no5lvl").boot();

    // Long-lived marker processes. A copy of busybox would not do: busybox picks its applet by
    // argv[0], and "kvma_vol_marker" is none. A script keeps its own name as comm while its
    // shell waits for the `sleep` child (the trailing `true` stops a tail-call exec).
    let mut console = guest.console().unwrap();
    console
        .run(
            &format!(
                "printf '#!/bin/sh\\nsleep $1\\ntrue\\n' > /tmp/{MARKER}; chmod +x /tmp/{MARKER}; \
                 (/tmp/{MARKER} 1000 &); (/tmp/{MARKER} 2000 &); sleep 1"
            ),
            COMMAND_TIMEOUT,
        )
        .unwrap();
    let stat = console
        .run("cat /proc/[0-9]*/stat", COMMAND_TIMEOUT)
        .unwrap();
    let vm = guest.attach().unwrap();
    vm.stop().unwrap();
    let guest_view = parse_stat(&stat);
    let markers: Vec<_> = guest_view.iter().filter(|p| p.2 == MARKER).collect();
    assert_eq!(markers.len(), 2, "{guest_view:?}");

    // The dump: memory, vCPU registers and VMCOREINFO, written while the guest is paused.
    let live = Kernel::discover(
        &vm as &dyn PhysicalMemory,
        Some(&vm as &dyn VcpuState),
        &DiscoverOptions::default(),
    )
    .unwrap();
    assert_eq!(live.layout().mode, PagingMode::Level4);
    let text = live.vmcoreinfo().unwrap().text.clone();
    let registers: Vec<_> = (0..vm.vcpu_count())
        .map(|i| vm.registers(i).unwrap())
        .collect();
    let work = tempfile::tempdir().unwrap();
    let core = work.path().join("guest.core");
    // For trying further Volatility plugins by hand on the same dump and ISF.
    let keep = std::env::var_os("KVMACCESS_VOL_KEEP").is_some();
    let started = Instant::now();
    kvmaccess_dump::write_elf_core_to_path(
        &core,
        false,
        &vm as &dyn PhysicalMemory,
        &registers,
        Some(&text),
        &mut |_, _| {},
    )
    .unwrap();
    eprintln!("ELF core written in {:?}", started.elapsed());
    drop(live);
    drop(console);
    drop(vm);
    guest.kill().unwrap();

    // kvmaccess on the dump alone: discover, types, ps; timed as `kvmaccess ps` would run.
    let started = Instant::now();
    let dump = kvmaccess_dump::open_dump(&core, None).unwrap();
    let note = dump.vmcoreinfo().unwrap().to_string();
    let kernel = Kernel::from_vmcoreinfo_text(
        &dump as &dyn PhysicalMemory,
        &note,
        &DiscoverOptions::default(),
    )
    .unwrap();
    let discovered = started.elapsed();
    let types = kernel.load_types().unwrap();
    let typed = started.elapsed();
    let offsets = TaskOffsets::from_types(&types).unwrap();
    let tasks = kernel.tasks_from_list(&offsets).unwrap();
    let ours_time = started.elapsed();
    eprintln!(
        "kvmaccess on the dump ({} build): open + discover {discovered:?}, + BTF {:?}, \
         + task list {:?}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        typed - discovered,
        ours_time - typed
    );
    let ours: BTreeSet<Proc> = tasks
        .iter()
        .map(|t| {
            (
                i64::from(t.tgid),
                i64::from(t.ppid.unwrap_or(-1)),
                t.comm.clone(),
            )
        })
        .collect();

    // The ISF, from the dump's own BTF and kallsyms.
    let started = Instant::now();
    let isf = kernel.export_isf(&types).unwrap();
    let symbols_dir = work.path().join("symbols");
    std::fs::create_dir_all(symbols_dir.join("linux")).unwrap();
    let isf_path = symbols_dir
        .join("linux")
        .join(Isf::file_name(kernel.release()));
    isf.write_to_path(&isf_path).unwrap();
    eprintln!(
        "ISF exported in {:?}: {} bytes, {} user types, {} enums, {} base types, {:?}",
        started.elapsed(),
        std::fs::metadata(&isf_path).unwrap().len(),
        isf.user_types.len(),
        isf.enums.len(),
        isf.base_types.len(),
        isf.stats
    );
    assert!(isf.undefined_references().is_empty());
    assert!(isf.stats.banner);
    // Link-time addresses: the live init_task minus KASLR.
    let kaslr = kernel.layout().kaslr_offset;
    assert_ne!(kaslr, 0, "KASLR should be on in the test guest");
    assert_eq!(
        isf.symbols["init_task"].address,
        kernel.symbol("init_task").unwrap() - kaslr
    );

    // Volatility: the first run validates the ISF against its schema and builds its banner
    // cache; the second is a user's normal run.
    let cache = work.path().join("vol-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let cold = run_pslist(&vol, &core, &symbols_dir, &cache);
    let warm = run_pslist(&vol, &core, &symbols_dir, &cache);
    for run in [&cold, &warm] {
        let lower = run.stderr.to_lowercase();
        assert!(
            !lower.contains("symbol") && !lower.contains("traceback"),
            "Volatility reported problems:\n{}",
            run.stderr
        );
    }
    assert_eq!(cold.procs, warm.procs);
    let theirs = &warm.procs;
    eprintln!(
        "kvmaccess ps on the dump (open + discover + BTF + task list): {ours_time:?}; \
         vol linux.pslist: {:?} cold (schema validation, cache), {:?} warm; ratio {:.0}x (warm)",
        cold.elapsed,
        warm.elapsed,
        warm.elapsed.as_secs_f64() / ours_time.as_secs_f64()
    );

    // Volatility and kvmaccess on the same dump: identical.
    assert!(theirs.len() > 10, "{theirs:?}");
    assert_eq!(
        theirs,
        &ours,
        "Volatility only: {:?}\nkvmaccess only: {:?}",
        theirs.difference(&ours).collect::<Vec<_>>(),
        ours.difference(theirs).collect::<Vec<_>>()
    );
    assert_eq!(theirs.iter().filter(|p| p.2 == MARKER).count(), 2);

    // The guest's own view, taken just before the pause: every process it listed is there
    // with the same parent and name. /proc shows more than `task_struct.comm` holds: a kernel
    // thread's full name (comm keeps 15 bytes) and a kworker's current workqueue after a `-`.
    let by_pid: BTreeMap<i64, &Proc> = theirs.iter().map(|p| (p.0, p)).collect();
    let same = |proc_view: &Proc, task: &Proc| {
        let full = proc_view.2.as_str();
        let comm = task.2.as_str();
        proc_view.1 == task.1
            && (full == comm
                || full.get(..15) == Some(comm)
                || (full.starts_with("kworker/")
                    && full.strip_prefix(comm).is_some_and(|w| w.starts_with('-'))))
    };
    let missing: Vec<_> = guest_view
        .iter()
        .filter(|p| !by_pid.get(&p.0).is_some_and(|t| same(p, t)))
        .collect();
    assert!(
        missing.is_empty(),
        "in /proc but not in Volatility's list: {missing:?}"
    );
    // Anything new is a kernel thread started meanwhile (children of kthreadd, PID 2).
    let guest_pids: BTreeSet<i64> = guest_view.iter().map(|p| p.0).collect();
    let extra: Vec<_> = theirs
        .iter()
        .filter(|p| !guest_pids.contains(&p.0) && p.1 != 2)
        .collect();
    assert!(
        extra.is_empty(),
        "in Volatility's list but not in /proc: {extra:?}"
    );
    eprintln!(
        "Volatility, kvmaccess and /proc agree on {} processes (markers: {:?})",
        theirs.len(),
        markers
    );
    // Plugins that read typed globals beyond init_task: the module list (with taint_flags)
    // and the system-call table.
    for plugin in ["linux.lsmod", "linux.check_syscall"] {
        let (elapsed, json, stderr) = run_plugin(&vol, &core, &symbols_dir, &cache, plugin);
        let rows = json.as_array().map_or(0, Vec::len);
        eprintln!("vol {plugin}: {rows} rows in {elapsed:?}");
        assert!(rows > 0, "{plugin} printed nothing: {stderr}");
        assert!(!stderr.to_lowercase().contains("traceback"), "{stderr}");
    }
    if keep {
        eprintln!("kept the dump and ISF in {}", work.keep().display());
    }
}
