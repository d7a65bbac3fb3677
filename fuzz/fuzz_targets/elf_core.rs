//! Feeds arbitrary bytes to the ELF core reader: opening must either fail cleanly or yield a
//! dump whose reads and register queries never panic and never return bytes from outside the
//! ranges it reports.

#![no_main]

use kvmaccess_core::{Gpa, PhysicalMemory, VcpuState};
use kvmaccess_dump::{parse_core_notes, parse_qemu_cpu_state, ElfCore};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let notes = parse_core_notes(data);
    // The note parser also stands alone (the QEMU backend feeds it note descriptors directly).
    let _ = parse_qemu_cpu_state(data);

    let Ok(core) = ElfCore::from_bytes(data.to_vec()) else {
        return;
    };
    // Both entry points must agree on what the notes say.
    if let Ok(notes) = notes {
        assert_eq!(notes.vcpus, core.vcpus());
    }
    let mut buf = [0u8; 64];
    let mut prev_end = 0u64;
    for (i, range) in core.ranges().iter().enumerate() {
        assert!(range.start < range.end, "empty range reported");
        assert!(
            i == 0 || range.start.0 > prev_end,
            "ranges unsorted or not merged"
        );
        prev_end = range.end.0;
        let first = range.start;
        let last = Gpa(range
            .end
            .0
            .saturating_sub(buf.len() as u64)
            .max(range.start.0));
        let _ = core.read_phys(first, &mut buf);
        let _ = core.read_phys(last, &mut buf);
        // One byte past the end of a range is either the next range or a hole.
        let _ = core.read_phys(range.end, &mut buf[..1]);
    }
    let _ = core.read_phys(Gpa(0), &mut buf);
    let _ = core.read_phys(Gpa(u64::MAX), &mut buf);
    for vcpu in 0..=core.vcpu_count() {
        let _ = core.registers(vcpu);
    }
    let _ = core.notes().vmcoreinfo_map();
});
