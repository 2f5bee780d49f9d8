//! filevol's core: everything a volume is and everything done to one, with
//! no gRPC or protobuf in sight.
//!
//! The layers, bottom up, and the only way imports run between them:
//!
//! - [`sys`]: the syscall layer (mounts, loop devices, locks, extents,
//!   descriptor-relative walks of untrusted trees). The only `unsafe` in
//!   filevol is here.
//! - [`units`], [`volume`]: the vocabulary: sizes and durations, and what a
//!   volume is and what may be asked of it (records, access modes,
//!   StorageClass parameters, the mkfs option policy, topology, ids).
//! - [`health`]: what can be wrong with a volume or the pool (findings with
//!   stable reasons), and the kernel log's loop-device errors.
//! - [`pool`]: the store. A directory that holds every volume, snapshot and
//!   record, shared by every filevol process.
//! - [`node`]: staging and publishing on one host, every kernel call behind
//!   [`node::kernel::Kernel`] so the logic runs against a recording fake.
//! - [`changed_blocks`]: which ranges of a snapshot hold data or changed,
//!   from the pool filesystem's own maps.
//!
//! [`faults`] and [`error_chain`] serve every layer. The driver crate
//! (`filevol`) translates CSI calls into calls on these; nothing here knows
//! it exists.

pub mod changed_blocks;
pub mod error_chain;
pub mod faults;
pub mod health;
pub mod node;
pub mod pool;
pub mod sys;
pub mod units;
pub mod volume;
