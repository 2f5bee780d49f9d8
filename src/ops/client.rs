//! `filevol client`: CSI calls by hand against any driver's socket, the job
//! `csc` does for Go drivers. Answers are printed in protobuf text format.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};
use protobuf::MessageDyn;

use super::OpsError;
use crate::endpoint::Endpoint;
use crate::ops::requests as req;
use crate::proto::csi;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::grpc::{ControllerClient, IdentityClient, NodeClient, SnapshotMetadataClient};

use super::block_metadata::{self, StreamArgs, Totals};
use filevol_core::units::parse_size;

/// Flags of `filevol client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The driver's socket. Default: the one `filevol serve` listens on
    /// when given none (/run/filevol/csi.sock as root, else under
    /// $XDG_RUNTIME_DIR or /tmp/filevol-$UID).
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// One JSON object per answer (`{"call": ..., "response": ...}`, a line
    /// each) instead of protobuf text.
    #[arg(long)]
    pub json: bool,
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
    /// Filesystem (mount volumes). Default: CreateVolume leaves it to the
    /// driver (ext4 for filevol); stage and publish use the volume's own,
    /// asked of the controller (ControllerGetVolume) where the endpoint
    /// serves it, else left to the driver.
    #[arg(long)]
    pub fs_type: Option<String>,
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
        /// Size (bytes, or with Ki/Mi/Gi/Ti). Default: the source's size for
        /// a clone or restore, else 1Gi.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
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
    /// ControllerPublishVolume.
    ControllerPublish {
        /// The volume id.
        volume_id: String,
        /// The node to publish to.
        #[arg(long)]
        node_id: String,
        /// Publish read-only.
        #[arg(long)]
        readonly: bool,
        /// The capability.
        #[command(flatten)]
        cap: CapabilityArgs,
    },
    /// ControllerUnpublishVolume.
    ControllerUnpublish {
        /// The volume id.
        volume_id: String,
        /// The node to unpublish from (empty: every node).
        #[arg(long, default_value = "")]
        node_id: String,
    },
    /// NodeExpandVolume: grows the filesystem after ControllerExpandVolume.
    NodeExpand {
        /// The volume id.
        volume_id: String,
        /// The path the volume is published or staged at.
        #[arg(long)]
        volume_path: String,
        /// The staging path, when the volume is staged.
        #[arg(long, default_value = "")]
        staging_path: String,
        /// The size asked for (default: none, the size the volume has).
        #[arg(value_parser = parse_size)]
        size: Option<u64>,
    },
    /// GetMetadataAllocated: the ranges of a snapshot that hold data (the
    /// stream read to its end and checked against the spec).
    Allocated {
        /// The snapshot id.
        snapshot_id: String,
        /// Offset, page size, output.
        #[command(flatten)]
        stream: StreamArgs,
    },
    /// GetMetadataDelta: the ranges that changed between two snapshots of
    /// one volume (the stream read to its end and checked against the spec).
    Delta {
        /// The earlier snapshot.
        base_snapshot_id: String,
        /// The later snapshot.
        target_snapshot_id: String,
        /// Offset, page size, output.
        #[command(flatten)]
        stream: StreamArgs,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// The capability for `c`, with what was not given taken from the volume:
/// the controller's volume context says block or mount and the filesystem
/// (ControllerGetVolume). An endpoint without the controller leaves both to
/// the driver (mount, its recorded filesystem).
fn capability_of(
    c: &CapabilityArgs,
    volume_id: &str,
    controller: &ControllerClient,
    opt: CallOption,
) -> csi::VolumeCapability {
    if c.block || c.fs_type.is_some() {
        return capability(c);
    }
    match volume_context(controller, opt, volume_id) {
        Some(ctx) => capability(&like(c, &ctx)),
        None => capability(c),
    }
}

/// A volume's context (layout, access, fsType) from the controller, when
/// the endpoint serves it and the volume exists.
fn volume_context(
    controller: &ControllerClient,
    opt: CallOption,
    volume_id: &str,
) -> Option<std::collections::HashMap<String, String>> {
    let got = controller
        .controller_get_volume_opt(&req::get_volume(volume_id), opt)
        .ok()?;
    Some(got.volume.volume_context.clone())
}

/// `c` with block/mount and the filesystem of the volume whose context is
/// `ctx`.
fn like(c: &CapabilityArgs, ctx: &std::collections::HashMap<String, String>) -> CapabilityArgs {
    CapabilityArgs {
        block: ctx.get("access").map(String::as_str) == Some("block"),
        fs_type: ctx.get("fsType").cloned(),
        mode: c.mode,
    }
}

/// The context of a clone's or restore's source volume (a snapshot's is its
/// source volume's), when the controller still has it.
fn source_context(
    controller: &ControllerClient,
    opt: &dyn Fn() -> CallOption,
    from_snapshot: Option<&str>,
    from_volume: Option<&str>,
) -> Option<std::collections::HashMap<String, String>> {
    let volume = match (from_snapshot, from_volume) {
        (Some(id), _) => {
            let page = controller
                .list_snapshots_opt(&req::find_snapshot(id), opt())
                .ok()?;
            page.entries.first()?.snapshot.source_volume_id.clone()
        }
        (None, Some(id)) => id.to_owned(),
        (None, None) => return None,
    };
    volume_context(controller, opt(), &volume)
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
    if c.block {
        req::block_cap(mode)
    } else {
        req::mount_cap(mode, c.fs_type.as_deref().unwrap_or_default())
    }
}

/// The size a clone or restore gets when none is given: its source's.
fn source_size(
    controller: &ControllerClient,
    opt: CallOption,
    from_snapshot: Option<&str>,
    from_volume: Option<&str>,
) -> Result<Option<u64>, OpsError> {
    let bytes = if let Some(id) = from_snapshot {
        let page = controller
            .list_snapshots_opt(&req::find_snapshot(id), opt)
            .map_err(|source| OpsError::Rpc {
                call: "ListSnapshots",
                source,
            })?;
        page.entries.first().map(|e| e.snapshot.size_bytes)
    } else if let Some(id) = from_volume {
        let got = controller
            .controller_get_volume_opt(&req::get_volume(id), opt)
            .map_err(|source| OpsError::Rpc {
                call: "ControllerGetVolume",
                source,
            })?;
        Some(got.volume.capacity_bytes)
    } else {
        None
    };
    Ok(bytes.and_then(|b| u64::try_from(b).ok()).filter(|b| *b > 0))
}

/// The totals line of a stream read with `--summary`.
fn summary(
    out: &mut dyn std::io::Write,
    json: bool,
    call: &str,
    a: StreamArgs,
    t: Totals,
) -> Result<(), OpsError> {
    if !a.summary {
        return Ok(());
    }
    let line = if json {
        serde_json::json!({
            "call": call,
            "messages": t.messages,
            "runs": t.runs,
            "bytes": t.bytes,
            "volume_capacity_bytes": t.capacity,
        })
        .to_string()
    } else {
        format!(
            "{call}: {} message(s), {} run(s), {} of {} bytes",
            t.messages, t.runs, t.bytes, t.capacity
        )
    };
    writeln!(out, "{line}").map_err(OpsError::Output)
}

fn show(
    out: &mut dyn std::io::Write,
    json: bool,
    call: &str,
    m: &dyn MessageDyn,
) -> Result<(), OpsError> {
    if json {
        let line = serde_json::json!({ "call": call, "response": super::json::message(m) });
        return writeln!(out, "{line}").map_err(OpsError::Output);
    }
    writeln!(
        out,
        "{call}:\n{}",
        protobuf::text_format::print_to_string_pretty(m)
    )
    .map_err(OpsError::Output)
}

/// Makes the call and prints the answer to `out`.
pub fn run(args: ClientArgs, out: &mut dyn std::io::Write) -> Result<(), OpsError> {
    let endpoint = match &args.endpoint {
        Some(e) => Endpoint::parse(e)?,
        None => crate::config::default_endpoint(),
    };
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let channel = ChannelBuilder::new(env).connect(&endpoint.grpc_address());
    let identity = IdentityClient::new(channel.clone());
    let controller = ControllerClient::new(channel.clone());
    let node = NodeClient::new(channel.clone());
    let metadata = SnapshotMetadataClient::new(channel);
    let opt = || CallOption::default().timeout(Duration::from_secs(args.timeout));
    let json = args.json;
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
                json,
                "GetPluginInfo",
                &call!(
                    "GetPluginInfo",
                    identity.get_plugin_info_opt(&Default::default(), opt())
                ),
            )?;
            show(
                out,
                json,
                "GetPluginCapabilities",
                &call!(
                    "GetPluginCapabilities",
                    identity.get_plugin_capabilities_opt(&Default::default(), opt())
                ),
            )?;
            show(
                out,
                json,
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
            let size = match size {
                Some(s) => s,
                None => source_size(
                    &controller,
                    opt(),
                    from_snapshot.as_deref(),
                    from_volume.as_deref(),
                )?
                .unwrap_or(1 << 30),
            };
            // A clone or restore is its source's shape unless told otherwise.
            let source = if cap.block || cap.fs_type.is_some() {
                None
            } else {
                source_context(
                    &controller,
                    &opt,
                    from_snapshot.as_deref(),
                    from_volume.as_deref(),
                )
            };
            let shape = match &source {
                Some(ctx) => capability(&like(&cap, ctx)),
                None => capability(&cap),
            };
            let mut r = req::create_volume(&name, req::size(size), shape);
            r.parameters = params.into_iter().collect();
            if let Some(layout) = source.as_ref().and_then(|ctx| ctx.get("layout")) {
                r.parameters
                    .entry("layout".into())
                    .or_insert_with(|| layout.clone());
            }
            if let Some(id) = &from_snapshot {
                r.volume_content_source = Some(req::snapshot_source(id)).into();
            } else if let Some(id) = &from_volume {
                r.volume_content_source = Some(req::volume_source(id)).into();
            }
            show(
                out,
                json,
                "CreateVolume",
                &call!("CreateVolume", controller.create_volume_opt(&r, opt())),
            )?;
        }
        Call::DeleteVolume { volume_id } => {
            let r = req::delete(&volume_id);
            show(
                out,
                json,
                "DeleteVolume",
                &call!("DeleteVolume", controller.delete_volume_opt(&r, opt())),
            )?;
        }
        Call::ListVolumes => {
            let mut r = req::list(0, "");
            loop {
                let page = call!("ListVolumes", controller.list_volumes_opt(&r, opt()));
                show(out, json, "ListVolumes", &page)?;
                if page.next_token.is_empty() {
                    break;
                }
                r.starting_token = page.next_token;
            }
        }
        Call::Capacity => {
            show(
                out,
                json,
                "GetCapacity",
                &call!(
                    "GetCapacity",
                    controller.get_capacity_opt(&Default::default(), opt())
                ),
            )?;
        }
        Call::Expand { volume_id, size } => {
            let r = req::expand(&volume_id, req::size(size));
            show(
                out,
                json,
                "ControllerExpandVolume",
                &call!(
                    "ControllerExpandVolume",
                    controller.controller_expand_volume_opt(&r, opt())
                ),
            )?;
        }
        Call::CreateSnapshot { name, source } => {
            let r = req::snapshot(&name, &source);
            show(
                out,
                json,
                "CreateSnapshot",
                &call!("CreateSnapshot", controller.create_snapshot_opt(&r, opt())),
            )?;
        }
        Call::DeleteSnapshot { snapshot_id } => {
            let r = req::delete_snapshot(&snapshot_id);
            show(
                out,
                json,
                "DeleteSnapshot",
                &call!("DeleteSnapshot", controller.delete_snapshot_opt(&r, opt())),
            )?;
        }
        Call::ListSnapshots => {
            let mut r = csi::ListSnapshotsRequest::new();
            loop {
                let page = call!("ListSnapshots", controller.list_snapshots_opt(&r, opt()));
                show(out, json, "ListSnapshots", &page)?;
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
            let cap = capability_of(&cap, &volume_id, &controller, opt());
            let r = req::stage(&volume_id, Path::new(&staging_path), cap);
            show(
                out,
                json,
                "NodeStageVolume",
                &call!("NodeStageVolume", node.node_stage_volume_opt(&r, opt())),
            )?;
        }
        Call::Unstage {
            volume_id,
            staging_path,
        } => {
            let r = req::unstage(&volume_id, Path::new(&staging_path));
            show(
                out,
                json,
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
            let cap = capability_of(&cap, &volume_id, &controller, opt());
            let r = req::publish(
                &volume_id,
                Path::new(&staging_path),
                Path::new(&target_path),
                cap,
                readonly,
            );
            show(
                out,
                json,
                "NodePublishVolume",
                &call!("NodePublishVolume", node.node_publish_volume_opt(&r, opt())),
            )?;
        }
        Call::Unpublish {
            volume_id,
            target_path,
        } => {
            let r = req::unpublish(&volume_id, Path::new(&target_path));
            show(
                out,
                json,
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
            let r = req::volume_stats(&volume_id, Path::new(&volume_path));
            show(
                out,
                json,
                "NodeGetVolumeStats",
                &call!(
                    "NodeGetVolumeStats",
                    node.node_get_volume_stats_opt(&r, opt())
                ),
            )?;
        }
        Call::ControllerPublish {
            volume_id,
            node_id,
            readonly,
            cap,
        } => {
            let cap = capability_of(&cap, &volume_id, &controller, opt());
            let r = req::controller_publish(&volume_id, &node_id, cap, readonly);
            show(
                out,
                json,
                "ControllerPublishVolume",
                &call!(
                    "ControllerPublishVolume",
                    controller.controller_publish_volume_opt(&r, opt())
                ),
            )?;
        }
        Call::ControllerUnpublish { volume_id, node_id } => {
            let r = req::controller_unpublish(&volume_id, &node_id);
            show(
                out,
                json,
                "ControllerUnpublishVolume",
                &call!(
                    "ControllerUnpublishVolume",
                    controller.controller_unpublish_volume_opt(&r, opt())
                ),
            )?;
        }
        Call::NodeExpand {
            volume_id,
            volume_path,
            staging_path,
            size,
        } => {
            let r = req::node_expand(
                &volume_id,
                Path::new(&volume_path),
                Some(Path::new(&staging_path)),
                size.map(req::size),
            );
            show(
                out,
                json,
                "NodeExpandVolume",
                &call!("NodeExpandVolume", node.node_expand_volume_opt(&r, opt())),
            )?;
        }
        Call::Allocated {
            snapshot_id,
            stream,
        } => {
            let totals =
                block_metadata::allocated(&metadata, opt(), &snapshot_id, stream, &mut |m| {
                    show(out, json, "GetMetadataAllocated", m)
                })?;
            summary(out, json, "GetMetadataAllocated", stream, totals)?;
        }
        Call::Delta {
            base_snapshot_id,
            target_snapshot_id,
            stream,
        } => {
            let totals = block_metadata::delta(
                &metadata,
                opt(),
                &base_snapshot_id,
                &target_snapshot_id,
                stream,
                &mut |m| show(out, json, "GetMetadataDelta", m),
            )?;
            summary(out, json, "GetMetadataDelta", stream, totals)?;
        }
        Call::NodeInfo => {
            show(
                out,
                json,
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
