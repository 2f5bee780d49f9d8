//! Figures from measurements: percentiles of sorted samples, and a
//! process's memory as the kernel counts it. `filevol bench` and the
//! benchmarks under `benches/` report with these, so their p50s and p99s
//! are the same statistic and can be compared.

/// The `q` quantile (0 to 1) of `sorted` by nearest rank: the sample at
/// index round((n - 1) · q), so p50 of an even count is the upper middle
/// sample and p100 the largest. `None` when there are no samples.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    // q is in [0, 1], so the rounded index is in [0, last]; `as` saturates
    // anyway and `min` keeps a q above 1 on the last sample.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let index = (last as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted.get(index.min(last)).copied()
}

/// A memory figure of process `pid` from `/proc/<pid>/status`, in KiB:
/// `VmRSS` (resident now) or `VmHWM` (the peak). `None` when the process
/// or the line is gone.
pub fn memory_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_on_both_counts_and_nothing_on_none() {
        let odd = [1, 2, 3, 4, 5];
        assert_eq!(percentile(&odd, 0.5), Some(3));
        assert_eq!(percentile(&odd, 0.0), Some(1));
        assert_eq!(percentile(&odd, 1.0), Some(5));
        let even: Vec<u32> = (0..300).collect();
        // The upper middle, as `v[v.len() / 2]` gives.
        assert_eq!(percentile(&even, 0.5), Some(150));
        assert_eq!(percentile(&even, 0.99), Some(296));
        assert_eq!(percentile(&[7.5], 0.99), Some(7.5));
        assert_eq!(percentile::<u8>(&[], 0.5), None);
        assert_eq!(percentile(&odd, 2.0), Some(5));
    }

    #[test]
    fn this_process_has_a_resident_set() {
        let pid = std::process::id();
        assert!(memory_kib(pid, "VmRSS").is_some_and(|kib| kib > 0));
        assert!(memory_kib(pid, "VmHWM").is_some());
        assert_eq!(memory_kib(pid, "NoSuchLine"), None);
    }
}
