//! Which mkfs options a StorageClass may ask for (`mkfsOptions`): the one
//! place that decides.
//!
//! mkfs runs on the node, as root, with the node's filesystem in reach. A
//! StorageClass author is not the node's administrator, yet several mkfs
//! options read or write host paths and devices: ext4 `-d /etc` copies the
//! node's `/etc` into every new volume, btrfs `-f /dev/sdb` (any positional
//! argument) adds a host disk to the filesystem, xfs `-d name=`, `-l
//! logdev=`, `-r rtdev=` and `-p protofile`, btrfs `-r`/`--rootdir`, ext4
//! `-l`, `-z`, `-J device=` and `-M` all name paths. So options are not
//! filtered by a denylist, which would miss the next such option, but held
//! to an allowlist of *tuning* options, each value checked by its shape.
//! The controller checks at CreateVolume (`INVALID_ARGUMENT`, nothing
//! made) and the node again before its first mkfs, for records an older
//! version accepted (`FAILED_PRECONDITION`, nothing formatted). And mkfs
//! never sees the words as given: [`Validated::args`] rebuilds the argument
//! vector from what was parsed here, so the tool cannot read them another
//! way than this module did.
//!
//! # How options are read
//!
//! - One word is one option, with its value either attached (`-m0`,
//!   `--label=x`) or in the next word (`-m 0`, `--label x`). Flags are never
//!   bundled (`-jq`, `-jd/etc` are refused): getopt would read the rest of
//!   the word as more options.
//! - btrfs long options match by their exact name (getopt_long's
//!   abbreviations, `--root` for `--rootdir`, are refused). ext4 and xfs
//!   have no long options.
//! - No positional arguments: mkfs would take them as devices or sizes.
//! - No value contains `/` or starts with `-`. Numbers are decimal digits,
//!   sizes take a unit suffix where the tool does (ext4 `kmgt`, xfs
//!   `sbkmgtpe`, btrfs `kmgtpe`, either case), labels are 1 to 16 (xfs: 12)
//!   of `A-Z a-z 0-9 _ . -`, UUIDs are 8-4-4-4-12 hex digits, and names
//!   (features, profiles, usage types) come from fixed lists.
//!
//! # The allowlist
//!
//! ext4 (`mkfs.ext4`):
//!
//! | option | value |
//! |---|---|
//! | `-i` bytes per inode, `-C` cluster size | size |
//! | `-I` inode size, `-N` inodes, `-g` blocks per group, `-G` groups per flex group | number |
//! | `-m` reserved blocks | percentage (`0`, `0.5`) |
//! | `-j` | (flag) a journal |
//! | `-J` | `size=`, `fast_commit_size=` (numbers) |
//! | `-L` | label (16) |
//! | `-U` | UUID, `clear`, `random` or `time` |
//! | `-T` | usage types: `default`, `floppy`, `small`, `big`, `huge`, `news`, `largefile`, `largefile4` |
//! | `-O` | features, `^` to clear one: [`EXT4_FEATURES`] (not `journal_dev`) |
//! | `-E` | `lazy_itable_init`, `lazy_journal_init`, `assume_storage_prezeroed`, `packed_meta_blocks` (`[=0\|1]`), `nodiscard`, `stride=`, `stripe_width=`/`stripe-width=`, `resize=`, `mmp_update_interval=`, `orphan_file_size=`, `num_backup_sb=0\|1\|2`, `root_owner[=uid:gid]`, `encoding=utf8`, `encoding_flags=strict\|nostrict`, `quotatype=` (`usrquota:grpquota:prjquota`) |
//!
//! xfs (`mkfs.xfs`):
//!
//! | option | sub-options |
//! |---|---|
//! | `-b` | `size=` |
//! | `-m` | `crc=`, `finobt=`, `rmapbt=`, `reflink=`, `bigtime=`, `inobtcount=` (`0\|1`), `uuid=` |
//! | `-d` | `agcount=`, `agsize=`, `su=`, `sw=`, `sunit=`, `swidth=`, `noalign`, `cowextsize=`, `extszinherit=` |
//! | `-i` | `size=`, `perblock=`, `maxpct=`, `align`, `sparse`, `nrext64`, `projid32bit` (`[=0\|1]`), `attr=1\|2` |
//! | `-l` | `size=`, `version=1\|2`, `sunit=`, `su=`, `lazy-count=0\|1`, `internal[=1]`, `agnum=` |
//! | `-n` | `size=`, `version=2\|ci`, `ftype=0\|1` |
//! | `-L` | label (12) |
//!
//! btrfs (`mkfs.btrfs`):
//!
//! | option | value |
//! |---|---|
//! | `-L`/`--label` | label (16) |
//! | `-n`/`--nodesize` | size |
//! | `-m`/`--metadata`, `-d`/`--data` | profile: `single`, `dup` |
//! | `-M`/`--mixed` | (flag) |
//! | `-O`/`--features` | `mixed-bg`, `extref`, `skinny-metadata`, `no-holes`, `free-space-tree`, `block-group-tree`, `^` to clear one |
//! | `-R`/`--runtime-features` | `quota`, `free-space-tree`, `^` to clear one |
//! | `--csum`/`--checksum` | `crc32c`, `xxhash`, `sha256`, `blake2` |
//! | `-U`/`--uuid` | UUID |
//!
//! # Refused with a reason of their own
//!
//! Everything else is refused as unknown; these get a reason because they
//! are what an attacker (or a copied example) would try:
//!
//! - a host path or device: ext4 `-d`, `-l`, `-z`, `-M`, `-J device=`; xfs
//!   `-c`, `-p`, `-r`, `-d name=`/`file`, `-l logdev=`; btrfs
//!   `-r`/`--rootdir`, and any positional argument;
//! - set by filevol itself (4 KiB sectors, quiet, no discard so a thick
//!   image keeps its preallocation, the volume's size): ext4 `-b`, `-F`,
//!   `-q`, `-E discard`; xfs `-s`, `-q`, `-K`, `-d size=`/`sectsize=`, `-l
//!   sectsize=`; btrfs `-s`/`--sectorsize`, `-q`, `-K`, `-b`/`--byte-count`;
//! - forcing over an existing filesystem (filevol formats only blank
//!   images): xfs `-f`, btrfs `-f`/`--force`;
//! - no filesystem made (dry run, superblock only, print and exit): ext4
//!   `-n`, `-S`, `-V`; xfs `-N`, `-V`; btrfs `-V`, `--help`;
//! - the kernel's reaction to errors, which can panic the node: ext4 `-e`;
//! - a bad-block scan of the device: ext4 `-c`;
//! - another kind of filesystem, not a tuned one: ext4 `-t`, `-r`, `-o`,
//!   `-E offset=`, `-O journal_dev`; btrfs `--shrink`.

