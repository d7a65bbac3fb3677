//! Unit tests of the view-comparison checks (`modules`, `tasks`, `ftrace`): a synthetic kernel
//! whose objects live in a mock direct map, with hand-picked offsets.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::cell::{Cell, RefCell};
use std::time::Duration;

use kvmaccess_core::{Gpa, Gva, Registers};
use kvmaccess_linux::modules::ModuleLayoutOffsets;
use kvmaccess_linux::ModTreeOffsets;
use kvmaccess_linux::{
    Kernel, KernelLayout, KernelProfile, ModuleOffsets, Provenance, Symbol, SymbolTable,
    TaskOffsets,
};
use kvmaccess_testkit::{MapFlags, MockMemory, PageSize, PageTableBuilder, TableFormat};
use kvmaccess_x86::PagingMode;

use crate::*;

const DIRECT: u64 = 0xffff_8880_0000_0000;
const MAPPED: u64 = 16 << 20;
const TEXT: u64 = 0xffff_ffff_8100_0000;
const FUNCTION_TRACE_CALL: u64 = TEXT + 0x1000;
const SYS_GETPID: u64 = TEXT + 0x2000;
const SYS_GETPPID: u64 = TEXT + 0x2100;
const AGGR_PRE: u64 = TEXT + 0x3000;
const KPROBE_DISPATCHER: u64 = TEXT + 0x4000;
const MODULE_BASE: u64 = 0xffff_ffff_c000_0000;
const UNOWNED: u64 = 0xffff_c900_dead_0000;

struct World {
    mem: MockMemory,
    root: Gpa,
    next: Cell<u64>,
    symbols: RefCell<Vec<Symbol>>,
}

impl World {
    fn new() -> Self {
        let mem = MockMemory::new(32 << 20);
        let root = {
            let mut b = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
            for i in 0..MAPPED / (2 << 20) {
                b.map(
                    Gva(DIRECT + i * (2 << 20)),
                    Gpa(i * (2 << 20)),
                    PageSize::Size2M,
                    MapFlags::KERNEL_RW.nx(),
                )
                .unwrap();
            }
            b.root()
        };
        let s = |n: &str, a, k| Symbol::new(n, a, k);
        Self {
            mem,
            root,
            next: Cell::new(DIRECT + (8 << 20)),
            symbols: RefCell::new(vec![
                s("_text", TEXT, 'T'),
                s("_stext", TEXT, 'T'),
                s("function_trace_call", FUNCTION_TRACE_CALL, 'T'),
                s("__x64_sys_getpid", SYS_GETPID, 'T'),
                s("__x64_sys_getppid", SYS_GETPPID, 'T'),
                s("aggr_pre_handler", AGGR_PRE, 't'),
                s("kprobe_dispatcher", KPROBE_DISPATCHER, 't'),
                s("_etext", TEXT + 0x10_0000, 'T'),
                s("_end", TEXT + 0x40_0000, 'B'),
            ]),
        }
    }

    fn alloc(&self, size: u64) -> u64 {
        let at = self.next.get();
        self.next.set((at + size + 63) & !63);
        assert!(self.next.get() <= DIRECT + MAPPED);
        self.bytes(at, &vec![0; size as usize]);
        at
    }

    fn symbol(&self, name: &str, at: u64) {
        self.symbols.borrow_mut().push(Symbol::new(name, at, 'd'));
    }

    fn bytes(&self, gva: u64, data: &[u8]) {
        self.mem.write_bytes(Gpa(gva - DIRECT), data).unwrap();
    }

    fn u64(&self, gva: u64, v: u64) {
        self.bytes(gva, &v.to_le_bytes());
    }

    fn u32(&self, gva: u64, v: u32) {
        self.bytes(gva, &v.to_le_bytes());
    }

    fn read(&self, gva: u64) -> u64 {
        let mut raw = [0u8; 8];
        self.mem.peek(Gpa(gva - DIRECT), &mut raw).unwrap();
        u64::from_le_bytes(raw)
    }

    /// Append `node` to the circular list at `head` (singly followed: only `next` links).
    fn append(&self, head: u64, node: u64) {
        let mut last = head;
        while self.read(last) != head {
            last = self.read(last);
        }
        self.u64(last, node);
        self.u64(node, head);
    }

    /// Unlink `node` from the circular list at `head`.
    fn unlink(&self, head: u64, node: u64) {
        let mut prev = head;
        while self.read(prev) != node {
            prev = self.read(prev);
        }
        self.u64(prev, self.read(node));
    }

