//! Replays the fuzzing corpus (fuzz/corpus/<target>/) and the inputs that
//! once found bugs (fuzz/regressions/<target>/) through the same entry
//! points the cargo-fuzz targets call, on stable Rust: every input must go
//! through without a panic.

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            out.push((
                e.path().display().to_string(),
                std::fs::read(e.path()).unwrap(),
            ));
        }
    }
    assert!(!out.is_empty(), "no corpus for {target}");
    out
}

#[test]
fn request_validation_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, kubelet) = (dir.path().join("pool"), dir.path().join("kubelet"));
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&kubelet).unwrap();
    let driver = filevol_kit::fuzzing::driver(&pool, &kubelet);
    for (name, data) in inputs("requests") {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            filevol_kit::fuzzing::request(&driver, &data)
        }));
        assert!(outcome.is_ok(), "{name} panicked");
    }
    // Validation made nothing: no volume, no mount point.
    assert_eq!(std::fs::read_dir(pool.join("volumes")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&kubelet).unwrap().count(), 0);
}

#[test]
fn parser_and_metadata_corpora() {
    for (target, run) in [
        ("mountinfo", filevol_kit::fuzzing::mountinfo as fn(&[u8])),
        ("sysfs", filevol_kit::fuzzing::sysfs),
        ("metadata", filevol_kit::fuzzing::metadata),
        ("mkfs_options", filevol_kit::fuzzing::mkfs_options),
        ("block_ranges", filevol_kit::fuzzing::block_ranges),
    ] {
        for (name, data) in inputs(target) {
            assert!(
                std::panic::catch_unwind(|| run(&data)).is_ok(),
                "{name} panicked"
            );
        }
    }
}
