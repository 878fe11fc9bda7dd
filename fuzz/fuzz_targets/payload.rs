//! `cargo +nightly fuzz run payload`: the harness is `cometd_bridge::fuzzing::payload`.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| cometd_bridge::fuzzing::payload(input));
