//! Finding and parsing the kernel's VMCOREINFO text.
//!
//! The kernel builds this `KEY=VALUE\n` text at boot for kdump (`crash_save_vmcoreinfo_init`).
//! It lives in two places on current kernels: `vmcoreinfo_data`, a page from
//! `get_zeroed_page` with the text at offset 0, and `vmcoreinfo_note`, a page-aligned ELF note
//! whose descriptor (the same text) starts after the 12-byte note header and the 12-byte padded
//! name `VMCOREINFO`, at offset 24. Older kernels kept both in static arrays, anywhere, which
//! is why a full byte scan remains as a fallback.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kvmaccess_core::{Gpa, PhysicalMemory, PAGE_SIZE};
use serde::Serialize;

use crate::error::{excerpt, Error, Result};

/// Marker every VMCOREINFO text starts with.
pub const MAGIC: &[u8] = b"OSRELEASE=";

/// Longest text accepted. The kernel's buffer is one page (`VMCOREINFO_BYTES`); a dump note is
/// allowed a little more in case a future kernel grows it.
pub const MAX_TEXT: usize = 64 * 1024;

/// Bytes read at each candidate: the kernel's buffer is one page.
const CANDIDATE_READ: usize = 4096;

/// Offset of the text inside the page-aligned `vmcoreinfo_note` (Elf64_Nhdr + "VMCOREINFO\0"
/// padded to 4 bytes).
const NOTE_TEXT_OFFSET: usize = 24;

/// Lines beyond this are ignored (the kernel writes about 100).
const MAX_LINES: usize = 4096;

/// Warnings kept per text; the rest are counted.
const MAX_WARNINGS: usize = 32;

/// Parsed VMCOREINFO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Vmcoreinfo {
    /// `OSRELEASE`: the kernel release (`uname -r`).
    pub osrelease: String,
    /// `BUILD-ID`: hex of the vmlinux GNU build ID, when the kernel records it.
    pub build_id: Option<String>,
    /// `PAGESIZE`.
    pub page_size: Option<u64>,
    /// `KERNELOFFSET`: the KASLR virtual slide of the kernel image.
    pub kernel_offset: Option<u64>,
    /// `SYMBOL(name)=hex`: addresses, already including the KASLR slide.
    pub symbols: BTreeMap<String, u64>,
    /// `NUMBER(name)=decimal`, signed (`phys_base` is negative on KASLR guests).
    pub numbers: BTreeMap<String, i64>,
    /// `SIZE(type)=decimal`.
    pub sizes: BTreeMap<String, u64>,
    /// `OFFSET(type.member)=decimal`.
    pub offsets: BTreeMap<String, u64>,
    /// `LENGTH(array)=decimal`.
    pub lengths: BTreeMap<String, u64>,
    /// Every other `KEY=VALUE` line (`CRASHTIME`, architecture extras...).
    pub other: BTreeMap<String, String>,
    /// Lines that were skipped, and why.
    pub warnings: Vec<String>,
    /// The text itself, up to its NUL.
    pub text: String,
}

