//! Tests across modules: synthetic cores, truncation and mutation, the writer round trip and
//! `open_dump`.

// Fixtures narrow small, known values (lengths of a few KiB, register low halves on purpose).
#![allow(clippy::cast_possible_truncation)]

use crate::elf::{Ehdr64, Phdr64, ET_CORE, PT_LOAD, PT_NOTE};
use crate::notes::{push_note, EM_386, EM_X86_64};
use crate::*;
use kvmaccess_core::{DescriptorTable, Error, Gpa, PhysRange, PhysicalMemory, Segment, VcpuState};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

pub(crate) fn sample_regs(vcpu: usize) -> Registers {
    let k = vcpu as u64;
    let seg = |sel: u16, base: u64, flags: u32| Segment {
        selector: sel,
        base,
        limit: 0xffff_ffff,
        flags,
    };
    Registers {
        vcpu,
        rax: 0x1111 + k,
        rbx: 0x2222 + k,
        rcx: 0x3333 + k,
        rdx: 0x4444 + k,
        rsi: 0x5555 + k,
        rdi: 0x6666 + k,
        rbp: 0x7777 + k,
        rsp: 0xffff_c900_0000_0000 + k,
        r8: 8,
        r9: 9,
        r10: 10,
        r11: 11,
        r12: 12,
        r13: 13,
        r14: 14,
        r15: 15 + k,
        rip: 0xffff_ffff_8100_0000 + k,
        rflags: 0x246,
        cs: seg(0x10, 0, 0x00a0_9b00),
        ds: seg(0x18, 0, 0x00c0_9300),
        es: seg(0x18, 0, 0x00c0_9300),
        fs: seg(0, 0x7f00_0000_0000 + k, 0),
        gs: seg(0, 0xffff_8880_0000_0000 + k, 0),
        ss: seg(0x18, 0, 0x00c0_9300),
        ldtr: seg(0, 0, 0x8200),
        tr: seg(0x40, 0xffff_fe00_0000_3000, 0x8b00),
        gdtr: DescriptorTable {
            base: 0xffff_fe00_0000_1000,
            limit: 0x7f,
        },
        idtr: DescriptorTable {
            base: 0xffff_fe00_0000_0000,
            limit: 0xfff,
        },
        cr0: 0x8005_0033,
        cr2: 0x7f00_dead_0000,
        cr3: 0x1234_5000 + (k << 12),
        cr4: 0x0037_06f0,
        efer: None,
        kernel_gs_base: Some(0x7fff_0000 + k),
    }
}

/// Deterministic content for guest address `gpa`.
fn pattern(gpa: u64) -> u8 {
    (gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (gpa as u8)
}

/// Guest memory made of `pattern` over some ranges; fails reads at `poison` to test aborts.
struct MockMemory {
    ranges: Vec<PhysRange>,
    poison: Option<u64>,
}

impl MockMemory {
    fn new(spans: &[(u64, u64)]) -> Self {
        Self {
            ranges: spans
                .iter()
                .map(|&(s, l)| PhysRange::from_start_len(Gpa(s), l).unwrap())
                .collect(),
            poison: None,
        }
    }
}

impl PhysicalMemory for MockMemory {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        if !self
            .ranges
            .iter()
            .any(|r| r.contains_span(gpa, buf.len() as u64))
        {
            return Err(Error::PhysUnmapped { gpa });
        }
        if let Some(p) = self.poison {
            if (gpa.0..gpa.0 + buf.len() as u64).contains(&p) {
                return Err(Error::PhysUnmapped { gpa: Gpa(p) });
            }
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern(gpa.0 + i as u64);
        }
        Ok(())
    }

    fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }
}

/// A PT_LOAD for the synthetic-core builder.
#[derive(Clone)]
struct Seg {
    paddr: u64,
    vaddr: u64,
    data: Vec<u8>,
    memsz: u64,
}

fn seg(paddr: u64, data: Vec<u8>) -> Seg {
    let memsz = data.len() as u64;
    Seg {
        paddr,
        vaddr: 0,
        data,
        memsz,
    }
}