use crate::volume::meta::FsType;

/// At most this many words: a StorageClass tunes a handful of settings.
const MAX_WORDS: usize = 64;
/// At most this many bytes in one word.
const MAX_WORD: usize = 256;

/// Why mkfs options were refused: the option at fault, as written, and
/// the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mkfsOptions {option:?} for {}: {reason}", fs.as_str())]
pub struct MkfsOptionError {
    /// The filesystem the options were checked for.
    pub fs: FsType,
    /// The word at fault, as written (shortened past 64 characters).
    pub option: String,
    /// Why it is refused.
    pub reason: String,
}

/// Options [`validate`] accepted for one filesystem, as parsed. The only way
/// to hand options to mkfs (`format::mkfs_file` takes this, not strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated<'a> {
    /// The filesystem they were checked for.
    fs: FsType,
    /// Each option in its canonical spelling, with its value.
    args: Vec<(&'static str, Option<&'a str>)>,
}

impl<'a> Validated<'a> {
    /// The filesystem the options were checked for.
    pub fn fs(&self) -> FsType {
        self.fs
    }

    /// The options in order, each in its canonical spelling (the short one
    /// where there is one: `-L`, not `--label`), with its value separate
    /// (`-m0` and `-m 0` both give `("-m", Some("0"))`). mkfs gets these
    /// words, not the ones the StorageClass wrote.
    pub fn args(&self) -> &[(&'static str, Option<&'a str>)] {
        &self.args
    }
}

/// Checks `options` (the words of a StorageClass's `mkfsOptions`) against
/// the allowlist of `fs`; the first word at fault is the error.
pub fn validate(fs: FsType, options: &[String]) -> Result<Validated<'_>, MkfsOptionError> {
    let refuse = |word: &str, reason: String| MkfsOptionError {
        fs,
        option: shortened(word),
        reason,
    };
    if options.len() > MAX_WORDS {
        return Err(refuse(
            &options[MAX_WORDS],
            format!("more than {MAX_WORDS} words of options"),
        ));
    }
    let table = table(fs);
    let mut args = Vec::new();
    let mut words = options.iter();
    while let Some(word) = words.next() {
        if word.len() > MAX_WORD {
            return Err(refuse(word, format!("longer than {MAX_WORD} bytes")));
        }
        let (opt, attached) = find(fs, table, word).map_err(|reason| refuse(word, reason))?;
        let value = match opt.kind {
            Kind::Refused(why) => return Err(refuse(word, why.reason().to_owned())),
            Kind::Flag => {
                if let Some(rest) = attached {
                    return Err(refuse(
                        word,
                        format!(
                            "{} takes no value, and flags are not bundled: write each option as its own word (found {rest:?} after it)",
                            opt.spelling()
                        ),
                    ));
                }
                None
            }
            Kind::Value(arg) => {
                let value = match attached {
                    Some(v) => v,
                    None => words
                        .next()
                        .ok_or_else(|| refuse(word, format!("{} needs a value", opt.spelling())))?,
                };
                if value.len() > MAX_WORD {
                    return Err(refuse(
                        word,
                        format!("its value is longer than {MAX_WORD} bytes"),
                    ));
                }
                let checked = match arg {
                    Arg::Shape(shape) => check(shape, value),
                    Arg::Subs(subs) => value
                        .split(',')
                        .try_for_each(|item| check_sub(opt.spelling(), subs, item)),
                };
                checked.map_err(|reason| {
                    refuse(word, format!("value {:?}: {reason}", shortened(value)))
                })?;
                Some(value)
            }
        };
        args.push((opt.spelling(), value));
    }
    Ok(Validated { fs, args })
}

/// Each spelling of each allowed option of `fs` (`-L` and `--label` apart),
/// and whether it takes a value. For the fuzz target and error messages.
pub fn allowed(fs: FsType) -> impl Iterator<Item = (&'static str, bool)> {
    table(fs)
        .iter()
        .filter(|o| !matches!(o.kind, Kind::Refused(_)))
        .flat_map(|o| {
            let takes = matches!(o.kind, Kind::Value(_));
            o.short.into_iter().chain(o.long).map(move |s| (s, takes))
        })
}

