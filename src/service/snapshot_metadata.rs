//! The SnapshotMetadata service (CSI v1.10+, alpha): which ranges of a
//! snapshot hold data, and which changed between two snapshots of one
//! volume, streamed a page at a time on the executor's stream lane
//! (`Executor::submit_stream`).
//!
//! The answers come from the pool filesystem's metadata
//! (`filevol_core::pool::block_maps`, which decides which snapshots compare
//! and reads their maps), never from reading volume data. Both calls answer
//! VARIABLE_LENGTH runs, adjacent ones merged; this module checks the
//! request and pages the runs into messages.

use std::sync::Arc;

use super::{validate, Driver};
use crate::error::Error;
use crate::executor::{Job, Messages};
use crate::proto::csi;
use crate::rpc::Rpc;
use filevol_core::changed_blocks::{Pager, Run};
use filevol_core::pool::block_maps::BlockMap;
use filevol_core::pool::PoolError;

/// Runs per message when the caller leaves `max_results` at 0: about 14 KiB
/// on the wire.
const DEFAULT_PER_PAGE: usize = 1024;

/// The most runs one message carries whatever the caller asks: the spec
/// lets the plugin send fewer, and this bounds a message's memory (and
/// keeps it far below gRPC's 4 MiB receive limit).
const MAX_PER_PAGE: usize = 4096;

/// A SnapshotMetadata request: checked on the completion-queue thread, run
/// on the stream lane.
pub trait StreamOperation: protobuf::MessageFull + Send + 'static {
    /// The message type of the answer's stream.
    type Response: Send + 'static;
    /// Which RPC this request belongs to.
    const RPC: Rpc;
    /// Checks the request and builds its job, whose result is the stream.
    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Messages<Self::Response>>, Error>;
}

/// `starting_offset`, checked where no snapshot is needed.
fn starting_offset(offset: i64) -> Result<u64, Error> {
    u64::try_from(offset).map_err(|_| Error::OutOfRange {
        field: "starting_offset",
        reason: format!("{offset} is negative"),
    })
}

/// Runs per message for `max_results`.
fn per_page(max_results: i32) -> Result<usize, Error> {
    match usize::try_from(max_results) {
        Ok(0) => Ok(DEFAULT_PER_PAGE),
        Ok(n) => Ok(n.min(MAX_PER_PAGE)),
        Err(_) => Err(Error::invalid(
            "max_results",
            format!("{max_results} is negative"),
        )),
    }
}

/// The volume capacity the stream reports, and the starting offset checked
/// against it. An offset at the capacity is the end of a stream already
/// read: it gets an empty answer, not an error.
fn bounds(snapshot: &str, capacity: u64, from: u64) -> Result<i64, Error> {
    let wire = i64::try_from(capacity).map_err(|_| PoolError::Damaged {
        path: format!("snapshots/{snapshot}").into(),
        problem: format!("size {capacity} does not fit the CSI int64"),
    })?;
    if from > capacity {
        return Err(Error::OutOfRange {
            field: "starting_offset",
            reason: format!("{from} is past the end of snapshot {snapshot} ({capacity} bytes)"),
        });
    }
    Ok(wire)
}

/// A run as the spec's `BlockMetadata`. Runs never pass the capacity, which
/// [`bounds`] checked fits an i64.
fn block(run: Run) -> csi::BlockMetadata {
    let wire = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut b = csi::BlockMetadata::new();
    b.byte_offset = wire(run.start);
    b.size_bytes = wire(run.len());
    b
}

/// The pages of `map`'s runs as stream messages; at least one message, so
/// even a snapshot with nothing to report tells the reader its capacity.
fn messages<R>(
    map: BlockMap,
    from: u64,
    per_page: usize,
    make: impl Fn(Vec<csi::BlockMetadata>) -> R + Send + 'static,
) -> Messages<R>
where
    R: Send + 'static,
{
    let runs = map.runs.map(|r| r.map_err(Error::from));
    let mut pages = Pager::new(runs, from, map.capacity, per_page);
    let mut sent_any = false;
    Box::new(std::iter::from_fn(move || match pages.next() {
        Some(page) => {
            sent_any = true;
            Some(page.map(|runs| make(runs.into_iter().map(block).collect())))
        }
        None if !sent_any => {
            sent_any = true;
            Some(Ok(make(Vec::new())))
        }
        None => None,
    }))
}

impl StreamOperation for csi::GetMetadataAllocatedRequest {
    type Response = csi::GetMetadataAllocatedResponse;
    const RPC: Rpc = Rpc::GetMetadataAllocated;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Messages<Self::Response>>, Error> {
        validate::id("snapshot_id", &self.snapshot_id)?;
        let from = starting_offset(self.starting_offset)?;
        let per_page = per_page(self.max_results)?;
        let driver = Arc::clone(driver);
        let id = self.snapshot_id;
        let subject = format!("snapshot/{id}");
        let job = Job::new(move || {
            let map = driver.pool.allocated_blocks(&id, from)?;
            let wire = bounds(&id, map.capacity, from)?;
            Ok(messages(map, from, per_page, move |blocks| {
                let mut resp = csi::GetMetadataAllocatedResponse::new();
                resp.block_metadata_type = csi::BlockMetadataType::VARIABLE_LENGTH.into();
                resp.volume_capacity_bytes = wire;
                resp.block_metadata = blocks;
                resp
            }))
        });
        Ok(job.about(subject))
    }
}

impl StreamOperation for csi::GetMetadataDeltaRequest {
    type Response = csi::GetMetadataDeltaResponse;
    const RPC: Rpc = Rpc::GetMetadataDelta;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Messages<Self::Response>>, Error> {
        validate::id("base_snapshot_id", &self.base_snapshot_id)?;
        validate::id("target_snapshot_id", &self.target_snapshot_id)?;
        let from = starting_offset(self.starting_offset)?;
        let per_page = per_page(self.max_results)?;
        let driver = Arc::clone(driver);
        let (base_id, target_id) = (self.base_snapshot_id, self.target_snapshot_id);
        let subject = format!("snapshot/{base_id}..{target_id}");
        let job = Job::new(move || {
            let map = driver.pool.changed_blocks(&base_id, &target_id, from)?;
            let wire = bounds(&target_id, map.capacity, from)?;
            Ok(messages(map, from, per_page, move |blocks| {
                let mut resp = csi::GetMetadataDeltaResponse::new();
                resp.block_metadata_type = csi::BlockMetadataType::VARIABLE_LENGTH.into();
                resp.volume_capacity_bytes = wire;
                resp.block_metadata = blocks;
                resp
            }))
        });
        Ok(job.about(subject))
    }
}
