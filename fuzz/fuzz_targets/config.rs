//! `cargo +nightly fuzz run config`: the harness is `cometd_bridge::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| cometd_bridge::fuzzing::config(input));