/// Builds an ELF64 core by hand (independently of the writer): header, program headers, notes,
/// then segment bytes packed back to back (unaligned, unlike QEMU, to exercise the reader).
fn build_core(machine: u16, segs: &[Seg], notes: Option<&[u8]>) -> Vec<u8> {
    let phnum = segs.len() + usize::from(notes.is_some());
    let mut out = Vec::new();
    let mut ident = [0u8; 16];
    ident[..4].copy_from_slice(b"\x7fELF");
    ident[4] = 2;
    ident[5] = 1;
    ident[6] = 1;
    let ehdr = Ehdr64 {
        ident,
        etype: U16::new(ET_CORE),
        machine: U16::new(machine),
        version: U32::new(1),
        entry: U64::ZERO,
        phoff: U64::new(64),
        shoff: U64::ZERO,
        flags: U32::ZERO,
        ehsize: U16::new(64),
        phentsize: U16::new(56),
        phnum: U16::new(phnum as u16),
        shentsize: U16::ZERO,
        shnum: U16::ZERO,
        shstrndx: U16::ZERO,
    };
    out.extend_from_slice(ehdr.as_bytes());
    let mut off = 64 + 56 * phnum as u64;
    let phdr = |ptype: u32, off: u64, paddr: u64, vaddr: u64, filesz: u64, memsz: u64| Phdr64 {
        ptype: U32::new(ptype),
        flags: U32::ZERO,
        offset: U64::new(off),
        vaddr: U64::new(vaddr),
        paddr: U64::new(paddr),
        filesz: U64::new(filesz),
        memsz: U64::new(memsz),
        align: U64::ZERO,
    };
    if let Some(n) = notes {
        out.extend_from_slice(phdr(PT_NOTE, off, 0, 0, n.len() as u64, n.len() as u64).as_bytes());
        off += n.len() as u64;
    }
    for s in segs {
        let len = s.data.len() as u64;
        out.extend_from_slice(phdr(PT_LOAD, off, s.paddr, s.vaddr, len, s.memsz).as_bytes());
        off += len;
    }
    if let Some(n) = notes {
        out.extend_from_slice(n);
    }
    for s in segs {
        out.extend_from_slice(&s.data);
    }
    out
}

fn qemu_notes(
    vcpus: &[Registers],
    with_prstatus: bool,
    with_qemu: bool,
    info: Option<&str>,
) -> Vec<u8> {
    let mut n = Vec::new();
    if with_prstatus {
        for (i, r) in vcpus.iter().enumerate() {
            push_note(
                &mut n,
                "CORE",
                NT_PRSTATUS,
                &encode_prstatus_x86_64(r, i as u32 + 1),
            )
            .unwrap();
        }
    }
    if with_qemu {
        for r in vcpus {
            push_note(&mut n, "QEMU", 0, &encode_qemu_cpu_state(r)).unwrap();
        }
    }
    if let Some(text) = info {
        push_note(&mut n, "VMCOREINFO", 0, text.as_bytes()).unwrap();
    }
    n
}

fn pattern_bytes(start: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern(start + i)).collect()
}

/// A typical core: two vCPUs, VMCOREINFO, RAM below and above a hole, a zero-filled tail.
fn typical_core() -> Vec<u8> {
    let vcpus = [sample_regs(0), sample_regs(1)];
    let notes = qemu_notes(&vcpus, true, true, Some("OSRELEASE=6.8.0\nPAGESIZE=4096\n"));
    let mut tail = seg(0x10_0000, pattern_bytes(0x10_0000, 0x800));
    tail.memsz = 0x1000;
    build_core(
        EM_X86_64,
        &[
            seg(0, pattern_bytes(0, 0x1000)),
            seg(0x1000, pattern_bytes(0x1000, 0x1000)),
            tail,
        ],
        Some(&notes),
    )
}

fn expect_unmapped(res: Result<(), Error>, at: u64) {
    match res {
        Err(Error::PhysUnmapped { gpa }) => assert_eq!(gpa, Gpa(at)),
        other => panic!("expected PhysUnmapped at {at:#x}, got {other:?}"),
    }
}

