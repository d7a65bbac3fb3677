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

    /// Like [`SymbolTable::new`], with the indexes of an earlier table of the same symbols
    /// (from the profile cache). Each is checked in one linear pass and used only when it is
    /// exactly the sorted index; otherwise it is rebuilt. Sorting ~100k names costs tens of
    /// milliseconds, checking them one.
    ///
    /// Returns the table and whether both indexes were taken as given.
    pub fn with_index_hints(
        mut symbols: Vec<Symbol>,
        by_name: Vec<u32>,
        by_address: Vec<u32>,
    ) -> (Self, bool) {
        symbols.truncate(Self::MAX_SYMBOLS);
        let mut table = Self {
            symbols,
            by_name,
            by_address,
        };
        let names_ok = table.name_index_valid();
        if !names_ok {
            table.by_name = table.sorted_by_name(table.positions().collect());
        }
        let addresses_ok = table.address_index_valid();
        if !addresses_ok {
            table.by_address = table.sorted_by_address(table.located_positions().collect());
        }
        (table, names_ok && addresses_ok)
    }

    /// The name index: positions sorted by (name, position).
    pub fn name_index(&self) -> &[u32] {
        &self.by_name
    }

    /// The address index: positions of located (non-absolute) symbols sorted by
    /// (address, position).
    pub fn address_index(&self) -> &[u32] {
        &self.by_address
    }

    fn positions(&self) -> impl Iterator<Item = u32> + '_ {
        // Positions fit u32 because the table holds at most MAX_SYMBOLS < 2^32 entries.
        (0..self.symbols.len()).filter_map(|i| u32::try_from(i).ok())
    }

    fn located_positions(&self) -> impl Iterator<Item = u32> + '_ {
        self.positions()
            .filter(|&i| self.at(i).is_some_and(|s| !s.is_absolute()))
    }

    fn name_key(&self, position: u32) -> (&str, u32) {
        (self.name_at(position), position)
    }

    fn address_key(&self, position: u32) -> (u64, u32) {
        (self.at(position).map_or(0, |s| s.address), position)
    }

    /// Sorted by (name, position). The keys are distinct, so an unstable sort gives the one
    /// order; collecting the names next to the positions saves an indirection per comparison.
    fn sorted_by_name(&self, positions: Vec<u32>) -> Vec<u32> {
        let mut keyed: Vec<(&str, u32)> = positions.iter().map(|&p| self.name_key(p)).collect();
        keyed.sort_unstable();
        keyed.into_iter().map(|(_, p)| p).collect()
    }

    fn sorted_by_address(&self, positions: Vec<u32>) -> Vec<u32> {
        let mut keyed: Vec<(u64, u32)> = positions.iter().map(|&p| self.address_key(p)).collect();
        keyed.sort_unstable();
        keyed.into_iter().map(|(_, p)| p).collect()
    }

    /// Strictly increasing keys make the positions distinct; distinct in-range positions as
    /// many as the symbols are all of them.
    fn name_index_valid(&self) -> bool {
        self.by_name.len() == self.symbols.len()
            && self
                .by_name
                .iter()
                .all(|&p| usize::try_from(p).is_ok_and(|p| p < self.symbols.len()))
            && self
                .by_name
                .windows(2)
                .all(|w| self.name_key(w[0]) < self.name_key(w[1]))
    }

    fn address_index_valid(&self) -> bool {
        self.by_address.len() == self.located_positions().count()
            && self
                .by_address
                .iter()
                .all(|&p| self.at(p).is_some_and(|s| !s.is_absolute()))
            && self
                .by_address
                .windows(2)
                .all(|w| self.address_key(w[0]) < self.address_key(w[1]))
    }

    fn reindex(&mut self) {
        self.by_name = self.sorted_by_name(self.positions().collect());
        self.by_address = self.sorted_by_address(self.located_positions().collect());
    }

    /// Merges the positions from `first` on (new symbols) into both indexes: only the new ones
    /// are sorted.
    fn extend_index(&mut self, first: usize) {
        let fresh: Vec<u32> = self.positions().skip(first).collect();
        let fresh_located: Vec<u32> = fresh
            .iter()
            .copied()
            .filter(|&i| self.at(i).is_some_and(|s| !s.is_absolute()))
            .collect();
        let fresh = self.sorted_by_name(fresh);
        let fresh_located = self.sorted_by_address(fresh_located);
        let by_name = std::mem::take(&mut self.by_name);
        self.by_name = merge_sorted(&by_name, &fresh, |p| self.name_key(p));
        let by_address = std::mem::take(&mut self.by_address);
        self.by_address = merge_sorted(&by_address, &fresh_located, |p| self.address_key(p));
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
        // Aliases are few: walking them beats a second search over every name.
        let after = self.by_name.get(start..).unwrap_or_default();
        let aliases = after
            .iter()
            .take_while(|&&p| self.name_at(p) == name)
            .count();
        after
            .get(..aliases)
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
        let first = self.symbols.len();
        self.symbols.extend(more.into_iter().take(room));
        self.extend_index(first);
    }

    /// The symbols, giving up the indexes.
    pub fn into_vec(self) -> Vec<Symbol> {
        self.symbols
    }
}

