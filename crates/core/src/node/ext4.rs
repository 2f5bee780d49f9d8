//! The ext2/3/4 superblock, read and rewritten in-process: what the
//! signature probe needs to tell ext4 from its relatives (as `blkid` does),
//! and what turns a copy of a formatted template into a filesystem of its
//! own (a fresh UUID) without running `tune2fs` or `mkfs`.
//!
//! Changing `s_uuid` is safe only because templates are made with
//! `metadata_csum_seed`: every metadata checksum (group descriptors,
//! bitmaps, inodes, directories, extent blocks) is then seeded from
//! `s_checksum_seed`, which stays, rather than from the UUID, so only the
//! superblocks' own checksums change. Without that feature a new UUID would
//! invalidate every checksum in the filesystem, and [`renew_uuid`] refuses
//! it. The superblock is rewritten in every place it lives (the primary and
//! each backup group's copy), as `tune2fs -U` does, so that e2fsck falling
//! back to a backup finds the same filesystem.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Where the primary superblock lives, and its size.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// Bytes in a superblock.
pub const SUPERBLOCK_LEN: usize = 1024;

/// The magic number, at [`MAGIC_AT`] within the superblock.
const MAGIC: u16 = 0xEF53;
const MAGIC_AT: usize = 0x38;

// Field offsets within the superblock (`struct ext4_super_block`).
const BLOCKS_COUNT_LO: usize = 0x04;
const FIRST_DATA_BLOCK: usize = 0x14;
const LOG_BLOCK_SIZE: usize = 0x18;
const BLOCKS_PER_GROUP: usize = 0x20;
const BLOCK_GROUP_NR: usize = 0x5A;
const FEATURE_COMPAT: usize = 0x5C;
const FEATURE_INCOMPAT: usize = 0x60;
const FEATURE_RO_COMPAT: usize = 0x64;
const UUID: usize = 0x68;
const HASH_SEED: usize = 0xEC;
const BLOCKS_COUNT_HI: usize = 0x150;
const FLAGS: usize = 0x160;
const BACKUP_BGS: usize = 0x24C;
const CHECKSUM: usize = 0x3FC;

const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_BTREE_DIR: u32 = 0x4;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// `s_flags`: a filesystem for in-development code (blkid calls it ext4dev).
const FLAGS_TEST_FILESYS: u32 = 0x4;

/// What ext3 understands; a filesystem using anything else is ext4
/// (libblkid's `EXT3_FEATURE_*_SUPP`).
const EXT3_INCOMPAT: u32 = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG;
const EXT3_RO_COMPAT: u32 = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR;

/// What a superblock-sized buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No ext magic at all.
    None,
    /// An ext4 filesystem as `blkid -p` would report it, with
    /// `metadata_csum` and a superblock checksum that matches.
    Ext4,
    /// The ext magic, but not a clear ext4: ext2, ext3, an external
    /// journal, ext4dev, no `metadata_csum`, or a checksum that does not
    /// match. Left to `blkid` to name.
    OtherExt,
}

fn u16_at(sb: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([sb[at], sb[at + 1]])
}

fn u32_at(sb: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([sb[at], sb[at + 1], sb[at + 2], sb[at + 3]])
}

/// The checksum a superblock should carry: crc32c over everything before
/// `s_checksum`, seeded with ~0 and not inverted (e2fsprogs' and the
/// kernel's `ext4_superblock_csum`).
fn checksum(sb: &[u8]) -> u32 {
    crc32c_raw(!0, &sb[..CHECKSUM])
}

fn checksum_ok(sb: &[u8]) -> bool {
    checksum(sb) == u32_at(sb, CHECKSUM)
}

/// Classifies the superblock `sb` ([`SUPERBLOCK_LEN`] bytes).
pub fn kind(sb: &[u8]) -> Kind {
    if sb.len() < SUPERBLOCK_LEN || u16_at(sb, MAGIC_AT) != MAGIC {
        return Kind::None;
    }
    let incompat = u32_at(sb, FEATURE_INCOMPAT);
    let ro_compat = u32_at(sb, FEATURE_RO_COMPAT);
    let ext4 = incompat & INCOMPAT_JOURNAL_DEV == 0
        && (incompat & !EXT3_INCOMPAT != 0 || ro_compat & !EXT3_RO_COMPAT != 0)
        && u32_at(sb, FLAGS) & FLAGS_TEST_FILESYS == 0
        && ro_compat & RO_COMPAT_METADATA_CSUM != 0
        && checksum_ok(sb);
    if ext4 {
        Kind::Ext4
    } else {
        Kind::OtherExt
    }
}

