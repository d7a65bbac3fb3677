//! Starting QEMU with everything introspection needs, and finding a guest started earlier.

use crate::console::Console;
use crate::error::{Error, Result};
use crate::qmp::QmpClient;
use crate::vm::{AttachOptions, QemuVm};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Which accelerator QEMU uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when [`kvm_probe`] says it is usable, else TCG.
    #[default]
    Auto,
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's software emulator: slow but available everywhere.
    Tcg,
}

impl Accel {
    /// Turn `Auto` into `Kvm` or `Tcg`, with the reason for the choice.
    pub fn resolve(self) -> (Accel, String) {
        match self {
            Accel::Auto => match kvm_probe() {
                Ok(()) => (Accel::Kvm, "KVM is usable".to_string()),
                Err(why) => (Accel::Tcg, format!("using TCG: {why}")),
            },
            other => (other, "chosen explicitly".to_string()),
        }
    }

    fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg | Accel::Auto => "tcg",
        }
    }
}

/// Whether KVM can run a stock guest kernel at useful speed here; `Err` says why not.
///
/// Opening /dev/kvm is not enough: some hosts (nested sandboxes) provide /dev/kvm through a
/// software implementation (`kvm_pvm`) on which an unmodified kernel crawls. Without hardware
/// virtualisation flags, or with that module loaded, TCG is the better choice.
pub fn kvm_probe() -> std::result::Result<(), String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm cannot be opened ({e})"))?;
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(
            "/dev/kvm is the software PVM implementation (kvm_pvm), too slow for stock kernels"
                .to_string(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Err("the CPU reports no vmx/svm (hardware virtualisation)".to_string());
    }
    Ok(())
}

/// Where QEMU keeps guest RAM. Both are shared mappings that an attach maps read-only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RamBackend {
    /// A file (`memory-backend-file`) in /dev/shm or the run directory, named in the state file.
    #[default]
    File,
    /// An anonymous memfd (`memory-backend-memfd`). It has no name in the file system: an
    /// attach finds it among QEMU's open files in `/proc/PID/fd` (which needs the rights to
    /// ptrace QEMU, as the same user has), and nothing is left behind when QEMU dies.
    Memfd,
}

/// What to boot and how. Build with [`LaunchConfig::new`] and adjust the public fields.
#[derive(Clone, Debug)]
pub struct LaunchConfig {
    /// The kernel image (`-kernel`).
    pub kernel: PathBuf,
    /// The initramfs (`-initrd`).
    pub initrd: Option<PathBuf>,
    /// Kernel command line (`-append`).
    pub append: String,
    /// Guest RAM in bytes; must be a whole number of MiB.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub smp: u32,
    /// Accelerator.
    pub accel: Accel,
    /// CPU model (`-cpu`).
    pub cpu: String,
    /// Further QEMU arguments, appended last.
    pub extra_args: Vec<String>,
    /// Directory for the sockets, logs, PID and state files. Created if missing.
    pub run_dir: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// How guest RAM is shared.
    pub ram: RamBackend,
    /// Put the RAM file in /dev/shm (fast tmpfs) when possible, else in `run_dir`; only for
    /// [`RamBackend::File`].
    pub ram_in_dev_shm: bool,
    /// Pass `-no-reboot`: a guest reboot (or a panic with `panic=-1`) ends QEMU instead of
    /// looping.
    pub no_reboot: bool,
    /// Add `-device vmcoreinfo`, so a guest with `qemu_fw_cfg` publishes VMCOREINFO to QEMU
    /// (it then appears in `dump-guest-memory` output).
    pub vmcoreinfo: bool,
    /// Add QEMU's ISA pvpanic device (`-device pvpanic`, ACPI `QEMU0001`, driven by Linux's
    /// `pvpanic-mmio`) and `-action panic=pause` (QEMU 6.0 and later): a guest whose driver is
    /// loaded tells QEMU when it panics, from the panic notifiers, before `panic=` reboots it;
    /// QEMU then emits `GUEST_PANICKED` and keeps the panicked kernel's memory paused for a
    /// dump instead of shutting down (its default).
    pub pvpanic: bool,
    /// How long to wait for QEMU's QMP socket to answer.
    pub start_timeout: Duration,
}

