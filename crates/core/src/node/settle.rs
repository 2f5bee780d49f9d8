//! Settling a clone or restore before its first read-only stage: the
//! journal its copied filesystem carries is replayed once, on a private
//! writable device, under the volume's exclusive fence.
//!
//! A snapshot or clone of a mounted filesystem is a crash image: ext4 and
//! xfs find a journal to replay in it, btrfs a log tree (after an fsync),
//! and none of them will replay it from a read-only device, which is what
//! every read-only stage attaches ("XFS: recovery required on read-only
//! device", EROFS). Mounting with the replay skipped (ext4 `noload`, xfs
//! `norecovery`) would show the filesystem without what its journal holds:
//! the last writes before the snapshot, and metadata that may not agree
//! with itself.
//!
//! So the first read-only stage of a volume whose record says it was copied
//! and not settled ([`VolumeMeta::needs_settling`]):
//!
//! 1. takes the volume's fence exclusively, the fence a writer's stage
//!    holds: no other node plugin, on this host or another sharing the
//!    pool, has the volume staged or stages it meanwhile. A reader on
//!    another node that comes while one settles waits for it (up to
//!    [`PATIENCE`]), then finds it settled and does nothing. A fence held
//!    only shared means readers have it staged already, so it mounts
//!    read-only as it is (a copy made before settling existed): nothing is
//!    replayed, and new readers are not locked out by the old ones;
//! 2. reads the record again under it: settled meanwhile, nothing to do;
//! 3. attaches the image read-write to a loop device of its own (which
//!    holds the image's lock exclusively, as every writer's device does),
//!    mounts the filesystem where no path reaches it and lets it go
//!    ([`crate::sys::mount::mount_unattached`]): the kernel replays the
//!    journal and leaves it clean. xfs is mounted `nouuid`, as every stage
//!    of it is: the source, with the same UUID, may be mounted on this host;
//! 4. detaches the device, waits until it is gone, syncs the image, and
//!    records `settled` in the volume's record; then lets go of the fence.
//!
//! The stage then goes on as any read-only stage, on a clean filesystem.
//! A crash before the record leaves the volume unsettled, and the next
//! stage replays again, which finds a clean journal and changes nothing; a
//! device the crash left attached is mounted nowhere, and the next attach
//! on this host detaches it (`Node::clear_other_devices`).
//!
//! What is settled is the copy's blocks, once. A read-write stage replays
//! the journal by mounting, as it always did, and changes no record; a
//! settled volume staged read-write later and left with a dirty journal
//! (its node died) is not settled again: its read-only stage fails with
//! [`NodeError::Unmountable`], which says to stage it read-write once.

use std::time::{Duration, Instant};

use super::devices;
use super::error::{probe_failed, sys, unmountable, NodeError};
use super::format::Content;
use super::rollback::with_failed_undos;
use super::Node;
use crate::pool::Pool;
use crate::sys::lock::LockKind;
use crate::volume::meta::{FsType, VolumeMeta};

/// How long a read-only stage waits for another node plugin that holds
/// the volume's fence (settling it, most likely) before it gives up with
/// [`NodeError::NotSettled`], which kubelet retries.
const PATIENCE: Duration = Duration::from_secs(10);

