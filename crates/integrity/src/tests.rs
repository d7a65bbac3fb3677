//! Unit tests: a synthetic kernel in mock memory (image mapped with 2 MiB pages at a chosen
//! KASLR slide), the classifier on hand-made patch sites, baselines on disk, restore plans.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use kvmaccess_core::{DescriptorTable, Gpa, Gva, PhysicalMemory, Registers};
use kvmaccess_linux::{
    Kernel, KernelLayout, KernelProfile, LayoutSource, Provenance, Symbol, SymbolSource,
    SymbolTable, VmcoreinfoSource,
};
use kvmaccess_testkit::{MapFlags, MockMemory, PageSize, PageTableBuilder, TableFormat};
use kvmaccess_x86::PagingMode;

use crate::patch::{classify, decode, Insn, Sites, Window, NOP5};
use crate::*;

const LINK_TEXT: u64 = 0xffff_ffff_8100_0000;
const PHYS: u64 = 0x100_0000;
const MODULE_BASE: u64 = 0xffff_ffff_c000_0000;

// Offsets from _text.
const FUNC_A: u64 = 0x1000;
const FUNC_B: u64 = 0x2000;
const SYS_GETPID: u64 = 0x3000;
const SYS_READ: u64 = 0x3100;
const FTRACE_CALLER: u64 = 0x4000;
const PF_HANDLER: u64 = 0x5000;
const ETEXT: u64 = 0x10_0000;
const RODATA: u64 = 0x20_0000;
const SYS_CALL_TABLE: u64 = RODATA + 0x100;
const JUMP_TABLE: u64 = RODATA + 0x1000;
// __ro_after_init data: the direct map's base, a slab cache pointer, a detected feature flag,
// and a function pointer set at boot.
const RO_AFTER_INIT: u64 = RODATA + 0x2000;
const PAGE_OFFSET_BASE: u64 = RO_AFTER_INIT;
const SOME_CACHEP: u64 = RO_AFTER_INIT + 0x8;
const FEATURE_FLAG: u64 = RO_AFTER_INIT + 0x10;
const BOOT_HOOK: u64 = RO_AFTER_INIT + 0x18;
const END_RO_AFTER_INIT: u64 = RO_AFTER_INIT + 0x1000;
const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;
const END_RODATA: u64 = RODATA + 0x1_0000;
const IDT_TABLE: u64 = 0x30_0000;
const GDT: u64 = 0x30_1000;
const END: u64 = 0x40_0000;

fn symbols(text: u64) -> Vec<Symbol> {
    let s = |name: &str, off: u64, kind| Symbol::new(name, text + off, kind);
    vec![
        s("_text", 0, 'T'),
        s("_stext", 0, 'T'),
        s("func_a", FUNC_A, 'T'),
        s("func_b", FUNC_B, 't'),
        s("__x64_sys_getpid", SYS_GETPID, 'T'),
        s("__x64_sys_read", SYS_READ, 'T'),
        s("ftrace_caller", FTRACE_CALLER, 'T'),
        s("asm_exc_page_fault", PF_HANDLER, 'T'),
        s("_etext", ETEXT, 'T'),
        s("__start_rodata", RODATA, 'D'),
        s("sys_call_table", SYS_CALL_TABLE, 'R'),
        s("after_table", SYS_CALL_TABLE + 16, 'R'),
        s("__start___jump_table", JUMP_TABLE, 'D'),
        s("__stop___jump_table", JUMP_TABLE + 16, 'D'),
        s("__start_ro_after_init", RO_AFTER_INIT, 'D'),
        s("page_offset_base", PAGE_OFFSET_BASE, 'D'),
        s("some_cachep", SOME_CACHEP, 'd'),
        s("feature_flag", FEATURE_FLAG, 'd'),
        s("boot_hook", BOOT_HOOK, 'd'),
        s("__end_ro_after_init", END_RO_AFTER_INIT, 'D'),
        s("__end_rodata", END_RODATA, 'D'),
        s("idt_table", IDT_TABLE, 'b'),
        s("gdt_copy", GDT, 'b'),
        s("_end", END, 'B'),
    ]
}

/// A kernel whose image sits at `LINK_TEXT + slide`, physical `PHYS`.
struct Guest {
    mem: MockMemory,
    root: Gpa,
    slide: u64,
}

