//! A pool's files as a test reads them behind the driver's back: where a
//! volume's image is, a pattern written into it, a digest of its contents,
//! what it has allocated, and whether the pool as a whole is consistent
//! after crashes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use filevol_core::sys::lock::{try_lock, LockKind};

/// The image of volume `id` in `pool` (an image-layout volume's).
pub fn image(pool: &Path, id: &str) -> PathBuf {
    pool.join("volumes").join(id).join("image")
}

/// Writes `len` bytes of a pattern seeded by `seed` into `path` at
/// `offset`, and syncs them.
pub fn fill(path: &Path, offset: u64, len: usize, seed: u8) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the file to fill");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    // The counter's low byte, on purpose: the pattern repeats every 256.
    #[allow(clippy::cast_possible_truncation)]
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).expect("write the pattern");
        left -= n;
    }
    f.sync_all().expect("sync");
}

/// A digest of `path`'s contents (FNV-1a over the whole file).
pub fn digest(path: &Path) -> u64 {
    let mut f = File::open(path).expect("open the file to digest");
    let mut buf = vec![0u8; 1 << 20];
    let mut h: u64 = 0xcbf29ce484222325;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return h;
        }
        for b in &buf[..n] {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
}

/// The bytes `path` has allocated on disk.
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Asserts that every object in `pool` is whole (an image at least as large
/// as its record says, a directory volume's data, a group snapshot's
/// members and record together) and that scratch holds only live
/// processes' directories, empty: what dead ones left was cleaned when a
/// controller started.
pub fn assert_consistent(pool: &Path) {
    for dir in entries(&pool.join("volumes")) {
        let meta = record(&dir);
        if meta["layout"] == "image" {
            let len = std::fs::metadata(dir.join("image"))
                .expect("stat the image")
                .len();
            assert!(
                len >= meta["capacity_bytes"].as_u64().expect("capacity_bytes"),
                "{}",
                dir.display()
            );
        } else {
            assert!(dir.join("data").is_dir());
        }
    }
    for dir in entries(&pool.join("snapshots")) {
        let meta = record(&dir);
        let group = meta["group_id"].as_str();
        if let Some(g) = group {
            assert!(
                pool.join("groups").join(format!("{g}.json")).is_file(),
                "orphan member {}",
                dir.display()
            );
        }
        assert!(dir.join("image").is_file() || dir.join("data").is_dir());
    }
    for dir in entries(&pool.join(".scratch")) {
        if !dir.is_dir() {
            continue;
        }
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("{}.lock", dir.display()))
            .unwrap_or_else(|e| panic!("scratch {} has no lock file: {e}", dir.display()));
        let free = try_lock(&lock, LockKind::Exclusive).expect("try the scratch lock");
        assert!(
            !free,
            "scratch of a dead process survived: {}",
            dir.display()
        );
        let left: Vec<_> = std::fs::read_dir(&dir).expect("list scratch").collect();
        assert!(left.is_empty(), "{} holds {left:?}", dir.display());
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("read a directory entry").path())
        .collect()
}

fn record(dir: &Path) -> serde_json::Value {
    let bytes = std::fs::read(dir.join("meta.json")).expect("read meta.json");
    serde_json::from_slice(&bytes).expect("parse meta.json")
}
