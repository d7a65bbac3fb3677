//! A translation cache and the [`AddressSpace`] that uses it.

use kvmaccess_core::{Gpa, Gva, InvalidationEpoch, PhysicalMemory, PhysicalMemoryWrite, Registers};
use serde::Serialize;

use crate::control::PagingMode;
use crate::walk::{
    buf_len, copy_chunks, translate_with, Mapping, PageSize, Translation, VirtChunks, WalkOptions,
};
use crate::Error;

/// Hit and miss counters of a [`TranslationCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Validating lookups that found the leaf entry changed (counted in `misses` too).
    pub stale: u64,
}

/// One cached leaf mapping. `generation == 0` marks an empty slot.
#[derive(Clone, Copy)]
struct Slot {
    generation: u64,
    /// Virtual page number in units of the page's own size (`gva >> shift`).
    page_number: u64,
    /// The root table (not the raw CR3: PCID and cache bits do not change translations).
    root: u64,
    leaf_entry: Gpa,
    leaf_value: u64,
    mapping: Mapping,
    mode: PagingMode,
}

const EMPTY_SLOT: Slot = Slot {
    generation: 0,
    page_number: 0,
    root: 0,
    leaf_entry: Gpa(0),
    leaf_value: 0,
    mapping: Mapping {
        virt_base: Gva(0),
        page_base: Gpa(0),
        page_size: PageSize::Size4K,
        writable: false,
        user: false,
        nx: false,
        global: false,
        dirty: false,
        accessed: false,
    },
    mode: PagingMode::Disabled,
};

/// Caches leaf translations keyed by (root table, paging mode, virtual page).
///
/// A direct-mapped table allocated once: a hit is a hash, one or two compares per page size the
/// mode has, and no allocation. A 2 MiB or 1 GiB mapping is stored once, under its own page
/// number, and serves every 4 KiB page inside it (a lookup probes the 4 KiB slot first, then
/// the large sizes).
///
/// # Staleness
///
/// A cache is only as good as its invalidation. For a paused guest or a dump, nothing changes
/// and the cache is exact. For a running guest, either invalidate on every resume
/// ([`TranslationCache::invalidate_all`] is O(1), or share an [`InvalidationEpoch`] with the
/// backend), or turn on [validation](TranslationCache::set_validate): each hit then re-reads
/// the cached leaf entry (one 4- or 8-byte physical read) and drops the entry if it changed. That
/// catches a remapped or unmapped page at roughly twice the cost of an unvalidated hit, but not a
/// change in an upper level (a whole page table swapped out): for that, invalidate.
///
/// Entries do not record the [`WalkOptions`] they were walked with: invalidate after changing
/// them ([`AddressSpace::with_options`] does).
#[derive(Clone)]
pub struct TranslationCache {
    slots: Box<[Slot]>,
    index_shift: u32,
    generation: u64,
    epoch: Option<(InvalidationEpoch, u64)>,
    validate: bool,
    stats: CacheStats,
}

