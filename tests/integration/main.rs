//! Integration tests: the real `filevol` binary on a temporary socket and
//! pool, driven over gRPC. One test binary (gRPC core is linked into each).

// Test data and measurements cast on purpose: counters truncated into
// pattern bytes, percentile indices from floats, sizes into CSI's int64.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod bench;
mod capabilities;
mod churn;
mod controller;
mod crash;
mod dispatch;
mod escape;
mod fuzz_corpus;
mod hostile;
mod identity;
mod layouts;
mod lifecycle;
mod logging;
mod loopfs;
mod mkfs_options;
mod needs;
mod node;
mod ops;
mod req;
mod single_writer;
mod util;
