//! Checks, the registry users enable and disable them with, and the passes that run them.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use std::sync::OnceLock;

use kvmaccess_core::{Registers, VcpuState};
use kvmaccess_linux::{Kernel, KernelTypes};
use serde::Serialize;

use crate::baseline::{Baseline, Blobs};
use crate::checks::{
    CrCheck, FtraceCheck, GdtCheck, IdtCheck, ModulesCheck, SyscallCheck, TasksCheck, TextCheck,
};
use crate::error::{Error, Result};
use crate::finding::{Finding, Severity};
use crate::location::{AddressMap, ModuleSpan};

/// Everything one pass needs, gathered once: the kernel, every vCPU's registers (one backend
/// round trip for all of them), the address map, and the pass's timestamp.
pub struct Context<'k, 'm> {
    /// The kernel being checked.
    pub kernel: &'k Kernel<'m>,
    /// Registers of every vCPU, indexed by position (each carries its own `vcpu` number).
    pub vcpus: Vec<Registers>,
    /// When the pass started; every finding of the pass carries it.
    pub time: SystemTime,
    /// Where the kernel image and modules are in this boot.
    pub map: AddressMap<'k>,
    /// The kernel's BTF when the caller has it ([`Context::with_types`]).
    types: Option<&'k KernelTypes>,
    /// BTF read from the guest by the first check of this pass that needed it (and the error,
    /// so that a kernel without BTF is asked once per pass, not once per check).
    loaded_types: OnceLock<std::result::Result<KernelTypes, String>>,
}

impl fmt::Debug for Context<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("kernel", &self.kernel.release())
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl<'k, 'm> Context<'k, 'm> {
    /// A context from registers already fetched.
    pub fn new(kernel: &'k Kernel<'m>, vcpus: Vec<Registers>) -> Result<Self> {
        if vcpus.is_empty() {
            return Err(Error::NoVcpus);
        }
        Ok(Self {
            kernel,
            vcpus,
            time: SystemTime::now(),
            map: AddressMap::from_kernel(kernel)?,
            types: None,
            loaded_types: OnceLock::new(),
        })
    }

    /// A context fetching the registers of all vCPUs in one call.
    pub fn from_backend(kernel: &'k Kernel<'m>, backend: &dyn VcpuState) -> Result<Self> {
        Self::new(kernel, backend.all_registers()?)
    }

    /// Tell the checks where modules are (from the module list), so that module addresses get
    /// module owners and module-relative baseline locations.
    pub fn with_modules(mut self, modules: Vec<ModuleSpan>) -> Self {
        self.map.set_modules(modules);
        self
    }

    /// Give the checks the kernel's type information (BTF) the caller already loaded
    /// (`kernel.load_types()` or a vmlinux's `.BTF`). Without it, the first check of a pass that
    /// needs offsets reads the BTF from the guest itself (a few MiB, tens of milliseconds);
    /// checks keep the offsets they derive for later passes, so a monitor pays that once.
    pub fn with_types(mut self, types: &'k KernelTypes) -> Self {
        self.types = Some(types);
        self
    }

    /// The kernel's type information: the caller's, or read from the guest once per pass.
    pub fn types(&self) -> Result<&KernelTypes> {
        if let Some(types) = self.types {
            return Ok(types);
        }
        self.loaded_types
            .get_or_init(|| self.kernel.load_types().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|reason| Error::NoTypes(reason.clone()))
    }

    /// A finding stamped with this pass's time; fields the caller fills.
    pub(crate) fn finding(
        &self,
        check: &'static str,
        severity: Severity,
        class: &'static str,
        object: impl Into<String>,
        entry: impl Into<String>,
    ) -> Finding {
        Finding {
            check,
            severity,
            class,
            object: object.into(),
            entry: entry.into(),
            expected: String::new(),
            actual: String::new(),
            owner: None,
            vcpu: None,
            time: self.time,
            explanation: String::new(),
            target: crate::finding::Target::None,
        }
    }
}

/// A check's slice of the baseline.
#[derive(Clone, Copy, Debug)]
pub struct CheckBaseline<'b> {
    /// The state the check captured (its own JSON).
    pub state: &'b serde_json::Value,
    /// The whole baseline (for blobs and the KASLR slide at capture).
    pub baseline: &'b Baseline,
}

