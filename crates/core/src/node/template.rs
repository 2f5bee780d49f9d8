//! Formatted templates: a new ext4 volume is a copy of a filesystem made
//! once, not a mkfs of its own.
//!
//! mkfs is a process start and ~20 ms of CPU for every volume, the same
//! work with the same result each time but for the UUID. So the first
//! volume of a (filesystem, size, mkfs arguments) makes a template in the
//! pool, `<pool>/templates/<fs>-<bytes>-<recipe>`, and every volume after it
//! starts as a copy of that template: a reflink where the pool can share
//! blocks (instant, and the template's few MiB of metadata are shared until
//! the volume writes them), else a sparse copy of those few MiB. The copy
//! then gets a fresh random UUID in-process (`ext4::renew_uuid`), so no
//! two volumes share one, and goes through the same sync, crash points and
//! rename as a mkfs'd image (`Node::format_image`). A thick volume gets the
//! template's data written into its own preallocated image instead
//! (`Node::template_into`, under the intent of `super::in_place`): a copy
//! would be a second preallocated file, or share the template's blocks.
//!
//! mke2fs leaves out a last block group too small for its own metadata, so
//! the template of some sizes (1025 MiB, 20e9 bytes) is a filesystem a few
//! MiB shorter than its file; a mkfs of the volume's own would be the
//! same, and the kernel mounts it. The check accepts it.
//!
//! The recipe is filevol's mkfs arguments plus two that make a template
//! fit to copy:
//! - `-O metadata_csum_seed`: metadata checksums are seeded from a field of
//!   their own, so the new UUID breaks none of them;
//! - `-E assume_storage_prezeroed=1`: the template is a new sparse file,
//!   which reads as zeros, so mkfs need not write zeros over the inode
//!   tables and the journal, and marks them zeroed. Without it mkfs (or
//!   the kernel's `ext4lazyinit` thread after every first mount) writes
//!   zeros through the inode tables: hundreds of MiB per 10 GiB volume,
//!   kernel CPU on every lifecycle and space the pool never gets back.
//!
//! The template name carries a hash of the whole argument vector, so a
//! change of recipe makes new templates rather than reusing old ones.
//!
//! Templates are made like every other object in the pool: in this
//! process's scratch, synced, then renamed into `templates/` and the
//! directory synced, so a crash leaves a whole template or none (and
//! scratch debris a controller removes). Node plugins sharing a pool may
//! make the same template at once: each rename replaces the other's with
//! an equivalent file, and a copy in progress holds its own descriptor.
//! Only `templates/` holds them: volume listings, `pool ls` and `doctor`
//! never look there. Capacity counts their blocks, and the pool keeps at
//! most `pool::MAX_TEMPLATES`, evicting the least recently used (a use
//! sets the template's mtime) when a node makes one, and reclaiming idle
//! ones (`pool::templates`).
//!
//! A template is checked at each use, on the copy (the bytes that will
//! become the volume): its size, and the superblock's magic, checksum,
//! geometry and features. One that fails is removed and the volume gets a
//! mkfs of its own. So does a volume whose template cannot be made (an
//! older mkfs without those options, a pool too full for it), a thick
//! volume whose format in place was cut short, a volume with
//! `mkfsOptions`, an xfs or btrfs volume
//! (their UUIDs are not rewritten in-process yet), and any volume on a pool
//! that can neither reflink nor report holes (a "sparse" copy there would
//! write every byte).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::error::{sys, NodeError};
use super::kernel::Renewal;
use super::{format, Node};
use crate::pool::Pool;
use crate::sys::fs as sysfs;
use crate::volume::meta::{FsType, VolumeMeta};
use crate::volume::mkfs_options;

/// What filevol adds to its mkfs arguments for an ext4 template (see the
/// module documentation).
const EXT4_TEMPLATE: [&str; 4] = [
    "-O",
    "metadata_csum_seed",
    "-E",
    "assume_storage_prezeroed=1",
];

/// How the template of one volume is made, and its name.
#[derive(Debug)]
pub(super) struct Recipe {
    /// Its filesystem.
    fs: FsType,
    /// Its size in bytes.
    len: u64,
    /// The mkfs options beyond filevol's own (see [`format::mkfs_args`]).
    options: Vec<String>,
    /// Its file name in `templates/`.
    name: String,
}

impl Recipe {
    /// The recipe for volume `v`, or `None` when it gets a mkfs of its own
    /// (see the module documentation for which do).
    pub(super) fn of(pool: &Pool, v: &VolumeMeta, fs: FsType) -> Option<Recipe> {
        let copies_cheaply = pool.reflinks() || pool.reports_holes();
        if fs != FsType::Ext4 || !v.mkfs_options.is_empty() || !copies_cheaply {
            return None;
        }
        let options: Vec<String> = EXT4_TEMPLATE.iter().map(|&s| s.to_owned()).collect();
        let (program, args) = format::mkfs_args(&mkfs_options::validate(fs, &options).ok()?);
        let words: Vec<&str> = std::iter::once(program)
            .chain(args.iter().map(String::as_str))
            .collect();
        let hash = crate::volume::ids::fnv1a64(words.join("\0").as_bytes().iter());
        Some(Recipe {
            fs,
            len: v.capacity_bytes,
            name: format!("{}-{}-{hash:016x}", fs.as_str(), v.capacity_bytes),
            options,
        })
    }
}

