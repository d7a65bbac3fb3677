//! The derived kernel profile as one JSON document: what kvmaccess learned about a kernel from
//! guest memory alone (release, build ID, KASLR, paging, symbols, struct layouts) and where each
//! piece came from. It can be kept next to a dump, diffed between boots, or read by other tools.
//! Addresses are `"0x…"` strings so that no JSON reader rounds them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use kvmaccess_btf::{Btf, TypeId, TypeInfo};
use kvmaccess_core::Gpa;
use kvmaccess_x86::PagingMode;
use serde::Serialize;

use crate::{Error, Kernel, KernelTypes, Provenance, Result};

/// Format tag of the document; bumped when a field changes meaning.
pub const PROFILE_FORMAT: &str = "kvmaccess-profile/1";

/// The structs and unions kvmaccess itself reads (tasks, modules, the log buffer, descriptor
/// tables, namespaces): the default types section.
pub const USED_TYPES: &[&str] = &[
    "task_struct",
    "list_head",
    "hlist_node",
    "mm_struct",
    "cred",
    "pid",
    "upid",
    "pid_namespace",
    "signal_struct",
    "files_struct",
    "fdtable",
    "file",
    "nsproxy",
    "uts_namespace",
    "new_utsname",
    "module",
    "module_layout",
    "module_memory",
    "mod_kallsyms",
    "mod_tree_node",
    "latch_tree_node",
    "kernel_symbol",
    "printk_ringbuffer",
    "prb_desc_ring",
    "prb_data_ring",
    "prb_desc",
    "printk_info",
    "gate_struct",
    "desc_struct",
    "idt_bits",
];

/// Which struct layouts go into the document.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TypeSelection {
    /// The types kvmaccess reads ([`USED_TYPES`]) that this kernel has.
    #[default]
    Used,
    /// Every named struct and union of the kernel's BTF (about 10,000 on a 6.1 kernel).
    All,
    /// No types section.
    None,
}

/// Options for [`Kernel::export_profile`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ProfileOptions {
    /// Which types to include.
    pub types: TypeSelection,
}

/// The exported profile.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileExport {
    /// [`PROFILE_FORMAT`].
    pub format: &'static str,
    /// `kvmaccess <version>`.
    pub producer: String,
    /// Kernel release.
    pub release: String,
    /// GNU build ID of vmlinux (hex), when VMCOREINFO has it.
    pub build_id: Option<String>,
    /// `linux_banner`, when it was found.
    pub banner: Option<String>,
    /// Paging mode of kernel addresses.
    pub paging_mode: PagingMode,
    /// Guest-physical address of the kernel's top-level page table.
    pub root: Gpa,
    /// KASLR offsets.
    pub kaslr: Kaslr,
    /// `phys_base` (signed).
    pub phys_base: i64,
    /// Start of the direct map, when known.
    #[serde(with = "kvmaccess_core::hex::option")]
    pub page_offset_base: Option<u64>,
    /// Symbols (kernel image and any merged module symbols).
    pub symbols: Vec<ExportSymbol>,
    /// Struct and union layouts by name (empty with [`TypeSelection::None`]).
    pub types: BTreeMap<String, ExportType>,
    /// Where everything came from.
    pub provenance: Provenance,
}

/// KASLR offsets.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Kaslr {
    /// Virtual slide of the kernel image.
    #[serde(with = "kvmaccess_core::hex")]
    pub virtual_offset: u64,
    /// Physical slide: load address minus the link-time physical address.
    #[serde(with = "kvmaccess_core::hex")]
    pub physical_offset: u64,
}

/// One symbol.
#[derive(Clone, Debug, Serialize)]
pub struct ExportSymbol {
    /// Name.
    pub name: String,
    /// Live address (per-CPU symbols: the offset in the per-CPU area).
    #[serde(with = "kvmaccess_core::hex")]
    pub address: u64,
    /// `nm`-style type letter.
    #[serde(rename = "type")]
    pub kind: char,
    /// Owning module, `null` for the kernel image.
    pub module: Option<String>,
}

