use kvmaccess_core::{Gpa, Gva, PhysRange, PhysicalMemory, Registers, Segment};
use kvmaccess_testkit::{
    bits, MapFlags, MockMemory, PageSize as TkSize, PageTableBuilder, TableFormat, TableLevel,
};

use super::*;
use crate::Level;

const RAM: u64 = 1 << 36;
const GVA: Gva = Gva(0x7fff_0000_1000);
const FRAME_A: Gpa = Gpa(0x50_0000);
const FRAME_B: Gpa = Gpa(0x60_0000);

/// Memory with `GVA` mapped to `FRAME_A`; frame A holds 0xaaaa..., frame B 0xbbbb....
fn setup(mem: &MockMemory) -> PageTableBuilder<'_> {
    let mut tables = PageTableBuilder::new(mem, TableFormat::Level4).unwrap();
    tables
        .map(GVA, FRAME_A, TkSize::Size4K, MapFlags::USER_RW)
        .unwrap();
    mem.write_u64(FRAME_A, 0xaaaa_aaaa_aaaa_aaaa).unwrap();
    mem.write_u64(FRAME_B, 0xbbbb_bbbb_bbbb_bbbb).unwrap();
    tables
}

#[test]
fn second_read_hits() {
    let mem = MockMemory::new(RAM);
    let tables = setup(&mem);
    let mut space = AddressSpace::new(&mem, PagingMode::Level4, tables.cr3());
    assert_eq!(space.read_u64(GVA).unwrap(), 0xaaaa_aaaa_aaaa_aaaa);
    assert_eq!(
        space.cache().stats(),
        CacheStats {
            hits: 0,
            misses: 1,
            stale: 0
        }
    );
    assert_eq!(space.read_u32(Gva(GVA.0 + 4)).unwrap(), 0xaaaa_aaaa);
    assert_eq!(
        space.gpa(Gva(GVA.0 + 0xfff)).unwrap(),
        Gpa(FRAME_A.0 + 0xfff)
    );
    assert_eq!(space.cache().stats().hits, 2);
}

