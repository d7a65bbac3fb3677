//! A vmlinux ELF given by the user: its symbol table (like a System.map) and its types (for
//! kernels whose image in guest memory has no BTF): the `.BTF` section when it has one, else its
//! DWARF converted to BTF.
//!
//! The file is read on demand through `object`'s read cache, so a 600 MB debug vmlinux is not
//! loaded whole: opening it reads only the symbol and string tables and the BTF section; the
//! DWARF sections are read (and converted, a few seconds) only when types are asked for.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use object::read::ReadCache;
use object::{Object, ObjectSection, ObjectSymbol, SectionFlags, SectionKind, SymbolKind};

use crate::error::{Error, Result};
use crate::symbols::Symbol;
use crate::sysmap::SystemMap;
use crate::types::{KernelTypes, MAX_BTF_BYTES};

/// Most symbols taken from a vmlinux (an allyesconfig kernel has ~500k).
const MAX_SYMBOLS: usize = 4_000_000;

/// What a vmlinux file offers.
#[derive(Debug)]
pub struct Vmlinux {
    path: PathBuf,
    /// Its symbols at link-time addresses, as a System.map would list them (empty for a
    /// stripped image such as the one inside a bzImage).
    pub system_map: SystemMap,
    /// The `.BTF` section, when the kernel was built with CONFIG_DEBUG_INFO_BTF.
    pub btf: Option<Vec<u8>>,
    /// Whether it carries DWARF (`.debug_info`), converted to types when there is no `.BTF`.
    pub has_dwarf: bool,
}

impl Vmlinux {
    /// Reads the symbol table and the BTF section of the ELF at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Vmlinux {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| bad(format!("cannot open it: {e}")))?;
        let cache = ReadCache::new(file);
        let elf = object::File::parse(&cache).map_err(|e| bad(format!("not an ELF file: {e}")))?;
        if elf.architecture() != object::Architecture::X86_64 {
            return Err(bad(format!(
                "it is a {:?} ELF, not x86-64",
                elf.architecture()
            )));
        }
        let mut symbols = Vec::new();
        for symbol in elf.symbols() {
            if symbols.len() >= MAX_SYMBOLS {
                return Err(bad(format!("more than {MAX_SYMBOLS} symbols")));
            }
            if symbol.address() == 0
                || !matches!(
                    symbol.kind(),
                    SymbolKind::Text | SymbolKind::Data | SymbolKind::Unknown
                )
            {
                continue;
            }
            let Ok(name) = symbol.name() else { continue };
            if name.is_empty() {
                continue;
            }
            let section = symbol
                .section_index()
                .and_then(|i| elf.section_by_index(i).ok());
            let kind = type_letter(
                section.as_ref().map(|s| (s.kind(), s.flags())),
                symbol.is_global(),
            );
            symbols.push(Symbol {
                name: name.to_string(),
                address: symbol.address(),
                kind,
                module: None::<Arc<str>>,
            });
        }
        let btf = match elf.section_by_name(".BTF") {
            Some(section) => {
                if section.size() > MAX_BTF_BYTES {
                    return Err(bad(format!(
                        ".BTF is {} bytes, more than the {MAX_BTF_BYTES}-byte limit",
                        section.size()
                    )));
                }
                Some(
                    section
                        .data()
                        .map_err(|e| bad(format!("reading .BTF: {e}")))?
                        .to_vec(),
                )
            }
            None => None,
        };
        let has_dwarf = elf.section_by_name(".debug_info").is_some();
        if symbols.is_empty() && btf.is_none() && !has_dwarf {
            return Err(bad(
                "it has neither a symbol table nor types (.BTF or DWARF): stripped?".to_string(),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            system_map: SystemMap { symbols },
            btf,
            has_dwarf,
        })
    }

