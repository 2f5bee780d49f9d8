//! Node registrations and ControllerPublish records.
//!
//! An attachment is an empty file in `<pool>/attachments/` whose name is the
//! whole record:
//!
//! ```text
//! <volume id>@<volume created_unix_ms>@<node id>@<access mode>@<rw|ro>
//! pvc-1-9c2d...@1718000000000@node-a@single_node_writer@rw
//! ```
//!
//! Why a name and not a field of `meta.json` (where filevol kept them before):
//! a publish or unpublish then costs one directory fsync and no rename,
//! instead of rewriting the volume's record (temp file, fsync, rename,
//! directory fsync); and one readdir answers both "which nodes is this
//! volume on" and "how many volumes is this node attached to", which
//! otherwise meant reading every volume's record. The crash-safety argument
//! is at [`Pool::publish`] and [`Pool::unpublish`].
//!
//! `@` cannot occur in an id ([`ids::check`]: letters, digits, `-`, `_`,
//! `.`) nor in a mode's name, so the name splits back unambiguously.
//!
//! The creation stamp ties a record to one *incarnation* of its volume: ids
//! come from names, so a volume deleted and made again gets the same id, and
//! a record left behind by the first (its volume directory removed by hand,
//! or deleted by an older filevol that did not know these records) must not
//! make the second look attached. A record whose volume is gone, or has
//! another stamp, is stale for good: readers ignore it, and anyone may
//! remove it (`Pool::remove_stale_attachments`).
//!
//! Pools written before these records hold attachments in `meta.json`
//! ([`VolumeMeta::legacy_attachments`]). Readers take the union, unpublish
//! removes either kind, and a controller's start moves the old ones into
//! records (see `janitor`), after which the per-node count is exact from
//! the directory alone.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::IntoDeserializer;
use serde::Deserialize;

use super::error::io_error;
use super::store::{self, ObjectLock};
use super::{Pool, PoolError};
use crate::sys::fs as sysfs;
use crate::volume::ids;
use crate::volume::meta::{AccessMode, Attachment, NodeRecord, VolumeMeta};

/// The pool directory holding the records.
pub const DIR: &str = "attachments";

/// Separates the fields of a record's name; never part of an id or a mode.
const SEP: char = '@';

/// Longest file name the filesystems a pool lives on accept. Volume ids are
/// derived (at most 57 characters), node ids at most [`ids::MAX_ID_LEN`],
/// modes at most 25: a record's name is at most 230 bytes.
const NAME_MAX: usize = 255;

/// One ControllerPublish record, as its file name carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    /// The volume id.
    volume: String,
    /// The volume's [`VolumeMeta::created_unix_ms`]: which incarnation.
    created: u64,
    /// The node, mode and read-only flag.
    attachment: Attachment,
}

impl Record {
    fn of(v: &VolumeMeta, attachment: Attachment) -> Record {
        Record {
            volume: v.id.clone(),
            created: v.created_unix_ms,
            attachment,
        }
    }

    /// The file name, or why this record cannot have one.
    fn name(&self) -> Result<String, PoolError> {
        let a = &self.attachment;
        for (what, id) in [("volume", &self.volume), ("node", &a.node_id)] {
            ids::check(id).map_err(|e| PoolError::Unsupported(format!("{what} id {id:?}: {e}")))?;
        }
        let name = format!(
            "{}{SEP}{}{SEP}{}{SEP}{}{SEP}{}",
            self.volume,
            self.created,
            a.node_id,
            mode_name(a.mode),
            if a.readonly { "ro" } else { "rw" }
        );
        if name.len() > NAME_MAX {
            return Err(PoolError::Unsupported(format!(
                "node id {:?} is too long for an attachment record of volume {}",
                a.node_id, self.volume
            )));
        }
        Ok(name)
    }

    /// The record a file name carries; `None` for any other name.
    fn parse(name: &str) -> Option<Record> {
        let mut fields = name.split(SEP);
        let mut next = || fields.next();
        let (volume, created, node, mode, rw) = (next()?, next()?, next()?, next()?, next()?);
        if next().is_some() || ids::check(volume).is_err() || ids::check(node).is_err() {
            return None;
        }
        Some(Record {
            volume: volume.to_owned(),
            created: created.parse().ok()?,
            attachment: Attachment {
                node_id: node.to_owned(),
                mode: parse_mode(mode)?,
                readonly: match rw {
                    "ro" => true,
                    "rw" => false,
                    _ => return None,
                },
            },
        })
    }

