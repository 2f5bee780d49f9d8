//! filevol: a Kubernetes CSI driver that turns a directory into sized
//! volumes.
//!
//! The shape is fixed and synchronous: a grpcio server decodes each call on
//! its completion-queue thread, [`service`] validates it into a typed job,
//! and [`executor`] runs the job on a bounded pool of worker threads that
//! make the blocking syscalls, with a per-volume lock table keeping calls on
//! one volume serialised. There is no async runtime.
//!
//! What a volume is and what is done to one lives in `filevol-core`; this
//! crate translates CSI calls into calls on it. Its modules are public only
//! where something outside uses them: the binary (`cli`, `config`,
//! `logging`, `server`, `ops`), the integration tests (`proto`, `ops`) and
//! the test kit's fuzz entry points (`service`, `executor`). The status
//! mapping, the metrics, the endpoint, redaction and the RPC catalogue are
//! the crate's own.

pub mod cli;
pub mod config;
mod endpoint;
mod error;
pub mod executor;
pub mod logging;
mod metrics;
pub mod ops;
pub mod proto;
mod redact;
mod rpc;
pub mod server;
pub mod service;
