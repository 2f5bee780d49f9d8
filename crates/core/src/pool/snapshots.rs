//! Snapshots and group snapshots.
//!
//! A group snapshot commits its members first and its record last. Its
//! creator holds the group's lock (`groups/<id>.lock`) from the first member
//! to the record, so members without a record belong to an unfinished group
//! only while that lock is free: that is what lets a controller's janitor
//! remove them without ever racing a creator that is still alive.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use super::error::io_error;
use super::room::Need;
use super::store::{self, Kind};
use super::subvolumes;
use super::{copy, now_ts, page, remove_built, source_missing, Pool, PoolError};
use crate::faults::crash_point;
use crate::sys::fs as sysfs;
use crate::volume::ids;
use crate::volume::meta::{CopyMethod, GroupMeta, Layout, SnapshotMeta, Source, FORMAT};

/// Checks a caller's list of a group's snapshots against the group.
pub fn check_members(group: &GroupMeta, expected: &[String]) -> Result<(), PoolError> {
    if expected.is_empty() {
        return Ok(());
    }
    let mut a = expected.to_vec();
    let mut b = group.snapshot_ids.clone();
    a.sort();
    b.sort();
    if a != b {
        return Err(PoolError::Mismatch(format!(
            "the snapshot ids given do not match group snapshot {}'s members",
            group.id
        )));
    }
    Ok(())
}

impl Pool {
    /// The snapshot `id`, as the pool holds it now.
    pub fn snapshot(&self, id: &str) -> Result<SnapshotMeta, PoolError> {
        self.store.read(id)
    }

