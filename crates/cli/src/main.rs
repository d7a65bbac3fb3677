//! `kvmaccess`: inspect a QEMU/KVM guest's memory, registers and descriptor tables from outside.

#![forbid(unsafe_code)]

mod bench;
mod bench_monitor;
mod boot;
mod hexdump;
mod inspect;
mod linux;
mod monitor;
mod objects;
mod output;
mod parse;
mod setters;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::parse::{parse_size, parse_u64};

/// Watch a virtual machine's kernel from outside the guest.
///
/// Every inspection command works on one target: a running QEMU (`--qmp SOCKET`), a memory dump
/// (`--dump FILE`), or, by default, the guest that `kvmaccess boot` started.
#[derive(Debug, Parser)]
#[command(
    name = "kvmaccess",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(flatten)]
    target: TargetArgs,

    /// Print JSON instead of text (on every command that prints data).
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

/// Where the guest is.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// QMP socket of a running QEMU (ours or anybody's), e.g. /run/vm/qmp.sock.
    #[arg(long, global = true, value_name = "SOCKET", conflicts_with_all = ["dump", "guest"])]
    pub qmp: Option<PathBuf>,

    /// A memory dump: ELF core (QEMU dump-guest-memory, virsh dump --memory-only), LiME, or a
    /// raw image with --raw-base.
    #[arg(long, global = true, value_name = "FILE", conflicts_with = "guest")]
    pub dump: Option<PathBuf>,

    /// Guest-physical address where a raw dump starts (raw images only).
    #[arg(long, global = true, value_name = "ADDR", value_parser = parse_u64, requires = "dump")]
    pub raw_base: Option<u64>,

    /// Name of a guest started by `kvmaccess boot` [default: default].
    #[arg(long, global = true, value_name = "NAME")]
    pub guest: Option<String>,

    /// Directory holding the run directories of guests that `boot` starts
    /// [default: $KVMACCESS_RUN_DIR, else /run/kvmaccess as root, else $XDG_RUNTIME_DIR/kvmaccess].
    #[arg(long, global = true, value_name = "DIR")]
    pub run_root: Option<PathBuf>,

    /// Read guest registers through the binary CPU notes of a one-page dump instead of HMP
    /// `info registers` (no EFER; QEMU briefly stops the guest).
    #[arg(long, global = true)]
    pub regs_from_dump: bool,

    /// Read guest RAM through /proc/PID/mem even when QEMU shares it (for cross-checks).
    #[arg(long, global = true)]
    pub proc_mem: bool,

    #[command(flatten)]
    pub profile: linux::ProfileArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Launch a guest (default: the built-in Debian test guest) with shared RAM and a QMP socket,
    /// and keep it running in the background.
    Boot(boot::BootArgs),
    /// Stop a guest started by `boot` and remove its run directory.
    Shutdown(boot::ShutdownArgs),
    /// Run a shell command on the serial console of a guest started by `boot`.
    Console(boot::ConsoleArgs),
    /// vCPU registers, with CR0/CR4/EFER decoded (paging mode, WP, SMEP, SMAP, NXE).
    Regs(inspect::RegsArgs),
    /// The decoded GDT of a vCPU (`gdt set` writes one descriptor).
    Gdt(inspect::GdtArgs),
    /// The 256 IDT gates of a vCPU, with handler symbols and owners on Linux guests (`idt set`
    /// points one gate elsewhere).
    Idt(inspect::IdtArgs),
    /// Translate a guest-virtual address, printing every level of the page walk.
    Translate(inspect::TranslateArgs),
    /// Read guest memory by virtual (default) or physical address; hexdump or raw bytes.
    Read(inspect::ReadArgs),
    /// Write guest memory (needs --allow-write); the bytes are read back to verify.
    Write(inspect::WriteArgs),
    /// Stop the guest's vCPUs.
    Pause,
    /// Let the guest's vCPUs run again.
    Resume,
    /// Save guest memory and registers as an ELF core that QEMU-style tools can read.
    Dump(inspect::DumpArgs),
    /// The guest kernel: release, KASLR offsets, paging mode, where the profile came from and
    /// how long each step took.
    Info(linux::InfoArgs),
    /// Every kernel and module symbol, in the layout of /proc/kallsyms.
    Symbols(linux::SymbolsArgs),
    /// Kernel addresses to symbol+offset.
    Addr2sym(linux::Addr2SymArgs),
    /// Processes from the kernel's task list (or PID table): pid, ppid, uid, state, comm and
    /// page-table root.
    Ps(objects::PsArgs),
    /// Loaded modules: base, size, taint and state (or the sysfs view with --kset).
    Lsmod(objects::LsmodArgs),
    /// The kernel log, from the printk ring buffer.
    Dmesg(objects::DmesgArgs),
    /// The system-call tables: every entry, the symbol it points to, and whether that is the
    /// kernel's own wrapper.
    Syscalls(objects::SyscallsArgs),
    /// Export the derived kernel profile (kvmaccess JSON or a Volatility 3 ISF).
    Profile(objects::ProfileCmd),
    /// Record the kernel objects of a known-good guest (KASLR-relative, tied to the build id).
    Baseline(monitor::BaselineArgs),
    /// Compare the guest with a baseline once: exit 0 clean, 1 findings, 2 error.
    Check(monitor::CheckArgs),
    /// The monitor daemon: check every interval, one JSON line per finding and guest event.
    Watch(monitor::WatchArgs),
    /// Measure the cost of each access primitive (median and p99), next to the 2011 paper's
    /// figures; `bench monitor` measures the integrity monitor's overhead.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("kvmaccess: error: {}", one_line(&error));
            ExitCode::from(2)
        }
    }
}

