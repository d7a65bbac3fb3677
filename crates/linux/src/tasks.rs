//! Processes and threads of a Linux guest, read from kernel memory with offsets from the kernel's
//! own BTF: the task list (`init_task.tasks`), the thread lists, the PID table of the initial PID
//! namespace (an XArray), and each process's user address space (`mm->pgd`).
//!
//! The task list and the PID table are two independent views of the same processes: a task
//! unlinked from one but not the other is what a process-hiding rootkit leaves behind, which is
//! why both exist here.
//!
//! Everything is bounded: lists by [`MAX_TASKS`] with cycle detection ([`walk_list`]), the PID
//! table by its node count and a strictly decreasing node shift, strings by their BTF array size.

use kvmaccess_btf::TypeInfo;
use kvmaccess_core::{Gpa, Gva, PhysicalMemory};
use kvmaccess_x86::AddressSpace;
use serde::Serialize;

use crate::{Error, Kernel, KernelTypes, Result};

/// Most tasks any list or table may hold: `PID_MAX_LIMIT` on 64-bit kernels. Every task has a
/// distinct PID in the initial namespace, so a real kernel cannot have more.
pub const MAX_TASKS: usize = 4 * 1024 * 1024;

/// Most tasks sharing one `struct pid` as their PID (the kernel allows one; the slack covers a
/// task caught mid-`exec` by a reader of a running guest).
const MAX_PID_CHAIN: usize = 64;

/// Most XArray nodes visited in one PID table: 4 Mi PIDs fill 65,536 leaves plus ~1,100
/// interior nodes, so twice that is generous and still bounds a hostile tree that shares nodes.
const MAX_XA_NODES: usize = 131_072;

/// Largest span of `task_struct` read in one piece. The 6.1 fields span ~3 KiB.
const MAX_TASK_SPAN: u64 = 16 * 1024;

/// `PF_KTHREAD`: the task is a kernel thread. A `#define`, so not in BTF; unchanged since 2.6.
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// Which list walk shape: a circular `list_head` ring or a NULL-terminated `hlist`.
#[derive(Clone, Copy)]
enum ListEnd {
    Head(u64),
    Null,
}

/// Walk a circular kernel list (`struct list_head`) starting at `head` and return the address of
/// every entry's `list_head`, in order, without the head. `next_of` reads the `next` pointer of
/// the `list_head` at an address.
///
/// Guest memory is untrusted: a list that loops without coming back to `head` gives
/// [`Error::ListCycle`] (found with Brent's algorithm: constant memory, at most about twice the
/// entries of the list are read), more than `limit` entries give [`Error::ListTooLong`], and a
/// NULL link gives [`Error::ListBroken`]. Read errors from `next_of` are passed through.
pub fn walk_list(
    list: &str,
    head: u64,
    limit: usize,
    next_of: impl FnMut(u64) -> Result<u64>,
) -> Result<Vec<u64>> {
    walk(list, head, ListEnd::Head(head), limit, next_of)
}

/// Walk a NULL-terminated kernel `hlist` from the address of its first node (0 for an empty
/// list). Same guarantees as [`walk_list`]; `head` is only used in messages.
pub fn walk_hlist(
    list: &str,
    first: u64,
    limit: usize,
    mut next_of: impl FnMut(u64) -> Result<u64>,
) -> Result<Vec<u64>> {
    // The first node comes from the head itself: feed it through the same loop.
    let mut pending = Some(first);
    walk(list, 0, ListEnd::Null, limit, move |at| {
        match pending.take() {
            Some(first) => Ok(first),
            None => next_of(at),
        }
    })
}

fn walk(
    list: &str,
    head: u64,
    end: ListEnd,
    limit: usize,
    mut next_of: impl FnMut(u64) -> Result<u64>,
) -> Result<Vec<u64>> {
    let mut nodes = Vec::new();
    // Brent: the tortoise jumps to the hare at every power of two; a cycle that does not pass
    // through the end is caught once the power exceeds its length.
    let mut tortoise: Option<u64> = None;
    let mut power = 1usize;
    let mut steps = 0usize;
    let mut at = head;
    loop {
        let next = next_of(at)?;
        match end {
            ListEnd::Head(h) if next == h => return Ok(nodes),
            ListEnd::Null if next == 0 => return Ok(nodes),
            ListEnd::Head(_) if next == 0 => {
                return Err(Error::ListBroken {
                    list: list.to_string(),
                    at,
                    next,
                    walked: nodes.len(),
                    reason: "NULL link in a circular list",
                })
            }
            _ => {}
        }
        if tortoise == Some(next) {
            return Err(Error::ListCycle {
                list: list.to_string(),
                head,
                at: next,
                walked: nodes.len(),
            });
        }
        if nodes.len() >= limit {
            return Err(Error::ListTooLong {
                list: list.to_string(),
                head,
                limit,
            });
        }
        nodes.push(next);
        steps += 1;
        if steps == power {
            tortoise = Some(next);
            power = power.saturating_mul(2);
            steps = 0;
        }
        at = next;
    }
}

/// Read kernel memory, naming what was read in the error.
pub(crate) fn read_named(
    kernel: &Kernel<'_>,
    gva: u64,
    buf: &mut [u8],
    what: impl FnOnce() -> String,
) -> Result<()> {
    kernel.read(Gva(gva), buf).map_err(|e| match e {
        Error::Virt { gva, source, .. } => Error::Virt {
            what: what(),
            gva,
            source,
        },
        other => other,
    })
}

/// Read a kernel pointer (or any u64), naming it in the error.
pub(crate) fn read_ptr(
    kernel: &Kernel<'_>,
    gva: u64,
    what: impl FnOnce() -> String,
) -> Result<u64> {
    let mut raw = [0u8; 8];
    read_named(kernel, gva, &mut raw, what)?;
    Ok(u64::from_le_bytes(raw))
}

/// `base + offset` for guest-supplied bases, where wrapping means a corrupt pointer.
pub(crate) fn add(base: u64, offset: u64, what: &str) -> Result<u64> {
    base.checked_add(offset)
        .ok_or_else(|| Error::Unsupported(format!("{what}: {base:#x} + {offset:#x} overflows")))
}

/// `container_of`: the struct address for a member address.
pub(crate) fn container(member: u64, offset: u64, what: &str) -> Result<u64> {
    member.checked_sub(offset).ok_or_else(|| {
        Error::Unsupported(format!(
            "{what}: member address {member:#x} is below its offset {offset:#x}"
        ))
    })
}

/// Little-endian integer of `N` bytes at `at` in `buf`, zero-extended.
pub(crate) fn le_at(buf: &[u8], at: u64, size: u64) -> Option<u64> {
    let start = usize::try_from(at).ok()?;
    let len = usize::try_from(size).ok().filter(|&n| n <= 8)?;
    let bytes = buf.get(start..start.checked_add(len)?)?;
    let mut raw = [0u8; 8];
    raw.get_mut(..len)?.copy_from_slice(bytes);
    Some(u64::from_le_bytes(raw))
}

/// A C string in a fixed array: up to the first NUL, lossy UTF-8.
pub(crate) fn c_string(bytes: &[u8]) -> String {
    let end = memchr::memchr(0, bytes).unwrap_or(bytes.len());
    String::from_utf8_lossy(bytes.get(..end).unwrap_or_default()).into_owned()
}