/// Why a file is not the template filesystem [`renew_uuid`] expects.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// Reading or writing the file failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The file is not a whole ext4 of the expected size, made with
    /// `metadata_csum_seed`.
    #[error("not the template expected: {0}")]
    NotTemplate(String),
}

/// The geometry read from a primary superblock.
struct Geometry {
    block_size: u64,
    blocks: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    compat: u32,
    ro_compat: u32,
    backup_bgs: [u32; 2],
}

impl Geometry {
    fn groups(&self) -> u64 {
        (self.blocks - self.first_data_block).div_ceil(self.blocks_per_group)
    }

    /// Whether group `g` (> 0) holds a backup superblock.
    fn has_backup(&self, g: u64) -> bool {
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return self.backup_bgs.iter().any(|&b| u64::from(b) == g);
        }
        if self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 {
            return true;
        }
        g == 1 || [3, 5, 7].iter().any(|&base| is_power_of(g, base))
    }

    /// Where the superblock copy of group `g` (> 0) starts.
    fn backup_at(&self, g: u64) -> u64 {
        (self.first_data_block + g * self.blocks_per_group) * self.block_size
    }
}

fn is_power_of(mut n: u64, base: u64) -> bool {
    while n > 1 && n % base == 0 {
        n /= base;
    }
    n == 1
}

/// Checks that `file` holds a whole ext4 that mke2fs made of a file of
/// `len` bytes (as long, or shorter by the last group it left out), made with
/// `metadata_csum_seed` (magic, checksum, size, features), then gives it
/// the filesystem UUID `uuid` and the directory hash seed `hash_seed` in
/// its primary superblock and every backup, each with its checksum
/// recomputed. Nothing is written unless every copy checks out.
///
/// The hash seed is per filesystem too (mkfs draws one at random): it
/// orders hashed directories, and changing it is safe only on a
/// filesystem that has no hashed directory yet, which a fresh template is
/// (its root and `lost+found` are single-block linear directories).
pub fn renew_uuid(
    file: &File,
    len: u64,
    uuid: [u8; 16],
    hash_seed: [u8; 16],
) -> Result<(), RenewError> {
    let not = |why: String| RenewError::NotTemplate(why);
    let file_len = file.metadata()?.len();
    if file_len != len {
        return Err(not(format!("{file_len} bytes where {len} were expected")));
    }
    let mut primary = vec![0u8; SUPERBLOCK_LEN];
    file.read_exact_at(&mut primary, SUPERBLOCK_OFFSET)?;
    if kind(&primary) != Kind::Ext4 {
        return Err(not("no ext4 superblock with a valid checksum".into()));
    }
    let incompat = u32_at(&primary, FEATURE_INCOMPAT);
    if incompat & INCOMPAT_CSUM_SEED == 0 {
        return Err(not(
            "made without metadata_csum_seed: a new UUID would break its checksums".into(),
        ));
    }
    let log = u32_at(&primary, LOG_BLOCK_SIZE);
    if log > 6 {
        return Err(not(format!("block size 2^{} is impossible", 10 + log)));
    }
    let hi = if incompat & INCOMPAT_64BIT != 0 {
        u64::from(u32_at(&primary, BLOCKS_COUNT_HI))
    } else {
        0
    };
    let geo = Geometry {
        block_size: 1024 << log,
        blocks: hi << 32 | u64::from(u32_at(&primary, BLOCKS_COUNT_LO)),
        first_data_block: u64::from(u32_at(&primary, FIRST_DATA_BLOCK)),
        blocks_per_group: u64::from(u32_at(&primary, BLOCKS_PER_GROUP)),
        compat: u32_at(&primary, FEATURE_COMPAT),
        ro_compat: u32_at(&primary, FEATURE_RO_COMPAT),
        backup_bgs: [
            u32_at(&primary, BACKUP_BGS),
            u32_at(&primary, BACKUP_BGS + 4),
        ],
    };
    if geo.blocks_per_group == 0 || geo.blocks <= geo.first_data_block {
        return Err(not("an impossible geometry".into()));
    }
    // mke2fs leaves out a last block group too small to hold its own
    // metadata (a 1025 MiB file gets a 1024 MiB filesystem), and the
    // kernel mounts a filesystem shorter than its device. So a shorter
    // filesystem is what mke2fs made of a file of `len` bytes when it ends
    // on a group boundary and less than a group short of the end.
    let fs_len = geo.blocks.saturating_mul(geo.block_size);
    let group_len = geo.blocks_per_group.saturating_mul(geo.block_size);
    let whole_groups = (geo.blocks - geo.first_data_block) % geo.blocks_per_group == 0;
    let dropped_last_group = fs_len < len && len - fs_len < group_len && whole_groups;
    if fs_len != len && !dropped_last_group {
        return Err(not(format!(
            "a filesystem of {fs_len} bytes in a file of {len}"
        )));
    }
    let old_uuid = &primary[UUID..UUID + 16];
    let mut copies = vec![(SUPERBLOCK_OFFSET, primary.clone())];
    for g in (1..geo.groups()).filter(|&g| geo.has_backup(g)) {
        let at = geo.backup_at(g);
        let mut sb = vec![0u8; SUPERBLOCK_LEN];
        file.read_exact_at(&mut sb, at)?;
        let group = u64::from(u16_at(&sb, BLOCK_GROUP_NR));
        // The group number only fits 16 bits: larger ones wrap.
        if kind(&sb) != Kind::Ext4 || &sb[UUID..UUID + 16] != old_uuid || group != g & 0xFFFF {
            return Err(not(format!("the backup superblock of group {g} differs")));
        }
        copies.push((at, sb));
    }
    for (at, mut sb) in copies {
        sb[UUID..UUID + 16].copy_from_slice(&uuid);
        sb[HASH_SEED..HASH_SEED + 16].copy_from_slice(&hash_seed);
        let sum = checksum(&sb);
        sb[CHECKSUM..].copy_from_slice(&sum.to_le_bytes());
        file.write_all_at(&sb, at)?;
    }
    Ok(())
}