    fn string(&self, s: &str) -> u64 {
        let at = self.alloc(s.len() as u64 + 1);
        self.bytes(at, s.as_bytes());
        at
    }

    fn kernel(&self) -> Kernel<'_> {
        let profile = KernelProfile {
            release: "6.1.0-test".into(),
            build_id: Some("ab".into()),
            layout: KernelLayout {
                mode: PagingMode::Level4,
                root: self.root,
                kaslr_offset: 0,
                phys_base: 0,
                page_offset_base: Some(DIRECT),
            },
            vmcoreinfo: None,
            banner: None,
            symbols: SymbolTable::new(self.symbols.borrow().clone()),
            provenance: Provenance::supplied("the test"),
        };
        Kernel::from_profile(&self.mem, profile)
    }
}

fn ctx<'k, 'm>(kernel: &'k Kernel<'m>) -> Context<'k, 'm> {
    ctx_with(kernel, false)
}

/// A context whose one module, "evil", is listed or (`hidden`) found only through sysfs.
fn ctx_with<'k, 'm>(kernel: &'k Kernel<'m>, hidden: bool) -> Context<'k, 'm> {
    Context::new(kernel, vec![Registers::default()])
        .unwrap()
        .with_modules(vec![ModuleSpan {
            name: "evil".into(),
            start: MODULE_BASE,
            end: MODULE_BASE + 0x10000,
            text: true,
            base: MODULE_BASE,
            hidden,
        }])
}

fn set(check: impl Check + 'static) -> CheckSet {
    let mut s = CheckSet::from_ids::<&str>(&[]).unwrap();
    s.push(Box::new(check));
    s
}