    /// Whether the record belongs to this incarnation of `v`.
    fn is_of(&self, v: &VolumeMeta) -> bool {
        self.volume == v.id && self.created == v.created_unix_ms
    }
}

/// A mode's name in a record: the one serde gives it in `meta.json`, so the
/// pool spells each mode one way.
fn mode_name(mode: AccessMode) -> String {
    match serde_json::to_value(mode) {
        Ok(serde_json::Value::String(name)) => name,
        other => unreachable!("access modes serialise as strings, not {other:?}"),
    }
}

fn parse_mode(name: &str) -> Option<AccessMode> {
    let name: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        name.into_deserializer();
    AccessMode::deserialize(name).ok()
}

/// Every ControllerPublish record of a pool, read with one readdir of
/// `attachments/`: read it once per decision or listing, then ask
/// [`Attachments::of`] for each volume.
#[derive(Debug, Default)]
pub struct Attachments {
    records: Vec<Record>,
}

impl Attachments {
    /// Reads the records of the pool at `root`, now. A pool that no
    /// filevol with records has opened yet has none. Names that are not
    /// records (a tool's temporary file) are skipped, never removed.
    pub fn read(root: &Path) -> Result<Attachments, PoolError> {
        let dir = root.join(DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Attachments::default()),
            Err(e) => return Err(io_error("read directory", &dir)(e)),
        };
        let mut records = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("read directory", &dir))?;
            if let Some(r) = entry.file_name().to_str().and_then(Record::parse) {
                records.push(r);
            }
        }
        Ok(Attachments { records })
    }

    /// The nodes `v` is published to: its records and any
    /// [`VolumeMeta::legacy_attachments`], one entry per node (a crash while
    /// a controller moved an old entry into a record can leave both).
    pub fn of(&self, v: &VolumeMeta) -> Vec<Attachment> {
        let mut out: Vec<Attachment> = self
            .records
            .iter()
            .filter(|r| r.is_of(v))
            .map(|r| r.attachment.clone())
            .collect();
        for a in &v.legacy_attachments {
            if !out.iter().any(|b| b.node_id == a.node_id) {
                out.push(a.clone());
            }
        }
        out
    }

    fn records_of<'a>(&'a self, v: &'a VolumeMeta) -> impl Iterator<Item = &'a Record> + 'a {
        self.records.iter().filter(move |r| r.is_of(v))
    }
}

impl Pool {
    /// Records that node `node` is a node plugin serving this pool.
    pub fn register_node(&self, record: &NodeRecord) -> Result<(), PoolError> {
        ids::check(&record.node_id)
            .map_err(|e| PoolError::Unsupported(format!("node id {:?}: {e}", record.node_id)))?;
        store::write_json(
            &self
                .root
                .join("nodes")
                .join(format!("{}.json", record.node_id)),
            record,
        )
    }

