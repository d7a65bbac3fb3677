use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// How bad a finding is.
///
/// `Info` is reserved for state changes the kernel makes itself (a static key switched, ftrace
/// turned on): a monitor shows them but never alarms on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// A legitimate change made by the kernel itself.
    Info,
    /// Unusual, probably harmless.
    Low,
    /// Suspicious; worth a look.
    Medium,
    /// A protection weakened or kernel state changed in a way the kernel does not do itself.
    High,
    /// Control flow hijacked or a core protection switched off.
    Critical,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        })
    }
}

/// The exact object a finding is about, machine-readable, so that [`crate::restore_plan`] can
/// find what to write back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Target {
    /// One entry of a system-call table.
    SyscallEntry {
        /// Table symbol (`sys_call_table`, `ia32_sys_call_table`, `x32_sys_call_table`).
        table: String,
        /// System-call number (index into the table).
        number: u32,
    },
    /// One gate of the IDT a vCPU uses.
    IdtGate {
        /// The vCPU whose IDTR located the table.
        vcpu: usize,
        /// Interrupt vector.
        vector: u8,
    },
    /// One descriptor of a vCPU's GDT.
    GdtDescriptor {
        /// The vCPU.
        vcpu: usize,
        /// Slot index (selector / 8).
        index: u16,
    },
    /// A descriptor-table register (GDTR, IDTR) of a vCPU.
    TableRegister {
        /// The vCPU.
        vcpu: usize,
        /// `GDTR` or `IDTR`.
        register: String,
    },
    /// A control-register bit of a vCPU.
    ControlBit {
        /// The vCPU.
        vcpu: usize,
        /// `CR0.WP`, `CR4.SMEP`, ...
        bit: String,
    },
    /// A range of kernel memory compared byte for byte.
    Bytes {
        /// Kernel virtual address of the first changed byte in this boot.
        #[serde(with = "kvmaccess_core::hex")]
        gva: u64,
        /// Number of bytes.
        len: u64,
        /// Region name in the baseline (`kernel text`, `rodata`, `x64_sys_call`, ...).
        region: String,
        /// Offset of `gva` from the start of that region.
        #[serde(with = "kvmaccess_core::hex")]
        region_offset: u64,
    },
    /// No single object (a summary of many sites).
    None,
}

/// One difference between the guest and its baseline (or an absolute policy), explained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Id of the check that found it (`gdt`, `idt`, `cr`, `syscalls`, `text`, ...).
    pub check: &'static str,
    /// How bad it is.
    pub severity: Severity,
    /// Classification of the change (`jump-label`, `ftrace`, `static-call`, `kprobe`,
    /// `kaslr-relocation`, `inline-hook`, `pointer-hook`, `policy`, ...).
    pub class: &'static str,
    /// What object: `IDT`, `sys_call_table`, `CR0.WP`, `kernel text`, ...
    pub object: String,
    /// Which entry of it: `vector 0x0e`, `syscall 39 (getpid)`, `vCPU 1`, `symbol+offset`.
    pub entry: String,
    /// The baseline value (or what the policy requires).
    pub expected: String,
    /// The value now.
    pub actual: String,
    /// Who owns the new target (`kernel text (x64_sys_call+0x10)`, `module evil`, `unowned
    /// memory`), when the finding is about a pointer or a jump.
    pub owner: Option<String>,
    /// The vCPU, for per-vCPU state.
    pub vcpu: Option<usize>,
    /// When the pass that found it started.
    #[serde(with = "crate::time::serde_time")]
    pub time: SystemTime,
    /// One sentence a person understands.
    pub explanation: String,
    /// Machine-readable object, for restore.
    pub target: Target,
}

impl Finding {
    /// Whether this is a legitimate state change rather than an alarm.
    pub fn is_info(&self) -> bool {
        self.severity == Severity::Info
    }
}

impl fmt::Display for Finding {
    /// `[critical] idt: IDT vector 0x0e (vCPU 0): expected asm_exc_page_fault, now 0x… (owner
    /// unowned memory) — explanation`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}: {}", self.severity, self.check, self.object)?;
        if !self.entry.is_empty() {
            write!(f, " {}", self.entry)?;
        }
        if let Some(vcpu) = self.vcpu {
            if !self.entry.contains("vCPU") {
                write!(f, " (vCPU {vcpu})")?;
            }
        }
        write!(f, ": expected {}, now {}", self.expected, self.actual)?;
        if let Some(owner) = &self.owner {
            write!(f, " (owner: {owner})")?;
        }
        write!(f, " [{}] — {}", self.class, self.explanation)
    }
}