impl std::fmt::Debug for TranslationCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TranslationCache")
            .field("capacity", &self.slots.len())
            .field("generation", &self.generation)
            .field("validate", &self.validate)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Default for TranslationCache {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

impl TranslationCache {
    /// Slots in a default cache (64 KiB of memory; covers 4 MiB of 4 KiB pages).
    pub const DEFAULT_CAPACITY: usize = 1024;

    /// A cache of `capacity` slots, rounded to a power of two between 16 and 2^20.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(16, 1 << 20).next_power_of_two();
        Self {
            slots: vec![EMPTY_SLOT; capacity].into_boxed_slice(),
            index_shift: 64 - capacity.trailing_zeros(),
            generation: 1,
            epoch: None,
            validate: false,
            stats: CacheStats::default(),
        }
    }

    /// Follow `epoch`: every bump invalidates this cache.
    pub fn with_epoch(mut self, epoch: InvalidationEpoch) -> Self {
        let seen = epoch.current();
        self.epoch = Some((epoch, seen));
        self
    }

    /// Re-read the leaf entry on every hit; see the type's documentation.
    pub fn set_validate(&mut self, validate: bool) {
        self.validate = validate;
    }

    /// Whether hits are validated.
    pub fn validates(&self) -> bool {
        self.validate
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Hit and miss counts so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Forget every entry, in O(1).
    pub fn invalidate_all(&mut self) {
        match self.generation.checked_add(1) {
            Some(next) => self.generation = next,
            None => {
                // After 2^64 invalidations old generations could come back: really clear.
                self.slots.fill(EMPTY_SLOT);
                self.generation = 1;
            }
        }
    }

    /// Forget the entries of the address space whose CR3 is `cr3` (compared by root table in
    /// each entry's paging mode, so PCID bits do not matter).
    pub fn invalidate_root(&mut self, cr3: u64) {
        for slot in self.slots.iter_mut() {
            if slot.generation != 0
                && slot.mode.root_table(cr3).map(|root| root.0) == Some(slot.root)
            {
                slot.generation = 0;
            }
        }
    }

    /// Forget entries for pages overlapping `gva..gva+len`, in every address space.
    pub fn invalidate_range(&mut self, gva: Gva, len: u64) {
        if len == 0 {
            return;
        }
        let last = gva.0.saturating_add(len - 1);
        for slot in self.slots.iter_mut() {
            let page_first = slot.mapping.virt_base.0;
            let page_last = page_first.saturating_add(slot.mapping.page_size.offset_mask());
            if slot.generation != 0 && page_first <= last && gva.0 <= page_last {
                slot.generation = 0;
            }
        }
    }

    /// The cached mapping of `gva` in the address space `cr3` selects, if any. In validating
    /// mode this reads the leaf entry from `mem` and treats a changed or unreadable entry as a
    /// miss (dropping it).
    #[inline]
    pub fn lookup<M: PhysicalMemory + ?Sized>(
        &mut self,
        mem: &M,
        mode: PagingMode,
        cr3: u64,
        gva: Gva,
    ) -> Option<Mapping> {
        self.follow_epoch();
        let root = mode.root_table(cr3).map_or(0, |root| root.0);
        for &size in page_sizes(mode) {
            let page_number = gva.0 >> size.shift();
            let index = self.index(page_number, root, size);
            let Some(slot) = self.slots.get(index) else {
                continue;
            };
            if slot.generation == self.generation
                && slot.page_number == page_number
                && slot.mapping.page_size == size
                && slot.root == root
                && slot.mode == mode
            {
                if self.validate && !leaf_unchanged(mem, mode, slot) {
                    if let Some(slot) = self.slots.get_mut(index) {
                        slot.generation = 0;
                    }
                    self.stats.stale += 1;
                    break;
                }
                self.stats.hits += 1;
                return Some(slot.mapping);
            }
        }
        self.stats.misses += 1;
        None
    }

    /// Remember a translation of the address space `cr3` selects in `mode`. Identity
    /// translations (paging disabled) are not cached: they cost nothing to recompute.
    pub fn insert(&mut self, mode: PagingMode, cr3: u64, translation: &Translation) {
        self.follow_epoch();
        let (Some(root), Some(leaf)) = (mode.root_table(cr3), translation.trail.leaf()) else {
            return;
        };
        let size = translation.mapping.page_size;
        let page_number = translation.gva.0 >> size.shift();
        let index = self.index(page_number, root.0, size);
        let generation = self.generation;
        if let Some(slot) = self.slots.get_mut(index) {
            *slot = Slot {
                generation,
                page_number,
                root: root.0,
                leaf_entry: leaf.entry_addr,
                leaf_value: leaf.value,
                mapping: translation.mapping,
                mode,
            };
        }
    }

    /// The mapping of `gva`: from the cache, or by walking the tables and caching the result.
    pub fn mapping<M: PhysicalMemory + ?Sized>(
        &mut self,
        mem: &M,
        mode: PagingMode,
        cr3: u64,
        gva: Gva,
        options: &WalkOptions,
    ) -> Result<Mapping, Error> {
        if let Some(mapping) = self.lookup(mem, mode, cr3, gva) {
            return Ok(mapping);
        }
        let translation = translate_with(mem, mode, cr3, gva, options)?;
        self.insert(mode, cr3, &translation);
        Ok(translation.mapping)
    }

    #[inline]
    fn follow_epoch(&mut self) {
        let changed = match &mut self.epoch {
            Some((epoch, seen)) => {
                let now = epoch.current();
                let changed = now != *seen;
                *seen = now;
                changed
            }
            None => false,
        };
        if changed {
            self.invalidate_all();
        }
    }

    #[inline]
    fn index(&self, page_number: u64, root: u64, size: PageSize) -> usize {
        // Fibonacci hashing: multiply by 2^64/phi and keep the top bits. The root and size are
        // mixed in so that the same page of two processes, or a 4K and a 2M page number that
        // happen to be equal, do not always collide.
        let key = page_number ^ root.rotate_left(17) ^ (u64::from(size.shift()) << 56);
        let hash = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.index_shift;
        // The shift leaves at most log2(capacity) bits, so the hash fits usize.
        usize::try_from(hash).unwrap_or(0)
    }
}

/// Page sizes a mode can map, most common first.
fn page_sizes(mode: PagingMode) -> &'static [PageSize] {
    match mode {
        PagingMode::Disabled => &[],
        PagingMode::Bits32 => &[PageSize::Size4K, PageSize::Size4M],
        PagingMode::Pae => &[PageSize::Size4K, PageSize::Size2M],
        PagingMode::Level4 | PagingMode::Level5 => {
            &[PageSize::Size4K, PageSize::Size2M, PageSize::Size1G]
        }
    }
}

