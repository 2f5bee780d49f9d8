//! The SnapshotMetadata service on real pools: known blocks written into a
//! volume's image, snapshots taken through the driver, and the allocated and
//! changed ranges checked against a model of what was written, at the
//! filesystem's block granularity, across pages and restarts, on xfs and
//! btrfs pools; a pool without reflink; every error case of the spec.

use std::os::unix::fs::FileExt;
use std::path::Path;

use filevol::ops::requests as req;
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol::proto::grpc::SnapshotMetadataClient;
use filevol_core::changed_blocks::{check_stream, Run};
use filevol_kit::driver::{code, status, Driver, Opts};
use filevol_kit::files;
use filevol_kit::scratch::pool_on;
use futures_util::StreamExt;
use grpcio::RpcStatusCode;

use crate::BIN;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const VOLUME: u64 = 64 * MIB;

/// A stream read to its end: the capacity all its messages gave, and each
/// message's runs.
type Answer = grpcio::Result<(u64, Vec<Vec<Run>>)>;

/// A stream read to its end: its messages' runs, and the capacity they
/// all gave.
fn pages_of<R>(
    stream: grpcio::Result<grpcio::ClientSStreamReceiver<R>>,
    of: impl Fn(&R) -> (i64, csi::BlockMetadataType, Vec<Run>),
) -> Answer {
    let mut stream = stream?;
    let mut pages = Vec::new();
    let mut capacity = None;
    while let Some(msg) = futures_executor::block_on(stream.next()) {
        let (cap, kind, runs) = of(&msg?);
        assert_eq!(kind, csi::BlockMetadataType::VARIABLE_LENGTH);
        let cap = cap as u64;
        assert_eq!(
            *capacity.get_or_insert(cap),
            cap,
            "capacity changed mid-stream"
        );
        pages.push(runs);
    }
    Ok((capacity.expect("at least one message"), pages))
}

fn runs(blocks: &[csi::BlockMetadata]) -> Vec<Run> {
    blocks
        .iter()
        .map(|b| Run {
            start: b.byte_offset as u64,
            end: (b.byte_offset + b.size_bytes) as u64,
        })
        .collect()
}

fn allocated(c: &SnapshotMetadataClient, id: &str, from: i64, max: i32) -> Answer {
    let mut r = csi::GetMetadataAllocatedRequest::new();
    r.snapshot_id = id.into();
    r.starting_offset = from;
    r.max_results = max;
    pages_of(c.get_metadata_allocated(&r), |m| {
        (
            m.volume_capacity_bytes,
            m.block_metadata_type.enum_value().unwrap(),
            runs(&m.block_metadata),
        )
    })
}

fn delta(c: &SnapshotMetadataClient, base: &str, target: &str, from: i64, max: i32) -> Answer {
    let mut r = csi::GetMetadataDeltaRequest::new();
    r.base_snapshot_id = base.into();
    r.target_snapshot_id = target.into();
    r.starting_offset = from;
    r.max_results = max;
    pages_of(c.get_metadata_delta(&r), |m| {
        (
            m.volume_capacity_bytes,
            m.block_metadata_type.enum_value().unwrap(),
            runs(&m.block_metadata),
        )
    })
}

/// Byte ranges as a set of 4 KiB blocks, the finest granularity the pools
/// here allocate in.
fn blocks_of(ranges: &[(u64, u64)]) -> std::collections::BTreeSet<u64> {
    ranges
        .iter()
        .flat_map(|&(start, end)| (start / BLOCK)..end.div_ceil(BLOCK))
        .collect()
}

fn flat(pages: &[Vec<Run>]) -> Vec<(u64, u64)> {
    pages.iter().flatten().map(|r| (r.start, r.end)).collect()
}

fn block_volume(d: &Driver, name: &str, bytes: u64) -> String {
    let r = req::create_volume(name, bytes as i64, req::block_cap(Mode::SINGLE_NODE_WRITER));
    d.controller()
        .create_volume(&r)
        .unwrap()
        .volume
        .volume_id
        .clone()
}

