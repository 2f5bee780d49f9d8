//! Clean-up of what dead processes left, run by a controller (or `--mode
//! all`) when it opens the pool. Node plugins never run it: one process kind
//! decides, and it removes only what is provably abandoned:
//! - the scratch of an instance whose scratch lock is free (it is dead);
//! - members of a group snapshot whose record does not exist (ENOENT, not
//!   merely unreadable: at both looks, before and under the lock) and whose
//!   group lock is free: the creator holds that lock from its first member
//!   to the record, so a free lock means nobody is still making the group;
//!   a look or a lock that fails otherwise is logged and the members stay;
//! - nothing whose record cannot be read: a damaged record is logged and
//!   reported (volume condition, `filevol pool ls`), never deleted.
//!
//! It moves ControllerPublish records an older filevol kept in a volume's
//! `meta.json` into `attachments/`, under the volume's lock, and removes
//! attachment records whose volume is gone (see `attachments`: a stale
//! record can never become current again).
//!
//! It removes freeze requests and answers (see `freeze`) whose controller
//! or guardian is gone: a lock held means work in progress, which stays.
//!
//! It reclaims formatted templates unused for a day, and any beyond the
//! bound (see `templates`).
//!
//! It also extends an image shorter than its volume (a size change lost in
//! a crash, or an expansion cut short), under the volume's lock: the tail is
//! a hole, so no data changes; and it tells every process to read the
//! volumes' sizes again (see `capacity`).

use std::fs::OpenOptions;

use super::{scratch, Pool, PoolError};
use crate::sys::fs as sysfs;
use crate::volume::meta::{Layout, SnapshotMeta, VolumeMeta};

/// Runs every clean-up. A failure to clean one object is logged, not fatal:
/// the pool still serves.
pub(super) fn run(pool: &Pool) -> Result<(), PoolError> {
    scratch::clean(&pool.scratch)?;
    remove_unfinished_groups(pool)?;
    repair_short_images(pool)?;
    move_legacy_attachments(pool)?;
    pool.remove_stale_attachments(None)?;
    match pool.remove_abandoned_freezes() {
        Ok(0) => {}
        Ok(n) => log::info!("removed {n} freeze request(s) and answer(s) left by dead processes"),
        Err(e) => log::warn!("freeze requests: {e}"),
    }
    if let Err(e) = pool.prune_templates(super::MAX_TEMPLATES, None) {
        log::warn!("reclaiming templates: {e}");
    }
    // An expansion cut short between its record and its notice: every
    // process reads the sizes again.
    pool.sizes_changed()
}

fn remove_unfinished_groups(pool: &Pool) -> Result<(), PoolError> {
    for (id, entry) in pool.store.load_all::<SnapshotMeta>()? {
        let s = match entry {
            Ok(s) => s,
            Err(problem) => {
                log::warn!("snapshot {id}: {problem} (left in place)");
                continue;
            }
        };
        let Some(group) = &s.group_id else { continue };
        if !group_record_absent(pool, &id, group) {
            continue;
        }
        let _lock = match pool.store.lock_group(group) {
            Ok(lock) => lock,
            Err(PoolError::Busy { .. }) => continue, // its creator is still at work
            Err(e) => {
                log::warn!("snapshot {id}: group snapshot {group}: {e}; left in place");
                continue;
            }
        };
        // Checked again under the lock: the creator may have finished
        // between the first look and the lock.
        if !group_record_absent(pool, &id, group) {
            continue;
        }
        log::warn!(
            "removing snapshot {id} of unfinished group snapshot {group} (its creator is gone)"
        );
        if let Err(e) = pool.remove_member(&id) {
            log::warn!("snapshot {id}: {e}");
        }
    }
    Ok(())
}

/// Whether the record of `group` (which snapshot `id` belongs to) is proven
/// absent (ENOENT). A record that cannot be looked at is logged and counts
/// as present: its members stay.
fn group_record_absent(pool: &Pool, id: &str, group: &str) -> bool {
    let path = pool.group_file(group);
    match sysfs::symlink_metadata_if_present(&path) {
        Ok(found) => found.is_none(),
        Err(e) => {
            log::warn!(
                "snapshot {id}: group snapshot {group}: stat {}: {e}; left in place",
                path.display()
            );
            false
        }
    }
}

fn repair_short_images(pool: &Pool) -> Result<(), PoolError> {
    for (id, entry) in pool.store.load_all::<VolumeMeta>()? {
        let Ok(v) = entry else { continue };
        if v.layout != Layout::Image {
            continue;
        }
        let path = pool.image_path(&id);
        let short = match sysfs::metadata_if_present(&path) {
            Ok(found) => found.is_some_and(|m| m.len() < v.capacity_bytes),
            Err(e) => {
                log::warn!("volume {id}: stat {}: {e}; not repaired", path.display());
                false
            }
        };
        if !short {
            continue;
        }
        let Ok(_lock) = pool.lock_volume(&id) else {
            continue; // being changed right now: not ours to repair
        };
        let Ok(v) = pool.volume(&id) else { continue };
        let Ok(f) = OpenOptions::new().write(true).open(&path) else {
            continue;
        };
        match f.metadata() {
            Ok(m) if m.len() < v.capacity_bytes => {
                log::warn!(
                    "volume {id}: image is {} bytes, the volume {}; extending it",
                    m.len(),
                    v.capacity_bytes
                );
                if let Err(e) = f.set_len(v.capacity_bytes).and_then(|()| f.sync_all()) {
                    log::warn!("volume {id}: extend image: {e}");
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn move_legacy_attachments(pool: &Pool) -> Result<(), PoolError> {
    for (id, entry) in pool.store.load_all::<VolumeMeta>()? {
        let Ok(v) = entry else { continue };
        if v.legacy_attachments.is_empty() {
            continue;
        }
        let Ok(lock) = pool.lock_volume(&id) else {
            continue; // being changed right now: the next start moves them
        };
        match pool.move_legacy_attachments(&id, &lock) {
            Ok(()) => log::info!(
                "volume {id}: moved its attachments from meta.json into {}/",
                super::attachments::DIR
            ),
            Err(e) => log::warn!("volume {id}: move its attachments out of meta.json: {e}"),
        }
    }
    Ok(())
}