impl Node {
    /// Makes `scratch` (which must not exist) a copy of the volume's
    /// template with a UUID of its own, making the template first if
    /// there is none. `Ok(None)` when there is no usable template: the
    /// caller then runs mkfs itself, and `scratch` does not exist.
    pub(super) fn copy_template(
        &self,
        pool: &Pool,
        recipe: &Recipe,
        scratch: &Path,
    ) -> Result<Option<File>, NodeError> {
        let path = pool.template_path(&recipe.name);
        let Some(template) = self.usable_template(pool, recipe, &path) else {
            return Ok(None);
        };
        let copy = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(scratch)
            .map_err(sys("create", scratch))?;
        match sysfs::reflink(&template, &copy) {
            Ok(()) => {}
            Err(e) if sysfs::reflink_unsupported(&e) => {
                sysfs::sparse_copy(&template, &copy, recipe.len)
                    .map_err(sys("copy the template into", scratch))?;
            }
            Err(e) => return Err(sys("reflink the template into", scratch)(e)),
        }
        if self.renewed(&template, &copy, recipe, &path, scratch)? {
            Ok(Some(copy))
        } else {
            drop(copy);
            sysfs::remove_if_present(scratch).map_err(sys("remove", scratch))?;
            Ok(None)
        }
    }

    /// Writes the volume's template into `image`, the volume's own
    /// preallocated image (a thick volume's first format, see
    /// `Node::format_in_place`), with a UUID of its own, making the
    /// template first if there is none. The template's data is written
    /// into the image's own blocks, never shared with the template nor
    /// put in a new file, so the image keeps every block it owns and the
    /// format needs no space beyond it; what the template has as holes
    /// the image reads as zeros already (it was proven blank). `Ok(false)`
    /// when there is no usable template: the caller then runs mkfs on the
    /// image, which may hold part of an unusable template by then.
    pub(super) fn template_into(
        &self,
        pool: &Pool,
        recipe: &Recipe,
        image: &File,
        image_path: &Path,
    ) -> Result<bool, NodeError> {
        let path = pool.template_path(&recipe.name);
        let Some(template) = self.usable_template(pool, recipe, &path) else {
            return Ok(false);
        };
        sysfs::write_data_into(&template, image, recipe.len)
            .map_err(sys("write the template into", image_path))?;
        self.renewed(&template, image, recipe, &path, image_path)
    }

    /// The template of `recipe` at `path`, made first if it is missing;
    /// `None` (logged) when there is none to be had.
    fn usable_template(&self, pool: &Pool, recipe: &Recipe, path: &Path) -> Option<File> {
        match self.open_template(pool, recipe, path) {
            Ok(t) => Some(t),
            Err(e) => {
                log::warn!(
                    "no template for {} of {} bytes ({}); running mkfs for this volume",
                    recipe.fs.as_str(),
                    recipe.len,
                    crate::error_chain::message_chain(&e)
                );
                None
            }
        }
    }

    /// Gives `copy` (at `copy_path`, a copy of `template` at `path`) a
    /// UUID of its own, and marks the template used (its mtime: the
    /// pool evicts the least recently used, see `pool::templates`).
    /// `Ok(false)` when the copy is no template: the template is removed.
    fn renewed(
        &self,
        template: &File,
        copy: &File,
        recipe: &Recipe,
        path: &Path,
        copy_path: &Path,
    ) -> Result<bool, NodeError> {
        match self.kernel.renew_uuid(copy, recipe.fs, recipe.len) {
            Ok(Renewal::Renewed) => {
                if let Err(e) = template.set_modified(std::time::SystemTime::now()) {
                    log::warn!("mark {} used: {e}", path.display());
                }
                Ok(true)
            }
            Ok(Renewal::NotTemplate(why)) => {
                log::warn!(
                    "template {} is unusable ({why}); removing it, and running mkfs for this volume",
                    path.display()
                );
                if let Err(e) = sysfs::remove_if_present(path) {
                    log::warn!("remove {}: {e}", path.display());
                }
                Ok(false)
            }
            Err(e) => Err(sys("give a new UUID to", copy_path)(e)),
        }
    }

    /// Opens the template at `path`, made first if it is missing.
    fn open_template(&self, pool: &Pool, recipe: &Recipe, path: &Path) -> Result<File, NodeError> {
        match File::open(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(sys("open", path)(e)),
        }
        let built = pool.scratch_path("template");
        let result = self.make_template(recipe, &built, path);
        if result.is_err() {
            let _ = sysfs::remove_if_present(&built);
        }
        result?;
        // A new template: the bound on how many the pool keeps is kept
        // here, where they are made (the janitor reclaims idle ones too).
        if let Err(e) = pool.prune_templates(crate::pool::MAX_TEMPLATES, Some(recipe.name.as_str()))
        {
            log::warn!("reclaiming templates: {e}");
        }
        File::open(path).map_err(sys("open", path))
    }

    /// Makes the template in `built` (in this process's scratch) and
    /// renames it to `path`.
    fn make_template(&self, recipe: &Recipe, built: &Path, path: &Path) -> Result<(), NodeError> {
        let options = mkfs_options::validate(recipe.fs, &recipe.options).map_err(|source| {
            NodeError::MkfsOptionsRefused {
                id: recipe.name.clone(),
                source,
            }
        })?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(built)
            .map_err(sys("create", built))?;
        file.set_len(recipe.len).map_err(sys("size", built))?;
        log::info!(
            "making the template for {} of {} bytes",
            recipe.fs.as_str(),
            recipe.len
        );
        self.kernel.mkfs(built, &options, false)?;
        file.sync_all().map_err(sys("sync", built))?;
        std::fs::rename(built, path).map_err(sys("move into the pool", path))?;
        let dir = path.parent().expect("templates live in their directory");
        sysfs::fsync_dir(dir).map_err(sys("sync", dir))
    }
}
