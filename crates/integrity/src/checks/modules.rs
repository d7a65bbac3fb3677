//! Loaded modules, seen three ways: the `modules` list (what `lsmod` and `/proc/modules` read),
//! the sysfs kobjects on `module_kset` (`/sys/module`), and the module address tree
//! (`mod_tree`, where the kernel looks up which module an address belongs to). A rootkit that
//! unlinks itself from the list to hide from `lsmod` usually leaves its kobject, because
//! removing it breaks unloading; one that removes its kobject too stays in the tree, because
//! leaving it breaks the module's own exception handling and stack traces. A module another
//! view holds and the list does not is reported as critical on every pass, baseline or not.
//!
//! Against the baseline, modules loaded or unloaded since are reported as information (the
//! kernel loads modules on demand all the time), with the taints that matter for judging a
//! newcomer (unsigned, out-of-tree); a module that came back with another size is reported low.
//!
//! Race with a running guest: the kernel adds a module to the list before its kobject and, on
//! unload, removes the kobject before unlinking it from the list. So reading the list first
//! and the kset second can only show a module "in the kset but not on the list" if it was
//! loaded entirely between the two reads; such a candidate is confirmed by reading the list
//! again before it is reported. The list and the tree change together (under the module
//! mutex), so a module only the tree shows is confirmed by reading both again.

use std::collections::{BTreeMap, HashSet};

use kvmaccess_linux::{Kernel, Module, ModuleKobject, ModuleOffsets};
use serde::{Deserialize, Serialize};

use crate::baseline::Blobs;
use crate::engine::{Check, CheckBaseline, Context};
use crate::error::Result;
use crate::finding::{Finding, Severity};

pub(crate) const DESCRIPTION: &str = "the module list against the sysfs module kobjects \
     and the module address tree (modules hidden from lsmod) and against the baseline \
     (modules loaded, unloaded or changed since)";

/// Module-list check (`modules`).
#[derive(Debug, Default)]
pub struct ModulesCheck {
    offsets: super::Derived<ModuleOffsets>,
    parsed: super::Parsed<ModulesState>,
}

impl ModulesCheck {
    /// A check using these offsets instead of deriving them from the kernel's BTF.
    pub fn with_offsets(offsets: ModuleOffsets) -> Self {
        Self {
            offsets: super::Derived::fixed(offsets),
            parsed: super::Parsed::default(),
        }
    }
}

/// One module as captured. The base is absolute: modules load anywhere in the module area,
/// so it is compared only within one boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ModuleState {
    pub name: String,
    pub size: u64,
    pub text_size: u64,
    #[serde(with = "kvmaccess_core::hex")]
    pub base: u64,
    pub taints: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ModulesState {
    pub modules: Vec<ModuleState>,
}

/// The module as the check compares it: only its lasting (non-init) memory, because the kernel
/// frees init sections some time after the module went live, and a module seen before that
/// would otherwise look changed.
fn state_of(m: &Module) -> ModuleState {
    use kvmaccess_linux::ModuleRegionKind as Kind;
    let lasting = || {
        m.regions
            .iter()
            .filter(|r| !matches!(r.kind, Kind::InitText | Kind::InitRodata | Kind::InitData))
    };
    ModuleState {
        name: m.name.clone(),
        size: lasting().fold(0u64, |a, r| a.saturating_add(r.size)),
        text_size: lasting()
            .filter(|r| r.kind.is_text())
            .fold(0u64, |a, r| a.saturating_add(r.size)),
        base: m.base,
        taints: m.taints,
    }
}

/// Taint letters of a module with what each means, e.g. `OE (out-of-tree, unsigned)`.
pub(crate) fn taint_text(taints: u64) -> String {
    let letters = kvmaccess_linux::modules::module_taint_letters(taints);
    if letters.is_empty() {
        return "none".into();
    }
    let words: Vec<&str> = letters
        .chars()
        .map(|c| match c {
            'P' => "proprietary",
            'F' => "force-loaded",
            'C' => "staging",
            'O' => "out-of-tree",
            'E' => "unsigned",
            'K' => "livepatch",
            'X' => "auxiliary",
            'T' => "randstruct",
            'N' => "test",
            _ => "?",
        })
        .collect();
    format!("{letters} ({})", words.join(", "))
}

