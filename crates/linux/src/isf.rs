//! Volatility 3 symbol tables (ISF, the "Intermediate Symbol Format" JSON that dwarf2json
//! writes) built from the kernel's own BTF and kallsyms, for kernels whose debug package the user
//! does not have.
//!
//! The format (schema 6.2.0, the newest Volatility 3 2.x reads) has five sections:
//! `base_types` (integers, characters, booleans, floats, `void` and the `pointer` width),
//! `user_types` (structs and unions, referenced by name), `enums`, `symbols` (link-time
//! addresses; Volatility measures the KASLR shift itself) and `metadata`. Volatility identifies
//! the kernel a dump holds by scanning it for the `constant_data` of `linux_banner`, so that
//! symbol carries the banner's bytes exactly as the kernel has them.
//!
//! BTF differs from DWARF in ways the export has to bridge:
//! - typedefs and qualifiers do not exist in ISF: every reference is resolved through them;
//! - anonymous structs, unions and enums get generated names (`unnamed_struct_<btf id>`...),
//!   and anonymous members become `unnamed_field_<offset>` with `"anonymous": true`, which
//!   Volatility flattens into the parent as C does;
//! - forward declarations without a definition become empty structs, so that every name used
//!   is defined (Volatility resolves names lazily and fails on the first unknown one);
//! - BTF describes the types of per-CPU variables only; the types of the globals Volatility
//!   plugins read (`init_task`, `init_mm`, `modules`...) come from a table of their C
//!   declarations, used only when the kernel's BTF has the type.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use base64::Engine;
use kvmaccess_btf::{Btf, Kind, TypeId, TypeInfo};
use kvmaccess_core::Gva;
use serde::{Serialize, Serializer};

use crate::{Error, Kernel, KernelTypes, Result, SymbolSource, SymbolTable};

/// ISF format version written: the newest that Volatility 3 2.x implements.
pub const ISF_FORMAT: &str = "6.2.0";

/// Producer name in the metadata.
pub const PRODUCER: &str = "kvmaccess";

/// Longest `linux_banner` read from the guest (the kernel's is about 150 bytes).
pub const MAX_BANNER: usize = 1024;

/// Longest pointer/array/qualifier chain followed for one type reference. Real kernels need a
/// handful; hostile BTF can make a cycle of pointers, which is cut here.
const MAX_CHAIN: usize = 64;

/// Most elements given to an array whose length is inferred from the next symbol's address.
const MAX_GAP_COUNT: u64 = 1 << 16;

/// A Volatility 3 ISF document.
#[derive(Clone, Debug, Serialize)]
pub struct Isf {
    /// Format version, producer and sources.
    pub metadata: Metadata,
    /// Primitive types by name.
    pub base_types: BTreeMap<String, BaseType>,
    /// Structs and unions by name.
    pub user_types: BTreeMap<String, UserType>,
    /// Enums by name.
    pub enums: BTreeMap<String, EnumType>,
    /// Symbols by name.
    pub symbols: BTreeMap<String, IsfSymbol>,
    /// What the export did, for the user (not part of the file).
    #[serde(skip)]
    pub stats: IsfStats,
}

/// The `metadata` section.
#[derive(Clone, Debug, Serialize)]
pub struct Metadata {
    /// ISF format version.
    pub format: String,
    /// Who wrote the file.
    pub producer: Producer,
    /// Where the symbols came from.
    pub linux: LinuxSources,
}

/// `metadata.producer`.
#[derive(Clone, Debug, Serialize)]
pub struct Producer {
    /// Tool name.
    pub name: String,
    /// Tool version (`major.minor.patch`).
    pub version: String,
}

/// `metadata.linux`.
#[derive(Clone, Debug, Serialize)]
pub struct LinuxSources {
    /// Symbol sources. The schema knows `dwarf`, `symtab` and `system-map`; kallsyms is the
    /// kernel's own symbol table, hence `symtab`. Types have no entry: the schema has no kind
    /// for BTF and calling it `dwarf` would mislead.
    pub symbols: Vec<SourceItem>,
}

/// One source file of the metadata.
#[derive(Clone, Debug, Serialize)]
pub struct SourceItem {
    /// `symtab`.
    pub kind: String,
    /// A description of the source.
    pub name: String,
}

/// A primitive type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BaseType {
    /// Size in bytes.
    pub size: u32,
    /// Whether it is signed.
    pub signed: bool,
    /// `int`, `char`, `bool`, `float` or `void`.
    pub kind: &'static str,
    /// Always `little` (x86-64).
    pub endian: &'static str,
}

/// A struct or union.
#[derive(Clone, Debug, Serialize)]
pub struct UserType {
    /// `struct` or `union`.
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u32,
    /// Members by name.
    pub fields: BTreeMap<String, Field>,
}

