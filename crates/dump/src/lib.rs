//! Memory-dump backends for kvmaccess: QEMU/libvirt ELF cores, LiME dumps and raw images, all
//! readable through [`kvmaccess_core::PhysicalMemory`], plus an ELF core writer whose output
//! QEMU-aware tools (and this crate) can read back.
//!
//! Open a file whose format is not known in advance with [`open_dump`]; open a specific format
//! with [`ElfCore::open`], [`LimeDump::open`] or [`RawDump::open`]. The live QEMU backend reads
//! registers by parsing the notes of a small `dump-guest-memory` with [`parse_core_notes`] or
//! [`parse_qemu_cpu_state`].
//!
//! Files are memory-mapped read-only and validated completely when opened (every segment must
//! lie inside the file), so that reads afterwards never fail for any reason but a hole in guest
//! memory.

mod backing;
mod elf;
mod error;
mod lime;
mod notes;
mod physmap;
mod raw;
mod writer;

#[cfg(test)]
mod tests;

pub use elf::{parse_core_notes, ElfCore, LoadSegment};
pub use error::{DumpError, Result};
pub use lime::{encode_lime_header, LimeDump, LIME_HEADER_SIZE, LIME_MAGIC, LIME_VERSION};
pub use notes::{
    encode_prstatus_x86_64, encode_qemu_cpu_state, parse_prstatus_i386, parse_prstatus_x86_64,
    parse_qemu_cpu_state, parse_vmcoreinfo, CoreNotes, RegisterSource, NT_PRSTATUS,
    PRSTATUS_I386_SIZE, PRSTATUS_X86_64_SIZE, QEMU_CPU_STATE_BASE_SIZE,
    QEMU_CPU_STATE_SIZE_WITH_KGS, QEMU_CPU_STATE_VERSION, QEMU_NOTE_NAME, VMCOREINFO_NOTE_NAME,
};
pub use raw::RawDump;
pub use writer::{write_elf_core, write_elf_core_to_path};

use backing::{map_file, Backing};
use kvmaccess_core::{Error, Gpa, PhysRange, PhysicalMemory, Registers, VcpuState};
use std::fmt;
use std::path::Path;

/// The formats [`open_dump`] recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DumpFormat {
    /// ELF core (QEMU `dump-guest-memory`, `virsh dump --memory-only`, our writer).
    ElfCore,
    /// LiME range-header format.
    Lime,
    /// Headerless guest-physical memory from a base address.
    Raw,
}

impl fmt::Display for DumpFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DumpFormat::ElfCore => "ELF core",
            DumpFormat::Lime => "LiME",
            DumpFormat::Raw => "raw",
        })
    }
}

/// A dump of any supported format.
#[derive(Debug)]
#[non_exhaustive]
pub enum Dump {
    /// An ELF core.
    Elf(ElfCore),
    /// A LiME dump.
    Lime(LimeDump),
    /// A raw image.
    Raw(RawDump),
}

/// The formats that can be recognised from their first bytes.
#[derive(Clone, Copy)]
enum Magic {
    Elf,
    Lime,
}

/// Recognises the format from the first bytes: ELF magic, then LiME magic.
fn sniff(bytes: &[u8]) -> Option<Magic> {
    if bytes.starts_with(elf::ELF_MAGIC) {
        Some(Magic::Elf)
    } else if bytes.starts_with(&LIME_MAGIC.to_le_bytes()) {
        Some(Magic::Lime)
    } else {
        None
    }
}

/// Names formats that people commonly mistake for a memory dump we can read, and how to get one
/// we can.
fn unsupported_format_hint(bytes: &[u8]) -> Option<&'static str> {
    const KNOWN: [(&[u8], &str); 5] = [
        (
            b"QEVM",
            "a QEMU migration stream (savevm/migrate); take a memory dump with \
             dump-guest-memory instead",
        ),
        (
            b"LibvirtQemud",
            "a libvirt save image; use `virsh dump --memory-only --format elf` instead",
        ),
        (
            b"KDUMP   ",
            "a compressed kdump file (dump-guest-memory format kdump-*); use format elf",
        ),
        (
            b"makedumpfile",
            "a makedumpfile flattened file; use an ELF dump",
        ),
        (
            b"PAGEDU",
            "a Windows crash dump, which this tool does not read",
        ),
    ];
    KNOWN
        .iter()
        .find(|(magic, _)| bytes.starts_with(magic))
        .map(|(_, hint)| *hint)
}

