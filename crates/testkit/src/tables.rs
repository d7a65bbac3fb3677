use kvmaccess_core::{Gpa, Gva, PhysicalMemory, PAGE_SIZE};

use crate::{Error, MockMemory};

/// Page-table entry bits, written down independently of `kvmaccess-x86`.
pub mod bits {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Writable.
    pub const RW: u64 = 1 << 1;
    /// User-accessible.
    pub const US: u64 = 1 << 2;
    /// Page-level write-through.
    pub const PWT: u64 = 1 << 3;
    /// Page-level cache disable.
    pub const PCD: u64 = 1 << 4;
    /// Accessed.
    pub const A: u64 = 1 << 5;
    /// Dirty (leaf entries only).
    pub const D: u64 = 1 << 6;
    /// Page size: the entry maps a large page (PDE, PDPTE); reserved in PML4E/PML5E.
    pub const PS: u64 = 1 << 7;
    /// Global (leaf entries only).
    pub const G: u64 = 1 << 8;
    /// Execute-disable (PAE and long mode, with EFER.NXE).
    pub const XD: u64 = 1 << 63;
    /// Frame address bits of a 64-bit entry (MAXPHYADDR 52).
    pub const ADDR_64: u64 = 0x000f_ffff_ffff_f000;
    /// Frame address bits of a 32-bit entry.
    pub const ADDR_32: u64 = 0xffff_f000;
}

/// The page-table layout to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TableFormat {
    /// Two levels of 4-byte entries (CR4.PAE = 0); 4 MiB pages need CR4.PSE.
    Bits32,
    /// PAE: a 4-entry PDPT, then PD and PT of 8-byte entries.
    Pae,
    /// IA-32e 4-level paging.
    Level4,
    /// IA-32e 5-level paging (CR4.LA57).
    Level5,
}

/// One level of a page-table hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TableLevel {
    /// Page-map level 5.
    Pml5,
    /// Page-map level 4.
    Pml4,
    /// Page-directory-pointer table.
    Pdpt,
    /// Page directory.
    Pd,
    /// Page table.
    Pt,
}

/// Size of the page a mapping creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB (PTE).
    Size4K,
    /// 2 MiB (PDE with PS; PAE and long mode).
    Size2M,
    /// 4 MiB (PDE with PS; 32-bit paging with CR4.PSE).
    Size4M,
    /// 1 GiB (PDPTE with PS; long mode).
    Size1G,
}

impl PageSize {
    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size4M => 1 << 22,
            PageSize::Size1G => 1 << 30,
        }
    }
}

/// Permission and status bits of a leaf mapping. Intermediate entries the builder creates are
/// present, writable and user so that these leaf bits alone decide the effective permissions;
/// poke the intermediate entries to test accumulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapFlags {
    /// R/W bit.
    pub writable: bool,
    /// U/S bit.
    pub user: bool,
    /// XD bit (ignored in 32-bit format, which has none).
    pub nx: bool,
    /// G bit.
    pub global: bool,
    /// D bit.
    pub dirty: bool,
    /// A bit.
    pub accessed: bool,
}

impl MapFlags {
    /// Supervisor, read-only, executable.
    pub const KERNEL_RO: Self = Self {
        writable: false,
        user: false,
        nx: false,
        global: false,
        dirty: false,
        accessed: false,
    };
    /// Supervisor, writable, executable.
    pub const KERNEL_RW: Self = Self {
        writable: true,
        ..Self::KERNEL_RO
    };
    /// User, writable, executable.
    pub const USER_RW: Self = Self {
        writable: true,
        user: true,
        ..Self::KERNEL_RO
    };

    /// The same flags with `nx` set.
    pub const fn nx(self) -> Self {
        Self { nx: true, ..self }
    }

    /// The same flags with `global` set.
    pub const fn global(self) -> Self {
        Self {
            global: true,
            ..self
        }
    }

    /// The same flags with `accessed` and `dirty` set.
    pub const fn dirty(self) -> Self {
        Self {
            dirty: true,
            accessed: true,
            ..self
        }
    }

