//! The zero-configuration Linux layer of kvmaccess: everything needed to read a Linux guest's
//! kernel without a hand-made profile.
//!
//! [`Kernel::discover`] finds the kernel's VMCOREINFO text in guest memory
//! ([`vmcoreinfo::scan`]), derives the kernel's page-table root, paging mode and KASLR offsets
//! from it ([`KernelLayout`]), decodes the kernel's own symbol table ([`kallsyms::decode`]) and
//! cross-checks all of it, recording where each piece came from and how long each step took
//! ([`Provenance`]). Without VMCOREINFO it falls back to a vCPU's CR3 and the banner in the
//! kernel image, and takes symbols from a user-supplied [`SystemMap`].
//!
//! Guest memory is hostile input: every count is capped, every offset checked, and nothing the
//! guest writes can make this crate panic, loop without bound or allocate without bound.

#![forbid(unsafe_code)]

pub mod dmesg;
mod error;
pub mod isf;
pub mod kallsyms;
mod layout;
pub mod modules;
pub mod owners;
pub mod profile_cache;
pub mod profile_export;
mod symbols;
pub mod syscalls;
mod sysmap;
pub mod tasks;
mod types;
pub mod vmcoreinfo;
mod vmlinux;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvmaccess_core::{Gpa, Gva, PhysicalMemory, VcpuState};
use kvmaccess_x86::AddressSpace;
use serde::Serialize;

pub use dmesg::{LogBuffer, LogRecord, PrintkLayout};
pub use error::{Error, Result};
pub use isf::{build_isf, Isf, IsfInput, IsfStats};
pub use kallsyms::{DecodeOptions, KallsymsLocation, KernelRead, OffsetRule};
pub use layout::{
    read_banner, Banner, KernelLayout, RegisterFallback, DEFAULT_TEXT, START_KERNEL_MAP,
};
pub use modules::{
    KsetEntry, ModTreeOffsets, Module, ModuleKobject, ModuleOffsets, ModuleRegion,
    ModuleRegionKind, ModuleSymbolsMerged,
};
pub use owners::{KernelSection, Owner, Owners};
pub use profile_cache::{CacheReport, CacheUse, ProfileCache};
pub use profile_export::{ProfileExport, ProfileOptions, TypeSelection};
pub use symbols::{Symbol, SymbolTable};
pub use syscalls::{SyscallEntry, SyscallResolver, SyscallTable, SyscallTables};
pub use sysmap::SystemMap;
pub use tasks::{walk_hlist, walk_list, Task, TaskOffsets, TaskState, MAX_TASKS};
pub use types::{KernelTypes, MAX_BTF_BYTES};
pub use vmcoreinfo::{ScanMode, ScanOptions, Vmcoreinfo};
pub use vmlinux::Vmlinux;

/// Most distinct VMCOREINFO copies that are fully validated (each costs a kallsyms decode).
const MAX_VALIDATED: usize = 8;

/// What [`Kernel::discover`] may use besides guest memory.
#[derive(Clone, Debug, Default)]
pub struct DiscoverOptions {
    /// How to scan for VMCOREINFO.
    pub scan: ScanOptions,
    /// VMCOREINFO text from elsewhere (an ELF core's note): used instead of scanning.
    pub vmcoreinfo_text: Option<String>,
    /// A System.map for kernels whose kallsyms cannot be located.
    pub system_map: Option<SystemMap>,
    /// How to decode kallsyms.
    pub kallsyms: DecodeOptions,
    /// Where to keep derived data per kernel build (`None`: derive everything every time).
    pub cache: Option<ProfileCache>,
}

/// Where VMCOREINFO came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum VmcoreinfoSource {
    /// Found by scanning guest memory.
    Scan {
        /// Copies found.
        candidates: usize,
        /// Distinct texts among them.
        distinct: usize,
        /// Address of the copy used.
        chosen: Gpa,
        /// Every other distinct copy and why it lost.
        rejected: Vec<String>,
        /// Bytes of memory scanned.
        scanned_bytes: u64,
        /// Passes that ran.
        passes: Vec<ScanMode>,
    },
    /// Found at the address where an earlier attach to the same build found it (the address
    /// comes from the profile cache; the copy there passed every check a scan's would).
    Remembered {
        /// Address of the copy used.
        gpa: Gpa,
        /// The build it belongs to.
        build_id: String,
    },
    /// Given by the caller (an ELF core's VMCOREINFO note).
    Provided,
    /// None was found; the reason.
    Absent(String),
}

/// Where the page-table root, paging mode and KASLR offset came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum LayoutSource {
    /// VMCOREINFO: `SYMBOL(init_top_pgt)`, `NUMBER(phys_base)`, `KERNELOFFSET`,
    /// `NUMBER(pgtable_l5_enabled)`.
    Vmcoreinfo,
    /// A vCPU's CR3 and paging mode; KASLR inferred from the first mapping of the kernel image
    /// region, assuming the default link address of `_text`.
    Registers {
        /// The vCPU.
        vcpu: usize,
    },
}

