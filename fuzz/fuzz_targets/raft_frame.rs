//! Raft-protocol frames from a peer, decoded and judged.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meshfs::fuzzing::raft_frame(data, meshfs::ids::DeviceId([2; 16]))
});
