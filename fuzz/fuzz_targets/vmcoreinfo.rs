//! VMCOREINFO text parsing: arbitrary bytes must parse or fail cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = kvmaccess_linux::Vmcoreinfo::parse(data) {
        assert!(!info.osrelease.is_empty());
        // The layout derived from hostile text must not panic either.
        let _ = kvmaccess_linux::KernelLayout::from_vmcoreinfo(&info);
        let _ = kvmaccess_linux::KallsymsLocation::from_vmcoreinfo(&info);
    }
});
