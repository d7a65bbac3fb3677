//! Commands of the Linux layer: the kernel profile kvmaccess derives from guest memory alone.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kvmaccess_linux::{
    CacheReport, CacheUse, DiscoverOptions, Kernel, KernelTypes, ProfileCache, SystemMap, Vmlinux,
};
use serde::Serialize;

use crate::output::print_json;
use crate::parse::parse_u64;
use crate::target::{Access, Target};
use crate::{out, outln, TargetArgs};

/// Optional inputs that replace what the guest's memory cannot give.
#[derive(Debug, Clone, Args, Default)]
pub struct ProfileArgs {
    /// A System.map for kernels whose kallsyms kvmaccess cannot locate (before 6.0, or
    /// without VMCOREINFO). KASLR is applied automatically.
    #[arg(long, global = true, value_name = "FILE")]
    pub system_map: Option<PathBuf>,

    /// A vmlinux ELF of the guest's kernel: its symbol table stands in for a System.map and its
    /// .BTF section for kernels whose memory image has no BTF.
    #[arg(long, global = true, value_name = "FILE")]
    pub vmlinux: Option<PathBuf>,

    /// Derive the whole profile from guest memory every time: neither read nor write the
    /// profile cache.
    #[arg(long, global = true, conflicts_with = "profile_cache")]
    pub no_profile_cache: bool,

    /// Directory of the profile cache, where what is costly to derive (decoded kallsyms, symbol
    /// and type indexes) is kept per kernel build id and re-checked against the guest on use
    /// [default: $XDG_CACHE_HOME/kvmaccess/profiles, else ~/.cache/kvmaccess/profiles].
    #[arg(long, global = true, value_name = "DIR")]
    pub profile_cache: Option<PathBuf>,
}

impl ProfileArgs {
    /// The profile cache to use, if any.
    pub fn cache(&self) -> Option<ProfileCache> {
        if self.no_profile_cache {
            return None;
        }
        self.profile_cache
            .clone()
            .or_else(ProfileCache::default_dir)
            .map(ProfileCache::new)
    }

    fn vmlinux(&self) -> Result<Option<Vmlinux>> {
        self.vmlinux
            .as_deref()
            .map(|path| Vmlinux::open(path).map_err(anyhow::Error::from))
            .transpose()
    }
}

/// The kernel's types: its own BTF from guest memory, else the --vmlinux one.
pub fn kernel_types(kernel: &Kernel<'_>, profile: &ProfileArgs) -> Result<KernelTypes> {
    match kernel.load_types() {
        Ok(types) => Ok(types),
        Err(from_guest) => match profile.vmlinux()? {
            Some(vmlinux) => vmlinux
                .types()
                .map_err(anyhow::Error::from)
                .with_context(|| format!("the guest kernel has no usable BTF ({from_guest}), and")),
            None => Err(from_guest.into()),
        },
    }
}

/// Discovers the kernel behind a target.
pub fn open_kernel<'t>(target: &'t Target, profile: &ProfileArgs) -> Result<Kernel<'t>> {
    let mut options = DiscoverOptions {
        vmcoreinfo_text: target.vmcoreinfo_recorded(),
        cache: profile.cache(),
        ..DiscoverOptions::default()
    };
    if let Some(vmlinux) = profile.vmlinux()? {
        if !vmlinux.system_map.symbols.is_empty() {
            options.system_map = Some(vmlinux.system_map);
        }
    }
    if let Some(path) = &profile.system_map {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the System.map {}", path.display()))?;
        options.system_map =
            Some(SystemMap::parse(&text).with_context(|| format!("parsing {}", path.display()))?);
    }
    let vcpus = (target.vcpus().vcpu_count() > 0).then(|| target.vcpus());
    Kernel::discover(target.memory(), vcpus, &options).context("finding the guest kernel")
}

#[derive(Debug, Args)]
pub struct InfoArgs {}

#[derive(Serialize)]
struct InfoReport<'a> {
    release: &'a str,
    build_id: Option<&'a str>,
    #[serde(with = "kvmaccess_core::hex")]
    kaslr_offset: u64,
    physical_load_address: Option<kvmaccess_core::Gpa>,
    phys_base: i64,
    paging_mode: kvmaccess_x86::PagingMode,
    page_table_root: kvmaccess_core::Gpa,
    symbols: usize,
    btf_bytes: Option<u64>,
    btf_types: Option<usize>,
    btf_error: Option<String>,
    /// Where the types came from (guest memory, or the --vmlinux file's .BTF or DWARF).
    types_origin: Option<&'a str>,
    provenance: &'a kvmaccess_linux::Provenance,
    /// What the profile cache did; `null` with --no-profile-cache.
    profile_cache: Option<CacheReport>,
}