/// Where the symbol table came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum SymbolSource {
    /// Decoded from the guest's kallsyms.
    Kallsyms {
        /// The offset rule that was applied.
        rule: OffsetRule,
        /// Bytes read from the guest.
        bytes_read: usize,
    },
    /// A user-supplied System.map, moved by the measured KASLR slide.
    SystemMap {
        /// The slide.
        slide: u64,
        /// The symbol the slide was measured on.
        anchor: String,
    },
    /// No symbols; the reason.
    Absent(String),
}

/// One step of discovery and its wall time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Short name (`vmcoreinfo-scan`, `kallsyms-decode`, ...).
    pub name: &'static str,
    /// Wall time.
    pub duration: Duration,
    /// What it found, in words.
    pub detail: String,
}

/// How the profile was obtained: sources, checks that passed, what is missing, timings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Provenance {
    /// Source of VMCOREINFO.
    pub vmcoreinfo: VmcoreinfoSource,
    /// Source of the layout.
    pub layout: LayoutSource,
    /// Source of the symbols.
    pub symbols: SymbolSource,
    /// Cross-checks that passed.
    pub checks: Vec<String>,
    /// What could not be determined and what the user can do about it.
    pub missing: Vec<String>,
    /// Steps in order with timings.
    pub steps: Vec<Step>,
}

impl Provenance {
    /// The provenance of a profile whose parts the caller supplied rather than discovered (a
    /// layout and symbols known from elsewhere, tests, fuzzing): `by` names the supplier.
    pub fn supplied(by: &str) -> Self {
        Self {
            vmcoreinfo: VmcoreinfoSource::Absent(format!("supplied by {by}")),
            layout: LayoutSource::Vmcoreinfo,
            symbols: SymbolSource::Absent(format!("supplied by {by}")),
            checks: Vec::new(),
            missing: Vec::new(),
            steps: Vec::new(),
        }
    }

    /// Sum of the step times.
    pub fn total(&self) -> Duration {
        self.steps.iter().map(|s| s.duration).sum()
    }
}

/// Everything discovered about a kernel, independent of the memory it was read from.
#[derive(Clone, Debug)]
pub struct KernelProfile {
    /// Kernel release (`uname -r`).
    pub release: String,
    /// GNU build ID of vmlinux (hex), when VMCOREINFO has it.
    pub build_id: Option<String>,
    /// Paging mode, root, KASLR offsets.
    pub layout: KernelLayout,
    /// The VMCOREINFO used, if any.
    pub vmcoreinfo: Option<Vmcoreinfo>,
    /// `linux_banner`, when it was found and checked.
    pub banner: Option<Banner>,
    /// Kernel symbols (possibly empty: see [`Provenance::symbols`]).
    pub symbols: SymbolTable,
    /// Where all of it came from.
    pub provenance: Provenance,
}

/// Most names [`Kernel::symbol`] remembers.
const SYMBOL_MEMO_LIMIT: usize = 4096;

/// A discovered kernel bound to the guest memory it lives in.
///
/// Later layers (types from BTF, tasks, modules, syscall tables, the log buffer) build on
/// [`Kernel::read`], [`Kernel::space`] and [`Kernel::symbols`].
pub struct Kernel<'m> {
    mem: &'m dyn PhysicalMemory,
    profile: KernelProfile,
    space: Mutex<AddressSpace<'m, dyn PhysicalMemory + 'm>>,
    cache: Option<CacheBinding>,
    /// [`Kernel::symbol`]'s answers: a monitor asks for the same few dozen names every pass,
    /// and a search of ~150,000 names with cold caches costs microseconds each.
    symbol_memo: Mutex<HashMap<String, Option<u64>>>,
}

/// The profile cache a kernel was discovered with, for [`Kernel::load_types`].
struct CacheBinding {
    store: ProfileCache,
    report: Mutex<CacheReport>,
}

impl std::fmt::Debug for Kernel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("release", &self.profile.release)
            .field("layout", &self.profile.layout)
            .field("symbols", &self.profile.symbols.len())
            .finish_non_exhaustive()
    }
}

struct Timer {
    steps: Vec<Step>,
}

impl Timer {
    fn run<T>(
        &mut self,
        name: &'static str,
        work: impl FnOnce() -> T,
        detail: impl FnOnce(&T) -> String,
    ) -> T {
        let started = Instant::now();
        let out = work();
        let duration = started.elapsed();
        self.steps.push(Step {
            name,
            duration,
            detail: detail(&out),
        });
        out
    }
}

/// One VMCOREINFO copy after validation.
struct Evaluated {
    gpa: Option<Gpa>,
    info: Vmcoreinfo,
    layout: KernelLayout,
    symbols: Option<kallsyms::Decoded>,
    symbols_error: Option<String>,
    banner: Option<Banner>,
    checks: Vec<String>,
    problems: Vec<String>,
    score: u32,
    decode_time: Duration,
    cache: CandidateCache,
}

/// What the profile cache gave one VMCOREINFO copy's kallsyms.
#[derive(Default)]
struct CandidateCache {
    /// Hit, miss (and why), or unused.
    outcome: CacheUse,
    /// The cached symbol indexes, on a hit.
    index_hints: Option<(Vec<u32>, Vec<u32>)>,
    /// The VMCOREINFO address the cached entry remembers.
    remembered_gpa: Option<Gpa>,
}