fn summary(r: &Report) -> Vec<(Severity, &'static str, String)> {
    r.findings
        .iter()
        .map(|f| (f.severity, f.class, f.entry.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// modules

fn module_offsets() -> ModuleOffsets {
    ModuleOffsets {
        module_size: 0x240,
        list_next: 0,
        list: 8,
        name: 24,
        name_len: 56,
        state: 0,
        state_size: 4,
        state_names: vec![(0, "MODULE_STATE_LIVE".into())],
        layout: ModuleLayoutOffsets::Layouts {
            core: 0x80,
            init: 0xa0,
            base: 0,
            size: 8,
            size_bytes: 4,
            text_size: 12,
            ro_size: 16,
            ro_after_init_size: Some(20),
        },
        taints: Some(0xc0),
        refcnt: Some(0xc8),
        kallsyms: None,
        ks_symtab: 0,
        ks_num_symtab: 8,
        ks_strtab: 16,
        ks_typetab: None,
        sym_size: 24,
        st_name: 0,
        st_value: 8,
        mkobj: 0xe0,
        mk_kobj: 0,
        mk_mod: 0x40,
        kset_list: 0,
        kobj_entry: 8,
        kobj_name: 0,
        tree: None,
    }
}

struct Modules<'w> {
    w: &'w World,
    off: ModuleOffsets,
    head: u64,
    kset: u64,
}

impl<'w> Modules<'w> {
    fn new(w: &'w World) -> Self {
        let head = w.alloc(16);
        w.u64(head, head);
        let kset = w.alloc(96);
        w.u64(kset, kset);
        let kset_ptr = w.alloc(8);
        w.u64(kset_ptr, kset);
        w.symbol("modules", head);
        w.symbol("module_kset", kset_ptr);
        Self {
            w,
            off: module_offsets(),
            head,
            kset,
        }
    }

    fn module(&self, name: &str, base: u64, size: u32, taints: u64) -> u64 {
        let (w, o) = (self.w, &self.off);
        let m = w.alloc(o.module_size);
        w.bytes(m + o.name, name.as_bytes());
        w.u64(m + 0x80, base);
        w.u32(m + 0x80 + 8, size);
        w.u32(m + 0x80 + 12, size / 2);
        w.u32(m + 0x80 + 16, size / 2);
        w.u32(m + 0x80 + 20, size / 2);
        w.u64(m + o.taints.unwrap(), taints);
        w.append(self.head, m + o.list);
        let mk = m + o.mkobj;
        w.u64(mk + o.kobj_name, w.string(name));
        w.u64(mk + o.mk_mod, m);
        w.append(self.kset + o.kset_list, mk + o.kobj_entry);
        m
    }
}

#[test]
fn hidden_modules_and_module_changes() {
    let w = World::new();
    let ms = Modules::new(&w);
    let good = ms.module("good", MODULE_BASE + 0x10_0000, 0x4000, 0);
    // A built-in module with parameters: a kobject without a struct module.
    let builtin = w.alloc(0x60);
    w.u64(builtin, w.string("printk"));
    w.append(ms.kset, builtin + ms.off.kobj_entry);
    let kernel = w.kernel();
    let checks = set(ModulesCheck::with_offsets(ms.off.clone()));
    let baseline = capture_baseline(&ctx(&kernel), &checks).unwrap();
    assert_eq!(baseline.checks["modules"]["modules"][0]["name"], "good");
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert!(r.findings.is_empty(), "{:#?}", r.findings);

    // evil loads, unsigned and out of tree, and unlinks itself from the list.
    let evil = ms.module("evil", MODULE_BASE, 0x2000, (1 << 12) | (1 << 13));
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    let loaded = &r.findings[0];
    assert_eq!(
        (loaded.severity, loaded.class, loaded.entry.as_str()),
        (Severity::Info, "module-loaded", "evil")
    );
    assert!(
        loaded.actual.contains("OE (out-of-tree, unsigned)"),
        "{}",
        loaded.actual
    );
    w.unlink(ms.head, evil + ms.off.list);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert_eq!(
        summary(&r),
        [(Severity::Critical, "hidden-module", "evil".to_string())]
    );
    let f = &r.findings[0];
    assert_eq!(
        f.explanation.split(':').next().unwrap(),
        "module evil is hidden from the module list (still registered in sysfs)"
    );
    assert!(
        f.actual.contains("OE (out-of-tree, unsigned)"),
        "{}",
        f.actual
    );

    // good unloaded (list and kset); good reloaded bigger.
    w.unlink(ms.head, good + ms.off.list);
    w.unlink(ms.kset, good + ms.off.mkobj + ms.off.kobj_entry);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert_eq!(
        summary(&r),
        [
            (Severity::Critical, "hidden-module", "evil".to_string()),
            (Severity::Info, "module-unloaded", "good".to_string())
        ]
    );
    ms.module("good", MODULE_BASE + 0x20_0000, 0x8000, 0);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert_eq!(
        summary(&r)[1..],
        [(Severity::Low, "module-changed", "good".to_string())]
    );

    // A module list that loops is an error of the check, not a hang.
    let a = ms.module("a", MODULE_BASE + 0x30_0000, 0x1000, 0);
    w.u64(a + ms.off.list, a + ms.off.list);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    let errors: Vec<_> = r.errors().collect();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].1.contains("modules"), "{errors:?}");
}

/// The kset's names are read only for modules the list lacks: a kobject whose name cannot be
/// read neither fails the check (a built-in one) nor spares a hidden module its finding.
#[test]
fn unreadable_kobject_names_do_not_blind_the_modules_check() {
    const UNMAPPED: u64 = 0xffff_c900_dead_0000;
    let w = World::new();
    let ms = Modules::new(&w);
    ms.module("good", MODULE_BASE + 0x10_0000, 0x4000, 0);
    let builtin = w.alloc(0x60);
    w.u64(builtin, UNMAPPED);
    w.append(ms.kset, builtin + ms.off.kobj_entry);
    let kernel = w.kernel();
    assert!(kernel.kobject_name(&ms.off, builtin).is_err());
    let checks = set(ModulesCheck::with_offsets(ms.off.clone()));
    let baseline = capture_baseline(&ctx(&kernel), &checks).unwrap();
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert!(
        r.findings.is_empty() && r.errors().next().is_none(),
        "{r:#?}"
    );

    let evil = ms.module("evil", MODULE_BASE, 0x2000, 0);
    w.unlink(ms.head, evil + ms.off.list);
    w.u64(evil + ms.off.mkobj + ms.off.kobj_name, UNMAPPED);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert_eq!(
        summary(&r),
        [(Severity::Critical, "hidden-module", "evil".to_string())]
    );
    // A kobject whose name and struct module both cannot be read is named by that address.
    let ghost = w.alloc(0x60);
    w.u64(ghost + ms.off.kobj_name, UNMAPPED);
    w.u64(ghost + ms.off.mk_mod, UNMAPPED + 0x1000);
    w.append(ms.kset, ghost + ms.off.kobj_entry);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    let entries: Vec<&str> = r.findings.iter().map(|f| f.entry.as_str()).collect();
    assert_eq!(
        entries,
        ["evil", "struct module at 0xffffc900dead1000"],
        "{:#?}",
        r.findings
    );
}

