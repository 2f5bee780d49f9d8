//! A staged volume's health as this host sees it: its mount, its loop
//! device's errors, the filesystem inside, its fence.
//!
//! Everything here is read from the kernel at the call: the mount table,
//! the device table, `/sys/fs/ext4/<dev>/errors_count`, an open of the
//! mount's root, the kernel log's error counts kept by
//! [`LoopErrors`](crate::health::loop_errors::LoopErrors). The pool is
//! touched only by a `stat` of the image where no device serves it;
//! callers run this under a deadline all the same (see
//! [`crate::sys::deadline`]). The pool's own findings (unreachable, full)
//! are added by the caller, who keeps them from a background probe.

use std::path::Path;

use super::error::{sys, NodeError};
use super::Node;
use crate::health::{Finding, Health, Reason};
use crate::pool::Pool;
use crate::sys::blockstat;
use crate::sys::kmsg;
use crate::sys::loopdev::LoopDevice;
use crate::sys::mount::MountState;
use crate::volume::meta::{AccessType, Layout, VolumeMeta};

impl Node {
    /// What is wrong with volume `v` on this node. With `path` (a staging
    /// or target path a call names), that path must be a mount (a missing
    /// or unmounted one is [`Reason::NotMounted`]); without one (the
    /// metrics, a call that names none), the volume is looked at through
    /// its loop device.
    pub fn volume_health(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        path: Option<&Path>,
    ) -> Result<Health, NodeError> {
        let mut h = Health::ok();
        if let Some(path) = path {
            match self.mount_state(path)? {
                MountState::Missing => h.add(Finding::new(
                    Reason::NotMounted,
                    format!(
                        "{} does not exist: the volume was never staged or published there, or that was undone",
                        path.display()
                    ),
                )),
                MountState::Mounted => {}
                MountState::NotMounted => h.add(Finding::new(
                    Reason::NotMounted,
                    format!(
                        "{} is not mounted: the pod sees an empty directory. Delete the pod so kubelet stages and publishes the volume again",
                        path.display()
                    ),
                )),
                MountState::Broken => h.add(Finding::new(
                    Reason::NotMounted,
                    format!(
                        "the filesystem at {} is gone (stale or disconnected): delete the pod so kubelet stages and publishes the volume again",
                        path.display()
                    ),
                )),
            }
        }
        if v.layout == Layout::Image {
            self.image_health(pool, v, &mut h)?;
        }
        if let Some(reason) = self.custody.unproven(&v.id) {
            h.add(Finding::new(
                Reason::FenceUnproven,
                format!(
                    "this node cannot prove it holds the volume's fence ({reason}): another host may be writing its image. Stop the pods using it on other nodes; the next custody check clears this once the fence is this node's again"
                ),
            ));
        }
        if v.subvolume && v.access == AccessType::Mount {
            let data = pool.data_path(&v.id);
            if let Err(e) = crate::pool::subvolumes::usage(&data) {
                h.add(Finding::new(
                    Reason::DataUnreadable,
                    format!(
                        "the qgroup of subvolume {} cannot be read: {e}. Check that quotas are on (btrfs quota enable) on the pool",
                        data.display()
                    ),
                ));
            }
        }
        Ok(h)
    }

