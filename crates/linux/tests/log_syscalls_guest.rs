//! The kernel log and the system-call tables of the project's real test guest (Debian 6.1 cloud
//! kernel under QEMU/TCG), checked against the guest's own `dmesg` and `/proc/kallsyms`.
//!
//! The guest is `make guest`'s kernel and initramfs, found through `KVMACCESS_GUEST_DIR`
//! (default `<workspace>/.cache/guest`; see `kvmaccess-guestlab`). Missing files fail the test: it is never skipped.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::time::{Duration, Instant};

use kvmaccess_core::{PhysicalMemory, VcpuState};
use kvmaccess_guestlab::{one_qemu_at_a_time, GuestSpec};
use kvmaccess_linux::{DiscoverOptions, Kernel, SyscallResolver};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Median of `runs` timings of `work`.
fn median(runs: usize, mut work: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            work();
            started.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

#[test]
fn dmesg_and_syscall_tables_match_the_guest() {
    let _one = one_qemu_at_a_time();
    // `quiet` (the default) keeps level-4+ records off the serial console the test talks
    // through.
    let mut guest = GuestSpec::default().boot();
    let vm = guest.attach().unwrap();
    let kernel = Kernel::discover(
        &vm as &dyn PhysicalMemory,
        Some(&vm as &dyn VcpuState),
        &DiscoverOptions::default(),
    )
    .unwrap();
    let types = kernel.load_types().unwrap();
    let mut console = guest.console().unwrap();

    // (a) The log: distinctive lines written from inside, then the guest's own dmesg.
    let token = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            & 0xffff_ffff
    );
    let lines = [
        (6u8, format!("kvma-test-line-{token}-info")),
        (4u8, format!("kvma-test-line-{token}-warn")),
        (6u8, format!("kvma-test-line-{token}-multi word text")),
    ];
    for (level, text) in &lines {
        console
            .run(
                &format!("echo '<{level}>{text}' > /dev/kmsg"),
                COMMAND_TIMEOUT,
            )
            .unwrap();
    }
    let theirs = console.run("dmesg | tail -n 50", COMMAND_TIMEOUT).unwrap();
    let theirs: Vec<String> = theirs
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .filter(|l| l.starts_with('['))
        .collect();
    assert!(theirs.len() >= 40, "guest dmesg: {theirs:?}");

    let started = Instant::now();
    let log = kernel.log_buffer(&types).unwrap();
    let cold = started.elapsed();
    eprintln!(
        "dmesg: {} records ({} descriptors examined, {} skipped) in {cold:?}; notes {:?}; first \
         skipped {:?}",
        log.records.len(),
        log.examined,
        log.skipped_count,
        log.notes,
        log.skipped.first()
    );
    assert!(log.notes.is_empty(), "{:?}", log.notes);
    for (level, text) in &lines {
        let found = log
            .records
            .iter()
            .find(|r| &r.text == text)
            .unwrap_or_else(|| panic!("{text:?} not in our dmesg"));
        assert_eq!(found.level, *level, "{found:?}");
        // Writes to /dev/kmsg without a facility are logged as LOG_USER.
        assert_eq!(found.facility, 1, "{found:?}");
        assert!(found.caller.to_string().starts_with('T'), "{found:?}");
    }
    let ours: Vec<String> = log.records.iter().flat_map(|r| r.dmesg_lines()).collect();
    // The guest's last lines appear in ours, in order (ours may hold a later record or two).
    let mut at = 0usize;
    for line in &theirs {
        let pos = ours
            .get(at..)
            .and_then(|rest| rest.iter().position(|l| l == line))
            .unwrap_or_else(|| {
                panic!(
                    "guest line {line:?} not found in ours after line {at}; our last lines: {:?}",
                    &ours[ours.len().saturating_sub(10)..]
                )
            });
        at += pos + 1;
    }
    let seqs: Vec<u64> = log.records.iter().map(|r| r.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]),
        "sequence numbers not increasing"
    );
    let warm = median(20, || {
        kernel.log_buffer(&types).unwrap();
    });
    eprintln!(
        "dmesg: {} lines of the guest's own dmesg match; warm read {warm:?}",
        theirs.len()
    );

    // (b) System-call tables.
    let started = Instant::now();
    let resolver = SyscallResolver::new(&kernel, Some(&types)).unwrap();
    let setup = started.elapsed();
    let tables = resolver.read(&kernel).unwrap();
    let read = median(200, || {
        resolver.read(&kernel).unwrap();
    });
    eprintln!(
        "syscalls: resolver set-up {setup:?}, read+decode of all tables {read:?} ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    eprintln!("syscalls: notes {:?}", tables.notes);
    let x64 = &tables.x64;
    eprintln!(
        "syscalls: x64 table at {:#x}, {} entries ({}), {} unused numbers; ia32 {}; x32 {}",
        x64.address,
        x64.entries.len(),
        x64.count_source,
        x64.entries.iter().filter(|e| e.unused).count(),
        if tables.ia32.is_some() {
            "present"
        } else {
            "absent"
        },
        if tables.x32.is_some() {
            "present"
        } else {
            "absent"
        },
    );
    let bad: Vec<_> = x64.unexpected().take(10).collect();
    assert!(
        bad.is_empty(),
        "unexpected entries on a clean guest: {bad:?}"
    );
    assert!(
        (400..=MAX_ENTRIES).contains(&x64.entries.len()),
        "{}",
        x64.entries.len()
    );
    let by_source = |s| x64.entries.iter().filter(|e| e.name_source == s).count();
    eprintln!(
        "syscalls: names from metadata {}, from symbols {}",
        by_source(kvmaccess_linux::syscalls::NameSource::Metadata),
        by_source(kvmaccess_linux::syscalls::NameSource::Symbol)
    );
    assert!(by_source(kvmaccess_linux::syscalls::NameSource::Metadata) > 300);
    let well_known = [
        (0usize, "read"),
        (1, "write"),
        (59, "execve"),
        (60, "exit"),
        (231, "exit_group"),
    ];
    let kallsyms = console
        .run(
            "grep -E ' (__x64_sys_(read|write|execve|exit|exit_group)|ia32_sys_call_table|\
             x32_sys_call_table|sys_call_table|x64_sys_call)$' /proc/kallsyms",
            COMMAND_TIMEOUT,
        )
        .unwrap();
    let guest_address = |name: &str| {
        kallsyms
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .find(|l| l.split_whitespace().nth(2) == Some(name))
            .map(|l| u64::from_str_radix(l.split_whitespace().next().unwrap(), 16).unwrap())
    };
    for (nr, name) in well_known {
        let entry = &x64.entries[nr];
        assert_eq!(entry.name.as_deref(), Some(name), "{entry:?}");
        let theirs = guest_address(&format!("__x64_sys_{name}"))
            .unwrap_or_else(|| panic!("__x64_sys_{name} not in {kallsyms:?}"));
        assert_eq!(entry.address, theirs, "{name}");
    }
    assert_eq!(guest_address("sys_call_table"), Some(x64.address));
    assert_eq!(
        guest_address("ia32_sys_call_table").is_some(),
        tables.ia32.is_some()
    );
    assert_eq!(
        guest_address("x32_sys_call_table").is_some(),
        tables.x32.is_some()
    );
    for table in tables.tables().skip(1) {
        let bad: Vec<_> = table.unexpected().take(10).collect();
        assert!(bad.is_empty(), "{:?}: {bad:?}", table.abi);
    }

    // The dispatcher's code.
    let code = kernel.dispatcher_code().unwrap();
    for block in &code {
        eprintln!(
            "dispatcher: {} at {:#x}, {} bytes{}",
            block.name,
            block.address,
            block.bytes.len(),
            if block.truncated { " (truncated)" } else { "" }
        );
        assert!(!block.bytes.is_empty());
    }
    let names: Vec<&str> = code.iter().map(|c| c.name).collect();
    assert!(names.contains(&"entry_SYSCALL_64") && names.contains(&"do_syscall_64"));
    if guest_address("x64_sys_call").is_some() {
        assert!(names.contains(&"x64_sys_call"), "{names:?}");
    }

    drop(console);
    drop(kernel);
    drop(vm);
    guest.kill().unwrap();
}

const MAX_ENTRIES: usize = kvmaccess_linux::syscalls::MAX_SYSCALLS as usize;