/// The option `word` starts, and the value attached to it (`-m0`,
/// `--label=x`), if any.
fn find<'w>(
    fs: FsType,
    table: &'static [Opt],
    word: &'w str,
) -> Result<(&'static Opt, Option<&'w str>), String> {
    let unknown = || {
        format!(
            "unknown option; allowed: {}",
            allowed(fs).map(|(s, _)| s).collect::<Vec<_>>().join(" ")
        )
    };
    if let Some(long) = word.strip_prefix("--") {
        let (name, attached) = match long.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (long, None),
        };
        let opt = table
            .iter()
            .find(|o| o.long.is_some_and(|l| &l[2..] == name))
            .ok_or_else(unknown)?;
        return Ok((opt, attached));
    }
    let Some(rest) = word.strip_prefix('-') else {
        return Err(
            "not an option: mkfs would take it as a device or a size (positional arguments are not allowed)"
                .into(),
        );
    };
    let Some(c) = rest.chars().next() else {
        return Err(unknown());
    };
    let attached = &rest[c.len_utf8()..];
    let opt = table
        .iter()
        .find(|o| {
            o.short
                .and_then(|s| s.strip_prefix('-'))
                .is_some_and(|name| name.chars().eq([c]))
        })
        .ok_or_else(unknown)?;
    Ok((opt, (!attached.is_empty()).then_some(attached)))
}

/// Checks `value` against `shape`.
fn check(shape: Shape, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("empty".into());
    }
    if value.contains('/') {
        return Err("contains '/': no value may name a path".into());
    }
    if value.starts_with('-') {
        return Err("starts with '-': a value must not look like an option".into());
    }
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    let ok = match shape {
        Shape::Count => digits(value),
        Shape::Size(units) => {
            let number = value
                .strip_suffix(|c: char| units.contains(c.to_ascii_lowercase()))
                .unwrap_or(value);
            digits(number)
        }
        Shape::Percent => match value.split_once('.') {
            Some((whole, fraction)) => digits(whole) && digits(fraction),
            None => digits(value),
        },
        Shape::Label(max) => {
            value.len() <= max
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        }
        Shape::Uuid(words) => is_uuid(value) || words.contains(&value),
        Shape::Word(words) => words.contains(&value),
        Shape::List { names, negate, sep } => {
            return value.split(sep).try_for_each(|item| {
                let name = match item.strip_prefix('^') {
                    Some(name) if negate => name,
                    _ => item,
                };
                if names.contains(&name) {
                    Ok(())
                } else {
                    Err(format!(
                        "{item:?} is not one of {}{}",
                        names.join(" "),
                        if negate { " (^ to clear one)" } else { "" }
                    ))
                }
            });
        }
        Shape::UidGid => value
            .split_once(':')
            .is_some_and(|(uid, gid)| digits(uid) && digits(gid)),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("expected {}", shape.describe()))
    }
}

/// Checks one sub-option (`lazy_itable_init=0`, `agcount=4`) of `option`.
fn check_sub(option: &str, subs: &[Sub], item: &str) -> Result<(), String> {
    let (key, value) = match item.split_once('=') {
        Some((key, value)) => (key, Some(value)),
        None => (item, None),
    };
    let Some(sub) = subs.iter().find(|s| s.key == key) else {
        return Err(format!(
            "unknown sub-option {key:?} of {option}; allowed: {}",
            subs.iter()
                .filter(|s| !matches!(s.value, SubValue::Refused(_)))
                .map(|s| s.key)
                .collect::<Vec<_>>()
                .join(" ")
        ));
    };
    match (sub.value, value) {
        (SubValue::Refused(why), _) => Err(format!("{key}: {}", why.reason())),
        (SubValue::None, None) => Ok(()),
        (SubValue::None, Some(_)) => Err(format!("{key} takes no value")),
        (SubValue::Required(_), None) => Err(format!("{key} needs a value")),
        (SubValue::Optional(_), None) => Ok(()),
        (SubValue::Required(shape) | SubValue::Optional(shape), Some(v)) => {
            check(shape, v).map_err(|reason| format!("{key}={v:?}: {reason}"))
        }
    }
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `word` for an error message: at most 64 characters.
fn shortened(word: &str) -> String {
    match word.char_indices().nth(64) {
        Some((end, _)) => format!("{}...", &word[..end]),
        None => word.to_owned(),
    }
}

// ---- the tables ----

/// An option of one mkfs: its spellings and what it takes.
#[derive(Debug)]
struct Opt {
    /// `-X`, if it has a short spelling.
    short: Option<&'static str>,
    /// `--name`, if it has a long spelling (btrfs only).
    long: Option<&'static str>,
    /// A flag, a value of some shape, or refused.
    kind: Kind,
}

impl Opt {
    /// The spelling mkfs is given: the short one where there is one.
    fn spelling(&self) -> &'static str {
        self.short.or(self.long).expect("an option has a spelling")
    }
}

/// How an option is taken.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// No value.
    Flag,
    /// A value.
    Value(Arg),
    /// Never, for this reason.
    Refused(Why),
}