/// Two index runs, each sorted by `key`, as one sorted run.
fn merge_sorted<K: Ord>(a: &[u32], b: &[u32], key: impl Fn(u32) -> K) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while let (Some(&x), Some(&y)) = (a.get(i), b.get(j)) {
        if key(y) < key(x) {
            out.push(y);
            j += 1;
        } else {
            out.push(x);
            i += 1;
        }
    }
    out.extend_from_slice(a.get(i..).unwrap_or_default());
    out.extend_from_slice(b.get(j..).unwrap_or_default());
    out
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

    #[test]
    fn merging_keeps_both_indexes_sorted() {
        let mut merged = table();
        let more = vec![
            Symbol::new("aaa", 0xffff_ffff_c000_0000, 't'),
            Symbol::new("helper", 0xffff_ffff_8100_0100, 't'),
            Symbol::new("zzz", 0x10, 'A'),
            Symbol::new("mid", 0xffff_ffff_8100_0150, 'T'),
        ];
        merged.merge(more.clone());
        let mut all = table().into_vec();
        all.extend(more);
        let rebuilt = SymbolTable::new(all);
        assert_eq!(merged.name_index(), rebuilt.name_index());
        assert_eq!(merged.address_index(), rebuilt.address_index());
        assert_eq!(
            merged.describe(0xffff_ffff_8100_0160).as_deref(),
            Some("mid+0x10")
        );
    }

    #[test]
    fn index_hints_are_checked_before_use() {
        let t = table();
        let (by_name, by_address) = (t.name_index().to_vec(), t.address_index().to_vec());
        let symbols = t.clone().into_vec();
        let (hinted, used) =
            SymbolTable::with_index_hints(symbols.clone(), by_name.clone(), by_address.clone());
        assert!(used);
        assert_eq!(hinted.name_index(), t.name_index());

        let mut swapped = by_name.clone();
        swapped.swap(0, 1);
        let mut duplicated = by_name.clone();
        duplicated[1] = duplicated[0];
        let mut out_of_range = by_name.clone();
        out_of_range[2] = 99;
        let mut with_absolute = by_address.clone();
        with_absolute[0] = 0; // fixed_percpu_data, an absolute symbol
        let bad: [(Vec<u32>, Vec<u32>); 6] = [
            (swapped, by_address.clone()),
            (duplicated, by_address.clone()),
            (out_of_range, by_address.clone()),
            (by_name[1..].to_vec(), by_address.clone()),
            (by_name.clone(), with_absolute),
            (by_name.clone(), Vec::new()),
        ];
        for (names, addresses) in bad {
            let (rebuilt, used) = SymbolTable::with_index_hints(symbols.clone(), names, addresses);
            assert!(!used);
            assert_eq!(rebuilt.name_index(), t.name_index());
            assert_eq!(rebuilt.address_index(), t.address_index());
        }
    }
}
