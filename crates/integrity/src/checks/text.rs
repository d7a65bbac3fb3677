//! Kernel text, rodata and the exception table against the baseline copy.
//!
//! Speed: each region is translated once per mapping (2 MiB pages for kernel text) and
//! compared with the baseline copy in 64 KiB blocks where the backend holds guest memory (a
//! live guest's mapped RAM is not copied first), so a clean pass costs two memory streams. A
//! block that differs is read into one reused buffer, and only its 4 KiB pages that differ are
//! looked at further; a page whose differences were all classified as legitimate is
//! remembered with its bytes, so a kernel that stays in a patched state (tracing on, a static
//! key flipped) is not re-classified every pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvmaccess_core::Gva;
use serde::{Deserialize, Serialize};

use crate::baseline::Blobs;
use crate::engine::{Check, CheckBaseline, Context};
use crate::error::{Error, Result};
use crate::finding::{Finding, Severity, Target};
use crate::location::Location;
use crate::patch::{self, Sites, Verdict, Window};

/// Largest region captured (the 6.1 kernel's text is ~10 MiB).
const MAX_REGION: u64 = 256 << 20;
/// Read granularity: large enough to amortise per-read costs, small enough to stay in cache.
const BLOCK: usize = 64 << 10;
const PAGE: u64 = 4096;
/// Bytes of context read around a change for classification.
const CONTEXT: u64 = 16;
/// How many times a page that changed while its alarm was being classified is read and
/// classified again.
const IN_FLUX_ROUNDS: usize = 3;
/// Most jump-label / static-call entries read (6.1 has ~40k jump labels).
const MAX_SITES: u64 = 1 << 20;
/// Most ftrace records walked.
const MAX_FTRACE_RECORDS: usize = 1 << 20;
/// Most `ftrace_ops` followed on the ops list.
const MAX_FTRACE_OPS: usize = 1024;
/// Examples listed in an aggregated state-change finding.
const EXAMPLES: usize = 3;

/// The regions: name, start symbol, end symbol.
const REGIONS: &[(&str, &str, &str)] = &[
    ("kernel text", "_stext", "_etext"),
    ("rodata", "__start_rodata", "__end_rodata"),
    ("exception table", "__start___ex_table", "__stop___ex_table"),
];

/// Kernel text check (`text`).
///
/// By default every pass compares every byte. [`TextCheck::with_budget`] bounds a pass to a
/// number of bytes, taken round-robin over the regions: a monitor running every second then
/// pays a fraction of a full comparison per pass and still covers everything every
/// `ceil(total / budget)` passes.
#[derive(Debug, Default)]
pub struct TextCheck {
    cache: Mutex<RegionCache>,
    budget: Option<u64>,
    cursor: Mutex<u64>,
    parsed: super::Parsed<TextState>,
}

/// One captured region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RegionState {
    pub name: String,
    pub start: Location,
    pub len: u64,
    pub blob: String,
    /// Whether the region holds code (its changes are decoded as instructions).
    pub code: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TextState {
    pub regions: Vec<RegionState>,
    /// Regions the kernel lacks, and why they were skipped.
    pub skipped: Vec<String>,
    /// The kernel's `page_offset_base` when the baseline was taken: with memory randomisation
    /// it differs between boots even where the KASLR slide does not (absent from baselines
    /// written before it was recorded, and on kernels without the variable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_offset_base: Option<u64>,
}

/// BTF offsets for the ftrace structures, found once.
#[derive(Clone, Copy, Debug)]
struct FtraceOffsets {
    page_next: u64,
    page_records: u64,
    page_index: u64,
    rec_size: u64,
    rec_ip: u64,
    ops_next: u64,
    ops_trampoline: u64,
    ops_trampoline_size: u64,
}

/// Sites that do not change while the kernel runs (its tables are read-only after boot).
#[derive(Debug)]
struct StaticSites {
    text_base: u64,
    sites: Sites,
    ftrace: Option<FtraceOffsets>,
    notes: Vec<String>,
}

