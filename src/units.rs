//! Sizes and durations as people write them: `512`, `64Mi`, `2Gi`; `90s`,
//! `100m`, `1w`. Used by flags, the ephemeral volume `size` attribute and
//! the tools.

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
}
