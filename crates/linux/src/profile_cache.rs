//! The profile cache: what is expensive to derive from a kernel (decoded kallsyms names, the
//! symbol and BTF name indexes), kept on disk per kernel build so that a second attach to the
//! same build skips the work.
//!
//! Nothing in it is trusted. Entries are keyed by the GNU build ID from VMCOREINFO, but a guest
//! writes its own VMCOREINFO, so the key only says where to look: every cached result is tied to
//! a BLAKE3 digest of the guest bytes it was derived from (the kallsyms name arrays, the BTF
//! blob), and is used only after the same bytes, read afresh from the guest, hash the same. A
//! guest that claims another build's ID, or a kernel whose tables changed since, gets a miss and
//! a fresh derivation, never somebody else's names. Everything that moves with KASLR
//! (addresses) is always computed from the live guest. Cached indexes are checked in one linear
//! pass before use.
//!
//! The file itself is checked too: a magic, a format version, a size bound, a BLAKE3 checksum
//! over header and payload, strict parsing of every field, and owner/permission checks on the
//! file and its directory (no other user may have written it). Files are written to a temporary
//! name and renamed, so a reader sees a whole old file or a whole new one.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvmaccess_core::Gpa;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::kallsyms::{self, CachedNames, NamesSource};
use crate::symbols::Symbol;

/// First bytes of every cache file.
pub const MAGIC: [u8; 8] = *b"KVMAPRF\0";

/// Format version; a file of any other version is ignored (and replaced on the next miss).
pub const VERSION: u16 = 1;

/// Largest file read. A kernel's entry is a few MiB (100k symbols); 2M symbols of 512 bytes
/// would not fit, but no kernel has names that long on average.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Header: magic, version, kind, reserved, VMCOREINFO address, payload length, checksum.
pub const HEADER_LEN: usize = 8 + 2 + 1 + 1 + 8 + 8 + 32;

/// Bytes of the header covered by the checksum (all but the checksum itself).
const CHECKED_HEADER: usize = HEADER_LEN - 32;

/// Longest build ID accepted (the VMCOREINFO parser's own bound).
const MAX_BUILD_ID: usize = 128;

/// Cache files whose headers are read when looking for a remembered VMCOREINFO address.
const MAX_HINT_FILES: usize = 64;

/// Prefix of the hashed BTF bytes.
const BTF_DOMAIN: &[u8] = b"kvmaccess btf v1\0";

/// Encoded "no address".
const NO_GPA: u64 = u64::MAX;

/// Which part of a profile a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    /// Decoded kallsyms names and the symbol indexes.
    Symbols,
    /// The BTF blob's identity and name index.
    Types,
}

impl EntryKind {
    fn code(self) -> u8 {
        match self {
            Self::Symbols => 1,
            Self::Types => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Symbols),
            2 => Some(Self::Types),
            _ => None,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Symbols => "symbols",
            Self::Types => "types",
        }
    }
}

/// The symbols part of a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolsEntry {
    /// The build ID the entry is filed under.
    pub build_id: String,
    /// The kernel release, as VMCOREINFO gave it.
    pub release: String,
    /// Where VMCOREINFO was found last time: probed first on the next attach.
    pub vmcoreinfo_gpa: Option<Gpa>,
    /// The decoded names and the bytes they came from.
    pub names: CachedNames,
    /// [`crate::SymbolTable::name_index`] of the table built from them.
    pub by_name: Vec<u32>,
    /// [`crate::SymbolTable::address_index`] of that table.
    pub by_address: Vec<u32>,
}

/// The types part of a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypesEntry {
    /// The build ID the entry is filed under.
    pub build_id: String,
    /// The kernel release.
    pub release: String,
    /// [`btf_digest`] of the BTF blob.
    pub digest: [u8; 32],
    /// Length of the blob.
    pub blob_len: u64,
    /// [`kvmaccess_btf::Btf::name_index`] of the parsed blob.
    pub name_index: Vec<u32>,
}

/// One cache file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheFile {
    /// A `.symbols` file.
    Symbols(SymbolsEntry),
    /// A `.types` file.
    Types(TypesEntry),
}