    /// The kernel types: from the `.BTF` section, else converted from the DWARF sections, else
    /// an error saying what the file lacks.
    pub fn types(&self) -> Result<KernelTypes> {
        if let Some(bytes) = &self.btf {
            return KernelTypes::from_btf_bytes(bytes, &self.types_origin());
        }
        if !self.has_dwarf {
            return Err(Error::Vmlinux {
                path: self.path.clone(),
                reason: "it has neither a .BTF section nor DWARF (.debug_info); a vmlinux with \
                         types is the one in the kernel's debug package"
                    .to_string(),
            });
        }
        let started = Instant::now();
        let file = File::open(&self.path).map_err(|e| Error::Vmlinux {
            path: self.path.clone(),
            reason: format!("cannot open it: {e}"),
        })?;
        let cache = ReadCache::new(file);
        let conversion = kvmaccess_dwarf::btf_from_elf(&cache).map_err(|source| Error::Dwarf {
            path: self.path.clone(),
            source,
        })?;
        // The read cache holds the DWARF sections (150 MB for a distribution kernel): gone
        // before the types are parsed.
        drop(cache);
        let mut types = KernelTypes::from_btf_bytes(&conversion.btf, &self.types_origin())?;
        types.elapsed = started.elapsed();
        Ok(types)
    }

    /// Where [`types`](Self::types) takes the types from, for provenance reports.
    pub fn types_origin(&self) -> String {
        match (&self.btf, self.has_dwarf) {
            (Some(_), _) => format!("the .BTF section of {}", self.path.display()),
            (None, true) => format!("the DWARF of {} (converted to BTF)", self.path.display()),
            (None, false) => format!("{} (which has no types)", self.path.display()),
        }
    }
}