/// Byte size of the member at `path` of `type_name`.
pub(crate) fn member_size(types: &KernelTypes, type_name: &str, path: &str) -> Result<u64> {
    let btf = &types.btf;
    let what = || format!("{type_name}.{path}");
    let id = btf
        .find_composite(type_name)
        .ok_or_else(|| Error::BtfMissingType(type_name.to_string()))?;
    let loc = btf.locate(id, path).map_err(|source| Error::Btf {
        what: what(),
        source,
    })?;
    btf.size_of(loc.type_id).map_err(|source| Error::Btf {
        what: what(),
        source,
    })
}

/// Element count of the array member at `path` of `type_name`.
pub(crate) fn array_len(types: &KernelTypes, type_name: &str, path: &str) -> Result<u32> {
    let btf = &types.btf;
    let what = || format!("{type_name}.{path}");
    let id = btf
        .find_composite(type_name)
        .ok_or_else(|| Error::BtfMissingType(type_name.to_string()))?;
    let loc = btf.locate(id, path).map_err(|source| Error::Btf {
        what: what(),
        source,
    })?;
    let resolved = btf.resolve(loc.type_id).map_err(|source| Error::Btf {
        what: what(),
        source,
    })?;
    match btf.info(resolved) {
        Ok(TypeInfo::Array { count, .. }) => Ok(count),
        Ok(other) => Err(Error::NoBtf(format!(
            "{}: expected an array, found {:?}",
            what(),
            other.kind()
        ))),
        Err(source) => Err(Error::Btf {
            what: what(),
            source,
        }),
    }
}

/// Value of an enumerator as a small index.
pub(crate) fn enum_index(types: &KernelTypes, enum_name: &str, name: &str) -> Result<u64> {
    let value = types
        .btf
        .enum_value(enum_name, name)
        .map_err(|source| Error::Btf {
            what: format!("enum {enum_name}.{name}"),
            source,
        })?;
    u64::try_from(value)
        .ok()
        .filter(|&v| v < 64)
        .ok_or_else(|| Error::NoBtf(format!("enum {enum_name}.{name} = {value}: not an index")))
}

/// Where the task fields live in this kernel, resolved once from BTF by name.
///
/// Public so that tests (and tools with a profile from elsewhere) can build one by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TaskOffsets {
    /// `sizeof(struct task_struct)`.
    pub task_size: u64,
    /// `list_head.next`.
    pub list_next: u64,
    /// `task_struct.tasks` (the global task list).
    pub tasks: u64,
    /// `task_struct.pid` (`pid_t`, 4 bytes).
    pub pid: u64,
    /// `task_struct.tgid`.
    pub tgid: u64,
    /// `task_struct.real_parent`.
    pub real_parent: u64,
    /// `task_struct.comm`.
    pub comm: u64,
    /// Bytes of `task_struct.comm` (TASK_COMM_LEN).
    pub comm_len: u64,
    /// `task_struct.cred`.
    pub cred: u64,
    /// `task_struct.__state` (5.14+) or `state` (older).
    pub state: u64,
    /// Bytes of the state field (4 for `__state`, 8 for the old `long state`).
    pub state_size: u64,
    /// `task_struct.exit_state`.
    pub exit_state: u64,
    /// `task_struct.flags`.
    pub flags: u64,
    /// `task_struct.mm`.
    pub mm: u64,
    /// `task_struct.active_mm`.
    pub active_mm: u64,
    /// `task_struct.start_boottime` (or `start_time` when absent): nanoseconds since boot.
    pub start_time: Option<u64>,
    /// `task_struct.signal`.
    pub signal: u64,
    /// `task_struct.thread_node`, entry in `signal_struct.thread_head`.
    pub thread_node: Option<u64>,
    /// `signal_struct.thread_head`.
    pub signal_thread_head: Option<u64>,
    /// `task_struct.thread_group` (kernels before 6.7; the fallback thread ring).
    pub thread_group: Option<u64>,
    /// `task_struct.pid_links[PIDTYPE_PID]`.
    pub pid_link: u64,
    /// `cred.uid` (`kuid_t.val`).
    pub cred_uid: u64,
    /// `cred.euid`.
    pub cred_euid: u64,
    /// `mm_struct.pgd`.
    pub mm_pgd: u64,
    /// `mm_struct.arg_start`.
    pub mm_arg_start: u64,
    /// `mm_struct.arg_end`.
    pub mm_arg_end: u64,
    /// `mm_struct.env_start`.
    pub mm_env_start: u64,
    /// `mm_struct.env_end`.
    pub mm_env_end: u64,
    /// `pid.tasks[PIDTYPE_PID]` (an `hlist_head`).
    pub pid_tasks: u64,
    /// `hlist_node.next`.
    pub hlist_next: u64,
    /// `pid_namespace.idr.idr_rt.xa_head`.
    pub ns_xa_head: u64,
    /// `xa_node.shift` (one byte).
    pub xa_shift: u64,
    /// `xa_node.slots`.
    pub xa_slots: u64,
    /// Slots per node (`XA_CHUNK_SIZE`, the length of `xa_node.slots`).
    pub xa_chunk: u32,
    /// `sizeof(struct xa_node)`.
    pub xa_node_size: u64,
}

impl TaskOffsets {
    /// Resolve every offset from the kernel's BTF. Fields that differ between kernel versions
    /// (`__state`/`state`, `thread_node`/`thread_group`, `start_boottime`) are detected.
    pub fn from_types(types: &KernelTypes) -> Result<Self> {
        let t = |path: &str| types.offset_of("task_struct", path);
        let (state, state_size) = match t("__state") {
            Ok(off) => (off, member_size(types, "task_struct", "__state")?),
            Err(_) => (t("state")?, member_size(types, "task_struct", "state")?),
        };
        let pid_type = enum_index(types, "pid_type", "PIDTYPE_PID")?;
        let xa_chunk = array_len(types, "xa_node", "slots")?;
        if !(2..=256).contains(&xa_chunk) || !xa_chunk.is_power_of_two() {
            return Err(Error::NoBtf(format!(
                "xa_node.slots has {xa_chunk} elements, not a power of two"
            )));
        }
        Ok(Self {
            task_size: types.size_of("task_struct")?,
            list_next: types.offset_of("list_head", "next")?,
            tasks: t("tasks")?,
            pid: t("pid")?,
            tgid: t("tgid")?,
            real_parent: t("real_parent")?,
            comm: t("comm")?,
            comm_len: member_size(types, "task_struct", "comm")?,
            cred: t("cred")?,
            state,
            state_size,
            exit_state: t("exit_state")?,
            flags: t("flags")?,
            mm: t("mm")?,
            active_mm: t("active_mm")?,
            start_time: t("start_boottime").or_else(|_| t("start_time")).ok(),
            signal: t("signal")?,
            thread_node: t("thread_node").ok(),
            signal_thread_head: types.offset_of("signal_struct", "thread_head").ok(),
            thread_group: t("thread_group").ok(),
            pid_link: t(&format!("pid_links[{pid_type}]"))?,
            cred_uid: types.offset_of("cred", "uid.val")?,
            cred_euid: types.offset_of("cred", "euid.val")?,
            mm_pgd: types.offset_of("mm_struct", "pgd")?,
            mm_arg_start: types.offset_of("mm_struct", "arg_start")?,
            mm_arg_end: types.offset_of("mm_struct", "arg_end")?,
            mm_env_start: types.offset_of("mm_struct", "env_start")?,
            mm_env_end: types.offset_of("mm_struct", "env_end")?,
            pid_tasks: types.offset_of("pid", &format!("tasks[{pid_type}]"))?,
            hlist_next: types.offset_of("hlist_node", "next")?,
            ns_xa_head: types.offset_of("pid_namespace", "idr.idr_rt.xa_head")?,
            xa_shift: types.offset_of("xa_node", "shift")?,
            xa_slots: types.offset_of("xa_node", "slots")?,
            xa_chunk,
            xa_node_size: types.size_of("xa_node")?,
        })
    }

