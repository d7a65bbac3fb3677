//! A kernel symbol table with lookups in both directions.

use std::cmp::Ordering;
use std::sync::Arc;

use serde::{Serialize, Serializer};

/// One symbol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Symbol {
    /// The name, without the type letter.
    pub name: String,
    /// Its address (kernel virtual; per-CPU symbols hold their offset in the per-CPU area).
    pub address: u64,
    /// The `nm`-style type letter: `T`/`t` text, `D`/`d` data, `R`/`r` read-only data, `B`/`b`
    /// bss, `A` absolute (per-CPU offsets on x86-64), ...
    pub kind: char,
    /// The module that owns the symbol, `None` for the kernel image.
    #[serde(serialize_with = "serialize_module")]
    pub module: Option<Arc<str>>,
}

fn serialize_module<S: Serializer>(module: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    module.as_deref().serialize(s)
}

impl Symbol {
    /// A kernel-image symbol.
    pub fn new(name: impl Into<String>, address: u64, kind: char) -> Self {
        Self {
            name: name.into(),
            address,
            kind,
            module: None,
        }
    }

    /// Whether the address is an absolute value rather than a location (per-CPU offsets).
    /// Such symbols take no part in [`SymbolTable::addr2sym`]: their small values would claim
    /// every low address.
    pub fn is_absolute(&self) -> bool {
        matches!(self.kind, 'A' | 'a')
    }
}

/// Symbols with a name index and an address index.
///
/// Both indexes are sorted vectors of positions rather than hash maps: kernels have many
/// duplicate names (static functions), which a sorted index returns as one contiguous run, and
/// the indexes cost four bytes per symbol instead of a second copy of every name.
#[derive(Clone, Debug, Default)]
pub struct SymbolTable {
    symbols: Vec<Symbol>,
    by_name: Vec<u32>,
    by_address: Vec<u32>,
}

impl SymbolTable {
    /// Most symbols a table holds (the kernel has ~100k; modules add a few thousand each).
    pub const MAX_SYMBOLS: usize = 16_000_000;

    /// Build the indexes. Symbols past [`SymbolTable::MAX_SYMBOLS`] are dropped.
    pub fn new(mut symbols: Vec<Symbol>) -> Self {
        symbols.truncate(Self::MAX_SYMBOLS);
        let mut table = Self {
            symbols,
            by_name: Vec::new(),
            by_address: Vec::new(),
        };
        table.reindex();
        table
    }

    fn reindex(&mut self) {
        // Positions fit u32 because the table holds at most MAX_SYMBOLS < 2^32 entries.
        let positions = || (0..self.symbols.len()).filter_map(|i| u32::try_from(i).ok());
        let mut by_name: Vec<u32> = positions().collect();
        by_name.sort_by(|&a, &b| self.name_at(a).cmp(self.name_at(b)).then(a.cmp(&b)));
        let mut by_address: Vec<u32> = positions()
            .filter(|&i| self.at(i).is_some_and(|s| !s.is_absolute()))
            .collect();
        by_address.sort_by_key(|&i| (self.at(i).map_or(0, |s| s.address), i));
        self.by_name = by_name;
        self.by_address = by_address;
    }

    fn at(&self, position: u32) -> Option<&Symbol> {
        self.symbols.get(usize::try_from(position).ok()?)
    }

    fn name_at(&self, position: u32) -> &str {
        self.at(position).map_or("", |s| s.name.as_str())
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// True when there are no symbols.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// Symbols in their original order (kallsyms order for a decoded table).
    pub fn iter(&self) -> std::slice::Iter<'_, Symbol> {
        self.symbols.iter()
    }

    /// All symbols as a slice.
    pub fn as_slice(&self) -> &[Symbol] {
        &self.symbols
    }

