//! The test kit: what the integration tests and the benchmarks share to
//! drive a CSI driver and to check what it did, each piece written once.
//! Nothing shipped imports it.
//!
//! - `driver`: a `filevol serve` process on a temporary socket, pool and
//!   kubelet directory, ready when Probe says so, killed and cleaned up when
//!   dropped;
//! - [`scratch`]: loop-mounted scratch filesystems for pools, and a bindfs
//!   view of one, undone when dropped;
//! - `node_env`: a pool, a kubelet directory and a driver for one node
//!   test; [`leaks`]: the check that a test left no mount or loop device;
//!   [`files`]: a pool's files read behind the driver's back; [`needs`]:
//!   what a test needs from the machine (root); [`tempdir`]: a temporary
//!   directory; [`writer`]: a writer inside a volume whose acknowledged
//!   blocks must survive what the driver's processes go through.
//!
//! Two halves. Without features the kit is gRPC-free: the core crate's unit
//! tests use it (`cargo test -p filevol-core` builds no gRPC). The `driver`
//! feature adds what talks to a driver process (`driver`, `node_env`)
//! and the fuzz entry points (`fuzzing`); it links the driver crate, and
//! the driver's tests and benchmarks turn it on.
//!
//! The request builders and the statistics are the operator tools' own
//! (`ops::requests`, `ops::stats`): the binary ships them, the tests and
//! the benchmarks borrow them from there.
//!
//! Everything here is for tests and benchmarks and panics with the reason
//! where a step fails: that fails the test with it. What mounts or attaches
//! needs root.

#[cfg(feature = "driver")]
pub mod driver;
pub mod files;
#[cfg(feature = "driver")]
pub mod fuzzing;
pub mod leaks;
pub mod needs;
#[cfg(feature = "driver")]
pub mod node_env;
pub mod scratch;
pub mod tempdir;
pub mod writer;
