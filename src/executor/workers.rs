//! A fixed set of named threads fed by a bounded queue.
//!
//! The bound is the back-pressure: when every worker is busy and the queue is
//! full, [`WorkerPool::try_submit`] hands the task back at once and the caller
//! answers RESOURCE_EXHAUSTED instead of letting work pile up without limit.
//! A task that panics is caught here as a last line of defence, so a bug in
//! one call never costs the pool a worker.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;

/// A unit of blocking work.
pub type Task = Box<dyn FnOnce() + Send + 'static>;

/// Why a task was not queued; the task comes back so that what it owns (its
/// locks, its reply channel) is released by the caller.
pub enum SubmitError {
    /// The queue is at its bound.
    Full(Task),
    /// The pool has been shut down.
    Closed(Task),
}

impl std::fmt::Debug for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SubmitError::Full(_) => "Full",
            SubmitError::Closed(_) => "Closed",
        })
    }
}

/// The worker threads and the sending side of their queue.
#[derive(Debug)]
pub struct WorkerPool {
    sender: Mutex<Option<Sender<Task>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    size: usize,
    alive: Arc<AtomicUsize>,
    busy: Arc<AtomicUsize>,
}

impl WorkerPool {
    /// Starts `size` threads named `{name}-{i}` behind a queue of `depth`
    /// waiting tasks (0: a task is taken only when a worker is idle).
    pub fn start(name: &str, size: usize, depth: usize) -> std::io::Result<Self> {
        assert!(size > 0, "a worker pool needs at least one worker");
        let (sender, receiver) = crossbeam_channel::bounded::<Task>(depth);
        let alive = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::with_capacity(size);
        for i in 0..size {
            let receiver = receiver.clone();
            let (thread_alive, thread_busy) = (Arc::clone(&alive), Arc::clone(&busy));
            alive.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || work_loop(receiver, thread_alive, thread_busy));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    alive.fetch_sub(1, Ordering::SeqCst);
                    // Stop the ones already started before reporting.
                    drop(sender);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(WorkerPool {
            sender: Mutex::new(Some(sender)),
            threads: Mutex::new(threads),
            size,
            alive,
            busy,
        })
    }

    /// Queues `task` without blocking.
    pub fn try_submit(&self, task: Task) -> Result<(), SubmitError> {
        let sender = self.sender.lock();
        let Some(sender) = sender.as_ref() else {
            return Err(SubmitError::Closed(task));
        };
        sender.try_send(task).map_err(|e| match e {
            TrySendError::Full(t) => SubmitError::Full(t),
            TrySendError::Disconnected(t) => SubmitError::Closed(t),
        })
    }

    /// Tasks waiting for a worker.
    pub fn queued(&self) -> usize {
        self.sender.lock().as_ref().map_or(0, |s| s.len())
    }

    /// Workers running a task right now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Workers whose thread is still running.
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }

    /// How many workers the pool was started with.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Refuses new tasks, lets the workers finish what is queued, and joins
    /// them. Idempotent.
    pub fn shutdown(&self) {
        drop(self.sender.lock().take());
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn work_loop(receiver: Receiver<Task>, alive: Arc<AtomicUsize>, busy: Arc<AtomicUsize>) {
    // Counts the worker out however the thread ends.
    struct Alive(Arc<AtomicUsize>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _alive = Alive(alive);
    while let Ok(task) = receiver.recv() {
        busy.fetch_add(1, Ordering::SeqCst);
        if catch_unwind(AssertUnwindSafe(task)).is_err() {
            log::error!("a task panicked outside its own guard; the worker carries on");
        }
        busy.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A task that blocks until the returned sender is dropped or sends.
    fn blocker() -> (Task, crossbeam_channel::Sender<()>) {
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        (
            Box::new(move || {
                let _ = rx.recv();
            }),
            tx,
        )
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("timed out waiting for {what}");
    }

    #[test]
    fn full_queue_hands_the_task_back() {
        let pool = WorkerPool::start("t-full", 1, 1).unwrap();
        let (busy_task, release_busy) = blocker();
        pool.try_submit(busy_task).unwrap();
        wait_until("the worker to pick up the task", || pool.busy() == 1);
        let (queued_task, release_queued) = blocker();
        pool.try_submit(queued_task).unwrap();
        assert_eq!(pool.queued(), 1);
        let (third, _r) = blocker();
        assert!(matches!(pool.try_submit(third), Err(SubmitError::Full(_))));
        drop(release_busy);
        drop(release_queued);
        wait_until("the queue to drain", || {
            pool.queued() == 0 && pool.busy() == 0
        });
        let (fourth, r4) = blocker();
        pool.try_submit(fourth).unwrap();
        drop(r4);
    }

    #[test]
    fn panicking_task_leaves_the_worker_alive() {
        let pool = WorkerPool::start("t-panic", 1, 4).unwrap();
        pool.try_submit(Box::new(|| panic!("deliberate test panic")))
            .unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        pool.try_submit(Box::new(move || tx.send(42).unwrap()))
            .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 42);
        assert_eq!(pool.alive(), 1);
    }

    #[test]
    fn shutdown_runs_queued_tasks_then_joins() {
        let pool = WorkerPool::start("t-stop", 2, 8).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..6 {
            let done = Arc::clone(&done);
            pool.try_submit(Box::new(move || {
                std::thread::sleep(Duration::from_millis(5));
                done.fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap();
        }
        pool.shutdown();
        assert_eq!(done.load(Ordering::SeqCst), 6);
        assert_eq!(pool.alive(), 0);
        assert!(matches!(
            pool.try_submit(Box::new(|| {})),
            Err(SubmitError::Closed(_))
        ));
    }

    #[test]
    fn threads_carry_the_pool_name() {
        let pool = WorkerPool::start("t-name", 1, 1).unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        pool.try_submit(Box::new(move || {
            tx.send(std::thread::current().name().map(str::to_owned))
                .unwrap()
        }))
        .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap().as_deref(),
            Some("t-name-0")
        );
    }
}
