//! What a person reads: sizes in binary units (exact bytes with `--bytes`), one range notation, times as UTC
//! timestamps and durations in words, lists joined with commas. Never Rust's debug formatting.

use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use daxvisor_proto::units::HumanBytes;

/// How sizes are printed: humanised, or exact bytes (`--bytes`).
#[derive(Clone, Copy)]
pub struct Sizes {
    pub exact: bool,
}

impl Sizes {
    pub fn bytes(self, n: u64) -> String {
        if self.exact {
            n.to_string()
        } else {
            HumanBytes(n).to_string()
        }
    }
}

/// A table that fits the terminal where it can.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

/// A two-column table of fields and values, without a header.
pub fn fields(rows: Vec<(&str, String)>) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    for (k, v) in rows {
        t.add_row(vec![k.to_owned(), v]);
    }
    t
}

/// The one range notation: `[0x100000, 0x200000)`, `[0x100000, end)` for "to the end of the region".
pub fn range(offset: u64, length: u64) -> String {
    daxvisor::api::range_text(offset, length)
}

/// Owner ids as a person reads them: `owner 2, owner 5`.
pub fn owners(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "-".to_owned();
    }
    ids.iter()
        .map(|o| format!("owner {o}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Milliseconds as `850 ms`, `12.3 s`, `4 min 05 s`, `3 h 02 min`, `2 d 04 h`.
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms} ms"),
        1..=59 => format!("{:.1} s", ms as f64 / 1000.0),
        60..=3599 => format!("{} min {:02} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {:02} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC timestamp with milliseconds.
pub fn timestamp(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        at_ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(timestamp(1_796_614_781_532), "2026-12-07T03:39:41.532Z");
    }

    #[test]
    fn durations_and_sizes_read_as_words() {
        assert_eq!(duration_ms(850), "850 ms");
        assert_eq!(duration_ms(12_345), "12.3 s");
        assert_eq!(duration_ms(245_000), "4 min 05 s");
        assert_eq!(duration_ms(3 * 3_600_000 + 120_000), "3 h 02 min");
        assert_eq!(Sizes { exact: false }.bytes(8 << 30), "8 GiB");
        assert_eq!(Sizes { exact: true }.bytes(8 << 30), "8589934592");
        assert_eq!(range(0x100000, 0x100000), "[0x100000, 0x200000)");
        assert_eq!(range(0x100000, 0), "[0x100000, end)");
        assert_eq!(owners(&[2, 5]), "owner 2, owner 5");
    }
}
