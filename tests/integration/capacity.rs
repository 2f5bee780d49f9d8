//! Capacity and the figures beside it, on a real reflink pool: what a
//! snapshot counts as, what GetCapacity, a refusal, the metrics and `filevol
//! pool ls` say about one pool, and that they agree with `st_blocks`.

use std::path::{Path, PathBuf};
use std::process::Command;

use filevol::ops::requests as req;
use filevol::proto::csi::{self, volume_capability::access_mode::Mode};
use filevol_core::units::{human, human_fine};
use filevol_kit::driver::{scrape, status, Driver, Opts};
use filevol_kit::files;
use filevol_kit::node_env::NodeEnv;
use grpcio::RpcStatusCode;

use crate::BIN;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// `opts` with `flag` set to `value` (replaced where the kit set it).
pub(crate) fn with_flag(mut opts: Opts, flag: &str, value: &str) -> Opts {
    match opts.args.iter().position(|a| a == flag) {
        Some(i) => value.clone_into(&mut opts.args[i + 1]),
        None => opts.args.extend([flag.to_owned(), value.to_owned()]),
    }
    opts
}

/// The value of the series `series` (name and labels) in a scrape.
fn series(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// Stages `id` (ext4), writes `mib` MiB into a new file `name` through its
/// filesystem, and unstages it, so every block has reached the image.
fn write_through(env: &NodeEnv, id: &str, name: &str, mib: usize) {
    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    let staging = env.staging(id);
    let n = env.d.node();
    n.node_stage_volume(&req::stage(id, &staging, cap)).unwrap();
    let file = staging.join(name);
    std::fs::File::create(&file).unwrap();
    files::fill(&file, 0, mib << 20, 7);
    n.node_unstage_volume(&req::unstage(id, &staging)).unwrap();
}

fn snapshot_image(pool: &Path, id: &str) -> PathBuf {
    pool.join("snapshots").join(id).join("image")
}

fn pool_ls(pool: &Path, json: bool) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["pool", "ls", "--pool"]).arg(pool);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The report's pool: 2 GiB on xfs, the default reserve (64 MiB) and
/// overcommit (1.0), a 1 GiB volume and a reflinked snapshot of it. Counted
/// at its full size the snapshot left "0 more bytes" on a pool 1.9 GiB
/// free; counted by the blocks it holds, it leaves the rest.
#[test]
#[ignore = "needs root"]
fn a_reflink_snapshot_counts_its_blocks_and_every_report_agrees() {
    let env = NodeEnv::with_opts(BIN, "xfs", 2048, |o| {
        let o = with_flag(o, "--reserve", "64Mi");
        let o = with_flag(o, "--overcommit", "1.0");
        with_flag(o, "--metrics-address", "127.0.0.1:0")
    });
    let c = env.d.controller();
    let room = || {
        let r = c.get_capacity(&csi::GetCapacityRequest::new()).unwrap();
        u64::try_from(r.available_capacity).unwrap()
    };
    let st = rustix::fs::statvfs(&env.pool).unwrap();
    let usable = st.f_blocks * st.f_frsize - 64 * MIB;
    assert_eq!(room(), usable, "size less the reserve");

    let id = env.create("data", 1024, "ext4");
    assert_eq!(room(), usable - GIB);
    write_through(&env, &id, "first", 200);
    let snap = c
        .create_snapshot(&req::snapshot("snap", &id))
        .unwrap()
        .snapshot
        .unwrap()
        .snapshot_id;
    let held = files::allocated(&snapshot_image(&env.pool, &snap));
    // A reflink maps the source's written blocks (not the unwritten
    // extents mke2fs left for the journal: those read as zeros, and the
    // copy leaves them holes).
    assert!(held <= files::allocated(&env.image(&id)));
    assert!((200 * MIB..GIB).contains(&held), "{held}");
    // The first stage made the template of the volume's size, which
    // counts by its blocks too.
    let tpl = template_blocks(&env.pool);
    assert!(tpl > 0);
    assert_eq!(
        room(),
        usable - GIB - held - tpl,
        "the snapshot counts its blocks"
    );

    // The source diverges: it takes new blocks (its capacity counted them
    // already), the snapshot keeps its own, and the room does not move.
    write_through(&env, &id, "second", 100);
    let volume_blocks = files::allocated(&env.image(&id));
    assert!(volume_blocks > held, "{volume_blocks} <= {held}");
    assert_eq!(files::allocated(&snapshot_image(&env.pool, &snap)), held);
    let left = room();
    assert_eq!(left, usable - GIB - held - tpl);
    // A standby controller (its own process, its own cache of counts)
    // reads the same pool and says the same.
    let replica = Driver::start_on(
        BIN,
        &env.pool,
        Opts::default().args(&[
            "--mode",
            "controller",
            "--node-id",
            "replica",
            "--reserve",
            "64Mi",
            "--overcommit",
            "1.0",
        ]),
    );
    let r = replica
        .controller()
        .get_capacity(&csi::GetCapacityRequest::new())
        .unwrap();
    assert_eq!(u64::try_from(r.available_capacity).unwrap(), left);
    drop(replica);

    // More than is left: refused, with how that was reached.
    let st = status(c.create_volume(&req::create("too-big", (left + 64 * MIB) as i64)));
    assert_eq!(
        st.code(),
        RpcStatusCode::RESOURCE_EXHAUSTED,
        "{}",
        st.message()
    );
    let message = st.message();
    for part in [
        format!("it has {} left", human_fine(left)),
        "less 1.00 GiB promised to 1 volume".to_owned(),
        format!("less {} counted for 1 snapshot", human_fine(held)),
        "raise --overcommit (now 1.0)".to_owned(),
        "delete volumes or snapshots".to_owned(),
    ] {
        assert!(message.contains(&part), "{part:?} missing: {message}");
    }
    // What is left can be had.
    let fits = c
        .create_volume(&req::create("fits", (left / MIB * MIB) as i64))
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    assert!(room() < MIB);
    c.delete_volume(&req::delete(&fits)).unwrap();
    assert_eq!(room(), left);

    // The metrics tell the same story, and their allocation is st_blocks.
    let text = scrape(&env.d.metrics_address());
    for (name, expected) in [
        ("filevol_pool_capacity_bytes", left),
        ("filevol_pool_provisioned_bytes", GIB),
        ("filevol_pool_snapshot_bytes", held),
        (
            "filevol_pool_allocated_bytes{kind=\"volume\"}",
            volume_blocks,
        ),
        ("filevol_pool_allocated_bytes{kind=\"snapshot\"}", held),
        ("filevol_pool_volumes", 1),
        ("filevol_pool_snapshots", 1),
    ] {
        assert_eq!(series(&text, name), expected, "{name} in:\n{text}");
    }
    assert_eq!(
        series(&text, "filevol_pool_used_bytes") + series(&text, "filevol_pool_free_bytes"),
        series(&text, "filevol_pool_size_bytes")
    );

    // So does `pool ls`, which knows no flags and says so.
    let report: serde_json::Value = serde_json::from_str(&pool_ls(&env.pool, true)).unwrap();
    assert_eq!(report["volumes"][0]["allocated_bytes"], volume_blocks);
    assert_eq!(report["volumes"][0]["capacity_bytes"], GIB);
    assert_eq!(report["snapshots"][0]["allocated_bytes"], held);
    assert_eq!(report["snapshots"][0]["counted_bytes"], held);
    let totals = &report["totals"];
    assert_eq!(totals["provisioned_bytes"], GIB);
    assert_eq!(totals["snapshot_counted_bytes"], held);
    assert_eq!(totals["volume_allocated_bytes"], volume_blocks);
    assert_eq!(totals["snapshot_allocated_bytes"], held);
    assert_eq!(
        totals["filesystem_size_bytes"],
        series(&text, "filevol_pool_size_bytes")
    );
    assert!(
        totals["capacity_note"]
            .as_str()
            .unwrap()
            .contains("--overcommit"),
        "{totals}"
    );
    let table = pool_ls(&env.pool, false);
    for part in [
        "COUNTED",
        &human(held),
        "room        not shown",
        "1.0 GiB provisioned",
    ] {
        assert!(table.contains(part), "{part:?} missing:\n{table}");
    }

    c.delete_snapshot(&req::delete_snapshot(&snap)).unwrap();
    c.delete_volume(&req::delete(&id)).unwrap();
    assert_eq!(
        room(),
        usable - tpl,
        "the template stays for the next volume"
    );
}

