//! The baseline on disk: a JSON document plus a binary sidecar for large byte captures.
//!
//! `<name>.json` (any path) holds everything a person may want to read or diff: the kernel's
//! identity, when and with which KASLR slide the baseline was taken, and each check's state.
//! Byte copies of kernel text and read-only data (megabytes) go to `<path>.bin` next to it:
//!
//! ```text
//! offset 0   8 bytes  magic "KVMABLB1"
//! offset 8   8 bytes  little-endian length of the data area
//! offset 16  ...      the blobs, back to back, each at the offset its record names
//! ```
//!
//! The JSON lists every blob with its offset (from the start of the data area), length and
//! BLAKE3 hash; loading verifies each hash, so a sidecar that was swapped, truncated or edited
//! is refused instead of silently lowering the bar.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kvmaccess_linux::Kernel;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `format` field of every baseline.
pub const BASELINE_FORMAT: &str = "kvmaccess-integrity-baseline";
/// The version this crate writes and reads.
pub const BASELINE_VERSION: u32 = 1;
/// First 8 bytes of the sidecar.
pub const SIDECAR_MAGIC: &[u8; 8] = b"KVMABLB1";
/// Largest sidecar accepted (a kernel's text and rodata are tens of MiB).
const MAX_SIDECAR: u64 = 1 << 30;

/// Where one blob lives in the sidecar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    /// Name the owning check gave it (`text/kernel text`, `syscalls/x64_sys_call`, ...).
    pub name: String,
    /// Offset from the start of the sidecar's data area.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// BLAKE3 of the bytes, hex.
    pub blake3: String,
}

/// Blob storage of a baseline: the records and the bytes.
#[derive(Clone, Debug, Default)]
pub struct Blobs {
    records: Vec<BlobRecord>,
    data: Vec<u8>,
}

impl Blobs {
    /// Store bytes under a name (replacing nothing: names are unique per check by construction;
    /// a repeated name shadows the earlier blob on lookup).
    pub fn put(&mut self, name: impl Into<String>, bytes: &[u8]) {
        let offset = u64::try_from(self.data.len()).unwrap_or(u64::MAX);
        self.data.extend_from_slice(bytes);
        self.records.push(BlobRecord {
            name: name.into(),
            offset,
            len: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            blake3: blake3::hash(bytes).to_hex().to_string(),
        });
    }

    /// The bytes stored under a name.
    pub fn get(&self, name: &str) -> Result<&[u8]> {
        let record = self
            .records
            .iter()
            .rev()
            .find(|r| r.name == name)
            .ok_or_else(|| Error::MissingBlob(name.to_string()))?;
        let range = usize::try_from(record.offset)
            .ok()
            .zip(usize::try_from(record.len).ok())
            .and_then(|(start, len)| Some(start..start.checked_add(len)?));
        range
            .and_then(|r| self.data.get(r))
            .ok_or_else(|| Error::MissingBlob(name.to_string()))
    }

    /// The records.
    pub fn records(&self) -> &[BlobRecord] {
        &self.records
    }

    /// Total bytes stored.
    pub fn total_len(&self) -> usize {
        self.data.len()
    }
}

/// Everything captured about a kernel at one moment, to compare later states against.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Baseline {
    /// Always [`BASELINE_FORMAT`].
    pub format: String,
    /// Format version ([`BASELINE_VERSION`]).
    pub version: u32,
    /// Kernel release (`uname -r`).
    pub release: String,
    /// GNU build id of vmlinux (hex); a check refuses a guest with another one.
    pub build_id: Option<String>,
    /// When the baseline was taken (RFC 3339, UTC).
    pub created: String,
    /// KASLR slide at capture (informational: everything else is stored relative to it).
    #[serde(with = "kvmaccess_core::hex")]
    pub kaslr_offset: u64,
    /// Number of vCPUs at capture.
    pub vcpus: usize,
    /// State of each check, by check id.
    pub checks: BTreeMap<String, serde_json::Value>,
    /// The blobs in the sidecar.
    pub blobs: Vec<BlobRecord>,
    /// The sidecar's bytes (not in the JSON).
    #[serde(skip)]
    data: Vec<u8>,
}

impl Baseline {
    /// An empty baseline for a kernel; checks fill `checks` and `blobs`.
    pub(crate) fn new(kernel: &Kernel<'_>, vcpus: usize, created: SystemTime) -> Self {
        Self {
            format: BASELINE_FORMAT.to_string(),
            version: BASELINE_VERSION,
            release: kernel.release().to_string(),
            build_id: kernel.build_id().map(str::to_string),
            created: crate::time::rfc3339(created),
            kaslr_offset: kernel.layout().kaslr_offset,
            vcpus,
            checks: BTreeMap::new(),
            blobs: Vec::new(),
            data: Vec::new(),
        }
    }

    pub(crate) fn set_blobs(&mut self, blobs: Blobs) {
        self.blobs = blobs.records;
        self.data = blobs.data;
    }