impl Guest {
    fn new(slide: u64) -> Self {
        let mem = MockMemory::new(64 << 20);
        let mut tables = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
        for i in 0..2u64 {
            tables
                .map(
                    Gva(LINK_TEXT + slide + i * (2 << 20)),
                    Gpa(PHYS + i * (2 << 20)),
                    PageSize::Size2M,
                    MapFlags::KERNEL_RW,
                )
                .unwrap();
        }
        let root = tables.root();
        let g = Self { mem, root, slide };
        // Code: NOP5 at every function entry (ftrace sites), a jump-label NOP in func_a.
        for f in [FUNC_A, FUNC_B, SYS_GETPID, SYS_READ] {
            g.poke(f, &NOP5);
        }
        g.poke(FUNC_A + 0x10, &NOP5);
        g.poke(FTRACE_CALLER, &[0xc3]);
        // sys_call_table: getpid, read.
        g.poke(SYS_CALL_TABLE, &(g.text() + SYS_GETPID).to_le_bytes());
        g.poke(SYS_CALL_TABLE + 8, &(g.text() + SYS_READ).to_le_bytes());
        // One jump entry: code func_a+0x10, target func_a+0x40, relative to their fields.
        let entry = g.text() + JUMP_TABLE;
        let code = (g.text() + FUNC_A + 0x10).wrapping_sub(entry) as i64 as i32;
        let target = (g.text() + FUNC_A + 0x40).wrapping_sub(entry + 4) as i64 as i32;
        g.poke(JUMP_TABLE, &code.to_le_bytes());
        g.poke(JUMP_TABLE + 4, &target.to_le_bytes());
        g.boot_time_data(DIRECT_MAP, 1);
        g.poke(BOOT_HOOK, &(g.text() + FUNC_A).to_le_bytes());
        // IDT: vector 0x0e -> page-fault handler; GDT: null, kernel code, user code.
        let gate = restore::encode_gate64(g.text() + PF_HANDLER, 0x10, 0, 0xe, 0, true);
        g.poke(IDT_TABLE + 0x0e * 16, &gate);
        g.poke(GDT + 8, &0x00af_9b00_0000_ffffu64.to_le_bytes());
        g.poke(GDT + 16, &0x00af_fb00_0000_ffffu64.to_le_bytes());
        g
    }

    fn text(&self) -> u64 {
        LINK_TEXT + self.slide
    }

    /// What a boot writes into __ro_after_init: the direct map's base, a cache allocated in it,
    /// a feature flag.
    fn boot_time_data(&self, direct_map: u64, flag: u8) {
        self.poke(PAGE_OFFSET_BASE, &direct_map.to_le_bytes());
        self.poke(SOME_CACHEP, &(direct_map + 0x0123_4500).to_le_bytes());
        self.poke(FEATURE_FLAG, &[flag]);
    }

    fn poke(&self, offset: u64, bytes: &[u8]) {
        self.mem.write_bytes(Gpa(PHYS + offset), bytes).unwrap();
    }

    fn peek(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.mem.read_phys(Gpa(PHYS + offset), &mut b).unwrap();
        b
    }

    fn kernel(&self, build_id: &str) -> Kernel<'_> {
        self.kernel_over(&self.mem, build_id)
    }

    /// The kernel read through `mem` (this guest's memory behind a wrapper of the test's).
    fn kernel_over<'m>(&self, mem: &'m dyn PhysicalMemory, build_id: &str) -> Kernel<'m> {
        let profile = KernelProfile {
            release: "6.1.0-test".into(),
            build_id: Some(build_id.into()),
            layout: KernelLayout {
                mode: PagingMode::Level4,
                root: self.root,
                kaslr_offset: self.slide,
                phys_base: 0,
                page_offset_base: None,
            },
            vmcoreinfo: None,
            banner: None,
            symbols: SymbolTable::new(symbols(self.text())),
            provenance: Provenance {
                vmcoreinfo: VmcoreinfoSource::Absent("test".into()),
                layout: LayoutSource::Vmcoreinfo,
                symbols: SymbolSource::Absent("test".into()),
                checks: vec![],
                missing: vec![],
                steps: vec![],
            },
        };
        Kernel::from_profile(mem, profile)
    }

    fn regs(&self, vcpu: usize) -> Registers {
        Registers {
            vcpu,
            cr0: 0x8005_0033,
            cr4: 0x0035_06f0 | (1 << 20) | (1 << 21),
            efer: Some(0xd01),
            gdtr: DescriptorTable {
                base: self.text() + GDT,
                limit: 0x7f,
            },
            idtr: DescriptorTable {
                base: self.text() + IDT_TABLE,
                limit: 0xfff,
            },
            ..Registers::default()
        }
    }
}

fn modules() -> Vec<ModuleSpan> {
    vec![ModuleSpan {
        name: "evil".into(),
        start: MODULE_BASE,
        end: MODULE_BASE + 0x10000,
        text: true,
        base: MODULE_BASE,
        hidden: false,
    }]
}

