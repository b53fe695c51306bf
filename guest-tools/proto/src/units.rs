//! The one size and duration syntax of every daxvisor command line (`daxvisor run`, `daxvisor-ctl`,
//! `daxvisor-agent`), and the human form sizes are printed in.
//!
//! It lives here because this crate is the one place the VMM and the guest agent both depend on without
//! crossing the crate walls, and it stays `no_std` and allocation-free like the rest of the crate.
//!
//! Sizes: a decimal or `0x` hexadecimal count, then an optional binary suffix: `K`, `M`, `G`, `T` (any case),
//! `KiB`, `MiB`, `GiB`, `TiB`, or `B`. All suffixes are powers of 1024: `64M` = `64MiB` = 67108864.
//! Durations: a decimal count with `ms` or `s`; a bare count is milliseconds.

use core::fmt;

/// A size or duration that does not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitError {
    /// Nothing given.
    Empty,
    /// The number part is not a decimal or `0x` hexadecimal count.
    BadNumber,
    /// The suffix is not one this syntax knows.
    BadSuffix,
    /// The value does not fit in 64 bits.
    TooLarge,
}

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnitError::Empty => "empty value",
            UnitError::BadNumber => "not a number",
            UnitError::BadSuffix => "unknown unit",
            UnitError::TooLarge => "too large",
        })
    }
}

/// What a size looks like, for error messages.
pub const SIZE_SYNTAX: &str =
    "a byte count, decimal or 0x hex, with an optional K, M, G, T (or KiB, MiB, GiB, TiB) suffix, e.g. 64M";
/// What a duration looks like, for error messages.
pub const DURATION_SYNTAX: &str = "a count with ms or s, e.g. 500ms or 2s (a bare count is ms)";

/// Split `s` into its leading number (decimal or `0x` hex) and the rest.
fn number(s: &str) -> Result<(u64, &str), UnitError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(UnitError::Empty);
    }
    let (digits, radix, rest) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => {
            let end = hex
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(hex.len());
            (&hex[..end], 16, &hex[end..])
        }
        None => {
            let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            (&s[..end], 10, &s[end..])
        }
    };
    if digits.is_empty() {
        return Err(UnitError::BadNumber);
    }
    let n = u64::from_str_radix(digits, radix).map_err(|_| UnitError::TooLarge)?;
    Ok((n, rest.trim_start()))
}

/// Bytes: `4096`, `0x200000`, `64M`, `2MiB`, `1G`, `1T`.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let (n, suffix) = number(s)?;
    let shift = match suffix.as_bytes() {
        [] | [b'B' | b'b'] => 0,
        [unit] | [unit, b'B' | b'b'] | [unit, b'i' | b'I', b'B' | b'b'] => {
            match unit.to_ascii_lowercase() {
                b'k' => 10,
                b'm' => 20,
                b'g' => 30,
                b't' => 40,
                _ => return Err(UnitError::BadSuffix),
            }
        }
        _ => return Err(UnitError::BadSuffix),
    };
    n.checked_mul(1u64 << shift).ok_or(UnitError::TooLarge)
}

/// Milliseconds: `500ms`, `2s`, `500` (ms).
pub fn parse_duration_ms(s: &str) -> Result<u64, UnitError> {
    let (n, suffix) = number(s)?;
    let mult = match suffix {
        "" | "ms" => 1,
        "s" => 1000,
        _ => return Err(UnitError::BadSuffix),
    };
    n.checked_mul(mult).ok_or(UnitError::TooLarge)
}

/// Bytes in the largest binary unit that keeps them readable (`64 MiB`, `1.5 GiB`, `512 B`); exact when the
/// count is a whole number of that unit, one decimal otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut unit = 0;
        while unit + 1 < UNITS.len() && self.0 >= 1u64 << (10 * (unit + 1)) {
            unit += 1;
        }
        let div = 1u64 << (10 * unit);
        let (whole, rest) = (self.0 / div, self.0 % div);
        if rest == 0 {
            write!(f, "{whole} {}", UNITS[unit])
        } else {
            // One decimal, rounded down so a size is never shown larger than it is.
            let tenth = (u128::from(rest) * 10 / u128::from(div)) as u64;
            write!(f, "{whole}.{tenth} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn sizes_take_every_documented_spelling() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("2K"), Ok(2048));
        assert_eq!(parse_size("0x200000"), Ok(2 << 20));
        assert_eq!(parse_size("0x2M"), Ok(2 << 20));
        assert_eq!(parse_size("12B"), Ok(12));
        assert_eq!(parse_size(" 1G "), Ok(1 << 30));
    }

    #[test]
    fn bad_sizes_say_why() {
        assert_eq!(parse_size(""), Err(UnitError::Empty));
        assert_eq!(parse_size("M"), Err(UnitError::BadNumber));
        assert_eq!(parse_size("-1"), Err(UnitError::BadNumber));
        assert_eq!(parse_size("12X"), Err(UnitError::BadSuffix));
        assert_eq!(parse_size("1Mi"), Err(UnitError::BadSuffix));
        assert_eq!(parse_size("99999999999T"), Err(UnitError::TooLarge));
        assert_eq!(parse_size("99999999999999999999"), Err(UnitError::TooLarge));
    }

    #[test]
    fn durations_take_ms_and_s() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("2s"), Ok(2000));
        assert_eq!(parse_duration_ms("250"), Ok(250));
        assert_eq!(parse_duration_ms("1m"), Err(UnitError::BadSuffix));
        assert_eq!(parse_duration_ms(""), Err(UnitError::Empty));
    }

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(HumanBytes(0).to_string(), "0 B");
        assert_eq!(HumanBytes(512).to_string(), "512 B");
        assert_eq!(HumanBytes(64 << 20).to_string(), "64 MiB");
        assert_eq!(HumanBytes(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(HumanBytes((1 << 20) + 1).to_string(), "1.0 MiB");
        assert_eq!(HumanBytes(1 << 40).to_string(), "1 TiB");
    }
}