fn leaf_unchanged<M: PhysicalMemory + ?Sized>(mem: &M, mode: PagingMode, slot: &Slot) -> bool {
    let current = if mode == PagingMode::Bits32 {
        mem.read_u32(slot.leaf_entry).map(u64::from)
    } else {
        mem.read_u64(slot.leaf_entry)
    };
    current.is_ok_and(|value| value == slot.leaf_value)
}

/// One guest address space: memory, paging mode, CR3 and a translation cache, behind a simple
/// read/write API.
///
/// Methods take `&mut self` because they fill the cache. Writes ignore page permissions (an
/// introspection tool may patch read-only pages on purpose).
#[derive(Debug)]
pub struct AddressSpace<'m, M: ?Sized> {
    mem: &'m M,
    mode: PagingMode,
    cr3: u64,
    options: WalkOptions,
    cache: TranslationCache,
}

impl<'m, M: PhysicalMemory + ?Sized> AddressSpace<'m, M> {
    /// An address space with default [`WalkOptions`] and a default cache, which follows the
    /// backend's [`InvalidationEpoch`] when it has one.
    pub fn new(mem: &'m M, mode: PagingMode, cr3: u64) -> Self {
        let cache = match mem.invalidation_epoch() {
            Some(epoch) => TranslationCache::default().with_epoch(epoch),
            None => TranslationCache::default(),
        };
        Self {
            mem,
            mode,
            cr3,
            options: WalkOptions::default(),
            cache,
        }
    }

    /// The address space a vCPU is in: mode from [`PagingMode::from_registers`], its CR3, and
    /// options from [`WalkOptions::from_registers`].
    pub fn from_registers(mem: &'m M, regs: &Registers) -> Self {
        Self {
            options: WalkOptions::from_registers(regs),
            ..Self::new(mem, PagingMode::from_registers(regs), regs.cr3)
        }
    }

    /// Use these walk options (clears the cache, whose entries were walked with the old ones).
    pub fn with_options(mut self, options: WalkOptions) -> Self {
        self.options = options;
        self.cache.invalidate_all();
        self
    }

    /// Use this cache (e.g. one sized differently, validating, or following an epoch).
    pub fn with_cache(mut self, cache: TranslationCache) -> Self {
        self.cache = cache;
        self
    }

