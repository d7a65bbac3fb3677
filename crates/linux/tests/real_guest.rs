//! Discovery against the project's real test guest (Debian 6.1 cloud kernel under QEMU/TCG),
//! checked against the guest's own /proc/kallsyms.
//!
//! The guest is `make guest`'s kernel and initramfs, found through `KVMACCESS_GUEST_DIR`
//! (default `<workspace>/.cache/guest`; see `kvmaccess-guestlab`). Missing files fail the tests: they are never skipped.
//! Tests boot one QEMU at a time (the machine may have two cores).

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine;
use kvmaccess_core::{PhysicalMemory, VcpuState};
use kvmaccess_guestlab::{one_qemu_at_a_time, GuestSpec};
use kvmaccess_linux::{DiscoverOptions, Kernel, SymbolSource, VmcoreinfoSource};
use kvmaccess_x86::PagingMode;

/// gzip + base64 of /proc/kallsyms takes ~7 s under TCG; the raw text ~40 s.
const KALLSYMS_TIMEOUT: Duration = Duration::from_secs(180);

/// What one boot yields for the comparisons.
struct BootResult {
    kaslr_offset: u64,
}

fn boot_and_check(no5lvl: bool) -> BootResult {
    let _one = one_qemu_at_a_time();
    let spec = GuestSpec::default();
    let mut guest = if no5lvl {
        spec.append("no5lvl").boot()
    } else {
        spec.boot()
    };
    let vm = guest.attach().unwrap();

    let started = Instant::now();
    let kernel = Kernel::discover(
        &vm as &dyn PhysicalMemory,
        Some(&vm as &dyn VcpuState),
        &DiscoverOptions::default(),
    )
    .unwrap();
    let total = started.elapsed();
    eprintln!(
        "{} ({}): discovered in {total:?}",
        kernel.release(),
        if no5lvl { "4-level" } else { "5-level" }
    );
    for step in &kernel.provenance().steps {
        eprintln!(
            "  {:<22} {:>10.3?}  {}",
            step.name, step.duration, step.detail
        );
    }
    // A second scan of the same memory: the first pays the host's page faults on the shared RAM
    // mapping, this one shows the scan's own cost.
    let warm = kvmaccess_linux::vmcoreinfo::scan(&vm, &Default::default());
    eprintln!("  warm rescan: {:?}", warm.duration);
    eprintln!("  checks: {:?}", kernel.provenance().checks);
    eprintln!("  missing: {:?}", kernel.provenance().missing);

    let layout = *kernel.layout();
    assert_eq!(
        layout.mode,
        if no5lvl {
            PagingMode::Level4
        } else {
            PagingMode::Level5
        }
    );
    assert!(kernel.release().starts_with("6."), "{}", kernel.release());
    assert!(kernel.build_id().is_some());
    assert!(kernel.profile().banner.is_some());
    assert!(matches!(
        kernel.provenance().symbols,
        SymbolSource::Kallsyms { .. }
    ));
    match &kernel.provenance().vmcoreinfo {
        VmcoreinfoSource::Scan { candidates, .. } => assert!(*candidates >= 1),
        other => panic!("{other:?}"),
    }
    assert!(
        kernel.provenance().missing.is_empty(),
        "{:?}",
        kernel.provenance().missing
    );

    // The guest's own view, compressed: the raw text takes ~40 s on the TCG serial console.
    let mut console = guest.console().unwrap();
    let encoded = console
        .run("gzip -c /proc/kallsyms | base64", KALLSYMS_TIMEOUT)
        .unwrap();
    let compact: String = encoded.chars().filter(|c| !c.is_whitespace()).collect();
    let gz = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_string(&mut text)
        .unwrap();

    // Kernel-image symbols only (module, BPF and ftrace entries carry a [owner] suffix);
    // compared as multisets because names and addresses repeat.
    let mut theirs: HashMap<(u64, char, &str), i64> = HashMap::new();
    for line in text.lines().filter(|l| !l.contains('[')) {
        let mut f = line.split_whitespace();
        let (Some(a), Some(k), Some(n)) = (f.next(), f.next(), f.next()) else {
            panic!("bad /proc/kallsyms line {line:?}");
        };
        let address = u64::from_str_radix(a, 16).unwrap();
        *theirs
            .entry((address, k.chars().next().unwrap(), n))
            .or_default() += 1;
    }
    let guest_count: i64 = theirs.values().sum();
    for s in kernel.symbols() {
        *theirs
            .entry((s.address, s.kind, s.name.as_str()))
            .or_default() -= 1;
    }
    let differing: Vec<_> = theirs.iter().filter(|(_, &n)| n != 0).take(20).collect();
    assert!(
        differing.is_empty(),
        "{} differences between /proc/kallsyms ({guest_count} kernel symbols) and ours ({}); \
         first: {differing:?}",
        theirs.values().filter(|&&n| n != 0).count(),
        kernel.symbols().len()
    );
    assert!(guest_count > 50_000, "{guest_count}");
    eprintln!(
        "  all {guest_count} kernel symbols of /proc/kallsyms match; KASLR {:#x}",
        layout.kaslr_offset
    );

    // Kernel virtual reads through the discovered root work.
    let banner_at = kernel.symbol("linux_banner").unwrap();
    let mut raw = [0u8; 14];
    kernel
        .read(kvmaccess_core::Gva(banner_at), &mut raw)
        .unwrap();
    assert_eq!(&raw, b"Linux version ");

    drop(console);
    drop(kernel);
    drop(vm);
    guest.kill().unwrap();
    BootResult {
        kaslr_offset: layout.kaslr_offset,
    }
}

#[test]
fn kallsyms_match_the_guest_in_4_and_5_level_paging_and_kaslr_moves() {
    let five = boot_and_check(false);
    let four = boot_and_check(true);
    // KASLR picks among ~500 2 MiB slots: two boots landing on the same one is a 0.2% event,
    // and a constant offset means randomisation (or our reading of it) is broken.
    assert_ne!(five.kaslr_offset, four.kaslr_offset);
    assert_ne!(five.kaslr_offset, 0);
}
