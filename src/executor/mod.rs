//! Runs validated CSI calls on worker threads and answers them.
//!
//! The completion-queue thread that received a call validates it into a
//! [`Job`] and hands it to [`Executor::submit`], which never blocks: it takes
//! the job's lock keys (or answers ABORTED), queues the job on the worker pool
//! (or answers RESOURCE_EXHAUSTED), and leaves a small future on the
//! completion queue. The worker runs the job and starts the reply itself (so
//! the answer leaves without waiting for the completion-queue thread to
//! wake), and hands the reply's completion back to the completion queue over
//! a oneshot channel. The completion-queue threads never make a syscall, and
//! workers never wait on gRPC.
//!
//! Probe runs on a lane of its own (one thread, its own queue), so a pool
//! whose workers are all stuck in slow mounts still answers liveness checks.
//!
//! Server-streaming calls (SnapshotMetadata) run on a third lane: a stream
//! lasts as long as its reader takes to read it, and a slow backup client
//! must not hold the workers that stage volumes. See [`Executor::submit_stream`].

mod locks;
mod workers;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use futures_util::SinkExt;
use grpcio::{RpcContext, ServerStreamingSink, UnarySink, UnarySinkResult, WriteFlags};
use parking_lot::Mutex;

pub use locks::{LockGuard, LockTable};
pub use workers::{SubmitError, Task, WorkerPool};

use crate::error::{code_name, status_code, to_status, Error};
use crate::metrics::Metrics;
use crate::rpc::Rpc;
use filevol_core::error_chain::message_chain;
use filevol_core::faults;

/// Which threads run a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// The bounded worker pool: every call but Probe.
    Workers,
    /// The probe lane, which a saturated worker pool cannot block.
    Probe,
}

/// A validated call, ready to run: the blocking work and what it must hold.
pub struct Job<R> {
    keys: Vec<String>,
    subject: String,
    lane: Lane,
    work: Box<dyn FnOnce() -> Result<R, Error> + Send + 'static>,
}

impl<R> std::fmt::Debug for Job<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("keys", &self.keys)
            .field("subject", &self.subject)
            .field("lane", &self.lane)
            .finish_non_exhaustive()
    }
}

impl<R> Job<R> {
    /// A job that runs `work` on a worker and holds no lock.
    pub fn new(work: impl FnOnce() -> Result<R, Error> + Send + 'static) -> Self {
        Job {
            keys: Vec::new(),
            subject: String::new(),
            lane: Lane::Workers,
            work: Box::new(work),
        }
    }

    /// Serialises this job with every other job naming `key`. The first key
    /// also becomes the job's subject in its log line.
    pub fn locking(mut self, key: impl Into<String>) -> Self {
        let key = key.into();
        if self.subject.is_empty() {
            self.subject.clone_from(&key);
        }
        self.keys.push(key);
        self
    }

    /// Names what the job works on in its log line, for a job that locks
    /// nothing.
    pub fn about(mut self, subject: impl Into<String>) -> Self {
        self.subject = subject.into();
        self
    }

    /// Runs the job on `lane` instead of the worker pool.
    pub fn on_lane(mut self, lane: Lane) -> Self {
        self.lane = lane;
        self
    }
}

/// The worker pool, the probe lane, the lock table, and the call metrics
/// they feed.
#[derive(Debug)]
pub struct Executor {
    workers: WorkerPool,
    probe: WorkerPool,
    /// Only in processes that serve SnapshotMetadata: a node plugin
    /// starts no threads it would never use.
    streams: Option<WorkerPool>,
    locks: Arc<LockTable>,
    metrics: Arc<Metrics>,
}

/// How many probes may wait behind a stuck one before new ones are refused.
const PROBE_QUEUE_DEPTH: usize = 16;

/// Streams answered at once, and how many more may wait. A backup tool
/// reads one snapshot's metadata at a time per volume; beyond this the
/// caller hears RESOURCE_EXHAUSTED and retries, and the worker pool is
/// never touched.
const STREAM_WORKERS: usize = 4;
const STREAM_QUEUE_DEPTH: usize = 16;

/// The answer of a streaming call: its messages, each computed on the
/// stream lane after the one before it has been handed to gRPC, so at most
/// two are in memory whatever the stream's length.
pub type Messages<R> = Box<dyn Iterator<Item = Result<R, Error>> + Send>;