/// One integrity check.
///
/// `capture` records the state worth comparing (addresses as [`crate::Location`]s, large byte
/// ranges as blobs); `verify` compares the guest now with it. A check may keep caches across
/// passes (the text check remembers classified pages), so a monitor keeps one [`CheckSet`] for
/// its lifetime.
pub trait Check: Send + Sync + fmt::Debug {
    /// Stable id users enable and disable the check with.
    fn id(&self) -> &'static str;
    /// One line on what it checks.
    fn description(&self) -> &'static str;
    /// Capture the state; blobs go to `blobs`.
    fn capture(&self, ctx: &Context<'_, '_>, blobs: &mut Blobs) -> Result<serde_json::Value>;
    /// Compare the guest now with the captured state.
    fn verify(&self, ctx: &Context<'_, '_>, baseline: CheckBaseline<'_>) -> Result<Vec<Finding>>;
}

/// Id and description of a registered check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CheckInfo {
    /// The id.
    pub id: &'static str,
    /// What it checks.
    pub description: &'static str,
    /// Whether [`CheckSet::default`] enables it.
    pub default: bool,
}

/// Every check this crate has, in the order passes run them.
pub const CHECKS: &[CheckInfo] = &[
    CheckInfo {
        id: "cr",
        description: "CR0.WP, CR4.SMEP/SMAP/UMIP, EFER.NXE and the paging mode of every vCPU",
        default: true,
    },
    CheckInfo {
        id: "gdt",
        description: "every vCPU's GDT: descriptors, DPLs, call gates, GDTR base and limit",
        default: true,
    },
    CheckInfo {
        id: "idt",
        description: "every vCPU's IDT: all 256 gates (handler, type, DPL, IST, selector), IDTR",
        default: true,
    },
    CheckInfo {
        id: "syscalls",
        description: "system-call tables entry by entry, and the dispatcher code \
                      (entry_SYSCALL_64, do_syscall_64, x64_sys_call)",
        default: true,
    },
    CheckInfo {
        id: "text",
        description: "kernel text, rodata and exception table against the baseline copy, \
                      with every change classified",
        default: true,
    },
    CheckInfo {
        id: "modules",
        description: crate::checks::modules::DESCRIPTION,
        default: true,
    },
    CheckInfo {
        id: "tasks",
        description: crate::checks::tasks::DESCRIPTION,
        default: true,
    },
    CheckInfo {
        id: "ftrace",
        description: crate::checks::ftrace::DESCRIPTION,
        default: true,
    },
];

fn build(id: &str) -> Option<Box<dyn Check>> {
    Some(match id {
        "cr" => Box::new(CrCheck::default()),
        "gdt" => Box::new(GdtCheck::default()),
        "idt" => Box::new(IdtCheck::default()),
        "syscalls" => Box::new(SyscallCheck::default()),
        "text" => Box::new(TextCheck::default()),
        "modules" => Box::new(ModulesCheck::default()),
        "tasks" => Box::new(TasksCheck::default()),
        "ftrace" => Box::new(FtraceCheck::default()),
        _ => return None,
    })
}

/// The enabled checks.
#[derive(Debug)]
pub struct CheckSet {
    checks: Vec<Box<dyn Check>>,
    /// Whether each check's CPU time is measured. Off for a long-running monitor: the thread
    /// clock is a system call, two per check, and in a VM a system call is dear next to
    /// comparing a few kilobytes.
    per_check_cpu: bool,
}

impl Default for CheckSet {
    /// Every check marked default in [`CHECKS`].
    fn default() -> Self {
        Self {
            checks: CHECKS
                .iter()
                .filter(|c| c.default)
                .filter_map(|c| build(c.id))
                .collect(),
            per_check_cpu: true,
        }
    }
}

impl CheckSet {
    /// Exactly these checks (in registry order), or an error naming an unknown id.
    pub fn from_ids<S: AsRef<str>>(ids: &[S]) -> Result<Self> {
        for id in ids {
            Self::known(id.as_ref())?;
        }
        Ok(Self {
            checks: CHECKS
                .iter()
                .filter(|c| ids.iter().any(|i| i.as_ref() == c.id))
                .filter_map(|c| build(c.id))
                .collect(),
            per_check_cpu: true,
        })
    }

    /// The default set without these checks.
    pub fn without<S: AsRef<str>>(ids: &[S]) -> Result<Self> {
        for id in ids {
            Self::known(id.as_ref())?;
        }
        let mut set = Self::default();
        set.checks
            .retain(|c| !ids.iter().any(|i| i.as_ref() == c.id()));
        Ok(set)
    }

    /// Bound the text check to `bytes` per pass, round-robin (for a monitor running every
    /// second: full coverage every `ceil(total / bytes)` passes at a fraction of the cost).
    pub fn with_text_budget(mut self, bytes: u64) -> Self {
        for check in &mut self.checks {
            if check.id() == "text" {
                *check = Box::new(TextCheck::with_budget(bytes));
            }
        }
        self
    }

    /// Stop measuring each check's CPU time ([`CheckRun::cpu`] is then `None`); the pass's
    /// total is still measured.
    pub fn without_per_check_cpu(mut self) -> Self {
        self.per_check_cpu = false;
        self
    }

