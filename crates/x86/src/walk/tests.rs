use kvmaccess_core::{Gpa, Gva, PhysicalMemory};
use kvmaccess_testkit::{
    bits, MapFlags, MockMemory, PageSize as TkSize, PageTableBuilder, TableFormat, TableLevel,
};

use super::*;

/// Plenty of sparse RAM: 1 GiB pages need frames above 1 GiB.
const RAM: u64 = 1 << 36;

fn mode_of(format: TableFormat) -> PagingMode {
    match format {
        TableFormat::Bits32 => PagingMode::Bits32,
        TableFormat::Pae => PagingMode::Pae,
        TableFormat::Level4 => PagingMode::Level4,
        TableFormat::Level5 => PagingMode::Level5,
    }
}

fn level_of(level: TableLevel) -> Level {
    match level {
        TableLevel::Pml5 => Level::Pml5,
        TableLevel::Pml4 => Level::Pml4,
        TableLevel::Pdpt => Level::Pdpt,
        TableLevel::Pd => Level::Pd,
        TableLevel::Pt => Level::Pt,
    }
}

/// A kernel-looking address each format can map.
fn sample_gva(format: TableFormat) -> Gva {
    match format {
        TableFormat::Bits32 | TableFormat::Pae => Gva(0xc012_3000),
        TableFormat::Level4 => Gva(0xffff_8880_0012_3000),
        TableFormat::Level5 => Gva(0xff11_0000_0012_3000),
    }
}

const ALL_FORMATS: [TableFormat; 4] = [
    TableFormat::Bits32,
    TableFormat::Pae,
    TableFormat::Level4,
    TableFormat::Level5,
];

#[test]
fn four_k_pages_in_every_mode() {
    for format in ALL_FORMATS {
        let mem = MockMemory::new(RAM);
        let mut tables = PageTableBuilder::new(&mem, format).unwrap();
        let gva = sample_gva(format);
        tables
            .map(
                gva,
                Gpa(0x50_0000),
                TkSize::Size4K,
                MapFlags::KERNEL_RW.global().dirty(),
            )
            .unwrap();
        let mode = mode_of(format);
        let t = translate(&mem, mode, tables.cr3(), Gva(gva.0 + 0x123)).unwrap();
        assert_eq!(t.gpa, Gpa(0x50_0123), "{format:?}");
        assert_eq!(t.mapping.page_base, Gpa(0x50_0000));
        assert_eq!(t.mapping.virt_base, gva);
        assert_eq!(t.mapping.page_size, PageSize::Size4K);
        assert!(t.mapping.writable && !t.mapping.user && !t.mapping.nx);
        assert!(t.mapping.global && t.mapping.dirty && t.mapping.accessed);

        let steps = t.trail.as_slice();
        let expected: Vec<Level> = tables
            .levels()
            .iter()
            .map(|(l, _, _)| level_of(*l))
            .collect();
        assert_eq!(steps.iter().map(|s| s.level).collect::<Vec<_>>(), expected);
        assert_eq!(steps.len(), mode.levels());
        for (step, (level, _, _)) in steps.iter().zip(tables.levels()) {
            let entry = tables.entry_addr(gva, *level).unwrap().unwrap();
            assert_eq!(step.entry_addr, entry, "{format:?} {level:?}");
            assert_eq!(step.value, tables.read_entry(entry).unwrap());
        }
        assert_eq!(t.trail.leaf().map(|s| s.level), Some(Level::Pt));
    }
}

