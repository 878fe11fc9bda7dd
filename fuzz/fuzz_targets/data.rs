//! `cargo +nightly fuzz run data`: the harness is `cometd_bridge::fuzzing::data`.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| cometd_bridge::fuzzing::data(input));
