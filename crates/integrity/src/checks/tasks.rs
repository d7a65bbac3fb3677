//! Processes, seen two ways: the task list (`init_task.tasks`, what the kernel's own
//! iterators `for_each_process` walk) and the PID table of the initial namespace (what
//! `/proc` and `kill` look processes up in). A process-hiding rootkit unlinks a task from the
//! list and keeps it in the table, so that it still runs and gets signals: a thread-group
//! leader in the table but not on the list is reported as critical.
//!
//! Processes come and go, so there is no per-process baseline: the baseline only records that
//! the check ran.
//!
//! Races with a running guest. The two views are read one after the other while the guest
//! runs, so a process forking, exiting or exec'ing from a thread between the reads can appear
//! in one view only. Three rules keep that from alarming:
//!
//! 1. A task that is exiting (`exit_state` set: zombie or dead; or `PF_EXITING`) never counts:
//!    the kernel unlinks exiting tasks from the list itself.
//! 2. A leader counts as on the list when its `task_struct` is there, or any list entry has
//!    its thread-group id (an exec from a non-leader thread swaps the leader's list entry).
//! 3. A task is reported only when it is seen hidden in two consecutive reads of both views:
//!    the previous pass of the same check (a `watch` keeps its [`crate::CheckSet`]), or else an
//!    immediate re-read of both views after [`RECHECK_DELAY`] (a one-shot `check`). Tasks
//!    hidden by a rootkit stay hidden; a race does not survive the second read.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use kvmaccess_linux::{Task, TaskOffsets};
use serde::{Deserialize, Serialize};

use crate::baseline::Blobs;
use crate::engine::{Check, CheckBaseline, Context};
use crate::error::Result;
use crate::finding::{Finding, Severity};

pub(crate) const DESCRIPTION: &str = "the task list against the PID table (processes hidden \
     from the task list), seen hidden in two consecutive reads";

/// How long the second read of both views waits, when the previous pass cannot confirm a
/// candidate: long enough for a fork or exit in flight to finish, short enough for a pass.
pub const RECHECK_DELAY: Duration = Duration::from_millis(50);

/// `PF_EXITING`: the task is in `do_exit`. A `#define`, so not in BTF; unchanged since 2.6.
const PF_EXITING: u32 = 0x4;

/// Task-list check (`tasks`).
#[derive(Debug)]
pub struct TasksCheck {
    offsets: super::Derived<TaskOffsets>,
    /// Hidden processes seen by the last read of the last pass: `(task_struct, pid)`.
    last: Mutex<HashSet<(u64, i32)>>,
    /// Second read within a pass for candidates the last pass did not see; `None` relies on
    /// consecutive passes alone.
    recheck: Option<Duration>,
}

impl Default for TasksCheck {
    fn default() -> Self {
        Self {
            offsets: super::Derived::default(),
            last: Mutex::new(HashSet::new()),
            recheck: Some(RECHECK_DELAY),
        }
    }
}

impl TasksCheck {
    /// A check using these offsets instead of deriving them from the kernel's BTF.
    pub fn with_offsets(offsets: TaskOffsets) -> Self {
        Self {
            offsets: super::Derived::fixed(offsets),
            ..Self::default()
        }
    }

