//! `filevol client`: CSI calls by hand against any driver's socket, the job
//! `csc` does for Go drivers. Answers are printed in protobuf text format.

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};
use protobuf::MessageFull;

use super::OpsError;
use crate::endpoint::Endpoint;
use crate::proto::csi;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::grpc::{ControllerClient, IdentityClient, NodeClient};
use crate::units::parse_size;

/// Flags of `filevol client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The driver's socket.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///run/filevol/csi.sock"
    )]
    pub endpoint: String,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// The call to make.
    #[command(subcommand)]
    pub call: Call,
}

/// Access modes, by their CSI names in kebab case.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AccessModeArg {
    /// ReadWriteOnce.
    SingleNodeWriter,
    /// Read-only on one node.
    SingleNodeReaderOnly,
    /// ReadOnlyMany.
    MultiNodeReaderOnly,
    /// One writer, many readers.
    MultiNodeSingleWriter,
    /// ReadWriteMany.
    MultiNodeMultiWriter,
    /// ReadWriteOncePod.
    SingleNodeSingleWriter,
    /// Several writers on one node.
    SingleNodeMultiWriter,
}

/// How a volume is used: filesystem type or block, and access mode.
#[derive(Debug, Args, Clone)]
pub struct CapabilityArgs {
    /// Filesystem (mount volumes).
    #[arg(long, default_value = "ext4")]
    pub fs_type: String,
    /// A raw block volume instead of a filesystem.
    #[arg(long)]
    pub block: bool,
    /// Access mode.
    #[arg(long, value_enum, default_value_t = AccessModeArg::SingleNodeWriter)]
    pub mode: AccessModeArg,
}