/// A module that removed itself from the list and from sysfs is still in the module address
/// tree: found there, and given to the monitor as hidden.
#[test]
fn a_module_gone_from_list_and_sysfs_is_found_in_the_module_tree() {
    let w = World::new();
    let mut ms = Modules::new(&w);
    let tree = ModTreeOffsets {
        root: 8,
        rb_left: 16,
        rb_right: 8,
        node_mod: 0,
        node_rb: 8,
    };
    ms.off.tree = Some(tree.clone());
    let good = ms.module("good", MODULE_BASE + 0x10_0000, 0x4000, 0);
    let evil = ms.module("evil", MODULE_BASE, 0x2000, (1 << 12) | (1 << 13));
    let node = |module: u64, left: u64| {
        let n = w.alloc(40);
        w.u64(n + tree.node_mod, module);
        w.u64(n + tree.node_rb + tree.rb_left, left);
        n + tree.node_rb
    };
    let root = node(good, node(evil, 0));
    let mod_tree = w.alloc(64);
    w.u64(mod_tree + tree.root, root);
    w.symbol("mod_tree", mod_tree);
    let kernel = w.kernel();
    let checks = set(ModulesCheck::with_offsets(ms.off.clone()));
    let baseline = capture_baseline(&ctx(&kernel), &checks).unwrap();
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert!(r.findings.is_empty(), "{:#?}", r.findings);

    w.unlink(ms.head, evil + ms.off.list);
    w.unlink(ms.kset, evil + ms.off.mkobj + ms.off.kobj_entry);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert_eq!(
        summary(&r),
        [(Severity::Critical, "hidden-module", "evil".to_string())]
    );
    let f = &r.findings[0];
    let seen_in = "only in the module address tree (mod_tree), not in /sys/module either";
    assert!(
        f.actual.starts_with(seen_in) && f.explanation.contains("and from sysfs"),
        "{f:?}"
    );
    let (listed, hidden) = listed_and_hidden_modules(&kernel, &ms.off).unwrap();
    let names =
        |ms: &[kvmaccess_linux::Module]| ms.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
    assert_eq!(
        (names(&listed), names(&hidden)),
        (vec!["good".to_string()], vec!["evil".to_string()])
    );

    // Back on the list: nothing hidden, though sysfs still lacks it.
    w.append(ms.head, evil + ms.off.list);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
}

/// Where a module's symbol table lives: `struct module.kallsyms` points at a `mod_kallsyms`.
const KALLSYMS: u64 = 0xd0;
const UNFORMED: u32 = 3;

/// A `mod_kallsyms` with one named function at `address` (symbol 0 is ELF's empty one).
fn module_kallsyms(w: &World, name: &str, address: u64) -> u64 {
    let strtab = w.string(&format!("\0{name}"));
    let symtab = w.alloc(48);
    w.u32(symtab + 24, 1);
    w.u64(symtab + 24 + 8, address);
    let kallsyms = w.alloc(24);
    w.u64(kallsyms, symtab);
    w.u64(kallsyms + 8, 2);
    w.u64(kallsyms + 16, strtab);
    kallsyms
}

