//! printk ring decoding: the input is the memory of a ring (header, descriptors, infos, text),
//! mapped at a fixed kernel address with the 64-bit kernel layout; its first bytes steer the
//! header's pointers and sizes into the input so that most runs reach the record decoder.
//! Decoding must succeed or fail without panicking, looping or allocating without bound.
#![no_main]

use kvmaccess_linux::dmesg::{read_log, DescStates, Field, PrintkLayout};
use kvmaccess_linux::kallsyms::FlatMemory;
use libfuzzer_sys::fuzz_target;

const BASE: u64 = 0xffff_ffff_8200_0000;

/// The shape of the x86-64 kernel's structures; this target fuzzes the data, not the layout.
fn layout() -> PrintkLayout {
    PrintkLayout {
        ring_size: 88,
        count_bits: Field::bytes(0, 4),
        descs: Field::bytes(8, 8),
        infos: Field::bytes(16, 8),
        head_id: Field::bytes(24, 8),
        tail_id: Field::bytes(32, 8),
        size_bits: Field::bytes(48, 4),
        data: Field::bytes(56, 8),
        desc_size: 24,
        state_var: Field::bytes(0, 8),
        text_begin: Field::bytes(8, 8),
        text_next: Field::bytes(16, 8),
        info_size: 88,
        seq: Field::bytes(0, 8),
        ts_nsec: Field::bytes(8, 8),
        text_len: Field::bytes(16, 2),
        facility: Field::bytes(18, 1),
        flags: Field {
            bit_offset: 152,
            bits: 5,
        },
        level: Field {
            bit_offset: 157,
            bits: 3,
        },
        caller_id: Field::bytes(20, 4),
        states: DescStates::KERNEL,
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 96 {
        return;
    }
    let mut bytes = data.to_vec();
    // Unless the first byte says "raw", point the arrays into the input and keep sizes small.
    if bytes[0] & 0x0f != 0 {
        let offset = |i: usize| BASE + u64::from(u16::from_le_bytes([data[i], data[i + 1]]));
        let count_bits = u32::from(data[7] % 8);
        let size_bits = 4 + u32::from(data[6] % 10);
        bytes[0..4].copy_from_slice(&count_bits.to_le_bytes());
        bytes[8..16].copy_from_slice(&offset(1).to_le_bytes());
        bytes[16..24].copy_from_slice(&offset(3).to_le_bytes());
        bytes[48..52].copy_from_slice(&size_bits.to_le_bytes());
        bytes[56..64].copy_from_slice(&offset(5).to_le_bytes());
    }
    let mut mem = FlatMemory {
        base: BASE,
        bytes: &bytes,
    };
    if let Ok(log) = read_log(&mut mem, BASE, &layout()) {
        assert!(log.examined <= 1 << kvmaccess_linux::dmesg::MAX_DESC_BITS);
        let _ = log.dmesg_text();
    }
});