#[test]
fn large_pages_in_every_mode() {
    let cases = [
        // PSE-36: a 4 MiB page above 4 GiB.
        (
            TableFormat::Bits32,
            Gva(0x8040_0000),
            Gpa(0x3_0040_0000),
            TkSize::Size4M,
            PageSize::Size4M,
        ),
        (
            TableFormat::Pae,
            Gva(0xc020_0000),
            Gpa(0x1_0060_0000),
            TkSize::Size2M,
            PageSize::Size2M,
        ),
        (
            TableFormat::Level4,
            Gva(0xffff_8880_0020_0000),
            Gpa(0x20_0000),
            TkSize::Size2M,
            PageSize::Size2M,
        ),
        (
            TableFormat::Level4,
            Gva(0xffff_8880_4000_0000),
            Gpa(0x8_4000_0000),
            TkSize::Size1G,
            PageSize::Size1G,
        ),
        (
            TableFormat::Level5,
            Gva(0xff11_0000_4000_0000),
            Gpa(0x4000_0000),
            TkSize::Size1G,
            PageSize::Size1G,
        ),
        (
            TableFormat::Level5,
            Gva(0x0000_7fff_ffe0_0000),
            Gpa(0x60_0000),
            TkSize::Size2M,
            PageSize::Size2M,
        ),
    ];
    for (format, gva, gpa, tk_size, size) in cases {
        let mem = MockMemory::new(RAM);
        let mut tables = PageTableBuilder::new(&mem, format).unwrap();
        tables.map(gva, gpa, tk_size, MapFlags::USER_RW).unwrap();
        let offset = size.bytes() - 8;
        let t = translate(&mem, mode_of(format), tables.cr3(), Gva(gva.0 + offset)).unwrap();
        assert_eq!(t.gpa, Gpa(gpa.0 + offset), "{format:?} {size:?}");
        assert_eq!(t.mapping.page_size, size);
        assert_eq!(t.mapping.page_base, gpa);
        assert_eq!(t.mapping.virt_base, gva);
        assert!(t.mapping.user && t.mapping.writable);
        let leaf = t.trail.leaf().unwrap();
        assert_ne!(leaf.value & bits::PS, 0);
        assert_eq!(
            t.trail.as_slice().len(),
            mode_of(format).levels() - if size == PageSize::Size1G { 2 } else { 1 }
        );
    }
}

#[test]
fn ps_bit_is_ignored_in_32_bit_paging_without_pse() {
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Bits32).unwrap();
    tables
        .map(
            Gva(0x8040_0000),
            Gpa(0x40_0000),
            TkSize::Size4M,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    let options = WalkOptions {
        pse: false,
        ..WalkOptions::default()
    };
    // Without PSE the PDE points at a page table, here the (zeroed) 4 MiB frame.
    let err = translate_with(
        &mem,
        PagingMode::Bits32,
        tables.cr3(),
        Gva(0x8040_1000),
        &options,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::NotPresent { level: Level::Pt, entry_addr, .. } if entry_addr == Gpa(0x40_0004)),
        "{err}"
    );
}

#[test]
fn not_present_at_each_level() {
    for format in ALL_FORMATS {
        let levels = {
            let mem = MockMemory::new(RAM);
            PageTableBuilder::new(&mem, format).unwrap().levels()
        };
        for &(level, _, _) in levels {
            let mem = MockMemory::new(RAM);
            let mut tables = PageTableBuilder::new(&mem, format).unwrap();
            let gva = sample_gva(format);
            tables
                .map(gva, Gpa(0x50_0000), TkSize::Size4K, MapFlags::KERNEL_RW)
                .unwrap();
            let entry = tables.modify_entry(gva, level, 0, bits::P).unwrap();
            let value = tables.read_entry(entry).unwrap();
            let err = translate(&mem, mode_of(format), tables.cr3(), gva).unwrap_err();
            match err {
                Error::NotPresent {
                    gva: err_gva,
                    level: err_level,
                    entry_addr,
                    value: err_value,
                } => {
                    assert_eq!(
                        (err_gva, err_level, entry_addr, err_value),
                        (gva, level_of(level), entry, value)
                    );
                }
                other => panic!("{format:?} {level:?}: {other}"),
            }
        }
    }
    // An empty root fails at the top level.
    let mem = MockMemory::new(RAM);
    let tables = PageTableBuilder::new(&mem, TableFormat::Level5).unwrap();
    let err = translate(&mem, PagingMode::Level5, tables.cr3(), Gva(0)).unwrap_err();
    assert!(matches!(
        err,
        Error::NotPresent {
            level: Level::Pml5,
            value: 0,
            ..
        }
    ));
}

