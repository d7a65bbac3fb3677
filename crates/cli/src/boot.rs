//! `boot`, `shutdown` and `console`: the guests kvmaccess starts itself.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use kvmaccess_qemu::{Accel, GuestState, LaunchConfig, RamBackend};
use serde::Serialize;

use crate::output::print_json;
use crate::parse::parse_duration;
use crate::target::{booted_guest, guest_run_dir};
use crate::{out, outln};
use crate::{size_arg, TargetArgs};

/// The line the built-in guest's init prints once it is ready for commands.
pub const READY_MARKER: &str = "KVMACCESS-GUEST-READY";

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AccelArg {
    /// KVM when it is usable at full speed, else TCG.
    Auto,
    /// Hardware virtualisation (/dev/kvm).
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RamArg {
    /// A shared file in /dev/shm (or the run directory), visible to other tools by its path.
    File,
    /// An anonymous memfd: no file to leave behind; kvmaccess finds it through /proc/PID/fd.
    Memfd,
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// Kernel image [default: the built-in Debian cloud kernel].
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initramfs [default: the built-in busybox initramfs, with the built-in kernel].
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Guest RAM (e.g. 512M, 4G).
    #[arg(long, default_value = "512M", value_parser = size_arg)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    smp: u32,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
    /// How QEMU shares guest RAM with kvmaccess.
    #[arg(long, value_enum, default_value_t = RamArg::File)]
    ram: RamArg,
    /// QEMU CPU model. `max` gives 5-level paging under TCG; add `no5lvl` to --append for 4-level.
    #[arg(long, default_value = "max")]
    cpu: String,
    /// Extra kernel command-line arguments (e.g. "no5lvl nokaslr").
    #[arg(long, default_value = "")]
    append: String,
    /// Wait until the console prints this line before returning [default: the built-in guest's
    /// ready marker when booting the built-in guest; otherwise don't wait].
    #[arg(long, value_name = "TEXT")]
    wait_for: Option<String>,
    /// How long to wait for the guest to be ready.
    #[arg(long, default_value = "180s", value_parser = parse_duration)]
    timeout: Duration,
    /// Let the guest reboot (by default a reboot ends QEMU, and so does a panic the guest
    /// cannot report through pvpanic, so a crashed guest never loops silently).
    #[arg(long)]
    allow_reboot: bool,
    /// Leave out the pvpanic device. With it, a guest that loads its driver (`pvpanic-mmio`)
    /// reports a panic to QEMU, which pauses it for a dump and tells `watch`.
    #[arg(long)]
    no_pvpanic: bool,
    /// Extra arguments passed to QEMU as they are (repeatable).
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    qemu_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ShutdownArgs {
    /// How long QEMU may take to exit after `quit`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// The shell command to run in the guest.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
    /// How long the command may take.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
}

/// Where the built-in guest's kernel and initramfs are: `$KVMACCESS_GUEST_DIR`, else the
/// source tree's `.cache/guest` that `make guest` fills.
pub fn builtin_guest_dir() -> PathBuf {
    match std::env::var_os("KVMACCESS_GUEST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.cache/guest")),
    }
}

#[derive(Serialize)]
struct BootReport<'a> {
    name: &'a str,
    #[serde(flatten)]
    state: &'a GuestState,
    ready_line: Option<String>,
}

