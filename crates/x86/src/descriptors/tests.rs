use kvmaccess_core::{DescriptorTable, Gpa, Gva};
use kvmaccess_testkit::{MapFlags, MockMemory, PageSize, PageTableBuilder, TableFormat};

use super::*;
use crate::PagingMode;

fn table(qwords: &[u64]) -> Vec<u8> {
    qwords.iter().flat_map(|q| q.to_le_bytes()).collect()
}

/// Encode the low 8 bytes of a segment descriptor.
fn segment(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (u64::from(access) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (u64::from(flags & 0xf) << 52)
        | ((base >> 24) << 56)
}

const LINUX_TSS_BASE: u64 = 0xffff_fe00_0000_3000;

/// The per-CPU GDT of an x86-64 Linux kernel, as `gdt_page` lays it out.
fn linux_x86_64_gdt() -> Vec<u64> {
    vec![
        0,                     // 0x00 null
        0x00cf_9b00_0000_ffff, // 0x08 KERNEL32_CS
        0x00af_9b00_0000_ffff, // 0x10 KERNEL_CS
        0x00cf_9300_0000_ffff, // 0x18 KERNEL_DS
        0x00cf_fb00_0000_ffff, // 0x20 USER32_CS
        0x00cf_f300_0000_ffff, // 0x28 USER_DS
        0x00af_fb00_0000_ffff, // 0x30 USER_CS
        0,                     // 0x38 unused
        // 0x40 TSS, busy (loaded in TR), 16 bytes.
        segment((LINUX_TSS_BASE & 0xffff_ffff) as u32, 0x4087, 0x8b, 0),
        LINUX_TSS_BASE >> 32,
        0, // 0x50 LDT, empty: two zero slots
        0,
        0, // 0x60..0x70 TLS
        0,
        0,
        0x0040_f500_0000_0003, // 0x78 CPUNODE: limit = CPU number
    ]
}

#[test]
fn linux_x86_64_gdt_decodes() {
    let entries = decode_gdt(&table(&linux_x86_64_gdt()), true);
    let selectors: Vec<u16> = entries.iter().map(|e| e.selector).collect();
    // The TSS consumes slots 8 and 9; the zero LDT slots decode as two nulls.
    assert_eq!(
        selectors,
        [
            0x00, 0x08, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38, 0x40, 0x50, 0x58, 0x60, 0x68, 0x70,
            0x78
        ]
    );
    assert_eq!(entries[0].descriptor, Descriptor::Null);

    let Descriptor::Code(kernel_cs) = entries[2].descriptor else {
        panic!("{:?}", entries[2])
    };
    assert!(kernel_cs.long && !kernel_cs.default_32 && kernel_cs.readable && kernel_cs.accessed);
    assert_eq!((kernel_cs.fields.dpl, kernel_cs.fields.base), (0, 0));
    assert_eq!(
        (kernel_cs.fields.limit, kernel_cs.fields.limit_bytes),
        (0xfffff, 0xffff_ffff)
    );
    assert_eq!(
        entries[2].to_string(),
        "0x10 code64 DPL0 P base=0 limit=0xfffff G L R A"
    );
    assert_eq!(
        entries[1].to_string(),
        "0x08 code32 DPL0 P base=0 limit=0xfffff G D R A"
    );

    let Descriptor::Data(kernel_ds) = entries[3].descriptor else {
        panic!("{:?}", entries[3])
    };
    assert!(kernel_ds.writable && kernel_ds.big && !kernel_ds.expand_down);
    assert_eq!(
        entries[5].to_string(),
        "0x28 data DPL3 P base=0 limit=0xfffff G B W A"
    );
    assert_eq!(
        entries[6].to_string(),
        "0x30 code64 DPL3 P base=0 limit=0xfffff G L R A"
    );

    let Descriptor::Tss(tss) = entries[8].descriptor else {
        panic!("{:?}", entries[8])
    };
    assert_eq!(tss.fields.base, LINUX_TSS_BASE);
    assert_eq!(
        (tss.fields.limit, tss.width, tss.busy),
        (0x4087, GateWidth::Bits64, true)
    );
    assert_eq!(entries[8].raw_high, Some(0xffff_fe00));
    assert_eq!(
        entries[8].to_string(),
        "0x40 tss64 busy DPL0 P base=0xfffffe0000003000 limit=0x4087"
    );

    let Descriptor::Data(cpunode) = entries[14].descriptor else {
        panic!("{:?}", entries[14])
    };
    assert_eq!((cpunode.fields.limit, cpunode.fields.dpl), (3, 3));
    assert!(cpunode.expand_down && !cpunode.writable);

    let json = serde_json::to_value(entries[2]).unwrap();
    assert_eq!(json["selector"], 0x10);
    assert_eq!(json["descriptor"]["kind"], "code");
    assert_eq!(json["descriptor"]["long"], true);
    assert_eq!(json["descriptor"]["limit"], 0xfffff);
    let json = serde_json::to_value(entries[8]).unwrap();
    assert_eq!(json["descriptor"]["kind"], "tss");
    assert_eq!(json["descriptor"]["width"], "64");
}

#[test]
fn legacy_system_descriptors() {
    let call_gate = 0x1234 | (0x60 << 16) | (3 << 32) | (0xec << 40) | (0xc010 << 48);
    let gdt = [
        0,
        segment(0xc123_4000, 0x67, 0x89, 0), // 0x08 TSS32 available
        segment(0x1000, 0xff, 0x82, 0),      // 0x10 LDT
        call_gate,                           // 0x18 call gate 32
        (0x08 << 16) | (0x85 << 40),         // 0x20 task gate
        0x88 << 40,                          // 0x28 reserved type 8
        segment(0x2000, 0x2b, 0x83, 0),      // 0x30 TSS16 busy
        segment(0x3000, 0xffff, 0x96, 0),    // 0x38 data16 expand-down
        (0x60 << 16) | (0x84 << 40) | 0x100, // 0x40 call gate 16
        segment(0, 0xffff, 0x9f, 0),         // 0x48 conforming code16
    ];
    let entries = decode_gdt(&table(&gdt), false);
    assert_eq!(entries.len(), gdt.len());
    let text: Vec<String> = entries.iter().map(ToString::to_string).collect();
    assert_eq!(
        text[1],
        "0x08 tss32 available DPL0 P base=0xc1234000 limit=0x67"
    );
    assert_eq!(text[2], "0x10 ldt DPL0 P base=0x1000 limit=0xff");
    assert_eq!(
        text[3],
        "0x18 callgate32 DPL3 P target=0x60:0xc0101234 params=3"
    );
    assert_eq!(text[4], "0x20 taskgate DPL0 P tss=0x8");
    assert_eq!(
        text[5],
        "0x28 reserved system type 0x8 DPL0 P raw=0x0000880000000000"
    );
    assert_eq!(text[6], "0x30 tss16 busy DPL0 P base=0x2000 limit=0x2b");
    assert_eq!(text[7], "0x38 data DPL0 P base=0x3000 limit=0xffff W E");
    assert_eq!(text[8], "0x40 callgate16 DPL0 P target=0x60:0x100 params=0");
    assert_eq!(text[9], "0x48 code16 DPL0 P base=0 limit=0xffff R C A");

    // The same bytes under long mode: the TSS and LDT become 16-byte descriptors (with garbage
    // upper halves), 16-bit types are reserved.
    let entries = decode_gdt(&table(&gdt), true);
    assert!(matches!(
        entries[1].descriptor,
        Descriptor::Tss(TssDescriptor { busy: false, .. })
    ));
    assert_eq!(entries[1].raw_high, Some(gdt[2]));
    assert_eq!(entries[2].selector, 0x18);
    assert!(matches!(
        entries[2].descriptor,
        Descriptor::CallGate(CallGate {
            width: GateWidth::Bits64,
            ..
        })
    ));
    assert_eq!(entries[3].selector, 0x28);
    assert!(matches!(
        entries[3].descriptor,
        Descriptor::Reserved { type_code: 0x8, .. }
    ));
    assert!(matches!(
        entries[4].descriptor,
        Descriptor::Reserved { type_code: 0x3, .. }
    ));
}

#[test]
fn long_mode_call_gates_and_truncation() {
    let low = 0x1234 | (0x10 << 16) | (0xec << 40) | (0x8100 << 48);
    let entries = decode_gdt(&table(&[0, low, 0xffff_ffff, 0x8e << 40, 0x89 << 40]), true);
    assert_eq!(entries.len(), 4);
    assert_eq!(
        entries[1].to_string(),
        "0x08 callgate64 DPL3 P target=0x10:0xffffffff81001234 params=0"
    );
    // An interrupt gate has no place in a GDT.
    assert!(matches!(
        entries[2].descriptor,
        Descriptor::Reserved { type_code: 0xe, .. }
    ));
    // A TSS in the last slot has no upper half.
    assert_eq!(
        entries[3].descriptor,
        Descriptor::Truncated { type_code: 0x9 }
    );
    assert!(entries[3].to_string().contains("truncated"));
}

#[test]
fn gdt_size_is_bounded() {
    let entries = decode_gdt(&vec![0; 70_000], false);
    assert_eq!(entries.len(), GDT_MAX_ENTRIES);
    assert_eq!(entries.last().map(|e| e.selector), Some(0xfff8));
    // A partial trailing slot is ignored.
    assert_eq!(decode_gdt(&[0xff; 15], true).len(), 1);
    assert!(decode_gdt(&[], true).is_empty());
    // Every slot a 16-byte TSS: the walk consumes two at a time.
    let tss = segment(0, 0x67, 0x89, 0);
    assert_eq!(decode_gdt(&table(&[tss; 8192]), true).len(), 4096);
}

/// The 16 bytes of a 64-bit IDT gate.
fn gate64(offset: u64, selector: u16, ist: u8, type_code: u8, dpl: u8, present: bool) -> [u64; 2] {
    let low = (offset & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(ist) << 32)
        | (u64::from(type_code) << 40)
        | (u64::from(dpl) << 45)
        | (u64::from(present) << 47)
        | (((offset >> 16) & 0xffff) << 48);
    [low, offset >> 32]
}

#[test]
fn idt_64_bit_gates() {
    let mut gates = vec![[0u64; 2]; 256];
    gates[0] = gate64(0xffff_ffff_81a0_0a40, 0x10, 0, 0xe, 0, true);
    gates[3] = gate64(0xffff_ffff_81a0_1000, 0x10, 0, 0xe, 3, true);
    gates[8] = gate64(0xffff_ffff_81a0_2000, 0x10, 1, 0xe, 0, true);
    gates[0x80] = gate64(0xffff_ffff_81a0_1234, 0x10, 0, 0xe, 3, true);
    gates[0x82] = gate64(0xffff_ffff_81a0_3000, 0x10, 7, 0xf, 0, true);
    gates[0x83] = gate64(0, 0x28, 0, 0x5, 0, true);
    let bytes: Vec<u8> = gates
        .iter()
        .flatten()
        .flat_map(|q| q.to_le_bytes())
        .collect();
    let idt = decode_idt(&bytes, true);
    assert_eq!(idt.len(), 256);

    assert_eq!(idt[0].offset, 0xffff_ffff_81a0_0a40);
    assert_eq!(
        idt[0].to_string(),
        "0x00 int64 DPL0 P 0x10:0xffffffff81a00a40"
    );
    assert_eq!(idt[8].ist, 1);
    assert_eq!(
        idt[8].to_string(),
        "0x08 int64 DPL0 P 0x10:0xffffffff81a02000 IST1"
    );
    let int80 = idt[0x80];
    assert_eq!(
        (int80.vector, int80.kind, int80.dpl, int80.present),
        (0x80, GateKind::Interrupt, 3, true)
    );
    assert_eq!(
        int80.to_string(),
        "0x80 int64 DPL3 P 0x10:0xffffffff81a01234"
    );
    assert!(!idt[0x81].present);
    assert_eq!(
        idt[0x81].to_string(),
        "0x81 reserved type 0x0 DPL0 NP 0x0:0x0"
    );
    assert_eq!(
        idt[0x82].to_string(),
        "0x82 trap64 DPL0 P 0x10:0xffffffff81a03000 IST7"
    );
    // Task gates do not exist in long mode.
    assert_eq!(
        (idt[0x83].kind, idt[0x83].width),
        (GateKind::Reserved, None)
    );

    let json = serde_json::to_value(int80).unwrap();
    assert_eq!(json["kind"], "interrupt");
    assert_eq!(json["width"], "64");
    assert_eq!(json["offset"], "0xffffffff81a01234");
}

/// An 8-byte 32-bit IDT gate.
fn gate32(offset: u32, selector: u16, type_code: u8, dpl: u8) -> u64 {
    let offset = u64::from(offset);
    (offset & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(type_code) << 40)
        | (u64::from(dpl) << 45)
        | (1 << 47)
        | ((offset >> 16) << 48)
}

#[test]
fn idt_32_bit_gates() {
    let gates = [
        gate32(0xc100_0100, 0x60, 0xe, 0),
        gate32(0, 0, 0x1, 0),
        gate32(0x1234, 0x08, 0x6, 0),
        gate32(0x5678, 0x08, 0x7, 0),
        gate32(0xdead_beef, 0xf8, 0x5, 0),
        gate32(0xc100_0200, 0x60, 0xf, 3),
    ];
    let idt = decode_idt(&table(&gates), false);
    let text: Vec<String> = idt.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "0x00 int32 DPL0 P 0x60:0xc1000100",
            "0x01 reserved type 0x1 DPL0 P 0x0:0x0",
            "0x02 int16 DPL0 P 0x8:0x1234",
            "0x03 trap16 DPL0 P 0x8:0x5678",
            "0x04 task DPL0 P tss=0xf8",
            "0x05 trap32 DPL3 P 0x60:0xc1000200",
        ]
    );
    assert_eq!(idt[4].offset, 0);
    assert!(idt.iter().all(|g| g.ist == 0 && g.raw_high.is_none()));
}

