//! Driving a guest shell on QEMU's serial console socket.

use crate::error::{Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Removes terminal escape sequences and carriage returns from a byte stream, keeping state across
/// chunks so that a sequence split between two reads is still removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Escape {
    #[default]
    Text,
    /// After ESC.
    Esc,
    /// Inside `ESC [ ...` until a final byte.
    Csi,
    /// Inside `ESC ] ...` until BEL or `ESC \`.
    Osc,
    OscEsc,
}

fn clean_into(state: &mut Escape, input: &[u8], out: &mut Vec<u8>) {
    for &b in input {
        *state = match (*state, b) {
            (Escape::Text, 0x1b) => Escape::Esc,
            (Escape::Text, b'\r') => Escape::Text,
            (Escape::Text, b) => {
                if b >= 0x20 || b == b'\n' || b == b'\t' {
                    out.push(b);
                }
                Escape::Text
            }
            (Escape::Esc, b'[') => Escape::Csi,
            (Escape::Esc, b']') => Escape::Osc,
            (Escape::Esc, _) => Escape::Text,
            (Escape::Csi, 0x40..=0x7e) => Escape::Text,
            (Escape::Csi, _) => Escape::Csi,
            (Escape::Osc, 0x07) => Escape::Text,
            (Escape::Osc, 0x1b) => Escape::OscEsc,
            (Escape::Osc, _) => Escape::Osc,
            (Escape::OscEsc, _) => Escape::Text,
        };
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() {
        return Some(from.min(hay.len()));
    }
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// A connection to the guest's serial console (a QEMU `-chardev socket,server=on`).
///
/// Output is cleaned of terminal escape sequences and carriage returns as it arrives.
#[derive(Debug)]
pub struct Console {
    stream: UnixStream,
    /// Cleaned output not yet consumed by `wait_for`/`run`.
    text: Vec<u8>,
    escape: Escape,
    counter: u64,
    quiet: bool,
}

/// End-of-command marker; the echo of the command line spells it with `""` inside so that only
/// the shell's real output matches.
const DONE: &str = "__KVMA_DONE_";

impl Console {
    /// Connect to the console socket. QEMU serves one client at a time; output produced while no
    /// client was connected is only in the chardev's log file.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|e| {
            Error::Console(format!(
                "cannot connect to console socket {}: {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            stream,
            text: Vec::new(),
            escape: Escape::default(),
            counter: 0,
            quiet: false,
        })
    }

    /// Send raw text (a trailing newline is not added).
    pub fn send(&mut self, text: &str) -> Result<()> {
        self.stream
            .write_all(text.as_bytes())
            .map_err(|e| Error::Console(format!("writing to the console: {e}")))
    }

    /// Read until the cleaned output contains `marker`; return everything up to the end of the
    /// line holding it (the rest stays buffered for the next call).
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut from = 0;
        loop {
            if let Some(pos) = find(&self.text, marker.as_bytes(), from) {
                let end = self.text[pos..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(self.text.len(), |n| pos + n + 1);
                let taken: Vec<u8> = self.text.drain(..end).collect();
                return Ok(String::from_utf8_lossy(&taken).into_owned());
            }
            from = self.text.len().saturating_sub(marker.len());
            self.read_more(deadline, marker)?;
        }
    }

    fn read_more(&mut self, deadline: Instant, waiting_for: &str) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let tail_start = self.text.len().saturating_sub(400);
            return Err(Error::Console(format!(
                "timed out waiting for {waiting_for:?}; last output: {:?}",
                String::from_utf8_lossy(&self.text[tail_start..])
            )));
        }
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| Error::Console(format!("configuring the console socket: {e}")))?;
        let mut chunk = [0u8; 16384];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(Error::Console(
                "the console socket closed (QEMU exited?)".to_string(),
            )),
            Ok(n) => {
                clean_into(&mut self.escape, &chunk[..n], &mut self.text);
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(Error::Console(format!("reading the console: {e}"))),
        }
    }

    /// Run a shell command and return its output (stdout and stderr as the console shows them,
    /// without the echoed command line). Fails if the command does not finish in `timeout`.
    /// The command must not end in a comment or `&`: the marker is appended after `;`.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        self.run_with_status(cmd, timeout).map(|(_, out)| out)
    }

    /// [`Console::run`], also returning the command's exit status.
    pub fn run_with_status(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String)> {
        if !self.quiet {
            // busybox ash stops its line editor (cursor queries, redraws of long lines) once
            // echo is off, which makes output much easier to separate from input. Best effort:
            // if stty is missing, the echo handling below still copes.
            self.quiet = true;
            let _ = self.run_with_status("stty -echo 2>/dev/null; PS1=''; PS2=''", timeout);
        }
        self.counter += 1;
        let n = self.counter;
        let done = format!("{DONE}{n}__ ");
        let echoed = format!("{DONE}\"\"{n}__");
        self.send(&format!("{cmd}; echo {DONE}\"\"{n}__ $?\n"))?;

        let deadline = Instant::now() + timeout;
        let mut from = 0;
        let marker_at = loop {
            // The real marker is `__KVMA_DONE_<n>__ <status>` at the start of a line.
            let mut search = from;
            let mut hit = None;
            while let Some(p) = find(&self.text, done.as_bytes(), search) {
                let at_line_start = p == 0 || self.text[p - 1] == b'\n';
                let line_end = self.text[p..].iter().position(|&b| b == b'\n');
                if at_line_start {
                    if let Some(e) = line_end {
                        hit = Some((p, p + e));
                        break;
                    }
                }
                search = p + 1;
            }
            if let Some(h) = hit {
                break h;
            }
            from = self.text.len().saturating_sub(done.len() + 1);
            self.read_more(deadline, &format!("the end of `{cmd}`"))?;
        };
        let (start, end) = marker_at;
        let status_text = String::from_utf8_lossy(&self.text[start + done.len()..end])
            .trim()
            .to_string();
        let status = status_text.parse::<i32>().map_err(|_| {
            Error::Console(format!("unexpected status {status_text:?} after `{cmd}`"))
        })?;
        let before = &self.text[..start];
        // Output starts after the echoed command line when the terminal echoes.
        let out_start = find(before, echoed.as_bytes(), 0)
            .and_then(|p| {
                before[p..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|e| p + e + 1)
            })
            .unwrap_or(0);
        let output = String::from_utf8_lossy(&before[out_start..]).into_owned();
        let consumed = (end + 1).min(self.text.len());
        self.text.drain(..consumed);
        Ok((status, output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_removed_across_chunks() {
        let mut st = Escape::default();
        let mut out = Vec::new();
        clean_into(&mut st, b"/ # \x1b[6", &mut out);
        clean_into(&mut st, b"nls\r\n\x1b]0;title\x07ok\x1bc\n", &mut out);
        assert_eq!(out, b"/ # ls\nok\n");
    }

    #[test]
    fn find_from_offset() {
        assert_eq!(find(b"abcabc", b"abc", 1), Some(3));
        assert_eq!(find(b"abc", b"zz", 0), None);
        assert_eq!(find(b"abc", b"a", 9), None);
    }
}