/// The calls.
#[derive(Debug, Subcommand)]
pub enum Call {
    /// GetPluginInfo, GetPluginCapabilities and Probe.
    Identity,
    /// CreateVolume.
    CreateVolume {
        /// The volume name.
        name: String,
        /// Size (bytes, or with Ki/Mi/Gi/Ti).
        #[arg(long, default_value = "1Gi", value_parser = parse_size)]
        size: u64,
        /// StorageClass parameters, `key=value`, repeatable.
        #[arg(long = "param", value_parser = parse_pair)]
        params: Vec<(String, String)>,
        /// Restore from this snapshot.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone this volume.
        #[arg(long)]
        from_volume: Option<String>,
        /// The capability.
        #[command(flatten)]
        cap: CapabilityArgs,
    },
    /// DeleteVolume.
    DeleteVolume {
        /// The volume id.
        volume_id: String,
    },
    /// ListVolumes (every page).
    ListVolumes,
    /// GetCapacity.
    Capacity,
    /// ControllerExpandVolume.
    Expand {
        /// The volume id.
        volume_id: String,
        /// The new size.
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// CreateSnapshot.
    CreateSnapshot {
        /// The snapshot name.
        name: String,
        /// The source volume id.
        #[arg(long)]
        source: String,
    },
    /// DeleteSnapshot.
    DeleteSnapshot {
        /// The snapshot id.
        snapshot_id: String,
    },
    /// ListSnapshots (every page).
    ListSnapshots,
    /// NodeStageVolume.
    Stage {
        /// The volume id.
        volume_id: String,
        /// The staging path.
        #[arg(long)]
        staging_path: String,
        /// The capability.
        #[command(flatten)]
        cap: CapabilityArgs,
    },
    /// NodeUnstageVolume.
    Unstage {
        /// The volume id.
        volume_id: String,
        /// The staging path.
        #[arg(long)]
        staging_path: String,
    },
    /// NodePublishVolume.
    Publish {
        /// The volume id.
        volume_id: String,
        /// The staging path.
        #[arg(long)]
        staging_path: String,
        /// The target path.
        #[arg(long)]
        target_path: String,
        /// Publish read-only.
        #[arg(long)]
        readonly: bool,
        /// The capability.
        #[command(flatten)]
        cap: CapabilityArgs,
    },
    /// NodeUnpublishVolume.
    Unpublish {
        /// The volume id.
        volume_id: String,
        /// The target path.
        #[arg(long)]
        target_path: String,
    },
    /// NodeGetVolumeStats.
    Stats {
        /// The volume id.
        volume_id: String,
        /// The path the volume is published or staged at.
        #[arg(long)]
        volume_path: String,
    },
    /// NodeGetInfo.
    NodeInfo,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn capability(c: &CapabilityArgs) -> csi::VolumeCapability {
    let mode = match c.mode {
        AccessModeArg::SingleNodeWriter => Mode::SINGLE_NODE_WRITER,
        AccessModeArg::SingleNodeReaderOnly => Mode::SINGLE_NODE_READER_ONLY,
        AccessModeArg::MultiNodeReaderOnly => Mode::MULTI_NODE_READER_ONLY,
        AccessModeArg::MultiNodeSingleWriter => Mode::MULTI_NODE_SINGLE_WRITER,
        AccessModeArg::MultiNodeMultiWriter => Mode::MULTI_NODE_MULTI_WRITER,
        AccessModeArg::SingleNodeSingleWriter => Mode::SINGLE_NODE_SINGLE_WRITER,
        AccessModeArg::SingleNodeMultiWriter => Mode::SINGLE_NODE_MULTI_WRITER,
    };
    let mut cap = csi::VolumeCapability::new();
    let mut am = csi::volume_capability::AccessMode::new();
    am.mode = mode.into();
    cap.access_mode = Some(am).into();
    if c.block {
        cap.set_block(Default::default());
    } else {
        let mut m = csi::volume_capability::MountVolume::new();
        m.fs_type.clone_from(&c.fs_type);
        cap.set_mount(m);
    }
    cap
}

fn show<M: MessageFull>(out: &mut dyn std::io::Write, call: &str, m: &M) -> Result<(), OpsError> {
    writeln!(
        out,
        "{call}:\n{}",
        protobuf::text_format::print_to_string_pretty(m)
    )
    .map_err(OpsError::Output)
}

/// Makes the call and prints the answer to `out`.
pub fn run(args: ClientArgs, out: &mut dyn std::io::Write) -> Result<(), OpsError> {
    let endpoint = Endpoint::parse(&args.endpoint)?;
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let channel = ChannelBuilder::new(env).connect(&endpoint.grpc_address());
    let identity = IdentityClient::new(channel.clone());
    let controller = ControllerClient::new(channel.clone());
    let node = NodeClient::new(channel);
    let opt = || CallOption::default().timeout(Duration::from_secs(args.timeout));
    macro_rules! call {
        ($name:literal, $e:expr) => {
            $e.map_err(|source| OpsError::Rpc {
                call: $name,
                source,
            })?
        };
    }
    match args.call {
        Call::Identity => {
            show(
                out,
                "GetPluginInfo",
                &call!(
                    "GetPluginInfo",
                    identity.get_plugin_info_opt(&Default::default(), opt())
                ),
            )?;
            show(
                out,
                "GetPluginCapabilities",
                &call!(
                    "GetPluginCapabilities",
                    identity.get_plugin_capabilities_opt(&Default::default(), opt())
                ),
            )?;
            show(
                out,
                "Probe",
                &call!("Probe", identity.probe_opt(&Default::default(), opt())),
            )?;
        }
        Call::CreateVolume {
            name,
            size,
            params,
            from_snapshot,
            from_volume,
            cap,
        } => {
            let mut r = csi::CreateVolumeRequest::new();
            r.name = name;
            let mut range = csi::CapacityRange::new();
            range.required_bytes = i64::try_from(size).unwrap_or(i64::MAX);
            r.capacity_range = Some(range).into();
            r.volume_capabilities.push(capability(&cap));
            r.parameters = params.into_iter().collect();
            let mut source = csi::VolumeContentSource::new();
            if let Some(id) = from_snapshot {
                let mut s = csi::volume_content_source::SnapshotSource::new();
                s.snapshot_id = id;
                source.set_snapshot(s);
                r.volume_content_source = Some(source).into();
            } else if let Some(id) = from_volume {
                let mut s = csi::volume_content_source::VolumeSource::new();
                s.volume_id = id;
                source.set_volume(s);
                r.volume_content_source = Some(source).into();
            }
            show(
                out,
                "CreateVolume",
                &call!("CreateVolume", controller.create_volume_opt(&r, opt())),
            )?;
        }
        Call::DeleteVolume { volume_id } => {
            let mut r = csi::DeleteVolumeRequest::new();
            r.volume_id = volume_id;
            show(
                out,
                "DeleteVolume",
                &call!("DeleteVolume", controller.delete_volume_opt(&r, opt())),
            )?;
        }
        Call::ListVolumes => {
            let mut r = csi::ListVolumesRequest::new();
            loop {
                let page = call!("ListVolumes", controller.list_volumes_opt(&r, opt()));
                show(out, "ListVolumes", &page)?;
                if page.next_token.is_empty() {
                    break;
                }
                r.starting_token = page.next_token;
            }
        }
        Call::Capacity => {
            show(
                out,
                "GetCapacity",
                &call!(
                    "GetCapacity",
                    controller.get_capacity_opt(&Default::default(), opt())
                ),
            )?;
        }
        Call::Expand { volume_id, size } => {
            let mut r = csi::ControllerExpandVolumeRequest::new();
            r.volume_id = volume_id;
            let mut range = csi::CapacityRange::new();
            range.required_bytes = i64::try_from(size).unwrap_or(i64::MAX);
            r.capacity_range = Some(range).into();
            show(
                out,
                "ControllerExpandVolume",
                &call!(
                    "ControllerExpandVolume",
                    controller.controller_expand_volume_opt(&r, opt())
                ),
            )?;
        }
        Call::CreateSnapshot { name, source } => {
            let mut r = csi::CreateSnapshotRequest::new();
            r.name = name;
            r.source_volume_id = source;
            show(
                out,
                "CreateSnapshot",
                &call!("CreateSnapshot", controller.create_snapshot_opt(&r, opt())),
            )?;
        }
        Call::DeleteSnapshot { snapshot_id } => {
            let mut r = csi::DeleteSnapshotRequest::new();
            r.snapshot_id = snapshot_id;
            show(
                out,
                "DeleteSnapshot",
                &call!("DeleteSnapshot", controller.delete_snapshot_opt(&r, opt())),
            )?;
        }
        Call::ListSnapshots => {
            let mut r = csi::ListSnapshotsRequest::new();
            loop {
                let page = call!("ListSnapshots", controller.list_snapshots_opt(&r, opt()));
                show(out, "ListSnapshots", &page)?;
                if page.next_token.is_empty() {
                    break;
                }
                r.starting_token = page.next_token;
            }
        }
        Call::Stage {
            volume_id,
            staging_path,
            cap,
        } => {
            let mut r = csi::NodeStageVolumeRequest::new();
            r.volume_id = volume_id;
            r.staging_target_path = staging_path;
            r.volume_capability = Some(capability(&cap)).into();
            show(
                out,
                "NodeStageVolume",
                &call!("NodeStageVolume", node.node_stage_volume_opt(&r, opt())),
            )?;
        }
        Call::Unstage {
            volume_id,
            staging_path,
        } => {
            let mut r = csi::NodeUnstageVolumeRequest::new();
            r.volume_id = volume_id;
            r.staging_target_path = staging_path;
            show(
                out,
                "NodeUnstageVolume",
                &call!("NodeUnstageVolume", node.node_unstage_volume_opt(&r, opt())),
            )?;
        }
        Call::Publish {
            volume_id,
            staging_path,
            target_path,
            readonly,
            cap,
        } => {
            let mut r = csi::NodePublishVolumeRequest::new();
            r.volume_id = volume_id;
            r.staging_target_path = staging_path;
            r.target_path = target_path;
            r.readonly = readonly;
            r.volume_capability = Some(capability(&cap)).into();
            show(
                out,
                "NodePublishVolume",
                &call!("NodePublishVolume", node.node_publish_volume_opt(&r, opt())),
            )?;
        }
        Call::Unpublish {
            volume_id,
            target_path,
        } => {
            let mut r = csi::NodeUnpublishVolumeRequest::new();
            r.volume_id = volume_id;
            r.target_path = target_path;
            show(
                out,
                "NodeUnpublishVolume",
                &call!(
                    "NodeUnpublishVolume",
                    node.node_unpublish_volume_opt(&r, opt())
                ),
            )?;
        }
        Call::Stats {
            volume_id,
            volume_path,
        } => {
            let mut r = csi::NodeGetVolumeStatsRequest::new();
            r.volume_id = volume_id;
            r.volume_path = volume_path;
            show(
                out,
                "NodeGetVolumeStats",
                &call!(
                    "NodeGetVolumeStats",
                    node.node_get_volume_stats_opt(&r, opt())
                ),
            )?;
        }
        Call::NodeInfo => {
            show(
                out,
                "NodeGetInfo",
                &call!(
                    "NodeGetInfo",
                    node.node_get_info_opt(&Default::default(), opt())
                ),
            )?;
        }
    }
    Ok(())
}