/// Map a 4K page (or a large one), set `set` in the entry at `level`, and return the error.
fn reserved_case(
    format: TableFormat,
    size: TkSize,
    level: TableLevel,
    set: u64,
    options: WalkOptions,
) -> Result<Translation, Error> {
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, format).unwrap();
    let gva = match (format, size) {
        (TableFormat::Level4 | TableFormat::Level5, TkSize::Size1G) => Gva(0x4000_0000),
        (_, TkSize::Size4M) => Gva(0x40_0000),
        _ => Gva(0x20_0000),
    };
    let gpa = Gpa(size.bytes());
    tables.map(gva, gpa, size, MapFlags::KERNEL_RW).unwrap();
    tables.modify_entry(gva, level, set, 0).unwrap();
    translate_with(&mem, mode_of(format), tables.cr3(), gva, &options)
}

fn expect_reserved(result: Result<Translation, Error>, level: Level, bits_set: u64) {
    match result {
        Err(Error::ReservedBits {
            level: err_level,
            reserved,
            ..
        }) => assert_eq!((err_level, reserved), (level, bits_set)),
        Err(other) => panic!("expected reserved bits at {level}, got {other}"),
        Ok(t) => panic!("expected reserved bits at {level}, got {t:?}"),
    }
}

#[test]
fn reserved_bits_at_each_level() {
    let default = WalkOptions::default();
    let narrow = WalkOptions::default().with_phys_addr_bits(39);
    let no_nx = WalkOptions {
        nx_enabled: false,
        ..default
    };
    use TableFormat::*;
    use TableLevel as L;
    use TkSize::*;

    // Long mode: PS is reserved in PML4E/PML5E.
    expect_reserved(
        reserved_case(Level4, Size4K, L::Pml4, bits::PS, default),
        Level::Pml4,
        bits::PS,
    );
    expect_reserved(
        reserved_case(Level5, Size4K, L::Pml5, bits::PS, default),
        Level::Pml5,
        bits::PS,
    );
    // Bits at and above MAXPHYADDR, at every level.
    for level in [L::Pml5, L::Pml4, L::Pdpt, L::Pd, L::Pt] {
        expect_reserved(
            reserved_case(Level5, Size4K, level, 1 << 45, narrow),
            level_of(level),
            1 << 45,
        );
    }
    // Large-page address fields have reserved low bits.
    expect_reserved(
        reserved_case(Level4, Size1G, L::Pdpt, 1 << 13, default),
        Level::Pdpt,
        1 << 13,
    );
    expect_reserved(
        reserved_case(Level4, Size2M, L::Pd, 1 << 20, default),
        Level::Pd,
        1 << 20,
    );
    // XD without EFER.NXE.
    expect_reserved(
        reserved_case(Level4, Size4K, L::Pt, bits::XD, no_nx),
        Level::Pt,
        bits::XD,
    );
    expect_reserved(
        reserved_case(Level4, Size4K, L::Pml4, bits::XD, no_nx),
        Level::Pml4,
        bits::XD,
    );
    // Bits 62:52 are ignored in long mode (protection keys), but reserved in PAE.
    let t = reserved_case(Level4, Size4K, L::Pt, 0x7ff << 52, default).unwrap();
    assert_eq!(t.gpa, Gpa(0x1000));
    expect_reserved(
        reserved_case(Pae, Size4K, L::Pt, 1 << 60, default),
        Level::Pt,
        1 << 60,
    );

    // PAE PDPTEs: R/W, U/S, bits 8:5 and XD are reserved.
    expect_reserved(
        reserved_case(Pae, Size4K, L::Pdpt, bits::RW, default),
        Level::Pdpt,
        bits::RW,
    );
    expect_reserved(
        reserved_case(Pae, Size4K, L::Pdpt, bits::PS | bits::A, default),
        Level::Pdpt,
        bits::PS | bits::A,
    );
    expect_reserved(
        reserved_case(Pae, Size4K, L::Pdpt, bits::XD, default),
        Level::Pdpt,
        bits::XD,
    );
    expect_reserved(
        reserved_case(Pae, Size2M, L::Pd, 1 << 13, default),
        Level::Pd,
        1 << 13,
    );
    expect_reserved(
        reserved_case(Pae, Size4K, L::Pd, bits::XD, no_nx),
        Level::Pd,
        bits::XD,
    );
    expect_reserved(
        reserved_case(Pae, Size4K, L::Pt, 1 << 40, narrow),
        Level::Pt,
        1 << 40,
    );

    // 32-bit 4 MiB pages: bit 21 always, PSE-36 bits past MAXPHYADDR.
    expect_reserved(
        reserved_case(Bits32, Size4M, L::Pd, 1 << 21, default),
        Level::Pd,
        1 << 21,
    );
    let m36 = default.with_phys_addr_bits(36);
    expect_reserved(
        reserved_case(Bits32, Size4M, L::Pd, 1 << 17, m36),
        Level::Pd,
        1 << 17,
    );
    let t = reserved_case(Bits32, Size4M, L::Pd, 1 << 16, m36).unwrap();
    assert_eq!(t.gpa, Gpa((1 << 35) | 0x40_0000));
    // 4-byte entries of 4 KiB mappings have no reserved bits.
    assert!(reserved_case(Bits32, Size4K, L::Pt, 0xe00, default).is_ok());
}

