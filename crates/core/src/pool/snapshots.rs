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
use std::time::{Duration, Instant};

use super::error::io_error;
use super::freeze::{FreezeAnswer, PostedRequest, ANSWER_WAIT, COPY_DEADLINE};
use super::room::Need;
use super::store::{self, Kind};
use super::subvolumes;
use super::volumes::ImageLock;
use super::{copy, now_ts, page, remove_built, source_missing, Pool, PoolError};
use crate::faults::crash_point;
use crate::sys::fs as sysfs;
use crate::sys::lock::LockKind;
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
        if v.formatting {
            // Its image holds a half-made filesystem that only a stage of
            // the volume itself knows to make again; a restore would not.
            return Err(PoolError::InUse(format!(
                "volume {source}'s first format was cut short; stage it once (its filesystem is made again) before taking a snapshot of it"
            )));
        }
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
        // Every member is copied at one instant: those attached for writing
        // anywhere are frozen by their node plugins for the copies; the
        // others are kept from being attached for writing meanwhile.
        let (writers, _readers) = self.group_writers(sources)?;
        let freeze = if writers.is_empty() {
            None
        } else {
            Some(self.freeze_writers(&id, &writers)?)
        };
        crash_point("group.frozen");
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
        })()
        .and_then(|()| freeze.as_ref().map_or(Ok(()), Freeze::still_holds));
        // Thawed here, before the members are committed: the copies are
        // made, and a pod's writes wait no longer than they must.
        drop(freeze);
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

    /// Splits a group's members into those attached for writing somewhere
    /// (their image's lock is held exclusively, by a loop device on some
    /// host) and the rest, whose shared image locks are returned: held
    /// until the group is made, they keep a writer from attaching to a
    /// member meanwhile.
    fn group_writers(&self, sources: &[String]) -> Result<(Vec<String>, Vec<File>), PoolError> {
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for source in sources {
            let v = self.volume(source).map_err(source_missing)?;
            if v.layout == Layout::Dir {
                // As before members were frozen: FAILED_PRECONDITION.
                return Err(PoolError::NeedsReflink(format!(
                    "volume {source} is a directory, which cannot be copied at one instant with the other members; group snapshots take image volumes on a pool that can reflink"
                )));
            }
            match self.lock_image(source, LockKind::Shared)? {
                ImageLock::Held(file) => readers.push(file),
                ImageLock::Busy => writers.push(source.clone()),
                ImageLock::NoImage => {}
            }
        }
        Ok((writers, readers))
    }

    /// Asks the node plugins to freeze the filesystems of `writers` (see
    /// [`freeze`](super::freeze)) and waits until every one is frozen, or
    /// refuses the group with the reason: a member that cannot be frozen
    /// (a raw block device), or one no node answered for in time.
    fn freeze_writers(&self, group: &str, writers: &[String]) -> Result<Freeze, PoolError> {
        let posted = self.post_freeze(group, writers)?;
        let started = Instant::now();
        loop {
            let answers = posted.answers()?;
            let refused: Vec<String> = answers
                .iter()
                .flat_map(|(a, _)| {
                    a.refused
                        .iter()
                        .filter(|(v, _)| writers.contains(v))
                        .map(|(v, why)| format!("volume {v} on node {}: {why}", a.node))
                })
                .collect();
            if !refused.is_empty() {
                return Err(PoolError::InUse(format!(
                    "group snapshot {group} cannot be taken at one instant: {}",
                    refused.join("; ")
                )));
            }
            let missing = unfrozen(writers, &answers);
            if missing.is_empty() {
                log::info!(
                    "group snapshot {group}: {} member(s) frozen after {} ms",
                    writers.len(),
                    started.elapsed().as_millis()
                );
                return Ok(Freeze {
                    posted,
                    started,
                    writers: writers.to_vec(),
                });
            }
            if started.elapsed() >= ANSWER_WAIT {
                return Err(PoolError::InUse(format!(
                    "group snapshot {group} cannot be taken at one instant: volume(s) {} are attached for writing and no node plugin froze them within {} s (their node plugin is down, or older than this controller)",
                    missing.join(", "),
                    ANSWER_WAIT.as_secs()
                )));
            }
            std::thread::sleep(ANSWER_POLL);
        }
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

/// How often a controller looks for the nodes' answers.
const ANSWER_POLL: Duration = Duration::from_millis(10);

/// The members of `writers` that no answer whose freeze holds has frozen.
fn unfrozen(writers: &[String], answers: &[(FreezeAnswer, bool)]) -> Vec<String> {
    writers
        .iter()
        .filter(|w| {
            !answers
                .iter()
                .any(|(a, holds)| *holds && a.frozen.contains(w))
        })
        .cloned()
        .collect()
}

/// The freeze of a group's writers, held while its members are copied;
/// dropping it withdraws the request, and the nodes thaw.
#[derive(Debug)]
struct Freeze {
    posted: PostedRequest,
    started: Instant,
    writers: Vec<String>,
}

impl Freeze {
    /// Checks, after the copies, that every freeze lasted through them:
    /// each answer is still held by its guardian, and the copies ended
    /// before any guardian's own deadline could come.
    fn still_holds(&self) -> Result<(), PoolError> {
        if self.started.elapsed() >= COPY_DEADLINE {
            return Err(PoolError::InUse(format!(
                "the members took {} ms to copy, longer than a freeze may last; nothing was kept",
                self.started.elapsed().as_millis()
            )));
        }
        let missing = unfrozen(&self.writers, &self.posted.answers()?);
        if !missing.is_empty() {
            return Err(PoolError::InUse(format!(
                "the freeze of volume(s) {} ended before the copies did (its node plugin or freeze guardian stopped); nothing was kept",
                missing.join(", ")
            )));
        }
        Ok(())
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