impl<'m> Kernel<'m> {
    /// Find and check everything, from guest memory alone (plus vCPU registers when there is no
    /// VMCOREINFO, and whatever `options` supplies).
    pub fn discover(
        mem: &'m dyn PhysicalMemory,
        vcpus: Option<&dyn VcpuState>,
        options: &DiscoverOptions,
    ) -> Result<Self> {
        let mut timer = Timer { steps: Vec::new() };
        if let Some(text) = &options.vmcoreinfo_text {
            let info = timer.run(
                "vmcoreinfo-parse",
                || Vmcoreinfo::parse(text.as_bytes()),
                describe_parse,
            )?;
            let evaluated = evaluate(mem, None, info, vcpus, options, &mut timer);
            if evaluated.score == 0 {
                return Err(Error::VmcoreinfoNotFound {
                    scanned_bytes: 0,
                    candidates: 1,
                    rejected: vec![format!("provided text: {}", evaluated.problems.join(", "))],
                });
            }
            return Self::finish(mem, evaluated, VmcoreinfoSource::Provided, options, timer);
        }

        if let Some((chosen, source)) = remembered(mem, vcpus, options, &mut timer) {
            return Self::finish(mem, chosen, source, options, timer);
        }

        let report = timer.run(
            "vmcoreinfo-scan",
            || vmcoreinfo::scan(mem, &options.scan),
            |r| {
                format!(
                    "{} candidate(s) in {} MiB ({:?})",
                    r.candidates.len(),
                    r.scanned_bytes >> 20,
                    r.passes
                )
            },
        );
        // Identical copies (the data page and the ELF note) are validated once.
        let mut distinct: Vec<(Gpa, &[u8])> = Vec::new();
        for candidate in &report.candidates {
            if !distinct
                .iter()
                .any(|(_, b)| *b == candidate.bytes.as_slice())
            {
                distinct.push((candidate.gpa, &candidate.bytes));
            }
        }
        let mut evaluated: Vec<Evaluated> = Vec::new();
        let mut rejected: Vec<String> = Vec::new();
        for &(gpa, bytes) in distinct.iter().take(MAX_VALIDATED) {
            match Vmcoreinfo::parse(bytes) {
                Ok(info) => {
                    evaluated.push(evaluate(mem, Some(gpa), info, vcpus, options, &mut timer))
                }
                Err(e) => rejected.push(format!("{gpa}: {e}")),
            }
        }
        if distinct.len() > MAX_VALIDATED {
            rejected.push(format!(
                "{} further distinct copies not examined",
                distinct.len() - MAX_VALIDATED
            ));
        }
        // Highest score wins; among equals the lowest address (the scan's order).
        let best = evaluated
            .iter()
            .enumerate()
            .filter(|(_, e)| e.score > 0)
            .max_by_key(|(i, e)| (e.score, std::cmp::Reverse(*i)))
            .map(|(i, _)| i);
        let Some(best) = best else {
            rejected.extend(evaluated.iter().map(|e| {
                format!(
                    "{}: {}",
                    e.gpa.map_or("?".to_string(), |g| g.to_string()),
                    e.problems.join(", ")
                )
            }));
            let not_found = Error::VmcoreinfoNotFound {
                scanned_bytes: report.scanned_bytes,
                candidates: report.candidates.len(),
                rejected: rejected.clone(),
            };
            return match vcpus {
                Some(vcpus) => {
                    Self::from_registers(mem, vcpus, options, timer, not_found.to_string())
                }
                None => Err(not_found),
            };
        };
        let chosen = evaluated.swap_remove(best);
        for other in &evaluated {
            rejected.push(format!(
                "{}: score {} < {} ({})",
                other.gpa.map_or("?".to_string(), |g| g.to_string()),
                other.score,
                chosen.score,
                if other.problems.is_empty() {
                    "no problem found".to_string()
                } else {
                    other.problems.join(", ")
                }
            ));
        }
        let source = VmcoreinfoSource::Scan {
            candidates: report.candidates.len(),
            distinct: distinct.len(),
            chosen: chosen.gpa.unwrap_or_default(),
            rejected,
            scanned_bytes: report.scanned_bytes,
            passes: report.passes.clone(),
        };
        Self::finish(mem, chosen, source, options, timer)
    }

    /// Build a profile from VMCOREINFO text recorded elsewhere (an ELF core's note), reading
    /// everything else from `mem`.
    pub fn from_vmcoreinfo_text(
        mem: &'m dyn PhysicalMemory,
        text: &str,
        options: &DiscoverOptions,
    ) -> Result<Self> {
        let options = DiscoverOptions {
            vmcoreinfo_text: Some(text.to_string()),
            ..options.clone()
        };
        Self::discover(mem, None, &options)
    }

