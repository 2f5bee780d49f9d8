//! Filesystem tools, run as programs with an argument vector (never a
//! shell): the signature probe, mkfs, and online growth.
//!
//! The probe is the guard against the commonest way CSI drivers destroy
//! data. Only an image that is *provably* blank (see [`blank_image`]) is
//! ever formatted, and then into a new file that replaces it (see
//! `Node::format_image`), or for a thick image in place under an intent
//! recorded first (`super::in_place`). On an attached device, anything `blkid -p` finds,
//! a probe that fails, or data without a recognisable signature stops the
//! stage: nothing is ever formatted there. A stage asks `super::probe`
//! first, which answers the clear cases in-process and hands every other
//! one to [`probe`] here.

use std::io;
use std::path::Path;
use std::process::Command;

use crate::sys::command::{output, run, CommandError};
use crate::volume::meta::FsType;
use crate::volume::mkfs_options;

/// What is on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// No signature and no data: safe to format.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// Something else: a partition table, RAID member, or data without a
    /// signature. Described for the error message.
    Other(String),
}

/// Runs `blkid -p` on `path` (a device or an image file): `None` when it
/// finds no signature at all. A blkid that cannot run or fails is an error
/// (the node reports it as a probe that failed: never formatted).
fn blkid(path: &Path) -> io::Result<Option<Content>> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(path)
        .output()?;
    match out.status.code() {
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                    .map(str::to_owned)
            };
            Ok(Some(match (field("TYPE"), field("USAGE")) {
                (Some(t), Some(usage)) if usage == "filesystem" => Content::Filesystem(t),
                (Some(t), _) => Content::Other(format!("a {t} signature")),
                (None, _) => {
                    Content::Other(format!("signatures ({})", text.trim().replace('\n', " ")))
                }
            }))
        }
        // blkid -p: 2 means nothing was found.
        Some(2) => Ok(None),
        _ => Err(io::Error::other(format!(
            "blkid exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Probes `device` with `blkid -p`; its backing image is `image`. No signature is
/// "blank" only when the image has no data extent either; on a pool that
/// cannot report holes that is never proven here (see [`blank_image`]).
/// An error means the probe failed: the node refuses to format
/// (`NodeError::ProbeFailed` of the device).
pub fn probe(device: &Path, image: &Path) -> io::Result<Content> {
    if let Some(found) = blkid(device)? {
        return Ok(found);
    }
    if has_data(image)? {
        Ok(Content::Other("data without any known signature".into()))
    } else {
        Ok(Content::Blank)
    }
}

/// Whether the image of a volume is provably blank, so that its first
/// read-write stage may give it a filesystem.
///
/// - Where SEEK_DATA tells holes from data (`reports_holes`), an image with
///   no data extent at all is blank: nothing was ever written to it. A
///   zero-filled image (`zeroFill`), or a clone or restore (its source's
///   extents, zeros perhaps), can have data extents from the start, so the
///   caller passes `false` for those and the record decides, as below.
/// - Where it cannot (FUSE filesystems, NFS before 4.2, which call every
///   byte data), the pool's record decides: only an image that no node ever
///   formatted or handed out raw (`written == Some(false)`) *and* in which
///   `blkid -p` finds no signature is blank. A record without the field
///   (`None`, older pools) is never enough.
///
/// An error means the question could not be answered (the node reports a
/// probe of the image that failed, and formats nothing).
pub fn blank_image(image: &Path, reports_holes: bool, written: Option<bool>) -> io::Result<bool> {
    if written == Some(true) {
        return Ok(false);
    }
    if reports_holes {
        return Ok(!has_data(image)?);
    }
    if written != Some(false) {
        return Ok(false);
    }
    Ok(blkid(image)?.is_none())
}

/// Whether the image has any data extent (SEEK_DATA finds one). A new
/// sparse image, or a preallocated one (unwritten extents), has none.
pub fn has_data(image: &Path) -> std::io::Result<bool> {
    let f = std::fs::File::open(image)?;
    match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(0)) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NXIO) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Makes a filesystem in the file `file` (a new file beside the volume's
/// image, see `Node::format_image`, or a thick image itself), with 4 KiB
/// sectors to match the loop devices (a 512-byte-sector xfs would not
/// mount on them), without discard
/// (it would undo a thick image's preallocation), then the volume's extra
/// options, which only [`mkfs_options::validate`] can give.
///
/// mke2fs keeps only the last `-E` it is given, so for ext4 every `-E` of
/// the options joins filevol's `nodiscard` in one `-E`, at the end: an
/// option such as `-E lazy_itable_init=1` does not bring discard back.
pub fn mkfs_file(file: &Path, options: &mkfs_options::Validated<'_>) -> Result<(), CommandError> {
    mkfs_file_over(file, options, false)
}

/// [`mkfs_file`], told with `overwrite` that `file` may hold signatures
/// already: a thick image whose format in place was cut short (see
/// `Node::format_in_place`), which only filevol ever wrote. mkfs.xfs and
/// mkfs.btrfs refuse such a file without `-f`; mkfs.ext4 always gets `-F`
/// (it asks before formatting a file that is not a device). Never for a
/// file a pod may have written.
pub fn mkfs_file_over(
    file: &Path,
    options: &mkfs_options::Validated<'_>,
    overwrite: bool,
) -> Result<(), CommandError> {
    let (program, mut args) = mkfs_args(options);
    if overwrite && options.fs() != FsType::Ext4 {
        args.insert(0, "-f".to_owned());
    }
    let mut argv: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    argv.push(file.as_os_str());
    run(program, &argv)
}

/// The program [`mkfs_file`] runs and its arguments, but for the file: the
/// one place they are decided (a template's name hashes them).
pub fn mkfs_args(options: &mkfs_options::Validated<'_>) -> (&'static str, Vec<String>) {
    let fs = options.fs();
    let (program, base): (&str, &[&str]) = match fs {
        FsType::Ext4 => ("mkfs.ext4", &["-F", "-q", "-b", "4096"]),
        FsType::Xfs => ("mkfs.xfs", &["-q", "-K", "-s", "size=4096"]),
        FsType::Btrfs => ("mkfs.btrfs", &["-q", "-K", "--sectorsize", "4096"]),
    };
    let mut args: Vec<String> = base.iter().map(|&a| a.to_owned()).collect();
    let mut extended = String::from("nodiscard");
    for &(option, value) in options.args() {
        match (fs, option, value) {
            (FsType::Ext4, "-E", Some(value)) => {
                extended.push(',');
                extended.push_str(value);
            }
            _ => {
                args.push(option.to_owned());
                args.extend(value.map(str::to_owned));
            }
        }
    }
    if fs == FsType::Ext4 {
        args.extend(["-E".to_owned(), extended]);
    }
    (program, args)
}

/// Grows the mounted filesystem to fill its (grown) device.
pub fn grow(fs: FsType, device: &Path, mount_point: &Path) -> Result<(), CommandError> {
    match fs {
        FsType::Ext4 => run("resize2fs", &[device.as_os_str()]).map_err(|e| {
            // The kernel's online resize wants CAP_SYS_RESOURCE; say so
            // rather than leave an operator with "Permission denied".
            if e.stderr.contains("Permission denied") {
                CommandError {
                    stderr: format!("{} (growing a mounted ext4 needs CAP_SYS_RESOURCE in the node plugin's container)", e.stderr),
                    ..e
                }
            } else {
                e
            }
        }),
        FsType::Xfs => run("xfs_growfs", &[std::ffi::OsStr::new("-d"), mount_point.as_os_str()]),
        FsType::Btrfs => run(
            "btrfs",
            &[
                std::ffi::OsStr::new("filesystem"),
                std::ffi::OsStr::new("resize"),
                std::ffi::OsStr::new("max"),
                mount_point.as_os_str(),
            ],
        ),
    }
}

/// The size of the one device of the btrfs mounted at `mount_point`, as
/// the filesystem sees it (`btrfs filesystem show --raw`: "devid 1 size N").
pub fn btrfs_device_size(mount_point: &Path) -> Result<u64, CommandError> {
    let args = [
        std::ffi::OsStr::new("filesystem"),
        std::ffi::OsStr::new("show"),
        std::ffi::OsStr::new("--raw"),
        mount_point.as_os_str(),
    ];
    let text = output("btrfs", &args)?;
    parse_btrfs_device_size(&text).ok_or_else(|| CommandError {
        command: format!("btrfs filesystem show --raw {}", mount_point.display()),
        status: "unreadable output".into(),
        stderr: text.trim().to_owned(),
    })
}

fn parse_btrfs_device_size(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("devid")).then_some(())?;
        let mut words = words.skip_while(|w| *w != "size").skip(1);
        words.next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sparse(dir: &Path, name: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        p
    }

    #[test]
    fn btrfs_device_sizes_are_read_from_show() {
        let text = "Label: none  uuid: 3cd6\n\tTotal devices 1 FS bytes used 147456\n\tdevid    1 size 125829120 used 92274688 path /dev/loop0\n";
        assert_eq!(parse_btrfs_device_size(text), Some(125_829_120));
        assert_eq!(parse_btrfs_device_size("Label: none\n"), None);
        assert_eq!(parse_btrfs_device_size("\tdevid 1 size 12x used 1\n"), None);
    }

    #[test]
    fn a_written_record_is_never_blank() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse(dir.path(), "image");
        assert!(!blank_image(&image, true, Some(true)).unwrap());
        assert!(!blank_image(&image, false, Some(true)).unwrap());
    }

    #[test]
    fn where_holes_are_reported_an_image_without_data_is_blank() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse(dir.path(), "image");
        assert!(blank_image(&image, true, Some(false)).unwrap());
        // Records older than the field: SEEK_DATA alone decides.
        assert!(blank_image(&image, true, None).unwrap());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        f.sync_all().unwrap();
        assert!(!blank_image(&image, true, Some(false)).unwrap());
        assert!(!blank_image(&image, true, None).unwrap());
    }

    #[test]
    fn where_holes_are_not_reported_the_record_and_the_signature_decide() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse(dir.path(), "image");
        // Never written and no signature: blank.
        assert!(blank_image(&image, false, Some(false)).unwrap());
        // Unknown history: never enough without SEEK_DATA.
        assert!(!blank_image(&image, false, None).unwrap());
        // A filesystem where the record says nothing was written (a crash
        // between mkfs and the record): the probe refuses it.
        mkfs_file(&image, &mkfs_options::validate(FsType::Ext4, &[]).unwrap()).unwrap();
        assert!(!blank_image(&image, false, Some(false)).unwrap());
    }

    /// The allowlisted options are ones the real tools take: a
    /// representative set per filesystem, through [`mkfs_file`], on a
    /// sparse 300 MiB file. The label shows they arrived. Needs mkfs.ext4,
    /// mkfs.xfs, mkfs.btrfs and blkid (scripts/install-deps.sh installs
    /// them); a missing one fails the test.
    #[test]
    fn the_real_mkfs_tools_take_the_allowlisted_options() {
        use std::process::Command;
        for (fs, options, label) in [
            (
                FsType::Ext4,
                "-m 0 -i 16k -I 512 -N 20000 -g 16384 -G 32 -O ^huge_file,metadata_csum,project,quota -T default -J size=16 -Ltool-ext4 -U random -E lazy_itable_init=1,lazy_journal_init=1,stride=16,stripe_width=64,root_owner=1000:1000,resize=1000000,num_backup_sb=1,quotatype=usrquota:prjquota,packed_meta_blocks=0",
                "tool-ext4",
            ),
            (
                FsType::Xfs,
                "-b size=4096 -m crc=1,finobt=1,reflink=1,rmapbt=0,bigtime=1,inobtcount=1 -i size=512,maxpct=10,sparse=1,nrext64=0 -d agcount=4,su=64k,sw=2 -l size=64m,lazy-count=1,internal -n size=8192,ftype=1 -Ltool-xfs",
                "tool-xfs",
            ),
            (
                FsType::Btrfs,
                "--label=tool-btrfs -n 16k -m dup -d single -O no-holes,skinny-metadata -R quota,free-space-tree --csum xxhash",
                "tool-btrfs",
            ),
            (FsType::Btrfs, "-M -L tool-mixed", "tool-mixed"),
        ] {
            let program = format!("mkfs.{}", fs.as_str());
            if let Err(e) = Command::new(&program).arg("-V").output() {
                panic!("this test needs {program} (scripts/install-deps.sh installs it): {e}");
            }
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("image");
            std::fs::File::create(&file)
                .unwrap()
                .set_len(300 << 20)
                .unwrap();
            let given: Vec<String> = options.split_whitespace().map(str::to_owned).collect();
            let v = mkfs_options::validate(fs, &given).unwrap_or_else(|e| panic!("{options:?}: {e}"));
            mkfs_file(&file, &v)
                .unwrap_or_else(|e| panic!("{} {options:?}: {e}", fs.as_str()));
            let probe = |tag: &str| {
                let out = Command::new("blkid")
                    .args(["-p", "-o", "value", "-s", tag])
                    .arg(&file)
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).trim().to_owned()
            };
            assert_eq!(probe("TYPE"), fs.as_str(), "{options:?}");
            assert_eq!(probe("LABEL"), label, "{options:?}");
        }
    }

    /// mke2fs keeps only its last `-E`: the options' `-E` must not replace
    /// the `nodiscard` that keeps a thick image preallocated.
    #[test]
    fn the_real_mke2fs_keeps_nodiscard_beside_extended_options() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let file = std::fs::File::create(&path).unwrap();
        crate::sys::fs::preallocate(&file, 64 << 20)
            .expect("this test needs a temporary directory that can preallocate (fallocate)");
        let given: Vec<String> = ["-E", "lazy_itable_init=1", "-E", "lazy_journal_init=1"]
            .map(str::to_owned)
            .to_vec();
        let v = mkfs_options::validate(FsType::Ext4, &given).unwrap();
        mkfs_file(&path, &v).unwrap();
        let allocated = std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap()) * 512;
        assert!(
            allocated >= 60 << 20,
            "mkfs discarded the preallocation: {allocated} bytes left"
        );
    }
}