fn snapshot(d: &Driver, name: &str, volume: &str) -> String {
    d.controller()
        .create_snapshot(&req::snapshot(name, volume))
        .unwrap()
        .snapshot
        .snapshot_id
        .clone()
}

fn write(image: &Path, at: u64, len: u64, seed: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(&vec![seed; len as usize], at).unwrap();
    f.sync_all().unwrap();
}

fn punch(image: &Path, at: u64, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        at,
        len,
    )
    .unwrap();
    f.sync_all().unwrap();
}

/// The answer for every page size and from every interesting offset must be
/// the whole answer, clipped: what a reader that restarts after an
/// interruption is promised.
fn assert_pages_and_restarts(
    whole: &[(u64, u64)],
    capacity: u64,
    read: &dyn Fn(i64, i32) -> Answer,
) {
    for max in [1, 2, 3, 0] {
        let (cap, pages) = read(0, max).unwrap();
        assert_eq!(cap, capacity);
        let per = if max == 0 { usize::MAX } else { max as usize };
        let slices: Vec<&[Run]> = pages.iter().map(Vec::as_slice).collect();
        check_stream(slices, 0, capacity, per).unwrap();
        assert_eq!(flat(&pages), whole, "max_results {max}");
    }
    let mut offsets: Vec<u64> = vec![0, BLOCK, capacity - BLOCK, capacity];
    for &(start, end) in whole {
        offsets.extend([start, start + BLOCK.min(end - start) / 2, end - 1, end]);
    }
    for from in offsets {
        let (_, pages) = read(from as i64, 2).unwrap();
        let slices: Vec<&[Run]> = pages.iter().map(Vec::as_slice).collect();
        check_stream(slices, from, capacity, 2).unwrap();
        let expected: Vec<(u64, u64)> = whole
            .iter()
            .filter(|r| r.1 > from)
            .map(|&(s, e)| (s.max(from), e))
            .collect();
        assert_eq!(flat(&pages), expected, "from {from}");
    }
}

