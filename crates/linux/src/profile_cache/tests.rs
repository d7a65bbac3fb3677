//! The cache file format and store: round trips, and every kind of bad file refused.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::os::unix::fs::PermissionsExt;

use super::*;

const BUILD: &str = "00112233445566778899aabbccddeeff00112233";

fn symbols_entry() -> CacheFile {
    let symbols = vec![
        Symbol::new("fixed_percpu_data", 0, 'A'),
        Symbol::new("_stext", 0, 'T'),
        Symbol::new("helper", 0, 't'),
        Symbol::new("x".repeat(kallsyms::MAX_NAME), 0, 'D'),
    ];
    CacheFile::Symbols(SymbolsEntry {
        build_id: BUILD.into(),
        release: "6.1.0-test".into(),
        vmcoreinfo_gpa: Some(Gpa(0x11d_6018)),
        names: CachedNames {
            source: NamesSource {
                digest: [7; 32],
                count: 4,
                token_table_len: 1000,
                names_len: 5000,
            },
            symbols,
        },
        by_name: vec![1, 0, 2, 3],
        by_address: vec![1, 2, 3],
    })
}

fn types_entry() -> CacheFile {
    CacheFile::Types(TypesEntry {
        build_id: BUILD.into(),
        release: "6.1.0-test".into(),
        digest: btf_digest(b"blob"),
        blob_len: 4,
        name_index: vec![3, 1, 2],
    })
}

fn reason(result: Result<CacheFile>) -> String {
    match result {
        Err(Error::Cache { reason, .. }) => reason,
        other => panic!("expected a cache error, got {other:?}"),
    }
}

#[test]
fn entries_round_trip() {
    for entry in [symbols_entry(), types_entry()] {
        let bytes = entry.encode();
        assert_eq!(CacheFile::parse(&bytes).unwrap(), entry);
        let header = Header::peek(&bytes).unwrap();
        assert_eq!(header.kind, entry.kind());
        assert_eq!(header.payload_len as usize, bytes.len() - HEADER_LEN);
    }
    let bytes = symbols_entry().encode();
    assert_eq!(
        Header::peek(&bytes).unwrap().vmcoreinfo_gpa,
        Some(Gpa(0x11d_6018))
    );
}

#[test]
fn every_truncation_and_every_flipped_byte_is_refused() {
    let bytes = symbols_entry().encode();
    for len in 0..bytes.len() {
        assert!(
            CacheFile::parse(&bytes[..len]).is_err(),
            "truncated to {len}"
        );
    }
    // Any single changed byte: header fields and payload are all under the checksum.
    for at in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[at] ^= 0x20;
        assert!(CacheFile::parse(&bad).is_err(), "byte {at} flipped");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(CacheFile::parse(&longer).is_err());
}

/// A file with a correct checksum around bad content: the parser's own checks must hold.
fn resealed(mut payload_edit: impl FnMut(&mut Vec<u8>), entry: &CacheFile) -> Vec<u8> {
    let bytes = entry.encode();
    let mut head = bytes[..HEADER_LEN].to_vec();
    let mut payload = bytes[HEADER_LEN..].to_vec();
    payload_edit(&mut payload);
    head[20..28].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let sum = checksum(&head[..CHECKED_HEADER], &payload);
    head[CHECKED_HEADER..].copy_from_slice(&sum);
    head.extend_from_slice(&payload);
    head
}

#[test]
fn well_sealed_but_invalid_content_is_refused() {
    let entry = symbols_entry();
    // Offsets into the payload: build id (1 + 40), release (1 + 10), digest, 3 x u32, count.
    let count_at = 41 + 11 + 32 + 12;
    let first_name = count_at + 4;
    // A count far beyond the bytes that follow: refused before anything is allocated.
    let huge = resealed(
        |p| p[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes()),
        &entry,
    );
    assert!(reason(CacheFile::parse(&huge)).contains("exceeds"));
    // A type letter that is not printable.
    let bad_kind = resealed(|p| p[first_name] = 0x01, &entry);
    assert!(reason(CacheFile::parse(&bad_kind)).contains("type letter"));
    // A name that is not UTF-8.
    let bad_utf8 = resealed(|p| p[first_name + 3] = 0xff, &entry);
    assert!(reason(CacheFile::parse(&bad_utf8)).contains("UTF-8"));
    // A build id that could name another path.
    let bad_id = resealed(|p| p[1] = b'/', &entry);
    assert!(reason(CacheFile::parse(&bad_id)).contains("hex"));
    // Bytes after the entry.
    let trailing = resealed(|p| p.push(0), &entry);
    assert!(reason(CacheFile::parse(&trailing)).contains("after the entry"));
    // A types entry carrying a VMCOREINFO address (only symbols entries remember one): it
    // would not encode back to the same bytes.
    let mut types = types_entry().encode();
    types[12..20].copy_from_slice(&0x1000u64.to_le_bytes());
    let sum = checksum(&types[..CHECKED_HEADER], &types[HEADER_LEN..]);
    types[CHECKED_HEADER..HEADER_LEN].copy_from_slice(&sum);
    assert!(reason(CacheFile::parse(&types)).contains("address"));
    // An unknown version or kind.
    let mut other_version = entry.encode();
    other_version[8] = 2;
    assert!(reason(CacheFile::parse(&other_version)).contains("version"));
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let big = vec![0u8; MAX_FILE_BYTES as usize + 1];
    assert!(reason(CacheFile::parse(&big)).contains("limit"));
}

