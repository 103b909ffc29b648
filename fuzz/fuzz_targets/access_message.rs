//! Gossiped access messages, decoded and checked.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meshfs::fuzzing::access_message(data, meshfs::ids::DeviceId([3; 16]))
});