#[test]
fn idt_size_is_bounded() {
    assert_eq!(decode_idt(&vec![0xff; 300 * 16], true).len(), 256);
    assert_eq!(decode_idt(&vec![0xff; 300 * 8], false).len(), 256);
    assert_eq!(decode_idt(&[0; 15], true).len(), 0);
    assert_eq!(
        decode_idt(&vec![0; 4096], false).last().map(|g| g.vector),
        Some(255)
    );
}

#[test]
fn tables_are_read_through_virtual_addresses() {
    let mem = MockMemory::new(1 << 30);
    let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
    let gdt_base = Gva(0xffff_fe00_0000_1000);
    let idt_base = Gva(0xffff_fe00_0000_0000);
    tables
        .map(
            gdt_base,
            Gpa(0x50_0000),
            PageSize::Size4K,
            MapFlags::KERNEL_RW,
        )
        .unwrap();
    tables
        .map(
            idt_base,
            Gpa(0x60_0000),
            PageSize::Size4K,
            MapFlags::KERNEL_RO,
        )
        .unwrap();
    mem.write_bytes(Gpa(0x50_0000), &table(&linux_x86_64_gdt()))
        .unwrap();
    let [low, high] = gate64(0xffff_ffff_81a0_1234, 0x10, 2, 0xe, 0, true);
    mem.write_bytes(Gpa(0x60_0000 + 2 * 16), &table(&[low, high]))
        .unwrap();

    let mut space = AddressSpace::new(&mem, PagingMode::Level4, tables.cr3());
    let gdtr = DescriptorTable {
        base: gdt_base.0,
        limit: 0x7f,
    };
    let gdt = read_gdt(&mut space, gdtr, true).unwrap();
    assert_eq!(gdt.len(), 15);
    assert!(matches!(
        gdt[2].descriptor,
        Descriptor::Code(CodeSegment { long: true, .. })
    ));
    // A limit cutting the TSS in half.
    let short = read_gdt(
        &mut space,
        DescriptorTable {
            limit: 0x47,
            ..gdtr
        },
        true,
    )
    .unwrap();
    assert_eq!(
        short.last().map(|e| e.descriptor),
        Some(Descriptor::Truncated { type_code: 0xb })
    );

    // An absurd limit is capped at 256 gates, which fit the mapped page.
    let idtr = DescriptorTable {
        base: idt_base.0,
        limit: u32::MAX,
    };
    let idt = read_idt(&mut space, idtr, true).unwrap();
    assert_eq!(idt.len(), 256);
    assert_eq!(
        idt[2].to_string(),
        "0x02 int64 DPL0 P 0x10:0xffffffff81a01234 IST2"
    );

    // A GDT limit past 0xffff is capped too, and the unmapped part reports the failing page.
    let err = read_gdt(
        &mut space,
        DescriptorTable {
            limit: 0x10_0000,
            ..gdtr
        },
        true,
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::DescriptorTable {
                table: "GDT",
                len: 0x10000,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.gva(), Some(Gva(gdt_base.0 + 0x1000)));
    assert!(
        err.to_string()
            .starts_with("reading the GDT at 0xfffffe0000001000"),
        "{err}"
    );
}
