//! Sizes and durations as people write them: `512`, `64Mi`, `2Gi`; `90s`,
//! `100m`, `1w` (flags, the ephemeral volume `size` attribute, the tools),
//! and sizes as people read them: `1.5 GiB` (the tools' tables and the
//! pool's capacity errors).

use std::time::Duration;

/// Parses a byte count with an optional binary suffix: `512`, `64Mi`, `2Gi`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = [("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40)]
        .iter()
        .find_map(|(suffix, shift)| s.strip_suffix(suffix).map(|d| (d, *shift)))
        .unwrap_or((s, 0));
    let n: u64 = digits
        .parse()
        .map_err(|e| format!("{s:?} is not a size (bytes, or a number with Ki/Mi/Gi/Ti): {e}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a duration: a whole number with a unit, `s`, `m`, `h`, `d` or
/// `w` (a bare number is seconds), as systemd timers and `sleep` write them.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, unit) = [
        ("s", 1),
        ("m", 60),
        ("h", 3600),
        ("d", 86_400),
        ("w", 604_800),
    ]
    .iter()
    .find_map(|(suffix, secs)| s.strip_suffix(suffix).map(|d| (d, *secs)))
    .unwrap_or((s, 1));
    let n: u64 = digits.parse().map_err(|e| {
        format!("{s:?} is not a duration (a whole number with s, m, h, d or w): {e}")
    })?;
    n.checked_mul(unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];

/// `bytes` in the largest binary unit it reaches: (value, index in UNITS).
fn scaled(bytes: u64) -> (f64, usize) {
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    (value, unit)
}

/// Bytes as a short human figure (binary units, one decimal): `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    match scaled(bytes) {
        (_, 0) => format!("{bytes} B"),
        (value, unit) => format!("{value:.1} {}", UNITS[unit]),
    }
}

/// Bytes to three significant digits (`1.94 GiB`, `64.0 MiB`, `201 MiB`):
/// for sums a reader checks by hand, where one decimal of a GiB would hide
/// a reserve of 64 MiB.
pub fn human_fine(bytes: u64) -> String {
    match scaled(bytes) {
        (_, 0) => format!("{bytes} B"),
        (value, unit) => {
            let decimals = if value >= 100.0 {
                0
            } else if value >= 10.0 {
                1
            } else {
                2
            };
            format!("{value:.decimals$} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("100m").unwrap(), Duration::from_secs(6000));
        assert_eq!(parse_duration("1w").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("1.5h").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999w").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64Mi").unwrap(), 64 << 20);
        assert_eq!(parse_size("2Ti").unwrap(), 2 << 40);
        assert!(parse_size("1.5Gi").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(10 << 30), "10.0 GiB");
        assert_eq!(human(1536 << 10), "1.5 MiB");
        assert_eq!(human_fine(512), "512 B");
        assert_eq!(human_fine(1984 << 20), "1.94 GiB");
        assert_eq!(human_fine(64 << 20), "64.0 MiB");
        assert_eq!(human_fine(1 << 30), "1.00 GiB");
        assert_eq!(human_fine(695 << 20), "695 MiB");
    }
}