    fn entry_bits(self, format: TableFormat) -> u64 {
        let mut value = bits::P;
        let pairs = [
            (self.writable, bits::RW),
            (self.user, bits::US),
            (self.global, bits::G),
            (self.dirty, bits::D),
            (self.accessed, bits::A),
            (self.nx && format != TableFormat::Bits32, bits::XD),
        ];
        for (on, bit) in pairs {
            if on {
                value |= bit;
            }
        }
        value
    }
}

/// Lays out x86 page tables in a [`MockMemory`].
///
/// Table frames come from a bump allocator over an area of guest-physical memory (by default
/// `1 MiB..4 MiB`); keep data pages outside that area.
#[derive(Debug)]
pub struct PageTableBuilder<'m> {
    mem: &'m MockMemory,
    format: TableFormat,
    root: Gpa,
    area_start: u64,
    next_frame: u64,
    area_end: u64,
}

/// Default frame area for page tables.
const DEFAULT_AREA: (u64, u64) = (0x10_0000, 0x40_0000);

impl<'m> PageTableBuilder<'m> {
    /// A builder with an empty root table allocated from the default area.
    pub fn new(mem: &'m MockMemory, format: TableFormat) -> Result<Self, Error> {
        Self::with_table_area(mem, format, Gpa(DEFAULT_AREA.0), Gpa(DEFAULT_AREA.1))
    }

    /// A builder allocating tables (the root first) from `start..end`.
    pub fn with_table_area(
        mem: &'m MockMemory,
        format: TableFormat,
        start: Gpa,
        end: Gpa,
    ) -> Result<Self, Error> {
        let mut builder = Self {
            mem,
            format,
            root: Gpa(0),
            area_start: start.0.next_multiple_of(PAGE_SIZE),
            next_frame: start.0.next_multiple_of(PAGE_SIZE),
            area_end: end.0,
        };
        builder.root = builder.alloc_frame()?;
        Ok(builder)
    }

    /// A builder whose root table is at `root` (which the caller has zeroed, or filled on
    /// purpose), allocating further tables from the default area. PAE roots need only 32-byte
    /// alignment, which lets tests put CR3 bits 5-11 to use.
    pub fn with_root(mem: &'m MockMemory, format: TableFormat, root: Gpa) -> Self {
        Self {
            mem,
            format,
            root,
            area_start: DEFAULT_AREA.0,
            next_frame: DEFAULT_AREA.0,
            area_end: DEFAULT_AREA.1,
        }
    }

    /// The table format.
    pub fn format(&self) -> TableFormat {
        self.format
    }

    /// Address of the root table.
    pub fn root(&self) -> Gpa {
        self.root
    }

    /// A CR3 value selecting the root table (no PCID, no cache-control bits).
    pub fn cr3(&self) -> u64 {
        self.root.0
    }

    /// A zeroed frame from the table area.
    pub fn alloc_frame(&mut self) -> Result<Gpa, Error> {
        let frame = self.next_frame;
        let next = frame
            .checked_add(PAGE_SIZE)
            .filter(|&next| next <= self.area_end)
            .ok_or(Error::OutOfFrames {
                start: Gpa(self.area_start),
                end: Gpa(self.area_end),
            })?;
        self.mem
            .write_bytes(Gpa(frame), &[0; crate::memory::FRAME_BYTES])?;
        self.next_frame = next;
        Ok(Gpa(frame))
    }

    /// Map the page of `size` at `gva` to the frame at `gpa`, creating intermediate tables.
    /// Replaces an existing leaf at that level.
    pub fn map(
        &mut self,
        gva: Gva,
        gpa: Gpa,
        size: PageSize,
        flags: MapFlags,
    ) -> Result<(), Error> {
        let leaf_level = self.leaf_level(size)?;
        self.check_virtual(gva)?;
        check_aligned("virtual address", gva.0, size.bytes())?;
        check_aligned("physical address", gpa.0, size.bytes())?;
        let leaf = self.leaf_entry(gpa, size, flags)?;

        let mut table = self.root;
        for &(level, _, _) in self.levels() {
            let entry = self.entry_in(table, gva, level)?;
            if level == leaf_level {
                return self.write_entry(entry, leaf);
            }
            let value = self.read_entry(entry)?;
            table = if value & bits::P == 0 {
                let frame = self.alloc_frame()?;
                self.write_entry(entry, frame.0 | self.intermediate_bits(level))?;
                frame
            } else if value & bits::PS != 0 && self.ps_is_page_size(level) {
                return Err(Error::LargePageInTheWay { gva, level, entry });
            } else {
                Gpa(value & self.addr_mask())
            };
        }
        // The leaf level is always one of the format's levels; reaching here means it was not.
        Err(Error::UnsupportedPageSize {
            format: self.format,
            size,
        })
    }

