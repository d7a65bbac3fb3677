//! Control registers, EFER, and the paging mode they select.

use std::fmt;

use bitflags::bitflags;
use kvmaccess_core::{Gpa, Registers};
use serde::{Deserialize, Serialize};

bitflags! {
    /// CR0. Unknown bits are kept, so a value round-trips through this type unchanged.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    pub struct Cr0: u64 {
        /// Protection enable.
        const PE = 1 << 0;
        /// Monitor coprocessor.
        const MP = 1 << 1;
        /// x87 emulation.
        const EM = 1 << 2;
        /// Task switched.
        const TS = 1 << 3;
        /// Extension type (hard-wired to 1 on modern CPUs).
        const ET = 1 << 4;
        /// Native x87 error reporting.
        const NE = 1 << 5;
        /// Write protect: the kernel cannot write read-only pages.
        const WP = 1 << 16;
        /// Alignment mask.
        const AM = 1 << 18;
        /// Not write-through.
        const NW = 1 << 29;
        /// Cache disable.
        const CD = 1 << 30;
        /// Paging.
        const PG = 1 << 31;
    }
}

bitflags! {
    /// CR4. Unknown bits are kept.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    pub struct Cr4: u64 {
        /// Virtual-8086 mode extensions.
        const VME = 1 << 0;
        /// Protected-mode virtual interrupts.
        const PVI = 1 << 1;
        /// RDTSC restricted to ring 0.
        const TSD = 1 << 2;
        /// Debugging extensions.
        const DE = 1 << 3;
        /// Page size extensions: 4 MiB pages in 32-bit paging.
        const PSE = 1 << 4;
        /// Physical address extension (required for long mode).
        const PAE = 1 << 5;
        /// Machine-check enable.
        const MCE = 1 << 6;
        /// Global pages.
        const PGE = 1 << 7;
        /// RDPMC allowed outside ring 0.
        const PCE = 1 << 8;
        /// OS supports FXSAVE/FXRSTOR.
        const OSFXSR = 1 << 9;
        /// OS handles unmasked SIMD exceptions.
        const OSXMMEXCPT = 1 << 10;
        /// User-mode instruction prevention (SGDT, SIDT... fault in ring 3).
        const UMIP = 1 << 11;
        /// 57-bit linear addresses (5-level paging).
        const LA57 = 1 << 12;
        /// VMX enable.
        const VMXE = 1 << 13;
        /// SMX enable.
        const SMXE = 1 << 14;
        /// RDFSBASE and friends allowed.
        const FSGSBASE = 1 << 16;
        /// Process-context identifiers in CR3.
        const PCIDE = 1 << 17;
        /// XSAVE enabled.
        const OSXSAVE = 1 << 18;
        /// Key Locker.
        const KL = 1 << 19;
        /// Supervisor-mode execution prevention.
        const SMEP = 1 << 20;
        /// Supervisor-mode access prevention.
        const SMAP = 1 << 21;
        /// Protection keys for user pages.
        const PKE = 1 << 22;
        /// Control-flow enforcement technology.
        const CET = 1 << 23;
        /// Protection keys for supervisor pages.
        const PKS = 1 << 24;
        /// User interrupts.
        const UINTR = 1 << 25;
        /// Linear-address masking for supervisor pointers.
        const LAM_SUP = 1 << 28;
    }
}

bitflags! {
    /// The IA32_EFER MSR. Unknown bits are kept.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    pub struct Efer: u64 {
        /// SYSCALL/SYSRET enable.
        const SCE = 1 << 0;
        /// Long mode enable.
        const LME = 1 << 8;
        /// Long mode active.
        const LMA = 1 << 10;
        /// No-execute enable: makes the XD bit of page-table entries meaningful.
        const NXE = 1 << 11;
        /// Secure virtual machine enable (AMD).
        const SVME = 1 << 12;
        /// Long-mode segment limit enable (AMD).
        const LMSLE = 1 << 13;
        /// Fast FXSAVE/FXRSTOR (AMD).
        const FFXSR = 1 << 14;
        /// Translation cache extension (AMD).
        const TCE = 1 << 15;
    }
}

