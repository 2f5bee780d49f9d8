//! What the pool records about its objects, as small JSON files written
//! crash-safely beside the data. The field names are the on-disk format:
//! rename none without a migration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the metadata format.
pub const FORMAT: u32 = 1;

/// How a volume stores its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// A sparse (or preallocated) image file behind a loop device.
    Image,
    /// A directory, for ReadWriteMany: on a btrfs pool a subvolume with a
    /// qgroup limit (see [`VolumeMeta::subvolume`]), elsewhere a plain
    /// directory without size enforcement.
    Dir,
}

impl Layout {
    /// Whether an expansion is finished on the node: an image's loop
    /// device and filesystem grow where it is staged (NodeExpandVolume); a
    /// directory has nothing to grow.
    pub fn expands_on_node(self) -> bool {
        match self {
            Layout::Image => true,
            Layout::Dir => false,
        }
    }
}

/// How the volume is handed to the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessType {
    /// A mounted filesystem.
    Mount,
    /// A raw block device.
    Block,
}

/// Filesystems the node can make and grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// ext4 (the default).
    Ext4,
    /// XFS; clones share their source's UUID, so the node mounts it `nouuid`.
    Xfs,
    /// btrfs.
    Btrfs,
}

impl FsType {
    /// Parses a CSI `fs_type`; empty means the default, ext4.
    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "" | "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            "btrfs" => Some(FsType::Btrfs),
            _ => None,
        }
    }

    /// The name mkfs and mount know it by.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
        }
    }

    /// Smallest volume of this filesystem, in bytes: what mkfs will make,
    /// and for btrfs what the kernel will resize (its ioctl refuses any
    /// size below 256 MiB, so a smaller btrfs could never grow online).
    pub fn min_bytes(self) -> u64 {
        match self {
            FsType::Ext4 => 1 << 20,
            FsType::Xfs => 300 << 20,
            FsType::Btrfs => 256 << 20,
        }
    }
}

/// CSI access modes, as filevol stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    /// ReadWriteOnce.
    SingleNodeWriter,
    /// Read-only on one node.
    SingleNodeReaderOnly,
    /// ReadOnlyMany.
    MultiNodeReaderOnly,
    /// One writer, many readers, across nodes.
    MultiNodeSingleWriter,
    /// ReadWriteMany.
    MultiNodeMultiWriter,
    /// ReadWriteOncePod.
    SingleNodeSingleWriter,
    /// Several writers on one node.
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// Whether the mode confines the volume to one node.
    pub fn is_single_node(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeWriter
                | AccessMode::SingleNodeReaderOnly
                | AccessMode::SingleNodeSingleWriter
                | AccessMode::SingleNodeMultiWriter
        )
    }

    /// Whether the mode only reads.
    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }

    /// Whether a layout can serve the mode safely. An image holds a
    /// single-writer filesystem: several nodes may only read it.
    pub fn supported_by(self, layout: Layout) -> bool {
        match layout {
            Layout::Dir => true,
            Layout::Image => !matches!(
                self,
                AccessMode::MultiNodeSingleWriter | AccessMode::MultiNodeMultiWriter
            ),
        }
    }
}

/// Where a volume's first content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Restored from a snapshot.
    Snapshot(String),
    /// Cloned from a volume.
    Volume(String),
}

/// A ControllerPublish record: this volume is attached to this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The node.
    pub node_id: String,
    /// The access mode it was published with.
    pub mode: AccessMode,
    /// Published read-only.
    pub readonly: bool,
}

