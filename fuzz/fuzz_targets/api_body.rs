//! `cargo +nightly fuzz run api_body`: the harness is `cometd_bridge::fuzzing::api_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| cometd_bridge::fuzzing::api_body(input));
