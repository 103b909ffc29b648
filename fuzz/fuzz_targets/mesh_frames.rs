//! Every mesh protocol message decoded from arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshfs::fuzzing::mesh_frames(data));
