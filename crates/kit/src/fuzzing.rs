//! Entry points for fuzzing, shared by the cargo-fuzz targets in `fuzz/`
//! and the corpus replay test that CI runs on stable Rust. Each takes
//! arbitrary bytes and must neither panic nor touch anything outside the
//! test pool and kubelet directory it is given.

use std::path::Path;
use std::sync::Arc;

use protobuf::Message;

use filevol::config::{Config, ServeArgs};
use filevol::executor::Executor;
use filevol::proto::csi;
use filevol::service::{Driver, Operation};
use filevol_core::node::Node;
use filevol_core::pool::{Pool, PoolOptions};
use filevol_core::volume::meta::{GroupMeta, NodeRecord, SnapshotMeta, VolumeMeta};

/// A driver on `pool` with node paths under `kubelet`, for validating
/// requests; one worker thread, nothing served.
pub fn driver(pool: &Path, kubelet: &Path) -> Arc<Driver> {
    let flags = [
        "--pool",
        pool.to_str().expect("utf-8 test path"),
        "--kubelet-dir",
        kubelet.to_str().expect("utf-8 test path"),
        "--endpoint",
        "unix:///nonexistent/fuzz.sock",
        "--node-id",
        "fuzz",
        "--workers",
        "1",
    ];
    let args = ServeArgs::try_parse_from(flags).expect("the fuzzing driver's flags parse");
    let config = Config::from_args(args).expect("fuzz configuration");
    let pool = Pool::open(
        &config.pool,
        PoolOptions {
            reserve_bytes: 0,
            overcommit: 1.0,
            topology: config.topology.clone(),
            janitor: true,
        },
    )
    .expect("fuzz pool");
    let node =
        Some(Node::start(&config.kubelet_dir, &config.node_id, &pool, true).expect("fuzz node"));
    let executor = Executor::start(1, 1, false).expect("fuzz executor");
    // Not started: the fuzzed jobs are built, never run.
    let health = filevol::service::health::PoolWatch::new(pool.root(), config.health_interval);
    Arc::new(Driver {
        config,
        executor,
        pool,
        node,
        health,
    })
}

fn validate<R: Operation + Message>(driver: &Arc<Driver>, bytes: &[u8]) {
    // Undecodable bytes never reach filevol's code (gRPC answers them);
    // whatever decodes must validate without panicking. The job is built
    // but not run: validation is what faces the network.
    if let Ok(req) = R::parse_from_bytes(bytes) {
        let _ = req.prepare(driver);
    }
}