#[test]
fn typical_core_registers_notes_and_memory() {
    let core = ElfCore::from_bytes(typical_core()).unwrap();
    assert!(core.is_elf64());
    assert_eq!(core.vcpu_count(), 2);
    assert_eq!(core.registers(0).unwrap(), sample_regs(0));
    assert_eq!(core.registers(1).unwrap(), sample_regs(1));
    assert!(matches!(
        core.registers(2),
        Err(Error::NoSuchVcpu { index: 2, count: 2 })
    ));
    assert_eq!(core.notes().sources, vec![RegisterSource::QemuNote; 2]);
    assert!(
        core.notes().warnings.is_empty(),
        "{:?}",
        core.notes().warnings
    );
    assert_eq!(core.vmcoreinfo(), Some("OSRELEASE=6.8.0\nPAGESIZE=4096\n"));
    assert_eq!(
        core.notes()
            .vmcoreinfo_map()
            .get("OSRELEASE")
            .map(String::as_str),
        Some("6.8.0")
    );
    assert_eq!(
        core.ranges(),
        &[
            PhysRange {
                start: Gpa(0),
                end: Gpa(0x2000)
            },
            PhysRange {
                start: Gpa(0x10_0000),
                end: Gpa(0x10_1000)
            }
        ]
    );
    // Across the boundary of two contiguous segments.
    let mut buf = vec![0u8; 0x20];
    core.read_phys(Gpa(0xff0), &mut buf).unwrap();
    assert_eq!(buf, pattern_bytes(0xff0, 0x20));
    // Zero-filled tail after p_filesz.
    core.read_phys(Gpa(0x10_07f0), &mut buf).unwrap();
    assert_eq!(&buf[..0x10], &pattern_bytes(0x10_07f0, 0x10)[..]);
    assert_eq!(&buf[0x10..], &[0u8; 0x10]);
    // Into the hole, and past the end.
    expect_unmapped(core.read_phys(Gpa(0x1ff8), &mut [0u8; 16]), 0x2000);
    expect_unmapped(core.read_phys(Gpa(0x10_0ff8), &mut [0u8; 16]), 0x10_1000);
    expect_unmapped(
        core.read_phys(Gpa(u64::MAX - 1), &mut [0u8; 16]),
        u64::MAX - 1,
    );
    assert_eq!(
        core.read_u64(Gpa(8)).unwrap(),
        u64::from_le_bytes(pattern_bytes(8, 8).try_into().unwrap())
    );
}

#[test]
fn prstatus_only_and_qemu_only_cores() {
    let vcpus = [sample_regs(0), sample_regs(1), sample_regs(2)];
    let mem = [seg(0, vec![1; 64])];
    let pr_only = ElfCore::from_bytes(build_core(
        EM_X86_64,
        &mem,
        Some(&qemu_notes(&vcpus, true, false, None)),
    ))
    .unwrap();
    assert_eq!(pr_only.vcpu_count(), 3);
    assert_eq!(pr_only.notes().sources[2], RegisterSource::PrStatusOnly);
    let r = pr_only.registers(2).unwrap();
    assert_eq!(
        (r.vcpu, r.rip, r.rsp, r.gs.base),
        (2, vcpus[2].rip, vcpus[2].rsp, vcpus[2].gs.base)
    );
    assert_eq!(
        (r.cr3, r.gdtr.base, r.kernel_gs_base, r.efer),
        (0, 0, None, None)
    );
    assert!(pr_only.vmcoreinfo().is_none());

    let qemu_only = ElfCore::from_bytes(build_core(
        EM_X86_64,
        &mem,
        Some(&qemu_notes(&vcpus, false, true, None)),
    ))
    .unwrap();
    assert_eq!(qemu_only.all_registers().unwrap(), vcpus.to_vec());

    let no_notes = ElfCore::from_bytes(build_core(EM_X86_64, &mem, None)).unwrap();
    assert_eq!(no_notes.vcpu_count(), 0);
    assert!(matches!(
        no_notes.registers(0),
        Err(Error::NoSuchVcpu { .. })
    ));
}

#[test]
fn disagreeing_and_unpaired_notes_give_warnings() {
    let mut n = Vec::new();
    let a = sample_regs(0);
    let mut b = a.clone();
    b.rip += 1;
    push_note(&mut n, "CORE", NT_PRSTATUS, &encode_prstatus_x86_64(&b, 1)).unwrap();
    push_note(&mut n, "CORE", NT_PRSTATUS, &encode_prstatus_x86_64(&b, 7)).unwrap();
    push_note(&mut n, "QEMU", 0, &encode_qemu_cpu_state(&a)).unwrap();
    let mut future = encode_qemu_cpu_state(&a);
    future[0] = 9;
    push_note(&mut n, "QEMU", 0, &future).unwrap();
    let notes = parse_core_notes(&build_core(EM_X86_64, &[], Some(&n))).unwrap();
    assert_eq!(notes.vcpus.len(), 2);
    assert_eq!(notes.vcpus[0].rip, a.rip, "the QEMU note wins");
    assert_eq!(
        notes.sources,
        vec![RegisterSource::QemuNote, RegisterSource::PrStatusOnly]
    );
    let all = notes.warnings.join("\n");
    assert!(all.contains("disagree on rip"), "{all}");
    assert!(all.contains("pr_pid 7"), "{all}");
    assert!(all.contains("unsupported version 9"), "{all}");
}

