use serde::{Deserialize, Serialize};

/// One segment register as the CPU caches it: selector plus the hidden base, limit and
/// attribute bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Visible selector.
    pub selector: u16,
    /// Cached base address.
    #[serde(with = "crate::hex")]
    pub base: u64,
    /// Cached limit, in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Attribute bits in the layout of the descriptor's high dword (type at bit 8, S at 12, DPL at
    /// 13-14, P at 15, AVL 20, L 21, D/B 22, G 23), as QEMU and KVM keep them.
    pub flags: u32,
}

impl Segment {
    /// Descriptor privilege level.
    pub fn dpl(&self) -> u8 {
        ((self.flags >> 13) & 3) as u8
    }

    /// 64-bit code segment (L bit).
    pub fn long_mode(&self) -> bool {
        self.flags & (1 << 21) != 0
    }
}

/// Base and limit of the GDT or IDT, as held in GDTR/IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Linear address of the table.
    #[serde(with = "crate::hex")]
    pub base: u64,
    /// Limit: the table's size in bytes minus one.
    pub limit: u32,
}

/// A snapshot of one vCPU's architectural state.
///
/// Fields a backend cannot supply are `None` rather than zero, so that callers never mistake a
/// missing value for a cleared bit (QEMU's dump notes, for instance, have no EFER).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registers {
    /// vCPU index, from 0.
    pub vcpu: usize,
    #[serde(with = "crate::hex")]
    pub rax: u64,
    #[serde(with = "crate::hex")]
    pub rbx: u64,
    #[serde(with = "crate::hex")]
    pub rcx: u64,
    #[serde(with = "crate::hex")]
    pub rdx: u64,
    #[serde(with = "crate::hex")]
    pub rsi: u64,
    #[serde(with = "crate::hex")]
    pub rdi: u64,
    #[serde(with = "crate::hex")]
    pub rbp: u64,
    #[serde(with = "crate::hex")]
    pub rsp: u64,
    #[serde(with = "crate::hex")]
    pub r8: u64,
    #[serde(with = "crate::hex")]
    pub r9: u64,
    #[serde(with = "crate::hex")]
    pub r10: u64,
    #[serde(with = "crate::hex")]
    pub r11: u64,
    #[serde(with = "crate::hex")]
    pub r12: u64,
    #[serde(with = "crate::hex")]
    pub r13: u64,
    #[serde(with = "crate::hex")]
    pub r14: u64,
    #[serde(with = "crate::hex")]
    pub r15: u64,
    #[serde(with = "crate::hex")]
    pub rip: u64,
    #[serde(with = "crate::hex")]
    pub rflags: u64,
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    #[serde(with = "crate::hex")]
    pub cr0: u64,
    #[serde(with = "crate::hex")]
    pub cr2: u64,
    #[serde(with = "crate::hex")]
    pub cr3: u64,
    #[serde(with = "crate::hex")]
    pub cr4: u64,
    /// EFER MSR, when the backend reports it.
    #[serde(with = "crate::hex::option")]
    pub efer: Option<u64>,
    /// IA32_KERNEL_GS_BASE MSR, when the backend reports it.
    #[serde(with = "crate::hex::option")]
    pub kernel_gs_base: Option<u64>,
}
