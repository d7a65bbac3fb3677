//! Discovery against a synthetic guest: mock memory with real page tables, a VMCOREINFO text,
//! an encoded kallsyms blob and a banner.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use super::*;
use crate::kallsyms::testing::{encode, Blob};
use crate::kallsyms::{decode, FlatMemory};
use kvmaccess_core::Registers;
use kvmaccess_testkit::{MapFlags, MockMemory, PageSize, PageTableBuilder, TableFormat};

const KASLR: u64 = 0x0200_0000;
const TEXT: u64 = DEFAULT_TEXT + KASLR;
const TEXT_PHYS: u64 = 0x0400_0000;
const PHYS_BASE: i64 = TEXT_PHYS as i64 - (TEXT - START_KERNEL_MAP) as i64;
const TABLES_PHYS: u64 = TEXT_PHYS + 0x10_0000;
const BLOB_VA: u64 = TEXT + 0x20_0000;
const BANNER_VA: u64 = TEXT + 0x30_0000;
const RELEASE: &str = "6.1.0-test";

fn long_name() -> String {
    "very_long_symbol_name_".repeat(9)
}

fn symbols() -> Vec<(char, String, u64)> {
    vec![
        ('A', "fixed_percpu_data".into(), 0),
        ('A', "current_task".into(), 0x1fb80),
        ('T', "_text".into(), TEXT),
        ('T', "startup_64".into(), TEXT),
        ('T', "_stext".into(), TEXT + 0x1000),
        ('t', "test_helper".into(), TEXT + 0x2000),
        ('t', long_name(), TEXT + 0x3000),
        ('D', "linux_banner".into(), BANNER_VA),
    ]
}

fn blob() -> Blob {
    let owned = symbols();
    let borrowed: Vec<(char, &str, u64)> =
        owned.iter().map(|(k, n, a)| (*k, n.as_str(), *a)).collect();
    encode(BLOB_VA, TEXT, &borrowed)
}

struct Fake {
    mem: MockMemory,
    root: Gpa,
    blob: Blob,
}

fn vmcoreinfo_text(blob: &Blob, root_va: u64, release: &str, l5: bool) -> String {
    let loc = &blob.location;
    let kallsyms::AddressTable::Relative {
        offsets,
        relative_base,
    } = loc.addresses
    else {
        unreachable!()
    };
    format!(
        "OSRELEASE={release}\nBUILD-ID=00112233445566778899aabbccddeeff00112233\nPAGESIZE=4096\n\
         SYMBOL(_stext)={:x}\nSYMBOL(swapper_pg_dir)={root_va:x}\nSYMBOL(init_top_pgt)={root_va:x}\n\
         SYMBOL(kallsyms_names)={:x}\nSYMBOL(kallsyms_num_syms)={:x}\n\
         SYMBOL(kallsyms_token_table)={:x}\nSYMBOL(kallsyms_token_index)={:x}\n\
         SYMBOL(kallsyms_offsets)={offsets:x}\nSYMBOL(kallsyms_relative_base)={relative_base:x}\n\
         NUMBER(phys_base)={PHYS_BASE}\nNUMBER(pgtable_l5_enabled)={}\nKERNELOFFSET={KASLR:x}\n\0",
        TEXT + 0x1000,
        loc.names,
        loc.num_syms,
        loc.token_table,
        loc.token_index,
        u8::from(l5)
    )
}

