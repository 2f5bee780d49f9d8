//! Sizes as people write them: `512`, `64Mi`, `2Gi`. Used by flags, the
//! ephemeral volume `size` attribute and the tools.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64Mi").unwrap(), 64 << 20);
        assert_eq!(parse_size("2Ti").unwrap(), 2 << 40);
        assert!(parse_size("1.5Gi").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }
}
