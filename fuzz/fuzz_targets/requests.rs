//! Arbitrary bytes decoded as each CSI request and handed to its validation
//! (see `filevol_kit::fuzzing::request`).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

struct Env {
    driver: Arc<filevol::service::Driver>,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = dir.path().join("pool");
        let kubelet = dir.path().join("kubelet");
        std::fs::create_dir_all(&pool).unwrap();
        std::fs::create_dir_all(&kubelet).unwrap();
        Env {
            driver: filevol_kit::fuzzing::driver(&pool, &kubelet),
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    filevol_kit::fuzzing::request(&env().driver, data);
});