    /// The image of snapshot `id`, opened for reading, with its record:
    /// what changed-block tracking reads. The open descriptor keeps the
    /// blocks that a DeleteSnapshot running meanwhile would free, so a
    /// stream in progress answers for the snapshot as it was when opened.
    pub fn open_snapshot_image(&self, id: &str) -> Result<(SnapshotMeta, File), PoolError> {
        let meta = self.snapshot(id)?;
        if meta.layout != Layout::Image {
            return Err(PoolError::Unsupported(format!(
                "snapshot {id} is of a directory volume, which has no blocks to describe; changed-block tracking covers image volumes"
            )));
        }
        let path = self.snapshot_dir(id).join("image");
        let image = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            // Deleted between the record and the image: its directory is
            // proven absent (a directory that cannot be looked at is an
            // error, not a deleted snapshot).
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && !self.snapshot_dir_present(id)? =>
            {
                return Err(PoolError::NotFound {
                    kind: "snapshot",
                    id: id.to_owned(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PoolError::Damaged {
                    path,
                    problem: "the snapshot's record has no image beside it".into(),
                })
            }
            Err(e) => return Err(io_error("open snapshot image", &path)(e)),
        };
        let st = image
            .metadata()
            .map_err(io_error("stat snapshot image", &path))?;
        if !st.is_file() || st.len() < meta.size_bytes {
            return Err(PoolError::Damaged {
                path,
                problem: format!(
                    "the image is {} bytes, its record says {}",
                    st.len(),
                    meta.size_bytes
                ),
            });
        }
        Ok((meta, image))
    }

    /// Whether the directory of snapshot `id` is there; only ENOENT is "no".
    fn snapshot_dir_present(&self, id: &str) -> Result<bool, PoolError> {
        let dir = self.snapshot_dir(id);
        crate::sys::fs::exists(&dir).map_err(io_error("stat", &dir))
    }

    /// Snapshots in id order from `start`, at most `max` (0: all), keeping
    /// those `keep` accepts, and the id to continue from. Snapshots whose
    /// record cannot be read are left out (and logged).
    pub fn list_snapshots(
        &self,
        start: Option<&str>,
        max: usize,
        keep: impl Fn(&SnapshotMeta) -> bool,
    ) -> Result<(Vec<Arc<SnapshotMeta>>, Option<String>), PoolError> {
        let ids = self.store.ids(Kind::Snapshot)?;
        let (items, next) = page(&ids, start, max, |id| match self.store.load(id)? {
            Ok(s) => keep(&s).then_some(s),
            Err(problem) => {
                log::warn!("snapshot {id}: {problem}");
                None
            }
        });
        Ok((items.into_iter().map(|(_, s)| s).collect(), next))
    }

    /// Every snapshot record (for capacity and reports).
    pub fn all_snapshots(&self) -> Result<Vec<(String, store::Entry<SnapshotMeta>)>, PoolError> {
        self.store.load_all::<SnapshotMeta>()
    }

    /// Takes a snapshot of `source`, or returns the one an identical
    /// earlier request took.
    pub fn create_snapshot(&self, name: &str, source: &str) -> Result<SnapshotMeta, PoolError> {
        let id = ids::derive(ids::Kind::Snapshot, name);
        let compatible = |existing: SnapshotMeta| {
            if existing.source_volume_id == source && existing.group_id.is_none() {
                Ok(existing)
            } else {
                Err(PoolError::Incompatible {
                    kind: "snapshot",
                    name: name.to_owned(),
                    id: id.clone(),
                    what: "source volume".into(),
                })
            }
        };
        match self.snapshot(&id) {
            Ok(existing) => return compatible(existing),
            Err(PoolError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let built = self.scratch.new_path("snapshot");
        let check = || self.check_copyable(&Source::Volume(source.to_owned()));
        let result = self
            .build_snapshot(
                &built,
                &id,
                name,
                source,
                None,
                copy::Fallback::Sparse(&check),
            )
            .and_then(|meta| {
                crash_point("snapshot.built");
                self.commit(&built, &self.snapshot_dir(&id))
                    .map(|won| (won, meta))
            });
        match result {
            Ok((true, meta)) => {
                crash_point("snapshot.committed");
                Ok(meta)
            }
            Ok((false, _)) => {
                remove_built(&built);
                compatible(self.snapshot(&id)?)
            }
            Err(e) => {
                remove_built(&built);
                Err(e)
            }
        }
    }

    fn build_snapshot(
        &self,
        built: &Path,
        id: &str,
        name: &str,
        source: &str,
        group: Option<&str>,
        fallback: copy::Fallback<'_>,
    ) -> Result<SnapshotMeta, PoolError> {
        // Held from the copy to reading `written` (see `build_volume`).
        let _source = self.lock_volume(source).map_err(source_missing)?;
        let v = self.volume(source).map_err(source_missing)?;
        std::fs::create_dir(built).map_err(io_error("create", built))?;
        let mut subvolume = false;
        let method = match v.layout {
            Layout::Image => {
                let dest = built.join("image");
                let src = self.image_path(source);
                if matches!(fallback, copy::Fallback::Sparse(_)) {
                    self.check_room_for_copy(&src)?;
                }
                copy::copy_image(&src, &dest, v.capacity_bytes, fallback)?
            }
            Layout::Dir => {
                if matches!(fallback, copy::Fallback::Refuse) {
                    // A group snapshot promises every member at one instant.
                    return Err(PoolError::NeedsReflink(format!(
                        "volume {source} is a directory, which cannot be copied at one instant; group snapshots take image volumes on a pool that can reflink"
                    )));
                }
                if v.subvolume {
                    // Atomic: no fence, the volume may be staged and written.
                    subvolumes::snapshot(&self.data_path(source), built, true, None)?;
                    subvolume = true;
                    CopyMethod::Reflink
                } else {
                    let _quiet = self.check_dir_copyable(&Source::Volume(source.to_owned()))?;
                    copy::copy_tree(&self.data_path(source), &built.join("data"))?;
                    CopyMethod::Sparse
                }
            }
        };
        crash_point("snapshot.copied");
        // Read after the copy: see `build_volume`.
        let written = self.volume(source).map_err(source_missing)?.written;
        let (secs, nanos) = now_ts();
        let meta = SnapshotMeta {
            format: FORMAT,
            id: id.to_owned(),
            name: name.to_owned(),
            source_volume_id: source.to_owned(),
            size_bytes: v.capacity_bytes,
            layout: v.layout,
            access: v.access,
            fs_type: v.fs_type,
            method,
            group_id: group.map(str::to_owned),
            created_secs: secs,
            created_nanos: nanos,
            written,
            subvolume,
        };
        store::write_new(&built.join(store::META), &meta)?;
        Ok(meta)
    }

    /// Refuses a byte copy that cannot fit, before filling the pool with
    /// half of it.
    fn check_room_for_copy(&self, src: &Path) -> Result<(), PoolError> {
        let need = sysfs::allocated_bytes(src).map_err(io_error("stat", src))?;
        let usage = self.usage()?;
        if need > usage.fs_free.saturating_sub(usage.reserve) {
            return Err(PoolError::exhausted(Need::Space(need), usage));
        }
        Ok(())
    }

    /// Deletes the snapshot. Idempotent; a member of a group snapshot goes
    /// only with its group.
    pub fn delete_snapshot(&self, id: &str) -> Result<(), PoolError> {
        let _lock = match self.store.lock(Kind::Snapshot, id) {
            Ok(lock) => lock,
            Err(PoolError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let s = match self.snapshot(id) {
            Ok(s) => s,
            Err(PoolError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if let Some(group) = &s.group_id {
            return Err(PoolError::Mismatch(format!(
                "snapshot {id} belongs to group snapshot {group}; delete the group"
            )));
        }
        self.discard(&self.snapshot_dir(id))?;
        self.sizes_changed()
    }

    /// Removes a snapshot under its lock, whatever group it is in (the
    /// caller holds the group's lock).
    pub(super) fn remove_member(&self, id: &str) -> Result<(), PoolError> {
        let _lock = match self.store.lock(Kind::Snapshot, id) {
            Ok(lock) => lock,
            Err(PoolError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.discard(&self.snapshot_dir(id))
    }

    // ---- group snapshots ----

    /// The group snapshot `id`, as the pool holds it now.
    pub fn group(&self, id: &str) -> Result<GroupMeta, PoolError> {
        let path = self.group_file(id);
        match store::read_json::<GroupMeta>(&path) {
            Err(PoolError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Err(PoolError::NotFound {
                    kind: "group snapshot",
                    id: id.to_owned(),
                })
            }
            other => other,
        }
    }

    /// Snapshots every volume in `sources` together. Every member is a
    /// reflink (instant and atomic) or the whole group is refused.
    pub fn create_group(&self, name: &str, sources: &[String]) -> Result<GroupMeta, PoolError> {
        let id = ids::derive(ids::Kind::Group, name);
        let _lock = self.store.lock_group(&id)?;
        match self.group(&id) {
            Ok(existing) if existing.source_volume_ids == sources => return Ok(existing),
            Ok(_) => {
                return Err(PoolError::Incompatible {
                    kind: "group snapshot",
                    name: name.to_owned(),
                    id,
                    what: "set of source volumes".into(),
                })
            }
            Err(PoolError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let mut built = Vec::new();
        let result = (|| {
            for source in sources {
                let member_id = ids::derive(ids::Kind::Snapshot, &format!("{id}/{source}"));
                let path = self.scratch.new_path("group-member");
                built.push((member_id.clone(), path.clone()));
                let meta = self.build_snapshot(
                    &path,
                    &member_id,
                    &format!("{name}/{source}"),
                    source,
                    Some(&id),
                    copy::Fallback::Refuse,
                )?;
                if meta.layout == Layout::Dir {
                    return Err(PoolError::Unsupported(format!(
                        "volume {source} is a directory volume; group snapshots need image volumes on a reflink pool"
                    )));
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (_, path) in &built {
                remove_built(path);
            }
            return Err(e);
        }
        // Members enter the pool first, the group record last. A crash in
        // between leaves members without a group, which a janitor removes
        // once this lock is free.
        for (member_id, path) in &built {
            let dest = self.snapshot_dir(member_id);
            if !self.commit(path, &dest)? {
                // A member of an earlier attempt at this group whose creator
                // died: no group record names it, and the group's lock is
                // ours, so nobody else is making it.
                log::warn!("replacing snapshot {member_id} left by an unfinished group snapshot");
                self.remove_member(member_id)?;
                if !self.commit(path, &dest)? {
                    return Err(PoolError::Busy {
                        kind: "snapshot",
                        id: member_id.clone(),
                    });
                }
            }
            crash_point("group.member_committed");
        }
        let (secs, nanos) = now_ts();
        let group = GroupMeta {
            format: FORMAT,
            id: id.clone(),
            name: name.to_owned(),
            snapshot_ids: built.iter().map(|(m, _)| m.clone()).collect(),
            source_volume_ids: sources.to_vec(),
            created_secs: secs,
            created_nanos: nanos,
        };
        store::write_json(&self.group_file(&id), &group)?;
        Ok(group)
    }

    /// Deletes a group snapshot and its members. Idempotent. `expected`, when
    /// not empty, must list exactly the group's snapshots.
    pub fn delete_group(&self, id: &str, expected: &[String]) -> Result<(), PoolError> {
        let _lock = self.store.lock_group(id)?;
        let group = match self.group(id) {
            Ok(g) => g,
            Err(PoolError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        check_members(&group, expected)?;
        // Members first: a crash part-way leaves the record naming members
        // that are gone, and a retried delete finishes the job.
        for member in &group.snapshot_ids {
            self.remove_member(member)?;
        }
        self.discard(&self.group_file(id))?;
        self.sizes_changed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_member_lists_must_match_exactly() {
        let g = GroupMeta {
            format: FORMAT,
            id: "g".into(),
            name: "g".into(),
            snapshot_ids: vec!["a".into(), "b".into()],
            source_volume_ids: vec![],
            created_secs: 0,
            created_nanos: 0,
        };
        check_members(&g, &[]).unwrap();
        check_members(&g, &["b".into(), "a".into()]).unwrap();
        assert!(check_members(&g, &["a".into()]).is_err());
        assert!(check_members(&g, &["a".into(), "c".into()]).is_err());
    }
}