/// What an option's value is.
#[derive(Debug, Clone, Copy)]
enum Arg {
    /// One value of this shape.
    Shape(Shape),
    /// Comma-separated sub-options, `key` or `key=value`.
    Subs(&'static [Sub]),
}

/// What a value must look like.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// Decimal digits.
    Count,
    /// Decimal digits and at most one of these unit letters (either case).
    Size(&'static str),
    /// Decimal digits with an optional fraction.
    Percent,
    /// 1 to this many of `A-Z a-z 0-9 _ . -`.
    Label(usize),
    /// A UUID, or one of these words.
    Uuid(&'static [&'static str]),
    /// One of these words.
    Word(&'static [&'static str]),
    /// A `sep`-separated list of these names, each negated by a leading
    /// `^` if `negate`.
    List {
        /// The names allowed.
        names: &'static [&'static str],
        /// Whether `^name` is allowed.
        negate: bool,
        /// The separator.
        sep: char,
    },
    /// `uid:gid`, numeric.
    UidGid,
}

impl Shape {
    fn describe(self) -> String {
        match self {
            Shape::Count => "a number".into(),
            Shape::Size(units) => format!("a number with an optional unit ({units})"),
            Shape::Percent => "a percentage (0, 0.5)".into(),
            Shape::Label(max) => format!("a label of 1 to {max} of A-Z a-z 0-9 _ . -"),
            Shape::Uuid(&[]) => "a UUID".into(),
            Shape::Uuid(words) => format!("a UUID or one of {}", words.join(" ")),
            Shape::Word(words) => format!("one of {}", words.join(" ")),
            Shape::List { names, .. } => format!("a list of {}", names.join(" ")),
            Shape::UidGid => "uid:gid".into(),
        }
    }
}

/// A sub-option of an option that takes `key[=value],...`.
#[derive(Debug)]
struct Sub {
    /// Its name.
    key: &'static str,
    /// What it takes.
    value: SubValue,
}

/// What a sub-option takes.
#[derive(Debug, Clone, Copy)]
enum SubValue {
    /// No value (`noalign`).
    None,
    /// A value, which may be left out (`lazy_itable_init`).
    Optional(Shape),
    /// A value (`agcount=4`).
    Required(Shape),
    /// Never, for this reason.
    Refused(Why),
}

/// Why an option is refused outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// It names a file, directory or device of the node.
    HostPath,
    /// filevol sets it.
    SetByFilevol,
    /// It forces writing over an existing filesystem.
    Force,
    /// mkfs would not make a filesystem.
    NoFilesystem,
    /// It sets the kernel's reaction to errors.
    ErrorBehaviour,
    /// It scans the device for bad blocks.
    BadBlocks,
    /// It makes another kind of filesystem or layout.
    NotTuning,
}

impl Why {
    fn reason(self) -> &'static str {
        match self {
            Why::HostPath => {
                "takes a path or device of the node: not allowed (a StorageClass may tune the filesystem, never reach the host)"
            }
            Why::SetByFilevol => {
                "is set by filevol itself (4 KiB sectors, quiet, no discard, the volume's size): not allowed"
            }
            Why::Force => "forces mkfs over an existing filesystem: not allowed (filevol formats only blank images)",
            Why::NoFilesystem => "would not make the filesystem (a dry run, a superblock only, or print and exit): not allowed",
            Why::ErrorBehaviour => "sets the kernel's reaction to filesystem errors, which can panic the node: not allowed",
            Why::BadBlocks => "scans the device for bad blocks: not allowed",
            Why::NotTuning => "makes another kind of filesystem, not a tuned one: not allowed",
        }
    }
}

const fn flag(short: &'static str) -> Opt {
    Opt {
        short: Some(short),
        long: None,
        kind: Kind::Flag,
    }
}

const fn value(short: &'static str, shape: Shape) -> Opt {
    Opt {
        short: Some(short),
        long: None,
        kind: Kind::Value(Arg::Shape(shape)),
    }
}

const fn subs(short: &'static str, subs: &'static [Sub]) -> Opt {
    Opt {
        short: Some(short),
        long: None,
        kind: Kind::Value(Arg::Subs(subs)),
    }
}

const fn refused(short: &'static str, why: Why) -> Opt {
    Opt {
        short: Some(short),
        long: None,
        kind: Kind::Refused(why),
    }
}

/// A btrfs option: short and long spelling (either may be absent).
const fn btrfs(short: Option<&'static str>, long: &'static str, kind: Kind) -> Opt {
    Opt {
        short,
        long: Some(long),
        kind,
    }
}

/// A btrfs option's kind: a value of this shape.
const fn takes(shape: Shape) -> Kind {
    Kind::Value(Arg::Shape(shape))
}

const fn sub(key: &'static str, value: SubValue) -> Sub {
    Sub { key, value }
}

const BOOL: Shape = Shape::Word(&["0", "1"]);
const EXT4_UNITS: &str = "kmgt";
const XFS_UNITS: &str = "sbkmgtpe";
const BTRFS_UNITS: &str = "kmgtpe";

/// ext4 features `-O` may set or clear (ext4(5)); not `journal_dev`, which
/// makes an external journal instead of a filesystem.
pub const EXT4_FEATURES: &[&str] = &[
    "64bit",
    "bigalloc",
    "casefold",
    "dir_index",
    "dir_nlink",
    "ea_inode",
    "encrypt",
    "ext_attr",
    "extent",
    "extents",
    "extra_isize",
    "fast_commit",
    "filetype",
    "flex_bg",
    "has_journal",
    "huge_file",
    "inline_data",
    "large_dir",
    "large_file",
    "metadata_csum",
    "metadata_csum_seed",
    "meta_bg",
    "mmp",
    "orphan_file",
    "project",
    "quota",
    "resize_inode",
    "sparse_super",
    "sparse_super2",
    "stable_inodes",
    "uninit_bg",
    "verity",
];