/// A member of a struct or union.
#[derive(Clone, Debug, Serialize)]
pub struct Field {
    /// Its type.
    #[serde(rename = "type")]
    pub ty: TypeDesc,
    /// Byte offset (of the storage unit, for bitfields).
    pub offset: u64,
    /// An anonymous struct or union whose members belong to the parent.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub anonymous: bool,
}

/// An enum.
#[derive(Clone, Debug, Serialize)]
pub struct EnumType {
    /// Size in bytes.
    pub size: u32,
    /// Name of the base type with that size and signedness.
    pub base: String,
    /// Enumerators.
    #[serde(serialize_with = "serialize_constants")]
    pub constants: BTreeMap<String, i128>,
}

/// A symbol.
#[derive(Clone, Debug, Serialize)]
pub struct IsfSymbol {
    /// Link-time address (the live address minus the KASLR offset; per-CPU offsets as they are).
    pub address: u64,
    /// Type of the variable, when known.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub ty: Option<TypeDesc>,
    /// Contents (base64), for `linux_banner`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constant_data: Option<String>,
}

/// A reference to a type, as fields and symbols hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TypeDesc {
    /// A base type by name.
    Base {
        /// Its name in `base_types`.
        name: String,
    },
    /// A pointer.
    Pointer {
        /// The pointee.
        subtype: Box<TypeDesc>,
    },
    /// An array.
    Array {
        /// Number of elements (0 for flexible arrays).
        count: u32,
        /// The element type.
        subtype: Box<TypeDesc>,
    },
    /// A struct by name.
    Struct {
        /// Its name in `user_types`.
        name: String,
    },
    /// A union by name.
    Union {
        /// Its name in `user_types`.
        name: String,
    },
    /// An enum by name.
    Enum {
        /// Its name in `enums`.
        name: String,
    },
    /// A function (only as a pointer's subtype).
    Function,
    /// A bitfield.
    Bitfield {
        /// First bit, counted from the least significant bit of the storage unit at the
        /// field's offset.
        bit_position: u32,
        /// Width in bits.
        bit_length: u32,
        /// The storage unit's type (base or enum).
        #[serde(rename = "type")]
        base: Box<TypeDesc>,
    },
}

/// Counts describing one export.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IsfStats {
    /// BTF types read.
    pub btf_types: usize,
    /// Symbols written.
    pub symbols: usize,
    /// Symbols written with a type.
    pub typed_symbols: usize,
    /// Structs, unions and enums that got a generated name.
    pub anonymous_types: usize,
    /// Structs, unions or enums whose name an earlier one already had (renamed `<name>_<id>`).
    pub renamed_duplicates: usize,
    /// Forward declarations never defined, written as empty structs or unions.
    pub opaque_types: usize,
    /// Type references cut because their chain was longer than any real kernel's (hostile BTF).
    pub cut_chains: usize,
    /// Whether `linux_banner` carries its bytes (without them Volatility cannot find the kernel).
    pub banner: bool,
}

fn serialize_constants<S: Serializer>(
    constants: &BTreeMap<String, i128>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    // JSON integers: i64 covers every signed enumerator, u64 the large unsigned enum64 values.
    s.collect_map(constants.iter().map(|(name, &value)| {
        let number = match i64::try_from(value) {
            Ok(v) => serde_json::Value::from(v),
            Err(_) => serde_json::Value::from(u64::try_from(value).unwrap_or(u64::MAX)),
        };
        (name, number)
    }))
}

/// Reads kernel virtual memory at a live address; `false` if it cannot.
pub type ReadKernel<'a> = &'a dyn Fn(u64, &mut [u8]) -> bool;

/// What a build needs besides the BTF.
#[derive(Clone, Copy)]
pub struct IsfInput<'a> {
    /// Kernel symbols with live (relocated) addresses; module symbols are ignored.
    pub symbols: &'a SymbolTable,
    /// KASLR virtual offset to remove from every non-absolute address.
    pub kaslr_offset: u64,
    /// The bytes of `linux_banner` as the kernel has them, including the NUL.
    pub banner: Option<&'a [u8]>,
    /// Kernel release, for the metadata.
    pub release: &'a str,
    /// Guest memory, to trim the zero padding after arrays whose length is inferred from the
    /// next symbol (`taint_flags`, the system-call tables); without it they keep the padding.
    pub memory: Option<ReadKernel<'a>>,
    /// Where the symbols and types came from, in words, for the metadata; `None` says guest
    /// memory.
    pub sources: Option<&'a str>,
}

impl std::fmt::Debug for IsfInput<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsfInput")
            .field("symbols", &self.symbols.len())
            .field("kaslr_offset", &self.kaslr_offset)
            .field("banner", &self.banner.map(<[u8]>::len))
            .field("release", &self.release)
            .field("memory", &self.memory.is_some())
            .field("sources", &self.sources)
            .finish()
    }
}