impl Vmcoreinfo {
    /// Parse VMCOREINFO text. The input may carry the trailing NUL and anything after it.
    ///
    /// Lines that do not parse are skipped and described in [`Vmcoreinfo::warnings`]; only a
    /// missing or empty `OSRELEASE` (or an oversized text) fails, because without it the text is
    /// not VMCOREINFO at all.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let text = match memchr::memchr(0, bytes) {
            Some(nul) => bytes.get(..nul).unwrap_or(bytes),
            None => bytes,
        };
        if text.len() > MAX_TEXT {
            return Err(Error::VmcoreinfoTooLarge {
                len: text.len(),
                limit: MAX_TEXT,
            });
        }
        let mut info = Vmcoreinfo {
            text: String::from_utf8_lossy(text).into_owned(),
            ..Self::default()
        };
        let mut warnings = Warnings::default();
        for (number, line) in text.split(|&b| b == b'\n').enumerate() {
            if number >= MAX_LINES {
                warnings.push(format!("ignored everything after line {MAX_LINES}"));
                break;
            }
            if line.is_empty() {
                continue;
            }
            if let Err(reason) = info.parse_line(line) {
                warnings.push(format!(
                    "line {}: {reason}: {:?}",
                    number + 1,
                    excerpt(line, 80)
                ));
            }
        }
        if info.osrelease.is_empty() {
            return Err(Error::VmcoreinfoNoRelease {
                start: excerpt(text, 40),
            });
        }
        info.warnings = warnings.finish();
        Ok(info)
    }

    fn parse_line(&mut self, line: &[u8]) -> std::result::Result<(), &'static str> {
        if !line.iter().all(|&b| (0x20..0x7f).contains(&b)) {
            return Err("not printable ASCII");
        }
        // Printable ASCII is valid UTF-8.
        let line = std::str::from_utf8(line).map_err(|_| "not UTF-8")?;
        let (key, value) = line.split_once('=').ok_or("no '='")?;
        if key.is_empty() {
            return Err("empty key");
        }
        if let Some(inner) = bracketed(key) {
            let (kind, name) = inner;
            if name.is_empty() {
                return Err("empty name in brackets");
            }
            let fresh = match kind {
                "SYMBOL" => insert_new(&mut self.symbols, name, parse_hex(value)?),
                "NUMBER" => insert_new(&mut self.numbers, name, parse_signed(value)?),
                "SIZE" => insert_new(&mut self.sizes, name, parse_unsigned(value)?),
                "OFFSET" => insert_new(&mut self.offsets, name, parse_unsigned(value)?),
                "LENGTH" => insert_new(&mut self.lengths, name, parse_unsigned(value)?),
                _ => insert_new(&mut self.other, key, value.to_string()),
            };
            return if fresh { Ok(()) } else { Err("duplicate key") };
        }
        match key {
            "OSRELEASE" => {
                if !self.osrelease.is_empty() {
                    return Err("duplicate key");
                }
                if value.is_empty() || value.len() > 64 || value.contains(' ') {
                    return Err("implausible release");
                }
                self.osrelease = value.to_string();
            }
            "BUILD-ID" => {
                if self.build_id.is_some() {
                    return Err("duplicate key");
                }
                if value.is_empty()
                    || value.len() > 128
                    || !value.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err("build ID is not hex");
                }
                self.build_id = Some(value.to_ascii_lowercase());
            }
            "PAGESIZE" => set_once(&mut self.page_size, parse_unsigned(value)?)?,
            "KERNELOFFSET" => set_once(&mut self.kernel_offset, parse_hex(value)?)?,
            _ => {
                if !insert_new(&mut self.other, key, value.to_string()) {
                    return Err("duplicate key");
                }
            }
        }
        Ok(())
    }

    /// `SYMBOL(name)`, or an error naming the missing key.
    pub fn symbol(&self, name: &str) -> Result<u64> {
        self.symbols
            .get(name)
            .copied()
            .ok_or_else(|| Error::VmcoreinfoMissing {
                key: format!("SYMBOL({name})"),
            })
    }

    /// `NUMBER(name)`, or an error naming the missing key.
    pub fn number(&self, name: &str) -> Result<i64> {
        self.numbers
            .get(name)
            .copied()
            .ok_or_else(|| Error::VmcoreinfoMissing {
                key: format!("NUMBER({name})"),
            })
    }

    /// `OFFSET(type.member)`.
    pub fn offset(&self, type_and_member: &str) -> Option<u64> {
        self.offsets.get(type_and_member).copied()
    }

    /// `SIZE(type)`.
    pub fn size(&self, type_name: &str) -> Option<u64> {
        self.sizes.get(type_name).copied()
    }
}

#[derive(Default)]
struct Warnings {
    kept: Vec<String>,
    dropped: usize,
}

impl Warnings {
    fn push(&mut self, warning: String) {
        if self.kept.len() < MAX_WARNINGS {
            self.kept.push(warning);
        } else {
            self.dropped += 1;
        }
    }

    fn finish(mut self) -> Vec<String> {
        if self.dropped > 0 {
            self.kept
                .push(format!("... and {} more skipped lines", self.dropped));
        }
        self.kept
    }
}

