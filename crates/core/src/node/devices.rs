//! Which loop device serves which image, known to the node without asking
//! every device on the host.
//!
//! Finding an image's device by asking each loop device what it is bound to
//! (LOOP_GET_STATUS64 on every `/sys/block/loop*`) costs a stat, an open
//! and an ioctl per device, at every stage and unstage, and grows with the
//! host's loop count. The node keeps the answer instead, by the image's
//! (st_dev, st_ino), and asks only the one device it names.
//!
//! Why a table answer is as good as the scan it replaces:
//!
//! - **A hit** is checked with the kernel on every lookup: the device must
//!   still be bound to this image (one LOOP_GET_STATUS64), so a device
//!   detached or reused behind the table's back is never taken for the
//!   image's; the entry is dropped and the lookup goes on as a miss.
//! - **A miss** means no device of this node plugin serves the image. The
//!   table starts from a scan of every device at the node's start (the one
//!   that checks the fences of staged images), keeping the devices that are
//!   this plugin's: mounted under its kubelet directory, or mounted nowhere
//!   (a stage that died between attach and mount). Every device this
//!   process attaches is entered before the attach returns. A miss is
//!   never taken for "no device at all": the attach takes the image's lock,
//!   which every other device of it holds (`Node::attach`), so another
//!   node plugin's device is neither taken for this plugin's nor doubled.
//! - A crash loses the table, not the devices: the next start scans again.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use parking_lot::Mutex;

use super::kernel::{Bound, Kernel};
use crate::sys::loopdev::{LoopDevice, Owner};

/// Loop devices by the (st_dev, st_ino) of the image they serve, with the
/// id of the volume whose image it is.
#[derive(Debug)]
pub(super) struct DeviceTable {
    by_image: Mutex<HashMap<(u64, u64), (LoopDevice, String)>>,
    /// The node whose devices these are: an entry whose device number now
    /// serves the same image for another node (this node's device went
    /// and the kernel handed the number out again) is not this node's.
    owner: Owner,
}

impl DeviceTable {
    /// An empty table of `owner`'s devices.
    pub(super) fn of(owner: Owner) -> DeviceTable {
        DeviceTable {
            by_image: Mutex::default(),
            owner,
        }
    }

    /// Enters devices found by a scan, with their volume's id (usable ones
    /// win over ones being detached, as a stage wants).
    pub(super) fn fill(&self, attached: &[(Bound, (u64, u64), String)]) {
        let mut table = self.by_image.lock();
        for (bound, key, id) in attached {
            let keep = table.get(key).is_some_and(|_| bound.detaching);
            if !keep {
                table.insert(*key, (bound.device, id.clone()));
            }
        }
    }

    /// Records that `device` now serves the image `key` of volume `id`.
    pub(super) fn attached(&self, key: (u64, u64), device: LoopDevice, id: &str) {
        self.by_image.lock().insert(key, (device, id.to_owned()));
    }

    /// Every entry: the volume's id, its image's key and the device.
    pub(super) fn entries(&self) -> Vec<(String, (u64, u64), LoopDevice)> {
        self.by_image
            .lock()
            .iter()
            .map(|(key, (device, id))| (id.clone(), *key, *device))
            .collect()
    }

    /// The device serving `image`, checked with the kernel (see the module
    /// notes); `None` when the image does not exist or nothing serves it.
    pub(super) fn bound(&self, kernel: &dyn Kernel, image: &Path) -> io::Result<Option<Bound>> {
        let Some(key) = image_key(image)? else {
            return Ok(None);
        };
        self.bound_key(kernel, key)
    }

    /// [`DeviceTable::bound`] for an image already identified.
    pub(super) fn bound_key(
        &self,
        kernel: &dyn Kernel,
        key: (u64, u64),
    ) -> io::Result<Option<Bound>> {
        let Some(device) = self.by_image.lock().get(&key).map(|(d, _)| *d) else {
            return Ok(None);
        };
        match kernel.loop_status(device)? {
            Some(status) if status.backing == key && self.owner.claims(status.owner) => {
                Ok(Some(Bound {
                    device,
                    detaching: status.detaching,
                    owner: status.owner,
                }))
            }
            // Detached (and perhaps bound to another image, or to this one
            // for another node, since): drop the entry unless an attach has
            // replaced it meanwhile.
            _ => {
                let mut table = self.by_image.lock();
                if table.get(&key).map(|(d, _)| *d) == Some(device) {
                    table.remove(&key);
                }
                Ok(None)
            }
        }
    }
}

/// The (st_dev, st_ino) of `image`, or `None` if it does not exist.
pub(super) fn image_key(image: &Path) -> io::Result<Option<(u64, u64)>> {
    match std::fs::metadata(image) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