fn fake_guest(l5: bool) -> Fake {
    let mem = MockMemory::new(256 << 20);
    let format = if l5 {
        TableFormat::Level5
    } else {
        TableFormat::Level4
    };
    let mut tables = PageTableBuilder::with_table_area(
        &mem,
        format,
        Gpa(TABLES_PHYS),
        Gpa(TABLES_PHYS + 0x8_0000),
    )
    .unwrap();
    for i in 0..4 {
        tables
            .map(
                Gva(TEXT + i * 0x20_0000),
                Gpa(TEXT_PHYS + i * 0x20_0000),
                PageSize::Size2M,
                MapFlags::KERNEL_RW,
            )
            .unwrap();
    }
    let root = tables.root();
    let blob = blob();
    mem.write_bytes(Gpa(BLOB_VA - TEXT + TEXT_PHYS), &blob.bytes)
        .unwrap();
    mem.write_bytes(
        Gpa(BANNER_VA - TEXT + TEXT_PHYS),
        format!("Linux version {RELEASE} (builder@host) (gcc) #1 SMP\n\0").as_bytes(),
    )
    .unwrap();
    let root_va = root.0 - TEXT_PHYS + TEXT;
    let real = vmcoreinfo_text(&blob, root_va, RELEASE, l5);
    // A planted copy at a lower address whose release does not match the banner.
    let fake = vmcoreinfo_text(&blob, root_va, "6.6.6-evil", l5);
    mem.write_bytes(Gpa(0x10_0000), fake.as_bytes()).unwrap();
    mem.write_bytes(Gpa(0x80_0000), real.as_bytes()).unwrap();
    mem.write_bytes(Gpa(0x90_0018), real.as_bytes()).unwrap();
    Fake { mem, root, blob }
}

