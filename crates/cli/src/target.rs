//! Turning `--qmp` / `--dump` / `--guest` into an open backend.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kvmaccess_core::{PhysicalMemory, PhysicalMemoryWrite, Registers, VcpuState, VmControl};
use kvmaccess_dump::Dump;
use kvmaccess_qemu::{AttachOptions, GuestState, QemuVm, RamMode, RegisterSource};

use crate::TargetArgs;

/// Name of the guest `boot` starts when none is given.
pub const DEFAULT_GUEST: &str = "default";

/// An open target: a live QEMU or a dump file.
#[derive(Debug)]
pub enum Target {
    /// A running QEMU, reached through QMP.
    Live(Box<QemuVm>),
    /// A memory dump.
    Dump(Box<Dump>),
}

/// Whether the command intends to write guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

impl Target {
    /// Opens the target the arguments name. Notices (e.g. the `/proc/PID/mem` fallback) go to
    /// stderr so that JSON on stdout stays clean.
    pub fn open(args: &TargetArgs, access: Access) -> Result<Self> {
        Self::open_as(args, access, false)
    }

    /// Like [`Target::open`] for a long-running monitor: on a guest started by `boot` it takes
    /// the second QMP socket reserved for it, so one-off commands keep working meanwhile.
    pub fn open_monitor(args: &TargetArgs, access: Access) -> Result<Self> {
        Self::open_as(args, access, true)
    }

    fn open_as(args: &TargetArgs, access: Access, monitor: bool) -> Result<Self> {
        if let Some(path) = &args.dump {
            if access == Access::ReadWrite {
                bail!(
                    "{} is a dump: writes go to a live guest only (--qmp or a booted guest)",
                    path.display()
                );
            }
            let dump = kvmaccess_dump::open_dump(path, args.raw_base)?;
            return Ok(Target::Dump(Box::new(dump)));
        }
        let options = AttachOptions {
            allow_write: access == Access::ReadWrite,
            ram: if args.proc_mem {
                RamMode::ProcMem
            } else {
                RamMode::Auto
            },
            registers: if args.regs_from_dump {
                RegisterSource::Dump
            } else {
                RegisterSource::Hmp
            },
        };
        let socket = match &args.qmp {
            Some(socket) => socket.clone(),
            None => {
                let state = booted_guest(args)?;
                match (monitor, state.monitor_socket) {
                    (true, Some(socket)) => socket,
                    _ => state.qmp_socket,
                }
            }
        };
        let vm = QemuVm::attach_with(&socket, options)?;
        if let Some(notice) = vm.notice() {
            eprintln!("kvmaccess: note: {notice}");
        }
        Ok(Target::Live(Box::new(vm)))
    }

    pub fn memory(&self) -> &dyn PhysicalMemory {
        match self {
            Target::Live(vm) => vm.as_ref(),
            Target::Dump(dump) => dump.as_ref(),
        }
    }

    pub fn vcpus(&self) -> &dyn VcpuState {
        match self {
            Target::Live(vm) => vm.as_ref(),
            Target::Dump(dump) => dump.as_ref(),
        }
    }

    /// Pause/resume, for live guests only.
    pub fn control(&self) -> Result<&dyn VmControl> {
        match self {
            Target::Live(vm) => Ok(vm.as_ref()),
            Target::Dump(dump) => bail!(
                "{} is a dump: only a live guest can be paused or resumed",
                dump.file_name()
            ),
        }
    }

    /// Memory writes; the target must have been opened with [`Access::ReadWrite`].
    pub fn writer(&self) -> Result<&dyn PhysicalMemoryWrite> {
        match self {
            Target::Live(vm) => Ok(vm.as_ref()),
            Target::Dump(dump) => bail!("{} is a dump: it cannot be written", dump.file_name()),
        }
    }

    /// Registers of one vCPU, with the vCPU count in the error when it does not exist.
    pub fn registers(&self, vcpu: usize) -> Result<Registers> {
        let vcpus = self.vcpus();
        if vcpus.vcpu_count() == 0 {
            bail!("{} records no vCPU registers", self.describe());
        }
        Ok(vcpus.registers(vcpu)?)
    }

    /// The `VMCOREINFO` text the target carries, if any. A live guest has one when QEMU runs
    /// with `-device vmcoreinfo` and the guest loaded `qemu_fw_cfg`; QEMU hands it out only
    /// inside a dump, so this costs a one-page dump.
    pub fn vmcoreinfo(&self) -> Option<String> {
        match self {
            Target::Live(vm) => vm.dump_notes().ok().and_then(|notes| notes.vmcoreinfo),
            Target::Dump(dump) => dump.vmcoreinfo().map(str::to_owned),
        }
    }

    /// The `VMCOREINFO` text a dump recorded (ELF core note); `None` for live guests, whose
    /// memory is scanned instead so that nothing the guest handed to QEMU is trusted blindly.
    pub fn vmcoreinfo_recorded(&self) -> Option<String> {
        match self {
            Target::Live(_) => None,
            Target::Dump(dump) => dump.vmcoreinfo().map(str::to_owned),
        }
    }

    /// A few words naming the target, for messages.
    pub fn describe(&self) -> String {
        match self {
            Target::Live(vm) => format!("the QEMU guest at {}", vm.qmp().path().display()),
            Target::Dump(dump) => format!("the {} dump {}", dump.format(), dump.file_name()),
        }
    }
}

/// Where run directories of booted guests live.
pub fn run_root(args: &TargetArgs) -> PathBuf {
    if let Some(dir) = &args.run_root {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os("KVMACCESS_RUN_DIR") {
        return PathBuf::from(dir);
    }
    if is_root() {
        return PathBuf::from("/run/kvmaccess");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("kvmaccess"),
        None => std::env::temp_dir().join("kvmaccess"),
    }
}

/// The run directory of the named (or default) booted guest.
pub fn guest_run_dir(args: &TargetArgs) -> PathBuf {
    run_root(args).join(args.guest.as_deref().unwrap_or(DEFAULT_GUEST))
}

/// The state of the booted guest the arguments name, which must still be running.
pub fn booted_guest(args: &TargetArgs) -> Result<GuestState> {
    let dir = guest_run_dir(args);
    let name = args.guest.as_deref().unwrap_or(DEFAULT_GUEST);
    let state_file = dir.join(GuestState::FILE_NAME);
    if !state_file.exists() {
        bail!(
            "no target: give --qmp SOCKET or --dump FILE, or start a guest with `kvmaccess boot` \
             (no guest '{name}' in {})",
            run_root(args).display()
        );
    }
    let state =
        GuestState::load(&dir).with_context(|| format!("reading the state of guest '{name}'"))?;
    if !state.is_alive() {
        bail!(
            "guest '{name}' (QEMU pid {}) is no longer running; its console log is {}; \
             `kvmaccess shutdown` cleans it up",
            state.pid,
            state.console_log.display()
        );
    }
    Ok(state)
}

fn is_root() -> bool {
    // The owner of /proc/self is the effective uid; no unsafe geteuid() call needed.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Refuses to replace a file the user owns unless they said so.
pub fn check_output_path(path: &Path, force: bool) -> Result<()> {
    if !force && path.symlink_metadata().is_ok() {
        bail!(
            "{} already exists: choose another name or pass --force to replace it",
            path.display()
        );
    }
    Ok(())
}