#[test]
fn one_large_page_serves_all_its_small_pages() {
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    tables
        .map(
            Gva(0x4000_0000),
            Gpa(0x8000_0000),
            TkSize::Size1G,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    tables
        .map(
            Gva(0x20_0000),
            Gpa(0x40_0000),
            TkSize::Size2M,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    let mut space = AddressSpace::new(&mem, PagingMode::Level4, tables.cr3());
    for page in 0..64u64 {
        let gva = Gva(0x4000_0000 + page * 0x10_1000);
        assert_eq!(space.gpa(gva).unwrap(), Gpa(0x8000_0000 + page * 0x10_1000));
        let gva = Gva(0x20_0000 + page * 0x7000);
        assert_eq!(space.gpa(gva).unwrap(), Gpa(0x40_0000 + page * 0x7000));
    }
    assert_eq!(space.cache().stats().misses, 2);
    assert_eq!(space.cache().stats().hits, 126);
}

#[test]
fn remap_then_invalidate_gives_new_data() {
    let invalidations: [fn(&mut TranslationCache, u64); 3] = [
        |cache, _| cache.invalidate_all(),
        |cache, cr3| cache.invalidate_root(cr3),
        |cache, _| cache.invalidate_range(Gva(GVA.0 + 0xffc), 8),
    ];
    for invalidate in invalidations {
        let mem = MockMemory::new(RAM);
        let mut tables = setup(&mem);
        let mut space = AddressSpace::new(&mem, PagingMode::Level4, tables.cr3());
        assert_eq!(space.read_u64(GVA).unwrap(), 0xaaaa_aaaa_aaaa_aaaa);

        tables
            .map(GVA, FRAME_B, TkSize::Size4K, MapFlags::USER_RW)
            .unwrap();
        // Without invalidation, the cache still answers with the old frame: the documented cost
        // of not validating.
        assert_eq!(space.read_u64(GVA).unwrap(), 0xaaaa_aaaa_aaaa_aaaa);

        // PCID bits must not matter to invalidate_root.
        invalidate(space.cache_mut(), tables.cr3() | 0x5);
        assert_eq!(space.read_u64(GVA).unwrap(), 0xbbbb_bbbb_bbbb_bbbb);
    }
}

#[test]
fn unrelated_invalidations_keep_entries() {
    let mem = MockMemory::new(RAM);
    let tables = setup(&mem);
    let mut space = AddressSpace::new(&mem, PagingMode::Level4, tables.cr3());
    space.read_u64(GVA).unwrap();
    space
        .cache_mut()
        .invalidate_range(Gva(GVA.0 + 0x1000), 0x1000);
    space
        .cache_mut()
        .invalidate_range(Gva(GVA.0 - 0x1000), 0x1000);
    space.cache_mut().invalidate_range(GVA, 0);
    space.cache_mut().invalidate_root(0x1234_5000);
    space.read_u64(GVA).unwrap();
    assert_eq!(space.cache().stats().hits, 1);
}

#[test]
fn validating_lookups_notice_a_changed_leaf() {
    let mem = MockMemory::new(RAM);
    let mut tables = setup(&mem);
    let mut space = AddressSpace::new(&mem, PagingMode::Level4, tables.cr3());
    space.cache_mut().set_validate(true);
    assert!(space.cache().validates());
    assert_eq!(space.read_u64(GVA).unwrap(), 0xaaaa_aaaa_aaaa_aaaa);
    assert_eq!(space.read_u64(GVA).unwrap(), 0xaaaa_aaaa_aaaa_aaaa);
    assert_eq!(space.cache().stats().hits, 1);

    tables
        .map(GVA, FRAME_B, TkSize::Size4K, MapFlags::USER_RW)
        .unwrap();
    assert_eq!(space.read_u64(GVA).unwrap(), 0xbbbb_bbbb_bbbb_bbbb);
    assert_eq!(space.cache().stats().stale, 1);

    // Unmapped: the stale entry is dropped and the walk reports the hole.
    tables
        .modify_entry(GVA, TableLevel::Pt, 0, bits::P)
        .unwrap();
    let err = space.read_u64(GVA).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotPresent {
                level: Level::Pt,
                ..
            }
        ),
        "{err}"
    );

    // A leaf entry that can no longer be read counts as changed too.
    tables
        .modify_entry(GVA, TableLevel::Pt, bits::P, 0)
        .unwrap();
    space.read_u64(GVA).unwrap();
    let pte = tables.entry_addr(GVA, TableLevel::Pt).unwrap().unwrap();
    mem.fail_reads_at(pte);
    assert!(space.read_u64(GVA).is_err());
    assert_eq!(space.cache().stats().stale, 3);
}

#[test]
fn validation_reads_4_byte_entries_in_32_bit_paging() {
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Bits32).unwrap();
    tables
        .map(Gva(0x1000), FRAME_A, TkSize::Size4K, MapFlags::KERNEL_RW)
        .unwrap();
    // The neighbouring PTE shares the upper half of an 8-byte read; changing it must not
    // invalidate.
    tables
        .map(Gva(0x2000), FRAME_B, TkSize::Size4K, MapFlags::KERNEL_RW)
        .unwrap();
    mem.write_u32(FRAME_A, 0xaaaa_aaaa).unwrap();
    let mut space = AddressSpace::new(&mem, PagingMode::Bits32, tables.cr3());
    space.cache_mut().set_validate(true);
    space.read_u32(Gva(0x1000)).unwrap();
    tables
        .modify_entry(Gva(0x2000), TableLevel::Pt, bits::A, 0)
        .unwrap();
    assert_eq!(space.read_u32(Gva(0x1000)).unwrap(), 0xaaaa_aaaa);
    assert_eq!(space.cache().stats().stale, 0);
}