/// What a check remembers between passes.
#[derive(Debug, Default)]
pub(crate) struct RegionCache {
    /// Pages whose differences were all legitimate, per region: page address → (bytes,
    /// changes). With the function tracer on nearly every text page differs; its changes are
    /// shared, not copied, on each pass.
    pages: HashMap<String, HashMap<u64, (Vec<u8>, PageChanges)>>,
    sites: Option<Arc<StaticSites>>,
    buf: Vec<u8>,
    /// ftrace trampolines seen on registered ops in recent passes, with when they were last
    /// seen. The kernel takes an ops off `ftrace_ops_list` before it patches the call sites back
    /// to NOPs, and under emulation that patching takes seconds: sites still calling a
    /// trampoline that just left the list are the tracer shutting down, not a hook.
    retired_trampolines: Vec<((u64, u64), std::time::Instant)>,
}

/// How long a trampoline that left `ftrace_ops_list` is still accepted as a call target.
const TRAMPOLINE_GRACE: std::time::Duration = std::time::Duration::from_secs(120);
/// Most trampolines remembered (a tracer switched on and off in a loop allocates new ones).
const MAX_REMEMBERED_TRAMPOLINES: usize = 256;

/// The classified changes of one page.
pub(crate) type PageChanges = Arc<[Change]>;

/// One classified change.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub verdict: Verdict,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
}

fn read_u64(ctx: &Context<'_, '_>, at: u64) -> Result<u64> {
    Ok(ctx.kernel.read_u64(Gva(at))?)
}

fn read_u32(ctx: &Context<'_, '_>, at: u64) -> Result<u32> {
    let mut raw = [0u8; 4];
    ctx.kernel.read(Gva(at), &mut raw)?;
    Ok(u32::from_le_bytes(raw))
}

fn read_range(
    ctx: &Context<'_, '_>,
    start: &str,
    stop: &str,
    limit: u64,
) -> Result<(u64, Vec<u8>)> {
    let s = ctx.kernel.symbol(start)?;
    let e = ctx.kernel.symbol(stop)?;
    let len = e
        .checked_sub(s)
        .filter(|&l| l <= limit)
        .ok_or_else(|| Error::Implausible(format!("{start} {s:#x} .. {stop} {e:#x}")))?;
    let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| Error::Implausible(stop.into()))?];
    ctx.kernel.read(Gva(s), &mut bytes)?;
    Ok((s, bytes))
}

fn rel(entry: u64, bytes: &[u8], at: usize) -> Option<u64> {
    let raw: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(
        entry
            .wrapping_add(at as u64)
            .wrapping_add_signed(i64::from(i32::from_le_bytes(raw))),
    )
}

impl StaticSites {
    fn load(ctx: &Context<'_, '_>) -> Self {
        let mut notes = Vec::new();
        let mut sites = Sites::default();
        match read_range(
            ctx,
            "__start___jump_table",
            "__stop___jump_table",
            MAX_SITES * 16,
        ) {
            Ok((start, bytes)) => {
                // struct jump_entry { s32 code; s32 target; long key; }, each field relative
                // to its own address.
                for (i, e) in bytes.chunks_exact(16).enumerate() {
                    let entry = start.wrapping_add(i as u64 * 16);
                    if let (Some(code), Some(target)) = (rel(entry, e, 0), rel(entry, e, 4)) {
                        sites.jump_labels.push((code, target));
                    }
                }
            }
            Err(e) => notes.push(format!("jump labels unknown: {e}")),
        }
        match read_range(
            ctx,
            "__start_static_call_sites",
            "__stop_static_call_sites",
            MAX_SITES * 8,
        ) {
            Ok((start, bytes)) => {
                // struct static_call_site { s32 addr; s32 key; }
                for (i, e) in bytes.chunks_exact(8).enumerate() {
                    if let Some(addr) = rel(start.wrapping_add(i as u64 * 8), e, 0) {
                        sites.static_calls.push(addr);
                    }
                }
            }
            Err(e) => notes.push(format!("static-call sites unknown: {e}")),
        }
        sites.static_call_trampolines = ctx
            .map
            .symbols()
            .iter()
            .filter(|s| s.module.is_none() && s.name.starts_with("__SCT__"))
            .map(|s| s.address)
            .collect();
        for name in ["ftrace_caller", "ftrace_regs_caller"] {
            if let Ok(a) = ctx.kernel.symbol(name) {
                sites.ftrace_callers.push(a);
            }
        }
        for name in ["ftrace_call", "ftrace_regs_call", "ftrace_graph_call"] {
            if let Ok(a) = ctx.kernel.symbol(name) {
                sites.ftrace_op_sites.push(a);
            }
        }
        let ftrace = match ftrace_offsets(ctx) {
            Ok(off) => {
                match ftrace_records(ctx, &off) {
                    Ok(records) => {
                        sites.ftrace_records = records;
                        sites.ftrace_records_known = true;
                    }
                    Err(e) => notes.push(format!("ftrace records unknown: {e}")),
                }
                Some(off)
            }
            Err(e) => {
                notes.push(format!("ftrace structures unknown (no BTF?): {e}"));
                None
            }
        };
        sites.jump_labels.sort_unstable();
        sites.static_calls.sort_unstable();
        sites.static_call_trampolines.sort_unstable();
        sites.ftrace_records.sort_unstable();
        sites.ftrace_op_sites.sort_unstable();
        Self {
            text_base: ctx.map.text_base,
            sites,
            ftrace,
            notes,
        }
    }
}