    fn finish(
        mem: &'m dyn PhysicalMemory,
        chosen: Evaluated,
        source: VmcoreinfoSource,
        options: &DiscoverOptions,
        mut timer: Timer,
    ) -> Result<Self> {
        let Evaluated {
            gpa,
            info,
            layout,
            symbols,
            symbols_error,
            banner,
            mut checks,
            problems,
            decode_time,
            cache,
            ..
        } = chosen;
        let mut missing = problems;
        let mut fresh_source = None;
        let (table, symbol_source) = match (symbols, symbols_error) {
            (Some(decoded), _) => {
                let rule = decoded.rule;
                let bytes_read = decoded.bytes_read;
                let count = decoded.symbols.len();
                let hit = matches!(cache.outcome, CacheUse::Hit { .. });
                let (table, hinted) = timer.run(
                    "symbol-index",
                    || match cache.index_hints {
                        Some((by_name, by_address)) => {
                            SymbolTable::with_index_hints(decoded.symbols, by_name, by_address)
                        }
                        None => (SymbolTable::new(decoded.symbols), false),
                    },
                    |(_, hinted)| {
                        format!(
                            "{count} symbols{}",
                            if *hinted {
                                ", cached indexes checked"
                            } else {
                                ""
                            }
                        )
                    },
                );
                timer.steps.push(if hit {
                    Step {
                        name: "kallsyms-cached",
                        duration: decode_time,
                        detail: format!(
                            "{count} names from the profile cache, {bytes_read} bytes read and \
                             hash-checked, rule {rule:?}"
                        ),
                    }
                } else {
                    Step {
                        name: "kallsyms-decode",
                        duration: decode_time,
                        detail: format!("{count} symbols, {bytes_read} bytes read, rule {rule:?}"),
                    }
                });
                // Worth (re)writing unless everything came from an entry that is still exact.
                let remembered_moved = gpa.is_some() && gpa != cache.remembered_gpa;
                if !hit || !hinted || remembered_moved {
                    fresh_source = Some(decoded.source);
                }
                (table, SymbolSource::Kallsyms { rule, bytes_read })
            }
            (None, reason) => {
                let reason = reason.unwrap_or_else(|| "kallsyms not attempted".to_string());
                let stext = info.symbols.get("_stext").copied();
                match system_map_symbols(options, stext, banner.as_ref(), &mut timer) {
                    Some(Ok((table, source))) => (table, source),
                    Some(Err(e)) => {
                        missing.push(format!("{reason}; System.map: {e}"));
                        (SymbolTable::default(), SymbolSource::Absent(reason))
                    }
                    None => {
                        missing.push(format!("{reason}; pass a System.map (--system-map)"));
                        (SymbolTable::default(), SymbolSource::Absent(reason))
                    }
                }
            }
        };
        if banner.is_none() {
            missing.push("linux_banner not located: the release was not cross-checked".into());
        } else {
            checks.push("linux_banner matches OSRELEASE".into());
        }
        let cache_report = options.cache.as_ref().map(|store| {
            let build_id = info.build_id.clone();
            let mut symbols = cache.outcome;
            if let (Some(source), Some(build_id)) = (fresh_source, &build_id) {
                // A provided text (a dump) has no address: keep the one a live attach found.
                let remembered = gpa.or(cache.remembered_gpa);
                let stored = store_symbols(
                    store, build_id, &info, remembered, source, &table, &mut timer,
                );
                if let CacheUse::Miss { stored: s, .. } = &mut symbols {
                    *s = stored;
                }
            }
            CacheReport {
                dir: store.dir().to_path_buf(),
                build_id,
                vmcoreinfo_remembered: matches!(source, VmcoreinfoSource::Remembered { .. }),
                symbols,
                types: CacheUse::Unused,
            }
        });
        let profile = KernelProfile {
            release: info.osrelease.clone(),
            build_id: info.build_id.clone(),
            layout,
            banner,
            symbols: table,
            provenance: Provenance {
                vmcoreinfo: source,
                layout: LayoutSource::Vmcoreinfo,
                symbols: symbol_source,
                checks,
                missing,
                steps: timer.steps,
            },
            vmcoreinfo: Some(info),
        };
        Ok(Self::from_profile(mem, profile).with_cache(options.cache.as_ref(), cache_report))
    }

    /// Attach the cache discovery used, so that [`Kernel::load_types`] uses it too.
    fn with_cache(mut self, store: Option<&ProfileCache>, report: Option<CacheReport>) -> Self {
        self.cache = store.zip(report).map(|(store, report)| CacheBinding {
            store: store.clone(),
            report: Mutex::new(report),
        });
        self
    }

    /// What the profile cache did, when discovery was given one.
    pub fn profile_cache(&self) -> Option<CacheReport> {
        self.cache.as_ref().map(|c| lock(&c.report).clone())
    }

    /// The cache and the build ID to file entries under, when both exist.
    fn cache_key(&self) -> Option<(&ProfileCache, &str)> {
        let cache = self.cache.as_ref()?;
        Some((&cache.store, self.profile.build_id.as_deref()?))
    }

    fn record_types_cache(&self, outcome: CacheUse) {
        if let Some(cache) = &self.cache {
            lock(&cache.report).types = outcome;
        }
    }

