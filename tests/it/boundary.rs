//! The CometD client must stay usable on its own: nothing under `src/cometd/` may use the
//! rest of the crate (the bridge, sinks, store, admin API, ...).

use std::path::{Path, PathBuf};

use crate::support::project_dir;

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

/// Every `crate::<name>` in `source` whose `<name>` is not `cometd`, with its line number.
fn foreign_crate_paths(source: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        for (index, _) in code.match_indices("crate::") {
            let preceded_by_ident =
                code[..index].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_');
            let rest = &code[index + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !preceded_by_ident && name != "cometd" {
                found.push((number + 1, line.trim().to_string()));
            }
        }
    }
    found
}

#[test]
fn the_boundary_check_recognises_foreign_paths() {
    assert_eq!(foreign_crate_paths("use crate::cometd::Error;"), vec![]);
    assert_eq!(foreign_crate_paths("let x = 1; // crate::bridge in a comment"), vec![]);
    assert_eq!(foreign_crate_paths("use cometd_bridge_crate::x;"), vec![]);
    assert_eq!(foreign_crate_paths("use crate::sink::Nats;").len(), 1);
    assert_eq!(foreign_crate_paths("use crate::{bridge, cometd};").len(), 1);
}

#[test]
fn the_cometd_client_uses_nothing_from_the_rest_of_the_crate() {
    let dir = project_dir().join("src/cometd");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    assert!(!files.is_empty(), "no Rust files under {}", dir.display());
    let mut leaks = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(&file).expect("read source");
        for (line, text) in foreign_crate_paths(&source) {
            leaks.push(format!("{}:{line}: {text}", file.display()));
        }
    }
    assert!(leaks.is_empty(), "src/cometd uses the rest of the crate:\n{}", leaks.join("\n"));
}