#[test]
fn an_epoch_bump_invalidates_sharing_caches() {
    let mem = MockMemory::new(RAM);
    let mut tables = setup(&mem);
    let epoch = InvalidationEpoch::new();
    let cache = TranslationCache::new(64).with_epoch(epoch.clone());
    let mut space = AddressSpace::new(&mem, PagingMode::Level4, tables.cr3()).with_cache(cache);
    assert_eq!(space.cache().capacity(), 64);
    space.read_u64(GVA).unwrap();
    tables
        .map(GVA, FRAME_B, TkSize::Size4K, MapFlags::USER_RW)
        .unwrap();
    assert_eq!(space.read_u64(GVA).unwrap(), 0xaaaa_aaaa_aaaa_aaaa);
    epoch.bump();
    assert_eq!(epoch.current(), 1);
    assert_eq!(space.read_u64(GVA).unwrap(), 0xbbbb_bbbb_bbbb_bbbb);
}

#[test]
fn roots_are_kept_apart() {
    let mem = MockMemory::new(RAM);
    let mut first = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    first
        .map(GVA, FRAME_A, TkSize::Size4K, MapFlags::USER_RW)
        .unwrap();
    let mut second = PageTableBuilder::with_table_area(
        &mem,
        TableFormat::Level4,
        Gpa(0x80_0000),
        Gpa(0x90_0000),
    )
    .unwrap();
    second
        .map(GVA, FRAME_B, TkSize::Size4K, MapFlags::USER_RW)
        .unwrap();
    mem.write_u64(FRAME_A, 1).unwrap();
    mem.write_u64(FRAME_B, 2).unwrap();

    let mut space = AddressSpace::new(&mem, PagingMode::Level4, first.cr3());
    assert_eq!(space.read_u64(GVA).unwrap(), 1);
    space.set_cr3(second.cr3());
    assert_eq!(space.cr3(), second.cr3());
    assert_eq!(space.read_u64(GVA).unwrap(), 2);
    space.set_cr3(first.cr3());
    assert_eq!(space.read_u64(GVA).unwrap(), 1);
    assert_eq!(space.cache().stats().hits, 1);

    space.cache_mut().invalidate_root(second.cr3());
    space.set_cr3(second.cr3());
    assert_eq!(space.read_u64(GVA).unwrap(), 2);
    space.set_cr3(first.cr3());
    assert_eq!(space.read_u64(GVA).unwrap(), 1);
    assert_eq!(
        space.cache().stats(),
        CacheStats {
            hits: 2,
            misses: 3,
            stale: 0
        }
    );
}

#[test]
fn address_space_reads_and_writes_across_pages() {
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Pae).unwrap();
    tables
        .map(
            Gva(0xc000_1000),
            FRAME_A,
            TkSize::Size4K,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    tables
        .map(
            Gva(0xc000_2000),
            FRAME_B,
            TkSize::Size4K,
            MapFlags::KERNEL_RO,
        )
        .unwrap();
    let mut space = AddressSpace::new(&mem, PagingMode::Pae, tables.cr3());
    // Writes ignore R/W: the second page is read-only.
    space
        .write_u64(Gva(0xc000_1ffc), 0x0123_4567_89ab_cdef)
        .unwrap();
    assert_eq!(
        space.read_u64(Gva(0xc000_1ffc)).unwrap(),
        0x0123_4567_89ab_cdef
    );
    assert_eq!(mem.read_u32(FRAME_B).unwrap(), 0x0123_4567);

    let data: Vec<u8> = (0..0x1800u32).map(|i| i.to_le_bytes()[0]).collect();
    space.write(Gva(0xc000_1400), &data).unwrap();
    assert_eq!(space.read_vec(Gva(0xc000_1400), data.len()).unwrap(), data);

    let chunks: Vec<_> = space
        .chunks(Gva(0xc000_1000), 0x2000)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(chunks.len(), 2);
    let err = space.read_vec(Gva(0xc000_2ff0), 0x20).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotPresent {
                gva: Gva(0xc000_3000),
                ..
            }
        ),
        "{err}"
    );
    let err = space.read_u64(Gva(0x1_0000_0000)).unwrap_err();
    assert!(matches!(err, Error::Beyond4G { .. }), "{err}");
    mem.fail_reads_at(Gpa(FRAME_A.0 + 8));
    let err = space.read_u64(Gva(0xc000_1004)).unwrap_err();
    assert!(matches!(err, Error::PhysRead { .. }), "{err}");
}

