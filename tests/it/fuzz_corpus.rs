//! The fuzz corpus (`fuzz/corpus/<target>/`, kept small by `cargo fuzz cmin`) replayed
//! through the harnesses of `cometd_bridge::fuzzing`, so that every input the fuzzer found
//! interesting, and every crash it found and that was fixed, stays checked by the ordinary
//! test command. `scripts/fuzz.sh` runs the fuzzer itself (nightly, cargo-fuzz).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use cometd_bridge::fuzzing;

use crate::support::project_dir;

/// A harness: takes the fuzzer's bytes, panics on a finding.
type Harness = fn(&[u8]);

/// Every target: its name in `fuzz/fuzz_targets/` and `fuzz/corpus/`, and its harness.
const TARGETS: &[(&str, Harness)] = &[
    ("payload", fuzzing::payload),
    ("websocket", fuzzing::websocket),
    ("data", fuzzing::data),
    ("config", fuzzing::config),
    ("api_body", fuzzing::api_body),
];

/// Runs every file of the target's corpus through its harness; fails naming each file
/// that panics, and when the corpus is missing or empty (so it cannot pass by finding
/// nothing to run).
fn replay(target: &str) {
    let (_, harness) = TARGETS.iter().find(|(name, _)| *name == target).expect("a listed target");
    let dir = project_dir().join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("the corpus {} cannot be read: {error}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the corpus {} is empty", dir.display());
    let failed: Vec<String> = files
        .iter()
        .filter(|file| {
            let input = std::fs::read(file).expect("read a corpus file");
            catch_unwind(AssertUnwindSafe(|| harness(&input))).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} inputs of {target} panic (reproduce with `cargo +nightly fuzz run {target} <file>` in fuzz/):\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn every_fuzz_target_is_replayed_here() {
    let dir = project_dir().join("fuzz/fuzz_targets");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{} cannot be read: {error}", dir.display()))
        .filter_map(|entry| {
            entry.expect("a directory entry").path().file_stem().map(|s| s.to_string_lossy().into())
        })
        .collect();
    found.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed, "fuzz/fuzz_targets/ and this file's TARGETS differ");
}

#[test]
fn payload_corpus() {
    replay("payload");
}

#[test]
fn websocket_corpus() {
    replay("websocket");
}

#[test]
fn data_corpus() {
    replay("data");
}

#[test]
fn config_corpus() {
    replay("config");
}

#[test]
fn api_body_corpus() {
    replay("api_body");
}
