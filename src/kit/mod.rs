//! The test kit: what the integration tests, the benchmarks and the
//! operator tools share to drive a CSI driver and to measure it, each piece
//! written once.
//!
//! - [`requests`]: one builder per CSI request (`filevol client`, `filevol
//!   bench`, the tests and the benchmarks);
//! - [`stats`]: percentiles and a process's memory (`filevol bench` and the
//!   benchmarks);
//! - [`driver`]: a `filevol serve` process on a temporary socket, pool and
//!   kubelet directory, ready when Probe says so, killed and cleaned up when
//!   dropped;
//! - [`scratch`]: loop-mounted scratch filesystems for pools, and a bindfs
//!   view of one, undone when dropped;
//! - [`node_env`]: a pool, a kubelet directory and a driver for one node
//!   test; [`leaks`]: the check that a test left no mount or loop device;
//!   [`files`]: a pool's files read behind the driver's back; [`needs`]:
//!   what a test needs from the machine (root); [`tempdir`]: a temporary
//!   directory; [`writer`]: a writer inside a volume whose acknowledged
//!   blocks must survive what the driver's processes go through.
//!
//! Why in the library: the tools in the binary build their requests here,
//! so the builders cannot live under `tests/`; and the integration tests
//! and the benchmarks are crates of their own, which share code only
//! through the library (the benchmarks used to include test files with
//! `#[path]`).
//!
//! Why not behind a cargo feature: a package cannot switch on a feature of
//! its own for its tests and benchmarks but through a dev-dependency on
//! itself (which cargo accepts by accident) or `required-features` (which
//! silently skips a target built without it), and `cargo doc` and clippy
//! would then check the kit only when asked to. Instead the kit adds no
//! dependency: its temporary directories are [`tempdir::TempDir`], a few
//! lines of std (`tempfile` stays a dev-dependency), and its syscalls are
//! [`crate::sys`]'s. The binary calls only [`requests`] and [`stats`]; the
//! linker leaves the rest out of it.
//!
//! [`requests`] and [`stats`] never panic, as the tools need. The rest is
//! for tests and benchmarks and panics with the reason where a step fails:
//! that fails the test with it. What mounts or attaches needs root.

pub mod driver;
pub mod files;
pub mod leaks;
pub mod needs;
pub mod node_env;
pub mod requests;
pub mod scratch;
pub mod stats;
pub mod tempdir;
pub mod writer;