/// BLAKE3 of a BTF blob as the types entry records it.
pub fn btf_digest(blob: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(BTF_DOMAIN);
    hasher.update(blob);
    *hasher.finalize().as_bytes()
}

fn format_error(reason: impl Into<String>) -> Error {
    Error::Cache {
        path: "(contents)".into(),
        reason: reason.into(),
    }
}

/// Whether `id` can name a file: lowercase hex, as the VMCOREINFO parser stores it.
fn plain_build_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_BUILD_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A little-endian reader that fails instead of running past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format_error(format!(
                    "truncated: {what} needs {len} bytes at offset {}, {} left",
                    self.at,
                    self.bytes.len().saturating_sub(self.at)
                ))
            })?;
        let piece = self.bytes.get(self.at..end).unwrap_or_default();
        self.at = end;
        Ok(piece)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn left(&self) -> usize {
        self.bytes.len().saturating_sub(self.at)
    }

    /// A string with a one-byte length.
    fn short_str(&mut self, what: &str) -> Result<String> {
        let len = usize::from(self.u8(what)?);
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| format_error(format!("{what} is not UTF-8")))
    }

    /// A count of `unit`-byte items, refused when the rest of the input cannot hold them (so a
    /// forged count never sizes an allocation).
    fn count(&mut self, what: &str, unit: usize, limit: usize) -> Result<usize> {
        let count = usize::try_from(self.u32(what)?).unwrap_or(usize::MAX);
        if count > limit || count.saturating_mul(unit) > self.left() {
            return Err(format_error(format!(
                "{what} {count} exceeds the limit ({limit}) or the {} bytes left",
                self.left()
            )));
        }
        Ok(count)
    }

    fn u32_array(&mut self, what: &str, limit: usize) -> Result<Vec<u32>> {
        let count = self.count(what, 4, limit)?;
        let raw = self.take(count.saturating_mul(4), what)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

fn put_short_str(out: &mut Vec<u8>, text: &str) {
    // Callers pass build IDs (<= 128 bytes) and releases (<= 64); longer text is cut at a
    // character boundary rather than encoded wrongly.
    let mut end = text.len().min(usize::from(u8::MAX));
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.get(..end).unwrap_or_default();
    out.push(u8::try_from(cut.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(cut.as_bytes());
}

fn put_u32_array(out: &mut Vec<u8>, values: &[u32]) {
    out.extend_from_slice(
        &u32::try_from(values.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for value in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn checksum(header: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(header);
    hasher.update(payload);
    *hasher.finalize().as_bytes()
}

/// The fields of a header, read without checking the checksum (only to find hints).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the file holds.
    pub kind: EntryKind,
    /// The remembered VMCOREINFO address.
    pub vmcoreinfo_gpa: Option<Gpa>,
    /// Payload length.
    pub payload_len: u64,
}

impl Header {
    /// Reads a header; `None` for anything that is not a current-version cache file.
    pub fn peek(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader { bytes, at: 0 };
        if r.array::<8>("magic").ok()? != MAGIC || r.u16("version").ok()? != VERSION {
            return None;
        }
        let kind = EntryKind::from_code(r.u8("kind").ok()?)?;
        if r.u8("reserved").ok()? != 0 {
            return None;
        }
        let gpa = r.u64("address").ok()?;
        let payload_len = r.u64("payload length").ok()?;
        Some(Self {
            kind,
            vmcoreinfo_gpa: (gpa != NO_GPA).then_some(Gpa(gpa)),
            payload_len,
        })
    }
}

impl CacheFile {
    /// The build ID the entry is filed under.
    pub fn build_id(&self) -> &str {
        match self {
            Self::Symbols(e) => &e.build_id,
            Self::Types(e) => &e.build_id,
        }
    }

    /// What the file holds.
    pub fn kind(&self) -> EntryKind {
        match self {
            Self::Symbols(_) => EntryKind::Symbols,
            Self::Types(_) => EntryKind::Types,
        }
    }

    /// Parses and checks a whole file. Any deviation (size, magic, version, checksum, a field
    /// out of bounds, bytes left over) is an error: a cache file is either exactly what we
    /// wrote or ignored.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if u64::try_from(bytes.len()).map_or(true, |len| len > MAX_FILE_BYTES) {
            return Err(format_error(format!(
                "{} bytes exceed the {MAX_FILE_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let header =
            Header::peek(bytes).ok_or_else(|| format_error("not a cache file of this version"))?;
        let (head, rest) = bytes
            .split_at_checked(HEADER_LEN)
            .ok_or_else(|| format_error("truncated header"))?;
        let stored_sum = head.get(CHECKED_HEADER..).unwrap_or_default();
        if u64::try_from(rest.len()).ok() != Some(header.payload_len) {
            return Err(format_error(format!(
                "payload is {} bytes, the header says {}",
                rest.len(),
                header.payload_len
            )));
        }
        if checksum(head.get(..CHECKED_HEADER).unwrap_or_default(), rest) != stored_sum {
            return Err(format_error("checksum mismatch (corrupt or edited)"));
        }
        let mut r = Reader { bytes: rest, at: 0 };
        let build_id = r.short_str("build id")?;
        if !plain_build_id(&build_id) {
            return Err(format_error("build id is not lowercase hex"));
        }
        let release = r.short_str("release")?;
        let file = match header.kind {
            EntryKind::Symbols => CacheFile::Symbols(parse_symbols(
                &mut r,
                build_id,
                release,
                header.vmcoreinfo_gpa,
            )?),
            EntryKind::Types => {
                if header.vmcoreinfo_gpa.is_some() {
                    return Err(format_error("a types entry with a VMCOREINFO address"));
                }
                let digest = r.array::<32>("BTF digest")?;
                let blob_len = r.u64("BTF length")?;
                if blob_len == 0 || blob_len > crate::MAX_BTF_BYTES {
                    return Err(format_error(format!("BTF length {blob_len}")));
                }
                let name_index = r.u32_array("BTF name index", kvmaccess_btf::MAX_TYPES)?;
                CacheFile::Types(TypesEntry {
                    build_id,
                    release,
                    digest,
                    blob_len,
                    name_index,
                })
            }
        };
        if r.left() != 0 {
            return Err(format_error(format!("{} bytes after the entry", r.left())));
        }
        Ok(file)
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        put_short_str(&mut payload, self.build_id());
        let gpa = match self {
            Self::Symbols(e) => {
                put_short_str(&mut payload, &e.release);
                encode_symbols(&mut payload, e);
                e.vmcoreinfo_gpa.map_or(NO_GPA, |g| g.0)
            }
            Self::Types(e) => {
                put_short_str(&mut payload, &e.release);
                payload.extend_from_slice(&e.digest);
                payload.extend_from_slice(&e.blob_len.to_le_bytes());
                put_u32_array(&mut payload, &e.name_index);
                NO_GPA
            }
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.kind().code());
        out.push(0);
        out.extend_from_slice(&gpa.to_le_bytes());
        out.extend_from_slice(
            &u64::try_from(payload.len())
                .unwrap_or(u64::MAX)
                .to_le_bytes(),
        );
        let sum = checksum(&out, &payload);
        out.extend_from_slice(&sum);
        out.extend_from_slice(&payload);
        out
    }
}

fn parse_symbols(
    r: &mut Reader<'_>,
    build_id: String,
    release: String,
    vmcoreinfo_gpa: Option<Gpa>,
) -> Result<SymbolsEntry> {
    let digest = r.array::<32>("names digest")?;
    let count = r.u32("symbol count")?;
    let token_table_len = r.u32("token table length")?;
    let names_len = r.u32("names length")?;
    let source = NamesSource {
        digest,
        count,
        token_table_len,
        names_len,
    };
    let max = usize::try_from(kallsyms::MAX_SYMBOLS).unwrap_or(usize::MAX);
    // A name takes at least four bytes: type letter, length, one character.
    let count = r.count("symbol count", 4, max)?;
    if count == 0 {
        return Err(format_error("no symbols"));
    }
    let mut symbols = Vec::with_capacity(count);
    for index in 0..count {
        let kind = r.u8("type letter")?;
        if !kind.is_ascii_graphic() {
            return Err(format_error(format!(
                "symbol {index}: type letter {kind:#x}"
            )));
        }
        let len = usize::from(r.u16("name length")?);
        if len == 0 || len > kallsyms::MAX_NAME {
            return Err(format_error(format!("symbol {index}: name of {len} bytes")));
        }
        let raw = r.take(len, "name")?;
        let name = std::str::from_utf8(raw)
            .map_err(|_| format_error(format!("symbol {index}: name is not UTF-8")))?;
        symbols.push(Symbol::new(name, 0, char::from(kind)));
    }
    let by_name = r.u32_array("name index", count)?;
    let by_address = r.u32_array("address index", count)?;
    Ok(SymbolsEntry {
        build_id,
        release,
        vmcoreinfo_gpa,
        names: CachedNames { source, symbols },
        by_name,
        by_address,
    })
}

fn encode_symbols(out: &mut Vec<u8>, e: &SymbolsEntry) {
    let source = &e.names.source;
    out.extend_from_slice(&source.digest);
    out.extend_from_slice(&source.count.to_le_bytes());
    out.extend_from_slice(&source.token_table_len.to_le_bytes());
    out.extend_from_slice(&source.names_len.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(e.names.symbols.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for symbol in &e.names.symbols {
        // Decoded names are at most MAX_NAME bytes and type letters ASCII; anything else
        // (impossible from the decoder) is written so that parsing rejects the file.
        out.push(u8::try_from(u32::from(symbol.kind)).unwrap_or(0));
        out.extend_from_slice(&u16::try_from(symbol.name.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(symbol.name.as_bytes());
    }
    put_u32_array(out, &e.by_name);
    put_u32_array(out, &e.by_address);
}

/// The effective uid of this process, from `/proc/self/status` (this crate has no unsafe code
/// to call `geteuid`). `None` without procfs: the permission checks still apply.
fn our_uid() -> Option<u32> {
    static UID: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UID.get_or_init(read_uid)
}

fn read_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Refuses a directory other users could have written to.
fn check_dir(dir: &Path) -> Result<()> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::Cache {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let reason = if !meta.is_dir() {
        Some("not a directory".to_string())
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "writable by other users (mode {:o}); not used",
            meta.mode() & 0o7777
        ))
    } else if our_uid().is_some_and(|uid| meta.uid() != uid && meta.uid() != 0) {
        Some(format!("owned by uid {}, not us; not used", meta.uid()))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::Cache {
            path: dir.display().to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// A directory of cache files, one `.symbols` and one `.types` file per kernel build ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileCache {
    dir: PathBuf,
}

impl ProfileCache {
    /// A cache in `dir` (created on the first write, mode 0700).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `$XDG_CACHE_HOME/kvmaccess/profiles`, else `~/.cache/kvmaccess/profiles`. The XDG
    /// specification says to ignore a relative `XDG_CACHE_HOME`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .filter(|p| p.is_absolute())
                    .map(|home| home.join(".cache"))
            })?;
        Some(base.join("kvmaccess").join("profiles"))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file for one part of one build; `None` for a build ID that is not plain hex.
    pub fn path(&self, build_id: &str, kind: EntryKind) -> Option<PathBuf> {
        plain_build_id(build_id).then(|| self.dir.join(format!("{build_id}.{}", kind.extension())))
    }

    /// The entry for `build_id`, if there is a usable one. `Ok(None)`: no file. `Err`: a file
    /// that cannot be used (unreadable, not ours, corrupt, another build's); the caller
    /// derives afresh and overwrites it.
    pub fn load(&self, build_id: &str, kind: EntryKind) -> Result<Option<CacheFile>> {
        let path = self.path(build_id, kind).ok_or_else(|| Error::Cache {
            path: self.dir.display().to_string(),
            reason: format!("build id {build_id:?} is not plain hex"),
        })?;
        let bad = |reason: String| Error::Cache {
            path: path.display().to_string(),
            reason,
        };
        if !self.dir.is_dir() {
            return Ok(None);
        }
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.mode() & 0o022 != 0 || our_uid().is_some_and(|uid| meta.uid() != uid) {
            return Err(bad(format!(
                "owned by uid {} with mode {:o}: not written by us; ignored",
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
        check_dir(&self.dir)?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(bad(format!(
                "{} bytes exceed the {MAX_FILE_BYTES}-byte limit",
                meta.len()
            )));
        }
        let file = std::fs::File::open(&path).map_err(|e| bad(e.to_string()))?;
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        // Bounded even if the file grows between the size check and the read.
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(e.to_string()))?;
        let parsed = CacheFile::parse(&bytes).map_err(|e| match e {
            Error::Cache { reason, .. } => bad(reason),
            other => bad(other.to_string()),
        })?;
        if parsed.build_id() != build_id || parsed.kind() != kind {
            return Err(bad(format!(
                "holds the {:?} entry of build {}",
                parsed.kind(),
                parsed.build_id()
            )));
        }
        Ok(Some(parsed))
    }

    /// Writes an entry: a temporary file (0600) in the same directory, renamed over the old
    /// one. Returns the file's path.
    pub fn store(&self, file: &CacheFile) -> Result<PathBuf> {
        let path = self
            .path(file.build_id(), file.kind())
            .ok_or_else(|| Error::Cache {
                path: self.dir.display().to_string(),
                reason: format!("build id {:?} is not plain hex", file.build_id()),
            })?;
        let io = |what: &str, e: std::io::Error| Error::Cache {
            path: path.display().to_string(),
            reason: format!("{what}: {e}"),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| io("creating the directory", e))?;
        check_dir(&self.dir)?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .subsec_nanos();
        let temp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
            std::process::id(),
            nanos
        ));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| io("creating a temporary file", e))
            .and_then(|mut out| {
                // No fsync: after a crash a torn file fails its checksum and is re-derived,
                // which is cheaper than syncing on every miss.
                out.write_all(&file.encode())
                    .map_err(|e| io("writing a temporary file", e))
            })
            .and_then(|()| std::fs::rename(&temp, &path).map_err(|e| io("renaming", e)));
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written.map(|()| path)
    }

    /// Remembered VMCOREINFO addresses: `(build ID, address)` from the headers of up to
    /// [`MAX_HINT_FILES`] symbols files. Unchecked: whatever is found at an address is
    /// validated like a scan's candidate.
    pub fn hints(&self) -> Vec<(String, Gpa)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut hints = Vec::new();
        for entry in entries.flatten().take(MAX_HINT_FILES) {
            let name = entry.file_name();
            let Some(build_id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".symbols"))
                .filter(|id| plain_build_id(id))
            else {
                continue;
            };
            let mut head = [0u8; HEADER_LEN];
            let read = std::fs::File::open(entry.path()).and_then(|mut f| f.read_exact(&mut head));
            if read.is_err() {
                continue;
            }
            if let Some(Header {
                kind: EntryKind::Symbols,
                vmcoreinfo_gpa: Some(gpa),
                ..
            }) = Header::peek(&head)
            {
                hints.push((build_id.to_string(), gpa));
            }
        }
        hints
    }
}

/// What the profile cache did for one part of the profile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum CacheUse {
    /// Not consulted (the types were not loaded, or there is no build ID).
    #[default]
    Unused,
    /// Taken from the cache after the guest's source bytes hashed the same.
    Hit {
        /// Reading and checking the cache file.
        load: Duration,
        /// Reading the source bytes from the guest and hashing them.
        validate: Duration,
    },
    /// Derived from guest memory.
    Miss {
        /// Why the cache could not be used.
        reason: String,
        /// Whether a fresh entry was written.
        stored: bool,
    },
}

/// What the profile cache did during discovery (and type loading).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CacheReport {
    /// The cache directory.
    pub dir: PathBuf,
    /// The build ID entries are filed under; `None` (no caching) when the kernel records none.
    pub build_id: Option<String>,
    /// VMCOREINFO was found at the address remembered from an earlier attach (no scan).
    pub vmcoreinfo_remembered: bool,
    /// The kallsyms names and symbol indexes.
    pub symbols: CacheUse,
    /// The BTF name index.
    pub types: CacheUse,
}

#[cfg(test)]
mod tests;