/// One line a user can act on: the chain of causes joined, no backtrace. A library error that
/// already quotes its cause in its own message is not followed by that cause again.
fn one_line(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let json = cli.json;
    let target = &cli.target;
    // Commands with their own exit codes (check: 1 for findings) return them; the rest succeed
    // or fail.
    match cli.command {
        Command::Baseline(args) => return monitor::baseline(target, &args, json),
        Command::Check(args) => return monitor::check(target, &args, json),
        Command::Watch(args) => return monitor::watch(target, &args),
        Command::Boot(args) => boot::boot(target, &args, json),
        Command::Shutdown(args) => boot::shutdown(target, &args, json),
        Command::Console(args) => boot::console(target, &args),
        Command::Regs(args) => inspect::regs(target, &args, json),
        Command::Gdt(args) => inspect::gdt(target, &args, json),
        Command::Idt(args) => inspect::idt(target, &args, json),
        Command::Translate(args) => inspect::translate(target, &args, json),
        Command::Read(args) => inspect::read(target, &args, json),
        Command::Write(args) => inspect::write(target, &args, json),
        Command::Pause => inspect::pause(target, true, json),
        Command::Resume => inspect::pause(target, false, json),
        Command::Dump(args) => inspect::dump(target, &args, json),
        Command::Info(args) => linux::info(target, &args, json),
        Command::Symbols(args) => linux::symbols(target, &args, json),
        Command::Addr2sym(args) => linux::addr2sym(target, &args, json),
        Command::Ps(args) => objects::ps(target, &args, json),
        Command::Lsmod(args) => objects::lsmod(target, &args, json),
        Command::Dmesg(args) => objects::dmesg(target, &args, json),
        Command::Syscalls(args) => objects::syscalls(target, &args, json),
        Command::Profile(args) => objects::profile(target, &args, json),
        Command::Bench(args) => bench::bench(target, &args, json),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Library warnings (a profile cache that cannot be written, say) on stderr as one line each,
/// like the tool's own notes; `RUST_LOG` sets the level (default: warnings).
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(output::LogLine)
        .try_init();
}

/// Parses a byte count for clap.
pub fn size_arg(text: &str) -> Result<u64, String> {
    parse_size(text)
}

#[cfg(test)]
mod tests {
    use super::{one_line, Cli};
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[derive(Debug)]
    struct Walk;

    impl std::fmt::Display for Walk {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("PML4 entry at 0x1000 is not present")
        }
    }

    impl std::error::Error for Walk {}

    /// A library error that quotes its cause and also gives it as its source.
    #[derive(Debug)]
    struct Quoting(Walk);

    impl std::fmt::Display for Quoting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "reading the GDT at 0x0: {}", self.0)
        }
    }

    impl std::error::Error for Quoting {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_already_quoted_is_not_repeated() {
        let error = anyhow::Error::new(Quoting(Walk)).context("gdt of vCPU 0");
        assert_eq!(
            one_line(&error),
            "gdt of vCPU 0: reading the GDT at 0x0: PML4 entry at 0x1000 is not present"
        );
    }

    #[test]
    fn causes_are_joined() {
        let error = anyhow::Error::new(Walk).context("translating 0x10");
        assert_eq!(
            one_line(&error),
            "translating 0x10: PML4 entry at 0x1000 is not present"
        );
    }
}