/// A loadable module whose `struct module` is not on the list but in another view: in the
/// kset (sysfs), or, when it removed its kobject as well, in the module address tree.
pub(crate) struct Hidden {
    /// Its `struct module`.
    pub address: u64,
    /// Its sysfs kobject, when it kept one.
    pub kobject: Option<ModuleKobject>,
    /// The module itself, when its `struct module` could be read.
    pub module: Option<Module>,
}

impl Hidden {
    fn name(&self) -> String {
        match (&self.module, &self.kobject) {
            (Some(m), _) if !m.name.is_empty() => m.name.clone(),
            (_, Some(k)) if !k.name.is_empty() => k.name.clone(),
            _ => format!("struct module at {:#x}", self.address),
        }
    }
}

/// The module list, and the loadable modules that another view holds but the list does not:
/// the kset, then the module address tree. A candidate is confirmed by reading the list (and
/// the tree) again, so that a module loaded or unloaded between the reads is not reported.
pub(crate) fn views(
    kernel: &Kernel<'_>,
    off: &ModuleOffsets,
) -> Result<(Vec<Module>, Vec<Hidden>)> {
    let listed = kernel.modules(off)?;
    let kset = kernel.module_kset_entries(off)?;
    let tree = kernel.modules_from_tree(off)?;
    let on_list: HashSet<u64> = listed.iter().map(|m| m.address).collect();
    let mut candidates: Vec<(u64, Option<u64>)> = kset
        .into_iter()
        .filter_map(|e| e.module.map(|m| (m, e.kobject)))
        .filter(|(m, _)| !on_list.contains(m))
        .map(|(m, kobject)| (m, Some(kobject)))
        .collect();
    let in_kset: HashSet<u64> = candidates.iter().map(|(m, _)| *m).collect();
    candidates.extend(
        tree.iter()
            .filter(|m| !on_list.contains(m) && !in_kset.contains(m))
            .map(|&m| (m, None)),
    );
    if candidates.is_empty() {
        return Ok((listed, Vec::new()));
    }
    // The kernel links a module into the list and the tree together, and unlinks it from
    // both together after its kobject is gone: one that is in neither list read, and still
    // in the tree (when the tree is all that shows it), is hidden.
    let again: HashSet<u64> = kernel.modules(off)?.iter().map(|m| m.address).collect();
    let tree_again: HashSet<u64> = if candidates.iter().any(|(_, k)| k.is_none()) {
        kernel.modules_from_tree(off)?.into_iter().collect()
    } else {
        HashSet::new()
    };
    candidates.retain(|(m, k)| !again.contains(m) && (k.is_some() || tree_again.contains(m)));
    let hidden = candidates
        .into_iter()
        .map(|(address, kobject)| Hidden {
            address,
            // A name that cannot be read does not keep the module from being reported: it is
            // then named by its `struct module` (what a rootkit would rather prevent).
            kobject: kobject.map(|kobject| ModuleKobject {
                kobject,
                name: kernel.kobject_name(off, kobject).unwrap_or_default(),
                module: Some(address),
            }),
            module: kernel.module_at(off, address).ok(),
        })
        .collect();
    Ok((listed, hidden))
}

fn hidden_finding(ctx: &Context<'_, '_>, h: &Hidden) -> Finding {
    let name = h.name();
    let mut f = ctx.finding(
        "modules",
        Severity::Critical,
        "hidden-module",
        "module list",
        name.clone(),
    );
    f.expected = "on the module list (lsmod, /proc/modules)".into();
    let (seen_in, still) = match h.kobject {
        Some(_) => (
            "only in /sys/module (module_kset)",
            "still registered in sysfs",
        ),
        None => (
            "only in the module address tree (mod_tree), not in /sys/module either",
            "and from sysfs; still in the kernel's module address tree",
        ),
    };
    f.actual = format!(
        "{seen_in}, struct module at {:#x}{}",
        h.address,
        h.module
            .as_ref()
            .map(|m| format!(
                ", {} at {:#x}, size {:#x}, taints {}",
                m.proc_state(),
                m.base,
                m.size,
                taint_text(m.taints)
            ))
            .unwrap_or_default()
    );
    f.owner = Some(format!("module {name}"));
    f.explanation = format!(
        "module {name} is hidden from the module list ({still}): lsmod and /proc/modules do \
         not show it, which only a rootkit does"
    );
    f
}

