//! Secrets (tokens, passwords, signing keys): written inline, as `env:NAME` or as `file:PATH`,
//! resolved once when the configuration is loaded, and never printed.

use std::fmt;

/// A resolved secret value. `Debug` and `Display` print a placeholder, so a secret cannot
/// reach a log line or an API answer by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Resolves `spec`: `env:NAME` reads the environment variable (from `env`), `file:PATH`
    /// reads the file (trailing newline removed), anything else is the value itself.
    ///
    /// # Errors
    /// A readable reason when the variable is unset or the file cannot be read.
    pub fn resolve(spec: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, String> {
        if let Some(name) = spec.strip_prefix("env:") {
            return env(name).map(Secret).ok_or_else(|| format!("environment variable {name} is not set"));
        }
        if let Some(path) = spec.strip_prefix("file:") {
            return crate::files::read_text_bounded(
                std::path::Path::new(path),
                crate::files::SECRET_FILE_BYTES,
            )
            .map(|text| Secret(text.trim_end_matches(['\n', '\r']).to_string()))
            .map_err(|error| format!("cannot read secret file {error}"));
        }
        Ok(Secret(spec.to_string()))
    }

    /// The secret value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_resolve_from_env_file_or_inline_and_never_print() {
        let env = |name: &str| (name == "TOKEN").then(|| "from-env".to_string());
        assert_eq!(Secret::resolve("env:TOKEN", &env).unwrap().expose(), "from-env");
        assert!(Secret::resolve("env:MISSING", &env).unwrap_err().contains("MISSING is not set"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, "from-file\n").unwrap();
        assert_eq!(Secret::resolve(&format!("file:{}", file.display()), &env).unwrap().expose(), "from-file");
        assert!(Secret::resolve("file:/nonexistent/x", &env).unwrap_err().contains("cannot read"));
        let inline = Secret::resolve("hunter2", &env).unwrap();
        assert_eq!(format!("{inline} {inline:?}"), "*** Secret(***)");
    }
}