/// A struct or union layout.
#[derive(Clone, Debug, Serialize)]
pub struct ExportType {
    /// `struct` or `union`.
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Members in declaration order; members of anonymous structs and unions are listed in
    /// their parent, as C code names them.
    pub members: Vec<ExportMember>,
}

/// A member.
#[derive(Clone, Debug, Serialize)]
pub struct ExportMember {
    /// Name.
    pub name: String,
    /// Byte offset (of the first byte holding a bitfield).
    pub offset: u64,
    /// C type.
    #[serde(rename = "type")]
    pub ty: String,
    /// For bitfields: the first bit, counted from the start of the struct.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bit_offset: Option<u64>,
    /// For bitfields: the width.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
}

/// Deepest nesting of anonymous members flattened (the kernel's is 4 or 5).
const MAX_ANON_DEPTH: usize = 16;

impl Kernel<'_> {
    /// The profile as a serialisable document; `types` adds struct layouts from BTF.
    pub fn export_profile(
        &self,
        types: Option<&KernelTypes>,
        options: &ProfileOptions,
    ) -> Result<ProfileExport> {
        let profile = self.profile();
        let layout = &profile.layout;
        let symbols = profile
            .symbols
            .iter()
            .map(|s| ExportSymbol {
                name: s.name.clone(),
                address: s.address,
                kind: s.kind,
                module: s.module.as_deref().map(str::to_string),
            })
            .collect();
        let types = match (types, options.types) {
            (_, TypeSelection::None) | (None, _) => BTreeMap::new(),
            (Some(t), selection) => export_types(&t.btf, selection)?,
        };
        Ok(ProfileExport {
            format: PROFILE_FORMAT,
            producer: format!("kvmaccess {}", env!("CARGO_PKG_VERSION")),
            release: profile.release.clone(),
            build_id: profile.build_id.clone(),
            banner: profile.banner.as_ref().map(|b| b.text.clone()),
            paging_mode: layout.mode,
            root: layout.root,
            kaslr: Kaslr {
                virtual_offset: layout.kaslr_offset,
                physical_offset: layout.phys_kaslr_offset(),
            },
            phys_base: layout.phys_base,
            page_offset_base: layout.page_offset_base,
            symbols,
            types,
            provenance: profile.provenance.clone(),
        })
    }
}

impl ProfileExport {
    /// Write the document as pretty JSON.
    pub fn write_json<W: Write>(&self, out: W) -> Result<()> {
        let mut out = std::io::BufWriter::new(out);
        serde_json::to_writer_pretty(&mut out, self)
            .map_err(|e| e.to_string())
            .and_then(|()| out.flush().map_err(|e| e.to_string()))
            .map_err(|reason| Error::Export {
                path: "<stream>".into(),
                reason,
            })
    }

    /// Write the document to `path`, replacing it.
    pub fn write_to_path(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let named = |reason: String| Error::Export {
            path: path.display().to_string(),
            reason,
        };
        let file = std::fs::File::create(path).map_err(|e| named(e.to_string()))?;
        self.write_json(file).map_err(|e| match e {
            Error::Export { reason, .. } => named(reason),
            other => other,
        })
    }
}