/// Opens the dump at `path`, recognising ELF cores and LiME dumps by their magic.
///
/// A file with neither magic is read as a raw image only if `raw_base` (the CLI's
/// `--raw-base`) says where it starts in guest-physical memory; otherwise the error explains that
/// option. Giving `raw_base` for an ELF or LiME file is an error too, rather than silently
/// ignoring one of the two.
pub fn open_dump(path: impl AsRef<Path>, raw_base: Option<u64>) -> Result<Dump> {
    let path = path.as_ref();
    let backing = map_file(path)?;
    Dump::with_backing(backing, path.display().to_string(), raw_base)
}

impl Dump {
    /// Like [`open_dump`], for a dump held in memory.
    pub fn from_bytes(bytes: Vec<u8>, raw_base: Option<u64>) -> Result<Self> {
        Self::with_backing(Backing::Owned(bytes), "<memory>".to_owned(), raw_base)
    }

    fn with_backing(backing: Backing, file: String, raw_base: Option<u64>) -> Result<Self> {
        if backing.bytes().is_empty() {
            return Err(DumpError::Empty { file });
        }
        match (sniff(backing.bytes()), raw_base) {
            (Some(magic), Some(_)) => Err(DumpError::RawBaseOnStructuredDump {
                file,
                format: match magic {
                    Magic::Elf => DumpFormat::ElfCore,
                    Magic::Lime => DumpFormat::Lime,
                },
            }),
            (Some(Magic::Elf), None) => ElfCore::with_backing(backing, file).map(Dump::Elf),
            (Some(Magic::Lime), None) => LimeDump::with_backing(backing, file).map(Dump::Lime),
            (None, Some(base)) => RawDump::with_backing(backing, file, base).map(Dump::Raw),
            (None, None) => {
                let magic = backing
                    .bytes()
                    .iter()
                    .take(8)
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let hint = unsupported_format_hint(backing.bytes())
                    .map(|h| format!("; it looks like {h}"))
                    .unwrap_or_default();
                Err(DumpError::UnknownFormat { file, magic, hint })
            }
        }
    }

    /// The dump's format.
    pub fn format(&self) -> DumpFormat {
        match self {
            Dump::Elf(_) => DumpFormat::ElfCore,
            Dump::Lime(_) => DumpFormat::Lime,
            Dump::Raw(_) => DumpFormat::Raw,
        }
    }

    /// The file's name as given when opening.
    pub fn file_name(&self) -> &str {
        match self {
            Dump::Elf(d) => d.file_name(),
            Dump::Lime(d) => d.file_name(),
            Dump::Raw(d) => d.file_name(),
        }
    }

    /// The `VMCOREINFO` text, when the format records it and the guest published it.
    pub fn vmcoreinfo(&self) -> Option<&str> {
        match self {
            Dump::Elf(d) => d.vmcoreinfo(),
            Dump::Lime(_) | Dump::Raw(_) => None,
        }
    }

    /// Registers of every vCPU, when the format records them (ELF cores only). Named apart from
    /// [`VcpuState::registers`] so that `dump.registers(i)` keeps meaning the trait method.
    pub fn recorded_registers(&self) -> Option<&[Registers]> {
        match self {
            Dump::Elf(d) => Some(d.vcpus()),
            Dump::Lime(_) | Dump::Raw(_) => None,
        }
    }

    /// The parsed notes of an ELF core (registers, `VMCOREINFO`, warnings).
    pub fn core_notes(&self) -> Option<&CoreNotes> {
        match self {
            Dump::Elf(d) => Some(d.notes()),
            Dump::Lime(_) | Dump::Raw(_) => None,
        }
    }

    fn memory(&self) -> &dyn PhysicalMemory {
        match self {
            Dump::Elf(d) => d,
            Dump::Lime(d) => d,
            Dump::Raw(d) => d,
        }
    }
}

impl PhysicalMemory for Dump {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        self.memory().read_phys(gpa, buf)
    }

    fn ranges(&self) -> &[PhysRange] {
        self.memory().ranges()
    }
}

impl VcpuState for Dump {
    fn vcpu_count(&self) -> usize {
        self.recorded_registers().map_or(0, <[Registers]>::len)
    }

    fn registers(&self, vcpu: usize) -> Result<Registers, Error> {
        match self {
            Dump::Elf(d) => d.registers(vcpu),
            Dump::Lime(_) | Dump::Raw(_) => Err(Error::Unsupported(format!(
                "a {} dump records no vCPU registers",
                self.format()
            ))),
        }
    }

    fn all_registers(&self) -> Result<Vec<Registers>, Error> {
        match self {
            Dump::Elf(d) => d.all_registers(),
            Dump::Lime(_) | Dump::Raw(_) => self.registers(0).map(|r| vec![r]),
        }
    }
}
