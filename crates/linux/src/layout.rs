//! Where the kernel is: paging mode, page-table root, KASLR offsets.

use kvmaccess_core::{Gpa, Gva, PhysicalMemory, Registers};
use kvmaccess_x86::{AddressSpace, PagingMode};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::kallsyms::KernelRead;
use crate::vmcoreinfo::Vmcoreinfo;

/// `__START_KERNEL_map` on x86-64: the kernel image is mapped at this address plus its physical
/// load address minus `phys_base`.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// Link-time address of `_text` with the default `CONFIG_PHYSICAL_START` (16 MiB).
pub const DEFAULT_TEXT: u64 = 0xffff_ffff_8100_0000;

/// Size of the `__START_KERNEL_map` region (KERNEL_IMAGE_SIZE with KASLR).
pub const KERNEL_IMAGE_REGION: u64 = 1 << 30;

/// Banner prefix of `linux_banner`.
pub const BANNER_PREFIX: &[u8] = b"Linux version ";

/// How the kernel's address space is laid out in this guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KernelLayout {
    /// Paging mode of kernel addresses.
    pub mode: PagingMode,
    /// Guest-physical address of the top-level page table that maps the kernel
    /// (`init_top_pgt`, alias `swapper_pg_dir`, or the CR3 of a vCPU in the fallback).
    pub root: Gpa,
    /// KASLR virtual slide of the kernel image (`KERNELOFFSET`).
    pub kaslr_offset: u64,
    /// `phys_base`: physical load address minus the link-time one, adjusted for the slide.
    pub phys_base: i64,
    /// Start of the direct map of all physical memory, when known.
    pub page_offset_base: Option<u64>,
}

impl KernelLayout {
    /// The layout VMCOREINFO describes (x86-64 only).
    pub fn from_vmcoreinfo(info: &Vmcoreinfo) -> Result<Self> {
        if let Some(size) = info.page_size {
            if size != 4096 {
                return Err(Error::Unsupported(format!(
                    "PAGESIZE={size} (only x86-64 with 4 KiB pages is supported)"
                )));
            }
        }
        let mode = match info.numbers.get("pgtable_l5_enabled") {
            Some(1) => PagingMode::Level5,
            Some(0) | None => PagingMode::Level4,
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "NUMBER(pgtable_l5_enabled)={other} (expected 0 or 1)"
                )))
            }
        };
        let phys_base = info.number("phys_base").map_err(|_| {
            Error::Unsupported(
                "VMCOREINFO has no NUMBER(phys_base): not an x86-64 kernel?".to_string(),
            )
        })?;
        let pgd = info
            .symbol("init_top_pgt")
            .or_else(|_| info.symbol("swapper_pg_dir"))?;
        let mut layout = Self {
            mode,
            root: Gpa(0),
            kaslr_offset: info.kernel_offset.unwrap_or(0),
            phys_base,
            page_offset_base: info
                .numbers
                .get("page_offset_base")
                .map(|&v| u64::from_le_bytes(v.to_le_bytes())),
        };
        layout.root = layout.image_phys(pgd).ok_or_else(|| {
            Error::Unsupported(format!(
                "init_top_pgt {pgd:#x} is not in the kernel image mapping"
            ))
        })?;
        if layout.root.0 % 4096 != 0 {
            return Err(Error::Unsupported(format!(
                "kernel page-table root {} is not page-aligned",
                layout.root
            )));
        }
        Ok(layout)
    }

    /// Physical address of a kernel-image address by the `__START_KERNEL_map` rule, without
    /// walking page tables; `None` outside the image region.
    pub fn image_phys(&self, gva: u64) -> Option<Gpa> {
        let offset = gva.checked_sub(START_KERNEL_MAP)?;
        if offset >= KERNEL_IMAGE_REGION {
            return None;
        }
        Some(Gpa(offset.wrapping_add(u64::from_le_bytes(
            self.phys_base.to_le_bytes(),
        ))))
    }

    /// Physical KASLR offset: how far the image was loaded from its link-time physical address.
    pub fn phys_kaslr_offset(&self) -> u64 {
        self.kaslr_offset
            .wrapping_add(u64::from_le_bytes(self.phys_base.to_le_bytes()))
    }

    /// Physical address `_text` was loaded at, assuming the default `CONFIG_PHYSICAL_START`.
    pub fn phys_load_address(&self) -> Option<Gpa> {
        self.image_phys(DEFAULT_TEXT.wrapping_add(self.kaslr_offset))
    }

    /// An address space for kernel virtual addresses.
    pub fn space<'m, M: PhysicalMemory + ?Sized>(&self, mem: &'m M) -> AddressSpace<'m, M> {
        AddressSpace::new(mem, self.mode, self.root.0)
    }
}

/// A `linux_banner` found in memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Banner {
    /// Its kernel virtual address.
    pub address: u64,
    /// The text up to its newline.
    pub text: String,
    /// The release (the word after "Linux version ").
    pub release: String,
}

/// Read and check the banner at `address`: it must start with "Linux version ".
pub fn read_banner<R: KernelRead + ?Sized>(mem: &mut R, address: u64) -> Result<Banner> {
    let mut raw = [0u8; 256];
    mem.read_kernel(Gva(address), &mut raw)?;
    parse_banner(address, &raw).ok_or_else(|| {
        Error::KallsymsMismatch(format!(
            "linux_banner at {address:#x} does not start with \"Linux version \": {:?}",
            crate::error::excerpt(&raw, 40)
        ))
    })
}

