//! Running the `kvmaccess` binary in tests, and guests booted through it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The result of one `kvmaccess` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(output: Output) -> Self {
        Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Panics with both streams unless the command succeeded.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "kvmaccess failed (exit {}):\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// The stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// Asserts a user error: exit code 2, one line on stderr naming `needle`, no panic.
    pub fn user_error(&self, needle: &str) {
        assert_eq!(
            self.code, 2,
            "expected exit 2, got {}: {}",
            self.code, self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "stderr should mention {needle:?}: {}",
            self.stderr
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.starts_with("kvmaccess: note:"))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one error line, got: {}",
            self.stderr
        );
        assert!(
            lines[0].starts_with("kvmaccess: error: "),
            "{}",
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        // A cause is said once, even when a library error quotes it and also chains it.
        let parts: Vec<&str> = lines[0].split(": ").filter(|p| p.len() > 12).collect();
        for (i, part) in parts.iter().enumerate() {
            assert!(
                !parts[i + 1..].contains(part),
                "{part:?} is repeated: {}",
                self.stderr
            );
        }
    }
}

/// Runs `kvmaccess ARGS` with an isolated run directory.
pub fn kvmaccess(run_root: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_kvmaccess"))
        .args(args)
        .env("KVMACCESS_RUN_DIR", run_root)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("running kvmaccess");
    Run::from_output(output)
}

/// The built-in guest's files; a missing guest fails the test rather than skipping it.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("KVMACCESS_GUEST_DIR").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.cache/guest")),
        PathBuf::from,
    );
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        assert!(
            dir.join(file).is_file(),
            "the test guest is missing ({}): run `make guest` first",
            dir.join(file).display()
        );
    }
    dir
}

/// A guest booted with `kvmaccess boot` in its own run directory; shut down on drop.
pub struct BootedGuest {
    pub run_root: tempfile::TempDir,
}

impl BootedGuest {
    /// Boots the built-in guest under TCG (this machine's /dev/kvm cannot run stock kernels;
    /// the product's `auto` would pick TCG here too, but tests should not depend on that).
    pub fn boot(extra: &[&str]) -> Self {
        let _ = guest_dir();
        // Short paths: unix socket names are limited to 108 bytes.
        let run_root = tempfile::Builder::new()
            .prefix("kva")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let mut args = vec!["boot", "--accel", "tcg"];
        if !extra.contains(&"--mem") {
            args.extend_from_slice(&["--mem", "512M"]);
        }
        args.extend_from_slice(extra);
        kvmaccess(run_root.path(), &args).ok();
        Self { run_root }
    }

    pub fn run(&self, args: &[&str]) -> Run {
        kvmaccess(self.run_root.path(), args)
    }

    /// Runs a shell command in the guest and returns its output.
    pub fn console(&self, command: &str) -> String {
        self.console_within(command, "120s")
    }

    /// Like [`BootedGuest::console`], for commands that are slow under emulation on a loaded
    /// machine (switching every function's ftrace site, say).
    pub fn console_within(&self, command: &str, timeout: &str) -> String {
        self.run(&["console", "--timeout", timeout, "--", command])
            .ok()
            .stdout
    }

    /// The address of a symbol according to the guest's own /proc/kallsyms.
    pub fn guest_symbol(&self, name: &str) -> u64 {
        let out = self.console(&format!("grep ' {name}$' /proc/kallsyms"));
        let line = out
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(name))
            .unwrap_or_else(|| panic!("{name} not in the guest's /proc/kallsyms: {out:?}"));
        let address = u64::from_str_radix(line.split_whitespace().next().unwrap_or(""), 16)
            .expect("hex address");
        assert_ne!(address, 0, "kptr_restrict hides addresses: {line}");
        address
    }
}

impl Drop for BootedGuest {
    fn drop(&mut self) {
        let _ = kvmaccess(self.run_root.path(), &["shutdown", "--timeout", "20s"]);
    }
}