/// A module caught while it loads has its code in the list but not yet its symbols; one whose
/// symbols could not be read is read again. Neither leaves the tracker "settled", so a monitor
/// re-reads the list before it explains an alarm pointing into that module.
#[test]
fn module_tracker_settles_only_once_every_module_s_symbols_are_in() {
    let w = World::new();
    let mut ms = Modules::new(&w);
    ms.off.kallsyms = Some(KALLSYMS);
    ms.off
        .state_names
        .push((i64::from(UNFORMED), "MODULE_STATE_UNFORMED".into()));
    // The module symbol naming `address`, if any (kernel symbols are not looked at).
    let named = |kernel: &Kernel<'_>, address: u64| {
        let (symbol, off) = kernel.symbols().addr2sym(address)?;
        let module = symbol.module.as_deref()?;
        Some(format!("{}+{off:#x} [{module}]", symbol.name))
    };
    let mut kernel = w.kernel();
    let mut tracker = ModuleTracker::with_offsets(&kernel, ms.off.clone());
    assert!(tracker.refresh_if_due(&mut kernel, None));
    assert!(tracker.settled() && tracker.spans().is_empty());

    // Loading: in the list with its memory laid out, its state unformed, no symbols yet.
    let hook = MODULE_BASE + 0x40;
    let late = ms.module("late", MODULE_BASE, 0x2000, 0);
    w.u32(late + ms.off.state, UNFORMED);
    tracker.refresh(&mut kernel, None);
    assert!(!tracker.settled());
    assert_eq!(tracker.spans()[0].name, "late");
    assert_eq!(named(&kernel, hook), None);

    // Loaded: its symbols are merged.
    w.u64(late + KALLSYMS, module_kallsyms(&w, "late_hook", hook));
    w.u32(late + ms.off.state, 0);
    tracker.refresh(&mut kernel, None);
    assert!(tracker.settled());
    assert_eq!(
        named(&kernel, hook).as_deref(),
        Some("late_hook+0x0 [late]")
    );

    // A symbol table that cannot be read does not settle; the same list read again once the
    // table is readable merges it (the list alone did not change).
    let other = ms.module("other", MODULE_BASE + 0x10_0000, 0x2000, 0);
    w.u64(other + KALLSYMS, UNOWNED);
    tracker.refresh(&mut kernel, None);
    assert!(!tracker.settled());
    assert_eq!(
        named(&kernel, hook).as_deref(),
        Some("late_hook+0x0 [late]")
    );
    let entry = MODULE_BASE + 0x10_0010;
    w.u64(other + KALLSYMS, module_kallsyms(&w, "other_entry", entry));
    tracker.refresh(&mut kernel, None);
    assert!(tracker.settled());
    assert_eq!(
        named(&kernel, entry).as_deref(),
        Some("other_entry+0x0 [other]")
    );

    // Nothing changed: settled without merging again; not due for some passes.
    tracker.refresh(&mut kernel, None);
    assert!(tracker.settled());
    assert!(!tracker.refresh_if_due(&mut kernel, None));
}

// ---------------------------------------------------------------------------------------------
// tasks

fn task_offsets() -> TaskOffsets {
    TaskOffsets {
        task_size: 0x100,
        list_next: 0,
        tasks: 0x20,
        pid: 0x44,
        tgid: 0x48,
        real_parent: 0x50,
        comm: 0x60,
        comm_len: 16,
        cred: 0x58,
        state: 0x10,
        state_size: 4,
        exit_state: 0x40,
        flags: 0x14,
        mm: 0x30,
        active_mm: 0x38,
        start_time: None,
        signal: 0x70,
        thread_node: Some(0x80),
        signal_thread_head: Some(0x10),
        thread_group: Some(0x90),
        pid_link: 0xa0,
        cred_uid: 8,
        cred_euid: 24,
        mm_pgd: 0x48,
        mm_arg_start: 0x100,
        mm_arg_end: 0x108,
        mm_env_start: 0x110,
        mm_env_end: 0x118,
        pid_tasks: 0x10,
        hlist_next: 0,
        ns_xa_head: 8,
        xa_shift: 0,
        xa_slots: 40,
        xa_chunk: 64,
        xa_node_size: 576,
    }
}

struct Tasks<'w> {
    w: &'w World,
    off: TaskOffsets,
    head: u64,
    leaf: u64,
}

impl<'w> Tasks<'w> {
    fn new(w: &'w World) -> Self {
        let off = task_offsets();
        let init = w.alloc(off.task_size);
        w.u64(init + off.tasks, init + off.tasks);
        let ns = w.alloc(64);
        let leaf = w.alloc(off.xa_node_size);
        w.u64(ns + off.ns_xa_head, leaf + 2);
        w.symbol("init_task", init);
        w.symbol("init_pid_ns", ns);
        Self {
            w,
            head: init + off.tasks,
            off,
            leaf,
        }
    }

    /// A task in the PID table (pid < 64), on the task list when `listed`.
    fn task(&self, pid: i32, tgid: i32, comm: &str, listed: bool) -> u64 {
        let (w, o) = (self.w, &self.off);
        let t = w.alloc(o.task_size);
        w.u32(t + o.pid, pid as u32);
        w.u32(t + o.tgid, tgid as u32);
        w.bytes(t + o.comm, comm.as_bytes());
        if listed {
            w.append(self.head, t + o.tasks);
        }
        let p = w.alloc(64);
        w.u64(p + o.pid_tasks, t + o.pid_link);
        w.u64(self.leaf + o.xa_slots + pid as u64 * 8, p);
        t
    }
}