    fn from_registers(
        mem: &'m dyn PhysicalMemory,
        vcpus: &dyn VcpuState,
        options: &DiscoverOptions,
        mut timer: Timer,
        why: String,
    ) -> Result<Self> {
        let regs = timer.run(
            "registers",
            || vcpus.registers(0),
            |r| match r {
                Ok(r) => format!("vCPU 0 CR3 {:#x}", r.cr3),
                Err(e) => e.to_string(),
            },
        );
        let regs = regs.map_err(|e| {
            Error::NoProfileSource(format!("{why}; and vCPU 0 registers are unavailable: {e}"))
        })?;
        let fallback = timer.run(
            "layout-from-registers",
            || layout::from_registers(mem, &regs),
            |r| match r {
                Ok(f) => format!("_text at {:#x}, root {}", f.text, f.layout.root),
                Err(e) => e.to_string(),
            },
        )?;
        let mut missing = vec![
            format!("no VMCOREINFO ({why})"),
            format!(
                "KASLR offset {:#x} inferred from the first kernel-image mapping at {:#x}, \
                 assuming _text is linked at {DEFAULT_TEXT:#x}",
                fallback.layout.kaslr_offset, fallback.text
            ),
        ];
        let release = fallback
            .banner
            .as_ref()
            .map(|b| b.release.clone())
            .unwrap_or_default();
        if fallback.banner.is_none() {
            missing.push("no linux_banner found in the kernel image: release unknown".into());
        }
        let mut layout = fallback.layout;
        let (symbols, symbol_source) = match system_map_symbols(
            options,
            None,
            fallback.banner.as_ref(),
            &mut timer,
        ) {
            Some(Ok((table, source))) => {
                if let SymbolSource::SystemMap { slide, .. } = &source {
                    // The banner anchor measures the slide exactly; trust it over the guess.
                    layout.kaslr_offset = *slide;
                }
                (table, source)
            }
            Some(Err(e)) => {
                missing.push(format!("System.map: {e}"));
                (SymbolTable::default(), SymbolSource::Absent(e.to_string()))
            }
            None => {
                let reason =
                    "kallsyms cannot be located without VMCOREINFO; pass a System.map (--system-map)"
                        .to_string();
                missing.push(reason.clone());
                (SymbolTable::default(), SymbolSource::Absent(reason))
            }
        };
        let profile = KernelProfile {
            release,
            build_id: None,
            layout,
            vmcoreinfo: None,
            banner: fallback.banner,
            symbols,
            provenance: Provenance {
                vmcoreinfo: VmcoreinfoSource::Absent(why),
                layout: LayoutSource::Registers {
                    vcpu: fallback.vcpu,
                },
                symbols: symbol_source,
                checks: Vec::new(),
                missing,
                steps: timer.steps,
            },
        };
        let report = options.cache.as_ref().map(|store| CacheReport {
            dir: store.dir().to_path_buf(),
            build_id: None,
            vmcoreinfo_remembered: false,
            symbols: CacheUse::Unused,
            types: CacheUse::Unused,
        });
        Ok(Self::from_profile(mem, profile).with_cache(options.cache.as_ref(), report))
    }

    /// Bind an existing profile (from an earlier discovery of the same guest) to memory.
    pub fn from_profile(mem: &'m dyn PhysicalMemory, profile: KernelProfile) -> Self {
        let space = AddressSpace::new(mem, profile.layout.mode, profile.layout.root.0);
        Self {
            mem,
            profile,
            space: Mutex::new(space),
            symbol_memo: Mutex::default(),
            cache: None,
        }
    }

    /// The profile.
    pub fn profile(&self) -> &KernelProfile {
        &self.profile
    }

    /// Give up the memory binding.
    pub fn into_profile(self) -> KernelProfile {
        self.profile
    }

    /// Kernel release.
    pub fn release(&self) -> &str {
        &self.profile.release
    }

    /// GNU build ID of vmlinux, when known.
    pub fn build_id(&self) -> Option<&str> {
        self.profile.build_id.as_deref()
    }

    /// Paging mode, page-table root, KASLR offsets.
    pub fn layout(&self) -> &KernelLayout {
        &self.profile.layout
    }

    /// Kernel symbols.
    pub fn symbols(&self) -> &SymbolTable {
        &self.profile.symbols
    }

    /// Kernel symbols, to merge module symbols into.
    pub fn symbols_mut(&mut self) -> &mut SymbolTable {
        self.symbol_memo
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        &mut self.profile.symbols
    }

    /// Where everything came from and how long it took.
    pub fn provenance(&self) -> &Provenance {
        &self.profile.provenance
    }

    /// The VMCOREINFO used, if any.
    pub fn vmcoreinfo(&self) -> Option<&Vmcoreinfo> {
        self.profile.vmcoreinfo.as_ref()
    }