    /// The fields of `task_struct` read for every task, as (offset, size).
    fn task_fields(&self) -> impl Iterator<Item = (u64, u64)> {
        [
            (self.state, self.state_size),
            (self.flags, 4),
            (self.mm, 8),
            (self.active_mm, 8),
            (self.exit_state, 4),
            (self.pid, 4),
            (self.tgid, 4),
            (self.real_parent, 8),
            (self.cred, 8),
            (self.comm, self.comm_len),
            (self.signal, 8),
        ]
        .into_iter()
        .chain(self.start_time.map(|o| (o, 8)))
    }

    /// The one range of `task_struct` that holds every field read: reading it at once costs one
    /// or two page translations instead of a dozen small reads.
    fn task_span(&self) -> Result<(u64, u64)> {
        let start = self.task_fields().map(|(o, _)| o).min().unwrap_or(0);
        let end = self
            .task_fields()
            .filter_map(|(o, s)| o.checked_add(s))
            .max()
            .unwrap_or(0);
        let len = end.saturating_sub(start);
        if end > self.task_size || len > MAX_TASK_SPAN || len == 0 {
            return Err(Error::NoBtf(format!(
                "task_struct fields span {start:#x}..{end:#x}, beyond the struct size {:#x} \
                 or the {MAX_TASK_SPAN}-byte read limit",
                self.task_size
            )));
        }
        Ok((start, len))
    }
}

/// A task's scheduling state the way `ps` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TaskState {
    /// `R` running, `S` sleeping, `D` disk sleep, `T` stopped, `t` tracing stop, `X` dead,
    /// `Z` zombie, `P` parked, `I` idle.
    pub letter: char,
    /// The raw `__state`.
    pub raw: u64,
    /// The raw `exit_state`.
    pub exit_state: u32,
}

// Task state bits of 6.1 (`include/linux/sched.h`): `#define`s, so not in BTF. These have
// been stable since 4.14 apart from where `TASK_RTLOCK_WAIT` sits.
const TASK_UNINTERRUPTIBLE: u64 = 0x0002;
const TASK_NOLOAD: u64 = 0x0400;
const TASK_RTLOCK_WAIT: u64 = 0x1000;
/// The bits `/proc` reports: interruptible, uninterruptible, stopped, traced, dead, zombie,
/// parked.
const TASK_REPORT: u64 = 0x7f;
/// Letters indexed by the highest reported bit (1-based), then idle.
const STATE_LETTERS: [char; 9] = ['R', 'S', 'D', 'T', 't', 'X', 'Z', 'P', 'I'];

impl TaskState {
    /// Map raw `__state` and `exit_state` to the letter `/proc/PID/stat` shows.
    pub fn new(raw: u64, exit_state: u32) -> Self {
        let mut report = (raw | u64::from(exit_state)) & TASK_REPORT;
        let idle = TASK_UNINTERRUPTIBLE | TASK_NOLOAD;
        let index = if raw & idle == idle {
            // An idle kernel thread sleeps uninterruptibly without counting as load: `I`.
            8
        } else {
            if raw == TASK_RTLOCK_WAIT {
                // Waiting on a sleeping spinlock under PREEMPT_RT shows as `D`.
                report = TASK_UNINTERRUPTIBLE;
            }
            usize::try_from(u64::BITS - report.leading_zeros()).unwrap_or(0)
        };
        Self {
            letter: STATE_LETTERS.get(index).copied().unwrap_or('?'),
            raw,
            exit_state,
        }
    }
}

/// One task (a process or a thread).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Task {
    /// Address of its `task_struct`.
    #[serde(serialize_with = "kvmaccess_core::hex::serialize")]
    pub address: u64,
    /// Thread ID (`task_struct.pid`).
    pub pid: i32,
    /// Process ID (`task_struct.tgid`).
    pub tgid: i32,
    /// `real_parent->tgid`; `None` when the parent pointer is NULL or unreadable.
    pub ppid: Option<i32>,
    /// Command name (`comm`, up to the first NUL, lossy UTF-8).
    pub comm: String,
    /// Real UID (`cred->uid`), when the credentials could be read.
    pub uid: Option<u32>,
    /// Effective UID (`cred->euid`).
    pub euid: Option<u32>,
    /// Scheduling state.
    pub state: TaskState,
    /// `task_struct.flags` (`PF_*`).
    pub flags: u32,
    /// `mm` (NULL for kernel threads and exited tasks).
    #[serde(serialize_with = "kvmaccess_core::hex::option::serialize")]
    pub mm: Option<u64>,
    /// `active_mm` (a kernel thread borrows the last user mm it ran on).
    #[serde(serialize_with = "kvmaccess_core::hex::option::serialize")]
    pub active_mm: Option<u64>,
    /// `mm->pgd`: kernel virtual address of the top-level page table of its user memory.
    #[serde(serialize_with = "kvmaccess_core::hex::option::serialize")]
    pub pgd: Option<u64>,
    /// `mm->pgd` translated to guest-physical: the CR3 value (without PCID) of the process.
    pub pgd_phys: Option<Gpa>,
    /// Start time in nanoseconds since boot (`start_boottime`), when the kernel has it.
    pub start_time_ns: Option<u64>,
    /// `task_struct.signal`, shared by the thread group.
    #[serde(serialize_with = "kvmaccess_core::hex::serialize")]
    pub signal: u64,
}

impl Task {
    /// Kernel threads carry `PF_KTHREAD` and have no user memory.
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }

    /// The thread-group leader (the "process") has `pid == tgid`.
    pub fn is_group_leader(&self) -> bool {
        self.pid == self.tgid
    }
}

fn i32_of(v: Option<u64>) -> Option<i32> {
    v.and_then(|v| u32::try_from(v).ok())
        .map(|v| i32::from_le_bytes(v.to_le_bytes()))
}

fn nonzero(v: Option<u64>) -> Option<u64> {
    v.filter(|&v| v != 0)
}