    /// The registration of the node plugin with this id, `None` when it has
    /// none (no record: ENOENT). A record that cannot be read is an error,
    /// not an unknown node.
    pub fn node_record(&self, node: &str) -> Result<Option<NodeRecord>, PoolError> {
        if ids::check(node).is_err() {
            return Ok(None);
        }
        match store::read_json(&self.root.join("nodes").join(format!("{node}.json"))) {
            Ok(record) => Ok(Some(record)),
            Err(PoolError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn attachments_dir(&self) -> PathBuf {
        self.root.join(DIR)
    }

    /// Every ControllerPublish record in the pool, read now (one readdir).
    pub fn attachments(&self) -> Result<Attachments, PoolError> {
        Attachments::read(&self.root)
    }

    /// ControllerPublish: attaches the volume to `node`.
    ///
    /// Crash safety: the record is an empty file created with `O_EXCL`, so
    /// it exists whole or not at all and has no data to sync; one fsync of
    /// `attachments/` makes it durable before the CO is answered. A crash
    /// before that fsync can lose only a record whose call was never
    /// answered, and the CO retries such a call until it is (CSI requires
    /// it), which makes the record again. No rename is needed: nothing is
    /// replaced.
    pub fn publish(
        &self,
        id: &str,
        node: &str,
        mode: AccessMode,
        readonly: bool,
    ) -> Result<VolumeMeta, PoolError> {
        // Serialises publishes and unpublishes of this volume across
        // replicas and hosts: the checks below and the record are one step.
        let _lock = self.lock_volume(id)?;
        let v = self.volume(id)?;
        let Some(registered) = self.node_record(node)? else {
            return Err(PoolError::NodeNotFound(node.to_owned()));
        };
        let all = self.attachments()?;
        let current = all.of(&v);
        if let Some(a) = current.iter().find(|a| a.node_id == node) {
            return if a.mode == mode && a.readonly == readonly {
                Ok(v)
            } else {
                Err(PoolError::AttachedIncompatibly {
                    id: id.to_owned(),
                    node: node.to_owned(),
                })
            };
        }
        if registered.max_volumes > 0 {
            let attached = self.count_attached(&all, node);
            if attached >= registered.max_volumes as usize {
                return Err(PoolError::AttachLimit {
                    node: node.to_owned(),
                    max: registered.max_volumes,
                });
            }
        }
        if let Some(other) = current
            .iter()
            .find(|a| a.node_id != node && (a.mode.is_single_node() || mode.is_single_node()))
        {
            return Err(PoolError::AttachedElsewhere {
                id: id.to_owned(),
                node: other.node_id.clone(),
            });
        }
        let record = Record::of(
            &v,
            Attachment {
                node_id: node.to_owned(),
                mode,
                readonly,
            },
        );
        self.create_records(std::slice::from_ref(&record))?;
        Ok(v)
    }

    /// How many volumes `node` is attached to, from the records alone:
    /// legacy entries in `meta.json` were moved into records when a
    /// controller opened the pool. A record counts unless its volume is
    /// gone or is another incarnation; a volume whose record cannot be
    /// read keeps counting (refusing one attach too many is the safe side).
    /// Reads the records of this node's volumes only (at most its limit),
    /// not every volume's.
    fn count_attached(&self, all: &Attachments, node: &str) -> usize {
        all.records
            .iter()
            .filter(|r| r.attachment.node_id == node)
            .filter(|r| match self.volume(&r.volume) {
                Ok(v) => v.created_unix_ms == r.created,
                Err(PoolError::NotFound { .. }) => false,
                Err(_) => true,
            })
            .count()
    }

    /// Creates records and makes them durable with one fsync of the
    /// directory (see [`Pool::publish`]). A record already there is whole
    /// (it has no content), so finding it is success.
    fn create_records(&self, records: &[Record]) -> Result<(), PoolError> {
        let dir = self.attachments_dir();
        for r in records {
            let path = dir.join(r.name()?);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error("create", &path)(e)),
            }
        }
        sysfs::fsync_dir(&dir).map_err(io_error("sync", &dir))
    }

    /// Removes records; `Ok(true)` when any was there. Not made durable:
    /// the caller fsyncs when it must.
    fn remove_records<'a>(
        &self,
        records: impl IntoIterator<Item = &'a Record>,
    ) -> Result<bool, PoolError> {
        let dir = self.attachments_dir();
        let mut removed = false;
        for r in records {
            let path = dir.join(r.name()?);
            match std::fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", &path)(e)),
            }
        }
        Ok(removed)
    }

    /// ControllerUnpublish: detaches the volume from `node` (every node when
    /// `None`). A volume or attachment that is gone is already unpublished.
    ///
    /// Crash safety: the records go by unlink, then one fsync of
    /// `attachments/` before the CO is answered. A crash before it can bring
    /// a record back, but only for a call that was never answered, and the
    /// CO retries it. An entry in a pool's old `meta.json` goes by
    /// rewriting that record (only then).
    pub fn unpublish(&self, id: &str, node: Option<&str>) -> Result<(), PoolError> {
        let lock = match self.lock_volume(id) {
            Ok(lock) => lock,
            Err(PoolError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut v = match self.volume(id) {
            Ok(v) => v,
            Err(PoolError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let detached = |a: &Attachment| node.is_none_or(|n| a.node_id == n);
        let all = self.attachments()?;
        let gone = all.records_of(&v).filter(|r| detached(&r.attachment));
        if self.remove_records(gone)? {
            let dir = self.attachments_dir();
            sysfs::fsync_dir(&dir).map_err(io_error("sync", &dir))?;
        }
        let before = v.legacy_attachments.len();
        v.legacy_attachments.retain(|a| !detached(a));
        if v.legacy_attachments.len() != before {
            self.update_volume(&v, &lock)?;
        }
        Ok(())
    }

    /// Removes the records of volume `only` (every volume when `None`) that
    /// are stale: their volume is gone, or is another incarnation (another
    /// creation stamp). Such a record can never become current again, so
    /// removing it needs no lock. The records are listed *before* their
    /// volumes are read: a record made meanwhile belongs to a volume that
    /// exists, and is not in the list. A volume whose record cannot be read
    /// keeps its records: only a volume proven absent (`Store::read` says
    /// NotFound only on ENOENT) or of another incarnation makes a record
    /// stale. Not made durable: readers ignore stale records
    /// anyway, so one that a crash brings back changes nothing.
    pub(super) fn remove_stale_attachments(&self, only: Option<&str>) -> Result<(), PoolError> {
        let all = self.attachments()?;
        let stale: Vec<&Record> = all
            .records
            .iter()
            .filter(|r| only.is_none_or(|id| r.volume == id))
            .filter(|r| match self.volume(&r.volume) {
                Ok(v) => v.created_unix_ms != r.created,
                Err(PoolError::NotFound { .. }) => true,
                Err(e) => {
                    log::warn!(
                        "keeping the attachment of volume {} to node {}: the volume cannot be read: {}",
                        r.volume,
                        r.attachment.node_id,
                        crate::error_chain::message_chain(&e)
                    );
                    false
                }
            })
            .collect();
        for r in &stale {
            log::info!(
                "removing the attachment of volume {} to node {}: the volume it was made for is gone",
                r.volume,
                r.attachment.node_id
            );
        }
        self.remove_records(stale)?;
        Ok(())
    }

    /// Moves the attachments an older filevol kept in the volume's
    /// `meta.json` into records; the caller holds the volume's lock. The
    /// records are durable before `meta.json` drops the entries, so a crash
    /// in between leaves both, which readers take as one.
    pub(super) fn move_legacy_attachments(
        &self,
        id: &str,
        held: &ObjectLock,
    ) -> Result<(), PoolError> {
        let mut v = self.volume(id)?;
        if v.legacy_attachments.is_empty() {
            return Ok(());
        }
        let records: Vec<Record> = v
            .legacy_attachments
            .iter()
            .map(|a| Record::of(&v, a.clone()))
            .collect();
        self.create_records(&records)?;
        v.legacy_attachments.clear();
        self.update_volume(&v, held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_round_trip_and_nothing_else_parses() {
        let r = Record {
            volume: "pvc-1-0123456789abcdef".into(),
            created: 1_718_000_000_000,
            attachment: Attachment {
                node_id: "node_a.example".into(),
                mode: AccessMode::SingleNodeSingleWriter,
                readonly: true,
            },
        };
        let name = r.name().unwrap();
        assert_eq!(
            name,
            "pvc-1-0123456789abcdef@1718000000000@node_a.example@single_node_single_writer@ro"
        );
        assert_eq!(Record::parse(&name), Some(r.clone()));
        for bad in [
            "",
            ".tmp",
            "v@1@n@single_node_writer",
            "v@1@n@single_node_writer@rw@x",
            "v@x@n@single_node_writer@rw",
            "v@1@n@sometimes@rw",
            "v@1@n@single_node_writer@yes",
            "v@1@.n@single_node_writer@rw",
            "@1@n@single_node_writer@rw",
        ] {
            assert_eq!(Record::parse(bad), None, "{bad:?}");
        }
        let long = Record {
            attachment: Attachment {
                node_id: "n".repeat(ids::MAX_ID_LEN),
                ..r.attachment.clone()
            },
            ..r.clone()
        };
        assert!(long.name().is_ok(), "a derived id and any node id fit");
        let bad_node = Record {
            attachment: Attachment {
                node_id: "a@b".into(),
                ..r.attachment
            },
            ..r
        };
        assert!(bad_node.name().is_err());
    }
}