impl Node {
    /// Settles volume `v` for a read-only stage if its record says it needs
    /// it (see the module documentation); returns its record as it is now.
    pub(super) fn settle(&self, pool: &Pool, v: &VolumeMeta) -> Result<VolumeMeta, NodeError> {
        let give_up = Instant::now() + PATIENCE;
        loop {
            let now = pool.volume(&v.id)?;
            if !now.needs_settling() {
                return Ok(now);
            }
            if let Some(_fence) = pool.fence_volume(&v.id, LockKind::Exclusive)? {
                // Under the fence: another node may have settled it since.
                let now = pool.volume(&v.id)?;
                if !now.needs_settling() {
                    return Ok(now);
                }
                if !self.replay_journal(pool, &now)? {
                    return Ok(now);
                }
                let lock = pool.lock_volume(&v.id)?;
                let settled = pool.mark_settled(&v.id, &lock)?;
                log::info!(
                    "volume {}: the journal copied with it is replayed; read-only stages mount it as of its source",
                    v.id
                );
                return Ok(settled);
            }
            // Held, but only shared: readers have it staged, so it mounted
            // read-only for them as it is (a copy made before settling, of
            // an unmounted source): nothing to replay, and waiting for
            // every reader to go would lock out new ones.
            if pool.fence_volume(&v.id, LockKind::Shared)?.is_some() {
                log::debug!(
                    "volume {}: staged read-only elsewhere already; not settled",
                    v.id
                );
                return Ok(now);
            }
            if Instant::now() >= give_up {
                return Err(NodeError::NotSettled {
                    id: v.id.clone(),
                    reason: format!(
                        "its fence stayed held by another node plugin (one replaying it now, or a writer's stage) for {} s",
                        PATIENCE.as_secs()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Replays the journal of `v`'s filesystem on a private writable loop
    /// device (steps 3 and 4 of the module documentation). The caller holds
    /// the volume's fence exclusively. `Ok(false)` when the image holds no
    /// filesystem of the volume's kind, which is left for the stage's own
    /// probe to report; a blank image (a copy of a volume never formatted)
    /// has nothing to replay and is settled as it is.
    fn replay_journal(&self, pool: &Pool, v: &VolumeMeta) -> Result<bool, NodeError> {
        let fs = v.fs_type.unwrap_or(FsType::Ext4);
        let image = pool.image_path(&v.id);
        let key = devices::image_key(&image)
            .and_then(|key| key.ok_or_else(|| std::io::ErrorKind::NotFound.into()))
            .map_err(sys("attach a loop device to", &image))?;
        let attach = || {
            self.kernel
                .attach(&image, false, self.direct_io, &self.node_id)
                .map_err(sys("attach a loop device to", &image))
        };
        let a = match attach()? {
            Some(a) => a,
            None => {
                self.clear_other_devices(&v.id, &image, key)?;
                attach()?.ok_or_else(|| NodeError::ImageFenced {
                    id: v.id.clone(),
                    image: image.clone(),
                })?
            }
        };
        let dev = a.device;
        let result = (|| {
            // A device number is reused: nothing cached of another image.
            self.kernel
                .drop_cached_blocks(dev)
                .map_err(sys("drop cached blocks of", dev.path()))?;
            match self
                .kernel
                .probe(&dev.path(), &image, fs)
                .map_err(probe_failed(dev.path()))?
            {
                Content::Filesystem(found) if found == fs.as_str() => {}
                Content::Blank => return Ok(true),
                _ => return Ok(false),
            }
            let flags: &[&str] = if fs == FsType::Xfs { &["nouuid"] } else { &[] };
            self.kernel
                .mount_unattached(&dev.path(), fs.as_str(), flags)
                .map_err(unmountable(
                    &v.id,
                    fs.as_str(),
                    dev.path(),
                    "read-write to replay its journal",
                ))?;
            Ok(true)
        })();
        // The device was the replay's alone: detached whatever happened.
        let detached = self.kernel.detach(dev).map_err(sys("detach", dev.path()));
        let replayed = match (result, detached) {
            (Ok(replayed), Ok(())) => replayed,
            (Ok(_), Err(e)) | (Err(e), Ok(())) => return Err(e),
            (Err(e), Err(undo)) => {
                return Err(with_failed_undos(e, vec![undo.to_string()]));
            }
        };
        // Gone before the fence is let go: a device being detached still
        // writes the image until its last close.
        if !self
            .detached_device(dev, key)
            .map_err(sys("find loop device of", &image))?
        {
            return Err(NodeError::DetachPending {
                device: dev.path(),
                image,
            });
        }
        // What the replay wrote reaches the pool before the record says so
        // (another host reads the image through its own cache).
        std::fs::File::open(&image)
            .and_then(|f| f.sync_all())
            .map_err(sys("sync", &image))?;
        Ok(replayed)
    }
}