    /// The guest memory.
    pub fn memory(&self) -> &'m M {
        self.mem
    }

    /// The paging mode.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// The CR3 in use.
    pub fn cr3(&self) -> u64 {
        self.cr3
    }

    /// The walk options in use.
    pub fn options(&self) -> WalkOptions {
        self.options
    }

    /// Switch to another process's tables. The cache keeps entries per root, so switching back
    /// and forth stays warm.
    pub fn set_cr3(&mut self, cr3: u64) {
        self.cr3 = cr3;
    }

    /// The translation cache.
    pub fn cache(&self) -> &TranslationCache {
        &self.cache
    }

    /// The translation cache, to invalidate it or change its validation mode.
    pub fn cache_mut(&mut self) -> &mut TranslationCache {
        &mut self.cache
    }

    /// Walk the tables for `gva` (always, for the full trail) and refresh the cache.
    pub fn translate(&mut self, gva: Gva) -> Result<Translation, Error> {
        let translation = translate_with(self.mem, self.mode, self.cr3, gva, &self.options)?;
        self.cache.insert(self.mode, self.cr3, &translation);
        Ok(translation)
    }

    /// The leaf mapping of `gva`, cached.
    #[inline]
    pub fn mapping(&mut self, gva: Gva) -> Result<Mapping, Error> {
        self.cache
            .mapping(self.mem, self.mode, self.cr3, gva, &self.options)
    }

    /// The guest-physical address of `gva`, cached.
    pub fn gpa(&mut self, gva: Gva) -> Result<Gpa, Error> {
        self.mapping(gva).map(|mapping| mapping.gpa_of(gva))
    }

    /// The physically contiguous pieces of `gva..gva+len`, using the cache.
    pub fn chunks<'s>(
        &'s mut self,
        gva: Gva,
        len: u64,
    ) -> VirtChunks<impl FnMut(Gva) -> Result<Mapping, Error> + 's>
    where
        'm: 's,
    {
        // Capture shortened borrows rather than `self`, whose type names `'m`, which an
        // edition-2021 `impl Trait` may not capture.
        let mem: &'s M = self.mem;
        let cache = &mut self.cache;
        let (mode, cr3, options) = (self.mode, self.cr3, self.options);
        VirtChunks::new(gva, len, move |page| {
            cache.mapping(mem, mode, cr3, page, &options)
        })
    }

    /// Fill `buf` from `gva`. Fails on the first unmapped page; `buf` may then be partly filled.
    #[inline]
    pub fn read(&mut self, gva: Gva, buf: &mut [u8]) -> Result<(), Error> {
        let len = buf_len(buf.len());
        let mapping = self.mapping(gva)?;
        if len <= mapping.bytes_to_page_end(gva) {
            let gpa = mapping.gpa_of(gva);
            return self
                .mem
                .read_phys(gpa, buf)
                .map_err(|source| Error::PhysRead { gva, gpa, source });
        }
        let mem = self.mem;
        copy_chunks(self.chunks(gva, len), gva, |gpa, range| {
            let dst = buf.get_mut(range).ok_or(Error::RangeWraps { gva, len })?;
            mem.read_phys(gpa, dst)
                .map_err(|source| Error::PhysRead { gva, gpa, source })
        })
    }

    /// `len` bytes from `gva`.
    pub fn read_vec(&mut self, gva: Gva, len: usize) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0; len];
        self.read(gva, &mut buf)?;
        Ok(buf)
    }

    /// A little-endian `u64` at `gva` (may cross a page).
    #[inline]
    pub fn read_u64(&mut self, gva: Gva) -> Result<u64, Error> {
        let mut raw = [0; 8];
        self.read(gva, &mut raw)?;
        Ok(u64::from_le_bytes(raw))
    }

    /// A little-endian `u32` at `gva` (may cross a page).
    #[inline]
    pub fn read_u32(&mut self, gva: Gva) -> Result<u32, Error> {
        let mut raw = [0; 4];
        self.read(gva, &mut raw)?;
        Ok(u32::from_le_bytes(raw))
    }
}

impl<M: PhysicalMemoryWrite + ?Sized> AddressSpace<'_, M> {
    /// Write `data` at `gva`. Fails on the first unmapped page, after writing the pages before
    /// it.
    ///
    /// The written bytes may be page-table entries (of this or any cached address space), so
    /// the cache is emptied afterwards, whatever the outcome: writes are rare, a stale
    /// translation is a wrong answer.
    pub fn write(&mut self, gva: Gva, data: &[u8]) -> Result<(), Error> {
        let len = buf_len(data.len());
        let mem = self.mem;
        let written = copy_chunks(self.chunks(gva, len), gva, |gpa, range| {
            let src = data.get(range).ok_or(Error::RangeWraps { gva, len })?;
            mem.write_phys(gpa, src)
                .map_err(|source| Error::PhysWrite { gva, gpa, source })
        });
        self.cache.invalidate_all();
        written
    }

    /// Write a little-endian `u64` at `gva`.
    pub fn write_u64(&mut self, gva: Gva, value: u64) -> Result<(), Error> {
        self.write(gva, &value.to_le_bytes())
    }
}

#[cfg(test)]
mod tests;