#[test]
fn built_from_registers() {
    let mem = MockMemory::with_ranges(&[PhysRange {
        start: Gpa(0),
        end: Gpa(RAM),
    }]);
    let tables = setup(&mem);
    mem.write_u64(FRAME_A, 42).unwrap();
    let regs = Registers {
        cr0: 0x8005_0033,
        cr3: tables.cr3(),
        cr4: 0x3406f0,
        efer: None,
        cs: Segment {
            flags: 0x20fb00,
            ..Segment::default()
        },
        ..Registers::default()
    };
    let mut space = AddressSpace::from_registers(&mem, &regs);
    assert_eq!(space.mode(), PagingMode::Level4);
    assert_eq!(space.options(), WalkOptions::default());
    assert_eq!(space.read_u64(GVA).unwrap(), 42);
    let t = space.translate(GVA).unwrap();
    assert_eq!(t.trail.as_slice().len(), 4);
    assert_eq!(space.memory().ram_size(), RAM);

    let regs = Registers {
        efer: Some(0x500),
        ..regs
    };
    let space =
        AddressSpace::from_registers(&mem, &regs).with_options(WalkOptions::from_registers(&regs));
    assert!(!space.options().nx_enabled);
}

#[test]
fn paging_disabled_goes_straight_through() {
    let mem = MockMemory::new(RAM);
    mem.write_u64(Gpa(0x7c00), 0xaa55).unwrap();
    mem.write_u64(Gpa(0x1000), 0x1122).unwrap();
    let mut space = AddressSpace::new(&mem, PagingMode::Disabled, 0);
    assert_eq!(space.read_u64(Gva(0x7c00)).unwrap(), 0xaa55);
    assert_eq!(space.read_vec(Gva(0x7bff), 2).unwrap(), [0, 0x55]);
    assert_eq!(space.read_vec(Gva(0xfff), 2).unwrap(), [0, 0x22]);
}

#[test]
fn hostile_lookups_do_not_disturb_the_cache() {
    // A tiny cache where everything collides still answers correctly.
    let mem = MockMemory::new(RAM);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    for page in 0..200u64 {
        let frame = Gpa(0x100_0000 + page * 0x1000);
        tables
            .map(
                Gva(0x1000_0000 + page * 0x1000),
                frame,
                TkSize::Size4K,
                MapFlags::KERNEL_RW,
            )
            .unwrap();
        mem.write_u64(frame, page).unwrap();
    }
    let mut space = AddressSpace::new(&mem, PagingMode::Level4, tables.cr3())
        .with_cache(TranslationCache::new(1));
    assert_eq!(space.cache().capacity(), 16);
    for round in 0..3 {
        for page in 0..200u64 {
            assert_eq!(
                space.read_u64(Gva(0x1000_0000 + page * 0x1000)).unwrap(),
                page,
                "round {round}"
            );
        }
    }
}

/// A flat, lock-free memory like a backend's mmap, for timing the hot path.
struct Flat(Vec<u8>, [PhysRange; 1]);

impl PhysicalMemory for Flat {
    #[inline]
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), kvmaccess_core::Error> {
        let start =
            usize::try_from(gpa.0).map_err(|_| kvmaccess_core::Error::PhysUnmapped { gpa })?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or(kvmaccess_core::Error::PhysUnmapped { gpa })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn ranges(&self) -> &[PhysRange] {
        &self.1
    }
}

