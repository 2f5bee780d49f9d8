//! Every capability filevol advertises has a test behind it: the table
//! below names, for each capability a driver on an xfs pool advertises
//! (plugin, controller, group controller and node), the tests that
//! exercise it. The check fails when a capability is advertised without an
//! entry, when an entry names a capability no longer advertised, or when a
//! named test does not exist in this binary. That every named test passes
//! is the rest of the run's job.

use std::collections::BTreeSet;
use std::process::Command;

use filevol::proto::csi;
use filevol_kit::driver::{Driver, Opts};
use filevol_kit::scratch::pool_on;

use crate::BIN;

/// Capability → tests exercising it (`module::function`).
const COVERED: &[(&str, &[&str])] = &[
    // Plugin capabilities.
    (
        "service CONTROLLER_SERVICE",
        &[
            "identity::plugin_info_and_probe",
            "identity::controller_mode_serves_no_node_service",
        ],
    ),
    (
        "service VOLUME_ACCESSIBILITY_CONSTRAINTS",
        &[
            "controller::create_is_idempotent_sparse_and_refuses_incompatible_retries",
            "identity::a_shared_pool_advertises_no_topology",
        ],
    ),
    (
        "service GROUP_CONTROLLER_SERVICE",
        &[
            "identity::group_snapshots_are_advertised_where_the_pool_reflinks",
            "controller::group_snapshots_reflink_every_member",
        ],
    ),
    (
        "service SNAPSHOT_METADATA_SERVICE",
        &[
            "snapshot_metadata::allocated_and_delta_follow_the_writes_on_xfs",
            "snapshot_metadata::allocated_and_delta_follow_the_writes_on_btrfs",
            "snapshot_metadata::spec_error_cases_answer_their_codes_and_change_nothing",
            "snapshot_metadata::without_reflink_allocated_works_and_a_delta_is_a_failed_precondition",
        ],
    ),
    (
        "expansion ONLINE",
        &["node::xfs_grows_online", "node::btrfs_grows_online"],
    ),
    (
        "expansion OFFLINE",
        &["node::offline_expansion_grows_at_the_next_stage"],
    ),
    // Controller.
    (
        "controller CREATE_DELETE_VOLUME",
        &["controller::create_is_idempotent_sparse_and_refuses_incompatible_retries"],
    ),
    (
        "controller PUBLISH_UNPUBLISH_VOLUME",
        &["controller::attachments_follow_the_access_mode"],
    ),
    (
        "controller LIST_VOLUMES",
        &["controller::list_volumes_paginates_and_refuses_foreign_tokens"],
    ),
    (
        "controller GET_CAPACITY",
        &["controller::capacity_counts_what_volumes_were_promised"],
    ),
    (
        "controller CREATE_DELETE_SNAPSHOT",
        &[
            "controller::snapshots_are_reflinks_on_xfs",
            "controller::without_reflink_snapshots_are_sparse_copies_and_refuse_staged_images",
        ],
    ),
    (
        "controller LIST_SNAPSHOTS",
        &["controller::snapshots_are_reflinks_on_xfs"],
    ),
    (
        "controller GET_SNAPSHOT",
        &["controller::snapshots_are_reflinks_on_xfs"],
    ),
    (
        "controller CLONE_VOLUME",
        &["controller::snapshots_are_reflinks_on_xfs"],
    ),
    (
        "controller PUBLISH_READONLY",
        &["controller::attachments_follow_the_access_mode"],
    ),
    (
        "controller EXPAND_VOLUME",
        &[
            "controller::expansion_grows_and_never_shrinks_and_modify_preallocates",
            "node::node_expansion_reports_the_real_size_never_the_requested_one",
        ],
    ),
    (
        "controller LIST_VOLUMES_PUBLISHED_NODES",
        &["controller::attachments_follow_the_access_mode"],
    ),
    (
        "controller VOLUME_CONDITION",
        &["controller::volume_condition_turns_abnormal_when_the_image_goes"],
    ),
    (
        "controller GET_VOLUME_HEALTH",
        &[
            "health::a_thin_pool_that_fills_is_reported_on_both_wires_and_clears_once_space_is_freed",
            "health::a_share_that_stops_answering_is_unreachable_and_no_worker_hangs",
        ],
    ),
    (
        "controller LIST_VOLUME_HEALTH",
        &["health::filesystem_faults_and_a_missing_image_show_on_both_wires_and_clear"],
    ),
    (
        "controller GET_VOLUME",
        &["controller::volume_condition_turns_abnormal_when_the_image_goes"],
    ),
    (
        "controller SINGLE_NODE_MULTI_WRITER",
        &[
            "single_writer::a_single_writer_image_is_published_once_wherever_the_targets_are",
            "single_writer::a_single_node_multi_writer_volume_publishes_at_many_targets",
        ],
    ),
    (
        "controller MODIFY_VOLUME",
        &["controller::expansion_grows_and_never_shrinks_and_modify_preallocates"],
    ),
    // Group controller.
    (
        "group CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT",
        &["controller::group_snapshots_reflink_every_member"],
    ),
    // Node.
    (
        "node STAGE_UNSTAGE_VOLUME",
        &[
            "node::xfs_round_trip_keeps_data",
            "node::block_volumes_round_trip",
        ],
    ),
    (
        "node GET_VOLUME_STATS",
        &[
            "node::block_volumes_round_trip",
            "node::volume_condition_turns_abnormal_when_the_mount_goes",
        ],
    ),
    (
        "node EXPAND_VOLUME",
        &[
            "node::xfs_grows_online",
            "node::node_expansion_reports_the_real_size_never_the_requested_one",
        ],
    ),
    (
        "node VOLUME_CONDITION",
        &["node::volume_condition_turns_abnormal_when_the_mount_goes"],
    ),
    (
        "node GET_VOLUME_HEALTH",
        &[
            "health::a_thin_pool_that_fills_is_reported_on_both_wires_and_clears_once_space_is_freed",
            "health::filesystem_faults_and_a_missing_image_show_on_both_wires_and_clear",
        ],
    ),
    (
        "node GET_STORAGE_HEALTH",
        &[
            "health::a_thin_pool_that_fills_is_reported_on_both_wires_and_clears_once_space_is_freed",
            "health::a_share_that_stops_answering_is_unreachable_and_no_worker_hangs",
        ],
    ),
    (
        "node SINGLE_NODE_MULTI_WRITER",
        &[
            "single_writer::a_single_writer_block_volume_is_published_once",
            "single_writer::single_writer_dir_volumes_count_only_themselves",
            "single_writer::a_single_node_multi_writer_volume_publishes_at_many_targets",
        ],
    ),
    (
        "node VOLUME_MOUNT_GROUP",
        &[
            "node::fs_group_is_applied_by_the_driver",
            "escape::the_fs_group_walk_never_follows_a_name_swapped_for_a_link",
        ],
    ),
];