impl LaunchConfig {
    /// Defaults: 512 MiB, 1 vCPU, automatic accelerator, `-cpu max`, `console=ttyS0` on the
    /// command line, RAM in a file in /dev/shm, `-no-reboot`, `-device vmcoreinfo`, a pvpanic device that
    /// pauses the guest on panic.
    pub fn new(kernel: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            append: "console=ttyS0".to_string(),
            mem_bytes: 512 << 20,
            smp: 1,
            accel: Accel::Auto,
            cpu: "max".to_string(),
            extra_args: Vec::new(),
            run_dir: run_dir.into(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            ram: RamBackend::File,
            ram_in_dev_shm: true,
            no_reboot: true,
            vmcoreinfo: true,
            pvpanic: true,
            start_timeout: Duration::from_secs(30),
        }
    }

    /// Paths QEMU will use, before launching.
    pub fn paths(&self) -> GuestState {
        GuestState {
            pid: 0,
            run_dir: self.run_dir.clone(),
            qmp_socket: self.run_dir.join("qmp.sock"),
            monitor_socket: Some(self.run_dir.join("qmp-monitor.sock")),
            console_socket: self.run_dir.join("console.sock"),
            console_log: self.run_dir.join("console.log"),
            qemu_log: self.run_dir.join("qemu.log"),
            pid_file: self.run_dir.join("qemu.pid"),
            ram_backend: self.ram,
            ram_path: match self.ram {
                RamBackend::File => Some(self.run_dir.join("ram")),
                RamBackend::Memfd => None,
            },
            accel: Accel::Tcg,
            started_unix: 0,
        }
    }

    /// The QEMU command line for an already-resolved accelerator and RAM file (`state.ram_path`,
    /// needed for [`RamBackend::File`]).
    pub fn args(&self, accel: Accel, state: &GuestState) -> Result<Vec<OsString>> {
        if self.mem_bytes == 0 || self.mem_bytes % (1 << 20) != 0 {
            return Err(Error::Launch(format!(
                "guest memory must be a positive whole number of MiB, not {} bytes",
                self.mem_bytes
            )));
        }
        let mib = self.mem_bytes >> 20;
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(OsString::from(s));
        for s in ["-nodefaults", "-nographic", "-no-user-config"] {
            push(s);
        }
        push("-accel");
        push(accel.qemu_name());
        push("-cpu");
        push(&self.cpu);
        push("-m");
        push(&format!("{mib}M"));
        push("-smp");
        push(&self.smp.to_string());
        push("-object");
        push(&self.ram_object(mib, state)?);
        push("-machine");
        push("memory-backend=ram");
        push("-qmp");
        push(&format!(
            "unix:{},server=on,wait=off",
            qemu_opt_path(&state.qmp_socket)?
        ));
        // QEMU serves one client per QMP socket: a second one keeps a long-running monitor from
        // locking out one-off commands (and the other way round).
        if let Some(monitor) = &state.monitor_socket {
            push("-qmp");
            push(&format!(
                "unix:{},server=on,wait=off",
                qemu_opt_path(monitor)?
            ));
        }
        push("-chardev");
        push(&format!(
            "socket,id=con,path={},server=on,wait=off,logfile={}",
            qemu_opt_path(&state.console_socket)?,
            qemu_opt_path(&state.console_log)?
        ));
        push("-serial");
        push("chardev:con");
        push("-pidfile");
        a.push(state.pid_file.clone().into_os_string());
        let mut push = |s: &str| a.push(OsString::from(s));
        if self.vmcoreinfo {
            push("-device");
            push("vmcoreinfo");
        }
        if self.pvpanic {
            for s in ["-device", "pvpanic", "-action", "panic=pause"] {
                push(s);
            }
        }
        if self.no_reboot {
            push("-no-reboot");
        }
        push("-kernel");
        a.push(self.kernel.clone().into_os_string());
        if let Some(i) = &self.initrd {
            a.push(OsString::from("-initrd"));
            a.push(i.clone().into_os_string());
        }
        a.push(OsString::from("-append"));
        a.push(OsString::from(&self.append));
        a.extend(self.extra_args.iter().map(OsString::from));
        Ok(a)
    }

