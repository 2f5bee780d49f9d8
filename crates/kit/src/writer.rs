//! A writer inside a volume that keeps going while driver processes die:
//! checksummed 4 KiB blocks, each fsynced before it counts as
//! acknowledged, and the check that every acknowledged block reads back.
//! The writes go through the kernel's mount, which a driver crash does not
//! touch, so a lost or torn block is the driver's doing (a second writer,
//! a reformat, a detach under a mount).

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Blocks a writer cycles over (16 MiB).
pub const SLOTS: usize = 4096;

/// The block written to `slot` in generation `gen`: the slot and the
/// generation, then a pattern drawn from both.
pub fn block(slot: u64, gen: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(4096);
    let mut x = slot.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ gen;
    while b.len() < 4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes());
    }
    b[..8].copy_from_slice(&slot.to_le_bytes());
    b[8..16].copy_from_slice(&gen.to_le_bytes());
    b
}

/// A thread writing blocks into one file until told to stop.
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Acknowledged>>,
}

/// What a writer had acknowledged when it stopped.
#[derive(Debug, Clone)]
pub struct Acknowledged {
    /// Per slot, the generation last acknowledged (0: none).
    pub generations: Vec<u64>,
    /// Writes acknowledged in all.
    pub writes: u64,
}

impl Writer {
    /// Starts writing into a new file at `path`. A write or an fsync that
    /// fails panics the thread, which [`Writer::finish`] reports.
    pub fn start(path: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let mut f = std::fs::File::create(path)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut generations = vec![0u64; SLOTS];
            let mut n = 0u64;
            // The slots in order, over and over; generation g is the g-th
            // pass.
            for (slot, offset) in (0..SLOTS).zip((0u64..).step_by(4096)).cycle() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let gen = generations[slot] + 1;
                f.seek(SeekFrom::Start(offset))
                    .expect("a seek inside the volume failed");
                f.write_all(&block(offset / 4096, gen))
                    .expect("a write inside the volume failed");
                f.sync_data().expect("an fsync inside the volume failed");
                generations[slot] = gen;
                n += 1;
            }
            Acknowledged {
                generations,
                writes: n,
            }
        });
        Writer {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it and returns what it acknowledged; panics if a write failed.
    pub fn finish(mut self) -> Acknowledged {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("not finished yet")
            .join()
            .expect("the writer failed: a write or fsync inside the volume returned an error")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Checks that every acknowledged block of `path` reads back as written;
/// returns how many were checked. Panics naming the first that does not.
pub fn verify(path: &Path, acked: &Acknowledged) -> usize {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 4096];
    let mut checked = 0;
    for (slot, &gen) in (0u64..).zip(&acked.generations) {
        if gen == 0 {
            continue;
        }
        f.read_exact_at(&mut buf, slot * 4096)
            .unwrap_or_else(|e| panic!("read block {slot} of {}: {e}", path.display()));
        assert!(
            buf == block(slot, gen),
            "block {slot} of {}, generation {gen}, was acknowledged and reads back otherwise",
            path.display()
        );
        checked += 1;
    }
    checked
}

/// Checks the ext4 filesystem in `image` read-only (`e2fsck -fn`); panics
/// with its report unless it is clean.
pub fn fsck_clean(image: &Path) {
    let out = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("run e2fsck: {e}"));
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}\n{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