/// The scenario of the issue on a pool of `fs`: known blocks, a snapshot,
/// an overwrite, an extension into a hole, a punched range, a snapshot.
/// The driver runs with `mode` (`all`, or `controller` as deploy/ ships it).
fn allocated_and_delta_follow_the_writes(fs: &str, mode: &str) {
    let (_fs, pool) = pool_on(fs, 512);
    let d = Driver::start_on(BIN, &pool, Opts::default().args(&["--mode", mode]));
    let c = d.snapshot_metadata();
    let vol = block_volume(&d, "cbt", VOLUME);
    let image = files::image(&pool, &vol);

    // Before: data at the start, two runs in the middle, the last block.
    let first = [
        (0, 64 * 1024),
        (MIB, MIB + 8 * BLOCK),
        (10 * MIB, 10 * MIB + 3 * BLOCK),
        (VOLUME - BLOCK, VOLUME),
    ];
    for (i, &(s, e)) in first.iter().enumerate() {
        write(&image, s, e - s, 0x10 + i as u8);
    }
    let s1 = snapshot(&d, "cbt-1", &vol);

    // After: one block rewritten in place, a new run in a hole, one block
    // of the third run punched out, one block rewritten with its own bytes
    // (still a write: it must show).
    let overwrite = (MIB + 2 * BLOCK, MIB + 3 * BLOCK);
    let extend = (20 * MIB, 20 * MIB + 32 * BLOCK);
    let punched = (10 * MIB + BLOCK, 10 * MIB + 2 * BLOCK);
    let same_bytes = (VOLUME - BLOCK, VOLUME);
    write(&image, overwrite.0, BLOCK, 0xee);
    write(&image, extend.0, extend.1 - extend.0, 0xdd);
    punch(&image, punched.0, BLOCK);
    write(&image, same_bytes.0, BLOCK, 0x13);
    let s2 = snapshot(&d, "cbt-2", &vol);

    // Allocated: exactly the written blocks, merged into runs.
    let (cap, pages) = allocated(&c, &s1, 0, 0).unwrap();
    assert_eq!(cap, VOLUME);
    let got = flat(&pages);
    assert_eq!(
        blocks_of(&got),
        blocks_of(&first),
        "{fs}: allocated of s1: {got:?}"
    );
    assert_pages_and_restarts(&got, VOLUME, &|from, max| allocated(&c, &s1, from, max));

    let mut after: Vec<(u64, u64)> = first.to_vec();
    after.push(extend);
    let mut expect_s2 = blocks_of(&after);
    expect_s2.remove(&(punched.0 / BLOCK));
    let (_, pages) = allocated(&c, &s2, 0, 0).unwrap();
    assert_eq!(blocks_of(&flat(&pages)), expect_s2, "{fs}: allocated of s2");

    // Delta: exactly what was written or punched since s1, both ways.
    let changed = [overwrite, extend, punched, same_bytes];
    let (cap, pages) = delta(&c, &s1, &s2, 0, 0).unwrap();
    assert_eq!(cap, VOLUME);
    let got = flat(&pages);
    assert_eq!(blocks_of(&got), blocks_of(&changed), "{fs}: delta: {got:?}");
    assert_pages_and_restarts(&got, VOLUME, &|from, max| delta(&c, &s1, &s2, from, max));
    let (_, back) = delta(&c, &s2, &s1, 0, 0).unwrap();
    assert_eq!(flat(&back), got, "{fs}: a delta reads the same both ways");

    // A second controller on the same pool (a standby taking over) gives
    // the same answers: they come from the pool, not from the process that
    // took the snapshots.
    let replica = Driver::start_on(BIN, &pool, Opts::default().args(&["--mode", "controller"]));
    let (_, theirs) = delta(&replica.snapshot_metadata(), &s1, &s2, 0, 0).unwrap();
    assert_eq!(flat(&theirs), got, "{fs}: the replica's delta");
    drop(replica);

    // A snapshot against itself, and two snapshots with no write between
    // them, changed nothing: one message, no runs.
    let (_, same) = delta(&c, &s2, &s2, 0, 0).unwrap();
    assert_eq!(same, vec![Vec::<Run>::new()]);
    let s3 = snapshot(&d, "cbt-3", &vol);
    let (_, none) = delta(&c, &s2, &s3, 0, 0).unwrap();
    assert!(
        flat(&none).is_empty(),
        "{fs}: no write, no change: {none:?}"
    );

    // The answers were read from the filesystem's maps: the driver read
    // nothing of the images (its whole read(2) traffic is records).
    let io = std::fs::read_to_string(format!("/proc/{}/io", d.pid())).unwrap();
    let rchar: u64 = io
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(rchar < MIB, "{fs}: the driver read {rchar} bytes");
}

#[test]
#[ignore = "needs root"]
fn allocated_and_delta_follow_the_writes_on_xfs() {
    allocated_and_delta_follow_the_writes("xfs", "all");
}

#[test]
#[ignore = "needs root"]
fn allocated_and_delta_follow_the_writes_on_btrfs() {
    allocated_and_delta_follow_the_writes("btrfs", "controller");
}

/// A volume grown between two snapshots: the grown part that holds data is
/// changed, and the capacity is the target's.
#[test]
#[ignore = "needs root"]
fn a_delta_across_an_expansion_reports_the_new_data() {
    let (_fs, pool) = pool_on("xfs", 512);
    let d = Driver::start_on(BIN, &pool, Opts::default());
    let c = d.snapshot_metadata();
    let vol = block_volume(&d, "grows", 16 * MIB);
    let image = files::image(&pool, &vol);
    write(&image, 0, BLOCK, 1);
    let s1 = snapshot(&d, "grows-1", &vol);
    d.controller()
        .controller_expand_volume(&req::expand(&vol, (32 * MIB) as i64))
        .unwrap();
    write(&image, 20 * MIB, 2 * BLOCK, 2);
    let s2 = snapshot(&d, "grows-2", &vol);
    let (cap, pages) = delta(&c, &s1, &s2, 0, 0).unwrap();
    assert_eq!(cap, 32 * MIB);
    assert_eq!(flat(&pages), vec![(20 * MIB, 20 * MIB + 2 * BLOCK)]);
}