    /// The `-object` value of the RAM backend, which `-machine memory-backend=ram` names.
    fn ram_object(&self, mib: u64, state: &GuestState) -> Result<String> {
        match self.ram {
            RamBackend::File => {
                let path = state.ram_path.as_deref().ok_or_else(|| {
                    Error::Launch("a file-backed guest needs a RAM file path".to_string())
                })?;
                Ok(format!(
                    "memory-backend-file,id=ram,size={mib}M,mem-path={},share=on",
                    qemu_opt_path(path)?
                ))
            }
            RamBackend::Memfd => Ok(format!("memory-backend-memfd,id=ram,size={mib}M,share=on")),
        }
    }

    /// Start QEMU and wait until its QMP socket answers. The returned [`Guest`] kills QEMU when
    /// dropped unless [`Guest::detach`] is called.
    pub fn launch(&self) -> Result<Guest> {
        for (what, p) in [
            ("kernel", Some(&self.kernel)),
            ("initrd", self.initrd.as_ref()),
        ] {
            if let Some(p) = p {
                if !p.is_file() {
                    return Err(Error::Launch(format!(
                        "{what} {} does not exist",
                        p.display()
                    )));
                }
            }
        }
        std::fs::create_dir_all(&self.run_dir)
            .map_err(|e| Error::io(format!("creating {}", self.run_dir.display()), e))?;
        let run_dir = self
            .run_dir
            .canonicalize()
            .map_err(|e| Error::io(format!("resolving {}", self.run_dir.display()), e))?;
        if let Ok(old) = GuestState::load(&run_dir) {
            if old.is_alive() {
                return Err(Error::Launch(format!(
                    "a guest started from {} is still running (PID {}); stop it first",
                    run_dir.display(),
                    old.pid
                )));
            }
            old.cleanup();
        }

        let mut state = LaunchConfig {
            run_dir: run_dir.clone(),
            ..self.clone()
        }
        .paths();
        if self.ram == RamBackend::File {
            state.ram_path = Some(ram_file_path(&run_dir, self.ram_in_dev_shm));
        }
        let (accel, _why) = self.accel.resolve();
        state.accel = accel;
        for p in [&state.qmp_socket, &state.console_socket]
            .into_iter()
            .chain(state.monitor_socket.as_ref())
        {
            // sun_path holds 108 bytes including the terminating NUL.
            if p.as_os_str().len() >= 108 {
                return Err(Error::Launch(format!(
                    "socket path {} is too long for a unix socket; use a shorter run directory",
                    p.display()
                )));
            }
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(&state.console_log);
        let args = self.args(accel, &state)?;

        let log = std::fs::File::create(&state.qemu_log)
            .map_err(|e| Error::io(format!("creating {}", state.qemu_log.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::io("duplicating the log file", e))?;
        let mut cmd = Command::new(&self.qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group, so a Ctrl-C aimed at the launching tool does not take a
            // detached guest down with it.
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| Error::Launch(format!("running {}: {e}", self.qemu.display())))?;
        state.pid = child.id();
        state.started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut guest = Guest {
            child: Some(child),
            state,
            kill_on_drop: true,
        };
        guest.wait_for_qmp(self.start_timeout)?;
        guest.state.save()?;
        Ok(guest)
    }
}

/// Escape a path for a QEMU `-object`/`-chardev` option value, where `,` separates options.
fn qemu_opt_path(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .ok_or_else(|| Error::Launch(format!("path {} is not valid UTF-8", p.display())))?;
    Ok(s.replace(',', ",,"))
}

fn ram_file_path(run_dir: &Path, prefer_shm: bool) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let shm = Path::new("/dev/shm");
    if prefer_shm && shm.is_dir() {
        let probe = shm.join(format!(".kvmaccess-probe-{}", std::process::id()));
        if std::fs::File::create(&probe).is_ok() {
            let _ = std::fs::remove_file(&probe);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            return shm.join(format!(
                "kvmaccess-{}-{}-{nanos}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
        }
    }
    run_dir.join("ram")
}

/// Where a launched guest's files are; saved as `guest.json` in the run directory so later
/// commands can find "the guest that `boot` started".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestState {
    /// QEMU's PID.
    pub pid: u32,
    /// The run directory.
    pub run_dir: PathBuf,
    /// QMP socket: pass to [`QemuVm::attach`].
    pub qmp_socket: PathBuf,
    /// A second QMP socket reserved for a long-running monitor (`kvmaccess watch`); absent in
    /// state files written before it existed.
    #[serde(default)]
    pub monitor_socket: Option<PathBuf>,
    /// Serial console socket: [`Console::connect`], or `socat - UNIX-CONNECT:<path>`.
    pub console_socket: PathBuf,
    /// Everything the guest wrote to its console since boot.
    pub console_log: PathBuf,
    /// QEMU's own stdout/stderr.
    pub qemu_log: PathBuf,
    /// QEMU's `-pidfile`.
    pub pid_file: PathBuf,
    /// How guest RAM is shared; state files written before memfd existed mean a file.
    #[serde(default)]
    pub ram_backend: RamBackend,
    /// The shared file holding guest RAM; `None` for a memfd, which has no path.
    pub ram_path: Option<PathBuf>,
    /// The accelerator QEMU was started with.
    pub accel: Accel,
    /// Start time, seconds since the Unix epoch.
    pub started_unix: u64,
}

impl GuestState {
    /// File name of the state file inside the run directory.
    pub const FILE_NAME: &'static str = "guest.json";

    /// Read `run_dir/guest.json`.
    pub fn load(run_dir: impl AsRef<Path>) -> Result<Self> {
        let p = run_dir.as_ref().join(Self::FILE_NAME);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            Error::io(
                format!(
                    "reading {} (no guest was started from this directory?)",
                    p.display()
                ),
                e,
            )
        })?;
        serde_json::from_str(&text)
            .map_err(|e| Error::protocol("guest state file", format!("{}: {e}", p.display())))
    }

    /// Write `run_dir/guest.json`.
    pub fn save(&self) -> Result<()> {
        let p = self.run_dir.join(Self::FILE_NAME);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::protocol("guest state file", e.to_string()))?;
        std::fs::write(&p, text).map_err(|e| Error::io(format!("writing {}", p.display()), e))
    }