#[test]
fn hidden_processes_need_two_reads() {
    let w = World::new();
    let ts = Tasks::new(&w);
    ts.task(1, 1, "init", true);
    let sleeper = ts.task(42, 42, "sleep", true);
    // A thread (not on the task list, which holds leaders) and a zombie leader unlinked by
    // the kernel's own exit path: neither is hidden.
    ts.task(43, 42, "worker", false);
    let zombie = ts.task(50, 50, "zombie", false);
    w.u32(zombie + ts.off.exit_state, 0x20);
    let exiting = ts.task(51, 51, "exiting", false);
    w.u32(exiting + ts.off.flags, 0x4);
    let kernel = w.kernel();

    // Consecutive passes only.
    let checks = set(TasksCheck::with_offsets(ts.off).with_recheck(None));
    let baseline = capture_baseline(&ctx(&kernel), &checks).unwrap();
    assert_eq!(baseline.checks["tasks"]["listed"], 2);
    assert_eq!(baseline.checks["tasks"]["pid_table"], 5);
    let pass = || run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert!(pass().findings.is_empty());
    w.unlink(ts.head, sleeper + ts.off.tasks);
    assert!(pass().findings.is_empty(), "one read is not enough");
    let r = pass();
    assert_eq!(
        summary(&r),
        [(
            Severity::Critical,
            "hidden-process",
            "process 42 (sleep)".to_string()
        )]
    );
    assert_eq!(
        r.findings[0].explanation.split(':').next().unwrap(),
        "process 42 (sleep) is hidden from the task list (still in the PID table)"
    );
    // Back on the list: quiet at once; hidden again: two passes again.
    w.append(ts.head, sleeper + ts.off.tasks);
    assert!(pass().findings.is_empty());
    w.unlink(ts.head, sleeper + ts.off.tasks);
    assert!(pass().findings.is_empty());
    // Seen hidden, then exiting in the next pass: no alarm.
    w.u32(sleeper + ts.off.exit_state, 0x20);
    assert!(pass().findings.is_empty());
    w.u32(sleeper + ts.off.exit_state, 0);

    // A one-shot check re-reads both views at once.
    let once = set(TasksCheck::with_offsets(ts.off).with_recheck(Some(Duration::ZERO)));
    let r = run_checks(&ctx(&kernel), &baseline, &once).unwrap();
    assert_eq!(r.findings.len(), 1, "{:#?}", r.findings);
    assert_eq!(r.findings[0].entry, "process 42 (sleep)");
}

// ---------------------------------------------------------------------------------------------
// ftrace and kprobes

fn ftrace_offsets() -> FtraceOffsets {
    FtraceOffsets {
        ops_func: 0,
        ops_next: 8,
        ops_flags: 16,
        ops_saved_func: Some(32),
        ops_func_hash: Some(0x60),
        hash_filter: 8,
        hash_size_bits: 0,
        hash_buckets: 8,
        hash_count: 16,
        entry_hlist: 0,
        entry_ip: 16,
        hlist_next: 0,
        flags: vec![
            ("ENABLED".into(), 1),
            ("SAVE_REGS".into(), 4),
            ("IPMODIFY".into(), 1 << 12),
        ],
        kprobes: Some(KprobeOffsets {
            hlist: 0,
            list: 16,
            list_next: 0,
            addr: 40,
            pre_handler: 56,
            post_handler: 64,
            kretprobe_kp: None,
            kretprobe_handler: None,
            kretprobe_entry_handler: None,
        }),
    }
}

struct Ftrace<'w> {
    w: &'w World,
    off: FtraceOffsets,
    list: u64,
    end: u64,
    table: u64,
}

impl<'w> Ftrace<'w> {
    fn new(w: &'w World) -> Self {
        let end = w.alloc(0x100);
        let list = w.alloc(8);
        w.u64(list, end);
        let table = w.alloc(64 * 8);
        w.symbol("ftrace_list_end", end);
        w.symbol("ftrace_ops_list", list);
        w.symbol("kprobe_table", table);
        Self {
            w,
            off: ftrace_offsets(),
            list,
            end,
            table,
        }
    }