/// Struct and union layouts from BTF. The first definition of a name wins (BTF can hold
/// distinct types of one name from different compilation units).
pub fn export_types(btf: &Btf, selection: TypeSelection) -> Result<BTreeMap<String, ExportType>> {
    let mut out = BTreeMap::new();
    let ids: Vec<TypeId> = match selection {
        TypeSelection::None => Vec::new(),
        TypeSelection::Used => USED_TYPES
            .iter()
            .filter_map(|n| btf.find_struct(n).or_else(|| btf.find_union(n)))
            .collect(),
        TypeSelection::All => btf
            .types()
            .filter(|t| {
                !t.name.is_empty()
                    && matches!(t.info, TypeInfo::Struct { .. } | TypeInfo::Union { .. })
            })
            .map(|t| t.id)
            .collect(),
    };
    for id in ids {
        let t = btf.get(id).map_err(|source| Error::Btf {
            what: format!("type {id}"),
            source,
        })?;
        if out.contains_key(t.name) {
            continue;
        }
        let (kind, size) = match t.info {
            TypeInfo::Struct { size, .. } => ("struct", size),
            TypeInfo::Union { size, .. } => ("union", size),
            _ => continue,
        };
        let mut members = Vec::new();
        flatten(btf, id, 0, 0, &mut members).map_err(|source| Error::Btf {
            what: format!("members of {}", t.name),
            source,
        })?;
        out.insert(
            t.name.to_string(),
            ExportType {
                kind,
                size: u64::from(size),
                members,
            },
        );
    }
    Ok(out)
}

fn flatten(
    btf: &Btf,
    id: TypeId,
    base_bits: u64,
    depth: usize,
    out: &mut Vec<ExportMember>,
) -> std::result::Result<(), kvmaccess_btf::Error> {
    if depth > MAX_ANON_DEPTH {
        return Err(kvmaccess_btf::Error::TooDeep {
            id,
            limit: MAX_ANON_DEPTH,
        });
    }
    for m in btf.members(id)? {
        let bit = base_bits.saturating_add(u64::from(m.bit_offset));
        if m.name.is_empty() {
            let inner = btf.resolve(m.type_id)?;
            if matches!(
                btf.info(inner)?,
                TypeInfo::Struct { .. } | TypeInfo::Union { .. }
            ) {
                flatten(btf, inner, bit, depth + 1, out)?;
            }
            continue;
        }
        let bitfield = m.bitfield_size != 0 || bit % 8 != 0;
        out.push(ExportMember {
            name: m.name.to_string(),
            offset: bit / 8,
            ty: btf.type_name(m.type_id)?,
            bit_offset: bitfield.then_some(bit),
            bits: bitfield.then_some(u32::from(m.bitfield_size)),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use kvmaccess_btf::encode::BtfBuilder;

    use super::*;

    #[test]
    fn used_types_flatten_anonymous_members_and_mark_bitfields() {
        let mut b = BtfBuilder::new();
        let int = b.int("int", 4, true);
        let uint = b.int("unsigned int", 4, false);
        let list_head = kvmaccess_btf::TypeId(b.next_id().get() + 1);
        let ptr = b.ptr(list_head);
        b.struct_(
            "list_head",
            16,
            &[("next", ptr, 0, 0), ("prev", ptr, 64, 0)],
        );
        let anon = b.union_("", 4, &[("__state", uint, 0, 0), ("alias", int, 0, 0)]);
        b.struct_(
            "task_struct",
            32,
            &[
                ("", anon, 0, 0),
                ("in_execve", uint, 32, 1),
                ("tasks", list_head, 64, 0),
            ],
        );
        b.struct_("not_used_by_kvmaccess", 4, &[("x", int, 0, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();

        let used = export_types(&btf, TypeSelection::Used).unwrap();
        assert_eq!(
            used.keys().collect::<Vec<_>>(),
            ["list_head", "task_struct"]
        );
        let task = &used["task_struct"];
        let names: Vec<_> = task.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["__state", "alias", "in_execve", "tasks"]);
        assert_eq!(task.members[2].offset, 4);
        assert_eq!(task.members[2].bit_offset, Some(32));
        assert_eq!(task.members[2].bits, Some(1));
        assert_eq!(task.members[3].offset, 8);
        assert_eq!(task.members[3].ty, "struct list_head");
        let json = serde_json::to_value(&used["list_head"]).unwrap();
        assert_eq!(json["members"][0]["type"], "struct list_head *");
        assert!(json["members"][0].get("bits").is_none());

        assert_eq!(export_types(&btf, TypeSelection::All).unwrap().len(), 3);
        assert!(export_types(&btf, TypeSelection::None).unwrap().is_empty());
    }
}