/// What the pool's templates hold (`st_blocks`).
fn template_blocks(pool: &Path) -> u64 {
    std::fs::read_dir(pool.join("templates"))
        .unwrap()
        .map(|e| files::allocated(&e.unwrap().path()))
        .sum()
}

/// The report's pool: a thick volume is staged on a pool with just its
/// size free. Its first format is done in the image CreateVolume
/// preallocated, never in a second copy beside it (which the pool could
/// not hold: checked with statvfs), and the image stays whole.
#[test]
#[ignore = "needs root"]
fn a_thick_volume_is_staged_on_a_pool_with_just_its_size_free() {
    for fs in ["ext4", "xfs"] {
        let env = NodeEnv::with_opts(BIN, "xfs", 600, |o| {
            with_flag(with_flag(o, "--reserve", "0"), "--overcommit", "1.0")
        });
        let free = || {
            let st = rustix::fs::statvfs(&env.pool).unwrap();
            st.f_bavail * st.f_frsize
        };
        // Two thirds of what is free (at least the 300 MiB xfs needs).
        let size = free() * 2 / 3 / MIB * MIB;
        assert!(size >= 300 * MIB, "{size}");
        let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, fs);
        let mut r = req::create_volume(&format!("thick-{fs}-{size}"), size as i64, cap.clone());
        r.parameters.insert("thick".into(), "true".into());
        let id = env
            .d
            .controller()
            .create_volume(&r)
            .unwrap()
            .volume
            .unwrap()
            .volume_id;
        let image = env.image(&id);
        assert!(files::allocated(&image) >= size, "preallocated");
        assert!(free() < size, "a second copy cannot fit: {} free", free());

        let staging = env.staging(&id);
        let n = env.d.node();
        n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
            .unwrap_or_else(|e| {
                panic!(
                    "{fs}: {e}
{}",
                    env.d.log()
                )
            });
        let file = staging.join("data");
        std::fs::File::create(&file).unwrap();
        files::fill(&file, 0, 16 << 20, 5);
        let written = files::digest(&file);
        n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
        assert!(files::allocated(&image) >= size, "{fs}: still thick");
        assert!(!image.with_file_name(".image.mkfs").exists());
        let meta = std::fs::read_to_string(image.with_file_name("meta.json")).unwrap();
        assert!(
            meta.contains("\"written\": true") && !meta.contains("formatting"),
            "{meta}"
        );
        // A second stage finds the data: formatted once.
        n.node_stage_volume(&req::stage(&id, &staging, cap))
            .unwrap();
        assert_eq!(files::digest(&file), written);
        n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
        let log = env.d.log();
        assert!(!log.contains("No space left"), "{log}");
        if fs == "ext4" {
            // From the template, written into the image's own blocks.
            assert!(log.contains("making the template for ext4"), "{log}");
            assert!(!log.contains("running mkfs for this volume"), "{log}");
            let out = Command::new("e2fsck")
                .arg("-fn")
                .arg(&image)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        env.d.controller().delete_volume(&req::delete(&id)).unwrap();
    }
}