fn store_in(dir: &Path) -> ProfileCache {
    ProfileCache::new(dir.join("kvmaccess").join("profiles"))
}

#[test]
fn store_writes_atomically_with_private_permissions() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = store_in(tmp.path());
    assert!(cache.load(BUILD, EntryKind::Symbols).unwrap().is_none());
    let path = cache.store(&symbols_entry()).unwrap();
    assert_eq!(path, cache.path(BUILD, EntryKind::Symbols).unwrap());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(cache.dir()), 0o700);
    assert_eq!(
        cache.load(BUILD, EntryKind::Symbols).unwrap(),
        Some(symbols_entry())
    );
    // Overwriting replaces the file whole and leaves no temporary behind.
    let mut changed = symbols_entry();
    if let CacheFile::Symbols(e) = &mut changed {
        e.vmcoreinfo_gpa = None;
    }
    cache.store(&changed).unwrap();
    cache.store(&types_entry()).unwrap();
    assert_eq!(
        cache.load(BUILD, EntryKind::Symbols).unwrap(),
        Some(changed)
    );
    assert_eq!(
        cache.load(BUILD, EntryKind::Types).unwrap(),
        Some(types_entry())
    );
    let names: Vec<String> = std::fs::read_dir(cache.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
    // The hint comes from the symbols file's header; no address, no hint.
    assert!(cache.hints().is_empty());
    cache.store(&symbols_entry()).unwrap();
    assert_eq!(cache.hints(), vec![(BUILD.to_string(), Gpa(0x11d_6018))]);
}

#[test]
fn unusable_files_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = store_in(tmp.path());
    let path = cache.store(&symbols_entry()).unwrap();

    // Corrupt.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(cache.load(BUILD, EntryKind::Symbols).is_err());

    // Another build's entry under this build's name.
    let other = "ffff".to_string();
    let mut entry = symbols_entry();
    if let CacheFile::Symbols(e) = &mut entry {
        e.build_id = other.clone();
    }
    let moved = cache.store(&entry).unwrap();
    std::fs::rename(&moved, &path).unwrap();
    assert!(cache.load(BUILD, EntryKind::Symbols).is_err());

    // Oversized (sparse): refused by its size, not read.
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(MAX_FILE_BYTES + 1).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(cache.load(BUILD, EntryKind::Symbols).is_err());

    // Written by someone else (group- or world-writable), or in a directory others can write.
    cache.store(&symbols_entry()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(cache.load(BUILD, EntryKind::Symbols).is_err());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(cache.load(BUILD, EntryKind::Symbols).unwrap().is_some());
    std::fs::set_permissions(cache.dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(cache.load(BUILD, EntryKind::Symbols).is_err());
    assert!(cache.store(&symbols_entry()).is_err());
    std::fs::set_permissions(cache.dir(), std::fs::Permissions::from_mode(0o700)).unwrap();

    // A symlink is not followed.
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
    assert!(cache.load(BUILD, EntryKind::Symbols).is_err());

    // A build id that is not plain hex never becomes a path.
    assert!(cache.path("../../etc", EntryKind::Symbols).is_none());
    assert!(cache.load("../../etc", EntryKind::Symbols).is_err());
}

#[test]
fn an_unwritable_directory_is_an_error_to_report() {
    let tmp = tempfile::tempdir().unwrap();
    // A file where the directory should be: creating it fails even for root.
    let blocker = tmp.path().join("kvmaccess");
    std::fs::write(&blocker, b"").unwrap();
    let cache = store_in(tmp.path());
    assert!(cache.store(&symbols_entry()).is_err());
    assert!(cache.load(BUILD, EntryKind::Symbols).unwrap().is_none());
    assert!(cache.hints().is_empty());
}

#[test]
fn default_dir_follows_xdg() {
    // Read-only checks on the current environment: the variables are not changed (tests run
    // in parallel threads of one process).
    if let Some(dir) = ProfileCache::default_dir() {
        assert!(dir.ends_with("kvmaccess/profiles"), "{}", dir.display());
        assert!(dir.is_absolute());
    }
}