/// The checks that need no BTF (the synthetic kernel has none).
fn classic() -> CheckSet {
    CheckSet::from_ids(&["cr", "gdt", "idt", "syscalls", "text"]).unwrap()
}

fn alarms(report: &Report) -> Vec<&Finding> {
    report.alarms().collect()
}

#[test]
fn kaslr_relative_locations_survive_a_new_slide() {
    let a = Guest::new(0x2e00_0000);
    let b = Guest::new(0x0a00_0000);
    let (ka, kb) = (a.kernel("aa"), b.kernel("aa"));
    let mut ma = AddressMap::from_kernel(&ka).unwrap();
    let mut mb = AddressMap::from_kernel(&kb).unwrap();
    ma.set_modules(modules());
    let mut mods_b = modules();
    mods_b[0].base += 0x20_0000;
    mods_b[0].start += 0x20_0000;
    mods_b[0].end += 0x20_0000;
    mb.set_modules(mods_b);

    let loc = ma.encode(a.text() + FUNC_B + 0x13);
    assert_eq!(loc.to_string(), "func_b+0x13");
    assert_eq!(mb.decode(&loc), Some(b.text() + FUNC_B + 0x13));
    assert!(loc.same_place(&mb.encode(b.text() + FUNC_B + 0x13)));
    assert!(!loc.same_place(&mb.encode(b.text() + FUNC_B + 0x14)));

    let m = ma.encode(MODULE_BASE + 0x40);
    assert!(matches!(&m, Location::Module { module, module_offset: 0x40, .. } if module == "evil"));
    assert_eq!(mb.decode(&m), Some(MODULE_BASE + 0x20_0040));

    let cea = ma.encode(CEA_RO_IDT);
    assert_eq!(
        cea,
        Location::Absolute {
            address: CEA_RO_IDT
        }
    );
    assert_eq!(mb.decode(&cea), Some(CEA_RO_IDT));
    assert_eq!(ma.encode(0), Location::Null);
    assert_eq!(ma.owner(0xdead_0000_0000), Owner::Unowned);
    assert!(ma.owner(a.text() + FUNC_A).is_kernel_text());
    assert!(matches!(ma.owner(MODULE_BASE + 1), Owner::Module { ref name, .. } if name == "evil"));
    assert_eq!(m.to_string(), "evil+0x40");
    assert_eq!(ma.owner(MODULE_BASE + 1).to_string(), "module evil text");
    // A module that unlinked itself keeps its own name; its owner says that it hid.
    let mut hidden = modules();
    hidden[0].hidden = true;
    ma.set_modules(hidden);
    assert_eq!(ma.encode(MODULE_BASE + 0x40).to_string(), "evil+0x40");
    assert_eq!(
        ma.owner(MODULE_BASE + 1).to_string(),
        "module evil (hidden from the module list) text"
    );
    // JSON keeps addresses exact.
    let json = serde_json::to_string(&loc).unwrap();
    let back: Location = serde_json::from_str(&json).unwrap();
    assert_eq!(back, loc);
}

#[test]
fn decoder_knows_the_hook_shapes() {
    let at = 0xffff_ffff_8100_1000u64;
    assert_eq!(
        decode(&[0xe9, 0xfb, 0x0f, 0x00, 0x00], at),
        Some(Insn::JmpRel32 {
            target: at + 0x1000
        })
    );
    assert_eq!(
        decode(&[0xe8, 0xfb, 0xff, 0xff, 0xff], at),
        Some(Insn::CallRel32 { target: at })
    );
    assert_eq!(
        decode(&[0xeb, 0xfe], at),
        Some(Insn::JmpRel8 { target: at })
    );
    assert_eq!(
        decode(&[0xff, 0x25, 0, 0, 0, 0], at),
        Some(Insn::JmpRipIndirect { slot: at + 6 })
    );
    let mut mov = vec![0x48, 0xb8];
    mov.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
    mov.extend_from_slice(&[0xff, 0xe0]);
    assert_eq!(
        decode(&mov, at),
        Some(Insn::MovRaxJmpRax {
            target: 0x1122_3344_5566_7788
        })
    );
    assert_eq!(decode(&[0xcc], at), Some(Insn::Int3));
    assert_eq!(decode(&NOP5, at), Some(Insn::Nop5));
    assert_eq!(decode(&[0x48, 0xb8, 1, 2], at), None);
    assert_eq!(decode(&[], at), None);
}

fn jmp(from: u64, to: u64, op: u8) -> [u8; 5] {
    let rel = (to.wrapping_sub(from + 5) as i64 as i32).to_le_bytes();
    [op, rel[0], rel[1], rel[2], rel[3]]
}