/// Streams a reader abandons stop, and the lane they ran on serves the
/// next ones: more abandoned streams than the lane has threads, then one
/// read to the end.
#[test]
#[ignore = "needs root"]
fn an_abandoned_stream_stops_and_frees_its_lane() {
    let (_fs, pool) = pool_on("xfs", 512);
    let d = Driver::start_on(BIN, &pool, Opts::default().args(&["--log-level", "debug"]));
    let c = d.snapshot_metadata();
    let vol = block_volume(&d, "many", 64 * MIB);
    let image = files::image(&pool, &vol);
    // 2048 separate extents: 2048 one-run messages at max_results 1.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    for i in 0..2048u64 {
        f.write_all_at(&[0xab; 4096], i * 8 * BLOCK).unwrap();
    }
    f.sync_all().unwrap();
    let s = snapshot(&d, "many-1", &vol);
    for _ in 0..8 {
        let mut r = csi::GetMetadataAllocatedRequest::new();
        r.snapshot_id = s.clone();
        r.max_results = 1;
        let mut stream = c.get_metadata_allocated(&r).unwrap();
        let first = futures_executor::block_on(stream.next()).unwrap().unwrap();
        assert_eq!(first.block_metadata.len(), 1);
        drop(stream);
    }
    let (_, pages) = allocated(&c, &s, 0, 1).unwrap();
    assert_eq!(pages.len(), 2048);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !d.log().contains("outcome=CANCELLED") {
        assert!(
            std::time::Instant::now() < deadline,
            "no cancelled stream logged:\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root"]
fn spec_error_cases_answer_their_codes_and_change_nothing() {
    let (_fs, pool) = pool_on("xfs", 512);
    let d = Driver::start_on(BIN, &pool, Opts::default().args(&["--log-level", "debug"]));
    let c = d.snapshot_metadata();
    let vol = block_volume(&d, "errs", 16 * MIB);
    write(&files::image(&pool, &vol), 0, BLOCK, 7);
    let s1 = snapshot(&d, "errs-1", &vol);
    let other = block_volume(&d, "errs-other", 16 * MIB);
    let o1 = snapshot(&d, "errs-other-1", &other);
    let dir = d
        .controller()
        .create_volume(&req::create_with(
            "errs-dir",
            (16 * MIB) as i64,
            &[("layout", "dir")],
        ))
        .unwrap()
        .volume
        .volume_id
        .clone();
    let dir1 = snapshot(&d, "errs-dir-1", &dir);
    let before = tree(&pool);

    let cap = (16 * MIB) as i64;
    let cases: Vec<(&str, Answer, RpcStatusCode)> = vec![
        (
            "no snapshot id",
            allocated(&c, "", 0, 0),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
        (
            "an id that leaves its directory",
            allocated(&c, "../x", 0, 0),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
        (
            "unknown snapshot",
            allocated(&c, "snap-nope", 0, 0),
            RpcStatusCode::NOT_FOUND,
        ),
        (
            "negative offset",
            allocated(&c, &s1, -1, 0),
            RpcStatusCode::OUT_OF_RANGE,
        ),
        (
            "offset past the end",
            allocated(&c, &s1, cap + 1, 0),
            RpcStatusCode::OUT_OF_RANGE,
        ),
        (
            "negative max_results",
            allocated(&c, &s1, 0, -1),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
        (
            "a directory volume's snapshot",
            allocated(&c, &dir1, 0, 0),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
        (
            "no base",
            delta(&c, "", &s1, 0, 0),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
        (
            "no target",
            delta(&c, &s1, "", 0, 0),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
        (
            "unknown base",
            delta(&c, "snap-nope", &s1, 0, 0),
            RpcStatusCode::NOT_FOUND,
        ),
        (
            "unknown target",
            delta(&c, &s1, "snap-nope", 0, 0),
            RpcStatusCode::NOT_FOUND,
        ),
        (
            "negative offset",
            delta(&c, &s1, &s1, -5, 0),
            RpcStatusCode::OUT_OF_RANGE,
        ),
        (
            "offset past the end",
            delta(&c, &s1, &s1, cap + 4096, 0),
            RpcStatusCode::OUT_OF_RANGE,
        ),
        (
            "negative max_results",
            delta(&c, &s1, &s1, 0, -3),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
        (
            "snapshots of different volumes",
            delta(&c, &s1, &o1, 0, 0),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
        (
            "a directory volume's snapshots",
            delta(&c, &dir1, &dir1, 0, 0),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
    ];
    for (what, result, want) in cases {
        let st = status(result);
        assert_eq!(st.code(), want, "{what}: {}", st.message());
        assert!(!st.message().is_empty(), "{what}: no message");
    }
    // An offset at the end is a finished stream: one message, no runs.
    let (_, pages) = allocated(&c, &s1, cap, 0).unwrap();
    assert_eq!(pages, vec![Vec::<Run>::new()]);
    assert_eq!(tree(&pool), before, "an error changed the pool");

    // A damaged snapshot (its image cut short behind the driver's back) is
    // an internal error with the path, never a short answer.
    let snap_image = pool.join("snapshots").join(&s1).join("image");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&snap_image)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let st = status(allocated(&c, &s1, 0, 0));
    assert_eq!(st.code(), RpcStatusCode::INTERNAL, "{}", st.message());
    assert!(st.message().contains("damaged"), "{}", st.message());
    std::fs::remove_file(&snap_image).unwrap();
    let st = status(delta(&c, &s1, &s1, 0, 0));
    assert_eq!(st.code(), RpcStatusCode::INTERNAL, "{}", st.message());
}

/// Every file of the pool with its size, for "changed nothing".
fn tree(pool: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![pool.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path().display().to_string(), meta.len()));
        }
    }
    out.sort();
    out
}

/// A pool that cannot reflink: the service is not advertised, allocated
/// ranges are still answered (they need no sharing), and a delta is the
/// spec's FAILED_PRECONDITION, saying why and what to do.
#[test]
#[ignore = "needs root"]
fn without_reflink_allocated_works_and_a_delta_is_a_failed_precondition() {
    let (_fs, pool) = pool_on("ext4", 256);
    let d = Driver::start_on(BIN, &pool, Opts::default());
    let caps = d
        .identity()
        .get_plugin_capabilities(&csi::GetPluginCapabilitiesRequest::new())
        .unwrap();
    assert!(
        !caps.capabilities.iter().any(|c| c.has_service()
            && c.service().type_.enum_value()
                == Ok(csi::plugin_capability::service::Type::SNAPSHOT_METADATA_SERVICE)),
        "advertised on a pool that cannot reflink"
    );
    let c = d.snapshot_metadata();
    let vol = block_volume(&d, "plain", 16 * MIB);
    let image = files::image(&pool, &vol);
    write(&image, 4 * MIB, 2 * BLOCK, 3);
    let s1 = snapshot(&d, "plain-1", &vol);
    let s2 = snapshot(&d, "plain-2", &vol);
    let (_, pages) = allocated(&c, &s1, 0, 0).unwrap();
    assert_eq!(flat(&pages), vec![(4 * MIB, 4 * MIB + 2 * BLOCK)]);
    let st = status(delta(&c, &s1, &s2, 0, 0));
    assert_eq!(st.code(), RpcStatusCode::FAILED_PRECONDITION);
    assert!(st.message().contains("full backup"), "{}", st.message());
}

/// A node plugin serves no SnapshotMetadata: UNIMPLEMENTED with where to go.
#[test]
fn a_node_plugin_refuses_with_the_reason() {
    let d = Driver::start_with(BIN, Opts::default().args(&["--mode", "node"]));
    let st = status(allocated(&d.snapshot_metadata(), "snap-x", 0, 0));
    assert_eq!(st.code(), RpcStatusCode::UNIMPLEMENTED);
    assert!(
        st.message().contains("--mode controller"),
        "{}",
        st.message()
    );
    assert_eq!(
        code(delta(&d.snapshot_metadata(), "a", "b", 0, 0)),
        RpcStatusCode::UNIMPLEMENTED
    );
}