    /// Every symbol called `name`, in original order.
    pub fn lookup_all<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s Symbol> + 's {
        let start = self
            .by_name
            .partition_point(|&p| self.name_at(p).cmp(name) == Ordering::Less);
        let end = self
            .by_name
            .partition_point(|&p| self.name_at(p).cmp(name) != Ordering::Greater);
        self.by_name
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .filter_map(move |&p| self.at(p))
    }

    /// The first symbol called `name` (kernel-image symbols come before module symbols).
    pub fn lookup(&self, name: &str) -> Option<&Symbol> {
        self.lookup_all(name).next()
    }

    /// Address of the first symbol called `name`.
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.lookup(name).map(|s| s.address)
    }

    /// The symbol whose address is the greatest at or below `address`, and the offset of
    /// `address` from it. Among aliases at the same address the first in original order wins.
    /// Absolute symbols are never returned. There is no upper bound: an address far past the
    /// last symbol still resolves to it; callers that care check the offset.
    pub fn addr2sym(&self, address: u64) -> Option<(&Symbol, u64)> {
        let after = self
            .by_address
            .partition_point(|&p| self.at(p).is_some_and(|s| s.address <= address));
        let last = *self.by_address.get(after.checked_sub(1)?)?;
        let top = self.at(last)?.address;
        // Walk back to the first alias at that address.
        let first_alias = self
            .by_address
            .partition_point(|&p| self.at(p).is_some_and(|s| s.address < top));
        let symbol = self.at(*self.by_address.get(first_alias)?)?;
        Some((symbol, address - symbol.address))
    }

    /// `name+0xoff` for an address, as the kernel prints it (`%pS` without the size).
    pub fn describe(&self, address: u64) -> Option<String> {
        self.addr2sym(address).map(|(s, off)| {
            let module = s
                .module
                .as_ref()
                .map(|m| format!(" [{m}]"))
                .unwrap_or_default();
            if off == 0 {
                format!("{}{module}", s.name)
            } else {
                format!("{}+{off:#x}{module}", s.name)
            }
        })
    }

    /// Add symbols (module symbols, say) and rebuild the indexes.
    pub fn merge(&mut self, more: impl IntoIterator<Item = Symbol>) {
        let room = Self::MAX_SYMBOLS.saturating_sub(self.symbols.len());
        self.symbols.extend(more.into_iter().take(room));
        self.reindex();
    }

    /// The symbols, giving up the indexes.
    pub fn into_vec(self) -> Vec<Symbol> {
        self.symbols
    }
}

impl<'a> IntoIterator for &'a SymbolTable {
    type Item = &'a Symbol;
    type IntoIter = std::slice::Iter<'a, Symbol>;
    fn into_iter(self) -> Self::IntoIter {
        self.symbols.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SymbolTable {
        SymbolTable::new(vec![
            Symbol::new("fixed_percpu_data", 0, 'A'),
            Symbol::new("_text", 0xffff_ffff_8100_0000, 'T'),
            Symbol::new("startup_64", 0xffff_ffff_8100_0000, 'T'),
            Symbol::new("helper", 0xffff_ffff_8100_0100, 't'),
            Symbol::new("helper", 0xffff_ffff_8100_0200, 't'),
            Symbol::new("current_task", 0x1fb80, 'A'),
        ])
    }

    #[test]
    fn lookups_both_ways() {
        let t = table();
        assert_eq!(t.address_of("_text"), Some(0xffff_ffff_8100_0000));
        let helpers: Vec<u64> = t.lookup_all("helper").map(|s| s.address).collect();
        assert_eq!(helpers, [0xffff_ffff_8100_0100, 0xffff_ffff_8100_0200]);
        assert!(t.lookup("nothing").is_none());
        let (s, off) = t.addr2sym(0xffff_ffff_8100_0010).unwrap();
        assert_eq!((s.name.as_str(), off), ("_text", 0x10));
        assert_eq!(
            t.describe(0xffff_ffff_8100_0204).as_deref(),
            Some("helper+0x4")
        );
        // Absolute symbols never resolve addresses.
        assert!(t.addr2sym(0x1fb80).is_none());
        assert!(t.addr2sym(0).is_none());
    }

    #[test]
    fn merge_adds_module_symbols() {
        let mut t = table();
        let module: Arc<str> = Arc::from("hello");
        t.merge([Symbol {
            name: "hello_init".into(),
            address: 0xffff_ffff_c000_0000,
            kind: 't',
            module: Some(module),
        }]);
        assert_eq!(t.len(), 7);
        assert_eq!(
            t.describe(0xffff_ffff_c000_0008).as_deref(),
            Some("hello_init+0x8 [hello]")
        );
        assert_eq!(t.iter().count(), 7);
    }
}