    /// An ops pushed on the list head, filtering `ips` (none: every function).
    fn ops(&self, func: u64, flags: u64, ips: &[u64]) -> u64 {
        let (w, o) = (self.w, &self.off);
        let ops = w.alloc(0x100);
        w.u64(ops + o.ops_func, func);
        w.u64(ops + o.ops_saved_func.unwrap(), func);
        w.u64(ops + o.ops_flags, flags);
        let ops_hash = w.alloc(32);
        w.u64(ops + o.ops_func_hash.unwrap(), ops_hash);
        let hash = w.alloc(48);
        w.u64(ops_hash + o.hash_filter, hash);
        let buckets = w.alloc(4 * 8);
        w.u64(hash + o.hash_size_bits, 2);
        w.u64(hash + o.hash_buckets, buckets);
        w.u64(hash + o.hash_count, ips.len() as u64);
        for (i, &ip) in ips.iter().enumerate() {
            let e = w.alloc(32);
            w.u64(e + o.entry_ip, ip);
            let b = buckets + (i as u64 % 4) * 8;
            w.u64(e, w.read(b));
            w.u64(b, e);
        }
        w.u64(ops + o.ops_next, w.read(self.list));
        w.u64(self.list, ops);
        ops
    }

    fn kprobe(&self, bucket: u64, addr: u64, pre: u64, post: u64) -> u64 {
        let (w, k) = (self.w, self.off.kprobes.as_ref().unwrap());
        let p = w.alloc(0x80);
        w.u64(p + k.addr, addr);
        w.u64(p + k.pre_handler, pre);
        w.u64(p + k.post_handler, post);
        let b = self.table + bucket * 8;
        w.u64(p + k.hlist, w.read(b));
        w.u64(b, p + k.hlist);
        p
    }
}

/// The getpid hook of the module "evil" after it hid itself, named for what it did.
fn assert_hook_of_hidden_evil(f: &Finding) {
    assert!(
        f.explanation
            .starts_with("module evil, hidden from the module list, hooks __x64_sys_getpid"),
        "{}",
        f.explanation
    );
    assert_eq!(
        f.owner.as_deref(),
        Some("module evil (hidden from the module list) text"),
        "{f:?}"
    );
}