fn ftrace_offsets(ctx: &Context<'_, '_>) -> Result<FtraceOffsets> {
    let types = ctx.kernel.load_types()?;
    Ok(FtraceOffsets {
        page_next: types.offset_of("ftrace_page", "next")?,
        page_records: types.offset_of("ftrace_page", "records")?,
        page_index: types.offset_of("ftrace_page", "index")?,
        rec_size: types.size_of("dyn_ftrace")?,
        rec_ip: types.offset_of("dyn_ftrace", "ip")?,
        ops_next: types.offset_of("ftrace_ops", "next")?,
        ops_trampoline: types.offset_of("ftrace_ops", "trampoline")?,
        ops_trampoline_size: types.offset_of("ftrace_ops", "trampoline_size")?,
    })
}

/// Every `dyn_ftrace.ip`, walking `ftrace_pages_start` (bounded).
fn ftrace_records(ctx: &Context<'_, '_>, off: &FtraceOffsets) -> Result<Vec<u64>> {
    let mut page = read_u64(ctx, ctx.kernel.symbol("ftrace_pages_start")?)?;
    let mut ips = Vec::new();
    let rec_size = usize::try_from(off.rec_size)
        .ok()
        .filter(|&s| (8..=256).contains(&s))
        .ok_or_else(|| Error::Implausible(format!("sizeof(dyn_ftrace) = {}", off.rec_size)))?;
    let ip_at = usize::try_from(off.rec_ip).unwrap_or(usize::MAX);
    let mut pages = 0usize;
    while page != 0 {
        pages += 1;
        if pages > MAX_FTRACE_RECORDS || ips.len() > MAX_FTRACE_RECORDS {
            return Err(Error::Implausible(
                "the ftrace page list does not end".into(),
            ));
        }
        let records = read_u64(ctx, page.wrapping_add(off.page_records))?;
        let index = usize::try_from(read_u32(ctx, page.wrapping_add(off.page_index))?)
            .unwrap_or(0)
            .min(MAX_FTRACE_RECORDS);
        if index > 0 {
            let mut bytes = vec![0u8; index.saturating_mul(rec_size)];
            ctx.kernel.read(Gva(records), &mut bytes)?;
            for rec in bytes.chunks_exact(rec_size) {
                if let Some(raw) = rec.get(ip_at..ip_at + 8) {
                    let ip = u64::from_le_bytes(raw.try_into().unwrap_or([0; 8]));
                    if ip != 0 {
                        ips.push(ip);
                    }
                }
            }
        }
        page = read_u64(ctx, page.wrapping_add(off.page_next))?;
    }
    Ok(ips)
}

/// Trampolines of the registered `ftrace_ops` (they come and go with tracers).
fn ftrace_trampolines(ctx: &Context<'_, '_>, off: &FtraceOffsets) -> Result<Vec<(u64, u64)>> {
    let end = ctx.kernel.symbol("ftrace_list_end")?;
    let mut op = read_u64(ctx, ctx.kernel.symbol("ftrace_ops_list")?)?;
    let mut out = Vec::new();
    for _ in 0..MAX_FTRACE_OPS {
        if op == 0 || op == end {
            return Ok(out);
        }
        let tramp = read_u64(ctx, op.wrapping_add(off.ops_trampoline))?;
        let size = read_u32(ctx, op.wrapping_add(off.ops_trampoline_size))?;
        if tramp != 0 {
            out.push((tramp, u64::from(size.max(1))));
        }
        op = read_u64(ctx, op.wrapping_add(off.ops_next))?;
    }
    Err(Error::Implausible(
        "the ftrace_ops list does not end".into(),
    ))
}

