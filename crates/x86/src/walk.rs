//! The page walker: guest-virtual to guest-physical translation for every x86 paging mode.
//!
//! Page tables are guest data, so every value read here is treated as hostile: the walk visits a
//! fixed number of levels whatever the entries say (a table that points at itself only makes a
//! walk end at a wrong frame, never loop), all address arithmetic is checked, and failures name
//! the level, the entry's address and its value.

use std::fmt;

use kvmaccess_core::{Gpa, Gva, PhysicalMemory, PhysicalMemoryWrite, Registers};
use serde::ser::SerializeSeq;
use serde::{Serialize, Serializer};

use crate::control::{Cr4, Efer, PagingMode};
use crate::Error;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const GLOBAL: u64 = 1 << 8;
const EXECUTE_DISABLE: u64 = 1 << 63;
/// Frame bits 51:12 of a 64-bit entry; bits above MAXPHYADDR are rejected as reserved first.
const ADDR_MASK_64: u64 = 0x000f_ffff_ffff_f000;
const ADDR_MASK_32: u64 = 0xffff_f000;

/// One level of the page-table hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    /// Page-map level 5 (5-level paging only).
    Pml5,
    /// Page-map level 4.
    Pml4,
    /// Page-directory-pointer table (the 4-entry table CR3 points to in PAE).
    Pdpt,
    /// Page directory.
    Pd,
    /// Page table.
    Pt,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` so that callers can align level names in tables.
        f.pad(match self {
            Level::Pml5 => "PML5",
            Level::Pml4 => "PML4",
            Level::Pdpt => "PDPT",
            Level::Pd => "PD",
            Level::Pt => "PT",
        })
    }
}

/// Size of a mapped page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum PageSize {
    /// 4 KiB.
    #[serde(rename = "4K")]
    Size4K,
    /// 2 MiB (PAE and long-mode PDE).
    #[serde(rename = "2M")]
    Size2M,
    /// 4 MiB (32-bit PDE with CR4.PSE).
    #[serde(rename = "4M")]
    Size4M,
    /// 1 GiB (long-mode PDPTE).
    #[serde(rename = "1G")]
    Size1G,
}

impl PageSize {
    /// log2 of the size.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size4M => 22,
            PageSize::Size1G => 30,
        }
    }

    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// `bytes() - 1`: the offset bits of an address inside such a page.
    pub const fn offset_mask(self) -> u64 {
        self.bytes() - 1
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4K",
            PageSize::Size2M => "2M",
            PageSize::Size4M => "4M",
            PageSize::Size1G => "1G",
        })
    }
}

/// One entry read during a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct WalkStep {
    /// The table level the entry belongs to.
    pub level: Level,
    /// Guest-physical address of the entry.
    pub entry_addr: Gpa,
    /// The entry as read (zero-extended for 4-byte entries).
    #[serde(with = "kvmaccess_core::hex")]
    pub value: u64,
}

/// The entries a walk read, top level first. Held inline (at most five), so a walk allocates
/// nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WalkTrail {
    steps: [WalkStep; 5],
    len: usize,
}

impl WalkTrail {
    const EMPTY: Self = Self {
        steps: [WalkStep {
            level: Level::Pt,
            entry_addr: Gpa(0),
            value: 0,
        }; 5],
        len: 0,
    };

    /// The steps as a slice.
    pub fn as_slice(&self) -> &[WalkStep] {
        self.steps.get(..self.len).unwrap_or(&[])
    }

    /// The last (leaf) step, if paging was on.
    pub fn leaf(&self) -> Option<&WalkStep> {
        self.as_slice().last()
    }

    fn push(&mut self, step: WalkStep) {
        // A walk has at most five levels, so the slot always exists.
        if let Some(slot) = self.steps.get_mut(self.len) {
            *slot = step;
            self.len += 1;
        }
    }
}

impl fmt::Debug for WalkTrail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl Serialize for WalkTrail {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let steps = self.as_slice();
        let mut seq = serializer.serialize_seq(Some(steps.len()))?;
        for step in steps {
            seq.serialize_element(step)?;
        }
        seq.end()
    }
}

/// A leaf mapping: where a page lives and what its entries allow. This is what
/// [`crate::TranslationCache`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Mapping {
    /// Guest-virtual address of the first byte of the page.
    pub virt_base: Gva,
    /// Guest-physical address of the first byte of the page.
    pub page_base: Gpa,
    /// Size of the page.
    pub page_size: PageSize,
    /// Writable: the AND of the R/W bits of every level. With CR0.WP = 0 the kernel may write
    /// even when this is false.
    pub writable: bool,
    /// User-accessible: the AND of the U/S bits of every level.
    pub user: bool,
    /// Execute-disable: the OR of the XD bits of every level. Meaningful only when EFER.NXE is
    /// set: with [`WalkOptions::nx_enabled`] false a set XD bit fails the walk as reserved, as on
    /// the CPU. Always false in 32-bit paging, which has no XD bit.
    pub nx: bool,
    /// G bit of the leaf entry.
    pub global: bool,
    /// D bit of the leaf entry.
    pub dirty: bool,
    /// A bit of the leaf entry.
    pub accessed: bool,
}

impl Mapping {
    /// The guest-physical address of `gva`, which must lie in this page (only its offset bits
    /// are used).
    pub fn gpa_of(&self, gva: Gva) -> Gpa {
        // The base is page-aligned, so OR-ing the offset cannot carry.
        Gpa(self.page_base.0 | (gva.0 & self.page_size.offset_mask()))
    }

    /// Bytes from `gva` to the end of its page (at least 1).
    pub fn bytes_to_page_end(&self, gva: Gva) -> u64 {
        self.page_size.bytes() - (gva.0 & self.page_size.offset_mask())
    }
}

impl fmt::Display for Mapping {
    /// `4K page 0x1000 -> 0x5000 W U NX G D A`, listing only the set permission and status bits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} page {} -> {}",
            self.page_size, self.virt_base, self.page_base
        )?;
        for (on, name) in [
            (self.writable, "W"),
            (self.user, "U"),
            (self.nx, "NX"),
            (self.global, "G"),
            (self.dirty, "D"),
            (self.accessed, "A"),
        ] {
            if on {
                write!(f, " {name}")?;
            }
        }
        Ok(())
    }
}

/// The result of a successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Translation {
    /// The address translated.
    pub gva: Gva,
    /// Where it lives.
    pub gpa: Gpa,
    /// The leaf mapping and its effective permissions.
    #[serde(flatten)]
    pub mapping: Mapping,
    /// The entries read, top level first; empty when paging is disabled.
    pub trail: WalkTrail,
}

impl fmt::Display for Translation {
    /// The translation on one line, then one indented line per entry read.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} ({})", self.gva, self.gpa, self.mapping)?;
        for step in self.trail.as_slice() {
            write!(
                f,
                "\n  {:<4} entry at {} = {:#018x}",
                step.level, step.entry_addr, step.value
            )?;
        }
        Ok(())
    }
}

/// Facts about the vCPU that the walker cannot read from the tables themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct WalkOptions {
    /// MAXPHYADDR, the physical-address width (CPUID leaf 0x80000008, EAX bits 7:0); entry address bits at
    /// or above it are reserved. Clamped to 32..=52; default 52, which accepts every address a
    /// table can hold.
    pub phys_addr_bits: u8,
    /// EFER.NXE. When false, a set XD bit is a reserved-bit fault, as on the CPU. Default true,
    /// so that a missing EFER does not make valid tables fail.
    pub nx_enabled: bool,
    /// CR4.PSE: whether a 32-bit PDE with PS set maps a 4 MiB page (otherwise PS is ignored
    /// there). Default true, as every 32-bit OS of the last 25 years sets it.
    pub pse: bool,
}

impl Default for WalkOptions {
    fn default() -> Self {
        Self {
            phys_addr_bits: 52,
            nx_enabled: true,
            pse: true,
        }
    }
}

impl WalkOptions {
    /// Options matching a register snapshot: NXE from EFER when known, PSE from CR4.
    pub fn from_registers(regs: &Registers) -> Self {
        Self {
            nx_enabled: regs.efer.map_or(true, |efer| {
                Efer::from_bits_retain(efer).contains(Efer::NXE)
            }),
            pse: Cr4::from_bits_retain(regs.cr4).contains(Cr4::PSE),
            ..Self::default()
        }
    }

    /// The same options with another MAXPHYADDR.
    pub fn with_phys_addr_bits(self, bits: u8) -> Self {
        Self {
            phys_addr_bits: bits,
            ..self
        }
    }

    fn maxphyaddr(&self) -> u32 {
        u32::from(self.phys_addr_bits.clamp(32, 52))
    }
}

/// Where a level's index sits in the virtual address.
struct LevelSpec {
    level: Level,
    shift: u32,
    index_mask: u64,
}

const LEVELS_LONG: [LevelSpec; 5] = [
    LevelSpec {
        level: Level::Pml5,
        shift: 48,
        index_mask: 0x1ff,
    },
    LevelSpec {
        level: Level::Pml4,
        shift: 39,
        index_mask: 0x1ff,
    },
    LevelSpec {
        level: Level::Pdpt,
        shift: 30,
        index_mask: 0x1ff,
    },
    LevelSpec {
        level: Level::Pd,
        shift: 21,
        index_mask: 0x1ff,
    },
    LevelSpec {
        level: Level::Pt,
        shift: 12,
        index_mask: 0x1ff,
    },
];

const LEVELS_PAE: [LevelSpec; 3] = [
    LevelSpec {
        level: Level::Pdpt,
        shift: 30,
        index_mask: 0x3,
    },
    LevelSpec {
        level: Level::Pd,
        shift: 21,
        index_mask: 0x1ff,
    },
    LevelSpec {
        level: Level::Pt,
        shift: 12,
        index_mask: 0x1ff,
    },
];

const LEVELS_32: [LevelSpec; 2] = [
    LevelSpec {
        level: Level::Pd,
        shift: 22,
        index_mask: 0x3ff,
    },
    LevelSpec {
        level: Level::Pt,
        shift: 12,
        index_mask: 0x3ff,
    },
];

fn level_specs(mode: PagingMode) -> &'static [LevelSpec] {
    match mode {
        PagingMode::Disabled => &[],
        PagingMode::Bits32 => &LEVELS_32,
        PagingMode::Pae => &LEVELS_PAE,
        PagingMode::Level4 => LEVELS_LONG.get(1..).unwrap_or(&[]),
        PagingMode::Level5 => &LEVELS_LONG,
    }
}

/// Bits `low..=high` set.
const fn bit_range(low: u32, high: u32) -> u64 {
    (u64::MAX >> (63 - high)) & (u64::MAX << low)
}

/// The bits of `value` that are reserved for an entry at `level` in `mode`.
fn reserved_bits(mode: PagingMode, level: Level, value: u64, options: &WalkOptions) -> u64 {
    let maxphy = options.maxphyaddr();
    let large = value & PAGE_SIZE_BIT != 0;
    let xd = if options.nx_enabled {
        0
    } else {
        EXECUTE_DISABLE
    };
    let mask = match mode {
        PagingMode::Disabled => 0,
        PagingMode::Bits32 => {
            if level == Level::Pd && large && options.pse {
                // PSE-36 puts physical bits 39:32 in bits 20:13; those past MAXPHYADDR (capped at
                // 40 for this format) and bit 21 are reserved.
                let width = maxphy.min(40);
                bit_range(width - 19, 21)
            } else {
                0
            }
        }
        PagingMode::Pae => {
            let above_maxphy = bit_range(maxphy, 62);
            match level {
                // PDPTEs have no R/W, U/S or XD; they are loaded like a descriptor.
                Level::Pdpt => bit_range(1, 2) | bit_range(5, 8) | bit_range(maxphy, 63),
                Level::Pd if large => above_maxphy | bit_range(13, 20) | xd,
                _ => above_maxphy | xd,
            }
        }
        PagingMode::Level4 | PagingMode::Level5 => {
            // Bits 62:52 are ignored (or protection keys), never reserved.
            let above_maxphy = if maxphy < 52 {
                bit_range(maxphy, 51)
            } else {
                0
            };
            let structural = match level {
                Level::Pml5 | Level::Pml4 => PAGE_SIZE_BIT,
                Level::Pdpt if large => bit_range(13, 29),
                Level::Pd if large => bit_range(13, 20),
                _ => 0,
            };
            above_maxphy | structural | xd
        }
    };
    value & mask
}

/// Translate `gva` with default [`WalkOptions`] (MAXPHYADDR 52, NXE assumed, PSE assumed).
pub fn translate<M: PhysicalMemory + ?Sized>(
    mem: &M,
    mode: PagingMode,
    cr3: u64,
    gva: Gva,
) -> Result<Translation, Error> {
    translate_with(mem, mode, cr3, gva, &WalkOptions::default())
}

/// Translate `gva` by walking the tables `cr3` selects in `mode`.
///
/// With paging disabled the translation is the identity over 32-bit addresses.
pub fn translate_with<M: PhysicalMemory + ?Sized>(
    mem: &M,
    mode: PagingMode,
    cr3: u64,
    gva: Gva,
    options: &WalkOptions,
) -> Result<Translation, Error> {
    check_linear_address(mode, gva)?;
    let Some(root) = mode.root_table(cr3) else {
        return Ok(identity(gva));
    };
    let four_byte_entries = mode == PagingMode::Bits32;
    let mut trail = WalkTrail::EMPTY;
    let mut table = root;
    let mut writable = true;
    let mut user = true;
    let mut nx = false;

    for spec in level_specs(mode) {
        let level = spec.level;
        let index = (gva.0 >> spec.shift) & spec.index_mask;
        let entry_size = if four_byte_entries { 4 } else { 8 };
        let entry_addr = table
            .checked_add(index * entry_size)
            .ok_or(Error::TableAddressOverflow { gva, level, table })?;
        let read = if four_byte_entries {
            mem.read_u32(entry_addr).map(u64::from)
        } else {
            mem.read_u64(entry_addr)
        };
        let value = read.map_err(|source| Error::TableRead {
            gva,
            level,
            entry_addr,
            source,
        })?;
        trail.push(WalkStep {
            level,
            entry_addr,
            value,
        });
        if value & PRESENT == 0 {
            return Err(Error::NotPresent {
                gva,
                level,
                entry_addr,
                value,
            });
        }
        let reserved = reserved_bits(mode, level, value, options);
        if reserved != 0 {
            return Err(Error::ReservedBits {
                gva,
                level,
                entry_addr,
                value,
                reserved,
                phys_addr_bits: options.phys_addr_bits,
            });
        }
        if !(mode == PagingMode::Pae && level == Level::Pdpt) {
            writable &= value & WRITABLE != 0;
            user &= value & USER != 0;
            nx |= mode != PagingMode::Bits32 && value & EXECUTE_DISABLE != 0;
        }

        if let Some((page_size, page_base)) = leaf_of(mode, level, value, options) {
            let mapping = Mapping {
                virt_base: Gva(gva.0 & !page_size.offset_mask()),
                page_base,
                page_size,
                writable,
                user,
                nx,
                global: value & GLOBAL != 0,
                dirty: value & DIRTY != 0,
                accessed: value & ACCESSED != 0,
            };
            return Ok(Translation {
                gva,
                gpa: mapping.gpa_of(gva),
                mapping,
                trail,
            });
        }
        table = Gpa(value
            & if four_byte_entries {
                ADDR_MASK_32
            } else {
                ADDR_MASK_64
            });
    }
    // Every level list ends with PT, which `leaf_of` always accepts.
    Err(Error::TableAddressOverflow {
        gva,
        level: Level::Pt,
        table,
    })
}

/// If the present, reserved-bit-free entry at `level` maps a page, its size and base.
fn leaf_of(
    mode: PagingMode,
    level: Level,
    value: u64,
    options: &WalkOptions,
) -> Option<(PageSize, Gpa)> {
    let large = value & PAGE_SIZE_BIT != 0;
    match (mode, level) {
        (PagingMode::Bits32, Level::Pt) => Some((PageSize::Size4K, Gpa(value & ADDR_MASK_32))),
        (PagingMode::Bits32, Level::Pd) if large && options.pse => {
            let high = ((value >> 13) & 0xff) << 32;
            Some((PageSize::Size4M, Gpa((value & 0xffc0_0000) | high)))
        }
        (_, Level::Pt) => Some((PageSize::Size4K, Gpa(value & ADDR_MASK_64))),
        (PagingMode::Pae | PagingMode::Level4 | PagingMode::Level5, Level::Pd) if large => Some((
            PageSize::Size2M,
            Gpa(value & ADDR_MASK_64 & !PageSize::Size2M.offset_mask()),
        )),
        (PagingMode::Level4 | PagingMode::Level5, Level::Pdpt) if large => Some((
            PageSize::Size1G,
            Gpa(value & ADDR_MASK_64 & !PageSize::Size1G.offset_mask()),
        )),
        _ => None,
    }
}

fn identity(gva: Gva) -> Translation {
    let mapping = Mapping {
        virt_base: Gva(gva.0 & !PageSize::Size4K.offset_mask()),
        page_base: Gpa(gva.0 & !PageSize::Size4K.offset_mask()),
        page_size: PageSize::Size4K,
        writable: true,
        user: true,
        nx: false,
        global: false,
        dirty: false,
        accessed: false,
    };
    Translation {
        gva,
        gpa: Gpa(gva.0),
        mapping,
        trail: WalkTrail::EMPTY,
    }
}

/// Reject addresses the mode cannot express before reading any table.
pub(crate) fn check_linear_address(mode: PagingMode, gva: Gva) -> Result<(), Error> {
    match mode {
        PagingMode::Disabled | PagingMode::Bits32 | PagingMode::Pae => {
            if gva.0 > u64::from(u32::MAX) {
                return Err(Error::Beyond4G { gva, mode });
            }
        }
        PagingMode::Level4 | PagingMode::Level5 => {
            let top = mode.linear_address_bits() - 1;
            let high = gva.0 >> top;
            if high != 0 && high != u64::MAX >> top {
                return Err(Error::NonCanonical { gva, mode });
            }
        }
    }
    Ok(())
}

/// A physically contiguous piece of a virtual range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VirtChunk {
    /// First virtual address of the piece.
    pub gva: Gva,
    /// Where that address lives.
    pub gpa: Gpa,
    /// Length in bytes; the whole piece is contiguous in both address spaces.
    pub len: u64,
}

/// Pieces stop growing at this size: beyond it, merging saves no measurable time per byte read,
/// and an iterator over a huge identity-mapped range still yields promptly.
const MAX_MERGED_CHUNK: u64 = 16 << 20;

/// Iterator over the physically contiguous pieces of a virtual range, from
/// [`translate_range`] or [`crate::AddressSpace::chunks`].
///
/// Consecutive pages whose frames are adjacent are merged into one piece (up to 16 MiB). When a page fails to
/// translate, the piece before it is yielded first, then the error, then nothing.
pub struct VirtChunks<F> {
    resolve: F,
    cursor: u64,
    remaining: u64,
    pending: Option<Result<VirtChunk, Error>>,
}

impl<F> fmt::Debug for VirtChunks<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtChunks")
            .field("cursor", &Gva(self.cursor))
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl<F> VirtChunks<F>
where
    F: FnMut(Gva) -> Result<Mapping, Error>,
{
    /// Chunks of `gva..gva+len`, resolving each page with `resolve`.
    pub(crate) fn new(gva: Gva, len: u64, resolve: F) -> Self {
        // The last byte must be addressable; a range ending exactly at 2^64 is fine.
        let wraps = len != 0 && gva.0.checked_add(len - 1).is_none();
        Self {
            resolve,
            cursor: gva.0,
            remaining: if wraps { 0 } else { len },
            pending: wraps.then_some(Err(Error::RangeWraps { gva, len })),
        }
    }
}

impl<F> Iterator for VirtChunks<F>
where
    F: FnMut(Gva) -> Result<Mapping, Error>,
{
    type Item = Result<VirtChunk, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut current = match self.pending.take() {
            Some(Ok(chunk)) => chunk,
            Some(Err(error)) => {
                self.remaining = 0;
                return Some(Err(error));
            }
            None => {
                if self.remaining == 0 {
                    return None;
                }
                match self.step() {
                    Ok(chunk) => chunk,
                    Err(error) => {
                        self.remaining = 0;
                        return Some(Err(error));
                    }
                }
            }
        };
        while self.remaining > 0 && current.len < MAX_MERGED_CHUNK {
            match self.step() {
                Ok(next) if current.gpa.checked_add(current.len) == Some(next.gpa) => {
                    current.len += next.len;
                }
                other => {
                    self.pending = Some(other);
                    break;
                }
            }
        }
        Some(Ok(current))
    }
}

impl<F> VirtChunks<F>
where
    F: FnMut(Gva) -> Result<Mapping, Error>,
{
    /// Resolve the page at the cursor and advance past the part of it inside the range.
    fn step(&mut self) -> Result<VirtChunk, Error> {
        let gva = Gva(self.cursor);
        let mapping = (self.resolve)(gva)?;
        let len = mapping.bytes_to_page_end(gva).min(self.remaining);
        self.remaining -= len;
        // Only the very last piece of a range ending at 2^64 overflows, and then nothing follows.
        self.cursor = self.cursor.checked_add(len).unwrap_or(0);
        Ok(VirtChunk {
            gva,
            gpa: mapping.gpa_of(gva),
            len,
        })
    }
}

/// Split `gva..gva+len` into physically contiguous pieces, walking the tables for each page.
pub fn translate_range<'a, M: PhysicalMemory + ?Sized>(
    mem: &'a M,
    mode: PagingMode,
    cr3: u64,
    gva: Gva,
    len: u64,
) -> VirtChunks<impl FnMut(Gva) -> Result<Mapping, Error> + 'a> {
    let options = WalkOptions::default();
    VirtChunks::new(gva, len, move |page| {
        translate_with(mem, mode, cr3, page, &options).map(|t| t.mapping)
    })
}

/// Fill `buf` from the guest-virtual range at `gva`, walking the tables for every page (use
/// [`crate::AddressSpace`] for cached translations). Fails on the first unmapped page; `buf` may
/// then be partly filled.
pub fn read_virt<M: PhysicalMemory + ?Sized>(
    mem: &M,
    mode: PagingMode,
    cr3: u64,
    gva: Gva,
    buf: &mut [u8],
) -> Result<(), Error> {
    let len = buf_len(buf.len());
    copy_chunks(
        translate_range(mem, mode, cr3, gva, len),
        gva,
        |gpa, range| {
            let dst = buf.get_mut(range).ok_or(Error::RangeWraps { gva, len })?;
            mem.read_phys(gpa, dst)
                .map_err(|source| Error::PhysRead { gva, gpa, source })
        },
    )
}

/// Write `data` to the guest-virtual range at `gva`. Page permissions are not checked: an
/// introspection tool may patch read-only kernel text on purpose. Fails on the first unmapped
/// page, after writing the pages before it.
pub fn write_virt<M: PhysicalMemoryWrite + ?Sized>(
    mem: &M,
    mode: PagingMode,
    cr3: u64,
    gva: Gva,
    data: &[u8],
) -> Result<(), Error> {
    let len = buf_len(data.len());
    copy_chunks(
        translate_range(mem, mode, cr3, gva, len),
        gva,
        |gpa, range| {
            let src = data.get(range).ok_or(Error::RangeWraps { gva, len })?;
            mem.write_phys(gpa, src)
                .map_err(|source| Error::PhysWrite { gva, gpa, source })
        },
    )
}

pub(crate) fn buf_len(len: usize) -> u64 {
    // usize is at most 64 bits on every supported target.
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Feed each chunk of a range starting at `start` to `copy` as (physical address, range of the
/// caller's buffer).
pub(crate) fn copy_chunks<I>(
    chunks: I,
    start: Gva,
    mut copy: impl FnMut(Gpa, std::ops::Range<usize>) -> Result<(), Error>,
) -> Result<(), Error>
where
    I: Iterator<Item = Result<VirtChunk, Error>>,
{
    for chunk in chunks {
        let chunk = chunk?;
        let wraps = || Error::RangeWraps {
            gva: start,
            len: chunk.len,
        };
        let offset = chunk
            .gva
            .0
            .checked_sub(start.0)
            .and_then(|offset| usize::try_from(offset).ok())
            .ok_or_else(wraps)?;
        let len = usize::try_from(chunk.len).map_err(|_| wraps())?;
        let end = offset.checked_add(len).ok_or_else(wraps)?;
        copy(chunk.gpa, offset..end)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