/// The paging mode of a vCPU, which decides how the page walker reads the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PagingMode {
    /// CR0.PG = 0: linear addresses are physical addresses.
    Disabled,
    /// 32-bit paging (CR4.PAE = 0): two levels of 4-byte entries.
    Bits32,
    /// PAE paging: a 4-entry PDPT, then two levels of 8-byte entries.
    Pae,
    /// IA-32e 4-level paging: 48-bit linear addresses.
    Level4,
    /// IA-32e 5-level paging (CR4.LA57): 57-bit linear addresses.
    Level5,
}

/// How [`PagingMode::detect`] decided between PAE and long mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeEvidence {
    /// CR0/CR4 alone decided (paging off, or 32-bit paging).
    ControlRegisters,
    /// EFER was known and its LMA bit decided.
    Efer,
    /// EFER unknown; CS has the L bit, so the vCPU runs 64-bit code.
    CsLongBit,
    /// EFER unknown and CS is not 64-bit, but GDTR or IDTR lies above 4 GiB, which no PAE
    /// kernel can set up: a 64-bit kernel interrupted in 32-bit (compatibility-mode) code.
    TableAbove4G,
    /// EFER unknown and nothing shows long mode: assumed PAE. Wrong for a 64-bit kernel whose
    /// tables sit below 4 GiB while it runs compatibility-mode code.
    Assumed,
}

/// The outcome of [`PagingMode::detect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModeDetection {
    /// The paging mode.
    pub mode: PagingMode,
    /// What decided it.
    pub evidence: ModeEvidence,
}

impl PagingMode {
    /// The paging mode these control registers select. Long mode is taken from EFER.LMA (the
    /// mode the CPU is in), not EFER.LME (the mode it was asked to enter).
    pub fn from_control(cr0: Cr0, cr4: Cr4, efer: Efer) -> Self {
        if !cr0.contains(Cr0::PG) {
            PagingMode::Disabled
        } else if !cr4.contains(Cr4::PAE) {
            PagingMode::Bits32
        } else if !efer.contains(Efer::LMA) {
            PagingMode::Pae
        } else if cr4.contains(Cr4::LA57) {
            PagingMode::Level5
        } else {
            PagingMode::Level4
        }
    }

    /// The paging mode of a register snapshot; see [`PagingMode::detect`].
    pub fn from_registers(regs: &Registers) -> Self {
        Self::detect(regs).mode
    }

    /// The paging mode of a register snapshot, and what it was decided from.
    ///
    /// When the backend reports EFER, its LMA bit decides. QEMU's ELF dump notes carry no EFER,
    /// so then long mode is inferred: CR0.PG and CR4.PAE must be set (long mode requires both)
    /// and either CS is a 64-bit code segment (L bit) or GDTR/IDTR holds an address above 4 GiB.
    /// Otherwise PAE is assumed, which misreads a 64-bit kernel that keeps its descriptor tables
    /// below 4 GiB and was stopped in 32-bit user code.
    pub fn detect(regs: &Registers) -> ModeDetection {
        let cr0 = Cr0::from_bits_retain(regs.cr0);
        let cr4 = Cr4::from_bits_retain(regs.cr4);
        if !cr0.contains(Cr0::PG) || !cr4.contains(Cr4::PAE) {
            let mode = Self::from_control(cr0, cr4, Efer::empty());
            return ModeDetection {
                mode,
                evidence: ModeEvidence::ControlRegisters,
            };
        }
        let long = |evidence| ModeDetection {
            mode: Self::from_control(cr0, cr4, Efer::LMA),
            evidence,
        };
        if let Some(efer) = regs.efer {
            return ModeDetection {
                mode: Self::from_control(cr0, cr4, Efer::from_bits_retain(efer)),
                evidence: ModeEvidence::Efer,
            };
        }
        if regs.cs.long_mode() {
            return long(ModeEvidence::CsLongBit);
        }
        let above_4g = |base: u64| base > u64::from(u32::MAX);
        if above_4g(regs.gdtr.base) || above_4g(regs.idtr.base) {
            return long(ModeEvidence::TableAbove4G);
        }
        ModeDetection {
            mode: PagingMode::Pae,
            evidence: ModeEvidence::Assumed,
        }
    }

    /// Whether this is one of the IA-32e (64-bit) modes.
    pub fn is_long_mode(self) -> bool {
        matches!(self, PagingMode::Level4 | PagingMode::Level5)
    }

