//! `filevol trim`: asks a running node plugin to trim its staged volumes
//! now (the `TrimVolumes` call of `proto/filevol.proto`), and prints what
//! each gave back to the pool.
//!
//! The trims run inside the node plugin, not in this process: the plugin
//! is what keeps a trim apart from a stage or unstage of the same volume,
//! and what counts the bytes reclaimed in its metrics.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};
use serde::Serialize;

use super::OpsError;
use crate::endpoint::Endpoint;
use crate::proto::filevol::TrimVolumesRequest;
use crate::proto::grpc::NodeMaintenanceClient;
use filevol_core::units::human;

/// Flags of `filevol trim`.
#[derive(Debug, Args)]
pub struct TrimArgs {
    /// The node plugin's socket. Default: the one `filevol serve` listens
    /// on when given none (/run/filevol/csi.sock as root).
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Seconds to wait for the answer (a trim of many large volumes takes
    /// a while).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Volumes to trim. Default: every filesystem volume staged on the node.
    pub volume_ids: Vec<String>,
}

/// One volume's line of the answer.
#[derive(Debug, Serialize)]
struct Row {
    volume_id: String,
    path: String,
    trimmed: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    skipped: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
    discarded_bytes: u64,
    allocated_bytes_before: u64,
    allocated_bytes_after: u64,
    reclaimed_bytes: u64,
}

/// Runs `filevol trim`, writing to `out`.
pub fn run(args: TrimArgs, out: &mut dyn std::io::Write) -> Result<(), OpsError> {
    let endpoint = match &args.endpoint {
        Some(e) => Endpoint::parse(e)?,
        None => crate::config::default_endpoint(),
    };
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let client =
        NodeMaintenanceClient::new(ChannelBuilder::new(env).connect(&endpoint.grpc_address()));
    let mut req = TrimVolumesRequest::new();
    req.volume_ids.clone_from(&args.volume_ids);
    let resp = client
        .trim_volumes_opt(
            &req,
            CallOption::default().timeout(Duration::from_secs(args.timeout)),
        )
        .map_err(|source| OpsError::Rpc {
            call: "TrimVolumes",
            source,
        })?;
    let rows: Vec<Row> = resp
        .volumes
        .into_iter()
        .map(|v| Row {
            reclaimed_bytes: v
                .allocated_bytes_before
                .saturating_sub(v.allocated_bytes_after),
            volume_id: v.volume_id,
            path: v.path,
            trimmed: v.trimmed,
            skipped: v.skipped,
            error: v.error,
            discarded_bytes: v.discarded_bytes,
            allocated_bytes_before: v.allocated_bytes_before,
            allocated_bytes_after: v.allocated_bytes_after,
        })
        .collect();
    let w =
        |out: &mut dyn std::io::Write, s: String| writeln!(out, "{s}").map_err(OpsError::Output);
    let failed = rows.iter().filter(|r| !r.error.is_empty()).count();
    let result = if failed == 0 {
        Ok(())
    } else {
        Err(OpsError::TrimsFailed(failed))
    };
    if args.json {
        w(
            out,
            serde_json::to_string_pretty(&rows).expect("rows serialise"),
        )?;
        return result;
    }
    if rows.is_empty() {
        return w(
            out,
            "no filesystem volume of the pool is staged on this node".into(),
        );
    }
    w(
        out,
        format!(
            "{:<44} {:>10} {:>10} {:>10} {:>10}  RESULT",
            "VOLUME", "DISCARDED", "BEFORE", "AFTER", "RECLAIMED"
        ),
    )?;
    for r in &rows {
        let outcome = if r.trimmed {
            "trimmed".to_owned()
        } else if r.error.is_empty() {
            format!("skipped: {}", r.skipped)
        } else {
            format!("failed: {}", r.error)
        };
        w(
            out,
            format!(
                "{:<44} {:>10} {:>10} {:>10} {:>10}  {outcome}",
                r.volume_id,
                human(r.discarded_bytes),
                human(r.allocated_bytes_before),
                human(r.allocated_bytes_after),
                human(r.reclaimed_bytes),
            ),
        )?;
    }
    result
}