fn check_symbols(table: &SymbolTable) {
    for (kind, name, address) in symbols() {
        let found = table.lookup(&name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!((found.kind, found.address), (kind, address), "{name}");
    }
    assert_eq!(table.len(), symbols().len());
    let (sym, off) = table.addr2sym(TEXT + 0x2010).unwrap();
    assert_eq!((sym.name.as_str(), off), ("test_helper", 0x10));
}

#[test]
fn discovers_a_synthetic_kernel_in_both_paging_modes() {
    for l5 in [false, true] {
        let fake = fake_guest(l5);
        let kernel = Kernel::discover(&fake.mem, None, &DiscoverOptions::default()).unwrap();
        assert_eq!(kernel.release(), RELEASE);
        assert_eq!(
            kernel.build_id(),
            Some("00112233445566778899aabbccddeeff00112233")
        );
        let layout = kernel.layout();
        assert_eq!(layout.root, fake.root);
        assert_eq!(layout.kaslr_offset, KASLR);
        assert_eq!(layout.phys_base, PHYS_BASE);
        assert_eq!(layout.phys_load_address(), Some(Gpa(TEXT_PHYS)));
        assert_eq!(
            layout.mode,
            if l5 {
                kvmaccess_x86::PagingMode::Level5
            } else {
                kvmaccess_x86::PagingMode::Level4
            }
        );
        check_symbols(kernel.symbols());
        let prov = kernel.provenance();
        match &prov.vmcoreinfo {
            VmcoreinfoSource::Scan {
                candidates,
                distinct,
                chosen,
                rejected,
                ..
            } => {
                assert_eq!((*candidates, *distinct), (3, 2));
                assert_eq!(*chosen, Gpa(0x80_0000));
                assert!(
                    rejected.iter().any(|r| r.contains("6.6.6-evil")),
                    "{rejected:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            prov.symbols,
            SymbolSource::Kallsyms {
                rule: OffsetRule::AbsolutePercpu,
                ..
            }
        ));
        assert!(prov.missing.is_empty(), "{:?}", prov.missing);
        assert!(prov.steps.iter().any(|s| s.name == "vmcoreinfo-scan"));
        let mut banner = [0u8; 14];
        kernel.read(Gva(BANNER_VA), &mut banner).unwrap();
        assert_eq!(&banner, b"Linux version ");
        assert_eq!(kernel.symbol("linux_banner").unwrap(), BANNER_VA);
        assert!(kernel.symbol("nothing_here").is_err());
    }
}

#[test]
fn provided_note_text_skips_the_scan() {
    let fake = fake_guest(false);
    let text = vmcoreinfo_text(&fake.blob, fake.root.0 - TEXT_PHYS + TEXT, RELEASE, false);
    let kernel =
        Kernel::from_vmcoreinfo_text(&fake.mem, &text, &DiscoverOptions::default()).unwrap();
    assert_eq!(kernel.provenance().vmcoreinfo, VmcoreinfoSource::Provided);
    assert!(!kernel
        .provenance()
        .steps
        .iter()
        .any(|s| s.name == "vmcoreinfo-scan"));
    check_symbols(kernel.symbols());
}

#[test]
fn system_map_replaces_missing_kallsyms() {
    let fake = fake_guest(false);
    let text = vmcoreinfo_text(&fake.blob, fake.root.0 - TEXT_PHYS + TEXT, RELEASE, false)
        .lines()
        .filter(|l| !l.contains("kallsyms"))
        .collect::<Vec<_>>()
        .join("\n");
    let without =
        Kernel::from_vmcoreinfo_text(&fake.mem, &text, &DiscoverOptions::default()).unwrap();
    assert!(without.symbols().is_empty());
    assert!(
        without
            .provenance()
            .missing
            .iter()
            .any(|m| m.contains("--system-map")),
        "{:?}",
        without.provenance().missing
    );
    let map = SystemMap::parse(
        "ffffffff81001000 T _stext\nffffffff81002000 t test_helper\n0000000000000000 D __per_cpu_start\n",
    )
    .unwrap();
    let options = DiscoverOptions {
        system_map: Some(map),
        ..DiscoverOptions::default()
    };
    let with = Kernel::from_vmcoreinfo_text(&fake.mem, &text, &options).unwrap();
    assert_eq!(
        with.symbols().address_of("test_helper"),
        Some(TEXT + 0x2000)
    );
    assert_eq!(with.symbols().address_of("__per_cpu_start"), Some(0));
    assert!(matches!(
        with.provenance().symbols,
        SymbolSource::SystemMap { slide: KASLR, .. }
    ));
}

struct FixedRegs(Registers);

impl VcpuState for FixedRegs {
    fn vcpu_count(&self) -> usize {
        1
    }
    fn registers(&self, _vcpu: usize) -> std::result::Result<Registers, kvmaccess_core::Error> {
        Ok(self.0.clone())
    }
}

fn long_mode_regs(cr3: u64, l5: bool) -> Registers {
    Registers {
        cr0: 0x8005_0033,
        cr3,
        cr4: 0x0000_06f0 | if l5 { 1 << 12 } else { 0 },
        efer: Some(0xd01),
        ..Registers::default()
    }
}

#[test]
fn registers_fallback_without_vmcoreinfo() {
    let fake = fake_guest(false);
    // Wipe every VMCOREINFO copy.
    for at in [0x10_0000u64, 0x80_0000, 0x90_0018] {
        fake.mem.write_bytes(Gpa(at), &[0u8; 16]).unwrap();
    }
    assert!(matches!(
        Kernel::discover(&fake.mem, None, &DiscoverOptions::default()),
        Err(Error::VmcoreinfoNotFound { .. })
    ));
    let regs = FixedRegs(long_mode_regs(fake.root.0, false));
    let kernel = Kernel::discover(&fake.mem, Some(&regs), &DiscoverOptions::default()).unwrap();
    assert_eq!(kernel.release(), RELEASE);
    assert_eq!(kernel.layout().kaslr_offset, KASLR);
    assert_eq!(kernel.layout().phys_base, PHYS_BASE);
    assert_eq!(kernel.profile().banner.as_ref().unwrap().address, BANNER_VA);
    assert!(matches!(
        kernel.provenance().layout,
        LayoutSource::Registers { vcpu: 0 }
    ));
    assert!(kernel.symbols().is_empty());
    let missing = kernel.provenance().missing.join("\n");
    assert!(
        missing.contains("no VMCOREINFO") && missing.contains("System.map"),
        "{missing}"
    );

    let map = SystemMap::parse("ffffffff81300000 D linux_banner\nffffffff81002000 t test_helper\n")
        .unwrap();
    let options = DiscoverOptions {
        system_map: Some(map),
        ..DiscoverOptions::default()
    };
    let kernel = Kernel::discover(&fake.mem, Some(&regs), &options).unwrap();
    assert_eq!(
        kernel.symbols().address_of("test_helper"),
        Some(TEXT + 0x2000)
    );
}

#[test]
fn forged_vmcoreinfo_without_matching_tables_is_rejected() {
    let fake = fake_guest(false);
    for at in [0x10_0000u64, 0x80_0000, 0x90_0018] {
        fake.mem.write_bytes(Gpa(at), &[0u8; 16]).unwrap();
    }
    // Points the root somewhere that maps nothing.
    let mut text = vmcoreinfo_text(&fake.blob, TEXT + 0x3f_0000, RELEASE, false);
    text.push('\0');
    fake.mem
        .write_bytes(Gpa(0x20_0000), text.as_bytes())
        .unwrap();
    let err = Kernel::discover(&fake.mem, None, &DiscoverOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("does not translate"), "{message}");
}

fn flat(blob: &Blob) -> FlatMemory<'_> {
    FlatMemory {
        base: blob.base,
        bytes: &blob.bytes,
    }
}

fn offset_of(blob: &Blob, va: u64) -> usize {
    (va - blob.base) as usize
}

#[test]
fn decoder_rejects_hostile_tables() {
    let good = blob();
    let decoded = decode(&mut flat(&good), &good.location, DecodeOptions::default()).unwrap();
    assert_eq!(decoded.symbols[6].name, long_name());
    assert!(long_name().len() > 127);

    // Absurd count.
    let mut b = good.clone();
    let at = offset_of(&b, b.location.num_syms);
    b.bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&mut flat(&b), &b.location, DecodeOptions::default()),
        Err(Error::KallsymsTooMany {
            value: 0xffff_ffff,
            ..
        })
    ));

    // A token index entry far outside the table.
    let mut b = good.clone();
    let at = offset_of(&b, b.location.token_index) + 2 * 0x41;
    b.bytes[at..at + 2].copy_from_slice(&0xfff0u16.to_le_bytes());
    assert!(matches!(
        decode(&mut flat(&b), &b.location, DecodeOptions::default()),
        Err(Error::KallsymsTokenIndex { token: 0x41, .. })
    ));

    // The last token loses its NUL.
    let mut b = good.clone();
    let at = offset_of(&b, b.location.token_index) - 1;
    b.bytes[at] = b'x';
    assert!(matches!(
        decode(&mut flat(&b), &b.location, DecodeOptions::default()),
        Err(Error::KallsymsTokenUnterminated { token: 255, .. })
    ));

    // More symbols than names: the names run into the token table and off the end.
    let mut b = good.clone();
    let at = offset_of(&b, b.location.num_syms);
    b.bytes[at..at + 4].copy_from_slice(&2000u32.to_le_bytes());
    assert!(decode(&mut flat(&b), &b.location, DecodeOptions::default()).is_err());

    // A name whose two-byte length claims 16 KiB.
    let mut b = good.clone();
    let at = offset_of(&b, b.location.names);
    b.bytes[at] = 0xff;
    b.bytes[at + 1] = 0x7f;
    let err = decode(&mut flat(&b), &b.location, DecodeOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::KallsymsNameOverrun { index: 0, .. }
                | Error::KallsymsNameTooLong { index: 0, .. }
        ),
        "{err}"
    );

    // Zero-length name.
    let mut b = good.clone();
    let at = offset_of(&b, b.location.names);
    b.bytes[at] = 0;
    assert!(matches!(
        decode(&mut flat(&b), &b.location, DecodeOptions::default()),
        Err(Error::KallsymsEmptyName { index: 0, .. })
    ));

    // Arrays placed where nothing is mapped.
    let mut moved = good.location;
    moved.names = 0x1000;
    assert!(decode(&mut flat(&good), &moved, DecodeOptions::default()).is_err());
}

