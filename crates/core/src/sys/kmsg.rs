//! The kernel log, record by record (`/dev/kmsg`).
//!
//! Each read of `/dev/kmsg` returns one record, "prio,seq,usec,flags;text"
//! then continuation lines of the form " KEY=value"; a reader opened anew
//! starts at the oldest record the ring still holds and blocks at the end
//! for the next. A reader that fell behind the ring gets EPIPE once and
//! goes on from the oldest record left. Reading needs CAP_SYSLOG (or
//! `kernel.dmesg_restrict=0`), which a node plugin has.

use std::fs::File;
use std::io::{self, Read};
use std::time::Duration;

/// One kernel log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When it was logged, on the log's clock (since boot; see [`now`]).
    pub at: Duration,
    /// Its text, without the continuation lines.
    pub message: String,
}

/// A record from the bytes of one read, if they hold one.
pub fn parse(raw: &[u8]) -> Option<Record> {
    let text = String::from_utf8_lossy(raw);
    let (header, rest) = text.split_once(';')?;
    let mut fields = header.split(',');
    let _prio = fields.next()?;
    let _seq = fields.next()?;
    let usec: u64 = fields.next()?.parse().ok()?;
    let message = rest.lines().next().unwrap_or_default().to_owned();
    Some(Record {
        at: Duration::from_micros(usec),
        message,
    })
}

/// The log's clock now: the monotonic clock, which the log's timestamps
/// follow (both count from boot and stop while the host is suspended).
pub fn now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Hands every record of the kernel log to `each`, the ones already
/// logged first, then each new one as it comes; returns only on an error
/// other than having fallen behind.
pub fn follow(mut each: impl FnMut(Record)) -> io::Result<()> {
    let mut log = File::open("/dev/kmsg")?;
    // A record is at most about 1 KiB of text plus its dictionary; a
    // buffer too small for one fails the read with EINVAL.
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match log.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                if let Some(r) = parse(&buf[..n]) {
                    each(r);
                }
            }
            // Overwritten before it was read: go on from the oldest left.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_s_time_and_text_are_read_and_its_dictionary_left_out() {
        let r = parse(
            b"3,1234,5678901,-;I/O error, dev loop3, sector 8\n SUBSYSTEM=block\n DEVICE=b7:3\n",
        )
        .unwrap();
        assert_eq!(r.at, Duration::from_micros(5_678_901));
        assert_eq!(r.message, "I/O error, dev loop3, sector 8");
        assert_eq!(parse(b"garbage"), None);
        assert_eq!(parse(b"3,1,notanumber,-;x"), None);
    }

    #[test]
    fn the_log_s_clock_runs_with_the_monotonic_clock() {
        let a = now();
        std::thread::sleep(Duration::from_millis(5));
        assert!(now() > a);
    }
}