    /// Map `count` consecutive 4 KiB pages from `gva` to consecutive frames from `gpa`.
    pub fn map_4k_range(
        &mut self,
        gva: Gva,
        gpa: Gpa,
        count: u64,
        flags: MapFlags,
    ) -> Result<(), Error> {
        for page in 0..count {
            let offset = page
                .checked_mul(PAGE_SIZE)
                .ok_or(Error::AddressOverflow { gpa, len: u64::MAX })?;
            let overflow = Error::AddressOverflow { gpa, len: offset };
            let page_gva = gva.checked_add(offset).ok_or(overflow)?;
            let overflow = Error::AddressOverflow { gpa, len: offset };
            let page_gpa = gpa.checked_add(offset).ok_or(overflow)?;
            self.map(page_gva, page_gpa, PageSize::Size4K, flags)?;
        }
        Ok(())
    }

    /// Address of the entry that `level` uses for `gva`, following the tables built so far.
    /// `None` when an upper entry is not present or maps a large page, or the format has no such
    /// level.
    pub fn entry_addr(&self, gva: Gva, level: TableLevel) -> Result<Option<Gpa>, Error> {
        let mut table = self.root;
        for &(this_level, _, _) in self.levels() {
            let entry = self.entry_in(table, gva, this_level)?;
            if this_level == level {
                return Ok(Some(entry));
            }
            let value = self.read_entry(entry)?;
            if value & bits::P == 0 || (value & bits::PS != 0 && self.ps_is_page_size(this_level)) {
                return Ok(None);
            }
            table = Gpa(value & self.addr_mask());
        }
        Ok(None)
    }

    /// Read the entry at `entry` (4 bytes in 32-bit format, else 8).
    pub fn read_entry(&self, entry: Gpa) -> Result<u64, Error> {
        Ok(match self.format {
            TableFormat::Bits32 => u64::from(self.mem.read_u32(entry)?),
            _ => self.mem.read_u64(entry)?,
        })
    }

    /// Overwrite the entry at `entry` with a raw value (for reserved bits, cycles, garbage). In
    /// 32-bit format only the low 32 bits are written.
    pub fn write_entry(&self, entry: Gpa, value: u64) -> Result<(), Error> {
        let bytes = value.to_le_bytes();
        match self.format {
            TableFormat::Bits32 => self.mem.write_bytes(entry, &bytes[..4]),
            _ => self.mem.write_bytes(entry, &bytes),
        }
    }

    /// Set `set` and clear `clear` in the entry `level` uses for `gva`; returns the entry's
    /// address. Fails with `PhysUnmapped` at address 0 if there is no such entry.
    pub fn modify_entry(
        &self,
        gva: Gva,
        level: TableLevel,
        set: u64,
        clear: u64,
    ) -> Result<Gpa, Error> {
        let entry = self.entry_addr(gva, level)?.ok_or(Error::Core(
            kvmaccess_core::Error::PhysUnmapped { gpa: Gpa(0) },
        ))?;
        let value = self.read_entry(entry)?;
        self.write_entry(entry, (value | set) & !clear)?;
        Ok(entry)
    }

