//! Arbitrary bytes through `filevol_kit::fuzzing::mountinfo`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    filevol_kit::fuzzing::mountinfo(data);
});
