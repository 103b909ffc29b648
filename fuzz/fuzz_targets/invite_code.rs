//! Invite codes as typed or pasted.
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| meshfs::fuzzing::invite_code(text));