/// Decodes the `hex` field of `read --json`.
pub fn hex_bytes(value: &serde_json::Value) -> Vec<u8> {
    let hex = value["hex"].as_str().expect("hex field");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

impl BootedGuest {
    /// A path inside the guest's run directory (removed with it).
    pub fn path(&self, name: &str) -> PathBuf {
        self.run_root.path().join(name)
    }

    /// Takes a baseline of the guest as it is now (`baseline -o`); returns its path.
    pub fn baseline(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        self.run(&["baseline", "-o", path.to_str().expect("utf-8 path")])
            .ok();
        path
    }

    /// `check --json --baseline B EXTRA`: the exit code and the findings.
    pub fn check_findings(&self, baseline: &Path, extra: &[&str]) -> (i32, Vec<serde_json::Value>) {
        let mut args = vec![
            "--json",
            "check",
            "--baseline",
            baseline.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        let run = self.run(&args);
        assert!(
            run.code == 0 || run.code == 1,
            "check failed (exit {}): {}{}",
            run.code,
            run.stdout,
            run.stderr
        );
        let findings = run.json()["findings"].as_array().expect("findings").clone();
        (run.code, findings)
    }

    /// Starts `kvmaccess watch --baseline B --log LOG ARGS` as a child process and waits for its
    /// `watch-started` line. Its stderr goes to LOG.stderr.
    pub fn watch(&self, baseline: &Path, log_name: &str, args: &[&str]) -> Watch {
        let log = self.path(log_name);
        let stderr_path = self.path(&format!("{log_name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_kvmaccess"))
            .arg("watch")
            .arg("--baseline")
            .arg(baseline)
            .arg("--log")
            .arg(&log)
            .args(args)
            .env("KVMACCESS_RUN_DIR", self.run_root.path())
            .env_remove("RUST_BACKTRACE")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting kvmaccess watch");
        let mut watch = Watch {
            child,
            log,
            stderr: stderr_path,
        };
        watch.wait_for("watch-started", Duration::from_secs(60), |l| {
            l["event"] == "watch-started"
        });
        watch
    }
}

impl BootedGuest {
    /// Runs a QMP command (without arguments) on the guest's one-off QMP socket, the one `watch`
    /// leaves free; returns QEMU's answer.
    pub fn qmp(&self, command: &str) -> serde_json::Value {
        let state = kvmaccess_qemu::GuestState::load(self.run_root.path().join("default"))
            .expect("the booted guest's state file");
        let qmp = kvmaccess_qemu::QmpClient::connect(&state.qmp_socket).expect("QMP socket");
        qmp.execute(command, serde_json::Value::Null)
            .unwrap_or_else(|e| panic!("QMP {command}: {e}"))
    }
}

/// A `kvmaccess watch` child process and its JSON-lines log; killed on drop.
pub struct Watch {
    child: std::process::Child,
    pub log: PathBuf,
    stderr: PathBuf,
}

impl Watch {
    /// The watch's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the watch has used so far (/proc/PID/schedstat, nanoseconds on a CPU).
    pub fn cpu_time(&self) -> Duration {
        let path = format!("/proc/{}/schedstat", self.pid());
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("{path} is not schedstat: {text:?}"));
        Duration::from_nanos(ns)
    }

    /// Every line logged so far, parsed.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("log line not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// The log and the watch's stderr, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "log:\n{}\nstderr:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Polls the log until a line satisfies `pred`; returns its index and the line. Panics with
    /// the transcript when `timeout` passes or the watch exits without such a line.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> (usize, serde_json::Value) {
        self.wait_for_from(0, what, timeout, pred)
    }

    /// Like [`Watch::wait_for`], looking only at the lines from index `first` on.
    pub fn wait_for_from(
        &mut self,
        first: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> (usize, serde_json::Value) {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the exit status first: lines logged before the exit are then all visible.
            let exited = self.child.try_wait().expect("watch status");
            if let Some(found) = self
                .lines()
                .into_iter()
                .enumerate()
                .skip(first)
                .find(|(_, l)| pred(l))
            {
                return found;
            }
            if let Some(status) = exited {
                panic!(
                    "watch exited ({status}) without {what}\n{}",
                    self.transcript()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}\n{}",
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Follows the watch through a reboot of the guest: the reset, the new kernel found, and a
    /// full pass over it, which (with `--text-budget 0` and informational findings shown)
    /// reports the data the new boot set up as `boot-data`, since it differs from the baseline
    /// boot's. Returns the `kernel-found` line.
    ///
    /// `first` is the number of lines logged before the reboot was asked for: an earlier reset
    /// (QEMU may report one the watch connected just after) must not stand in for this one.
    pub fn follow_reboot(&mut self, first: usize) -> serde_json::Value {
        let (reset, _) = self.wait_for_from(first, "the reboot", Duration::from_secs(60), |l| {
            l["event"] == "guest-rebooted"
        });
        self.follow_new_kernel(reset)
    }

    /// The `kernel-found` line logged after line `first`, once a full pass over that kernel
    /// has reported the boot's own data (see [`Watch::follow_reboot`]).
    pub fn follow_new_kernel(&mut self, first: usize) -> serde_json::Value {
        let (at, found) = self.wait_for_from(
            first,
            "the kernel after the reboot",
            Duration::from_secs(180),
            |l| l["event"] == "kernel-found",
        );
        self.wait_for_from(
            at,
            "a full pass over the new boot",
            Duration::from_secs(120),
            |l| l["event"] == "finding" && l["class"] == "boot-data",
        );
        found
    }

    /// Waits for the watch to report QEMU's exit and end with a failure, as it must.
    pub fn expect_qemu_exit(&mut self) {
        self.wait_for("QEMU's exit", Duration::from_secs(30), |l| {
            l["event"] == "qemu-exited"
        });
        let status = self.wait_status(Duration::from_secs(30));
        assert!(!status.success(), "the watch must fail when QEMU exits");
    }

    /// Logged lines that mean trouble: alarms, and passes, checks or dumps that failed.
    pub fn problems(&self) -> Vec<serde_json::Value> {
        self.lines()
            .into_iter()
            .filter(|l| {
                (l["event"] == "finding" && l["severity"] != "info")
                    || [
                        "pass-failed",
                        "check-failed",
                        "baseline-mismatch",
                        "dump-failed",
                    ]
                    .iter()
                    .any(|e| l["event"] == *e)
            })
            .collect()
    }

    /// Waits for the watch to end by itself (`--passes`); panics unless it exits 0 in time.
    pub fn wait_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("watch status") {
                assert!(
                    status.success(),
                    "watch failed: {status}\n{}",
                    self.transcript()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "watch still running after {timeout:?}\n{}",
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the watch to end by itself and returns how it ended.
    pub fn wait_status(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("watch status") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "watch still running after {timeout:?}\n{}",
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ends the watch (it is a child of this test) and returns its log.
    pub fn stop(&mut self) -> Vec<serde_json::Value> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC time as kvmaccess prints it
/// (`2026-11-21T22:40:40.240Z`).
pub fn rfc3339_ms(text: &str) -> i64 {
    let field = |range: std::ops::Range<usize>| -> i64 {
        text.get(range)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an RFC 3339 time: {text}"))
    };
    let (year, month, day) = (field(0..4), field(5..7), field(8..10));
    let (hour, minute, second) = (field(11..13), field(14..16), field(17..19));
    let millis = match text.get(19..20) {
        Some(".") => {
            let digits: String = text[20..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let value: i64 = format!("{digits:0<3}")[..3].parse().expect("fraction");
            value
        }
        _ => 0,
    };
    assert!(text.ends_with('Z'), "not a UTC time: {text}");
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(d.as_millis()).expect("fits")
}

impl BootedGuest {
    /// The address of a module's symbol according to the guest's own /proc/kallsyms
    /// (`ADDRESS t NAME [MODULE]`).
    pub fn guest_module_symbol(&self, module: &str, name: &str) -> u64 {
        let out = self.console(&format!("grep -w '{name}' /proc/kallsyms"));
        let tag = format!("[{module}]");
        let line = out
            .lines()
            .find(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(2) == Some(&name) && f.get(3) == Some(&tag.as_str())
            })
            .unwrap_or_else(|| panic!("{name} [{module}] not in /proc/kallsyms: {out:?}"));
        let address = u64::from_str_radix(line.split_whitespace().next().unwrap_or(""), 16)
            .expect("hex address");
        assert_ne!(address, 0, "kptr_restrict hides addresses: {line}");
        address
    }
}