#[test]
fn elf32_i386_core_is_read() {
    // QEMU writes ELF32/EM_386 when the guest is outside long mode with RAM below 4 GiB.
    let mut n = Vec::new();
    let mut full = sample_regs(0);
    full.rip = 0xfff0;
    full.kernel_gs_base = None;
    let mut pr = vec![0u8; PRSTATUS_I386_SIZE];
    pr[24..28].copy_from_slice(&1u32.to_le_bytes());
    let regs32 = [
        full.rbx, full.rcx, full.rdx, full.rsi, full.rdi, full.rbp, full.rax,
    ];
    for (i, v) in regs32.iter().enumerate() {
        pr[72 + 4 * i..76 + 4 * i].copy_from_slice(&(*v as u32).to_le_bytes());
    }
    for (off, sel) in [
        (28, full.ds),
        (32, full.es),
        (36, full.fs),
        (40, full.gs),
        (52, full.cs),
        (64, full.ss),
    ] {
        pr[72 + off..74 + off].copy_from_slice(&sel.selector.to_le_bytes());
    }
    pr[72 + 48..72 + 52].copy_from_slice(&(full.rip as u32).to_le_bytes());
    pr[72 + 56..72 + 60].copy_from_slice(&(full.rflags as u32).to_le_bytes());
    pr[72 + 60..72 + 64].copy_from_slice(&(full.rsp as u32).to_le_bytes());
    push_note(&mut n, "CORE", NT_PRSTATUS, &pr).unwrap();
    push_note(&mut n, "QEMU", 0, &encode_qemu_cpu_state(&full)).unwrap();
    let mem = pattern_bytes(0x1000, 64);

    let mut f = Vec::new();
    let mut ident = [0u8; 16];
    ident[..4].copy_from_slice(b"\x7fELF");
    ident[4] = 1;
    ident[5] = 1;
    ident[6] = 1;
    f.extend_from_slice(&ident);
    let push16 = |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&v.to_le_bytes());
    let push32 = |f: &mut Vec<u8>, v: u32| f.extend_from_slice(&v.to_le_bytes());
    push16(&mut f, ET_CORE);
    push16(&mut f, EM_386);
    push32(&mut f, 1); // version
    push32(&mut f, 0); // entry
    push32(&mut f, 52); // phoff
    push32(&mut f, 0); // shoff
    push32(&mut f, 0); // flags
    for v in [52u16, 32, 2, 0, 0, 0] {
        push16(&mut f, v);
    }
    let note_off = 52 + 64;
    let mem_off = note_off + n.len() as u32;
    for v in [
        PT_NOTE,
        note_off,
        0,
        0,
        n.len() as u32,
        n.len() as u32,
        0,
        4,
    ] {
        push32(&mut f, v);
    }
    for v in [PT_LOAD, mem_off, 0, 0x1000, 64, 64, 0, 0] {
        push32(&mut f, v);
    }
    f.extend_from_slice(&n);
    f.extend_from_slice(&mem);
    let core = ElfCore::from_bytes(f).unwrap();
    assert!(!core.is_elf64());
    assert_eq!(core.machine(), EM_386);
    assert_eq!(core.registers(0).unwrap(), full);
    assert!(
        core.notes().warnings.is_empty(),
        "{:?}",
        core.notes().warnings
    );
    let mut buf = [0u8; 64];
    core.read_phys(Gpa(0x1000), &mut buf).unwrap();
    assert_eq!(buf.to_vec(), mem);
}

#[test]
fn odd_segments_are_validated() {
    let notes = qemu_notes(&[sample_regs(0)], true, true, None);
    // Overlap.
    let err = ElfCore::from_bytes(build_core(
        EM_X86_64,
        &[seg(0x1000, vec![0; 0x100]), seg(0x10f0, vec![0; 0x10])],
        Some(&notes),
    ))
    .unwrap_err();
    assert!(
        err.to_string().contains("both claim guest-physical 0x10f0"),
        "{err}"
    );
    // p_filesz > p_memsz.
    let mut bad = seg(0, vec![0; 16]);
    bad.memsz = 8;
    let err = ElfCore::from_bytes(build_core(EM_X86_64, &[bad], None)).unwrap_err();
    assert!(err.to_string().contains("exceeds p_memsz"), "{err}");
    // Wrapping address.
    let mut wrap = seg(u64::MAX - 4, vec![0; 16]);
    wrap.memsz = 16;
    assert!(ElfCore::from_bytes(build_core(EM_X86_64, &[wrap], None)).is_err());
    // Empty segments are ignored; p_vaddr equal to p_paddr (modern QEMU) is fine; segments may
    // come in any order.
    let mut empty = seg(0x5000, vec![]);
    empty.memsz = 0;
    let mut hi = seg(0x9000, vec![3; 8]);
    hi.vaddr = 0x9000;
    let core = ElfCore::from_bytes(build_core(
        EM_X86_64,
        &[hi, empty, seg(0x2000, vec![2; 8])],
        None,
    ))
    .unwrap();
    assert_eq!(core.ranges().len(), 2);
    assert_eq!(core.ranges()[0].start, Gpa(0x2000));
    assert_eq!(core.read_u32(Gpa(0x9004)).unwrap(), 0x0303_0303);
    // Not a core, wrong machine, big-endian.
    let mut exec = typical_core();
    exec[16] = 2;
    assert!(ElfCore::from_bytes(exec)
        .unwrap_err()
        .to_string()
        .contains("not ET_CORE"));
    let mut arm = typical_core();
    arm[18] = 183;
    assert!(ElfCore::from_bytes(arm).is_err());
    let mut be = typical_core();
    be[5] = 2;
    assert!(ElfCore::from_bytes(be)
        .unwrap_err()
        .to_string()
        .contains("little-endian"));
}

