//! What a test needs from the machine, checked in one place.
//!
//! A test that needs root (loop devices, mounts) says so in its attribute,
//! `#[ignore = "needs root"]`, and calls [`root`] before anything else (the
//! kit's scratch pools and node environments call it for it): `cargo test`
//! lists it as ignored with that reason, `scripts/test.sh` running as root
//! adds `--include-ignored` (and refuses to run without root under
//! `CI=true`), and a run that includes it without root fails it with the
//! reason. The tools it needs (mkfs, bindfs, ...) are installed by
//! `scripts/install-deps.sh`; a missing one fails the test in the step that
//! runs it. No test reports `ok` without having run.

/// Fails the test unless it runs as root.
pub fn root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (loop devices and mounts): run scripts/test.sh as root, \
         or leave out --include-ignored"
    );
}

/// Fails the test unless it runs as root with CAP_SYS_RESOURCE, which the
/// kernel demands for growing a mounted ext4. Some sandboxes drop it from
/// root's capability bounding set; a privileged node plugin container has
/// it.
pub fn cap_sys_resource() {
    root();
    assert!(
        filevol_core::sys::caps::effective(filevol_core::sys::caps::SYS_RESOURCE),
        "this test needs CAP_SYS_RESOURCE, which this process lacks (CapEff in /proc/self/status)"
    );
}