    /// Number of page-table levels walked (0 when paging is disabled).
    pub fn levels(self) -> usize {
        match self {
            PagingMode::Disabled => 0,
            PagingMode::Bits32 => 2,
            PagingMode::Pae => 3,
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        }
    }

    /// Width of a linear address in bits.
    pub fn linear_address_bits(self) -> u32 {
        match self {
            PagingMode::Disabled | PagingMode::Bits32 | PagingMode::Pae => 32,
            PagingMode::Level4 => 48,
            PagingMode::Level5 => 57,
        }
    }

    /// Physical address of the top-level table that `cr3` selects in this mode (`None` when
    /// paging is disabled). 32-bit paging takes bits 31:12, PAE bits 31:5 (the PDPT is only
    /// 32-byte aligned), long mode bits 51:12 (PCID, LAM and cache-control bits dropped).
    pub fn root_table(self, cr3: u64) -> Option<Gpa> {
        match self {
            PagingMode::Disabled => None,
            PagingMode::Bits32 => Some(Gpa(cr3 & 0xffff_f000)),
            PagingMode::Pae => Some(Gpa(cr3 & 0xffff_ffe0)),
            PagingMode::Level4 | PagingMode::Level5 => Some(Gpa(cr3 & 0x000f_ffff_ffff_f000)),
        }
    }
}

impl fmt::Display for PagingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PagingMode::Disabled => "paging disabled",
            PagingMode::Bits32 => "32-bit",
            PagingMode::Pae => "PAE",
            PagingMode::Level4 => "4-level",
            PagingMode::Level5 => "5-level",
        })
    }
}

/// CR3 taken apart for one paging mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cr3 {
    /// The raw register.
    #[serde(with = "kvmaccess_core::hex")]
    pub raw: u64,
    /// The top-level table, see [`PagingMode::root_table`].
    pub root: Option<Gpa>,
    /// Process-context identifier (bits 11:0), present only in long mode with CR4.PCIDE.
    pub pcid: Option<u16>,
    /// Page-level write-through for the root table (not in PAE, nor with PCIDs).
    pub pwt: bool,
    /// Page-level cache disable for the root table (not in PAE, nor with PCIDs).
    pub pcd: bool,
    /// LAM_U57 (bit 61, long mode): user pointers carry metadata in bits 62:57.
    pub lam_u57: bool,
    /// LAM_U48 (bit 62, long mode): user pointers carry metadata in bits 62:48.
    pub lam_u48: bool,
}

impl Cr3 {
    /// Decode `raw` as the CPU would in `mode`, with CR4.PCIDE = `pcide`.
    pub fn decode(raw: u64, mode: PagingMode, pcide: bool) -> Self {
        let bit = |n: u32| raw & (1 << n) != 0;
        let long = mode.is_long_mode();
        let with_pcid = long && pcide;
        let cache_bits = matches!(mode, PagingMode::Bits32) || (long && !pcide);
        Self {
            raw,
            root: mode.root_table(raw),
            pcid: with_pcid.then(|| {
                // Masked to 12 bits, so the value always fits.
                u16::try_from(raw & 0xfff).unwrap_or(0)
            }),
            pwt: cache_bits && bit(3),
            pcd: cache_bits && bit(4),
            lam_u57: long && bit(61),
            lam_u48: long && bit(62),
        }
    }

    /// Decode CR3 of a register snapshot in its detected paging mode.
    pub fn from_registers(regs: &Registers) -> Self {
        let pcide = Cr4::from_bits_retain(regs.cr4).contains(Cr4::PCIDE);
        Self::decode(regs.cr3, PagingMode::from_registers(regs), pcide)
    }
}

/// A protection feature that a security reader checks first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SecurityFeature {
    /// Register and bit, e.g. `CR4.SMEP`.
    pub name: &'static str,
    /// Whether it is on; `None` when the register is unknown (EFER from QEMU dumps).
    pub enabled: Option<bool>,
    /// What it protects against when on.
    pub meaning: &'static str,
}

/// CR0, CR4 and EFER of one vCPU, for printing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ControlRegisters {
    /// CR0.
    pub cr0: Cr0,
    /// CR4.
    pub cr4: Cr4,
    /// EFER, when the backend reported it.
    pub efer: Option<Efer>,
}

