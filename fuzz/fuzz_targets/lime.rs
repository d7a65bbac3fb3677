//! Feeds arbitrary bytes to the LiME reader and, through `Dump::from_bytes`, to format sniffing.

#![no_main]

use kvmaccess_core::{Gpa, PhysicalMemory};
use kvmaccess_dump::{Dump, LimeDump};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Dump::from_bytes(data.to_vec(), None);

    let Ok(dump) = LimeDump::from_bytes(data.to_vec()) else {
        return;
    };
    let mut buf = [0u8; 48];
    // LiME stores every byte it covers, so the ranges can never exceed the file.
    assert!(dump.ram_size() <= data.len() as u64);
    for range in dump.ranges() {
        let len = usize::try_from(range.len())
            .unwrap_or(usize::MAX)
            .min(buf.len());
        assert!(dump.read_phys(range.start, &mut buf[..len]).is_ok());
        let _ = dump.read_phys(Gpa(range.end.0.saturating_sub(1)), &mut buf);
    }
    let _ = dump.read_phys(Gpa(u64::MAX), &mut buf);
});
