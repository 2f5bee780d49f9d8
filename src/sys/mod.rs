//! The kernel-facing layer: thin, named wrappers over the syscalls filevol
//! makes (through rustix), each returning `std::io::Error` so callers can
//! name the step and the object in their own error. Nothing above this
//! module calls rustix for file, copy or lock operations directly.

pub mod fs;
pub mod lock;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;
pub mod untrusted;