#[test]
fn hostile_program_header_counts_are_bounded() {
    let mut f = build_core(EM_X86_64, &[seg(0, vec![0; 16])], None);
    // e_phnum = PN_XNUM with no section header.
    f[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
    assert!(ElfCore::from_bytes(f.clone()).is_err());
    // PN_XNUM with a section header claiming 4 billion entries.
    let shoff = f.len() as u64;
    let mut sh = vec![0u8; 64];
    sh[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
    f.extend_from_slice(&sh);
    f[40..48].copy_from_slice(&shoff.to_le_bytes());
    f[58..60].copy_from_slice(&64u16.to_le_bytes());
    f[60..62].copy_from_slice(&1u16.to_le_bytes());
    let err = ElfCore::from_bytes(f.clone()).unwrap_err();
    assert!(err.to_string().contains("program headers"), "{err}");
    // ... and one with the honest count works.
    f[shoff as usize + 44..shoff as usize + 48].copy_from_slice(&1u32.to_le_bytes());
    let core = ElfCore::from_bytes(f).unwrap();
    assert_eq!(core.ram_size(), 16);
    // A program header table far past the end.
    let mut far = typical_core();
    far[32..40].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
    assert!(ElfCore::from_bytes(far).is_err());
}

#[test]
fn every_truncation_is_an_error() {
    let full = typical_core();
    for cut in 0..full.len() {
        match ElfCore::from_bytes(full[..cut].to_vec()) {
            Err(DumpError::Truncated {
                missing,
                needed_end,
                file_len,
                ..
            }) => {
                assert_eq!(file_len, cut as u64);
                assert_eq!(missing, needed_end - file_len);
                assert!(missing > 0);
            }
            Err(e) if cut < 64 => assert!(!e.to_string().is_empty()),
            other => panic!("cut at {cut}: expected a truncation error, got {other:?}"),
        }
    }
    let err = ElfCore::from_bytes(full[..full.len() - 100].to_vec()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("PT_LOAD segment 3 (guest-physical 0x100000..0x101000)"),
        "{text}"
    );
    assert!(text.contains("(100 bytes missing)"), "{text}");
}

/// xorshift64*: deterministic, dependency-free randomness for the mutation test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn exercise(core: &ElfCore) {
    let mut buf = [0u8; 64];
    for r in core.ranges() {
        let _ = core.read_phys(r.start, &mut buf);
        let _ = core.read_phys(Gpa(r.end.0.saturating_sub(8)), &mut buf);
    }
    let _ = core.read_phys(Gpa(0xff0), &mut buf);
    for i in 0..core.vcpu_count() + 1 {
        let _ = core.registers(i);
    }
    let _ = core.notes().vmcoreinfo_map();
}

#[test]
fn random_mutations_never_panic() {
    let base = typical_core();
    let header_zone = 64 + 56 * 4 + 2000;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut opened = 0;
    for round in 0..3000 {
        let mut f = base.clone();
        for _ in 0..1 + rng.below(6) {
            // Mostly hit headers and notes, where the parsing is.
            let zone = if rng.below(4) == 0 {
                f.len()
            } else {
                header_zone.min(f.len())
            };
            let i = rng.below(zone);
            match rng.below(3) {
                0 => f[i] ^= 1 << rng.below(8),
                1 => f[i] = rng.next() as u8,
                _ => f[i] = [0, 0xff, 0x7f, 0x80][rng.below(4)],
            }
        }
        if round % 7 == 0 {
            let len = rng.below(f.len() + 1);
            f.truncate(len);
        }
        if let Ok(core) = ElfCore::from_bytes(f.clone()) {
            opened += 1;
            exercise(&core);
        }
        let _ = parse_core_notes(&f);
        let _ = Dump::from_bytes(f, None);
    }
    assert!(
        opened > 100,
        "mutations should often leave the core readable ({opened})"
    );
}

#[test]
fn writer_round_trip_with_hole_and_two_vcpus() {
    // A hole between 0x3000 and 0x10_0000 and a second range spanning several copy chunks.
    let mem = MockMemory::new(&[(0, 0x3000), (0x10_0000, (5 << 19) + 0x123)]);
    let vcpus = [sample_regs(0), sample_regs(1)];
    let info = "OSRELEASE=6.8.0\nSYMBOL(swapper_pg_dir)=ffffffff82a0a000\n";
    let mut out = std::io::Cursor::new(Vec::new());
    let mut calls = Vec::new();
    let written = write_elf_core(&mut out, &mem, &vcpus, Some(info), &mut |d, t| {
        calls.push((d, t))
    })
    .unwrap();
    let bytes = out.into_inner();
    assert_eq!(written, bytes.len() as u64);
    let total = mem.ram_size();
    assert_eq!(calls.first(), Some(&(0, total)));
    assert_eq!(calls.last(), Some(&(total, total)));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    assert!(calls.len() > 3);

    let core = ElfCore::from_bytes(bytes).unwrap();
    assert!(
        core.notes().warnings.is_empty(),
        "{:?}",
        core.notes().warnings
    );
    assert_eq!(core.all_registers().unwrap(), vcpus.to_vec());
    assert_eq!(core.vmcoreinfo(), Some(info));
    assert_eq!(core.ranges(), mem.ranges());
    for s in core.segments() {
        assert_eq!(s.file_offset % 4096, 0, "{s:?}");
        assert_eq!(s.file_size, s.mem_size);
    }
    for r in mem.ranges() {
        let mut got = vec![0u8; r.len() as usize];
        core.read_phys(r.start, &mut got).unwrap();
        assert!(
            got == pattern_bytes(r.start.0, got.len()),
            "range {r:?} differs"
        );
    }
    expect_unmapped(core.read_phys(Gpa(0x2ff0), &mut [0u8; 32]), 0x3000);

    // Without kernel_gs_base the QEMU note shrinks and the field reads back as absent.
    let mut old = vcpus.to_vec();
    for r in &mut old {
        r.kernel_gs_base = None;
    }
    let mut out = Vec::new();
    write_elf_core(&mut out, &mem, &old, None, &mut |_, _| {}).unwrap();
    assert_eq!(
        ElfCore::from_bytes(out).unwrap().all_registers().unwrap(),
        old
    );
}

#[test]
fn writer_to_path_is_atomic_and_no_clobber() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.core");
    let mem = MockMemory::new(&[(0, 0x2000), (0x8000, 0x1000)]);
    let vcpus = [sample_regs(0)];
    write_elf_core_to_path(&path, false, &mem, &vcpus, None, &mut |_, _| {}).unwrap();
    let dump = open_dump(&path, None).unwrap();
    assert_eq!(dump.format(), DumpFormat::ElfCore);
    assert_eq!(dump.recorded_registers().unwrap(), &vcpus[..]);
    assert_eq!(VcpuState::registers(&dump, 0).unwrap(), vcpus[0]);
    assert_eq!(
        dump.read_u64(Gpa(0x8000)).unwrap(),
        u64::from_le_bytes(pattern_bytes(0x8000, 8).try_into().unwrap())
    );

    let err = write_elf_core_to_path(&path, false, &mem, &vcpus, None, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, DumpError::DestinationExists { .. }), "{err}");
    write_elf_core_to_path(&path, true, &mem, &vcpus, None, &mut |_, _| {}).unwrap();

    // A read failure mid-dump leaves neither the destination nor a temporary file.
    let failing = MockMemory {
        poison: Some(0x1800),
        ..MockMemory::new(&[(0, 0x2000)])
    };
    let fresh = dir.path().join("failed.core");
    let err =
        write_elf_core_to_path(&fresh, false, &failing, &vcpus, None, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("0x1800"), "{err}");
    assert!(!fresh.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("guest.core")]);
}