impl<'m> Kernel<'m> {
    /// Read one task's fields; `address` is its `task_struct`.
    pub fn task_at(&self, off: &TaskOffsets, address: u64) -> Result<Task> {
        let (start, len) = off.task_span()?;
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let at = add(address, start, "task_struct")?;
        read_named(self, at, &mut buf, || {
            format!("task_struct at {address:#x}")
        })?;
        let field = |o: u64, size: u64| le_at(&buf, o.checked_sub(start)?, size);
        let comm_bytes = (|| {
            let from = usize::try_from(off.comm.checked_sub(start)?).ok()?;
            let to = from.checked_add(usize::try_from(off.comm_len).ok()?)?;
            buf.get(from..to)
        })()
        .unwrap_or_default();
        let real_parent = nonzero(field(off.real_parent, 8));
        let ppid = real_parent.and_then(|p| {
            let mut raw = [0u8; 4];
            let at = p.checked_add(off.tgid)?;
            self.read(Gva(at), &mut raw).ok()?;
            Some(i32::from_le_bytes(raw))
        });
        let cred = nonzero(field(off.cred, 8));
        let (uid, euid) = cred
            .and_then(|c| {
                let lo = off.cred_uid.min(off.cred_euid);
                let hi = off.cred_uid.max(off.cred_euid).checked_add(4)?;
                let mut raw = vec![0u8; usize::try_from(hi.checked_sub(lo)?).ok()?];
                self.read(Gva(c.checked_add(lo)?), &mut raw).ok()?;
                let get = |o: u64| le_at(&raw, o - lo, 4).and_then(|v| u32::try_from(v).ok());
                Some((get(off.cred_uid), get(off.cred_euid)))
            })
            .unwrap_or((None, None));
        let mm = nonzero(field(off.mm, 8));
        let pgd = mm.and_then(|m| {
            let at = m.checked_add(off.mm_pgd)?;
            self.read_u64(Gva(at)).ok().filter(|&p| p != 0)
        });
        let pgd_phys = pgd.and_then(|p| self.shared_space().gpa(Gva(p)).ok());
        let exit_state = field(off.exit_state, 4)
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0);
        Ok(Task {
            address,
            pid: i32_of(field(off.pid, 4)).unwrap_or(-1),
            tgid: i32_of(field(off.tgid, 4)).unwrap_or(-1),
            ppid,
            comm: c_string(comm_bytes),
            uid,
            euid,
            state: TaskState::new(field(off.state, off.state_size).unwrap_or(0), exit_state),
            flags: field(off.flags, 4)
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0),
            mm,
            active_mm: nonzero(field(off.active_mm, 8)),
            pgd,
            pgd_phys,
            start_time_ns: off.start_time.and_then(|o| field(o, 8)),
            signal: field(off.signal, 8).unwrap_or(0),
        })
    }

    /// Processes (thread-group leaders) on the task list `init_task.tasks`, in list order.
    /// `init_task` itself (PID 0, the boot CPU's idle task) is the list head and not included,
    /// as in `ps`.
    pub fn tasks_from_list(&self, off: &TaskOffsets) -> Result<Vec<Task>> {
        self.task_addresses_from_list(off)?
            .into_iter()
            .map(|address| self.task_at(off, address))
            .collect()
    }

    /// The `task_struct` addresses of [`Kernel::tasks_from_list`], without reading the tasks: a
    /// comparison of views that reads a task only when the views disagree about it.
    pub fn task_addresses_from_list(&self, off: &TaskOffsets) -> Result<Vec<u64>> {
        let head = add(self.symbol("init_task")?, off.tasks, "init_task.tasks")?;
        let nodes = walk_list("init_task.tasks", head, MAX_TASKS, |n| {
            read_ptr(self, add(n, off.list_next, "list_head")?, || {
                format!("init_task.tasks entry {n:#x}")
            })
        })?;
        nodes
            .into_iter()
            .map(|n| container(n, off.tasks, "task_struct.tasks"))
            .collect()
    }

    /// A task's PID and thread-group id alone: two small reads instead of [`Kernel::task_at`]'s
    /// whole task.
    pub fn task_ids(&self, off: &TaskOffsets, address: u64) -> Result<(i32, i32)> {
        let id = |offset: u64, what: &str| -> Result<i32> {
            let mut raw = [0u8; 4];
            read_named(self, add(address, offset, what)?, &mut raw, || {
                format!("{what} of the task_struct at {address:#x}")
            })?;
            Ok(i32::from_le_bytes(raw))
        };
        Ok((id(off.pid, "pid")?, id(off.tgid, "tgid")?))
    }

    /// Every thread of `leader`'s thread group, the leader included, from
    /// `signal->thread_head` (or, on kernels without it, the `thread_group` ring).
    pub fn threads_of(&self, off: &TaskOffsets, leader: &Task) -> Result<Vec<Task>> {
        let next = |what: &'static str| {
            move |n: u64| {
                read_ptr(self, add(n, off.list_next, "list_head")?, || {
                    format!("{what} entry {n:#x}")
                })
            }
        };
        if leader.signal == 0 {
            // An exited task whose signal_struct is gone: its threads are gone too.
            return Ok(vec![leader.clone()]);
        }
        match (off.signal_thread_head, off.thread_node) {
            (Some(head_off), Some(node_off)) => {
                let head = add(leader.signal, head_off, "signal_struct.thread_head")?;
                walk_list("signal->thread_head", head, MAX_TASKS, next("thread_head"))?
                    .into_iter()
                    .map(|n| self.task_at(off, container(n, node_off, "task_struct.thread_node")?))
                    .collect()
            }
            _ => {
                let ring = off.thread_group.ok_or_else(|| {
                    Error::NoBtf(
                        "task_struct has neither thread_node/signal_struct.thread_head nor \
                         thread_group"
                            .to_string(),
                    )
                })?;
                let head = add(leader.address, ring, "task_struct.thread_group")?;
                let mut out = vec![leader.clone()];
                for n in walk_list("thread_group", head, MAX_TASKS, next("thread_group"))? {
                    out.push(self.task_at(off, container(n, ring, "task_struct.thread_group")?)?);
                }
                Ok(out)
            }
        }
    }

    /// Every thread of every process on the task list (`ps -T`), grouped by process.
    pub fn threads_from_list(&self, off: &TaskOffsets) -> Result<Vec<Task>> {
        let mut out = Vec::new();
        for leader in self.tasks_from_list(off)? {
            let threads = self.threads_of(off, &leader)?;
            if out.len().saturating_add(threads.len()) > MAX_TASKS {
                return Err(Error::ListTooLong {
                    list: "threads of all tasks".to_string(),
                    head: leader.address,
                    limit: MAX_TASKS,
                });
            }
            out.extend(threads);
        }
        Ok(out)
    }

    /// Every task (threads included) registered in the initial PID namespace's PID table
    /// (`init_pid_ns.idr`, an XArray of `struct pid`), sorted by PID. This view is independent
    /// of the task list: compare the two to find tasks unlinked from one of them.
    pub fn tasks_from_pid_table(&self, off: &TaskOffsets) -> Result<Vec<Task>> {
        let mut tasks = self
            .task_addresses_from_pid_table(off)?
            .into_iter()
            .map(|address| self.task_at(off, address))
            .collect::<Result<Vec<_>>>()?;
        tasks.sort_by_key(|t| (t.pid, t.address));
        Ok(tasks)
    }

    /// The `task_struct` addresses of [`Kernel::tasks_from_pid_table`], in PID-table order,
    /// without reading the tasks.
    pub fn task_addresses_from_pid_table(&self, off: &TaskOffsets) -> Result<Vec<u64>> {
        let ns = self.symbol("init_pid_ns")?;
        let head = add(ns, off.ns_xa_head, "init_pid_ns.idr")?;
        let mut tasks = Vec::new();
        for (_, pid) in self.xarray_entries(off, head, "init_pid_ns.idr", MAX_TASKS)? {
            let first = read_ptr(self, add(pid, off.pid_tasks, "pid.tasks")?, || {
                format!("struct pid at {pid:#x}")
            })?;
            let chain = walk_hlist("pid->tasks[PIDTYPE_PID]", first, MAX_PID_CHAIN, |n| {
                read_ptr(self, add(n, off.hlist_next, "hlist_node")?, || {
                    format!("pid_links node {n:#x}")
                })
            })?;
            for node in chain {
                if tasks.len() >= MAX_TASKS {
                    return Err(Error::ListTooLong {
                        list: "init_pid_ns.idr tasks".to_string(),
                        head,
                        limit: MAX_TASKS,
                    });
                }
                tasks.push(container(node, off.pid_link, "task_struct.pid_links")?);
            }
        }
        Ok(tasks)
    }

    /// The entries of an XArray (index, pointer) whose `xa_head` is at `head_at`, in index
    /// order. Value entries and internal entries other than nodes are skipped.
    pub fn xarray_entries(
        &self,
        off: &TaskOffsets,
        head_at: u64,
        what: &str,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>> {
        let corrupt = |reason: String| Error::TreeCorrupt {
            what: what.to_string(),
            reason,
        };
        let chunk_shift = off.xa_chunk.trailing_zeros();
        let head = read_ptr(self, head_at, || format!("{what} xa_head"))?;
        let mut out = Vec::new();
        if head == 0 {
            return Ok(out);
        }
        if !is_xa_node(head) {
            if head & 3 == 0 {
                out.push((0, head));
            }
            return Ok(out);
        }
        let node_len = usize::try_from(off.xa_node_size)
            .ok()
            .filter(|&n| n <= 64 * 1024)
            .ok_or_else(|| corrupt(format!("xa_node of {} bytes", off.xa_node_size)))?;
        let mut buf = vec![0u8; node_len];
        // Depth-first, slots in reverse so that entries come out in index order.
        // (node, first index it covers, the shift it must have, or None for the root).
        let mut stack: Vec<(u64, u64, Option<u32>)> = vec![(head - 2, 0, None)];
        let mut visited = 0usize;
        while let Some((node, base, expected)) = stack.pop() {
            visited += 1;
            if visited > MAX_XA_NODES {
                return Err(corrupt(format!("more than {MAX_XA_NODES} nodes")));
            }
            read_named(self, node, &mut buf, || format!("{what} xa_node"))?;
            let shift = le_at(&buf, off.xa_shift, 1)
                .and_then(|s| u32::try_from(s).ok())
                .unwrap_or(u32::MAX);
            // Shifts fall by one chunk per level down to 0: that alone bounds the depth (at
            // most 64 / chunk_shift + 1 levels) and rules out loops back to an ancestor.
            if shift >= u64::BITS
                || shift % chunk_shift != 0
                || expected.is_some_and(|e| e != shift)
            {
                return Err(corrupt(format!(
                    "node {node:#x} has shift {shift}, expected {}",
                    expected.map_or("a multiple of the chunk shift".to_string(), |e| e
                        .to_string())
                )));
            }
            for slot in (0..u64::from(off.xa_chunk)).rev() {
                let entry = add(off.xa_slots, slot * 8, "xa_node.slots")
                    .ok()
                    .and_then(|o| le_at(&buf, o, 8))
                    .ok_or_else(|| corrupt("xa_node.slots outside the node".to_string()))?;
                if entry == 0 {
                    continue;
                }
                let index = u128::from(slot) << shift;
                let index = u64::try_from(u128::from(base) + index)
                    .map_err(|_| corrupt(format!("index overflow at node {node:#x}")))?;
                if is_xa_node(entry) {
                    let child_shift = shift.checked_sub(chunk_shift).ok_or_else(|| {
                        corrupt(format!("leaf node {node:#x} points to another node"))
                    })?;
                    stack.push((entry - 2, index, Some(child_shift)));
                } else if entry & 3 == 0 {
                    if out.len() >= limit {
                        return Err(corrupt(format!("more than {limit} entries")));
                    }
                    out.push((index, entry));
                }
                // Anything else is a value entry (bit 0) or a sibling/retry/zero marker.
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The task with thread ID `pid`, from the task list (threads included).
    pub fn task_by_pid(&self, off: &TaskOffsets, pid: i32) -> Result<Task> {
        let leaders = self.tasks_from_list(off)?;
        if let Some(t) = leaders.iter().find(|t| t.pid == pid) {
            return Ok(t.clone());
        }
        for leader in &leaders {
            if let Some(t) = self
                .threads_of(off, leader)?
                .into_iter()
                .find(|t| t.pid == pid)
            {
                return Ok(t);
            }
        }
        Err(Error::NoSuchTask { pid })
    }

    /// The user address space of a task: its `mm->pgd` as the root, in the kernel's paging
    /// mode. With page-table isolation the kernel-mode PGD (the one `mm->pgd` names) maps user
    /// memory too, so it serves for reading.
    pub fn process_space(&self, task: &Task) -> Result<AddressSpace<'m, dyn PhysicalMemory + 'm>> {
        let no_memory = |reason: &str| Error::NoUserMemory {
            pid: task.pid,
            comm: task.comm.clone(),
            reason: reason.to_string(),
        };
        if task.mm.is_none() {
            return Err(no_memory(if task.is_kernel_thread() {
                "a kernel thread (mm is NULL)"
            } else {
                "mm is NULL (the task has exited)"
            }));
        }
        let root = match (task.pgd, task.pgd_phys) {
            (Some(_), Some(root)) => root,
            (None, _) => return Err(no_memory("mm->pgd is NULL or unreadable")),
            (Some(pgd), None) => {
                return Err(no_memory(&format!(
                    "mm->pgd {pgd:#x} does not translate through the kernel page tables"
                )))
            }
        };
        Ok(AddressSpace::new(self.memory(), self.layout().mode, root.0))
    }

    /// Read user memory of the task with thread ID `pid`.
    pub fn read_user(&self, off: &TaskOffsets, pid: i32, gva: Gva, buf: &mut [u8]) -> Result<()> {
        let task = self.task_by_pid(off, pid)?;
        self.read_task_memory(&task, gva, buf)
    }

    /// Read user memory of `task`.
    pub fn read_task_memory(&self, task: &Task, gva: Gva, buf: &mut [u8]) -> Result<()> {
        let mut space = self.process_space(task)?;
        space.read(gva, buf).map_err(|source| Error::User {
            pid: task.pid,
            gva,
            len: buf.len(),
            source,
        })
    }

    /// The command line of a process (`mm->arg_start..arg_end`, NUL-separated), at most
    /// `limit` bytes.
    pub fn task_cmdline(&self, off: &TaskOffsets, task: &Task, limit: usize) -> Result<Vec<u8>> {
        self.task_mm_range(task, off.mm_arg_start, off.mm_arg_end, limit)
    }

    /// The environment of a process (`mm->env_start..env_end`), at most `limit` bytes.
    pub fn task_environ(&self, off: &TaskOffsets, task: &Task, limit: usize) -> Result<Vec<u8>> {
        self.task_mm_range(task, off.mm_env_start, off.mm_env_end, limit)
    }

    fn task_mm_range(
        &self,
        task: &Task,
        start_off: u64,
        end_off: u64,
        limit: usize,
    ) -> Result<Vec<u8>> {
        let mm = task.mm.ok_or_else(|| Error::NoUserMemory {
            pid: task.pid,
            comm: task.comm.clone(),
            reason: "mm is NULL".to_string(),
        })?;
        let start = read_ptr(self, add(mm, start_off, "mm_struct")?, || {
            "mm_struct".into()
        })?;
        let end = read_ptr(self, add(mm, end_off, "mm_struct")?, || "mm_struct".into())?;
        let len = usize::try_from(end.saturating_sub(start))
            .unwrap_or(usize::MAX)
            .min(limit);
        let mut buf = vec![0u8; len];
        self.read_task_memory(task, Gva(start), &mut buf)?;
        Ok(buf)
    }
}

/// `xa_is_node`: an internal entry (low bits `10`) above the small internal values (sibling,
/// retry and zero markers, all below 4096).
fn is_xa_node(entry: u64) -> bool {
    entry & 3 == 2 && entry > 4096
}

/// A synthetic guest for unit tests: a 4-level kernel address space whose direct map covers
/// the first 16 MiB of physical memory, objects written by virtual address, and a [`Kernel`]
/// bound to it with hand-picked symbols.
#[cfg(test)]
pub(crate) mod fake {
    #![allow(clippy::unwrap_used)]

    use kvmaccess_core::{Gpa, Gva};
    use kvmaccess_testkit::{MapFlags, MockMemory, PageSize, PageTableBuilder, TableFormat};
    use kvmaccess_x86::PagingMode;

    use crate::{
        Kernel, KernelLayout, KernelProfile, LayoutSource, Provenance, Symbol, SymbolSource,
        SymbolTable, VmcoreinfoSource,
    };

    /// Start of the direct map.
    pub const DIRECT: u64 = 0xffff_8880_0000_0000;
    /// Bytes of physical memory mapped.
    pub const MAPPED: u64 = 16 << 20;
    /// Where objects go: physical 8 MiB upwards.
    pub const HEAP: u64 = DIRECT + (8 << 20);

    pub struct Fake {
        pub mem: MockMemory,
        pub root: Gpa,
        next: std::cell::Cell<u64>,
    }

    impl Fake {
        pub fn new() -> Self {
            let mem = MockMemory::new(32 << 20);
            let root = {
                let mut b = PageTableBuilder::new(&mem, TableFormat::Level4).unwrap();
                for i in 0..MAPPED / (2 << 20) {
                    let off = i * (2 << 20);
                    b.map(
                        Gva(DIRECT + off),
                        Gpa(off),
                        PageSize::Size2M,
                        MapFlags::KERNEL_RW.nx(),
                    )
                    .unwrap();
                }
                b.root()
            };
            Self {
                mem,
                root,
                next: std::cell::Cell::new(HEAP),
            }
        }

        /// Physical address of a direct-map address.
        pub fn phys(&self, gva: u64) -> Gpa {
            assert!((DIRECT..DIRECT + MAPPED).contains(&gva), "{gva:#x}");
            Gpa(gva - DIRECT)
        }

        /// A fresh zeroed object of `size` bytes, 64-byte aligned.
        pub fn alloc(&self, size: u64) -> u64 {
            let at = self.next.get();
            self.next.set((at + size + 63) & !63);
            assert!(self.next.get() <= DIRECT + MAPPED);
            self.bytes(at, &vec![0; usize::try_from(size).unwrap()]);
            at
        }

        pub fn bytes(&self, gva: u64, data: &[u8]) {
            self.mem.write_bytes(self.phys(gva), data).unwrap();
        }

        pub fn u64(&self, gva: u64, v: u64) {
            self.bytes(gva, &v.to_le_bytes());
        }

        pub fn u32(&self, gva: u64, v: u32) {
            self.bytes(gva, &v.to_le_bytes());
        }

        /// A kernel over this memory with `symbols`.
        pub fn kernel(&self, symbols: Vec<Symbol>) -> Kernel<'_> {
            let profile = KernelProfile {
                release: "6.1.0-test".into(),
                build_id: None,
                layout: KernelLayout {
                    mode: PagingMode::Level4,
                    root: self.root,
                    kaslr_offset: 0,
                    phys_base: 0,
                    page_offset_base: Some(DIRECT),
                },
                vmcoreinfo: None,
                banner: None,
                symbols: SymbolTable::new(symbols),
                provenance: Provenance {
                    vmcoreinfo: VmcoreinfoSource::Absent("test".into()),
                    layout: LayoutSource::Vmcoreinfo,
                    symbols: SymbolSource::Absent("test".into()),
                    checks: Vec::new(),
                    missing: Vec::new(),
                    steps: Vec::new(),
                },
            };
            Kernel::from_profile(&self.mem, profile)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_sign_loss)]

    use std::collections::HashMap;

    use kvmaccess_core::Gva;
    use kvmaccess_testkit::{MapFlags, PageSize, PageTableBuilder, TableFormat};

    use super::fake::{Fake, DIRECT};
    use super::*;
    use crate::Symbol;

    fn map_list(links: &[(u64, u64)]) -> impl FnMut(u64) -> Result<u64> + '_ {
        let map: HashMap<u64, u64> = links.iter().copied().collect();
        move |at| {
            map.get(&at).copied().ok_or_else(|| Error::Virt {
                what: "test".into(),
                gva: Gva(at),
                source: kvmaccess_x86::Error::RangeWraps {
                    gva: Gva(at),
                    len: 8,
                },
            })
        }
    }

    #[test]
    fn lists_end_at_their_head() {
        let links = [(1, 10), (10, 20), (20, 30), (30, 1)];
        assert_eq!(
            walk_list("l", 1, 100, map_list(&links)).unwrap(),
            [10, 20, 30]
        );
        assert!(walk_list("l", 1, 100, map_list(&[(1, 1)]))
            .unwrap()
            .is_empty());
        let hl = [(10, 20), (20, 0)];
        assert_eq!(walk_hlist("h", 10, 100, map_list(&hl)).unwrap(), [10, 20]);
        assert!(walk_hlist("h", 0, 100, map_list(&[])).unwrap().is_empty());
    }

    #[test]
    fn hostile_lists_fail_instead_of_hanging() {
        // a -> b -> a, never back to the head.
        let err = walk_list("l", 1, 1000, map_list(&[(1, 10), (10, 20), (20, 10)])).unwrap_err();
        assert!(matches!(err, Error::ListCycle { at: 10 | 20, .. }), "{err}");
        // A self-loop.
        let err = walk_list("l", 1, 1000, map_list(&[(1, 10), (10, 10)])).unwrap_err();
        assert!(matches!(err, Error::ListCycle { at: 10, .. }), "{err}");
        // A long tail into a long cycle is still found, within about twice its length.
        let mut links: Vec<(u64, u64)> = (0..500).map(|i| (100 + i, 101 + i)).collect();
        links.push((1, 100));
        links.push((600, 300));
        let mut reads = 0;
        let mut next = map_list(&links);
        let err = walk_list("l", 1, 1_000_000, |a| {
            reads += 1;
            next(a)
        })
        .unwrap_err();
        assert!(matches!(err, Error::ListCycle { .. }), "{err}");
        assert!(reads < 2000, "{reads}");
        // An hlist cycle.
        let err = walk_hlist("h", 10, 100, map_list(&[(10, 20), (20, 10)])).unwrap_err();
        assert!(matches!(err, Error::ListCycle { .. }), "{err}");
        // Too long.
        let long: Vec<(u64, u64)> = (0..100).map(|i| (i + 1, i + 2)).collect();
        let err = walk_list("l", 1, 50, map_list(&long)).unwrap_err();
        assert!(matches!(err, Error::ListTooLong { limit: 50, .. }), "{err}");
        // NULL inside a ring; unreadable links.
        let err = walk_list("l", 1, 50, map_list(&[(1, 10), (10, 0)])).unwrap_err();
        assert!(matches!(err, Error::ListBroken { at: 10, .. }), "{err}");
        let err = walk_list("l", 1, 50, map_list(&[(1, 10), (10, 77)])).unwrap_err();
        assert!(matches!(err, Error::Virt { .. }), "{err}");
    }

    #[test]
    fn state_letters_match_proc() {
        let letter = |raw, exit| TaskState::new(raw, exit).letter;
        assert_eq!(letter(0, 0), 'R');
        assert_eq!(letter(1, 0), 'S');
        assert_eq!(letter(2, 0), 'D');
        assert_eq!(letter(0x402, 0), 'I');
        assert_eq!(letter(4, 0), 'T');
        assert_eq!(letter(8, 0), 't');
        assert_eq!(letter(0x40, 0), 'P');
        assert_eq!(letter(0, 0x20), 'Z');
        assert_eq!(letter(0, 0x10), 'X');
        assert_eq!(letter(0x1000, 0), 'D');
        assert_eq!(letter(0x100, 0), 'R'); // not a reported bit
    }

    pub(crate) fn offsets() -> TaskOffsets {
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
            start_time: Some(0x78),
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

    struct World<'f> {
        fake: &'f Fake,
        off: TaskOffsets,
        init: u64,
        ns: u64,
    }

    impl<'f> World<'f> {
        fn new(fake: &'f Fake) -> Self {
            let off = offsets();
            let init = fake.alloc(off.task_size);
            let ns = fake.alloc(136);
            let w = Self {
                fake,
                off,
                init,
                ns,
            };
            w.set_task(init, 0, 0, init, "swapper/0", 0);
            // An empty ring: the head points to itself.
            fake.u64(init + off.tasks, init + off.tasks);
            w
        }

        fn set_task(&self, t: u64, pid: i32, tgid: i32, parent: u64, comm: &str, flags: u32) {
            let (f, o) = (self.fake, &self.off);
            f.u32(t + o.pid, pid as u32);
            f.u32(t + o.tgid, tgid as u32);
            f.u64(t + o.real_parent, parent);
            f.u32(t + o.flags, flags);
            let mut c = [0u8; 16];
            let n = comm.len().min(15);
            c[..n].copy_from_slice(&comm.as_bytes()[..n]);
            f.bytes(t + o.comm, &c);
        }

        /// A new task appended to the task list.
        fn task(&self, pid: i32, parent: u64, comm: &str, flags: u32) -> u64 {
            let (f, o) = (self.fake, &self.off);
            let t = f.alloc(o.task_size);
            self.set_task(t, pid, pid, parent, comm, flags);
            // Insert before the head (at the tail): the ring is singly followed here.
            let head = self.init + o.tasks;
            let mut last = head;
            loop {
                let next = self.read(last);
                if next == head {
                    break;
                }
                last = next;
            }
            f.u64(last, t + o.tasks);
            f.u64(t + o.tasks, head);
            let cred = f.alloc(176);
            f.u32(cred + o.cred_uid, 1000 + pid as u32);
            f.u32(cred + o.cred_euid, 2000 + pid as u32);
            f.u64(t + o.cred, cred);
            t
        }

        fn read(&self, gva: u64) -> u64 {
            let mut raw = [0u8; 8];
            self.fake.mem.peek(self.fake.phys(gva), &mut raw).unwrap();
            u64::from_le_bytes(raw)
        }

        fn symbols(&self) -> Vec<Symbol> {
            vec![
                Symbol::new("init_task", self.init, 'D'),
                Symbol::new("init_pid_ns", self.ns, 'D'),
            ]
        }
    }

    #[test]
    fn task_list_threads_and_user_memory() {
        let fake = Fake::new();
        let w = World::new(&fake);
        let o = w.off;
        let init1 = w.task(1, w.init, "init", 0);
        let kthread = w.task(2, w.init, "kthreadd", PF_KTHREAD);
        let sh = w.task(42, init1, "a-very-long-command-name", 0);
        fake.u32(sh + o.state, 1);
        fake.u64(sh + o.start_time.unwrap(), 123_456);

        // User memory of `sh`: its own page tables, one user page holding a marker.
        let mut user = PageTableBuilder::with_table_area(
            &fake.mem,
            TableFormat::Level4,
            kvmaccess_core::Gpa(0x40_0000),
            kvmaccess_core::Gpa(0x50_0000),
        )
        .unwrap();
        user.map(
            Gva(0x7fff_0000_0000),
            kvmaccess_core::Gpa(0x60_0000),
            PageSize::Size4K,
            MapFlags::USER_RW,
        )
        .unwrap();
        fake.mem
            .write_bytes(kvmaccess_core::Gpa(0x60_0010), b"MARKER\0")
            .unwrap();
        let mm = fake.alloc(0x200);
        fake.u64(mm + o.mm_pgd, DIRECT + user.root().0);
        fake.u64(mm + o.mm_arg_start, 0x7fff_0000_0010);
        fake.u64(mm + o.mm_arg_end, 0x7fff_0000_0017);
        fake.u64(sh + o.mm, mm);

        // `sh` has a second thread, 43, on signal->thread_head.
        let signal = fake.alloc(0x40);
        let t43 = fake.alloc(o.task_size);
        w.set_task(t43, 43, 42, init1, "worker", 0);
        fake.u64(t43 + o.mm, mm);
        let (head, n42, n43) = (
            signal + o.signal_thread_head.unwrap(),
            sh + o.thread_node.unwrap(),
            t43 + o.thread_node.unwrap(),
        );
        fake.u64(head, n42);
        fake.u64(n42, n43);
        fake.u64(n43, head);
        fake.u64(sh + o.signal, signal);
        fake.u64(t43 + o.signal, signal);

        let kernel = fake.kernel(w.symbols());
        let tasks = kernel.tasks_from_list(&o).unwrap();
        let summary: Vec<(i32, Option<i32>, &str)> = tasks
            .iter()
            .map(|t| (t.pid, t.ppid, t.comm.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (1, Some(0), "init"),
                (2, Some(0), "kthreadd"),
                (42, Some(1), "a-very-long-com")
            ]
        );
        let t = &tasks[2];
        assert_eq!((t.uid, t.euid), (Some(1042), Some(2042)));
        assert_eq!(t.state.letter, 'S');
        assert_eq!(t.start_time_ns, Some(123_456));
        assert_eq!(t.pgd_phys, Some(user.root()));
        assert!(tasks[1].is_kernel_thread() && !t.is_kernel_thread());
        assert_eq!(tasks[1].address, kthread);

        let threads = kernel.threads_of(&o, t).unwrap();
        let tids: Vec<(i32, i32)> = threads.iter().map(|t| (t.pid, t.tgid)).collect();
        assert_eq!(tids, [(42, 42), (43, 42)]);
        assert_eq!(kernel.threads_from_list(&o).unwrap().len(), 4);

        let mut buf = [0u8; 6];
        kernel
            .read_user(&o, 43, Gva(0x7fff_0000_0010), &mut buf)
            .unwrap();
        assert_eq!(&buf, b"MARKER");
        assert_eq!(kernel.task_cmdline(&o, t, 4096).unwrap(), b"MARKER\0");
        let err = kernel
            .read_user(&o, 2, Gva(0x7fff_0000_0010), &mut buf)
            .unwrap_err();
        assert!(matches!(err, Error::NoUserMemory { pid: 2, .. }), "{err}");
        let err = kernel
            .read_user(&o, 42, Gva(0x7fff_0000_1000), &mut buf)
            .unwrap_err();
        assert!(matches!(err, Error::User { pid: 42, .. }), "{err}");
        assert!(matches!(
            kernel.task_by_pid(&o, 99).unwrap_err(),
            Error::NoSuchTask { pid: 99 }
        ));
    }

    #[test]
    fn corrupt_task_lists_are_errors() {
        let fake = Fake::new();
        let w = World::new(&fake);
        let o = w.off;
        let a = w.task(1, w.init, "a", 0);
        let b = w.task(2, w.init, "b", 0);
        let kernel = fake.kernel(w.symbols());
        // b -> a instead of b -> head.
        fake.u64(b + o.tasks, a + o.tasks);
        let err = kernel.tasks_from_list(&o).unwrap_err();
        assert!(matches!(err, Error::ListCycle { .. }), "{err}");
        // b -> b.
        fake.u64(b + o.tasks, b + o.tasks);
        let err = kernel.tasks_from_list(&o).unwrap_err();
        assert!(matches!(err, Error::ListCycle { .. }), "{err}");
        // b -> unmapped memory.
        fake.u64(b + o.tasks, 0xffff_c900_dead_0000);
        let err = kernel.tasks_from_list(&o).unwrap_err();
        assert!(matches!(err, Error::Virt { .. }), "{err}");
        assert!(err.to_string().contains("init_task.tasks"), "{err}");
    }

    /// An XArray node at `node` with `shift` and the given (slot, entry) pairs.
    fn xa_node(fake: &Fake, o: &TaskOffsets, shift: u8, slots: &[(u64, u64)]) -> u64 {
        let node = fake.alloc(o.xa_node_size);
        fake.bytes(node + o.xa_shift, &[shift]);
        for &(slot, entry) in slots {
            fake.u64(node + o.xa_slots + slot * 8, entry);
        }
        node
    }

    /// A `struct pid` whose PIDTYPE_PID hlist holds `task`.
    fn pid_for(fake: &Fake, o: &TaskOffsets, task: u64) -> u64 {
        let pid = fake.alloc(96);
        fake.u64(pid + o.pid_tasks, task + o.pid_link);
        fake.u64(task + o.pid_link, 0);
        pid
    }

    #[test]
    fn pid_table_is_walked_and_checked() {
        let fake = Fake::new();
        let w = World::new(&fake);
        let o = w.off;
        let t1 = w.task(1, w.init, "init", 0);
        let t70 = w.task(70, t1, "far", 0);
        let t5 = w.task(5, t1, "near", 0);
        let (p1, p5, p70) = (
            pid_for(&fake, &o, t1),
            pid_for(&fake, &o, t5),
            pid_for(&fake, &o, t70),
        );
        // Two levels: slot 0 covers 0..63, slot 1 covers 64..127.
        let leaf0 = xa_node(&fake, &o, 0, &[(1, p1), (5, p5), (9, 0x11), (10, 0x102)]);
        let leaf1 = xa_node(&fake, &o, 0, &[(6, p70)]);
        let top = xa_node(&fake, &o, 6, &[(0, leaf0 + 2), (1, leaf1 + 2)]);
        fake.u64(w.ns + o.ns_xa_head, top + 2);
        let kernel = fake.kernel(w.symbols());
        let entries = kernel
            .xarray_entries(&o, w.ns + o.ns_xa_head, "t", 100)
            .unwrap();
        assert_eq!(entries, [(1, p1), (5, p5), (70, p70)]);
        let pids: Vec<i32> = kernel
            .tasks_from_pid_table(&o)
            .unwrap()
            .iter()
            .map(|t| t.pid)
            .collect();
        assert_eq!(pids, [1, 5, 70]);

        // A child whose shift does not fit its parent, a node pointing at itself, and a leaf
        // pointing to a node are all corrupt.
        fake.bytes(leaf1 + o.xa_shift, &[6]);
        let err = kernel.tasks_from_pid_table(&o).unwrap_err();
        assert!(matches!(err, Error::TreeCorrupt { .. }), "{err}");
        fake.bytes(leaf1 + o.xa_shift, &[0]);
        fake.u64(top + o.xa_slots + 8 * 2, top + 2);
        let err = kernel.tasks_from_pid_table(&o).unwrap_err();
        assert!(matches!(err, Error::TreeCorrupt { .. }), "{err}");
        fake.u64(top + o.xa_slots + 8 * 2, 0);
        fake.u64(leaf1 + o.xa_slots, leaf0 + 2);
        let err = kernel.tasks_from_pid_table(&o).unwrap_err();
        assert!(matches!(err, Error::TreeCorrupt { .. }), "{err}");
        fake.u64(leaf1 + o.xa_slots, 0);
        // A pid's task chain that loops.
        fake.u64(t5 + o.pid_link, t5 + o.pid_link);
        let err = kernel.tasks_from_pid_table(&o).unwrap_err();
        assert!(matches!(err, Error::ListCycle { .. }), "{err}");
        fake.u64(t5 + o.pid_link, 0);
        // A single entry without nodes, and an empty table.
        fake.u64(w.ns + o.ns_xa_head, p1);
        assert_eq!(kernel.tasks_from_pid_table(&o).unwrap().len(), 1);
        fake.u64(w.ns + o.ns_xa_head, 0);
        assert!(kernel.tasks_from_pid_table(&o).unwrap().is_empty());
    }

    #[test]
    fn shared_nodes_cannot_blow_up_the_walk() {
        // Every slot of every interior level points at the same child: 64^4 paths, few nodes.
        let fake = Fake::new();
        let w = World::new(&fake);
        let o = w.off;
        let t1 = w.task(1, w.init, "init", 0);
        let p1 = pid_for(&fake, &o, t1);
        let mut child = xa_node(&fake, &o, 0, &[(0, p1)]) + 2;
        for shift in [6u8, 12, 18, 24] {
            let slots: Vec<(u64, u64)> = (0..64).map(|s| (s, child)).collect();
            child = xa_node(&fake, &o, shift, &slots) + 2;
        }
        fake.u64(w.ns + o.ns_xa_head, child);
        let kernel = fake.kernel(w.symbols());
        let err = kernel.tasks_from_pid_table(&o).unwrap_err();
        assert!(matches!(err, Error::TreeCorrupt { .. }), "{err}");
    }
}
