use serde::{Deserialize, Serialize};
use std::fmt;

/// Size of the smallest x86 page.
pub const PAGE_SIZE: u64 = 4096;

macro_rules! address_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(#[serde(with = "crate::hex")] pub u64);

        impl $name {
            /// The raw address.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// `self + offset`, or `None` if that wraps past 2^64.
            pub fn checked_add(self, offset: u64) -> Option<Self> {
                self.0.checked_add(offset).map(Self)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl From<u64> for $name {
            fn from(raw: u64) -> Self {
                Self(raw)
            }
        }
    };
}

address_newtype!(
    /// A guest-physical address.
    Gpa
);
address_newtype!(
    /// A guest-virtual (linear) address.
    Gva
);
address_newtype!(
    /// A guest-physical frame number (a guest-physical address divided by 4 KiB).
    Gfn
);

impl Gpa {
    /// The 4 KiB frame that holds this address.
    pub const fn frame(self) -> Gfn {
        Gfn(self.0 / PAGE_SIZE)
    }
}

impl Gfn {
    /// The first address of this frame, or `None` for frame numbers beyond 2^52.
    pub fn start(self) -> Option<Gpa> {
        self.0.checked_mul(PAGE_SIZE).map(Gpa)
    }
}

/// A half-open range `start..end` of guest-physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhysRange {
    /// First address in the range.
    pub start: Gpa,
    /// First address past the range.
    pub end: Gpa,
}

impl PhysRange {
    /// A range from its first address and length; `None` if it would wrap.
    pub fn from_start_len(start: Gpa, len: u64) -> Option<Self> {
        start.checked_add(len).map(|end| Self { start, end })
    }

    /// Length in bytes (zero for an inverted range).
    pub fn len(&self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }

    /// True when the range holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `gpa..gpa+len` lies entirely inside this range.
    pub fn contains_span(&self, gpa: Gpa, len: u64) -> bool {
        match gpa.0.checked_add(len) {
            Some(end) => gpa.0 >= self.start.0 && end <= self.end.0,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_checks_do_not_wrap() {
        let r = PhysRange::from_start_len(Gpa(0x1000), 0x1000).unwrap();
        assert!(r.contains_span(Gpa(0x1000), 0x1000));
        assert!(!r.contains_span(Gpa(0x1000), 0x1001));
        assert!(!r.contains_span(Gpa(u64::MAX), 2));
        assert!(PhysRange::from_start_len(Gpa(u64::MAX), 2).is_none());
        assert_eq!(Gpa(0x2fff).frame(), Gfn(2));
        assert_eq!(Gfn(u64::MAX).start(), None);
    }
}