impl Kernel<'_> {
    /// The kernel's profile as a Volatility 3 ISF: every BTF type, every kernel-image symbol
    /// at its link-time address, and `linux_banner`'s bytes read from guest memory.
    pub fn export_isf(&self, types: &KernelTypes) -> Result<Isf> {
        let banner = self.linux_banner_bytes()?;
        let read = |address: u64, buf: &mut [u8]| self.read(Gva(address), buf).is_ok();
        let symbols = match &self.provenance().symbols {
            SymbolSource::Kallsyms { .. } => "kallsyms read from guest memory",
            SymbolSource::SystemMap { .. } => "a System.map moved by the KASLR slide",
            SymbolSource::Absent(_) => "no symbol table",
        };
        let sources = format!("symbols: {symbols}; types: {}", types.origin);
        build_isf(
            &types.btf,
            &IsfInput {
                symbols: self.symbols(),
                kaslr_offset: self.layout().kaslr_offset,
                banner: Some(&banner),
                release: self.release(),
                memory: Some(&read),
                sources: Some(&sources),
            },
        )
    }

    /// `linux_banner` up to and including its NUL, as the kernel has it in memory.
    pub fn linux_banner_bytes(&self) -> Result<Vec<u8>> {
        let address = self.symbol("linux_banner")?;
        let mut out = Vec::new();
        let mut chunk = [0u8; 64];
        while out.len() < MAX_BANNER {
            let offset = u64::try_from(out.len()).unwrap_or(u64::MAX);
            self.read(Gva(address.wrapping_add(offset)), &mut chunk)?;
            if let Some(nul) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(chunk.get(..=nul).unwrap_or(&chunk));
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
        }
        Err(Error::Isf(format!(
            "linux_banner at {address:#x} has no NUL within {MAX_BANNER} bytes"
        )))
    }
}