/// Everything the pool knows about a volume (`volumes/<id>/meta.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Metadata format version.
    pub format: u32,
    /// The volume id.
    pub id: String,
    /// The CreateVolume name.
    pub name: String,
    /// Image or directory.
    pub layout: Layout,
    /// Size in bytes (for `dir`, enforced only on a subvolume).
    pub capacity_bytes: u64,
    /// Mount or block.
    pub access: AccessType,
    /// The filesystem, for mount volumes on images.
    pub fs_type: Option<FsType>,
    /// Whether the image is preallocated.
    pub thick: bool,
    /// Extra mkfs arguments, passed as separate argv entries.
    pub mkfs_options: Vec<String>,
    /// StorageClass parameters as given.
    pub parameters: BTreeMap<String, String>,
    /// Mutable parameters as last applied.
    pub mutable_parameters: BTreeMap<String, String>,
    /// Where the first content came from.
    pub source: Option<Source>,
    /// The topology segment the volume is reachable from.
    pub topology: BTreeMap<String, String>,
    /// Creation time, milliseconds since the epoch.
    pub created_unix_ms: u64,
    /// ControllerPublish records written by filevol before attachments got
    /// records of their own (`attachments/`, see
    /// `pool::attachments`). Never added to now, only
    /// removed from, so ask `Pool::attachments`
    /// which nodes a volume is published to: that is these and the records.
    /// Always written, even empty: a version that still expects the field
    /// must be able to read the record (a rollback, a replica not yet
    /// upgraded).
    #[serde(rename = "attachments", default)]
    pub legacy_attachments: Vec<Attachment>,
    /// Whether the image may hold data: set once a node has formatted it or
    /// handed it out as a raw block device, copied from the source by clones
    /// and restores. `Some(false)` only for an image nothing was ever
    /// written to; `None` in records made before this field, where only
    /// SEEK_DATA can prove an image blank. On a pool filesystem that cannot
    /// report holes (FUSE, NFS before 4.2) this record, with the signature
    /// probe, is what keeps a written volume from being formatted.
    #[serde(default)]
    pub written: Option<bool>,
    /// Whether the filesystem copied into a clone or restore has had its
    /// journal replayed (`node::settle`): a copy of a mounted filesystem
    /// carries one, which a read-only device cannot replay. Set once, by
    /// the first read-only stage, before any reader mounts it; false in
    /// records made before this field, whose first read-only stage then
    /// replays it (a clean journal replays to nothing). Means nothing for
    /// a volume without a source.
    #[serde(default)]
    pub settled: bool,
    /// A format in place is under way, or was cut short: set, durably,
    /// before a node writes the first byte of a filesystem into the image
    /// itself (thick volumes: a second copy would need twice the space),
    /// cleared in the same record write that sets `written`, after the
    /// filesystem is synced. While set, the image holds nothing but
    /// filevol's own half-made filesystem, never handed out: the next
    /// read-write stage formats it again (never a read-only one, which is
    /// refused), and the probe is not asked whether it looks formatted.
    /// Absent in older records and while false, so those read and write
    /// as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub formatting: bool,
    /// Whether a `dir` volume's data is a btrfs subvolume whose qgroup
    /// limit is `capacity_bytes` (`pool::subvolumes`). False for image
    /// volumes, for dir volumes on other filesystems, and in records made
    /// before subvolumes: those directories stay plain.
    #[serde(default)]
    pub subvolume: bool,
}

impl VolumeMeta {
    /// Whether a read-only stage must first have the journal of the copied
    /// filesystem replayed (see [`VolumeMeta::settled`]): a clone or
    /// restore of a filesystem image, not settled yet.
    pub fn needs_settling(&self) -> bool {
        self.source.is_some()
            && !self.settled
            && self.layout == Layout::Image
            && self.access == AccessType::Mount
    }
}

/// How a snapshot's data was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMethod {
    /// FICLONE, or a btrfs subvolume snapshot: shares blocks with the
    /// source.
    Reflink,
    /// A byte copy that skips holes.
    Sparse,
}

/// A snapshot (`snapshots/<id>/meta.json`). It exists only once its data is
/// complete, so it is always ready to use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Metadata format version.
    pub format: u32,
    /// The snapshot id.
    pub id: String,
    /// The CreateSnapshot name.
    pub name: String,
    /// The volume it was taken from.
    pub source_volume_id: String,
    /// The source's capacity.
    pub size_bytes: u64,
    /// The source's layout, access type and filesystem, for restores.
    pub layout: Layout,
    /// See [`VolumeMeta::access`].
    pub access: AccessType,
    /// See [`VolumeMeta::fs_type`].
    pub fs_type: Option<FsType>,
    /// How the data was copied.
    pub method: CopyMethod,
    /// The group snapshot it belongs to.
    pub group_id: Option<String>,
    /// Creation time, seconds and nanoseconds since the epoch.
    pub created_secs: i64,
    /// See `created_secs`.
    pub created_nanos: i32,
    /// The source volume's [`VolumeMeta::written`] when it was taken.
    #[serde(default)]
    pub written: Option<bool>,
    /// Whether the data is a read-only btrfs subvolume, snapshotted from a
    /// subvolume `dir` volume at one instant (its `method` is `reflink`:
    /// it shares every extent with its source).
    #[serde(default)]
    pub subvolume: bool,
}

/// A group snapshot (`groups/<id>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMeta {
    /// Metadata format version.
    pub format: u32,
    /// The group id.
    pub id: String,
    /// The CreateVolumeGroupSnapshot name.
    pub name: String,
    /// Member snapshots, in the order of their source volumes.
    pub snapshot_ids: Vec<String>,
    /// The volumes snapshotted.
    pub source_volume_ids: Vec<String>,
    /// Creation time, seconds since the epoch.
    pub created_secs: i64,
    /// See `created_secs`.
    pub created_nanos: i32,
}

/// A node plugin that serves this pool (`nodes/<id>.json`), written at the
/// node plugin's start so the controller can tell a real node from a typo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node id.
    pub node_id: String,
    /// Its topology segment.
    pub topology: BTreeMap<String, String>,
    /// How many volumes it accepts (0: no limit).
    #[serde(default)]
    pub max_volumes: u32,
}
