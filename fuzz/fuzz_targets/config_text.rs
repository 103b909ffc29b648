//! Config files as written by hand.
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| meshfs::fuzzing::config_text(text));
