//! Printing for scripts: one JSON document per command on stdout.

use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;

/// Prints `value` as pretty JSON followed by a newline.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("encoding JSON")?;
    write_stdout(format_args!("{text}\n"));
    Ok(())
}

/// Writes to stdout; when the reader has gone away (`kvmaccess idt | head`), exits quietly as
/// a well-behaved filter does instead of panicking like `print!` would.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    if let Err(error) = lock.write_fmt(args) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("kvmaccess: error: writing to stdout: {error}");
        std::process::exit(2);
    }
}

/// `print!` that survives a closed pipe.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!($($arg)*)) };
}

/// `println!` that survives a closed pipe.
#[macro_export]
macro_rules! outln {
    () => { $crate::output::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}