/// `KIND(name)` → `(KIND, name)`.
fn bracketed(key: &str) -> Option<(&str, &str)> {
    let inner = key.strip_suffix(')')?;
    let (kind, name) = inner.split_once('(')?;
    Some((kind, name))
}

/// Insert unless present: a second copy of a key is suspicious and must not override the first.
fn insert_new<V>(map: &mut BTreeMap<String, V>, key: &str, value: V) -> bool {
    if map.contains_key(key) {
        return false;
    }
    map.insert(key.to_string(), value);
    true
}

fn set_once<V>(slot: &mut Option<V>, value: V) -> std::result::Result<(), &'static str> {
    if slot.is_some() {
        return Err("duplicate key");
    }
    *slot = Some(value);
    Ok(())
}

fn parse_hex(value: &str) -> std::result::Result<u64, &'static str> {
    let digits = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
        .unwrap_or(value);
    if digits.is_empty() || digits.starts_with('+') {
        return Err("not a hex number");
    }
    u64::from_str_radix(digits, 16).map_err(|_| "not a hex number")
}

fn parse_unsigned(value: &str) -> std::result::Result<u64, &'static str> {
    if value.starts_with('+') {
        return Err("not a decimal number");
    }
    value.parse::<u64>().map_err(|_| "not a decimal number")
}

/// Signed decimal. The kernel prints NUMBER() with `%ld`, so an unsigned quantity with the top
/// bit set (`sme_mask` on some machines) shows up negative; keeping the i64 loses nothing.
fn parse_signed(value: &str) -> std::result::Result<i64, &'static str> {
    if value.starts_with('+') {
        return Err("not a decimal number");
    }
    value.parse::<i64>().map_err(|_| "not a decimal number")
}

/// How [`scan`] looks for the text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScanMode {
    /// Page-aligned probes first; a full byte scan only when they find nothing.
    #[default]
    Auto,
    /// Only the two places current kernels use: offset 0 and offset 24 of each page.
    PageAligned,
    /// Every byte (kernels that keep the text in static arrays).
    Full,
}

/// Options of [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ScanOptions {
    /// Where to look.
    pub mode: ScanMode,
    /// Scan only guest-physical addresses below this (None: all RAM).
    pub limit: Option<u64>,
    /// Bytes per read of the full scan.
    pub chunk_bytes: usize,
    /// Stop after this many candidates (a guest can plant thousands of copies).
    pub max_candidates: usize,
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            mode: ScanMode::Auto,
            limit: None,
            chunk_bytes: 4 << 20,
            max_candidates: 64,
        }
    }
}

/// One copy of VMCOREINFO text found in guest memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// Guest-physical address of the text's first byte.
    pub gpa: Gpa,
    /// The bytes from there up to (not including) the NUL, at most one page.
    #[serde(skip)]
    pub bytes: Vec<u8>,
}

/// What [`scan`] found.
#[derive(Clone, Debug, Serialize)]
pub struct ScanReport {
    /// Copies in address order.
    pub candidates: Vec<Candidate>,
    /// The passes that ran (one or both of page-aligned and full).
    pub passes: Vec<ScanMode>,
    /// Bytes of guest-physical memory covered.
    pub scanned_bytes: u64,
    /// Wall time of the scan.
    pub duration: Duration,
    /// True when `max_candidates` cut the search short.
    pub truncated: bool,
}

/// Look for VMCOREINFO text in guest-physical memory.
///
/// Reads that fail (holes inside a reported range, flaky backends) skip that piece of memory
/// instead of failing the scan: one unreadable page must not hide the text.
pub fn scan(mem: &dyn PhysicalMemory, options: &ScanOptions) -> ScanReport {
    let started = Instant::now();
    let mut report = ScanReport {
        candidates: Vec::new(),
        passes: Vec::new(),
        scanned_bytes: 0,
        duration: Duration::ZERO,
        truncated: false,
    };
    let ranges = clipped_ranges(mem, options.limit);
    if matches!(options.mode, ScanMode::Auto | ScanMode::PageAligned) {
        report.passes.push(ScanMode::PageAligned);
        report.scanned_bytes = ranges.iter().map(|(s, e)| e - s).sum();
        scan_pages(mem, &ranges, options, &mut report);
    }
    let full = match options.mode {
        ScanMode::Full => true,
        ScanMode::Auto => report.candidates.is_empty(),
        ScanMode::PageAligned => false,
    };
    if full {
        report.passes.push(ScanMode::Full);
        report.scanned_bytes = ranges.iter().map(|(s, e)| e - s).sum();
        scan_bytes(mem, &ranges, options, &mut report);
    }
    report.candidates.sort_by_key(|c| c.gpa);
    report.candidates.dedup_by_key(|c| c.gpa);
    report.duration = started.elapsed();
    report
}

