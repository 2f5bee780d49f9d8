//! I/O errors of loop devices, as the kernel logged them.
//!
//! A loop device keeps no error counter of its own (`/sys/block/loopN/stat`
//! counts only what succeeded), but the block layer logs every failed
//! request ("I/O error, dev loop3, sector ...", "critical space allocation
//! error, dev loop3, ..." when the pool is full) and the filesystems above
//! log theirs ("Buffer I/O error on dev loop3, ..."). A node plugin follows
//! the kernel log (`/dev/kmsg`) on a thread of its own and counts, per
//! device, the errors of a recent window: a volume whose device failed in
//! the window is degraded, and clears once its device has gone a window
//! without one. A device attached anew starts with no errors
//! ([`LoopErrors::forget`]), so a number reused for another image does not
//! inherit the errors of the last.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::sys::kmsg::{self, Record};

/// How long an error keeps a device degraded.
pub const WINDOW: Duration = Duration::from_secs(600);

/// A device's errors in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceErrors {
    /// Errors logged since the device was attached (or the plugin started).
    pub count: u64,
    /// When the last one was logged (the log's clock: since boot).
    pub last: Duration,
}

/// The errors of every loop device, fed by the kernel log.
#[derive(Debug, Clone, Default)]
pub struct LoopErrors {
    devices: Arc<Mutex<HashMap<u32, DeviceErrors>>>,
}