#[test]
fn ftrace_ops_and_kprobes_are_judged_by_their_owners() {
    let w = World::new();
    let ft = Ftrace::new(&w);
    let ms = Modules::new(&w);
    let evil = ms.module("evil", MODULE_BASE, 0x2000, 0);
    // The kernel's own function tracer, on everything: not reported.
    ft.ops(FUNCTION_TRACE_CALL, 1, &[]);
    // A kprobe event (kernel handler).
    ft.kprobe(3, SYS_GETPPID, KPROBE_DISPATCHER, 0);
    let kernel = w.kernel();
    let checks = set(FtraceCheck::with_offsets(ft.off.clone()).with_module_offsets(ms.off.clone()));
    let baseline = capture_baseline(&ctx(&kernel), &checks).unwrap();
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert!(r.findings.is_empty(), "{:#?}", r.findings);

    // A module redirecting getpid.
    let evil_ops = ft.ops(MODULE_BASE + 0x40, 1 | 4 | (1 << 12), &[SYS_GETPID]);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert_eq!(
        summary(&r),
        [(
            Severity::High,
            "ftrace-hook",
            "__x64_sys_getpid".to_string()
        )]
    );
    let f = &r.findings[0];
    assert!(
        f.explanation
            .starts_with("module evil hooks __x64_sys_getpid through ftrace (callback evil+0x40"),
        "{}",
        f.explanation
    );
    assert!(
        f.explanation.contains("ENABLED|SAVE_REGS|IPMODIFY"),
        "{}",
        f.explanation
    );
    assert!(f.owner.as_deref().unwrap().starts_with("module evil"));
    assert!(f.actual.contains(&format!("{evil_ops:#x}")), "{}", f.actual);

    // The same hook when the module hid itself (a monitor finds it through sysfs and marks its
    // span hidden): as grave as unowned code, and named for what it did.
    let r = run_checks(&ctx_with(&kernel, true), &baseline, &checks).unwrap();
    assert_eq!(
        summary(&r),
        [(
            Severity::Critical,
            "ftrace-hook",
            "__x64_sys_getpid".to_string()
        )]
    );
    let f = &r.findings[0];
    assert_hook_of_hidden_evil(f);

    // A caller that knows no module spans (a library user): the check finds the hidden module
    // through sysfs itself, and names it in the same words.
    w.unlink(ms.head, evil + ms.off.list);
    let bare = Context::new(&kernel, vec![Registers::default()]).unwrap();
    let r = run_checks(&bare, &baseline, &checks).unwrap();
    let f = &r.findings[0];
    assert_eq!(f.severity, Severity::Critical, "{f:?}");
    assert_hook_of_hidden_evil(f);
    // Without the module's offsets, the callback stays unowned: graded the same.
    let unnamed = set(FtraceCheck::with_offsets(ft.off.clone()));
    let r = run_checks(&bare, &baseline, &unnamed).unwrap();
    let f = &r.findings[0];
    assert_eq!(f.severity, Severity::Critical, "{f:?}");
    assert!(
        f.explanation.starts_with("code in unowned memory"),
        "{}",
        f.explanation
    );

    // Unowned code hooking everything; a module kprobe; an aggregate holding an unowned one.
    ft.ops(UNOWNED, 1, &[]);
    ft.kprobe(5, SYS_GETPID, MODULE_BASE + 0x80, 0);
    let aggr = ft.kprobe(7, SYS_GETPPID, AGGR_PRE, 0);
    let k = ft.off.kprobes.clone().unwrap();
    let member = w.alloc(0x80);
    w.u64(member + k.addr, SYS_GETPPID);
    w.u64(member + k.post_handler, UNOWNED + 0x100);
    w.u64(aggr + k.list, member + k.list);
    w.u64(member + k.list, aggr + k.list);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    let mut got = summary(&r);
    got.sort();
    assert_eq!(
        got,
        [
            (
                Severity::High,
                "ftrace-hook",
                "__x64_sys_getpid".to_string()
            ),
            (
                Severity::High,
                "kprobe-hook",
                "__x64_sys_getpid".to_string()
            ),
            (
                Severity::Critical,
                "ftrace-hook",
                "every traceable function".to_string()
            ),
            (
                Severity::Critical,
                "kprobe-hook",
                "__x64_sys_getppid".to_string()
            ),
        ]
    );

    // A baseline taken with the module's hooks: medium, still named; unowned stays critical.
    let later = capture_baseline(&ctx(&kernel), &checks).unwrap();
    let r = run_checks(&ctx(&kernel), &later, &checks).unwrap();
    let mut got: Vec<(Severity, &str)> = r.findings.iter().map(|f| (f.severity, f.class)).collect();
    got.sort();
    assert_eq!(
        got,
        [
            (Severity::Medium, "ftrace-hook"),
            (Severity::Medium, "kprobe-hook"),
            (Severity::Critical, "ftrace-hook"),
            (Severity::Critical, "kprobe-hook"),
        ]
    );
    assert!(r
        .findings
        .iter()
        .any(|f| f.explanation.contains("present since the baseline")));

    // A filter hash that loops, then an ops list that loops: errors, not hangs.
    let hash_bucket = {
        let ops_hash = w.read(evil_ops + 0x60);
        let hash = w.read(ops_hash + 8);
        w.read(hash + 8)
    };
    let entry = w.read(hash_bucket);
    w.u64(entry, entry);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert!(
        r.errors().any(|(_, e)| e.contains("loops")),
        "{:?}",
        r.checks
    );
    w.u64(entry, 0);
    w.u64(evil_ops + 8, evil_ops);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert_eq!(r.errors().count(), 1, "{:?}", r.checks);
    w.u64(evil_ops + 8, ft.end);
    let r = run_checks(&ctx(&kernel), &baseline, &checks).unwrap();
    assert_eq!(r.errors().count(), 0, "{:?}", r.checks);
}

#[test]
fn default_set_has_the_view_checks_and_needs_types() {
    let ids: Vec<&str> = CHECKS.iter().map(|c| c.id).collect();
    assert!(ids.ends_with(&["modules", "tasks", "ftrace"]), "{ids:?}");
    assert_eq!(
        CheckSet::default().ids(),
        ["cr", "gdt", "idt", "syscalls", "text", "modules", "tasks", "ftrace"]
    );
    // The synthetic kernel has no BTF: the error says what is missing.
    let w = World::new();
    let kernel = w.kernel();
    let err = capture_baseline(&ctx(&kernel), &CheckSet::from_ids(&["tasks"]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("BTF"), "{err}");
}
