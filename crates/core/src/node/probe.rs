//! The signature probe of a stage, in-process for the clear cases and
//! `blkid -p` for everything else.
//!
//! Every read-write stage probes its device before mounting it, and
//! `blkid` is a process start: most of a stage's CPU once the mkfs is gone
//! (see `template`). Yet nearly every probe asks one question whose answer
//! is plain from a few bytes: is this the ext4 filevol made? So the probe
//! reads the places signatures live (the first 256 KiB and the last
//! 512 KiB of the device) and answers itself only when the answer is
//! clear:
//!
//! - exactly one signature, a valid ext4 superblock (magic, ext4 features,
//!   checksum), an empty boot block, and ext4 expected: that filesystem;
//! - every byte read is zero *and* the image has no data extent: blank.
//!
//! Anything else (another filesystem, several signatures, bytes that are
//! not zero but no signature it knows, a read that fails) goes to
//! [`format::probe`], the `blkid -p` probe, so a refusal and its message
//! are exactly what they always were. A wrong answer here could only ever
//! mount or refuse to mount: the decision to format is not made from this
//! probe but from [`format::blank_image`] before the device exists.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::ext4;
use super::format::{self, Content};
use crate::volume::meta::FsType;

/// Bytes read from the start of the device: the superblocks and labels of
/// everything probed here, the furthest being ZFS's first uberblock array
/// (128 to 256 KiB).
const HEAD: u64 = 256 << 10;
/// Bytes read from the end: md RAID superblocks 0.90 (64 KiB from the
/// end) and 1.0 (8 KiB), and ZFS's last label (the last 256 KiB, aligned
/// down to 256 KiB: up to 512 KiB from the end).
const TAIL: u64 = 512 << 10;

/// What the device holds: its probe, then `blkid -p` where that is not
/// clear (see the module documentation). An error is a probe that failed
/// (the node formats nothing and says so: `NodeError::ProbeFailed`).
pub fn probe(device: &Path, image: &Path, expected: FsType) -> io::Result<Content> {
    match quick(device, image, expected) {
        Ok(Some(found)) => Ok(found),
        Ok(None) => format::probe(device, image),
        Err(e) => {
            log::debug!(
                "in-process probe of {} failed ({e}); asking blkid",
                device.display()
            );
            format::probe(device, image)
        }
    }
}

/// The in-process answer, when it is clear; `None` hands the question to
/// `blkid`.
pub fn quick(device: &Path, image: &Path, expected: FsType) -> io::Result<Option<Content>> {
    // One probe at a time in this process, into one buffer kept for the
    // process's life. A window is 768 KiB: allocated per probe, glibc
    // raises its mmap threshold after the first free and serves the next
    // ones from each worker's arena, which keeps them, so 16 workers held
    // 12 MiB (the driver's peak RSS grew by 7 MiB under `scripts/bench/compare.sh`).
    // Reading a window takes well under a millisecond, so the turns cost
    // little; a device that hangs the read is on the pool every stage here
    // uses anyway.
    static BUFFER: parking_lot::Mutex<Vec<u8>> = parking_lot::Mutex::new(Vec::new());
    let mut buffer = BUFFER.lock();
    let w = Window::read_into(&File::open(device)?, &mut buffer)?;
    let found = signatures(&w);
    if found == ["ext4"] && expected == FsType::Ext4 && w.at(0, 1024).is_some_and(zero) {
        return Ok(Some(Content::Filesystem("ext4".into())));
    }
    if found.is_empty() && zero(w.head()) && zero(w.tail()) && !format::has_data(image)? {
        return Ok(Some(Content::Blank));
    }
    Ok(None)
}

fn zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// The bytes read from a device: its start and its end.
#[derive(Debug)]
pub struct Window<'b> {
    /// The start (`head_len` bytes), then from `HEAD` on the end.
    buf: &'b [u8],
    head_len: usize,
    /// Where the end read starts on the device, where it is in `buf`, and
    /// how much was read.
    tail_at: u64,
    tail_start: usize,
    tail_len: usize,
    size: u64,
}