/// Fails (never skips) when a host tool a test needs is missing, naming the package.
fn require_tool(tool: &str, package: &str) {
    let ran = std::process::Command::new(tool).arg("--version").output();
    assert!(
        ran.is_ok_and(|out| out.status.success()),
        "{tool} is needed by this test and is not installed or does not run: install the \
         {package} package (`apt-get install {package}`; `make host-packages` installs the test \
         tools)"
    );
}

/// Runs `tool` (from `package`) with the arguments `args` makes for the path of a core of two
/// vCPUs (`sample_regs`) over RAM at 0-4K and 1M-1M+8K, with VMCOREINFO. Returns its stdout,
/// stderr and success.
fn run_on_sample_core(
    tool: &str,
    package: &str,
    args: impl FnOnce(&str) -> Vec<String>,
) -> (String, String, bool) {
    require_tool(tool, package);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.core");
    let mem = MockMemory::new(&[(0, 0x1000), (0x10_0000, 0x2000)]);
    write_elf_core_to_path(
        &path,
        false,
        &mem,
        &[sample_regs(0), sample_regs(1)],
        Some("A=1\n"),
        &mut |_, _| {},
    )
    .unwrap();
    let out = std::process::Command::new(tool)
        .args(args(path.to_str().unwrap()))
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn readelf_accepts_written_core() {
    let (text, errs, ok) = run_on_sample_core("readelf", "binutils", |core| {
        ["-W", "-h", "-l", "-n", core].map(String::from).to_vec()
    });
    assert!(ok, "{errs}");
    assert!(
        !errs.contains("Error") && !errs.contains("Warning"),
        "{errs}"
    );
    assert!(text.contains("CORE (Core file)"), "{text}");
    assert!(text.contains("X86-64") || text.contains("x86-64"), "{text}");
    assert_eq!(text.matches("NT_PRSTATUS").count(), 2, "{text}");
    assert!(text.contains("VMCOREINFO"), "{text}");
    assert!(
        text.contains("0x0000000000100000 0x0000000000100000 0x002000 0x002000"),
        "{text}"
    );
}

/// gdb, which knows nothing of kvmaccess, finds each vCPU's registers in our NT_PRSTATUS notes
/// (one thread per vCPU) and guest memory at its physical address (p_vaddr = p_paddr).
#[test]
fn gdb_reads_registers_and_memory_of_written_core() {
    let (text, errs, ok) = run_on_sample_core("gdb", "gdb", |core| {
        let registers = "info registers rip rsp r15 fs_base";
        let commands = [
            "set architecture i386:x86-64",
            &format!("core-file {core}"),
            "thread 1",
            registers,
            "thread 2",
            registers,
            "x/8xb 0x100010",
        ];
        let mut args = vec!["-batch".to_string(), "-nx".to_string()];
        for command in commands {
            args.extend(["-ex".to_string(), command.to_string()]);
        }
        args
    });
    assert!(ok, "{text}{errs}");
    let mut want = Vec::new();
    for r in [sample_regs(0), sample_regs(1)] {
        want.extend([
            ("rip", r.rip),
            ("rsp", r.rsp),
            ("r15", r.r15),
            ("fs_base", r.fs.base),
        ]);
    }
    assert_eq!(gdb_registers(&text), want, "{text}{errs}");
    let bytes: Vec<String> = (0x10_0010..0x10_0018)
        .map(|gpa| format!("{:#04x}", pattern(gpa)))
        .collect();
    let dump_line = format!("0x100010:\t{}", bytes.join("\t"));
    assert!(
        text.lines().any(|l| l == dump_line),
        "want {dump_line:?} in\n{text}{errs}"
    );
}

/// `(name, value)` of every line gdb's `info registers` printed, in order (frame lines `#0 …`
/// and memory lines `0x100010: …` do not start with a register name).
fn gdb_registers(text: &str) -> Vec<(&str, u64)> {
    let register_name = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_alphabetic())
            && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next().filter(|w| register_name(w))?;
            let value = words.next()?.strip_prefix("0x")?;
            Some((name, u64::from_str_radix(value, 16).ok()?))
        })
        .collect()
}

