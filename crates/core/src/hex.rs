//! Serde helpers that write 64-bit addresses and register values as `"0x…"` strings.
//!
//! JSON numbers above 2^53 lose their low bits in JavaScript and in jq before 1.7, which is what
//! Debian 12 ships: a kernel address printed as a number would silently change in a user's
//! script. Deserialisation accepts both the string and a plain number.

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};
use std::fmt;

/// Serialise a `u64` as `"0x…"`.
pub fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&format_args!("{value:#x}"))
}

/// Deserialise a `u64` from `"0x…"`, a decimal string, or a number.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(HexVisitor)
}

struct HexVisitor;

impl Visitor<'_> for HexVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a 64-bit value as \"0x…\" or a number")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        Ok(value)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        u64::try_from(value).map_err(|_| E::custom(format!("{value} is negative")))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
        let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse::<u64>(),
        };
        parsed.map_err(|e| E::custom(format!("{text:?} is not a 64-bit value: {e}")))
    }
}

/// The same for `Option<u64>` (`null` when absent).
pub mod option {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialise `Some(v)` as `"0x…"`, `None` as `null`.
    pub fn serialize<S: Serializer>(value: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => super::serialize(v, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// Deserialise `null`, `"0x…"` or a number.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super")] u64);
        Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|Wrapped(v)| v))
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Sample {
        #[serde(with = "crate::hex")]
        address: u64,
        #[serde(with = "crate::hex::option")]
        maybe: Option<u64>,
    }

    #[test]
    fn round_trips_and_accepts_numbers() {
        let sample = Sample {
            address: 0xffff_ffff_8100_0000,
            maybe: None,
        };
        let text = serde_json::to_string(&sample).unwrap();
        assert_eq!(text, r#"{"address":"0xffffffff81000000","maybe":null}"#);
        assert_eq!(serde_json::from_str::<Sample>(&text).unwrap(), sample);
        let from_numbers: Sample =
            serde_json::from_str(r#"{"address":4096,"maybe":"0x10"}"#).unwrap();
        assert_eq!(from_numbers.address, 4096);
        assert_eq!(from_numbers.maybe, Some(16));
        assert!(serde_json::from_str::<Sample>(r#"{"address":"0xzz","maybe":null}"#).is_err());
        assert!(serde_json::from_str::<Sample>(r#"{"address":-1,"maybe":null}"#).is_err());
    }
}
