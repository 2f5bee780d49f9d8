//! Node registrations and ControllerPublish records.

use super::ids;
use super::meta::{AccessMode, Attachment, NodeRecord, VolumeMeta};
use super::store;
use super::{Pool, PoolError};

impl Pool {
    /// Records that node `node` is a node plugin serving this pool.
    pub fn register_node(&self, record: &NodeRecord) -> Result<(), PoolError> {
        ids::check(&record.node_id)
            .map_err(|e| PoolError::Unsupported(format!("node id {:?}: {e}", record.node_id)))?;
        store::write_json(
            &self
                .root
                .join("nodes")
                .join(format!("{}.json", record.node_id)),
            record,
        )
    }

    /// The registration of the node plugin with this id, if it has one.
    pub fn node_record(&self, node: &str) -> Option<NodeRecord> {
        if ids::check(node).is_err() {
            return None;
        }
        store::read_json(&self.root.join("nodes").join(format!("{node}.json"))).ok()
    }

    /// ControllerPublish: attaches the volume to `node`.
    pub fn publish(
        &self,
        id: &str,
        node: &str,
        mode: AccessMode,
        readonly: bool,
    ) -> Result<VolumeMeta, PoolError> {
        let lock = self.lock_volume(id)?;
        let mut v = self.volume(id)?;
        let Some(record) = self.node_record(node) else {
            return Err(PoolError::NodeNotFound(node.to_owned()));
        };
        if let Some(a) = v.attachments.iter().find(|a| a.node_id == node) {
            return if a.mode == mode && a.readonly == readonly {
                Ok(v)
            } else {
                Err(PoolError::AttachedIncompatibly {
                    id: id.to_owned(),
                    node: node.to_owned(),
                })
            };
        }
        if record.max_volumes > 0 {
            let attached = self
                .all_volumes()?
                .iter()
                .filter_map(|(_, v)| v.as_ref().ok())
                .filter(|v| v.attachments.iter().any(|a| a.node_id == node))
                .count();
            if attached >= record.max_volumes as usize {
                return Err(PoolError::AttachLimit {
                    node: node.to_owned(),
                    max: record.max_volumes,
                });
            }
        }
        if let Some(other) = v
            .attachments
            .iter()
            .find(|a| a.node_id != node && (a.mode.is_single_node() || mode.is_single_node()))
        {
            return Err(PoolError::AttachedElsewhere {
                id: id.to_owned(),
                node: other.node_id.clone(),
            });
        }
        v.attachments.push(Attachment {
            node_id: node.to_owned(),
            mode,
            readonly,
        });
        self.update_volume(&v, &lock)?;
        Ok(v)
    }

    /// ControllerUnpublish: detaches the volume from `node` (every node when
    /// `None`). A volume or attachment that is gone is already unpublished.
    pub fn unpublish(&self, id: &str, node: Option<&str>) -> Result<(), PoolError> {
        let lock = match self.lock_volume(id) {
            Ok(lock) => lock,
            Err(PoolError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut v = match self.volume(id) {
            Ok(v) => v,
            Err(PoolError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let before = v.attachments.len();
        v.attachments
            .retain(|a| node.is_some_and(|n| a.node_id != n));
        if v.attachments.len() != before {
            self.update_volume(&v, &lock)?;
        }
        Ok(())
    }
}
