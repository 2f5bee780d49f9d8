//! A throwaway filesystem on a loop-mounted image, for pools with (xfs) and
//! without (ext4) reflink, and tiny ones that fill up. Unmounted (and its
//! loop device released, `-o loop` sets autoclear) when dropped, even when
//! the test fails. Needs root: a test that makes one carries
//! `#[ignore = "needs root"]` (see `needs`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted scratch filesystem.
pub struct LoopFs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    /// Makes a `size_mib` filesystem of type `fs` ("xfs", "ext4", "btrfs")
    /// and mounts it. Fails the test without root.
    pub fn new(fs: &str, size_mib: u64) -> LoopFs {
        crate::needs::root();
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        let mkfs = match fs {
            "xfs" => Command::new("mkfs.xfs")
                .args(["-q", "-m", "reflink=1"])
                .arg(&image)
                .status(),
            "ext4" => Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&image)
                .status(),
            other => Command::new(format!("mkfs.{other}"))
                .arg("-q")
                .arg(&image)
                .status(),
        };
        assert!(mkfs.expect("run mkfs").success(), "mkfs.{fs} failed");
        let status = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -o loop failed");
        LoopFs { mnt, _dir: dir }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        unmount_patiently(&self.mnt);
    }
}

/// Unmounts `mnt`. A process of the test may still hold a file open for a
/// moment after being killed; retry for about 5 s before falling back to a
/// lazy unmount.
pub fn unmount_patiently(mnt: &Path) {
    for _ in 0..50 {
        if Command::new("umount")
            .arg(mnt)
            .status()
            .is_ok_and(|s| s.success())
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = Command::new("umount").arg("-l").arg(mnt).status();
}