#[test]
fn classifier_tells_self_patching_from_hooks() {
    let text = LINK_TEXT;
    let table = SymbolTable::new(symbols(text));
    let mut map = AddressMap::from_symbols(&table).unwrap();
    map.set_modules(modules());
    let site = text + FUNC_A + 0x10;
    let sites = Sites {
        jump_labels: vec![(site, text + FUNC_A + 0x40)],
        ftrace_records: vec![text + FUNC_B],
        ftrace_records_known: true,
        ftrace_callers: vec![text + FTRACE_CALLER],
        ..Sites::default()
    };
    let base = text + FUNC_A;
    let mut old = vec![0x90u8; 0x2000];
    old[0x10..0x15].copy_from_slice(&NOP5);
    old[0x1000..0x1005].copy_from_slice(&NOP5);
    let check = |new: &[u8], start: u64, end: u64| {
        classify(
            &sites,
            &map,
            &Window {
                gva: base,
                old: &old,
                new,
            },
            start,
            end,
        )
    };

    // Jump label NOP -> jmp to its own target: info; jmp elsewhere: an alarm.
    let mut new = old.clone();
    new[0x10..0x15].copy_from_slice(&jmp(site, text + FUNC_A + 0x40, 0xe9));
    let v = check(&new, site, site + 5);
    assert_eq!(
        (v.class, v.severity),
        ("jump-label", Severity::Info),
        "{v:?}"
    );
    new[0x10..0x15].copy_from_slice(&jmp(site, MODULE_BASE + 8, 0xe9));
    let v = check(&new, site, site + 5);
    assert_eq!(
        (v.class, v.severity),
        ("inline-hook", Severity::Critical),
        "{v:?}"
    );

    // ftrace NOP -> call ftrace_caller: info; call into a module: an alarm.
    let fsite = text + FUNC_B;
    let mut new = old.clone();
    new[0x1000..0x1005].copy_from_slice(&jmp(fsite, text + FTRACE_CALLER, 0xe8));
    let v = check(&new, fsite, fsite + 5);
    assert_eq!((v.class, v.severity), ("ftrace", Severity::Info), "{v:?}");
    new[0x1000..0x1005].copy_from_slice(&jmp(fsite, MODULE_BASE, 0xe8));
    let v = check(&new, fsite, fsite + 5);
    assert_eq!(v.severity, Severity::Critical);

    // int3 with and without kprobes.
    let mut new = old.clone();
    new[0x800] = 0xcc;
    let v = check(&new, base + 0x800, base + 0x801);
    assert_eq!((v.class, v.severity), ("kprobe", Severity::High));
    let with_kprobes = Sites {
        kprobes_registered: true,
        ..sites.clone()
    };
    let v = classify(
        &with_kprobes,
        &map,
        &Window {
            gva: base,
            old: &old,
            new: &new,
        },
        base + 0x800,
        base + 0x801,
    );
    assert_eq!(v.severity, Severity::Info);

    // Inline jmp rel32 into a module, anywhere else in text.
    let hook = base + 0x900;
    let mut new = old.clone();
    new[0x900..0x905].copy_from_slice(&jmp(hook, MODULE_BASE + 0x10, 0xe9));
    let v = check(&new, hook, hook + 5);
    assert_eq!((v.class, v.severity), ("inline-hook", Severity::Critical));
    assert!(v.detail.contains("module evil"), "{}", v.detail);

    // mov rax, imm64; jmp rax to unowned memory; only part of the bytes differ.
    let mut new = old.clone();
    let mut mov = vec![0x48, 0xb8];
    mov.extend_from_slice(&0xffff_c900_dead_0000u64.to_le_bytes());
    mov.extend_from_slice(&[0xff, 0xe0]);
    new[0xa00..0xa0c].copy_from_slice(&mov);
    let v = check(&new, base + 0xa00, base + 0xa0c);
    assert_eq!((v.class, v.severity), ("inline-hook", Severity::Critical));
    assert_eq!(
        v.insn,
        Some(Insn::MovRaxJmpRax {
            target: 0xffff_c900_dead_0000
        })
    );
    assert!(v.detail.contains("unowned"), "{}", v.detail);

    // A KASLR-relocated absolute address (baseline from another slide) is explained.
    let delta = 0x0400_0000u64;
    let reloc = Sites {
        slide_delta: delta,
        ..Sites::default()
    };
    let mut old2 = old.clone();
    old2[0xb00..0xb08].copy_from_slice(&(text + FUNC_B).to_le_bytes());
    let mut new2 = old2.clone();
    new2[0xb00..0xb08].copy_from_slice(&(text + FUNC_B + delta).to_le_bytes());
    let first = (0..8)
        .find(|&i| old2[0xb00 + i] != new2[0xb00 + i])
        .unwrap() as u64;
    let last = (0..8)
        .rfind(|&i| old2[0xb00 + i] != new2[0xb00 + i])
        .unwrap() as u64;
    let v = classify(
        &reloc,
        &map,
        &Window {
            gva: base,
            old: &old2,
            new: &new2,
        },
        base + 0xb00 + first,
        base + 0xb00 + last + 1,
    );
    assert_eq!((v.class, v.severity), ("kaslr-relocation", Severity::Info));

    // A relocation that changes one byte into 0xcc is still a relocation, not an int3.
    let (was, delta) = (0xffff_ffff_928c_8790u64, 0x40_0000u64);
    let mut old3 = old.clone();
    old3[0xc00..0xc08].copy_from_slice(&was.to_le_bytes());
    let mut new3 = old3.clone();
    new3[0xc00..0xc08].copy_from_slice(&(was + delta).to_le_bytes());
    assert_eq!((old3[0xc02], new3[0xc02]), (0x8c, crate::patch::INT3));
    let v = classify(
        &Sites {
            slide_delta: delta,
            ..Sites::default()
        },
        &map,
        &Window {
            gva: base,
            old: &old3,
            new: &new3,
        },
        base + 0xc02,
        base + 0xc03,
    );
    assert_eq!((v.class, v.severity), ("kaslr-relocation", Severity::Info));
}