/// ext4 usage types (`-T`, the stanzas of mke2fs.conf); not `hurd`.
const EXT4_USAGE: &[&str] = &[
    "default",
    "floppy",
    "small",
    "big",
    "huge",
    "news",
    "largefile",
    "largefile4",
];

const EXT4_EXTENDED: &[Sub] = &[
    sub("lazy_itable_init", SubValue::Optional(BOOL)),
    sub("lazy_journal_init", SubValue::Optional(BOOL)),
    sub("assume_storage_prezeroed", SubValue::Optional(BOOL)),
    sub("packed_meta_blocks", SubValue::Optional(BOOL)),
    sub("nodiscard", SubValue::None),
    sub("stride", SubValue::Required(Shape::Count)),
    sub("stripe_width", SubValue::Required(Shape::Count)),
    sub("stripe-width", SubValue::Required(Shape::Count)),
    sub("resize", SubValue::Required(Shape::Count)),
    sub("mmp_update_interval", SubValue::Required(Shape::Count)),
    sub(
        "orphan_file_size",
        SubValue::Required(Shape::Size(EXT4_UNITS)),
    ),
    sub(
        "num_backup_sb",
        SubValue::Required(Shape::Word(&["0", "1", "2"])),
    ),
    sub("root_owner", SubValue::Optional(Shape::UidGid)),
    sub(
        "encoding",
        SubValue::Required(Shape::Word(&["utf8", "utf8-12.1"])),
    ),
    sub(
        "encoding_flags",
        SubValue::Required(Shape::Word(&["strict", "nostrict"])),
    ),
    sub(
        "quotatype",
        SubValue::Required(Shape::List {
            names: &["usrquota", "grpquota", "prjquota"],
            negate: false,
            sep: ':',
        }),
    ),
    // Images are formatted without discard: it would undo a thick image's
    // preallocation.
    sub("discard", SubValue::Refused(Why::SetByFilevol)),
    sub("offset", SubValue::Refused(Why::NotTuning)),
];

const EXT4_JOURNAL: &[Sub] = &[
    sub("size", SubValue::Required(Shape::Count)),
    sub("fast_commit_size", SubValue::Required(Shape::Count)),
    sub("device", SubValue::Refused(Why::HostPath)),
];

const EXT4: &[Opt] = &[
    value("-i", Shape::Size(EXT4_UNITS)),
    value("-I", Shape::Count),
    value("-N", Shape::Count),
    value("-m", Shape::Percent),
    value("-g", Shape::Count),
    value("-G", Shape::Count),
    value("-C", Shape::Size(EXT4_UNITS)),
    flag("-j"),
    subs("-J", EXT4_JOURNAL),
    value("-L", Shape::Label(16)),
    value("-U", Shape::Uuid(&["clear", "random", "time"])),
    value(
        "-T",
        Shape::List {
            names: EXT4_USAGE,
            negate: false,
            sep: ',',
        },
    ),
    value(
        "-O",
        Shape::List {
            names: EXT4_FEATURES,
            negate: true,
            sep: ',',
        },
    ),
    subs("-E", EXT4_EXTENDED),
    refused("-d", Why::HostPath),
    refused("-l", Why::HostPath),
    refused("-z", Why::HostPath),
    refused("-M", Why::HostPath),
    refused("-b", Why::SetByFilevol),
    refused("-F", Why::SetByFilevol),
    refused("-q", Why::SetByFilevol),
    refused("-n", Why::NoFilesystem),
    refused("-S", Why::NoFilesystem),
    refused("-V", Why::NoFilesystem),
    refused("-e", Why::ErrorBehaviour),
    refused("-c", Why::BadBlocks),
    refused("-t", Why::NotTuning),
    refused("-r", Why::NotTuning),
    refused("-o", Why::NotTuning),
];

const XFS_BLOCK: &[Sub] = &[sub("size", SubValue::Required(Shape::Size(XFS_UNITS)))];

const XFS_META: &[Sub] = &[
    sub("crc", SubValue::Required(BOOL)),
    sub("finobt", SubValue::Required(BOOL)),
    sub("rmapbt", SubValue::Required(BOOL)),
    sub("reflink", SubValue::Required(BOOL)),
    sub("bigtime", SubValue::Required(BOOL)),
    sub("inobtcount", SubValue::Required(BOOL)),
    sub("uuid", SubValue::Required(Shape::Uuid(&[]))),
];

const XFS_DATA: &[Sub] = &[
    sub("agcount", SubValue::Required(Shape::Count)),
    sub("agsize", SubValue::Required(Shape::Size(XFS_UNITS))),
    sub("su", SubValue::Required(Shape::Size(XFS_UNITS))),
    sub("sw", SubValue::Required(Shape::Count)),
    sub("sunit", SubValue::Required(Shape::Count)),
    sub("swidth", SubValue::Required(Shape::Count)),
    sub("noalign", SubValue::None),
    sub("cowextsize", SubValue::Required(Shape::Count)),
    sub("extszinherit", SubValue::Required(Shape::Count)),
    sub("name", SubValue::Refused(Why::HostPath)),
    sub("file", SubValue::Refused(Why::HostPath)),
    sub("size", SubValue::Refused(Why::SetByFilevol)),
    sub("sectsize", SubValue::Refused(Why::SetByFilevol)),
];