#[test]
fn decoder_survives_random_corruption() {
    let good = blob();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..2000 {
        let mut b = good.clone();
        for _ in 0..(next() % 8 + 1) {
            let at = (next() % b.bytes.len() as u64) as usize;
            b.bytes[at] = next() as u8;
        }
        let _ = decode(&mut flat(&b), &b.location, DecodeOptions::default());
    }
}

#[test]
fn offset_rules() {
    use kallsyms::apply_offset;
    let base = 0xffff_ffff_8100_0000;
    assert_eq!(
        apply_offset(OffsetRule::AbsolutePercpu, base, 0x1fb80),
        0x1fb80
    );
    assert_eq!(apply_offset(OffsetRule::AbsolutePercpu, base, -1), base);
    assert_eq!(
        apply_offset(OffsetRule::AbsolutePercpu, base, -0x1001),
        base + 0x1000
    );
    assert_eq!(
        apply_offset(OffsetRule::Relative, base, 0x1000),
        base + 0x1000
    );
    assert_eq!(
        apply_offset(OffsetRule::Relative, 0x1000, -1),
        0x1_0000_0fff
    );
    assert_eq!(
        apply_offset(OffsetRule::AbsolutePercpu, 0, i32::MIN),
        0x7fff_ffff
    );
}

const BUILD: &str = "00112233445566778899aabbccddeeff00112233";

