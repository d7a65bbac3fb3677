//! System.map: the link-time symbol list `nm` writes, given by the user when kallsyms cannot be
//! read. Its addresses lack the KASLR slide, which is measured against one symbol whose live
//! address is known.

use crate::error::{excerpt, Error, Result};
use crate::layout::START_KERNEL_MAP;
use crate::symbols::Symbol;

/// Most lines read (a distribution kernel has ~90k; allyesconfig ~500k).
pub const MAX_LINES: usize = 4_000_000;

/// A parsed System.map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SystemMap {
    /// Symbols at their link-time addresses, in file order.
    pub symbols: Vec<Symbol>,
}

impl SystemMap {
    /// Parse `address type name` lines. Blank lines are skipped; any other malformed line
    /// fails, naming the line, because a file that is not a System.map should not silently
    /// yield a partial table.
    pub fn parse(text: &str) -> Result<Self> {
        let mut symbols = Vec::new();
        for (number, line) in text.lines().enumerate() {
            if number >= MAX_LINES {
                return Err(Error::SystemMap {
                    line: number + 1,
                    reason: "too many lines",
                    text: String::new(),
                });
            }
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            let bad = |reason| Error::SystemMap {
                line: number + 1,
                reason,
                text: excerpt(line.as_bytes(), 80),
            };
            let mut fields = line.split_whitespace();
            let (Some(address), Some(kind), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad("expected `address type name`"));
            };
            let address = u64::from_str_radix(address, 16).map_err(|_| bad("bad hex address"))?;
            let mut kind_chars = kind.chars();
            let (Some(kind), None) = (kind_chars.next(), kind_chars.next()) else {
                return Err(bad("type is not one letter"));
            };
            if name.len() > crate::kallsyms::MAX_NAME {
                return Err(bad("name too long"));
            }
            symbols.push(Symbol::new(name, address, kind));
        }
        Ok(Self { symbols })
    }

    /// Link-time address of the first symbol called `name`.
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.symbols
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.address)
    }

    /// The slide that moves `anchor` from its link-time address to `live_address`.
    pub fn slide(&self, anchor: &str, live_address: u64) -> Result<u64> {
        let linked = self.address_of(anchor).ok_or_else(|| {
            Error::SystemMapSlide(format!("the System.map has no {anchor} symbol"))
        })?;
        Ok(live_address.wrapping_sub(linked))
    }

    /// The symbols moved by `slide`. Only kernel-image addresses move: absolute symbols
    /// (per-CPU offsets and other small values) keep theirs.
    pub fn relocated(&self, slide: u64) -> Vec<Symbol> {
        self.symbols
            .iter()
            .map(|s| {
                let mut moved = s.clone();
                if s.address >= START_KERNEL_MAP && !s.is_absolute() {
                    moved.address = s.address.wrapping_add(slide);
                }
                moved
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_relocates() {
        let map = SystemMap::parse(
            "0000000000000000 D __per_cpu_start\nffffffff81000000 T _text\n\n\
             ffffffff8211ffe0 D linux_banner\n",
        )
        .unwrap();
        assert_eq!(map.symbols.len(), 3);
        let slide = map.slide("_text", 0xffff_ffff_b200_0000).unwrap();
        assert_eq!(slide, 0x3100_0000);
        let moved = map.relocated(slide);
        assert_eq!(moved[0].address, 0);
        assert_eq!(moved[2].address, 0xffff_ffff_b311_ffe0);
        assert!(map.slide("nope", 0).is_err());
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["zz T x", "ffff T", "ffff TT x", "ffff"] {
            let err = SystemMap::parse(bad).unwrap_err().to_string();
            assert!(err.contains("line 1"), "{err}");
        }
    }
}
