//! Integration tests: the real `filevol` binary on a temporary socket and
//! pool, driven over gRPC. One test binary (gRPC core is linked into each).
//!
//! What more than one file uses (the driver harness, scratch pools, leak
//! checks) comes from the test kit, `filevol_kit`, which the benchmarks use
//! too, and the request builders from the tools that ship them
//! (`filevol::ops::requests`); a file keeps here only the helpers it alone
//! needs, and no file imports from another.

// Test data and measurements cast on purpose: counters truncated into
// pattern bytes, percentile indices from floats, sizes into CSI's int64.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
// This crate is all tests: `tests_outside_test_module` is for the unit
// tests of the libraries, which belong in a `#[cfg(test)] mod tests`.
#![allow(clippy::tests_outside_test_module)]
// Long tests report what they measured on stderr, as `cargo test` shows it.
#![allow(clippy::print_stderr, clippy::use_debug)]

/// The binary under test, for the kit's driver harness
/// (`filevol_kit::driver`) and for the tests that run it themselves.
const BIN: &str = env!("CARGO_BIN_EXE_filevol");

mod bench;
mod btrfs_dirs;
mod capabilities;
mod capacity;
mod churn;
mod controller;
mod crash;
mod dir_usage;
mod dispatch;
mod ephemeral;
mod escape;
mod fences;
mod fuzz_corpus;
mod group_freeze;
mod health;
mod hostile;
mod identity;
mod layouts;
mod lifecycle;
mod lock_reach;
mod logging;
mod mkfs_options;
mod no_space;
mod node;
mod ops;
mod read_only_copies;
mod single_writer;
mod snapshot_metadata;
mod stress;
mod templates;
mod trim;