impl ControlRegisters {
    /// The control registers of a snapshot.
    pub fn from_registers(regs: &Registers) -> Self {
        Self {
            cr0: Cr0::from_bits_retain(regs.cr0),
            cr4: Cr4::from_bits_retain(regs.cr4),
            efer: regs.efer.map(Efer::from_bits_retain),
        }
    }

    /// The state of WP, SMEP, SMAP, UMIP and NXE.
    pub fn security_features(&self) -> [SecurityFeature; 5] {
        [
            SecurityFeature {
                name: "CR0.WP",
                enabled: Some(self.cr0.contains(Cr0::WP)),
                meaning: "ring 0 cannot write read-only pages",
            },
            SecurityFeature {
                name: "CR4.SMEP",
                enabled: Some(self.cr4.contains(Cr4::SMEP)),
                meaning: "ring 0 cannot execute user pages",
            },
            SecurityFeature {
                name: "CR4.SMAP",
                enabled: Some(self.cr4.contains(Cr4::SMAP)),
                meaning: "ring 0 cannot touch user pages unless EFLAGS.AC is set",
            },
            SecurityFeature {
                name: "CR4.UMIP",
                enabled: Some(self.cr4.contains(Cr4::UMIP)),
                meaning: "user code cannot run SGDT/SIDT/SLDT/SMSW/STR",
            },
            SecurityFeature {
                name: "EFER.NXE",
                enabled: self.efer.map(|efer| efer.contains(Efer::NXE)),
                meaning: "pages marked execute-disable cannot be executed",
            },
        ]
    }
}