/// Run with `cargo test --release -p kvmaccess-x86 -- --ignored --nocapture warm_read`.
#[test]
#[ignore = "timing; meaningful only in release builds"]
fn warm_read_timing() {
    let mock = MockMemory::new(16 << 20);
    let mut tables = PageTableBuilder::new(&mock, TableFormat::Level4).unwrap();
    tables
        .map_4k_range(
            Gva(0xffff_8880_0000_0000),
            Gpa(0x80_0000),
            256,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    let mut flat = vec![0u8; 16 << 20];
    mock.peek(Gpa(0), &mut flat).unwrap();
    let flat = Flat(
        flat,
        [PhysRange {
            start: Gpa(0),
            end: Gpa(16 << 20),
        }],
    );
    let mut space = AddressSpace::new(&flat, PagingMode::Level4, tables.cr3());
    let iterations = 10_000_000u64;
    let mut sum = 0u64;
    let start = std::time::Instant::now();
    for i in 0..iterations {
        let gva = Gva(0xffff_8880_0000_0000 + (i % 64) * 0x1000 + (i % 1000));
        sum = sum.wrapping_add(u64::from(
            space.read_u32(std::hint::black_box(gva)).unwrap(),
        ));
    }
    let elapsed = start.elapsed();
    let per_read = elapsed.as_nanos() as f64 / iterations as f64;
    println!("warm 4-byte virtual read: {per_read:.1} ns (checksum {sum})");
    let mut validating = AddressSpace::new(&flat, PagingMode::Level4, tables.cr3());
    validating.cache_mut().set_validate(true);
    let start = std::time::Instant::now();
    for i in 0..iterations {
        let gva = Gva(0xffff_8880_0000_0000 + (i % 64) * 0x1000 + (i % 1000));
        sum = sum.wrapping_add(u64::from(
            validating.read_u32(std::hint::black_box(gva)).unwrap(),
        ));
    }
    let per_read = start.elapsed().as_nanos() as f64 / iterations as f64;
    println!("validating warm 4-byte virtual read: {per_read:.1} ns (checksum {sum})");
}

#[test]
fn a_page_table_write_through_the_space_is_seen_by_the_next_read() {
    let mem = MockMemory::new(RAM);
    let mut tables = setup(&mem);
    let entry = tables.entry_addr(GVA, TableLevel::Pt).unwrap().unwrap();
    // A window onto the page table itself, as a kernel's direct map would give.
    let window = Gva(0x7fff_0000_5000);
    tables
        .map(
            window,
            Gpa(entry.0 & !0xfff),
            TkSize::Size4K,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    let mut space = AddressSpace::new(&mem, PagingMode::Level4, tables.cr3());
    assert_eq!(space.read_u64(GVA).unwrap(), 0xaaaa_aaaa_aaaa_aaaa);
    let old = tables.read_entry(entry).unwrap();
    let frame_bits = 0x000f_ffff_ffff_f000;
    let remapped = (old & !frame_bits) | FRAME_B.0;
    space
        .write_u64(Gva(window.0 + (entry.0 & 0xfff)), remapped)
        .unwrap();
    assert_eq!(tables.read_entry(entry).unwrap(), remapped);
    assert_eq!(space.read_u64(GVA).unwrap(), 0xbbbb_bbbb_bbbb_bbbb);
}

/// Memory whose backend bumps an epoch, as a live guest's does on every resume.
struct Resumable<'m> {
    mem: &'m MockMemory,
    epoch: InvalidationEpoch,
}

impl PhysicalMemory for Resumable<'_> {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), kvmaccess_core::Error> {
        self.mem.read_phys(gpa, buf)
    }

    fn ranges(&self) -> &[PhysRange] {
        self.mem.ranges()
    }

    fn invalidation_epoch(&self) -> Option<InvalidationEpoch> {
        Some(self.epoch.clone())
    }
}

#[test]
fn a_new_space_follows_its_backends_epoch() {
    let mem = MockMemory::new(RAM);
    let mut tables = setup(&mem);
    let backend = Resumable {
        mem: &mem,
        epoch: InvalidationEpoch::new(),
    };
    let mut space = AddressSpace::new(&backend, PagingMode::Level4, tables.cr3());
    assert_eq!(space.read_u64(GVA).unwrap(), 0xaaaa_aaaa_aaaa_aaaa);
    // The guest remaps the page while it runs; the paused snapshot's translation is kept...
    tables
        .map(GVA, FRAME_B, TkSize::Size4K, MapFlags::USER_RW)
        .unwrap();
    assert_eq!(space.read_u64(GVA).unwrap(), 0xaaaa_aaaa_aaaa_aaaa);
    // ...until the backend says the guest ran.
    backend.epoch.bump();
    assert_eq!(space.read_u64(GVA).unwrap(), 0xbbbb_bbbb_bbbb_bbbb);
}
