//! How sizes and durations read, in every command's output and every flag that takes one, so
//! cachectl, cache-worker and cache-coordinator agree.

/// `1536` → `1.5 KiB`; below 1 KiB, whole bytes.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// A duration as flags take it: `0`, or a count with a unit, `s`, `m`, `h` or `d` (`90s`,
/// `10m`, `12h`, `7d`), in seconds.
pub fn parse_duration_seconds(text: &str) -> Result<u64, String> {
    if text == "0" {
        return Ok(0);
    }
    let bad = || format!("invalid duration {text:?}: use a number and a unit, as in 90s, 10m, 12h or 7d");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (count, unit) = text.split_at(split);
    let count: u64 = count.parse().map_err(|_| bad())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    count.checked_mul(unit).ok_or_else(bad)
}

/// A size as flags take it: `0`, a count of bytes, or a count with a binary unit, `KiB`,
/// `MiB`, `GiB` or `TiB` (`512MiB`, `10GiB`), in bytes.
pub fn parse_size_bytes(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {text:?}: use a number of bytes, or one with a unit, as in 512MiB or 10GiB");
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (count, unit) = text.split_at(split);
    let count: u64 = count.parse().map_err(|_| bad())?;
    let unit: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(bad()),
    };
    count.checked_mul(unit).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_with_binary_units() {
        assert_eq!(parse_size_bytes("0"), Ok(0));
        assert_eq!(parse_size_bytes("4096"), Ok(4096));
        assert_eq!(parse_size_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size_bytes("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size_bytes("2TiB"), Ok(2 << 40));
        for bad in ["", "MiB", "10 GiB", "10GB", "-1", "1.5GiB", "99999999999TiB"] {
            assert!(parse_size_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_take_a_unit_or_zero() {
        assert_eq!(parse_duration_seconds("0"), Ok(0));
        assert_eq!(parse_duration_seconds("90s"), Ok(90));
        assert_eq!(parse_duration_seconds("10m"), Ok(600));
        assert_eq!(parse_duration_seconds("12h"), Ok(43_200));
        assert_eq!(parse_duration_seconds("30d"), Ok(2_592_000));
        for bad in ["", "10", "m", "1.5h", "-1d", "10w", "99999999999999999999d"] {
            assert!(parse_duration_seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_read_like_a_person_wrote_them() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