/// Write `NAME NAME ...` for the named set bits, then any unnamed set bits in hex.
fn write_flag_names<B>(f: &mut fmt::Formatter<'_>, flags: B) -> fmt::Result
where
    B: bitflags::Flags<Bits = u64>,
{
    let mut first = true;
    for (name, _) in flags.iter_names() {
        if !first {
            f.write_str(" ")?;
        }
        f.write_str(name)?;
        first = false;
    }
    let unnamed = flags.bits() & !B::all().bits();
    if unnamed != 0 {
        if !first {
            f.write_str(" ")?;
        }
        write!(f, "unnamed={unnamed:#x}")?;
    }
    Ok(())
}

impl fmt::Display for ControlRegisters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CR0  {:#018x} [", self.cr0.bits())?;
        write_flag_names(f, self.cr0)?;
        write!(f, "]\nCR4  {:#018x} [", self.cr4.bits())?;
        write_flag_names(f, self.cr4)?;
        match self.efer {
            Some(efer) => {
                write!(f, "]\nEFER {:#018x} [", efer.bits())?;
                write_flag_names(f, efer)?;
                f.write_str("]")?;
            }
            None => f.write_str("]\nEFER unknown")?,
        }
        f.write_str("\nprotections:")?;
        for feature in self.security_features() {
            let state = match feature.enabled {
                Some(true) => "on",
                Some(false) => "OFF",
                None => "unknown",
            };
            write!(f, " {}={}", feature.name, state)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmaccess_core::{DescriptorTable, Segment};

    fn long_mode_regs() -> Registers {
        Registers {
            cr0: 0x8005_0033,
            cr3: 0x1_2345_6000 | 0x18 | (1 << 61),
            cr4: 0x0037_06f0,
            efer: Some(0xd01),
            cs: Segment {
                selector: 0x10,
                flags: 0x209b00,
                ..Segment::default()
            },
            ..Registers::default()
        }
    }

    #[test]
    fn modes_from_control_registers() {
        let pg = Cr0::PE | Cr0::PG;
        assert_eq!(
            PagingMode::from_control(Cr0::PE, Cr4::PAE, Efer::LMA),
            PagingMode::Disabled
        );
        assert_eq!(
            PagingMode::from_control(pg, Cr4::PSE, Efer::empty()),
            PagingMode::Bits32
        );
        assert_eq!(
            PagingMode::from_control(pg, Cr4::PAE, Efer::LME),
            PagingMode::Pae
        );
        assert_eq!(
            PagingMode::from_control(pg, Cr4::PAE, Efer::LMA),
            PagingMode::Level4
        );
        assert_eq!(
            PagingMode::from_control(pg, Cr4::PAE | Cr4::LA57, Efer::LMA | Efer::LME),
            PagingMode::Level5
        );
    }

    #[test]
    fn detection_without_efer() {
        let mut regs = long_mode_regs();
        assert_eq!(PagingMode::detect(&regs).evidence, ModeEvidence::Efer);
        assert_eq!(PagingMode::from_registers(&regs), PagingMode::Level4);

        regs.efer = None;
        let detection = PagingMode::detect(&regs);
        assert_eq!(detection.mode, PagingMode::Level4);
        assert_eq!(detection.evidence, ModeEvidence::CsLongBit);

        // A 64-bit kernel caught in compatibility-mode user code.
        regs.cs.flags = 0xc0fb00;
        regs.gdtr = DescriptorTable {
            base: 0xffff_fe00_0000_1000,
            limit: 0x7f,
        };
        assert_eq!(
            PagingMode::detect(&regs).evidence,
            ModeEvidence::TableAbove4G
        );
        regs.cr4 |= Cr4::LA57.bits();
        assert_eq!(PagingMode::from_registers(&regs), PagingMode::Level5);

        regs.gdtr.base = 0xc180_0000;
        let detection = PagingMode::detect(&regs);
        assert_eq!(
            (detection.mode, detection.evidence),
            (PagingMode::Pae, ModeEvidence::Assumed)
        );

        regs.cr4 &= !Cr4::PAE.bits();
        let detection = PagingMode::detect(&regs);
        assert_eq!(
            (detection.mode, detection.evidence),
            (PagingMode::Bits32, ModeEvidence::ControlRegisters)
        );
        regs.cr0 = 0x11;
        assert_eq!(PagingMode::from_registers(&regs), PagingMode::Disabled);
    }

    #[test]
    fn cr3_roots_and_pcid() {
        let raw = 0xc000_0000_0000_0000 | 0x000f_ffff_ffff_ffff;
        assert_eq!(PagingMode::Bits32.root_table(raw), Some(Gpa(0xffff_f000)));
        assert_eq!(PagingMode::Pae.root_table(raw), Some(Gpa(0xffff_ffe0)));
        assert_eq!(
            PagingMode::Level4.root_table(raw),
            Some(Gpa(0x000f_ffff_ffff_f000))
        );
        assert_eq!(PagingMode::Disabled.root_table(raw), None);

        let regs = long_mode_regs();
        let cr3 = Cr3::from_registers(&regs);
        assert_eq!(cr3.root, Some(Gpa(0x1_2345_6000)));
        assert_eq!(cr3.pcid, Some(0x18));
        assert!(!cr3.pwt && !cr3.pcd && cr3.lam_u57 && !cr3.lam_u48);

        let no_pcid = Cr3::decode(0x1018, PagingMode::Level4, false);
        assert_eq!((no_pcid.pcid, no_pcid.pwt, no_pcid.pcd), (None, true, true));
        let pae = Cr3::decode(0x1038 | (1 << 61), PagingMode::Pae, true);
        assert_eq!(pae.root, Some(Gpa(0x1020)));
        assert!(!pae.pwt && !pae.lam_u57 && pae.pcid.is_none());
    }

    #[test]
    fn human_description_names_flags_and_protections() {
        let mut regs = long_mode_regs();
        regs.cr4 |= 1 << 40;
        let text = ControlRegisters::from_registers(&regs).to_string();
        assert!(text.contains("[PE MP ET NE WP AM PG]"), "{text}");
        assert!(text.contains("SMEP SMAP"), "{text}");
        assert!(text.contains("unnamed=0x10000000000"), "{text}");
        assert!(text.contains("[SCE LME LMA NXE]"), "{text}");
        assert!(
            text.contains("CR4.SMEP=on") && text.contains("CR4.UMIP=OFF"),
            "{text}"
        );

        regs.efer = None;
        let summary = ControlRegisters::from_registers(&regs);
        assert!(summary.to_string().contains("EFER.NXE=unknown"));
        let json = serde_json::to_value(summary).unwrap();
        assert_eq!(json["efer"], serde_json::Value::Null);
        assert!(json["cr0"].as_str().unwrap().contains("PG"));
        assert_eq!(serde_json::to_value(PagingMode::Level5).unwrap(), "level5");
    }
}
