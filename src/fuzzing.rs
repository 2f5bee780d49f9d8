//! Entry points for fuzzing, shared by the cargo-fuzz targets in `fuzz/`
//! and the corpus replay test that CI runs on stable Rust. Each takes
//! arbitrary bytes and must neither panic nor touch anything outside the
//! test pool and kubelet directory it is given.

use std::path::Path;
use std::sync::Arc;

use protobuf::Message;

use crate::config::{Config, ServeArgs};
use crate::executor::Executor;
use crate::node::Node;
use crate::pool::meta::{GroupMeta, NodeRecord, SnapshotMeta, VolumeMeta};
use crate::pool::{Pool, PoolOptions};
use crate::proto::csi;
use crate::service::{Driver, Operation};

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
    let node = Some(Node::start(&config.kubelet_dir, &pool, true).expect("fuzz node"));
    let executor = Executor::start(1, 1).expect("fuzz executor");
    Arc::new(Driver {
        config,
        executor,
        pool,
        node,
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
    for entry in crate::sys::mountinfo::parse(&text) {
        // Whatever parses names a device and an absolute mount point.
        assert!(!entry.device.is_empty());
        assert!(entry.mount_point.is_absolute());
    }
}

/// The sysfs readers on arbitrary text.
pub fn sysfs(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(bytes) = crate::sys::loopdev::parse_sectors(&text) {
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
    use crate::node::mkfs_options::{allowed, validate};
    use crate::pool::meta::FsType;

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
