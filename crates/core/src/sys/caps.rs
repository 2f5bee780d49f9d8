//! Capabilities of this process, as the kernel reports them.

/// CAP_SYS_RESOURCE: growing a mounted ext4 (EXT4_IOC_RESIZE_FS) needs it.
pub const SYS_RESOURCE: u32 = 24;

/// Whether capability `bit` is in this process's effective set (`CapEff`
/// in /proc/self/status). A sandbox can withhold one even from root.
pub fn effective(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps >> bit & 1 == 1)
}