/// The `nm` letter for a symbol in a section of this kind: lower case for local symbols.
fn type_letter(section: Option<(SectionKind, SectionFlags)>, global: bool) -> char {
    let letter = match section {
        Some((SectionKind::Text, _)) => 't',
        Some((SectionKind::ReadOnlyData | SectionKind::ReadOnlyString, _)) => 'r',
        Some((SectionKind::UninitializedData | SectionKind::UninitializedTls, _)) => 'b',
        Some((SectionKind::Data | SectionKind::Tls, _)) => 'd',
        Some(_) => 'd',
        None => 'a',
    };
    if global {
        letter.to_ascii_uppercase()
    } else {
        letter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::write::{
        Object as WriteObject, StandardSection, Symbol as WriteSymbol, SymbolSection,
    };
    use object::{Architecture, BinaryFormat, Endianness, SymbolFlags, SymbolScope};

    /// The smallest valid BTF: a header with an empty type section and a one-NUL string section.
    fn empty_btf() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0xeb9fu16.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for word in [24u32, 0, 0, 0, 1] {
            b.extend_from_slice(&word.to_le_bytes());
        }
        b.push(0);
        b
    }

    fn elf(
        with_symbols: bool,
        btf: Option<Vec<u8>>,
        arch: Architecture,
    ) -> tempfile::NamedTempFile {
        let mut obj = WriteObject::new(BinaryFormat::Elf, arch, Endianness::Little);
        let text = obj.section_id(StandardSection::Text);
        obj.append_section_data(text, &[0x90; 64], 16);
        if with_symbols {
            for (name, value, scope) in [
                ("_stext", 0x10u64, SymbolScope::Linkage),
                ("local_helper", 0x20, SymbolScope::Compilation),
            ] {
                obj.add_symbol(WriteSymbol {
                    name: name.as_bytes().to_vec(),
                    value,
                    size: 4,
                    kind: SymbolKind::Text,
                    scope,
                    weak: false,
                    section: SymbolSection::Section(text),
                    flags: SymbolFlags::None,
                });
            }
        }
        if let Some(btf) = btf {
            let id = obj.add_section(Vec::new(), b".BTF".to_vec(), SectionKind::ReadOnlyData);
            obj.append_section_data(id, &btf, 4);
        }
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, &obj.write().unwrap()).unwrap();
        file
    }

    #[test]
    fn symbols_and_btf_are_read() {
        let file = elf(true, Some(empty_btf()), Architecture::X86_64);
        let vmlinux = Vmlinux::open(file.path()).unwrap();
        let names: Vec<(&str, u64, char)> = vmlinux
            .system_map
            .symbols
            .iter()
            .map(|s| (s.name.as_str(), s.address, s.kind))
            .collect();
        assert!(names.contains(&("_stext", 0x10, 'T')), "{names:?}");
        assert!(names.contains(&("local_helper", 0x20, 't')), "{names:?}");
        assert_eq!(vmlinux.types().unwrap().btf.type_count(), 0);
    }

    /// A real compiler's DWARF, from an executable that has no .BTF: the types come from DWARF
    /// and say so, and a broken .debug_info is an error naming the file.
    #[test]
    fn dwarf_types_when_there_is_no_btf() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("k.c");
        std::fs::write(
            &src,
            "struct list_head { struct list_head *next, *prev; };\n\
             struct task_struct { int pid; char comm[16]; struct list_head tasks; };\n\
             struct task_struct init_task;\n\
             int main(void) { return init_task.pid; }\n",
        )
        .unwrap();
        let exe = dir.path().join("vmlinux");
        let status = std::process::Command::new("cc")
            .args(["-g", "-o"])
            .arg(&exe)
            .arg(&src)
            .status()
            .expect("running cc (the Makefile installs gcc)");
        assert!(status.success());
        let vmlinux = Vmlinux::open(&exe).unwrap();
        assert!(vmlinux.btf.is_none() && vmlinux.has_dwarf);
        assert!(vmlinux.types_origin().contains("DWARF"));
        let types = vmlinux.types().unwrap();
        assert_eq!(types.origin, vmlinux.types_origin());
        assert_eq!(types.offset_of("task_struct", "tasks").unwrap(), 24);
        assert_eq!(types.offset_of("task_struct", "comm").unwrap(), 4);
        assert_eq!(types.size_of("task_struct").unwrap(), 40);

        // The same file with its .debug_info overwritten by junk.
        let mut bytes = std::fs::read(&exe).unwrap();
        let elf = object::File::parse(&*bytes).unwrap();
        let (offset, size) = elf
            .section_by_name(".debug_info")
            .unwrap()
            .file_range()
            .unwrap();
        drop(elf);
        let range = usize::try_from(offset).unwrap()..usize::try_from(offset + size).unwrap();
        bytes[range].fill(0xff);
        std::fs::write(&exe, &bytes).unwrap();
        let e = Vmlinux::open(&exe).unwrap().types().unwrap_err();
        assert!(matches!(e, Error::Dwarf { .. }), "{e}");
        assert!(e.to_string().contains("vmlinux"), "{e}");
    }

    #[test]
    fn missing_parts_are_explained() {
        let stripped = elf(true, None, Architecture::X86_64);
        let vmlinux = Vmlinux::open(stripped.path()).unwrap();
        assert!(vmlinux
            .types()
            .unwrap_err()
            .to_string()
            .contains("neither a .BTF"));

        let empty = elf(false, None, Architecture::X86_64);
        assert!(Vmlinux::open(empty.path())
            .unwrap_err()
            .to_string()
            .contains("stripped"));

        let arm = elf(true, Some(empty_btf()), Architecture::Aarch64);
        assert!(Vmlinux::open(arm.path())
            .unwrap_err()
            .to_string()
            .contains("not x86-64"));

        let not_elf = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_elf.path(), b"hello").unwrap();
        assert!(Vmlinux::open(not_elf.path())
            .unwrap_err()
            .to_string()
            .contains("not an ELF"));
        assert!(Vmlinux::open(Path::new("/nonexistent/vmlinux"))
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/vmlinux"));

        let bad_btf = elf(false, Some(vec![0xde, 0xad]), Architecture::X86_64);
        let vmlinux = Vmlinux::open(bad_btf.path()).unwrap();
        assert!(vmlinux.types().is_err());
    }
}