/// Whether any kprobe is registered: a non-empty bucket in `kprobe_table`.
fn kprobes_registered(ctx: &Context<'_, '_>) -> bool {
    let Ok(table) = ctx.kernel.symbol("kprobe_table") else {
        return false;
    };
    let mut raw = vec![0u8; 64 * 8];
    ctx.kernel.read(Gva(table), &mut raw).is_ok() && raw.iter().any(|&b| b != 0)
}

impl RegionCache {
    fn static_sites(&mut self, ctx: &Context<'_, '_>) -> Arc<StaticSites> {
        match &self.sites {
            Some(s) if s.text_base == ctx.map.text_base => s.clone(),
            _ => {
                let s = Arc::new(StaticSites::load(ctx));
                self.sites = Some(s.clone());
                s
            }
        }
    }
}

/// Sites for one pass: the static ones plus the run-time state of ftrace and kprobes.
fn pass_sites(ctx: &Context<'_, '_>, cache: &mut RegionCache, slide_delta: u64) -> Sites {
    let stat = cache.static_sites(ctx);
    let mut sites = stat.sites.clone();
    if let Some(off) = &stat.ftrace {
        let now = std::time::Instant::now();
        let current = ftrace_trampolines(ctx, off).unwrap_or_default();
        let remembered = &mut cache.retired_trampolines;
        remembered.retain(|(t, seen)| {
            !current.contains(t) && now.duration_since(*seen) < TRAMPOLINE_GRACE
        });
        remembered.extend(current.iter().map(|&t| (t, now)));
        if remembered.len() > MAX_REMEMBERED_TRAMPOLINES {
            let excess = remembered.len() - MAX_REMEMBERED_TRAMPOLINES;
            remembered.drain(..excess);
        }
        sites.ftrace_trampolines = remembered.iter().map(|(t, _)| *t).collect();
    }
    sites.kprobes_registered = kprobes_registered(ctx);
    sites.slide_delta = slide_delta;
    sites
}