fn parse_banner(address: u64, raw: &[u8]) -> Option<Banner> {
    let rest = raw.strip_prefix(BANNER_PREFIX)?;
    let end = rest
        .iter()
        .position(|&b| b == 0 || b == b'\n')
        .unwrap_or(rest.len());
    let body = rest.get(..end)?;
    let release_len = body.iter().position(|&b| b == b' ').unwrap_or(body.len());
    let release = std::str::from_utf8(body.get(..release_len)?).ok()?;
    if release.is_empty() || !release.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(BANNER_PREFIX),
        String::from_utf8_lossy(body)
    );
    Some(Banner {
        address,
        text,
        release: release.to_string(),
    })
}

/// What the register fallback found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegisterFallback {
    /// The layout.
    pub layout: KernelLayout,
    /// The vCPU whose CR3 was used.
    pub vcpu: usize,
    /// `_text` as the first mapped page of the kernel image region.
    pub text: u64,
    /// The banner found in the image.
    pub banner: Option<Banner>,
}

/// Build a layout from a vCPU's CR3 when there is no VMCOREINFO.
///
/// Every process's page tables map the kernel image at `__START_KERNEL_map` + slide and the
/// kernel clears the mappings below `_text` at boot, so the first mapped 2 MiB page of that
/// region is `_text`; the slide follows if the kernel was linked at the default 16 MiB
/// (`CONFIG_PHYSICAL_START`), an assumption the provenance states. With page-table isolation a
/// vCPU in user mode has the user half of a pair of tables in CR3; the kernel half is the page
/// below (bit 12 clear), which is tried too.
pub fn from_registers<M: PhysicalMemory + ?Sized>(
    mem: &M,
    regs: &Registers,
) -> Result<RegisterFallback> {
    let detection = PagingMode::detect(regs);
    let mode = detection.mode;
    if !matches!(mode, PagingMode::Level4 | PagingMode::Level5) {
        return Err(Error::Unsupported(format!(
            "vCPU {} is in {mode:?} paging mode, not x86-64 long mode",
            regs.vcpu
        )));
    }
    let root = mode.root_table(regs.cr3).unwrap_or(Gpa(0));
    let mut last_error = None;
    for root in [root, Gpa(root.0 & !0x1000)] {
        let mut space = AddressSpace::new(mem, mode, root.0);
        match first_image_mapping(&mut space) {
            Ok((text, text_phys)) => {
                let kaslr_offset = text.wrapping_sub(DEFAULT_TEXT);
                let phys_base = text_phys.0.wrapping_sub(text - START_KERNEL_MAP);
                let layout = KernelLayout {
                    mode,
                    root,
                    kaslr_offset,
                    phys_base: i64::from_le_bytes(phys_base.to_le_bytes()),
                    page_offset_base: None,
                };
                let banner = find_banner(&mut space, text);
                return Ok(RegisterFallback {
                    layout,
                    vcpu: regs.vcpu,
                    text,
                    banner,
                });
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| Error::NoProfileSource("no kernel mapping".to_string())))
}

fn first_image_mapping<M: PhysicalMemory + ?Sized>(
    space: &mut AddressSpace<'_, M>,
) -> Result<(u64, Gpa)> {
    const STEP: u64 = 2 << 20;
    let mut va = START_KERNEL_MAP;
    while va < START_KERNEL_MAP + KERNEL_IMAGE_REGION {
        if let Ok(gpa) = space.gpa(Gva(va)) {
            return Ok((va, gpa));
        }
        va += STEP;
    }
    Err(Error::NoProfileSource(format!(
        "CR3 root {:#x} maps nothing in the kernel image region {START_KERNEL_MAP:#x}..+1 GiB",
        space.cr3()
    )))
}

/// Scan the mapped kernel image from `text` for `linux_banner`.
fn find_banner<M: PhysicalMemory + ?Sized>(
    space: &mut AddressSpace<'_, M>,
    text: u64,
) -> Option<Banner> {
    const CHUNK: usize = 2 << 20;
    let finder = memchr::memmem::Finder::new(BANNER_PREFIX);
    let mut buf = vec![0u8; CHUNK + 256];
    let mut va = text;
    let end = START_KERNEL_MAP + KERNEL_IMAGE_REGION;
    while va < end {
        // The image ends at the first unmapped chunk.
        space.read(Gva(va), &mut buf).ok()?;
        let hits: Vec<usize> = finder
            .find_iter(buf.get(..CHUNK).unwrap_or_default())
            .collect();
        for hit in hits {
            if let Some(banner) = buf
                .get(hit..)
                .and_then(|raw| parse_banner(va + hit as u64, raw))
            {
                if banner.text.contains(" (") {
                    return Some(banner);
                }
            }
        }
        va += CHUNK as u64;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_parsing() {
        let b = parse_banner(1, b"Linux version 6.1.0-56-cloud-amd64 (x@y) #1 SMP\n\0").unwrap();
        assert_eq!(b.release, "6.1.0-56-cloud-amd64");
        assert_eq!(b.text, "Linux version 6.1.0-56-cloud-amd64 (x@y) #1 SMP");
        assert!(parse_banner(1, b"Linux version \0").is_none());
        assert!(parse_banner(1, b"Linux versio").is_none());
    }

    #[test]
    fn image_translation_uses_signed_phys_base() {
        let layout = KernelLayout {
            mode: PagingMode::Level5,
            root: Gpa(0),
            kaslr_offset: 0x3100_0000,
            phys_base: -450_887_680,
            page_offset_base: None,
        };
        // _text = 0xffffffff81000000 + slide; phys = _text - MAP + phys_base.
        let text = DEFAULT_TEXT + 0x3100_0000;
        assert_eq!(layout.image_phys(text), Some(Gpa(0x1720_0000)));
        assert_eq!(layout.phys_load_address(), Some(Gpa(0x1720_0000)));
        assert_eq!(layout.phys_kaslr_offset(), 0x1620_0000);
        assert_eq!(layout.image_phys(0xffff_8880_0000_0000), None);
    }
}