impl<'b> Window<'b> {
    /// Reads the start and the end of `file` (a device or an image) into
    /// `buf`, which grows to `HEAD + TAIL` bytes the first time.
    pub fn read_into(file: &File, buf: &'b mut Vec<u8>) -> io::Result<Window<'b>> {
        let size = rustix::fs::seek(file, rustix::fs::SeekFrom::End(0))?;
        let whole = usize::try_from(HEAD + TAIL).map_err(io::Error::other)?;
        buf.resize(whole, 0);
        let head_len = usize::try_from(HEAD.min(size)).map_err(io::Error::other)?;
        file.read_exact_at(&mut buf[..head_len], 0)?;
        let tail_at = size.saturating_sub(TAIL).max(head_len as u64);
        let tail_len = usize::try_from(size - tail_at).map_err(io::Error::other)?;
        let head = usize::try_from(HEAD).map_err(io::Error::other)?;
        file.read_exact_at(&mut buf[head..head + tail_len], tail_at)?;
        Ok(Window {
            buf,
            head_len,
            tail_at,
            tail_start: head,
            tail_len,
            size,
        })
    }

    fn head(&self) -> &[u8] {
        &self.buf[..self.head_len]
    }

    fn tail(&self) -> &[u8] {
        &self.buf[self.tail_start..self.tail_start + self.tail_len]
    }

    /// The `len` bytes at `at`, if the window holds them.
    fn at(&self, at: u64, len: usize) -> Option<&[u8]> {
        let end = at.checked_add(len as u64)?;
        if end <= self.head_len as u64 {
            let at = usize::try_from(at).ok()?;
            return self.head().get(at..at + len);
        }
        if at >= self.tail_at && end <= self.size {
            let at = usize::try_from(at - self.tail_at).ok()?;
            return self.tail().get(at..at + len);
        }
        None
    }

    fn has(&self, at: u64, magic: &[u8]) -> bool {
        self.at(at, magic.len()) == Some(magic)
    }
}

/// The md RAID magic (0xa92b4efc), as a little- and a big-endian host
/// writes it (0.90 superblocks are in host order).
const MD_MAGIC: [[u8; 4]; 2] = [[0xfc, 0x4e, 0x2b, 0xa9], [0xa9, 0x2b, 0x4e, 0xfc]];
/// ZFS's uberblock magic (0x00bab10c), as a 64-bit number either way.
const ZFS_MAGIC: [[u8; 8]; 2] = [
    [0x0c, 0xb1, 0xba, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0xba, 0xb1, 0x0c],
];
/// bcache's superblock magic, at 4 KiB + 24.
const BCACHE_MAGIC: [u8; 16] = [
    0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81,
];

/// Every signature found in the window, named after blkid's types where
/// blkid has one. Several names for one thing (two swap page sizes) count
/// once.
pub fn signatures(w: &Window) -> Vec<&'static str> {
    let mut found = Vec::new();
    let mut add = |name: &'static str, here: bool| {
        if here && !found.contains(&name) {
            found.push(name);
        }
    };
    match w
        .at(ext4::SUPERBLOCK_OFFSET, ext4::SUPERBLOCK_LEN)
        .map(ext4::kind)
    {
        Some(ext4::Kind::Ext4) => add("ext4", true),
        Some(ext4::Kind::OtherExt) => add("ext2/ext3/jbd", true),
        Some(ext4::Kind::None) | None => {}
    }
    add("xfs", w.has(0, b"XFSB"));
    add("btrfs", w.has(65536 + 64, b"_BHRfS_M"));
    add("squashfs", w.has(0, b"hsqs"));
    add("f2fs", w.has(1024, &0xF2F5_2010u32.to_le_bytes()));
    add("erofs", w.has(1024, &0xE0F5_E1E2u32.to_le_bytes()));
    add("jfs", w.has(32768, b"JFS1"));
    add("reiserfs", w.has(65536 + 52, b"ReIsEr"));
    add("iso9660", w.has(32769, b"CD001"));
    add("vdo", w.has(0, b"dmvdo"));
    add("crypto_LUKS", w.has(0, b"LUKS\xba\xbe"));
    // LUKS2 keeps a second header at one of these offsets.
    for at in [16u64, 32, 64, 128] {
        add("crypto_LUKS", w.has(at << 10, b"SKUL\xba\xbe"));
    }
    // Swap and hibernation images: their signature ends the first page,
    // whatever the page size of the machine that made them.
    for page in [4096u64, 8192, 16384, 65536] {
        for magic in [
            &b"SWAPSPACE2"[..],
            b"SWAP-SPACE",
            b"S1SUSPEND",
            b"S2SUSPEND",
            b"ULSUSPEND",
            b"LINHIB0001",
        ] {
            add("swap", w.has(page - 10, magic));
        }
    }
    for sector in 0..4u64 {
        add("LVM2_member", w.has(sector * 512, b"LABELONE"));
    }
    // A DOS partition table, and everything else with a boot sector
    // signature (FAT, NTFS, exFAT, BitLocker).
    add("dos", w.has(510, &[0x55, 0xAA]));
    add("gpt", w.has(512, b"EFI PART") || w.has(4096, b"EFI PART"));
    add("bcache", w.has(4096 + 24, &BCACHE_MAGIC));
    // md RAID: 1.1 at the start, 1.2 at 4 KiB, 1.0 near the end (8 KiB
    // from it, 4 KiB aligned), 0.90 in the last 64 KiB-aligned 64 KiB.
    let md_10 = (w.size.saturating_sub(8192)) & !4095;
    let md_090 = (w.size & !65535).saturating_sub(65536);
    for at in [0, 4096, md_10, md_090] {
        for magic in &MD_MAGIC {
            add("linux_raid_member", w.size >= 65536 && w.has(at, magic));
        }
    }
    // ZFS: uberblock arrays in the second half of the first and the last
    // 256 KiB label, a slot every KiB (or more).
    let last_label = (w.size & !((256 << 10) - 1)).saturating_sub(256 << 10);
    for label in [0, last_label] {
        for slot in (0..128).map(|k| label + (128 << 10) + (k << 10)) {
            for magic in &ZFS_MAGIC {
                add("zfs_member", w.size >= 512 << 10 && w.has(slot, magic));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::mkfs_options;
    use std::io::Write;
    use std::path::PathBuf;
    use std::process::Command;

    /// Large enough for mkfs.xfs (300 MB at least); sparse.
    const SIZE: u64 = 512 << 20;

    fn image(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().set_len(SIZE).unwrap();
        p
    }

    fn write_at(path: &Path, at: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, at).unwrap();
        f.sync_all().unwrap();
    }

    fn ext4(dir: &Path, name: &str) -> PathBuf {
        let p = image(dir, name);
        format::mkfs_file(&p, &mkfs_options::validate(FsType::Ext4, &[]).unwrap()).unwrap();
        p
    }

    /// Runs a tool on `p`; false (the test then skips that case) when the
    /// tool is not installed.
    /// Runs a filesystem tool on `p`. A missing tool fails the test (a
    /// green run must mean every case ran); scripts/install-deps.sh
    /// installs them all.
    fn tool(program: &str, args: &[&str], p: &Path) {
        match Command::new(program).args(args).arg(p).output() {
            Ok(out) => assert!(out.status.success(), "{program}: {out:?}"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                panic!("this test needs {program} (scripts/install-deps.sh installs it)")
            }
            Err(e) => panic!("{program}: {e}"),
        }
    }

    fn found(p: &Path) -> Vec<&'static str> {
        let mut buf = Vec::new();
        signatures(&Window::read_into(&File::open(p).unwrap(), &mut buf).unwrap())
    }

    /// The in-process answer for `p`, and what `blkid -p` says for the
    /// same image when the quick probe hands over.
    fn both(p: &Path) -> (Option<Content>, Content) {
        let quick = quick(p, p, FsType::Ext4).unwrap();
        (quick, probe(p, p, FsType::Ext4).unwrap())
    }

    #[test]
    fn an_ext4_made_by_filevol_is_answered_in_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = ext4(dir.path(), "ext4");
        assert_eq!(found(&p), ["ext4"]);
        let fs = Content::Filesystem("ext4".into());
        assert_eq!(both(&p), (Some(fs.clone()), fs.clone()));
        // What blkid says of it, too.
        assert_eq!(format::probe(&p, &p).unwrap(), fs);
        // Expecting another filesystem: blkid names what is there.
        assert_eq!(quick(&p, &p, FsType::Xfs).unwrap(), None);
    }

    #[test]
    fn a_sparse_zero_image_is_blank_and_written_zeros_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "zero");
        assert_eq!(found(&p), Vec::<&str>::new());
        assert_eq!(both(&p), (Some(Content::Blank), Content::Blank));
        // Zeros written: a data extent, so not provably blank; blkid finds
        // nothing and the data decides.
        write_at(&p, 100 << 20, &[0u8; 4096]);
        let (quick, full) = both(&p);
        assert_eq!(quick, None);
        assert!(matches!(full, Content::Other(_)), "{full:?}");
    }

    #[test]
    fn other_filesystems_and_swap_go_to_blkid() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &str, &[&str]); 3] = [
            ("xfs", "mkfs.xfs", &["-q"]),
            ("btrfs", "mkfs.btrfs", &["-q"]),
            ("swap", "mkswap", &[]),
        ];
        for (name, program, args) in cases {
            let p = image(dir.path(), name);
            tool(program, args, &p);
            assert_eq!(found(&p), [name], "{name}");
            let (quick, full) = both(&p);
            assert_eq!(quick, None, "{name}");
            let expected = if name == "swap" {
                Content::Other("a swap signature".into())
            } else {
                Content::Filesystem(name.into())
            };
            assert_eq!(full, expected, "{name}");
        }
    }

    #[test]
    fn partition_tables_and_volume_labels_go_to_blkid() {
        let dir = tempfile::tempdir().unwrap();
        // An MBR with one Linux partition from 1 MiB to the end.
        let mbr = image(dir.path(), "mbr");
        let mut sector = [0u8; 512];
        sector[446 + 4] = 0x83;
        sector[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        let sectors = u32::try_from(SIZE / 512 - 2048).unwrap();
        sector[446 + 12..446 + 16].copy_from_slice(&sectors.to_le_bytes());
        sector[510] = 0x55;
        sector[511] = 0xAA;
        write_at(&mbr, 0, &sector);
        assert_eq!(found(&mbr), ["dos"]);
        // A GPT header (protective MBR included).
        let gpt = image(dir.path(), "gpt");
        write_at(&gpt, 0, &sector);
        write_at(&gpt, 512, b"EFI PART\x00\x00\x01\x00\x5c\x00\x00\x00");
        assert_eq!(found(&gpt), ["dos", "gpt"]);
        // An LVM physical volume's label in its second sector.
        let lvm = image(dir.path(), "lvm");
        write_at(
            &lvm,
            512,
            b"LABELONE\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0LVM2 001",
        );
        assert_eq!(found(&lvm), ["LVM2_member"]);
        for p in [&mbr, &gpt, &lvm] {
            let (quick, full) = both(p);
            assert_eq!(quick, None, "{}", p.display());
            assert!(matches!(full, Content::Other(_)), "{full:?}");
        }
    }

    #[test]
    fn garbage_is_never_taken_for_a_filesystem_or_blank() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "garbage");
        let mut noise = vec![0u8; 1 << 20];
        for chunk in noise.chunks_mut(16) {
            chunk.copy_from_slice(&ext4::random_bytes().unwrap());
        }
        write_at(&p, 0, &noise);
        write_at(&p, SIZE - (1 << 20), &noise);
        let (quick, full) = both(&p);
        assert_eq!(quick, None);
        assert!(matches!(full, Content::Other(_)), "{full:?}");
    }

    #[test]
    fn an_ext4_with_a_second_signature_goes_to_blkid() {
        let dir = tempfile::tempdir().unwrap();
        // An md 1.0 superblock's magic near the end.
        let raid = ext4(dir.path(), "raid");
        write_at(&raid, (SIZE - 8192) & !4095, &MD_MAGIC[0]);
        assert_eq!(found(&raid), ["ext4", "linux_raid_member"]);
        // A swap signature at the end of its first page.
        let swap = ext4(dir.path(), "swap");
        write_at(&swap, 4096 - 10, b"SWAPSPACE2");
        assert_eq!(found(&swap), ["ext4", "swap"]);
        // Something in the boot block, where mkfs leaves zeros.
        let boot = ext4(dir.path(), "boot");
        write_at(&boot, 0, b"\xeb\x3c\x90MSDOS5.0");
        assert_eq!(found(&boot), ["ext4"]);
        for p in [&raid, &swap, &boot] {
            assert_eq!(quick(p, p, FsType::Ext4).unwrap(), None, "{}", p.display());
        }
        // An xfs superblock over the boot block: blkid finds both, and the
        // stage is refused as it always was.
        let xfs = image(dir.path(), "xfs");
        tool("mkfs.xfs", &["-q"], &xfs);
        {
            let both = ext4(dir.path(), "both");
            let mut sector = [0u8; 512];
            File::open(&xfs)
                .unwrap()
                .read_exact_at(&mut sector, 0)
                .unwrap();
            write_at(&both, 0, &sector);
            assert_eq!(found(&both), ["ext4", "xfs"]);
            assert_eq!(quick(&both, &both, FsType::Ext4).unwrap(), None);
            let e = probe(&both, &both, FsType::Ext4).unwrap_err();
            assert!(e.to_string().starts_with("blkid exited with"), "{e}");
        }
    }

    #[test]
    fn an_ext4_whose_superblock_checksum_is_wrong_goes_to_blkid() {
        let dir = tempfile::tempdir().unwrap();
        let p = ext4(dir.path(), "bad");
        // One byte of the volume name, without fixing the checksum.
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        std::io::Seek::seek(&mut f, io::SeekFrom::Start(1024 + 0x78)).unwrap();
        f.write_all(b"x").unwrap();
        f.sync_all().unwrap();
        assert_eq!(found(&p), ["ext2/ext3/jbd"]);
        assert_eq!(quick(&p, &p, FsType::Ext4).unwrap(), None);
    }
}
