//! Work that may hang in the kernel, run under a deadline on a thread of
//! its own.
//!
//! A stat or read of a share that stopped answering (an NFS server gone, a
//! FUSE daemon stopped, a device suspended) sleeps in the kernel, often
//! uninterruptibly, for as long as the share is gone. Run on a worker, it
//! takes the worker with it; run under [`run`], the caller waits at most
//! the deadline and the thread is left to finish whenever the share
//! answers. Threads left behind are counted: once [`MAX_STUCK`] of them
//! are still stuck, [`run`] answers [`Outcome::TooManyStuck`] at once rather
//! than leave another, so a share that stays gone costs a bounded number
//! of threads, not one per call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Threads left in the kernel past their deadline at most.
pub const MAX_STUCK: usize = 16;

static STUCK: AtomicUsize = AtomicUsize::new(0);

/// What became of work run under a deadline.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<T> {
    /// It finished in time.
    Done(T),
    /// It did not finish in time; its thread goes on without a caller.
    TimedOut,
    /// Too many earlier calls are still stuck: it was not started.
    TooManyStuck,
    /// It panicked (the panic is in the log); its thread is gone.
    Panicked,
}

/// Threads past their deadline and still running, now.
pub fn stuck() -> usize {
    STUCK.load(Ordering::Relaxed)
}

/// Runs `work` on a thread of its own and waits at most `deadline` for it.
pub fn run<T: Send + 'static>(
    name: &str,
    deadline: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Outcome<T> {
    if stuck() >= MAX_STUCK {
        return Outcome::TooManyStuck;
    }
    // A rendezvous: a send succeeds only while the caller receives, so a
    // thread whose caller gave up always sees its send fail.
    let (tx, rx) = mpsc::sync_channel(0);
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let out = work();
            // The caller gave up: this thread was counted stuck; it is not
            // any more.
            if tx.send(out).is_err() {
                STUCK.fetch_sub(1, Ordering::Relaxed);
            }
        });
    if spawned.is_err() {
        return Outcome::TooManyStuck;
    }
    match rx.recv_timeout(deadline) {
        Ok(out) => Outcome::Done(out),
        // The sender went without sending: the work panicked. Nothing is
        // left running, so nothing is counted.
        Err(mpsc::RecvTimeoutError::Disconnected) => Outcome::Panicked,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // Counted before the receiver is dropped, so the thread's
            // decrement (which needs the send to fail) comes after it; a
            // thread that finished in between is taken back.
            STUCK.fetch_add(1, Ordering::Relaxed);
            if let Ok(out) = rx.try_recv() {
                STUCK.fetch_sub(1, Ordering::Relaxed);
                return Outcome::Done(out);
            }
            drop(rx);
            Outcome::TimedOut
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    #[test]
    fn work_in_time_answers_and_work_past_its_deadline_is_left_counted() {
        assert_eq!(run("t", Duration::from_secs(5), || 7), Outcome::Done(7));
        let release = Arc::new(Barrier::new(2));
        let held = Arc::clone(&release);
        let before = stuck();
        let out = run("t", Duration::from_millis(20), move || {
            held.wait();
        });
        assert_eq!(out, Outcome::TimedOut);
        assert!(stuck() > before);
        release.wait();
        // The thread finishes and is no longer counted.
        for _ in 0..200 {
            if stuck() == before {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the released thread is still counted stuck");
    }

    #[test]
    fn work_that_panics_is_said_and_not_counted_stuck() {
        let before = stuck();
        let out: Outcome<()> = run("t", Duration::from_secs(5), || panic!("on purpose"));
        assert_eq!(out, Outcome::Panicked);
        assert_eq!(stuck(), before);
    }
}