/// Every capability the driver advertises, as "kind NAME".
fn advertised(d: &Driver) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let plugin = d
        .identity()
        .get_plugin_capabilities(&csi::GetPluginCapabilitiesRequest::new())
        .unwrap();
    for c in &plugin.capabilities {
        if c.has_service() {
            out.insert(format!(
                "service {:?}",
                c.service().type_.enum_value().unwrap()
            ));
        } else {
            let t = c.volume_expansion().type_.enum_value().unwrap();
            out.insert(format!("expansion {t:?}"));
        }
    }
    let controller = d
        .controller()
        .controller_get_capabilities(&csi::ControllerGetCapabilitiesRequest::new())
        .unwrap();
    for c in &controller.capabilities {
        out.insert(format!(
            "controller {:?}",
            c.rpc().type_.enum_value().unwrap()
        ));
    }
    let group = d
        .group_controller()
        .group_controller_get_capabilities(&csi::GroupControllerGetCapabilitiesRequest::new())
        .unwrap();
    for c in &group.capabilities {
        out.insert(format!("group {:?}", c.rpc().type_.enum_value().unwrap()));
    }
    let node = d
        .node()
        .node_get_capabilities(&csi::NodeGetCapabilitiesRequest::new())
        .unwrap();
    for c in &node.capabilities {
        out.insert(format!("node {:?}", c.rpc().type_.enum_value().unwrap()));
    }
    out
}

/// The tests in this binary, as libtest lists them.
fn tests_in_this_binary() -> BTreeSet<String> {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--list", "--format", "terse"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "needs root"]
fn every_advertised_capability_has_a_test() {
    let (_fs, pool) = pool_on("xfs", 512);
    let d = Driver::start_on(BIN, &pool, Opts::default());
    let advertised = advertised(&d);
    let covered: BTreeSet<String> = COVERED.iter().map(|(c, _)| (*c).to_owned()).collect();
    let untested: Vec<_> = advertised.difference(&covered).collect();
    assert!(
        untested.is_empty(),
        "advertised without a test: {untested:?}"
    );
    let stale: Vec<_> = covered.difference(&advertised).collect();
    assert!(stale.is_empty(), "listed but not advertised: {stale:?}");
    let tests = tests_in_this_binary();
    for (cap, names) in COVERED {
        assert!(!names.is_empty(), "{cap}: no test named");
        for name in *names {
            assert!(
                tests.contains(*name),
                "{cap}: no test {name} in this binary"
            );
        }
    }
}
