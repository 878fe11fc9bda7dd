//! The CometD client must stay usable on its own: the `bayeux-client` crate
//! (`crates/bayeux-client`) names none of the daemon's own dependencies, nor the daemon
//! itself. The compiler keeps its code from using the daemon's modules; this keeps its
//! manifest from pulling them in (`scripts/check-client-deps.sh` checks the whole tree).

use std::collections::BTreeSet;

use crate::support::project_dir;

/// What only the daemon may depend on.
const DAEMON_ONLY: [&str; 9] =
    ["cometd-bridge", "axum", "redb", "async-nats", "prometheus-client", "utoipa", "clap", "config", "tower"];

/// The names in a manifest's `[dependencies]` and `[dev-dependencies]` sections (and any
/// `[target.*.dependencies]`), one `name = ...` a line as this project writes them.
fn dependency_names(manifest: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut in_dependencies = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_dependencies = line.ends_with("dependencies]") && !line.starts_with("[workspace");
            continue;
        }
        if in_dependencies && let Some((name, _)) = line.split_once('=') {
            let name = name.trim();
            if !name.is_empty() && !name.starts_with('#') {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn the_dependency_reader_reads_this_projects_manifests() {
    let root = std::fs::read_to_string(project_dir().join("Cargo.toml")).expect("read Cargo.toml");
    let names = dependency_names(&root);
    assert!(
        names.contains("axum") && names.contains("bayeux-client") && names.contains("tempfile"),
        "{names:?}"
    );
    assert!(!names.contains("members"), "{names:?}");
}

#[test]
fn the_client_crate_depends_on_nothing_of_the_daemons() {
    let path = project_dir().join("crates/bayeux-client/Cargo.toml");
    let manifest = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let names = dependency_names(&manifest);
    assert!(names.contains("tokio"), "the reader found the client's dependencies: {names:?}");
    let leaks: Vec<_> = DAEMON_ONLY.iter().filter(|name| names.contains(**name)).collect();
    assert!(leaks.is_empty(), "{} names the daemon's {leaks:?}", path.display());
}