    /// Whether the QEMU this state describes still runs: its PID exists and its command line
    /// names our QMP socket (so a recycled PID is not mistaken for it).
    pub fn is_alive(&self) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", self.pid)) else {
            return false;
        };
        let sock = self.qmp_socket.as_os_str().as_encoded_bytes();
        !sock.is_empty() && cmdline.windows(sock.len()).any(|w| w == sock)
    }

    /// Ask QEMU to quit through QMP, then wait up to `timeout` for it to exit, and clean up.
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        if self.is_alive() {
            let qmp = QmpClient::connect(&self.qmp_socket)?;
            match qmp.execute("quit", Value::Null) {
                Ok(_) | Err(Error::Closed) => {}
                Err(e) => return Err(e),
            }
            let deadline = Instant::now() + timeout;
            while self.is_alive() {
                if Instant::now() > deadline {
                    return Err(Error::Launch(format!(
                        "QEMU (PID {}) did not exit within {} s of `quit`",
                        self.pid,
                        timeout.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.cleanup();
        Ok(())
    }

    /// Remove the RAM file (if RAM is in one), sockets, PID and state files. Only call once QEMU
    /// has exited: the RAM file lives in tmpfs and would otherwise hold the guest's memory forever.
    pub fn cleanup(&self) {
        for p in [
            &self.qmp_socket,
            &self.console_socket,
            &self.pid_file,
            &self.run_dir.join(Self::FILE_NAME),
        ]
        .into_iter()
        .chain(self.ram_path.as_ref())
        .chain(self.monitor_socket.as_ref())
        {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Attach to this guest.
    pub fn attach(&self, options: AttachOptions) -> Result<QemuVm> {
        QemuVm::attach_with(&self.qmp_socket, options)
    }

    /// Connect to this guest's serial console.
    pub fn console(&self) -> Result<Console> {
        Console::connect(&self.console_socket)
    }

    /// Wait until the console log contains `marker`; return the line that holds it.
    pub fn wait_for_console(&self, marker: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(bytes) = std::fs::read(&self.console_log) {
                let text = String::from_utf8_lossy(&bytes);
                if let Some(line) = text.lines().find(|l| l.contains(marker)) {
                    return Ok(line.trim_matches(|c: char| c.is_control()).to_string());
                }
            }
            if !self.is_alive() {
                return Err(Error::Launch(format!(
                    "QEMU exited before the console showed {marker:?}; see {} and {}",
                    self.qemu_log.display(),
                    self.console_log.display()
                )));
            }
            if Instant::now() > deadline {
                let log = std::fs::read(&self.console_log).unwrap_or_default();
                let tail =
                    String::from_utf8_lossy(&log[log.len().saturating_sub(600)..]).into_owned();
                return Err(Error::Console(format!(
                    "{marker:?} did not appear within {} s; console ends with: {tail:?}",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A QEMU process started by [`LaunchConfig::launch`].
#[derive(Debug)]
pub struct Guest {
    child: Option<Child>,
    state: GuestState,
    kill_on_drop: bool,
}

impl Guest {
    /// Paths, PID and accelerator.
    pub fn state(&self) -> &GuestState {
        &self.state
    }

    /// QEMU's PID.
    pub fn pid(&self) -> u32 {
        self.state.pid
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> &Path {
        &self.state.qmp_socket
    }

    /// Attach read-only with defaults.
    pub fn attach(&self) -> Result<QemuVm> {
        QemuVm::attach(&self.state.qmp_socket)
    }

    /// Attach with options.
    pub fn attach_with(&self, options: AttachOptions) -> Result<QemuVm> {
        self.state.attach(options)
    }

    /// Connect to the serial console.
    pub fn console(&self) -> Result<Console> {
        self.state.console()
    }

    /// Wait until the console log contains `marker`; return that line.
    pub fn wait_for_console(&self, marker: &str, timeout: Duration) -> Result<String> {
        self.state.wait_for_console(marker, timeout)
    }

    /// Whether QEMU is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => self.state.is_alive(),
        }
    }

    /// Leave QEMU running after this handle (and this process) goes away; returns where to find
    /// it. Its RAM file stays until [`GuestState::shutdown`] or [`GuestState::cleanup`].
    pub fn detach(mut self) -> GuestState {
        self.kill_on_drop = false;
        // Dropping a `Child` neither kills nor waits for it.
        self.child = None;
        self.state.clone()
    }

    /// Kill QEMU now, wait for it, and remove its files.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            c.wait()
                .map_err(|e| Error::io(format!("waiting for QEMU (PID {})", self.state.pid), e))?;
        }
        self.state.cleanup();
        Ok(())
    }

    fn wait_for_qmp(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let log = std::fs::read_to_string(&self.state.qemu_log).unwrap_or_default();
                    return Err(Error::Launch(format!(
                        "QEMU exited at start ({status}): {}",
                        crate::error::shorten(log.trim(), 2000)
                    )));
                }
            }
            if self.state.qmp_socket.exists() {
                match QmpClient::connect(&self.state.qmp_socket) {
                    Ok(_) => return Ok(()),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Launch(format!(
                    "QMP socket {} did not appear within {} s",
                    self.state.qmp_socket.display(),
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.kill_on_drop {
            let _ = self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line under TCG, as strings.
    fn tcg_args(cfg: &LaunchConfig, state: &GuestState) -> Vec<String> {
        cfg.args(Accel::Tcg, state)
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn command_line_has_shared_ram_sockets_and_escapes_commas() {
        let mut cfg = LaunchConfig::new("/k/vmlinuz", "/run/a,b");
        cfg.initrd = Some("/k/initrd".into());
        cfg.mem_bytes = 256 << 20;
        cfg.smp = 2;
        let mut st = cfg.paths();
        st.ram_path = Some("/dev/shm/kvmaccess-x".into());
        let args = tcg_args(&cfg, &st);
        let joined = args.join(" ");
        for want in [
            "-nodefaults -nographic -no-user-config",
            "-accel tcg -cpu max -m 256M -smp 2",
            "memory-backend-file,id=ram,size=256M,mem-path=/dev/shm/kvmaccess-x,share=on",
            "-machine memory-backend=ram",
            "-qmp unix:/run/a,,b/qmp.sock,server=on,wait=off",
            "socket,id=con,path=/run/a,,b/console.sock,server=on,wait=off,logfile=/run/a,,b/console.log",
            "-serial chardev:con",
            "-device vmcoreinfo -device pvpanic -action panic=pause -no-reboot",
            "-kernel /k/vmlinuz -initrd /k/initrd -append console=ttyS0",
        ] {
            assert!(joined.contains(want), "{want:?} missing from {joined}");
        }
        // The pidfile is a plain argument, not an option value: no comma escaping.
        assert!(args.iter().any(|a| a == "/run/a,b/qemu.pid"));
    }

    #[test]
    fn memfd_ram_has_no_path_and_its_own_backend() {
        let mut cfg = LaunchConfig::new("/k", "/r");
        cfg.ram = RamBackend::Memfd;
        cfg.mem_bytes = 128 << 20;
        let st = cfg.paths();
        assert_eq!(
            (st.ram_backend, st.ram_path.as_ref()),
            (RamBackend::Memfd, None)
        );
        let args = tcg_args(&cfg, &st);
        let joined = args.join(" ");
        assert!(
            joined.contains(
                "-object memory-backend-memfd,id=ram,size=128M,share=on -machine memory-backend=ram"
            ),
            "{joined}"
        );
        assert!(!joined.contains("mem-path"), "{joined}");
    }

    #[test]
    fn state_files_from_before_memfd_mean_a_ram_file() {
        let mut st = LaunchConfig::new("/k", "/r").paths();
        st.ram_path = Some("/dev/shm/x".into());
        let mut json = serde_json::to_value(&st).unwrap();
        json.as_object_mut().unwrap().remove("ram_backend");
        let old: GuestState = serde_json::from_value(json).unwrap();
        assert_eq!(old, st);
        assert_eq!(old.ram_backend, RamBackend::File);
    }

    #[test]
    fn pvpanic_can_be_left_out() {
        let mut cfg = LaunchConfig::new("/k", "/r");
        cfg.pvpanic = false;
        let args = tcg_args(&cfg, &cfg.paths());
        assert!(!args.iter().any(|a| a.contains("pvpanic")), "{args:?}");
        assert!(!args.iter().any(|a| a == "-action"), "{args:?}");
    }

    #[test]
    fn memory_must_be_whole_mib() {
        let mut cfg = LaunchConfig::new("/k", "/r");
        cfg.mem_bytes = (1 << 20) + 1;
        assert!(cfg.args(Accel::Tcg, &cfg.paths()).is_err());
        cfg.mem_bytes = 0;
        assert!(cfg.args(Accel::Tcg, &cfg.paths()).is_err());
    }

    #[test]
    fn auto_resolves_to_a_concrete_accelerator() {
        let (accel, why) = Accel::Auto.resolve();
        assert_ne!(accel, Accel::Auto);
        assert!(!why.is_empty());
        assert_eq!(Accel::Tcg.resolve().0, Accel::Tcg);
    }
}