/// The first byte picks one of the 30 request types; the rest is decoded
/// as that request and handed to its validation.
pub fn request(driver: &Arc<Driver>, data: &[u8]) {
    let Some((selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 30 {
        0 => validate::<csi::GetPluginInfoRequest>(driver, bytes),
        1 => validate::<csi::GetPluginCapabilitiesRequest>(driver, bytes),
        2 => validate::<csi::ProbeRequest>(driver, bytes),
        3 => validate::<csi::CreateVolumeRequest>(driver, bytes),
        4 => validate::<csi::DeleteVolumeRequest>(driver, bytes),
        5 => validate::<csi::ControllerPublishVolumeRequest>(driver, bytes),
        6 => validate::<csi::ControllerUnpublishVolumeRequest>(driver, bytes),
        7 => validate::<csi::ValidateVolumeCapabilitiesRequest>(driver, bytes),
        8 => validate::<csi::ListVolumesRequest>(driver, bytes),
        9 => validate::<csi::GetCapacityRequest>(driver, bytes),
        10 => validate::<csi::ControllerGetCapabilitiesRequest>(driver, bytes),
        11 => validate::<csi::CreateSnapshotRequest>(driver, bytes),
        12 => validate::<csi::DeleteSnapshotRequest>(driver, bytes),
        13 => validate::<csi::ListSnapshotsRequest>(driver, bytes),
        14 => validate::<csi::GetSnapshotRequest>(driver, bytes),
        15 => validate::<csi::ControllerExpandVolumeRequest>(driver, bytes),
        16 => validate::<csi::ControllerGetVolumeRequest>(driver, bytes),
        17 => validate::<csi::ControllerModifyVolumeRequest>(driver, bytes),
        18 => validate::<csi::GroupControllerGetCapabilitiesRequest>(driver, bytes),
        19 => validate::<csi::CreateVolumeGroupSnapshotRequest>(driver, bytes),
        20 => validate::<csi::DeleteVolumeGroupSnapshotRequest>(driver, bytes),
        21 => validate::<csi::GetVolumeGroupSnapshotRequest>(driver, bytes),
        22 => validate::<csi::NodeStageVolumeRequest>(driver, bytes),
        23 => validate::<csi::NodeUnstageVolumeRequest>(driver, bytes),
        24 => validate::<csi::NodePublishVolumeRequest>(driver, bytes),
        25 => validate::<csi::NodeUnpublishVolumeRequest>(driver, bytes),
        26 => validate::<csi::NodeGetVolumeStatsRequest>(driver, bytes),
        27 => validate::<csi::NodeExpandVolumeRequest>(driver, bytes),
        28 => validate::<csi::NodeGetCapabilitiesRequest>(driver, bytes),
        _ => validate::<csi::NodeGetInfoRequest>(driver, bytes),
    }
}

/// The mount-table parser on arbitrary text.
pub fn mountinfo(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for entry in filevol_core::sys::mountinfo::parse(&text) {
        // Whatever parses names a device and an absolute mount point.
        assert!(!entry.device.is_empty());
        assert!(entry.mount_point.is_absolute());
    }
}

/// The sysfs readers on arbitrary text.
pub fn sysfs(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(bytes) = filevol_core::sys::loopdev::parse_sectors(&text) {
        assert_eq!(bytes % 512, 0);
    }
}

/// The pool's metadata reader on arbitrary bytes: whatever parses must
/// write back and parse to the same value.
pub fn metadata(data: &[u8]) {
    fn round_trip<
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    >(
        data: &[u8],
    ) {
        if let Ok(v) = serde_json::from_slice::<T>(data) {
            let again: T = serde_json::from_slice(&serde_json::to_vec(&v).expect("serialises"))
                .expect("re-parses");
            assert_eq!(again, v);
        }
    }
    round_trip::<VolumeMeta>(data);
    round_trip::<SnapshotMeta>(data);
    round_trip::<GroupMeta>(data);
    round_trip::<NodeRecord>(data);
}

/// The mkfs option allowlist on arbitrary text: the first byte picks the
/// filesystem, the rest is split on white space as CreateVolume splits
/// `mkfsOptions`. Whatever is accepted must be on the allowlist, word by
/// word, and name no path: a hole in the validator fails here.
pub fn mkfs_options(data: &[u8]) {
    use filevol_core::volume::meta::FsType;
    use filevol_core::volume::mkfs_options::{allowed, validate};

    let Some((selector, rest)) = data.split_first() else {
        return;
    };
    let fs = [FsType::Ext4, FsType::Xfs, FsType::Btrfs][usize::from(*selector) % 3];
    let text = String::from_utf8_lossy(rest);
    let words: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    let Ok(validated) = validate(fs, &words) else {
        return;
    };
    let list: Vec<(&str, bool)> = allowed(fs).collect();
    let value_ok = |v: &str| {
        !v.is_empty() && !v.starts_with('-') && v.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    };
    // The words as given: options from the list, each followed by its
    // value where it takes one, no positional argument, no path.
    let mut i = 0;
    while i < words.len() {
        let word = &words[i];
        assert!(
            word.bytes().all(|b| b.is_ascii_graphic() && b != b'/'),
            "accepted {word:?} for {}",
            fs.as_str()
        );
        assert!(word.starts_with('-'), "accepted a positional {word:?}");
        let (name, attached) = match word.strip_prefix("--") {
            Some(long) => match long.split_once('=') {
                Some((name, value)) => (&word[..name.len() + 2], Some(value)),
                None => (word.as_str(), None),
            },
            None => {
                let (name, rest) = word.split_at(2.min(word.len()));
                (name, (!rest.is_empty()).then_some(rest))
            }
        };
        let Some(&(_, takes_value)) = list.iter().find(|(s, _)| *s == name) else {
            panic!(
                "accepted {name:?} (in {word:?}), not on the {} list",
                fs.as_str()
            );
        };
        match (takes_value, attached) {
            (true, Some(value)) => assert!(value_ok(value), "accepted value {value:?}"),
            (true, None) => {
                i += 1;
                let value = words.get(i).expect("a value follows");
                assert!(value_ok(value), "accepted value {value:?}");
            }
            (false, attached) => assert_eq!(attached, None, "a flag with {word:?}"),
        }
        i += 1;
    }
    // What mkfs would be given: the same, rebuilt.
    for &(option, value) in validated.args() {
        assert!(list.iter().any(|(s, _)| *s == option), "passes {option}");
        if let Some(value) = value {
            assert!(value_ok(value), "passes {option} {value:?}");
        }
    }
}

/// The range arithmetic of changed-block tracking
/// (`filevol_core::changed_blocks`), against a model that looks at every unit:
/// two extent maps and a request (offset, capacity, page size) drawn from
/// `data`, optionally shifted to the top of u64. The delta must be exactly
/// the units where the maps do not provably agree (so never less than what
/// changed), the pages must keep every promise of the spec, and paging
/// must neither lose nor invent a byte. Panics on any difference.
pub fn block_ranges(data: &[u8]) {
    use filevol_core::changed_blocks::{check_stream, Delta, OutOfOrder, Pager, Run};
    use filevol_core::sys::extents::Extent;

    let mut bytes = data.iter().copied();
    let mut next = || bytes.next().unwrap_or(0);
    // Near the top of u64 when asked: offsets must not wrap anywhere.
    let shift = if next() & 1 == 1 { u64::MAX - 4096 } else { 0 };
    let from = u64::from(next());
    let capacity = from.max(u64::from(next()) + u64::from(next()));
    let per_page = usize::from(next() % 8) + 1;
    let map = |next: &mut dyn FnMut() -> u8| {
        let mut extents = Vec::new();
        let mut at = 0u64;
        for _ in 0..(next() % 12) {
            let gap = u64::from(next() % 8);
            let len = u64::from(next() % 24) + 1;
            let physical = u64::from(next() % 64);
            let flags = match next() % 16 {
                0 => linux_raw_sys::ioctl::FIEMAP_EXTENT_ENCODED,
                1 => linux_raw_sys::ioctl::FIEMAP_EXTENT_UNWRITTEN,
                2 => linux_raw_sys::ioctl::FIEMAP_EXTENT_SHARED,
                _ => 0,
            };
            extents.push(Extent {
                logical: shift + at + gap,
                physical: shift + physical,
                length: len,
                flags,
            });
            at += gap + len;
        }
        extents
    };
    let base = map(&mut next);
    let target = map(&mut next);
    let (from, capacity) = (shift + from, shift + capacity);

    // The model: unit by unit.
    let covering = |m: &[Extent], p: u64| m.iter().find(|e| e.logical <= p && p < e.end()).copied();
    let mut expected: Vec<(u64, u64)> = Vec::new();
    for p in from..capacity {
        let changed = match (covering(&base, p), covering(&target, p)) {
            (None, None) => false,
            (Some(a), Some(b)) => {
                let neutral = linux_raw_sys::ioctl::FIEMAP_EXTENT_SHARED
                    | linux_raw_sys::ioctl::FIEMAP_EXTENT_LAST
                    | linux_raw_sys::ioctl::FIEMAP_EXTENT_MERGED;
                !(a.is_provable()
                    && b.is_provable()
                    && a.flags & !neutral == b.flags & !neutral
                    && a.physical + (p - a.logical) == b.physical + (p - b.logical))
            }
            _ => true,
        };
        if changed {
            match expected.last_mut() {
                Some(r) if r.1 == p => r.1 = p + 1,
                _ => expected.push((p, p + 1)),
            }
        }
    }

    let delta: Vec<Run> = Delta::new(
        base.iter().copied().map(Ok),
        target.iter().copied().map(Ok),
        from,
        capacity,
    )
    .collect::<std::io::Result<_>>()
    .expect("a delta of well-formed maps");
    let got: Vec<(u64, u64)> = delta.iter().map(|r| (r.start, r.end)).collect();
    assert_eq!(
        got, expected,
        "delta of {base:?} and {target:?} over {from}..{capacity}"
    );

    // Pages of the delta, and of the base's extents as allocated ranges
    // (touching and overlapping clipped runs, from before `from`).
    for runs in [
        delta.clone(),
        base.iter()
            .map(|e| Run {
                start: e.logical,
                end: e.end(),
            })
            .collect(),
    ] {
        let pages: Vec<Vec<Run>> = Pager::new(
            runs.iter().copied().map(Ok::<_, OutOfOrder>),
            from,
            capacity,
            per_page,
        )
        .collect::<Result<_, _>>()
        .expect("sorted runs page");
        let slices: Vec<&[Run]> = pages.iter().map(Vec::as_slice).collect();
        check_stream(slices, from, capacity, per_page).expect("the spec's promises");
        // Nothing lost, nothing invented: the union of the clipped input.
        let mut union: Vec<(u64, u64)> = Vec::new();
        for r in &runs {
            let (s, e) = (r.start.max(from), r.end.min(capacity));
            if s >= e {
                continue;
            }
            match union.last_mut() {
                Some(u) if s <= u.1 => u.1 = u.1.max(e),
                _ => union.push((s, e)),
            }
        }
        let paged: Vec<(u64, u64)> = pages.iter().flatten().map(|r| (r.start, r.end)).collect();
        assert_eq!(paged, union, "pages of {runs:?}");
    }
}

#[cfg(test)]
mod tests {
    /// The block-range model on stable Rust without cargo-fuzz: many
    /// pseudo-random inputs (a fixed xorshift seed, so a failure repeats).
    #[test]
    fn block_ranges_agree_with_the_model_on_random_inputs() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let len = (state % 96) as usize;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state.to_le_bytes()[0]
                })
                .collect();
            super::block_ranges(&data);
        }
    }
}