/// RAM below `limit` that holds data: never-touched RAM reads as zeros (no VMCOREINFO there),
/// and touching it through a shared mapping would make the host allocate it.
fn clipped_ranges(mem: &dyn PhysicalMemory, limit: Option<u64>) -> Vec<(u64, u64)> {
    let limit = limit.unwrap_or(u64::MAX);
    mem.ranges()
        .iter()
        .filter_map(|r| {
            let end = r.end.0.min(limit);
            (r.start.0 < end).then_some(kvmaccess_core::PhysRange {
                start: r.start,
                end: Gpa(end),
            })
        })
        .flat_map(|r| mem.data_ranges(r))
        .map(|r| (r.start.0, r.end.0))
        .collect()
}

fn scan_pages(
    mem: &dyn PhysicalMemory,
    ranges: &[(u64, u64)],
    options: &ScanOptions,
    report: &mut ScanReport,
) {
    // One small read per page is far cheaper than copying all of RAM: on a shared-memory
    // backend it is a bounds check and a 34-byte copy.
    const PROBE: usize = NOTE_TEXT_OFFSET + MAGIC.len();
    let mut probe = [0u8; PROBE];
    for &(start, end) in ranges {
        let mut page = start.next_multiple_of(PAGE_SIZE);
        while page < end {
            if mem.read_phys(Gpa(page), &mut probe).is_ok() {
                for offset in [0, NOTE_TEXT_OFFSET] {
                    if probe.get(offset..offset + MAGIC.len()) == Some(MAGIC) {
                        let Some(at) = page.checked_add(offset as u64) else {
                            continue;
                        };
                        if !push_candidate(mem, Gpa(at), options, report) {
                            return;
                        }
                    }
                }
            }
            let Some(next) = page.checked_add(PAGE_SIZE) else {
                break;
            };
            page = next;
        }
    }
}

fn scan_bytes(
    mem: &dyn PhysicalMemory,
    ranges: &[(u64, u64)],
    options: &ScanOptions,
    report: &mut ScanReport,
) {
    let finder = memchr::memmem::Finder::new(MAGIC);
    let chunk = options.chunk_bytes.clamp(64 * 1024, 64 << 20);
    // Consecutive chunks overlap by one byte less than the needle, so a match that straddles
    // a boundary is seen whole in the later chunk and never twice.
    let overlap = MAGIC.len() - 1;
    let mut buf = vec![0u8; chunk];
    for &(start, end) in ranges {
        let mut at = start;
        while at < end {
            let want = usize::try_from(end - at).map_or(chunk, |left| left.min(chunk));
            let Some(piece) = buf.get_mut(..want) else {
                break;
            };
            if mem.read_phys(Gpa(at), piece).is_err() {
                read_pagewise(mem, at, piece);
            }
            {
                for hit in finder.find_iter(piece) {
                    let Some(gpa) = at.checked_add(hit as u64) else {
                        continue;
                    };
                    if !push_candidate(mem, Gpa(gpa), options, report) {
                        return;
                    }
                }
            }
            let step = if want == chunk && at + (want as u64) < end {
                (want - overlap) as u64
            } else {
                want as u64
            };
            at += step;
        }
    }
}

/// Fill `buf` page by page, zeroing pages that cannot be read: one bad page inside a chunk must
/// not hide the rest of it, and zeros never match the magic.
fn read_pagewise(mem: &dyn PhysicalMemory, at: u64, buf: &mut [u8]) {
    let mut done = 0usize;
    while done < buf.len() {
        let addr = at.saturating_add(done as u64);
        let to_boundary = usize::try_from(PAGE_SIZE - addr % PAGE_SIZE).unwrap_or(4096);
        let end = buf.len().min(done + to_boundary);
        if let Some(piece) = buf.get_mut(done..end) {
            if mem.read_phys(Gpa(addr), piece).is_err() {
                piece.fill(0);
            }
        }
        done = end;
    }
}

