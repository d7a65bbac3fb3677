//! Checks the parser against the real target: the `.BTF` of the Debian 6.1 cloud kernel that
//! `make guest` downloads. The BTF is extracted from the bzImage here, in the test only: the
//! product reads BTF from guest memory, never from a kernel image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Instant;

use kvmaccess_btf::{Btf, Kind, TypeInfo};
use object::{Object, ObjectSection};

const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

fn guest_dir() -> PathBuf {
    match std::env::var_os("KVMACCESS_GUEST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/guest"),
    }
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// The compressed payload of a bzImage, located through the boot protocol's setup header.
fn payload(bz: &[u8]) -> &[u8] {
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let off = pm_start + le_u32(bz, 0x248) as usize;
    let len = le_u32(bz, 0x24c) as usize;
    &bz[off..off + len]
}

/// Decompresses an LZ4 legacy frame: magic, then blocks of (u32 compressed length, data). The
/// kernel's build appends the uncompressed size as a 4-byte trailer, which is dropped first.
fn lz4_legacy(frame: &[u8]) -> Vec<u8> {
    assert_eq!(
        frame[..4],
        LZ4_LEGACY_MAGIC,
        "bzImage payload is not LZ4 legacy"
    );
    let body = &frame[4..frame.len() - 4];
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 4 <= body.len() {
        let n = le_u32(body, pos) as usize;
        pos += 4;
        if n == u32::from_le_bytes(LZ4_LEGACY_MAGIC) as usize {
            continue; // a concatenated frame starts
        }
        let block = &body[pos..pos + n];
        out.extend(lz4_flex::block::decompress(block, LZ4_LEGACY_BLOCK).unwrap());
        pos += n;
    }
    out
}

/// The kernel image's `.BTF` and its `.data` section (virtual address, bytes).
struct Kernel {
    btf: Vec<u8>,
    data_addr: u64,
    data: Vec<u8>,
}

fn debian_kernel() -> Kernel {
    let path = guest_dir().join("vmlinuz");
    let bz = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the guest kernel {}: {e}. Run `make guest` first (or set \
             KVMACCESS_GUEST_DIR to a directory holding vmlinuz).",
            path.display()
        )
    });
    let vmlinux = lz4_legacy(payload(&bz));
    let elf = object::File::parse(&*vmlinux).expect("decompressed payload is not an ELF");
    let section = elf
        .section_by_name(".BTF")
        .expect("vmlinux has no .BTF section");
    let data = elf.section_by_name(".data").expect("vmlinux has no .data");
    Kernel {
        btf: section.data().unwrap().to_vec(),
        data_addr: data.address(),
        data: data.data().unwrap().to_vec(),
    }
}