pub fn info(args: &TargetArgs, _cmd: &InfoArgs, json: bool) -> Result<()> {
    let target = Target::open(args, Access::ReadOnly)?;
    let kernel = open_kernel(&target, &args.profile)?;
    let types = kernel_types(&kernel, &args.profile);
    let layout = kernel.layout();
    let report = InfoReport {
        release: kernel.release(),
        build_id: kernel.build_id(),
        kaslr_offset: layout.kaslr_offset,
        physical_load_address: layout.phys_load_address(),
        phys_base: layout.phys_base,
        paging_mode: layout.mode,
        page_table_root: layout.root,
        symbols: kernel.symbols().len(),
        btf_bytes: types.as_ref().ok().map(|t| t.bytes),
        btf_types: types.as_ref().ok().map(|t| t.btf.type_count()),
        btf_error: types.as_ref().err().map(ToString::to_string),
        types_origin: types.as_ref().ok().map(|t| t.origin.as_str()),
        provenance: kernel.provenance(),
        profile_cache: kernel.profile_cache(),
    };
    if json {
        return print_json(&report);
    }
    outln!("kernel      {}", report.release);
    outln!("build id    {}", report.build_id.unwrap_or("unknown"));
    outln!(
        "KASLR       virtual +{:#x}, physical load address {} (phys_base {}{:#x})",
        report.kaslr_offset,
        report
            .physical_load_address
            .map_or_else(|| "unknown".to_string(), |a| a.to_string()),
        if report.phys_base < 0 { "-" } else { "" },
        report.phys_base.unsigned_abs()
    );
    outln!(
        "paging      {}, kernel page-table root {}",
        report.paging_mode,
        report.page_table_root
    );
    outln!("symbols     {} from kallsyms", report.symbols);
    match (&types, &report.btf_error) {
        (Ok(t), _) => outln!(
            "types       {} BTF types ({} KiB) from {} in {:.1} ms",
            t.btf.type_count(),
            t.bytes >> 10,
            t.origin,
            t.elapsed.as_secs_f64() * 1e3
        ),
        (Err(_), Some(e)) => outln!("types       unavailable: {e}"),
        (Err(_), None) => {}
    }
    let p = kernel.provenance();
    outln!("profile from:");
    outln!("  VMCOREINFO  {}", describe_json(&p.vmcoreinfo));
    outln!("  layout      {}", describe_json(&p.layout));
    outln!("  symbols     {}", describe_json(&p.symbols));
    for check in &p.checks {
        outln!("  checked     {check}");
    }
    for missing in &p.missing {
        outln!("  missing     {missing}");
    }
    match &report.profile_cache {
        None => outln!("  cache       off (--no-profile-cache, or no home directory)"),
        Some(cache) => {
            outln!("  cache       {}", cache.dir.display());
            match &cache.build_id {
                None => outln!("    (not used: the kernel records no build id)"),
                Some(_) => {
                    if cache.vmcoreinfo_remembered {
                        outln!(
                            "    VMCOREINFO  at the address remembered for this build (no scan)"
                        );
                    }
                    outln!("    symbols     {}", describe_cache_use(&cache.symbols));
                    outln!("    types       {}", describe_cache_use(&cache.types));
                }
            }
        }
    }
    outln!("steps:");
    for step in &p.steps {
        outln!(
            "  {:<28} {:>9.2} ms  {}",
            step.name,
            step.duration.as_secs_f64() * 1e3,
            step.detail
        );
    }
    outln!(
        "  {:<28} {:>9.2} ms",
        "total",
        p.total().as_secs_f64() * 1e3
    );
    Ok(())
}

/// One line on what the profile cache did for a part of the profile.
fn describe_cache_use(outcome: &CacheUse) -> String {
    let ms = |d: &std::time::Duration| d.as_secs_f64() * 1e3;
    match outcome {
        CacheUse::Unused => "not consulted".to_string(),
        CacheUse::Hit { load, validate } => format!(
            "from the cache: entry read in {:.2} ms, checked against the guest's bytes in {:.2} ms",
            ms(load),
            ms(validate)
        ),
        CacheUse::Miss { reason, stored } => format!(
            "derived from guest memory ({reason}); {}",
            if *stored {
                "entry written"
            } else {
                "entry not written"
            }
        ),
    }
}