fn cached(dir: &std::path::Path) -> DiscoverOptions {
    DiscoverOptions {
        cache: Some(ProfileCache::new(dir)),
        ..DiscoverOptions::default()
    }
}

fn symbols_outcome(kernel: &Kernel<'_>) -> CacheUse {
    kernel.profile_cache().unwrap().symbols
}

/// Guest-physical address of a kernel virtual address in the fake guest's image.
fn image_phys(va: u64) -> Gpa {
    Gpa(va - TEXT + TEXT_PHYS)
}

/// Renames `test_helper` to `test_Helper` in the guest's `kallsyms_names` (its characters are
/// tokens of their own in the test encoding).
fn rename_helper(fake: &Fake) {
    let at = fake
        .blob
        .bytes
        .windows(10)
        .position(|w| w == b"est_helper")
        .unwrap();
    let va = fake.blob.base + at as u64 + 4;
    assert!(va > fake.blob.location.names && va < fake.blob.location.token_table);
    fake.mem.write_bytes(image_phys(va), b"H").unwrap();
}

#[test]
fn cached_names_are_used_only_for_the_bytes_they_came_from() {
    use kallsyms::{decode_cached, CachedNames};
    let good = blob();
    let fresh = decode(&mut flat(&good), &good.location, DecodeOptions::default()).unwrap();
    let names = CachedNames {
        source: fresh.source,
        symbols: fresh
            .symbols
            .iter()
            .map(|s| Symbol::new(s.name.clone(), 0, s.kind))
            .collect(),
    };
    let hit = decode_cached(
        &mut flat(&good),
        &good.location,
        DecodeOptions::default(),
        names.clone(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(hit.symbols, fresh.symbols);
    assert_eq!((hit.source, hit.rule), (fresh.source, fresh.rule));

    // Another boot of the same build: KASLR moved everything, the names arrays are the same
    // bytes, and the addresses come from the moved guest.
    let delta = 0x4a0_0000;
    let owned = symbols();
    let shifted: Vec<(char, &str, u64)> = owned
        .iter()
        .map(|(k, n, a)| (*k, n.as_str(), if *k == 'A' { *a } else { a + delta }))
        .collect();
    let moved = encode(BLOB_VA + delta, TEXT + delta, &shifted);
    let hit = decode_cached(
        &mut flat(&moved),
        &moved.location,
        DecodeOptions::default(),
        names.clone(),
    )
    .unwrap()
    .unwrap();
    for (got, (kind, name, address)) in hit.symbols.iter().zip(&shifted) {
        assert_eq!(
            (got.kind, got.name.as_str(), got.address),
            (*kind, *name, *address)
        );
    }

    // Any change to the count, the names, the token table or the token index is a miss.
    let start = offset_of(&good, good.location.num_syms);
    for at in start..good.bytes.len() {
        let mut b = good.clone();
        b.bytes[at] ^= 0x01;
        match decode_cached(
            &mut flat(&b),
            &b.location,
            DecodeOptions::default(),
            names.clone(),
        ) {
            Ok(Ok(_)) => panic!("byte {at} changed, cached names still used"),
            Ok(Err(back)) => assert_eq!(back, names),
            Err(_) => {}
        }
    }
    // Names cached for a different count are not used either.
    let mut short = names.clone();
    short.symbols.pop();
    assert!(decode_cached(
        &mut flat(&good),
        &good.location,
        DecodeOptions::default(),
        short
    )
    .unwrap()
    .is_err());
}

#[test]
fn second_discovery_comes_from_the_cache_and_agrees() {
    let fake = fake_guest(false);
    let dir = tempfile::tempdir().unwrap();
    let options = cached(dir.path());
    let first = Kernel::discover(&fake.mem, None, &options).unwrap();
    let report = first.profile_cache().unwrap();
    assert_eq!(report.build_id.as_deref(), Some(BUILD));
    assert!(
        matches!(report.symbols, CacheUse::Miss { stored: true, .. }),
        "{report:?}"
    );
    assert!(!report.vmcoreinfo_remembered);

    let second = Kernel::discover(&fake.mem, None, &options).unwrap();
    let report = second.profile_cache().unwrap();
    assert!(matches!(report.symbols, CacheUse::Hit { .. }), "{report:?}");
    assert!(report.vmcoreinfo_remembered);
    assert_eq!(
        second.provenance().vmcoreinfo,
        VmcoreinfoSource::Remembered {
            gpa: Gpa(0x80_0000),
            build_id: BUILD.into()
        }
    );
    let steps: Vec<&str> = second.provenance().steps.iter().map(|s| s.name).collect();
    assert!(!steps.contains(&"vmcoreinfo-scan"), "{steps:?}");
    assert!(steps.contains(&"kallsyms-cached"), "{steps:?}");
    assert!(!steps.contains(&"profile-cache-write"), "{steps:?}");
    check_symbols(second.symbols());
    assert_eq!(first.symbols().as_slice(), second.symbols().as_slice());
    assert_eq!(first.symbols().name_index(), second.symbols().name_index());
    assert_eq!(first.layout(), second.layout());
    assert!(second.provenance().missing.is_empty());

    // Without a cache nothing is reported.
    let plain = Kernel::discover(&fake.mem, None, &DiscoverOptions::default()).unwrap();
    assert!(plain.profile_cache().is_none());
}

#[test]
fn kallsyms_changed_after_caching_are_decoded_afresh() {
    let fake = fake_guest(false);
    let dir = tempfile::tempdir().unwrap();
    let options = cached(dir.path());
    Kernel::discover(&fake.mem, None, &options).unwrap();
    rename_helper(&fake);
    let kernel = Kernel::discover(&fake.mem, None, &options).unwrap();
    match symbols_outcome(&kernel) {
        CacheUse::Miss { reason, stored } => {
            assert!(reason.contains("differ"), "{reason}");
            assert!(stored);
        }
        other => panic!("stale names used: {other:?}"),
    }
    assert!(kernel.symbols().lookup("test_Helper").is_some());
    assert!(kernel.symbols().lookup("test_helper").is_none());
    // The entry was rewritten from the new bytes.
    let again = Kernel::discover(&fake.mem, None, &options).unwrap();
    assert!(matches!(symbols_outcome(&again), CacheUse::Hit { .. }));
    assert!(again.symbols().lookup("test_Helper").is_some());
}

#[test]
fn a_guest_claiming_the_same_build_cannot_poison_the_cache() {
    let honest = fake_guest(false);
    let hostile = fake_guest(false);
    rename_helper(&hostile);
    let dir = tempfile::tempdir().unwrap();
    let options = cached(dir.path());
    Kernel::discover(&honest.mem, None, &options).unwrap();
    // The hostile guest gets its own names, not the honest guest's, and its entry replaces
    // the honest one...
    let kernel = Kernel::discover(&hostile.mem, None, &options).unwrap();
    assert!(matches!(
        symbols_outcome(&kernel),
        CacheUse::Miss { stored: true, .. }
    ));
    assert!(kernel.symbols().lookup("test_Helper").is_some());
    // ...which the honest guest then refuses: it never sees the hostile names.
    let kernel = Kernel::discover(&honest.mem, None, &options).unwrap();
    assert!(matches!(symbols_outcome(&kernel), CacheUse::Miss { .. }));
    check_symbols(kernel.symbols());
    assert!(kernel.symbols().lookup("test_Helper").is_none());
}

#[test]
fn a_corrupt_cache_file_is_ignored_and_rewritten() {
    let fake = fake_guest(false);
    let dir = tempfile::tempdir().unwrap();
    let options = cached(dir.path());
    Kernel::discover(&fake.mem, None, &options).unwrap();
    let path = ProfileCache::new(dir.path())
        .path(BUILD, profile_cache::EntryKind::Symbols)
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    // Rename a symbol inside the file without fixing the checksum.
    let at = bytes.windows(11).position(|w| w == b"test_helper").unwrap();
    bytes[at] = b'T';
    std::fs::write(&path, &bytes).unwrap();
    let kernel = Kernel::discover(&fake.mem, None, &options).unwrap();
    match symbols_outcome(&kernel) {
        CacheUse::Miss { reason, stored } => {
            assert!(reason.contains("checksum"), "{reason}");
            assert!(stored);
        }
        other => panic!("edited cache file used: {other:?}"),
    }
    check_symbols(kernel.symbols());
    // Truncated to its header: the same.
    std::fs::write(&path, &bytes[..profile_cache::HEADER_LEN]).unwrap();
    let kernel = Kernel::discover(&fake.mem, None, &options).unwrap();
    assert!(matches!(
        symbols_outcome(&kernel),
        CacheUse::Miss { stored: true, .. }
    ));
    let kernel = Kernel::discover(&fake.mem, None, &options).unwrap();
    assert!(matches!(symbols_outcome(&kernel), CacheUse::Hit { .. }));
    check_symbols(kernel.symbols());
}

#[test]
fn a_remembered_address_holding_a_forged_copy_falls_back_to_the_scan() {
    let fake = fake_guest(false);
    let dir = tempfile::tempdir().unwrap();
    let options = cached(dir.path());
    Kernel::discover(&fake.mem, None, &options).unwrap();
    // Point the remembered address at the planted copy (same build id, wrong release).
    let store = ProfileCache::new(dir.path());
    let Some(profile_cache::CacheFile::Symbols(mut entry)) = store
        .load(BUILD, profile_cache::EntryKind::Symbols)
        .unwrap()
    else {
        panic!("no symbols entry")
    };
    entry.vmcoreinfo_gpa = Some(Gpa(0x10_0000));
    store
        .store(&profile_cache::CacheFile::Symbols(entry))
        .unwrap();
    let kernel = Kernel::discover(&fake.mem, None, &options).unwrap();
    match &kernel.provenance().vmcoreinfo {
        VmcoreinfoSource::Scan { chosen, .. } => assert_eq!(*chosen, Gpa(0x80_0000)),
        other => panic!("{other:?}"),
    }
    assert_eq!(kernel.release(), RELEASE);
    check_symbols(kernel.symbols());
    // The names were still good; the address was corrected.
    assert!(matches!(symbols_outcome(&kernel), CacheUse::Hit { .. }));
    assert_eq!(store.hints(), vec![(BUILD.to_string(), Gpa(0x80_0000))]);
    let kernel = Kernel::discover(&fake.mem, None, &options).unwrap();
    assert!(kernel.profile_cache().unwrap().vmcoreinfo_remembered);
}

#[test]
fn an_unwritable_cache_is_no_error() {
    let fake = fake_guest(false);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), b"").unwrap();
    let options = cached(&dir.path().join("file").join("profiles"));
    let kernel = Kernel::discover(&fake.mem, None, &options).unwrap();
    assert!(matches!(
        symbols_outcome(&kernel),
        CacheUse::Miss { stored: false, .. }
    ));
    check_symbols(kernel.symbols());
}

