//! The first format of a thick volume, in its own image.
//!
//! A thin image gets its filesystem in a new file that replaces it by one
//! rename (`Node::format_image`): a crash leaves the blank image, never a
//! half-made filesystem. For a thick image that new file would be a second
//! preallocated copy, so the first stage would need twice the volume's size
//! of the pool, which CreateVolume never promised: on a pool with just the
//! volume's size free the stage would fail with ENOSPC. So a thick image is
//! formatted where it is, in the blocks CreateVolume preallocated (mkfs
//! there never discards: `format::mkfs_args`), and a record keeps the
//! crash safety the rename gave:
//!
//! 1. `formatting` is set in the volume's record, durably, before the first
//!    byte is written (the caller holds the volume's lock and fence, and no
//!    loop device serves the image);
//! 2. the image gets its filesystem: the template written into its own
//!    blocks (`Node::template_into`), else mkfs on the image;
//! 3. the image is synced;
//! 4. one record write sets `written` and clears `formatting`.
//!
//! A crash before 1 leaves a blank image, formatted at the next stage as
//! any blank one. A crash between 1 and 4 leaves `formatting` set: the
//! image holds nothing but that half-made (or whole but unrecorded)
//! filesystem, was never attached for anyone, so the next read-write stage
//! formats it again, over its signatures (`mkfs -f`), without asking the
//! probe; a read-only stage refuses it. After 4 the volume holds data and
//! is never formatted again: `written` is never unset.

use std::fs::OpenOptions;

use super::error::{sys, NodeError};
use super::template::Recipe;
use super::Node;
use crate::pool::store::ObjectLock;
use crate::pool::Pool;
use crate::volume::meta::VolumeMeta;
use crate::volume::mkfs_options;

impl Node {
    /// Formats the thick image of `v` in place (see the module
    /// documentation) and returns its record, `written` and no longer
    /// `formatting`. `redo`: a format in place was cut short, and the image
    /// holds what it wrote. The caller holds the volume's lock (`held`),
    /// its fence and its image's lock, and no device serves the image.
    pub(super) fn format_in_place(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        options: &mkfs_options::Validated<'_>,
        held: &ObjectLock,
        redo: bool,
    ) -> Result<VolumeMeta, NodeError> {
        let id = &v.id;
        let fs = options.fs();
        log::info!(
            "volume {id}: {} {} of {} bytes in its thick image",
            if redo {
                "a format in place was cut short; making"
            } else {
                "the image is blank, making"
            },
            fs.as_str(),
            v.capacity_bytes
        );
        pool.mark_formatting(id, held)?;
        crate::faults::crash_point("stage.format_intent");
        let image = pool.image_path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .map_err(sys("open", &image))?;
        // A template's holes must read as zeros in the image: true of a
        // blank image (its preallocated extents are unwritten), not of one
        // a cut-short format wrote. That one gets a mkfs of its own, which
        // writes every structure it needs.
        let recipe = if redo { None } else { Recipe::of(pool, v, fs) };
        let templated = match &recipe {
            Some(recipe) => self.template_into(pool, recipe, &file, &image)?,
            None => false,
        };
        if !templated {
            // Over signatures only where filevol may have written some: a
            // redo, or a template found unusable once written.
            let overwrite = redo || recipe.is_some();
            self.kernel.mkfs(&image, options, overwrite)?;
        }
        file.sync_all().map_err(sys("sync", &image))?;
        crate::faults::crash_point("stage.formatted");
        Ok(pool.mark_written(id, held)?)
    }
}