#[test]
fn open_dump_sniffs_and_explains() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.core");
    let err = open_dump(&missing, None).unwrap_err();
    assert!(err.to_string().contains("nope.core"), "{err}");

    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        open_dump(&empty, None),
        Err(DumpError::Empty { .. })
    ));
    assert!(matches!(
        open_dump(&empty, Some(0)),
        Err(DumpError::Empty { .. })
    ));

    assert!(matches!(
        open_dump(dir.path(), None),
        Err(DumpError::NotAFile { .. })
    ));

    let raw = dir.path().join("mem.raw");
    std::fs::write(&raw, pattern_bytes(0x1000, 0x1000)).unwrap();
    let err = open_dump(&raw, None).unwrap_err();
    assert!(err.to_string().contains("--raw-base"), "{err}");
    let qevm = dir.path().join("saved.bin");
    std::fs::write(&qevm, b"QEVM\0\0\0\x03rest").unwrap();
    let err = open_dump(&qevm, None).unwrap_err().to_string();
    assert!(
        err.contains("QEMU migration stream") && err.contains("--raw-base"),
        "{err}"
    );
    let dump = open_dump(&raw, Some(0x1000)).unwrap();
    assert_eq!(dump.format(), DumpFormat::Raw);
    assert!(dump.recorded_registers().is_none() && dump.vmcoreinfo().is_none());
    assert!(matches!(
        VcpuState::registers(&dump, 0),
        Err(Error::Unsupported(_))
    ));
    assert_eq!(dump.vcpu_count(), 0);
    let mut b = [0u8; 4];
    dump.read_phys(Gpa(0x1ffc), &mut b).unwrap();
    assert_eq!(b.to_vec(), pattern_bytes(0x1ffc, 4));

    let core = dir.path().join("t.core");
    std::fs::write(&core, typical_core()).unwrap();
    let dump = open_dump(&core, None).unwrap();
    assert_eq!(dump.vmcoreinfo(), Some("OSRELEASE=6.8.0\nPAGESIZE=4096\n"));
    assert_eq!(dump.vcpu_count(), 2);
    let err = open_dump(&core, Some(0)).unwrap_err();
    assert!(err.to_string().contains("ELF core"), "{err}");

    let truncated = dir.path().join("short.core");
    let bytes = typical_core();
    std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
    let err = open_dump(&truncated, None).unwrap_err();
    assert!(err.to_string().contains("short.core is truncated"), "{err}");

    let lime = dir.path().join("m.lime");
    let mut l = encode_lime_header(0x2000, 0x2003).to_vec();
    l.extend_from_slice(&[1, 2, 3, 4]);
    std::fs::write(&lime, &l).unwrap();
    let dump = open_dump(&lime, None).unwrap();
    assert_eq!(dump.format(), DumpFormat::Lime);
    assert_eq!(dump.read_u32(Gpa(0x2000)).unwrap(), 0x0403_0201);

    // Errors convert into the core error type for trait-level callers.
    let core_err: Error = open_dump(&missing, None).unwrap_err().into();
    assert!(matches!(core_err, Error::Io { .. }));
}