#[test]
fn non_canonical_and_beyond_4g() {
    let mem = MockMemory::new(RAM);
    for (mode, gva) in [
        (PagingMode::Level4, 0x0000_8000_0000_0000),
        (PagingMode::Level4, 0xffff_0000_0000_0000),
        (PagingMode::Level4, 0x8000_0000_0000_0000),
        (PagingMode::Level5, 0x0100_0000_0000_0000),
        (PagingMode::Level5, 0xfe00_0000_0000_0000),
    ] {
        let err = translate(&mem, mode, 0x10_0000, Gva(gva)).unwrap_err();
        assert!(
            matches!(err, Error::NonCanonical { .. }),
            "{mode} {gva:#x}: {err}"
        );
        assert!(err.to_string().contains("not canonical"), "{err}");
    }
    // Canonical under 5-level paging though not under 4-level: the walk starts.
    let err = translate(
        &mem,
        PagingMode::Level5,
        0x10_0000,
        Gva(0x0000_8000_0000_0000),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotPresent {
                level: Level::Pml5,
                ..
            }
        ),
        "{err}"
    );

    for mode in [PagingMode::Disabled, PagingMode::Bits32, PagingMode::Pae] {
        let err = translate(&mem, mode, 0x10_0000, Gva(0x1_0000_0000)).unwrap_err();
        assert!(matches!(err, Error::Beyond4G { .. }), "{mode}: {err}");
    }
}

#[test]
fn paging_disabled_is_identity() {
    let mem = MockMemory::new(RAM);
    mem.write_u32(Gpa(0xb8000), 0x0741_0748).unwrap();
    let t = translate(&mem, PagingMode::Disabled, 0xdead_b000, Gva(0xb8002)).unwrap();
    assert_eq!(t.gpa, Gpa(0xb8002));
    assert!(t.trail.as_slice().is_empty());
    let mut buf = [0; 2];
    read_virt(&mem, PagingMode::Disabled, 0, Gva(0xb8002), &mut buf).unwrap();
    assert_eq!(buf, [0x41, 0x07]);
}

