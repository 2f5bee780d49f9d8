//! From a sorted stream of runs to the pages of a SnapshotMetadata answer.

use super::{OutOfOrder, Run};

/// Pages of at most `per_page` runs from `runs`, which must come in order of
/// `start` (they may touch or overlap: those are merged). Runs are clipped
/// to `[from, capacity)`. A run is held back until the next one shows it
/// cannot grow, so a page never splits what one run could say.
///
/// Input out of order is an error, not a reordering: the input is a
/// filesystem's answer, and one that goes backwards cannot be trusted to
/// have said everything.
#[derive(Debug)]
pub struct Pager<I> {
    runs: I,
    from: u64,
    capacity: u64,
    per_page: usize,
    /// The run still growing.
    pending: Option<Run>,
    /// Start of the last run taken from the input, to catch disorder.
    last_start: u64,
    done: bool,
}

impl<I, E> Pager<I>
where
    I: Iterator<Item = Result<Run, E>>,
    E: From<OutOfOrder>,
{
    /// Pages over `runs` clipped to `[from, capacity)`, `per_page` (at
    /// least 1) runs each.
    pub fn new(runs: I, from: u64, capacity: u64, per_page: usize) -> Self {
        Pager {
            runs,
            from,
            capacity,
            per_page: per_page.max(1),
            pending: None,
            last_start: 0,
            done: false,
        }
    }

    /// The next input run, clipped; `None` at the end of the input.
    fn next_run(&mut self) -> Option<Result<Run, E>> {
        loop {
            let run = match self.runs.next()? {
                Ok(run) => run,
                Err(e) => return Some(Err(e)),
            };
            if run.start < self.last_start {
                return Some(Err(OutOfOrder {
                    run,
                    after: self.last_start,
                }
                .into()));
            }
            self.last_start = run.start;
            let clipped = Run {
                start: run.start.max(self.from),
                end: run.end.min(self.capacity),
            };
            if run.start >= self.capacity {
                // Sorted input: nothing further can fall inside.
                return None;
            }
            if !clipped.is_empty() {
                return Some(Ok(clipped));
            }
        }
    }
}

impl<I, E> Iterator for Pager<I>
where
    I: Iterator<Item = Result<Run, E>>,
    E: From<OutOfOrder>,
{
    type Item = Result<Vec<Run>, E>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut page = Vec::with_capacity(self.per_page.min(1024));
        loop {
            match self.next_run() {
                Some(Ok(run)) => match &mut self.pending {
                    Some(p) if run.start <= p.end => p.end = p.end.max(run.end),
                    Some(p) => {
                        page.push(*p);
                        *p = run;
                        if page.len() == self.per_page {
                            return Some(Ok(page));
                        }
                    }
                    None => self.pending = Some(run),
                },
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                None => {
                    self.done = true;
                    page.extend(self.pending.take());
                    return (!page.is_empty()).then_some(Ok(page));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::check_stream;
    use super::*;
    use std::io;

    fn pages(runs: &[(u64, u64)], from: u64, cap: u64, per: usize) -> Vec<Vec<(u64, u64)>> {
        let input = runs.iter().map(|&(start, end)| Ok(Run { start, end }));
        let out: Vec<Vec<Run>> = Pager::new(input, from, cap, per)
            .collect::<io::Result<_>>()
            .unwrap();
        let slices: Vec<&[Run]> = out.iter().map(Vec::as_slice).collect();
        check_stream(slices, from, cap, per).unwrap();
        out.iter()
            .map(|p| p.iter().map(|r| (r.start, r.end)).collect())
            .collect()
    }

    #[test]
    fn touching_and_overlapping_runs_coalesce() {
        assert_eq!(
            pages(&[(0, 10), (10, 20), (15, 18), (30, 40)], 0, 100, 10),
            vec![vec![(0, 20), (30, 40)]]
        );
    }

    #[test]
    fn clipped_to_the_starting_offset_and_the_capacity() {
        assert_eq!(
            pages(&[(0, 10), (20, 40), (90, 120), (130, 140)], 25, 100, 10),
            vec![vec![(25, 40), (90, 100)]]
        );
        // A starting offset at the capacity leaves nothing to say.
        assert!(pages(&[(0, 10)], 100, 100, 10).is_empty());
    }

    #[test]
    fn pages_hold_at_most_per_page_runs_and_never_split_a_run() {
        let runs: Vec<(u64, u64)> = (0..7).map(|i| (i * 10, i * 10 + 5)).collect();
        let got = pages(&runs, 0, 1000, 3);
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 1]);
        // A run that keeps growing across what would be a page boundary
        // stays one run.
        let got = pages(&[(0, 5), (10, 15), (15, 20), (20, 25)], 0, 100, 1);
        assert_eq!(got, vec![vec![(0, 5)], vec![(10, 25)]]);
    }

    #[test]
    fn near_the_top_of_u64() {
        let top = u64::MAX;
        assert_eq!(
            pages(&[(top - 10, top - 5), (top - 5, top)], top - 8, top, 4),
            vec![vec![(top - 8, top)]]
        );
    }

    #[test]
    fn disorder_is_an_error() {
        let input = [(10u64, 20u64), (5, 8)]
            .into_iter()
            .map(|(start, end)| Ok(Run { start, end }));
        let out: io::Result<Vec<_>> = Pager::new(input, 0, 100, 10).collect();
        assert_eq!(out.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