impl Check for ModulesCheck {
    fn id(&self) -> &'static str {
        "modules"
    }

    fn description(&self) -> &'static str {
        DESCRIPTION
    }

    fn capture(&self, ctx: &Context<'_, '_>, _blobs: &mut Blobs) -> Result<serde_json::Value> {
        let off = self
            .offsets
            .get(ctx, |t| Ok(ModuleOffsets::from_types(t)?))?;
        // The kset is read too, so that a baseline cannot be taken where the views are
        // unreadable; hidden modules are not recorded: they are reported on every pass.
        let (listed, _) = views(ctx.kernel, &off)?;
        let state = ModulesState {
            modules: listed.iter().map(state_of).collect(),
        };
        super::to_value("modules", &state)
    }

    fn verify(&self, ctx: &Context<'_, '_>, baseline: CheckBaseline<'_>) -> Result<Vec<Finding>> {
        let state = self.parsed.get("modules", &baseline)?;
        let off = self
            .offsets
            .get(ctx, |t| Ok(ModuleOffsets::from_types(t)?))?;
        let (listed, hidden) = views(ctx.kernel, &off)?;
        let mut out: Vec<Finding> = hidden.iter().map(|h| hidden_finding(ctx, h)).collect();

        let was: BTreeMap<&str, &ModuleState> =
            state.modules.iter().map(|m| (m.name.as_str(), m)).collect();
        // A module still loading (its init sections counted in its size) or going away is in
        // transit; it is compared once it is live.
        let now: BTreeMap<&str, ModuleState> = listed
            .iter()
            .filter(|m| m.proc_state() == "Live")
            .map(|m| (m.name.as_str(), state_of(m)))
            .collect();
        // A new slide means a reboot: every module moved, which says nothing.
        let same_boot = ctx.kernel.layout().kaslr_offset == baseline.baseline.kaslr_offset;
        for (name, m) in &now {
            let Some(old) = was.get(name) else {
                let mut f = ctx.finding(
                    "modules",
                    Severity::Info,
                    "module-loaded",
                    "module list",
                    *name,
                );
                f.expected = "not loaded".into();
                f.actual = format!(
                    "loaded at {:#x}, size {:#x}, taints {}",
                    m.base,
                    m.size,
                    taint_text(m.taints)
                );
                f.owner = Some(format!("module {name}"));
                f.explanation = format!(
                    "module {name} was loaded since the baseline (taints {})",
                    taint_text(m.taints)
                );
                out.push(f);
                continue;
            };
            if old.size != m.size || old.text_size != m.text_size {
                let mut f = ctx.finding(
                    "modules",
                    Severity::Low,
                    "module-changed",
                    "module list",
                    *name,
                );
                f.expected = format!("size {:#x}, text {:#x}", old.size, old.text_size);
                f.actual = format!("size {:#x}, text {:#x}", m.size, m.text_size);
                f.owner = Some(format!("module {name}"));
                f.explanation = format!(
                    "module {name} has another size than at the baseline: another build of it, \
                     or another module under its name, was loaded"
                );
                out.push(f);
            } else if same_boot && old.base != m.base {
                let mut f = ctx.finding(
                    "modules",
                    Severity::Info,
                    "module-reloaded",
                    "module list",
                    *name,
                );
                f.expected = format!("at {:#x}", old.base);
                f.actual = format!("at {:#x}", m.base);
                f.owner = Some(format!("module {name}"));
                f.explanation =
                    format!("module {name} was unloaded and loaded again since the baseline");
                out.push(f);
            }
        }
        let hidden_names: HashSet<String> = hidden.iter().map(Hidden::name).collect();
        for (name, old) in &was {
            // A hidden module is reported as such, not as unloaded.
            if now.contains_key(name) || hidden_names.contains(*name) {
                continue;
            }
            let mut f = ctx.finding(
                "modules",
                Severity::Info,
                "module-unloaded",
                "module list",
                *name,
            );
            f.expected = format!("loaded, size {:#x}", old.size);
            f.actual = "not on the module list".into();
            f.explanation = format!("module {name} was unloaded since the baseline");
            out.push(f);
        }
        Ok(out)
    }
}