#[test]
fn permissions_accumulate_over_levels() {
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    let gva = Gva(0x7f00_0000_1000);
    tables
        .map(gva, Gpa(0x50_0000), TkSize::Size4K, MapFlags::USER_RW)
        .unwrap();
    let walk = |tables: &PageTableBuilder<'_>| {
        translate(&mem, PagingMode::Level4, tables.cr3(), gva)
            .unwrap()
            .mapping
    };
    let m = walk(&tables);
    assert!(m.writable && m.user && !m.nx);

    tables
        .modify_entry(gva, TableLevel::Pdpt, 0, bits::RW)
        .unwrap();
    let m = walk(&tables);
    assert!(!m.writable && m.user && !m.nx);

    tables
        .modify_entry(gva, TableLevel::Pml4, 0, bits::US)
        .unwrap();
    tables
        .modify_entry(gva, TableLevel::Pd, bits::XD, 0)
        .unwrap();
    let m = walk(&tables);
    assert!(!m.writable && !m.user && m.nx);
    // Upper-level G/D/A bits are not the leaf's.
    assert!(!m.global && !m.dirty && !m.accessed);

    // PAE: PDPTEs carry no permissions, XD below them counts.
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Pae).unwrap();
    tables
        .map(
            Gva(0x1000),
            Gpa(0x50_0000),
            TkSize::Size4K,
            MapFlags::USER_RW.nx(),
        )
        .unwrap();
    let m = translate(&mem, PagingMode::Pae, tables.cr3(), Gva(0x1000))
        .unwrap()
        .mapping;
    assert!(m.writable && m.user && m.nx);

    // 32-bit paging has no XD bit: bit 31 of a 4-byte entry is an address bit.
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Bits32).unwrap();
    tables
        .map(
            Gva(0x1000),
            Gpa(0x8000_0000),
            TkSize::Size4K,
            MapFlags::KERNEL_RO.nx(),
        )
        .unwrap();
    let t = translate(&mem, PagingMode::Bits32, tables.cr3(), Gva(0x1000)).unwrap();
    assert!(!t.mapping.nx && !t.mapping.writable && !t.mapping.user);
    assert_eq!(t.gpa, Gpa(0x8000_0000));
}

