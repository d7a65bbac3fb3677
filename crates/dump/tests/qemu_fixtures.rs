//! Reads cores written by a real QEMU (Debian's 7.2) rather than by our own writer, so that a
//! misreading of QEMU's layout cannot hide behind a writer with the same misreading.
//!
//! Both were taken over QMP with `dump-guest-memory paging=false begin=… length=4096` from a
//! 2-vCPU q35 guest, which keeps them a few KiB; the one page of memory is all zeros.
//! * `qemu72-bios-elf64-i386.core`: guest paused in SeaBIOS under TCG. QEMU writes ELF64 (the
//!   BIOS ROM ends at 4 GiB) with `e_machine` EM_386 and i386 `NT_PRSTATUS` notes, section
//!   headers before the program headers and an `e_ehsize` of 8.
//! * `qemu72-kernel-x86_64.core`: guest under KVM while vCPU 0 ran the Linux boot code in long
//!   mode and vCPU 1 still waited in the BIOS: EM_X86_64, x86-64 `NT_PRSTATUS`, and
//!   `QEMUCPUState` of size 440 (with `kernel_gs_base`).

use kvmaccess_core::{Gpa, PhysicalMemory, VcpuState};
use kvmaccess_dump::{open_dump, DumpFormat, ElfCore, RegisterSource};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

#[test]
fn qemu_bios_core_elf64_em386() {
    let core = ElfCore::open(fixture("qemu72-bios-elf64-i386.core")).unwrap();
    assert!(core.is_elf64());
    assert_eq!(core.machine(), 3);
    let notes = core.notes();
    assert!(notes.warnings.is_empty(), "{:?}", notes.warnings);
    assert_eq!(notes.sources, vec![RegisterSource::QemuNote; 2]);
    assert!(notes.vmcoreinfo.is_none());

    let bsp = core.registers(0).unwrap();
    assert_eq!(
        (bsp.cs.selector, bsp.cs.base, bsp.rip),
        (0xf000, 0xf0000, 0xb7b9)
    );
    assert_eq!((bsp.cr0, bsp.idtr.limit), (0x10, 0x3ff));
    let ap = core.registers(1).unwrap();
    assert_eq!(
        (ap.cs.selector, ap.rip, ap.gdtr.base),
        (0x8, 0xfd09a, 0xf6180)
    );
    assert_eq!(ap.cs.flags, 0x00cf_9b00);

    assert_eq!(
        core.ranges(),
        &[kvmaccess_core::PhysRange {
            start: Gpa(0x300_0000),
            end: Gpa(0x300_1000)
        }]
    );
    assert_eq!(core.read_u64(Gpa(0x300_0ff8)).unwrap(), 0);
    assert!(core.read_u64(Gpa(0x300_0ffc)).is_err());
}

#[test]
fn qemu_long_mode_core() {
    let dump = open_dump(fixture("qemu72-kernel-x86_64.core"), None).unwrap();
    assert_eq!(dump.format(), DumpFormat::ElfCore);
    let notes = dump.core_notes().unwrap();
    assert!(notes.warnings.is_empty(), "{:?}", notes.warnings);
    assert_eq!(dump.vcpu_count(), 2);

    let r = dump.registers(0).unwrap();
    assert_eq!(r.rip, 0x431_c2cf);
    assert_eq!(r.rsp, 0x433_7e60);
    assert_eq!(r.r15, 0x80_0000);
    assert_eq!((r.cs.selector, r.cs.flags), (0x10, 0x00a0_9b00));
    assert!(r.cs.long_mode());
    assert_eq!(r.tr.selector, 0x20);
    assert_eq!((r.gdtr.base, r.idtr.base), (0x433_2010, 0x433_2050));
    assert_eq!((r.cr0, r.cr3, r.cr4), (0x8005_0033, 0x435_7000, 0x20));
    assert_eq!(r.kernel_gs_base, Some(0));
    assert_eq!(r.efer, None);
    assert_eq!(dump.registers(1).unwrap().rip, 0xfd09a);

    let mut page = vec![0xffu8; 4096];
    dump.read_phys(Gpa(0x800_0000), &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0));
}
