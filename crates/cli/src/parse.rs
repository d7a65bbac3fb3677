//! Parsers for the numbers users type: addresses in hex or decimal, sizes with a unit suffix.

/// Parses `0xffff...`, `ffff...` with a hex letter, or plain decimal. Kernel addresses are
/// habitually written in hex without a prefix (System.map, /proc/kallsyms), so a string with a
/// hex letter and no prefix is taken as hex; a plain run of decimal digits is decimal unless it
/// is 16 digits long (the width of a printed 64-bit address).
pub fn parse_u64(text: &str) -> Result<u64, String> {
    let trimmed = text.trim().replace('_', "");
    let (digits, radix) = if let Some(hex) = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
    {
        (hex.to_string(), 16)
    } else if trimmed
        .chars()
        .any(|c| c.is_ascii_hexdigit() && !c.is_ascii_digit())
        || trimmed.len() == 16
    {
        (trimmed.clone(), 16)
    } else {
        (trimmed.clone(), 10)
    };
    if digits.is_empty() {
        return Err(format!("'{text}' is not a number"));
    }
    u64::from_str_radix(&digits, radix)
        .map_err(|e| format!("'{text}' is not a valid address or number: {e}"))
}

/// Parses a byte count: `4096`, `0x1000`, `4K`, `512M`, `2G` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (number, shift) = match trimmed.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&trimmed[..trimmed.len() - 1], 10),
        Some('M') => (&trimmed[..trimmed.len() - 1], 20),
        Some('G') => (&trimmed[..trimmed.len() - 1], 30),
        Some('T') => (&trimmed[..trimmed.len() - 1], 40),
        _ => (trimmed, 0),
    };
    let value = if number.starts_with("0x") || number.starts_with("0X") {
        parse_u64(number)?
    } else {
        number
            .parse::<u64>()
            .map_err(|e| format!("'{text}' is not a size: {e}"))?
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Parses `500ms`, `1s`, `2m`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let (number, scale_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1u64)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else {
        (t, 1000)
    };
    let value: u64 = number
        .parse()
        .map_err(|e| format!("'{text}' is not a duration (try 500ms, 1s, 2m): {e}"))?;
    value
        .checked_mul(scale_ms)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("'{text}' is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_in_the_forms_users_paste() {
        assert_eq!(parse_u64("0x10").unwrap(), 16);
        assert_eq!(
            parse_u64("ffffffff81000000").unwrap(),
            0xffff_ffff_8100_0000
        );
        assert_eq!(parse_u64("0000000000001000").unwrap(), 0x1000);
        assert_eq!(parse_u64("4096").unwrap(), 4096);
        assert_eq!(parse_u64("0xffff_ffff").unwrap(), 0xffff_ffff);
        assert!(parse_u64("0x").is_err());
        assert!(parse_u64("zz").is_err());
        assert!(parse_u64("0x1ffffffffffffffff").is_err());
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("0x100").unwrap(), 256);
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("M").is_err());
        assert_eq!(parse_duration("1s").unwrap().as_millis(), 1000);
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert!(parse_duration("soon").is_err());
    }
}
