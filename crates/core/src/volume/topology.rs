//! Where a pool's volumes can be reached from: its topology segment
//! (`--topology`), matched against what a CO asks. One rule for
//! CreateVolume's requirements and GetCapacity's segment.

use std::collections::{BTreeMap, HashMap};

/// Whether a pool with segment `pool` lies within `segment` (a CO's
/// topology: every key of the pool's segment has the same value there). A
/// shared pool (an empty segment) lies within every one.
pub fn within(pool: &BTreeMap<String, String>, segment: &HashMap<String, String>) -> bool {
    pool.iter().all(|(k, v)| segment.get(k) == Some(v))
}

/// Whether a pool with segment `pool` is one of the `requisite` topologies
/// a CreateVolume must be reachable from (none listed: any will do).
pub fn reachable<'a>(
    pool: &BTreeMap<String, String>,
    requisite: impl IntoIterator<Item = &'a HashMap<String, String>>,
) -> bool {
    let mut requisite = requisite.into_iter().peekable();
    requisite.peek().is_none() || requisite.any(|segment| within(pool, segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn segment(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn a_node_local_pool_is_within_its_node_only() {
        let local = pool(&[("topology.filevol.csi.rs/node", "a")]);
        assert!(within(
            &local,
            &segment(&[("topology.filevol.csi.rs/node", "a"), ("zone", "z")])
        ));
        assert!(!within(
            &local,
            &segment(&[("topology.filevol.csi.rs/node", "b")])
        ));
        assert!(!within(&local, &segment(&[("zone", "z")])));
    }

    #[test]
    fn a_shared_pool_is_within_every_segment() {
        assert!(within(
            &pool(&[]),
            &segment(&[("topology.filevol.csi.rs/node", "b")])
        ));
        assert!(within(&pool(&[]), &segment(&[])));
    }

    #[test]
    fn requirements_need_one_reachable_topology_or_none() {
        let local = pool(&[("n", "a")]);
        let (a, b) = (segment(&[("n", "a")]), segment(&[("n", "b")]));
        assert!(reachable(&local, []));
        assert!(reachable(&local, [&b, &a]));
        assert!(!reachable(&local, [&b]));
        assert!(reachable(&pool(&[]), [&b]));
    }
}