#[test]
fn table_read_failures_name_the_level() {
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    let gva = Gva(0xffff_ffff_8100_0000);
    tables
        .map(gva, Gpa(0x50_0000), TkSize::Size4K, MapFlags::KERNEL_RW)
        .unwrap();
    let pd_entry = tables.entry_addr(gva, TableLevel::Pd).unwrap().unwrap();
    mem.fail_reads_at(pd_entry);
    let err = translate(&mem, PagingMode::Level4, tables.cr3(), gva).unwrap_err();
    assert!(
        matches!(&err, Error::TableRead { level: Level::Pd, entry_addr, .. } if *entry_addr == pd_entry),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("PD entry") && text.contains("injected"),
        "{text}"
    );
    assert!(std::error::Error::source(&err).is_some());

    // A root table outside RAM.
    let err = translate(&mem, PagingMode::Level4, 0xf_0000_0000_0000, gva).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TableRead {
                level: Level::Pml4,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn self_referencing_tables_end_after_the_last_level() {
    let mem = MockMemory::new(RAM);
    let tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    let root = tables.root();
    // A recursive PML4 slot (Windows-style self map), writable.
    let slot = 0x1ed;
    tables
        .write_entry(Gpa(root.0 + slot * 8), root.0 | bits::P | bits::RW)
        .unwrap();
    // Going through the slot four times lands on the PML4 itself as a 4 KiB page.
    let self_map = (slot << 39) | (slot << 30) | (slot << 21) | (slot << 12);
    let gva = Gva(0xffff_0000_0000_0000 | self_map | (slot * 8));
    let t = translate(&mem, PagingMode::Level4, tables.cr3(), gva).unwrap();
    assert_eq!(t.gpa, Gpa(root.0 + slot * 8));
    assert_eq!(t.trail.as_slice().len(), 4);
    assert!(t
        .trail
        .as_slice()
        .iter()
        .all(|s| s.entry_addr == Gpa(root.0 + slot * 8)));
}

#[test]
fn cr3_control_bits_are_ignored() {
    let mem = MockMemory::new(RAM);
    // PAE roots are 32-byte aligned: put the PDPT at offset 0x60 of a frame.
    let mut tables = PageTableBuilder::with_root(&mem, TableFormat::Pae, Gpa(0x9060));
    tables
        .map(
            Gva(0xc000_0000),
            Gpa(0x50_0000),
            TkSize::Size4K,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    let t = translate(&mem, PagingMode::Pae, 0x9060 | 0x18, Gva(0xc000_0000)).unwrap();
    assert_eq!(t.gpa, Gpa(0x50_0000));
    assert_eq!(t.trail.as_slice()[0].entry_addr, Gpa(0x9060 + 3 * 8));

    let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    tables
        .map(
            Gva(0x1000),
            Gpa(0x50_0000),
            TkSize::Size4K,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    let cr3 = tables.cr3() | 0x123 | (1 << 63) | (1 << 61);
    assert_eq!(
        translate(&mem, PagingMode::Level4, cr3, Gva(0x1000))
            .unwrap()
            .gpa,
        Gpa(0x50_0000)
    );
}

/// Three pages: the first two physically adjacent, the third elsewhere, then a hole.
fn three_pages(mem: &MockMemory) -> PageTableBuilder<'_> {
    let mut tables = PageTableBuilder::new(mem, TableFormat::Level4).unwrap();
    tables
        .map_4k_range(Gva(0x40_1000), Gpa(0x50_0000), 2, MapFlags::USER_RW)
        .unwrap();
    tables
        .map(
            Gva(0x40_3000),
            Gpa(0x70_0000),
            TkSize::Size4K,
            MapFlags::USER_RW,
        )
        .unwrap();
    tables
}

#[test]
fn ranges_split_into_contiguous_chunks() {
    let mem = MockMemory::new(RAM);
    let tables = three_pages(&mem);
    let chunks: Vec<VirtChunk> = translate_range(
        &mem,
        PagingMode::Level4,
        tables.cr3(),
        Gva(0x40_1800),
        0x2000,
    )
    .collect::<Result<_, _>>()
    .unwrap();
    assert_eq!(
        chunks,
        [
            VirtChunk {
                gva: Gva(0x40_1800),
                gpa: Gpa(0x50_0800),
                len: 0x1800
            },
            VirtChunk {
                gva: Gva(0x40_3000),
                gpa: Gpa(0x70_0000),
                len: 0x800
            },
        ]
    );
    assert_eq!(
        translate_range(&mem, PagingMode::Level4, tables.cr3(), Gva(0x40_1800), 0).count(),
        0
    );

    // The good part comes first, then the failure, then nothing.
    let mut iter = translate_range(
        &mem,
        PagingMode::Level4,
        tables.cr3(),
        Gva(0x40_3f00),
        0x200,
    );
    assert_eq!(iter.next().unwrap().unwrap().len, 0x100);
    let err = iter.next().unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotPresent {
                gva: Gva(0x40_4000),
                ..
            }
        ),
        "{err}"
    );
    assert!(iter.next().is_none());

    let mut iter = translate_range(&mem, PagingMode::Level4, tables.cr3(), Gva(u64::MAX - 4), 6);
    assert!(matches!(iter.next(), Some(Err(Error::RangeWraps { .. }))));
    assert!(iter.next().is_none());
}

#[test]
fn a_range_may_end_at_the_top_of_the_address_space() {
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    let top = Gva(0xffff_ffff_ffff_f000);
    tables
        .map(top, Gpa(0x50_0000), TkSize::Size4K, MapFlags::KERNEL_RW)
        .unwrap();
    mem.write_u64(Gpa(0x50_0ff8), 0x1122_3344_5566_7788)
        .unwrap();
    let mut buf = [0; 8];
    read_virt(
        &mem,
        PagingMode::Level4,
        tables.cr3(),
        Gva(u64::MAX - 7),
        &mut buf,
    )
    .unwrap();
    assert_eq!(u64::from_le_bytes(buf), 0x1122_3344_5566_7788);
    let chunks: Vec<_> =
        translate_range(&mem, PagingMode::Level4, tables.cr3(), top, 0x1000).collect();
    assert_eq!(chunks.len(), 1);
}

#[test]
fn read_and_write_across_pages() {
    let mem = MockMemory::new(RAM);
    let tables = three_pages(&mem);
    let cr3 = tables.cr3();
    let data: Vec<u8> = (0..0x2400u32).map(|i| (i * 7 % 251) as u8).collect();
    write_virt(&mem, PagingMode::Level4, cr3, Gva(0x40_1c00), &data).unwrap();

    let mut back = vec![0; data.len()];
    read_virt(&mem, PagingMode::Level4, cr3, Gva(0x40_1c00), &mut back).unwrap();
    assert_eq!(back, data);
    // The bytes landed in the right frames.
    let mut first = [0; 4];
    mem.peek(Gpa(0x50_0c00), &mut first).unwrap();
    assert_eq!(first, data[..4]);
    let mut last = [0; 4];
    mem.peek(Gpa(0x70_0ffc), &mut last).unwrap();
    assert_eq!(last, data[data.len() - 4..]);

    // Data reads that fail name the physical address.
    mem.fail_reads_at(Gpa(0x70_0010));
    let err = read_virt(
        &mem,
        PagingMode::Level4,
        cr3,
        Gva(0x40_2ff0),
        &mut [0; 0x40],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::PhysRead {
                gpa: Gpa(0x70_0000),
                ..
            }
        ),
        "{err}"
    );
    let core: kvmaccess_core::Error = err.into();
    assert!(matches!(core, kvmaccess_core::Error::Backend { .. }));

    let err = write_virt(&mem, PagingMode::Level4, cr3, Gva(0x40_3ff0), &[0; 0x20]).unwrap_err();
    let core: kvmaccess_core::Error = err.into();
    assert!(
        matches!(
            core,
            kvmaccess_core::Error::VirtUnmapped {
                gva: Gva(0x40_4000),
                ..
            }
        ),
        "{core}"
    );
}