    /// The image volume's device and filesystem.
    fn image_health(&self, pool: &Pool, v: &VolumeMeta, h: &mut Health) -> Result<(), NodeError> {
        let image = pool.image_path(&v.id);
        let dev = match self.bound(&image) {
            Ok(Some(bound)) if !bound.detaching => bound.device,
            Ok(_) => {
                match crate::sys::fs::exists(&image) {
                    Ok(false) => h.add(Finding::new(
                        Reason::DataMissing,
                        format!(
                            "image {} is gone from the pool: the volume's data is lost unless it is restored from a backup or snapshot",
                            image.display()
                        ),
                    )),
                    Ok(true) => h.add(Finding::new(
                        Reason::NoLoopDevice,
                        format!(
                            "no loop device of this node serves image {}: delete the pod so kubelet stages the volume again",
                            image.display()
                        ),
                    )),
                    Err(e) => h.add(Finding::new(
                        Reason::DataUnreadable,
                        format!(
                            "image {} cannot be read: {e}. Check the pool's filesystem or share",
                            image.display()
                        ),
                    )),
                }
                return Ok(());
            }
            // The image cannot be looked at (its stat failed on the pool).
            Err(e) => {
                h.add(Finding::new(
                    Reason::DataUnreadable,
                    format!(
                        "image {} cannot be read: {e}. Check the pool's filesystem or share",
                        image.display()
                    ),
                ));
                return Ok(());
            }
        };
        let name = format!("loop{}", dev.number);
        if let Some(e) = self.loop_errors.recent(dev.number, kmsg::now()) {
            h.add(Finding::new(
                Reason::LoopIoErrors,
                format!(
                    "{name} returned {} I/O errors since it was attached, the last {}s ago: the pool below the image failed reads or writes (a full pool, a failing disk or share). Check the pool's free space and dmesg; this clears {}s after the last error",
                    e.count,
                    kmsg::now().saturating_sub(e.last).as_secs(),
                    crate::health::loop_errors::WINDOW.as_secs(),
                ),
            ));
        }
        if v.access != AccessType::Mount {
            return Ok(());
        }
        match blockstat::ext4_errors(&name) {
            Ok(Some(n)) if n > 0 => h.add(Finding::new(
                Reason::FilesystemErrors,
                format!(
                    "the ext4 filesystem on {name} has recorded {n} errors: its data may be damaged. Back it up, then unstage it (delete the pods using it) and run e2fsck -f on the image; the count clears only when fsck repairs it"
                ),
            )),
            Ok(_) => {}
            Err(e) => log::warn!("volume {}: ext4 error count of {name}: {e}", v.id),
        }
        self.filesystem_state(dev, &name, h)
    }

    /// Whether the kernel made the volume's filesystem read-only or shut
    /// it down, from its mounts under the kubelet directory.
    fn filesystem_state(
        &self,
        dev: LoopDevice,
        name: &str,
        h: &mut Health,
    ) -> Result<(), NodeError> {
        let table = self
            .kernel
            .mount_table()
            .map_err(sys("read", "/proc/self/mountinfo"))?;
        let source = dev.path();
        let Some(mount) = table.iter().find(|e| {
            Path::new(&e.source) == source && e.mount_point.starts_with(&self.kubelet_dir)
        }) else {
            return Ok(());
        };
        let has = |opts: &str, word: &str| opts.split(',').any(|o| o == word);
        // Mounted read-write, and the filesystem under it read-only: the
        // kernel turned it (a read-only stage has both read-only). Recent
        // kernels' ext4 (6.18 here) keeps the superblock "rw" and says
        // "emergency_ro" instead.
        let kernel_ro =
            has(&mount.super_options, "ro") || has(&mount.super_options, "emergency_ro");
        if kernel_ro && has(&mount.options, "rw") {
            h.add(Finding::new(
                Reason::FilesystemReadOnly,
                format!(
                    "the kernel remounted the {} filesystem on {name} read-only after an error: the pod's writes fail. See dmesg; free space in the pool if it is full, then delete the pods using the volume so it is staged again (fsck runs first for ext4)",
                    mount.fs_type
                ),
            ));
        }
        match blockstat::refuses_open(&mount.mount_point) {
            Ok(true) => h.add(Finding::new(
                Reason::FilesystemShutdown,
                format!(
                    "the {} filesystem on {name} answers every open with EIO: it shut itself down after an error (xfs does so on a failed metadata write). Delete the pods using the volume so it is unstaged, run xfs_repair (or fsck) on the image, and stage it again",
                    mount.fs_type
                ),
            )),
            Ok(false) => {}
            Err(e) => log::warn!(
                "{}: open to check the filesystem: {e}",
                mount.mount_point.display()
            ),
        }
        Ok(())
    }
}
