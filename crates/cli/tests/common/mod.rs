//! Running the `kvmaccess` binary in tests, and guests booted through it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
        self.run(&["console", "--timeout", "120s", "--", command])
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