/// A fake guest whose VMCOREINFO (provided, as from a dump) also locates a BTF blob.
fn with_btf(fake: &Fake) -> (String, Vec<u8>) {
    let mut b = kvmaccess_btf::encode::BtfBuilder::new();
    let int = b.int("int", 4, true);
    let long = b.int("long", 8, true);
    b.struct_(
        "task_struct",
        16,
        &[("pid", int, 0, 0), ("flags", long, 64, 0)],
    );
    b.struct_(
        "list_head",
        16,
        &[("next", long, 0, 0), ("prev", long, 64, 0)],
    );
    let blob = b.build();
    let at = TEXT + 0x50_0000;
    fake.mem.write_bytes(image_phys(at), &blob).unwrap();
    let mut text = vmcoreinfo_text(&fake.blob, fake.root.0 - TEXT_PHYS + TEXT, RELEASE, false);
    text.pop();
    text.push_str(&format!(
        "SYMBOL(__start_BTF)={at:x}\nSYMBOL(__stop_BTF)={:x}\n",
        at + blob.len() as u64
    ));
    (text, blob)
}

#[test]
fn btf_name_index_is_cached_and_checked() {
    let fake = fake_guest(false);
    let (text, blob) = with_btf(&fake);
    let dir = tempfile::tempdir().unwrap();
    let options = cached(dir.path());
    let first = Kernel::from_vmcoreinfo_text(&fake.mem, &text, &options).unwrap();
    assert_eq!(first.profile_cache().unwrap().types, CacheUse::Unused);
    let types = first.load_types().unwrap();
    assert!(matches!(
        first.profile_cache().unwrap().types,
        CacheUse::Miss { stored: true, .. }
    ));
    let second = Kernel::from_vmcoreinfo_text(&fake.mem, &text, &options).unwrap();
    assert_eq!(second.provenance().vmcoreinfo, VmcoreinfoSource::Provided);
    assert!(matches!(symbols_outcome(&second), CacheUse::Hit { .. }));
    let cached_types = second.load_types().unwrap();
    assert!(matches!(
        second.profile_cache().unwrap().types,
        CacheUse::Hit { .. }
    ));
    assert_eq!(cached_types.btf.name_index(), types.btf.name_index());
    assert_eq!(cached_types.offset_of("task_struct", "flags").unwrap(), 8);

    // A changed blob (one member renamed in the string table) is parsed afresh.
    let at = blob.windows(5).position(|w| w == b"flags").unwrap();
    fake.mem
        .write_bytes(image_phys(TEXT + 0x50_0000 + at as u64), b"g")
        .unwrap();
    let third = Kernel::from_vmcoreinfo_text(&fake.mem, &text, &options).unwrap();
    let changed = third.load_types().unwrap();
    assert!(matches!(
        third.profile_cache().unwrap().types,
        CacheUse::Miss { .. }
    ));
    assert!(changed.offset_of("task_struct", "flags").is_err());
}
