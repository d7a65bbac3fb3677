//! The classic 16-bytes-a-line hex dump, addressed by the guest address the bytes came from.

use std::fmt::Write;

/// Formats `bytes` as lines of `address  hex bytes  |ascii|`.
pub fn hexdump(start: u64, bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 4 + 32);
    for (line_index, chunk) in bytes.chunks(16).enumerate() {
        let address = start.wrapping_add((line_index as u64) * 16);
        let _ = write!(out, "{address:016x}  ");
        for column in 0..16 {
            match chunk.get(column) {
                Some(b) => {
                    let _ = write!(out, "{b:02x} ");
                }
                None => out.push_str("   "),
            }
            if column == 7 {
                out.push(' ');
            }
        }
        out.push_str(" |");
        out.extend(chunk.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '.'
            }
        }));
        out.push_str("|\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::hexdump;

    #[test]
    fn partial_last_line_is_padded() {
        let text = hexdump(0xffff_ffff_8100_0000, b"Linux version 6.1\n");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ffffffff81000000  4c 69 6e 75"));
        assert!(lines[0].ends_with("|Linux version 6.|"));
        assert!(lines[1].starts_with("ffffffff81000010  31 0a "));
        assert!(lines[1].ends_with("|1.|"));
        assert_eq!(lines[0].find(" |"), lines[1].find(" |"));
    }
}
