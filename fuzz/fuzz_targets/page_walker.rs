//! Arbitrary bytes as guest memory, paging mode, CR3 and address: the walker, the range
//! splitter, the cache and the virtual reads must never panic or hang.

#![no_main]

use kvmaccess_core::Gva;
use kvmaccess_x86::{
    read_virt, translate_range, translate_with, AddressSpace, PagingMode, TranslationCache,
    WalkOptions,
};
use libfuzzer_sys::fuzz_target;

#[path = "common/memory.rs"]
mod memory;

use memory::FuzzMemory;

const HEADER: usize = 1 + 8 + 8 + 2 + 1;

fn u64_at(data: &[u8], offset: usize) -> u64 {
    data.get(offset..offset + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let control = data[0];
    let mode = match control & 7 {
        0 => PagingMode::Disabled,
        1 => PagingMode::Bits32,
        2 => PagingMode::Pae,
        3 | 4 => PagingMode::Level4,
        _ => PagingMode::Level5,
    };
    let memory = FuzzMemory::new(&data[HEADER..]);
    let mut cr3 = u64_at(data, 1);
    // Most of the time keep the root inside the input so that walks go deep.
    if control & 0x08 == 0 {
        cr3 &= 0xffff;
    }
    let gva = Gva(u64_at(data, 9));
    let len = usize::from(u16::from_le_bytes([data[17], data[18]])) % 0x3000;
    let options = WalkOptions {
        phys_addr_bits: data[19],
        nx_enabled: control & 0x10 != 0,
        pse: control & 0x20 != 0,
    };

    if let Ok(translation) = translate_with(&memory, mode, cr3, gva, &options) {
        assert!(translation.trail.as_slice().len() <= mode.levels());
        let offset_mask = translation.mapping.page_size.offset_mask();
        assert_eq!(translation.gpa.0 & offset_mask, gva.0 & offset_mask);
    }

    let mut buf = vec![0u8; len];
    let _ = read_virt(&memory, mode, cr3, gva, &mut buf);
    let _ = translate_range(&memory, mode, cr3, gva, u64::MAX >> (control >> 2))
        .take(8)
        .count();

    // The same reads through the cache, twice (miss then hit), validating or not.
    let mut cache = TranslationCache::new(16);
    cache.set_validate(control & 0x40 != 0);
    let mut space = AddressSpace::new(&memory, mode, cr3)
        .with_options(options)
        .with_cache(cache);
    let first = space.read(gva, &mut buf).is_ok();
    let second = space.read(gva, &mut buf).is_ok();
    // Memory does not change between the reads, so neither may the outcome.
    assert_eq!(first, second);
    let _ = space.read_u64(Gva(gva.0.wrapping_add(0xffc)));
    space.cache_mut().invalidate_range(gva, 0x2000);
    space.cache_mut().invalidate_root(cr3);
});
