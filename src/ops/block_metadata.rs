//! `filevol client allocated` and `filevol client delta`: the two
//! SnapshotMetadata calls, read to the end of their stream.
//!
//! Every message is checked as it arrives against what the spec promises
//! (`changed_blocks::check_stream`): one capacity for the whole stream, no
//! page over `max_results`, runs in strictly increasing order and apart,
//! none ending before `starting_offset`. A driver that breaks a promise
//! fails the command, so the same command tests other drivers too.

use clap::Args;
use futures_util::StreamExt;
use grpcio::{CallOption, ClientSStreamReceiver};
use protobuf::{MessageDyn, MessageFull};

use super::OpsError;
use crate::proto::csi;
use crate::proto::grpc::SnapshotMetadataClient;
use filevol_core::changed_blocks::{Run, StreamCheck};

/// Where to start and how much per message.
#[derive(Debug, Args, Clone, Copy)]
pub struct StreamArgs {
    /// Byte offset to start from (to continue an interrupted stream).
    #[arg(long, default_value_t = 0)]
    pub starting_offset: i64,
    /// Runs per message at most (0: the driver decides).
    #[arg(long, default_value_t = 0)]
    pub max_results: i32,
    /// Print one summary line (messages, runs, bytes, capacity) instead of
    /// every message.
    #[arg(long)]
    pub summary: bool,
}

/// What both responses carry.
trait Page: MessageFull {
    fn capacity(&self) -> i64;
    fn blocks(&self) -> &[csi::BlockMetadata];
}

impl Page for csi::GetMetadataAllocatedResponse {
    fn capacity(&self) -> i64 {
        self.volume_capacity_bytes
    }
    fn blocks(&self) -> &[csi::BlockMetadata] {
        &self.block_metadata
    }
}

impl Page for csi::GetMetadataDeltaResponse {
    fn capacity(&self) -> i64 {
        self.volume_capacity_bytes
    }
    fn blocks(&self) -> &[csi::BlockMetadata] {
        &self.block_metadata
    }
}

/// Totals of a stream read to its end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Messages received.
    pub messages: u64,
    /// Runs received.
    pub runs: u64,
    /// Bytes the runs cover.
    pub bytes: u64,
    /// The volume's capacity, as the stream says.
    pub capacity: u64,
}

/// GetMetadataAllocated for `snapshot_id`.
pub fn allocated(
    client: &SnapshotMetadataClient,
    opt: CallOption,
    snapshot_id: &str,
    a: StreamArgs,
    show: &mut dyn FnMut(&dyn MessageDyn) -> Result<(), OpsError>,
) -> Result<Totals, OpsError> {
    const CALL: &str = "GetMetadataAllocated";
    let mut r = csi::GetMetadataAllocatedRequest::new();
    r.snapshot_id = snapshot_id.to_owned();
    r.starting_offset = a.starting_offset;
    r.max_results = a.max_results;
    let stream = client
        .get_metadata_allocated_opt(&r, opt)
        .map_err(|source| OpsError::Rpc { call: CALL, source })?;
    read(CALL, stream, a, show)
}

/// GetMetadataDelta from `base` to `target`.
pub fn delta(
    client: &SnapshotMetadataClient,
    opt: CallOption,
    base: &str,
    target: &str,
    a: StreamArgs,
    show: &mut dyn FnMut(&dyn MessageDyn) -> Result<(), OpsError>,
) -> Result<Totals, OpsError> {
    const CALL: &str = "GetMetadataDelta";
    let mut r = csi::GetMetadataDeltaRequest::new();
    r.base_snapshot_id = base.to_owned();
    r.target_snapshot_id = target.to_owned();
    r.starting_offset = a.starting_offset;
    r.max_results = a.max_results;
    let stream = client
        .get_metadata_delta_opt(&r, opt)
        .map_err(|source| OpsError::Rpc { call: CALL, source })?;
    read(CALL, stream, a, show)
}

fn read<P: Page>(
    call: &'static str,
    mut stream: ClientSStreamReceiver<P>,
    a: StreamArgs,
    show: &mut dyn FnMut(&dyn MessageDyn) -> Result<(), OpsError>,
) -> Result<Totals, OpsError> {
    let mut totals = Totals::default();
    let per_page = match usize::try_from(a.max_results) {
        Ok(0) | Err(_) => usize::MAX,
        Ok(n) => n,
    };
    let from = u64::try_from(a.starting_offset).unwrap_or(0);
    let broken = |why: String| OpsError::Broken { call, why };
    let mut check: Option<StreamCheck> = None;
    while let Some(page) = futures_executor::block_on(stream.next()) {
        let page = page.map_err(|source| OpsError::Rpc { call, source })?;
        let capacity = u64::try_from(page.capacity())
            .map_err(|_| broken(format!("negative capacity {}", page.capacity())))?;
        if totals.messages > 0 && capacity != totals.capacity {
            return Err(broken(format!(
                "the capacity changed mid-stream from {} to {capacity}",
                totals.capacity
            )));
        }
        totals.capacity = capacity;
        totals.messages += 1;
        let runs = page
            .blocks()
            .iter()
            .map(
                |b| match (u64::try_from(b.byte_offset), u64::try_from(b.size_bytes)) {
                    (Ok(start), Ok(len)) => start
                        .checked_add(len)
                        .map(|end| Run { start, end })
                        .ok_or_else(|| broken(format!("run {start}+{len} overflows"))),
                    _ => Err(broken(format!(
                        "negative run {}+{}",
                        b.byte_offset, b.size_bytes
                    ))),
                },
            )
            .collect::<Result<Vec<Run>, _>>()?;
        check
            .get_or_insert_with(|| StreamCheck::new(from, capacity, per_page))
            .page(&runs)
            .map_err(broken)?;
        totals.runs += runs.len() as u64;
        totals.bytes += runs.iter().map(Run::len).sum::<u64>();
        if !a.summary {
            show(&page)?;
        }
    }
    Ok(totals)
}
