//! A full pool answers RESOURCE_EXHAUSTED on every path, a filesystem
//! tool's included: mkfs that cannot write its metadata into the image on
//! a full pool says "No space left on device", and that is space to free,
//! not INTERNAL. Needs root (loop devices, mounts).

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::Path;

use filevol::ops::requests as req;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_kit::driver::status;
use filevol_kit::leaks::{is_mounted, loop_of};
use filevol_kit::node_env::NodeEnv;
use grpcio::RpcStatusCode;

use crate::BIN;

/// Fills the filesystem of `path` (a new file there) until a write fails
/// with ENOSPC, then gives back `leave` bytes, so that a small file can
/// still be made but nothing larger written.
fn fill_up(path: &Path, leave: u64) {
    let mut f = File::create(path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for size in [1 << 20, 4096] {
        loop {
            match f.write_all(&chunk[..size]) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::StorageFull => break,
                Err(e) => panic!("fill {}: {e}", path.display()),
            }
        }
    }
    f.sync_all().unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(leave)).unwrap();
    f.sync_all().unwrap();
}

#[test]
#[ignore = "needs root"]
fn a_stage_whose_mkfs_finds_the_pool_full_is_resource_exhausted() {
    let env = NodeEnv::new(BIN, "xfs", 512);
    // A thin xfs volume: its image takes nothing until mkfs writes the
    // filesystem's metadata and zeroes its log (megabytes).
    let id = env.create("full", 320, "xfs");
    let filler = env.pool.parent().unwrap().join("filler");
    fill_up(&filler, 1 << 20);
    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "xfs");
    let staging = env.staging(&id);
    let n = env.d.node();
    let st = status(n.node_stage_volume(&req::stage(&id, &staging, cap.clone())));
    assert_eq!(
        st.code(),
        RpcStatusCode::RESOURCE_EXHAUSTED,
        "{}",
        st.message()
    );
    // The tool's own words: this is the mkfs path, not a syscall's ENOSPC.
    assert!(
        st.message().contains("mkfs.xfs") && st.message().contains("No space left on device"),
        "{}",
        st.message()
    );
    assert!(!is_mounted(&staging));
    assert_eq!(loop_of(&env.image(&id)), None);
    // Space made free is what ends it.
    std::fs::remove_file(&filler).unwrap();
    n.node_stage_volume(&req::stage(&id, &staging, cap))
        .unwrap();
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
}
