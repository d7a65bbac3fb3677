//! Arbitrary bytes as a GDT and an IDT, in legacy and long mode: decoding and formatting must
//! never panic, and stay within the architectural entry counts.

#![no_main]

use kvmaccess_x86::{decode_gdt, decode_idt, GDT_MAX_ENTRIES, IDT_MAX_GATES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for long_mode in [false, true] {
        let gdt = decode_gdt(data, long_mode);
        assert!(gdt.len() <= GDT_MAX_ENTRIES);
        let mut previous = None;
        for entry in &gdt {
            // Selectors strictly increase; 16-byte descriptors skip one slot.
            assert!(previous.is_none_or(|p| entry.selector > p));
            previous = Some(entry.selector);
            let _ = entry.to_string();
        }

        let idt = decode_idt(data, long_mode);
        assert!(idt.len() <= IDT_MAX_GATES);
        for gate in &idt {
            let _ = gate.to_string();
        }
    }
});