/// Read one candidate; false once the candidate limit is reached.
fn push_candidate(
    mem: &dyn PhysicalMemory,
    gpa: Gpa,
    options: &ScanOptions,
    report: &mut ScanReport,
) -> bool {
    if report.candidates.iter().any(|c| c.gpa == gpa) {
        return true;
    }
    if report.candidates.len() >= options.max_candidates {
        report.truncated = true;
        return false;
    }
    if let Some(bytes) = read_text(mem, gpa) {
        report.candidates.push(Candidate { gpa, bytes });
    }
    true
}

/// The text at `gpa` when it starts like VMCOREINFO (an address remembered from an earlier
/// attach, which may hold anything by now).
pub(crate) fn read_candidate(mem: &dyn PhysicalMemory, gpa: Gpa) -> Option<Vec<u8>> {
    let mut magic = [0u8; MAGIC.len()];
    mem.read_phys(gpa, &mut magic).ok()?;
    if magic != MAGIC {
        return None;
    }
    read_text(mem, gpa)
}

/// The text at `gpa`, up to its NUL or one page, shortened to what is readable.
fn read_text(mem: &dyn PhysicalMemory, gpa: Gpa) -> Option<Vec<u8>> {
    let mut len = CANDIDATE_READ;
    let mut buf = vec![0u8; len];
    // The text may sit near the end of RAM: halve the read until it fits.
    while len >= MAGIC.len() {
        if let Some(piece) = buf.get_mut(..len) {
            if mem.read_phys(gpa, piece).is_ok() {
                buf.truncate(len);
                if let Some(nul) = memchr::memchr(0, &buf) {
                    buf.truncate(nul);
                }
                return Some(buf);
            }
        }
        len /= 2;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmaccess_testkit::MockMemory;

    const SAMPLE: &str =
        "OSRELEASE=6.1.0-56-cloud-amd64\nBUILD-ID=0123456789ABCDEF0123456789abcdef01234567\n\
PAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffffb2a13600\nOFFSET(uts_namespace.name)=0\n\
SIZE(page)=64\nLENGTH(zone.free_area)=11\nNUMBER(phys_base)=-450887680\n\
NUMBER(pgtable_l5_enabled)=1\nKERNELOFFSET=31000000\nCRASHTIME=1\n";

    #[test]
    fn parses_every_kind_of_line() {
        let mut bytes = SAMPLE.as_bytes().to_vec();
        bytes.extend_from_slice(b"\0garbage after the NUL");
        let info = Vmcoreinfo::parse(&bytes).unwrap();
        assert_eq!(info.osrelease, "6.1.0-56-cloud-amd64");
        assert_eq!(
            info.build_id.as_deref(),
            Some("0123456789abcdef0123456789abcdef01234567")
        );
        assert_eq!(info.page_size, Some(4096));
        assert_eq!(info.kernel_offset, Some(0x3100_0000));
        assert_eq!(info.symbol("init_uts_ns").unwrap(), 0xffff_ffff_b2a1_3600);
        assert_eq!(info.number("phys_base").unwrap(), -450_887_680);
        assert_eq!(info.number("pgtable_l5_enabled").unwrap(), 1);
        assert_eq!(info.offset("uts_namespace.name"), Some(0));
        assert_eq!(info.size("page"), Some(64));
        assert_eq!(info.lengths.get("zone.free_area"), Some(&11));
        assert_eq!(info.other.get("CRASHTIME").map(String::as_str), Some("1"));
        assert!(info.warnings.is_empty(), "{:?}", info.warnings);
        assert!(!info.text.contains("garbage"));
        let missing = info.symbol("nope").unwrap_err().to_string();
        assert!(missing.contains("SYMBOL(nope)"), "{missing}");
    }

    #[test]
    fn garbage_lines_are_skipped_with_warnings() {
        let text = "junk\nOSRELEASE=5.10\nSYMBOL(x)=zz\nNUMBER(y)=--1\n=1\nSYMBOL()=1\n\
SYMBOL(a)=1\nSYMBOL(a)=2\nNUMBER(big)=99999999999999999999\n\x01\x02=3\nOSRELEASE=6.6\n";
        let info = Vmcoreinfo::parse(text.as_bytes()).unwrap();
        assert_eq!(info.osrelease, "5.10");
        assert_eq!(info.symbols.get("a"), Some(&1));
        assert!(!info.symbols.contains_key("x"));
        assert_eq!(info.warnings.len(), 9, "{:?}", info.warnings);
    }

    #[test]
    fn rejects_text_without_release_and_huge_text() {
        assert!(matches!(
            Vmcoreinfo::parse(b"PAGESIZE=4096\n"),
            Err(Error::VmcoreinfoNoRelease { .. })
        ));
        assert!(Vmcoreinfo::parse(b"").is_err());
        assert!(Vmcoreinfo::parse(b"OSRELEASE=\n").is_err());
        let mut huge = b"OSRELEASE=1\n".to_vec();
        huge.resize(MAX_TEXT + 1, b'A');
        assert!(matches!(
            Vmcoreinfo::parse(&huge),
            Err(Error::VmcoreinfoTooLarge { .. })
        ));
        // Many lines: bounded work, bounded warnings.
        let mut many = b"OSRELEASE=1\n".to_vec();
        while many.len() < MAX_TEXT - 2 {
            many.extend_from_slice(b"x\n");
        }
        let info = Vmcoreinfo::parse(&many).unwrap();
        assert!(info.warnings.len() <= MAX_WARNINGS + 2);
    }

    #[test]
    fn finds_page_aligned_and_unaligned_copies() {
        let mem = MockMemory::new(64 << 20);
        let text = format!("{SAMPLE}\0");
        mem.write_bytes(Gpa(0x20_0000), text.as_bytes()).unwrap();
        mem.write_bytes(Gpa(0x30_0000 + 24), text.as_bytes())
            .unwrap();
        // Straddles the full scan's chunk boundary at 4 MiB.
        mem.write_bytes(Gpa(0x40_0000 - 5), text.as_bytes())
            .unwrap();
        let report = scan(&mem, &ScanOptions::default());
        let at: Vec<u64> = report.candidates.iter().map(|c| c.gpa.0).collect();
        assert_eq!(at, [0x20_0000, 0x30_0018]);
        assert_eq!(report.passes, [ScanMode::PageAligned]);
        let full = scan(
            &mem,
            &ScanOptions {
                mode: ScanMode::Full,
                ..ScanOptions::default()
            },
        );
        let at: Vec<u64> = full.candidates.iter().map(|c| c.gpa.0).collect();
        assert_eq!(at, [0x20_0000, 0x30_0018, 0x40_0000 - 5]);
        assert_eq!(full.candidates[0].bytes, SAMPLE.as_bytes());
    }

    #[test]
    fn auto_falls_back_to_full_scan_and_survives_the_end_of_ram() {
        let mem = MockMemory::new(0x10_0000);
        // The last bytes of RAM: the one-page read must shrink to fit.
        mem.write_bytes(Gpa(0x10_0000 - 40), b"OSRELEASE=1\nPAGESIZE=4096\n")
            .unwrap();
        mem.fail_reads_at(Gpa(0x1000));
        let report = scan(&mem, &ScanOptions::default());
        assert_eq!(report.passes, [ScanMode::PageAligned, ScanMode::Full]);
        assert_eq!(report.candidates.len(), 1);
        let info = Vmcoreinfo::parse(&report.candidates[0].bytes).unwrap();
        assert_eq!(info.page_size, Some(4096));
    }

    #[test]
    fn candidate_count_is_capped() {
        let mem = MockMemory::new(1 << 20);
        for page in 0..100u64 {
            mem.write_bytes(Gpa(page * 4096), b"OSRELEASE=x\n").unwrap();
        }
        let report = scan(
            &mem,
            &ScanOptions {
                max_candidates: 10,
                ..ScanOptions::default()
            },
        );
        assert_eq!(report.candidates.len(), 10);
        assert!(report.truncated);
    }
}