/// A compact one-line rendering of a provenance value.
fn describe_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("<{e}>"))
}

#[derive(Debug, Args)]
pub struct SymbolsArgs {
    /// Only symbols whose name contains this text.
    pattern: Option<String>,
    /// Only symbols of this module ("kernel" for the kernel's own).
    #[arg(long)]
    module: Option<String>,
}

#[derive(Serialize)]
struct SymbolJson<'a> {
    name: &'a str,
    #[serde(with = "kvmaccess_core::hex")]
    address: u64,
    kind: char,
    module: Option<&'a str>,
}

/// The kernel with module symbols merged when its types allow reading the module list; else
/// kernel symbols only, with a note saying why.
fn kernel_with_modules<'t>(target: &'t Target, profile: &ProfileArgs) -> Result<Kernel<'t>> {
    match crate::objects::LinuxView::open(target, profile) {
        Ok(view) => Ok(view.kernel),
        Err(e) => {
            eprintln!("kvmaccess: note: module symbols left out: {e:#}");
            open_kernel(target, profile)
        }
    }
}

pub fn symbols(args: &TargetArgs, cmd: &SymbolsArgs, json: bool) -> Result<()> {
    let target = Target::open(args, Access::ReadOnly)?;
    let kernel = kernel_with_modules(&target, &args.profile)?;
    let wanted = kernel.symbols().iter().filter(|s| {
        cmd.pattern.as_deref().map_or(true, |p| s.name.contains(p))
            && match cmd.module.as_deref() {
                None => true,
                Some("kernel") => s.module.is_none(),
                Some(m) => s.module.as_deref() == Some(m),
            }
    });
    if json {
        let list: Vec<SymbolJson<'_>> = wanted
            .map(|s| SymbolJson {
                name: &s.name,
                address: s.address,
                kind: s.kind,
                module: s.module.as_deref(),
            })
            .collect();
        return print_json(&list);
    }
    // The layout of /proc/kallsyms, so existing scripts and diffs work.
    let mut text = String::new();
    for s in wanted {
        text.push_str(&format!("{:016x} {} {}", s.address, s.kind, s.name));
        if let Some(m) = &s.module {
            text.push_str(&format!("\t[{m}]"));
        }
        text.push('\n');
    }
    out!("{text}");
    Ok(())
}

#[derive(Debug, Args)]
pub struct Addr2SymArgs {
    /// Kernel virtual addresses (hex).
    #[arg(required = true, value_parser = parse_u64, value_name = "ADDR")]
    addresses: Vec<u64>,
}

#[derive(Serialize)]
struct Addr2SymJson {
    #[serde(with = "kvmaccess_core::hex")]
    address: u64,
    symbol: Option<String>,
    #[serde(with = "kvmaccess_core::hex::option")]
    offset: Option<u64>,
    module: Option<String>,
}

pub fn addr2sym(args: &TargetArgs, cmd: &Addr2SymArgs, json: bool) -> Result<()> {
    let target = Target::open(args, Access::ReadOnly)?;
    let kernel = kernel_with_modules(&target, &args.profile)?;
    let results: Vec<Addr2SymJson> = cmd
        .addresses
        .iter()
        .map(|&address| match kernel.symbols().addr2sym(address) {
            Some((symbol, offset)) => Addr2SymJson {
                address,
                symbol: Some(symbol.name.to_string()),
                offset: Some(offset),
                module: symbol.module.as_deref().map(str::to_string),
            },
            None => Addr2SymJson {
                address,
                symbol: None,
                offset: None,
                module: None,
            },
        })
        .collect();
    if json {
        return print_json(&results);
    }
    for r in &results {
        match (&r.symbol, r.offset) {
            (Some(name), Some(offset)) => outln!(
                "{:#018x} {name}+{offset:#x}{}",
                r.address,
                r.module
                    .as_deref()
                    .map(|m| format!(" [{m}]"))
                    .unwrap_or_default()
            ),
            _ => outln!("{:#018x} (no symbol)", r.address),
        }
    }
    Ok(())
}
