//! The guest-physical layout, from HMP `info mtree -f`.
//!
//! The flat view of the `memory` address space lists, in address order, which memory region
//! backs each guest-physical range and at which offset into it. A QEMU RAM block backs guest RAM
//! in pieces: below 640 KiB, the PAM-shadowed BIOS area (shown as `rom` while write-protected), up
//! to the PCI hole (2 or 3 GiB on `pc`/`q35`), and the rest from 4 GiB. Taking this from QEMU
//! rather than assuming it keeps us right for any machine type and any `-m`.

use crate::error::{Error, Result};

/// One line of a flat view: a guest-physical range backed by one memory region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatRange {
    /// First guest-physical address.
    pub start: u64,
    /// First address past the range.
    pub end: u64,
    /// Region kind as QEMU prints it: `ram`, `rom`, `romd`, `i/o`, ...
    pub kind: String,
    /// Name of the backing memory region (for a RAM backend, its id; `pc.ram` without one).
    pub region: String,
    /// Offset of `start` inside that region.
    pub offset: u64,
}

/// A guest-physical range of RAM and where it lies in its RAM block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// First guest-physical address.
    pub start: u64,
    /// First address past the range.
    pub end: u64,
    /// The backing region's name.
    pub region: String,
    /// Offset of `start` inside the region (for a file backend, the file offset).
    pub offset: u64,
}

impl RamRange {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True for an empty range.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Parse the flat view of the `memory` address space out of `info mtree -f` output.
pub fn parse_memory_flatview(text: &str) -> Result<Vec<FlatRange>> {
    let mut in_memory_view = false;
    let mut seen_memory_view = false;
    let mut ranges = Vec::new();
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        let trimmed = line.trim();
        if trimmed.starts_with("FlatView #") {
            if seen_memory_view {
                break;
            }
            in_memory_view = false;
            continue;
        }
        if trimmed.starts_with("AS \"memory\"") {
            in_memory_view = true;
            seen_memory_view = true;
            continue;
        }
        if !in_memory_view {
            continue;
        }
        if let Some(r) = parse_range_line(trimmed) {
            ranges.push(r);
        }
    }
    if !seen_memory_view {
        return Err(Error::protocol(
            "info mtree -f",
            "no flat view for address space \"memory\"",
        ));
    }
    Ok(ranges)
}

/// `0000000000100000-00000000bfffffff (prio 0, ram): ram @0000000000100000`
fn parse_range_line(line: &str) -> Option<FlatRange> {
    let (span, rest) = line.split_once(' ')?;
    let (a, b) = span.split_once('-')?;
    let start = u64::from_str_radix(a, 16).ok()?;
    let last = u64::from_str_radix(b, 16).ok()?;
    // QEMU prints the last byte; a range ending at 2^64-1 has no exclusive end, and nothing that
    // high is RAM, so it is skipped rather than wrapped.
    let end = last.checked_add(1)?;
    let rest = rest.trim_start().strip_prefix('(')?;
    let (attrs, rest) = rest.split_once(')')?;
    let kind = attrs.rsplit(',').next()?.trim().to_string();
    let rest = rest.strip_prefix(':')?.trim();
    let mut words = rest.split_whitespace();
    let region = words.next()?.to_string();
    let mut offset = 0;
    for w in words {
        if let Some(hex) = w.strip_prefix('@') {
            offset = u64::from_str_radix(hex, 16).ok()?;
            break;
        }
    }
    Some(FlatRange {
        start,
        end,
        kind,
        region,
        offset,
    })
}

/// The RAM ranges backed by one of `regions` (RAM backend ids, or `pc.ram`), with neighbours
/// that continue each other both in guest-physical space and in the block merged.
pub fn ram_ranges(flat: &[FlatRange], regions: &[String]) -> Vec<RamRange> {
    let mut out: Vec<RamRange> = Vec::new();
    for f in flat {
        // Write-protected shadow RAM shows as `rom` but is still the RAM block's memory.
        if !matches!(f.kind.as_str(), "ram" | "rom" | "ramd") {
            continue;
        }
        if !regions.contains(&f.region) {
            continue;
        }
        if let Some(prev) = out.last_mut() {
            let continues = prev.end == f.start
                && prev.region == f.region
                && prev.offset.checked_add(prev.len()) == Some(f.offset);
            if continues {
                prev.end = f.end;
                continue;
            }
        }
        out.push(RamRange {
            start: f.start,
            end: f.end,
            region: f.region.clone(),
            offset: f.offset,
        });
    }
    out
}

