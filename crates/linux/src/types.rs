//! The kernel's own type information: the BTF blob between `__start_BTF` and `__stop_BTF`,
//! read from guest memory and parsed.

use std::time::Instant;

use kvmaccess_btf::Btf;
use kvmaccess_core::Gva;

use crate::profile_cache::{btf_digest, CacheFile, CacheUse, EntryKind, TypesEntry};
use crate::{Error, Kernel, Result};

/// Largest BTF blob accepted; the 6.1 kernel's is 4 MiB, a guest claiming more is lying.
pub const MAX_BTF_BYTES: u64 = 64 << 20;

/// The parsed kernel BTF, where it came from, and how long it took to get it.
#[derive(Debug)]
pub struct KernelTypes {
    /// The parsed type information.
    pub btf: Btf,
    /// Where it came from: the kernel's BTF in guest memory, a vmlinux's `.BTF` section, or a
    /// vmlinux's DWARF (for `info` and error messages).
    pub origin: String,
    /// Bytes of BTF parsed.
    pub bytes: u64,
    /// Time to read the blob and parse it.
    pub elapsed: std::time::Duration,
}

impl KernelTypes {
    /// Parses a BTF blob; `origin` says where it came from (in errors, and as
    /// [`origin`](Self::origin)).
    pub fn from_btf_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let started = Instant::now();
        let btf = Btf::parse(bytes).map_err(|source| Error::Btf {
            what: origin.to_string(),
            source,
        })?;
        Ok(Self {
            btf,
            origin: origin.to_string(),
            bytes: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            elapsed: started.elapsed(),
        })
    }

    /// Byte offset of `path` (dotted, through anonymous members) in `type_name`, with an error
    /// naming both when the kernel lacks it.
    pub fn offset_of(&self, type_name: &str, path: &str) -> Result<u64> {
        self.btf
            .offset_of(type_name, path)
            .map_err(|source| Error::Btf {
                what: format!("{type_name}.{path}"),
                source,
            })
    }

    /// Size of a struct, union or typedef by name.
    pub fn size_of(&self, type_name: &str) -> Result<u64> {
        let id = self
            .btf
            .find_composite(type_name)
            .ok_or_else(|| Error::BtfMissingType(type_name.to_string()))?;
        self.btf.size_of(id).map_err(|source| Error::Btf {
            what: format!("size of {type_name}"),
            source,
        })
    }
}

impl Kernel<'_> {
    /// Reads and parses the kernel's BTF. Kernels built without CONFIG_DEBUG_INFO_BTF have no
    /// `__start_BTF`; the error says what to pass instead.
    pub fn load_types(&self) -> Result<KernelTypes> {
        let started = Instant::now();
        let (start, stop) = match (self.symbol("__start_BTF"), self.symbol("__stop_BTF")) {
            (Ok(start), Ok(stop)) => (start, stop),
            _ => {
                return Err(Error::NoBtf(
                    "the kernel has no __start_BTF/__stop_BTF symbols (built without \
                     CONFIG_DEBUG_INFO_BTF); pass a vmlinux with BTF or DWARF (--vmlinux)"
                        .to_string(),
                ))
            }
        };
        let len = stop
            .checked_sub(start)
            .filter(|len| (1..=MAX_BTF_BYTES).contains(len))
            .ok_or_else(|| {
                Error::NoBtf(format!(
                    "__start_BTF {start:#x} .. __stop_BTF {stop:#x} is not a plausible BTF blob \
                     (at most {MAX_BTF_BYTES} bytes)"
                ))
            })?;
        let mut blob = vec![
            0u8;
            usize::try_from(len).map_err(|_| Error::NoBtf(format!(
                "{len} bytes do not fit in memory"
            )))?
        ];
        self.read(Gva(start), &mut blob)?;
        let origin = format!("the kernel BTF at {start:#x} ({len} bytes)");
        let mut types = match self.cache_key() {
            Some((store, build_id)) => {
                let (types, outcome) = self.parse_btf_cached(store, build_id, &blob, &origin)?;
                self.record_types_cache(outcome);
                types
            }
            None => KernelTypes::from_btf_bytes(&blob, &origin)?,
        };
        types.elapsed = started.elapsed();
        Ok(types)
    }

    /// Parses the blob with the name index cached for this build when the blob hashes as it
    /// did then; otherwise parses it in full and caches its index.
    fn parse_btf_cached(
        &self,
        store: &crate::ProfileCache,
        build_id: &str,
        blob: &[u8],
        origin: &str,
    ) -> Result<(KernelTypes, CacheUse)> {
        let started = Instant::now();
        let entry = store.load(build_id, EntryKind::Types);
        let load = started.elapsed();
        let started = Instant::now();
        let digest = btf_digest(blob);
        let validate = started.elapsed();
        let blob_len = u64::try_from(blob.len()).unwrap_or(u64::MAX);
        let hint = match entry {
            Ok(Some(CacheFile::Types(entry)))
                if entry.digest == digest
                    && entry.blob_len == blob_len
                    && entry.release == self.profile.release =>
            {
                Ok(entry.name_index)
            }
            Ok(Some(_)) => {
                Err("the guest's BTF differs from the cached entry's source".to_string())
            }
            Ok(None) => Err("no entry for this build yet".to_string()),
            Err(e) => {
                tracing::debug!("profile cache entry ignored: {e}");
                Err(e.to_string())
            }
        };
        let parsed = Btf::parse_with_name_index(blob, hint.as_deref().unwrap_or_default());
        let (btf, hinted) = parsed.map_err(|source| Error::Btf {
            what: origin.to_string(),
            source,
        })?;
        let outcome = if hinted {
            CacheUse::Hit { load, validate }
        } else {
            let reason = hint
                .err()
                .unwrap_or_else(|| "the cached name index does not fit the BTF".to_string());
            let entry = CacheFile::Types(TypesEntry {
                build_id: build_id.to_string(),
                release: self.profile.release.clone(),
                digest,
                blob_len,
                name_index: btf.name_index().to_vec(),
            });
            let stored = match store.store(&entry) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!("profile cache not written: {e}");
                    false
                }
            };
            CacheUse::Miss { reason, stored }
        };
        let types = KernelTypes {
            btf,
            origin: origin.to_string(),
            bytes: blob_len,
            elapsed: started.elapsed(),
        };
        Ok((types, outcome))
    }
}