const XFS_INODE: &[Sub] = &[
    sub("size", SubValue::Required(Shape::Size(XFS_UNITS))),
    sub("perblock", SubValue::Required(Shape::Count)),
    sub("maxpct", SubValue::Required(Shape::Count)),
    sub("align", SubValue::Optional(BOOL)),
    sub("sparse", SubValue::Optional(BOOL)),
    sub("nrext64", SubValue::Optional(BOOL)),
    sub("projid32bit", SubValue::Optional(BOOL)),
    sub("attr", SubValue::Required(Shape::Word(&["1", "2"]))),
];

const XFS_LOG: &[Sub] = &[
    sub("size", SubValue::Required(Shape::Size(XFS_UNITS))),
    sub("version", SubValue::Required(Shape::Word(&["1", "2"]))),
    sub("sunit", SubValue::Required(Shape::Count)),
    sub("su", SubValue::Required(Shape::Size(XFS_UNITS))),
    sub("lazy-count", SubValue::Required(BOOL)),
    // An external log (internal=0) would need logdev.
    sub("internal", SubValue::Optional(Shape::Word(&["1"]))),
    sub("agnum", SubValue::Required(Shape::Count)),
    sub("logdev", SubValue::Refused(Why::HostPath)),
    sub("sectsize", SubValue::Refused(Why::SetByFilevol)),
];

const XFS_NAMING: &[Sub] = &[
    sub("size", SubValue::Required(Shape::Size(XFS_UNITS))),
    sub("version", SubValue::Required(Shape::Word(&["2", "ci"]))),
    sub("ftype", SubValue::Required(BOOL)),
];

const XFS: &[Opt] = &[
    subs("-b", XFS_BLOCK),
    subs("-m", XFS_META),
    subs("-d", XFS_DATA),
    subs("-i", XFS_INODE),
    subs("-l", XFS_LOG),
    subs("-n", XFS_NAMING),
    value("-L", Shape::Label(12)),
    refused("-c", Why::HostPath),
    refused("-p", Why::HostPath),
    // The realtime section lives on another device (rtdev=).
    refused("-r", Why::HostPath),
    refused("-s", Why::SetByFilevol),
    refused("-q", Why::SetByFilevol),
    refused("-K", Why::SetByFilevol),
    refused("-f", Why::Force),
    refused("-N", Why::NoFilesystem),
    refused("-V", Why::NoFilesystem),
];

const BTRFS_PROFILES: Shape = Shape::Word(&["single", "dup"]);

const BTRFS: &[Opt] = &[
    btrfs(Some("-L"), "--label", takes(Shape::Label(16))),
    btrfs(Some("-n"), "--nodesize", takes(Shape::Size(BTRFS_UNITS))),
    btrfs(Some("-m"), "--metadata", takes(BTRFS_PROFILES)),
    btrfs(Some("-d"), "--data", takes(BTRFS_PROFILES)),
    btrfs(Some("-M"), "--mixed", Kind::Flag),
    btrfs(
        Some("-O"),
        "--features",
        takes(Shape::List {
            names: &[
                "mixed-bg",
                "extref",
                "skinny-metadata",
                "no-holes",
                "free-space-tree",
                "block-group-tree",
            ],
            negate: true,
            sep: ',',
        }),
    ),
    btrfs(
        Some("-R"),
        "--runtime-features",
        takes(Shape::List {
            names: &["quota", "free-space-tree"],
            negate: true,
            sep: ',',
        }),
    ),
    btrfs(
        None,
        "--csum",
        takes(Shape::Word(&["crc32c", "xxhash", "sha256", "blake2"])),
    ),
    btrfs(
        None,
        "--checksum",
        takes(Shape::Word(&["crc32c", "xxhash", "sha256", "blake2"])),
    ),
    btrfs(Some("-U"), "--uuid", takes(Shape::Uuid(&[]))),
    btrfs(Some("-r"), "--rootdir", Kind::Refused(Why::HostPath)),
    btrfs(None, "--shrink", Kind::Refused(Why::NotTuning)),
    btrfs(Some("-s"), "--sectorsize", Kind::Refused(Why::SetByFilevol)),
    btrfs(Some("-b"), "--byte-count", Kind::Refused(Why::SetByFilevol)),
    btrfs(Some("-q"), "--quiet", Kind::Refused(Why::SetByFilevol)),
    btrfs(Some("-K"), "--nodiscard", Kind::Refused(Why::SetByFilevol)),
    btrfs(Some("-f"), "--force", Kind::Refused(Why::Force)),
    btrfs(Some("-V"), "--version", Kind::Refused(Why::NoFilesystem)),
    btrfs(None, "--help", Kind::Refused(Why::NoFilesystem)),
];