/// Parse HMP `info ramblock` into (name, used bytes).
pub fn parse_ramblocks(text: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // name, psize value, psize unit, offset, used, total
        if words.len() < 6 || words[0] == "Block" {
            continue;
        }
        let Some(used) = words[4]
            .strip_prefix("0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
        else {
            continue;
        };
        out.push((words[0].to_string(), used));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTREE_4G: &str = "FlatView #0\n AS \"memory\", root: system\n AS \"cpu-memory-0\", root: system\n Root memory region: system\n  0000000000000000-00000000000c2fff (prio 0, ram): ram\n  00000000000c3000-00000000000e7fff (prio 0, rom): ram @00000000000c3000\n  00000000000e8000-00000000000effff (prio 0, ram): ram @00000000000e8000\n  00000000000f0000-00000000000fffff (prio 0, rom): ram @00000000000f0000\n  0000000000100000-00000000bfffffff (prio 0, ram): ram @0000000000100000\n  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic\n  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios\n  0000000100000000-000000013fffffff (prio 0, ram): ram @00000000c0000000\n\nFlatView #1\n AS \"I/O\", root: io\n Root memory region: io\n  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan\n";

    #[test]
    fn four_gib_guest_has_ram_above_the_pci_hole() {
        let flat = parse_memory_flatview(MTREE_4G).unwrap();
        assert_eq!(flat.len(), 8);
        let ram = ram_ranges(&flat, &["ram".to_string()]);
        assert_eq!(
            ram,
            vec![
                RamRange {
                    start: 0,
                    end: 0xc000_0000,
                    region: "ram".into(),
                    offset: 0
                },
                RamRange {
                    start: 0x1_0000_0000,
                    end: 0x1_4000_0000,
                    region: "ram".into(),
                    offset: 0xc000_0000
                },
            ]
        );
    }

    #[test]
    fn reset_state_bios_is_not_ram() {
        let text = "FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n  0000000000000000-00000000000bffff (prio 0, ram): pc.ram\n  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom\n  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000\n  0000000000100000-0000000003ffffff (prio 0, ram): pc.ram @0000000000100000\n";
        let flat = parse_memory_flatview(text).unwrap();
        let ram = ram_ranges(&flat, &["pc.ram".to_string()]);
        assert_eq!(ram.len(), 2);
        assert_eq!((ram[0].start, ram[0].end), (0, 0xc0000));
        assert_eq!(
            (ram[1].start, ram[1].end, ram[1].offset),
            (0x100000, 0x400_0000, 0x100000)
        );
    }

    #[test]
    fn missing_memory_view_is_an_error() {
        assert!(parse_memory_flatview("FlatView #0\n AS \"I/O\", root: io\n").is_err());
        assert!(parse_memory_flatview("").is_err());
    }

    #[test]
    fn odd_lines_are_ignored_not_fatal() {
        let text = "FlatView #0\n AS \"memory\", root: system\n  zzzz-0000 (prio 0, ram): x\n  0000000000000000-ffffffffffffffff (prio -1, i/o): unassigned\n  0000000000000000-0000000000000fff (prio 0, ram): ram\n";
        let flat = parse_memory_flatview(text).unwrap();
        assert_eq!(flat.len(), 1);
    }

    #[test]
    fn ramblocks() {
        let text = "              Block Name    PSize              Offset               Used              Total\n                     ram    4 KiB  0x0000000000000000 0x0000000100000000 0x0000000100000000\n                 pc.bios    4 KiB  0x0000000100000000 0x0000000000040000 0x0000000000040000\n";
        assert_eq!(
            parse_ramblocks(text),
            vec![
                ("ram".to_string(), 0x1_0000_0000),
                ("pc.bios".to_string(), 0x40000)
            ]
        );
    }
}