/// Build an ISF from BTF and symbols. Fails only if the result would reference a type it does
/// not define (a bug, reported rather than written).
pub fn build_isf(btf: &Btf, input: &IsfInput<'_>) -> Result<Isf> {
    let mut b = Builder::new(btf);
    b.base_types();
    b.name_types();
    b.user_types_and_enums();
    let symbols = b.symbols(input);
    b.define_opaque();
    let Builder {
        base_types,
        user_types,
        enums,
        mut stats,
        ..
    } = b;
    stats.btf_types = btf.type_count();
    stats.symbols = symbols.len();
    stats.typed_symbols = symbols.values().filter(|s| s.ty.is_some()).count();
    stats.banner = symbols
        .get("linux_banner")
        .is_some_and(|s| s.constant_data.is_some());
    let isf = Isf {
        metadata: Metadata {
            format: ISF_FORMAT.to_string(),
            producer: Producer {
                name: PRODUCER.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            linux: LinuxSources {
                symbols: vec![SourceItem {
                    kind: "symtab".to_string(),
                    name: match input.sources {
                        Some(sources) => format!("Linux {}: {sources}", input.release),
                        None => format!(
                            "kallsyms and BTF of Linux {} read from guest memory",
                            input.release
                        ),
                    },
                }],
            },
        },
        base_types,
        user_types,
        enums,
        symbols,
        stats,
    };
    let undefined = isf.undefined_references();
    if let Some(first) = undefined.first() {
        return Err(Error::Isf(format!(
            "{} references to undefined types, first: {first}",
            undefined.len()
        )));
    }
    Ok(isf)
}

impl Isf {
    /// File name Volatility expects under `<symbols>/linux/`: `kvmaccess-<release>.json`.
    pub fn file_name(release: &str) -> String {
        let safe: String = release
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("kvmaccess-{safe}.json")
    }

    /// Every type name used (by fields, symbols, enums) that the document does not define, as
    /// `"<where>: <what>"`. Empty for every document [`build_isf`] returns.
    pub fn undefined_references(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, user) in &self.user_types {
            for (field, f) in &user.fields {
                self.check_desc(&f.ty, &format!("{name}.{field}"), &mut out);
                if f.anonymous && !matches!(&f.ty, TypeDesc::Struct { .. } | TypeDesc::Union { .. })
                {
                    out.push(format!(
                        "{name}.{field}: anonymous field is not a struct/union"
                    ));
                }
            }
        }
        for (name, sym) in &self.symbols {
            if let Some(ty) = &sym.ty {
                self.check_desc(ty, &format!("symbol {name}"), &mut out);
            }
        }
        for (name, e) in &self.enums {
            if !self.base_types.contains_key(&e.base) {
                out.push(format!("enum {name}: base {}", e.base));
            }
        }
        if !self.base_types.contains_key("pointer") {
            out.push("base_types: pointer".to_string());
        }
        out
    }

    fn check_desc(&self, desc: &TypeDesc, at: &str, out: &mut Vec<String>) {
        match desc {
            TypeDesc::Base { name } => {
                if !self.base_types.contains_key(name) {
                    out.push(format!("{at}: base {name}"));
                }
            }
            TypeDesc::Struct { name } | TypeDesc::Union { name } => {
                let want = if matches!(desc, TypeDesc::Struct { .. }) {
                    "struct"
                } else {
                    "union"
                };
                match self.user_types.get(name) {
                    Some(u) if u.kind == want => {}
                    Some(u) => out.push(format!("{at}: {want} {name} is a {}", u.kind)),
                    None => out.push(format!("{at}: {want} {name}")),
                }
            }
            TypeDesc::Enum { name } => {
                if !self.enums.contains_key(name) {
                    out.push(format!("{at}: enum {name}"));
                }
            }
            TypeDesc::Pointer { subtype } | TypeDesc::Array { subtype, .. } => {
                self.check_desc(subtype, at, out);
            }
            TypeDesc::Bitfield { base, .. } => {
                if !matches!(**base, TypeDesc::Base { .. } | TypeDesc::Enum { .. }) {
                    out.push(format!("{at}: bitfield of a non-integer type"));
                }
                self.check_desc(base, at, out);
            }
            TypeDesc::Function => {}
        }
    }

    /// Write the document as JSON.
    pub fn write_json<W: Write>(&self, out: W) -> Result<()> {
        let mut out = std::io::BufWriter::new(out);
        serde_json::to_writer(&mut out, self).map_err(|e| Error::Export {
            path: "<stream>".into(),
            reason: e.to_string(),
        })?;
        out.flush().map_err(|e| Error::Export {
            path: "<stream>".into(),
            reason: e.to_string(),
        })
    }

    /// Write the document as JSON to `path`, replacing it.
    pub fn write_to_path(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let file = std::fs::File::create(path).map_err(|e| Error::Export {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        self.write_json(file).map_err(|e| match e {
            Error::Export { reason, .. } => Error::Export {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }
}

/// C declarations of globals that Volatility plugins read through typed symbols but that BTF
/// does not describe (it lists per-CPU variables only). Used when BTF has the named types.
enum Spec {
    Struct(&'static str),
    Base(&'static str),
    Ptr(&'static Spec),
    /// An array of fixed length, or (0) as long as the gap to the next symbol allows.
    Array(&'static Spec, u32),
    Function,
}

const WELL_KNOWN: &[(&str, Spec)] = &[
    ("init_task", Spec::Struct("task_struct")),
    ("init_mm", Spec::Struct("mm_struct")),
    ("init_files", Spec::Struct("files_struct")),
    ("init_fs", Spec::Struct("fs_struct")),
    ("init_nsproxy", Spec::Struct("nsproxy")),
    ("init_pid_ns", Spec::Struct("pid_namespace")),
    ("init_uts_ns", Spec::Struct("uts_namespace")),
    ("init_net", Spec::Struct("net")),
    ("init_cred", Spec::Struct("cred")),
    ("modules", Spec::Struct("list_head")),
    ("module_kset", Spec::Ptr(&Spec::Struct("kset"))),
    ("mod_tree", Spec::Struct("mod_tree_root")),
    ("net_namespace_list", Spec::Struct("list_head")),
    ("tty_drivers", Spec::Struct("list_head")),
    ("super_blocks", Spec::Struct("list_head")),
    ("file_systems", Spec::Ptr(&Spec::Struct("file_system_type"))),
    ("prb", Spec::Ptr(&Spec::Struct("printk_ringbuffer"))),
    ("printk_rb_static", Spec::Struct("printk_ringbuffer")),
    ("log_buf", Spec::Ptr(&Spec::Base("char"))),
    ("log_buf_len", Spec::Base("unsigned int")),
    ("cap_last_cap", Spec::Base("int")),
    ("nr_cpu_ids", Spec::Base("unsigned int")),
    ("max_pfn", Spec::Base("long unsigned int")),
    ("page_offset_base", Spec::Base("long unsigned int")),
    ("vmalloc_base", Spec::Base("long unsigned int")),
    ("vmemmap_base", Spec::Base("long unsigned int")),
    ("socket_file_ops", Spec::Struct("file_operations")),
    (
        "sockfs_dentry_operations",
        Spec::Struct("dentry_operations"),
    ),
    (
        "keyboard_notifier_list",
        Spec::Struct("atomic_notifier_head"),
    ),
    ("prog_idr", Spec::Struct("idr")),
    ("ftrace_ops_list", Spec::Ptr(&Spec::Struct("ftrace_ops"))),
    ("ftrace_list_end", Spec::Struct("ftrace_ops")),
    ("idt_table", Spec::Array(&Spec::Struct("gate_struct"), 256)),
    ("taint_flags", Spec::Array(&Spec::Struct("taint_flag"), 0)),
    (
        "__per_cpu_offset",
        Spec::Array(&Spec::Base("long unsigned int"), 0),
    ),
    (
        "sys_call_table",
        Spec::Array(&Spec::Ptr(&Spec::Function), 0),
    ),
    (
        "ia32_sys_call_table",
        Spec::Array(&Spec::Ptr(&Spec::Function), 0),
    ),
    (
        "x32_sys_call_table",
        Spec::Array(&Spec::Ptr(&Spec::Function), 0),
    ),
];

/// Arrays of [`WELL_KNOWN`] whose length from the symbol gap includes alignment padding, and
/// whose real elements are never all zero: the trailing zero elements are dropped.
const TRIM_ZERO_TAIL: &[&str] = &[
    "taint_flags",
    "sys_call_table",
    "ia32_sys_call_table",
    "x32_sys_call_table",
];

/// Most bytes read to trim one array.
const MAX_TRIM_READ: u64 = 1 << 20;

struct Builder<'b> {
    btf: &'b Btf,
    /// Generated or deduplicated names of structs, unions and enums by id.
    names: HashMap<TypeId, String>,
    /// Kinds (`struct`/`union`) of the defined user types by name.
    user_kinds: HashMap<String, &'static str>,
    /// Names of undefined forward declarations referenced, with whether they are unions.
    forward: BTreeMap<String, bool>,
    base_types: BTreeMap<String, BaseType>,
    user_types: BTreeMap<String, UserType>,
    enums: BTreeMap<String, EnumType>,
    stats: IsfStats,
}

impl<'b> Builder<'b> {
    fn new(btf: &'b Btf) -> Self {
        Self {
            btf,
            names: HashMap::new(),
            user_kinds: HashMap::new(),
            forward: BTreeMap::new(),
            base_types: BTreeMap::new(),
            user_types: BTreeMap::new(),
            enums: BTreeMap::new(),
            stats: IsfStats::default(),
        }
    }

    fn base_types(&mut self) {
        let little = "little";
        self.base_types.insert(
            "void".into(),
            BaseType {
                size: 0,
                signed: false,
                kind: "void",
                endian: little,
            },
        );
        // Volatility sizes every pointer by this entry.
        self.base_types.insert(
            "pointer".into(),
            BaseType {
                size: self.btf.pointer_size(),
                signed: false,
                kind: "int",
                endian: little,
            },
        );
        for t in self.btf.types() {
            let base = match t.info {
                TypeInfo::Int(int) => BaseType {
                    size: int.size,
                    signed: int.signed,
                    kind: if int.is_bool {
                        "bool"
                    } else if int.is_char || t.name.contains("char") {
                        "char"
                    } else {
                        "int"
                    },
                    endian: little,
                },
                TypeInfo::Float { size } => BaseType {
                    size,
                    signed: true,
                    kind: "float",
                    endian: little,
                },
                _ => continue,
            };
            if !t.name.is_empty() && !self.base_types.contains_key(t.name) {
                self.base_types.insert(t.name.to_string(), base);
            }
        }
    }

    /// Names for every struct, union and enum: the BTF name when it is free, else a generated
    /// one. Structs and unions share a namespace (`user_types`), enums have their own.
    fn name_types(&mut self) {
        let mut user_taken: HashSet<String> = HashSet::new();
        let mut enum_taken: HashSet<String> = HashSet::new();
        for t in self.btf.types() {
            let (prefix, taken) = match t.info {
                TypeInfo::Struct { .. } => ("struct", &mut user_taken),
                TypeInfo::Union { .. } => ("union", &mut user_taken),
                TypeInfo::Enum { .. } | TypeInfo::Enum64 { .. } => ("enum", &mut enum_taken),
                _ => continue,
            };
            let mut name = if t.name.is_empty() {
                self.stats.anonymous_types += 1;
                format!("unnamed_{prefix}_{}", t.id.get())
            } else {
                t.name.to_string()
            };
            if taken.contains(&name) {
                self.stats.renamed_duplicates += 1;
                let base = format!("{name}_{}", t.id.get());
                name = base.clone();
                let mut n = 0u32;
                // Only hostile BTF names a type like another's generated name; the counter
                // ends as soon as a free name is found, at most once per existing type.
                while taken.contains(&name) {
                    n += 1;
                    name = format!("{base}_{n}");
                }
            }
            taken.insert(name.clone());
            if prefix != "enum" {
                self.user_kinds.insert(name.clone(), prefix);
            }
            self.names.insert(t.id, name);
        }
    }

    fn user_types_and_enums(&mut self) {
        let btf = self.btf;
        for t in btf.types() {
            match t.info {
                TypeInfo::Struct { size, .. } | TypeInfo::Union { size, .. } => {
                    let kind = if t.kind() == Kind::Struct {
                        "struct"
                    } else {
                        "union"
                    };
                    let fields = self.fields(t.id);
                    let name = self.names.get(&t.id).cloned().unwrap_or_default();
                    self.user_types
                        .insert(name, UserType { kind, size, fields });
                }
                TypeInfo::Enum { size, signed, .. } | TypeInfo::Enum64 { size, signed, .. } => {
                    let constants = btf
                        .enumerators(t.id)
                        .map(|values| values.map(|v| (v.name.to_string(), v.value)).collect())
                        .unwrap_or_default();
                    let base = self.integer_base(size, signed);
                    let name = self.names.get(&t.id).cloned().unwrap_or_default();
                    self.enums.insert(
                        name,
                        EnumType {
                            size,
                            base,
                            constants,
                        },
                    );
                }
                _ => {}
            }
        }
    }

    /// The base type for an integer of `size` bytes: the C name when BTF has it, else any base
    /// type of that size and signedness, else a new one.
    fn integer_base(&mut self, size: u32, signed: bool) -> String {
        let preferred: &[&str] = match (size, signed) {
            (1, false) => &["unsigned char"],
            (1, true) => &["signed char", "char"],
            (2, false) => &["short unsigned int"],
            (2, true) => &["short int"],
            (4, false) => &["unsigned int"],
            (4, true) => &["int"],
            (8, false) => &["long unsigned int", "long long unsigned int"],
            (8, true) => &["long int", "long long int"],
            _ => &[],
        };
        let fits =
            |b: &BaseType| b.size == size && b.signed == signed && matches!(b.kind, "int" | "char");
        if let Some(name) = preferred
            .iter()
            .find(|n| self.base_types.get(**n).is_some_and(fits))
        {
            return (*name).to_string();
        }
        if let Some((name, _)) = self
            .base_types
            .iter()
            .find(|(n, b)| *n != "pointer" && fits(b))
        {
            return name.clone();
        }
        let name = format!("{}{}", if signed { "__s" } else { "__u" }, size * 8);
        self.base_types.insert(
            name.clone(),
            BaseType {
                size,
                signed,
                kind: "int",
                endian: "little",
            },
        );
        name
    }

    fn fields(&mut self, id: TypeId) -> BTreeMap<String, Field> {
        let btf = self.btf;
        let mut fields = BTreeMap::new();
        let Ok(members) = btf.members(id) else {
            return fields;
        };
        for (index, m) in members.enumerate() {
            let resolved = btf.resolve(m.type_id).unwrap_or(TypeId::VOID);
            let info = btf.info(resolved).unwrap_or(TypeInfo::Void);
            // Old BTF (no kind_flag) describes a bitfield through an int type narrower than
            // its storage.
            let bits = match (m.bitfield_size, info) {
                (0, TypeInfo::Int(int)) if u32::from(int.bits) < int.size.saturating_mul(8) => {
                    u32::from(int.bits)
                }
                (n, _) => u32::from(n),
            };
            let mut anonymous = false;
            let (offset, ty) = if bits > 0 || m.bit_offset % 8 != 0 {
                let (offset, desc) = self.bitfield(m.bit_offset, bits.max(1), resolved, info);
                (offset, desc)
            } else {
                anonymous = m.name.is_empty();
                (u64::from(m.bit_offset / 8), self.desc(m.type_id))
            };
            let name = if m.name.is_empty() {
                if !anonymous || !matches!(ty, TypeDesc::Struct { .. } | TypeDesc::Union { .. }) {
                    // Unnamed bitfields are padding: nothing to read there.
                    continue;
                }
                format!("unnamed_field_{offset:x}")
            } else {
                m.name.to_string()
            };
            // Two anonymous members can share an offset (a union of anonymous structs).
            let name = if fields.contains_key(&name) {
                format!("{name}_{index}")
            } else {
                name
            };
            fields.insert(
                name,
                Field {
                    ty,
                    offset,
                    anonymous,
                },
            );
        }
        fields
    }

    /// A bitfield: the storage unit is the member type's size, aligned down when the bits fit
    /// in that aligned unit (as compilers lay them out), else starting at the first byte.
    fn bitfield(
        &mut self,
        bit_offset: u32,
        bits: u32,
        resolved: TypeId,
        info: TypeInfo,
    ) -> (u64, TypeDesc) {
        let (size, base) = match info {
            TypeInfo::Int(int) => (int.size, self.desc(resolved)),
            TypeInfo::Enum { size, .. } | TypeInfo::Enum64 { size, .. } => {
                (size, self.desc(resolved))
            }
            _ => {
                let size = 8;
                let name = self.integer_base(size, false);
                (size, TypeDesc::Base { name })
            }
        };
        let unit_bits = size.clamp(1, 16).saturating_mul(8);
        let aligned = bit_offset - bit_offset % unit_bits;
        let (byte, position) = if bit_offset.saturating_add(bits) <= aligned + unit_bits {
            (aligned / 8, bit_offset - aligned)
        } else {
            (bit_offset / 8, bit_offset % 8)
        };
        (
            u64::from(byte),
            TypeDesc::Bitfield {
                bit_position: position,
                bit_length: bits,
                base: Box::new(base),
            },
        )
    }

    fn desc(&mut self, id: TypeId) -> TypeDesc {
        self.desc_at(id, 0)
    }

    fn desc_at(&mut self, id: TypeId, depth: usize) -> TypeDesc {
        let void = || TypeDesc::Base {
            name: "void".into(),
        };
        if depth > MAX_CHAIN {
            self.stats.cut_chains += 1;
            return void();
        }
        let btf = self.btf;
        let Ok(resolved) = btf.resolve(id) else {
            self.stats.cut_chains += 1;
            return void();
        };
        let Ok(t) = btf.get(resolved) else {
            return void();
        };
        match t.info {
            TypeInfo::Int(_) | TypeInfo::Float { .. } if !t.name.is_empty() => TypeDesc::Base {
                name: t.name.to_string(),
            },
            TypeInfo::Int(int) => TypeDesc::Base {
                name: self.integer_base(int.size, int.signed),
            },
            TypeInfo::Float { size } => TypeDesc::Base {
                name: self.integer_base(size, true),
            },
            TypeInfo::Ptr { target } => TypeDesc::Pointer {
                subtype: Box::new(self.desc_at(target, depth + 1)),
            },
            TypeInfo::Array { element, count, .. } => TypeDesc::Array {
                count,
                subtype: Box::new(self.desc_at(element, depth + 1)),
            },
            TypeInfo::Struct { .. } => TypeDesc::Struct {
                name: self.names.get(&resolved).cloned().unwrap_or_default(),
            },
            TypeInfo::Union { .. } => TypeDesc::Union {
                name: self.names.get(&resolved).cloned().unwrap_or_default(),
            },
            TypeInfo::Enum { .. } | TypeInfo::Enum64 { .. } => TypeDesc::Enum {
                name: self.names.get(&resolved).cloned().unwrap_or_default(),
            },
            TypeInfo::Fwd { is_union } => {
                let name = if t.name.is_empty() {
                    format!("unnamed_fwd_{}", resolved.get())
                } else {
                    t.name.to_string()
                };
                // A name defined elsewhere resolves to that definition, whose kind wins (only
                // hostile BTF declares `union x` for a `struct x`).
                let is_union = match self.user_kinds.get(&name) {
                    Some(&kind) => kind == "union",
                    None => {
                        self.forward.entry(name.clone()).or_insert(is_union);
                        is_union
                    }
                };
                if is_union {
                    TypeDesc::Union { name }
                } else {
                    TypeDesc::Struct { name }
                }
            }
            TypeInfo::FuncProto { .. } | TypeInfo::Func { .. } => TypeDesc::Function,
            _ => void(),
        }
    }

    /// Forward declarations without a definition become empty types, so that the name
    /// resolves (the kernel only ever points to them).
    fn define_opaque(&mut self) {
        for (name, &is_union) in &self.forward {
            if !self.user_types.contains_key(name) {
                self.stats.opaque_types += 1;
                self.user_types.insert(
                    name.clone(),
                    UserType {
                        kind: if is_union { "union" } else { "struct" },
                        size: 0,
                        fields: BTreeMap::new(),
                    },
                );
            }
        }
    }

    fn symbols(&mut self, input: &IsfInput<'_>) -> BTreeMap<String, IsfSymbol> {
        let mut out: BTreeMap<String, (char, IsfSymbol)> = BTreeMap::new();
        let mut starts: Vec<u64> = Vec::new();
        for s in input.symbols.iter() {
            if s.module.is_some() || s.name.is_empty() {
                continue;
            }
            let address = if s.is_absolute() {
                s.address
            } else {
                match s.address.checked_sub(input.kaslr_offset) {
                    Some(a) => a,
                    None => continue,
                }
            };
            if !s.is_absolute() {
                starts.push(address);
            }
            let symbol = IsfSymbol {
                address,
                ty: None,
                constant_data: None,
            };
            // Static symbols repeat names; a global definition wins over locals, else the first.
            match out.get(&s.name) {
                Some((kind, _)) if kind.is_ascii_uppercase() || s.kind.is_ascii_lowercase() => {}
                _ => {
                    out.insert(s.name.clone(), (s.kind, symbol));
                }
            }
        }
        starts.sort_unstable();
        starts.dedup();
        let mut out: BTreeMap<String, IsfSymbol> =
            out.into_iter().map(|(n, (_, s))| (n, s)).collect();

        // Per-CPU variables: BTF has their exact types.
        let btf = self.btf;
        let mut typed: Vec<(String, TypeDesc)> = Vec::new();
        for t in btf.types() {
            if t.kind() != Kind::Datasec {
                continue;
            }
            for v in btf.datasec_vars(t.id).unwrap_or(&[]) {
                let Ok(var) = btf.get(v.type_id) else {
                    continue;
                };
                if let TypeInfo::Var { target, .. } = var.info {
                    if out.contains_key(var.name) {
                        typed.push((var.name.to_string(), self.desc(target)));
                    }
                }
            }
        }
        for (name, spec) in WELL_KNOWN {
            let Some(sym) = out.get(*name) else {
                continue;
            };
            let next = starts
                .get(starts.partition_point(|&a| a <= sym.address))
                .copied();
            let gap = next.map(|n| n - sym.address);
            if let Some(mut desc) = self.spec_desc(spec, gap) {
                if let (Some(read), Spec::Array(element, 0)) = (input.memory, spec) {
                    if TRIM_ZERO_TAIL.contains(name) {
                        let live = sym.address.wrapping_add(input.kaslr_offset);
                        self.trim_zero_tail(&mut desc, element, live, read);
                    }
                }
                typed.push(((*name).to_string(), desc));
            }
        }
        for (name, desc) in typed {
            if let Some(sym) = out.get_mut(&name) {
                sym.ty = Some(desc);
            }
        }
        if let (Some(banner), Some(sym)) = (input.banner, out.get_mut("linux_banner")) {
            sym.constant_data = Some(base64::engine::general_purpose::STANDARD.encode(banner));
            if let Some(char_name) = ["char", "signed char", "unsigned char"]
                .into_iter()
                .find(|n| self.base_types.contains_key(*n))
            {
                sym.ty = Some(TypeDesc::Array {
                    count: u32::try_from(banner.len()).unwrap_or(u32::MAX),
                    subtype: Box::new(TypeDesc::Base {
                        name: char_name.to_string(),
                    }),
                });
            }
        }
        out
    }

    /// The descriptor for a well-known declaration, if this kernel's BTF has its types.
    fn spec_desc(&mut self, spec: &Spec, gap: Option<u64>) -> Option<TypeDesc> {
        Some(match spec {
            Spec::Struct(name) => {
                let id = self.btf.find_struct(name)?;
                TypeDesc::Struct {
                    name: self.names.get(&id)?.clone(),
                }
            }
            Spec::Base(name) => {
                self.base_types.get(*name)?;
                TypeDesc::Base {
                    name: (*name).to_string(),
                }
            }
            Spec::Ptr(inner) => TypeDesc::Pointer {
                subtype: Box::new(self.spec_desc(inner, None)?),
            },
            Spec::Array(inner, count) => {
                let element = self.spec_desc(inner, None)?;
                let count = if *count > 0 {
                    *count
                } else {
                    let size = self.spec_size(inner)?;
                    let n = gap? / size;
                    u32::try_from(n.clamp(1, MAX_GAP_COUNT)).ok()?
                };
                TypeDesc::Array {
                    count,
                    subtype: Box::new(element),
                }
            }
            Spec::Function => TypeDesc::Function,
        })
    }

    fn trim_zero_tail(&self, desc: &mut TypeDesc, element: &Spec, live: u64, read: ReadKernel<'_>) {
        let TypeDesc::Array { count, .. } = desc else {
            return;
        };
        let Some(size) = self.spec_size(element) else {
            return;
        };
        let Some(total) = size
            .checked_mul(u64::from(*count))
            .filter(|&t| t <= MAX_TRIM_READ)
            .and_then(|t| usize::try_from(t).ok())
        else {
            return;
        };
        let mut raw = vec![0u8; total];
        if !read(live, &mut raw) {
            return;
        }
        let Ok(step) = usize::try_from(size) else {
            return;
        };
        let used = raw
            .chunks(step)
            .rposition(|e| e.iter().any(|&b| b != 0))
            .map_or(0, |last| last + 1);
        *count = u32::try_from(used).unwrap_or(*count).max(1);
    }

    fn spec_size(&self, spec: &Spec) -> Option<u64> {
        match spec {
            Spec::Struct(name) => self.btf.size_of(self.btf.find_struct(name)?).ok(),
            Spec::Base(name) => self.base_types.get(*name).map(|b| u64::from(b.size)),
            Spec::Ptr(_) => Some(u64::from(self.btf.pointer_size())),
            Spec::Array(..) | Spec::Function => None,
        }
        .filter(|&s| s > 0)
    }
}

#[cfg(test)]
mod tests;