fn pass<'k, 'm>(kernel: &'k Kernel<'m>, g: &Guest) -> Context<'k, 'm> {
    Context::new(kernel, vec![g.regs(0), g.regs(1)])
        .unwrap()
        .with_modules(modules())
}

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Guest memory whose first `left` reads over `at` return `torn` there: a site the kernel is
/// rewriting while the monitor reads it.
struct TornReads<'a> {
    inner: &'a MockMemory,
    at: Gpa,
    torn: Vec<u8>,
    left: std::sync::atomic::AtomicUsize,
}

impl PhysicalMemory for TornReads<'_> {
    fn read_phys(
        &self,
        gpa: Gpa,
        buf: &mut [u8],
    ) -> std::result::Result<(), kvmaccess_core::Error> {
        self.inner.read_phys(gpa, buf)?;
        let end = gpa.0 + buf.len() as u64;
        let covers = gpa.0 <= self.at.0 && self.at.0 + self.torn.len() as u64 <= end;
        let take = |n: usize| n.checked_sub(1);
        if covers && self.left.fetch_update(Relaxed, Relaxed, take).is_ok() {
            let from = usize::try_from(self.at.0 - gpa.0).unwrap();
            buf[from..from + self.torn.len()].copy_from_slice(&self.torn);
        }
        Ok(())
    }

    fn ranges(&self) -> &[kvmaccess_core::PhysRange] {
        self.inner.ranges()
    }
}

#[test]
fn a_site_caught_mid_patch_is_classified_from_its_settled_bytes() {
    let g = Guest::new(0x1200_0000);
    let kernel = g.kernel("abcd");
    let checks = classic();
    let baseline = capture_baseline(&pass(&kernel, &g), &checks).unwrap();
    // The tracer attached to func_b: legitimate. The first three reads of the site (the
    // comparison with the baseline, the copy of the block that differs, and the classifier's
    // read around the change) see the old nop with one byte of the call already written.
    let t = g.text();
    let call = jmp(t + FUNC_B, t + FTRACE_CALLER, 0xe8);
    g.poke(FUNC_B, &call);
    let mut torn = NOP5.to_vec();
    torn[1] = call[1];
    assert_ne!(torn[..], NOP5[..]);
    let memory = TornReads {
        inner: &g.mem,
        at: Gpa(PHYS + FUNC_B),
        torn,
        left: AtomicUsize::new(3),
    };
    let moving = g.kernel_over(&memory, "abcd");
    let report = run_checks(&pass(&moving, &g), &baseline, &checks).unwrap();
    assert_eq!(
        memory.left.load(Relaxed),
        0,
        "the torn bytes were not read three times"
    );
    assert!(alarms(&report).is_empty(), "{:#?}", report.findings);
    assert!(
        report.findings.iter().any(|f| f.class == "ftrace"),
        "{:#?}",
        report.findings
    );
}