#[test]
fn errors_say_what_and_where() {
    let mem = MockMemory::new(RAM);
    let tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    let err = translate(
        &mem,
        PagingMode::Level4,
        tables.cr3(),
        Gva(0xffff_8000_0000_0000),
    )
    .unwrap_err();
    let text = err.to_string();
    assert_eq!(
        text,
        format!(
            "0xffff800000000000: PML4 entry at {:#x} is not present (value 0x0)",
            tables.root().0 + 256 * 8
        )
    );
    assert_eq!(err.gva(), Some(Gva(0xffff_8000_0000_0000)));
    let reserved = reserved_case(
        TableFormat::Level4,
        TkSize::Size4K,
        TableLevel::Pml4,
        bits::PS,
        WalkOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        reserved.contains("PML4 entry") && reserved.contains("reserved bits 0x80"),
        "{reserved}"
    );
}

#[test]
fn serializes_for_the_cli() {
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    tables
        .map(
            Gva(0x20_0000),
            Gpa(0x20_0000),
            TkSize::Size2M,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    let t = translate(&mem, PagingMode::Level4, tables.cr3(), Gva(0x20_0010)).unwrap();
    let json = serde_json::to_value(t).unwrap();
    assert_eq!(json["gpa"], "0x200010");
    assert_eq!(json["page_size"], "2M");
    assert_eq!(json["trail"].as_array().unwrap().len(), 3);
    assert_eq!(json["trail"][0]["level"], "PML4");
    assert_eq!(json["writable"], true);

    let text = t.to_string();
    let pml4 = tables
        .entry_addr(Gva(0x20_0000), TableLevel::Pml4)
        .unwrap()
        .unwrap();
    assert!(
        text.starts_with("0x200010 -> 0x200010 (2M page 0x200000 -> 0x200000 W)\n  PML4 entry at "),
        "{text}"
    );
    assert!(
        text.contains(&format!("PML4 entry at {pml4} = 0x")),
        "{text}"
    );
    assert!(text.contains("\n  PD   entry at "), "{text}");
    assert_eq!(text.lines().count(), 4);
}

#[test]
fn works_through_trait_objects() {
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    tables
        .map(
            Gva(0x1000),
            Gpa(0x50_0000),
            TkSize::Size4K,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    mem.write_u64(Gpa(0x50_0000), 7).unwrap();
    let dyn_mem: &dyn PhysicalMemory = &mem;
    assert_eq!(
        translate(dyn_mem, PagingMode::Level4, tables.cr3(), Gva(0x1000))
            .unwrap()
            .gpa,
        Gpa(0x50_0000)
    );
    let mut space = crate::AddressSpace::new(dyn_mem, PagingMode::Level4, tables.cr3());
    assert_eq!(space.read_u64(Gva(0x1000)).unwrap(), 7);
    let dyn_write: &dyn kvmaccess_core::PhysicalMemoryWrite = &mem;
    write_virt(
        dyn_write,
        PagingMode::Level4,
        tables.cr3(),
        Gva(0x1000),
        &[9],
    )
    .unwrap();
    assert_eq!(space.read_u64(Gva(0x1000)).unwrap(), 9);
}

/// xorshift64*: deterministic, dependency-free noise for the robustness test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_tables_never_panic() {
    const SIZE: usize = 64 * 1024;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let modes = [
        PagingMode::Disabled,
        PagingMode::Bits32,
        PagingMode::Pae,
        PagingMode::Level4,
        PagingMode::Level5,
    ];
    let mut outcomes = [0usize; 2];
    for round in 0..64 {
        // Mostly entries that point back into this memory, so walks go deep.
        let mut bytes = Vec::with_capacity(SIZE);
        while bytes.len() < SIZE {
            let mut word = rng.next();
            if word % 4 != 0 {
                word = (word & (0xfff | (0x7ff << 52) | (1 << 63))) | (rng.next() & 0xf000);
            }
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        let mem = MockMemory::from_bytes(Gpa(0), &bytes).unwrap();
        for _ in 0..200 {
            let mode = modes[(rng.next() % 5) as usize];
            let cr3 = if rng.next() % 8 == 0 {
                rng.next()
            } else {
                rng.next() & 0xffff
            };
            let gva = Gva(match rng.next() % 3 {
                0 => rng.next(),
                1 => rng.next() & 0xffff_ffff,
                _ => rng.next() | 0xffff_8000_0000_0000,
            });
            let options = WalkOptions {
                phys_addr_bits: (rng.next() % 70) as u8,
                nx_enabled: rng.next() % 2 == 0,
                pse: rng.next() % 2 == 0,
            };
            let result = translate_with(&mem, mode, cr3, gva, &options);
            outcomes[usize::from(result.is_ok())] += 1;
            if let Ok(t) = result {
                assert_eq!(
                    t.gpa.0 & t.mapping.page_size.offset_mask(),
                    gva.0 & t.mapping.page_size.offset_mask()
                );
                assert!(t.trail.as_slice().len() <= mode.levels());
            }
            let mut buf = vec![0; (rng.next() % 0x3000) as usize];
            let _ = read_virt(&mem, mode, cr3, gva, &mut buf);
            let _ = translate_range(&mem, mode, cr3, gva, rng.next() >> (rng.next() % 64))
                .take(4)
                .count();
        }
        assert!(round < 64);
    }
    // Both outcomes happen, so the test exercises real walks and not only early rejections.
    assert!(outcomes[0] > 100 && outcomes[1] > 100, "{outcomes:?}");
}

#[test]
fn memory_reads_per_walk_match_the_levels() {
    struct Counting<'a>(&'a MockMemory, std::sync::atomic::AtomicUsize);
    impl PhysicalMemory for Counting<'_> {
        fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), kvmaccess_core::Error> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.read_phys(gpa, buf)
        }
        fn ranges(&self) -> &[kvmaccess_core::PhysRange] {
            self.0.ranges()
        }
    }
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Level5).unwrap();
    tables
        .map(
            Gva(0x1000),
            Gpa(0x50_0000),
            TkSize::Size4K,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    let counting = Counting(&mem, Default::default());
    translate(&counting, PagingMode::Level5, tables.cr3(), Gva(0x1000)).unwrap();
    assert_eq!(counting.1.load(std::sync::atomic::Ordering::Relaxed), 5);
}