impl Executor {
    /// Starts `workers` worker threads behind a queue of `queue_depth`, the
    /// probe lane, and the stream lane if `streams`.
    pub fn start(workers: usize, queue_depth: usize, streams: bool) -> std::io::Result<Self> {
        Ok(Executor {
            workers: WorkerPool::start("filevol-worker", workers, queue_depth)?,
            probe: WorkerPool::start("filevol-probe", 1, PROBE_QUEUE_DEPTH)?,
            streams: streams
                .then(|| WorkerPool::start("filevol-stream", STREAM_WORKERS, STREAM_QUEUE_DEPTH))
                .transpose()?,
            locks: Arc::new(LockTable::default()),
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// Counts and latencies of the calls answered so far.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The worker pool, for health checks and metrics.
    pub fn workers(&self) -> &WorkerPool {
        &self.workers
    }

    /// Runs `job` (or reports why it could not be built) and answers `sink`.
    /// Never blocks the calling completion-queue thread.
    pub fn submit<R: Send + 'static>(
        &self,
        ctx: &RpcContext<'_>,
        rpc: Rpc,
        sink: UnarySink<R>,
        job: Result<Job<R>, Error>,
    ) {
        let started = Instant::now();
        let job = match job {
            Ok(job) => job,
            Err(err) => return reject(ctx, rpc, "", sink, err, started, &self.metrics),
        };
        let guard = match self.locks.try_lock(job.keys) {
            Ok(guard) => guard,
            Err(key) => {
                let busy = Error::Busy { key };
                return reject(ctx, rpc, &job.subject, sink, busy, started, &self.metrics);
            }
        };

        // The worker answers the call itself: starting the reply batch on
        // the worker sends the response at once instead of first waking the
        // completion-queue thread. The batch's completion is then awaited on
        // the completion queue (dropping it would cancel the call), so the
        // worker does not wait for it either. The sink sits in a slot so that
        // a refused task can give it back for the refusal.
        let slot = Arc::new(Mutex::new(Some(sink)));
        let (tx, rx) = futures_channel::oneshot::channel::<UnarySinkResult>();
        let subject = job.subject;
        let work = job.work;
        let task_slot = Arc::clone(&slot);
        let metrics = Arc::clone(&self.metrics);
        let task: Task = Box::new(move || {
            let result = catch_unwind(AssertUnwindSafe(|| {
                faults::before_work(rpc);
                work()
            }))
            .unwrap_or_else(|panic| Err(Error::Panicked(panic_message(&panic))));
            // Release the volume before answering, so a caller that retries
            // as soon as it hears back does not find its own call still
            // holding the lock.
            drop(guard);
            finish(rpc, &subject, result.as_ref().err(), started, &metrics);
            if let Some(sink) = task_slot.lock().take() {
                // The receiver is gone only if the server was torn down.
                let _ = tx.send(start_reply(rpc, sink, result));
            }
        });

        let pool = match job.lane {
            Lane::Workers => &self.workers,
            Lane::Probe => &self.probe,
        };
        match pool.try_submit(task) {
            Ok(()) => ctx.spawn(async move {
                if let Ok(sending) = rx.await {
                    log_undelivered(rpc, sending.await);
                }
            }),
            Err(refused) => {
                let err = match refused {
                    SubmitError::Full(_) => Error::QueueFull {
                        queued: pool.queued(),
                    },
                    SubmitError::Closed(_) => Error::ShuttingDown,
                };
                // Dropping the unrun task releases its lock guard.
                drop(refused);
                let sink = slot.lock().take().expect("an unrun task leaves its sink");
                reject(ctx, rpc, "", sink, err, started, &self.metrics);
            }
        }
    }

    /// Runs a streaming `job` on the stream lane: the job opens what it
    /// reads and returns the stream's messages; each is sent before the
    /// next is computed.
    ///
    /// The lane thread drives the sink itself (`block_on`): `feed` waits
    /// for the previous message to leave and starts this one, so memory is
    /// bounded by two messages and the thread waits at the reader's pace.
    /// A reader that goes away (cancellation, deadline, a closed
    /// connection) fails the next `feed`, and the stream stops there and
    /// then; the open files go with it. Errors before the first message or
    /// between messages end the stream with their status, as the spec asks
    /// ("abort transmission ... with its language specific error idiom").
    pub fn submit_stream<R: Send + 'static>(
        &self,
        ctx: &RpcContext<'_>,
        rpc: Rpc,
        sink: ServerStreamingSink<R>,
        job: Result<Job<Messages<R>>, Error>,
    ) {
        let started = Instant::now();
        let reject = |sink, err| reject_stream(ctx, rpc, sink, err, started, &self.metrics);
        let job = match job {
            Ok(job) => job,
            Err(err) => return reject(sink, err),
        };
        // Refused above already in a process whose mode serves no
        // SnapshotMetadata (`Driver::refusal`); this is the backstop.
        let Some(lane) = &self.streams else {
            let reason = "this process runs no stream lane (its mode serves no SnapshotMetadata)";
            return reject(
                sink,
                Error::NotServed {
                    rpc,
                    reason: reason.into(),
                },
            );
        };
        let guard = match self.locks.try_lock(job.keys) {
            Ok(guard) => guard,
            Err(key) => return reject(sink, Error::Busy { key }),
        };
        let slot = Arc::new(Mutex::new(Some(sink)));
        let task_slot = Arc::clone(&slot);
        let metrics = Arc::clone(&self.metrics);
        let (subject, work) = (job.subject, job.work);
        let task: Task = Box::new(move || {
            let Some(mut sink) = task_slot.lock().take() else {
                return;
            };
            let result = catch_unwind(AssertUnwindSafe(|| -> Result<(), Error> {
                faults::before_work(rpc);
                for message in work()? {
                    futures_executor::block_on(sink.feed((message?, WriteFlags::default())))
                        .map_err(|e| Error::ReaderGone(e.to_string()))?;
                }
                Ok(())
            }))
            .unwrap_or_else(|panic| Err(Error::Panicked(panic_message(&panic))));
            drop(guard);
            finish(rpc, &subject, result.as_ref().err(), started, &metrics);
            let ended = match result {
                Ok(()) => futures_executor::block_on(sink.close()),
                // Nobody is left to tell; dropping the sink cancels the call.
                Err(Error::ReaderGone(_)) => Ok(()),
                Err(err) => futures_executor::block_on(sink.fail(to_status(rpc, &err))),
            };
            log_undelivered(rpc, ended);
        });
        if let Err(refused) = lane.try_submit(task) {
            let err = match refused {
                SubmitError::Full(_) => Error::QueueFull {
                    queued: lane.queued(),
                },
                SubmitError::Closed(_) => Error::ShuttingDown,
            };
            // Dropping the unrun task releases its lock guard.
            drop(refused);
            reject(
                slot.lock().take().expect("an unrun task leaves its sink"),
                err,
            );
        }
    }

    /// Stops taking jobs, finishes those queued, and joins every thread.
    pub fn shutdown(&self) {
        self.workers.shutdown();
        self.probe.shutdown();
        if let Some(streams) = &self.streams {
            streams.shutdown();
        }
    }
}

/// Answers a streaming call that never reached the stream lane.
fn reject_stream<R>(
    ctx: &RpcContext<'_>,
    rpc: Rpc,
    sink: ServerStreamingSink<R>,
    err: Error,
    started: Instant,
    metrics: &Metrics,
) {
    finish(rpc, "", Some(&err), started, metrics);
    let failing = sink.fail(to_status(rpc, &err));
    ctx.spawn(async move { log_undelivered(rpc, failing.await) });
}

/// Answers a call that never reached a worker.
fn reject<R: Send + 'static>(
    ctx: &RpcContext<'_>,
    rpc: Rpc,
    subject: &str,
    sink: UnarySink<R>,
    err: Error,
    started: Instant,
    metrics: &Metrics,
) {
    finish(rpc, subject, Some(&err), started, metrics);
    let sending = start_reply(rpc, sink, Err(err));
    ctx.spawn(async move { log_undelivered(rpc, sending.await) });
}