#[test]
fn per_check_cpu_is_measured_unless_switched_off() {
    let g = Guest::new(0x1200_0000);
    let kernel = g.kernel("abcd");
    let baseline = capture_baseline(&pass(&kernel, &g), &classic()).unwrap();
    let timed = run_checks(&pass(&kernel, &g), &baseline, &classic()).unwrap();
    assert!(timed.checks.iter().all(|c| c.cpu.is_some()), "{timed:?}");
    let untimed = classic().without_per_check_cpu();
    let report = run_checks(&pass(&kernel, &g), &baseline, &untimed).unwrap();
    assert_eq!(report.checks.len(), timed.checks.len());
    assert!(report.checks.iter().all(|c| c.cpu.is_none()), "{report:?}");
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

#[test]
fn a_clean_guest_has_no_findings_and_hooks_are_reported_and_restored() {
    let g = Guest::new(0x1200_0000);
    let kernel = g.kernel("abcd");
    let checks = classic();
    let baseline = capture_baseline(&pass(&kernel, &g), &checks).unwrap();
    assert_eq!(baseline.checks.len(), 5);
    let report = run_checks(&pass(&kernel, &g), &baseline, &checks).unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(report.errors().count(), 0);

    // Legitimate: a jump label switched, ftrace attached to func_b (shape-recognised: no BTF).
    let t = g.text();
    g.poke(
        FUNC_A + 0x10,
        &jmp(t + FUNC_A + 0x10, t + FUNC_A + 0x40, 0xe9),
    );
    g.poke(FUNC_B, &jmp(t + FUNC_B, t + FTRACE_CALLER, 0xe8));
    let report = run_checks(&pass(&kernel, &g), &baseline, &checks).unwrap();
    assert!(alarms(&report).is_empty(), "{:#?}", report.findings);
    let classes: Vec<&str> = report.findings.iter().map(|f| f.class).collect();
    assert!(
        classes.contains(&"jump-label") && classes.contains(&"ftrace"),
        "{classes:?}"
    );

    // Attacks: syscall entry 0 to a module, IDT 0x0e to unowned memory, a DPL-3 call gate,
    // CR0.WP off on vCPU 1, an inline hook in __x64_sys_read.
    let evil = MODULE_BASE + 0x100;
    g.poke(SYS_CALL_TABLE, &evil.to_le_bytes());
    let gate = restore::encode_gate64(0xffff_c900_0000_1000, 0x10, 0, 0xe, 0, true);
    g.poke(IDT_TABLE + 0x0e * 16, &gate);
    let call_gate_low: u64 = 0x0000_ec00_0010_1000; // type 0xc, DPL 3, P, selector 0x10
    g.poke(GDT + 0x30, &call_gate_low.to_le_bytes());
    g.poke(GDT + 0x38, &0xffff_ffffu64.to_le_bytes());
    g.poke(SYS_READ, &jmp(t + SYS_READ, evil, 0xe9));
    let mut ctx = pass(&kernel, &g);
    ctx.vcpus[1].cr0 &= !(1 << 16);
    let report = run_checks(&ctx, &baseline, &checks).unwrap();
    for f in report.alarms() {
        eprintln!("{f}");
    }
    let find = |check: &str, class: &str| {
        report
            .alarms()
            .find(|f| f.check == check && f.class == class)
            .unwrap_or_else(|| panic!("no {check}/{class} in {:#?}", report.findings))
            .clone()
    };
    let sys = find("syscalls", "table-hook");
    assert_eq!(sys.entry, "syscall 0 (getpid)");
    assert_eq!(sys.severity, Severity::Critical);
    assert!(sys.owner.as_deref().unwrap().contains("module evil"));
    let idt = find("idt", "handler-moved");
    assert_eq!(idt.entry, "vector 0x0e");
    assert_eq!(idt.owner.as_deref(), Some("unowned memory"));
    assert!(
        idt.explanation.contains("vCPUs 0, 1"),
        "{}",
        idt.explanation
    );
    assert_eq!(find("gdt", "call-gate").severity, Severity::Critical);
    let wp = find("cr", "protection-off");
    assert_eq!((wp.object.as_str(), wp.vcpu), ("CR0.WP", Some(1)));
    let hook = find("text", "inline-hook");
    assert_eq!(hook.entry, "__x64_sys_read");
    assert!(hook.owner.as_deref().unwrap().contains("module evil"));
    // The table lives in rodata: the text check sees the pointer too.
    assert_eq!(find("text", "pointer-hook").entry, "sys_call_table");

    // Restore what memory writes can restore; CR0.WP cannot be.
    for f in [&sys, &idt, &hook, &find("gdt", "call-gate")] {
        match restore_plan(&ctx, f, &baseline).unwrap() {
            Restore::Write(w) => apply_write(&g.mem, kernel.layout(), &w).unwrap(),
            Restore::Impossible { reason } => panic!("{f}: {reason}"),
        }
    }
    assert!(matches!(
        restore_plan(&ctx, &wp, &baseline).unwrap(),
        Restore::Impossible { .. }
    ));
    assert_eq!(g.peek(SYS_CALL_TABLE, 8), (t + SYS_GETPID).to_le_bytes());
    let report = run_checks(&pass(&kernel, &g), &baseline, &checks).unwrap();
    assert!(alarms(&report).is_empty(), "{:#?}", report.findings);
    assert!(report.checks.iter().all(|c| c.error.is_none()));
}

#[test]
fn baselines_round_trip_and_refuse_other_builds() {
    let g = Guest::new(0x0600_0000);
    let kernel = g.kernel("0123abcd");
    let checks = classic();
    let baseline = capture_baseline(&pass(&kernel, &g), &checks).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.json");
    baseline.save(&path).unwrap();
    assert!(Baseline::sidecar_path(&path).is_file());
    let loaded = Baseline::load(&path).unwrap();
    assert_eq!(loaded.checks, baseline.checks);
    assert_eq!(loaded.blob("text/kernel text").unwrap().len() as u64, ETEXT);
    let report = run_checks(&pass(&kernel, &g), &loaded, &checks).unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);

    // Same build after a reboot with another slide: still clean.
    let moved = Guest::new(0x2200_0000);
    let kmoved = moved.kernel("0123ABCD");
    let report = run_checks(&pass(&kmoved, &moved), &loaded, &checks).unwrap();
    assert!(alarms(&report).is_empty(), "{:#?}", report.findings);
    // The two table pointers moved with the slide: explained, not alarms.
    let infos: Vec<(&str, &str)> = report
        .findings
        .iter()
        .map(|f| (f.class, f.object.as_str()))
        .collect();
    assert_eq!(infos, [("kaslr-relocation", "rodata")]);

    // Another build: refused, naming both ids.
    let other = g.kernel("ffff0000");
    let err = run_checks(&pass(&other, &g), &loaded, &checks).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("0123abcd") && msg.contains("ffff0000"),
        "{msg}"
    );

    // A tampered sidecar is refused.
    let side = Baseline::sidecar_path(&path);
    let mut bytes = std::fs::read(&side).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&side, bytes).unwrap();
    let err = Baseline::load(&path).unwrap_err().to_string();
    assert!(err.contains("BLAKE3"), "{err}");

    // Unknown versions and check ids are refused with what is known.
    let text = baseline
        .to_json()
        .unwrap()
        .replace("\"version\": 1", "\"version\": 99");
    assert!(Baseline::from_json(&text, &path).is_err());
    let err = CheckSet::from_ids(&["idt", "nope"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope") && err.contains("syscalls"), "{err}");
    assert_eq!(
        CheckSet::from_ids(&["idt", "cr"]).unwrap().ids(),
        ["cr", "idt"]
    );
    assert_eq!(CheckSet::without(&["text"]).unwrap().ids().len(), 7);
}

#[test]
fn another_boots_boot_time_data_is_informational_but_its_code_pointers_are_compared() {
    let g = Guest::new(0x0600_0000);
    let kernel = g.kernel("b007");
    let checks = CheckSet::from_ids(&["text"]).unwrap();
    let baseline = capture_baseline(&pass(&kernel, &g), &checks).unwrap();

    let only_hook = |report: &Report, entry: &str| {
        let found: Vec<(&str, &str)> = report
            .alarms()
            .map(|f| (f.class, f.entry.as_str()))
            .collect();
        assert_eq!(found, [("pointer-hook", entry)], "{:#?}", report.findings);
    };

    // Within the boot the baseline came from, a redirected cache pointer is an alarm.
    g.poke(SOME_CACHEP, &(DIRECT_MAP + 0x0999_0000).to_le_bytes());
    only_hook(
        &run_checks(&pass(&kernel, &g), &baseline, &checks).unwrap(),
        "some_cachep",
    );

    // Another boot, with another slide or only another direct map (memory randomisation with
    // the same slide): its boot-time data differs, and says so without an alarm.
    for slide in [0x2200_0000, 0x0600_0000] {
        let next = Guest::new(slide);
        next.boot_time_data(0xff11_0000_0000_0000, 0);
        let kernel = next.kernel("b007");
        let report = run_checks(&pass(&kernel, &next), &baseline, &checks).unwrap();
        assert!(alarms(&report).is_empty(), "{:#?}", report.findings);
        assert!(
            report.findings.iter().any(|f| f.class == "boot-data"),
            "{:#?}",
            report.findings
        );

        // A function pointer installed at boot must still point at the same function.
        next.poke(BOOT_HOOK, &(next.text() + FUNC_B).to_le_bytes());
        only_hook(
            &run_checks(&pass(&kernel, &next), &baseline, &checks).unwrap(),
            "boot_hook",
        );
    }
}

#[test]
fn gdt_changes_are_graded() {
    let g = Guest::new(0);
    let kernel = g.kernel("x");
    let checks = CheckSet::from_ids(&["gdt"]).unwrap();
    let baseline = capture_baseline(&pass(&kernel, &g), &checks).unwrap();
    // The CPU setting the accessed bit is no change.
    g.poke(GDT + 8, &0x00af_9b00_0000_ffffu64.to_le_bytes());
    g.poke(GDT + 8 + 5, &[0x9b]);
    let r = run_checks(&pass(&kernel, &g), &baseline, &checks).unwrap();
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    // Kernel code segment lowered to DPL 3: high; a new DPL-3 data segment: high.
    g.poke(GDT + 8, &0x00af_fb00_0000_ffffu64.to_le_bytes());
    g.poke(GDT + 0x40, &0x00cf_f300_0000_ffffu64.to_le_bytes());
    let r = run_checks(&pass(&kernel, &g), &baseline, &checks).unwrap();
    let classes: Vec<(&str, Severity, Option<usize>)> = r
        .findings
        .iter()
        .map(|f| (f.class, f.severity, f.vcpu))
        .collect();
    assert!(
        classes.contains(&("dpl-change", Severity::High, Some(0))),
        "{classes:?}"
    );
    assert!(
        classes.contains(&("new-descriptor", Severity::High, Some(1))),
        "{classes:?}"
    );
    // GDTR moved on one vCPU.
    let mut ctx = pass(&kernel, &g);
    ctx.vcpus[0].gdtr.base += 0x1000;
    let r = run_checks(&ctx, &baseline, &checks).unwrap();
    assert!(r
        .findings
        .iter()
        .any(|f| f.class == "table-moved" && f.vcpu == Some(0)));
}

#[test]
fn control_register_policy() {
    let g = Guest::new(0);
    let kernel = g.kernel("x");
    let checks = CheckSet::from_ids(&["cr"]).unwrap();
    let baseline = capture_baseline(&pass(&kernel, &g), &checks).unwrap();
    let mut ctx = pass(&kernel, &g);
    ctx.vcpus[0].cr4 &= !(1 << 20); // SMEP off
    ctx.vcpus[0].cr4 ^= 1 << 7; // PGE toggled by a TLB flush: not reported
    ctx.vcpus[1].efer = Some(0x501); // NXE off
    let r = run_checks(&ctx, &baseline, &checks).unwrap();
    let got: Vec<(&str, Severity)> = r
        .findings
        .iter()
        .map(|f| (f.object.as_str(), f.severity))
        .collect();
    assert_eq!(
        got,
        [("CR4.SMEP", Severity::High), ("EFER.NXE", Severity::High)]
    );
    let line = r.findings[0].to_string();
    assert!(
        line.starts_with("[high] cr: CR4.SMEP vCPU 0: expected set, now clear"),
        "{line}"
    );

    // A baseline with WP already clear: no baseline difference, but the policy still fires.
    let mut cleared = pass(&kernel, &g);
    for v in &mut cleared.vcpus {
        v.cr0 &= !(1 << 16);
    }
    let baseline = capture_baseline(&cleared, &checks).unwrap();
    let r = run_checks(&cleared, &baseline, &checks).unwrap();
    assert_eq!(r.findings.len(), 2);
    assert!(r
        .findings
        .iter()
        .all(|f| f.class == "policy" && f.severity == Severity::Critical));
}

#[test]
fn a_text_budget_covers_everything_in_turn() {
    let g = Guest::new(0x0400_0000);
    let kernel = g.kernel("b");
    let checks = CheckSet::from_ids(&["text"])
        .unwrap()
        .with_text_budget(64 << 10);
    let baseline = capture_baseline(&pass(&kernel, &g), &checks).unwrap();
    let t = g.text();
    g.poke(0x8_0000, &jmp(t + 0x8_0000, MODULE_BASE, 0xe9));
    // 1 MiB of text and 64 KiB of rodata at 64 KiB per pass: 17 passes cover it all.
    let hits: usize = (0..17)
        .map(|_| {
            run_checks(&pass(&kernel, &g), &baseline, &checks)
                .unwrap()
                .alarms()
                .count()
        })
        .sum();
    assert_eq!(hits, 1);
}
