//! kallsyms decoding: the input's first 12 bytes place the arrays inside the rest, which is
//! mapped at a fixed kernel address; decoding must succeed or fail without panicking.
#![no_main]

use kvmaccess_linux::kallsyms::{decode, AddressTable, FlatMemory};
use kvmaccess_linux::{DecodeOptions, KallsymsLocation, OffsetRule};
use libfuzzer_sys::fuzz_target;

const BASE: u64 = 0xffff_ffff_8100_0000;

fuzz_target!(|data: &[u8]| {
    let Some((header, body)) = data.split_first_chunk::<12>() else {
        return;
    };
    let at = |i: usize| BASE + u64::from(u16::from_le_bytes([header[i], header[i + 1]]));
    let location = KallsymsLocation {
        num_syms: at(0),
        names: at(2),
        token_table: at(4),
        token_index: at(6),
        addresses: if header[10] & 1 == 0 {
            AddressTable::Relative {
                offsets: at(8),
                relative_base: BASE,
            }
        } else {
            AddressTable::Absolute { addresses: at(8) }
        },
    };
    let rule = match header[11] % 3 {
        0 => OffsetRule::Auto,
        1 => OffsetRule::AbsolutePercpu,
        _ => OffsetRule::Relative,
    };
    let mut mem = FlatMemory {
        base: BASE,
        bytes: body,
    };
    let _ = decode(&mut mem, &location, DecodeOptions { rule });
});