    /// The levels of this format, top first, with the shift and width of their index.
    pub fn levels(&self) -> &'static [(TableLevel, u32, u32)] {
        match self.format {
            TableFormat::Bits32 => &[(TableLevel::Pd, 22, 10), (TableLevel::Pt, 12, 10)],
            TableFormat::Pae => &[
                (TableLevel::Pdpt, 30, 2),
                (TableLevel::Pd, 21, 9),
                (TableLevel::Pt, 12, 9),
            ],
            TableFormat::Level4 => &[
                (TableLevel::Pml4, 39, 9),
                (TableLevel::Pdpt, 30, 9),
                (TableLevel::Pd, 21, 9),
                (TableLevel::Pt, 12, 9),
            ],
            TableFormat::Level5 => &[
                (TableLevel::Pml5, 48, 9),
                (TableLevel::Pml4, 39, 9),
                (TableLevel::Pdpt, 30, 9),
                (TableLevel::Pd, 21, 9),
                (TableLevel::Pt, 12, 9),
            ],
        }
    }

    fn entry_size(&self) -> u64 {
        match self.format {
            TableFormat::Bits32 => 4,
            _ => 8,
        }
    }

    fn addr_mask(&self) -> u64 {
        match self.format {
            TableFormat::Bits32 => bits::ADDR_32,
            _ => bits::ADDR_64,
        }
    }

    fn entry_in(&self, table: Gpa, gva: Gva, level: TableLevel) -> Result<Gpa, Error> {
        let (shift, width) = self
            .levels()
            .iter()
            .find(|(l, _, _)| *l == level)
            .map(|&(_, shift, width)| (shift, width))
            .unwrap_or((12, 9));
        let index = (gva.0 >> shift) & ((1 << width) - 1);
        let offset = index * self.entry_size();
        table.checked_add(offset).ok_or(Error::AddressOverflow {
            gpa: table,
            len: offset,
        })
    }

    /// Whether bit 7 of an entry at `level` means "large page" (it does in PDEs, and in PDPTEs
    /// outside PAE).
    fn ps_is_page_size(&self, level: TableLevel) -> bool {
        match level {
            TableLevel::Pd => true,
            TableLevel::Pdpt => self.format != TableFormat::Pae,
            _ => false,
        }
    }

    fn intermediate_bits(&self, level: TableLevel) -> u64 {
        if self.format == TableFormat::Pae && level == TableLevel::Pdpt {
            // PAE PDPTEs have no R/W or U/S: those bits are reserved there.
            bits::P
        } else {
            bits::P | bits::RW | bits::US | bits::A
        }
    }

    fn leaf_level(&self, size: PageSize) -> Result<TableLevel, Error> {
        let level = match (self.format, size) {
            (_, PageSize::Size4K) => Some(TableLevel::Pt),
            (TableFormat::Bits32, PageSize::Size4M) => Some(TableLevel::Pd),
            (TableFormat::Bits32, _) => None,
            (_, PageSize::Size2M) => Some(TableLevel::Pd),
            (TableFormat::Level4 | TableFormat::Level5, PageSize::Size1G) => Some(TableLevel::Pdpt),
            _ => None,
        };
        level.ok_or(Error::UnsupportedPageSize {
            format: self.format,
            size,
        })
    }

    fn check_virtual(&self, gva: Gva) -> Result<(), Error> {
        let fits = match self.format {
            TableFormat::Bits32 | TableFormat::Pae => gva.0 <= u64::from(u32::MAX),
            TableFormat::Level4 => sign_extended(gva.0, 48),
            TableFormat::Level5 => sign_extended(gva.0, 57),
        };
        if fits {
            Ok(())
        } else {
            Err(Error::AddressTooWide {
                what: "virtual address",
                value: gva.0,
                format: self.format,
            })
        }
    }

    fn leaf_entry(&self, gpa: Gpa, size: PageSize, flags: MapFlags) -> Result<u64, Error> {
        let mut value = flags.entry_bits(self.format);
        if size != PageSize::Size4K {
            value |= bits::PS;
        }
        let too_wide = |limit: u64| {
            if gpa.0 >= limit {
                Err(Error::AddressTooWide {
                    what: "physical address",
                    value: gpa.0,
                    format: self.format,
                })
            } else {
                Ok(())
            }
        };
        match (self.format, size) {
            (TableFormat::Bits32, PageSize::Size4M) => {
                // PSE-36: physical bits 39:32 live in PDE bits 20:13.
                too_wide(1 << 40)?;
                value |= (gpa.0 & 0xffc0_0000) | (((gpa.0 >> 32) & 0xff) << 13);
            }
            (TableFormat::Bits32, _) => {
                too_wide(1 << 32)?;
                value |= gpa.0;
            }
            _ => {
                too_wide(1 << 52)?;
                value |= gpa.0;
            }
        }
        Ok(value)
    }
}