/// Compare `old` (the baseline copy) with the guest's bytes at `start` now; classify every
/// difference, per page. `slide_delta` is the KASLR slide now minus the slide at capture.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compare_region(
    ctx: &Context<'_, '_>,
    cache: &mut RegionCache,
    region: &str,
    start: u64,
    old: &[u8],
    code: bool,
    slide_delta: u64,
    boot_data: Option<(u64, u64)>,
) -> Result<Vec<PageChanges>> {
    let len = u64::try_from(old.len()).unwrap_or(u64::MAX);
    let mem = ctx.kernel.memory();
    let mut space = ctx.kernel.space();
    let chunks = space
        .chunks(Gva(start), len)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut buf = std::mem::take(&mut cache.buf);
    buf.resize(BLOCK, 0);
    let mut known = cache.pages.remove(region).unwrap_or_default();
    let mut changes: Vec<PageChanges> = Vec::new();
    // Pages that differ and are not known: (page address, offset in region, bytes now).
    let mut unknown: Vec<(u64, usize, Vec<u8>)> = Vec::new();
    let mut scan = || -> Result<()> {
        for chunk in &chunks {
            let chunk_off = usize::try_from(chunk.gva.0 - start).unwrap_or(usize::MAX);
            let chunk_len = usize::try_from(chunk.len).unwrap_or(0);
            let mut done = 0usize;
            while done < chunk_len {
                let n = BLOCK.min(chunk_len - done);
                let gpa = kvmaccess_core::Gpa(chunk.gpa.0 + done as u64);
                let region_off = chunk_off + done;
                let base = old
                    .get(region_off..region_off + n)
                    .ok_or_else(|| Error::Implausible("region chunks exceed the region".into()))?;
                // Nearly every block is unchanged: compared where the backend holds it, it
                // is copied out only when it differs (a comparison stops at the first change).
                if !mem.phys_equals(gpa, base)? {
                    let now = &mut buf[..n];
                    mem.read_phys(gpa, now)?;
                    // Split at 4 KiB page boundaries of the virtual address.
                    let mut p = 0usize;
                    while p < n {
                        let gva = start + (region_off + p) as u64;
                        let to_page_end = usize::try_from(PAGE - (gva % PAGE)).unwrap_or(n);
                        let q = (p + to_page_end).min(n);
                        if now[p..q] != base[p..q] {
                            match known.get(&gva) {
                                Some((bytes, page)) if bytes[..] == now[p..q] => {
                                    changes.push(Arc::clone(page));
                                }
                                _ => unknown.push((gva, region_off + p, now[p..q].to_vec())),
                            }
                        }
                        p = q;
                    }
                }
                done += n;
            }
        }
        Ok(())
    };
    let scanned = scan();
    cache.buf = buf;
    if let Err(e) = scanned {
        cache.pages.insert(region.to_string(), known);
        return Err(e);
    }

    let mut sites: Option<Sites> = None;
    let classified = || -> Result<()> {
        for (gva, off, scanned) in unknown {
            let sites = match &mut sites {
                Some(s) => &*s,
                None => &*sites.insert(pass_sites(ctx, cache, slide_delta)),
            };
            let base = &old[off..off + scanned.len()];
            let classify_page = |now: &[u8]| -> Result<Vec<Change>> {
                let mut page_changes: Vec<Change> = Vec::new();
                let mut i = 0usize;
                while i < now.len() {
                    if now[i] == base[i] {
                        i += 1;
                        continue;
                    }
                    let mut j = i;
                    while j < now.len() && now[j] != base[j] {
                        j += 1;
                    }
                    let pieces = if code {
                        patch::split_at_sites(sites, gva + i as u64, gva + j as u64)
                    } else {
                        vec![(gva + i as u64, gva + j as u64)]
                    };
                    for (run_start, run_end) in pieces {
                        let covered = page_changes.last().is_some_and(|c| {
                            run_start >= c.verdict.site
                                && run_end <= c.verdict.site + c.verdict.len as u64
                        });
                        if !covered {
                            page_changes.push(classify_run(
                                ctx, sites, start, old, run_start, run_end, code, boot_data,
                            )?);
                        }
                    }
                    i = j;
                }
                Ok(page_changes)
            };
            // The kernel patches itself while we read (a tracer switched on rewrites thousands
            // of call sites in stages), and the classifier reads the bytes around a change
            // again: a page caught mid-patch can look like a hook. An alarm therefore stands
            // only if the page still holds the bytes it was classified from; otherwise the
            // fresh bytes are classified. A page the guest keeps rewriting still alarms, after
            // a few rounds.
            let mut now = scanned;
            let mut page_changes = classify_page(&now)?;
            for _ in 0..IN_FLUX_ROUNDS {
                if page_changes
                    .iter()
                    .all(|c| c.verdict.severity == Severity::Info)
                {
                    break;
                }
                let mut again = vec![0u8; now.len()];
                ctx.kernel.read(Gva(gva), &mut again)?;
                if again == now {
                    break;
                }
                now = again;
                page_changes = classify_page(&now)?;
            }
            let page: PageChanges = page_changes.into();
            if page.iter().all(|c| c.verdict.severity == Severity::Info) {
                known.insert(gva, (now, Arc::clone(&page)));
            } else {
                // A page that held an alarm is classified again next pass.
                known.remove(&gva);
            }
            changes.push(page);
        }
        Ok(())
    };
    let result = classified();
    cache.pages.insert(region.to_string(), known);
    result.map(|()| changes)
}

#[allow(clippy::too_many_arguments)]
fn classify_run(
    ctx: &Context<'_, '_>,
    sites: &Sites,
    region_start: u64,
    old: &[u8],
    run_start: u64,
    run_end: u64,
    code: bool,
    boot_data: Option<(u64, u64)>,
) -> Result<Change> {
    let region_end = region_start + old.len() as u64;
    let win_start = run_start.saturating_sub(CONTEXT).max(region_start);
    let win_end = run_end.saturating_add(CONTEXT).min(region_end);
    let off = usize::try_from(win_start - region_start).unwrap_or(0);
    let len = usize::try_from(win_end - win_start).unwrap_or(0);
    let old_win = old.get(off..off + len).unwrap_or_default();
    let mut new_win = vec![0u8; len];
    ctx.kernel.read(Gva(win_start), &mut new_win)?;
    let window = Window {
        gva: win_start,
        old: old_win,
        new: &new_win,
    };
    let verdict = if code {
        patch::classify(sites, &ctx.map, &window, run_start, run_end)
    } else {
        classify_data(ctx, sites, &window, run_start, run_end, boot_data)
    };
    let a = usize::try_from(verdict.site.saturating_sub(win_start)).unwrap_or(0);
    let b = (a + verdict.len).min(len);
    Ok(Change {
        old: old_win.get(a..b).unwrap_or_default().to_vec(),
        new: new_win.get(a..b).unwrap_or_default().to_vec(),
        verdict,
    })
}

