//! The kernel-facing layer: thin, named wrappers over the syscalls filevol
//! makes (through rustix), each returning `std::io::Error` so callers can
//! name the step and the object in their own error. Mounts, loop devices,
//! OFD locks, reflinks and sparse copies, FITRIM, btrfs subvolumes and
//! qgroups (`btrfs`), the filesystem tools (`command`), and every walk of
//! a pod-controlled tree go through here; the layers above still call
//! rustix themselves for plain reads of the system (stat, statvfs, access,
//! seek) where a wrapper would add nothing.

pub mod blockstat;
pub mod btrfs;
pub mod caps;
pub mod command;
pub mod deadline;
pub mod extents;
pub mod freeze;
pub mod fs;
pub mod kmsg;
pub mod lock;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;
pub mod trim;
pub mod untrusted;
