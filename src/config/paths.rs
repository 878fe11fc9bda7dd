//! Naming what does not fit with its full path: a value of the wrong type
//! (`subscriptions[0].channel: invalid type: integer 42, expected a string`) like an unknown
//! key (`subscriptions[0].sink.colour: unknown key`), in the configuration and in posted
//! bodies. serde_path_to_error tracks the path of an error, serde_ignored that of each
//! unknown key; a sink (an internally tagged enum, which serde reads through a buffer that
//! loses the path) reads its fields itself and hands the inner path up in its error.

use serde::de::{DeserializeOwned, Deserializer};

use super::Problem;

/// Separates the inner path a sink puts in front of its error message from the message.
pub(super) const INNER_PATH: char = '\u{1f}';

/// Reads `deserializer` into `T`; each unknown key's path goes to `unknown`, and the first
/// value that does not fit is the problem, named with its path.
///
/// # Errors
/// The problem, keyed by the path of the value that does not fit.
pub fn deserialize_named<'de, D, T>(deserializer: D, mut unknown: impl FnMut(String)) -> Result<T, Problem>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let mut callback = |path: serde_ignored::Path<'_>| unknown(super::key_path(&path));
    let ignored = serde_ignored::Deserializer::new(deserializer, &mut callback);
    serde_path_to_error::deserialize(ignored).map_err(|error| {
        let path = path_text(error.path());
        problem(path, &error.into_inner().to_string())
    })
}

/// A problem at `path` from an error message, which may start with an inner path (see
/// [`inner_error`]) and may be serde's "unknown field".
fn problem(path: String, message: &str) -> Problem {
    let (path, message) = match message.split_once(INNER_PATH) {
        Some((inner, message)) => (join(&path, inner), message.trim_start_matches(INNER_PATH).to_string()),
        None => (path, message.to_string()),
    };
    // The config crate adds its own idea of the key to some messages.
    let message = match message.find(" for key `") {
        Some(start) => message[..start].to_string(),
        None => message,
    };
    match message.strip_prefix("unknown field `").and_then(|rest| rest.split_once('`')) {
        // serde_path_to_error may have put the field in the path already.
        Some((field, _)) if path == field || path.ends_with(&format!(".{field}")) => {
            Problem::new(path, "unknown key")
        }
        Some((field, _)) => Problem::new(join(&path, field), "unknown key"),
        None => Problem::new(path, message),
    }
}

/// The error a sink's `Deserialize` returns when its fields do not fit: the path inside
/// the sink travels in front of the message, to be joined to the outer path.
pub(crate) fn inner_error<E: serde::de::Error>(error: serde_path_to_error::Error<serde_json::Error>) -> E {
    // The first segment is the variant the sink's `type` chose, not a key the user wrote.
    let path = path_text(error.path());
    let path = match path.split_once('.') {
        Some((_, inner)) => inner.to_string(),
        None => String::new(),
    };
    let message = error.into_inner().to_string();
    // serde_json adds a position to its messages; inside a value it is meaningless.
    let message = match message.rfind(" at line ") {
        Some(start) => &message[..start],
        None => message.as_str(),
    };
    E::custom(format!("{path}{INNER_PATH}{message}"))
}

/// `a.b[0].c`.
fn path_text(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut text = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => text.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => text = join(&text, key),
            Segment::Unknown => {}
        }
    }
    text
}

fn join(path: &str, key: &str) -> String {
    match (path.is_empty(), key.is_empty()) {
        (_, true) => path.to_string(),
        (true, false) => key.to_string(),
        (false, false) if key.starts_with('[') => format!("{path}{key}"),
        (false, false) => format!("{path}.{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_inner_paths_join_the_outer_path() {
        assert_eq!(
            problem("subscriptions[0].sink".into(), "unknown field `colour`, expected one of `url`"),
            Problem::new("subscriptions[0].sink.colour", "unknown key")
        );
        assert_eq!(
            problem("sink".into(), &format!("url{INNER_PATH}invalid type: integer `42`, expected a string")),
            Problem::new("sink.url", "invalid type: integer `42`, expected a string")
        );
        assert_eq!(
            problem("channel".into(), "invalid type: integer `42`, expected a string for key `channel`"),
            Problem::new("channel", "invalid type: integer `42`, expected a string")
        );
    }
}