    /// The guest memory.
    pub fn memory(&self) -> &'m dyn PhysicalMemory {
        self.mem
    }

    /// A fresh address space for kernel virtual addresses (its own translation cache).
    pub fn space(&self) -> AddressSpace<'m, dyn PhysicalMemory + 'm> {
        AddressSpace::new(
            self.mem,
            self.profile.layout.mode,
            self.profile.layout.root.0,
        )
    }

    fn shared_space(&self) -> MutexGuard<'_, AddressSpace<'m, dyn PhysicalMemory + 'm>> {
        // A panic while holding the lock cannot leave the cache inconsistent in a way that
        // matters: it only holds translations, which are re-validated by invalidation.
        self.space.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read kernel virtual memory (through a shared translation cache).
    pub fn read(&self, gva: Gva, buf: &mut [u8]) -> Result<()> {
        self.shared_space().read_kernel(gva, buf)
    }

    /// Read a little-endian u64 of kernel virtual memory.
    pub fn read_u64(&self, gva: Gva) -> Result<u64> {
        let mut raw = [0u8; 8];
        self.read(gva, &mut raw)?;
        Ok(u64::from_le_bytes(raw))
    }

    /// Forget cached translations (call after the guest ran, if page tables may have changed).
    pub fn invalidate(&self) {
        self.shared_space().cache_mut().invalidate_all();
    }

    /// Address of a kernel symbol, or an error naming it.
    pub fn symbol(&self, name: &str) -> Result<u64> {
        let mut memo = self.symbol_memo.lock().unwrap_or_else(|p| p.into_inner());
        let found = match memo.get(name) {
            Some(&found) => found,
            None => {
                let found = self.profile.symbols.address_of(name).or_else(|| {
                    self.profile
                        .vmcoreinfo
                        .as_ref()
                        .and_then(|i| i.symbols.get(name).copied())
                });
                // Callers ask for fixed names; a bound keeps the memo small whatever they ask.
                if memo.len() < SYMBOL_MEMO_LIMIT {
                    memo.insert(name.to_string(), found);
                }
                found
            }
        };
        found.ok_or_else(|| Error::VmcoreinfoMissing {
            key: format!("symbol {name} (in neither kallsyms nor VMCOREINFO)"),
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain data, complete after every update.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Most remembered addresses probed before scanning.
const MAX_REMEMBERED: usize = 8;

/// VMCOREINFO at an address the profile cache remembers, when the copy there belongs to the
/// remembered build and passes every check a scan's best candidate must pass. Saves the scan
/// (tens of milliseconds on a large guest). A copy that is there but falls short of a clean pass
/// ends the shortcut: the full scan then weighs it against every other copy.
fn remembered(
    mem: &dyn PhysicalMemory,
    vcpus: Option<&dyn VcpuState>,
    options: &DiscoverOptions,
    timer: &mut Timer,
) -> Option<(Evaluated, VmcoreinfoSource)> {
    let store = options.cache.as_ref()?;
    let started = Instant::now();
    let hints = store.hints();
    if hints.is_empty() {
        return None;
    }
    for (build_id, gpa) in hints.into_iter().take(MAX_REMEMBERED) {
        let Some(info) = vmcoreinfo::read_candidate(mem, gpa)
            .and_then(|bytes| Vmcoreinfo::parse(&bytes).ok())
            .filter(|info| info.build_id.as_deref() == Some(build_id.as_str()))
        else {
            continue;
        };
        timer.steps.push(Step {
            name: "vmcoreinfo-remembered",
            duration: started.elapsed(),
            detail: format!("copy at {gpa}, where an earlier attach to build {build_id} found it"),
        });
        let evaluated = evaluate(mem, Some(gpa), info, vcpus, options, timer);
        if evaluated.problems.is_empty()
            && evaluated.symbols.is_some()
            && evaluated.banner.is_some()
        {
            return Some((evaluated, VmcoreinfoSource::Remembered { gpa, build_id }));
        }
        return None;
    }
    timer.steps.push(Step {
        name: "vmcoreinfo-remembered",
        duration: started.elapsed(),
        detail: "no remembered address holds its build's VMCOREINFO".into(),
    });
    None
}

/// kallsyms of one VMCOREINFO copy: the names from the profile cache when the guest's name
/// arrays are the bytes they were decoded from, decoded afresh otherwise.
fn decode_kallsyms(
    space: &mut AddressSpace<'_, dyn PhysicalMemory + '_>,
    info: &Vmcoreinfo,
    options: &DiscoverOptions,
) -> (Result<kallsyms::Decoded>, CandidateCache) {
    let location = match KallsymsLocation::from_vmcoreinfo(info) {
        Ok(location) => location,
        Err(e) => return (Err(e), CandidateCache::default()),
    };
    let mut cache = CandidateCache::default();
    let miss = |reason: String| CacheUse::Miss {
        reason,
        stored: false,
    };
    if let (Some(store), Some(build_id)) = (&options.cache, &info.build_id) {
        let started = Instant::now();
        let entry = match store.load(build_id, profile_cache::EntryKind::Symbols) {
            Ok(Some(profile_cache::CacheFile::Symbols(entry)))
                if entry.release == info.osrelease =>
            {
                Some(entry)
            }
            Ok(Some(_)) => {
                cache.outcome = miss("the cached entry names another release".into());
                None
            }
            Ok(None) => {
                cache.outcome = miss("no entry for this build yet".into());
                None
            }
            Err(e) => {
                tracing::debug!("profile cache entry ignored: {e}");
                cache.outcome = miss(e.to_string());
                None
            }
        };
        if let Some(entry) = entry {
            let load = started.elapsed();
            let started = Instant::now();
            match kallsyms::decode_cached(space, &location, options.kallsyms, entry.names) {
                Ok(Ok(decoded)) => {
                    cache.outcome = CacheUse::Hit {
                        load,
                        validate: started.elapsed(),
                    };
                    cache.index_hints = Some((entry.by_name, entry.by_address));
                    cache.remembered_gpa = entry.vmcoreinfo_gpa;
                    return (Ok(decoded), cache);
                }
                Ok(Err(_)) => {
                    cache.outcome = miss(
                        "the guest's kallsyms name arrays differ from the cached entry's source"
                            .into(),
                    );
                }
                Err(e) => cache.outcome = miss(format!("checking the cached entry: {e}")),
            }
            cache.remembered_gpa = entry.vmcoreinfo_gpa;
        }
    }
    (kallsyms::decode(space, &location, options.kallsyms), cache)
}

/// Writes the symbols entry of a build; a failure is a warning (a read-only home must not stop
/// anything). Returns whether it was written.
fn store_symbols(
    store: &ProfileCache,
    build_id: &str,
    info: &Vmcoreinfo,
    gpa: Option<Gpa>,
    source: kallsyms::NamesSource,
    table: &SymbolTable,
    timer: &mut Timer,
) -> bool {
    let entry = profile_cache::CacheFile::Symbols(profile_cache::SymbolsEntry {
        build_id: build_id.to_string(),
        release: info.osrelease.clone(),
        vmcoreinfo_gpa: gpa,
        names: kallsyms::CachedNames {
            source,
            symbols: table.as_slice().to_vec(),
        },
        by_name: table.name_index().to_vec(),
        by_address: table.address_index().to_vec(),
    });
    let result = timer.run(
        "profile-cache-write",
        || store.store(&entry),
        |r| match r {
            Ok(path) => format!("{}", path.display()),
            Err(e) => e.to_string(),
        },
    );
    match result {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("profile cache not written: {e}");
            false
        }
    }
}

fn describe_parse(result: &Result<Vmcoreinfo>) -> String {
    match result {
        Ok(info) => format!(
            "OSRELEASE={} with {} symbols, {} warnings",
            info.osrelease,
            info.symbols.len(),
            info.warnings.len()
        ),
        Err(e) => e.to_string(),
    }
}

/// Check one VMCOREINFO copy against the memory it claims to describe. Score 0 means unusable.
fn evaluate(
    mem: &dyn PhysicalMemory,
    gpa: Option<Gpa>,
    info: Vmcoreinfo,
    vcpus: Option<&dyn VcpuState>,
    options: &DiscoverOptions,
    timer: &mut Timer,
) -> Evaluated {
    let mut out = Evaluated {
        gpa,
        layout: KernelLayout {
            mode: kvmaccess_x86::PagingMode::Level4,
            root: Gpa(0),
            kaslr_offset: 0,
            phys_base: 0,
            page_offset_base: None,
        },
        info,
        symbols: None,
        symbols_error: None,
        banner: None,
        checks: Vec::new(),
        problems: Vec::new(),
        score: 0,
        decode_time: Duration::ZERO,
        cache: CandidateCache::default(),
    };
    let started = Instant::now();
    let layout = match KernelLayout::from_vmcoreinfo(&out.info) {
        Ok(layout) => layout,
        Err(e) => {
            out.problems.push(e.to_string());
            return out;
        }
    };
    out.layout = layout;
    let mut space = layout.space(mem);

    // The page tables must map _stext where the __START_KERNEL_map arithmetic says it is.
    let stext = match out.info.symbol("_stext") {
        Ok(stext) => stext,
        Err(e) => {
            out.problems.push(e.to_string());
            return out;
        }
    };
    match space.gpa(Gva(stext)) {
        Ok(gpa) if Some(gpa) == layout.image_phys(stext) => {
            out.score += 1;
            out.checks.push(format!(
                "_stext {stext:#x} translates to {gpa} through the root"
            ));
        }
        Ok(gpa) => {
            out.problems.push(format!(
                "_stext {stext:#x} translates to {gpa}, not {:?} as phys_base says",
                layout.image_phys(stext)
            ));
            return out;
        }
        Err(e) => {
            out.problems
                .push(format!("_stext {stext:#x} does not translate: {e}"));
            return out;
        }
    }
    if let Some(root_check) = cr3_agrees(mem, &layout, vcpus) {
        match root_check {
            Ok(detail) => {
                out.score += 1;
                out.checks.push(detail);
            }
            Err(problem) => out.problems.push(problem),
        }
    }
    timer.steps.push(Step {
        name: "layout-check",
        duration: started.elapsed(),
        detail: format!(
            "{} root {} KASLR {:#x}",
            gpa.map_or("provided".to_string(), |g| format!("copy at {g}:")),
            layout.root,
            layout.kaslr_offset
        ),
    });

    let started = Instant::now();
    let (decoded, cache) = decode_kallsyms(&mut space, &out.info, options);
    out.cache = cache;
    match decoded.and_then(|decoded| check_decoded(&out.info, decoded)) {
        Ok((decoded, agreed)) => {
            out.score += 2;
            out.checks.push(format!(
                "kallsyms agree with VMCOREINFO on {agreed} symbol addresses"
            ));
            out.symbols = Some(decoded);
        }
        Err(e) => {
            out.symbols_error = Some(e.to_string());
            out.problems.push(format!("kallsyms: {e}"));
        }
    }
    out.decode_time = started.elapsed();

    let banner_at = out
        .symbols
        .as_ref()
        .and_then(|d| d.symbols.iter().find(|s| s.name == "linux_banner"))
        .map(|s| s.address)
        .or_else(|| out.info.symbols.get("linux_banner").copied());
    if let Some(address) = banner_at {
        match read_banner(&mut space, address) {
            Ok(banner) if banner.release == out.info.osrelease => {
                out.score += 2;
                out.banner = Some(banner);
            }
            Ok(banner) => out.problems.push(format!(
                "linux_banner says {:?}, VMCOREINFO OSRELEASE={}",
                banner.release, out.info.osrelease
            )),
            Err(e) => out.problems.push(e.to_string()),
        }
    }
    out
}

/// VMCOREINFO entries that are plain symbol addresses. Others are not: `SYMBOL(mem_section)`,
/// for one, holds the pointer's value, not the variable's address.
const ADDRESS_SYMBOLS: &[&str] = &[
    "_stext",
    "init_top_pgt",
    "swapper_pg_dir",
    "init_uts_ns",
    "kallsyms_names",
    "kallsyms_num_syms",
    "kallsyms_token_table",
    "kallsyms_token_index",
    "kallsyms_offsets",
    "kallsyms_relative_base",
    "kallsyms_addresses",
];

/// The decoded table must hold the VMCOREINFO symbols that are addresses, at the same
/// addresses. A wrong offset rule or a forged table shows here first, at `_stext`.
fn check_decoded(
    info: &Vmcoreinfo,
    decoded: kallsyms::Decoded,
) -> Result<(kallsyms::Decoded, usize)> {
    let mut agreed = 0usize;
    let mut disagreeing = Vec::new();
    for &name in ADDRESS_SYMBOLS {
        let Some(&expected) = info.symbols.get(name) else {
            continue;
        };
        let mut found = decoded.symbols.iter().filter(|s| s.name == name).peekable();
        if found.peek().is_none() {
            continue;
        }
        // Names can repeat (static symbols); one match is enough.
        if found.any(|s| s.address == expected) {
            agreed += 1;
        } else {
            disagreeing.push(format!("{name} (VMCOREINFO {expected:#x})"));
        }
    }
    if !decoded.symbols.iter().any(|s| s.name == "_stext") {
        disagreeing.push("_stext (absent from kallsyms)".to_string());
    }
    if !disagreeing.is_empty() {
        return Err(Error::KallsymsMismatch(format!(
            "kallsyms (offset rule {:?}) and VMCOREINFO disagree on {}",
            decoded.rule,
            disagreeing.join(", ")
        )));
    }
    Ok((decoded, agreed))
}

/// Whether a vCPU's page tables map the kernel image through the same top-level entry as the
/// candidate root: every process shares the kernel's upper tables, so a forged VMCOREINFO with
/// tables of its own fails this. With page-table isolation a user CR3 is the page above the
/// kernel half of its pair, so both are tried.
fn cr3_agrees(
    mem: &dyn PhysicalMemory,
    layout: &KernelLayout,
    vcpus: Option<&dyn VcpuState>,
) -> Option<std::result::Result<String, String>> {
    let regs = vcpus?.registers(0).ok()?;
    let root = layout.mode.root_table(regs.cr3)?;
    // Entry 511 of the top level covers __START_KERNEL_map in both 4- and 5-level paging.
    let top_entry = |table: Gpa| mem.read_u64(Gpa(table.0 + 511 * 8)).ok();
    let ours = top_entry(layout.root)?;
    for candidate in [root, Gpa(root.0 & !0x1000)] {
        if top_entry(candidate) == Some(ours) {
            return Some(Ok(format!(
                "vCPU 0 CR3 {:#x} shares the kernel's top-level entry with the root",
                regs.cr3
            )));
        }
    }
    Some(Err(format!(
        "vCPU 0 CR3 {:#x} does not share the kernel image mapping of root {}",
        regs.cr3, layout.root
    )))
}

/// Symbols from the user's System.map, slid to match the guest. `None` without a map.
fn system_map_symbols(
    options: &DiscoverOptions,
    stext: Option<u64>,
    banner: Option<&Banner>,
    timer: &mut Timer,
) -> Option<Result<(SymbolTable, SymbolSource)>> {
    let map = options.system_map.as_ref()?;
    Some(timer.run(
        "system-map",
        || {
            let (anchor, slide) = match (stext, banner) {
                (Some(stext), _) => ("_stext", map.slide("_stext", stext)?),
                (None, Some(banner)) => {
                    ("linux_banner", map.slide("linux_banner", banner.address)?)
                }
                (None, None) => {
                    return Err(Error::SystemMapSlide(
                        "neither _stext (VMCOREINFO) nor linux_banner is known live".into(),
                    ))
                }
            };
            Ok((
                SymbolTable::new(map.relocated(slide)),
                SymbolSource::SystemMap {
                    slide,
                    anchor: anchor.to_string(),
                },
            ))
        },
        |r| match r {
            Ok((t, s)) => format!("{} symbols, {s:?}", t.len()),
            Err(e) => e.to_string(),
        },
    ))
}

#[cfg(test)]
mod tests;