/// Finds the statically initialised `init_task` in `.data` using only offsets from BTF: its
/// `comm` is "swapper", and `tasks` (an empty list), `real_parent` and `parent` point at itself.
/// A wrong offset for any of those would make the search fail, so this is an oracle independent
/// of the parser for the offsets that matter most.
fn find_init_task(kernel: &Kernel, btf: &Btf) -> Option<u64> {
    let off = |m| usize::try_from(btf.member_offset("task_struct", m).unwrap()).unwrap();
    let (comm, tasks, real_parent, parent) =
        (off("comm"), off("tasks"), off("real_parent"), off("parent"));
    let u64_at = |pos: usize| {
        kernel
            .data
            .get(pos..pos + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let mut found = None;
    for hit in memchr_all(&kernel.data, b"swapper\0") {
        let Some(base) = hit.checked_sub(comm) else {
            continue;
        };
        let vaddr = kernel.data_addr + base as u64;
        if u64_at(base + tasks) == Some(vaddr + tasks as u64)
            && u64_at(base + tasks + 8) == Some(vaddr + tasks as u64)
            && u64_at(base + real_parent) == Some(vaddr)
            && u64_at(base + parent) == Some(vaddr)
        {
            assert!(found.is_none(), "two init_task candidates");
            found = Some(vaddr);
        }
    }
    found
}

fn memchr_all<'a>(hay: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    hay.windows(needle.len())
        .enumerate()
        .filter(move |(_, w)| *w == needle)
        .map(|(i, _)| i)
}

#[test]
fn debian_6_1_kernel_facts() {
    let kernel = debian_kernel();
    let blob = &kernel.btf;
    let start = Instant::now();
    let btf = Btf::parse(blob).unwrap();
    let elapsed = start.elapsed();
    println!(
        "parsed {} bytes of BTF, {} types, in {elapsed:?} ({} build)",
        blob.len(),
        btf.type_count(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    assert!(btf.type_count() > 50_000);

    let task = btf.find_struct("task_struct").expect("task_struct");
    let task_size = btf.size_of(task).unwrap();
    println!("task_struct: id {task}, {task_size} bytes");
    for member in ["tasks", "comm", "pid", "tgid", "real_parent", "mm", "cred"] {
        let off = btf.member_offset("task_struct", member).unwrap();
        println!("task_struct.{member} = {off:#x} ({off})");
        assert!(off > 0 && off < task_size, "task_struct.{member} at {off}");
    }
    let init_task = find_init_task(&kernel, &btf)
        .expect("no init_task in .data matches the BTF offsets of comm/tasks/real_parent/parent");
    println!("init_task found in .data at {init_task:#x}");
    let field = |m| {
        let pos = usize::try_from(init_task - kernel.data_addr).unwrap()
            + usize::try_from(btf.member_offset("task_struct", m).unwrap()).unwrap();
        u64::from_le_bytes(kernel.data[pos..pos + 8].try_into().unwrap())
    };
    // Kernel threads have no mm; init_task borrows init_mm and has init_cred as both creds.
    assert_eq!(field("mm"), 0);
    assert_ne!(field("active_mm"), 0);
    assert_ne!(field("cred"), 0);
    assert_eq!(field("cred"), field("real_cred"));
    let comm = btf.locate(task, "comm").unwrap();
    assert_eq!(btf.type_name(comm.type_id).unwrap(), "char [16]");
    let tasks = btf.locate(task, "tasks").unwrap();
    assert_eq!(btf.type_name(tasks.type_id).unwrap(), "struct list_head");
    let parent = btf.locate(task, "real_parent").unwrap();
    assert_eq!(
        btf.type_name(parent.type_id).unwrap(),
        "struct task_struct *"
    );
    let pid = btf.locate(task, "pid").unwrap();
    assert_eq!(btf.type_name(pid.type_id).unwrap(), "pid_t");
    assert_eq!(btf.size_of(pid.type_id).unwrap(), 4);

    let list_head = btf.find_struct("list_head").unwrap();
    assert_eq!(btf.size_of(list_head).unwrap(), 16);

    // In 6.1, pgd is inside an anonymous struct that is the first member of mm_struct.
    let mm = btf.find_struct("mm_struct").unwrap();
    let pgd = btf.offset_of("mm_struct", "pgd").unwrap();
    println!("mm_struct.pgd = {pgd:#x}");
    assert!(pgd < btf.size_of(mm).unwrap());
    assert!(btf.members(mm).unwrap().all(|m| m.name != "pgd"));
    let pgd_type = btf.locate(mm, "pgd").unwrap().type_id;
    assert_eq!(btf.type_name(pgd_type).unwrap(), "pgd_t *");

    let module_list = btf.offset_of("module", "list").unwrap();
    let module_name = btf.offset_of("module", "name").unwrap();
    println!("module.list = {module_list:#x}, module.name = {module_name:#x}");
    let module = btf.find_struct("module").unwrap();
    let name_type = btf.locate(module, "name").unwrap().type_id;
    assert_eq!(btf.type_name(name_type).unwrap(), "char [56]");
    assert_eq!(btf.size_of(name_type).unwrap(), 56);
    let kobj_name = btf.offset_of("kobject", "name").unwrap();
    println!("kobject.name = {kobj_name:#x}");

    let exec_start = btf.offset_of("task_struct", "se.exec_start").unwrap();
    println!("task_struct.se.exec_start = {exec_start:#x}");
    assert!(exec_start > btf.member_offset("task_struct", "se").unwrap());

    assert_eq!(btf.enum_value("pid_type", "PIDTYPE_PID").unwrap(), 0);
    assert_eq!(btf.enum_value("pid_type", "PIDTYPE_TGID").unwrap(), 1);

    // Every type can be walked and named without error on a real kernel, except the sizes of
    // kinds that have none.
    let mut named = 0;
    for t in btf.types() {
        let name = btf.type_name(t.id).unwrap();
        named += usize::from(!name.is_empty());
        if matches!(
            t.kind(),
            Kind::Struct | Kind::Union | Kind::Int | Kind::Ptr | Kind::Enum | Kind::Enum64
        ) {
            btf.size_of(t.id).unwrap();
        }
        if let TypeInfo::Struct { .. } | TypeInfo::Union { .. } = t.info {
            for m in btf.members(t.id).unwrap() {
                btf.type_name(m.type_id).unwrap();
            }
        }
    }
    assert_eq!(named, btf.type_count());
}
