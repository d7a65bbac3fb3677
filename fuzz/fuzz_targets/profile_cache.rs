//! Profile cache files: parsing must accept only what encoding produces (a parsed file encodes
//! back to the same bytes) and fail on anything else without panicking; cached indexes, however
//! forged, must be checked without panicking before a symbol table uses them.
//!
//! Random bytes almost never carry a valid checksum, so each input is also parsed a second
//! time with its header's length and checksum fields fixed up: that reaches the payload parser.
#![no_main]

use kvmaccess_linux::profile_cache::{CacheFile, Header, HEADER_LEN};
use kvmaccess_linux::SymbolTable;
use libfuzzer_sys::fuzz_target;

/// Offsets in the header: payload length, then the checksum over everything before it and the
/// payload.
const LEN_AT: usize = 20;
const SUM_AT: usize = 28;

fn check(data: &[u8]) {
    let _ = Header::peek(data);
    let Ok(file) = CacheFile::parse(data) else {
        return;
    };
    assert_eq!(
        file.encode(),
        data,
        "a parsed file re-encodes to its own bytes"
    );
    if let CacheFile::Symbols(entry) = file {
        let (table, _) =
            SymbolTable::with_index_hints(entry.names.symbols, entry.by_name, entry.by_address);
        if let Some(first) = table.iter().next() {
            let _ = table.lookup(&first.name);
        }
        let _ = table.addr2sym(0xffff_ffff_8100_0000);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() < HEADER_LEN {
        return;
    }
    let mut sealed = data.to_vec();
    let payload_len = (data.len() - HEADER_LEN) as u64;
    sealed[LEN_AT..SUM_AT].copy_from_slice(&payload_len.to_le_bytes());
    let mut hasher = blake3::Hasher::new();
    hasher.update(&sealed[..SUM_AT]);
    hasher.update(&sealed[HEADER_LEN..]);
    let sum = *hasher.finalize().as_bytes();
    sealed[SUM_AT..HEADER_LEN].copy_from_slice(&sum);
    check(&sealed);
});