fn check_aligned(what: &'static str, value: u64, align: u64) -> Result<(), Error> {
    if value % align == 0 {
        Ok(())
    } else {
        Err(Error::Misaligned { what, value, align })
    }
}

/// Whether bits 63..`width` of `value` all equal bit `width - 1`.
fn sign_extended(value: u64, width: u32) -> bool {
    let high = value >> (width - 1);
    high == 0 || high == u64::MAX >> (width - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_4_level_mapping() {
        let mem = MockMemory::new(1 << 30);
        let mut builder = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
        let gva = Gva(0xffff_8000_0020_3000);
        builder
            .map(gva, Gpa(0x50_0000), PageSize::Size4K, MapFlags::KERNEL_RW)
            .unwrap();
        let pte = builder.entry_addr(gva, TableLevel::Pt).unwrap().unwrap();
        assert_eq!(
            builder.read_entry(pte).unwrap(),
            0x50_0000 | bits::P | bits::RW
        );
        // Root + PDPT + PD + PT.
        assert_eq!(builder.next_frame - builder.area_start, 4 * PAGE_SIZE);
        let err = builder.map(
            Gva(0x1000_0000_0000_0000),
            Gpa(0),
            PageSize::Size4K,
            MapFlags::KERNEL_RW,
        );
        assert!(matches!(err, Err(Error::AddressTooWide { .. })));
    }

    #[test]
    fn pse36_bits_land_in_the_pde() {
        let mem = MockMemory::new(1 << 24);
        let mut builder = PageTableBuilder::new(&mem, TableFormat::Bits32).unwrap();
        builder
            .map(
                Gva(0x8040_0000),
                Gpa(0x12_0040_0000),
                PageSize::Size4M,
                MapFlags::USER_RW,
            )
            .unwrap();
        let pde = builder
            .entry_addr(Gva(0x8040_0000), TableLevel::Pd)
            .unwrap()
            .unwrap();
        let value = builder.read_entry(pde).unwrap();
        assert_eq!(
            value,
            0x0040_0000 | (0x12 << 13) | bits::PS | bits::P | bits::RW | bits::US
        );
        assert_eq!(
            builder
                .entry_addr(Gva(0x8040_0000), TableLevel::Pt)
                .unwrap(),
            None
        );
    }

    #[test]
    fn rejects_what_the_format_cannot_express() {
        let mem = MockMemory::new(1 << 24);
        let mut pae = PageTableBuilder::new(&mem, TableFormat::Pae).unwrap();
        assert!(matches!(
            pae.map(Gva(0), Gpa(0), PageSize::Size1G, MapFlags::KERNEL_RW),
            Err(Error::UnsupportedPageSize { .. })
        ));
        assert!(matches!(
            pae.map(
                Gva(0x1000),
                Gpa(0x20_0000),
                PageSize::Size2M,
                MapFlags::KERNEL_RW
            ),
            Err(Error::Misaligned { .. })
        ));
        pae.map(
            Gva(0x20_0000),
            Gpa(0x20_0000),
            PageSize::Size2M,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
        assert!(matches!(
            pae.map(
                Gva(0x20_1000),
                Gpa(0x1000),
                PageSize::Size4K,
                MapFlags::KERNEL_RW
            ),
            Err(Error::LargePageInTheWay { .. })
        ));
        let pdpte = pae
            .entry_addr(Gva(0x20_0000), TableLevel::Pdpt)
            .unwrap()
            .unwrap();
        assert_eq!(pae.read_entry(pdpte).unwrap() & !bits::ADDR_64, bits::P);
    }

    #[test]
    fn frame_area_runs_out_cleanly() {
        let mem = MockMemory::new(1 << 24);
        let mut builder =
            PageTableBuilder::with_table_area(&mem, TableFormat::Level5, Gpa(0x1000), Gpa(0x3000))
                .unwrap();
        let err = builder.map(Gva(0), Gpa(0), PageSize::Size4K, MapFlags::KERNEL_RW);
        assert!(matches!(err, Err(Error::OutOfFrames { .. })));
    }
}