pub fn boot(target: &TargetArgs, args: &BootArgs, json: bool) -> Result<()> {
    if target.qmp.is_some() || target.dump.is_some() {
        bail!(
            "boot starts a new guest: --qmp and --dump don't apply (use --guest NAME to name it)"
        );
    }
    let name = target
        .guest
        .as_deref()
        .unwrap_or(crate::target::DEFAULT_GUEST);
    let builtin = args.kernel.is_none();
    let (kernel, initrd) = if builtin {
        let dir = builtin_guest_dir();
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initramfs.cpio.gz");
        if !kernel.is_file() || !initrd.is_file() {
            bail!(
                "the built-in guest is not built in {}: run `make guest` in the kvmaccess source \
                 tree (or set KVMACCESS_GUEST_DIR, or pass --kernel)",
                dir.display()
            );
        }
        (kernel, args.initrd.clone().or(Some(initrd)))
    } else {
        (args.kernel.clone().unwrap_or_default(), args.initrd.clone())
    };
    let run_dir = guest_run_dir(target);
    if let Ok(old) = GuestState::load(&run_dir) {
        if old.is_alive() {
            bail!(
                "guest '{name}' is already running (QEMU pid {}): `kvmaccess shutdown` it first, \
                 or boot another with --guest NAME",
                old.pid
            );
        }
    }
    let mut config = LaunchConfig::new(&kernel, &run_dir);
    config.initrd = initrd;
    // panic=-1 with -no-reboot makes a panicking guest end QEMU instead of hanging silently;
    // with pvpanic the panic notifier pauses it first (QEMU state `guest-panicked`).
    config.append = format!("console=ttyS0 panic=-1 quiet {}", args.append)
        .trim()
        .to_string();
    config.mem_bytes = args.mem;
    config.smp = args.smp;
    config.cpu = args.cpu.clone();
    config.extra_args = args.qemu_args.clone();
    config.no_reboot = !args.allow_reboot;
    config.pvpanic = !args.no_pvpanic;
    config.ram = match args.ram {
        RamArg::File => RamBackend::File,
        RamArg::Memfd => RamBackend::Memfd,
    };
    config.accel = match args.accel {
        AccelArg::Auto => Accel::Auto,
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Tcg => Accel::Tcg,
    };
    if matches!(args.accel, AccelArg::Auto) {
        let (chosen, why) = Accel::Auto.resolve();
        eprintln!("kvmaccess: accelerator {chosen:?}: {why}");
    }
    let guest = config.launch().context("starting QEMU")?;
    let marker = args
        .wait_for
        .clone()
        .or_else(|| builtin.then(|| READY_MARKER.to_string()));
    let ready_line = match &marker {
        Some(marker) => Some(guest.wait_for_console(marker, args.timeout)?),
        None => None,
    };
    let state = guest.detach();
    if json {
        return print_json(&BootReport {
            name,
            state: &state,
            ready_line,
        });
    }
    outln!(
        "guest '{name}' running: QEMU pid {}, accelerator {:?}",
        state.pid,
        state.accel
    );
    if let Some(line) = ready_line {
        outln!("  ready:   {line}");
    }
    outln!("  qmp:     {}", state.qmp_socket.display());
    if let Some(monitor) = &state.monitor_socket {
        outln!(
            "  monitor: {} (a second QMP socket, used by `watch`)",
            monitor.display()
        );
    }
    outln!(
        "  console: {} (log {})",
        state.console_socket.display(),
        state.console_log.display()
    );
    match &state.ram_path {
        Some(path) => outln!("  ram:     {}", path.display()),
        None => outln!(
            "  ram:     a memfd of QEMU's (found through /proc/{}/fd)",
            state.pid
        ),
    }
    let guest_flag = if name == crate::target::DEFAULT_GUEST {
        String::new()
    } else {
        format!(" --guest {name}")
    };
    outln!(
        "attach: `kvmaccess{guest_flag} regs` (or `kvmaccess --qmp {} regs`); stop: `kvmaccess{guest_flag} shutdown`",
        state.qmp_socket.display()
    );
    Ok(())
}

pub fn shutdown(target: &TargetArgs, args: &ShutdownArgs, json: bool) -> Result<()> {
    let name = target
        .guest
        .as_deref()
        .unwrap_or(crate::target::DEFAULT_GUEST);
    let run_dir = guest_run_dir(target);
    let state = GuestState::load(&run_dir)
        .with_context(|| format!("no guest '{name}' was started by `kvmaccess boot`"))?;
    let was_alive = state.is_alive();
    state.shutdown(args.timeout)?;
    if json {
        return print_json(&serde_json::json!({ "name": name, "was_running": was_alive }));
    }
    if was_alive {
        outln!("guest '{name}' stopped");
    } else {
        outln!("guest '{name}' had already exited; cleaned up its files");
    }
    Ok(())
}

pub fn console(target: &TargetArgs, args: &ConsoleArgs) -> Result<()> {
    let state = booted_guest(target)?;
    let mut console = state.console()?;
    let command = args.command.join(" ");
    let (status, output) = console.run_with_status(&command, args.timeout)?;
    out!("{output}");
    if !output.is_empty() && !output.ends_with('\n') {
        outln!();
    }
    if status != 0 {
        bail!("the guest command exited with status {status}");
    }
    Ok(())
}