    /// The bytes of a blob.
    pub fn blob(&self, name: &str) -> Result<&[u8]> {
        let record = self
            .blobs
            .iter()
            .rev()
            .find(|r| r.name == name)
            .ok_or_else(|| Error::MissingBlob(name.to_string()))?;
        let start = usize::try_from(record.offset).ok();
        let len = usize::try_from(record.len).ok();
        start
            .zip(len)
            .and_then(|(s, l)| self.data.get(s..s.checked_add(l)?))
            .ok_or_else(|| Error::MissingBlob(name.to_string()))
    }

    /// Refuse a guest that runs another build: addresses and bytes of one build say nothing
    /// about another. Without build ids on both sides the releases must match.
    pub fn check_compatible(&self, kernel: &Kernel<'_>) -> Result<()> {
        let same = match (&self.build_id, kernel.build_id()) {
            (Some(ours), Some(theirs)) => ours.eq_ignore_ascii_case(theirs),
            _ => self.release == kernel.release(),
        };
        if same {
            return Ok(());
        }
        Err(Error::BuildMismatch {
            baseline_release: self.release.clone(),
            baseline_build_id: self.build_id.clone().unwrap_or_else(|| "unknown".into()),
            guest_release: kernel.release().to_string(),
            guest_build_id: kernel.build_id().unwrap_or("unknown").to_string(),
        })
    }

    /// The sidecar path of a baseline path: `<path>.bin`.
    pub fn sidecar_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".bin");
        PathBuf::from(name)
    }

    /// Serialise to JSON (the sidecar is separate: [`Baseline::save`]).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::json("baseline", e))
    }

    /// Parse JSON, checking format and version; blobs stay empty until
    /// [`Baseline::attach_sidecar`].
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::BadBaseline {
                path: path.to_path_buf(),
                reason: format!("not JSON: {e}"),
            })?;
        let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
        if format != BASELINE_FORMAT {
            return Err(Error::BadBaseline {
                path: path.to_path_buf(),
                reason: format!("format is {format:?}, expected {BASELINE_FORMAT:?}"),
            });
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(u64::from(BASELINE_VERSION)) {
            return Err(Error::BadBaseline {
                path: path.to_path_buf(),
                reason: format!(
                    "version {version:?} is not supported (this build reads version \
                     {BASELINE_VERSION})"
                ),
            });
        }
        serde_json::from_value(value).map_err(|e| Error::BadBaseline {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Write `path` (JSON) and `path.bin` (sidecar, only when there are blobs).
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| Error::Io { path: p, source }
        };
        let sidecar = Self::sidecar_path(path);
        if !self.blobs.is_empty() {
            let mut bytes = Vec::with_capacity(self.data.len() + 16);
            bytes.extend_from_slice(SIDECAR_MAGIC);
            bytes.extend_from_slice(&u64::try_from(self.data.len()).unwrap_or(0).to_le_bytes());
            bytes.extend_from_slice(&self.data);
            std::fs::write(&sidecar, bytes).map_err(io(&sidecar))?;
        }
        std::fs::write(path, self.to_json()? + "\n").map_err(io(path))
    }

    /// Read `path` and its sidecar, verifying every blob's hash.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut baseline = Self::from_json(&text, path)?;
        if !baseline.blobs.is_empty() {
            let sidecar = Self::sidecar_path(path);
            let bytes = std::fs::read(&sidecar).map_err(|source| Error::Io {
                path: sidecar.clone(),
                source,
            })?;
            baseline.attach_sidecar(&bytes, &sidecar)?;
        }
        Ok(baseline)
    }

    /// Take the blobs' bytes from sidecar file contents, verifying magic, length and hashes.
    pub fn attach_sidecar(&mut self, bytes: &[u8], path: &Path) -> Result<()> {
        let bad = |reason: String| Error::Sidecar {
            path: path.to_path_buf(),
            reason,
        };
        let header = bytes
            .get(..16)
            .ok_or_else(|| bad(format!("{} bytes: shorter than its header", bytes.len())))?;
        if &header[..8] != SIDECAR_MAGIC {
            return Err(bad("wrong magic (not a kvmaccess baseline sidecar)".into()));
        }
        let mut len_raw = [0u8; 8];
        len_raw.copy_from_slice(&header[8..16]);
        let len = u64::from_le_bytes(len_raw);
        let data = &bytes[16..];
        if len > MAX_SIDECAR || Some(data.len()) != usize::try_from(len).ok() {
            return Err(bad(format!(
                "header says {len} data bytes, the file holds {}",
                data.len()
            )));
        }
        for record in &self.blobs {
            let slice = usize::try_from(record.offset)
                .ok()
                .zip(usize::try_from(record.len).ok())
                .and_then(|(s, l)| data.get(s..s.checked_add(l)?))
                .ok_or_else(|| {
                    bad(format!(
                        "blob {:?} ({} bytes at {}) lies outside the {len} data bytes",
                        record.name, record.len, record.offset
                    ))
                })?;
            let hash = blake3::hash(slice).to_hex();
            if !hash.as_str().eq_ignore_ascii_case(&record.blake3) {
                return Err(bad(format!(
                    "blob {:?} has BLAKE3 {hash}, the baseline records {}",
                    record.name, record.blake3
                )));
            }
        }
        self.data = data.to_vec();
        Ok(())
    }
}