/// A change in read-only data: relocation, another boot's boot-time data, or a pointer that
/// now points elsewhere.
fn classify_data(
    ctx: &Context<'_, '_>,
    sites: &Sites,
    window: &Window<'_>,
    start: u64,
    end: u64,
    boot_data: Option<(u64, u64)>,
) -> Verdict {
    let data_sites = Sites {
        slide_delta: sites.slide_delta,
        ..Sites::default()
    };
    let v = patch::classify(&data_sites, &ctx.map, window, start, end);
    if v.class == "kaslr-relocation" {
        return v;
    }
    if boot_data.is_some_and(|(lo, hi)| lo <= start && end <= hi)
        && !held_code_pointer(ctx, window, start, end, sites.slide_delta)
    {
        return Verdict {
            class: "boot-data",
            severity: Severity::Info,
            site: start,
            len: usize::try_from(end - start).unwrap_or(0),
            insn: None,
            detail: "boot-time data of another boot".into(),
        };
    }
    let slot = start & !7;
    let at = usize::try_from(slot.saturating_sub(window.gva)).unwrap_or(0);
    let value = |b: &[u8]| {
        b.get(at..at + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
    };
    let (old, new) = (value(window.old), value(window.new));
    if end <= slot + 8 {
        if let (Some(o), Some(n)) = (old, new) {
            let owner = ctx.map.owner(n);
            let pointerish = !matches!(owner, crate::location::Owner::Unowned) || n >> 47 != 0;
            if pointerish {
                return Verdict {
                    class: "pointer-hook",
                    severity: if owner.is_kernel_text() {
                        Severity::High
                    } else {
                        Severity::Critical
                    },
                    site: slot,
                    len: 8,
                    insn: None,
                    detail: format!(
                        "pointer {} -> {} (owner: {owner})",
                        ctx.map.describe(o).unwrap_or_else(|| format!("{o:#x}")),
                        ctx.map.describe(n).unwrap_or_else(|| format!("{n:#x}")),
                    ),
                };
            }
        }
    }
    Verdict {
        class: "data-change",
        severity: Severity::High,
        site: start,
        len: usize::try_from(end - start).unwrap_or(0),
        insn: None,
        detail: "read-only data changed".into(),
    }
}

/// The kernel's `page_offset_base` (the direct map's start) now.
fn live_page_offset_base(ctx: &Context<'_, '_>) -> Option<u64> {
    let at = ctx.kernel.symbol("page_offset_base").ok()?;
    read_u64(ctx, at).ok()
}

/// The kernel's `__ro_after_init` data when the running kernel is another boot than the
/// baseline's, else `None`.
///
/// The kernel writes that data during boot and only then makes it read-only, so from one boot
/// to the next it legitimately differs: pointers into the direct map and slab caches, CPU
/// features found, values chosen at random. Within one boot it never changes, and every byte of
/// it is compared as usual.
fn boot_data_range(
    ctx: &Context<'_, '_>,
    state: &TextState,
    slide_delta: u64,
) -> Option<(u64, u64)> {
    let direct_map_moved = matches!(
        (state.page_offset_base, live_page_offset_base(ctx)),
        (Some(then), Some(now)) if then != now
    );
    if slide_delta == 0 && !direct_map_moved {
        return None;
    }
    let start = ctx.kernel.symbol("__start_ro_after_init").ok()?;
    let end = ctx.kernel.symbol("__end_ro_after_init").ok()?;
    (start < end).then_some((start, end))
}

/// Whether an 8-byte slot overlapping `start..end` held a pointer into kernel code in the
/// baseline: function pointers the kernel installs at boot (security hooks, operations
/// tables) must point at the same functions in every boot, so their changes stay alarms.
fn held_code_pointer(
    ctx: &Context<'_, '_>,
    window: &Window<'_>,
    start: u64,
    end: u64,
    slide_delta: u64,
) -> bool {
    let mut slot = start & !7;
    while slot < end {
        let at = usize::try_from(slot.saturating_sub(window.gva)).unwrap_or(usize::MAX);
        let old = window
            .old
            .get(at..at.saturating_add(8))
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes);
        if old.is_some_and(|o| ctx.map.owner(o.wrapping_add(slide_delta)).is_kernel_text()) {
            return true;
        }
        slot += 8;
    }
    false
}

