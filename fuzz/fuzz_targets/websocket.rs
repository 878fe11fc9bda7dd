//! `cargo +nightly fuzz run websocket`: the harness is `cometd_bridge::fuzzing::websocket`.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| cometd_bridge::fuzzing::websocket(input));
