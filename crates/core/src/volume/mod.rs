//! The vocabulary every layer speaks: what a volume is and what may be
//! asked of it. The records the pool keeps ([`meta`]: layouts, filesystems,
//! access modes), the StorageClass parameters ([`parameters`]), the mkfs
//! options a class may set ([`mkfs_options`]), topology ([`topology`]) and
//! the names of objects ([`ids`]).
//!
//! Nothing here touches the pool or the kernel: the store (`pool`) and the
//! node (`node`) both build on these types, and neither is needed to read
//! them.

pub mod ids;
pub mod meta;
pub mod mkfs_options;
pub mod parameters;
pub mod topology;