fn table(fs: FsType) -> &'static [Opt] {
    match fs {
        FsType::Ext4 => EXT4,
        FsType::Xfs => XFS,
        FsType::Btrfs => BTRFS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn refused(fs: FsType, options: &str) -> MkfsOptionError {
        match validate(fs, &words(options)) {
            Ok(v) => panic!("{} {options:?} accepted as {:?}", fs.as_str(), v.args()),
            Err(e) => e,
        }
    }

    /// Every option that reaches the node is refused, and the message names
    /// the word at fault and says why.
    #[test]
    fn options_that_reach_the_node_are_refused_by_name() {
        for (fs, options, word, why) in [
            (FsType::Ext4, "-d /etc", "-d", "path or device"),
            (FsType::Ext4, "-d/etc", "-d/etc", "path or device"),
            (FsType::Ext4, "-m 1 -l /etc/bad", "-l", "path or device"),
            (FsType::Ext4, "-z /var/tmp/undo", "-z", "path or device"),
            (FsType::Ext4, "-M /mnt", "-M", "path or device"),
            (
                FsType::Ext4,
                "-J device=/dev/sdb",
                "-J",
                "device: takes a path",
            ),
            (
                FsType::Ext4,
                "-J size=64,device=UUID=x",
                "-J",
                "device: takes a path",
            ),
            (FsType::Ext4, "-m 1 /dev/sdb", "/dev/sdb", "positional"),
            (FsType::Ext4, "-jd /etc", "-jd", "not bundled"),
            (FsType::Ext4, "-L a/b", "-L", "contains '/'"),
            (
                FsType::Ext4,
                "-E root_owner=0:0,offset=4096",
                "-E",
                "offset",
            ),
            (FsType::Xfs, "-d name=/dev/sdb", "-d", "name: takes a path"),
            (
                FsType::Xfs,
                "-d agcount=4,file,name=x",
                "-d",
                "file: takes a path",
            ),
            (
                FsType::Xfs,
                "-l logdev=/dev/sdb,size=64m",
                "-l",
                "logdev: takes a path",
            ),
            (FsType::Xfs, "-p /etc/protofile", "-p", "path or device"),
            (FsType::Xfs, "-r rtdev=/dev/sdb", "-r", "path or device"),
            (FsType::Xfs, "-c options=/etc/x", "-c", "path or device"),
            (FsType::Xfs, "/dev/sdb", "/dev/sdb", "positional"),
            (FsType::Btrfs, "-f /dev/sdb", "-f", "forces"),
            (FsType::Btrfs, "/dev/sdb", "/dev/sdb", "positional"),
            (FsType::Btrfs, "-r /etc", "-r", "path or device"),
            (
                FsType::Btrfs,
                "--rootdir /etc",
                "--rootdir",
                "path or device",
            ),
            (
                FsType::Btrfs,
                "--rootdir=/etc",
                "--rootdir=/etc",
                "path or device",
            ),
            // getopt_long would take an abbreviation for --rootdir.
            (FsType::Btrfs, "--root /etc", "--root", "unknown option"),
            (FsType::Btrfs, "-L x -L/etc", "-L/etc", "contains '/'"),
        ] {
            let e = refused(fs, options);
            assert_eq!(e.option, word, "{} {options:?}: {e}", fs.as_str());
            assert!(e.reason.contains(why), "{} {options:?}: {e}", fs.as_str());
            assert!(e.to_string().contains(&format!("{word:?}")), "{e}");
        }
    }

    /// What filevol sets itself, what would not make a filesystem, what
    /// could panic the node, and what is simply not on the list.
    #[test]
    fn other_options_off_the_list_are_refused_with_their_reason() {
        for (fs, options, why) in [
            (FsType::Ext4, "-b 1024", "set by filevol"),
            (FsType::Ext4, "-F", "set by filevol"),
            (FsType::Ext4, "-q", "set by filevol"),
            (FsType::Ext4, "-E discard", "set by filevol"),
            (FsType::Ext4, "-e panic", "panic the node"),
            (FsType::Ext4, "-n", "would not make"),
            (FsType::Ext4, "-S", "would not make"),
            (FsType::Ext4, "-c", "bad blocks"),
            (FsType::Ext4, "-t ext2", "another kind"),
            (FsType::Ext4, "-O journal_dev", "is not one of"),
            (FsType::Ext4, "-O list-all", "is not one of"),
            (FsType::Ext4, "-T hurd", "is not one of"),
            (FsType::Ext4, "-Z 1", "unknown option; allowed: -i -I"),
            (FsType::Ext4, "--label x", "unknown option"),
            (FsType::Ext4, "-", "unknown option"),
            (FsType::Ext4, "-m", "needs a value"),
            (FsType::Ext4, "-m -1", "starts with '-'"),
            (
                FsType::Ext4,
                "-L sixteen-chars-and-more",
                "a label of 1 to 16",
            ),
            (FsType::Ext4, "-U not-a-uuid", "a UUID or one of"),
            (FsType::Ext4, "-E lazy_itable_init=2", "one of 0 1"),
            (FsType::Ext4, "-E ,nodiscard", "unknown sub-option \"\""),
            (FsType::Ext4, "-E nodiscard=1", "takes no value"),
            (FsType::Xfs, "-s size=512", "set by filevol"),
            (FsType::Xfs, "-q", "set by filevol"),
            (FsType::Xfs, "-K", "set by filevol"),
            (FsType::Xfs, "-d size=1g", "set by filevol"),
            (FsType::Xfs, "-N", "would not make"),
            (FsType::Xfs, "-f", "forces"),
            (FsType::Xfs, "-l internal=0", "one of 1"),
            (FsType::Xfs, "-m crc", "crc needs a value"),
            (FsType::Xfs, "-L thirteen-char", "a label of 1 to 12"),
            (FsType::Btrfs, "-s 4096", "set by filevol"),
            (FsType::Btrfs, "--sectorsize=4096", "set by filevol"),
            (FsType::Btrfs, "-q", "set by filevol"),
            (FsType::Btrfs, "-K", "set by filevol"),
            (FsType::Btrfs, "-b 1g", "set by filevol"),
            (FsType::Btrfs, "-V", "would not make"),
            (FsType::Btrfs, "-m raid1", "one of single dup"),
            (FsType::Btrfs, "-O list-all", "is not one of"),
            (FsType::Btrfs, "--label", "needs a value"),
            (FsType::Btrfs, "-MK", "not bundled"),
            (FsType::Btrfs, "--mixed=1", "takes no value"),
        ] {
            let e = refused(fs, options);
            assert!(e.reason.contains(why), "{} {options:?}: {e}", fs.as_str());
        }
        let many = vec!["-j".to_owned(); MAX_WORDS + 1];
        assert!(validate(FsType::Ext4, &many).is_err());
        let long = format!("-L{}", "x".repeat(1000));
        let e = validate(FsType::Ext4, &[long]).unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");
    }

    /// Typical tuning is accepted attached or apart, and reaches mkfs in
    /// one canonical spelling.
    #[test]
    fn tuning_is_accepted_in_both_spellings() {
        for (fs, options, args) in [
            (
                FsType::Ext4,
                "-m 0 -i 16384 -I 512 -N 4096 -O ^has_journal,metadata_csum -L data -T largefile -E lazy_itable_init=0,stride=16,stripe-width=64,root_owner=1000:1000",
                vec![
                    ("-m", Some("0")),
                    ("-i", Some("16384")),
                    ("-I", Some("512")),
                    ("-N", Some("4096")),
                    ("-O", Some("^has_journal,metadata_csum")),
                    ("-L", Some("data")),
                    ("-T", Some("largefile")),
                    ("-E", Some("lazy_itable_init=0,stride=16,stripe-width=64,root_owner=1000:1000")),
                ],
            ),
            (
                FsType::Ext4,
                "-m0 -i16k -j -Jsize=64 -Ldata -U 0ccd6b9c-1c8a-4b7e-9d55-2b36a2d4b0e1 -m0.5",
                vec![
                    ("-m", Some("0")),
                    ("-i", Some("16k")),
                    ("-j", None),
                    ("-J", Some("size=64")),
                    ("-L", Some("data")),
                    ("-U", Some("0ccd6b9c-1c8a-4b7e-9d55-2b36a2d4b0e1")),
                    ("-m", Some("0.5")),
                ],
            ),
            (
                FsType::Xfs,
                "-b size=4096 -m reflink=1,crc=1 -i maxpct=5,sparse -d agcount=4,su=64k,sw=4 -l size=64m,lazy-count=1 -n ftype=1 -L data",
                vec![
                    ("-b", Some("size=4096")),
                    ("-m", Some("reflink=1,crc=1")),
                    ("-i", Some("maxpct=5,sparse")),
                    ("-d", Some("agcount=4,su=64k,sw=4")),
                    ("-l", Some("size=64m,lazy-count=1")),
                    ("-n", Some("ftype=1")),
                    ("-L", Some("data")),
                ],
            ),
            (
                FsType::Xfs,
                "-bsize=4k -mreflink=0 -Ldata",
                vec![
                    ("-b", Some("size=4k")),
                    ("-m", Some("reflink=0")),
                    ("-L", Some("data")),
                ],
            ),
            (
                FsType::Btrfs,
                "-L data -n 16k -m dup -d single -O no-holes,^extref -R quota --csum xxhash -M",
                vec![
                    ("-L", Some("data")),
                    ("-n", Some("16k")),
                    ("-m", Some("dup")),
                    ("-d", Some("single")),
                    ("-O", Some("no-holes,^extref")),
                    ("-R", Some("quota")),
                    ("--csum", Some("xxhash")),
                    ("-M", None),
                ],
            ),
            (
                FsType::Btrfs,
                "--label=data --nodesize 16K -mdup --data=single --checksum=sha256 --mixed --uuid 0CCD6B9C-1C8A-4B7E-9D55-2B36A2D4B0E1",
                vec![
                    ("-L", Some("data")),
                    ("-n", Some("16K")),
                    ("-m", Some("dup")),
                    ("-d", Some("single")),
                    ("--checksum", Some("sha256")),
                    ("-M", None),
                    ("-U", Some("0CCD6B9C-1C8A-4B7E-9D55-2B36A2D4B0E1")),
                ],
            ),
        ] {
            let given = words(options);
            let v = validate(fs, &given)
                .unwrap_or_else(|e| panic!("{} {options:?}: {e}", fs.as_str()));
            assert_eq!(v.fs(), fs);
            assert_eq!(v.args(), args.as_slice(), "{} {options:?}", fs.as_str());
        }
        assert_eq!(validate(FsType::Xfs, &[]).unwrap().args(), &[]);
    }

    /// No option is both allowed and refused, and no spelling is listed
    /// twice: the tables say one thing about each option.
    #[test]
    fn each_option_is_listed_once() {
        for fs in [FsType::Ext4, FsType::Xfs, FsType::Btrfs] {
            let mut seen = std::collections::HashSet::new();
            for o in table(fs) {
                for s in o.short.into_iter().chain(o.long) {
                    assert!(seen.insert(s), "{} lists {s} twice", fs.as_str());
                    let short = s.len() == 2 && s.starts_with('-');
                    let long = s.starts_with("--") && s.len() > 3;
                    assert!(short || long, "{s}");
                }
            }
        }
        assert!(allowed(FsType::Btrfs).any(|(s, takes)| s == "--label" && takes));
        assert!(allowed(FsType::Ext4).any(|(s, takes)| s == "-j" && !takes));
        assert!(!allowed(FsType::Ext4).any(|(s, _)| s == "-d"));
    }
}
