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

/// A CreateVolume whose requisite topologies the pool's volumes cannot be
/// reached from. The message lists the pool's segment and each requisite
/// segment as `{key=value, ...}`, keys sorted, so an operator sees at once
/// which key or value differs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the pool's volumes are reachable only from topology {pool}; the request requires one of {required}")]
pub struct Unreachable {
    /// The pool's segment, as `{key=value, ...}`.
    pub pool: String,
    /// The requisite segments, each as `{key=value, ...}`, joined by ` or `.
    pub required: String,
}

/// A segment as `{key=value, ...}`, in key order.
fn segment_text<'a>(pairs: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<_> = pairs.into_iter().collect();
    pairs.sort();
    let text: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", text.join(", "))
}

/// [`reachable`], as the refusal a CreateVolume gets when the pool is none
/// of its `requisite` topologies.
pub fn require<'a>(
    pool: &BTreeMap<String, String>,
    requisite: impl IntoIterator<Item = &'a HashMap<String, String>> + Clone,
) -> Result<(), Unreachable> {
    if reachable(pool, requisite.clone()) {
        return Ok(());
    }
    let required: Vec<String> = requisite.into_iter().map(segment_text).collect();
    Err(Unreachable {
        pool: segment_text(pool),
        required: required.join(" or "),
    })
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

    #[test]
    fn a_refusal_names_the_pools_segment_and_what_was_required() {
        let local = pool(&[("topology.filevol.csi.rs/node", "a"), ("zone", "z")]);
        let b = segment(&[("zone", "z"), ("topology.filevol.csi.rs/node", "b")]);
        let c = segment(&[("topology.filevol.csi.rs/node", "c")]);
        assert_eq!(require(&local, []), Ok(()));
        let e = require(&local, [&b, &c]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the pool's volumes are reachable only from topology \
             {topology.filevol.csi.rs/node=a, zone=z}; the request requires one of \
             {topology.filevol.csi.rs/node=b, zone=z} or {topology.filevol.csi.rs/node=c}"
        );
    }
}