/// Starts sending the answer; the returned future completes when it is
/// sent and must be driven (dropping it cancels the call).
fn start_reply<R>(rpc: Rpc, sink: UnarySink<R>, result: Result<R, Error>) -> UnarySinkResult {
    match result {
        Ok(resp) => sink.success(resp),
        Err(err) => sink.fail(to_status(rpc, &err)),
    }
}

fn log_undelivered(rpc: Rpc, sent: grpcio::Result<()>) {
    if let Err(e) = sent {
        // The client went away or the call was cancelled at shutdown; the
        // work itself is done and logged.
        log::debug!("{rpc}: reply not delivered: {e}");
    }
}

/// Where every call ends, answered by a worker or refused before one: its
/// metrics and its log line.
fn finish(rpc: Rpc, subject: &str, err: Option<&Error>, started: Instant, metrics: &Metrics) {
    let code = err.map_or(grpcio::RpcStatusCode::OK, |e| status_code(rpc, e));
    metrics.record(rpc, code, started.elapsed());
    log_outcome(rpc, subject, err, started);
}

/// The one log line per call: info for calls that change state, debug for
/// the rest.
fn log_outcome(rpc: Rpc, subject: &str, err: Option<&Error>, started: Instant) {
    let level = if rpc.is_mutating() {
        log::Level::Info
    } else {
        log::Level::Debug
    };
    if !log::log_enabled!(level) {
        return;
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let subject = if subject.is_empty() { "-" } else { subject };
    match err {
        None => log::log!(level, "{rpc} {subject} outcome=OK duration={ms:.2}ms"),
        Some(err) => log::log!(
            level,
            "{rpc} {subject} outcome={} duration={ms:.2}ms error=\"{}\"",
            code_name(status_code(rpc, err)),
            message_chain(err)
        ),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}
