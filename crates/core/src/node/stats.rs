//! NodeGetVolumeStats and NodeExpandVolume: what a staged or published
//! volume holds, and growing its device and filesystem after the
//! controller grew its image.
//!
//! Both answer with what the kernel says the volume is now, never with what
//! was asked for or recorded: an expansion the controller did not make is an
//! error, not a success with the requested size.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::error::{sys, NodeError};
use super::{Node, Stats};
use crate::pool::{CapacityRange, Pool};
use crate::sys::mount::MountState;
use crate::volume::meta::{AccessType, FsType, Layout, VolumeMeta};

impl Node {
    /// NodeGetVolumeStats.
    pub fn stats(&self, pool: &Pool, v: &VolumeMeta, path: &Path) -> Result<Stats, NodeError> {
        let state = self.mount_state(path)?;
        if state == MountState::Missing {
            return Err(NodeError::NotFound {
                what: "volume path",
                path: path.to_owned(),
            });
        }
        let mut stats = Stats::default();
        // What is wrong is the health's to say (`node::health`), which the
        // caller asks under a deadline; here only the figures.
        if v.layout == Layout::Image && v.access == AccessType::Block {
            let image = pool.image_path(&v.id);
            if let Ok(Some(bound)) = self.bound(&image) {
                if !bound.detaching {
                    // A raw device has no free-space figure of its own;
                    // where the spec has room for one, "used" is what the
                    // image holds in the pool (st_blocks): blocks the pod
                    // wrote and has not discarded.
                    let dev = bound.device;
                    let size = self.kernel.size(dev).map_err(sys("size of", dev.path()))?;
                    let allocated = std::fs::metadata(&image)
                        .map_err(sys("stat", &image))?
                        .blocks()
                        .saturating_mul(512)
                        .min(size);
                    stats.bytes = Some((size, size - allocated, allocated));
                }
            }
        }
        if v.access == AccessType::Mount && state == MountState::Mounted {
            let st = rustix::fs::statvfs(path).map_err(|e| sys("statvfs", path)(e.into()))?;
            let total = st.f_blocks * st.f_frsize;
            let avail = st.f_bavail * st.f_frsize;
            let used = (st.f_blocks - st.f_bfree) * st.f_frsize;
            stats.bytes = Some((total, avail, used));
            if st.f_files > 0 {
                stats.inodes = Some((st.f_files, st.f_favail, st.f_files - st.f_ffree));
            }
            if v.subvolume {
                // statvfs of a subvolume answers for the whole pool
                // filesystem; the volume's size and use are its qgroup's.
                if let Ok(q) = crate::pool::subvolumes::usage(&pool.data_path(&v.id)) {
                    let total = q.max_referenced.unwrap_or(v.capacity_bytes);
                    stats.bytes = Some((total, total.saturating_sub(q.referenced), q.referenced));
                }
            }
        }
        Ok(stats)
    }

    /// NodeExpandVolume: the loop device re-reads the image's size, then the
    /// filesystem grows online. Returns the device's new size.
    pub fn expand(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        path: &Path,
        range: CapacityRange,
    ) -> Result<u64, NodeError> {
        let (required, limit) = (range.required, range.limit);
        let not_grown = |size| NodeError::NotGrown {
            id: v.id.clone(),
            size,
            required,
            limit,
        };
        if v.layout == Layout::Dir {
            // A directory has no filesystem of its own to grow; its size is
            // what the record (and the capacity accounting) says.
            if required > v.capacity_bytes || (limit != 0 && v.capacity_bytes > limit) {
                return Err(not_grown(v.capacity_bytes));
            }
            return Ok(v.capacity_bytes);
        }
        let image = pool.image_path(&v.id);
        let dev = match self
            .bound(&image)
            .map_err(sys("find loop device of", &image))?
        {
            Some(bound) if !bound.detaching => bound.device,
            _ => {
                return Err(NodeError::NotFound {
                    what: "loop device of",
                    path: image,
                })
            }
        };
        self.kernel
            .refresh_capacity(dev)
            .map_err(sys("refresh capacity of", dev.path()))?;
        crate::faults::crash_point("expand.device_grown");
        // Answer with what the volume is, never with what was asked for: an
        // image the controller did not grow is an error, not a success.
        let size = self.kernel.size(dev).map_err(sys("size of", dev.path()))?;
        if required > size || (limit != 0 && size > limit) {
            return Err(not_grown(size));
        }
        if v.access == AccessType::Mount {
            let fs = v.fs_type.unwrap_or(FsType::Ext4);
            if fs == FsType::Btrfs && size < FsType::Btrfs.min_bytes() {
                // The kernel resizes no btrfs this small, not even to its
                // own size: fine when it already fills its device (a small
                // volume of an older version, asked for what it has), an
                // error when it would have to grow.
                if self.kernel.btrfs_device_size(path)? >= size {
                    return Ok(size);
                }
                return Err(NodeError::TooSmallToResize {
                    id: v.id.clone(),
                    size,
                });
            }
            self.kernel.grow(fs, &dev.path(), path)?;
        }
        Ok(size)
    }
}