/// A random version 4 UUID (RFC 9562), as mkfs would draw.
pub fn random_uuid() -> io::Result<[u8; 16]> {
    let mut u = random_bytes()?;
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    Ok(u)
}

/// 16 bytes from the kernel's random source.
pub fn random_bytes() -> io::Result<[u8; 16]> {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        filled += rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(b)
}

/// The UUID `u` as text (`8-4-4-4-12` hex digits), as blkid prints it.
#[cfg(test)]
pub fn uuid_text(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// crc32c (Castagnoli, reflected polynomial 0x82F63B78) from `crc`, without
/// the final inversion: the form ext4 (and xfs) checksums are made with.
pub fn crc32c_raw(mut crc: u32, bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in (0u32..).zip(t.iter_mut()) {
            let mut c = i;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    for &b in bytes {
        crc = table[usize::from(crc.to_le_bytes()[0] ^ b)] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::format;
    use crate::volume::meta::FsType;
    use crate::volume::mkfs_options;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// A new sparse file of `len` bytes formatted by mkfs with filevol's
    /// arguments and `extra`.
    fn made(dir: &Path, name: &str, len: u64, extra: &[&str]) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().set_len(len).unwrap();
        let extra: Vec<String> = extra.iter().map(|&s| s.to_owned()).collect();
        let options = mkfs_options::validate(FsType::Ext4, &extra).unwrap();
        format::mkfs_file(&p, &options).unwrap();
        p
    }

    fn run(program: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(program).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// What `dumpe2fs -h` says the UUID of the superblock at block
    /// `block` (0: the primary) is.
    fn uuid_at(p: &Path, block: u64) -> String {
        let sb = format!("superblock={block}");
        let mut args = vec!["-h"];
        if block > 0 {
            args.extend(["-o", &sb, "-o", "blocksize=4096"]);
        }
        let path = p.to_str().unwrap();
        args.push(path);
        let (ok, text) = run("dumpe2fs", &args);
        assert!(ok, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix("Filesystem UUID:"))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn a_template_copy_gets_a_new_uuid_everywhere_and_stays_clean() {
        let dir = tempfile::tempdir().unwrap();
        let len = 1 << 30;
        let p = made(
            dir.path(),
            "t",
            len,
            &[
                "-O",
                "metadata_csum_seed",
                "-E",
                "assume_storage_prezeroed=1",
            ],
        );
        let old = uuid_at(&p, 0);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let uuid = random_uuid().unwrap();
        renew_uuid(&f, len, uuid, random_bytes().unwrap()).unwrap();
        f.sync_all().unwrap();
        let new = uuid_text(&uuid);
        assert_ne!(new, old);
        let (ok, text) = run("e2fsck", &["-fn", p.to_str().unwrap()]);
        assert!(ok, "{text}");
        let (ok, text) = run("blkid", &["-p", "-o", "export", p.to_str().unwrap()]);
        assert!(ok && text.contains(&format!("UUID={new}")), "{text}");
        // 8 groups of 32768 blocks: backups in groups 1, 3, 5 and 7.
        for block in [0, 32768, 3 * 32768, 5 * 32768, 7 * 32768] {
            assert_eq!(uuid_at(&p, block), new, "the superblock at block {block}");
        }
    }

    #[test]
    fn only_a_whole_template_of_the_right_size_is_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let len = 64 << 20;
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .unwrap()
        };
        let renew = |f: &File, len| renew_uuid(f, len, [1; 16], [2; 16]);
        // Without metadata_csum_seed every checksum would break.
        let plain = made(dir.path(), "plain", len, &[]);
        let before = std::fs::read(&plain).unwrap();
        let e = renew(&open(&plain), len).unwrap_err();
        assert!(matches!(e, RenewError::NotTemplate(_)), "{e}");
        assert_eq!(std::fs::read(&plain).unwrap(), before, "nothing written");
        let seeded = made(dir.path(), "seeded", len, &["-O", "metadata_csum_seed"]);
        // Another size than the filesystem's, or a file cut short.
        assert!(matches!(
            renew(&open(&seeded), 2 * len),
            Err(RenewError::NotTemplate(_))
        ));
        open(&seeded).set_len(len - 4096).unwrap();
        assert!(matches!(
            renew(&open(&seeded), len - 4096),
            Err(RenewError::NotTemplate(_))
        ));
        // Blank: no superblock at all.
        let blank = dir.path().join("blank");
        File::create(&blank).unwrap().set_len(len).unwrap();
        assert!(matches!(
            renew(&open(&blank), len),
            Err(RenewError::NotTemplate(_))
        ));
    }

    /// mke2fs leaves out a last group too small for its metadata: the
    /// template of a 1025 MiB volume is a 1024 MiB filesystem in a 1025 MiB
    /// file, and is renewed; a filesystem short by more is not.
    #[test]
    fn a_filesystem_short_by_its_dropped_last_group_is_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let len = 1025 << 20;
        let extra = ["-O", "metadata_csum_seed"];
        let p = made(dir.path(), "short", len, &extra);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mut sb = vec![0u8; SUPERBLOCK_LEN];
        f.read_exact_at(&mut sb, SUPERBLOCK_OFFSET).unwrap();
        assert_eq!(
            u64::from(u32_at(&sb, BLOCKS_COUNT_LO)) * 4096,
            1 << 30,
            "mke2fs left out the last group"
        );
        let uuid = random_uuid().unwrap();
        renew_uuid(&f, len, uuid, random_bytes().unwrap()).unwrap();
        f.sync_all().unwrap();
        let (ok, text) = run("e2fsck", &["-fn", p.to_str().unwrap()]);
        assert!(ok, "{text}");
        assert_eq!(uuid_at(&p, 0), uuid_text(&uuid));
        // A whole group and more short: not what mke2fs makes of the file.
        f.set_len(len + (128 << 20)).unwrap();
        let e = renew_uuid(&f, len + (128 << 20), [1; 16], [2; 16]).unwrap_err();
        assert!(matches!(e, RenewError::NotTemplate(_)), "{e}");
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The standard CRC-32C of "123456789" is 0xE3069283 (seed ~0, final
        // inversion).
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn backups_follow_sparse_super() {
        let geo = Geometry {
            block_size: 4096,
            blocks: 2_621_440,
            first_data_block: 0,
            blocks_per_group: 32768,
            compat: 0,
            ro_compat: RO_COMPAT_SPARSE_SUPER,
            backup_bgs: [0, 0],
        };
        let groups: Vec<u64> = (1..geo.groups()).filter(|&g| geo.has_backup(g)).collect();
        assert_eq!(groups, [1, 3, 5, 7, 9, 25, 27, 49]);
        assert_eq!(geo.backup_at(3), 3 * 32768 * 4096);
    }

    #[test]
    fn uuids_are_version_4_and_print_like_blkid() {
        let u = random_uuid().unwrap();
        assert_eq!(u[6] >> 4, 4);
        assert_eq!(u[8] >> 6, 0b10);
        assert_ne!(random_uuid().unwrap(), u);
        let text = uuid_text(&[
            0x79, 0x1a, 0x75, 0xa6, 0x93, 0x1e, 0x47, 0x60, 0x90, 0xa6, 0x69, 0x2b, 0x07, 0xa5,
            0x53, 0x8e,
        ]);
        assert_eq!(text, "791a75a6-931e-4760-90a6-692b07a5538e");
    }
}