/// Findings for a region's changes: one per alarm, one summary per kind of state change.
pub(crate) fn report(
    ctx: &Context<'_, '_>,
    check: &'static str,
    region: &str,
    start: u64,
    changes: &[PageChanges],
) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut info: Vec<(&'static str, Vec<&Change>)> = Vec::new();
    for c in changes.iter().flat_map(|page| page.iter()) {
        if c.verdict.severity == Severity::Info {
            match info.iter_mut().find(|(k, _)| *k == c.verdict.class) {
                Some((_, v)) => v.push(c),
                None => info.push((c.verdict.class, vec![c])),
            }
            continue;
        }
        let v = &c.verdict;
        let entry = ctx
            .map
            .describe(v.site)
            .unwrap_or_else(|| format!("{:#x}", v.site));
        let mut f = ctx.finding(check, v.severity, v.class, region, entry.clone());
        f.expected = super::hex_bytes(&c.old);
        f.actual = format!("{} ({})", super::hex_bytes(&c.new), v.detail);
        f.owner = patch::target_owner(&ctx.map, v).map(|o| o.to_string());
        f.explanation = match v.class {
            "inline-hook" => format!(
                "{entry} was patched to transfer control elsewhere, outside every mechanism \
                 the kernel patches itself with: an inline hook"
            ),
            "pointer-hook" => format!("a pointer in {region} at {entry} was redirected"),
            "kprobe" => format!("an int3 appeared at {entry} with no kprobe registered"),
            _ => format!("{region} bytes at {entry} changed outside every run-time patch site"),
        };
        f.target = Target::Bytes {
            gva: v.site,
            len: v.len as u64,
            region: region.to_string(),
            region_offset: v.site.wrapping_sub(start),
        };
        out.push(f);
    }
    for (class, list) in info {
        let examples: Vec<String> = list
            .iter()
            .take(EXAMPLES)
            .map(|c| {
                format!(
                    "{}: {}",
                    ctx.map
                        .describe(c.verdict.site)
                        .unwrap_or_else(|| format!("{:#x}", c.verdict.site)),
                    c.verdict.detail
                )
            })
            .collect();
        let mut f = ctx.finding(
            check,
            Severity::Info,
            class,
            region,
            format!("{} site(s)", list.len()),
        );
        f.expected = "baseline bytes".into();
        f.actual = examples.join("; ");
        f.explanation = match class {
            "jump-label" => "static keys were switched: the kernel rewrote their jump-label \
                             sites itself"
                .into(),
            "static-call" => "static calls were retargeted by the kernel".into(),
            "ftrace" => "ftrace is attached to kernel functions (a tracer or a live patch is \
                         active): their entry NOPs now call ftrace"
                .into(),
            "kprobe" => "kprobes are registered on these instructions".into(),
            "kaslr-relocation" => "the baseline came from a boot with another KASLR slide; \
                                   these bytes are the same code relocated (take a new baseline \
                                   to compare at full speed)"
                .into(),
            "boot-data" => "the baseline came from another boot: data the kernel writes once \
                            while booting and then makes read-only (__ro_after_init: direct-map \
                            pointers, caches, CPU features) differs between boots; pointers \
                            into kernel code there are still compared"
                .into(),
            _ => "legitimate state change".into(),
        };
        out.push(f);
    }
    out
}

impl TextCheck {
    /// A text check that compares at most `bytes` per pass (at least one page).
    pub fn with_budget(bytes: u64) -> Self {
        Self {
            budget: Some(bytes.max(PAGE)),
            ..Self::default()
        }
    }

