//! Operator tools: a CSI client for any driver's socket, a pool report, a
//! host doctor, a benchmark and a trim. They share the binary so an
//! operator has them wherever the driver is installed. What they build
//! requests with ([`requests`]) and measure with ([`stats`]) is theirs; the
//! test kit (`filevol-kit`) and the benchmarks use the same builders and
//! statistics from here, so a figure the tools print and one a benchmark
//! prints are the same statistic.

pub mod bench;
pub mod block_metadata;
pub mod client;
pub mod doctor;
pub mod json;
pub mod report;
pub mod requests;
pub mod stats;
pub mod trim;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The endpoint is not usable.
    #[error("endpoint")]
    Endpoint(#[from] crate::endpoint::EndpointError),
    /// The call failed.
    #[error("{call}")]
    Rpc {
        /// The RPC.
        call: &'static str,
        /// gRPC's error, status code and message included.
        #[source]
        source: grpcio::Error,
    },
    /// The pool could not be read.
    #[error("read the pool")]
    Pool(#[from] filevol_core::pool::PoolError),
    /// Output could not be written.
    #[error("write the report")]
    Output(#[source] std::io::Error),
    /// The doctor found problems.
    #[error("{0} check(s) failed")]
    ChecksFailed(usize),
    /// A load generator could not undo what it made; what is left is listed
    /// in its report.
    #[error("{0} object(s) the run made could not be cleaned up; see the report")]
    LeftBehind(usize),
    /// The directory is not a filevol pool.
    #[error("{0} is not a filevol pool (it has no volumes/ and snapshots/ directories): give --pool, or the directory `filevol serve --pool` uses")]
    NotAPool(std::path::PathBuf),
    /// Calls of a load generator's run were refused or failed (busy answers
    /// aside): the errors by RPC and code.
    #[error("{0} call(s) of the load failed ({1}); its figures are not of the load asked for")]
    CallsFailed(usize, String),
    /// A driver's answer broke a promise of the CSI spec.
    #[error("{call}: the driver's answer breaks the CSI spec: {why}")]
    Broken {
        /// The RPC.
        call: &'static str,
        /// Which promise, and how.
        why: String,
    },
    /// Trims of staged volumes failed; the answer says why, per volume.
    #[error("{0} trim(s) failed; see the table")]
    TrimsFailed(usize),
    /// A load generator's set-up made nothing to run the load on.
    #[error("nothing to run the load on: {0}")]
    NoLoad(String),
}