/// The loop device number a kernel log line blames for an I/O error, if it
/// is one: "dev loopN" in the block layer's error lines ("I/O error",
/// "critical space allocation error", ...), or "device loopN" in a line
/// about an "I/O error" (the buffer layer's, a filesystem's warning). A
/// filesystem's own error ("EXT4-fs error (device loop3): ...") is not the
/// device's: that is the filesystem's error count.
pub fn blamed_device(message: &str) -> Option<u32> {
    let prefixes: &[&str] = if message.contains("I/O error") {
        &["dev loop", "device loop"]
    } else if message.contains("error") {
        &["dev loop"]
    } else {
        return None;
    };
    prefixes.iter().find_map(|prefix| {
        let at = message.find(prefix)? + prefix.len();
        let digits: String = message[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

/// The loop device a kernel log line says was attached or detached: its
/// capacity changed from or to 0.
pub fn attached_or_detached(message: &str) -> Option<u32> {
    let rest = message.strip_prefix("loop")?;
    let (number, change) = rest.split_once(": detected capacity change from ")?;
    let (from, to) = change.split_once(" to ")?;
    (from.trim() == "0" || to.trim() == "0")
        .then(|| number.parse().ok())
        .flatten()
}

impl LoopErrors {
    /// Starts following the kernel log on a thread of its own, from the
    /// oldest record it still holds (errors logged before the plugin
    /// started count, within the window). Where the log cannot be read
    /// (no CAP_SYSLOG), says so once and counts nothing: the other
    /// findings still work.
    pub fn follow() -> LoopErrors {
        let errors = LoopErrors::default();
        let feed = errors.clone();
        let spawned = std::thread::Builder::new()
            .name("kmsg".into())
            .spawn(move || match kmsg::follow(|r| feed.record(&r)) {
                Ok(()) => {}
                Err(e) => log::warn!(
                    "the kernel log (/dev/kmsg) cannot be read: {e}; loop device I/O errors will not be reported"
                ),
            });
        if let Err(e) = spawned {
            log::warn!("cannot start the kernel log reader: {e}");
        }
        errors
    }

    /// Counts `record` if it blames a loop device; forgets a device's
    /// count at its attach or detach.
    pub fn record(&self, record: &Record) {
        if let Some(number) = attached_or_detached(&record.message) {
            self.forget(number);
        } else if let Some(number) = blamed_device(&record.message) {
            let mut devices = self.devices.lock();
            let e = devices.entry(number).or_insert(DeviceErrors {
                count: 0,
                last: record.at,
            });
            e.count += 1;
            e.last = e.last.max(record.at);
        }
    }

    /// Forgets the errors of device `number`: it was just attached.
    pub fn forget(&self, number: u32) {
        self.devices.lock().remove(&number);
    }

    /// The errors device `number` logged within [`WINDOW`] of `now` (the
    /// log's clock, [`kmsg::now`]), if any.
    pub fn recent(&self, number: u32, now: Duration) -> Option<DeviceErrors> {
        let devices = self.devices.lock();
        let e = devices.get(&number)?;
        (now.saturating_sub(e.last) < WINDOW).then_some(*e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(at_secs: u64, message: &str) -> Record {
        Record {
            at: Duration::from_secs(at_secs),
            message: message.into(),
        }
    }

    #[test]
    fn the_block_layer_s_and_the_buffer_layer_s_lines_blame_their_device() {
        for (line, want) in [
            ("I/O error, dev loop3, sector 2048 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio class 2", Some(3)),
            ("blk_update_request: I/O error, dev loop12, sector 8 op 0x0:(READ)", Some(12)),
            ("critical space allocation error, dev loop7, sector 96 op 0x1:(WRITE)", Some(7)),
            ("Buffer I/O error on dev loop0, logical block 5, lost async page write", Some(0)),
            ("Buffer I/O error on device loop1, logical block 118786", Some(1)),
            ("EXT4-fs warning (device loop1): ext4_end_bio:368: I/O error 3 writing to inode 12", Some(1)),
            ("loop3: detected capacity change from 0 to 2097152", None),
            ("EXT4-fs error (device loop3): trigger_test_error:129: comm bash: 1", None),
            ("EXT4-fs (loop4): mounted filesystem with ordered data mode", None),
            ("I/O error, dev vda, sector 1", None),
        ] {
            assert_eq!(blamed_device(line), want, "{line}");
        }
    }

    #[test]
    fn an_attach_or_detach_in_the_log_clears_what_came_before() {
        assert_eq!(
            attached_or_detached("loop3: detected capacity change from 0 to 2097152"),
            Some(3)
        );
        assert_eq!(
            attached_or_detached("loop12: detected capacity change from 2097152 to 0"),
            Some(12)
        );
        assert_eq!(
            attached_or_detached("loop3: detected capacity change from 2097152 to 4194304"),
            None
        );
        assert_eq!(attached_or_detached("I/O error, dev loop3, sector 1"), None);
        let e = LoopErrors::default();
        e.record(&rec(100, "I/O error, dev loop3, sector 1 op 0x1:(WRITE)"));
        e.record(&rec(
            101,
            "loop3: detected capacity change from 2097152 to 0",
        ));
        e.record(&rec(102, "loop3: detected capacity change from 0 to 4096"));
        assert!(e.recent(3, Duration::from_secs(110)).is_none());
        e.record(&rec(103, "I/O error, dev loop3, sector 1 op 0x1:(WRITE)"));
        assert_eq!(e.recent(3, Duration::from_secs(110)).unwrap().count, 1);
    }

    #[test]
    fn errors_count_within_the_window_and_a_new_attachment_starts_clean() {
        let e = LoopErrors::default();
        e.record(&rec(100, "I/O error, dev loop3, sector 1 op 0x1:(WRITE)"));
        e.record(&rec(160, "I/O error, dev loop3, sector 2 op 0x1:(WRITE)"));
        e.record(&rec(170, "loop3: detected capacity change from 8 to 16"));
        let got = e.recent(3, Duration::from_secs(200)).unwrap();
        assert_eq!(got.count, 2);
        assert_eq!(got.last, Duration::from_secs(160));
        assert!(e.recent(4, Duration::from_secs(200)).is_none());
        assert!(e.recent(3, Duration::from_secs(160) + WINDOW).is_none());
        e.forget(3);
        assert!(e.recent(3, Duration::from_secs(200)).is_none());
    }
}
