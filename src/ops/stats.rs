//! Figures from measurements: percentiles of sorted samples, and a
//! process's memory and CPU time as the kernel counts them. `filevol bench` and the
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

/// CPU time of process `pid` from `/proc/<pid>/stat`, in seconds: user
/// and system time of the process and of the children it waited for (a
/// driver's forked `mkfs` or `blkid` is part of what its calls cost).
/// `None` when the process is gone.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14-17 of the line, 12-15 of
    // what follows the name (state is the first).
    let ticks: u64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(ticks as f64 / clock_ticks())
}

/// Busy CPU time of the whole machine since boot, in seconds: every CPU's
/// user, nice, system, irq, softirq and steal time from `/proc/stat`
/// (idle and iowait aside). What is left after the driver's and the load
/// generator's own time is the kernel threads (loop workers, filesystem
/// log and discard work) and anything else running.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some(busy as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
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

    #[test]
    fn cpu_time_grows_with_work() {
        let pid = std::process::id();
        let before = process_cpu_seconds(pid).unwrap();
        let machine = machine_busy_seconds().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(process_cpu_seconds(pid).unwrap() > before);
        assert!(machine_busy_seconds().unwrap() > machine);
        assert_eq!(process_cpu_seconds(u32::MAX), None);
    }
}
