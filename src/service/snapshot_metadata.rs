//! The SnapshotMetadata service (CSI v1.10+, alpha): which ranges of a
//! snapshot hold data, and which changed between two snapshots of one
//! volume, streamed a page at a time on the executor's stream lane
//! (`Executor::submit_stream`).
//!
//! The answers come from the pool filesystem's metadata
//! (`filevol_core::changed_blocks`), never from reading volume data. Both calls
//! answer VARIABLE_LENGTH runs, adjacent ones merged.

use std::io;
use std::sync::Arc;

use super::{validate, Driver};
use crate::error::Error;
use crate::executor::{Job, Messages};
use crate::proto::csi;
use crate::rpc::Rpc;
use filevol_core::changed_blocks::{Delta, Pager, Run};
use filevol_core::pool::PoolError;
use filevol_core::sys::extents::{DataRanges, ExtentMap};
use filevol_core::volume::meta::{CopyMethod, SnapshotMeta};

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
fn bounds(snapshot: &SnapshotMeta, from: u64) -> Result<(u64, i64), Error> {
    let capacity = snapshot.size_bytes;
    let wire = i64::try_from(capacity).map_err(|_| PoolError::Damaged {
        path: format!("snapshots/{}", snapshot.id).into(),
        problem: format!("size {capacity} does not fit the CSI int64"),
    })?;
    if from > capacity {
        return Err(Error::OutOfRange {
            field: "starting_offset",
            reason: format!(
                "{from} is past the end of snapshot {} ({capacity} bytes)",
                snapshot.id
            ),
        });
    }
    Ok((capacity, wire))
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

/// An error of the filesystem while reading its maps.
fn read_error(what: &'static str, snapshot: String) -> impl Fn(io::Error) -> Error {
    move |e| {
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            Error::Pool(PoolError::NeedsReflink(format!(
                "the pool filesystem does not report {what} for snapshot {snapshot} ({e}); changed-block tracking needs a pool on xfs or btrfs"
            )))
        } else {
            Error::Pool(PoolError::Io {
                step: what,
                path: format!("snapshots/{snapshot}/image").into(),
                source: e,
            })
        }
    }
}

/// The pages of `runs` as stream messages; at least one message, so even a
/// snapshot with nothing to report tells the reader its capacity.
fn messages<R, I>(
    runs: I,
    from: u64,
    capacity: u64,
    per_page: usize,
    make: impl Fn(Vec<csi::BlockMetadata>) -> R + Send + 'static,
) -> Messages<R>
where
    R: Send + 'static,
    I: Iterator<Item = Result<Run, Error>> + Send + 'static,
{
    let mut pages = Pager::new(runs, from, capacity, per_page);
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
            let (snapshot, image) = driver.pool.open_snapshot_image(&id)?;
            let (capacity, wire) = bounds(&snapshot, from)?;
            let fail = read_error("data ranges", id);
            let runs = DataRanges::new(image, from, capacity)
                .map(move |r| r.map(|(start, end)| Run { start, end }).map_err(&fail));
            Ok(messages(runs, from, capacity, per_page, move |blocks| {
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
            let (base, base_image) = driver.pool.open_snapshot_image(&base_id)?;
            let (target, target_image) = driver.pool.open_snapshot_image(&target_id)?;
            comparable(&base, &target, driver.pool.root())?;
            let (capacity, wire) = bounds(&target, from)?;
            // The whole of both maps from `from` to the target's end: where
            // the base is shorter (the volume grew between the two), its
            // missing end reads as a hole, so the target's data there is
            // reported.
            let fail = read_error("extent maps", format!("{base_id} or {target_id}"));
            let runs = Delta::new(
                ExtentMap::new(base_image, from, capacity),
                ExtentMap::new(target_image, from, capacity),
                from,
                capacity,
            )
            // Which of the two maps failed is not known here; both ids are
            // in the call's log line.
            .map(move |r| r.map_err(&fail));
            Ok(messages(runs, from, capacity, per_page, move |blocks| {
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

/// Whether comparing the extent maps of `base` and `target` proves what
/// changed: two snapshots of one volume, both reflink copies of its image.
/// A byte-for-byte copy shares no block with anything, so its map would
/// report every allocated block as changed: correct, but a full backup in
/// disguise, and the spec has a code for it.
fn comparable(
    base: &SnapshotMeta,
    target: &SnapshotMeta,
    pool: &std::path::Path,
) -> Result<(), Error> {
    if base.source_volume_id != target.source_volume_id {
        return Err(PoolError::Unsupported(format!(
            "snapshots {} and {} are of different volumes ({} and {}); a delta compares two snapshots of one volume",
            base.id, target.id, base.source_volume_id, target.source_volume_id
        ))
        .into());
    }
    for s in [base, target] {
        if s.method != CopyMethod::Reflink {
            return Err(PoolError::NeedsReflink(format!(
                "snapshot {} is a byte-for-byte copy (the pool filesystem at {} could not reflink when it was taken), so it shares no blocks with other snapshots and changed-block tracking is not available for it; take a full backup (GetMetadataAllocated), or put the pool on xfs (mkfs.xfs -m reflink=1) or btrfs",
                s.id,
                pool.display()
            ))
            .into());
        }
    }
    Ok(())
}