    /// The slices of each region this pass covers: (region index, offset, length).
    fn plan(&self, lens: &[u64]) -> Vec<(usize, u64, u64)> {
        let total: u64 = lens.iter().sum();
        let Some(budget) = self.budget.filter(|&b| b < total) else {
            return lens.iter().enumerate().map(|(i, &l)| (i, 0, l)).collect();
        };
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let mut left = budget;
        let mut pos = *cursor % total;
        while left > 0 {
            let mut base = 0u64;
            for (i, &l) in lens.iter().enumerate() {
                if pos < base + l {
                    let off = pos - base;
                    let take = (l - off).min(left);
                    out.push((i, off, take));
                    left -= take;
                    pos = (pos + take) % total;
                    break;
                }
                base += l;
            }
        }
        *cursor = pos;
        out
    }

    /// What the classifier could not learn about this kernel's patch sites (missing tables,
    /// no BTF for ftrace records), empty before the first classification.
    pub fn site_notes(&self) -> Vec<String> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .sites
            .as_ref()
            .map(|s| s.notes.clone())
            .unwrap_or_default()
    }
}

impl Check for TextCheck {
    fn id(&self) -> &'static str {
        "text"
    }

    fn description(&self) -> &'static str {
        "kernel text, rodata and exception table against the baseline copy, with every change \
         classified"
    }

    fn capture(&self, ctx: &Context<'_, '_>, blobs: &mut Blobs) -> Result<serde_json::Value> {
        let mut state = TextState {
            regions: Vec::new(),
            skipped: Vec::new(),
            page_offset_base: live_page_offset_base(ctx),
        };
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for &(name, start_sym, end_sym) in REGIONS {
            let (start, end) = match (ctx.kernel.symbol(start_sym), ctx.kernel.symbol(end_sym)) {
                (Ok(s), Ok(e)) if s < e && e - s <= MAX_REGION => (s, e),
                (Ok(s), Ok(e)) => {
                    state
                        .skipped
                        .push(format!("{name}: {start_sym} {s:#x} .. {end_sym} {e:#x}"));
                    continue;
                }
                _ => {
                    if name == "kernel text" {
                        return Err(Error::Implausible(format!(
                            "the kernel has no {start_sym}/{end_sym}"
                        )));
                    }
                    state
                        .skipped
                        .push(format!("{name}: no {start_sym}/{end_sym} symbols"));
                    continue;
                }
            };
            // The exception table lives inside rodata on x86-64: compared there already.
            if spans.iter().any(|&(s, e)| s <= start && end <= e) {
                state
                    .skipped
                    .push(format!("{name}: inside an earlier region, compared there"));
                continue;
            }
            spans.push((start, end));
            let mut bytes = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
            ctx.kernel.read(Gva(start), &mut bytes)?;
            let blob = format!("text/{name}");
            blobs.put(blob.clone(), &bytes);
            state.regions.push(RegionState {
                name: name.to_string(),
                start: ctx.map.encode(start),
                len: end - start,
                blob,
                code: name == "kernel text",
            });
        }
        super::to_value("text", &state)
    }

    fn verify(&self, ctx: &Context<'_, '_>, baseline: CheckBaseline<'_>) -> Result<Vec<Finding>> {
        let state = self.parsed.get("text", &baseline)?;
        let delta = ctx
            .kernel
            .layout()
            .kaslr_offset
            .wrapping_sub(baseline.baseline.kaslr_offset);
        let boot_data = boot_data_range(ctx, &state, delta);
        let lens: Vec<u64> = state.regions.iter().map(|r| r.len).collect();
        let plan = self.plan(&lens);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (index, region) in state.regions.iter().enumerate() {
            let old = baseline.baseline.blob(&region.blob)?;
            if u64::try_from(old.len()).ok() != Some(region.len) {
                return Err(Error::MissingBlob(region.blob.clone()));
            }
            let start = ctx.map.decode(&region.start).ok_or_else(|| {
                Error::Implausible(format!("{}: start {} not found", region.name, region.start))
            })?;
            let mut changes = Vec::new();
            for &(_, off, len) in plan.iter().filter(|p| p.0 == index) {
                let a = usize::try_from(off).unwrap_or(usize::MAX);
                let b = a.saturating_add(usize::try_from(len).unwrap_or(0));
                let slice = old
                    .get(a..b)
                    .ok_or_else(|| Error::Implausible("text budget slice".into()))?;
                changes.extend(compare_region(
                    ctx,
                    &mut cache,
                    &region.name,
                    start + off,
                    slice,
                    region.code,
                    delta,
                    boot_data,
                )?);
            }
            out.extend(report(ctx, "text", &region.name, start, &changes));
        }
        Ok(out)
    }
}