    /// Set the delay of the immediate re-read, or `None` to confirm candidates only in the
    /// next pass (a `watch` that prefers never to sleep inside a pass).
    pub fn with_recheck(mut self, delay: Option<Duration>) -> Self {
        self.recheck = delay;
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TasksState {
    /// Leaders on the task list at capture (informational).
    pub listed: usize,
    /// Tasks in the PID table at capture (informational).
    pub pid_table: usize,
}

fn exiting(t: &Task) -> bool {
    t.state.exit_state != 0 || t.flags & PF_EXITING != 0
}

/// One read of both views: the leaders in the PID table missing from the task list, plus the
/// sizes of both views.
///
/// Both views are walked by address; a task is read only where they disagree, and in full only
/// if it is a process the list lacks (every pass, the threads in the PID table cost one small
/// read each, and the processes on both views none).
fn read_hidden(ctx: &Context<'_, '_>, off: &TaskOffsets) -> Result<(Vec<Task>, usize, usize)> {
    let kernel = ctx.kernel;
    let listed = kernel.task_addresses_from_list(off)?;
    let table = kernel.task_addresses_from_pid_table(off)?;
    let on_list: HashSet<u64> = listed.iter().copied().collect();
    let mut leaders_off_list = Vec::new();
    for &address in table.iter().filter(|a| !on_list.contains(a)) {
        let (pid, tgid) = kernel.task_ids(off, address)?;
        if pid > 0 && pid == tgid {
            leaders_off_list.push(address);
        }
    }
    let mut hidden = Vec::new();
    if !leaders_off_list.is_empty() {
        // A process the list holds under another task_struct (a thread that exec'd took over
        // its group) is not hidden.
        let listed_tgids = listed
            .iter()
            .map(|&a| kernel.task_ids(off, a).map(|(_, tgid)| tgid))
            .collect::<std::result::Result<HashSet<i32>, _>>()?;
        for address in leaders_off_list {
            let task = kernel.task_at(off, address)?;
            if task.is_group_leader() && !exiting(&task) && !listed_tgids.contains(&task.tgid) {
                hidden.push(task);
            }
        }
    }
    hidden.sort_by_key(|t| (t.pid, t.address));
    Ok((hidden, listed.len(), table.len()))
}

fn hidden_finding(ctx: &Context<'_, '_>, t: &Task) -> Finding {
    let mut f = ctx.finding(
        "tasks",
        Severity::Critical,
        "hidden-process",
        "task list",
        format!("process {} ({})", t.pid, t.comm),
    );
    f.expected = "on the task list (init_task.tasks)".into();
    f.actual = format!(
        "only in the PID table, task_struct at {:#x}, state {}, uid {}",
        t.address,
        t.state.letter,
        t.uid.map_or_else(|| "?".into(), |u| u.to_string())
    );
    f.explanation = format!(
        "process {} ({}) is hidden from the task list (still in the PID table): it runs and \
         gets signals, but the kernel's process iterators skip it, which only a rootkit does",
        t.pid, t.comm
    );
    f
}

impl Check for TasksCheck {
    fn id(&self) -> &'static str {
        "tasks"
    }

    fn description(&self) -> &'static str {
        DESCRIPTION
    }

    fn capture(&self, ctx: &Context<'_, '_>, _blobs: &mut Blobs) -> Result<serde_json::Value> {
        let off = self.offsets.get(ctx, |t| Ok(TaskOffsets::from_types(t)?))?;
        let (_, listed, pid_table) = read_hidden(ctx, &off)?;
        super::to_value("tasks", &TasksState { listed, pid_table })
    }

    fn verify(&self, ctx: &Context<'_, '_>, _baseline: CheckBaseline<'_>) -> Result<Vec<Finding>> {
        let off = self.offsets.get(ctx, |t| Ok(TaskOffsets::from_types(t)?))?;
        let (mut seen, _, _) = read_hidden(ctx, &off)?;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let key = |t: &Task| (t.address, t.pid);
        let mut confirmed: Vec<Task> = Vec::new();
        let mut pending: Vec<Task> = Vec::new();
        for t in seen.drain(..) {
            if last.contains(&key(&t)) {
                confirmed.push(t);
            } else {
                pending.push(t);
            }
        }
        let mut latest: HashSet<(u64, i32)> = confirmed.iter().map(key).collect();
        if !pending.is_empty() {
            match self.recheck {
                Some(delay) => {
                    std::thread::sleep(delay);
                    ctx.kernel.invalidate();
                    let (again, _, _) = read_hidden(ctx, &off)?;
                    let again: HashSet<(u64, i32)> = again.iter().map(key).collect();
                    latest.extend(again.iter().copied());
                    confirmed.extend(pending.into_iter().filter(|t| again.contains(&key(t))));
                }
                None => latest.extend(pending.iter().map(key)),
            }
        }
        *last = latest;
        confirmed.sort_by_key(|t| t.pid);
        Ok(confirmed.iter().map(|t| hidden_finding(ctx, t)).collect())
    }
}
