//! filevol: a Kubernetes CSI driver that turns a directory into sized
//! volumes.
//!
//! The shape is fixed and synchronous: a grpcio server decodes each call on
//! its completion-queue thread, [`service`] validates it into a typed job,
//! and [`executor`] runs the job on a bounded pool of worker threads that
//! make the blocking syscalls, with a per-volume lock table keeping calls on
//! one volume serialised. There is no async runtime.

pub mod cli;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod executor;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod proto;
pub mod redact;
pub mod rpc;
pub mod server;
pub mod service;
