//! Arbitrary bytes through `filevol::fuzzing::mountinfo`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    filevol::fuzzing::mountinfo(data);
});