    /// Add a check of your own (a module-list check from another crate, say).
    pub fn push(&mut self, check: Box<dyn Check>) {
        self.checks.push(check);
    }

    fn known(id: &str) -> Result<()> {
        if CHECKS.iter().any(|c| c.id == id) {
            return Ok(());
        }
        Err(Error::UnknownCheck {
            id: id.to_string(),
            known: CHECKS.iter().map(|c| c.id).collect::<Vec<_>>().join(", "),
        })
    }

    /// Ids of the enabled checks.
    pub fn ids(&self) -> Vec<&'static str> {
        self.checks.iter().map(|c| c.id()).collect()
    }

    /// The enabled checks.
    pub fn checks(&self) -> &[Box<dyn Check>] {
        &self.checks
    }
}

/// Take a baseline with every enabled check. A check that fails makes the whole capture fail:
/// a baseline with holes would make later passes report errors forever.
pub fn capture_baseline(ctx: &Context<'_, '_>, checks: &CheckSet) -> Result<Baseline> {
    let mut baseline = Baseline::new(ctx.kernel, ctx.vcpus.len(), ctx.time);
    let mut blobs = Blobs::default();
    for check in checks.checks() {
        let state = check.capture(ctx, &mut blobs)?;
        baseline.checks.insert(check.id().to_string(), state);
    }
    baseline.set_blobs(blobs);
    Ok(baseline)
}

/// How one check went in a pass.
#[derive(Clone, Debug, Serialize)]
pub struct CheckRun {
    /// Check id.
    pub id: &'static str,
    /// Wall time.
    pub wall: Duration,
    /// CPU time of this thread; `None` when the set does not measure it per check
    /// ([`CheckSet::without_per_check_cpu`]) or the thread clock cannot be read.
    pub cpu: Option<Duration>,
    /// Findings it produced.
    pub findings: usize,
    /// Why it could not finish, if it could not.
    pub error: Option<String>,
}

/// The result of one pass.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// When the pass started (RFC 3339).
    pub time: String,
    /// Every finding, in check order.
    pub findings: Vec<Finding>,
    /// Per-check timing and errors.
    pub checks: Vec<CheckRun>,
    /// Wall time of the whole pass (checks only; the register fetch is the caller's).
    pub wall: Duration,
    /// CPU time of the whole pass.
    pub cpu: Duration,
}

impl Report {
    /// The worst severity found, if anything was found.
    pub fn max_severity(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }

    /// Findings that are not legitimate state changes.
    pub fn alarms(&self) -> impl Iterator<Item = &Finding> + '_ {
        self.findings.iter().filter(|f| !f.is_info())
    }

    /// Checks that failed, with their errors.
    pub fn errors(&self) -> impl Iterator<Item = (&'static str, &str)> + '_ {
        self.checks
            .iter()
            .filter_map(|c| c.error.as_deref().map(|e| (c.id, e)))
    }
}

fn thread_cpu() -> Option<cpu_time::ThreadTime> {
    cpu_time::ThreadTime::try_now().ok()
}

/// Run every enabled check against the baseline. The baseline must come from the same kernel
/// build ([`Baseline::check_compatible`]); one check failing is recorded in its [`CheckRun`] and
/// does not stop the others.
pub fn run_checks(ctx: &Context<'_, '_>, baseline: &Baseline, checks: &CheckSet) -> Result<Report> {
    baseline.check_compatible(ctx.kernel)?;
    let pass_wall = Instant::now();
    let pass_cpu = thread_cpu();
    let mut findings = Vec::new();
    let mut runs = Vec::new();
    for check in checks.checks() {
        let wall = Instant::now();
        let cpu = checks.per_check_cpu.then(thread_cpu).flatten();
        let result = match baseline.checks.get(check.id()) {
            Some(state) => check.verify(ctx, CheckBaseline { state, baseline }),
            None => Err(Error::NotInBaseline(check.id().to_string())),
        };
        let cpu = cpu.map(|c| c.elapsed());
        let wall = wall.elapsed();
        let (count, error) = match result {
            Ok(mut found) => {
                let n = found.len();
                findings.append(&mut found);
                (n, None)
            }
            Err(e) => (0, Some(e.to_string())),
        };
        runs.push(CheckRun {
            id: check.id(),
            wall,
            cpu,
            findings: count,
            error,
        });
    }
    Ok(Report {
        time: crate::time::rfc3339(ctx.time),
        findings,
        checks: runs,
        wall: pass_wall.elapsed(),
        cpu: pass_cpu.map(|c| c.elapsed()).unwrap_or_default(),
    })
}