/// Memory that reports a hole in the middle and fails any read that touches it, the way a
/// reader must treat never-touched RAM of a shared-file backend.
struct Sparse {
    ranges: Vec<PhysRange>,
    hole: PhysRange,
}

impl PhysicalMemory for Sparse {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        let end = gpa.0 + buf.len() as u64;
        if gpa.0 < self.hole.end.0 && end > self.hole.start.0 {
            return Err(Error::Unsupported(format!("read of the hole at {gpa}")));
        }
        buf.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = pattern(gpa.0 + i as u64));
        Ok(())
    }

    fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }

    fn data_ranges(&self, within: PhysRange) -> Vec<PhysRange> {
        [
            PhysRange {
                start: within.start,
                end: Gpa(self.hole.start.0.min(within.end.0)),
            },
            PhysRange {
                start: Gpa(self.hole.end.0.max(within.start.0)),
                end: within.end,
            },
        ]
        .into_iter()
        .filter(|r| r.start < r.end)
        .collect()
    }
}

#[test]
fn writer_does_not_read_holes_and_writes_them_as_zeros() {
    let mem = Sparse {
        ranges: vec![PhysRange {
            start: Gpa(0),
            end: Gpa(5 << 20),
        }],
        hole: PhysRange {
            start: Gpa(0x10_1000),
            end: Gpa(0x30_0000),
        },
    };
    let mut out = Vec::new();
    write_elf_core(&mut out, &mem, &[], None, &mut |_, _| {}).expect("holes are not read");
    let core = ElfCore::from_bytes(out).expect("core");
    let mut buf = vec![0xffu8; 0x20_0000];
    core.read_phys(Gpa(0x10_0000), &mut buf).expect("read");
    assert!(buf[..0x1000]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(0x10_0000 + i as u64)));
    assert!(
        buf[0x1000..].iter().all(|&b| b == 0),
        "the hole reads as zeros"
    );
    let mut tail = [0u8; 16];
    core.read_phys(Gpa(0x30_0000), &mut tail).expect("read");
    assert_eq!(tail[0], pattern(0x30_0000));
}
